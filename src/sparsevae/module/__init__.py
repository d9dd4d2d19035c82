"""Torch modules."""

from ._module import (
    AUXILIARY_KEY,
    DEFAULT_PRIOR_CELLS,
    LATENT_PRIORS,
    LIKELIHOODS,
    MULTISTUDY_COUNT_DEFAULTS,
    STUDY_KEY,
    ModuleMask,
    SparseVAEModule,
)

__all__ = [
    "AUXILIARY_KEY",
    "DEFAULT_PRIOR_CELLS",
    "LATENT_PRIORS",
    "LIKELIHOODS",
    "MULTISTUDY_COUNT_DEFAULTS",
    "STUDY_KEY",
    "ModuleMask",
    "SparseVAEModule",
]
