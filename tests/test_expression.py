"""scvi-tools' expression API on SparseVAE, checked against a plain computation; the summary."""

import numpy as np
import pandas as pd
import pytest
import scvi
import torch

import sparsevae
from sparsevae import SparseVAE

from .conftest import QUIET, small_counts


@pytest.fixture(scope="module")
def model():
    scvi.settings.seed = 0
    adata = small_counts(n_cells=150, n_genes=30)
    adata.obs["group"] = np.where(np.arange(adata.n_obs) < 60, "a", "b")  # no real difference
    SparseVAE.setup_anndata(adata)
    m = SparseVAE(adata, n_factors=2, n_hidden=8)
    m.train(max_epochs=60, train_size=0.9, **QUIET)
    return m


def plain_mu(model, z: np.ndarray, adata) -> np.ndarray:
    """Expected counts decoded by hand from factors ``z`` (the module's generative model)."""
    module = model.module
    with torch.no_grad():
        zt = torch.as_tensor(z, dtype=torch.float32)
        eta = module.decoder(zt)[..., 0]
        library = torch.as_tensor(np.asarray(adata.X.sum(1)).reshape(-1, 1), dtype=torch.float32)
        log_mu = eta + torch.log(library)
        if module.composition_offset:
            log_mu = log_mu + module.offset_net(zt)
        return torch.exp(log_mu).numpy()


def test_normalized_expression_is_the_decoded_mean_per_cell(model):
    adata = model.adata
    z = model.get_latent_representation()
    mu = plain_mu(model, z, adata)
    rho_plain = mu / mu.sum(1, keepdims=True)
    # many posterior samples average to about the decoded posterior mean
    rho = model.get_normalized_expression(n_samples=200)
    assert isinstance(rho, pd.DataFrame)
    assert list(rho.columns) == list(adata.var_names) and list(rho.index) == list(adata.obs_names)
    np.testing.assert_allclose(rho.sum(1), 1.0, rtol=1e-5)
    assert np.corrcoef(np.log(rho.to_numpy()).ravel(), np.log(rho_plain).ravel())[0, 1] > 0.99
    # library_size scales rho; "latent" gives counts at the observed library size
    one = model.get_normalized_expression(
        indices=[0, 1], library_size=1e4, gene_list=[adata.var_names[3]]
    )
    assert one.shape == (2, 1) and float(one.sum().sum()) > 0
    lat = model.get_normalized_expression(library_size="latent", n_samples=200)
    assert np.corrcoef(lat.to_numpy().ravel(), mu.ravel())[0, 1] > 0.95
    draws = model.get_normalized_expression(n_samples=3, return_mean=False)
    assert draws.shape == (3, adata.n_obs, adata.n_vars)
    overall = model.get_normalized_expression(indices=np.arange(10), n_samples_overall=25)
    assert overall.shape == (25, adata.n_vars)


def test_differential_expression_change_mode(model):
    z = model.get_latent_representation()
    model.adata.obs["zgroup"] = np.where(z[:, 0] > np.median(z[:, 0]), "a", "b")
    de = model.differential_expression(groupby="zgroup", group1="a", mode="change", delta=0.1)
    for col in ["proba_de", "lfc_mean", "bayes_factor", "is_de_fdr_0.05", "raw_mean1"]:
        assert col in de.columns
    assert set(de.index) == set(model.adata.var_names)
    # the sign of the LFC follows the decoded means of the two groups
    rho = model.get_normalized_expression(n_samples=50).to_numpy()
    a = model.adata.obs["zgroup"].to_numpy() == "a"
    lfc_plain = np.log2(rho[a].mean(0) + 1e-4) - np.log2(rho[~a].mean(0) + 1e-4)
    lfc = de.loc[model.adata.var_names, "lfc_mean"].to_numpy()
    strong = np.abs(lfc_plain) > 0.5
    assert strong.sum() >= 3
    assert np.mean(np.sign(lfc[strong]) == np.sign(lfc_plain[strong])) >= 0.9
    vanilla = model.differential_expression(groupby="group", group1="a")
    assert "bayes_factor" in vanilla.columns
    # no genes differ between cells split at random (posterior probabilities stay uncertain)
    null = model.differential_expression(groupby="group", group1="a", mode="change", delta=0.5)
    assert null["is_de_fdr_0.05"].mean() < de["is_de_fdr_0.05"].mean()


