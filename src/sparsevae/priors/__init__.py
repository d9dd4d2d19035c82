"""Priors: the Spike-and-Slab Lasso on the decoder mask."""

from ._ssl import SpikeSlabLasso

__all__ = ["SpikeSlabLasso"]
