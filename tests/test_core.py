import math

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from anndata import AnnData

import sparsevae
from sparsevae import SparseVAE
from sparsevae.nn import MaskedDecoder
from sparsevae.priors import SpikeSlabLasso
from sparsevae.train import DivergenceError

from .conftest import QUIET


def small_counts(n_cells=120, n_genes=40, n_factors=2, seed=0):
    return sparsevae.datasets.simulate_programs(
        n_cells=n_cells,
        n_genes=n_genes,
        n_factors=n_factors,
        genes_per_program=15,
        n_shared_genes=2,
        seed=seed,
    )


# ----------------------------------------------------------------------------- decoder
@pytest.mark.parametrize("n_layers,n_output", [(1, 1), (2, 1), (3, 2)])
def test_batched_decoder_matches_gene_loop(n_layers, n_output):
    torch.manual_seed(0)
    dec = MaskedDecoder(23, 4, n_hidden=16, n_layers=n_layers, n_output=n_output)
    with torch.no_grad():
        dec.W.copy_(torch.randn_like(dec.W))
        dec.head_bias.normal_()
    z = torch.randn(9, 4)
    expected = dec.forward_loop(z)
    assert expected.shape == (9, 23, n_output)
    for max_chunk in (2**20, 16 * 9 * 5, 1):  # one chunk, several chunks, one gene per chunk
        dec.max_chunk_elements = max_chunk
        torch.testing.assert_close(dec(z), expected, atol=1e-5, rtol=1e-5)


def test_decoder_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    dec = MaskedDecoder(30, 3, n_hidden=8, n_layers=2, max_chunk_elements=8 * 5 * 7)
    z = torch.randn(5, 3, requires_grad=True)
    dec(z).square().sum().backward()
    g_plain = [p.grad.clone() for p in dec.parameters()] + [z.grad.clone()]
    dec.zero_grad()
    z.grad = None
    dec.max_saved_elements = 1  # force recomputation
    dec(z).square().sum().backward()
    g_ckpt = [p.grad for p in dec.parameters()] + [z.grad]
    for a, b in zip(g_plain, g_ckpt, strict=True):
        torch.testing.assert_close(a, b)


def test_decoder_gene_only_sees_its_mask_row():
    torch.manual_seed(0)
    dec = MaskedDecoder(5, 3, n_hidden=8)
    with torch.no_grad():
        dec.W.zero_()
        dec.W[0, 1] = 1.0
    z = torch.randn(6, 3)
    z2 = z.clone()
    z2[:, [0, 2]] = torch.randn(6, 2)  # change the factors gene 0 does not see
    torch.testing.assert_close(dec(z)[:, 0], dec(z2)[:, 0])


def test_composition_offset_is_one_number_per_cell():
    """Count likelihoods add c(z) to every gene's log mean: zero at the start, then the same shift
    for all genes of a cell, so log-ratios of genes that do not see a factor ignore it."""
    from sparsevae.module import SparseVAEModule

    torch.manual_seed(0)
    with_off = SparseVAEModule(6, n_factors=3, n_hidden=8)
    assert with_off.composition_offset  # default for counts
    without = SparseVAEModule(6, n_factors=3, n_hidden=8, composition_offset=False)
    without.load_state_dict(with_off.state_dict(), strict=False)
    assert not hasattr(without, "offset_net")
    assert not SparseVAEModule(6, n_factors=3, likelihood="gaussian").composition_offset
    z, lib = torch.randn(5, 3), torch.zeros(5, 1)
    torch.testing.assert_close(  # zero at initialisation
        with_off.generative(z, lib)["px"].mu, without.generative(z, lib)["px"].mu
    )
    with torch.no_grad():
        with_off.offset_net[-1].weight.normal_()
        with_off.decoder.W.zero_()
        with_off.decoder.W[:3, 0] = 1.0  # genes 0-2 see factor 0 only, genes 3-5 nothing
    z2 = z.clone()
    z2[:, 1:] = torch.randn(5, 2)  # change the factors no gene sees
    log_mu = with_off.generative(z, lib)["px"].mu.log()
    log_mu2 = with_off.generative(z2, lib)["px"].mu.log()
    shift = log_mu2 - log_mu
    assert shift.abs().min() > 1e-4  # the offset moves every gene of a cell ...
    torch.testing.assert_close(shift, shift[:, :1].expand_as(shift))  # ... by the same amount