def test_posterior_predictive_and_likelihood_parameters(model):
    x = model.posterior_predictive_sample(n_samples=2)
    assert x.shape == (model.adata.n_obs, model.adata.n_vars, 2)
    dense = x.todense()
    assert np.all(dense >= 0) and np.all(dense == np.round(dense))
    params = model.get_likelihood_parameters(indices=[0, 1, 2])
    assert params["mean"].shape == (3, model.adata.n_vars)
    assert params["dispersions"].shape == (3, model.adata.n_vars)
    # the predictive mean is near the data's mean per gene
    ratio = dense.mean((0, 2)).sum() / np.asarray(model.adata.X.mean(0)).sum()
    assert 0.7 < ratio < 1.4


def test_loadings_are_the_signed_link_effects(model):
    loadings = model.get_loadings()
    assert loadings.shape == (model.adata.n_vars, 2)
    pd.testing.assert_frame_equal(loadings, model.get_gene_effects(scale="link"))


def test_unsupported_options_are_refused_clearly(model):
    with pytest.raises(NotImplementedError, match="batch covariate"):
        model.get_normalized_expression(transform_batch="x")
    with pytest.raises(NotImplementedError, match="weights"):
        model.get_normalized_expression(weights="importance")
    with pytest.raises(ValueError, match="library_size"):
        model.get_normalized_expression(library_size=-1)
    with pytest.raises(NotImplementedError, match="latent library"):
        model.get_latent_library_size()


def test_gaussian_models_name_the_alternative():
    adata = small_counts(n_cells=60, n_genes=40)
    adata.X = np.log1p(adata.X.toarray().astype(np.float32))
    SparseVAE.setup_anndata(adata)
    m = SparseVAE(adata, n_factors=2, n_hidden=8)
    m.train(max_epochs=2, **QUIET)
    for call in (m.get_normalized_expression, m.posterior_predictive_sample):
        with pytest.raises(NotImplementedError, match="rank_genes_groups"):
            call()
    with pytest.raises(NotImplementedError, match="gaussian"):
        m.differential_expression(groupby=None, idx1=[0, 1], idx2=[2, 3])


def test_training_summary_and_validation_curves(model):
    # with validation cells, the history has validation curves every epoch
    assert len(model.history["elbo_validation"].dropna()) == 60
    text = model.training_summary()
    assert text.startswith("SparseVAE training: 60 epochs")
    assert "validation" in text and "identifiable" in text and "switched off" in text
    assert "checks: no problem found" in text
    # the counts follow the package's rules (switched off, anchors): one planted program is
    # found here, the other factor is switched off
    report = sparsevae.tl.identifiability_report(model)
    n_id = int(report.factors["identifiable"].sum())
    assert f"{n_id} identifiable" in text


def test_tl_differential_expression_in_scanpy_layout(model):
    import scanpy as sc

    adata = model.adata
    z = model.get_latent_representation()
    adata.obs["zgroup"] = np.where(z[:, 0] > np.median(z[:, 0]), "a", "b")
    table = sparsevae.tl.differential_expression(model, adata, "zgroup", groups=["a"])
    assert set(table["group"]) == {"a"} and len(table) == adata.n_vars
    df = sc.get.rank_genes_groups_df(adata, group="a", key="rank_genes_groups_sparsevae")
    assert list(df.columns[:5]) == ["names", "scores", "logfoldchanges", "pvals", "pvals_adj"]
    assert df["scores"].is_monotonic_decreasing or df["pvals"].is_monotonic_increasing
    assert np.all(np.diff(df["pvals_adj"].to_numpy()) >= -1e-12)  # expected FDR grows down
    with pytest.raises(ValueError, match="Unknown groups"):
        sparsevae.tl.differential_expression(model, adata, "zgroup", groups=["c"])


def test_factor_activity_finds_the_factor_that_splits_the_groups(model):
    adata = model.adata.copy()
    model.write_results(adata, effects=False)
    z = adata.obsm["X_sparsevae"]
    adata.obs["zgroup"] = pd.Categorical(np.where(z[:, 0] > np.median(z[:, 0]), "a", "b"))
    act = sparsevae.tl.factor_activity(adata, "zgroup", include_off=True)
    top = act[act["group"] == "a"].iloc[0]
    assert top["factor"] == "factor_0" and top["effect"] > 1 and top["auroc"] > 0.9
    assert top["pval_adj"] < 1e-6
    # switched-off factors are left out by default
    report = sparsevae.tl.identifiability_report(adata)
    off = set(report.factors.loc[report.factors["switched_off"], "factor"])
    default = sparsevae.tl.factor_activity(adata, "zgroup")
    assert not off & set(default["factor"])
    vs_b = sparsevae.tl.factor_activity(adata, "zgroup", groups=["a"], reference="b")
    assert set(vs_b["group"]) == {"a"}
    with pytest.raises(KeyError, match="groupby"):
        sparsevae.tl.factor_activity(adata, "nope")
