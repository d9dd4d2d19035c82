"""Priors of the factors: the iVAE's conditional prior p(z | u) and the Gaussian-mixture prior."""

import numpy as np
import pandas as pd
import pytest
import scvi
import torch
from torch.distributions import Normal, kl_divergence

import sparsevae
from sparsevae import SparseVAE
from sparsevae.priors import ConditionalPrior, MixturePrior

from .conftest import QUIET, small_counts


def counts_with_condition(n_cells=150, seed=0):
    adata = small_counts(n_cells=n_cells, n_genes=30, seed=seed)
    rng = np.random.default_rng(seed)
    adata.obs["condition"] = pd.Categorical(rng.choice(["ctrl", "stim", "other"], n_cells))
    adata.obs["time"] = rng.uniform(0, 10, n_cells)
    return adata


# ---------------------------------------------------------------- priors on their own
def test_conditional_prior_starts_at_standard_normal_and_kl_matches():
    prior = ConditionalPrior(3, n_categories=4)
    u = torch.tensor([[0], [3], [1]])
    pz = prior(u)
    torch.testing.assert_close(pz.loc, torch.zeros(3, 3))
    torch.testing.assert_close(pz.scale, torch.ones(3, 3))
    with torch.no_grad():
        prior.mean[1] = 2.0
        prior.log_var[1] = np.log(4.0)
    pz = prior(u)
    torch.testing.assert_close(pz.loc[2], torch.full((3,), 2.0))
    torch.testing.assert_close(pz.scale[2], torch.full((3,), 2.0))
    qz = Normal(torch.zeros(3, 3), torch.ones(3, 3))
    # KL(N(0,1) || N(2, 4)) = log 2 + (1 + 4) / 8 - 1/2 per factor
    expected = np.log(2.0) + 5 / 8 - 0.5
    torch.testing.assert_close(
        kl_divergence(qz, pz)[2], torch.full((3,), float(expected)), rtol=1e-5, atol=1e-6
    )


def test_continuous_conditional_prior_depends_on_u():
    prior = ConditionalPrior(2, n_categories=None, u_loc=5.0, u_scale=2.0)
    with torch.no_grad():
        prior.net[-1].bias.normal_()
        prior.net[-1].weight.normal_()
    a = prior(torch.tensor([[1.0]])).loc
    b = prior(torch.tensor([[9.0]])).loc
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="n_categories must be >= 2"):
        ConditionalPrior(2, n_categories=1)


def test_mixture_prior_responsibilities_and_dirichlet_penalty():
    prior = MixturePrior(3, 2, alpha=2.0)
    with torch.no_grad():
        prior.prior_means.copy_(torch.tensor([[-5.0, 0.0], [0.0, 0.0], [5.0, 0.0]]))
        prior.prior_log_scales.zero_()
    z = torch.tensor([[-5.0, 0.1], [0.2, 0.0], [4.8, -0.1]])
    r = prior.responsibilities(z)
    torch.testing.assert_close(r.sum(1), torch.ones(3))
    assert r.argmax(1).tolist() == [0, 1, 2]
    flat = float(prior.dirichlet_penalty().detach())
    with torch.no_grad():
        prior.prior_logits.copy_(torch.tensor([5.0, 0.0, -5.0]))  # one weight near zero
    assert float(prior.dirichlet_penalty()) > flat
    assert float(MixturePrior(3, 2, alpha=1.0).dirichlet_penalty()) == 0.0
    with pytest.raises(ValueError, match="alpha must be >= 1"):
        MixturePrior(3, 2, alpha=0.5)


