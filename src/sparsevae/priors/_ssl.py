"""Spike-and-Slab Lasso prior on the decoder mask (Rockova and George 2018), fitted by EM."""

from __future__ import annotations

import math

import torch
from torch import nn

from ._rules import is_selected

__all__ = ["SpikeSlabLasso"]

_ETA_EPS = 1e-6


class SpikeSlabLasso(nn.Module):
    r"""Spike-and-Slab Lasso prior on a ``(n_genes, n_factors)`` mask ``W``.

    ``eta_k ~ Beta(a, b)``, ``gamma_jk ~ Bernoulli(eta_k)`` and
    ``w_jk | gamma_jk ~ gamma_jk Laplace(lambda1) + (1 - gamma_jk) Laplace(lambda0)``.
    The inclusion probabilities ``p*`` (E-step) and the factor weights ``eta`` (M-step) are kept
    as buffers and updated with :meth:`em_step`; :meth:`penalty` is the expected negative log
    prior of ``W`` given them.

    Parameters
    ----------
    n_genes
        Number of rows of ``W``.
    n_factors
        Number of columns of ``W``.
    lambda0
        Rate of the spike Laplace (large: shrinks entries to zero).
    lambda1
        Rate of the slab Laplace (small: lets entries be large).
    a
        First parameter of the Beta prior on ``eta``.
    b
        Second parameter of the Beta prior on ``eta``; defaults to ``n_genes``.
    n_groups
        ``None`` (default): one mask, ``p*`` of shape ``(n_genes, n_factors)`` and ``eta`` of
        shape ``(n_factors,)``. An integer ``S``: ``S`` independent masks stacked as
        ``(S, n_genes, n_factors)`` (the study-specific masks of a multi-study model), each with
        its own ``eta`` (shape ``(S, n_factors)``); the penalty is the sum of the ``S`` penalties.
    """

    def __init__(
        self,
        n_genes: int,
        n_factors: int,
        lambda0: float = 10.0,
        lambda1: float = 1.0,
        a: float = 1.0,
        b: float | None = None,
        n_groups: int | None = None,
    ) -> None:
        super().__init__()
        if n_groups is not None and n_groups < 1:
            raise ValueError(f"n_groups must be None or >= 1, got {n_groups}.")
        if not (lambda0 > 0 and lambda1 > 0):
            raise ValueError(f"lambda0 and lambda1 must be > 0, got {lambda0} and {lambda1}.")
        if lambda0 <= lambda1:
            raise ValueError(
                f"lambda0 (spike, {lambda0}) must be larger than lambda1 (slab, {lambda1})."
            )
        b = float(n_genes) if b is None else float(b)
        if a <= 0 or b <= 0:
            raise ValueError(f"a and b must be > 0, got a={a}, b={b}.")
        self.n_genes = n_genes
        self.lambda0 = float(lambda0)
        # Spike rate in use: ``lambda0`` except during the training plan's ladder from a rate
        # near ``lambda1`` up to ``lambda0`` (dynamic posterior exploration).
        self.spike_rate = float(lambda0)
        self.lambda1 = float(lambda1)
        self.a = float(a)
        self.b = b
        self.n_groups = n_groups
        lead = () if n_groups is None else (int(n_groups),)
        self.register_buffer("p_star", torch.full((*lead, n_genes, n_factors), 0.5))
        self.register_buffer("eta", torch.full((*lead, n_factors), 0.5))
        #: Whether the selection is decided (:meth:`decide`): the penalty then charges selected
        #: entries the slab rate and the others the spike rate, and ``p*`` no longer moves.
        self.decided = False

    @property
    def w_off(self) -> float:
        """Where the spike and slab densities cross (equal weights).

        ``log(lambda0 / lambda1) / (lambda0 - lambda1)``: entries with ``|w|`` below it sit in
        the spike.
        """
        return math.log(self.lambda0 / self.lambda1) / (self.lambda0 - self.lambda1)

    @property
    def eta_off(self) -> float:
        """The ``eta`` that the EM update gives a factor whose ``p*`` sum to half a gene.

        ``(0.5 + a - 1) / (a + b + G - 2)``: a factor below it selects no gene.
        """
        return (0.5 + self.a - 1.0) / (self.a + self.b + self.n_genes - 2.0)

    def thresholds(self) -> dict[str, float]:
        """The thresholds that read a fitted mask, as stored with the results.

        Returns
        -------
        ``{"w_off": ..., "eta_off": ...}``, see :attr:`w_off` and :attr:`eta_off`.
        """
        return {"w_off": float(self.w_off), "eta_off": float(self.eta_off)}

    def penalty(self, W: torch.Tensor, group_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Negative expected log prior of ``W``: ``sum_jk (l1 p* + l0 (1 - p*)) |w_jk|``.

        Once the selection is decided (:meth:`decide`), ``p*`` is read as 1 for the selected
        entries and 0 for the others: each entry is charged the rate of the part it is in.

        Parameters
        ----------
        W
            The mask, shape ``(n_genes, n_factors)`` (``(n_groups, n_genes, n_factors)`` with
            groups).
        group_weights
            With groups: one weight per group, multiplying that group's penalty (default 1).

        Returns
        -------
        Scalar tensor.
        """
        p = is_selected(self.p_star).to(W.dtype) if self.decided else self.p_star
        rate = self.lambda1 * p + self.spike_rate * (1.0 - p)
        terms = rate * W.abs()
        if group_weights is None:
            return terms.sum()
        if terms.dim() != 3 or group_weights.shape != terms.shape[:1]:
            raise ValueError(
                f"group_weights must have one weight per group ({terms.shape[0]} groups), got "
                f"shape {tuple(group_weights.shape)}."
            )
        return (terms.sum((1, 2)) * group_weights.to(terms)).sum()

    @torch.no_grad()
    def inclusion_logits(self, W: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
        """Log-odds of ``gamma_jk = 1`` given ``W`` and ``eta``, computed in log space.

        Parameters
        ----------
        W
            The mask, shape ``(n_genes, n_factors)`` (``(n_groups, n_genes, n_factors)`` with
            groups).
        eta
            Factor weights, shape ``(n_factors,)`` (``(n_groups, n_factors)``).

        Returns
        -------
        Tensor of the shape of ``W``.
        """
        absw = W.abs()
        eta = eta.unsqueeze(-2)  # broadcast over genes
        log_slab = torch.log(eta) + math.log(self.lambda1 / 2.0) - self.lambda1 * absw
        lam0 = self.spike_rate
        log_spike = torch.log1p(-eta) + math.log(lam0 / 2.0) - lam0 * absw
        return log_slab - log_spike

    @torch.no_grad()
    def em_step(self, W: torch.Tensor, update_eta: bool = True) -> None:
        """One EM update: ``p*`` from ``W`` and the current ``eta``, then ``eta`` from ``p*``.

        Parameters
        ----------
        W
            The mask, shape ``(n_genes, n_factors)`` (``(n_groups, n_genes, n_factors)`` with
            groups).
        update_eta
            Also run the M-step for ``eta`` (``False`` keeps ``eta`` fixed, as the training plan
            does while the spike rate climbs to ``lambda0``).
        """
        if self.decided:
            raise RuntimeError("The selection is decided; call release() before em_step().")
        W = W.detach().to(self.p_star.dtype)
        p = torch.sigmoid(self.inclusion_logits(W, self.eta))
        self.p_star.copy_(p)
        if update_eta:
            self.eta.copy_(self._eta_from(p))

    def _eta_from(self, p: torch.Tensor) -> torch.Tensor:
        """The M-step: each factor's weight ``eta`` from its inclusion probabilities."""
        eta = (p.sum(-2) + self.a - 1.0) / (self.a + self.b + self.n_genes - 2.0)
        return eta.clamp(_ETA_EPS, 1.0 - _ETA_EPS)

    @torch.no_grad()
    def decide(self, p_star: torch.Tensor) -> None:
        """Fix the selection: set ``p*`` (and ``eta`` by the M-step) and stop it moving.

        The training plan calls it with ``p*`` averaged over the last epochs, so that the
        selection does not depend on the minibatch of the last EM step; the network then
        refits to the decided mask (see :class:`~sparsevae.train.SparseVAETrainingPlan`).

        Parameters
        ----------
        p_star
            Inclusion probabilities, of the shape of :attr:`p_star`.
        """
        if p_star.shape != self.p_star.shape:
            raise ValueError(
                f"p_star must have shape {tuple(self.p_star.shape)}, got {tuple(p_star.shape)}."
            )
        p = p_star.to(self.p_star)
        self.p_star.copy_(p)
        self.eta.copy_(self._eta_from(p))
        self.decided = True

    def release(self) -> None:
        """Let ``p*`` move again (EM) after :meth:`decide`."""
        self.decided = False
