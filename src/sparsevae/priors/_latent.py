"""Priors of the factors beyond ``N(0, I)``: conditional on a covariate (iVAE), a mixture (GMVAE).

Both leave the decoder and its mask alone: they change only the KL term of the ELBO.

- :class:`ConditionalPrior` (Khemakhem et al., AISTATS 2020): ``p(z | u) = prod_k N(z_k;
  mu_k(u), sigma_k^2(u))`` for an observed auxiliary variable ``u``. When the factors'
  distribution changes enough across ``u``, they are identifiable up to permutation and
  elementwise maps, even with a dense decoder.
- :class:`MixturePrior` (Dilokthanakul et al. 2016): ``p(z) = sum_c pi_c N(z; mu_c,
  sigma_c^2)``, built on scvi-tools' :class:`~scvi.module.base.MogPrior`, with a symmetric
  Dirichlet prior on the weights ``pi`` (the c*GM-VAE variant) and cluster probabilities
  ``p(c | z)`` in closed form.
"""

from __future__ import annotations

import torch
from scvi.module.base import MogPrior
from torch import nn
from torch.distributions import Normal

__all__ = ["ConditionalPrior", "MixturePrior"]

#: Bounds of the prior's log-variances (keeps exp() finite and the KL well conditioned).
_LOG_VAR_BOUND = 6.0
#: A mixture component whose weight falls below this share of ``1 / n_components`` is re-seeded.
RESEED_SHARE = 0.1


