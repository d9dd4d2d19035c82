"""Multi-study SparseVAE: shared and study-specific masks (issue 4)."""

import matplotlib

matplotlib.use("Agg")

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import sparsevae
from sparsevae import SparseVAE
from sparsevae.nn import MaskedDecoder
from sparsevae.priors import SpikeSlabLasso

from .conftest import QUIET, hand_weights, small_counts

STUDIES = ["study_0", "study_1", "study_2"]


def small_multistudy(n_cells_per_study=40, seed=0):
    """40 genes: shared programs 0-5 and 6-11, specific programs 12-17 (study_0), 18-23
    (study_1), 24-29 (study_2), background 30-39."""
    return sparsevae.datasets.simulate_multistudy(
        n_studies=3,
        n_genes=40,
        n_shared=2,
        n_specific=1,
        genes_per_program=6,
        n_cells_per_study=n_cells_per_study,
        seed=seed,
    )


# Hand-set masks (selected entries: p* = 0.99, others 0.01, W = 0):
HAND_SHARED = {0: [*range(6), 30], 1: list(range(6, 12))}
HAND_SPECIFIC = {
    "study_0": {0: [*range(12, 18), 30], 1: []},
    "study_1": {0: list(range(18, 24)), 1: [31]},
    "study_2": {0: [*range(24, 30), 31], 1: []},
}
#: The label each gene should get from tl.shared_specific_genes.
HAND_LABELS = (
    ["shared"] * 12
    + ["specific to study_0"] * 6
    + ["specific to study_1"] * 6
    + ["specific to study_2"] * 6
    + ["both", "specific to study_1, study_2"]
    + ["none"] * 8
)


def _fill(selection: dict[int, list[int]], n_factors: int) -> np.ndarray:
    return hand_weights(selection, n_genes=40, n_factors=n_factors)


@pytest.fixture(scope="module")
def hand_model():
    torch.manual_seed(0)
    adata = small_multistudy()
    SparseVAE.setup_anndata(adata, study_key="study")
    model = SparseVAE(adata, n_factors=2, n_specific_factors=2, n_hidden=8)
    model.train(max_epochs=1, batch_size=64, **QUIET)
    m = model.module
    W = torch.as_tensor(_fill(HAND_SHARED, 2))
    V = torch.stack([torch.as_tensor(_fill(HAND_SPECIFIC[s], 2)) for s in STUDIES])
    with torch.no_grad():
        m.decoder.W.copy_(W)
        m.decoder.W_specific.copy_(V)
        m.prior.p_star.copy_(torch.where(W != 0, 0.99, 0.01))
        m.prior_specific.p_star.copy_(torch.where(V != 0, 0.99, 0.01))
        m.prior.eta.copy_(torch.tensor([0.1, 0.08]))
        m.prior_specific.eta.copy_(torch.tensor([[0.1, 1e-6], [0.08, 0.02], [0.1, 1e-6]]))
    if m.gate_on:  # multi-study models close the spike gates: let them follow the hand-set p*
        m.close_spike_gates()
    return model


# ----------------------------------------------------------------------------- decoder
@pytest.mark.parametrize("n_layers", [1, 2])
def test_multistudy_decoder_matches_gene_loop_and_checkpointing(n_layers):
    torch.manual_seed(0)
    dec = MaskedDecoder(
        23, 3, n_hidden=8, n_layers=n_layers, n_output=2, n_specific=2, n_studies=3,
        max_chunk_elements=8 * 9 * 5,
    )  # fmt: skip
    with torch.no_grad():
        dec.W.normal_()
        dec.W_specific.normal_()
    z = torch.randn(9, 5)
    study = torch.tensor([0, 1, 2, 2, 1, 0, 1, 0, 2])
    assert dec.chunk_size(9) < 23  # several gene chunks
    out = dec(z, study=study)
    assert out.shape == (9, 23, 2)
    torch.testing.assert_close(out, dec.forward_loop(z, study), rtol=1e-5, atol=1e-6)
    # activation checkpointing gives the same gradients, the specific masks included
    grads = []
    for saved in (2**28, 1):
        dec.max_saved_elements = saved
        dec.zero_grad()
        dec(z, study=study.unsqueeze(1)).square().sum().backward()
        grads.append([p.grad.clone() for p in (dec.W, dec.W_specific, dec.first.weight)])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="study"):
        dec(z)


def test_cell_sees_only_its_own_study_mask():
    torch.manual_seed(1)
    dec = MaskedDecoder(6, 2, n_hidden=8, n_specific=2, n_studies=3)
    z = torch.randn(4, 4)
    study = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        before = dec(z, study=study)
        dec.W_specific[1, 3] += 5.0  # study 1's mask row of gene 3
        after = dec(z, study=study)
    changed = (after - before).abs().squeeze(-1) > 1e-6
    expected = torch.zeros(4, 6, dtype=torch.bool)
    expected[[1, 3], 3] = True  # only gene 3 of the cells of study 1
    assert torch.equal(changed, expected)


def test_grouped_prior_equals_independent_priors():
    torch.manual_seed(0)
    grouped = SpikeSlabLasso(30, 3, n_groups=2)
    singles = [SpikeSlabLasso(30, 3) for _ in range(2)]
    V = torch.randn(2, 30, 3) * torch.tensor([0.02, 0.5, 2.0])
    for _ in range(3):
        grouped.em_step(V)
        for s, prior in enumerate(singles):
            prior.em_step(V[s])
    for s, prior in enumerate(singles):
        torch.testing.assert_close(grouped.p_star[s], prior.p_star)
        torch.testing.assert_close(grouped.eta[s], prior.eta)
    torch.testing.assert_close(
        grouped.penalty(V), sum(p.penalty(V[s]) for s, p in enumerate(singles))
    )
    assert not torch.allclose(grouped.eta[0], grouped.eta[1])  # each study its own eta


# ----------------------------------------------------------------------------- single study
def test_single_study_model_is_unchanged():
    """Without study_key: no study field, no specific mask or prior, the same parameters as
    before multi-study support, and a study column in obs changes nothing."""
    import scvi

    runs = []
    for with_column in (False, True):
        adata = small_multistudy()
        if not with_column:
            del adata.obs["study"]
        scvi.settings.seed = 0
        SparseVAE.setup_anndata(adata)
        model = SparseVAE(adata, n_factors=3, n_hidden=8)
        model.train(max_epochs=2, batch_size=64, **QUIET)
        runs.append(model)
    a, b = runs
    assert not a.is_multistudy and a.studies == [] and a.mask_kinds == ["shared"]
    assert a.factor_names == ["factor_0", "factor_1", "factor_2"]
    assert "study" not in a.adata_manager.data_registry
    keys = set(a.module.state_dict())
    assert not any("specific" in k for k in keys)
    assert {"decoder.W", "prior.p_star", "prior.eta", "log_theta"} <= keys
    assert a.module.encoder.encoder.n_cat_list == []  # no covariate input
    np.testing.assert_array_equal(a.get_latent_representation(), b.get_latent_representation())
    pd.testing.assert_frame_equal(a.get_mask(), b.get_mask())
    pd.testing.assert_frame_equal(a.get_mask("shared"), a.get_mask())
    pd.testing.assert_frame_equal(a.get_inclusion_probabilities(), b.get_inclusion_probabilities())
    with pytest.raises(ValueError, match="single-study"):
        a.get_mask("study_0")
    with pytest.raises(ValueError, match="multi-study"):
        sparsevae.tl.shared_specific_genes(a)


def test_shared_factors_first():
    """While specific_on is off (the plan's first n_epochs_shared_first epochs) the specific
    factors do not reach the decoder; training leaves it on (off by default)."""
    adata = small_multistudy()
    SparseVAE.setup_anndata(adata, study_key="study")
    model = SparseVAE(adata, n_factors=2, n_specific_factors=1, n_hidden=8)
    module = model.module
    z = torch.randn(4, 3)
    z2 = z.clone()
    z2[:, 2] += 1.0  # change the specific factor only
    study = torch.zeros(4, 1, dtype=torch.long)
    lib = torch.zeros(4, 1)
    with torch.no_grad():
        module.decoder.W_specific.fill_(1.0)

    def mean(zz):
        return module.generative(zz, lib, study=study)["px"].mu

    assert module.specific_on
    assert not torch.allclose(mean(z), mean(z2))
    module.specific_on = False
    torch.testing.assert_close(mean(z), mean(z2))
    module.specific_on = True
    model.train(max_epochs=3, batch_size=64, n_epochs_shared_first=2, **QUIET)
    assert model.trainer.lightning_module.n_epochs_shared_first == 2
    assert module.specific_on
    model.train(max_epochs=1, batch_size=64, **QUIET)
    assert model.trainer.lightning_module.n_epochs_shared_first == 0  # off by default