def test_correlated_latent_prior():
    """latent_prior="correlated" learns a correlation matrix R for z ~ N(0, R): unit diagonal,
    identity at the start (then the KL equals the N(0, I) one); the default is N(0, I)."""
    from sparsevae.module import SparseVAEModule

    torch.manual_seed(0)
    corr = SparseVAEModule(6, n_factors=3, n_hidden=8, likelihood="gaussian",
                           latent_prior="correlated")  # fmt: skip
    normal = SparseVAEModule(6, n_factors=3, n_hidden=8, likelihood="gaussian")
    assert corr.latent_prior == "correlated" and normal.latent_prior == "normal"
    assert SparseVAEModule(6, n_factors=3, mask=None).latent_prior == "normal"
    with pytest.raises(ValueError, match="latent_prior"):
        SparseVAEModule(6, n_factors=3, latent_prior="laplace")
    normal.load_state_dict(corr.state_dict(), strict=False)
    x = torch.randn(5, 6)
    tensors = {"X": x}

    def kl(module):
        inf = module.inference(x)
        gen = module.generative(inf["z"], inf["library"])
        out = module.loss(tensors, inf, gen).kl_local
        return sum(out.values()) if isinstance(out, dict) else out

    torch.manual_seed(1)
    kl_corr = kl(corr)
    torch.manual_seed(1)
    torch.testing.assert_close(kl_corr, kl(normal))  # R = I at the start
    with torch.no_grad():
        corr.latent_tril.normal_()
    L = corr.latent_scale_tril()
    R = L @ L.T
    torch.testing.assert_close(torch.diagonal(R), torch.ones(3))
    assert torch.linalg.eigvalsh(R).min() > 0
    assert not torch.allclose(R, torch.eye(3))
    torch.manual_seed(1)
    assert not torch.allclose(kl(corr), kl_corr)  # the KL now uses R


def test_correlation_is_held_fixed_for_the_first_epochs():
    """train(n_epochs_fixed_correlation=N) keeps R = I (no update of its parameters) for the first
    N epochs; with 0 it is learned from the first step."""
    adata = sparsevae.datasets.simulate_moran2022(n_cells=200, rho=0.6, seed=0)
    SparseVAE.setup_anndata(adata)
    kw = {"likelihood": "gaussian", "n_factors": 2, "n_hidden": 8, "latent_prior": "correlated"}
    torch.manual_seed(0)
    held = SparseVAE(adata, **kw)
    held.train(max_epochs=3, n_epochs_fixed_correlation=3, **QUIET)
    assert torch.count_nonzero(held.module.latent_tril) == 0
    np.testing.assert_allclose(held.get_latent_correlation().to_numpy(), np.eye(2), atol=1e-6)
    assert held.module.correlation_on  # R is in use again after training
    assert held.trainer.lightning_module.n_epochs_fixed_correlation == 3
    torch.manual_seed(0)
    learned = SparseVAE(adata, **kw)
    learned.train(max_epochs=3, n_epochs_fixed_correlation=0, **QUIET)
    assert torch.count_nonzero(learned.module.latent_tril) > 0
    torch.manual_seed(0)
    default = SparseVAE(adata, **kw)
    default.train(max_epochs=2, **QUIET)
    assert default.trainer.lightning_module.n_epochs_fixed_correlation == 20
    with pytest.raises(ValueError, match="n_epochs_fixed_correlation"):
        default.train(max_epochs=1, n_epochs_fixed_correlation=-1, **QUIET)


