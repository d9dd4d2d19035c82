"""Priors on the mask and on the factors, and how a fitted mask is read."""

from ._latent import ConditionalPrior, MixturePrior
from ._rules import DEFAULT_MIN_PSTAR, anchors, factor_use, is_selected, n_selecting
from ._ssl import SpikeSlabLasso

__all__ = [
    "DEFAULT_MIN_PSTAR",
    "ConditionalPrior",
    "MixturePrior",
    "SpikeSlabLasso",
    "anchors",
    "factor_use",
    "is_selected",
    "n_selecting",
]
