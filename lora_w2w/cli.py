"""The `w2w` command line. `w2w --help` lists the commands, `w2w COMMAND --help` explains each.

Bad input (a missing or corrupt file, a layout that does not fit, a K larger than the space ...)
prints one line `w2w: error: ...` and exits with code 2; nothing half-written is left behind.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import W2WError

DEFAULT_SPACE = "files/tiny/space"


# ----------------------------------------------------------------------------- commands

def cmd_info(args) -> None:
    from .info import describe

    print(describe(Path(args.path)))


def cmd_export(args) -> None:
    from .formats import save_lora
    from .storage import load_model, load_space

    model = load_model(args.model)
    space = load_space(args.space, k=len(model.coefficients))
    weights = model.weights(space)
    out = save_lora(space.layout, weights, args.out, args.format, space.base_model)
    print(f"wrote {args.format} LoRA {out}")


def cmd_import_official(args) -> None:
    from .official import import_official
    from .space import W2WModel
    from .storage import load_model, save_model

    if args.model:
        model = load_model(args.src)
        save_model(W2WModel(model.coefficients, args.space_id), args.dst)
        print(f"wrote model {args.dst} ({len(model.coefficients)} coefficients)")
        return
    space = import_official(args.src, args.dst, trust_pickle=args.trust_pickle)
    print(f"wrote space {args.dst}: N = {space.num_weights}, K = {space.num_components}, M = {space.num_models}")


# ----------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="w2w", description="weights2weights: sample, edit and invert identity LoRAs in a w2w space, and build "
                                "spaces. Runs on the bundled tiny world by default.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="describe a space, a w2w model or a LoRA file",
                               description="Print what PATH is: a w2w space (layout, N, K, M, base model, "
                                           "attributes), a w2w model (K, space id) or a LoRA (format, layers, rank).")
    info.add_argument("path", help="a space directory, a model .safetensors/.pt, a PEFT folder or a kohya file")
    info.set_defaults(run=cmd_info)

    export = commands.add_parser("export", help="write a w2w model as a LoRA (PEFT/diffusers or kohya/A1111/ComfyUI)",
                                 description="Turn a w2w model (coefficients) into LoRA weights and write them in a "
                                             "format other tools load.")
    export.add_argument("--space", default=DEFAULT_SPACE, help="space directory (default: %(default)s)")
    export.add_argument("--model", required=True, help="model file: the project's .safetensors or the original w2wmodel.pt")
    export.add_argument("--format", choices=("peft", "kohya"), default="peft",
                        help="peft: a folder for pipe.load_lora_weights / PeftModel.from_pretrained; "
                             "kohya: one .safetensors for A1111, ComfyUI and diffusers (default: %(default)s)")
    export.add_argument("--out", required=True, help="output folder (peft) or .safetensors file (kohya)")
    export.set_defaults(run=cmd_export)

    official = commands.add_parser(
        "import-official", help="convert the released w2w files into the project's safe space format",
        description="Read mean.pt, std.pt, V.pt, proj_1000pc.pt, weight_dimensions.pt and identity_df.pt from SRC "
                    "and write a space to DST. With --model, convert one saved w2wmodel.pt instead.")
    official.add_argument("src", help="folder with the released files (or, with --model, a w2wmodel.pt)")
    official.add_argument("dst", help="space directory to write (or, with --model, a .safetensors model file)")
    official.add_argument("--trust-pickle", action="store_true",
                          help="allow unpickling identity_df.pt (and weight_dimensions.pt if it needs it); "
                               "unpickling runs code from the file: use only for files from a source you trust")
    official.add_argument("--model", action="store_true", help="SRC is a saved w2wmodel.pt (1 x K coefficients)")
    official.add_argument("--space-id", default=None,
                          help="with --model: id of the imported space the model belongs to (see `w2w info`)")
    official.set_defaults(run=cmd_import_official)

    # its own parser (shared with `accelerate launch -m lora_w2w.train_identities`): main() hands over
    commands.add_parser("train-identities", add_help=False,
                        help="train many identity LoRAs in one pass (see `w2w train-identities --help`)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train-identities"]:
        from .train_identities import main as train_main

        return train_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except W2WError as error:
        parser.exit(2, f"w2w: error: {error}\n")
    except OSError as error:
        parser.exit(2, f"w2w: error: {error}\n")
    except KeyboardInterrupt:
        parser.exit(130, "w2w: interrupted\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