def test_posterior_collapse_is_reported():
    """A model whose encoder outputs the prior for every cell (KL 0) warns after training; a
    healthy fit does not."""
    import warnings

    adata = small_counts()
    SparseVAE.setup_anndata(adata, layer="counts")
    model = SparseVAE(adata, n_factors=2, n_hidden=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no collapse warning on a healthy fit
        warnings.filterwarnings("ignore", message="(?!Posterior collapse)")
        model.train(max_epochs=10, **QUIET)
    enc = model.module.encoder
    with torch.no_grad():
        for layer in (enc.mean_encoder, enc.var_encoder):
            layer.weight.zero_()
            layer.bias.zero_()
    with pytest.warns(UserWarning, match="Posterior collapse.*n_epochs_kl_warmup"):
        model._warn_if_collapsed()
    # every factor switched off (mask in the spike, no gene selected): warned too
    with torch.no_grad():
        model.module.decoder.W.fill_(0.01)
        model.module.prior.p_star.fill_(0.01)
    with pytest.warns(UserWarning, match="Every factor was switched off.*n_epochs_kl_warmup"):
        model._warn_if_collapsed()


# ----------------------------------------------------------------------------- prior
def test_em_step_matches_hand_computation():
    W = torch.tensor([[0.0, 0.5], [2.0, -0.05], [-1.0, 30.0]])
    prior = SpikeSlabLasso(3, 2, lambda0=10.0, lambda1=1.0, a=2.0, b=5.0)
    eta0 = torch.tensor([0.3, 0.6])
    prior.eta.copy_(eta0)
    prior.em_step(W)
    p = np.zeros((3, 2))
    for j in range(3):
        for k in range(2):
            w = abs(float(W[j, k]))
            slab = float(eta0[k]) * 0.5 * 1.0 * math.exp(-1.0 * w)
            spike = (1 - float(eta0[k])) * 0.5 * 10.0 * math.exp(-10.0 * w)
            p[j, k] = slab / (slab + spike)
    np.testing.assert_allclose(prior.p_star.numpy(), p, rtol=1e-5, atol=1e-6)
    eta = (p.sum(0) + 2.0 - 1.0) / (2.0 + 5.0 + 3 - 2)
    np.testing.assert_allclose(prior.eta.numpy(), eta, rtol=1e-5)
    # penalty uses the new p*
    pen = ((1.0 * p + 10.0 * (1 - p)) * np.abs(W.numpy())).sum()
    assert float(prior.penalty(W)) == pytest.approx(pen, rel=1e-5)


def test_em_step_is_stable_for_huge_weights():
    prior = SpikeSlabLasso(2, 2)
    prior.em_step(torch.tensor([[1e4, 0.0], [-1e6, 1e-9]]))
    assert torch.isfinite(prior.p_star).all() and torch.isfinite(prior.eta).all()
    assert prior.p_star[0, 0] == pytest.approx(1.0)
    assert 0 < float(prior.eta.min()) and float(prior.eta.max()) < 1


def test_prior_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="lambda0"):
        SpikeSlabLasso(3, 2, lambda0=1.0, lambda1=2.0)


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("likelihood", ["nb", "zinb", "poisson", "gaussian"])
def test_each_likelihood_trains_and_loss_decreases(likelihood):
    adata = small_counts(n_cells=200, n_genes=45, n_factors=3)
    if likelihood == "gaussian":
        import scanpy as sc

        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
    import scvi

    scvi.settings.seed = 0
    SparseVAE.setup_anndata(adata)
    model = SparseVAE(adata, n_factors=3, n_hidden=16, likelihood=likelihood)
    assert model.likelihood == likelihood
    model.train(max_epochs=12, batch_size=64, **QUIET)
    loss = model.history["train_loss"].to_numpy(dtype=float).ravel()
    assert np.all(np.isfinite(loss))
    # The reconstruction term falls; the total can rise for a while under the Gaussian path's
    # full prior from the first step (the mask penalty grows with W).
    recon = model.history["reconstruction_loss_train"].to_numpy(dtype=float).ravel()
    assert recon[-1] < recon[0]
    z = model.get_latent_representation()
    assert z.shape == (200, 3) and np.isfinite(z).all()
    if model.module.prior is not None:
        p = model.get_inclusion_probabilities().to_numpy()
        assert ((p >= 0) & (p <= 1)).all()


def test_auto_likelihood():
    adata = small_counts()
    SparseVAE.setup_anndata(adata)
    assert SparseVAE(adata, n_factors=2).likelihood == "nb"
    sim = sparsevae.datasets.simulate_moran2022(n_cells=50)
    SparseVAE.setup_anndata(sim)
    assert SparseVAE(sim, n_factors=2).likelihood == "gaussian"


def test_vae_and_beta_vae_baselines_share_the_code_path():
    adata = small_counts()
    SparseVAE.setup_anndata(adata)
    vae = SparseVAE(adata, n_factors=2, mask=None, kl_weight=2.0, n_hidden=8)
    assert vae.module.prior is None
    assert not any(p is vae.module.decoder.W for p in vae.module.parameters())
    vae.train(max_epochs=2, **QUIET)
    np.testing.assert_array_equal(vae.get_mask().to_numpy(), 1.0)
    with pytest.raises(ValueError, match="mask=None"):
        vae.get_inclusion_probabilities()
    vae.write_results(adata)
    assert "sparsevae_pstar" not in adata.varm


