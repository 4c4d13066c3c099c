"""`make tiny-world`: rebuild everything in files/tiny/ from seeds, each stage skipped when its output
exists (so an interrupted build resumes):

    1. base/                    the tiny SD pipeline (train_base.py; identities from seed 1,000,000)
    2. evaluator.safetensors    the attribute and trait reader (evaluator.py; seeds 20,000,000+)
    3. <work>/faces             the weights dataset's identities (seeds 0 .. M-1), 10 images each
    4. <work>/loras             one Dreambooth LoRA per identity that weights/ lacks (w2w train-identities)
    5. weights/                 the LoRAs in float16 (w2w collect): the tiny world's weights dataset,
                                committed, so that the space is rebuilt without the hours of training
    6. space/                   PCA of weights/ with the identities' attribute table (w2w build), and
                                its explained-variance curve (--plot, assets/tiny_explained_variance.png)

    python -m lora_w2w.tiny.build --out files/tiny --work data/tiny [--identities 1000] [--processes P]

On a CPU the LoRAs are trained by one single-thread `w2w train-identities` process per core, each
over its share of the identities (`--shard r/P`; their logs in <work>/train_<r>.log): the tiny UNet's
small ops keep threads waiting on each other, so processes go faster than threads.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..dataset import INDEX_JSON, WeightsDataset, collect_folders
from ..defaults import TINY
from ..errors import W2WError
from ..dreambooth import DreamboothConfig
from ..flags import OneSpellingFormatter, add_flag, config_argv
from ..space import Space
from ..storage import atomic_output, save_space

# The LoRA recipe of the tiny world's space, DreamboothConfig's values that differ from the paper's (its
# ablation: files/tiny/README.md, "The LoRA recipe").
LORA_RECIPE = {"lora_r": 4, "lora_alpha": 108, "lora_target_modules": ["to_q", "to_v"], "max_train_steps": 800,
               "learning_rate": 3e-3, "train_batch_size": 1, "num_class_images": 200, "class_inference_steps": 25}
# The inversion learning rates that suit the tiny space's coefficient scale, recorded in it (measured in
# files/tiny/README.md, "space/").
INVERSION_PRESETS = {"real": {"lr": 0.3}, "ood": {"lr": 0.1}}
WEIGHTS_SHARD_SIZE = 128  # models per shard file of weights/: files of a few MB


def stage_base(out: Path, work: Path) -> None:
    from . import train_base

    train_base.main(train_base.parse_args(["--out", str(out / "base"), "--work-dir", str(work / "base_checkpoints")]))


def stage_evaluator(out: Path, work: Path) -> None:
    from . import evaluator

    evaluator.main(evaluator.parse_args(["--out", str(out / "evaluator.safetensors"), "--vae", str(out / "base" / "vae")]))


def identity_table(identities: int) -> pd.DataFrame:
    """The attribute table (index "name") of the space's identities, seeds 0 .. identities - 1."""
    from .synthetic import attribute_row, sample_identity

    rows = [{"name": identity.name, **attribute_row(identity)} for identity in map(sample_identity, range(identities))]
    return pd.DataFrame(rows).set_index("name")


def collected(weights: Path) -> set[str]:
    """The identities the weights dataset `weights` holds (none when it does not exist yet)."""
    return set(WeightsDataset(weights).names) if (weights / INDEX_JSON).exists() else set()


def stage_loras(out: Path, work: Path, identities: int, identities_per_batch: int, processes: int) -> None:
    """Train the identities that weights/ lacks."""
    from .. import train_identities
    from .synthetic import write_dataset

    if set(identity_table(identities).index) <= collected(out / "weights"):
        print(f"identity LoRAs: all {identities} in {out / 'weights'}, skipped")
        return
    write_dataset(work / "faces", identities, first_seed=0)
    recipe = DreamboothConfig(**LORA_RECIPE, pretrained_model_name_or_path=str(out / "base"),
                              class_data_dir=str(work / "class_images"))
    argv = ["--instance-root", str(work / "faces" / "celeba_generated"), "--output-root", str(work / "loras"),
            "--identities-per-batch", str(identities_per_batch), *config_argv(recipe)]  # for each process too
    if collected(out / "weights"):
        argv += ["--skip-collected", str(out / "weights")]
    if processes == 1:
        code = train_identities.main(argv)
    else:
        train_identities.generate_class_images(train_identities.parse_args(argv))  # once, before the shares start
        command = [sys.executable, "-m", "lora_w2w.train_identities", *argv]
        code = train_in_processes(command, processes, work / "loras", identities, work)
    if code:
        raise W2WError(f"training the identity LoRAs failed (exit code {code}; logs in {work})")


