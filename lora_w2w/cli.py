"""The `w2w` command line. `w2w --help` lists the commands, `w2w COMMAND --help` explains each.

Bad input (a missing or corrupt file, a layout that does not fit, a K larger than the space ...)
prints one line `w2w: error: ...` and exits with code 2; nothing half-written is left behind.
"""
from __future__ import annotations

import argparse
import sys
import textwrap
import warnings
from pathlib import Path

from .checks import COUNT, DEVICE, FINITE, NON_NEGATIVE, NON_NEGATIVE_NUMBER, POSITIVE, SEED, SIZE
from .errors import W2WError

DEFAULT_SPACE = "files/tiny/space"
DEFAULT_BASE = "files/tiny/base"
DEFAULT_MAX_UPLOAD = "20mb"  # `w2w app`: photos and SD1.5 models fit
TRUST_LORA_PICKLE = ("allow reading a PEFT folder's adapter_model.bin, a pickle (runs code from the file: only for "
                     "files from a source you trust)")


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _parse_edit(text: str) -> tuple[str, float]:
    """'Bald=-2' -> ('Bald', -2.0)."""
    name, sep, value = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ATTRIBUTE=STRENGTH such as Bald=-2, got {text!r}") from None


# ----------------------------------------------------------------------------- commands

def cmd_info(args) -> None:
    from .info import describe

    print(describe(Path(args.path), args.trust_pickle))


def cmd_export(args) -> None:
    from .formats import LORA_OUTPUTS, save_lora
    from .storage import check_output, load_model, load_space

    if (args.model is None) == (args.dataset is None):
        raise W2WError("export needs either --model (a w2w model) or --dataset with --dataset-model")
    if (args.dataset is None) != (args.dataset_model is None):
        raise W2WError("--dataset and --dataset-model go together")
    check_output(args.out, LORA_OUTPUTS[args.format], [args.model, args.dataset, args.space if args.model else None])
    if args.dataset:
        from .dataset import WeightsDataset

        dataset = WeightsDataset(args.dataset)
        key = args.dataset_model
        row = dataset.row(int(key) if key not in dataset.names and key.lstrip("-").isdigit() else key)
        layout, weights, base_model = dataset.layout, dataset[row], dataset.base_model
        what = f"dataset model {dataset.names[row]!r}"
    else:
        model = load_model(args.model)
        space = load_space(args.space, k=len(model.coefficients))
        layout, weights, base_model = space.layout, model.weights(space), space.base_model
        what = "w2w model"
    out = save_lora(layout, weights, args.out, args.format, base_model)
    print(f"wrote {what} as {args.format} LoRA {out}")


def cmd_collect(args) -> None:
    from .dataset import (DATASET_FOLDER, collect_all_weights, collect_folders, layout_of_lora, layout_of_space,
                          read_names)
    from .storage import check_output

    if (args.root is None) == (args.from_all_weights is None):
        raise W2WError("collect needs either LORA_ROOT OUT or --from-all-weights all_weights.pt OUT")
    if args.from_all_weights is None and args.names:
        raise W2WError("--names goes with --from-all-weights")
    check_output(args.out, DATASET_FOLDER, [args.root, args.from_all_weights, args.names, args.layout_from, args.space])
    layout, base_model = None, ""
    if args.space:
        layout, base_model = layout_of_space(args.space)
    elif args.layout_from:
        layout, base_model = layout_of_lora(args.layout_from, args.trust_pickle)
    if args.from_all_weights:
        names = read_names(args.names) if args.names else None
        report = collect_all_weights(args.from_all_weights, args.out, layout, names, args.trust_pickle, base_model,
                                     args.shard_size, _progress, args.dtype)
    else:
        report = collect_folders(args.root, args.out, layout, base_model, args.shard_size, _progress, args.dtype,
                                 args.trust_pickle)
    print(report)


def cmd_build(args) -> None:
    import time

    from .dataset import WeightsDataset
    from .pca import BUILD_STATE, BuildConfig, build_space, remove_state
    from .storage import SPACE_FOLDER, check_outputs, save_space

    if args.scheduler and args.backend != "dask":
        raise W2WError("--scheduler goes with --backend dask")
    start = time.perf_counter()
    state = Path(args.state or f"{str(args.out).rstrip('/')}.build-state")
    check_outputs([(args.out, SPACE_FOLDER), (state, BUILD_STATE)], [args.dataset, args.attributes])
    dataset = WeightsDataset(args.dataset)
    config = BuildConfig(memory=args.memory, backend=args.backend, method=args.method, oversamples=args.oversamples,
                         power_iterations=args.power_iterations, seed=args.seed, attributes=args.attributes,
                         scheduler=args.scheduler, workers=args.workers, base_model=args.base_model, state=state)
    space = build_space(dataset, k=args.components, config=config, log=_progress)
    save_space(space, args.out)
    remove_state(state)
    variance = space.explained_variance
    print(f"wrote space {args.out}: N = {space.num_weights:,}, K = {space.num_components:,}, M = {space.num_models:,}; "
          f"the components explain {float(variance.sum()) / float((space.std > 0).sum()):.1%} of the variance "
          f"(first {float(variance[0]):.4g}, last {float(variance[-1]):.4g}); {time.perf_counter() - start:.1f} s")