def test_gaussian_genes_are_standardised_inside_the_model():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(200, 1))
    x = np.hstack([100.0 + 50.0 * z, -3.0 + 0.1 * z, np.full((200, 1), 7.0)])
    x = x + rng.normal(scale=0.01, size=x.shape)
    x[:, 2] = 7.0  # a constant gene gets scale 1
    adata = AnnData(x.astype(np.float32))
    SparseVAE.setup_anndata(adata)
    model = SparseVAE(adata, n_factors=1, n_hidden=8)
    m = model.module
    assert model.likelihood == "gaussian"
    np.testing.assert_allclose(m.gene_loc.numpy(), x.mean(0), rtol=1e-4)
    np.testing.assert_allclose(m.gene_scale.numpy()[:2], x.std(0)[:2], rtol=1e-3)
    assert m.gene_scale[2].item() == 1.0
    # The likelihood is in data units: its mean is loc + scale * (network output).
    zt = torch.zeros(4, 1)
    px = m.generative(zt, torch.zeros(4, 1))["px"]
    out = m.decoder(zt)[..., 0]
    torch.testing.assert_close(px.loc, m.gene_loc + m.gene_scale * out)
    torch.testing.assert_close(px.scale[0], m.gene_scale * torch.exp(0.5 * m.log_sigma2))


def test_weight_prior_enters_the_penalty_only_with_a_mask():
    adata = small_counts(n_cells=60, n_genes=40)
    SparseVAE.setup_anndata(adata)
    with_prior = SparseVAE(adata, n_factors=2, n_hidden=8, weight_prior_precision=2.0).module
    without = SparseVAE(adata, n_factors=2, n_hidden=8, weight_prior_precision=0.0).module
    without.load_state_dict(with_prior.state_dict())
    extra = with_prior.prior_penalty() - without.prior_penalty()
    # 0.5 * precision * sum of squared weights, with precision 2
    torch.testing.assert_close(extra, with_prior.decoder.weight_sq_norm())
    vae = SparseVAE(adata, n_factors=2, n_hidden=8, mask=None, weight_prior_precision=2.0).module
    assert vae.prior_penalty().item() == 0.0  # plain VAE: no mask, no weight prior
    with pytest.raises(ValueError, match="weight_prior_precision"):
        SparseVAE(adata, n_factors=2, weight_prior_precision=-1.0)


def test_defaults_are_chosen_on_purpose():
    from sparsevae.model import default_max_epochs
    from sparsevae.train import SparseVAETrainingPlan

    adata = small_counts()
    SparseVAE.setup_anndata(adata)
    model = SparseVAE(adata, n_factors=2, n_hidden=8)
    plan = SparseVAETrainingPlan(model.module)
    # full KL weight from the first step (no 400-epoch warm-up), no weight decay, paper's lr
    assert plan.n_epochs_kl_warmup is None and plan.n_steps_kl_warmup is None
    assert plan.weight_decay == 0.0 and plan.lr == pytest.approx(1e-2)
    assert default_max_epochs(3005) == 100
    assert 20 <= default_max_epochs(10**6) <= default_max_epochs(100) <= 400


# ----------------------------------------------------------------------------- results
def test_write_results_keys_shapes_and_overwrite():
    adata = small_counts(n_cells=100, n_genes=40, n_factors=2)
    SparseVAE.setup_anndata(adata)
    model = SparseVAE(adata, n_factors=3, n_hidden=8)
    model.train(max_epochs=2, **QUIET)
    model.write_results(adata)
    assert adata.obsm["X_sparsevae"].shape == (100, 3)
    assert adata.varm["sparsevae_W"].shape == (40, 3)
    assert adata.varm["sparsevae_pstar"].shape == (40, 3)
    np.testing.assert_allclose(
        adata.varm["sparsevae_effect"], model.get_gene_effects().to_numpy(), rtol=1e-4, atol=1e-8
    )
    uns = adata.uns["sparsevae"]
    assert list(uns["factor_names"]) == ["factor_0", "factor_1", "factor_2"]
    assert uns["eta"].shape == (3,)
    assert uns["params"]["n_factors"] == 3 and uns["likelihood"] == "nb"
    before = adata.obsm["X_sparsevae"].copy()
    adata.obsm["X_sparsevae"][:] = 0
    with pytest.raises(KeyError, match="overwrite=True"):
        model.write_results(adata)
    assert (adata.obsm["X_sparsevae"] == 0).all()  # untouched
    model.write_results(adata, overwrite=True)
    np.testing.assert_allclose(adata.obsm["X_sparsevae"], before, atol=1e-6)
    model.write_results(adata, key_added="run2", effects=False)
    assert "X_run2" in adata.obsm and "run2_W" in adata.varm and "run2_effect" not in adata.varm
    W = model.get_mask()
    assert isinstance(W, pd.DataFrame) and list(W.index) == list(adata.var_names)


