"""The `w2w` command line. `w2w --help` lists the commands, `w2w COMMAND --help` explains each.

Bad input (a missing or corrupt file, a layout that does not fit, a K larger than the space ...)
prints one line `w2w: error: ...` and exits with code 2; nothing half-written is left behind.
"""
from __future__ import annotations

import argparse
import signal
import sys
import warnings
from pathlib import Path

from . import __version__
from .checks import COUNT, DEVICE, FINITE, NON_NEGATIVE, POSITIVE, SEED, SIZE
from .defaults import DEFAULT_BASE, DEFAULT_EVALUATOR, DEFAULT_SPACE
from .errors import W2WError, exit_code
from .flags import OneLineParser, add_config_flags, config_from_args, named_as_flags

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
    from .info import describe, describe_reference

    if (args.path is None) == (args.layout is None):
        raise W2WError("info needs either PATH (a file or folder) or --layout NAME (a full-size network)")
    if args.layout is None and (args.target_modules or args.rank):
        raise W2WError("--target-modules and --rank go with --layout")
    if args.layout:
        from .layout import DEFAULT_RANK, DEFAULT_TARGET_MODULES

        print(describe_reference(args.layout, tuple(args.target_modules or DEFAULT_TARGET_MODULES),
                                 args.rank or DEFAULT_RANK))
    else:
        print(describe(Path(args.path), args.trust_pickle))


def cmd_export(args) -> None:
    from .bases import lora_naming_of_base
    from .formats import LORA_OUTPUTS, save_lora
    from .storage import check_output

    if (args.model is None) == (args.dataset is None):
        raise W2WError("export needs either --model (a w2w model) or --dataset with --dataset-model")
    if (args.dataset is None) != (args.dataset_model is None):
        raise W2WError("--dataset and --dataset-model go together")
    check_output(args.out, LORA_OUTPUTS[args.format], [args.model, args.dataset, args.space if args.model else None])
    if args.model:
        from .workbench import Workbench

        bench = Workbench(args.base, args.space)  # the base's config files name the LoRA's keys
        out = bench.export(bench.load(args.model), args.format, args.out)
        print(f"wrote w2w model as {args.format} LoRA {out}")
        return
    from .dataset import WeightsDataset
    from .provenance import LoraAbout

    dataset = WeightsDataset(args.dataset)
    key = args.dataset_model
    row = dataset.row(int(key) if key not in dataset.names and key.lstrip("-").isdigit() else key)
    about = LoraAbout(f"dataset model {dataset.names[row]}", provenance=({"made": "dataset",
                                                                         "model": dataset.names[row]},))
    out = save_lora(dataset.layout, dataset[row], args.out, args.format, dataset.base_model,
                    lora_naming_of_base(args.base, dataset.layout), about)
    print(f"wrote dataset model {dataset.names[row]!r} as {args.format} LoRA {out}")


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
    import dataclasses
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
    config = dataclasses.replace(config_from_args(BuildConfig, args), state=state)
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
        from .provenance import imported

        check_output(args.dst, MODEL_FILE, [args.src])
        model = load_model(args.src, args.trust_pickle)
        save_model(W2WModel(model.coefficients, args.space_id, (*model.provenance, imported(args.src))), args.dst)
        print(f"wrote model {args.dst} ({len(model.coefficients)} coefficients)")
        return
    space = import_official(args.src, args.dst, trust_pickle=args.trust_pickle)
    print(f"wrote space {args.dst}: N = {space.num_weights}, K = {space.num_components}, M = {space.num_models}")


def cmd_download(args) -> None:
    from .download import download_base, download_release

    if args.what == "base":
        folder = download_base(args.id, args.revision)
        print(f"cached {args.id} in {folder}; commands load it from there with --base {args.id}")
        return
    name = args.dataset if args.what == "weights" else "files"
    paths = download_release(name, args.out, args.repo, args.revision)
    if name == "files":
        print(f"wrote {len(paths)} files to {paths[0].parent}; convert them: w2w import-official {args.out} "
              f"files/official --trust-pickle")
    else:
        print(f"wrote {paths[0]}; make a weights dataset of it: w2w collect --from-all-weights {paths[0]} "
              f"data/{name}_weights")


def cmd_project(args) -> None:
    from .workbench import Workbench

    bench = Workbench(args.base, args.space)  # memory-mapped: only the first K components are read
    model, residual = bench.project(args.lora, args.components, args.trust_pickle)
    bench.export(model, "w2w", args.out)
    k = len(model.coefficients)
    print(f"wrote model {args.out} ({k:,} coefficients); standardized residual |z - cV| / |z| = {residual:.4f} (0: "
          f"the LoRA lies in the span of the space's first {k:,} components, 1: wholly outside it)")


