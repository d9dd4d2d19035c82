"""Simulated and bundled datasets."""

from ._pbmc import pbmc68k_reduced_counts
from ._simulate import simulate_ivae, simulate_moran2022, simulate_multistudy, simulate_programs

__all__ = [
    "pbmc68k_reduced_counts",
    "simulate_ivae",
    "simulate_moran2022",
    "simulate_multistudy",
    "simulate_programs",
]
