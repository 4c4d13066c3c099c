"""weights2weights (w2w): a linear subspace of identity-encoding LoRA weights (Dravid et al., 2024).

    from lora_w2w import Space, load_base_pipeline
    space = Space.from_pretrained("files/tiny/space")
    model = space.sample(seed=0).edit({"Beard": 3.0})

The names below are imported on first use (PEP 562), so that `import lora_w2w` and `w2w --help` do not
load torch, diffusers and pandas (benchmarks/bench_import.py).
"""
import importlib
import logging

__version__ = "0.1.0"

EXPORTS = {  # name -> the module that defines it
    "Space": "space", "W2WModel": "space", "Workbench": "workbench",
    "load_space": "storage", "load_model": "storage", "load_base_pipeline": "pipeline", "generate": "pipeline",
    "image_grid": "pipeline", "attribute_names": "editing", "resolve_attribute": "editing", "W2WError": "errors",
}
__all__ = ["__version__", *EXPORTS]


def __getattr__(name: str):
    if name not in EXPORTS:
        raise AttributeError(f"module 'lora_w2w' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{EXPORTS[name]}", __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *EXPORTS})


class _NoTorchvisionNotice(logging.Filter):
    """Drops transformers' notice that an image processor falls back to its PIL version without torchvision:
    the project needs no torchvision (PIL and torch do its work), and diffusers' pipeline module would print
    the notice for two processors on import."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionNotice())