def cmd_generate(args) -> None:
    from .checks import check_int
    from .pipeline import image_grid, num_train_timesteps
    from .storage import FILES_FOLDER, IMAGE_FILE, check_outputs, output_lock, save_png
    from .workbench import Workbench

    out = Path(args.out)
    files = [out / f"seed_{seed:04d}.png" for seed in args.seeds] + [out / "grid.png"]
    check_outputs([(out, FILES_FOLDER)] + [(file, IMAGE_FILE) for file in files],
                  [args.model, args.edited, args.space, args.base])
    timesteps = num_train_timesteps(args.base)
    check_int(args.steps, "--steps", 1, timesteps)  # the scheduler takes at most its training timesteps
    if args.injection_timestep is not None:
        check_int(args.injection_timestep, "--injection-timestep", 0, timesteps)
    bench = Workbench(args.base, args.space, args.device)  # the base alone with a --prompt reads no space
    model, edited = (bench.load(path) if path else None for path in (args.model, args.edited))
    images = bench.images(model, args.prompt, edited=edited, injection_timestep=args.injection_timestep,
                          negative_prompt=args.negative_prompt, seeds=args.seeds, steps=args.steps,
                          guidance=args.guidance, size=args.size, log=_progress)
    with output_lock(out, _progress):  # a second run into the same folder writes after this one
        grid = image_grid(images, columns=len(images), column_labels=[f"seed {seed}" for seed in args.seeds])
        for file, image in zip(files, images + [grid]):
            save_png(image, file)
    print(f"wrote {len(images)} images and grid.png to {out}")


def cmd_sample(args) -> None:
    from .estimate import LARGE_SAMPLING, JobClock
    from .storage import FILE_BLOCK_BYTES, FILES_FOLDER, check_disk, check_output, output_lock
    from .workbench import Workbench, export_path

    out = check_output(args.out, FILES_FOLDER, [args.space])
    bench = Workbench(args.base, args.space)  # the base's config files name the exported LoRAs' keys
    if args.export:
        bench.lora_naming()  # a base of another family is refused before any file
    models = bench.sample(args.num, args.seed, args.components, args.factor)  # one at a time
    k = min(args.components or bench.space.coefficients.shape[1], bench.space.coefficients.shape[1])
    lora_files = {None: 0, "kohya": 1, "peft": 2}[args.export]  # a PEFT folder holds the weights twice
    check_disk(out, args.num, FILE_BLOCK_BYTES + 4 * k + lora_files * (FILE_BLOCK_BYTES + 4 * bench.space.num_weights),
               "models")
    with output_lock(out, _progress):  # a second run into the same folder waits for this one
        clock = JobClock(args.num, "models", LARGE_SAMPLING, _progress)
        for i, model in enumerate(models):
            model_file = out / f"sample_{i:03d}.safetensors"
            if args.export:  # first: a LoRA with NaN/inf (components holding them) is refused before any file
                bench.export(model, args.export, export_path(model_file, args.export))
            bench.export(model, "w2w", model_file)
            clock.tick()
    print(f"wrote {args.num} models ({len(model.coefficients)} coefficients each) to {out}")


def cmd_edit(args) -> None:
    from .editing import default_debias, resolve_attribute
    from .storage import MODEL_FILE, check_output
    from .workbench import Workbench

    check_output(args.out, MODEL_FILE, [args.model, args.space])
    bench = Workbench(space=args.space)
    model = bench.load(args.model)
    strengths = dict(args.edit)
    debias = (default_debias(bench.space) if args.debias is None else
              [name for name in args.debias.split(",") if name and name != "none"])
    fit = dict(debias=debias, components=args.components, method=args.method, debias_mode=args.debias_mode)
    bench.export(bench.edit(model, strengths, **fit), "w2w", args.out)
    directions = bench.directions(list(strengths), **fit)  # fitted once, for the edit
    for name, strength in strengths.items():
        d = directions[resolve_attribute(name)[0]]
        print(f"{name}: {strength:+g} std = {strength * d.std:+.3f} along the direction "
              f"(dataset std {d.std:.3f}, largest projection {d.largest:.3f} = {d.largest / d.std:.1f} std)")
    print(f"debiased against: {', '.join(debias) or 'nothing'}")
    print(f"wrote {args.out}")


