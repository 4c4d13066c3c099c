"""Train many identity LoRAs in one pass over the frozen base model.

    w2w train-identities --instance-root data/faces/celeba_generated --output-root loras --identities-per-batch 16

Each sub-folder of --instance-root is one identity. K identities share every forward pass: each
LoRA layer holds K rank-r LoRAs (`LoraBank`, lora_A (K, r, in), lora_B (K, out, r)) and sample k of
the batch goes through LoRA k (a batched matmul, the batch ordered identity-major). The loss is the
sum of the identities' Dreambooth losses, so each identity's gradients and AdamW state are those of
its solo `train_dreambooth.py` run with the same seed; its batches, latents, noise and timesteps
come from its own `StepSampler`. Instance latents, text embeddings and class latents are cached once.

Each finished identity is written as `<output-root>/<name>/unet/` (the format of train_dreambooth.py)
atomically, with its training settings in the metadata; on restart finished identities are skipped, and
a restart with other settings is refused (one weights dataset must not mix recipes). With
--skip-collected DATASET the identities a weights dataset holds count as finished too, so that folders
may be deleted once `w2w collect` has them. The K identities in flight save their state every
--checkpointing-steps steps, and a restart resumes them from it, so a killed job loses at most those steps.

P processes split the identities: process r trains identities r, r + P, r + 2P, ...

    torchrun --standalone --nproc_per_node P -m lora_w2w.train_identities ...          # P processes on a CPU
    accelerate launch --multi_gpu --num_processes P -m lora_w2w.train_identities ...   # P GPUs
    for r in 0 1 2 3; do w2w train-identities ... --shard $r/4 & done; wait            # no launcher

Each identity is locked while it trains (<output-root>/.locks/), so runs into one output root never train
the same identity: a second run takes the identities the first has not reached. A process whose launcher
died finishes its group in flight and stops (`w2w train-identities` started without a launcher goes on).
The flags are kebab-case; their underscore spellings (`--identities_per_batch`, the original
train_dreambooth.py's `--learning_rate` ...) are taken too.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.models.activations import GEGLU
from torch import nn
from tqdm.auto import tqdm

from .dreambooth import (DreamboothConfig, IdentityData, SharedData, accumulated_step, add_dreambooth_arguments,
                         ensure_class_images, identities_loss, initial_lora_weights, load_base, load_image_folder,
                         lora_layout, lr_lambda, prepare_identity, prepare_shared, training_settings)
from .dataset import WeightsDataset
from .errors import LayoutError, W2WError
from .flags import OneLineParser, OneSpellingFormatter, add_flag, config_from_args
from .formats import PEFT_WEIGHTS, recorded_training, save_peft
from .launch import IdentityLocks, LauncherWatch, uses_cpu_backend, world_warning
from .layout import LoraLayout
from .storage import load_state, save_state

GROUP_CHECKPOINT_FORMAT = "w2w-train-identities-checkpoint"


class LoraBank(nn.Module):
    """K LoRAs on one Linear layer: y_k = W x_k + scaling * B_k A_k x_k for the k-th block of the batch."""

    def __init__(self, base: nn.Linear, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(lora_a)  # (K, r, in)
        self.lora_B = nn.Parameter(lora_b)  # (K, out, r)
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.lora_A.shape[0]
        shape = x.shape                                                  # (K * n, L, in)
        x_k = x.reshape(k, -1, shape[-1])                                # (K, n * L, in)
        h = torch.bmm(x_k, self.lora_A.transpose(1, 2).to(x.dtype))      # (K, n * L, r)
        y = self.base(x_k)                                               # (K, n * L, out)
        y = torch.baddbmm(y, h, self.lora_B.transpose(1, 2).to(x.dtype), alpha=self.scaling)  # y + s B_k A_k x
        return y.reshape(*shape[:-1], -1)


def install_banks(unet: nn.Module, layout: LoraLayout, initial: torch.Tensor) -> dict[str, LoraBank]:
    """Put a LoraBank on every layer of the layout, started from initial (K, N); returns them by name."""
    banks = {}
    for name, (lora_a, lora_b) in layout.split(initial).items():  # (K, r, in), (K, out, r)
        current = unet.get_submodule(name)
        base = current.base if isinstance(current, LoraBank) else current
        banks[name] = LoraBank(base, lora_a.clone().to(base.weight.device), lora_b.clone().to(base.weight.device),
                               layout.scaling)
        unet.set_submodule(name, banks[name])
    return banks


class SplitGEGLU(nn.Module):
    """diffusers' GEGLU, h * gelu(g) with (h, g) = proj(x), as two Linears over proj's halves: h and g come out
    contiguous, where chunking proj(x) leaves both strided, and a CPU runs gelu and its backward faster on
    contiguous tensors (benchmarks/README.md, "GEGLU split")."""

    def __init__(self, geglu: GEGLU):
        super().__init__()
        self.proj = geglu.proj  # shared, not copied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.proj.weight, self.proj.bias  # (2 * out, in), (2 * out,)
        half = weight.shape[0] // 2
        h = F.linear(x, weight[:half], None if bias is None else bias[:half])
        g = F.linear(x, weight[half:], None if bias is None else bias[half:])
        return h * F.gelu(g)


def split_geglus(unet: nn.Module) -> dict[str, GEGLU]:
    """Replace every GEGLU of `unet` by a SplitGEGLU; returns the originals by name (for `restore`)."""
    originals = {name: module for name, module in unet.named_modules() if type(module) is GEGLU}
    for name, geglu in originals.items():
        unet.set_submodule(name, SplitGEGLU(geglu))
    return originals


def restore(unet: nn.Module, originals: dict[str, nn.Module]) -> None:
    """Put the modules `originals` back at their names."""
    for name, module in originals.items():
        unet.set_submodule(name, module)


@contextmanager
def identity_banks(unet: nn.Module, layout: LoraLayout, initial: torch.Tensor) -> Iterator[dict[str, LoraBank]]:
    """Inside, `unet` trains K identities at once: a LoraBank started from initial (K, N) on every layer
    of the layout (yielded by name) and its GEGLUs split; afterwards the UNet is as it was."""
    banks = install_banks(unet, layout, initial)
    geglus = split_geglus(unet)
    try:
        yield banks
    finally:
        restore(unet, geglus)
        restore(unet, {name: bank.base for name, bank in banks.items()})


def train_group(unet: nn.Module, layout: LoraLayout, identities: list[IdentityData], shared: SharedData,
                args: argparse.Namespace, accelerator: Accelerator, checkpoint: Path | None = None) -> torch.Tensor:
    """Train the LoRAs of `identities` together; returns their flat weights (K, N). With `checkpoint`, the
    group's state is saved there every args.checkpointing_steps steps, and a group finding its own
    state there resumes from it and ends exactly where an uninterrupted run ends."""
    k = len(identities)
    initial = initial_lora_weights(layout, args.seed).expand(k, -1)  # every run starts as a solo run does
    with identity_banks(unet, layout, initial) as banks:
        params = [p for bank in banks.values() for p in (bank.lora_A, bank.lora_B)]
        optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.adam_weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.lr_scheduler, args.max_train_steps))
        state = GroupState(checkpoint, identities, banks, optimizer, schedule, training_settings(args))
        start = state.resume() if checkpoint is not None and checkpoint.is_file() else 0
        names = ", ".join(i.name for i in identities[:3]) + (" ..." if k > 3 else "")
        progress = tqdm(range(start, args.max_train_steps), initial=start, total=args.max_train_steps,
                        desc=f"{k} identities ({names})", leave=False, disable=not accelerator.is_local_main_process)
        for step in progress:
            loss = accumulated_step(lambda: identities_loss(unet, identities, shared, args, accelerator.autocast),
                                    optimizer, args.gradient_accumulation_steps)
            schedule.step()
            progress.set_postfix(loss=f"{loss.item() / k:.4f}")
            if checkpoint is not None and (step + 1) % args.checkpointing_steps == 0 and step + 1 < args.max_train_steps:
                state.save(step + 1)
        return layout.join({name: (bank.lora_A.detach().cpu(), bank.lora_B.detach().cpu())
                            for name, bank in banks.items()})


class GroupState:
    """The in-flight state of a group of identities in one file: the LoRA banks, AdamW and the schedule,
    each identity's random stream, the step, and the identities' names and settings it belongs to."""

    def __init__(self, path: Path | None, identities: list[IdentityData], banks: dict[str, LoraBank],
                 optimizer: torch.optim.Optimizer, schedule, settings: dict):
        self.path, self.identities, self.banks = path, identities, banks
        self.optimizer, self.schedule = optimizer, schedule
        self.key = {"names": [i.name for i in identities], "settings": json.loads(json.dumps(settings))}

    def save(self, step: int) -> None:
        """Write the state after `step` steps (atomically)."""
        save_state(self.path, GROUP_CHECKPOINT_FORMAT, {
            **self.key, "step": step, "lora_A": [b.lora_A.detach().cpu() for b in self.banks.values()],
            "lora_B": [b.lora_B.detach().cpu() for b in self.banks.values()], "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(), "rng": [i.sampler.generator.get_state() for i in self.identities]})

    def resume(self) -> int:
        """Restore the state saved at `path` and return its step; 0 (with a warning) when the file holds
        another group's state or cannot be read: the group then starts over."""
        try:
            state = load_state(self.path, GROUP_CHECKPOINT_FORMAT)
        except W2WError as error:
            warnings.warn(f"{self.path}: unreadable checkpoint ignored, the group starts over ({error})", stacklevel=2)
            return 0
        if {key: state.get(key) for key in self.key} != self.key:
            warnings.warn(f"{self.path}: a checkpoint of other identities or settings, ignored (the group starts "
                          f"over and replaces it)", stacklevel=2)
            return 0
        with torch.no_grad():
            for bank, lora_a, lora_b in zip(self.banks.values(), state["lora_A"], state["lora_B"]):
                bank.lora_A.copy_(lora_a)
                bank.lora_B.copy_(lora_b)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        for identity, rng in zip(self.identities, state["rng"]):
            identity.sampler.generator.set_state(rng)
        return int(state["step"])


