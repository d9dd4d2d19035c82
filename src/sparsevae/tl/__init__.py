"""Tools on trained models."""

from ._anchors import (
    IdentifiabilityReport,
    anchor_genes,
    covariance_violations,
    identifiability_report,
    top_genes,
)
from ._enrich import enrich, read_gmt, translate_gene_sets
from ._metrics import celltype_accuracy
from ._network import to_network

__all__ = [
    "IdentifiabilityReport",
    "anchor_genes",
    "celltype_accuracy",
    "covariance_violations",
    "enrich",
    "identifiability_report",
    "read_gmt",
    "to_network",
    "top_genes",
    "translate_gene_sets",
]
