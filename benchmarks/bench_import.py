"""`import lora_w2w` with its top-level exports loaded on first use (PEP 562, lora_w2w/__init__.py) against
importing them up front, as an eager `__init__` would: each a fresh Python process, alternated, in the same run.

    python benchmarks/bench_import.py [--repeats 5]

Every `w2w` command imports the package first (`w2w --help` too), so this is the time each pays before
parsing its flags. The last line is one JSON object {"benchmark": "import", "ratio": <lazy seconds / eager
seconds>, "lazy_s": ..., "eager_s": ..., "repeats": ...}, the medians of --repeats.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAZY = "import lora_w2w"
EAGER = "import lora_w2w; [getattr(lora_w2w, name) for name in lora_w2w.EXPORTS]"  # every export loaded


def seconds(code: str) -> float:
    """Wall seconds of a fresh interpreter running `code` from the checkout."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of each, alternated (default: %(default)s)")
    args = parser.parse_args(argv)
    lazy, eager = [], []
    for _ in range(args.repeats):
        lazy.append(seconds(LAZY))
        eager.append(seconds(EAGER))
    result = {"benchmark": "import", "lazy_s": round(statistics.median(lazy), 3),
              "eager_s": round(statistics.median(eager), 3), "repeats": args.repeats}
    result["ratio"] = round(result["lazy_s"] / result["eager_s"], 3)
    print(f"import lora_w2w: {result['lazy_s']:.2f} s lazy, {result['eager_s']:.2f} s with every export loaded "
          f"(medians of {args.repeats})")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
