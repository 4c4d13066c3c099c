"""The applications scored by the evaluator on the tiny world, next to the paper's claims. Sections
(`--only NAME ...`; each seeded, so a rerun gives the same numbers):

- sampling: images of one sampled model across seeds agree on attributes (target >= 85%); sampled
  models differ from each other and from their nearest dataset model;
- editing: Eyeglasses, Bald, No_Beard, Blond_Hair edits change the attribute in >= 80% of cases and
  keep the other attributes in >= 90%, with a high identity similarity to the original (each change
  rate also split by the sex the evaluator reads: an edit may work on one sex only);
- table1 (the paper's Table 1): one edit per attribute by prompting ("sks person" plus the caption
  words), by a Concept-Sliders-style text slider (`lora_w2w.sliders`) and by w2w, on the same sampled
  models and seeds: attribute changed, others kept, identity similarity and the evaluator's feature
  distance (LPIPS-style; LPIPS itself needs torchvision's downloaded backbones) to the unedited images;
- table2 (Table 2): a held-out image inverted into the space, against single-image and multi-image
  Dreambooth-LoRA of the same identity (the paper: ID score 0.64 vs 0.43 vs 0.69);
- timing (Table 4): wall time of one inversion and of training one 1-image and one multi-image
  Dreambooth-LoRA, in the same run;
- scaling_models (Figs 9 and 10): spaces PCA'd from the first M of the weights dataset's LoRAs
  (no retraining): inversion identity similarity, edit entanglement, sampling consistency;
- scaling_components (Fig 30): inversion identity similarity against K on the full dataset's PCA.
- multi_image_inversion: held-out identities inverted from 1, 3 and 5 of their views with the same
  steps, scored against views none of them saw (and how often the photo face detector finds the faces).

`--faces DIR` runs Table 2's protocol on photographs instead, on any base and space (SD1.5 with the
released files): each person's photograph inverted against 1-image and multi-image Dreambooth-LoRA, every
model's images of several prompts scored by dlib's face descriptor (`identity.py`; not FaceNet, so not
the paper's numbers), into the report's table2 section.

    python -m lora_w2w.tiny.tables --out outputs/evaluation.json      # w2w evaluate does the same
    w2w evaluate --only table1 --out files/tiny/evaluation.json         # refresh one section of a report
    w2w evaluate --base stablediffusionapi/realistic-vision-v51 --space files/official --faces photos/ \
        --dreambooth-steps 800 --class-images 200 --out outputs/table2_photos.json   # Table 2 on photographs
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..dataset import WeightsDataset, add_models, matrix_source
from ..defaults import DEFAULT_BASE, DEFAULT_EVALUATOR, DEFAULT_SPACE, DEFAULT_WEIGHTS
from ..editing import DIRECTION_METHODS, apply_edits, attribute_directions, attribute_labels, edit_components
from ..errors import SettingError, W2WError
from ..flags import OneLineParser, add_config_flags, config_from_args
from ..identity import TinyIdentity, mean_similarity, pair_similarities
from ..network import FusedLora
from ..pipeline import generate_from_weights
from ..sampling import nearest_models, sample_models
from ..space import Space, W2WModel
from ..storage import atomic_output
from ..workbench import Workbench
from .build import LORA_RECIPE
from .evaluator import Evaluator, Prediction, attribute_agreement, feature_distance
from .synthetic import ATTRIBUTES, Identity, dataset_view_seed, render, sample_identity

EDITED = ("Eyeglasses", "Bald", "No_Beard", "Blond_Hair")
HELD_OUT_SEEDS = 6_000_000  # identities of no training set
PAPER = {
    "table2_id_score": {"w2w": 0.64, "dreambooth_1": 0.43, "dreambooth_multi": 0.69},
    "table4_a100_s": {"inversion_s": 55, "dreambooth_1_s": 200, "dreambooth_multi_s": 220},
    # Table 1 (prompting / sliders / w2w): ID score, LPIPS, CLIP score; the tiny world's Male is the paper's
    # gender edit; it has no narrow eyes (its eye traits carry no attribute or caption word)
    "table1": {"Male": {"prompting": (0.39, 0.30, 1.98), "slider": (0.33, 0.39, 3.50), "w2w": (0.45, 0.31, 4.13)},
               "Chubby": {"prompting": (0.29, 0.41, 1.12), "slider": (0.33, 0.38, 2.21), "w2w": (0.45, 0.36, 2.16)}},
}

# Table 1's attributes, each with the caption words that draw it: the prompt (and negative prompt) that
# gives a model the attribute, the one that takes it away (the vocabulary has no "thin" or "without": the
# negative prompt takes those), and the slider's prompt pair (c+ shows it, c- does not) on SLIDER_TARGET.
TABLE1 = {
    "Male": {"add": ("sks man", ""), "remove": ("sks woman", ""),
             "slider": ("a photo of a man", "a photo of a woman")},
    "Eyeglasses": {"add": ("sks person with glasses", ""), "remove": ("sks person", "glasses"),
                   "slider": ("a photo of a person with glasses", "a photo of a person")},
    "Blond_Hair": {"add": ("sks person with blond hair", ""), "remove": ("sks person", "blond hair"),
                   "slider": ("a photo of a person with blond hair", "a photo of a person")},
    "No_Beard": {"add": ("sks person", "a beard"), "remove": ("sks person with a beard", ""),
                 "slider": ("a photo of a person", "a photo of a person with a beard")},
    "Young": {"add": ("young sks person", ""), "remove": ("old sks person", ""),
              "slider": ("a photo of a young person", "a photo of an old person")},
    "Chubby": {"add": ("chubby sks person", ""), "remove": ("sks person", "chubby"),
               "slider": ("a photo of a chubby person", "a photo of a person")},
}
TABLE1_METHODS = ("prompting", "slider", "w2w")
SLIDER_TARGET = "a photo of a person"


@dataclass(frozen=True)
class Settings:
    """What `w2w evaluate` measures with; None: the default named in the help."""

    samples: int = field(default=32, metadata={"help": "sampled models scored (sampling, editing; each edit rate "
                                                       "moves in steps of 1/32)"})
    seeds: int = field(default=4, metadata={"help": "images generated per model"})
    steps: int = field(default=25, metadata={"help": "denoising steps per image"})
    guidance: float = field(default=5.0, metadata={"help": "classifier-free guidance scale"})
    edit_strength: float = field(default=3.0, metadata={
        "help": "edit strength in standard deviations of the dataset along the direction"})
    edit_method: str = field(default="mean_difference", metadata={"help": "how the directions are found",
                                                                  "choices": DIRECTION_METHODS})
    edit_components: int | None = field(default=None, metadata={
        "help": "K of the directions (default: the method's, editing.edit_components)"})
    inversions: int = field(default=4, metadata={"help": "held-out identities inverted (table2)"})
    inversion_components: int | None = field(default=None, metadata={
        "help": "K of the inversions (default: the real preset's, as the space records it)"})
    inversion_steps: int | None = field(default=None, metadata={"help": "Adam steps of an inversion "
                                                                        "(default: the preset's)"})
    inversion_lr: float | None = field(default=None, metadata={"help": "Adam learning rate of an inversion "
                                                                       "(default: the preset's)"})
    views: int = field(default=5, metadata={"help": "renders of a held-out identity: the multi-image "
                                                    "Dreambooth's training set and the identity's reference "
                                                    "(5: the multi-image baseline trains the 1-image one's steps)"})
    dreambooth_steps: int = field(default=LORA_RECIPE["max_train_steps"], metadata={
        "help": "steps of the 1-image Dreambooth-LoRA baseline (the space's recipe)"})
    dreambooth_multi_steps: int | None = field(default=None, metadata={
        "help": "steps of the multi-image Dreambooth-LoRA baseline (default: DREAMBOOTH_MULTI_STEPS_PER_VIEW "
                "per view)"})
    dreambooth_lr: float = field(default=LORA_RECIPE["learning_rate"], metadata={
        "help": "learning rate of the Dreambooth-LoRA baselines"})
    class_images: int = field(default=LORA_RECIPE["num_class_images"], metadata={
        "help": "prior-preservation images of the Dreambooth-LoRA baselines (the space's recipe)"})
    table1_samples: int = field(default=8, metadata={"help": "sampled models edited in table1"})
    slider_steps: int = field(default=60, metadata={"help": "Adam steps of each text slider"})
    slider_eta: float = field(default=1.0, metadata={"help": "the sliders' guidance scale eta"})
    slider_scale: float = field(default=2.0, metadata={
        "help": "scale a slider is applied at (a glasses slider of 60 steps, 2 models x 3 seeds: glasses in 1 "
                "image at 1, in all 6 at 2)"})
    slider_latents: int = field(default=32, metadata={"help": "base-model latents of the target prompt the "
                                                              "sliders train on"})
    scaling_models: tuple[int, ...] = field(default=(25, 50, 100, 250, 500, 1000), metadata={
        "help": "M of the scaling spaces: the first M models of --weights"})
    scaling_components: tuple[int, ...] = field(default=(10, 25, 50, 100, 250, 999), metadata={
        "help": "K of the inversions on the full dataset's PCA (at most M - 1)"})
    scaling_inversions: int = field(default=2, metadata={"help": "held-out identities inverted per scaling "
                                                                 "point"})
    scaling_samples: int = field(default=4, metadata={"help": "sampled models edited per scaling space"})

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and not isinstance(value, bool) and value < 1:
                raise SettingError(f.name, f"must be >= 1, got {value}")
        if self.edit_method not in DIRECTION_METHODS:
            raise SettingError("edit_method", f"{self.edit_method!r}: expected one of {', '.join(DIRECTION_METHODS)}")


# Multi-image Dreambooth steps per view: over the default 5 views, the 1-image baseline's 800 steps
# (files/tiny/README.md, Table 2: 80 per view scored below 1-view)
DREAMBOOTH_MULTI_STEPS_PER_VIEW = 160


@dataclass
class Context:
    """What every section works on: a Workbench (the base pipeline and the space) and the evaluator."""

    bench: Workbench
    evaluator: Evaluator
    work: Path = Path("outputs/evaluation")  # scratch folder: training images, Dreambooth LoRAs, scaling spaces
    weights: Path = Path(DEFAULT_WEIGHTS)  # the weights dataset the scaling spaces are cut from

    @property
    def space(self) -> Space:
        return self.bench.space

    @property
    def pipe(self):
        """The pipeline that generates (on CUDA float16; inversion takes the bench's own)."""
        return self.bench.pipeline("generate")

    @property
    def base(self) -> str:
        return self.bench.base


# ----------------------------------------------------------------------------- shared pieces

def _generation(settings: Settings) -> dict:
    """generate's settings: seeds 0 .. settings.seeds - 1, the steps and the guidance."""
    return dict(seeds=range(settings.seeds), num_inference_steps=settings.steps, guidance_scale=settings.guidance)


def _generate(ctx: Context, weights: torch.Tensor, settings: Settings) -> list[Image.Image]:
    """Images of the space's prompt with LoRA `weights` (N,) in its layout (a Dreambooth LoRA, an inversion's)."""
    return generate_from_weights(ctx.pipe, ctx.space.layout, weights, ctx.space.prompt, **_generation(settings))


def _images(ctx: Context, space: Space, model: W2WModel, settings: Settings, prompt: str | None = None,
            negative_prompt: str = "") -> list[Image.Image]:
    """Images of a model of `space` (of the space's prompt by default)."""
    return ctx.bench.using(space).images(model, prompt, negative_prompt=negative_prompt, seeds=range(settings.seeds),
                                         steps=settings.steps, guidance=settings.guidance)


def _majority(pred: Prediction) -> dict[str, bool]:
    return {a: bool((pred.attributes[a] > 0).mean() > 0.5) for a in ATTRIBUTES}


def _pairwise_similarity(a: Prediction, b: Prediction) -> float:
    """Mean identity similarity over all pairs (image of a, image of b), of the tiny IdentityEmbedder."""
    return mean_similarity(TinyIdentity.embed_prediction(a), TinyIdentity.embed_prediction(b))


def _paired_similarity(a: Prediction, b: Prediction) -> float:
    """Mean identity similarity of a's and b's images pair by pair (the same seeds), of the tiny IdentityEmbedder."""
    return float(pair_similarities(TinyIdentity.embed_prediction(a), TinyIdentity.embed_prediction(b)).mean())


def _held_out(count: int, views: int) -> list[tuple[Identity, list[Image.Image]]]:
    """The first `count` held-out identities with `views` renders each (view 0: the one inverted)."""
    identities = [sample_identity(HELD_OUT_SEEDS + i) for i in range(count)]
    return [(identity, [render(identity, dataset_view_seed(HELD_OUT_SEEDS + i, k)) for k in range(views)])
            for i, identity in enumerate(identities)]


def _identity_scores(ctx: Context, weights: torch.Tensor, identity: Identity, renders: list[Image.Image],
                     settings: Settings) -> dict[str, float]:
    """How a model's "sks person" images match an identity: identity similarity to its renders (all pairs)
    and the share of its attributes read as they are."""
    pred = ctx.evaluator.predict(_generate(ctx, weights, settings))
    return {"identity_similarity": _pairwise_similarity(pred, ctx.evaluator.predict(renders)),
            "attribute_agreement": attribute_agreement(pred, identity.attributes)}


def _inversion_config(space: Space, settings: Settings, components: int | None = None):
    from ..inversion import preset

    return preset("real", space, components=components or settings.inversion_components, lr=settings.inversion_lr,
                  steps=settings.inversion_steps)


def _invert(ctx: Context, space: Space, images: list[Image.Image], config) -> torch.Tensor:
    """The LoRA weights (N,) of one person's `images` inverted together into `space` (seed 0)."""
    model, _ = ctx.bench.using(space).invert(images, None, config)
    return model.weights(space)


def _mean_scores(rows: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each score over the rows (identities)."""
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}


def _write_views(root: Path, identities: list[tuple[Identity, list[Image.Image]]], views: int | None) -> None:
    """<root>/<identity>/<k>.png for the first `views` renders of each identity (None: all), anything with a
    name: Dreambooth's instance folders."""
    for identity, renders in identities:
        folder = root / identity.name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for k, image in enumerate(renders[:views]):
            image.save(folder / f"{k}.png")


def _dreambooth(ctx: Context, instances: Path, out: Path, steps: int, settings: Settings) -> None:
    """Dreambooth-LoRAs of every identity folder of `instances`, trained together in one pass with the space's
    recipe (rank, alpha, targets) and `steps` steps, into <out>/<identity>/unet/."""
    from .. import train_identities
    from ..dreambooth import DreamboothConfig

    layout = ctx.space.layout
    shutil.rmtree(out, ignore_errors=True)
    recipe = DreamboothConfig(pretrained_model_name_or_path=ctx.base, class_data_dir=str(ctx.work / "class_images"),
                              max_train_steps=steps, learning_rate=settings.dreambooth_lr,
                              num_class_images=settings.class_images, class_inference_steps=settings.steps,
                              lora_r=layout.rank, lora_alpha=layout.alpha,
                              lora_target_modules=tuple(layout.target_modules))
    train_identities.train_identities(train_identities.run_args(
        recipe, instances, out, identities_per_batch=len(list(instances.iterdir())), checkpointing_steps=0))


def multi_steps(settings: Settings) -> int:
    """Steps of the multi-image Dreambooth-LoRA baseline."""
    return settings.dreambooth_multi_steps or DREAMBOOTH_MULTI_STEPS_PER_VIEW * settings.views


# ----------------------------------------------------------------------------- sampling and editing

def evaluate_sampling(ctx: Context, settings: Settings) -> dict:
    space, evaluator = ctx.space, ctx.evaluator
    models = sample_models(space, settings.samples, seed=0)
    preds = [evaluator.predict(_images(ctx, space, m, settings)) for m in tqdm(models, desc="sampling: models")]
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


def _edit_scores(ctx: Context, space: Space, models: list[W2WModel], attributes: list[str], settings: Settings
                 ) -> tuple[list[Prediction], dict[str, dict[str, list]]]:
    """The models' unedited predictions, and per attribute, model by model: whether a `settings.edit_strength`
    edit toward its absence or presence changed it, the share of the other attributes (but Male) kept, and
    the identity similarity to the unedited images."""
    directions = attribute_directions(space, attributes, settings.edit_components, settings.edit_method,
                                      debias_against=["Male"])
    befores, results = [], {a: {"changed": [], "kept": [], "similarity": []} for a in attributes}
    for model in tqdm(models, desc="editing: models"):
        before = ctx.evaluator.predict(_images(ctx, space, model, settings))
        befores.append(before)
        read = _majority(before)
        for attribute in attributes:
            strength = -settings.edit_strength if read[attribute] else settings.edit_strength
            after = ctx.evaluator.predict(_images(ctx, space, apply_edits(model, {attribute: strength}, directions),
                                                  settings))
            now = _majority(after)
            others = [a for a in ATTRIBUTES if a not in (attribute, "Male")]
            results[attribute]["changed"].append(now[attribute] != read[attribute])
            results[attribute]["kept"].append(np.mean([now[a] == read[a] for a in others]))
            results[attribute]["similarity"].append(_paired_similarity(before, after))
    return befores, results


def evaluate_editing(ctx: Context, settings: Settings) -> dict:
    models = sample_models(ctx.space, settings.samples, seed=1)
    befores, results = _edit_scores(ctx, ctx.space, models, list(EDITED), settings)
    male = [_majority(before)["Male"] for before in befores]  # how the evaluator reads each model before its edits
    components = settings.edit_components or edit_components(ctx.space, settings.edit_method)
    return {a: {"changed": float(np.mean(r["changed"])), "changed_by_sex": _by_sex(r["changed"], male),
                "others_kept": float(np.mean(r["kept"])), "identity_similarity": float(np.mean(r["similarity"]))}
            for a, r in results.items()} | {
        "models_by_sex": {"men": sum(male), "women": len(male) - sum(male)},
        "targets": {"changed": 0.8, "others_kept": 0.9}, "strength_std": settings.edit_strength,
        "method": settings.edit_method, "components": min(components, ctx.space.num_components)}


def _by_sex(changed: list[bool], male: list[bool]) -> dict[str, float | None]:
    """The share of changed models among those read as men and as women (None for a group with no model):
    an edit the dataset only shows on one sex (a beard) may change that group alone."""
    groups = {"men": [c for c, m in zip(changed, male) if m], "women": [c for c, m in zip(changed, male) if not m]}
    return {group: float(np.mean(values)) if values else None for group, values in groups.items()}


# ----------------------------------------------------------------------------- Table 1: prompting, sliders, w2w

def _sliders(ctx: Context, settings: Settings) -> dict[str, torch.Tensor]:
    """A text slider (N,) per Table 1 attribute, trained on the base model from its prompt pair."""
    from ..sliders import SliderConfig, target_latents, train_slider

    pipe = ctx.bench.pipeline("train")  # the bench's dtype for training (bfloat16 on CUDA)
    latents = target_latents(pipe, SLIDER_TARGET, settings.slider_latents, settings.steps, settings.guidance)
    config = SliderConfig(steps=settings.slider_steps, eta=settings.slider_eta)
    return {a: train_slider(pipe, ctx.space.layout, *TABLE1[a]["slider"], SLIDER_TARGET, latents, config)
            for a in tqdm(TABLE1, desc="table1: sliders")}


def _edited_images(ctx: Context, method: str, model: W2WModel, attribute: str, add: bool, directions,
                   sliders: dict[str, torch.Tensor], settings: Settings) -> list[Image.Image]:
    """The model's images with `attribute` given (add) or taken away by one of TABLE1_METHODS."""
    space = ctx.space
    if method == "prompting":
        prompt, negative = TABLE1[attribute]["add" if add else "remove"]
        return _images(ctx, space, model, settings, prompt, negative)
    if method == "slider":
        with FusedLora(ctx.pipe.unet, space.layout, sliders[attribute], settings.slider_scale * (1 if add else -1)):
            return _images(ctx, space, model, settings)
    strength = settings.edit_strength * (1 if add else -1)
    return _images(ctx, space, apply_edits(model, {attribute: strength}, directions), settings)


def evaluate_table1(ctx: Context, settings: Settings) -> list[dict]:
    space, evaluator = ctx.space, ctx.evaluator
    directions = attribute_directions(space, list(TABLE1), settings.edit_components, settings.edit_method,
                                      debias_against=["Male"])
    sliders = _sliders(ctx, settings)
    scores = {(a, m): {"changed": [], "kept": [], "identity_similarity": [], "image_distance": []}
              for a in TABLE1 for m in TABLE1_METHODS}
    for model in tqdm(sample_models(space, settings.table1_samples, seed=1), desc="table1: models"):
        images = _images(ctx, space, model, settings)
        before = evaluator.predict(images)
        read = _majority(before)
        for attribute in TABLE1:
            for method in TABLE1_METHODS:
                edited = _edited_images(ctx, method, model, attribute, not read[attribute], directions, sliders,
                                        settings)
                after = evaluator.predict(edited)
                now = _majority(after)
                row = scores[attribute, method]
                row["changed"].append(now[attribute] != read[attribute])
                row["kept"].append(np.mean([now[a] == read[a] for a in ATTRIBUTES if a != attribute]))
                row["identity_similarity"].append(_paired_similarity(before, after))
                row["image_distance"].append(float(feature_distance(evaluator, images, edited).mean()))
    rows = []
    for (attribute, method), row in scores.items():
        paper = PAPER["table1"].get(attribute, {}).get(method)
        rows.append({"attribute": attribute, "method": method, **{k: float(np.mean(v)) for k, v in row.items()},
                     "paper": dict(zip(("id_score", "lpips", "clip"), paper)) if paper else None})
    return rows


# ----------------------------------------------------------------------------- Tables 2 and 4: inversion vs Dreambooth

def evaluate_table2(ctx: Context, settings: Settings) -> dict:
    identities = _held_out(settings.inversions, settings.views)
    config = _inversion_config(ctx.space, settings)
    weights = {"w2w": {identity.name: _invert(ctx, ctx.space, renders[:1], config)
                       for identity, renders in tqdm(identities, desc="table2: w2w")}}
    # the baselines: every identity of a kind trained together in one pass, with the space's LoRA recipe
    steps = {"dreambooth_1": settings.dreambooth_steps, "dreambooth_multi": multi_steps(settings)}
    for name, views in (("dreambooth_1", 1), ("dreambooth_multi", settings.views)):
        _write_views(ctx.work / name, identities, views)
        _dreambooth(ctx, ctx.work / name, ctx.work / f"loras_{name}", steps[name], settings)
        weights[name] = {identity.name: _load_lora(ctx, ctx.work / f"loras_{name}" / identity.name)
                         for identity, _ in identities}
    report = {}
    for name, models in weights.items():
        rows = [_identity_scores(ctx, models[identity.name], identity, renders, settings)
                for identity, renders in tqdm(identities, desc=f"table2: scoring {name}")]
        report[name] = _mean_scores(rows) | {
            "per_identity": [row["identity_similarity"] for row in rows],
            "paper_id_score": PAPER["table2_id_score"][name]}
    return report | {"views": settings.views, "steps": steps | {"w2w": config.steps},
                     "identities": len(identities), "config": asdict(config),
                     "renders": _render_similarity(ctx, identities), "dataset_loras": _dataset_loras(ctx, settings)}


def _render_similarity(ctx: Context, identities: list[tuple[Identity, list[Image.Image]]]) -> dict[str, float]:
    """What a model that drew the identity's renders themselves would score: the first view (the one the
    1-image baselines see) against all views, and all views against all."""
    preds = [ctx.evaluator.predict(renders) for _, renders in identities]
    return {"first_view_against_views": float(np.mean([_pairwise_similarity(p.select([0]), p) for p in preds])),
            "views_against_views": float(np.mean([_pairwise_similarity(p, p) for p in preds]))}


def _dataset_loras(ctx: Context, settings: Settings) -> dict[str, float | int]:
    """The multi-image recipe of the weights dataset (each LoRA trained on 10 views with the recipe's steps),
    scored as the baselines are, on its first settings.inversions identities (not held out: for the space)."""
    dataset = WeightsDataset(ctx.weights)
    rows = []
    for name in dataset.names[: settings.inversions]:
        identity = sample_identity(int(name))
        renders = [render(identity, dataset_view_seed(int(name), k)) for k in range(settings.views)]
        rows.append(_identity_scores(ctx, dataset[name], identity, renders, settings)["identity_similarity"])
    return {"identity_similarity": float(np.mean(rows)), "per_identity": rows, "identities": len(rows)}


def _load_lora(ctx: Context, folder: Path) -> torch.Tensor:
    from ..formats import load_peft

    return load_peft(ctx.space.layout, folder)


def evaluate_timing(ctx: Context, settings: Settings) -> dict:
    """Wall time of inverting one image against training one 1-image and one multi-image Dreambooth-LoRA,
    the recipe's; the class images, shared by every identity, are generated before the clock starts."""
    identities = _held_out(1, settings.views)
    config = _inversion_config(ctx.space, settings)
    _write_views(ctx.work / "timing_1", identities, 1)
    _write_views(ctx.work / "timing_multi", identities, settings.views)
    _dreambooth(ctx, ctx.work / "timing_1", ctx.work / "timing_warmup", 1, settings)  # class images, imports
    seconds = {}
    start = time.perf_counter()
    _invert(ctx, ctx.space, identities[0][1][:1], config)
    seconds["inversion_s"] = time.perf_counter() - start
    for name, views, steps in (("dreambooth_1_s", "timing_1", settings.dreambooth_steps),
                               ("dreambooth_multi_s", "timing_multi", multi_steps(settings))):
        start = time.perf_counter()
        _dreambooth(ctx, ctx.work / views, ctx.work / f"loras_{views}", steps, settings)
        seconds[name] = time.perf_counter() - start
    return seconds | {"dreambooth_1_over_inversion": seconds["dreambooth_1_s"] / seconds["inversion_s"],
                      "dreambooth_multi_over_inversion": seconds["dreambooth_multi_s"] / seconds["inversion_s"],
                      "steps": {"inversion": config.steps, "dreambooth_1": settings.dreambooth_steps,
                                "dreambooth_multi": multi_steps(settings)},
                      "threads": torch.get_num_threads(), "paper_a100_s": PAPER["table4_a100_s"]}


# ----------------------------------------------------------------------------- Table 2 on photographs

# The prompts each model of Table 2 on photographs draws (every seed of each), scored against the photographs
PHOTO_PROMPTS = ("sks person", "a photo of sks person", "a close-up photo of sks person smiling",
                 "a photo of sks person outdoors")


@dataclass
class Person:
    """A person of a --faces folder: a name and the photographs as fitted (FFHQ-aligned, automatic masks)."""

    name: str
    photos: list


def read_people(faces: Path, resolution: int, detector: str = "hog") -> list[Person]:
    """The people of a folder: an image file is a person with one photograph, a sub-folder a person with its
    photographs (sorted by name; the first is the one inverted and the 1-image Dreambooth's)."""
    from ..images import IMAGE_SUFFIXES
    from ..inversion import AUTO_MASK, read_photos

    if not faces.is_dir():
        raise W2WError(f"{faces}: no such folder of photographs")
    people = []
    for entry in sorted(faces.iterdir()):
        files = sorted(f for f in entry.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if entry.is_dir() else (
            [entry] if entry.suffix.lower() in IMAGE_SUFFIXES else [])
        if files:
            people.append(Person(entry.stem, read_photos(files, [AUTO_MASK] * len(files), "face", resolution,
                                                         detector)))
    if not people:
        raise W2WError(f"{faces}: no photographs; expected image files (a person each) or a folder of photographs "
                       f"per person")
    return people


def _photo_scores(ctx: Context, embedder, weights: torch.Tensor, references: np.ndarray, prompts: tuple[str, ...],
                  settings: Settings) -> dict:
    """How a LoRA's images of each prompt (every seed) match a person's photographs (embeddings (R, D))."""
    per_prompt, embeddings = {}, []
    for prompt in prompts:
        images = generate_from_weights(ctx.pipe, ctx.space.layout, weights, prompt, **_generation(settings))
        embeddings.append(embedder.embed(images))  # (S, D)
        per_prompt[prompt] = embedder.score(embeddings[-1], references).similarity
    return embedder.score(np.concatenate(embeddings), references).as_dict() | {"per_prompt": per_prompt}


def _mean_of(rows: list[dict], key: str) -> float | None:
    values = [row[key] for row in rows if row[key] is not None]
    return float(np.mean(values)) if values else None


def evaluate_table2_photographs(ctx: Context, settings: Settings, faces: Path, prompts: tuple[str, ...] = PHOTO_PROMPTS,
                                detector: str = "hog") -> dict:
    """Table 2's protocol on photographs: each person's first photograph inverted (FFHQ-aligned, its landmark
    mask), against a 1-image Dreambooth-LoRA on it and a multi-image one on all of the person's photographs
    (when someone has several), each model's images of `prompts` scored against the person's photographs by
    dlib's face descriptor (not FaceNet: not the paper's numbers)."""
    from ..diffusion import image_sizes
    from ..identity import DlibIdentity
    from ..inversion import invert, photo_targets

    pipe = ctx.bench.pipeline("invert")  # inversion's dtype (bfloat16 on CUDA), as every front end inverts
    sizes = image_sizes(pipe)
    people = read_people(faces, sizes[0], detector)  # faceless photographs fail before any work
    config = _inversion_config(ctx.space, settings)
    weights = {"w2w": {person.name: invert(pipe, ctx.space, *photo_targets(person.photos[:1], *sizes), config,
                                           progress=False).weights(ctx.space)
                       for person in tqdm(people, desc="table2 photographs: w2w")}}
    runs = {"dreambooth_1": (1, settings.dreambooth_steps)}
    if any(len(person.photos) > 1 for person in people):
        runs["dreambooth_multi"] = (None, multi_steps(settings))
    for name, (views, steps) in runs.items():
        shutil.rmtree(ctx.work / f"photos_{name}", ignore_errors=True)  # the people of an earlier run
        _write_views(ctx.work / f"photos_{name}", [(p, [photo.picture for photo in p.photos]) for p in people], views)
        _dreambooth(ctx, ctx.work / f"photos_{name}", ctx.work / f"loras_photos_{name}", steps, settings)
        weights[name] = {p.name: _load_lora(ctx, ctx.work / f"loras_photos_{name}" / p.name) for p in people}
    embedder = DlibIdentity(detector)
    references = {p.name: embedder.embed([photo.picture for photo in p.photos]) for p in people}  # (R, D) each
    report = {}
    for name, models in weights.items():
        rows = [_photo_scores(ctx, embedder, models[p.name], references[p.name], prompts, settings)
                for p in tqdm(people, desc=f"table2 photographs: scoring {name}")]
        report[name] = {"identity_similarity": _mean_of(rows, "similarity"),
                        "same_person_rate": _mean_of(rows, "same_person_rate"),
                        "no_face": sum(row["no_face"] for row in rows), "images": sum(row["images"] for row in rows),
                        "per_identity": [row["similarity"] for row in rows],
                        "per_prompt": {prompt: _mean_of([row["per_prompt"] for row in rows], prompt)
                                       for prompt in prompts},
                        "paper_id_score": PAPER["table2_id_score"][name]}
    return report | {"photographs": {p.name: [photo.name for photo in p.photos] for p in people},
                     "prompts": list(prompts), "identities": len(people), "embedder": embedder.name,
                     "steps": {name: steps for name, (_, steps) in runs.items()} | {"w2w": config.steps},
                     "config": asdict(config)}


# ----------------------------------------------------------------------------- Figs 9, 10 and 30: scaling

def _scaling_space(ctx: Context, models: int) -> Space:
    """The space of all M - 1 components PCA'd from the first `models` models of the weights dataset, built in
    the work folder, with the tiny space's attribute table and inversion presets."""
    from ..pca import BuildConfig, build_space

    dataset = WeightsDataset(ctx.weights)
    if not 2 <= models <= len(dataset):
        raise W2WError(f"{ctx.weights}: {models} models asked for a scaling space, the dataset has {len(dataset)}")
    folder = ctx.work / "scaling" / f"models_{models}"
    shutil.rmtree(folder, ignore_errors=True)
    names = list(dataset.names[:models])
    add_models(folder / "weights", matrix_source(dataset.read_rows(0, models), names), dataset.layout,
               dataset.base_model)
    attributes = ctx.space.attributes.loc[names]
    attributes.to_csv(folder / "attributes.csv")
    space = build_space(WeightsDataset(folder / "weights"), models - 1,
                        config=BuildConfig(attributes=folder / "attributes.csv"))
    return dataclasses.replace(space, inversion_presets=ctx.space.inversion_presets)


def _inversion_similarity(ctx: Context, space: Space, components: int, settings: Settings) -> float:
    """Mean identity similarity of the first settings.scaling_inversions held-out identities inverted into
    the first `components` of `space`."""
    config = _inversion_config(space, settings, components)
    return float(np.mean([_identity_scores(ctx, _invert(ctx, space, renders[:1], config), identity, renders,
                                           settings)["identity_similarity"]
                          for identity, renders in _held_out(settings.scaling_inversions, settings.views)]))


def evaluate_scaling_models(ctx: Context, settings: Settings) -> list[dict]:
    rows = []
    for models in tqdm(settings.scaling_models, desc="scaling: models"):
        full = _scaling_space(ctx, models)
        space = full.truncate(min(full.num_components, ctx.space.num_components))
        # an attribute that all of the first M models share (or none) has no direction in their space
        edited = [a for a in EDITED if len(attribute_labels(space, a).unique()) == 2]
        befores, results = _edit_scores(ctx, space, sample_models(space, settings.scaling_samples, seed=1), edited,
                                        settings)
        consistency = [attribute_agreement(before, _majority(before)) for before in befores]
        rows.append({"models": models, "components": space.num_components,
                     "inversion_identity_similarity": _inversion_similarity(ctx, space, space.num_components,
                                                                            settings),
                     "edit_entanglement": 1 - float(np.mean([r["kept"] for r in results.values()])),
                     "sampling_consistency": float(np.mean(consistency)), "edited": edited})
    return rows


def evaluate_scaling_components(ctx: Context, settings: Settings) -> list[dict]:
    space = _scaling_space(ctx, len(WeightsDataset(ctx.weights)))
    return [{"components": min(k, space.num_components),
             "inversion_identity_similarity": _inversion_similarity(ctx, space, min(k, space.num_components), settings)}
            for k in tqdm(settings.scaling_components, desc="scaling: components")]


MULTI_VIEWS = (1, 3, 5)  # views of an identity inverted together
SCORED_VIEWS = range(5, 10)  # the views the multi-image inversions are scored against: none of them saw these


def evaluate_multi_image_inversion(ctx: Context, settings: Settings, views_inverted: tuple[int, ...] = MULTI_VIEWS
                                   ) -> dict:
    """Each held-out identity inverted from its first 1, 3 and 5 views (one drawn per step, the same steps),
    scored against views 5-9 by identity similarity and against the identity's attributes."""
    from ..faces import detect_faces

    identities = _held_out(settings.inversions, max(SCORED_VIEWS) + 1)
    config = _inversion_config(ctx.space, settings)
    scores = {views: [] for views in views_inverted}
    for identity, renders in tqdm(identities, desc="multi-image inversion: identities"):
        scored = [renders[k] for k in SCORED_VIEWS]
        for views in views_inverted:
            weights = _invert(ctx, ctx.space, renders[:views], config)
            scores[views].append(_identity_scores(ctx, weights, identity, scored, settings))
    detected = [bool(detect_faces(image)) for _, renders in identities for image in renders]
    return {f"{views} view{'s' * (views > 1)}": _mean_scores(rows) for views, rows in scores.items()} | {
        "scored_against_views": list(SCORED_VIEWS), "identities": settings.inversions,
        "face_detection_rate": float(np.mean(detected)), "config": asdict(config),
        "paper_id_score": PAPER["table2_id_score"]}


SECTIONS = {
    "sampling": evaluate_sampling,
    "editing": evaluate_editing,
    "table1": evaluate_table1,
    "table2": evaluate_table2,
    "timing": evaluate_timing,
    "scaling_models": evaluate_scaling_models,
    "scaling_components": evaluate_scaling_components,
    "multi_image_inversion": evaluate_multi_image_inversion,
}


# ----------------------------------------------------------------------------- command line

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags of `w2w evaluate`; args.settings: the Settings they make."""
    parser = OneLineParser(prog="w2w evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=DEFAULT_BASE, help="base pipeline (default: %(default)s)")
    parser.add_argument("--space", default=DEFAULT_SPACE, help="space (default: %(default)s)")
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS,
                        help="weights dataset the scaling sections cut their spaces from (the space's models; "
                             "default: %(default)s)")
    parser.add_argument("--evaluator", default=DEFAULT_EVALUATOR, help="evaluator weights (default: %(default)s)")
    parser.add_argument("--out", default="outputs/evaluation.json",
                        help="JSON report; when it exists, the sections run replace theirs and the others are kept "
                             "(default: %(default)s)")
    parser.add_argument("--work", default="outputs/evaluation", help="work folder (default: %(default)s)")
    parser.add_argument("--only", nargs="+", choices=tuple(SECTIONS), default=list(SECTIONS), metavar="NAME",
                        help=f"sections to run, of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--faces", default=None, metavar="DIR",
                        help="run Table 2's protocol on photographs instead of the tiny world's sections: DIR holds "
                             "image files (a person each) or a folder of photographs per person (the first inverted; "
                             "all train the multi-image Dreambooth); scored by dlib's face descriptor, not FaceNet; "
                             "the report's table2 section (default: none)")
    parser.add_argument("--prompts", nargs="+", default=list(PHOTO_PROMPTS),
                        help="with --faces: the prompts each model draws, every seed of each (default: %(default)s)")
    parser.add_argument("--detector", choices=("hog", "cnn"), default="hog",
                        help="with --faces: dlib's face detector (cnn: turned faces, slower; default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; on a shared CPU 1 runs the tiny models fastest)")
    add_config_flags(parser.add_argument_group("settings"), Settings)
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    try:
        args.settings = config_from_args(Settings, args)
    except W2WError as error:
        parser.error(str(error))
    return args


def _existing_report(path: Path, space: Space) -> dict:
    """The report at `path` to update (none: a new one); a report of another space is refused."""
    if not path.exists():
        return {}
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise W2WError(f"{path}: not a readable JSON report to update ({error}); pass another --out") from None
    if not isinstance(report, dict) or report.get("space_id") != space.id:
        raise W2WError(f"{path}: a report of space {report.get('space_id') if isinstance(report, dict) else None}, "
                       f"not of {space.id}; pass another --out")
    return report


def main(args: argparse.Namespace) -> dict:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = args.settings
    evaluator = None if args.faces else Evaluator.load(args.evaluator)  # photographs are scored by dlib
    ctx = Context(Workbench(args.base, args.space, progress=False), evaluator, Path(args.work), Path(args.weights))
    space = ctx.space
    ctx.work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    _existing_report(out, space)  # a report of another space is refused before any work
    sections = {name: SECTIONS[name] for name in args.only}
    if args.faces:
        sections = {"table2": lambda ctx, settings: evaluate_table2_photographs(ctx, settings, Path(args.faces),
                                                                              tuple(args.prompts), args.detector)}
    for name, section in sections.items():
        start = time.perf_counter()
        torch.manual_seed(0)
        result = section(ctx, settings)
        # read again just before writing, so that runs of other sections into the same report are kept
        report = _existing_report(out, space) | {"space_id": space.id, name: result}
        report["runs"] = report.get("runs", {}) | {name: {"settings": asdict(settings),
                                                          "threads": torch.get_num_threads(),
                                                          "wall_s": round(time.perf_counter() - start, 1)}}
        with atomic_output(out) as tmp:  # after each section, so that a long run keeps what it finished
            tmp.write_text(json.dumps(report, indent=1))
    print(json.dumps({name: report[name] for name in sections}, indent=1))
    return report


if __name__ == "__main__":
    main(parse_args())