def cmd_directions(args) -> None:
    from .editing import direction_report
    from .workbench import Workbench

    report = direction_report(Workbench(space=args.space).space, args.components, args.method)
    print(report.to_string(float_format=lambda x: f"{x:.3f}"))


def invert_masks(args) -> list | None:
    """--mask: one per --image in order (a file or `auto` each); None for none, or for one `auto` for all."""
    from .inversion import AUTO_MASK

    if args.mask is None or args.mask == [AUTO_MASK]:
        return None
    if len(args.mask) != len(args.image):
        raise W2WError(f"--mask given {len(args.mask)} times for {len(args.image)} --image; expected one --mask per "
                       f"--image, in the same order (or one --mask {AUTO_MASK} for all)")
    return args.mask


def invert_encoder(args, bench):
    """The encoder `w2w invert` starts from (--encoder PATH, or --init encoder: the space's), or None (zero)."""
    from .encoder_files import default_encoder

    bench.space  # memory-mapped: invert reads only the first K components
    if args.encoder is None and args.init != "encoder":
        return None
    if args.encoder is None:
        args.encoder = default_encoder(args.space)  # None: the bench says the space names none
    return bench.encoder(args.encoder)


def cmd_invert(args) -> None:
    import time

    import torch

    from .formats import LORA_OUTPUTS
    from .inversion import AUTO_MASK, InversionConfig
    from .storage import FILE, MODEL_FILE, check_outputs
    from .workbench import Workbench, export_path, save_fitted, timed

    start = time.perf_counter()
    if args.steps == 0 and args.encoder is None and args.init != "encoder":
        raise W2WError("--steps 0 inverts nothing from zero: it gives the encoder's prediction alone; add --init "
                       "encoder or --encoder PATH, or pass --steps 1 or more")
    check_outputs([(args.out, MODEL_FILE), (args.checkpoint, FILE),
                   (export_path(args.out, args.export) if args.export else None, LORA_OUTPUTS.get(args.export))],
                  [*args.image, *(args.mask or []), args.mask_dir, args.space, args.base, args.encoder])
    masks = invert_masks(args)
    bench = Workbench(args.base, args.space, args.device, None if args.dtype == "auto" else getattr(torch, args.dtype))
    with named_as_flags():
        config = bench.inversion_config(args.preset, **{name: getattr(args, name) for name in vars(InversionConfig())})
    times = {}
    with timed(times, "reading the space"):
        encoder = invert_encoder(args, bench)
    print(f"inverting {len(args.image)} image{'s' * (len(args.image) > 1)} with K {config.components:,}, "
          f"lr {config.lr:g}, weight decay {config.weight_decay:g}, {config.steps} steps (preset {args.preset} on "
          f"this space, and the flags given), from {'zero' if encoder is None else f'the encoder {args.encoder}'}")
    model, photos = bench.invert(args.image, masks, config, preset=args.preset, mask_dir=args.mask_dir,
                                 auto_mask=args.mask == [AUTO_MASK], crop=args.crop, detector=args.detector,
                                 seed=args.seed, checkpoint=args.checkpoint, encoder=encoder, times=times)
    bench.export(model, "w2w", args.out)
    print(f"wrote model {args.out} ({config.components} coefficients, {config.steps} steps)")
    print("times: " + ", ".join(f"{phase} {seconds:.2f} s" for phase, seconds in times.items()) +
          f"; total {time.perf_counter() - start:.2f} s")
    for what, name, path in save_fitted(args.out, photos, args.crop):  # the face crops and automatic masks
        print(f"wrote {what} of {name}: {path}")
    if args.export:
        print(f"wrote {args.export} LoRA {bench.export(model, args.export, export_path(args.out, args.export))}")
    if args.score:  # the photos' person, by dlib's descriptor, on the same bench
        from .scoring import DEFAULT_SEEDS

        print_score(argparse.Namespace(**{**vars(args), "images": args.image, "embedder": "dlib", "evaluator": None,
                                          "prompts": None, "seeds": DEFAULT_SEEDS, "steps": None, "guidance": None,
                                          "json": False}), bench, model)