def cmd_import_official(args) -> None:
    from .official import import_official
    from .space import W2WModel
    from .storage import MODEL_FILE, check_output, load_model, save_model

    if args.model:
        check_output(args.dst, MODEL_FILE, [args.src])
        model = load_model(args.src)
        save_model(W2WModel(model.coefficients, args.space_id), args.dst)
        print(f"wrote model {args.dst} ({len(model.coefficients)} coefficients)")
        return
    space = import_official(args.src, args.dst, trust_pickle=args.trust_pickle)
    print(f"wrote space {args.dst}: N = {space.num_weights}, K = {space.num_components}, M = {space.num_models}")


def cmd_project(args) -> None:
    from .formats import load_lora
    from .space import W2WModel, check_finite
    from .storage import load_space, save_model

    space = load_space(args.space, k=args.components)  # memory-mapped: only the first K components are read
    weights = load_lora(space.layout, args.lora, args.trust_pickle)
    check_finite(weights, f"the weights of {args.lora}")
    coefficients = space.project(weights)
    residual = float(space.residual(weights, coefficients))
    save_model(W2WModel(coefficients, space.id), args.out)
    print(f"wrote model {args.out} ({space.num_components:,} coefficients); standardized residual |z - cV| / |z| = "
          f"{residual:.4f} (0: the LoRA lies in the span of the space's first {space.num_components:,} components, "
          f"1: wholly outside it)")


def cmd_generate(args) -> None:
    from .checks import check_int
    from .pipeline import generate, generate_from_weights, image_grid, load_base_pipeline, num_train_timesteps
    from .storage import FILES_FOLDER, IMAGE_FILE, check_outputs, load_model, load_space, output_lock, save_png

    out = Path(args.out)
    files = [out / f"seed_{seed:04d}.png" for seed in args.seeds] + [out / "grid.png"]
    check_outputs([(out, FILES_FOLDER)] + [(file, IMAGE_FILE) for file in files],
                  [args.model, args.edited, args.space, args.base])
    if args.injection_timestep is not None:
        check_int(args.injection_timestep, "--injection-timestep", 0, num_train_timesteps(args.base))
    model = load_model(args.model) if args.model else None
    edited = load_model(args.edited) if args.edited else None
    # the base model alone with a --prompt needs no space; otherwise the space gives the layout and the prompt
    space = None
    if model or edited or args.prompt is None:
        space = load_space(args.space, k=max((len(m.coefficients) for m in (model, edited) if m), default=None))
    pipe = load_base_pipeline(args.base, args.device)
    settings = dict(negative_prompt=args.negative_prompt, seeds=args.seeds, num_inference_steps=args.steps,
                    guidance_scale=args.guidance, height=args.size, width=args.size,
                    injection_timestep=args.injection_timestep)
    if space is None:
        images = generate_from_weights(pipe, None, None, args.prompt, **settings)
    else:
        images = generate(pipe, space, model, args.prompt, edited=edited, **settings)
    with output_lock(out, _progress):  # a second run into the same folder writes after this one
        grid = image_grid(images, columns=len(images), column_labels=[f"seed {seed}" for seed in args.seeds])
        for file, image in zip(files, images + [grid]):
            save_png(image, file)
    print(f"wrote {len(images)} images and grid.png to {out}")


def cmd_sample(args) -> None:
    from .formats import save_lora
    from .sampling import iter_sample_models
    from .storage import FILE_BLOCK_BYTES, FILES_FOLDER, check_disk, check_output, load_space, output_lock, save_model

    out = check_output(args.out, FILES_FOLDER, [args.space])
    space = load_space(args.space)
    models = iter_sample_models(space, args.num, args.seed, args.components, args.factor)  # one at a time
    k = min(args.components or space.coefficients.shape[1], space.coefficients.shape[1])
    lora_files = {None: 0, "kohya": 1, "peft": 2}[args.export]  # a PEFT folder holds the weights twice
    check_disk(out, args.num, FILE_BLOCK_BYTES + 4 * k + lora_files * (FILE_BLOCK_BYTES + 4 * space.num_weights),
               "models")
    with output_lock(out, _progress):  # a second run into the same folder waits for this one
        for i, model in enumerate(models):
            weights = model.weights(space) if args.export else None  # NaN/inf in the components: refused before writing
            model_file = out / f"sample_{i:03d}.safetensors"
            save_model(model, model_file)
            if args.export:
                save_lora(space.layout, weights, export_path(model_file, args.export), args.export, space.base_model)
    print(f"wrote {args.num} models ({len(model.coefficients)} coefficients each) to {out}")