def train_in_processes(command: list[str], processes: int, output_root: Path, total: int, log_dir: Path) -> int:
    """The training `command` (`w2w train-identities ...`) as `processes` processes over shares of the
    identities (`--shard r/P` appended), the cores split between them; a progress bar counts the finished
    identities. Ctrl-C or a SIGTERM stops them all. Returns the first non-zero exit code."""
    threads = max(1, (os.cpu_count() or 1) // processes)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log_dir.mkdir(parents=True, exist_ok=True)
    children = []
    terminated = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        for r in range(processes):
            with open(log_dir / f"train_{r}.log", "a") as log:
                children.append(subprocess.Popen([*command, "--shard", f"{r}/{processes}"], env=env, stdout=log,
                                                 stderr=subprocess.STDOUT))
        with tqdm(total=total, desc=f"identity LoRAs ({processes} processes, logs in {log_dir}/train_*.log)",
                  unit="identity") as bar:
            while any(child.poll() is None for child in children):
                time.sleep(2)
                bar.update(len(list(output_root.glob("*/unet/adapter_model.safetensors"))) - bar.n)
    finally:  # interrupted: stop the shares (each resumes its group in flight from its last checkpoint)
        signal.signal(signal.SIGTERM, terminated)
        for child in children:
            if child.poll() is None:
                child.terminate()
                child.wait()
    return next((child.returncode for child in children if child.returncode), 0)


def _exit_on_signal(signum: int, frame) -> None:
    """A SIGTERM exits like Ctrl-C does, through the `finally` blocks."""
    raise SystemExit(128 + signum)


def stage_weights(out: Path, work: Path) -> None:
    """Add the LoRAs trained in <work>/loras to out/weights, in float16."""
    if not (work / "loras").is_dir():
        print(f"weights: nothing trained in {work / 'loras'}, skipped")
        return
    print(collect_folders(work / "loras", out / "weights", base_model=str(out / "base"), shard_size=WEIGHTS_SHARD_SIZE,
                          dtype="float16"))


def stage_space(out: Path, work: Path, identities: int, components: int, picture: Path) -> None:
    """PCA of out/weights with all M - 1 components, its explained-variance plot, and the space with the
    first `components` of them written to out/space."""
    from ..pca import BuildConfig, build_space

    dataset = WeightsDataset(out / "weights")
    table = identity_table(identities)
    if list(dataset.names) != list(table.index):
        raise W2WError(f"{out / 'weights'} holds {len(dataset)} identities, the space is of {identities} (seeds 0 .. "
                       f"{identities - 1}); train the missing ones with `make tiny-world`")
    work.mkdir(parents=True, exist_ok=True)
    with atomic_output(work / "attributes.csv") as tmp:
        table.to_csv(tmp)
    space = build_space(dataset, k=len(dataset) - 1,
                        config=BuildConfig(attributes=work / "attributes.csv", base_model=str(out / "base")), log=print)
    kept = min(components, space.num_components)
    plot_explained_variance(space, kept, picture)
    save_space(dataclasses.replace(space.truncate(kept), inversion_presets=INVERSION_PRESETS), out / "space")


def plot_explained_variance(space: Space, kept: int, picture: Path) -> None:
    """The cumulative explained variance of all of the space's components, marking the `kept` ones."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cumulative = space.explained_variance_ratio().cumsum(0).numpy()
    k = len(cumulative)
    figure, axis = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    axis.plot(range(1, k + 1), cumulative)
    for level, label_at in ((0.5, 0.35), (0.9, 0.62), (0.99, 0.78)):  # labels stacked below the curve
        needed = int((cumulative < level).sum()) + 1
        axis.annotate(f"{level:.0%}: {needed} components", (needed, level), xytext=(0.6 * k if level > 0.5
                      else needed + 0.1 * k, label_at), arrowprops={"arrowstyle": "->"})
    axis.axvline(kept, color="gray", linestyle="--")
    axis.annotate(f"kept: K = {kept} ({cumulative[kept - 1]:.0%})", (kept, 0.05), xytext=(kept + 0.02 * k, 0.05))
    axis.set(xlabel=f"principal components (M = {space.num_models} identity LoRAs, N = {space.num_weights})",
             ylabel="cumulative explained variance", ylim=(0, 1.02), xlim=(0, k))
    axis.grid(alpha=0.3)
    figure.tight_layout()
    picture.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(picture) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=OneSpellingFormatter)
    parser.add_argument("--out", default=str(TINY), help="where the committed artifacts go (default: %(default)s)")
    parser.add_argument("--work", default="data/tiny", help="intermediate files, not committed (default: %(default)s)")
    parser.add_argument("--identities", type=int, default=1000, help="M, identities of the space (default: %(default)s)")
    parser.add_argument("--components", type=int, default=250,
                        help="K kept in the space, at most M - 1 (default: %(default)s, chosen in "
                             "the tiny world's README.md)")
    parser.add_argument("--plot", default="assets/tiny_explained_variance.png",
                        help="the explained-variance plot of the space (default: %(default)s)")
    add_flag(parser, "identities_per_batch", kebab=True, type=int, default=32,
             help="identities trained together (default: %(default)s)")
    parser.add_argument("--processes", type=int, default=None,
                        help="training processes sharing the cores (default: one per core on a CPU, 1 with CUDA)")
    args = parser.parse_args(argv)
    if args.processes is None:
        args.processes = 1 if torch.cuda.is_available() else os.cpu_count() or 1
    if args.processes < 1:
        parser.error(f"--processes must be >= 1, got {args.processes}")
    return args


def main(args: argparse.Namespace) -> int:
    out, work = Path(args.out), Path(args.work)
    stages = [
        ("base model", out / "base" / "model_index.json", lambda: stage_base(out, work)),
        ("evaluator", out / "evaluator.safetensors", lambda: stage_evaluator(out, work)),
        ("identity LoRAs", None, lambda: stage_loras(out, work, args.identities, args.identities_per_batch,
                                                               args.processes)),
        ("weights", None, lambda: stage_weights(out, work)),
        ("space", out / "space" / "space.json", lambda: stage_space(out, work, args.identities, args.components,
                                                                   Path(args.plot))),
    ]
    for name, done, run in stages:
        if done is not None and done.exists():
            print(f"{name}: {done} exists, skipped")
            continue
        print(f"{name}: building")
        run()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(parse_args()))
    except W2WError as error:
        sys.exit(f"lora_w2w.tiny.build: error: {error}")