# ----------------------------------------------------------------------------- bad input
def _snapshot(adata):
    return adata.obs.copy(), set(adata.uns), set(adata.obsm), set(adata.varm)


def _assert_untouched(adata, snap):
    obs, uns, obsm, varm = snap
    pd.testing.assert_frame_equal(adata.obs, obs)
    assert set(adata.uns) == uns and set(adata.obsm) == obsm and set(adata.varm) == varm


def test_bad_study_column_is_refused_before_registration():
    adata = small_multistudy()
    adata.obs["study"] = adata.obs["study"].astype(object)
    adata.obs.iloc[3, adata.obs.columns.get_loc("study")] = np.nan
    snap = _snapshot(adata)
    with pytest.raises(ValueError, match=r"1 cells without a study.*notna"):
        SparseVAE.setup_anndata(adata, study_key="study")
    _assert_untouched(adata, snap)

    adata = small_multistudy()
    adata.obs["one"] = "lab_a"
    snap = _snapshot(adata)
    with pytest.raises(ValueError, match=r"single study.*Leave study_key out"):
        SparseVAE.setup_anndata(adata, study_key="one")
    _assert_untouched(adata, snap)
    with pytest.raises(KeyError, match="not a column"):
        SparseVAE.setup_anndata(adata, study_key="donor")
    adata.obs["unused"] = pd.Categorical(adata.obs["study"], categories=[*STUDIES, "study_9"])
    with pytest.raises(ValueError, match="remove_unused_categories"):
        SparseVAE.setup_anndata(adata, study_key="unused")
    adata.obs["named"] = adata.obs["study"].astype(str).replace("study_0", "shared")
    with pytest.raises(ValueError, match="named 'shared'"):
        SparseVAE.setup_anndata(adata, study_key="named")
    _assert_untouched(adata, _snapshot(adata))


def test_n_specific_factors_needs_study_key():
    adata = small_multistudy()
    SparseVAE.setup_anndata(adata)
    with pytest.raises(ValueError, match="study_key"):
        SparseVAE(adata, n_factors=2, n_specific_factors=2)
    SparseVAE.setup_anndata(adata, study_key="study")
    with pytest.raises(ValueError, match="n_specific_factors"):
        SparseVAE(adata, n_factors=2, n_specific_factors=0)
    model = SparseVAE(adata, n_factors=2)  # default number of specific factors
    assert model.module.n_specific_factors == sparsevae.model._model.DEFAULT_N_SPECIFIC_FACTORS


def test_unknown_study_at_inference_is_refused(hand_model):
    model = hand_model
    new = small_multistudy(seed=1)
    new.obs["study"] = new.obs["study"].astype(str).replace("study_2", "study_7")
    snap = _snapshot(new)
    with pytest.raises(ValueError, match=r"never saw: \['study_7'\].*isin\(model.studies\)"):
        model.get_latent_representation(new)
    with pytest.raises(ValueError, match="never saw"):
        model.write_results(new)
    _assert_untouched(new, snap)
    missing = small_multistudy(seed=1)
    del missing.obs["study"]
    with pytest.raises(ValueError, match=r"needs each cell's study in adata.obs\['study'\]"):
        model.get_latent_representation(missing)
    nan = small_multistudy(seed=1)
    nan.obs["study"] = nan.obs["study"].astype(object)
    nan.obs.iloc[0, nan.obs.columns.get_loc("study")] = None
    with pytest.raises(ValueError, match="without a study"):
        model.get_latent_representation(nan)
    # a subset of the known studies is fine
    sub = small_multistudy(seed=1)
    sub = sub[sub.obs["study"] == "study_1"].copy()
    z = model.get_latent_representation(sub)
    assert z.shape == (40, 4) and np.isfinite(z).all()


# ----------------------------------------------------------------------------- results
def test_results_api_and_write_results(hand_model):
    model = hand_model
    assert model.is_multistudy and model.studies == STUDIES
    assert model.mask_kinds == ["shared", *STUDIES]
    assert model.factor_names == ["shared_0", "shared_1", "specific_0", "specific_1"]
    z = model.get_latent_representation()
    assert z.shape == (120, 4)
    W = model.get_mask("shared")
    assert W.columns.tolist() == ["shared_0", "shared_1"] and W.shape == (40, 2)
    pd.testing.assert_frame_equal(model.get_mask(), W)
    V1 = model.get_mask("study_1")
    assert V1.columns.tolist() == ["specific_0", "specific_1"]
    np.testing.assert_array_equal(V1.to_numpy(), _fill(HAND_SPECIFIC["study_1"], 2))
    assert model.get_inclusion_probabilities("study_2").shape == (40, 2)
    np.testing.assert_allclose(model.get_eta("study_1").to_numpy(), [0.08, 0.02])
    with pytest.raises(ValueError, match="valid kinds"):
        model.get_mask("study_9")

    adata = model.adata.copy()
    model.write_results(adata)
    assert adata.obsm["X_sparsevae"].shape == (120, 4)
    np.testing.assert_array_equal(adata.varm["sparsevae_W_shared"], W.to_numpy())
    for s in STUDIES:
        np.testing.assert_array_equal(adata.varm[f"sparsevae_W_{s}"], model.get_mask(s).to_numpy())
        assert adata.varm[f"sparsevae_pstar_{s}"].shape == (40, 2)
        assert adata.varm[f"sparsevae_effect_{s}"].shape == (40, 2)
    assert "sparsevae_W" not in adata.varm
    uns = adata.uns["sparsevae"]
    assert uns["studies"] == STUDIES and uns["study_key"] == "study"
    assert uns["mask_kinds"] == ["shared", *STUDIES]
    assert uns["W_keys"] == ["sparsevae_W_shared"] + [f"sparsevae_W_{s}" for s in STUDIES]
    assert uns["shared_factor_names"] == ["shared_0", "shared_1"]
    assert uns["specific_factor_names"] == ["specific_0", "specific_1"]
    assert uns["eta_specific"].shape == (3, 2)
    with pytest.raises(KeyError, match="overwrite=True"):
        model.write_results(adata)
    model.write_results(adata, overwrite=True, effects=False)
    # a new AnnData holding some studies only: effects of an absent study are NaN
    sub = adata[adata.obs["study"] != "study_0"].copy()
    model.write_results(sub, key_added="sub")
    assert np.isnan(sub.varm["sub_effect_study_0"]).all()
    assert np.isfinite(sub.varm["sub_effect_study_1"]).all()


def test_save_load_multistudy(tmp_path):
    import scvi

    scvi.settings.seed = 0
    adata = small_multistudy()
    SparseVAE.setup_anndata(adata, study_key="study")
    model = SparseVAE(adata, n_factors=2, n_specific_factors=2, n_hidden=8)
    model.train(max_epochs=2, batch_size=64, **QUIET)
    model.save(tmp_path / "m", overwrite=True, save_anndata=True)
    loaded = SparseVAE.load(tmp_path / "m", adata=adata)
    assert loaded.studies == STUDIES and loaded.module.n_specific_factors == 2
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )
    for kind in model.mask_kinds:
        pd.testing.assert_frame_equal(loaded.get_mask(kind), model.get_mask(kind))
        pd.testing.assert_frame_equal(
            loaded.get_inclusion_probabilities(kind), model.get_inclusion_probabilities(kind)
        )
        pd.testing.assert_series_equal(loaded.get_eta(kind), model.get_eta(kind))
    # the saved AnnData is used when none is given
    again = SparseVAE.load(tmp_path / "m")
    np.testing.assert_array_equal(
        again.get_latent_representation(), model.get_latent_representation()
    )