class ConditionalPrior(nn.Module):
    """Conditionally factorial Gaussian prior ``p(z | u)`` of the iVAE.

    Parameters
    ----------
    n_latent
        Number of factors.
    n_categories
        Categorical ``u``: number of categories; each category has its own learned mean and
        log-variance per factor. ``None`` for a continuous ``u``.
    n_hidden
        Continuous ``u``: hidden width of the small network ``u -> (mu(u), log sigma^2(u))``.
    u_loc, u_scale
        Continuous ``u``: mean and standard deviation of ``u`` on the training data (``u`` is
        standardised before the network).

    Notes
    -----
    The prior starts at ``N(0, I)`` for every ``u`` (zero means and log-variances), so training
    begins as a plain VAE and moves away from it only as far as the data ask.
    """

    def __init__(
        self,
        n_latent: int,
        n_categories: int | None = None,
        n_hidden: int = 32,
        u_loc: float = 0.0,
        u_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.n_latent = int(n_latent)
        self.n_categories = None if n_categories is None else int(n_categories)
        if self.n_categories is not None:
            if self.n_categories < 2:
                raise ValueError(f"n_categories must be >= 2, got {n_categories}.")
            self.mean = nn.Parameter(torch.zeros(self.n_categories, self.n_latent))
            self.log_var = nn.Parameter(torch.zeros(self.n_categories, self.n_latent))
        else:
            if not u_scale > 0:
                raise ValueError(f"u_scale must be positive, got {u_scale}.")
            self.net = nn.Sequential(
                nn.Linear(1, n_hidden), nn.Tanh(), nn.Linear(n_hidden, 2 * self.n_latent)
            )
            with torch.no_grad():  # start at N(0, I) for every u
                self.net[-1].weight.zero_()
                self.net[-1].bias.zero_()
            self.register_buffer("u_loc", torch.tensor(float(u_loc)))
            self.register_buffer("u_scale", torch.tensor(float(u_scale)))

    @property
    def is_categorical(self) -> bool:
        """Whether ``u`` is categorical."""
        return self.n_categories is not None

    def params(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of ``p(z | u)``.

        Parameters
        ----------
        u
            ``(n_cells, 1)``: category codes (categorical) or values (continuous).

        Returns
        -------
        Mean and log-variance, each ``(n_cells, n_latent)``.
        """
        if self.is_categorical:
            codes = u.reshape(-1).long()
            mean, log_var = self.mean[codes], self.log_var[codes]
        else:
            v = (u.reshape(-1, 1).to(self.u_loc.dtype) - self.u_loc) / self.u_scale
            mean, log_var = self.net(v).chunk(2, dim=-1)
        return mean, log_var.clamp(-_LOG_VAR_BOUND, _LOG_VAR_BOUND)

    def forward(self, u: torch.Tensor, like: torch.Tensor | None = None) -> Normal:
        """The prior ``p(z | u)``.

        Parameters
        ----------
        u
            ``(n_cells, 1)`` auxiliary values.
        like
            Optional tensor of factors whose leading (sample) dimensions the prior is broadcast
            to, e.g. ``(n_samples, n_cells, n_latent)``.

        Returns
        -------
        A :class:`~torch.distributions.Normal` with batch shape ``(n_cells, n_latent)``
        (or ``like.shape``).
        """
        mean, log_var = self.params(u)
        scale = torch.exp(0.5 * log_var)
        if like is not None and like.dim() > mean.dim():
            mean, scale = mean.expand_as(like), scale.expand_as(like)
        return Normal(mean, scale)


class MixturePrior(MogPrior):
    """Gaussian-mixture prior of the factors with a Dirichlet prior on the weights.

    ``p(pi) = Dir(alpha)``, ``p(c | pi) = Cat(pi)``, ``p(z | c) = N(mu_c, sigma_c^2)``, on
    scvi-tools' :class:`~scvi.module.base.MogPrior` (whose ``kl`` is a Monte Carlo estimate
    with 30 draws). The components' means, scales and weights are not moved by the gradient:
    they are placed by k-means (:meth:`init_components`) and then refitted to the training
    cells' posteriors by EM (:meth:`em_update`, the maximiser of the ELBO's ``E_q[log p(z)]``
    with closed-form responsibilities). Moved by the gradient alongside an encoder that is
    still reorganising the factors, the components lose track of the clusters and one broad
    component takes every cell (measured in the user guide, "Priors of the factors").

    Parameters
    ----------
    n_components
        Number of mixture components (clusters).
    n_latent
        Number of factors.
    alpha
        Concentration of the symmetric Dirichlet prior on the weights. ``alpha > 1`` keeps
        every component in use (the penalty ``-(alpha - 1) sum_c log pi_c`` grows without bound
        as a weight goes to zero); ``alpha = 1`` is a flat prior (the plain GMVAE).
    """

    def __init__(self, n_components: int, n_latent: int, alpha: float = 2.0) -> None:
        if int(n_components) < 2:
            raise ValueError(f"n_components must be >= 2, got {n_components}.")
        if not alpha >= 1.0:
            raise ValueError(f"alpha must be >= 1, got {alpha}.")
        super().__init__(int(n_components), int(n_latent))
        for param in (self.prior_means, self.prior_log_scales, self.prior_logits):
            param.requires_grad_(False)  # fitted by EM (em_update), not by the optimiser
        self.n_components = int(n_components)
        self.alpha = float(alpha)
        # Whether the component means have been placed on the data (see init_components).
        self.register_buffer("initialised", torch.tensor(False))
        # Number of re-seedings of almost empty components so far (see em_update).
        self.register_buffer("n_reseeded", torch.tensor(0))
        # The frame the components were fitted in: the posteriors' aggregate mean and spread at
        # the last EM update (see _standardise); responsibilities() maps factors into it.
        self.register_buffer("frame_loc", torch.zeros(int(n_latent)))
        self.register_buffer("frame_scale", torch.ones(int(n_latent)))

    def weights(self) -> torch.Tensor:
        """Mixture weights ``pi``.

        Returns
        -------
        ``(n_components,)`` tensor summing to 1.
        """
        return torch.softmax(self.prior_logits, dim=0)

    def scales(self) -> torch.Tensor:
        """Component standard deviations (as :class:`~scvi.module.base.MogPrior` uses them).

        Returns
        -------
        ``(n_components, n_latent)`` tensor.
        """
        return torch.exp(self.prior_log_scales) + 1e-4

    def dirichlet_penalty(self) -> torch.Tensor:
        """Negative log Dirichlet(``alpha``) density of the weights, up to a constant.

        Returns
        -------
        Scalar tensor ``-(alpha - 1) sum_c log pi_c``.
        """
        log_pi = torch.log_softmax(self.prior_logits, dim=0)
        return -(self.alpha - 1.0) * log_pi.sum()

    def log_joint(self, z: torch.Tensor) -> torch.Tensor:
        """``log pi_c + log N(z; mu_c, sigma_c^2)`` for every cell and component.

        Parameters
        ----------
        z
            ``(n_cells, n_latent)`` factors.

        Returns
        -------
        ``(n_cells, n_components)``.
        """
        comp = Normal(self.prior_means, self.scales())
        log_norm = comp.log_prob(z.unsqueeze(-2)).sum(-1)
        return log_norm + torch.log_softmax(self.prior_logits, dim=0)

    def responsibilities(self, z: torch.Tensor) -> torch.Tensor:
        """Cluster probabilities ``p(c | z)`` in closed form.

        The factors are first mapped into the frame the components were fitted in (the training
        posteriors standardised at the last EM update, see :meth:`em_update`).

        Parameters
        ----------
        z
            ``(n_cells, n_latent)`` factors (e.g. posterior means).

        Returns
        -------
        ``(n_cells, n_components)``, rows summing to 1.
        """
        z = (z.to(self.frame_loc) - self.frame_loc) / self.frame_scale
        return torch.softmax(self.log_joint(z), dim=-1)

    @torch.no_grad()
    def init_components(
        self, z: torch.Tensor, var: torch.Tensor | None = None, n_init: int = 10, seed: int = 0
    ) -> None:
        """Place the components on the data: k-means (scikit-learn) on the factors ``z``.

        Started from random means near 0, every cell falls into one component or the
        assignments stay uniform (the GMVAE's known failure modes); placing the means on
        clusters of the factors learned so far avoids both.

        Parameters
        ----------
        z
            ``(n_cells, n_latent)`` posterior means of training cells.
        var
            Their posterior variances (default zeros); k-means runs on the standardised means
            (see :meth:`em_update`).
        n_init
            k-means restarts (the best is kept).
        seed
            Seed of k-means.
        """
        from sklearn.cluster import KMeans

        z, _ = self._standardise(z, torch.zeros_like(z) if var is None else var)
        n, C = z.shape[0], self.n_components
        if n < C:
            raise ValueError(f"init_components needs at least {C} cells, got {n}.")
        kmeans = KMeans(C, n_init=n_init, random_state=seed).fit(z.cpu().double().numpy())
        mu = torch.as_tensor(kmeans.cluster_centers_, dtype=z.dtype, device=z.device)
        assign = torch.as_tensor(kmeans.labels_, device=z.device)
        counts = torch.bincount(assign, minlength=C).to(z.dtype)
        log_scales = torch.empty_like(mu)
        overall = z.std(0).clamp_min(1e-3)
        for c in range(C):
            members = z[assign == c]
            sd = members.std(0) if len(members) > 1 else overall
            log_scales[c] = torch.log(sd.clamp_min(0.05 * float(overall.mean())))
        self.prior_means.copy_(mu)
        self.prior_log_scales.copy_(log_scales)
        self.prior_logits.copy_(torch.log((counts + 1.0) / (n + C)))
        self.initialised.fill_(True)

    def _standardise(
        self, mean: torch.Tensor, var: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Posteriors shifted and scaled so that their aggregate has mean 0 and variance 1.

        The gauge of the mixture: fitted to standardised posteriors, its marginal is
        standardised as ``N(0, I)`` is. The ELBO leaves the factors' scale free (the decoder
        absorbs it); fitted to the raw posteriors, the mixture lets the factors drift to ever
        larger values.
        """
        mean, var = mean.to(self.prior_means), var.to(self.prior_means)
        centre = mean.mean(0)
        spread = (mean.var(0, unbiased=False) + var.mean(0)).sqrt().clamp_min(1e-6)
        self.frame_loc.copy_(centre)
        self.frame_scale.copy_(spread)
        return (mean - centre) / spread, var / spread.pow(2)

    @torch.no_grad()
    def em_update(self, mean: torch.Tensor, var: torch.Tensor, n_iter: int = 3) -> None:
        """Refit the components to the cells' posteriors ``N(mean_i, var_i)`` by EM.

        Each iteration computes the responsibilities ``r_ic = p(c | mean_i)`` and sets ``pi_c``
        (MAP under the Dirichlet prior), ``mu_c = sum_i r_ic mean_i / n_c`` and ``sigma_c^2 =
        sum_i r_ic ((mean_i - mu_c)^2 + var_i) / n_c``: the maximiser of ``sum_i E_q[log p(z_i)]``
        over the mixture for fixed responsibilities. The posteriors are first shifted and scaled
        to mean 0 and variance 1 in every factor (the factors' scale is a gauge the ELBO leaves
        free; ``N(0, I)`` fixes it the same way); the KL term brings the posteriors along.

        Parameters
        ----------
        mean, var
            ``(n_cells, n_latent)`` posterior means and variances of training cells.
        n_iter
            EM iterations.
        """
        mean, var = self._standardise(mean, var)
        self._em(mean, var, n_iter)
        # An (almost) empty component is re-seeded at the worst-explained cell and refitted: EM
        # alone never splits a component that holds two clusters.
        weights = self.weights()
        small = torch.nonzero(weights < RESEED_SHARE / self.n_components).flatten()
        if len(small):
            for c in small.tolist():
                worst = int(torch.logsumexp(self.log_joint(mean), dim=-1).argmin())
                self.prior_means[c] = mean[worst]
                self.prior_log_scales[c] = self.prior_log_scales[weights.argmax()]
                self.prior_logits[c] = float(torch.log(weights.max()))
            self.n_reseeded += len(small)
            self._em(mean, var, n_iter)

    @torch.no_grad()
    def _em(self, mean: torch.Tensor, var: torch.Tensor, n_iter: int) -> None:
        """EM iterations on standardised posteriors (see :meth:`em_update`)."""
        n, C = mean.shape[0], self.n_components
        floor = 1e-4 * float(var.mean().clamp_min(1e-8))
        for _ in range(n_iter):
            r = torch.softmax(self.log_joint(mean), dim=-1)  # (n, C), in the fitted frame
            n_c = r.sum(0)
            pi = (n_c + self.alpha - 1.0) / (n + C * (self.alpha - 1.0))
            keep = n_c > 1e-6  # an empty component keeps its place (alpha > 1 refills it)
            mu = (r.T @ mean) / n_c.clamp_min(1e-12).unsqueeze(1)
            second = r.T @ (mean.pow(2) + var) / n_c.clamp_min(1e-12).unsqueeze(1)
            sd2 = (second - mu.pow(2)).clamp_min(floor)
            self.prior_means[keep] = mu[keep]
            self.prior_log_scales[keep] = 0.5 * torch.log(sd2[keep])
            self.prior_logits.copy_(torch.log(pi.clamp_min(1e-12)))
