"""The torch module: composition offset, latent priors, standardisation, weight prior."""

import numpy as np
import pytest
import torch
from anndata import AnnData

import sparsevae
from sparsevae import SparseVAE
from sparsevae.module import SparseVAEModule

from .conftest import small_counts


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


def test_spike_gates_follow_the_prior_once_it_is_at_full_strength():
    torch.manual_seed(0)
    module = SparseVAEModule(12, n_factors=3, n_hidden=8, spike_gate=True)
    with torch.no_grad():
        module.decoder.W.zero_()
        module.decoder.W[:4, 0] = 2.0  # genes 0-3 in factor 0's slab, the rest in the spike
    gate = module.decoder.gate
    module.set_prior_schedule(penalty_on=True, ramp=0.5)  # still on the spike-rate ladder
    module.em_step()
    assert not module.gate_on and bool((gate == 1).all())
    module.set_prior_schedule(penalty_on=True, ramp=1.0)
    module.em_step()
    expected = (module.prior.p_star >= 0.5).float()
    assert module.gate_on and torch.equal(gate, expected)
    assert gate[:4, 0].all() and gate.sum() == 4
    module.set_prior_schedule(penalty_on=False, ramp=0.0)  # training again from the warm-up
    assert bool((gate == 1).all())
    multi = SparseVAEModule(12, n_factors=3, n_hidden=8, n_specific_factors=1, n_studies=2)
    assert not multi.spike_gate  # default with studies: no gates either
    plain = SparseVAEModule(12, n_factors=3, n_hidden=8)  # default without studies: no gates
    plain.set_prior_schedule(penalty_on=True, ramp=1.0)
    plain.em_step()
    assert not plain.gate_on and bool((plain.decoder.gate == 1).all())


@pytest.mark.parametrize("prior_cells", [None, 50.0, 5000.0])
def test_decoder_prior_is_spread_over_at_most_prior_cells(prior_cells):
    torch.manual_seed(0)
    module = SparseVAEModule(10, n_factors=2, n_hidden=8, likelihood="gaussian")
    module.prior_cells = prior_cells
    x = torch.randn(6, 10)
    tensors = {"X": x}
    inf = module.inference(x)
    gen = module.generative(inf["z"], inf["library"])
    n_obs = 1000
    loss = module.loss(tensors, inf, gen, n_obs=n_obs).loss
    per_cell = -gen["px"].log_prob(x).sum(-1)
    divisor = n_obs if prior_cells is None else min(n_obs, prior_cells)
    assert module.prior_divisor(n_obs) == divisor
    data_part = loss - module.decoder_prior_penalty() / divisor
    data_part = data_part - module.variance_prior_penalty() / n_obs
    kl = torch.distributions.kl_divergence(inf["qz"], gen["pz"]).sum(-1)
    torch.testing.assert_close(data_part, torch.mean(per_cell + kl))
    for bad in (0, -5.0, "200", True):
        with pytest.raises(ValueError, match="prior_cells must be a positive number"):
            SparseVAEModule(10, n_factors=2, prior_cells=bad)
    assert SparseVAEModule(10, n_factors=2, prior_cells=np.int64(200)).prior_cells == 200.0
    with pytest.raises(ValueError, match="spike_gate must be True, False, 'specific' or None"):
        SparseVAEModule(10, n_factors=2, spike_gate="yes")


@pytest.mark.parametrize("prior_cells", [None, 50.0, 5000.0])
def test_each_specific_mask_is_weighed_against_its_own_studys_cells(prior_cells):
    """With ``prior_cells``, study s's specific mask costs ``penalty_s / min(N_s, prior_cells)``
    per cell of the study, as in a single-study fit to study s alone; without, exact MAP."""
    torch.manual_seed(0)
    module = SparseVAEModule(
        10, n_factors=2, n_hidden=8, n_specific_factors=2, n_studies=2,
        study_shares=[100, 300], prior_cells=prior_cells,
    )  # fmt: skip
    assert module.study_shares == [0.25, 0.75]
    n_obs = 400
    per_study = torch.stack(
        [module.prior_specific.penalty(module.decoder.W_specific * (torch.arange(2) == s)
                                       .view(2, 1, 1)) for s in range(2)]
    )  # fmt: skip
    shared = module.prior.penalty(module.decoder.W)
    weight_part = module.decoder_prior_penalty(n_obs) - 0.5 * module.weight_prior_precision * (
        module.decoder.weight_sq_norm()
    )
    N = float(n_obs)
    divisor = module.prior_divisor(n_obs)
    # Whole-data objective (per-cell loss times N): shared against min(N, pc) cells, study s
    # against min(N_s, pc) of its N_s cells.
    n_s = torch.tensor([100.0, 300.0])
    own = n_s if prior_cells is None else n_s.clamp(max=prior_cells)
    expected = N / divisor * shared + (n_s / own * per_study).sum()
    torch.testing.assert_close(weight_part * N / divisor, expected)
    if prior_cells is None:
        assert torch.equal(module.specific_prior_weights(n_obs), torch.ones(2))
    for bad in ([1.0], [0.0, 0.0], [-1.0, 2.0]):
        with pytest.raises(ValueError, match="study_shares must hold 2 numbers >= 0"):
            SparseVAEModule(10, n_factors=2, n_specific_factors=1, n_studies=2, study_shares=bad)
    # a study without cells in the AnnData (a model loaded on a subset of the studies)
    assert SparseVAEModule(10, n_factors=2, n_specific_factors=1, n_studies=2,
                           study_shares=[60, 0]).study_shares == [1.0, 0.0]  # fmt: skip
    with pytest.raises(ValueError, match="one weight per group"):
        module.prior_specific.penalty(module.decoder.W_specific, torch.ones(3))