def test_mixture_components_placed_on_clusters():
    gen = torch.Generator().manual_seed(0)
    centers = torch.tensor([[-4.0, 0.0], [0.0, 4.0], [4.0, 0.0]])
    z = torch.cat([c + 0.3 * torch.randn(50, 2, generator=gen) for c in centers])
    # the mixture lives in the frame where the factors have mean 0 and variance 1
    centers = (centers - z.mean(0)) / z.std(0, unbiased=False)
    z = (z - z.mean(0)) / z.std(0, unbiased=False)
    prior = MixturePrior(3, 2)
    prior.init_components(z)
    assert bool(prior.initialised)
    found = prior.prior_means.detach()
    dist = torch.cdist(centers, found)
    assert float(dist.min(1).values.max()) < 0.5  # every true centre has a component
    labels = prior.responsibilities(z).argmax(1)
    assert len(set(labels.tolist())) == 3


# ---------------------------------------------------------------- conditional prior in the model
@pytest.mark.parametrize("key", ["condition", "time"])
def test_conditional_prior_trains_saves_loads_and_embeds_new_cells(key, tmp_path):
    scvi.settings.seed = 0
    adata = counts_with_condition()
    SparseVAE.setup_anndata(adata, auxiliary_key=key)
    model = SparseVAE(adata, n_factors=2, n_hidden=8, latent_prior="conditional")
    model.train(max_epochs=5, **QUIET)
    assert model.module.latent_prior == "conditional"
    z = model.get_latent_representation()
    assert np.all(np.isfinite(z))
    model.save(tmp_path / "m", save_anndata=True)
    loaded = SparseVAE.load(tmp_path / "m")
    np.testing.assert_allclose(loaded.get_latent_representation(), z, atol=1e-5)
    new = adata[:40].copy()
    assert model.get_latent_representation(new).shape == (40, 2)


def test_conditional_prior_learns_per_category_means():
    """Cells of condition 'stim' have one program switched up: its prior mean moves."""
    scvi.settings.seed = 0
    adata = counts_with_condition(n_cells=200)
    stim = (adata.obs["condition"] == "stim").to_numpy()
    X = adata.X.toarray() if hasattr(adata.X, "toarray") else np.array(adata.X)
    X[np.ix_(stim, np.arange(10))] *= 6  # a strong stim-only program on 10 genes
    adata.X = X
    SparseVAE.setup_anndata(adata, auxiliary_key="condition")
    model = SparseVAE(adata, n_factors=3, n_hidden=16, latent_prior="conditional")
    model.train(max_epochs=60, batch_size=32, **QUIET)
    z = model.get_latent_representation()
    prior = model.module.conditional_prior
    cats = model.auxiliary_categories
    means = prior.mean.detach().numpy()
    post = np.stack([z[adata.obs["condition"].astype(str) == c].mean(0) for c in cats])
    # the prior's stim-vs-ctrl shift follows that of the posterior means
    shift_prior = means[cats.index("stim")] - means[cats.index("ctrl")]
    shift_post = post[cats.index("stim")] - post[cats.index("ctrl")]
    assert np.abs(shift_prior).max() > 0.5, means
    k = int(np.abs(shift_post).argmax())
    assert np.sign(shift_prior[k]) == np.sign(shift_post[k]), (means, post)
    assert np.corrcoef(shift_prior, shift_post)[0, 1] > 0.8, (means, post)


def test_encode_auxiliary_gives_the_encoder_u():
    adata = counts_with_condition()
    SparseVAE.setup_anndata(adata, auxiliary_key="condition")
    model = SparseVAE(
        adata, n_factors=2, n_hidden=8, latent_prior="conditional", encode_auxiliary=True
    )
    first = model.module.encoder.encoder.fc_layers[0][0]
    assert first.in_features == adata.n_vars + 3
    model.train(max_epochs=2, **QUIET)
    assert model.get_latent_representation().shape == (adata.n_obs, 2)


