"""The defaults of every command: the tiny world's files and the example images, found from the
package's own files, never from the working directory.

- The tiny world (base pipeline, space, weights dataset, evaluator, its evaluation report: about 60 MB)
  lives in the checkout beside the package, `files/tiny/`, which an editable install (`pip install -e .`,
  `make`) finds. An install that is not editable holds the package alone: set W2W_TINY to a folder
  holding the tiny world (a checkout's `files/tiny`), or pass --base and --space; a command that needs
  the missing tiny world says so in one line (`require`).
- The example images the demo inverts (a face and a drawing, each with its mask) ship inside the
  package (`EXAMPLES`, package data); `inversion/images/` holds the same files for the notebooks and
  `inversion/invert.py` (inversion/images/make_examples.py writes both).
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import W2WError

PACKAGE = Path(__file__).resolve().parent
TINY_ENV = "W2W_TINY"  # the environment variable naming the tiny world's folder
TINY = Path(os.environ.get(TINY_ENV) or PACKAGE.parent / "files" / "tiny")
DEFAULT_BASE = str(TINY / "base")  # the base pipeline, a diffusers folder
DEFAULT_SPACE = str(TINY / "space")
DEFAULT_WEIGHTS = str(TINY / "weights")  # the weights dataset the space was built from
DEFAULT_EVALUATOR = str(TINY / "evaluator.safetensors")
DEFAULT_EVALUATION = str(TINY / "evaluation.json")  # `w2w evaluate`'s committed report
EXAMPLES = PACKAGE / "data" / "examples"  # face.png, face_mask.png, drawing.png, drawing_mask.png


def require(path: str | os.PathLike) -> None:
    """W2WError when `path` lies in the default tiny world and the tiny world is not there (an install
    that is not editable, or W2W_TINY naming another folder); any other path is left to its loader."""
    path = Path(path)
    if TINY.is_dir() or not path.is_absolute() or TINY not in (path, *path.parents):
        return
    source = f"{TINY_ENV}={os.environ[TINY_ENV]}" if os.environ.get(TINY_ENV) else "beside the installed package"
    raise W2WError(f"{path}: the tiny world is not at {TINY} ({source}); set {TINY_ENV} to a checkout's files/tiny, "
                   f"or pass --base and --space")
