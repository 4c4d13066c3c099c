"""The applications scored by the evaluator on the tiny world, next to the paper's claims:

- sampling: images of one sampled model across seeds agree on attributes (target >= 85%); sampled
  models differ from each other and from their nearest dataset model;
- editing: Eyeglasses, Bald, No_Beard, Blond_Hair edits change the attribute in >= 80% of cases and
  keep the other attributes in >= 90%, with a high identity similarity to the original (each change
  rate also split by the sex the evaluator reads: an edit may work on one sex only);
- inversion: a single held-out image inverted into the space, versus single-image and multi-image
  Dreambooth-LoRA of the same identity (the paper's Table 2: ID score 0.64 vs 0.43 vs 0.69);
- multi-image inversion: held-out identities inverted from 1, 3 and 5 of their views with the same
  steps, scored against views none of them saw (and how often the photo face detector finds the faces).

    python -m lora_w2w.tiny.evaluate --out outputs/evaluation.json      # w2w evaluate does the same
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..editing import METHODS, apply_edits, attribute_directions, attribute_labels
from ..pipeline import generate, load_base_pipeline
from ..sampling import nearest_models, sample_models
from ..space import Space
from ..storage import atomic_output, load_space
from .build import LORA_RECIPE
from .evaluator import Evaluator, Prediction, attribute_agreement, identity_similarity
from .faces import ATTRIBUTES, dataset_view_seed, render, sample_identity

EDITED = ("Eyeglasses", "Bald", "No_Beard", "Blond_Hair")
HELD_OUT_SEEDS = 6_000_000  # identities of no training set
PAPER = {"inversion_id_score": {"w2w, 1 image": 0.64, "Dreambooth-LoRA, 1 image": 0.43,
                                "Dreambooth-LoRA, many images": 0.69}}


SETTINGS_HELP = {
    "samples": "sampled models scored (sampling, editing)", "seeds": "images generated per model",
    "steps": "denoising steps per image", "guidance": "classifier-free guidance scale",
    "edit_strength": "edit strength in standard deviations of the dataset along the direction",
    "edit_method": "how the directions are found",
    "edit_components": "K of the directions (0: the method's default)",
    "inversions": "held-out identities inverted",
    "inversion_components": "K of the inversions (0: the space's real preset's)",
    "inversion_steps": "Adam steps of an inversion (0: the preset's)",
    "inversion_lr": "Adam learning rate of an inversion (0: the preset's)",
    "dreambooth_steps": "steps of the Dreambooth-LoRA baselines",
    "dreambooth_lr": "learning rate of the Dreambooth-LoRA baselines",
}


@dataclass
class Settings:
    samples: int = 32           # sampled models (each edit rate moves in steps of 1/32)
    seeds: int = 4              # images per model
    steps: int = 25             # denoising steps
    guidance: float = 5.0
    edit_strength: float = 3.0  # standard deviations of the dataset along a direction
    edit_method: str = "mean_difference"
    edit_components: int = 0    # 0: the method's default (editing.edit_components)
    inversions: int = 4         # held-out identities inverted
    inversion_components: int = 0  # 0: the real preset's, as the space records it (inversion.preset)
    inversion_steps: int = 0
    inversion_lr: float = 0.0
    dreambooth_steps: int = LORA_RECIPE["max_train_steps"]
    dreambooth_lr: float = LORA_RECIPE["learning_rate"]


def _images(pipe, space: Space, model, settings: Settings, seed0: int = 0):
    return generate(pipe, space.layout, model.weights(space), space.prompt,
                    seeds=range(seed0, seed0 + settings.seeds), num_inference_steps=settings.steps,
                    guidance_scale=settings.guidance)


def _majority(pred: Prediction) -> dict[str, bool]:
    return {a: bool((pred.attributes[a] > 0).mean() > 0.5) for a in ATTRIBUTES}


def _pairwise_similarity(a: Prediction, b: Prediction) -> float:
    """Mean identity similarity over all pairs (image of a, image of b)."""
    return float(np.mean([identity_similarity(a.select([i]), b).mean() for i in range(len(a))]))


def evaluate_sampling(pipe, space: Space, evaluator: Evaluator, settings: Settings) -> dict:
    models = sample_models(space, settings.samples, seed=0)
    preds = [evaluator.predict(_images(pipe, space, m, settings)) for m in tqdm(models, desc="sampling: models")]
    reads = [_majority(p) for p in preds]
    consistency = [attribute_agreement(p, read) for p, read in zip(preds, reads)]
    within = [_pairwise_similarity(p, p) for p in preds]
    between = [_pairwise_similarity(preds[i], preds[j]) for i in range(len(preds)) for j in range(i + 1, len(preds))]
    draws = torch.stack([m.coefficients for m in models])
    _, distance = nearest_models(space, draws)
    dataset = space.coefficients[:, : draws.shape[1]].float()
    # the typical distance of a dataset model to its nearest other dataset model (the first is itself)
    spread = torch.cdist(dataset[:200], dataset).topk(2, largest=False).values[:, 1].median()
    return {"attribute_consistency_across_seeds": float(np.mean(consistency)), "target": 0.85,
            "identity_similarity_same_model": float(np.mean(within)),
            "identity_similarity_different_models": float(np.mean(between)),
            "nearest_dataset_distance_over_dataset_spacing": float(distance.median() / spread),
            "attribute_frequency": _frequencies(space, reads)}


def _frequencies(space: Space, reads: list[dict[str, bool]]) -> dict[str, dict[str, float]]:
    """For each attribute of the space's table: the share of sampled models showing it (by the majority of
    their images) and the share of the dataset's models having it."""
    columns = space.attributes.columns if space.attributes is not None else ()
    return {a: {"samples": float(np.mean([read[a] for read in reads])),
                "dataset": float((attribute_labels(space, a) > 0).double().mean())} for a in ATTRIBUTES if a in columns}


