import logging
import warnings

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
warnings.filterwarnings("ignore", category=UserWarning)
logging.getLogger("lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

QUIET = {
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
}


@pytest.fixture
def quiet():
    return dict(QUIET)


def hand_weights(selection: dict[int, list[int]], n_genes: int, n_factors: int) -> np.ndarray:
    """A hand-set mask: gene ``j`` of ``selection[k]`` gets a weight on factor ``k``.

    Distinct magnitudes with alternating signs (``2.0, -1.9, 1.8, ...``), so the rank order of a
    factor's genes is the listed order; every other entry is 0.
    """
    W = np.zeros((n_genes, n_factors), dtype=np.float32)
    for k, genes in selection.items():
        for rank, j in enumerate(genes):
            W[j, k] = (-1.0) ** rank * (2.0 - 0.1 * rank)
    return W


def small_counts(n_cells=120, n_genes=40, n_factors=2, seed=0):
    """Small simulated counts with planted programs (15 genes each, 2 shared with the next)."""
    import sparsevae

    return sparsevae.datasets.simulate_programs(
        n_cells=n_cells,
        n_genes=n_genes,
        n_factors=n_factors,
        genes_per_program=15,
        n_shared_genes=2,
        seed=seed,
    )
