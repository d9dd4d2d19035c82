"""Training plan and the schedule of the mask prior."""

from ._plan import (
    MULTISTUDY_FREE_BITS_SPECIFIC,
    ROTATE_AFTER_WARMUP,
    DivergenceError,
    PriorSchedule,
    SparseVAETrainingPlan,
    default_max_epochs,
    prior_schedule,
)

__all__ = [
    "MULTISTUDY_FREE_BITS_SPECIFIC",
    "ROTATE_AFTER_WARMUP",
    "DivergenceError",
    "PriorSchedule",
    "SparseVAETrainingPlan",
    "default_max_epochs",
    "prior_schedule",
]
