"""Training plan and the schedule of the mask prior."""

from ._plan import (
    DivergenceError,
    PriorSchedule,
    SparseVAETrainingPlan,
    default_max_epochs,
    prior_schedule,
)

__all__ = [
    "DivergenceError",
    "PriorSchedule",
    "SparseVAETrainingPlan",
    "default_max_epochs",
    "prior_schedule",
]
