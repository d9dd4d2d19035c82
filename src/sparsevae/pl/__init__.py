"""Plots."""

from ._plots import mask_heatmap

__all__ = ["mask_heatmap"]
