"""The simulators with planted truth (datasets)."""

import numpy as np
import pandas as pd
import pytest
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


def test_simulate_ivae_segments_change_the_sources():
    import sparsevae

    ad = sparsevae.datasets.simulate_ivae(n_per_segment=50, n_segments=6, n_sources=3, n_features=8)
    assert ad.shape == (300, 8) and ad.obsm["true_factors"].shape == (300, 3)
    assert ad.obs["segment"].cat.categories.size == 6
    means = pd.DataFrame(ad.obsm["true_factors"]).groupby(ad.obs["segment"].to_numpy()).mean()
    assert means.std().min() > 0.5  # the sources' means move across segments
    with pytest.raises(ValueError, match="n_features >= n_sources"):
        sparsevae.datasets.simulate_ivae(n_sources=5, n_features=3)