# ----------------------------------------------------------------------------- tl / pl
def test_shared_specific_genes(hand_model):
    res = sparsevae.tl.shared_specific_genes(hand_model)
    genes = res.genes
    assert genes.index.tolist() == hand_model.adata.var_names.tolist()
    assert genes["label"].tolist() == HAND_LABELS
    g = hand_model.adata.var_names
    assert genes.loc[g[30], "shared"] == "shared_0"
    assert genes.loc[g[30], "specific_in_study_0"] == "specific_0"
    assert genes.loc[g[31], "specific_in_study_1"] == "specific_1"
    assert genes.loc[g[31], "specific_in_study_2"] == "specific_0"
    assert genes.loc[g[31], "studies"] == "study_1;study_2"
    assert genes["n_shared"].sum() == 13 and genes["n_specific"].sum() == 6 * 3 + 3
    f = res.factors.set_index(["kind", "factor"])["n_genes"]
    assert f[("shared", "shared_0")] == 7 and f[("shared", "shared_1")] == 6
    assert f[("study_0", "specific_0")] == 7 and f[("study_0", "specific_1")] == 0
    assert f[("study_1", "specific_1")] == 1 and f[("study_2", "specific_0")] == 7
    assert "both: 1" in res.summary()
    # the simulator's truth uses the same labels
    truth = small_multistudy().var["truth"]
    assert set(truth) == {"shared", *(f"specific to {s}" for s in STUDIES), "none"}


def _z_with_confined_factor(model, study="study_2", factor=1, seed=0):
    """Posterior means where every factor varies in every study, except shared ``factor``,
    which varies in ``study`` only (pinned near 0 elsewhere)."""
    codes = model._study_codes()
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((len(codes), len(model.factor_names))).astype(np.float32)
    inside = codes == model.studies.index(study)
    z[~inside, factor] *= 0.05
    return z


def test_check_shared_specific_on_a_consistent_fit(hand_model, monkeypatch):
    codes = hand_model._study_codes()
    rng = np.random.default_rng(1)
    z = rng.standard_normal((len(codes), 4)).astype(np.float32)
    monkeypatch.setattr(hand_model, "get_latent_representation", lambda *a, **k: z)
    checks = sparsevae.tl.check_shared_specific(hand_model)
    assert checks.activity.shape == (4, 3)
    assert checks.activity.index.tolist() == hand_model.factor_names
    assert checks.activity.columns.tolist() == STUDIES
    for s, study in enumerate(STUDIES):
        expected = z[codes == s, 0].std()
        assert checks.activity.loc["shared_0", study] == pytest.approx(expected, rel=1e-5)
    # both shared factors select genes; neither is confined; the specific programs differ
    assert checks.confined.index.tolist() == ["shared_0", "shared_1"]
    assert not checks.confined["flagged"].any()
    assert checks.confined["ratio"].between(1.0, 1.5).all()
    assert (checks.confined["quiet_in"] == "").all()
    assert checks.repeated.empty
    assert checks.ok and checks.problems == []
    assert "Every shared factor in use varies in every study" in checks.summary()
    with pytest.raises(ValueError, match="min_ratio"):
        sparsevae.tl.check_shared_specific(hand_model, min_ratio=1.0)
    with pytest.raises(ValueError, match="min_jaccard"):
        sparsevae.tl.check_shared_specific(hand_model, min_jaccard=0.0)


def test_check_shared_specific_flags_a_confined_shared_factor(hand_model, monkeypatch):
    z = _z_with_confined_factor(hand_model)
    monkeypatch.setattr(hand_model, "get_latent_representation", lambda *a, **k: z)
    checks = sparsevae.tl.check_shared_specific(hand_model)
    row = checks.confined.loc["shared_1"]
    assert row["flagged"] and row["ratio"] > 10
    assert row["varies_in"] == "study_2" and row["quiet_in"] == "study_0;study_1"
    assert row["n_genes"] == 6
    assert not checks.confined.loc["shared_0", "flagged"]
    assert not checks.ok and len(checks.problems) == 1
    assert "shared_1" in checks.problems[0] and "study_2" in checks.problems[0]
    assert "Refit with another seed" in checks.summary()
    # train() reports it: the warning names the factor and the remedy
    with pytest.warns(UserWarning, match="shared_1 .* varies in study_2 but hardly in study_0"):
        hand_model._warn_if_misassigned()


def test_effect_cells_takes_all_cells_or_a_fixed_sorted_subset():
    from sparsevae.model import effect_cells

    np.testing.assert_array_equal(effect_cells(10), np.arange(10))
    np.testing.assert_array_equal(effect_cells(2000), np.arange(2000))
    some = effect_cells(5000)
    assert len(some) == 2000 and len(np.unique(some)) == 2000
    assert (np.diff(some) > 0).all() and some.max() < 5000
    np.testing.assert_array_equal(some, effect_cells(5000))  # the same cells every call
    assert len(effect_cells(50, max_cells=20)) == 20


def test_written_results_carry_the_gene_level_check(hand_model, monkeypatch, tmp_path):
    z = _z_with_confined_factor(hand_model)
    monkeypatch.setattr(hand_model, "get_latent_representation", lambda *a, **k: z)
    adata = hand_model.adata.copy()
    hand_model.write_results(adata)
    adata.write_h5ad(tmp_path / "fit.h5ad")
    adata = ad.read_h5ad(tmp_path / "fit.h5ad")
    assert adata.uns["sparsevae"]["study_effects"].shape == (2, 3, 40)
    from_model = sparsevae.tl.check_shared_specific(hand_model)
    from_file = sparsevae.tl.check_shared_specific(adata)
    assert set(from_model.confined_genes["factor"]) == {"shared_1"}
    pd.testing.assert_frame_equal(from_file.confined_genes, from_model.confined_genes)
    assert from_file.problems == from_model.problems
    # genes dropped after writing: the stored effects no longer fit, a clear error
    fewer = adata[:, 5:].copy()
    with pytest.raises(ValueError, match="genes changed after write_results"):
        sparsevae.tl.check_shared_specific(fewer)
    assert fewer.uns["sparsevae"]["study_effects"].shape == (2, 3, 40)  # left as it was
    # written without effects: nothing stored, the gene-level check is skipped
    bare = hand_model.adata.copy()
    hand_model.write_results(bare, effects=False)
    assert "study_effects" not in bare.uns["sparsevae"]
    assert sparsevae.tl.check_shared_specific(bare).confined_genes.empty


def test_check_shared_specific_flags_a_program_repeated_in_every_study(hand_model):
    m = hand_model.module
    saved = m.prior_specific.p_star.clone()
    try:
        with torch.no_grad():
            # the same 6 genes (a shared program) in every study's specific_1 column, and
            # study_0 and study_1 share a second set through their specific_0 columns
            m.prior_specific.p_star[:, :, 1] = 0.01
            m.prior_specific.p_star[:, 0:6, 1] = 0.99
            m.prior_specific.p_star[1, 12:18, 0] = 0.99
        checks = sparsevae.tl.check_shared_specific(hand_model)
    finally:
        with torch.no_grad():
            m.prior_specific.p_star.copy_(saved)
    rep = checks.repeated.set_index("factors")
    every = "study_0:specific_1;study_1:specific_1;study_2:specific_1"
    assert rep.loc[every, "in_all_studies"] and rep.loc[every, "n_genes"] == 6
    assert rep.loc[every, "jaccard"] == 1.0
    # study_0's specific_0 (12-17, 30) and study_1's (12-23): Jaccard 6/13 < 0.5, not grouped
    assert len(rep) == 1
    assert any("every study" in p for p in checks.problems)
    looser = sparsevae.tl.check_shared_specific(hand_model, min_jaccard=0.4)
    assert looser.repeated.empty  # p* restored: the hand masks again
    with torch.no_grad():
        m.prior_specific.p_star[1, 12:18, 0] = 0.99
    try:
        looser = sparsevae.tl.check_shared_specific(hand_model, min_jaccard=0.4)
    finally:
        with torch.no_grad():
            m.prior_specific.p_star.copy_(saved)
    pair = looser.repeated.iloc[0]
    assert pair["factors"] == "study_0:specific_0;study_1:specific_0"
    assert pair["n_studies"] == 2 and not pair["in_all_studies"]
    assert "2 studies" in looser.summary() and looser.ok


def test_check_shared_specific_does_not_group_dense_masks(hand_model):
    """Dense specific masks overlap by chance (Jaccard > 0.5): not reported as repeated."""
    m = hand_model.module
    saved = m.prior_specific.p_star.clone()
    rng = np.random.default_rng(0)
    try:
        with torch.no_grad():
            for s in range(3):  # 34 random genes of 40 in each study's specific_0
                dense = torch.zeros(40)
                dense[torch.as_tensor(rng.choice(40, size=34, replace=False))] = 0.99
                m.prior_specific.p_star[s, :, 0] = dense
        checks = sparsevae.tl.check_shared_specific(hand_model)
    finally:
        with torch.no_grad():
            m.prior_specific.p_star.copy_(saved)
    assert checks.repeated.empty
    assert not any("every study" in p for p in checks.problems)