def cmd_train_encoder(args) -> None:
    import shutil
    import time

    from .encoder import EncoderConfig, train_encoder
    from .encoder_files import (ENCODER_FILE, FEATURES_FOLDER, extract_features, fit_path, image_sources,
                                model_images, name_encoder, save_encoder)
    from .storage import FILE, check_outputs, load_space
    from .workbench import beside_model

    start = time.perf_counter()
    out = Path(args.out)
    checkpoint = Path(args.checkpoint) if args.checkpoint else beside_model(out, ".train-state")
    cache = Path(args.features_cache) if args.features_cache else beside_model(out, ".features")
    check_outputs([(out, ENCODER_FILE), (fit_path(out), FILE), (checkpoint, FILE), (cache, FEATURES_FOLDER)],
                  [args.space, args.images])
    space = load_space(args.space)
    settings = {name: getattr(args, name) for name in vars(EncoderConfig()) if getattr(args, name) is not None}
    with named_as_flags():
        config = EncoderConfig(**{"components": min(EncoderConfig.components, space.num_components), **settings})
    space.check_k(config.components)
    images = model_images(args.images, space)  # a folder count or name that does not fit fails before any work
    features = extract_features(images, config, cache, args.workers)  # resumes; faceless folders fail here
    encoder = train_encoder(space, features, config, args.seed, checkpoint, sources=image_sources(images))
    save_encoder(encoder, out)
    checkpoint.unlink(missing_ok=True)
    if not args.features_cache:
        shutil.rmtree(cache)
    if args.make_default:
        name_encoder(args.space, out)
        print(f"named {out} the default encoder of {args.space}")
    fit = encoder.fit
    print(f"wrote encoder {out} (K {config.components}, features {config.features}, {len(images):,} models, "
          f"{sum(map(len, images)):,} images) and its fit {fit_path(out)}; {time.perf_counter() - start:.1f} s")
    print(f"held-out fit ({fit['models']} models, {fit['images']} images): R^2 {fit['r2']:.3f} per image, "
          f"{fit['r2_mean_of_images']:.3f} for the mean of a model's images (0: no better than the mean model); "
          f"cosine {fit['cosine']:.3f} per image, {fit['cosine_mean_of_images']:.3f} for the mean; predictions are "
          f"moved out {fit['gain']:.2f}x")


def print_score(args, bench, model) -> None:
    """`w2w score` and `w2w invert --score`: the model's identity score against args.images, a table or JSON."""
    import json

    from .scoring import embed_photos, format_report, make_embedder, score_model

    embedder = make_embedder(args.embedder, args.detector, args.evaluator)
    photos = embed_photos(embedder, args.images)  # (R, D): a photo without a face fails before the pipeline loads
    settings = {key: value for key, value in (("num_inference_steps", args.steps), ("guidance_scale", args.guidance))
                if value is not None}
    report = score_model(bench.pipeline("generate"), bench.space, model, photos, embedder, args.prompts, args.seeds,
                         **settings)
    report["photos"] = [str(photo) for photo in args.images]
    print(json.dumps(report, indent=1) if args.json else format_report(report))


def cmd_score(args) -> None:
    from .workbench import Workbench

    bench = Workbench(args.base, args.space, args.device)
    print_score(args, bench, bench.load(args.model))


# ----------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    """`w2w` and its subcommands, in the order `w2w --help` lists them."""
    parser = OneLineParser(
        prog="w2w", description="weights2weights: sample, edit and invert identity LoRAs in a w2w space, and build "
                                "spaces. Runs on the bundled tiny world by default.")
    parser.add_argument("--version", action="version", version=f"w2w (lora_w2w) {__version__}",
                        help="print the version of lora_w2w and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in (add_info_parser, add_export_parser, add_import_official_parser, add_download_parser,
                       add_project_parser,
                       add_generate_parser, add_sample_parser, add_edit_parsers, add_invert_parser,
                       add_score_parser, add_train_encoder_parser, add_dataset_parsers, add_handed_over_parsers):
        add_parser(commands)
    return parser


def add_space(parser) -> None:
    """--space: the space a command reads."""
    parser.add_argument("--space", default=DEFAULT_SPACE,
                        help="space directory (default: the tiny world, %(default)s; SD1.5: files/official)")


def add_naming_base(parser) -> None:
    """--base for the commands that write or read LoRA files but run no model: the key names of its family."""
    parser.add_argument("--base", default=None,
                        help="the base pipeline the space was built for, a folder or hub id of which only the config "
                             "files are read: its family names the LoRA's keys (SDXL: kohya's input_blocks names) "
                             "and its network must have the space's layout (default: Stable Diffusion 1 and 2's "
                             "names, those of the tiny world and of the released files)")


