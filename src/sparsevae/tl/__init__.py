"""Tools on trained models."""

from ._activity import factor_activity
from ._anchors import FitData as FitData  # the input type of tl and pl functions
from ._anchors import (
    IdentifiabilityReport,
    anchor_genes,
    covariance_violations,
    identifiability_report,
    top_genes,
)
from ._de import differential_expression
from ._enrich import enrich, read_gmt, translate_gene_sets
from ._fidelity import mask_fidelity
from ._metrics import celltype_accuracy, dci, mcc
from ._multistudy import (
    MultiStudyChecks,
    SharedSpecificGenes,
    check_shared_specific,
    mask_f1,
    shared_specific_genes,
)
from ._network import to_network
from ._results import FactorMask, Results, check_min_pstar, read_results
from ._stability import FactorStability, factor_stability

__all__ = [
    "FactorMask",
    "FactorStability",
    "IdentifiabilityReport",
    "MultiStudyChecks",
    "Results",
    "SharedSpecificGenes",
    "anchor_genes",
    "celltype_accuracy",
    "check_min_pstar",
    "check_shared_specific",
    "covariance_violations",
    "dci",
    "differential_expression",
    "enrich",
    "factor_activity",
    "factor_stability",
    "identifiability_report",
    "mask_f1",
    "mask_fidelity",
    "mcc",
    "read_gmt",
    "read_results",
    "shared_specific_genes",
    "to_network",
    "top_genes",
    "translate_gene_sets",
]