def test_check_shared_specific_max_cells_uses_a_subset(hand_model, monkeypatch):
    seen = {}
    original = hand_model.get_latent_representation

    def spy(adata=None, indices=None, **kwargs):
        seen["indices"] = indices
        return original(adata, indices=indices, **kwargs)

    monkeypatch.setattr(hand_model, "get_latent_representation", spy)
    checks = sparsevae.tl.check_shared_specific(hand_model, max_cells=60)
    idx = seen["indices"]
    assert len(idx) == 60 and len(set(idx)) == 60 and list(idx) == sorted(idx)
    assert np.isfinite(checks.activity.to_numpy()).all()
    sparsevae.tl.check_shared_specific(hand_model, max_cells=10_000)
    assert seen["indices"] is None  # fewer cells than max_cells: all of them


def test_check_shared_specific_needs_a_multistudy_model():
    adata = small_multistudy(n_cells_per_study=20)
    SparseVAE.setup_anndata(adata)
    model = SparseVAE(adata, n_factors=2, n_hidden=8)
    with pytest.raises(ValueError, match="multi-study model"):
        sparsevae.tl.check_shared_specific(model)


def test_anchors_and_identifiability_per_mask(hand_model):
    model = hand_model
    g = model.adata.var_names
    anchors = sparsevae.tl.anchor_genes(model)  # default: the shared mask
    assert set(anchors["factor"]) == {"shared_0", "shared_1"}
    a0 = anchors[anchors.factor == "shared_0"]
    # gene 30 is also selected by study_0's specific_0: not an anchor of shared_0
    assert a0.set_index("gene").loc[g[30], "is_anchor"] == False  # noqa: E712
    assert a0["is_anchor"].sum() == 6
    s0 = sparsevae.tl.anchor_genes(model, kind="study_0")
    assert set(s0["factor"]) == {"specific_0"}
    assert set(s0.loc[s0.is_anchor, "gene"]) == set(g[12:18])  # gene 30 is shared too
    s1 = sparsevae.tl.anchor_genes(model, kind="study_1", anchors_only=True)
    assert s1.loc[s1.factor == "specific_1", "gene"].tolist() == [g[31]]
    top = sparsevae.tl.top_genes(model, n=3, kind="study_2")
    assert top.columns.tolist() == ["specific_0", "specific_1"]
    assert top["specific_0"].tolist() == [g[24], g[25], g[26]]

    rep = sparsevae.tl.identifiability_report(model, kind="study_1")
    f = rep.factors.set_index("factor")
    assert f.index.tolist() == ["specific_0", "specific_1"]
    assert f.loc["specific_0", "n_anchors"] == 6 and f.loc["specific_1", "n_anchors"] == 1
    assert f.loc["specific_0", "identifiable"] and not f.loc["specific_1", "identifiable"]
    assert rep.covariance.index.tolist() == model.factor_names  # shared and specific
    v = rep.covariance_violations
    assert ((v.factor_1.str.startswith("specific")) | (v.factor_2.str.startswith("specific"))).all()
    shared = sparsevae.tl.identifiability_report(model)
    assert shared.factors["factor"].tolist() == ["shared_0", "shared_1"]
    assert shared.factors["n_anchors"].tolist() == [6, 6]
    assert shared.covariance.shape == (2, 2)
    off = sparsevae.tl.identifiability_report(model, kind="study_0").factors.set_index("factor")
    assert off.loc["specific_1", "switched_off"]

    net = sparsevae.tl.to_network(model, kind="study_2")
    assert set(net["source"]) == {"specific_0"} and len(net) == 7
    sets = {"prog_s1": list(g[18:24]), "prog_shared": list(g[:6]), "bg": list(g[32:40])}
    enr = sparsevae.tl.enrich(model, sets, kind="study_1", min_size=1)
    best = enr[enr.factor == "specific_0"].sort_values("pvalue").iloc[0]
    assert best["term"] == "prog_s1"


def test_gene_effects_per_mask(hand_model):
    model = hand_model
    shared = model.get_gene_effects()
    assert shared.columns.tolist() == ["shared_0", "shared_1"]
    W = _fill(HAND_SHARED, 2)
    assert np.all(shared.to_numpy()[W == 0] == 0.0) and np.all(shared.to_numpy()[W != 0] != 0.0)
    codes = model._study_codes()
    dec = model.module.decoder
    for s, study in enumerate(STUDIES):
        eff = model.get_gene_effects(kind=study, scale="link")
        assert eff.columns.tolist() == ["specific_0", "specific_1"]
        V = _fill(HAND_SPECIFIC[study], 2)
        assert np.all(eff.to_numpy()[V == 0] == 0.0) and np.all(eff.to_numpy()[V != 0] != 0.0)
        # brute force: Jacobian of the per-gene loop on the cells of the study
        idx = np.flatnonzero(codes == s)[:5]
        z = torch.as_tensor(model.get_latent_representation(indices=idx))
        st = torch.full((len(idx),), s)
        J = torch.autograd.functional.jacobian(lambda t, st=st: dec.forward_loop(t, st)[..., 0], z)
        J = torch.einsum("igik->igk", J)[..., 2:]
        got = model.get_gene_effects(kind=study, scale="link", indices=idx)
        np.testing.assert_allclose(got.to_numpy(), J.mean(0).numpy(), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="No cells of study"):
        model.get_gene_effects(kind="study_0", indices=np.flatnonzero(codes == 1)[:3])


def test_plots_per_mask(hand_model, tmp_path):
    ax = sparsevae.pl.mask_heatmap(hand_model, kind="study_1", show=False)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["specific_0", "specific_1"]
    assert "study_1" in ax.get_title()
    ax = sparsevae.pl.anchor_heatmap(hand_model, kind="study_0", show=False)
    assert "study_0" in ax.get_title()
    fig = sparsevae.pl.top_genes(
        hand_model, n=4, kind="study_2", show=False, save=tmp_path / "t.png", include_off=True
    )
    assert (tmp_path / "t.png").exists() and len(fig.axes) >= 2
    # by default the factor switched off in study_2 is left out
    fig = sparsevae.pl.top_genes(hand_model, n=4, kind="study_2", show=False)
    assert len(fig.axes) == 1
    plt.close("all")


def test_mask_f1_matches_factors_to_programs():
    truth = np.zeros((10, 3), dtype=bool)
    truth[:3, 0] = truth[3:6, 1] = truth[6:9, 2] = True
    sel = pd.DataFrame(np.zeros((10, 2), dtype=bool), columns=["a", "b"])
    sel.loc[3:5, "a"] = True  # program 1 exactly
    sel.loc[0:3, "b"] = True  # program 0 plus one gene of program 1
    res = sparsevae.tl.mask_f1(sel, truth)
    assert res["factor"].tolist() == ["b", "a", None]
    np.testing.assert_allclose(res["f1"], [2 * 3 / 7, 1.0, 0.0])
    np.testing.assert_allclose(res["precision"][:2], [0.75, 1.0])
    assert res["recall"].tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="same genes"):
        sparsevae.tl.mask_f1(sel, truth[:5])


# ----------------------------------------------------------------------------- simulator
def test_simulate_multistudy_truth():
    ad = sparsevae.datasets.simulate_multistudy(
        n_studies=3, n_genes=120, n_shared=2, n_specific=2, genes_per_program=12,
        n_cells_per_study=300, effect=1.5, nonlinear=False, seed=3,
    )  # fmt: skip
    assert ad.shape == (900, 120)
    assert ad.obs["study"].cat.categories.tolist() == STUDIES
    assert ad.uns["simulation"]["studies"] == STUDIES
    assert ad.obsm["true_factors"].shape == (900, 4)
    masks = [ad.varm["true_mask_shared"]] + [ad.varm[f"true_mask_{s}"] for s in STUDIES]
    assert all(m.sum(0).tolist() == [12, 12] for m in masks)
    stacked = np.hstack(masks)
    assert stacked.sum(1).max() == 1  # disjoint programs
    assert (ad.var["truth"] == "none").sum() == 120 - 8 * 12
    X = ad.X.toarray()
    assert sp.issparse(ad.X) and (X == np.round(X)).all() and (X >= 0).all()
    # a specific program moves with its factor in its own study only
    logx = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
    genes = np.flatnonzero(ad.varm["true_mask_study_1"][:, 0])
    z = ad.obsm["true_factors"][:, 2]
    for s in STUDIES:
        cells = (ad.obs["study"] == s).to_numpy()
        r = [abs(np.corrcoef(logx[cells, j], z[cells])[0, 1]) for j in genes]
        assert (np.median(r) > 0.3) == (s == "study_1")
    with pytest.raises(ValueError, match="n_studies"):
        sparsevae.datasets.simulate_multistudy(n_studies=1)
    with pytest.raises(ValueError, match="n_genes"):
        sparsevae.datasets.simulate_multistudy(n_genes=50)


