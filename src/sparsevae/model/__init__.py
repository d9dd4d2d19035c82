"""User-facing model classes."""

from ._model import SparseVAE, default_max_epochs

__all__ = ["SparseVAE", "default_max_epochs"]
