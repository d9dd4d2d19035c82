"""Priors on the mask and on the factors, and how a fitted mask is read."""

from ._latent import ConditionalPrior, MixturePrior
from ._rules import (
    DEFAULT_MIN_PSTAR,
    MIN_EFFECT_SHARE,
    MIN_RELATIVE_EFFECT,
    anchors,
    effect_share,
    factor_use,
    is_selected,
    n_selecting,
)
from ._ssl import SpikeSlabLasso

__all__ = [
    "DEFAULT_MIN_PSTAR",
    "MIN_EFFECT_SHARE",
    "MIN_RELATIVE_EFFECT",
    "ConditionalPrior",
    "MixturePrior",
    "SpikeSlabLasso",
    "anchors",
    "effect_share",
    "factor_use",
    "is_selected",
    "n_selecting",
]
