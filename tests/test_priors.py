"""The Spike-and-Slab Lasso prior (priors): EM step and hyperparameter checks."""

import math

import numpy as np
import pytest
import torch

from sparsevae.priors import SpikeSlabLasso


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


def test_decided_selection_charges_each_entry_its_parts_rate():
    prior = SpikeSlabLasso(3, 2, lambda0=10.0, lambda1=1.0, a=2.0, b=5.0)
    W = torch.tensor([[0.5, -0.2], [0.05, 1.0], [-0.3, 0.0]])
    p = torch.tensor([[0.9, 0.55], [0.3, 1.0], [0.49, 0.1]])
    prior.decide(p)
    assert prior.decided
    assert torch.equal(prior.p_star, p)
    eta = (p.sum(0) + 2.0 - 1.0) / (2.0 + 5.0 + 3 - 2)
    np.testing.assert_allclose(prior.eta.numpy(), eta.numpy(), rtol=1e-6)  # the M-step
    selected = (p >= 0.5).float()  # 0.55 counts as slab, 0.49 as spike
    pen = ((1.0 * selected + 10.0 * (1 - selected)) * W.abs()).sum()
    assert float(prior.penalty(W)) == pytest.approx(float(pen), rel=1e-6)
    with pytest.raises(RuntimeError, match="release"):
        prior.em_step(W)
    prior.release()
    soft = ((1.0 * p + 10.0 * (1 - p)) * W.abs()).sum()
    assert float(prior.penalty(W)) == pytest.approx(float(soft), rel=1e-6)
    prior.em_step(W)  # moves again
    assert not torch.equal(prior.p_star, p)
    with pytest.raises(ValueError, match="shape"):
        prior.decide(torch.ones(2, 2))