def evaluate_editing(pipe, space: Space, evaluator: Evaluator, settings: Settings) -> dict:
    directions = attribute_directions(space, list(EDITED), settings.edit_components or None, settings.edit_method,
                                      debias_against=["Male"])
    models = sample_models(space, settings.samples, seed=1)
    results = {a: {"changed": [], "kept": [], "similarity": []} for a in EDITED}
    male = []  # how the evaluator reads each model before its edits
    for model in tqdm(models, desc="editing: models"):
        before = evaluator.predict(_images(pipe, space, model, settings))
        read = _majority(before)
        male.append(read["Male"])
        for attribute in EDITED:
            strength = -settings.edit_strength if read[attribute] else settings.edit_strength
            edited = apply_edits(model, {attribute: strength}, directions)
            after = evaluator.predict(_images(pipe, space, edited, settings))
            now = _majority(after)
            others = [a for a in ATTRIBUTES if a not in (attribute, "Male")]
            results[attribute]["changed"].append(now[attribute] != read[attribute])
            results[attribute]["kept"].append(np.mean([now[a] == read[a] for a in others]))
            results[attribute]["similarity"].append(float(identity_similarity(before, after).mean()))
    return {a: {"changed": float(np.mean(r["changed"])), "changed_by_sex": _by_sex(r["changed"], male),
                "others_kept": float(np.mean(r["kept"])), "identity_similarity": float(np.mean(r["similarity"]))}
            for a, r in results.items()} | {
        "models_by_sex": {"men": sum(male), "women": len(male) - sum(male)},
        "targets": {"changed": 0.8, "others_kept": 0.9}, "strength_std": settings.edit_strength,
        "method": settings.edit_method, "components": len(next(iter(directions.values())).vector)}


def _by_sex(changed: list[bool], male: list[bool]) -> dict[str, float | None]:
    """The share of changed models among those read as men and as women (None for a group with no model):
    an edit the dataset only shows on one sex (a beard) may change that group alone."""
    groups = {"men": [c for c, m in zip(changed, male) if m], "women": [c for c, m in zip(changed, male) if not m]}
    return {group: float(np.mean(values)) if values else None for group, values in groups.items()}


def evaluate_inversion(pipe, space: Space, evaluator: Evaluator, settings: Settings, work: Path) -> dict:
    from .. import train_identities
    from ..dreambooth import prepare_image
    from ..formats import load_peft
    from ..inversion import invert, preset

    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    config = preset("real", space, components=settings.inversion_components or None,
                    lr=settings.inversion_lr or None, steps=settings.inversion_steps or None)
    identities = [sample_identity(HELD_OUT_SEEDS + i) for i in range(settings.inversions)]
    renders = {identity.name: [render(identity, dataset_view_seed(HELD_OUT_SEEDS + i, k)) for k in range(10)]
               for i, identity in enumerate(identities)}
    candidates = {name: {} for name in PAPER["inversion_id_score"]}
    for identity in tqdm(identities, desc="inversion: w2w"):
        for kind, images in (("one", renders[identity.name][:1]), ("many", renders[identity.name])):
            folder = work / kind / identity.name
            folder.mkdir(parents=True, exist_ok=True)
            for k, image in enumerate(images):
                image.save(folder / f"{k}.png")
        target = prepare_image(renders[identity.name][0], resolution)[None]
        candidates["w2w, 1 image"][identity.name] = invert(pipe, space, target, None, config,
                                                           progress=False).weights(space)
    # the baselines: every identity of a kind trained together in one pass, with the space's LoRA recipe
    for name, kind in (("Dreambooth-LoRA, 1 image", "one"), ("Dreambooth-LoRA, many images", "many")):
        train_identities.train_identities(train_identities.parse_args([
            "--pretrained_model_name_or_path", pipe.name_or_path, "--instance_root", str(work / kind),
            "--output_root", str(work / f"loras_{kind}"), "--class_data_dir", str(work / "class_images"),
            "--identities_per_batch", str(len(identities)),
            "--max_train_steps", str(settings.dreambooth_steps), "--learning_rate", str(settings.dreambooth_lr),
            "--num_class_images", "50", "--class_inference_steps", str(settings.steps),
            "--lora_r", str(space.layout.rank), "--lora_alpha", str(space.layout.alpha),
            "--lora_target_modules", *space.layout.target_modules]))
        candidates[name] = {i.name: load_peft(space.layout, work / f"loras_{kind}" / i.name) for i in identities}

    scores = {name: [] for name in candidates}
    for identity in tqdm(identities, desc="inversion: scoring"):
        truth = evaluator.predict(renders[identity.name])
        for name, models in candidates.items():
            images = generate(pipe, space.layout, models[identity.name], space.prompt, seeds=range(settings.seeds),
                              num_inference_steps=settings.steps, guidance_scale=settings.guidance)
            pred = evaluator.predict(images)
            scores[name].append({"identity_similarity": _pairwise_similarity(pred, truth),
                                 "attribute_agreement": attribute_agreement(pred, identity.attributes)})
    return {name: {key: float(np.mean([s[key] for s in rows])) for key in rows[0]} for name, rows in scores.items()} | {
        "paper_id_score": PAPER["inversion_id_score"], "config": asdict(config)}


