"""`make demo`: the tiny world end to end on the CPU, written to outputs/demo/ with a report.

    python -m lora_w2w.demo --out outputs/demo

Each stage runs when the tiny world's artifacts it needs are in files/tiny/ and says so in the
report when they are not.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .pipeline import DEFAULT_BASE, generate, image_grid, load_base_pipeline
from .storage import atomic_output

FACE_SEEDS = range(3_000_000, 3_000_016)  # identities of no training set


def save_png(image, path: Path) -> None:
    with atomic_output(path) as tmp:
        image.save(tmp, format="PNG")


def stage_faces(out: Path) -> dict:
    """Synthetic identities of the tiny world, 4 views each."""
    from .tiny.faces import render_grid

    save_png(render_grid(list(FACE_SEEDS), views=4), out / "faces.png")
    return {"images": "faces.png", "identities": len(FACE_SEEDS)}


def stage_base(out: Path, base: str, device: str) -> dict:
    """The tiny base model's samples for a few prompts."""
    pipe = load_base_pipeline(base, device, progress=False)
    prompts = ["a photo of a person", "a photo of a young woman with blond hair",
               "a photo of an old man with a bald head and glasses", "a photo of a man with black hair and a beard"]
    images = [image for prompt in prompts for image in generate(pipe, None, None, prompt, seeds=range(4),
                                                                  num_inference_steps=25)]
    save_png(image_grid(images, columns=4), out / "base_samples.png")
    return {"images": "base_samples.png", "prompts": prompts}


def write_report(out: Path, stages: dict) -> None:
    (out / "report.json").write_text(json.dumps(stages, indent=2))
    lines = ["# weights2weights demo: the tiny world", ""]
    for name, result in stages.items():
        lines.append(f"## {name}")
        if "skipped" in result:
            lines.append(f"Skipped: {result['skipped']}")
        else:
            lines += [f"![{name}]({result['images']})", "", f"{result['seconds']:.1f} s"]
        lines.append("")
    (out / "report.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the tiny world end to end and write a report.")
    parser.add_argument("--out", default="outputs/demo", help="output folder (default: %(default)s)")
    parser.add_argument("--base", default=DEFAULT_BASE, help="base pipeline (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda ... (default: auto)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base_ready = (Path(args.base) / "model_index.json").is_file() or not args.base.startswith("files/")
    plan = [
        ("synthetic identities", lambda: stage_faces(out), None),
        ("tiny base model", lambda: stage_base(out, args.base, args.device),
         None if base_ready else f"{args.base} is not built yet (make tiny-world)"),
    ]
    stages = {}
    for name, run, skipped in plan:
        if skipped:
            stages[name] = {"skipped": skipped}
            continue
        start = time.perf_counter()
        stages[name] = {**run(), "seconds": time.perf_counter() - start}
        print(f"{name}: {stages[name]['seconds']:.1f} s")
    write_report(out, stages)
    print(f"wrote {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
