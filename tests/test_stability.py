"""tl.factor_stability: factors matched across fits, reproducibility and consensus."""

from __future__ import annotations

import numpy as np
import pandas as pd
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


def test_factors_in_use_are_matched_among_themselves(written):
    """A switched-off factor that still varies a little with a real one is no counterpart: the
    reference factor is matched to the factor in use, and one without a partner in use is
    unmatched (|r| 0)."""
    _, adata = written
    ref = adata.copy()
    ref.varm["sparsevae_pstar"][0] = 1.0  # every factor selects gene 0: all three in use
    ref.varm["sparsevae_W"][0] = 1.0
    ref.uns["sparsevae"]["eta"] = np.full(3, 0.5)
    z = ref.obsm["X_sparsevae"]
    rng = np.random.default_rng(0)
    other = ref.copy()
    other.obsm["X_sparsevae"] = np.column_stack(
        [z[:, 0] + 0.8 * z[:, 0].std() * rng.normal(size=len(z)), z[:, 1], 0.01 * z[:, 0]]
    )
    other.varm["sparsevae_pstar"][:, 2] = 0.0  # factor 2: switched off
    other.varm["sparsevae_W"][:, 2] = 0.0
    other.uns["sparsevae"]["eta"] = np.array([0.5, 0.5, 0.0])
    stab = sparsevae.tl.factor_stability([ref, other])
    m = stab.matches.set_index("factor")
    names = list(stab.factors["factor"])
    assert m.loc[names[0], "matched"] == names[0]
    assert 0.6 < m.loc[names[0], "abs_r"] < 0.95
    assert m.loc[names[1], "matched"] == names[1]
    assert pd.isna(m.loc[names[2], "matched"]) and m.loc[names[2], "abs_r"] == 0.0


def test_anchor_consensus_counts_the_fits_in_which_a_gene_is_an_anchor(written):
    """A gene that is an anchor in two of three fits (in the third another factor selects it
    too) has an anchor share of 2/3: kept by ``consensus_anchors(0.5)``, not by ``(1.0)``."""
    _, adata = written
    results = sparsevae.tl.read_results(adata)
    anchors = results.anchors("shared", 0.5).to_numpy()
    names = list(results.factor_names)
    gene, factor = (int(i) for i in np.argwhere(anchors)[0])
    other = _permuted(adata, [2, 0, 1], np.array([1.0, -1.0, 1.0]))
    shared = adata.copy()
    second = (factor + 1) % 3
    shared.varm["sparsevae_pstar"][gene, second] = 1.0  # the gene now loads on two factors
    shared.varm["sparsevae_W"][gene, second] = 1.0
    stab = sparsevae.tl.factor_stability([adata, other, shared])
    share = stab.anchor_consensus
    assert share.iloc[gene, factor] == pytest.approx(2 / 3)
    expected = np.where(np.arange(len(share))[:, None] == gene, 0.0, anchors.astype(float))
    expected[gene, factor] = 2 / 3
    np.testing.assert_allclose(share.to_numpy(), expected)
    gene_name = str(adata.var_names[gene])
    assert gene_name in stab.consensus_anchors(0.5)[names[factor]]
    assert gene_name not in stab.consensus_anchors(1.0)[names[factor]]
    with pytest.raises(ValueError, match="min_share"):
        stab.consensus_anchors(0.0)
