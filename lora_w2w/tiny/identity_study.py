"""Does a LoRA carry an identity? Train Dreambooth LoRAs of held-out tiny-world identities with one
configuration, generate "sks person" with each, and let the evaluator read the images: attribute
agreement with the identity and identity similarity to its renders, against the base model without
a LoRA as baseline. One row of the ablation table in files/tiny/README.md.

    python -m lora_w2w.tiny.identity_study --identities 16 --lora-r 1 --max-train-steps 800 --out outputs/study

With `--having Blond_Hair=1 No_Beard=-1 ...` only identities with those attribute values are studied
(each value's identities in turn), and the agreement on each of those attributes says how often a
LoRA renders it.

The last line printed is one JSON object with the configuration and the scores.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from .. import train_identities
from ..defaults import DEFAULT_EVALUATOR
from ..dreambooth import DreamboothConfig, add_dreambooth_arguments
from ..errors import W2WError
from ..flags import OneSpellingFormatter, add_flag, config_from_args
from ..formats import load_peft
from ..layout import LoraLayout
from ..pipeline import generate_from_weights, image_grid
from ..storage import save_png
from ..workbench import Workbench
from .evaluator import Evaluator, attribute_agreement, identity_similarity
from .synthetic import ATTRIBUTES, dataset_view_seed, render, sample_identity, write_dataset

STUDY_SEEDS = 4_000_000  # identities of no training set


def parse_having(items: list[str]) -> dict[str, bool]:
    """["Blond_Hair=1", "No_Beard=-1"] -> {"Blond_Hair": True, "No_Beard": False}."""
    having = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in ATTRIBUTES or value not in ("1", "-1", "+1"):
            raise W2WError(f"--having {item!r}: expected ATTRIBUTE=1 or ATTRIBUTE=-1 with an attribute of "
                           f"{', '.join(ATTRIBUTES)}")
        having[name] = value != "-1"
    return having


def study_seeds(count: int, having: dict[str, bool]) -> list[int]:
    """`count` held-out identity seeds; with `having`, an equal share for each of its attribute values
    (the first seeds from STUDY_SEEDS whose identity has it)."""
    if not having:
        return list(range(STUDY_SEEDS, STUDY_SEEDS + count))
    seeds = []
    for i, (name, value) in enumerate(having.items()):
        want, seed = count // len(having) + (i < count % len(having)), STUDY_SEEDS
        while want:
            if sample_identity(seed).attributes[name] == value and seed not in seeds:
                seeds.append(seed)
                want -= 1
            seed += 1
    return seeds


def score_images(evaluator: Evaluator, images, identity, references) -> dict:
    """Attribute agreement of `images` with `identity`, identity similarity to its `references`
    (pairs image j / reference j mod R), per-attribute agreement and face confidence."""
    pred = evaluator.predict(images)
    ref = evaluator.predict(references)
    pairs = ref.select(np.arange(len(pred)) % len(ref))
    return {"agreement": attribute_agreement(pred, identity.attributes),
            "per_attribute": {a: attribute_agreement(pred, identity.attributes, [a]) for a in ATTRIBUTES},
            "similarity": float(identity_similarity(pred, pairs).mean()),
            "face_confidence": float(pred.face_confidence.mean())}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=OneSpellingFormatter)
    parser.add_argument("--identities", type=int, default=16, help="held-out identities trained (default: %(default)s)")
    add_flag(parser, "images_per_identity", kebab=True, type=int, default=10,
             help="instance images each (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=8, help="'sks person' images scored per identity (default: %(default)s)")
    add_flag(parser, "inference_steps", kebab=True, type=int, default=25,
             help="denoising steps of the samples (default: %(default)s)")
    parser.add_argument("--guidance", type=float, default=5.0, help="guidance scale of the samples (default: %(default)s)")
    parser.add_argument("--evaluator", default=DEFAULT_EVALUATOR, help="evaluator file")
    parser.add_argument("--out", required=True, help="work folder: faces, LoRAs, a picture, the JSON row")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--having", nargs="+", default=[], metavar="ATTRIBUTE=±1",
                        help="study only identities with these attribute values, an equal share each "
                             "(e.g. Blond_Hair=1 No_Beard=-1: blond identities and bearded ones)")
    add_dreambooth_arguments(parser, kebab=True)  # the configuration studied: the recipe's flags
    args = parser.parse_args(argv)
    try:
        args.having = parse_having(args.having)
        recipe = config_from_args(DreamboothConfig, args)
    except W2WError as error:
        parser.error(str(error))
    out = Path(args.out)
    recipe = dataclasses.replace(recipe, class_data_dir=recipe.class_data_dir or str(out.parent / "class_images"))
    args.train = train_identities.run_args(recipe, out / "faces" / "celeba_generated", out / "loras",
                                           identities_per_batch=args.identities)
    return args


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    out, train = Path(args.out), args.train
    identity_seeds = study_seeds(args.identities, args.having)
    write_dataset(out / "faces", len(identity_seeds), images_per_identity=args.images_per_identity, progress=False,
                  seeds=identity_seeds)
    start = time.perf_counter()
    train_identities.train_identities(train)
    train_seconds = time.perf_counter() - start

    pipe = Workbench(train.pretrained_model_name_or_path, None, "cpu", progress=False).pipeline()
    layout = LoraLayout.from_unet(pipe.unet, train.lora_target_modules, train.lora_r, train.lora_alpha)
    evaluator = Evaluator.load(args.evaluator)
    seeds = range(args.samples)
    settings = dict(seeds=seeds, num_inference_steps=args.inference_steps, guidance_scale=args.guidance)
    baseline_images = generate_from_weights(pipe, None, None, train.instance_prompt, **settings)
    rows, picture = [], []
    for seed in identity_seeds:
        identity = sample_identity(seed)
        references = [render(identity, dataset_view_seed(seed, k)) for k in range(args.images_per_identity)]
        weights = load_peft(layout, out / "loras" / identity.name)
        images = generate_from_weights(pipe, layout, weights, train.instance_prompt, **settings)
        rows.append({"name": identity.name, "lora": score_images(evaluator, images, identity, references),
                     "base": score_images(evaluator, baseline_images, identity, references)})
        picture += references[:4] + images[:4]
    save_png(image_grid(picture, columns=8), out / "study.png")

    def mean(kind, key):
        return float(np.mean([row[kind][key] for row in rows]))

    def rendered(kind, name, value):
        return float(np.mean([row[kind]["per_attribute"][name] for row, seed in zip(rows, identity_seeds)
                              if sample_identity(seed).attributes[name] == value]))

    result = {
        "config": {"rank": train.lora_r, "alpha": train.lora_alpha, "targets": train.lora_target_modules,
                   "steps": train.max_train_steps, "lr": train.learning_rate, "batch": train.train_batch_size,
                   "prior": train.with_prior_preservation, "num_weights": layout.numel,
                   "having": {name: 1 if value else -1 for name, value in args.having.items()}},
        "identities": args.identities, "train_seconds": round(train_seconds, 1),
        "agreement": mean("lora", "agreement"), "base_agreement": mean("base", "agreement"),
        "similarity": mean("lora", "similarity"), "base_similarity": mean("base", "similarity"),
        "face_confidence": mean("lora", "face_confidence"),
        "per_attribute": {a: float(np.mean([r["lora"]["per_attribute"][a] for r in rows])) for a in ATTRIBUTES},
        "base_per_attribute": {a: float(np.mean([r["base"]["per_attribute"][a] for r in rows])) for a in ATTRIBUTES},
        # with --having: how often the images of an identity with the value show it (LoRA, base alone)
        "rendered": {f"{name}={1 if value else -1}": [rendered(kind, name, value) for kind in ("lora", "base")]
                     for name, value in args.having.items()},
    }
    (out / "study.json").write_text(json.dumps({**result, "rows": rows}, indent=1))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(parse_args())