MULTI_VIEWS = (1, 3, 5)  # views of an identity inverted together
SCORED_VIEWS = range(5, 10)  # the views the multi-image inversions are scored against: none of them saw these


def evaluate_multi_image_inversion(pipe, space: Space, evaluator: Evaluator, settings: Settings,
                                   views_inverted: tuple[int, ...] = MULTI_VIEWS) -> dict:
    """Each held-out identity inverted from its first 1, 3 and 5 views (one drawn per step, the same steps),
    scored against views 5-9 by identity similarity and against the identity's attributes."""
    from ..dreambooth import prepare_image
    from ..faces import detect_faces
    from ..inversion import invert, preset

    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    config = preset("real", space, components=settings.inversion_components or None,
                    lr=settings.inversion_lr or None, steps=settings.inversion_steps or None)
    scores = {views: [] for views in views_inverted}
    detected = []
    for i in tqdm(range(settings.inversions), desc="multi-image inversion: identities"):
        identity = sample_identity(HELD_OUT_SEEDS + i)
        renders = [render(identity, dataset_view_seed(HELD_OUT_SEEDS + i, k)) for k in range(max(SCORED_VIEWS) + 1)]
        detected += [bool(detect_faces(image)) for image in renders]
        truth = evaluator.predict([renders[k] for k in SCORED_VIEWS])
        for views in views_inverted:
            images = torch.stack([prepare_image(image, resolution) for image in renders[:views]])  # (I, 3, R, R)
            model = invert(pipe, space, images, None, config, progress=False)
            pred = evaluator.predict(generate(pipe, space.layout, model.weights(space), space.prompt,
                                              seeds=range(settings.seeds), num_inference_steps=settings.steps,
                                              guidance_scale=settings.guidance))
            scores[views].append({"identity_similarity": _pairwise_similarity(pred, truth),
                                  "attribute_agreement": attribute_agreement(pred, identity.attributes)})
    return {f"{views} view{'s' * (views > 1)}": {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}
            for views, rows in scores.items()} | {
        "scored_against_views": list(SCORED_VIEWS), "identities": settings.inversions,
        "face_detection_rate": float(np.mean(detected)), "config": asdict(config),
        "paper_id_score": PAPER["inversion_id_score"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="w2w evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="files/tiny/base", help="base pipeline (default: %(default)s)")
    parser.add_argument("--space", default="files/tiny/space", help="space (default: %(default)s)")
    parser.add_argument("--evaluator", default="files/tiny/evaluator.safetensors", help="evaluator weights")
    parser.add_argument("--out", default="outputs/evaluation.json", help="JSON report (default: %(default)s)")
    parser.add_argument("--work", default="outputs/evaluation", help="work folder (default: %(default)s)")
    parser.add_argument("--only", nargs="+", choices=("sampling", "editing", "inversion", "multi_image_inversion"),
                        default=["sampling", "editing", "inversion", "multi_image_inversion"],
                        help="which applications to score")
    for field, value in asdict(Settings()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value,
                            choices=METHODS if field == "edit_method" else None,
                            help=f"{SETTINGS_HELP[field]} (default: %(default)s)")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    settings = Settings(**{f: getattr(args, f) for f in asdict(Settings())})
    pipe = load_base_pipeline(args.base, "auto", progress=False)
    space = load_space(args.space)
    evaluator = Evaluator.load(args.evaluator)
    report = {"space_id": space.id, "settings": asdict(settings)}
    if "sampling" in args.only:
        report["sampling"] = evaluate_sampling(pipe, space, evaluator, settings)
    if "editing" in args.only:
        report["editing"] = evaluate_editing(pipe, space, evaluator, settings)
    if "inversion" in args.only:
        report["inversion"] = evaluate_inversion(pipe, space, evaluator, settings, Path(args.work))
    if "multi_image_inversion" in args.only:
        report["multi_image_inversion"] = evaluate_multi_image_inversion(pipe, space, evaluator, settings)
    with atomic_output(args.out) as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main(parse_args())