def test_conditional_prior_combines_with_studies_and_moves_keep_the_function():
    from sparsevae.module import SparseVAEModule

    torch.manual_seed(0)
    module = SparseVAEModule(
        n_input=12, n_factors=3, n_hidden=8, n_specific_factors=2, n_studies=2,
        latent_prior="conditional", n_auxiliary_categories=3,
    )  # fmt: skip
    module.eval()
    with torch.no_grad():
        module.decoder.W_specific[:, :, 1] = 0.0
        module.offset_net[0].weight[:, 4] = 0.0
        module.conditional_prior.mean.normal_()
    u = torch.tensor([[0], [1], [2], [1]])
    before = module.conditional_prior(u).loc[:, 2].clone()
    module.move_to_specific(factor=2, study=1, slot=1)
    after = module.conditional_prior(u)
    torch.testing.assert_close(after.loc[:, 4], before)  # the slot took the factor's prior
    torch.testing.assert_close(after.loc[:, 2], torch.zeros(4))  # the factor is N(0, 1)


def test_conditional_multistudy_model_trains():
    scvi.settings.seed = 0
    adata = counts_with_condition()
    adata.obs["study"] = np.where(np.arange(adata.n_obs) % 2 == 0, "s0", "s1")
    SparseVAE.setup_anndata(adata, study_key="study", auxiliary_key="condition")
    model = SparseVAE(
        adata, n_factors=2, n_specific_factors=1, n_hidden=8, latent_prior="conditional",
        encode_auxiliary=True,
    )  # fmt: skip
    model.train(max_epochs=6, **QUIET)  # the move check (an inference pass with u) runs too
    assert model.get_latent_representation().shape == (adata.n_obs, 3)


def test_conditional_prior_with_gaussian_likelihood_and_no_mask():
    scvi.settings.seed = 0
    adata = sparsevae.datasets.simulate_ivae(n_per_segment=20, n_segments=5, seed=0)
    SparseVAE.setup_anndata(adata, auxiliary_key="segment")
    model = SparseVAE(adata, n_factors=5, n_hidden=16, mask=None, latent_prior="conditional")
    assert model.likelihood == "gaussian"
    model.train(max_epochs=3, **QUIET)
    score = sparsevae.tl.mcc(model.get_latent_representation(), adata.obsm["true_factors"])
    assert 0 <= score["mcc"] <= 1


# ---------------------------------------------------------------- bad input
def test_conditional_prior_bad_input_leaves_adata_unchanged():
    adata = counts_with_condition()
    before = adata.copy()
    with pytest.raises(KeyError, match="not a column"):
        SparseVAE.setup_anndata(adata, auxiliary_key="nope")
    adata.obs["with_nan"] = adata.obs["time"].where(np.arange(adata.n_obs) > 3)
    with pytest.raises(ValueError, match="missing values"):
        SparseVAE.setup_anndata(adata, auxiliary_key="with_nan")
    adata.obs["single"] = "a"
    with pytest.raises(ValueError, match="single category"):
        SparseVAE.setup_anndata(adata, auxiliary_key="single")
    adata.obs["flat"] = 1.0
    with pytest.raises(ValueError, match="constant"):
        SparseVAE.setup_anndata(adata, auxiliary_key="flat")
    assert "_scvi_uuid" not in adata.uns and "_scvi_manager_uuid" not in adata.uns
    pd.testing.assert_frame_equal(adata.obs[before.obs.columns], before.obs, check_dtype=False)


def test_conditional_prior_needs_u_and_u_needs_the_conditional_prior():
    adata = counts_with_condition()
    SparseVAE.setup_anndata(adata)
    with pytest.raises(ValueError, match="auxiliary_key"):
        SparseVAE(adata, n_factors=2, latent_prior="conditional")
    SparseVAE.setup_anndata(adata, auxiliary_key="condition")
    with pytest.raises(ValueError, match="only latent_prior='conditional' uses"):
        SparseVAE(adata, n_factors=2)
    with pytest.raises(ValueError, match="latent_prior must be one of"):
        SparseVAE(adata, n_factors=2, latent_prior="ivae")