# ----------------------------------------------------------------------------- recovery
def test_recovers_shared_and_specific_programs():
    """Shared mask -> shared programs, each study's mask -> that study's programs.

    3 studies x 300 cells, 200 genes: 2 shared programs and 1 specific program per study (30
    genes each, the other 50 genes constant), nonlinear maps, negative binomial counts, package
    defaults, 100 epochs. Learned factors are matched to true programs by the Hungarian
    algorithm on gene-set F1 (tl.mask_f1, selection p* >= 0.5). Required: mean F1 >= 0.9 for
    the shared mask and >= 0.8 for each study's mask, and no specific program absorbed by the shared
    mask (at most 10% of its genes selected by a shared factor). Measured with this setup on
    seeds 0-5: every mean F1 >= 0.94, nothing absorbed (seed 0: shared 1.0, 1.0; studies 0.97,
    0.98, 0.97). A fresh CI environment gave 0.85 for one study's mask (the fit is not
    bit-identical across environments).
    """
    import scvi

    scvi.settings.seed = 0
    ad = sparsevae.datasets.simulate_multistudy(
        n_studies=3, n_genes=200, n_shared=2, n_specific=1, genes_per_program=30,
        n_cells_per_study=300, seed=0,
    )  # fmt: skip
    SparseVAE.setup_anndata(ad, study_key="study")
    model = SparseVAE(ad, n_factors=2, n_specific_factors=1)
    model.train(max_epochs=100, batch_size=128, **QUIET)
    shared = model.get_inclusion_probabilities("shared") >= 0.5
    f1_shared = sparsevae.tl.mask_f1(shared, ad.varm["true_mask_shared"])["f1"]
    assert f1_shared.mean() >= 0.9, f1_shared.tolist()
    for s in STUDIES:
        sel = model.get_inclusion_probabilities(s) >= 0.5
        f1 = sparsevae.tl.mask_f1(sel, ad.varm[f"true_mask_{s}"])["f1"]
        # measured >= 0.94 in the dev environment, 0.85 for one study in a fresh CI environment
        assert f1.mean() >= 0.8, (s, f1.tolist())
        program = ad.varm[f"true_mask_{s}"][:, 0] > 0
        assert shared.to_numpy().any(1)[program].mean() <= 0.1, s
    # the per-gene labels follow: most program genes get their true label
    labels = sparsevae.tl.shared_specific_genes(model).genes["label"]
    in_program = (ad.var["truth"] != "none").to_numpy()
    agree = (labels.to_numpy() == ad.var["truth"].to_numpy())[in_program].mean()
    assert agree >= 0.9, agree


def test_move_to_specific_keeps_the_study_function_and_frees_the_factor():
    from sparsevae.module import SparseVAEModule

    torch.manual_seed(0)
    n_genes, K, K_spec, S = 12, 3, 2, 2
    module = SparseVAEModule(
        n_input=n_genes, n_factors=K, n_hidden=8, n_specific_factors=K_spec, n_studies=S
    )
    module.eval()
    with torch.no_grad():
        module.decoder.W_specific[:, :, 1] = 0.0  # slot 1 unused in every study
        module.prior.p_star[:, 2] = torch.rand(n_genes)
        module.offset_net[-1].weight.normal_()  # a non-trivial composition offset
        module.offset_net[0].weight[:, K + 1] = 0.0  # ... that the unused slot does not feed
    x = torch.poisson(5 * torch.rand(20, n_genes))
    study = torch.ones(20, 1, dtype=torch.long)  # cells of study 1
    qz_before = module.inference(x, study=study)["qz"]
    z = qz_before.loc
    lib = torch.zeros(20, 1)
    before = module.generative(z, lib, study=study)["px"].mu
    pstar = module.prior.p_star[:, 2].clone()
    module.move_to_specific(factor=2, study=1, slot=1)
    qz_after = module.inference(x, study=study)["qz"]
    # the slot's encoder unit is the factor's; the factor's is the prior N(0, 1)
    torch.testing.assert_close(qz_after.loc[:, K + 1], qz_before.loc[:, 2])
    torch.testing.assert_close(qz_after.loc[:, 2], torch.zeros(20))
    torch.testing.assert_close(qz_after.scale[:, 2], torch.ones(20), atol=1e-3, rtol=0)
    z_after = qz_after.loc
    after = module.generative(z_after, lib, study=study)["px"].mu
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    assert torch.all(module.decoder.W[:, 2] == 0) and torch.all(module.prior.p_star[:, 2] == 0)
    torch.testing.assert_close(module.prior_specific.p_star[1, :, 1], pstar)
    assert float(module.prior.eta[2]) < module.prior.eta_off


def test_move_to_shared_keeps_a_program_repeated_in_every_study():
    from sparsevae.model._reassign import MoveConfinedFactors
    from sparsevae.module import SparseVAEModule

    torch.manual_seed(1)
    n_genes, K, K_spec, S = 10, 2, 2, 3
    module = SparseVAEModule(
        n_input=n_genes, n_factors=K, n_hidden=8, n_specific_factors=K_spec, n_studies=S
    )
    module.eval()
    with torch.no_grad():
        module.decoder.W[:, 1] = 0.0  # shared factor 1 unused
        module.decoder.W_specific[:, :, 0] = module.decoder.W_specific[0, :, 0]  # same program
        module.offset_net[0].weight[:, 1] = 0.0
    x = torch.poisson(5 * torch.rand(9, n_genes))
    study = torch.arange(9).remainder(S).reshape(-1, 1)
    lib = torch.zeros(9, 1)
    z = module.inference(x, study=study)["qz"].loc
    before = module.generative(z, lib, study=study)["px"].mu
    module.move_to_shared(slot=0, factor=1)
    z_after = module.inference(x, study=study)["qz"].loc
    torch.testing.assert_close(z_after[:, 1], z[:, K])
    after = module.generative(z_after, lib, study=study)["px"].mu
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    assert torch.all(module.decoder.W_specific[:, :, 0] == 0)
    # the move happens half-way through the epochs with the full prior
    assert MoveConfinedFactors.move_epoch(full_prior_epoch=60, max_epochs=100) == 79
    assert MoveConfinedFactors.move_epoch(full_prior_epoch=0, max_epochs=100) == 49
    # ... and checked until a quarter of those epochs remain, pausing a tenth of them after a move
    assert MoveConfinedFactors.check_epochs(full_prior_epoch=60, max_epochs=100) == range(79, 90)
    assert MoveConfinedFactors.check_epochs(full_prior_epoch=240, max_epochs=400) == range(319, 360)
    assert MoveConfinedFactors.check_epochs(full_prior_epoch=9, max_epochs=10) == range(8, 9)
    assert MoveConfinedFactors.settle_epochs(full_prior_epoch=240, max_epochs=400) == 16
    assert MoveConfinedFactors.settle_epochs(full_prior_epoch=9, max_epochs=10) == 1


def test_swap_roles_exchanges_a_confined_shared_factor_and_a_repeated_slot():
    from sparsevae.module import SparseVAEModule

    torch.manual_seed(2)
    n_genes, K, K_spec, S = 10, 2, 1, 2
    module = SparseVAEModule(
        n_input=n_genes, n_factors=K, n_hidden=8, n_specific_factors=K_spec, n_studies=S
    )
    module.eval()
    with torch.no_grad():
        module.decoder.W_specific[:] = module.decoder.W_specific[0]  # one program, both studies
    x = torch.poisson(5 * torch.rand(6, n_genes))
    study = torch.zeros(6, 1, dtype=torch.long)  # cells of study 0
    lib = torch.zeros(6, 1)
    z = module.inference(x, study=study)["qz"].loc
    before = module.generative(z, lib, study=study)["px"].mu
    w_shared = module.decoder.W[:, 1].clone()
    module.swap_roles(factor=1, study=0, slot=0)
    z_after = module.inference(x, study=study)["qz"].loc
    torch.testing.assert_close(z_after[:, 1], z[:, K])
    torch.testing.assert_close(z_after[:, K], z[:, 1])
    after = module.generative(z_after, lib, study=study)["px"].mu
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(module.decoder.W_specific[0, :, 0], w_shared)
    assert torch.all(module.decoder.W_specific[1, :, 0] == 0)