def identity_folders(root: Path) -> list[Path]:
    """The identity folders under `root`, in alphanumeric order of their names."""
    if not root.is_dir():
        raise W2WError(f"{root}: no such folder of identities")
    folders = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)
    if not folders:
        raise W2WError(f"{root}: no identity folders (expected one sub-folder of images per identity)")
    return folders


def finished(output_root: Path, folders: list[Path], settings: dict) -> set[str]:
    """The names of the identities of `folders` already trained in `output_root`; W2WError when any of
    them was trained with other settings than `settings` (adapters without recorded settings pass)."""
    settings = json.loads(json.dumps(settings))  # as recorded: tuples become lists
    done, other = set(), {}
    for folder in folders:
        adapter = output_root / folder.name / "unet"
        if (adapter / PEFT_WEIGHTS).is_file():
            done.add(folder.name)
            recorded = recorded_training(adapter)
            if recorded is not None and recorded != settings:
                other[folder.name] = recorded
    if other:
        name, recorded = next(iter(other.items()))
        changes = ", ".join(f"{key} {recorded.get(key)!r} (asked now: {value!r})" for key, value in settings.items()
                            if recorded.get(key) != value)
        raise W2WError(f"{output_root}: {len(other)} identities (the first: {name}) were trained with other settings: "
                       f"{changes}; give another --output-root, or delete them to train them again")
    return done


