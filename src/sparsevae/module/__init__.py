"""Torch modules."""

from ._module import LIKELIHOODS, STUDY_KEY, ModuleMask, SparseVAEModule

__all__ = ["LIKELIHOODS", "STUDY_KEY", "ModuleMask", "SparseVAEModule"]
