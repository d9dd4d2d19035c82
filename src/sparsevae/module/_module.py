"""The Sparse VAE torch module: encoder, masked decoder, likelihoods and loss."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scvi import REGISTRY_KEYS
from scvi.distributions import NegativeBinomial, ZeroInflatedNegativeBinomial
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from scvi.nn import Encoder
from torch import nn
from torch.distributions import MultivariateNormal, Normal, Poisson, kl_divergence

from ..nn import MaskedDecoder
from ..priors import ConditionalPrior, MixturePrior, SpikeSlabLasso, is_selected
from ._rotation import varimax

__all__ = [
    "AUXILIARY_KEY",
    "COUNT_DEFAULTS",
    "DEFAULT_PRIOR_CELLS",
    "LATENT_PRIORS",
    "LIKELIHOODS",
    "STUDY_KEY",
    "ModuleMask",
    "SparseVAEModule",
]

#: Registry key of the study index (multi-study models).
STUDY_KEY = "study"
#: Registry key of the auxiliary variable ``u`` of the conditional prior.
AUXILIARY_KEY = "auxiliary"

LATENT_PRIORS = ("normal", "correlated", "conditional", "mixture")

LIKELIHOODS = ("gaussian", "nb", "zinb", "poisson")
Likelihood = Literal["gaussian", "nb", "zinb", "poisson"]

#: Total count that the encoder's input is normalised to (counts likelihoods).
_ENCODER_SCALE = 1e4


@dataclass(frozen=True)
class ModuleMask:
    """One mask of the module, as :meth:`SparseVAEModule.masks` lists them.

    Attributes
    ----------
    study
        ``None`` for the shared mask, else the study's index.
    W
        The mask entries, genes x factors (a view of the decoder's parameter).
    p_star
        Inclusion probabilities, genes x factors (``None`` without a mask prior).
    eta
        Prior inclusion weights, per factor (``None`` without a mask prior).
    """

    study: int | None
    W: torch.Tensor
    p_star: torch.Tensor | None
    eta: torch.Tensor | None


#: Default ``prior_cells``: ``None``, the exact MAP weight (the prior against all ``N`` cells).
DEFAULT_PRIOR_CELLS: float | None = None

#: Module options that :class:`~sparsevae.SparseVAE` fills in for models with a count likelihood
#: and the mask prior, where the user does not pass them: spike gates on every mask and the
#: prior weighed against at most 200 cells (each study's specific mask against at most 200 of
#: its own). Pass ``spike_gate=False, prior_cells=None`` for the exact MAP weight without gates
#: (user guide, "Why the defaults are what they are").
COUNT_DEFAULTS: dict[str, bool | float] = {"spike_gate": True, "prior_cells": 200.0}


class SparseVAEModule(BaseModuleClass):
    """Sparse VAE module (Moran et al. 2022) with count and Gaussian likelihoods.

    Parameters
    ----------
    n_input
        Number of genes.
    n_factors
        Number of latent factors ``K``.
    n_hidden
        Hidden width of the encoder and of the decoder's shared network.
    n_layers
        Number of hidden layers of the decoder's shared network.
    n_layers_encoder
        Number of hidden layers of the encoder.
    likelihood
        ``"gaussian"``, ``"nb"``, ``"zinb"`` or ``"poisson"``.
    mask
        ``"ssl"`` learns the mask ``W`` under a Spike-and-Slab Lasso prior; ``None`` fixes
        ``W`` to ones (the plain VAE).
    lambda0, lambda1, a, b
        Spike-and-Slab Lasso hyperparameters, see :class:`~sparsevae.priors.SpikeSlabLasso`.
    weight_prior_precision
        Precision ``tau`` of a zero-mean Gaussian prior on the decoder network's free-scale weights
        (not the mask, not the biases). The decoder has exact rescaling symmetries (scale part
        of ``W`` up and a layer down, same function), so without such a prior the mask penalty
        drives ``W`` to zero for free. With ``normalize_shared`` the prior is on the per-gene
        heads only, otherwise on all layers. ``0`` turns it off.
    normalize_shared
        Unit-norm shared layers in the decoder (see :class:`~sparsevae.nn.MaskedDecoder`), which
        makes the scale of ``W`` independent of the number of genes. Default: ``True`` for count
        likelihoods, ``False`` for ``"gaussian"`` (measurements: user guide, "Why the defaults
        are what they are").
    kl_weight
        Weight of the KL term (``beta`` of a beta-VAE); multiplied by the training plan's warm-up
        factor.
    dropout_rate
        Dropout rate of the encoder.
    sigma_prior_df, sigma_prior_scale
        Gaussian likelihood only: scaled-inverse-chi-squared prior on the per-gene variances,
        ``sigma_j^2 ~ Inv-Gamma(df / 2, df * scale / 2)``.
    gene_offset
        Count likelihoods: initial value of the per-gene output bias (log mean frequency).
        Speeds up the start of training.
    gene_loc, gene_scale
        Gaussian likelihood: per-gene mean and standard deviation of the training data. The
        network works on standardised values, ``x_j = loc_j + scale_j (f_j(w_j * z) + e_j)``:
        the same model family, but every gene weighs the same in the gradients at the start of
        training and the variance prior is scale-free. Defaults: 0 and 1.
    max_chunk_elements
        Passed to :class:`~sparsevae.nn.MaskedDecoder`.
    n_specific_factors
        Multi-study: number of study-specific factors ``K_spec`` (0, the default: the
        single-study model). The latent vector is ``[z_shared (n_factors), z_specific
        (K_spec)]``; the decoder's shared mask ``W`` (genes x ``n_factors``) is common to all
        studies and ``W_specific`` (studies x genes x ``K_spec``) holds each study's own mask.
        Each mask has its own Spike-and-Slab Lasso prior (and ``eta``), with the same
        hyperparameters; the specific priors live in ``prior_specific``.
    n_studies
        Multi-study: number of studies.
    study_shares
        Multi-study: each study's share of the cells (default: equal shares). With
        ``prior_cells``, study ``s``'s specific mask is weighed against ``min(N_s,
        prior_cells)`` of its own ``N_s`` cells (:meth:`specific_prior_weights`).
    composition_offset
        Count likelihoods: add a cell-level offset ``c(z_i)``, one number per cell computed by a
        small network (``n_factors`` -> ``n_hidden`` -> 1, output zero at the start) from all
        factors, to every gene's log mean: ``log mu_ij = head_j(f(w_j * z_i)) + log l_i +
        c(z_i)``. Counts measure each gene's *share* of the cell's transcripts, so when a
        program raises its genes every other gene's share falls a little; without the offset a
        gene outside every program looks weakly dependent on every factor, and with enough
        cells the likelihood outweighs the mask prior and selects it. The offset is common to
        all genes of a cell, so it cannot explain a gene-specific change and the mask keeps its
        reading (gene ``j``'s expression relative to the cell's composition depends only on the
        factors in ``w_j``). Default ``True``; ignored by the Gaussian likelihood.
    latent_prior
        Prior of the factors: ``"normal"`` (``z ~ N(0, I)``), ``"correlated"`` (``z ~ N(0,
        R)`` with ``R`` a correlation matrix, unit diagonal, learned with the other global
        parameters), ``"conditional"`` (the iVAE's ``p(z | u)``, see
        :class:`~sparsevae.priors.ConditionalPrior`; needs ``n_auxiliary_categories`` or a
        continuous ``u``) or ``"mixture"`` (a Gaussian mixture with a Dirichlet prior on its
        weights, see :class:`~sparsevae.priors.MixturePrior`; ``n_components``). Default
        ``"normal"``, the paper's prior. The identifiability theorem allows
        correlated factors (``min(Var z_k, Var z_k') > |Cov(z_k, z_k')|``), but with ``N(0, I)``
        the ELBO charges correlated codes ``-0.5 log det(corr)`` nats per cell (the aggregate
        posterior's mismatch with the prior), far more than the mask prior rewards a sparse
        mask; the fit then rotates correlated factors apart and loads one code on every
        feature. Use ``"correlated"`` when the factors are expected to be correlated; it is not
        the default because it is not yet measured widely enough (user guide, "Why the defaults
        are what they are", and the benchmarks page).
    encode_study
        Multi-study: give the encoder each cell's study (one-hot) as an extra input. Off by
        default: with it, the encoder can give a shared factor a different distribution in each
        study, which lets a shared factor carry study-specific programs and the specific masks
        copy shared ones (user guide, "Why the defaults are what they are"). Without it the
        factors are read from expression alone, the same way in every study.
    spike_gate
        Once the mask prior is at full strength, the decoder sees the entries the prior puts in
        the spike (``p* < 0.5``) as exactly zero; their gradient still passes through, so the
        likelihood can pull an entry back into the slab. Without the gates a small ``|w_jk|``
        still carries signal (the per-gene head makes up for its size), so "not selected" does
        not mean "not used" and a stronger prior empties the masks instead of thinning them.
        Use it with ``prior_cells`` (e.g. ``spike_gate=True, prior_cells=200``) for sparse masks
        with anchors on real counts. ``"specific"`` gates the study-specific masks only: use it
        for multi-study models on real counts, where a program of one study is carried by that
        study's specific factor but, that factor selecting few genes (a small ``eta``), stays
        below ``p* = 0.5`` without gates. Default ``None`` (off) here;
        :class:`~sparsevae.SparseVAE` models on counts turn it on (:data:`COUNT_DEFAULTS`).
        Off for the Gaussian likelihood: on the paper's simulation the gates left one feature
        at ``p*`` 0.53 on the wrong factor (user guide, "Why the defaults are what they are").
    prior_cells
        The decoder's prior (mask penalty and weight prior) is weighed against at most this many
        cells: the per-cell loss adds ``penalty / min(N, prior_cells)``. Up to ``prior_cells``
        training cells this is the exact MAP weight (``penalty / N``); beyond, a gene is selected
        when the average evidence per cell for its dependence is large enough, not merely its sum
        (which grows with ``N`` until every weak dependence is selected). Set it (e.g. 200,
        together with ``spike_gate=True``) for sparse masks with anchors on real counts with
        thousands of cells; lower is sparser. Multi-study: each study's specific mask is weighed
        against at most ``prior_cells`` of its own cells (see ``study_shares``). Default
        ``None``, the exact MAP weight here (200 lost factors on the paper's Gaussian
        simulation); :class:`~sparsevae.SparseVAE` models on counts use 200
        (:data:`COUNT_DEFAULTS`). Measurements in the user guide, "Why the defaults are what
        they are".
    n_auxiliary_categories
        ``latent_prior="conditional"`` with a categorical ``u``: its number of categories
        (``None`` for a continuous ``u``).
    auxiliary_loc, auxiliary_scale
        ``latent_prior="conditional"`` with a continuous ``u``: its mean and standard deviation
        on the training data.
    encode_auxiliary
        ``latent_prior="conditional"``: give the encoder ``u`` as an extra input (one-hot, or the
        standardised value), ``q(z | x, u)`` as in the iVAE. Off by default: the factors are
        read from expression alone and only the prior ties them to ``u``.
    n_components
        ``latent_prior="mixture"``: number of mixture components (cell clusters).
    mixture_alpha
        ``latent_prior="mixture"``: concentration of the Dirichlet prior on the mixture weights
        (``>= 1``; above 1 keeps every component in use).
    """

    def __init__(
        self,
        n_input: int,
        n_factors: int = 15,
        n_hidden: int = 100,
        n_layers: int = 2,
        n_layers_encoder: int = 1,
        likelihood: Likelihood = "nb",
        mask: Literal["ssl"] | None = "ssl",
        lambda0: float = 10.0,
        lambda1: float = 1.0,
        a: float = 1.0,
        b: float | None = None,
        weight_prior_precision: float | None = None,
        normalize_shared: bool | None = None,
        kl_weight: float = 1.0,
        dropout_rate: float = 0.1,
        sigma_prior_df: float = 3.0,
        sigma_prior_scale: float = 1.0,
        gene_offset: torch.Tensor | None = None,
        gene_loc: torch.Tensor | None = None,
        gene_scale: torch.Tensor | None = None,
        max_chunk_elements: int = 2**20,
        n_specific_factors: int = 0,
        n_studies: int = 1,
        study_shares: Sequence[float] | None = None,
        encode_study: bool = False,
        composition_offset: bool | None = None,
        latent_prior: Literal["normal", "correlated"] | None = None,
        spike_gate: bool | Literal["specific"] | None = None,
        prior_cells: float | None = DEFAULT_PRIOR_CELLS,
        n_auxiliary_categories: int | None = None,
        auxiliary_loc: float = 0.0,
        auxiliary_scale: float = 1.0,
        encode_auxiliary: bool = False,
        n_components: int = 10,
        mixture_alpha: float = 2.0,
    ) -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}.")
        if mask not in ("ssl", None):
            raise ValueError(f"mask must be 'ssl' or None, got {mask!r}.")
        self.n_input = n_input
        self.n_factors = n_factors
        if n_specific_factors < 0 or n_studies < 1:
            raise ValueError(
                f"n_specific_factors must be >= 0 and n_studies >= 1, got {n_specific_factors} "
                f"and {n_studies}."
            )
        self.n_specific_factors = int(n_specific_factors)
        self.n_studies = int(n_studies)
        self.is_multistudy = self.n_specific_factors > 0
        self.encode_study = bool(encode_study) and self.is_multistudy
        self.likelihood = likelihood
        self.mask = mask
        self.kl_weight = float(kl_weight)
        if normalize_shared is None:
            normalize_shared = likelihood != "gaussian"
        if weight_prior_precision is None:
            weight_prior_precision = 1.0
        if weight_prior_precision < 0:
            raise ValueError(f"weight_prior_precision must be >= 0, got {weight_prior_precision}.")
        self.weight_prior_precision = float(weight_prior_precision)
        # Multiplier of the mask penalty, set by the training plan during the prior warm-up.
        self.prior_scale = 1.0
        # Multi-study: whether the specific factors reach the decoder (off while the training
        # plan fits the shared factors first).
        self.specific_on = True
        # latent_prior="correlated": whether the learned correlation is used (off, R = I, while
        # the training plan holds it fixed for the first epochs).
        self.correlation_on = True
        # Free bits (nats per factor) of the training objective's KL term, set by the training
        # plan while the mask prior warms up; 0: the plain ELBO (see ``loss``). On every factor
        # (``free_bits``) and on the study-specific factors only (``free_bits_specific``).
        self.free_bits = 0.0
        self.free_bits_specific = 0.0
        self.sigma_prior_df = float(sigma_prior_df)
        self.sigma_prior_scale = float(sigma_prior_scale)
        if prior_cells is not None and (
            isinstance(prior_cells, bool)
            or not isinstance(prior_cells, numbers.Real)
            or not prior_cells > 0
        ):
            raise ValueError(
                f"prior_cells must be a positive number of cells or None, got {prior_cells!r}."
            )
        self.prior_cells = None if prior_cells is None else float(prior_cells)
        self.study_shares = self._check_study_shares(study_shares, int(n_studies))
        if spike_gate is None:
            spike_gate = False
        if not (isinstance(spike_gate, bool) or spike_gate == "specific"):
            raise ValueError(
                f"spike_gate must be True, False, 'specific' or None, got {spike_gate!r}."
            )
        # Which masks have gates: the shared mask (True only), the specific masks (both).
        self.gate_shared = spike_gate is True and mask is not None
        self.gate_specific = bool(spike_gate) and mask is not None and self.is_multistudy
        self.spike_gate = self.gate_shared or self.gate_specific
        # Whether the gates follow the prior (set by the training plan once the prior is at full
        # strength); until then every gate is open.
        self.gate_on = False
        #: Number of moves of mask columns between the shared and specific masks so far
        #: (``move_to_specific`` and the like); the training plan restarts its average of ``p*``
        #: when it changes.
        self.mask_edits = 0

        if latent_prior is None:
            latent_prior = "normal"
        if latent_prior not in LATENT_PRIORS:
            raise ValueError(f"latent_prior must be one of {LATENT_PRIORS}, got {latent_prior!r}.")
        self.latent_prior = latent_prior
        n_z = n_factors + self.n_specific_factors
        self.encode_auxiliary = bool(encode_auxiliary) and latent_prior == "conditional"
        self.n_auxiliary_categories = (
            None if n_auxiliary_categories is None else int(n_auxiliary_categories)
        )
        n_u_features = 0
        if self.encode_auxiliary:
            n_u_features = self.n_auxiliary_categories or 1
        self.encoder = Encoder(
            n_input + n_u_features,
            n_z,
            n_cat_list=[self.n_studies] if self.encode_study else None,
            n_layers=n_layers_encoder,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate,
            return_dist=True,
        )
        self.decoder = MaskedDecoder(
            n_input,
            n_factors,
            n_hidden=n_hidden,
            n_layers=n_layers,
            n_output=2 if likelihood == "zinb" else 1,
            learn_mask=mask is not None,
            max_chunk_elements=max_chunk_elements,
            normalize_shared=normalize_shared,
            n_specific=self.n_specific_factors,
            n_studies=self.n_studies,
        )
        if gene_offset is not None:
            with torch.no_grad():
                self.decoder.head_bias[:, 0] = torch.as_tensor(gene_offset, dtype=torch.float32)
        self.prior = (
            SpikeSlabLasso(n_input, n_factors, lambda0=lambda0, lambda1=lambda1, a=a, b=b)
            if mask is not None
            else None
        )
        # One prior per study-specific mask, stacked (each study has its own eta).
        self.prior_specific = (
            SpikeSlabLasso(
                n_input,
                self.n_specific_factors,
                lambda0=lambda0,
                lambda1=lambda1,
                a=a,
                b=b,
                n_groups=self.n_studies,
            )
            if mask is not None and self.is_multistudy
            else None
        )
        if latent_prior == "conditional":
            self.conditional_prior = ConditionalPrior(
                n_z,
                n_categories=self.n_auxiliary_categories,
                u_loc=auxiliary_loc,
                u_scale=auxiliary_scale,
            )
        if latent_prior == "mixture":
            self.mixture_prior = MixturePrior(n_components, n_z, alpha=mixture_alpha)
        if latent_prior == "correlated":
            # Free lower-triangular parameters of the prior's Cholesky factor (rows normalised
            # to unit length in latent_scale_tril, so the diagonal of R stays 1); 0 gives R = I.
            self.latent_tril = nn.Parameter(torch.zeros(n_z, n_z))
        if composition_offset is None:
            composition_offset = True
        self.composition_offset = bool(composition_offset) and likelihood != "gaussian"
        if self.composition_offset:
            n_z = n_factors + self.n_specific_factors
            self.offset_net = nn.Sequential(
                nn.Linear(n_z, n_hidden), nn.ReLU(), nn.Linear(n_hidden, 1)
            )
            with torch.no_grad():  # start at no offset
                self.offset_net[-1].weight.zero_()
                self.offset_net[-1].bias.zero_()
        if likelihood in ("nb", "zinb"):
            self.log_theta = nn.Parameter(torch.zeros(n_input))  # NB inverse dispersion
        if likelihood == "gaussian":
            self.log_sigma2 = nn.Parameter(torch.zeros(n_input))
            loc = torch.zeros(n_input) if gene_loc is None else torch.as_tensor(gene_loc)
            scale = torch.ones(n_input) if gene_scale is None else torch.as_tensor(gene_scale)
            if not bool((scale > 0).all()):
                raise ValueError("gene_scale must be positive.")
            self.register_buffer("gene_loc", loc.to(torch.float32).clone())
            self.register_buffer("gene_scale", scale.to(torch.float32).clone())

    @torch.no_grad()
    def non_finite_parameters(self) -> list[str]:
        """Names of the parameters and buffers that hold NaN or infinite values.

        Returns
        -------
        List of names (empty when every value is finite).
        """
        named = [*self.named_parameters(), *self.named_buffers()]
        return [name for name, t in named if t.is_floating_point() and not bool(t.isfinite().all())]

    @property
    def is_count(self) -> bool:
        """Whether the likelihood models counts."""
        return self.likelihood != "gaussian"

    # ---------------------------------------------------------------- inference / generative
    def _get_inference_input(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {
            "x": tensors[REGISTRY_KEYS.X_KEY],
            "size_factor": tensors.get(REGISTRY_KEYS.SIZE_FACTOR_KEY),
        }
        if self.is_multistudy:
            out["study"] = tensors[STUDY_KEY]
        if self.encode_auxiliary:
            out["auxiliary"] = tensors[AUXILIARY_KEY]
        return out

    def _get_generative_input(
        self, tensors: dict[str, torch.Tensor], inference_outputs: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        out = {"z": inference_outputs["z"], "library": inference_outputs["library"]}
        if self.is_multistudy:
            out["study"] = tensors[STUDY_KEY]
        if self.latent_prior == "conditional":
            out["auxiliary"] = tensors[AUXILIARY_KEY]
        return out

    @auto_move_data
    def inference(
        self,
        x: torch.Tensor,
        size_factor: torch.Tensor | None = None,
        n_samples: int = 1,
        study: torch.Tensor | None = None,
        auxiliary: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | Normal]:
        """Encode cells into the approximate posterior of their factors.

        Parameters
        ----------
        x
            Data, ``(n_cells, n_genes)``.
        size_factor
            Optional library sizes ``(n_cells, 1)``; counts default to the observed totals.
        study
            Multi-study: each cell's study index, ``(n_cells, 1)``.
        n_samples
            Number of posterior samples of ``z``.
        auxiliary
            ``encode_auxiliary``: each cell's auxiliary value ``u``, ``(n_cells, 1)``.

        Returns
        -------
        dict with ``qz`` (a Normal), ``z`` (a sample) and ``library`` (``log`` library size for
        counts, zeros for Gaussian data).
        """
        if self.is_count:
            total = x.sum(-1, keepdim=True)
            library = size_factor if size_factor is not None else total
            log_library = torch.log(library.clamp_min(1e-8))
            x_enc = torch.log1p(x * (_ENCODER_SCALE / total.clamp_min(1.0)))
        else:
            log_library = torch.zeros(x.shape[0], 1, device=x.device, dtype=x.dtype)
            x_enc = (x - self.gene_loc) / self.gene_scale
        if self.encode_auxiliary:
            if auxiliary is None:
                raise ValueError(
                    "encode_auxiliary needs each cell's auxiliary value (`auxiliary=`)."
                )
            x_enc = torch.cat([x_enc, self._auxiliary_features(auxiliary).to(x_enc)], dim=-1)
        if self.encode_study:
            if study is None:
                raise ValueError("A multi-study model needs each cell's study index (`study=`).")
            qz, z = self.encoder(x_enc, study.reshape(-1, 1).long())
        else:
            qz, z = self.encoder(x_enc)
        if n_samples > 1:
            z = qz.sample((n_samples,))
        return {"qz": qz, "z": z, "library": log_library}

    @torch.no_grad()
    def posterior(self, tensors: dict[str, torch.Tensor]) -> Normal:
        """Posterior of the factors of a minibatch (no decoding).

        Parameters
        ----------
        tensors
            Minibatch from the data loader.

        Returns
        -------
        The Normal ``q(z | x)`` with batch shape ``(n_cells, n_factors + n_specific_factors)``.
        """
        return self.inference(**self._get_inference_input(tensors))["qz"]

    def _auxiliary_features(self, auxiliary: torch.Tensor) -> torch.Tensor:
        """The encoder's view of ``u``: one-hot categories, or the standardised value."""
        prior = self.conditional_prior
        if prior.is_categorical:
            codes = auxiliary.reshape(-1).long()
            return torch.nn.functional.one_hot(codes, prior.n_categories).float()
        return (auxiliary.reshape(-1, 1).float() - prior.u_loc) / prior.u_scale

    @property
    def mixture_on(self) -> bool:
        """``latent_prior="mixture"``: whether the mixture is in use (its components are placed)."""
        return self.latent_prior == "mixture" and bool(self.mixture_prior.initialised)

    @auto_move_data
    def generative(
        self,
        z: torch.Tensor,
        library: torch.Tensor,
        study: torch.Tensor | None = None,
        auxiliary: torch.Tensor | None = None,
    ) -> dict[str, torch.distributions.Distribution]:
        """Decode factors into the distribution of the data.

        Parameters
        ----------
        z
            Factors, ``(n_cells, n_factors + n_specific_factors)``.
        library
            Log library size, ``(n_cells, 1)``; ignored by the Gaussian likelihood.
        study
            Multi-study: each cell's study index, ``(n_cells, 1)``; selects the cell's specific
            mask.
        auxiliary
            ``latent_prior="conditional"``: each cell's auxiliary value ``u``, ``(n_cells, 1)``.

        Returns
        -------
        dict with ``px`` (the likelihood) and ``pz`` (the factors' prior: standard normal, a
        multivariate normal with the learned correlation, ``p(z | u)``, or the Gaussian
        mixture; see ``latent_prior``).
        """
        z_dec = z
        if self.is_multistudy and not self.specific_on:
            # Shared factors first (training plan): the specific factors do not reach the decoder.
            keep = torch.ones(z.shape[-1], device=z.device, dtype=z.dtype)
            keep[self.n_factors :] = 0.0
            z_dec = z * keep
        out = self.decoder(z_dec, study=study)  # (B, G, O)
        eta = out[..., 0]
        if self.likelihood == "gaussian":
            scale = self.gene_scale
            px = Normal(self.gene_loc + scale * eta, scale * torch.exp(0.5 * self.log_sigma2))
        else:
            log_mu = eta + library
            if self.composition_offset:
                log_mu = log_mu + self.offset_net(z)
            mu = torch.exp(log_mu)
            if self.likelihood == "poisson":
                px = Poisson(mu)
            elif self.likelihood == "nb":
                px = NegativeBinomial(mu=mu, theta=torch.exp(self.log_theta))
            else:
                px = ZeroInflatedNegativeBinomial(
                    mu=mu, theta=torch.exp(self.log_theta), zi_logits=out[..., 1]
                )
        if self.latent_prior == "correlated":
            pz = MultivariateNormal(torch.zeros_like(z), scale_tril=self.latent_scale_tril())
        elif self.latent_prior == "conditional":
            if auxiliary is None:
                raise ValueError("latent_prior='conditional' needs each cell's `auxiliary` value.")
            pz = self.conditional_prior(auxiliary, like=z)
        elif self.mixture_on:
            pz = self.mixture_prior.get_prior(z)
        else:
            pz = Normal(torch.zeros_like(z), torch.ones_like(z))
        return {"px": px, "pz": pz}

    def latent_scale_tril(self) -> torch.Tensor:
        """Cholesky factor ``L`` of the factors' prior correlation matrix ``R = L L^T``.

        Returns
        -------
        ``(K, K)`` lower-triangular tensor with unit-length rows (identity for
        ``latent_prior="normal"``).
        """
        n_z = self.n_factors + self.n_specific_factors
        if self.latent_prior != "correlated" or not self.correlation_on:
            return torch.eye(n_z, device=self.decoder.W.device)
        eye = torch.eye(n_z, device=self.latent_tril.device, dtype=self.latent_tril.dtype)
        L = torch.tril(self.latent_tril, -1) + eye
        return L / L.norm(dim=1, keepdim=True)

    # ---------------------------------------------------------------- loss and prior
    def prior_penalty(self) -> torch.Tensor:
        """Negative log prior of the global parameters (decoder and, Gaussian, variances).

        Returns
        -------
        Scalar tensor: :meth:`decoder_prior_penalty` plus :meth:`variance_prior_penalty`.
        """
        return self.decoder_prior_penalty() + self.variance_prior_penalty()

    def decoder_prior_penalty(self, n_obs: int | None = None) -> torch.Tensor:
        """Negative log prior of the decoder: the masks' Spike-and-Slab Lasso and the weight prior.

        Multi-study: the penalties of the shared mask and of every study's specific mask are
        summed, each counted once: this is the MAP objective of the joint model. Study ``s``'s
        mask then gets likelihood gradients from its ``N_s`` cells against one prior, the same
        balance as a single-study model fitted to study ``s`` alone. With ``prior_cells``, each
        specific mask's penalty is weighted by :meth:`specific_prior_weights` so that this
        balance holds too.

        Parameters
        ----------
        n_obs
            Number of training cells (needed for those weights; ``None``: unweighted).

        Returns
        -------
        Scalar tensor (zero without a mask).
        """
        total = torch.zeros((), device=self.decoder.W.device)
        if self.prior is not None:
            total = total + self.prior_scale * self.prior.penalty(self.decoder.W)
            if self.prior_specific is not None:
                # Exact MAP (no prior_cells): every weight is 1; the plain sum keeps the
                # arithmetic (and so the fits) of the unweighted penalty.
                use = n_obs is not None and self.prior_cells is not None
                weights = self.specific_prior_weights(n_obs) if use else None
                total = total + self.prior_scale * self.prior_specific.penalty(
                    self.decoder.W_specific, weights
                )
            if self.weight_prior_precision > 0:
                total = total + 0.5 * self.weight_prior_precision * self.decoder.weight_sq_norm()
        return total

    def variance_prior_penalty(self) -> torch.Tensor:
        """Gaussian likelihood: negative log prior of the per-gene variances (else zero).

        Returns
        -------
        Scalar tensor.
        """
        if self.likelihood != "gaussian":
            return torch.zeros((), device=self.decoder.W.device)
        alpha = self.sigma_prior_df / 2.0
        beta = self.sigma_prior_df * self.sigma_prior_scale / 2.0
        s2 = self.log_sigma2
        return ((alpha + 1.0) * s2 + beta * torch.exp(-s2)).sum()

    @staticmethod
    def _check_study_shares(shares: Sequence[float] | None, n_studies: int) -> list[float]:
        """Each study's share of the cells (equal shares when ``None``), validated."""
        if shares is None:
            return [1.0 / n_studies] * n_studies
        out = [float(x) for x in shares]
        if len(out) != n_studies or not all(x >= 0 for x in out) or not sum(out) > 0:
            raise ValueError(
                f"study_shares must hold {n_studies} numbers >= 0 (not all 0), one per study, "
                f"got {shares!r}."
            )
        total = sum(out)
        return [x / total for x in out]

    def specific_prior_weights(self, n_obs: int) -> torch.Tensor:
        """Per study, the weight of its specific mask's penalty in :meth:`decoder_prior_penalty`.

        The per-cell loss divides the decoder's prior by ``min(N, prior_cells)``: the shared mask,
        which every cell informs, is weighed against at most ``prior_cells`` cells. Study ``s``'s
        mask is informed by its ``N_s`` cells only, so its weight ``min(N, prior_cells) N_s /
        (N min(N_s, prior_cells))`` weighs it against at most ``prior_cells`` of them: as in a
        single-study model fitted to study ``s`` with the same ``prior_cells``. Without
        ``prior_cells`` (exact MAP) every weight is 1.

        Parameters
        ----------
        n_obs
            Number of training cells ``N`` (``N_s`` is its share for study ``s``).

        Returns
        -------
        Tensor of shape ``(n_studies,)``.
        """
        n = float(max(n_obs, 1))
        divisor = self.prior_divisor(n_obs)
        weights = []
        for share in self.study_shares:
            n_s = max(share * n, 1.0)
            mine = n_s if self.prior_cells is None else min(n_s, self.prior_cells)
            weights.append(divisor * n_s / (n * mine))
        return torch.tensor(weights, device=self.decoder.W.device)

    def prior_divisor(self, n_obs: int) -> float:
        """Number of cells the decoder's prior is spread over: ``min(n_obs, prior_cells)``.

        Parameters
        ----------
        n_obs
            Number of training cells.

        Returns
        -------
        The divisor of :meth:`decoder_prior_penalty` in the per-cell loss.
        """
        n = float(max(n_obs, 1))
        return n if self.prior_cells is None else min(n, self.prior_cells)

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict[str, torch.Tensor],
        generative_outputs: dict[str, torch.distributions.Distribution],
        kl_weight: float = 1.0,
        n_obs: int = 1,
    ) -> LossOutput:
        """Negative ELBO per cell plus the prior on the global parameters divided by ``n_obs``.

        Parameters
        ----------
        tensors
            Minibatch from the data loader.
        inference_outputs
            Output of :meth:`inference`.
        generative_outputs
            Output of :meth:`generative`.
        kl_weight
            Warm-up factor from the training plan (multiplies the module's ``kl_weight``).
        n_obs
            Number of training cells; the prior is spread evenly over them.

        Returns
        -------
        :class:`scvi.module.base.LossOutput`.
        """
        x = tensors[REGISTRY_KEYS.X_KEY]
        px = generative_outputs["px"]
        reconst = -px.log_prob(x).sum(-1)
        qz, pz = inference_outputs["qz"], generative_outputs["pz"]
        if isinstance(pz, MultivariateNormal):
            qz = MultivariateNormal(qz.loc, scale_tril=torch.diag_embed(qz.scale))
            kl = kl_divergence(qz, pz)
        elif isinstance(pz, Normal):
            per_factor = kl_divergence(qz, pz)
            kl = per_factor.sum(-1)
        else:  # the mixture: scvi-tools' Monte Carlo estimate
            kl = self.mixture_prior.kl(qz)
        decoder_penalty = self.decoder_prior_penalty(n_obs)
        global_penalty = self.variance_prior_penalty()
        if self.latent_prior == "mixture":
            global_penalty = global_penalty + self.mixture_prior.dirichlet_penalty()
        weight = self.kl_weight * kl_weight
        free_bits = self._free_bits_per_factor()
        if self.training and free_bits is not None and isinstance(pz, Normal):
            # Free bits (Kingma et al. 2016): a factor's KL below its free bits (mean over the
            # minibatch) costs nothing, so the encoder gains nothing by collapsing a factor onto
            # the prior before the decoder has found a use for it. The reported KL is unchanged.
            free = torch.maximum(per_factor.mean(0), free_bits.to(per_factor)).sum()
            negative_elbo = torch.mean(reconst) + weight * free
        else:
            negative_elbo = torch.mean(reconst + weight * kl)
        loss = (
            negative_elbo
            + decoder_penalty / self.prior_divisor(n_obs)
            + global_penalty / max(n_obs, 1)
        )
        return LossOutput(
            loss=loss,
            reconstruction_loss=reconst,
            kl_local=kl,
            kl_global=decoder_penalty + global_penalty,
        )

    def _free_bits_per_factor(self) -> torch.Tensor | None:
        """Free bits per factor (``free_bits``; ``free_bits_specific`` on the specific factors).

        ``None`` when both are 0 (the plain KL term).
        """
        if self.free_bits <= 0 and self.free_bits_specific <= 0:
            return None
        n_z = self.n_factors + self.n_specific_factors
        bits = torch.full((n_z,), float(self.free_bits))
        bits[self.n_factors :] = max(float(self.free_bits), float(self.free_bits_specific))
        return bits

    def mask_priors(self) -> list[SpikeSlabLasso]:
        """The Spike-and-Slab Lasso priors of the masks (empty for the plain VAE).

        Returns
        -------
        List of :class:`~sparsevae.priors.SpikeSlabLasso`.
        """
        return [p for p in (self.prior, self.prior_specific) if p is not None]

    def masks(self) -> list[ModuleMask]:
        """The shared mask, then each study's specific mask (multi-study), with their priors.

        Returns
        -------
        List of :class:`ModuleMask`, the shared mask first.
        """
        with torch.no_grad():
            W, V = self.decoder.gated_masks()
        out = [
            ModuleMask(
                None,
                W,
                None if self.prior is None else self.prior.p_star,
                None if self.prior is None else self.prior.eta,
            )
        ]
        for s in range(self.n_studies if self.is_multistudy else 0):
            prior = self.prior_specific
            out.append(
                ModuleMask(
                    s,
                    V[s],
                    None if prior is None else prior.p_star[s],
                    None if prior is None else prior.eta[s],
                )
            )
        return out

    def set_prior_schedule(self, penalty_on: bool, ramp: float) -> None:
        """Apply the training plan's schedule of the mask prior.

        Parameters
        ----------
        penalty_on
            Whether the mask penalty counts in the loss (off during the warm-up).
        ramp
            Position on the spike-rate ladder, from 0 (spike rate ``1.5 * lambda1``: nearly a
            plain lasso, no gene is singled out) to 1 (``lambda0``); geometric in between.
        """
        self.prior_scale = 1.0 if penalty_on else 0.0
        t = min(1.0, max(0.0, float(ramp)))
        for prior in self.mask_priors():
            start = 1.5 * prior.lambda1
            prior.spike_rate = start * (prior.lambda0 / start) ** t if t < 1.0 else prior.lambda0
        self.gate_on = self.spike_gate and penalty_on and t >= 1.0
        if not self.gate_on:
            self.open_gates()

    @torch.no_grad()
    def decide_masks(self, p_stars: Sequence[torch.Tensor]) -> None:
        """Fix the selection of every mask (:meth:`SpikeSlabLasso.decide`) and close its gates.

        Parameters
        ----------
        p_stars
            One ``p*`` per prior of :meth:`mask_priors`, in that order (e.g. averaged over the
            last epochs by the training plan).
        """
        priors = self.mask_priors()
        if len(p_stars) != len(priors):
            raise ValueError(
                f"Expected {len(priors)} p* tensors (one per mask prior), got {len(p_stars)}."
            )
        for prior, p in zip(priors, p_stars, strict=True):
            prior.decide(p)
        if self.gate_on:
            self.close_spike_gates()

    def release_masks(self) -> None:
        """Let the EM move every mask's selection again (undoes :meth:`decide_masks`)."""
        for prior in self.mask_priors():
            prior.release()

    @torch.no_grad()
    def open_gates(self) -> None:
        """Let every mask entry reach the decoder (as before the prior is at full strength)."""
        if self.prior is not None:
            self.decoder.gate.fill_(1.0)
        if self.prior_specific is not None:
            self.decoder.gate_specific.fill_(1.0)

    @torch.no_grad()
    def close_spike_gates(self) -> None:
        """Close the gates of the entries the prior puts in the spike (``p* < 0.5``).

        The decoder then sees those entries as exactly zero: "in the spike" means "switched off"
        for the network, so a factor can carry signal only through the genes it selects.
        """
        if self.prior is not None and self.gate_shared:
            self.decoder.gate.copy_(is_selected(self.prior.p_star).to(self.decoder.gate.dtype))
        if self.prior_specific is not None and self.gate_specific:
            self.decoder.gate_specific.copy_(
                is_selected(self.prior_specific.p_star).to(self.decoder.gate_specific.dtype)
            )

    @property
    def can_rotate(self) -> bool:
        """Whether a rotation of the factors leaves the model's prior unchanged.

        True for single-study models with a mask prior and ``latent_prior="normal"``: their
        factors' prior ``N(0, I)`` is the same in any rotated basis (see :meth:`rotate_factors`).
        """
        return self.prior is not None and not self.is_multistudy and self.latent_prior == "normal"

    def loading_expression(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The data of a minibatch on the scale the factors' loadings are measured on.

        Counts: ``log1p(1e4 * x / total)`` per cell; Gaussian data: ``x`` as given.

        Parameters
        ----------
        tensors
            Minibatch from the data loader.

        Returns
        -------
        ``(n_cells, n_genes)`` tensor on the module's device.
        """
        x = tensors[REGISTRY_KEYS.X_KEY].to(self.decoder.W.device, torch.float32)
        if not self.is_count:
            return x
        return torch.log1p(1e4 * x / x.sum(dim=1, keepdim=True).clamp_min(1.0))

    @torch.no_grad()
    def varimax_rotation(
        self, cov_xz: torch.Tensor, var_x: torch.Tensor, cov_z: torch.Tensor
    ) -> torch.Tensor:
        """The rotation of the factors that makes their loadings on the genes sparsest.

        The loadings are those of each standardised gene on the whitened factors
        (``cov(x, z) cov(z)^(-1/2)``), so that every factor counts alike whatever its variance;
        they turn with the factors, so the rotation found is the same for every rotation of the
        factors it starts from. The factors the encoder does not use (posterior-mean variance
        below ``0.01``) stay as they are. See :func:`varimax`.

        Parameters
        ----------
        cov_xz
            ``(n_genes, n_factors)`` covariance of the genes (:meth:`loading_expression`) with
            the factors' posterior means over the training cells.
        var_x
            ``(n_genes,)`` variances of the genes.
        cov_z
            ``(n_factors, n_factors)`` covariance of the factors' posterior means.

        Returns
        -------
        ``(n_factors, n_factors)`` orthogonal matrix ``R``, for :meth:`rotate_factors`.
        """
        cov_z = cov_z.double().cpu().numpy()
        used = np.diag(cov_z) >= 0.01
        R = np.eye(self.n_factors)
        if used.sum() >= 2:
            sd_x = var_x.double().cpu().clamp_min(1e-12).sqrt().numpy()
            A = cov_xz.double().cpu().numpy()[:, used] / sd_x[:, None]
            values, vectors = np.linalg.eigh(cov_z[np.ix_(used, used)])
            inv_sqrt = (vectors / np.sqrt(np.clip(values, 1e-12, None))) @ vectors.T
            R[np.ix_(used, used)] = varimax(A @ inv_sqrt)
        return torch.as_tensor(R, device=self.decoder.W.device, dtype=self.decoder.W.dtype)

    @torch.no_grad()
    def rotate_factors(self, rotation: torch.Tensor) -> None:
        """Rotate the factors: new factors ``z' = R^T z``, the network adjusted to match.

        The encoder's means are rotated exactly (its log-variances are kept); the decoder's
        first layer (and the composition offset's) takes ``R`` so that it sees the same input.
        A gene's mask row acts per factor, so it cannot follow a rotation exactly: each gene
        keeps the root mean square of its row on every factor (exact when the rows are flat,
        as while the mask prior is off). Meant for the end of the mask prior's warm-up, when the
        factors are those of a plain VAE, identified only up to a rotation.

        Parameters
        ----------
        rotation
            ``(n_factors, n_factors)`` orthogonal matrix, e.g. from :meth:`varimax_rotation`.
        """
        if not self.can_rotate:
            raise ValueError(
                "Only single-study models with a mask prior and latent_prior='normal' can "
                "rotate their factors (their prior is the same in every rotated basis)."
            )
        K = self.n_factors
        R = rotation.to(self.decoder.W.device, self.decoder.W.dtype)
        if tuple(R.shape) != (K, K):
            raise ValueError(f"rotation must be {K} x {K}, got {tuple(R.shape)}.")
        mean = self.encoder.mean_encoder
        mean.weight[:K] = R.T @ mean.weight[:K]
        mean.bias[:K] = R.T @ mean.bias[:K]
        dec = self.decoder
        first, _ = dec.shared_weights()
        new_first = first[:, :K] @ R
        scale = torch.ones(K, device=R.device, dtype=R.dtype)
        if dec.normalize_shared:
            scale = new_first.norm(dim=0).clamp_min(1e-12)
        dec.first.weight[:, :K] = new_first
        row = dec.W.pow(2).mean(dim=1, keepdim=True).sqrt()
        dec.W.copy_(row * scale[None, :])
        if self.composition_offset:
            self.offset_net[0].weight[:, :K] = self.offset_net[0].weight[:, :K] @ R

    @torch.no_grad()
    def _latent_prior_columns(self) -> list[tuple[torch.Tensor, int, float]]:
        """Per-factor parameters of the factors' prior, as (tensor, dim of factors, reset value)."""
        if self.latent_prior == "conditional":
            prior = self.conditional_prior
            if prior.is_categorical:
                return [(prior.mean, 1, 0.0), (prior.log_var, 1, 0.0)]
            n_z = prior.n_latent
            last = prior.net[-1]
            return [
                (last.weight[:n_z], 0, 0.0), (last.bias[:n_z], 0, 0.0),
                (last.weight[n_z:], 0, 0.0), (last.bias[n_z:], 0, 0.0),
            ]  # fmt: skip
        if self.latent_prior == "mixture":
            prior = self.mixture_prior
            return [(prior.prior_means, 1, 0.0), (prior.prior_log_scales, 1, 0.0)]
        return []

    @torch.no_grad()
    def _move_latent_prior(self, dst: int, src: int, mode: str) -> None:
        """Factor ``dst`` takes factor ``src``'s prior.

        ``mode="move"``: ``src`` is reset to ``N(0, 1)``; ``"swap"``: they exchange;
        ``"copy"``: ``src`` keeps its own.
        """
        for tensor, dim, reset in self._latent_prior_columns():
            a, b = tensor.select(dim, dst), tensor.select(dim, src)
            saved = a.clone()
            a.copy_(b)
            if mode == "move":
                b.fill_(reset)
            elif mode == "swap":
                b.copy_(saved)

    def _begin_reassignment(
        self, what: str, factor: int, slot: int, study: int | None = None
    ) -> None:
        """Refuse a move between the masks that this module or these indices cannot take; count it.

        Every accepted move adds one to :attr:`mask_edits`.
        """
        if not self.is_multistudy or self.prior is None:
            raise ValueError(f"{what} needs a multi-study module with mask priors.")
        if self.latent_prior == "correlated":
            raise ValueError(f"{what} does not support latent_prior='correlated'.")
        in_range = 0 <= factor < self.n_factors and 0 <= slot < self.n_specific_factors
        if study is None:
            if not in_range:
                raise ValueError(f"factor or slot out of range: {factor}, {slot}.")
        elif not (in_range and 0 <= study < self.n_studies):
            raise ValueError(f"factor, study or slot out of range: {factor}, {study}, {slot}.")
        self.mask_edits += 1

    @torch.no_grad()
    def move_to_specific(self, factor: int, study: int, slot: int) -> None:
        """Hand shared factor ``factor`` over to specific factor ``slot`` of study ``study``.

        For the cells of ``study`` the decoder computes the same function afterwards: the slot
        takes the factor's encoder output unit, its first-layer column (and composition-offset
        column), its mask column (as the study's specific mask column) and its prior state
        (``p*``, ``eta``, gates). The shared factor is reset to an unused one: its mask column
        and ``p*`` are zero, ``eta`` is below the prior's "off" level and its encoder unit outputs
        the prior ``N(0, 1)``. Other studies lose the factor, and the composition offset loses
        what the slot's former output fed it: use it only for a factor that is quiet outside
        ``study`` and a slot that no study uses, and train on afterwards.

        Parameters
        ----------
        factor
            Index of the shared factor (``0 <= factor < n_factors``).
        study
            Index of the study.
        slot
            Index of the specific factor (``0 <= slot < n_specific_factors``).
        """
        self._begin_reassignment("move_to_specific", factor, slot, study)
        K = self.n_factors
        target = K + slot
        dec = self.decoder
        dec.first.weight[:, target] = dec.first.weight[:, factor]
        dec.W_specific[study, :, slot] = dec.W[:, factor]
        dec.gate_specific[study, :, slot] = dec.gate[:, factor]
        dec.W[:, factor] = 0.0
        dec.gate[:, factor] = 0.0 if self.gate_on and self.gate_shared else 1.0
        if self.composition_offset:
            first = self.offset_net[0].weight
            first[:, target] = first[:, factor]
            first[:, factor] = 0.0
        for layer in (self.encoder.mean_encoder, self.encoder.var_encoder):
            layer.weight[target] = layer.weight[factor]
            layer.bias[target] = layer.bias[factor]
            layer.weight[factor] = 0.0
            layer.bias[factor] = 0.0  # mean 0; variance exp(0) = 1 (scvi's default exp link)
        self._move_latent_prior(target, factor, "move")
        spec, shared = self.prior_specific, self.prior
        spec.p_star[study, :, slot] = shared.p_star[:, factor]
        spec.eta[study, slot] = shared.eta[factor]
        shared.p_star[:, factor] = 0.0
        shared.eta[factor] = min(float(shared.eta[factor]), 0.5 * shared.eta_off)

    @torch.no_grad()
    def split_to_specific(self, factor: int, study: int, slot: int, genes: torch.Tensor) -> None:
        """Hand some genes of shared factor ``factor`` to a copy of it in study ``study``'s mask.

        For genes whose dependence on a shared factor is confined to one study (the factor
        carries a shared program and, on some genes, one study's own): specific factor ``slot``
        becomes a copy of the factor (encoder output unit, first-layer column and prior of the
        factors), study ``study``'s specific mask column takes the factor's entries (and
        ``p*``, gates) of ``genes``, and the shared mask loses them. The cells of ``study``
        are decoded as before; the other studies lose the factor's effect on ``genes`` (small
        when it is confined). The shared factor keeps its other genes; the entries it hands over
        stay zero for the rest of the training (else the shared mask, whose factors select
        more genes and so have a larger ``eta``, takes them back). Use it only for a slot that
        no study uses, and train on afterwards.

        Parameters
        ----------
        factor
            Index of the shared factor (``0 <= factor < n_factors``).
        study
            Index of the study.
        slot
            Index of the specific factor (``0 <= slot < n_specific_factors``).
        genes
            Boolean tensor over genes: the genes to hand over.
        """
        self._begin_reassignment("split_to_specific", factor, slot, study)
        K = self.n_factors
        genes = torch.as_tensor(genes, dtype=torch.bool, device=self.decoder.W.device)
        if genes.shape != (self.decoder.n_genes,):
            raise ValueError(f"genes must be a boolean vector over {self.decoder.n_genes} genes.")
        target = K + slot
        dec = self.decoder
        closed_shared = 0.0 if self.gate_on and self.gate_shared else 1.0
        closed_specific = 0.0 if self.gate_on and self.gate_specific else 1.0
        dec.first.weight[:, target] = dec.first.weight[:, factor]
        dec.W_specific[:, :, slot] = 0.0
        dec.W_specific[study, genes, slot] = dec.W[genes, factor]
        dec.gate_specific[:, :, slot] = closed_specific
        dec.gate_specific[study, genes, slot] = dec.gate[genes, factor]
        dec.W[genes, factor] = 0.0
        dec.gate[genes, factor] = closed_shared
        dec.shared_keep[genes, factor] = 0.0  # the shared factor cannot take them back
        if self.composition_offset:
            self.offset_net[0].weight[:, target] = 0.0
        for layer in (self.encoder.mean_encoder, self.encoder.var_encoder):
            layer.weight[target] = layer.weight[factor]
            layer.bias[target] = layer.bias[factor]
        self._move_latent_prior(target, factor, "copy")
        spec, shared = self.prior_specific, self.prior
        spec.p_star[:, :, slot] = 0.0
        spec.p_star[study, genes, slot] = shared.p_star[genes, factor]
        spec.eta[study, slot] = shared.eta[factor]
        shared.p_star[genes, factor] = 0.0

    @torch.no_grad()
    def move_to_shared(self, slot: int, factor: int) -> None:
        """Hand specific factor ``slot`` (the same program in every study) to shared ``factor``.

        The reverse of :meth:`move_to_specific`, for a program that every study's specific mask
        carries on the same slot: the shared factor takes the slot's encoder output unit, its
        first-layer (and composition-offset) column, the mean over studies of the slot's mask
        columns and prior state. The slot is reset to an unused one in every study. Use it only
        for an unused shared factor, and train on afterwards.

        Parameters
        ----------
        slot
            Index of the specific factor.
        factor
            Index of the (unused) shared factor.
        """
        self._begin_reassignment("move_to_shared", factor, slot)
        K = self.n_factors
        source = K + slot
        dec = self.decoder
        dec.first.weight[:, factor] = dec.first.weight[:, source]
        dec.W[:, factor] = dec.W_specific[:, :, slot].mean(0)
        dec.gate[:, factor] = dec.gate_specific[:, :, slot].amax(0) if self.gate_shared else 1.0
        dec.W_specific[:, :, slot] = 0.0
        dec.gate_specific[:, :, slot] = 0.0 if self.gate_on and self.gate_specific else 1.0
        if self.composition_offset:
            first = self.offset_net[0].weight
            first[:, factor] = first[:, source]
            first[:, source] = 0.0
        for layer in (self.encoder.mean_encoder, self.encoder.var_encoder):
            layer.weight[factor] = layer.weight[source]
            layer.bias[factor] = layer.bias[source]
            layer.weight[source] = 0.0
            layer.bias[source] = 0.0
        self._move_latent_prior(factor, source, "move")
        spec, shared = self.prior_specific, self.prior
        shared.p_star[:, factor] = spec.p_star[:, :, slot].mean(0)
        shared.eta[factor] = spec.eta[:, slot].mean()
        spec.p_star[:, :, slot] = 0.0
        spec.eta[:, slot] = torch.clamp(spec.eta[:, slot], max=0.5 * spec.eta_off)

    @torch.no_grad()
    def swap_roles(self, factor: int, study: int, slot: int) -> None:
        """Exchange shared ``factor`` (one study's program) and specific ``slot`` (a shared one).

        The combination of :meth:`move_to_specific` and :meth:`move_to_shared` when neither an
        unused specific factor nor an unused shared factor is left (a *role swap*): the shared
        factor's program goes to ``slot`` of ``study``, and the program that every study's
        ``slot`` carries goes to ``factor`` (the mean of the studies' mask columns). Encoder
        units, first-layer and composition-offset columns are exchanged. Train on afterwards.

        Parameters
        ----------
        factor
            Index of the shared factor that varies in ``study`` only.
        study
            Index of that study.
        slot
            Index of the specific factor that carries the same program in every study.
        """
        self._begin_reassignment("swap_roles", factor, slot, study)
        genes = torch.zeros(self.n_studies, self.decoder.n_genes, dtype=torch.bool)
        genes[study] = True
        self.swap_roles_by_gene(factor, slot, genes)

    @torch.no_grad()
    def swap_roles_by_gene(
        self,
        factor: int,
        slot: int,
        genes: torch.Tensor,
        drop_from_factor: torch.Tensor | None = None,
    ) -> None:
        """:meth:`swap_roles` where the shared factor carries a program per study, gene by gene.

        For a shared factor that drives some genes in one study only and others in another
        (each study's program on one shared factor, found by the gene-level check of the
        multi-study guide) while ``slot`` carries the same program in every study: ``slot`` of
        study ``s`` takes the factor's mask entries (``W``, gates, ``p*``) of the genes
        ``genes[s]`` (and the factor's ``eta`` where ``genes[s]`` is not empty), the factor
        takes the slot's program;
        encoder units, first-layer and composition-offset columns are exchanged. The factor's
        entries outside ``genes`` are dropped. Train on afterwards.

        Parameters
        ----------
        factor
            Index of the shared factor.
        slot
            Index of the specific factor that carries the same program in every study.
        genes
            Boolean ``(n_studies, n_genes)``: the genes each study's ``slot`` takes.
        drop_from_factor
            Boolean ``(n_genes,)``: genes the factor does not take from the slot (their entries
            start in the spike). The move check passes the genes it hands to the studies'
            slots, so that a slot that also carried pieces of its own study's program does not
            give them back to the shared factor. ``None``: the factor takes every gene.
        """
        self._begin_reassignment("swap_roles_by_gene", factor, slot)
        K = self.n_factors
        t = K + slot
        dec = self.decoder
        genes = torch.as_tensor(genes, dtype=torch.bool, device=dec.W.device)
        if genes.shape != (self.n_studies, dec.n_genes):
            raise ValueError(
                f"genes must be a boolean tensor of shape ({self.n_studies}, {dec.n_genes})."
            )

        def swap_columns(weight: torch.Tensor) -> None:
            col = weight[:, factor].clone()
            weight[:, factor] = weight[:, t]
            weight[:, t] = col

        swap_columns(dec.first.weight)
        if self.composition_offset:
            swap_columns(self.offset_net[0].weight)
        for layer in (self.encoder.mean_encoder, self.encoder.var_encoder):
            row, bias = layer.weight[factor].clone(), layer.bias[factor].clone()
            layer.weight[factor], layer.bias[factor] = layer.weight[t], layer.bias[t]
            layer.weight[t], layer.bias[t] = row, bias
        self._move_latent_prior(t, factor, "swap")
        w_old, g_old = dec.W[:, factor].clone(), dec.gate[:, factor].clone()
        dec.W[:, factor] = dec.W_specific[:, :, slot].mean(0)
        dec.gate[:, factor] = dec.gate_specific[:, :, slot].amax(0) if self.gate_shared else 1.0
        closed = 0.0 if self.gate_on and self.gate_specific else 1.0
        dec.W_specific[:, :, slot] = torch.where(genes, w_old, torch.zeros_like(w_old))
        dec.gate_specific[:, :, slot] = torch.where(genes, g_old, torch.full_like(g_old, closed))
        spec, shared = self.prior_specific, self.prior
        p_old, e_old = shared.p_star[:, factor].clone(), shared.eta[factor].clone()
        shared.p_star[:, factor] = spec.p_star[:, :, slot].mean(0)
        shared.eta[factor] = spec.eta[:, slot].mean()
        if drop_from_factor is not None:
            drop = torch.as_tensor(drop_from_factor, dtype=torch.bool, device=dec.W.device)
            if drop.shape != (dec.n_genes,):
                raise ValueError(
                    f"drop_from_factor must be a boolean tensor of shape ({dec.n_genes},)."
                )
            dec.W[drop, factor] = 0.0
            shared.p_star[drop, factor] = 0.0
            if self.gate_on and self.gate_shared:
                dec.gate[drop, factor] = 0.0
        spec.p_star[:, :, slot] = torch.where(genes, p_old, torch.zeros_like(p_old))
        off = torch.clamp(spec.eta[:, slot], max=0.5 * spec.eta_off)
        spec.eta[:, slot] = torch.where(genes.any(1), e_old, off)

    @torch.no_grad()
    def em_step(self, update_eta: bool = True) -> None:
        """Update the prior's inclusion probabilities and factor weights (no-op without mask).

        Not allowed while the selection is decided (:meth:`decide_masks`).
        """
        if self.prior is not None:
            self.prior.em_step(self.decoder.W, update_eta=update_eta)
        if self.prior_specific is not None:
            self.prior_specific.em_step(self.decoder.W_specific, update_eta=update_eta)
        if self.gate_on:
            self.close_spike_gates()