def test_split_to_specific_keeps_the_study_function_and_the_other_genes():
    from sparsevae.module import SparseVAEModule

    torch.manual_seed(3)
    n_genes, K, K_spec, S = 12, 3, 2, 2
    module = SparseVAEModule(
        n_input=n_genes, n_factors=K, n_hidden=8, n_specific_factors=K_spec, n_studies=S
    )
    module.eval()
    with torch.no_grad():
        module.decoder.W_specific[:, :, 1] = 0.0  # slot 1 unused in every study
        module.prior.p_star[:, 2] = torch.rand(n_genes)
        module.offset_net[-1].weight.normal_()
        module.offset_net[0].weight[:, K + 1] = 0.0
    genes = torch.zeros(n_genes, dtype=torch.bool)
    genes[:5] = True
    x = torch.poisson(5 * torch.rand(20, n_genes))
    study = torch.tensor([0, 1] * 10).reshape(-1, 1)
    lib = torch.zeros(20, 1)
    qz = module.inference(x, study=study)["qz"]
    before = module.generative(qz.loc, lib, study=study)["px"].mu
    w_old, p_old = module.decoder.W[:, 2].clone(), module.prior.p_star[:, 2].clone()
    module.split_to_specific(factor=2, study=1, slot=1, genes=genes)
    qz_after = module.inference(x, study=study)["qz"]
    # the slot is a copy of the factor, which keeps its own encoder unit
    torch.testing.assert_close(qz_after.loc[:, K + 1], qz.loc[:, 2])
    torch.testing.assert_close(qz_after.loc[:, 2], qz.loc[:, 2])
    after = module.generative(qz_after.loc, lib, study=study)["px"].mu
    in_study = study.ravel() == 1
    # study 1's cells are decoded as before; the other study keeps every gene not handed over
    torch.testing.assert_close(after[in_study], before[in_study], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(after[~in_study][:, ~genes], before[~in_study][:, ~genes])
    dec = module.decoder
    assert torch.all(dec.W[genes, 2] == 0) and torch.equal(dec.W[~genes, 2], w_old[~genes])
    torch.testing.assert_close(dec.W_specific[1, genes, 1], w_old[genes])
    assert torch.all(dec.W_specific[1, ~genes, 1] == 0) and torch.all(dec.W_specific[0, :, 1] == 0)
    torch.testing.assert_close(module.prior_specific.p_star[1, genes, 1], p_old[genes])
    assert torch.all(module.prior.p_star[genes, 2] == 0)
    # the handed-over entries stay zero for the network, and get no gradient
    with torch.no_grad():
        dec.W[:, 2] = 1.0
    W_used, _ = dec.gated_masks()
    assert torch.all(W_used[genes, 2] == 0) and torch.all(W_used[~genes, 2] == 1)
    module.train()
    module.generative(qz_after.rsample(), lib, study=study)["px"].log_prob(x).sum().backward()
    assert torch.all(dec.W.grad[genes, 2] == 0) and dec.W.grad[~genes, 2].abs().sum() > 0
    assert "decoder.shared_keep" not in module.state_dict()  # a training-time constraint only
    with pytest.raises(ValueError, match="boolean vector"):
        module.split_to_specific(factor=2, study=1, slot=1, genes=genes[:3])


def test_within_study_effects_see_a_factor_quiet_in_one_study():
    torch.manual_seed(4)
    dec = MaskedDecoder(n_genes=6, n_factors=2, n_hidden=8, n_specific=1, n_studies=2)
    with torch.no_grad():
        dec.W[:, 1] = 0.0  # factor 1 reaches no gene
    z = torch.randn(40, 3)
    study = torch.tensor([0, 1] * 20)
    z[study == 1, 0] = 0.7  # factor 0 does not vary in study 1
    eff = dec.within_study_effects(z, study, [0, 1])
    assert eff.shape == (2, 2, 6)
    assert torch.all(eff[0, 0] > 0) and torch.all(eff[0, 1] == 0)
    assert torch.all(eff[1] == 0)


def test_confined_genes_finds_one_studys_genes_on_a_shared_factor():
    from sparsevae.model import shared_specific_checks
    from sparsevae.model._checks import confined_genes

    genes = [f"g{j}" for j in range(6)]
    effects = np.zeros((2, 2, 6))
    effects[0, 0] = 1.0
    effects[0, 1] = [0.1, 0.1, 0.2, 0.5, 1.0, 1.0]  # genes 0-2 driven in study_0 only
    effects[1, 0] = [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]  # two confined genes: below min_genes
    effects[1, 1] = [0.1, 0.1, 0.0, 0.0, 0.0, 0.0]
    selected = pd.DataFrame(
        {"shared_0": [True] * 5 + [False], "shared_1": [True, True] + [False] * 4}, index=genes
    )
    table = confined_genes(effects, selected, ["study_0", "study_1"], min_ratio=3.0)
    assert table.to_dict("records") == [
        {"factor": "shared_0", "study": "study_0", "n_genes": 3, "genes": "g0;g1;g2",
         "ratio": 10.0}
    ]  # fmt: skip
    assert confined_genes(effects, selected, ["study_0", "study_1"], min_ratio=20.0).empty
    # in the checks: a problem, unless the whole factor is already flagged
    z = np.random.default_rng(0).standard_normal((40, 3))
    codes = np.array([0, 1] * 20)
    selections = {
        "shared": selected,
        "study_0": pd.DataFrame({"specific_0": [False] * 6}, index=genes),
        "study_1": pd.DataFrame({"specific_0": [False] * 6}, index=genes),
    }
    names = ["shared_0", "shared_1", "specific_0"]
    checks = shared_specific_checks(z, codes, names, selections, effects=effects)
    assert len(checks.confined_genes) == 1 and not checks.ok
    assert "shared_0 drives 3 of its genes in study_0 only" in checks.problems[0]
    assert shared_specific_checks(z, codes, names, selections).confined_genes.empty
    z[codes == 1, 0] *= 0.01  # shared_0 is now confined as a whole: reported once
    checks = shared_specific_checks(z, codes, names, selections, effects=effects)
    assert len(checks.problems) == 1 and "varies in study_0" in checks.problems[0]


def test_mover_splits_the_confined_genes_off_a_shared_factor(monkeypatch):
    from sparsevae.model import _reassign

    torch.manual_seed(0)
    adata = small_multistudy()
    SparseVAE.setup_anndata(adata, study_key="study")
    model = SparseVAE(adata, n_factors=2, n_specific_factors=2, n_hidden=8)
    model.train(max_epochs=1, batch_size=64, **QUIET)
    m = model.module
    with torch.no_grad():
        m.prior.p_star.zero_()
        m.prior.p_star[:10, 0] = 0.99  # shared_0 selects genes 0-9
        m.prior_specific.p_star.zero_()
        m.decoder.W_specific.zero_()  # every slot free
        m.prior_specific.eta.fill_(1e-7)
    effects = np.ones((2, 3, 40))
    effects[0, 2, :5] = 10.0  # genes 0-4 of shared_0 are driven in study_2 only
    effects[0, 1, 5:9] = 10.0  # genes 5-8 of shared_0 in study_1 only: a second split
    seen = {}

    def fake_effects(module, z, codes, factors):
        seen["factors"] = factors
        return effects[factors]

    monkeypatch.setattr(_reassign, "within_study_effects", fake_effects)
    mover = _reassign.MoveConfinedFactors(model)
    moves = mover.move(m)
    assert seen["factors"] == [0]  # shared_1 selects no gene
    assert moves == [
        {"kind": "split_to_specific", "factor": "shared_0", "study": "study_2", "n_genes": 5,
         "ratio": 10.0, "slot": 0},
        {"kind": "split_to_specific", "factor": "shared_0", "study": "study_1", "n_genes": 4,
         "ratio": 10.0, "slot": 1},
    ]  # fmt: skip
    assert torch.all(m.prior.p_star[:9, 0] == 0) and bool(m.prior.p_star[9, 0] > 0.9)
    assert torch.all(m.prior_specific.p_star[2, :5, 0] > 0.9)
    assert torch.all(m.prior_specific.p_star[:2, :, 0] == 0)
    assert torch.all(m.prior_specific.p_star[1, 5:9, 1] > 0.9)
    assert torch.all(m.prior_specific.p_star[[0, 2], :, 1] == 0)


def model_for_swaps(n_specific_factors, slot_genes):
    """A briefly trained model with hand-set masks for the move check's swaps: shared_0 selects
    genes 0-9, shared_1 genes 30-35 (in use, so not free); ``slot_genes`` maps (study, slot) to
    the genes that slot selects; every W entry 0.5; and the check's gene-level effects of
    shared_0: genes 0-4 driven in study_2 only, genes 5-9 in study_1 only."""
    torch.manual_seed(0)
    adata = small_multistudy()
    SparseVAE.setup_anndata(adata, study_key="study")
    model = SparseVAE(adata, n_factors=2, n_specific_factors=n_specific_factors, n_hidden=8)
    model.train(max_epochs=1, batch_size=64, move_confined=False, **QUIET)
    m = model.module
    with torch.no_grad():
        m.prior.p_star.zero_()
        m.prior.p_star[:10, 0] = 0.99
        m.prior.p_star[30:36, 1] = 0.99
        m.prior.eta.fill_(0.3)
        m.decoder.W.fill_(0.5)
        m.prior_specific.p_star.zero_()
        for (study, slot), genes in slot_genes.items():
            m.prior_specific.p_star[study, genes, slot] = 0.99
        m.prior_specific.eta.fill_(0.3)
        m.decoder.W_specific.fill_(0.5)
    effects = np.ones((2, 3, 40))
    effects[0, 2, :5] = 10.0
    effects[0, 1, 5:10] = 10.0
    return model, m, effects


def test_mover_swaps_a_repeated_slot_with_a_factor_of_study_programs(monkeypatch):
    """No free factor: a slot repeated in every study and a shared factor that carries one
    study's program on some genes and another study's on others exchange roles, gene by gene."""
    from sparsevae.model import _reassign

    # slot 0: genes 20-27 in every study (a repeated program)
    model, m, effects = model_for_swaps(1, {(s, 0): slice(20, 28) for s in range(3)})
    with torch.no_grad():
        m.decoder.W_specific[:, 22, 0] = 2.0  # a marked entry, to follow the slot's program

    def fake_effects(module, z, codes, factors):
        return effects[factors]

    monkeypatch.setattr(_reassign, "within_study_effects", fake_effects)
    moves = _reassign.MoveConfinedFactors(model).move(m)
    assert moves == [
        {"kind": "swap_split", "factor": "shared_0", "studies": "study_1;study_2",
         "n_genes": 10, "slot": 0}
    ]  # fmt: skip
    # shared_0 now carries the slot's program; each study's slot the factor's genes of that study
    assert torch.all(m.prior.p_star[20:28, 0] > 0.9) and torch.all(m.prior.p_star[:10, 0] == 0)
    assert float(m.decoder.W[22, 0]) == 2.0
    assert torch.all(m.decoder.W[:10, 0] == 0)  # the genes handed to the slots stay there
    spec = m.prior_specific.p_star
    assert torch.all(spec[2, :5, 0] > 0.9) and torch.all(spec[2, 5:, 0] == 0)
    assert torch.all(spec[1, 5:10, 0] > 0.9) and torch.all(spec[1, :5, 0] == 0)
    assert torch.all(spec[1, 10:, 0] == 0) and torch.all(spec[0, :, 0] == 0)
    assert float(m.prior_specific.eta[0, 0]) < 0.3  # study_0's slot takes nothing: switched off
    model.moved_factors_ = [{**moves[0], "epoch": 7}]  # as train() records it
    assert (
        "swapped by gene: shared factor shared_0 carried programs of study_1, study_2 on 10 genes; "
        "it exchanged roles with specific_0 (each study's slot took the factor's genes of that "
        "study, the factor the slot's program)"
    ) in model.training_summary()


def test_mover_swaps_a_factor_of_several_studies_programs_with_a_slot_that_is_not_repeated(
    monkeypatch,
):
    """No free factor and no repeated slot: a shared factor that carries the programs of two
    studies, gene by gene, swaps with the slot whose gene sets overlap most across studies; the
    factor does not take back the genes it hands over. With one study's program only, nothing
    moves."""
    from sparsevae.model import _reassign

    # slot 0: pieces of one program, overlapping across studies (Jaccard 0-0.33, under the
    # repeated-program check's 0.5); slot 1: each study's own genes (no overlap)
    slots = {(0, 0): slice(0, 4), (1, 0): slice(2, 6), (2, 0): slice(12, 16),
             (0, 1): slice(16, 18), (1, 1): slice(18, 20), (2, 1): slice(36, 38)}  # fmt: skip

    model, m, effects = model_for_swaps(2, slots)
    monkeypatch.setattr(_reassign, "within_study_effects", lambda module, z, c, f: effects[f])
    assert sparsevae.tl.check_shared_specific(model).repeated.empty  # no repeated slot
    moves = _reassign.MoveConfinedFactors(model).move(m)
    assert moves == [
        {"kind": "swap_split", "factor": "shared_0", "studies": "study_1;study_2",
         "n_genes": 10, "slot": 0}
    ]  # fmt: skip
    spec = m.prior_specific.p_star
    assert torch.all(spec[2, :5, 0] > 0.9) and torch.all(spec[2, 5:, 0] == 0)
    assert torch.all(spec[1, 5:10, 0] > 0.9) and torch.all(spec[1, :5, 0] == 0)
    assert torch.all(m.prior.p_star[:10, 0] == 0) and torch.all(m.decoder.W[:10, 0] == 0)
    assert torch.all(m.prior.p_star[12:16, 0] > 0.3)  # the slot's pieces, as a mean over studies
    assert torch.all(spec[0, 16:18, 1] > 0.9) and torch.all(spec[2, 36:38, 1] > 0.9)  # slot 1 stays

    model, m, effects = model_for_swaps(2, slots)
    effects[0, 1, 5:10] = 1.0  # one study's program only: not this move's case
    assert _reassign.MoveConfinedFactors(model).move(m) == []


def test_moves_between_masks_refuse_bad_indices_and_models():
    from sparsevae.module import SparseVAEModule

    module = SparseVAEModule(n_input=6, n_factors=2, n_hidden=4, n_specific_factors=1, n_studies=2)
    genes = torch.ones(6, dtype=torch.bool)
    with pytest.raises(ValueError, match="factor, study or slot out of range: 2, 0, 0"):
        module.move_to_specific(factor=2, study=0, slot=0)
    with pytest.raises(ValueError, match="factor, study or slot out of range: 0, 2, 0"):
        module.split_to_specific(factor=0, study=2, slot=0, genes=genes)
    with pytest.raises(ValueError, match="factor, study or slot out of range: 0, 0, 1"):
        module.swap_roles(factor=0, study=0, slot=1)
    with pytest.raises(ValueError, match="factor or slot out of range: 0, 1"):
        module.move_to_shared(slot=1, factor=0)
    with pytest.raises(ValueError, match="genes must be a boolean tensor of shape"):
        module.swap_roles_by_gene(factor=0, slot=0, genes=genes)
    by_study = torch.zeros(2, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"drop_from_factor must be a boolean tensor of shape"):
        module.swap_roles_by_gene(factor=0, slot=0, genes=by_study, drop_from_factor=by_study)
    single = SparseVAEModule(n_input=6, n_factors=2, n_hidden=4)
    with pytest.raises(ValueError, match="split_to_specific needs a multi-study module"):
        single.split_to_specific(factor=0, study=0, slot=0, genes=genes)


def test_mover_checks_each_epoch_and_settles_after_a_move(monkeypatch):
    from types import SimpleNamespace

    from sparsevae.model._reassign import MoveConfinedFactors

    mover = MoveConfinedFactors(model=None)  # type: ignore[arg-type]
    found = {
        81: [{"kind": "to_specific", "factor": "shared_1"}],
        82: [{"kind": "swap"}],  # inside the pause: not looked for
        87: [{"kind": "split_to_specific", "factor": "shared_2"}],
        95: [{"kind": "swap"}],  # after the last check epoch
    }
    checked = []

    def fake_move(module):
        checked.append(module.epoch)
        return found.get(module.epoch, [])

    monkeypatch.setattr(mover, "move", fake_move)
    trainer = SimpleNamespace(max_epochs=100)
    for epoch in range(100):
        pl_module = SimpleNamespace(
            current_epoch=epoch,
            schedule=SimpleNamespace(full_prior_epoch=60),
            module=SimpleNamespace(epoch=epoch),
        )
        mover.on_train_epoch_end(trainer, pl_module)
    # every epoch from the move epoch; after a move a pause of 4 epochs (82-85, 88-91); no check
    # in the last quarter of the 40 full-prior epochs (90-99), left to refit the masks
    assert checked == [79, 80, 81, 86, 87]
    assert mover.moves == [
        {"kind": "to_specific", "factor": "shared_1", "epoch": 81},
        {"kind": "split_to_specific", "factor": "shared_2", "epoch": 87},
    ]


def test_a_check_that_moves_nothing_leaves_the_fit_unchanged(monkeypatch):
    """The move check reads the data between epochs; it must not change training's random draws."""
    import scvi

    from sparsevae.model._reassign import MoveConfinedFactors

    checked = []
    move = MoveConfinedFactors.move

    def spy(self, module):
        checked.append(move(self, module))
        return checked[-1]

    monkeypatch.setattr(MoveConfinedFactors, "move", spy)
    weights = []
    for move_confined in (False, True):
        scvi.settings.seed = 0
        adata = small_multistudy()
        SparseVAE.setup_anndata(adata, study_key="study")
        model = SparseVAE(adata, n_factors=2, n_specific_factors=1, n_hidden=8)
        model.train(
            max_epochs=12, batch_size=32, move_confined=move_confined,
            kl_free_bits_specific=0.0,  # a fit of these data where the check finds nothing to move
            **QUIET,
        )  # fmt: skip
        weights.append(model.module.decoder.W.detach().clone())
    assert len(checked) >= 2 and not any(checked)  # checked in several epochs, nothing moved
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)


