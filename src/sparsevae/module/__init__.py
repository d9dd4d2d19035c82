"""Torch modules."""

from ._module import (
    AUXILIARY_KEY,
    COUNT_DEFAULTS,
    DEFAULT_PRIOR_CELLS,
    LATENT_PRIORS,
    LIKELIHOODS,
    STUDY_KEY,
    ModuleMask,
    SparseVAEModule,
)
from ._rotation import varimax

__all__ = [
    "AUXILIARY_KEY",
    "COUNT_DEFAULTS",
    "DEFAULT_PRIOR_CELLS",
    "LATENT_PRIORS",
    "LIKELIHOODS",
    "STUDY_KEY",
    "ModuleMask",
    "SparseVAEModule",
    "varimax",
]
