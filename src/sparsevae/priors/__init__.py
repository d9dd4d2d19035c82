"""Priors on the mask and how a fitted mask is read."""

from ._rules import DEFAULT_MIN_PSTAR, factor_use, is_selected
from ._ssl import SpikeSlabLasso

__all__ = ["DEFAULT_MIN_PSTAR", "SpikeSlabLasso", "factor_use", "is_selected"]
