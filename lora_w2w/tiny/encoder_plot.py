"""The encoder section of `w2w evaluate`'s report drawn against time: identity similarity and attribute
agreement of held-out identities inverted from zero and from the encoder's prediction, a point per step count:

    python -m lora_w2w.tiny.encoder_plot --report files/tiny/evaluation.json --out assets/tiny_encoder.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import W2WError
from ..storage import atomic_output

PANELS = (("identity_similarity", "identity similarity (evaluator)"),
          ("attribute_agreement", "attributes read as the identity's"))
ZERO_AT = 1e-4  # where the log axis draws 0 s (zero-init's start); the encoder's forward pass takes about 1 ms
STYLES = {"zero": ("from zero (the paper's)", "o-"),
          "encoder": ("from the encoder's prediction (--init encoder)", "s-"),
          "encoder_low_lr": ("from the encoder's prediction, lr x {factor:g}", "^:")}


def plot_encoder(section: dict, path: Path) -> None:
    """One panel per PANELS metric against seconds, a curve per start, each point labelled with its steps; the
    identity panel marks the targets (1-image Dreambooth's score, zero-init's 400-step score)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(PANELS), figsize=(5.6 * len(PANELS), 4.0), layout="constrained")
    for ax, (key, label) in zip(axes, PANELS):
        for name, curve in section["curves"].items():
            legend, style = STYLES[name]
            legend = legend.format(factor=section["low_lr"] / section["config"]["lr"])
            seconds = [max(point["seconds"], ZERO_AT) for point in curve]  # log axis: zero-init's start drawn at ZERO_AT
            ax.plot(seconds, [point[key] for point in curve], style, label=legend)
            for point, x in zip(curve, seconds):
                ax.annotate(str(point["steps"]), (x, point[key]), textcoords="offset points", xytext=(3, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel(f"seconds, CPU time of one thread (log; 0 s drawn at {ZERO_AT:g}); labels: steps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    targets = section["targets"]["encoder"]
    axes[0].axhline(targets["encoder_alone"]["target"], color="gray", linestyle=":",
                    label="1-image Dreambooth-LoRA (Table 2)")
    axes[0].axhline(targets["encoder_40_steps"]["target"], color="gray", linestyle="--",
                    label=f"from zero, {targets['encoder_40_steps']['zero_steps']} steps")
    axes[0].legend(fontsize=8, loc="lower right")
    speedup, steps = targets["time_to_zero_last"]["speedup"], targets["time_to_zero_last"]["zero_steps"]
    figure.suptitle(f"Inversion of {section['identities']} held-out identities from one view; the time to the score "
                    f"of {steps} steps from zero is {'not reached' if speedup is None else f'{speedup:.1f}x shorter'} "
                    f"from the encoder")
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lora_w2w.tiny.encoder_plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", default="files/tiny/evaluation.json", help="report of `w2w evaluate --only "
                                                                               "encoder` (default: %(default)s)")
    parser.add_argument("--out", default="assets/tiny_encoder.png", help="picture to write (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        report = json.loads(Path(args.report).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise W2WError(f"{args.report}: not a readable report ({error})") from None
    if "encoder" not in report:
        raise W2WError(f"{args.report}: no encoder section; run `w2w evaluate --only encoder --out {args.report}`")
    plot_encoder(report["encoder"], Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    try:
        main()
    except W2WError as error:
        sys.exit(f"encoder_plot: error: {error}")
