"""sparsevae: identifiable, interpretable nonlinear factors of single-cell data."""

from . import datasets, pl, tl
from ._version import __version__
from .model import SparseVAE

__all__ = ["SparseVAE", "__version__", "datasets", "pl", "tl"]
