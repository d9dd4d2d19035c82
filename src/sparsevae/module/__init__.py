"""Torch modules."""

from ._module import LIKELIHOODS, SparseVAEModule

__all__ = ["LIKELIHOODS", "SparseVAEModule"]