def add_base(parser) -> None:
    """--base and --device: the pipeline a command runs."""
    parser.add_argument("--base", default=DEFAULT_BASE,
                        help="base diffusers pipeline the space was built for: folder or hub id (default: %(default)s; "
                             "SD1.5: stablediffusionapi/realistic-vision-v51)")
    parser.add_argument("--device", type=DEVICE, default="auto",
                        help="auto (CUDA when present), cpu, cuda, cuda:1, mps ... (default: %(default)s)")


def add_info_parser(commands) -> None:
    from .layout import REFERENCE_NETWORKS

    info = commands.add_parser("info", help="describe a space, a weights dataset, a model, a LoRA or an image, "
                                            "and how it was made",
                               description="Print what PATH is: a w2w space (layout, N, K, M, base model, "
                                           "attributes), a weights dataset (layout, M, shards), a w2w model (K, space "
                                           "id, how it was made: sampled, edited, inverted, projected), a LoRA "
                                           "(format, layers, rank; a kohya file's ModelSpec keys, a PEFT folder's "
                                           "model card, the model it was made from) or a generated image (prompt, "
                                           "seed, steps, guidance, models). With --layout NAME instead: the "
                                           "LoRA layout of a full-size base network, built on the meta device from "
                                           "its config shipped with w2w (no download): N and every layer.")
    info.add_argument("path", nargs="?", help="a space directory, a weights dataset directory, a model "
                                              ".safetensors/.pt, a PEFT folder, a kohya file or a PNG from "
                                              "`w2w generate`")
    info.add_argument("--layout", choices=tuple(REFERENCE_NETWORKS), default=None,
                      help="instead of PATH: " + "; ".join(f"{name}: {what}" for name, (what, _) in
                                                           REFERENCE_NETWORKS.items()))
    info.add_argument("--target-modules", nargs="+", default=None,
                      help="with --layout: the Linear layers that get a LoRA (default: to_q to_v, as the paper)")
    info.add_argument("--rank", type=COUNT, default=None, help="with --layout: the LoRA rank (default: 1)")
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
    add_naming_base(export)
    export.set_defaults(run=cmd_export)


def add_import_official_parser(commands) -> None:
    official = commands.add_parser(
        "import-official", help="convert the released w2w files into the project's safe space format",
        description="Read mean.pt (N), std.pt (N), V.pt (N x K), proj_1000pc.pt (M x 1000), weight_dimensions.pt "
                    "(PEFT key -> [numel, shape] in flat order, numel a 1-element torch.Size as the original "
                    "reads it, weight_dimensions[key][0][0]), identity_df.pt and adapter_config.json from SRC "
                    "and write a space to DST. With --model, convert one saved w2wmodel.pt instead.")
    official.add_argument("src", help="folder with the released files, or the folder above their files/ (or, with "
                                      "--model, a w2wmodel.pt)")
    official.add_argument("dst", help="space directory to write (or, with --model, a .safetensors model file)")
    official.add_argument("--trust-pickle", action="store_true",
                          help="allow unpickling identity_df.pt (and weight_dimensions.pt if it needs it); "
                               "unpickling runs code from the file: use only for files from a source you trust")
    official.add_argument("--model", action="store_true", help="SRC is a saved w2wmodel.pt (1 x K coefficients)")
    official.add_argument("--space-id", default=None,
                          help="with --model: id of the imported space the model belongs to (see `w2w info`)")
    official.set_defaults(run=cmd_import_official)


