"""weights2weights (w2w): a linear subspace of identity-encoding LoRA weights (Dravid et al., 2024)."""

__version__ = "0.1.0"
