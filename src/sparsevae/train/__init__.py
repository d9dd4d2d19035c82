"""Training plan."""

from ._plan import DivergenceError, SparseVAETrainingPlan

__all__ = ["DivergenceError", "SparseVAETrainingPlan"]