def test_new_data_with_unseen_category_or_missing_u_refused():
    scvi.settings.seed = 0
    adata = counts_with_condition()
    SparseVAE.setup_anndata(adata, auxiliary_key="condition")
    model = SparseVAE(adata, n_factors=2, n_hidden=8, latent_prior="conditional")
    model.train(max_epochs=1, **QUIET)
    new = adata[:20].copy()
    new.obs["condition"] = "never_seen"
    with pytest.raises(ValueError, match="categories the model never saw"):
        model.get_latent_representation(new)
    new = adata[:20].copy()
    del new.obs["condition"]
    with pytest.raises(ValueError, match="lacks"):
        model.get_latent_representation(new)


# ---------------------------------------------------------------- mixture prior in the model
def clustered_gaussian(n_per=80, n_features=20, seed=0):
    import anndata

    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, size=(3, n_features))
    X = np.concatenate([c + rng.normal(0, 1, size=(n_per, n_features)) for c in centers])
    adata = anndata.AnnData(X.astype(np.float32))
    adata.obs["truth"] = np.repeat(["a", "b", "c"], n_per)
    return adata


def test_mixture_prior_finds_clusters_and_writes_them():
    from sklearn.metrics import adjusted_rand_score

    scvi.settings.seed = 0
    adata = clustered_gaussian()
    SparseVAE.setup_anndata(adata)
    model = SparseVAE(
        adata, n_factors=3, n_hidden=16, mask=None, latent_prior="mixture", n_components=3
    )
    model.train(max_epochs=100, **QUIET)
    assert bool(model.module.mixture_prior.initialised)
    probs = model.get_cluster_probabilities()
    assert probs.shape == (adata.n_obs, 3)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    ari = adjusted_rand_score(adata.obs["truth"], probs.to_numpy().argmax(1))
    assert ari > 0.9, ari
    weights = model.get_mixture_weights()
    assert abs(weights.sum() - 1) < 1e-5 and weights.min() > 0.1
    model.write_results(adata, effects=False)
    assert adata.obs["sparsevae_cluster"].dtype.name == "category"
    assert adata.obsm["sparsevae_cluster_probabilities"].shape == (adata.n_obs, 3)
    assert "mixture_weights" in adata.uns["sparsevae"]
    assert "mixture: 3 components, 3 holding cells" in model.training_summary()
    # a mixture whose other components sit far from every cell has collapsed: train() warns
    with torch.no_grad():
        model.module.mixture_prior.prior_means[1:] += 100.0
    with pytest.warns(UserWarning, match="in one of its 3 components"):
        model._warn_if_mixture_collapsed()


def test_sparse_mixture_model_on_counts_with_studies():
    scvi.settings.seed = 0
    adata = small_counts(n_cells=150, n_genes=30)
    adata.obs["study"] = np.where(np.arange(adata.n_obs) % 2 == 0, "s0", "s1")
    SparseVAE.setup_anndata(adata, study_key="study")
    model = SparseVAE(
        adata, n_factors=2, n_specific_factors=1, n_hidden=8, latent_prior="mixture",
        n_components=4,
    )  # fmt: skip
    model.train(max_epochs=10, **QUIET)
    probs = model.get_cluster_probabilities()
    assert probs.shape == (adata.n_obs, 4) and np.all(np.isfinite(probs.to_numpy()))


def test_mixture_prior_bad_input():
    adata = clustered_gaussian(n_per=10)
    SparseVAE.setup_anndata(adata)
    for bad in (1, 0, adata.n_obs + 1, True, 2.5):
        with pytest.raises(ValueError, match="n_components"):
            SparseVAE(adata, n_factors=2, latent_prior="mixture", n_components=bad)
    model = SparseVAE(adata, n_factors=2, n_hidden=8)
    with pytest.raises(ValueError, match="latent_prior='mixture'"):
        model.get_cluster_probabilities()
    mixture = SparseVAE(adata, n_factors=2, n_hidden=8, latent_prior="mixture", n_components=2)
    with pytest.raises(RuntimeError, match="trained"):
        mixture.get_cluster_probabilities()
