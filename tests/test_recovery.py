"""Recovery of planted truth on the paper's simulation (slow)."""

import numpy as np
import pytest

import sparsevae
from sparsevae import SparseVAE

from .conftest import QUIET

pytestmark = pytest.mark.slow


def test_recovers_moran2022_factors_and_mask():
    """The paper's simulation: both factors recovered, mask puts x1..x3 and x4..x6 apart.

    Required: |Spearman| >= 0.9 between each true factor and a distinct learned factor; x1..x3
    selected (p* > 0.5) on the z1 factor with a higher p* there than on the z2 factor, x1 and x2
    not selected on the z2 factor; x4..x6 selected on the z2 factor and not on the z1 factor;
    x7 = 7 z1 z2 selected on both. (x3 = 3 z1^2 sometimes keeps p* slightly above 0.5 on the
    z2 factor as well: measured on 3 of 6 seeds, see the issue 2 note.)
    """
    import scvi
    from scipy.stats import spearmanr

    scvi.settings.seed = 0
    ad = sparsevae.datasets.simulate_moran2022(n_cells=1000, rho=0.0, seed=0)
    SparseVAE.setup_anndata(ad)
    model = SparseVAE(ad, n_factors=2)
    model.train(**QUIET)  # default epochs for 1000 cells: 300
    z = model.get_latent_representation()
    zt = ad.obsm["true_factors"]
    C = np.abs([[spearmanr(z[:, a], zt[:, b])[0] for b in range(2)] for a in range(2)])
    f1, f2 = (0, 1) if C[0, 0] + C[1, 1] >= C[0, 1] + C[1, 0] else (1, 0)
    assert C[f1, 0] >= 0.9 and C[f2, 1] >= 0.9
    P = model.get_inclusion_probabilities().to_numpy()
    sel = P > 0.5
    assert sel[:3, f1].all() and (P[:3, f1] > P[:3, f2]).all() and not sel[:2, f2].any()
    assert sel[3:6, f2].all() and not sel[3:6, f1].any()
    assert sel[6, f1] and sel[6, f2]
