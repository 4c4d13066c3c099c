"""How like the person of some photographs a model draws: `w2w score` and `w2w invert --score`.

The model generates one image per prompt and seed; an `IdentityEmbedder` (`identity.py`: dlib's face
descriptor for photographs, the tiny world's evaluator for its renders) embeds them and the photographs;
the score is the mean cosine similarity over all (image, photo) pairs with faces, dlib's same-person rate,
and the count of images in which no face was found, for each prompt and over all of them.

    embedder = make_embedder("dlib")
    photos = embed_photos(embedder, ["me.jpg"])  # (R, D); NoFaceError for a photo without a face
    report = score_model(pipe, space, model, photos, embedder, prompts=["sks person"], seeds=[0, 1])
    print(format_report(report))

dlib's similarities are not FaceNet's: they are not the paper's ID scores (0.64 / 0.43 / 0.69).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from .defaults import DEFAULT_EVALUATOR
from .errors import ArgumentError, NoFaceError
from .identity import DlibIdentity, IdentityEmbedder, TinyIdentity

EMBEDDERS = ("dlib", "tiny")
DEFAULT_SEEDS = (0, 1, 2, 3)


def make_embedder(name: str, detector: str = "hog", evaluator: str | os.PathLike = DEFAULT_EVALUATOR
                  ) -> IdentityEmbedder:
    """"dlib" (photographs; faces found by `detector`) or "tiny" (the tiny world's evaluator file)."""
    if name == "dlib":
        return DlibIdentity(detector)
    if name == "tiny":
        from .tiny.evaluator import Evaluator

        return TinyIdentity(Evaluator.load(evaluator))
    raise ArgumentError(f"unknown identity embedder {name!r}; expected one of {', '.join(EMBEDDERS)}")


def embed_photos(embedder: IdentityEmbedder, photos: Sequence[str | os.PathLike]) -> np.ndarray:
    """(R, D) embeddings of the photograph files; NoFaceError naming the first in which no face is found."""
    from .inversion import open_image

    embeddings = embedder.embed([open_image(photo, "photo") for photo in photos])  # (R, D)
    for photo, row in zip(photos, embeddings):
        if np.isnan(row).any():
            raise NoFaceError(f"{photo}: no face found to score against ({embedder.name}'s detector); expected a "
                              f"photograph of the person's face")
    return embeddings


def score_model(pipe, space, model, references: np.ndarray, embedder: IdentityEmbedder,
                prompts: Sequence[str] | None = None, seeds: Sequence[int] = DEFAULT_SEEDS, **settings) -> dict:
    """The identity score of `model`'s images (one per prompt and seed; `settings` those of `generate`, such
    as num_inference_steps) against the photographs' embeddings (R, D) (`embed_photos`): over all prompts
    ("all") and per prompt."""
    from .pipeline import generate

    prompts = list(prompts or [space.prompt])
    per_prompt, embeddings = {}, []
    for prompt in prompts:
        images = generate(pipe, space, model, prompt, seeds=seeds, **settings)
        embeddings.append(embedder.embed(images))  # (S, D)
        per_prompt[prompt] = embedder.score(embeddings[-1], references).as_dict()
    overall = embedder.score(np.concatenate(embeddings), references)  # (P * S, D) against (R, D)
    return {"embedder": embedder.name, "same_person_distance": embedder.same_person_distance,
            "seeds": list(seeds), "all": overall.as_dict(), "per_prompt": per_prompt}


def _cells(score: dict) -> list[str]:
    similarity = "-" if score["similarity"] is None else f"{score['similarity']:.3f}"
    same = "-" if score["same_person_rate"] is None else f"{score['same_person_rate']:.0%}"
    return [similarity, same, f"{score['no_face']}/{score['images']}"]


def format_report(report: dict) -> str:
    """`score_model`'s report as a table: a row per prompt, then all prompts."""
    rows = [["prompt", "similarity", "same person", "no face"]]
    rows += [[prompt, *_cells(score)] for prompt, score in report["per_prompt"].items()]
    rows.append(["all", *_cells(report["all"])])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    threshold = report["same_person_distance"]
    photos = report["all"]["references"]
    lines = [f"identity against {photos} photo{'s' * (photos > 1)} "
             f"({report['embedder']} embeddings, cosine similarity"
             + (f"; same person: distance under {threshold:g}" if threshold is not None else "") + ")"]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)