def collected(dataset: Path, layout: LoraLayout) -> set[str]:
    """The model names of the weights dataset `dataset`; LayoutError when its LoRAs are not of `layout`
    (a dataset of another recipe)."""
    held = WeightsDataset(dataset)
    mismatch = held.layout.describe_mismatch(layout)
    if mismatch:
        raise LayoutError(f"{dataset}: the dataset's LoRAs are not the ones trained here ({mismatch}); give the "
                          f"dataset of this recipe")
    return set(held.names)


def run_args(recipe: DreamboothConfig, instance_root: str | Path, output_root: str | Path,
             **settings) -> argparse.Namespace:
    """What `train_identities` takes, for a library caller: the Dreambooth `recipe`, the two folders, and any
    other setting of `w2w train-identities` by its name (identities_per_batch=16 ...; the rest its defaults)."""
    defaults = {action.dest: action.default for action in build_parser()._actions if action.dest != "help"}
    unknown = sorted(set(settings) - set(defaults))
    if unknown:
        raise W2WError(f"no setting {', '.join(unknown)} in w2w train-identities; expected some of "
                       f"{', '.join(defaults)}")
    folders = dict(instance_root=str(instance_root), output_root=str(output_root))
    return argparse.Namespace(**defaults | dataclasses.asdict(recipe) | settings | folders)