def cmd_edit(args) -> None:
    from .editing import apply_edits, attribute_directions
    from .storage import MODEL_FILE, check_output, load_model, load_space, save_model

    check_output(args.out, MODEL_FILE, [args.model, args.space])
    space = load_space(args.space)
    model = load_model(args.model)
    model.check_space(space)
    strengths = dict(args.edit)
    debias_against = [name for name in (args.debias or "").split(",") if name]
    directions = attribute_directions(space, list(strengths), args.components, args.method, debias_against,
                                      args.debias_mode)
    edited = apply_edits(model, strengths, directions)
    save_model(edited, args.out)
    for name, strength in strengths.items():
        d = directions[name]
        print(f"{name}: {strength:+g} std = {strength * d.std:+.3f} along the direction "
              f"(dataset std {d.std:.3f}, largest projection {d.largest:.3f} = {d.largest / d.std:.1f} std)")
    print(f"wrote {args.out}")


def cmd_directions(args) -> None:
    from .editing import direction_report
    from .storage import load_space

    report = direction_report(load_space(args.space), args.components, args.method)
    print(report.to_string(float_format=lambda x: f"{x:.3f}"))


def beside_model(out: Path, tail: str) -> Path:
    """OUT + tail for the model file OUT.safetensors (or OUT): the name of a file written beside it."""
    stem = out.with_suffix("") if out.suffix == ".safetensors" else out
    return stem.with_name(stem.name + tail)


def export_path(out: Path, fmt: str) -> Path:
    """Where `--export` (`w2w invert`, `w2w sample`) writes the LoRA beside the model OUT.safetensors:
    OUT_lora/ (peft) or OUT_lora.safetensors (kohya)."""
    return beside_model(out, "_lora" + (".safetensors" if fmt == "kohya" else ""))


def fitted_path(out: Path, what: str, index: int, count: int) -> Path:
    """Where `w2w invert` shows what it fitted beside the model OUT.safetensors: OUT.mask.png, OUT.crop.png,
    or OUT.mask.1.png ... with several images (numbered in --image order)."""
    return beside_model(out, f".{what}" + (f".{index + 1}" if count > 1 else "") + ".png")


def invert_masks(args) -> list | None:
    """--mask (one per --image, or one `auto` for all) or --mask-dir -> a mask (file, AUTO_MASK or None) per image."""
    from .inversion import AUTO_MASK, masks_in_folder

    if args.mask_dir:
        return masks_in_folder(args.image, args.mask_dir)
    if args.mask is None:
        return None
    if args.mask == [AUTO_MASK]:
        return args.mask * len(args.image)
    if len(args.mask) != len(args.image):
        raise W2WError(f"--mask given {len(args.mask)} times for {len(args.image)} --image; expected one --mask per "
                       f"--image, in the same order (or one --mask {AUTO_MASK} for all)")
    return args.mask


def cmd_invert(args) -> None:
    import torch
    from PIL import Image

    from .formats import LORA_OUTPUTS, save_lora
    from .inversion import invert_file, preset
    from .storage import FILE, MODEL_FILE, check_outputs, load_space, save_model, save_png

    check_outputs([(args.out, MODEL_FILE), (args.checkpoint, FILE),
                   (export_path(Path(args.out), args.export) if args.export else None, LORA_OUTPUTS.get(args.export))],
                  [*args.image, *(args.mask or []), args.mask_dir, args.space, args.base])
    masks = invert_masks(args)
    space = load_space(args.space)  # memory-mapped: invert reads only the first K components
    config = preset(args.preset, space, components=args.components, steps=args.steps, lr=args.lr,
                    weight_decay=args.weight_decay, checkpoint_every=args.checkpoint_every,
                    images_per_step=args.images_per_step)
    if config.components > space.num_components:
        raise W2WError(f"--components {config.components}: the space {args.space} has K = {space.num_components}; "
                       f"pass {space.num_components} or fewer")
    print(f"inverting {len(args.image)} image{'s' * (len(args.image) > 1)} with K {config.components:,}, "
          f"lr {config.lr:g}, weight decay {config.weight_decay:g}, {config.steps} steps (preset {args.preset} on "
          f"this space, and the flags given)")
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model, photos = invert_file(args.base, space, args.image, masks, config, args.seed, args.device, dtype,
                                args.checkpoint, crop=args.crop)
    save_model(model, args.out)
    print(f"wrote model {args.out} ({config.components} coefficients, {config.steps} steps)")
    for index, photo in enumerate(photos):  # what was fitted: the face crop and the automatic mask
        shown = [("crop", photo.picture)] if args.crop == "face" else []
        shown += [("mask", Image.fromarray(photo.mask))] if photo.auto else []
        for what, picture in shown:
            path = fitted_path(Path(args.out), what, index, len(photos))
            save_png(picture, path)
            print(f"wrote {what} of {photo.name}: {path}")
    if args.export:
        path = save_lora(space.layout, model.weights(space), export_path(Path(args.out), args.export), args.export,
                         space.base_model)
        print(f"wrote {args.export} LoRA {path}")