def test_trained_model_with_spike_gates_does_not_use_unselected_entries():
    torch.manual_seed(0)
    adata = small_counts(n_cells=120, n_genes=30)
    SparseVAE.setup_anndata(adata)
    model = SparseVAE(adata, n_factors=3, n_hidden=8, spike_gate=True, prior_cells=5)
    model.train(max_epochs=30, batch_size=64, enable_progress_bar=False, logger=False)
    selected = model.get_inclusion_probabilities().to_numpy() >= 0.5
    assert not selected.all()  # something to check
    np.testing.assert_array_equal(model.get_mask().to_numpy()[~selected], 0.0)
    effects = model.get_gene_effects().to_numpy()
    np.testing.assert_array_equal(effects[~selected], 0.0)
    assert sparsevae.tl.mask_fidelity(model)["faithful"].all()  # the gates make the mask exact
    assert not any("act mostly" in p for p in model.train_problems_)
    assert model.module.prior_divisor(120) == 5


def test_specific_gates_leave_the_shared_mask_open():
    """``spike_gate="specific"``: only the study-specific masks have spike gates."""
    torch.manual_seed(0)
    module = SparseVAEModule(
        10, n_factors=2, n_hidden=8, n_specific_factors=2, n_studies=2, spike_gate="specific"
    )
    with torch.no_grad():
        module.prior.p_star.zero_()
        module.prior_specific.p_star.zero_()
        module.prior_specific.p_star[1, :3, 0] = 0.9
    module.set_prior_schedule(penalty_on=True, ramp=1.0)
    module.close_spike_gates()
    assert module.gate_on
    assert bool((module.decoder.gate == 1).all())  # shared: open although every p* is 0
    expected = torch.zeros(2, 10, 2)
    expected[1, :3, 0] = 1.0
    assert torch.equal(module.decoder.gate_specific, expected)
    both = SparseVAEModule(10, n_factors=2, n_hidden=8, n_specific_factors=2, n_studies=2,
                           spike_gate=True)  # fmt: skip
    assert both.gate_shared and both.gate_specific


def test_varimax_gives_the_same_loadings_from_any_rotation():
    """varimax: the rotated loadings are sparse, canonical (order, sign) and the same whatever
    rotation of them it is given; R is orthogonal."""
    from sparsevae.module import varimax

    rng = np.random.default_rng(0)
    L = np.zeros((60, 3))
    for k in range(3):  # three blocks of genes, one per factor, of decreasing strength
        L[20 * k : 20 * (k + 1), k] = rng.uniform(0.5, 1.0, 20) * (3 - k)
    L += rng.normal(scale=0.05, size=L.shape)
    Q = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    R = varimax(L @ Q)
    np.testing.assert_allclose(R.T @ R, np.eye(3), atol=1e-10)
    rotated = L @ Q @ R
    np.testing.assert_allclose(rotated, L @ varimax(L), atol=1e-4)
    np.testing.assert_allclose(rotated, L, atol=0.05)  # the blocks, in order, signed positive
    with pytest.raises(ValueError, match="matrix"):
        varimax(np.ones(3))


def test_rotate_factors_keeps_the_model_when_mask_rows_are_flat():
    """rotate_factors: encoder means rotate exactly (z' = R^T z) and, with flat mask rows, the
    decoded means do not change; models whose prior is not rotation-invariant refuse."""
    torch.manual_seed(0)
    module = SparseVAEModule(30, n_factors=3, n_hidden=8)
    with torch.no_grad():
        module.decoder.W.copy_(torch.rand(30, 1).expand(30, 3))
        for p in module.offset_net.parameters():
            p.normal_(0, 0.3)
    module.eval()
    x = torch.poisson(torch.full((20, 30), 3.0))

    def run():
        inf = module.inference(x)
        z = inf["qz"].loc
        return z, module.generative(z, inf["library"])["px"].mean

    z0, mu0 = run()
    R = torch.linalg.qr(torch.randn(3, 3))[0]
    module.rotate_factors(R)
    z1, mu1 = run()
    torch.testing.assert_close(z1, z0 @ R, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mu1, mu0, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="3 x 3"):
        module.rotate_factors(torch.eye(2))
    for other in (
        SparseVAEModule(30, n_factors=3, latent_prior="correlated"),
        SparseVAEModule(30, n_factors=3, mask=None),
        SparseVAEModule(30, n_factors=2, n_studies=2, n_specific_factors=1),
    ):
        assert not other.can_rotate
        with pytest.raises(ValueError, match="rotate"):
            other.rotate_factors(torch.eye(other.n_factors))
