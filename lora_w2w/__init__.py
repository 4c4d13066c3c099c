"""weights2weights (w2w): a linear subspace of identity-encoding LoRA weights (Dravid et al., 2024)."""
import logging

__version__ = "0.1.0"


class _NoTorchvisionNotice(logging.Filter):
    """Drops transformers' notice that an image processor falls back to its PIL version without torchvision:
    the project needs no torchvision (PIL and torch do its work), and diffusers' pipeline module would print
    the notice for two processors on import."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionNotice())