def add_download_parser(commands) -> None:
    from .download import DEFAULT_OUT, RELEASES, W2W_REPO, WEIGHTS_DATASETS

    download = commands.add_parser(
        "download", help="fetch the released w2w files, a weights dataset or a base model from the Hugging Face Hub",
        description="Fetch through huggingface_hub's cache (HF_HOME): progress bars, a killed download resumes, a "
                    "finished one is not fetched again, and a cached one is found offline (HF_HUB_OFFLINE=1). files "
                    "and weights are then put under --out at their paths in the repository (hard links into the "
                    "cache where the filesystem allows, copies otherwise).")
    what = download.add_subparsers(dest="what", required=True, metavar="WHAT")
    files = what.add_parser("files", help=f"the released files ({RELEASES['files'][0]}: mean, std, components, "
                                          f"coefficients, attributes), for `w2w import-official OUT DST`",
                            description=f"Fetch {RELEASES['files'][0]} of the repository into OUT/files/.")
    weights = what.add_parser("weights", help="a released weights dataset (M x N) for `w2w collect --from-all-weights`",
                              description="Fetch a released weights dataset into OUT at its path in the repository: "
                                          + "; ".join(f"{name}: {RELEASES[name][0]}" for name in WEIGHTS_DATASETS))
    weights.add_argument("dataset", choices=WEIGHTS_DATASETS,
                         help="identities: the paper's 64,974 identity LoRAs (26 GB); dogs: 120 dog-breed LoRAs")
    for parser in (files, weights):
        parser.add_argument("--out", default=DEFAULT_OUT, help="folder to put the files in (default: %(default)s)")
        parser.add_argument("--repo", default=W2W_REPO,
                            help="Hugging Face model repository of the release (default: %(default)s)")
    base = what.add_parser("base", help="a base diffusers pipeline, into the cache that `--base ID` loads from",
                           description="Fetch the files of the diffusers pipeline ID that loading it reads into "
                                       "huggingface_hub's cache, so that `--base ID` works offline afterwards.")
    base.add_argument("id", metavar="ID", help="hub id of the pipeline, e.g. stablediffusionapi/realistic-vision-v51")
    for parser in (files, weights, base):
        parser.add_argument("--revision", help="branch, tag or commit of the repository (default: main)")
    download.set_defaults(run=cmd_download)


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
    add_naming_base(project)
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
    gen.add_argument("--guidance", type=FINITE, default=None,
                     help="guidance scale (default: the base's: 7.5 for Stable Diffusion; for FLUX.1 3.5, its embedded "
                          "guidance, and with --negative-prompt its true classifier-free guidance too)")
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
    add_naming_base(sample)
    sample.add_argument("--out", required=True, help="output folder for sample_XXX.safetensors")
    sample.set_defaults(run=cmd_sample)


def add_edit_parsers(commands) -> None:
    """`w2w edit` and `w2w directions`: the attribute directions of a space."""
    from .editing import (ALIASES, DEFAULT_DEBIAS, DEFAULT_DIRECTION_METHOD, DEFAULT_EDIT_COMPONENTS, DIRECTION_METHODS,
                          MODELS_PER_COMPONENT)

    components = (f"(default: {DEFAULT_EDIT_COMPONENTS:,} as in the paper; for least squares and logistic at most "
                  f"M/{MODELS_PER_COMPONENT} of the space's M dataset models)")
    edit = commands.add_parser("edit", help="edit a model along attribute directions",
                               description="Move a model along attribute directions fitted to the space's "
                                           "attribute table; strengths are in standard deviations of the dataset "
                                           "along each direction. Edits compose.")
    add_space(edit)
    edit.add_argument("--model", required=True, help="w2w model file to edit")
    aliases = ", ".join(f"{name} = {'-' if sign < 0 else ''}{column}" for name, (column, sign) in ALIASES.items())
    edit.add_argument("--edit", type=_parse_edit, action="append", required=True, metavar="ATTRIBUTE=STRENGTH",
                      help=f"e.g. --edit Beard=2 --edit Chubby=-1.5 (repeatable); friendly names have the sign folded "
                           f"in ({aliases}), the attribute table's own names work too (`w2w directions` lists them)")
    edit.add_argument("--debias", default=None,
                      help=f"comma-separated attributes to keep: their directions are removed from each edit's "
                           f"(default: {','.join(DEFAULT_DEBIAS)}, those the space has, as in `w2w app`; none: "
                           f"--debias none)")
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
    """`w2w train-identities`, `w2w evaluate` and `w2w app`: listed here, parsed by their modules (see `run`)."""
    # its own parser (shared with `accelerate launch -m lora_w2w.train_identities`): main() hands over
    commands.add_parser("train-identities", add_help=False,
                        help="train many identity LoRAs in one pass (see `w2w train-identities --help`)")
    commands.add_parser("evaluate", add_help=False,
                        help="score sampling, editing, inversion, the paper's tables and its scaling curves on the "
                             "tiny world, or Table 2 on photographs with --faces (see `w2w evaluate --help`)")
    commands.add_parser("app", add_help=False,
                        help="the weights2weights app in the browser: sample, invert, edit, generate, download (see "
                             "`w2w app --help`)")


