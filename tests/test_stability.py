"""tl.factor_stability: factors matched across fits, reproducibility and consensus."""

from __future__ import annotations

import numpy as np
import pytest

import sparsevae
from sparsevae import SparseVAE

from .conftest import QUIET, small_counts


@pytest.fixture(scope="module")
def written():
    adata = small_counts(n_cells=150, n_genes=60, n_factors=3)
    SparseVAE.setup_anndata(adata)
    model = SparseVAE(adata, n_factors=3, n_hidden=8)
    model.train(max_epochs=20, **QUIET)
    return model, model.write_results(adata.copy())


def _permuted(adata, order, signs):
    """The same fit with its factors reordered and flipped: what another start might give."""
    out = adata.copy()
    out.obsm["X_sparsevae"] = adata.obsm["X_sparsevae"][:, order] * signs
    for key in ("sparsevae_W", "sparsevae_pstar", "sparsevae_effect"):
        out.varm[key] = adata.varm[key][:, order]
    out.uns["sparsevae"]["eta"] = np.asarray(adata.uns["sparsevae"]["eta"])[order]
    return out


def test_a_permuted_fit_is_matched_exactly(written):
    model, adata = written
    other = _permuted(adata, [2, 0, 1], np.array([1.0, -1.0, 1.0]))
    stab = sparsevae.tl.factor_stability([adata, other, model])
    m = stab.matches
    names = model.factor_names
    first = m[m["fit"] == 1].set_index("factor")["matched"]
    # reference factor k sits at position order.index(k) of the permuted fit
    assert [first[n] for n in names] == [names[1], names[2], names[0]]
    np.testing.assert_allclose(m["abs_r"], 1.0, atol=1e-6)
    sel = m["jaccard_selected"].dropna()
    np.testing.assert_allclose(sel, 1.0)
    assert stab.factors["median_abs_r"].min() == pytest.approx(1.0, abs=1e-6)
    selected = sparsevae.tl.read_results(adata).selected("shared")
    np.testing.assert_array_equal(stab.consensus.to_numpy(), selected.to_numpy().astype(float))
    genes = stab.consensus_genes()
    assert set(genes) == set(names)
    assert "Factor stability over 3 fits" in stab.summary()


def test_unrelated_factors_are_not_reproducible(written):
    _, adata = written
    noise = adata.copy()
    rng = np.random.default_rng(12345)  # not the simulator's seed: its factors are N(0, 1) too
    noise.obsm["X_sparsevae"] = rng.normal(size=adata.obsm["X_sparsevae"].shape)
    stab = sparsevae.tl.factor_stability([adata, noise])
    assert stab.factors["median_abs_r"].max() < 0.5
    assert not stab.factors["reproducible"].any()


def test_bad_inputs(written):
    _, adata = written
    with pytest.raises(ValueError, match="at least two fits"):
        sparsevae.tl.factor_stability([adata])
    with pytest.raises(ValueError, match="same cells"):
        sparsevae.tl.factor_stability([adata, adata[:100].copy()])
    other = adata.copy()
    other.var_names = [f"x{i}" for i in range(adata.n_vars)]
    with pytest.raises(ValueError, match="other genes"):
        sparsevae.tl.factor_stability([adata, other])