def test_free_bits_in_the_loss_while_the_prior_warms_up(monkeypatch):
    """Free bits: a factor's KL below the threshold costs nothing in the training objective,
    the reported KL is unchanged, evaluation ignores it; the plan turns it on (when asked) only
    until the mask prior is at full strength, and it is off by default."""
    from torch.distributions import kl_divergence

    from sparsevae.train import SparseVAETrainingPlan

    torch.manual_seed(0)
    adata = small_multistudy()
    SparseVAE.setup_anndata(adata, study_key="study")
    model = SparseVAE(adata, n_factors=2, n_specific_factors=1, n_hidden=8)
    m = model.module
    loader = model._make_data_loader(adata=adata, batch_size=64)
    batch = next(iter(loader))
    m.train()
    torch.manual_seed(1)
    inf, gen, plain = m(batch)
    per_factor = kl_divergence(inf["qz"], gen["pz"])
    reconst = plain.reconstruction_loss["reconstruction_loss"]
    m.free_bits = 5.0  # above every factor's KL: the KL term is 5 nats per factor
    free = m.loss(batch, inf, gen)
    expected = plain.loss - per_factor.sum(-1).mean() + 5.0 * per_factor.shape[1]
    assert bool((per_factor.mean(0) < 5.0).all())
    torch.testing.assert_close(free.loss, expected)
    torch.testing.assert_close(free.kl_local["kl_local"], plain.kl_local["kl_local"])
    torch.testing.assert_close(reconst, free.reconstruction_loss["reconstruction_loss"])
    m.free_bits, m.free_bits_specific = 0.0, 5.0  # the specific factor's KL term only
    specific = m.loss(batch, inf, gen)
    k = m.n_factors
    expected = plain.loss - per_factor[:, k:].sum(-1).mean() + 5.0 * (per_factor.shape[1] - k)
    torch.testing.assert_close(specific.loss, expected)
    m.eval()
    torch.testing.assert_close(m.loss(batch, inf, gen).loss, plain.loss)  # evaluation: plain ELBO
    m.free_bits = m.free_bits_specific = 0.0

    seen = {}
    epoch_start = SparseVAETrainingPlan.on_train_epoch_start

    def spy(plan):
        epoch_start(plan)
        seen[plan.current_epoch] = (plan.module.free_bits, plan.module.free_bits_specific)

    monkeypatch.setattr(SparseVAETrainingPlan, "on_train_epoch_start", spy)
    model.train(
        max_epochs=10, batch_size=64, kl_free_bits=0.5, kl_free_bits_specific=0.0,
        move_confined=False, **QUIET,
    )  # fmt: skip
    full = model.trainer.lightning_module.schedule.full_prior_epoch  # 2 + 4 for 10 epochs
    assert seen == {e: (0.5, 0.0) if e < full else (0.0, 0.0) for e in range(10)}
    assert m.free_bits == m.free_bits_specific == 0.0
    seen.clear()
    model.train(max_epochs=10, batch_size=64, move_confined=False, **QUIET)
    # the default: free bits on the specific factors only, until the full prior
    assert seen == {e: (0.0, 0.5) if e < full else (0.0, 0.0) for e in range(10)}
    with pytest.raises(ValueError, match="kl_free_bits must be a number >= 0"):
        model.train(max_epochs=1, kl_free_bits=-1.0, **QUIET)
    with pytest.raises(ValueError, match="kl_free_bits_specific must be a number >= 0"):
        model.train(max_epochs=1, kl_free_bits_specific=-1.0, **QUIET)

    single = small_counts()
    SparseVAE.setup_anndata(single)
    seen.clear()
    SparseVAE(single, n_factors=2, n_hidden=8).train(max_epochs=3, batch_size=64, **QUIET)
    assert seen == {e: (0.0, 0.0) for e in range(3)}  # single-study models: off