def cmd_app(args) -> None:
    from .app import AppConfig, launch

    launch(AppConfig(space=args.space, base=args.base, device=args.device, max_upload=args.max_upload),
           host=args.host, port=args.port, share=args.share)


# ----------------------------------------------------------------------------- parser

class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (`w2w COMMAND: error: ...`, exit code 2), like every
    other error of w2w; `w2w COMMAND --help` shows the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """`w2w` and its subcommands, in the order `w2w --help` lists them."""
    parser = OneLineParser(
        prog="w2w", description="weights2weights: sample, edit and invert identity LoRAs in a w2w space, and build "
                                "spaces. Runs on the bundled tiny world by default.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in (add_info_parser, add_export_parser, add_import_official_parser, add_project_parser,
                       add_generate_parser, add_sample_parser, add_edit_parsers, add_invert_parser,
                       add_dataset_parsers, add_app_parser, add_handed_over_parsers):
        add_parser(commands)
    return parser


def add_space(parser) -> None:
    """--space: the space a command reads."""
    parser.add_argument("--space", default=DEFAULT_SPACE,
                        help="space directory (default: the tiny world, %(default)s; SD1.5: files/official)")


def add_base(parser) -> None:
    """--base and --device: the pipeline a command runs."""
    parser.add_argument("--base", default=DEFAULT_BASE,
                        help="base diffusers pipeline the space was built for: folder or hub id (default: %(default)s; "
                             "SD1.5: stablediffusionapi/realistic-vision-v51)")
    parser.add_argument("--device", type=DEVICE, default="auto",
                        help="auto (CUDA when present), cpu, cuda, cuda:1, mps ... (default: %(default)s)")


def add_info_parser(commands) -> None:
    info = commands.add_parser("info", help="describe a space, a weights dataset, a w2w model or a LoRA file",
                               description="Print what PATH is: a w2w space (layout, N, K, M, base model, "
                                           "attributes), a weights dataset (layout, M, shards), a w2w model (K, space "
                                           "id) or a LoRA (format, layers, rank).")
    info.add_argument("path", help="a space directory, a weights dataset directory, a model .safetensors/.pt, a PEFT "
                                   "folder or a kohya file")
    info.add_argument("--trust-pickle", action="store_true", help=TRUST_LORA_PICKLE)
    info.set_defaults(run=cmd_info)


def add_export_parser(commands) -> None:
    export = commands.add_parser("export", help="write a w2w model as a LoRA (PEFT/diffusers or kohya/A1111/ComfyUI)",
                                 description="Turn a w2w model (coefficients) into LoRA weights and write them in a "
                                             "format other tools load.")
    add_space(export)
    export.add_argument("--model", help="model file: the project's .safetensors or the original w2wmodel.pt")
    export.add_argument("--dataset", help="instead of --model: a weights dataset (made by `w2w collect`)")
    export.add_argument("--dataset-model", metavar="NAME_OR_INDEX",
                        help="with --dataset: the model to export, by name or row index")
    export.add_argument("--format", choices=("peft", "kohya"), default="peft",
                        help="peft: a folder for pipe.load_lora_weights / PeftModel.from_pretrained; "
                             "kohya: one .safetensors for A1111, ComfyUI and diffusers (default: %(default)s)")
    export.add_argument("--out", required=True, help="output folder (peft) or .safetensors file (kohya)")
    export.set_defaults(run=cmd_export)