def add_invert_parser(commands) -> None:
    from .faces import DETECTOR_HELP, DETECTORS
    from .inversion import AUTO_MASK, CROPS, PRESETS, InversionConfig

    presets = "; ".join(f"{name}: K {c.components:,}, lr {c.lr:g}, weight decay {c.weight_decay:g}, {c.steps} steps"
                        for name, c in PRESETS.items())
    invert = commands.add_parser(
        "invert", help="invert a person's images (one or several) into a w2w model (the paper's Sec. 4.3)",
        description="Find the model of the space that reproduces IMAGE: Adam on its first K coefficients, from "
                    f"zero (or from an encoder's prediction: --init encoder, --encoder; --steps 0 for the prediction "
                    f"alone), on the diffusion loss of the image (inside MASK). With several --image of one person, "
                    f"each step draws one of them, so the loss is averaged over the person's photographs. "
                    f"Presets (the paper's): {presets}; "
                    "on a space with fewer components, all of them; a space may record its own settings for a "
                    "preset, which replace the paper's (`w2w info SPACE` lists them). Defaults: the "
                    "tiny world; for Stable Diffusion 1.5: --base stablediffusionapi/realistic-vision-v51 "
                    "--space files/official.")
    invert.add_argument("--image", required=True, action="append",
                        help="an image to invert: any size and mode; repeat it for several photographs of one person")
    invert.add_argument("--crop", choices=CROPS, default="center",
                        help="center: resize and centre-crop each image as it is; face: FFHQ's alignment of its "
                             "largest face (68 landmarks; eyes level, the square about 4x the eye distance) at the "
                             "pipeline's resolution, written to OUT.crop.png (default: %(default)s)")
    invert.add_argument("--detector", choices=DETECTORS, default="hog",
                        help=f"for --crop face and --mask auto, {DETECTOR_HELP}")
    masks = invert.add_mutually_exclusive_group()
    masks.add_argument("--mask", action="append", default=None,
                       help=f"binary mask image, white where the image is fitted (the image's size or aspect ratio), "
                            f"or {AUTO_MASK}: the face's landmarks' hull raised over forehead and hair, feathered, "
                            f"written to OUT.mask.png; "
                            f"one per --image in order, or one {AUTO_MASK} for all")
    masks.add_argument("--mask-dir", default=None,
                       help="folder of masks paired with the images by file name (DIR/NAME.png for NAME.jpg)")
    invert.add_argument("--preset", choices=tuple(PRESETS), default="real",
                        help="real: photographs of faces; ood: paintings and other out-of-distribution images "
                             "(default: %(default)s)")
    settings = invert.add_argument_group("inversion settings: the preset's unless given")
    add_config_flags(settings, InversionConfig, defaults=dict.fromkeys(vars(InversionConfig()), None))
    invert.add_argument("--init", choices=("zero", "encoder"), default="zero",
                        help="where the coefficients start: zero (the paper's), or the prediction of the space's "
                             "default encoder (`w2w info SPACE` names it), refined by the steps; several --image: the "
                             "mean of their predictions (default: %(default)s)")
    invert.add_argument("--encoder", default=None,
                        help="start from this encoder's prediction (a `w2w train-encoder` file of the space; implies "
                             "--init encoder)")
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
    invert.add_argument("--score", action="store_true",
                        help="then generate with the model (seeds 0-3, the space's prompt) and print its identity "
                             "similarity to the images (dlib's face descriptor; see `w2w score`)")
    invert.set_defaults(run=cmd_invert)


def add_train_encoder_parser(commands) -> None:
    from .encoder import FEATURES, EncoderConfig

    train = commands.add_parser(
        "train-encoder", help="train an encoder from images to the space's coefficients (instant inversion)",
        description="Learn images -> the first K coefficients of SPACE from its dataset models: each model's "
                    "coefficients paired with the images its LoRA was trained on (ROOT: one folder of images per "
                    "model, in the dataset's alphanumeric order, as `w2w train-identities` took them), by ridge "
                    "regression on the images' features, streamed model by model on the CPU. Models are split into "
                    "fitted and held-out ones; the fit on the held-out ones (R^2 of the coefficients, cosine of "
                    "predicted and true coefficient vectors) is printed and written to ENCODER.fit.json. "
                    "`w2w invert --encoder ENCODER` (or --init encoder, with --make-default) starts from its "
                    "prediction. A killed run resumes from its checkpoint. Features: " +
                    "; ".join(f"{name}: {f.description}" for name, f in FEATURES.items()) + ".")
    add_space(train)
    train.add_argument("--images", required=True, metavar="ROOT",
                       help="folder of image folders, one per dataset model of the space, in the dataset's order")
    train.add_argument("--out", required=True, metavar="ENCODER", help="encoder file to write (.safetensors)")
    add_config_flags(train.add_argument_group("encoder settings"), EncoderConfig,
                     defaults=dict.fromkeys(vars(EncoderConfig()), None))
    train.add_argument("--seed", type=SEED, default=0,
                       help="seed of the split into fitted and held-out models (default: %(default)s)")
    train.add_argument("--checkpoint", default=None,
                       help="file the run's sums are saved in every 1,000 models; a run that finds it resumes from "
                            "it (default: ENCODER.train-state, removed once ENCODER is written)")
    train.add_argument("--workers", type=COUNT, default=1,
                       help="processes that extract the images' features in parallel (dlib: about one per core; "
                            "default: %(default)s)")
    train.add_argument("--features-cache", default=None, metavar="DIR",
                       help="folder the features are cached in, a file per model: a run that finds them reads them "
                            "instead (default: ENCODER.features, removed once ENCODER is written; a folder given "
                            "here is kept, for fits with other settings)")
    train.add_argument("--make-default", action="store_true",
                       help="name ENCODER in SPACE/space.json as the space's default encoder (`w2w invert --init "
                            "encoder`)")
    train.set_defaults(run=cmd_train_encoder)