def build_parser() -> argparse.ArgumentParser:
    launching = __doc__[__doc__.index("P processes split"):__doc__.index("The flags are kebab-case")]
    parser = OneLineParser(prog="w2w train-identities", description=__doc__.split("\n\n")[0],
                           epilog=launching.strip(), formatter_class=OneSpellingFormatter)
    add = functools.partial(add_flag, parser, kebab=True)
    add("instance_root", required=True, help="folder with one sub-folder of images per identity")
    add("output_root", required=True, help="<output-root>/<identity>/unet/ is written per identity")
    add("identities_per_batch", type=int, default=16,
        help="K, identities trained together in one pass (default: %(default)s)")
    add("limit", type=int, default=None, help="train only the first LIMIT identities")
    add("shard", default=None, metavar="R/P",
        help="train only share R of P (identities R, R + P, ...; R from 0), for P processes started without a "
             "launcher (default: the launcher's process index and count)")
    add("skip_collected", metavar="DATASET",
        help="a weights dataset (made by `w2w collect` from earlier runs): the identities it holds count as "
             "finished, so their folders may be deleted once collected")
    add("checkpointing_steps", type=int, default=100,
        help="save the state of the identities in flight every N steps (0: never), in "
             "<output-root>/.checkpoint-<first identity>.pt; a restart resumes from it (default: %(default)s)")
    add_dreambooth_arguments(parser, kebab=True)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config_from_args(DreamboothConfig, args)  # the recipe's checks, naming the flags
        if args.identities_per_batch < 1:
            raise W2WError(f"--identities-per-batch must be >= 1, got {args.identities_per_batch}")
        if args.checkpointing_steps < 0:
            raise W2WError(f"--checkpointing-steps must be >= 0, got {args.checkpointing_steps}")
        if args.shard is not None:
            args.shard = parse_shard(args.shard)
    except W2WError as error:
        parser.error(str(error))
    return args


def parse_shard(text: str) -> tuple[int, int]:
    """"R/P" -> (R, P) with 0 <= R < P."""
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise W2WError(f"--shard must be R/P with 0 <= R < P, such as 0/4; got {text!r}")
    return int(index), int(count)


