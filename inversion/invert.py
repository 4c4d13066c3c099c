"""Invert an image, or a folder of one person's images, into a w2w model, with the original inversion/invert.py's flags.

    # the tiny world (the defaults: --space files/tiny/space --base files/tiny/base)
    python inversion/invert.py --image inversion/images/face.png --save_name outputs/face

    # several photographs of one person, each cut around its face with an automatic mask
    python inversion/invert.py --imfolder photos/ --crop face --mask_path auto --save_name outputs/me

    # from the tiny world's encoder's prediction (w2w train-encoder), refined 40 steps; --epochs 0: the prediction
    python inversion/invert.py --image inversion/images/face.png --encoder files/tiny/encoder.safetensors \\
        --epochs 40 --save_name outputs/face_fast

    # a painting: the out-of-distribution preset's settings
    python inversion/invert.py --image inversion/images/drawing.png --preset ood --save_name outputs/drawing

    # Stable Diffusion 1.5 with the released files, converted on the fly (the .pt files are pickles:
    # --trust_pickle only for files from a source you trust); --epochs, --lr, --weight_decay and --dim
    # default to the original's settings
    python inversion/invert.py --base stablediffusionapi/realistic-vision-v51 --mean_path files/mean.pt \\
        --std_path files/std.pt --v_path files/V.pt --dim_path files/weight_dimensions.pt --trust_pickle \\
        --imfolder inversion/images/real --diffusers_format --save_name outputs/inversion1

Writes SAVE_NAME/w2wmodel.safetensors (the coefficients and the id of their space; `w2w export`
turns it into a LoRA) and, with --diffusers_format, SAVE_NAME/unet/, a PEFT/diffusers LoRA folder
that `pipe.load_lora_weights(SAVE_NAME + "/unet")` loads.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_w2w.defaults import DEFAULT_BASE, DEFAULT_SPACE
from lora_w2w.errors import W2WError, exit_code
from lora_w2w.faces import DETECTOR_HELP, DETECTORS
from lora_w2w.formats import PEFT_FOLDER
from lora_w2w.images import IMAGE_SUFFIXES
from lora_w2w.inversion import AUTO_MASK, CROPS, PRESETS
from lora_w2w.layout import LoraLayout, sd15_layout
from lora_w2w.official import OFFICIAL_BASE_MODEL, released_tensor
from lora_w2w.space import Space
from lora_w2w.storage import FILE, MODEL_FILE, check_outputs, torch_load
from lora_w2w.workbench import Workbench

FACE = Path(__file__).resolve().parent / "images" / "face.png"  # the default image, wherever this is run from


def preset_defaults(setting: str, format_spec: str = "") -> str:
    """What a flag defaults to: the preset's `setting` as the space records it, else the paper's."""
    paper = ", ".join(f"{name} {format(getattr(config, setting), format_spec)}" for name, config in PRESETS.items())
    return f"default: the preset's as the space records it, else the paper's: {paper}"


def released_space(args: argparse.Namespace) -> Space:
    """The space of the released mean.pt, std.pt, V.pt (N x K, memory-mapped: only its first --dim columns
    are read) and weight_dimensions.pt, in memory; its id is the one `w2w import-official` gives."""
    mean, std, basis = (released_tensor(Path(p), hint, args.trust_pickle, mmap=True)
                        for p, hint in ((args.mean_path, "(N,)"), (args.std_path, "(N,)"), (args.v_path, "(N, K)")))
    if args.dim_path:
        layout = LoraLayout.from_weight_dimensions(torch_load(Path(args.dim_path), args.trust_pickle),
                                                   source=args.dim_path)
    else:
        layout = sd15_layout()
    if basis.ndim != 2 or basis.shape[0] != layout.numel:
        raise W2WError(f"{args.v_path}: shape {tuple(basis.shape)}, expected (N, K) with N = {layout.numel}")
    return Space(mean.float().reshape(-1), std.float().reshape(-1), basis.T, layout, base_model=OFFICIAL_BASE_MODEL)


def folder_images(folder: Path) -> list[Path]:
    """The images of a folder by name, looking into sub-folders too (the original's ImageFolder layout)."""
    if not folder.is_dir():
        raise W2WError(f"{folder}: no such image folder")
    images = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise W2WError(f"{folder}: no image ({', '.join(IMAGE_SUFFIXES[:3])} ...) in the folder")
    return images


def image_masks(args: argparse.Namespace, images: list[Path]) -> list | None:
    """--mask_path: the one image's mask; None for none, or for `auto` (every image's automatic mask)."""
    if args.mask_path is None or args.mask_path == AUTO_MASK:
        return None
    if len(images) > 1:
        raise W2WError(f"--mask_path {args.mask_path}: one mask for {len(images)} images; give --mask_dir with a mask "
                       f"per image (same file names), or --mask_path {AUTO_MASK}")
    return [args.mask_path]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    space = parser.add_argument_group("space: --space, or the released files")
    space.add_argument("--space", default=None, help="w2w space directory (default: files/tiny/space)")
    space.add_argument("--mean_path", default=None, help="released mean.pt: the weights' means (N)")
    space.add_argument("--std_path", default=None, help="released std.pt: the weights' standard deviations (N)")
    space.add_argument("--v_path", default=None, help="released V.pt: the principal components (N x K)")
    space.add_argument("--dim_path", default=None,
                       help="released weight_dimensions.pt: the LoRA layers (default: Stable Diffusion 1.5's)")
    space.add_argument("--trust_pickle", action="store_true",
                       help="allow unpickling the released files when they need it (runs code from the file)")
    parser.add_argument("--base", default=None,
                        help=f"base diffusers pipeline: folder or hub id (default: files/tiny/base, or "
                             f"{OFFICIAL_BASE_MODEL} with the released files)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--imfolder", default=None,
                        help="folder of one person's images (sub-folders too), all inverted together: each step "
                             "draws one of them")
    source.add_argument("--image", default=None, help="the image to invert (default: inversion/images/face.png)")
    masks = parser.add_mutually_exclusive_group()
    masks.add_argument("--mask_path", default=None,
                       help=f"binary mask, white where the image is fitted; or {AUTO_MASK}: a mask over each image's face, "
                            f"forehead and hair from its landmarks")
    masks.add_argument("--mask_dir", default=None,
                       help="folder of masks paired with --imfolder's images by file name (NAME.png for NAME.jpg)")
    parser.add_argument("--crop", choices=CROPS, default="center",
                        help="center: resize and centre-crop; face: FFHQ's alignment of the largest face "
                             "(default: %(default)s)")
    parser.add_argument("--detector", choices=DETECTORS, default="hog",
                        help=f"for --crop face and --mask_path auto, {DETECTOR_HELP}")
    parser.add_argument("--preset", choices=tuple(PRESETS), default="real",
                        help="the settings --epochs, --lr, --weight_decay and --dim default to; real: photographs "
                             "of faces (the original's), ood: paintings and other out-of-distribution images "
                             "(default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"optimiser steps ({preset_defaults('steps')}); 0 with --encoder: its prediction alone")
    parser.add_argument("--encoder", default=None,
                        help="start from this encoder's prediction (`w2w train-encoder`) instead of zero")
    parser.add_argument("--lr", type=float, default=None, help=f"Adam learning rate ({preset_defaults('lr', 'g')})")
    parser.add_argument("--weight_decay", type=float, default=None,
                        help=f"Adam weight decay ({preset_defaults('weight_decay', 'g')})")
    parser.add_argument("--dim", type=int, default=None,
                        help=f"K, principal-component coefficients optimised ({preset_defaults('components', ',')}; "
                             f"at most the space's K)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the timesteps and noise (default: %(default)s)")
    parser.add_argument("--diffusers_format", action="store_true",
                        help="also write SAVE_NAME/unet/, a PEFT/diffusers LoRA folder")
    parser.add_argument("--save_name", default="outputs/inversion1",
                        help="output folder: SAVE_NAME/w2wmodel.safetensors (default: %(default)s)")
    parser.add_argument("--checkpoint", default=None,
                        help="file to save the run's state in every few steps; a run that finds it resumes from it, "
                             "so an interrupted inversion (Ctrl-C) goes on where it stopped")
    parser.add_argument("--checkpoint_every", type=int, default=None,
                        help="steps between the checkpoint's saves (default: 50)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda:0 ... (default: %(default)s)")
    args = parser.parse_args(argv)
    released = [args.mean_path, args.std_path, args.v_path]
    if any(released) and not all(released):
        parser.error("the released files need all three of --mean_path, --std_path and --v_path")
    if all(released) and args.space:
        parser.error("give either --space or the released files (--mean_path ...), not both")
    return args


def main(args: argparse.Namespace) -> None:
    out = Path(args.save_name)
    images = folder_images(Path(args.imfolder)) if args.imfolder else [Path(args.image or FACE)]
    space_path = None if args.mean_path else args.space or DEFAULT_SPACE
    mask = None if args.mask_path == AUTO_MASK else args.mask_path
    outputs = [(out / "w2wmodel.safetensors", MODEL_FILE), (args.checkpoint, FILE),
               (out / "unet" if args.diffusers_format else None, PEFT_FOLDER)]
    check_outputs(outputs, [*images, mask, args.mask_dir, space_path, args.mean_path, args.std_path, args.v_path,
                            args.dim_path, args.encoder])  # before any work: not inside an input's space, not over a device
    if args.mean_path:
        bench = Workbench(args.base or OFFICIAL_BASE_MODEL, released_space(args), args.device)
    else:
        bench = Workbench(args.base or DEFAULT_BASE, space_path, args.device)  # memory-mapped
    # the flags given, the others as the space records them for the preset (else the paper's)
    config = bench.inversion_config(args.preset, components=args.dim, lr=args.lr, weight_decay=args.weight_decay,
                                    steps=args.epochs, checkpoint_every=args.checkpoint_every)
    model, _ = bench.invert(images, image_masks(args, images), config, mask_dir=args.mask_dir,
                            auto_mask=args.mask_path == AUTO_MASK, crop=args.crop, detector=args.detector,
                            seed=args.seed, checkpoint=args.checkpoint,
                            encoder=bench.encoder(args.encoder) if args.encoder else None)
    print(f"wrote {bench.export(model, 'w2w', out / 'w2wmodel.safetensors')}")
    if args.diffusers_format:
        print(f"wrote {bench.export(model, 'peft', out / 'unet')}")


if __name__ == "__main__":
    sys.exit(exit_code("invert.py", lambda: main(parse_args())))  # bad input: one line, exit code 2, like `w2w`