def add_import_official_parser(commands) -> None:
    official = commands.add_parser(
        "import-official", help="convert the released w2w files into the project's safe space format",
        description="Read mean.pt (N), std.pt (N), V.pt (N x K), proj_1000pc.pt (M x 1000), weight_dimensions.pt "
                    "(PEFT key -> [numel, shape] in flat order, numel a 1-element torch.Size as the original "
                    "reads it, weight_dimensions[key][0][0]), identity_df.pt and adapter_config.json from SRC "
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


def add_project_parser(commands) -> None:
    project = commands.add_parser(
        "project", help="take an identity LoRA into the space as a w2w model",
        description="Project LORA, an identity LoRA of the space's layout, onto the space's first K components "
                    "(c = z Vᵀ for its standardized weights z) and write the w2w model. Prints the standardized "
                    "residual |z - cV| / |z|: how much of the LoRA the space cannot express. A LoRA of another "
                    "layout (layers, rank, shapes) is refused, naming the first difference.")
    project.add_argument("lora", metavar="LORA",
                         help="a PEFT folder (such as the original code's output, with unet/adapter_model.safetensors, "
                              "or train_dreambooth.py's), a PEFT/diffusers .safetensors file or a kohya file")
    add_space(project)
    project.add_argument("--components", type=int, default=None,
                         help="K, components projected on (default: all of the space's)")
    project.add_argument("--out", required=True, help="model file to write (.safetensors)")
    project.add_argument("--trust-pickle", action="store_true", help=TRUST_LORA_PICKLE)
    project.set_defaults(run=cmd_project)


def add_generate_parser(commands) -> None:
    gen = commands.add_parser("generate", help="generate images with a w2w model (or the base model alone)",
                              description="Generate one image per seed with a w2w model fused into the base UNet; "
                                          "writes seed_XXXX.png files and grid.png.")
    add_space(gen)
    add_base(gen)
    gen.add_argument("--model", help="w2w model file (.safetensors or the original w2wmodel.pt); omit for the base alone")
    gen.add_argument("--prompt", default=None,
                     help="prompt; the identity's token is 'sks' (default: the space's trigger prompt, 'sks person')")
    gen.add_argument("--negative-prompt", default="", help="negative prompt (default: none)")
    gen.add_argument("--seeds", type=SEED, nargs="+", default=[0, 1, 2, 3], help="one image per seed (default: 0 1 2 3)")
    gen.add_argument("--steps", type=COUNT, default=50, help="denoising steps (default: %(default)s)")
    gen.add_argument("--guidance", type=FINITE, default=7.5, help="classifier-free guidance scale (default: %(default)s)")
    gen.add_argument("--size", type=SIZE, default=None,
                     help="image size in pixels, a multiple of 8 (default: the base model's)")
    gen.add_argument("--edited", help="delayed injection: edited model used for timesteps t <= --injection-timestep")
    gen.add_argument("--injection-timestep", type=NON_NEGATIVE, default=None,
                     help="T of delayed injection, 0 to the scheduler's training timesteps (1,000 for SD1.5: the "
                          "edited model throughout): 700-1000 for global edits, 400-700 for fine ones")
    gen.add_argument("--out", required=True, help="output folder")
    gen.set_defaults(run=cmd_generate)


def add_sample_parser(commands) -> None:
    from .sampling import DEFAULT_SAMPLE_COMPONENTS

    sample = commands.add_parser("sample", help="sample new identity models from the space",
                                 description="Draw each of the first K coefficients from an independent Gaussian "
                                             "fitted to the dataset models' coefficients (the paper's sampling).")
    add_space(sample)
    sample.add_argument("--num", type=COUNT, default=4, help="models to sample (default: %(default)s)")
    sample.add_argument("--seed", type=SEED, default=0, help="random seed (default: %(default)s)")
    sample.add_argument("--components", "-k", type=COUNT, default=None,
                        help=f"K (default: {DEFAULT_SAMPLE_COMPONENTS:,} or all the dataset has)")
    sample.add_argument("--factor", type=POSITIVE, default=1.0,
                        help="scale of the Gaussians' std: < 1 typical, > 1 unusual identities (default: %(default)s)")
    sample.add_argument("--export", choices=("peft", "kohya"), default=None, help="also write each model as a LoRA")
    sample.add_argument("--out", required=True, help="output folder for sample_XXX.safetensors")
    sample.set_defaults(run=cmd_sample)


def add_edit_parsers(commands) -> None:
    """`w2w edit` and `w2w directions`: the attribute directions of a space."""
    from .editing import DEFAULT_EDIT_COMPONENTS, DEFAULT_DIRECTION_METHOD, DIRECTION_METHODS, MODELS_PER_COMPONENT

    components = (f"(default: {DEFAULT_EDIT_COMPONENTS:,} as in the paper; for least squares and logistic at most "
                  f"M/{MODELS_PER_COMPONENT} of the space's M dataset models)")
    edit = commands.add_parser("edit", help="edit a model along attribute directions",
                               description="Move a model along attribute directions fitted to the space's "
                                           "attribute table; strengths are in standard deviations of the dataset "
                                           "along each direction. Edits compose.")
    add_space(edit)
    edit.add_argument("--model", required=True, help="w2w model file to edit")
    edit.add_argument("--edit", type=_parse_edit, action="append", required=True, metavar="ATTRIBUTE=STRENGTH",
                      help="e.g. --edit Bald=-2 --edit Chubby=+1.5 (repeatable)")
    edit.add_argument("--debias", default="", help="comma-separated attributes to keep: their directions are removed")
    edit.add_argument("--debias-mode", choices=("project", "orthogonalize"), default="project",
                      help="project: the paper's one-by-one projection; orthogonalize: remove their whole span")
    edit.add_argument("--method", choices=DIRECTION_METHODS, default=DEFAULT_DIRECTION_METHOD,
                      help="how directions are found: the difference of the two classes' mean coefficients "
                           "(default: the change that goes with the attribute), least squares (the paper's, "
                           "which detects the attribute better than it edits it) or logistic regression")
    edit.add_argument("--components", "-k", type=COUNT, default=None,
                      help=f"K of the directions {components}")
    edit.add_argument("--out", required=True, help="edited model file (.safetensors)")
    edit.set_defaults(run=cmd_edit)

    directions = commands.add_parser("directions", help="list the attributes and how well each is predicted",
                                     description="For every ±1 attribute of the space: frequency and held-out "
                                                 "(balanced) accuracy of its linear direction.")
    add_space(directions)
    directions.add_argument("--method", choices=DIRECTION_METHODS, default=DEFAULT_DIRECTION_METHOD,
                            help="how directions are fitted (default: %(default)s)")
    directions.add_argument("--components", "-k", type=COUNT, default=None,
                            help=f"K used {components}")
    directions.set_defaults(run=cmd_directions)


def add_handed_over_parsers(commands) -> None:
    """`w2w train-identities` and `w2w evaluate`: listed here, parsed by their modules (see `run`)."""
    # its own parser (shared with `accelerate launch -m lora_w2w.train_identities`): main() hands over
    commands.add_parser("train-identities", add_help=False,
                        help="train many identity LoRAs in one pass (see `w2w train-identities --help`)")
    commands.add_parser("evaluate", add_help=False,
                        help="score sampling, editing, inversion, the paper's tables and its scaling curves on the "
                             "tiny world (see `w2w evaluate --help`)")


def add_invert_parser(commands) -> None:
    from .faces import FACE_FRACTION
    from .inversion import AUTO_MASK, CROPS, PRESETS, InversionConfig

    presets = "; ".join(f"{name}: K {c.components:,}, lr {c.lr:g}, weight decay {c.weight_decay:g}, {c.steps} steps"
                        for name, c in PRESETS.items())
    invert = commands.add_parser(
        "invert", help="invert a person's images (one or several) into a w2w model (the paper's Sec. 4.3)",
        description="Find the model of the space that reproduces IMAGE: Adam on its first K coefficients, from "
                    f"zero, on the diffusion loss of the image (inside MASK). With several --image of one person, "
                    f"each step draws one of them, so the loss is averaged over the person's photographs. "
                    f"Presets (the paper's): {presets}; "
                    "on a space with fewer components, all of them; a space may record its own settings for a "
                    "preset, which replace the paper's (`w2w info SPACE` lists them). Defaults: the "
                    "tiny world; for Stable Diffusion 1.5: --base stablediffusionapi/realistic-vision-v51 "
                    "--space files/official.")
    invert.add_argument("--image", required=True, action="append",
                        help="an image to invert: any size and mode; repeat it for several photographs of one person")
    invert.add_argument("--crop", choices=CROPS, default="center",
                        help="center: resize and centre-crop each image as it is; face: cut the square around its "
                             f"largest detected face, the face about {FACE_FRACTION:.0%}% of its width (FFHQ-like "
                             "framing), written to OUT.crop.png (default: %(default)s)")
    masks = invert.add_mutually_exclusive_group()
    masks.add_argument("--mask", action="append", default=None,
                       help=f"binary mask image, white where the image is fitted (the image's size or aspect ratio), "
                            f"or {AUTO_MASK}: a soft ellipse over the detected face and hair, written to OUT.mask.png; "
                            f"one per --image in order, or one {AUTO_MASK} for all")
    masks.add_argument("--mask-dir", default=None,
                       help="folder of masks paired with the images by file name (DIR/NAME.png for NAME.jpg)")
    invert.add_argument("--preset", choices=tuple(PRESETS), default="real",
                        help="real: photographs of faces; ood: paintings and other out-of-distribution images "
                             "(default: %(default)s)")
    invert.add_argument("--components", "-k", type=COUNT, default=None,
                        help="K, coefficients optimised; at most the space's K (default: the preset's, at most the "
                             "space's)")
    invert.add_argument("--steps", type=COUNT, default=None, help="optimiser steps (default: the preset's)")
    invert.add_argument("--lr", type=POSITIVE, default=None,
                        help="Adam learning rate (default: the preset's, or the one the space records for it)")
    invert.add_argument("--weight-decay", type=NON_NEGATIVE_NUMBER, default=None,
                        help="Adam weight decay (default: the preset's)")
    invert.add_argument("--seed", type=SEED, default=0, help="seed of the timesteps and noise (default: %(default)s)")
    add_space(invert)
    add_base(invert)
    invert.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="dtype of the base model: auto = bfloat16 on CUDA (as the original), float32 elsewhere")
    invert.add_argument("--out", required=True, help="model file to write (.safetensors)")
    invert.add_argument("--export", choices=("peft", "kohya"), default=None,
                        help="also write the model as a LoRA beside OUT.safetensors: OUT_lora/ (diffusers, PEFT) "
                             "or OUT_lora.safetensors (kohya: A1111, ComfyUI)")
    invert.add_argument("--checkpoint", default=None,
                        help="file to save the run's state in every --checkpoint-every steps; a run that finds "
                             "it resumes from it")
    invert.add_argument("--checkpoint-every", type=COUNT, default=None,
                        help=f"steps between checkpoints (default: {InversionConfig.checkpoint_every})")
    invert.add_argument("--images-per-step", type=COUNT, default=None,
                        help=f"images of the person each step draws and averages (default: "
                             f"{InversionConfig.images_per_step}; more cost more per step)")
    invert.set_defaults(run=cmd_invert)