def train_identities(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Train every unfinished identity of this process's share that no other process holds; returns the
    names trained and the names of the identities whose folders were refused (no images, a corrupt image),
    which are skipped."""
    launcher = LauncherWatch()  # first: a launcher that dies while the base loads is noticed too
    accelerator = make_accelerator(args)
    share, (index, count) = process_share(args, accelerator)
    settings = training_settings(args)
    output_root = Path(args.output_root)
    done = finished(output_root, share, settings)  # before the base loads: a wrong restart fails fast
    base = load_base(args.pretrained_model_name_or_path, accelerator.device)
    layout = lora_layout(base, args)
    if args.skip_collected:
        done |= collected(Path(args.skip_collected), layout)
    todo = [f for f in share if f.name not in done]
    resolution = args.resolution or base.resolution
    with accelerator.main_process_first(), class_images_lock(args):  # class images are generated once
        shared = prepare_shared(base, args, resolution, class_folder(args))
    locks, pending, trained, refused = IdentityLocks(output_root), iter(todo), [], []

    def written(name: str) -> bool:  # by another process since `todo` was made
        return (output_root / name / "unet" / PEFT_WEIGHTS).is_file()

    with tqdm(total=len(todo), desc=f"identities (share {index} of {count})", unit="identity",
              disable=not accelerator.is_local_main_process) as progress:
        while not launcher.gone:
            group, passed = locks.claim_group(pending, args.identities_per_batch, written)
            if not group:
                break
            try:
                identities = prepare_group(group, base, shared, args, resolution, refused)
                if identities:
                    train_and_save_group(base.network, layout, identities, shared, args, accelerator, settings,
                                         len(trained))
                    trained += [identity.name for identity in identities]
            finally:
                locks.release([folder.name for folder in group])
            progress.update(passed + len(group))
    if launcher.gone:
        warnings.warn(f"the launcher (process {launcher.pid}) is gone: stopped after {len(trained)} identities; "
                      f"launch again to train the rest", stacklevel=2)
    return trained, refused


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    """accelerate's state for this process: its CPU backend when a launcher started several processes and
    there is no CUDA; a warning when the world is 1 although the launcher was asked for more."""
    cpu = uses_cpu_backend(cuda=torch.cuda.is_available())
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=cpu)
    warning = world_warning(accelerator.num_processes)
    if warning:
        warnings.warn(warning, stacklevel=3)
    return accelerator


def process_share(args: argparse.Namespace, accelerator: Accelerator) -> tuple[list[Path], tuple[int, int]]:
    """The identity folders this process trains (share R of P: --shard, else accelerate's process index
    and count, of the first --limit identities) and (R, P)."""
    folders = identity_folders(Path(args.instance_root))[: args.limit]
    index, count = args.shard or (accelerator.process_index, accelerator.num_processes)
    return folders[index::count], (index, count)


def class_folder(args: argparse.Namespace) -> Path:
    """Where the run's class images are: --class-data-dir, else <output-root>/class_images."""
    return Path(args.class_data_dir or Path(args.output_root) / "class_images")


def class_images_lock(args: argparse.Namespace):
    """The lock of the run's class folder (`.<folder>.lock` beside it) when it trains with class images: a
    process generating them holds it, and other runs sharing the folder wait, then find them made."""
    from filelock import FileLock

    if not args.with_prior_preservation:
        return nullcontext()
    folder = class_folder(args)
    folder.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(folder.parent / f".{folder.name}.lock")


def generate_class_images(args: argparse.Namespace) -> None:
    """Generate the class images that training with `args` needs and its class folder lacks, as training
    does first: processes started afterwards over shares of the identities find them made."""
    if not args.with_prior_preservation:
        return
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    base = load_base(args.pretrained_model_name_or_path, accelerator.device)
    with class_images_lock(args):
        ensure_class_images(args.pretrained_model_name_or_path, class_folder(args), args.class_prompt,
                            args.num_class_images, args.resolution or base.resolution, args.class_inference_steps,
                            args.seed, accelerator.device)


def prepare_group(folders: list[Path], base, shared: SharedData, args: argparse.Namespace, resolution: int,
                  refused: list[str]) -> list[IdentityData]:
    """The cached inputs of the identities of `folders`; a folder that cannot be read is warned about,
    added to `refused` and left out (one bad folder must not stop hours of training)."""
    identities = []
    for folder in folders:
        try:
            images = load_image_folder(folder, resolution)
        except W2WError as error:
            warnings.warn(f"identity {folder.name} skipped: {error}", stacklevel=3)
            refused.append(folder.name)
            continue
        identities.append(prepare_identity(folder.name, images, base, shared, args))
    return identities


def train_and_save_group(unet: nn.Module, layout: LoraLayout, identities: list[IdentityData], shared: SharedData,
                         args: argparse.Namespace, accelerator: Accelerator, settings: dict,
                         finished_before: int) -> None:
    """Train a group (checkpointed under --output-root when --checkpointing-steps asks), write each
    identity's adapter, then drop the group's checkpoint; out of memory is an error that says what to do."""
    output_root = Path(args.output_root)
    checkpoint = output_root / f".checkpoint-{identities[0].name}.pt" if args.checkpointing_steps else None
    try:
        weights = train_group(unet, layout, identities, shared, args, accelerator, checkpoint)  # (K, N)
    except torch.OutOfMemoryError:
        raise W2WError(f"out of memory training {len(identities)} identities at once on {accelerator.device}: "
                       f"pass a smaller --identities-per-batch (on SD1.5 at 512 px a step needs about "
                       f"4.0 + 3.1 K GiB in float32); the {finished_before} identities finished are kept and a "
                       f"restart goes on from there") from None
    for identity, w in zip(identities, weights):
        save_peft(layout, w, output_root / identity.name / "unet", args.pretrained_model_name_or_path, settings,
                  shared.family.lora_naming())
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        trained, refused = train_identities(args)
    except W2WError as error:
        print(f"w2w train-identities: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # finished identities and the last checkpoint are kept: a rerun goes on from them
        print("w2w train-identities: interrupted", file=sys.stderr)
        return 130
    print(f"trained {len(trained)} identities into {args.output_root}")
    if refused:
        print(f"w2w train-identities: error: {len(refused)} identity folders refused: {', '.join(refused)}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
