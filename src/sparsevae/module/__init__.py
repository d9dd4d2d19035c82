"""Torch modules."""

from ._module import DEFAULT_PRIOR_CELLS, LIKELIHOODS, STUDY_KEY, ModuleMask, SparseVAEModule

__all__ = ["DEFAULT_PRIOR_CELLS", "LIKELIHOODS", "STUDY_KEY", "ModuleMask", "SparseVAEModule"]
