"""User-facing model classes."""

from ._checks import (
    MultiStudyChecks,
    effect_cells,
    shared_specific_checks,
    within_study_effects,
)
from ._model import SparseVAE, default_max_epochs
from ._save_load import UnsafeModelFileError

__all__ = [
    "MultiStudyChecks",
    "SparseVAE",
    "UnsafeModelFileError",
    "default_max_epochs",
    "effect_cells",
    "shared_specific_checks",
    "within_study_effects",
]
