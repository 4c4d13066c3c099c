"""Identity scores (the paper's ID score, Sec. 5): one interface, `IdentityEmbedder`, over two readers of faces.

The paper embeds faces with FaceNet on MTCNN crops and scores identity as the cosine similarity of embeddings
(its Table 2: 0.64 w2w, 0.43 1-image and 0.69 multi-image Dreambooth-LoRA). FaceNet's weights are downloaded
at run time; the two embedders here need no download:

- `DlibIdentity`, for photographs: dlib's ResNet face descriptor (128-D; 99.38% on LFW) of the largest face
  `faces` finds, its weights inside the face-recognition-models package. dlib calls two faces the same person
  when their descriptors lie closer than SAME_PERSON_DISTANCE (0.6, Euclidean).
- `TinyIdentity`, for the tiny world: the evaluator's identity embedding (`tiny/evaluator.py`: traits and
  attributes, standardized over the tiny world's identities).

    embedder = DlibIdentity()
    score = embedder.score(embedder.embed(generated), embedder.embed(photos))
    score.similarity, score.same_person_rate, score.no_face

dlib's descriptor is not FaceNet: its similarities are not the paper's numbers.
Letters: B images, R references, D embedding width.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image

from . import faces

SAME_PERSON_DISTANCE = 0.6  # dlib's threshold on the Euclidean distance of two face descriptors
DESCRIPTOR_SIZE = 128


@dataclass(frozen=True)
class IdentityScore:
    """How images match references: the mean cosine similarity over all (image, reference) pairs with a face
    on both sides, the share of those pairs the embedder calls the same person (None without a threshold),
    and the images and references in which no face was found. None where no pair has faces."""

    similarity: float | None
    same_person_rate: float | None
    images: int
    no_face: int
    references: int
    references_no_face: int

    def as_dict(self) -> dict:
        return asdict(self)


def cosine_similarities(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(B, R) cosine similarity of every row of a (B, D) with every row of b (R, D); NaN rows stay NaN."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def pair_similarities(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(B,) cosine similarity of a's and b's rows (B, D), pair by pair; one side may have a single row."""
    assert len(a) == len(b) or 1 in (len(a), len(b)), f"rows: {len(a)} vs {len(b)}"
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def mean_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """The mean cosine similarity over all pairs (row of a, row of b), (B, D) and (R, D)."""
    return float(cosine_similarities(a, b).mean())


class IdentityEmbedder(ABC):
    """Images -> identity embeddings (B, D), compared by cosine similarity."""

    name: str
    same_person_distance: float | None = None  # Euclidean distance under which two faces are one person

    @abstractmethod
    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(B, D) float64 embeddings of `images`: a row of NaN where no face is found."""

    def score(self, embeddings: np.ndarray, references: np.ndarray) -> IdentityScore:
        """The IdentityScore of images' embeddings (B, D) against references' (R, D)."""
        found, found_references = ~np.isnan(embeddings).any(1), ~np.isnan(references).any(1)  # (B,), (R,)
        a, b = embeddings[found], references[found_references]
        similarity = same = None
        if len(a) and len(b):
            similarity = mean_similarity(a, b)
            if self.same_person_distance is not None:
                distances = np.linalg.norm(a[:, None] - b[None], axis=2)  # (B', R')
                same = float((distances < self.same_person_distance).mean())
        return IdentityScore(similarity, same, len(embeddings), int((~found).sum()), len(references),
                             int((~found_references).sum()))


@lru_cache(maxsize=1)
def _descriptor_model():
    import dlib

    return dlib.face_recognition_model_v1(str(faces.model_file("dlib_face_recognition_resnet_model_v1.dat")))


class DlibIdentity(IdentityEmbedder):
    """dlib's face descriptor of each image's largest face, found by `faces` with `detector`."""

    name = "dlib"
    same_person_distance = SAME_PERSON_DISTANCE

    def __init__(self, detector: str = "hog"):
        self.detector = faces.check_detector(detector)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        rows = np.full((len(images), DESCRIPTOR_SIZE), np.nan)  # (B, 128)
        for i, image in enumerate(images):
            pixels, _ = faces.working_copy(image)
            shapes = faces.dlib_shapes(pixels, self.detector)
            if shapes:
                rows[i] = np.asarray(_descriptor_model().compute_face_descriptor(pixels, shapes[0]))
        return rows


class TinyIdentity(IdentityEmbedder):
    """The tiny world's evaluator's identity embedding: it reads a face in every image."""

    name = "tiny"

    def __init__(self, evaluator):
        self.evaluator = evaluator

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.embed_prediction(self.evaluator.predict(images))

    @staticmethod
    def embed_prediction(prediction) -> np.ndarray:
        """(B, D) of what the evaluator read off B images (a `Prediction`), for the callers that read its
        attributes too."""
        from .tiny.evaluator import identity_embedding

        return identity_embedding(prediction)