def test_downstream_scanpy_uses_factors():
    import scanpy as sc

    adata = small_counts(n_cells=100, n_genes=40, n_factors=2)
    SparseVAE.setup_anndata(adata)
    model = SparseVAE(adata, n_factors=2, n_hidden=8)
    model.train(max_epochs=2, **QUIET)
    model.write_results(adata)
    sc.pp.neighbors(adata, use_rep="X_sparsevae", n_neighbors=10)
    assert adata.obsp["connectivities"].shape == (100, 100)


def test_save_load_round_trip(tmp_path):
    adata = small_counts()
    SparseVAE.setup_anndata(adata)
    model = SparseVAE(adata, n_factors=2, n_hidden=8)
    model.train(max_epochs=3, **QUIET)
    model.save(tmp_path / "m", overwrite=True)
    loaded = SparseVAE.load(tmp_path / "m", adata=adata)
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )
    pd.testing.assert_frame_equal(loaded.get_mask(), model.get_mask())
    pd.testing.assert_frame_equal(
        loaded.get_inclusion_probabilities(), model.get_inclusion_probabilities()
    )
    pd.testing.assert_series_equal(loaded.get_eta(), model.get_eta())
    assert loaded.likelihood == "nb"


# ----------------------------------------------------------------------------- bad input
def snapshot(adata):
    X = adata.X.toarray() if sp.issparse(adata.X) else np.array(adata.X, copy=True)
    return X, adata.obs.copy(), adata.var.copy(), set(adata.uns), set(adata.obsm), set(adata.varm)


def assert_unchanged(adata, snap, uns_may_have_scvi=False):
    X, obs, var, uns, obsm, varm = snap
    Xn = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    np.testing.assert_array_equal(Xn, X)
    pd.testing.assert_frame_equal(adata.obs, obs)
    pd.testing.assert_frame_equal(adata.var, var)
    assert set(adata.obsm) == obsm and set(adata.varm) == varm
    new_uns = set(adata.uns) - uns
    if uns_may_have_scvi:
        new_uns = {k for k in new_uns if not k.startswith("_scvi")}
    assert not new_uns


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf_are_refused_before_registration(bad):
    adata = small_counts()
    adata.X = adata.X.toarray()
    adata.X[3, 4] = bad
    snap = snapshot(adata)
    with pytest.raises(ValueError, match=r"NaN|infinite"):
        SparseVAE.setup_anndata(adata)
    # NaN != NaN, compare the masks
    assert not any(k.startswith("_scvi") for k in adata.uns)
    assert set(adata.obsm) == snap[4]


def test_missing_layer_and_too_few_cells():
    adata = small_counts()
    with pytest.raises(KeyError, match="Layer 'nope'"):
        SparseVAE.setup_anndata(adata, layer="nope")
    tiny = small_counts()[:5].copy()
    with pytest.raises(ValueError, match="at least"):
        SparseVAE.setup_anndata(tiny)


@pytest.mark.parametrize(
    "mutate,likelihood,match",
    [
        (lambda X: X * -1.0, "nb", "negative"),
        (lambda X: X + 0.5, "poisson", "non-integer"),
        (lambda X: X * 0.999, "zinb", "non-integer"),
    ],
)
def test_count_likelihood_refuses_non_counts(mutate, likelihood, match):
    adata = small_counts()
    adata.X = mutate(adata.X.toarray())
    SparseVAE.setup_anndata(adata)
    snap = snapshot(adata)
    with pytest.raises(ValueError, match=match):
        SparseVAE(adata, likelihood=likelihood, n_factors=2)
    assert_unchanged(adata, snap)


def test_empty_cells_refused_for_counts():
    adata = small_counts()
    X = adata.X.toarray()
    X[7] = 0
    adata.X = X
    SparseVAE.setup_anndata(adata)
    with pytest.raises(ValueError, match="zero total counts"):
        SparseVAE(adata, n_factors=2)


@pytest.mark.parametrize("k", [0, 41, 2.5])
def test_bad_n_factors(k):
    adata = small_counts()
    SparseVAE.setup_anndata(adata)
    with pytest.raises(ValueError, match="n_factors"):
        SparseVAE(adata, n_factors=k)


