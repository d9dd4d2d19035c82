"""Variational Sparse Coding (Tonolini, Jensen and Murray-Smith, ECML-PKDD 2020): a baseline.

A VAE whose prior and posterior on each latent code are spike-and-slab:

- prior ``p(z_k) = alpha N(z_k; 0, 1) + (1 - alpha) delta_0(z_k)``;
- posterior ``q(z_k | x) = gamma_k N(z_k; mu_k, sigma_k^2) + (1 - gamma_k) delta_0(z_k)`` with
  ``mu``, ``sigma`` and ``gamma`` given by the encoder;
- KL per code (the paper's eq. 6, closed form):
  ``gamma_k KL(N(mu_k, sigma_k^2) || N(0, 1)) + KL(Bern(gamma_k) || Bern(alpha))``;
- reparameterisation: ``z_k = s_k (mu_k + sigma_k eps_k)`` with the relaxed spike selector
  ``s_k = sigmoid(c (u_k + gamma_k - 1))``, ``u_k ~ U(0, 1)``, ``c = 50``.

The decoder is a plain MLP (``K -> H -> H -> G``, ReLU) with a Gaussian likelihood and a learned
variance per feature on standardised data, the same function class as the VAE baseline. The code
of a cell is the posterior mean ``gamma * mu``. This is a baseline for ``benchmarks/``, not a part
of the package; the pseudo-input prior recycling of the paper is left out (a fixed ``alpha``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class VSC(nn.Module):
    """Variational Sparse Coding VAE for continuous data.

    Parameters
    ----------
    n_input
        Number of features.
    n_latent
        Number of latent codes.
    n_hidden
        Hidden width of the encoder and decoder.
    alpha
        Prior probability that a code is active (the slab weight).
    c
        Steepness of the relaxed spike selector.
    """

    def __init__(
        self,
        n_input: int,
        n_latent: int,
        n_hidden: int = 100,
        alpha: float = 0.5,
        c: float = 50.0,
    ) -> None:
        super().__init__()
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}.")
        self.alpha = float(alpha)
        self.c = float(c)
        self.encoder = nn.Sequential(nn.Linear(n_input, n_hidden), nn.ReLU())
        self.mu = nn.Linear(n_hidden, n_latent)
        self.logvar = nn.Linear(n_hidden, n_latent)
        self.logit_gamma = nn.Linear(n_hidden, n_latent)
        self.decoder = nn.Sequential(
            nn.Linear(n_latent, n_hidden),
            nn.ReLU(),
            nn.Linear(n_hidden, n_hidden),
            nn.ReLU(),
            nn.Linear(n_hidden, n_input),
        )
        self.log_sigma2 = nn.Parameter(torch.zeros(n_input))
        self.register_buffer("loc", torch.zeros(n_input))
        self.register_buffer("scale", torch.ones(n_input))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``mu``, ``logvar`` and ``gamma`` of the posterior for standardised ``x``."""
        h = self.encoder(x)
        gamma = torch.sigmoid(self.logit_gamma(h)).clamp(1e-6, 1 - 1e-6)
        return self.mu(h), self.logvar(h).clamp(-10, 10), gamma

    def loss(self, x: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
        """Negative ELBO per cell (mean over the minibatch) for standardised ``x``."""
        mu, logvar, gamma = self.encode(x)
        eps = torch.randn_like(mu)
        u = torch.rand_like(gamma)
        selector = torch.sigmoid(self.c * (u + gamma - 1.0))
        z = selector * (mu + torch.exp(0.5 * logvar) * eps)
        mean = self.decoder(z)
        var = torch.exp(self.log_sigma2)
        nll = 0.5 * (((x - mean) ** 2) / var + self.log_sigma2 + np.log(2 * np.pi)).sum(-1)
        a = self.alpha
        kl_slab = 0.5 * (mu**2 + torch.exp(logvar) - 1.0 - logvar)
        kl_spike = gamma * torch.log(gamma / a) + (1 - gamma) * torch.log((1 - gamma) / (1 - a))
        kl = (gamma * kl_slab + kl_spike).sum(-1)
        return (nll + beta * kl).mean()

    def fit(
        self,
        x: np.ndarray,
        epochs: int = 300,
        batch_size: int = 128,
        lr: float = 1e-3,
        seed: int = 0,
    ) -> VSC:
        """Fit by Adam on minibatches; the data are standardised with their own mean and sd.

        Parameters
        ----------
        x
            Data, ``(n_cells, n_features)``.
        epochs, batch_size, lr
            Optimisation settings.
        seed
            Random seed (initialisation is seeded by the caller's ``torch.manual_seed``).

        Returns
        -------
        ``self``.
        """
        x_t = torch.as_tensor(np.asarray(x), dtype=torch.float32)
        self.loc.copy_(x_t.mean(0))
        self.scale.copy_(x_t.std(0).clamp_min(1e-8))
        x_s = (x_t - self.loc) / self.scale
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        n = x_s.shape[0]
        self.train()
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n, batch_size):
                idx = perm[start : start + batch_size]
                loss = self.loss(x_s[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.eval()
        return self

    @torch.no_grad()
    def transform(self, x: np.ndarray) -> np.ndarray:
        """Codes (posterior means ``gamma * mu``) of cells ``x`` (original units)."""
        x_s = (torch.as_tensor(np.asarray(x), dtype=torch.float32) - self.loc) / self.scale
        mu, _, gamma = self.encode(x_s)
        return (gamma * mu).numpy()

    @torch.no_grad()
    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        """Decoded means of cells ``x`` from their codes, in original units."""
        z = torch.as_tensor(self.transform(x))
        return (self.loc + self.scale * self.decoder(z)).numpy()

    def decode_standardised(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder output on the standardised scale (for Jacobians)."""
        return self.decoder(z)