def test_count_models_default_to_gates_and_prior_cells():
    from sparsevae.module import COUNT_DEFAULTS

    adata = small_multistudy()
    SparseVAE.setup_anndata(adata, study_key="study")
    model = SparseVAE(adata, n_factors=2, n_specific_factors=1)
    assert model.likelihood == "nb"
    assert model.module.gate_shared and model.module.gate_specific
    assert model.module.prior_cells == COUNT_DEFAULTS["prior_cells"] == 200
    # recorded as the model's options, so that a saved model is rebuilt with them
    assert model.init_params_["kwargs"]["module_kwargs"]["prior_cells"] == 200
    # what the user passes wins: the exact MAP weight without gates
    plain = SparseVAE(adata, n_factors=2, n_specific_factors=1, spike_gate=False, prior_cells=None)
    assert not plain.module.spike_gate and plain.module.prior_cells is None
    only = SparseVAE(adata, n_factors=2, n_specific_factors=1, spike_gate="specific")
    assert not only.module.gate_shared and only.module.gate_specific
    assert only.module.prior_cells == 200
    # single-study models on counts too; the Gaussian likelihood and the VAE keep the module's
    single = small_multistudy()
    SparseVAE.setup_anndata(single)
    one = SparseVAE(single, n_factors=2)
    assert one.module.gate_shared and one.module.prior_cells == 200
    assert not SparseVAE(single, n_factors=2, mask=None).module.spike_gate
    logged = small_multistudy()
    logged.X = sp.csr_matrix(logged.X).log1p().astype(np.float32)
    SparseVAE.setup_anndata(logged, study_key="study")
    gaussian = SparseVAE(logged, n_factors=2, n_specific_factors=1)
    assert gaussian.likelihood == "gaussian"
    assert not gaussian.module.spike_gate and gaussian.module.prior_cells is None


def test_a_move_restarts_the_average_that_decides_the_masks():
    """Columns moved between the shared and specific masks are new factors: average anew."""
    from sparsevae.module import SparseVAEModule
    from sparsevae.train import SparseVAETrainingPlan

    torch.manual_seed(0)
    module = SparseVAEModule(n_input=12, n_factors=3, n_hidden=8, n_specific_factors=2, n_studies=2)
    plan = SparseVAETrainingPlan(module)
    with torch.no_grad():
        module.decoder.W_specific[:, :, 1] = 0.0  # slot 1 unused in every study
    plan._add_to_average()
    plan._add_to_average()
    assert plan._n_averaged == 2 and module.mask_edits == 0
    module.move_to_specific(factor=2, study=1, slot=1)
    assert module.mask_edits == 1
    plan._add_to_average()
    assert plan._n_averaged == 1
    plan._decide_masks()
    shared, specific = module.mask_priors()
    assert shared.decided and specific.decided
    assert torch.all(shared.p_star[:, 2] == 0)  # the moved column, as the move left it