APP_API = """\
API (gradio_client; every model travels as a w2w model file, every image list is a gallery):
  /sample(seed)                              -> (model file, images)
  /edit(model file, edits, debias)           -> (model file, images)
        edits: {"ATTRIBUTE": STRENGTH, ...} as JSON, strengths in standard deviations of the dataset;
        debias: a list of attributes whose directions are removed (default: Male and Young)
  /invert(image file, mask file or None, preset, steps[, crop, auto mask, more image files]) -> (model file, images)
        preset: real or ood; the mask is white where the image is fitted; crop: center (default) or face;
        auto mask: True fits the images without a mask file inside an ellipse over the detected face and hair;
        more image files: a list of further photos of the same person, inverted together with the first
  /generate(model file, prompt, seeds, steps) -> images     seeds: "0 1 2 3"
  /export(model file, format)                -> file        format: w2w, kohya or peft (a zip)
Example:
  from gradio_client import Client, handle_file
  client = Client("http://127.0.0.1:7860/")
  model, images = client.predict(0, api_name="/sample")
  edited, images = client.predict(handle_file(model), '{"Eyeglasses": 3}', ["Male", "Young"], api_name="/edit")
  kohya = client.predict(handle_file(edited), "kohya", api_name="/export")
Bad input gets the one line `w2w: error: ...` the other commands print, as a Gradio error."""


