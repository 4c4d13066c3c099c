"""The scaling curves of `w2w evaluate`'s report, drawn as the paper's Figs 9/10 (against the number of
models in the space) and 30 (against the number of components):

    python -m lora_w2w.tiny.scaling_plots --report files/tiny/evaluation.json --out assets
    # -> assets/tiny_scaling_models.png, assets/tiny_scaling_components.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..defaults import DEFAULT_EVALUATION
from ..errors import W2WError
from ..storage import atomic_output

MODELS_PNG = "tiny_scaling_models.png"
COMPONENTS_PNG = "tiny_scaling_components.png"
# (report key, axis label, title, y range or None for matplotlib's) of each panel of the models figure
MODEL_PANELS = (
    ("inversion_identity_similarity", "identity similarity", "inversion (Fig 10: ID score)", None),
    ("edit_entanglement", "share of the other attributes changed", "3-std edits (Fig 9: entanglement)", (0, None)),
    ("sampling_consistency", "attributes agreeing across seeds", "sampling consistency", (0.5, 1)),
)


def _save(figure, path: Path) -> None:
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_models(rows: list[dict], path: Path) -> None:
    """One panel per MODEL_PANELS metric against M, log scale."""
    import matplotlib.pyplot as plt

    models = [row["models"] for row in rows]
    figure, axes = plt.subplots(1, len(MODEL_PANELS), figsize=(4.8 * len(MODEL_PANELS), 3.8), layout="constrained")
    for ax, (key, label, title, limits) in zip(axes, MODEL_PANELS):
        ax.plot(models, [row[key] for row in rows], "o-")
        ax.set_xscale("log")
        ax.set_xlabel("models in the space (M; K = min(M - 1, the space's))")
        ax.set_ylabel(label)
        ax.set_title(title)
        if limits is not None:
            ax.set_ylim(*limits)
        ax.grid(alpha=0.3)
    figure.suptitle("The tiny world against the number of models in the space (paper: Figs 9 and 10)")
    _save(figure, path)
    plt.close(figure)


def plot_components(rows: list[dict], path: Path) -> None:
    """Inversion identity similarity against K, log scale."""
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(5, 3.6), layout="constrained")
    ax.plot([row["components"] for row in rows], [row["inversion_identity_similarity"] for row in rows], "o-")
    ax.set_xscale("log")
    ax.set_xlabel("components optimised (K)")
    ax.set_ylabel("identity similarity")
    ax.set_title("Tiny world: inversion against K, 1,000 models (paper: Fig 30)")
    ax.grid(alpha=0.3)
    _save(figure, path)
    plt.close(figure)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lora_w2w.tiny.scaling_plots", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--report", default=DEFAULT_EVALUATION, help="w2w evaluate's JSON report")
    parser.add_argument("--out", default="assets", help=f"folder of {MODELS_PNG} and {COMPONENTS_PNG}")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> list[Path]:
    path = Path(args.report)
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise W2WError(f"{path}: not a readable JSON report ({error})") from None
    missing = [key for key in ("scaling_models", "scaling_components") if key not in report]
    if missing:
        raise W2WError(f"{path}: no {' or '.join(missing)} section; run `w2w evaluate --only {' '.join(missing)}`")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_models(report["scaling_models"], out / MODELS_PNG)
    plot_components(report["scaling_components"], out / COMPONENTS_PNG)
    return [out / MODELS_PNG, out / COMPONENTS_PNG]


if __name__ == "__main__":
    try:
        print("\n".join(map(str, main(parse_args()))))
    except W2WError as error:
        print(f"scaling_plots: error: {error}", file=sys.stderr)
        sys.exit(2)
