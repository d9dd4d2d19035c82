"""The model class: training, likelihoods, schedule, results, save/load, input checks."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import sparsevae
from sparsevae import SparseVAE
from sparsevae.nn import MaskedDecoder
from sparsevae.train import DivergenceError

from .conftest import QUIET, small_counts


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


def test_restarts_keep_the_fit_with_the_best_elbo():
    import scvi

    adata = small_counts()
    SparseVAE.setup_anndata(adata)
    scvi.settings.seed = 0
    model = SparseVAE(adata, n_factors=2, n_hidden=8)
    model.train(max_epochs=3, n_restarts=3, **QUIET)
    elbos = model.restart_elbos_
    assert len(elbos) == 3 and len(set(elbos)) == 3  # different starts
    assert model.get_elbo() == pytest.approx(max(elbos), rel=1e-4)  # get_elbo samples z
    # The first start is the plain fit with the same seed.
    scvi.settings.seed = 0
    single = SparseVAE(adata, n_factors=2, n_hidden=8)
    single.train(max_epochs=3, **QUIET)
    assert single.get_elbo() == pytest.approx(elbos[0], rel=1e-4)
    # Start r is the plain fit from seed + r (network and minibatch order), and the user's seed
    # is set again afterwards.
    scvi.settings.seed = 2
    third = SparseVAE(adata, n_factors=2, n_hidden=8)
    third.train(max_epochs=3, **QUIET)
    assert third.get_elbo() == pytest.approx(elbos[2], rel=1e-4)
    scvi.settings.seed = 5
    SparseVAE(adata, n_factors=2, n_hidden=8).train(max_epochs=1, n_restarts=2, **QUIET)
    assert scvi.settings.seed == 5
    with pytest.raises(ValueError, match="n_restarts"):
        model.train(max_epochs=1, n_restarts=0, **QUIET)


def test_factors_take_their_varimax_rotation_at_the_end_of_the_warmup():
    """rotate_after_warmup: when the mask prior starts, the factors' loadings on the genes are in
    their varimax position (varimax of them is the identity); the rotation is kept; no rotation
    without a warm-up (Gaussian default) or when turned off."""
    import lightning.pytorch as pl

    from sparsevae.module import varimax

    adata = small_counts(n_cells=150, n_genes=40, n_factors=2)
    SparseVAE.setup_anndata(adata, layer="counts")
    model = SparseVAE(adata, n_factors=3, n_hidden=8)
    counts = adata.layers["counts"]
    x = torch.tensor(counts.toarray() if sp.issparse(counts) else counts, dtype=torch.float32)
    seen = {}

    class AtPriorStart(pl.Callback):
        def on_train_batch_start(self, trainer, plan, batch, batch_idx):
            if trainer.current_epoch == 2 and batch_idx == 0:
                module = plan.module
                module.eval()  # as the rotation reads the factors: no dropout
                with torch.no_grad():
                    z = module.inference(x)["qz"].loc.double().numpy()
                    lx = module.loading_expression({"X": x}).double().numpy()
                module.train()
                z = z[:, z.std(0) >= 0.1] - z[:, z.std(0) >= 0.1].mean(0)
                lx = (lx - lx.mean(0)) / np.where(lx.std(0) > 0, lx.std(0), 1.0)
                values, vectors = np.linalg.eigh(z.T @ z / len(z))
                white = z @ (vectors / np.sqrt(values)) @ vectors.T  # loadings as the plan's
                seen["R"] = varimax(lx.T @ white / len(z))

    model.train(
        max_epochs=4, n_epochs_prior_warmup=2, n_epochs_lambda0_ramp=1,
        rotate_after_warmup=True, callbacks=[AtPriorStart()], **QUIET,
    )  # fmt: skip
    R = model.warmup_rotation_
    np.testing.assert_allclose(R.T @ R, np.eye(3), atol=1e-5)
    assert not np.allclose(R, np.eye(3), atol=1e-3)  # a random start is not in varimax position
    np.testing.assert_allclose(seen["R"], np.eye(len(seen["R"])), atol=0.05)
    model.train(max_epochs=4, n_epochs_prior_warmup=2, rotate_after_warmup=False, **QUIET)
    assert model.warmup_rotation_ is None
    model.train(max_epochs=4, n_epochs_prior_warmup=0, rotate_after_warmup=True, **QUIET)
    assert model.warmup_rotation_ is None


def test_mask_decision_schedule_defaults_and_checks():
    from sparsevae.train import prior_schedule

    s = prior_schedule(100, True, gated=True)
    assert (s.warmup, s.ramp, s.average, s.settle) == (20, 40, 5, 5)
    assert (s.average_epoch, s.decide_epoch) == (90, 95) and s.decides
    # ungated masks (the Gaussian default) read the last EM step, as before
    assert not prior_schedule(100, True, gated=False).decides
    assert not prior_schedule(300, False).decides
    # defaults that do not fit after the full prior are shortened
    s = prior_schedule(100, True, n_epochs_prior_warmup=40, n_epochs_lambda0_ramp=56, gated=True)
    assert (s.average, s.settle) == (0, 4)
    s = prior_schedule(100, True, n_epochs_mask_average=0, n_epochs_mask_settle=10, gated=False)
    assert (s.average, s.settle, s.decide_epoch) == (0, 10, 90)
    with pytest.raises(ValueError, match="must fit"):
        prior_schedule(100, True, n_epochs_mask_average=30, n_epochs_mask_settle=20)
    with pytest.raises(ValueError, match="n_epochs_mask_settle"):
        prior_schedule(100, True, n_epochs_mask_settle=-1)


def test_masks_are_decided_from_averaged_pstar_and_the_network_refits():
    """Gated masks: p* averaged over the last epochs decides the selection, then EM stops."""
    import scvi
    from lightning.pytorch.callbacks import Callback

    from sparsevae.priors import is_selected

    adata = small_counts()
    SparseVAE.setup_anndata(adata)
    scvi.settings.seed = 0
    model = SparseVAE(adata, n_factors=2, n_hidden=8)
    assert model.module.spike_gate  # count default
    seen = []

    class Record(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            m = pl_module.module
            seen.append((m.prior.p_star.clone(), m.decoder.gate.clone(), m.decoder.W.clone()))

    model.train(
        max_epochs=20, n_epochs_mask_average=3, n_epochs_mask_settle=2, callbacks=[Record()],
        **QUIET,
    )  # fmt: skip
    plan = model.trainer.lightning_module
    assert (plan.schedule.average_epoch, plan.schedule.decide_epoch) == (15, 18)
    prior = model.module.prior
    average = torch.stack([p for p, _, _ in seen[15:18]]).mean(0)
    assert torch.allclose(prior.p_star, average, atol=1e-6)
    assert not torch.allclose(seen[17][0], average)  # the average, not the last EM step
    for p, gate, _ in seen[18:]:  # settle: p* fixed, the gates are the decided selection
        assert torch.equal(p, prior.p_star)
        assert torch.equal(gate, is_selected(prior.p_star).to(gate.dtype))
    assert not torch.equal(seen[18][2], seen[19][2])  # the network (and W) still train
    assert torch.equal(model.module.decoder.gate, is_selected(prior.p_star).to(gate.dtype))
    assert not prior.decided  # released: a later train() call runs the EM again
    # An average without a settle phase is decided at the end of training
    seen.clear()
    model.train(
        max_epochs=20, n_epochs_mask_average=3, n_epochs_mask_settle=0, callbacks=[Record()],
        **QUIET,
    )  # fmt: skip
    average = torch.stack([p for p, _, _ in seen[17:20]]).mean(0)
    assert torch.allclose(prior.p_star, average, atol=1e-6)
    assert torch.equal(model.module.decoder.gate, is_selected(prior.p_star).to(gate.dtype))
    # Without the decision the masks are read from the last EM step, as before
    model.train(max_epochs=20, n_epochs_mask_average=0, n_epochs_mask_settle=0, **QUIET)
    assert not model.trainer.lightning_module.schedule.decides