def test_genes_that_do_not_match_a_trained_model(tmp_path):
    adata = small_counts()
    SparseVAE.setup_anndata(adata)
    model = SparseVAE(adata, n_factors=2, n_hidden=8)
    model.train(max_epochs=1, **QUIET)
    model.save(tmp_path / "m")
    other = adata[:, ::-1].copy()
    snap = snapshot(other)
    with pytest.raises(ValueError, match="different order"):
        SparseVAE.load(tmp_path / "m", adata=other)
    assert_unchanged(other, snap, uns_may_have_scvi=True)
    fewer = adata[:, :30].copy()
    with pytest.raises(ValueError, match="missing"):
        SparseVAE.load(tmp_path / "m", adata=fewer)
    with pytest.raises(ValueError, match="do not match"):
        model.get_latent_representation(fewer)
    with pytest.raises(ValueError, match="do not match"):
        model.write_results(other)


def test_divergence_stops_with_clear_message():
    adata = small_counts()
    SparseVAE.setup_anndata(adata)
    model = SparseVAE(adata, n_factors=2, n_hidden=8)
    with torch.no_grad():
        model.module.decoder.head_bias.fill_(float("nan"))
    with pytest.raises(DivergenceError, match="Lower the learning rate"):
        model.train(max_epochs=2, **QUIET)


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


def test_prior_schedule_and_normalised_decoder():
    """The plan's prior schedule: warm-up without penalty, spike ladder, then the full prior."""
    adata = sparsevae.datasets.simulate_programs(
        n_cells=120, n_genes=40, n_factors=2, genes_per_program=10, seed=0
    )
    SparseVAE.setup_anndata(adata, layer="counts")
    model = SparseVAE(adata, n_factors=2, n_hidden=8)
    module = model.module
    assert module.decoder.normalize_shared  # count likelihood: unit-norm shared layers
    first, hidden = module.decoder.shared_weights()
    assert torch.allclose(first.norm(dim=0), torch.ones(2))
    assert all(torch.allclose(w.norm(dim=1), torch.ones(8)) for w in hidden)
    prior = module.prior
    module.set_prior_schedule(penalty_on=False, ramp=0.0)
    assert module.prior_scale == 0.0
    pen_off = module.prior_penalty().item()
    module.set_prior_schedule(penalty_on=True, ramp=0.0)
    assert prior.spike_rate == pytest.approx(1.5 * prior.lambda1)
    assert module.prior_penalty().item() > pen_off
    module.set_prior_schedule(penalty_on=True, ramp=0.5)
    assert prior.spike_rate == pytest.approx((1.5 * prior.lambda1 * prior.lambda0) ** 0.5)
    # eta is held at 0.5 through warm-up and ladder, and the prior ends at full strength
    model.train(max_epochs=2, n_epochs_prior_warmup=1, n_epochs_lambda0_ramp=5, **QUIET)
    assert torch.allclose(prior.eta, torch.full_like(prior.eta, 0.5))
    assert prior.spike_rate == prior.lambda0 and module.prior_scale == 1.0
    model.train(max_epochs=2, n_epochs_prior_warmup=0, n_epochs_lambda0_ramp=0, **QUIET)
    assert not torch.allclose(prior.eta, torch.full_like(prior.eta, 0.5))
    # Gaussian data keep the unnormalised decoder; forward equals the per-gene loop either way
    for norm in (True, False):
        dec = MaskedDecoder(30, 3, n_hidden=6, normalize_shared=norm)
        z = torch.randn(5, 3)
        assert torch.allclose(dec(z), dec.forward_loop(z), atol=1e-5)
    with pytest.raises(ValueError, match="n_epochs_prior_warmup"):
        model.train(max_epochs=1, n_epochs_prior_warmup=-1, **QUIET)
    # default schedule: on for count likelihoods, off for Gaussian (the paper's setting)
    model.train(max_epochs=5, **QUIET)
    plan = model.trainer.lightning_module
    assert (plan.n_epochs_prior_warmup, plan.n_epochs_lambda0_ramp) == (1, 2)
    gauss = adata.copy()
    gauss.X = np.log1p(
        gauss.layers["counts"].toarray()
        if hasattr(gauss.layers["counts"], "toarray")
        else gauss.layers["counts"]
    )
    SparseVAE.setup_anndata(gauss)
    gmodel = SparseVAE(gauss, n_factors=2, n_hidden=8, likelihood="gaussian")
    gmodel.train(max_epochs=5, **QUIET)
    plan = gmodel.trainer.lightning_module
    assert (plan.n_epochs_prior_warmup, plan.n_epochs_lambda0_ramp) == (0, 0)
