"""The simulators with planted truth (datasets)."""

import numpy as np
from anndata import AnnData

import sparsevae


def test_moran_simulator_design():
    ad = sparsevae.datasets.simulate_moran2022(n_cells=500, rho=0.6, noise=0.0, seed=1)
    z = ad.obsm["true_factors"]
    assert ad.shape == (500, 7)
    np.testing.assert_allclose(ad.X[:, 1], 2 * z[:, 0], rtol=1e-5)
    np.testing.assert_allclose(ad.X[:, 6], 7 * z[:, 0] * z[:, 1], rtol=1e-4, atol=1e-5)
    assert abs(np.corrcoef(z.T)[0, 1] - 0.6) < 0.1
    assert ad.varm["true_mask"].tolist() == [[1, 0]] * 3 + [[0, 1]] * 3 + [[1, 1]]


def test_program_simulator():
    ad = sparsevae.datasets.simulate_programs(
        n_cells=300, n_genes=100, n_factors=3, genes_per_program=20, n_shared_genes=4
    )
    m = ad.varm["true_mask"]
    assert m.shape == (100, 3) and (m.sum(0) == 24).all()
    assert ad.var["is_anchor"].sum() == 3 * 16
    X = ad.X.toarray()
    assert (X == np.round(X)).all() and (X >= 0).all() and (X.sum(1) > 0).all()
    assert isinstance(ad, AnnData)
