"""User-facing model classes."""

from ._model import SparseVAE, default_max_epochs
from ._save_load import UnsafeModelFileError

__all__ = ["SparseVAE", "UnsafeModelFileError", "default_max_epochs"]
