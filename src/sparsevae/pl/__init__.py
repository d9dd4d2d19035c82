"""Plots."""

from ._interpret_plots import (
    anchor_heatmap,
    enrichment_dotplot,
    factors_embedding,
    top_genes,
    training_history,
)
from ._plots import mask_heatmap

__all__ = [
    "anchor_heatmap",
    "enrichment_dotplot",
    "factors_embedding",
    "mask_heatmap",
    "top_genes",
    "training_history",
]