def add_app_parser(commands) -> None:
    app = commands.add_parser(
        "app", help="the weights2weights app in the browser: sample, invert, edit, generate, download",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill("Serve a Gradio page on HOST:PORT: sample a new identity; upload an image, draw its mask with "
                    "a brush and invert it (preset, steps, the loss in a progress bar); edit the model with a slider "
                    "per attribute (standard deviations of the dataset, -4 to +4), debiased against the ticked "
                    "attributes, with an injection timestep and a before/after comparison; generate with any "
                    "prompt; download the model as a w2w model, a kohya/ComfyUI/A1111 .safetensors or a "
                    "diffusers/PEFT folder (zip); upload any model `w2w export --model` reads. Each browser has its "
                    "own current model; the pipeline and space are loaded once; device jobs run one at a time. "
                    "Defaults: the tiny world on the CPU; for Stable Diffusion 1.5: --base "
                    "stablediffusionapi/realistic-vision-v51 --space files/official.", 100) + "\n\n" + APP_API)
    add_space(app)
    add_base(app)
    app.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default: %(default)s, this machine only; 0.0.0.0: the network)")
    app.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    app.add_argument("--share", action="store_true", help="also open a public gradio.live link (goes online)")
    app.add_argument("--max-upload", default=DEFAULT_MAX_UPLOAD,
                     help="largest file a browser or client may upload, e.g. 20mb, 1gb (default: %(default)s)")
    app.set_defaults(run=cmd_app)