def add_score_parser(commands) -> None:
    from .faces import DETECTOR_HELP, DETECTORS
    from .scoring import DEFAULT_SEEDS, EMBEDDERS

    score = commands.add_parser(
        "score", help="how like the person of some photographs a model draws (identity similarity)",
        description="Generate one image per prompt and seed with MODEL and compare the faces in them with the "
                    "faces of the photographs: the mean cosine similarity of their embeddings over all (image, "
                    "photo) pairs, the share of pairs dlib calls the same person (descriptor distance under 0.6) "
                    "and the count of images without a face, per prompt and over all. dlib's descriptor is not "
                    "the paper's FaceNet: the numbers are not the paper's ID scores.")
    add_space(score)
    add_base(score)
    score.add_argument("--model", required=True, help="w2w model file (.safetensors or the original w2wmodel.pt)")
    score.add_argument("--images", required=True, nargs="+", help="photographs of the person to compare with")
    score.add_argument("--prompts", nargs="+", default=None,
                       help="prompts to generate, each with every seed (default: the space's, 'sks person')")
    score.add_argument("--seeds", type=SEED, nargs="+", default=list(DEFAULT_SEEDS),
                       help=f"one image per prompt and seed (default: {' '.join(map(str, DEFAULT_SEEDS))})")
    score.add_argument("--steps", type=COUNT, default=None, help="denoising steps (default: generate's, 50)")
    score.add_argument("--guidance", type=FINITE, default=None,
                       help="guidance scale (default: generate's, the base's: 7.5 for Stable Diffusion, 3.5 for "
                            "FLUX.1)")
    score.add_argument("--embedder", choices=EMBEDDERS, default="dlib",
                       help="dlib: dlib's face descriptor, for photographs; tiny: the tiny world's evaluator, for "
                            "its renders (default: %(default)s)")
    score.add_argument("--detector", choices=DETECTORS, default="hog", help=DETECTOR_HELP)
    score.add_argument("--evaluator", default=DEFAULT_EVALUATOR,
                       help="the tiny world's evaluator file, for --embedder tiny (default: %(default)s)")
    score.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    score.set_defaults(run=cmd_score)


def add_dataset_parsers(commands) -> None:
    """`w2w collect` and `w2w build`: making a weights dataset and a space from it."""
    from .dataset import DEFAULT_SHARD_SIZE
    from .pca import BuildConfig

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
    add_config_flags(build, BuildConfig)
    build.set_defaults(run=cmd_build)


def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line on stderr, without the file and source line Python shows (above any progress bar)."""
    from tqdm import tqdm

    tqdm.write(f"w2w: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    try:
        with warnings.catch_warnings():  # every subcommand's warnings, one line each
            warnings.showwarning = one_line_warning
            return run(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:  # in any phase, the parser's imports included; outputs are whole or absent
        print("w2w: interrupted", file=sys.stderr)
        return 130
    finally:
        if argv is None:  # the `w2w` command: its work is over, and a Ctrl-C in the seconds the interpreter
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # takes to shut down would kill it without a word


def run(argv: list[str]) -> int:
    """The subcommand of `argv`; its exit code (bad input: SystemExit(2) after one line)."""
    if argv[:1] == ["train-identities"]:
        from .train_identities import main as train_main

        return train_main(argv[1:])
    if argv[:1] == ["evaluate"]:
        from .tiny import tables

        return exit_code("w2w evaluate", lambda: tables.main(tables.parse_args(argv[1:])))
    if argv[:1] == ["app"]:
        from .app import main as app_main  # imports Gradio: only for `w2w app`

        return app_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    code = exit_code("w2w", lambda: args.run(args))
    if code:
        raise SystemExit(code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