def add_dataset_parsers(commands) -> None:
    """`w2w collect` and `w2w build`: making a weights dataset and a space from it."""
    from .dataset import DEFAULT_SHARD_SIZE
    from .pca import (BACKENDS, DEFAULT_MEMORY, DEFAULT_OVERSAMPLES, DEFAULT_POWER_ITERATIONS, EXACT_PREFERENCE,
                      PCA_METHODS)

    collect = commands.add_parser(
        "collect", help="gather LoRAs (or the released all_weights.pt) into a weights dataset on disk",
        usage="w2w collect [-h] (LORA_ROOT | --from-all-weights ALL_WEIGHTS) OUT [options]",
        description="Flatten every LoRA under LORA_ROOT (<name>/unet/adapter_model.safetensors, "
                    "<name>/adapter_model.safetensors or <name>.safetensors) into the weights dataset OUT, rows in "
                    "string order of the names; or copy the released all_weights.pt. Rerunning adds only new models.")
    collect.add_argument("root", nargs="?", metavar="LORA_ROOT", help="folder of LoRA folders or files")
    collect.add_argument("out", metavar="OUT", help="weights dataset directory (created, or added to)")
    layout = collect.add_mutually_exclusive_group()
    layout.add_argument("--layout-from", metavar="LORA",
                        help="take the LoRA layout from this PEFT LoRA folder (default: an existing OUT's, else the "
                             "first LoRA's; with --from-all-weights, Stable Diffusion 1.5's)")
    layout.add_argument("--space", metavar="DIR", help="take the LoRA layout and base model from this space")
    collect.add_argument("--shard-size", type=COUNT, default=DEFAULT_SHARD_SIZE,
                         help="models per shard file of a new dataset (default: %(default)s; about 400 MB for "
                              "Stable Diffusion 1.5)")
    collect.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                         help="number format of a new dataset's shards (default: %(default)s); float16 halves the "
                              "disk and the bytes each PCA pass reads, rounding the weights to 11 significant bits")
    collect.add_argument("--from-all-weights", metavar="ALL_WEIGHTS",
                         help="instead of LORA_ROOT: the released all_weights.pt (M x N), read memory-mapped")
    collect.add_argument("--names", metavar="NAMES_TXT",
                         help="with --from-all-weights: model names, one per line, in row order (default: row numbers)")
    collect.add_argument("--trust-pickle", action="store_true",
                         help="allow full unpickling of --from-all-weights if the file needs it, and reading "
                              "adapter_model.bin pickles of LoRA folders (runs code from the file: only for files "
                              "from a source you trust)")
    collect.set_defaults(run=cmd_collect)

    build = commands.add_parser(
        "build", help="PCA of a weights dataset into a w2w space, in bounded memory",
        description="Standardize the columns of the dataset (M x N) and write the top K principal components, "
                    "every model's coefficients and the explained variance as a space. The matrix is streamed "
                    "from disk: peak memory follows --memory, not M x N.")
    build.add_argument("dataset", metavar="DATASET", help="weights dataset directory (made by `w2w collect`)")
    build.add_argument("out", metavar="OUT", help="space directory to write (replaced only once complete)")
    build.add_argument("--components", "-k", type=COUNT, required=True, help="K, the number of principal components")
    build.add_argument("--backend", choices=BACKENDS, default="torch",
                       help="torch: streamed on this machine; dask: dask.array on a dask.distributed cluster "
                            "(default: %(default)s)")
    build.add_argument("--method", choices=PCA_METHODS, default="auto",
                       help="torch backend: exact (eigendecomposition of the smaller Gram matrix) or randomized "
                            f"(subspace iteration); auto: exact when it fits --memory and costs at most "
                            f"{EXACT_PREFERENCE}x the randomized route (default: %(default)s)")
    build.add_argument("--memory", default=DEFAULT_MEMORY,
                       help="memory budget, e.g. 4GB, 16GiB: of this process with the torch backend, the interpreter "
                            "included; of each worker with --backend dask, which sizes its blocks by it and refuses "
                            "workers of a --scheduler with less than its plan needs (default: %(default)s)")
    build.add_argument("--oversamples", type=NON_NEGATIVE, default=DEFAULT_OVERSAMPLES,
                       help="randomized: extra trial vectors beyond K (default: %(default)s)")
    build.add_argument("--power-iterations", type=NON_NEGATIVE, default=DEFAULT_POWER_ITERATIONS,
                       help="randomized: passes of subspace iteration; more are more accurate when the spectrum "
                            "decays slowly (default: %(default)s)")
    build.add_argument("--seed", type=SEED, default=0,
                       help="randomized: seed of the trial vectors (default: %(default)s)")
    build.add_argument("--attributes", metavar="TABLE_CSV",
                       help="attribute table: CSV, first column the model names, one row per dataset model")
    build.add_argument("--scheduler", metavar="ADDRESS",
                       help="dask backend: address of a dask.distributed scheduler (default: a LocalCluster here); "
                            "its workers must see DATASET and the --state folder at the same paths")
    build.add_argument("--workers", type=COUNT,
                       help="dask backend without --scheduler: worker processes of the LocalCluster, one thread and "
                            "--memory each (default: one per core)")
    build.add_argument("--base-model", metavar="ID", help="base model id to record (default: the dataset's)")
    build.add_argument("--state", metavar="DIR",
                       help="folder where the build keeps its finished passes, so that a killed build resumes from "
                            "them when run again, and where dask workers write the result (default: OUT.build-state; "
                            "removed once OUT is written)")
    build.set_defaults(run=cmd_build)


def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line on stderr, without the file and source line Python shows (above any progress bar)."""
    from tqdm import tqdm

    tqdm.write(f"w2w: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    with warnings.catch_warnings():  # every subcommand's warnings, one line each
        warnings.showwarning = one_line_warning
        return run(sys.argv[1:] if argv is None else argv)


def run(argv: list[str]) -> int:
    """The subcommand of `argv`; its exit code."""
    if argv[:1] == ["train-identities"]:
        from .train_identities import main as train_main

        return train_main(argv[1:])
    if argv[:1] == ["evaluate"]:
        from .tiny import tables

        try:
            tables.main(tables.parse_args(argv[1:]))
        except W2WError as error:
            print(f"w2w evaluate: error: {error}", file=sys.stderr)
            return 2
        return 0
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
