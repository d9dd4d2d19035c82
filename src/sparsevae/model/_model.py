"""The user-facing SparseVAE model class."""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import anndata
import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField, NumericalObsField
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin, VAEMixin

from ..module import LIKELIHOODS, STUDY_KEY, ModuleMask, SparseVAEModule
from ..priors import factor_use, is_selected
from ..train import DivergenceError, SparseVAETrainingPlan, default_max_epochs, prior_schedule
from ._checks import shared_specific_checks
from ._interpret import InterpretabilityMixin
from ._save_load import read_model_file
from ._validate import (
    check_counts,
    check_finite,
    check_known_studies,
    check_n_cells,
    check_new_data,
    check_not_backed,
    check_registrable,
    check_study_column,
    data_location,
    get_matrix,
    matrix_stats,
)

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_N_SPECIFIC_FACTORS", "SparseVAE", "default_max_epochs"]

#: Study-specific factors of a multi-study model when ``n_specific_factors`` is not given.
DEFAULT_N_SPECIFIC_FACTORS = 5

#: Below this KL (nats per cell, summed over factors) at the last epoch, training warns of
#: posterior collapse. Healthy fits have several nats per cell.
COLLAPSE_KL = 0.05


def _warn(msg: str) -> None:
    """A training warning, to both the warnings module and the log (``train()`` -> caller)."""
    warnings.warn(msg, UserWarning, stacklevel=4)
    logger.warning(msg)


class SparseVAE(InterpretabilityMixin, VAEMixin, UnsupervisedTrainingMixin, BaseModelClass):
    """Sparse VAE: a VAE whose decoder lets gene ``j`` see only the factors in mask row ``w_j``.

    Moran, Sridhar, Wang and Blei, "Identifiable deep generative models via sparse decoding",
    TMLR 2022. The mask ``W`` (genes x factors) has a Spike-and-Slab Lasso prior fitted by EM;
    genes that load on a single factor (anchor genes) make the factors identifiable.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    n_factors
        Number of latent factors ``K``.
    n_hidden
        Hidden width of the encoder and of the decoder's shared network.
    n_layers
        Number of hidden layers of the decoder's shared network (the paper uses 2).
    likelihood
        ``"auto"`` (``"nb"`` for non-negative integer data, else ``"gaussian"``), ``"nb"``,
        ``"zinb"``, ``"poisson"`` or ``"gaussian"``. Count likelihoods use a log link with the
        cell's library size plus a cell-level composition offset shared by all genes (module
        keyword ``composition_offset``, on by default; see
        :class:`~sparsevae.module.SparseVAEModule`).
    mask
        ``"ssl"`` (learned sparse mask with a Spike-and-Slab Lasso prior) or ``None`` (no mask: the
        plain VAE baseline).
    lambda0
        Spike rate (large: pushes weak mask entries to zero).
    lambda1
        Slab rate (small: leaves selected entries free).
    a, b
        Beta prior on each factor's inclusion weight ``eta_k``; ``b`` defaults to the number of
        genes, which favours sparse factors.
    weight_prior_precision
        Precision of the Gaussian prior on the decoder network's weights; it fixes the scale of
        the mask so that inclusion probabilities mean something (default 1; on the per-gene heads
        for count likelihoods, whose decoder has unit-norm shared layers); see
        :class:`~sparsevae.module.SparseVAEModule` (``normalize_shared``, passed through
        ``**module_kwargs``). ``0`` turns it off.
    kl_weight
        Weight of the KL term; values above 1 give the beta-VAE baseline.
    n_specific_factors
        Multi-study models only (``setup_anndata(..., study_key=...)``): number of study-specific
        factors ``K_spec``; ``n_factors`` is then the number of shared factors. Default
        :data:`DEFAULT_N_SPECIFIC_FACTORS` (5) with a ``study_key``; the prior switches off the
        factors a study does not need, so a few too many do little harm (see the user guide's
        "Why the defaults are what they are"). Without a ``study_key`` leave it out (or 0).
    **module_kwargs
        Passed to :class:`~sparsevae.module.SparseVAEModule` (e.g. ``n_layers_encoder``,
        ``dropout_rate``).

    Examples
    --------
    >>> sparsevae.SparseVAE.setup_anndata(adata, layer="counts")
    >>> model = sparsevae.SparseVAE(adata, n_factors=15)
    >>> model.train()
    >>> model.write_results(adata)
    >>> sc.pp.neighbors(adata, use_rep="X_sparsevae")

    Multi-study: shared factors decoded through one shared mask, plus study-specific factors
    decoded through each study's own mask (DESIGN section 2).

    >>> sparsevae.SparseVAE.setup_anndata(adata, layer="counts", study_key="donor")
    >>> model = sparsevae.SparseVAE(adata, n_factors=10, n_specific_factors=3)
    >>> model.train()
    >>> model.get_mask("shared")  # genes x shared_0..shared_9
    >>> model.get_mask("donor_A")  # genes x specific_0..specific_2, donor_A's own mask
    >>> sparsevae.tl.shared_specific_genes(model)
    """

    _module_cls = SparseVAEModule
    _training_plan_cls = SparseVAETrainingPlan

    def __init__(
        self,
        adata: AnnData,
        n_factors: int = 15,
        n_hidden: int = 100,
        n_layers: int = 2,
        likelihood: Literal["auto", "gaussian", "nb", "zinb", "poisson"] = "auto",
        mask: Literal["ssl"] | None = "ssl",
        lambda0: float = 10.0,
        lambda1: float = 1.0,
        a: float = 1.0,
        b: float | None = None,
        weight_prior_precision: float | None = None,
        kl_weight: float = 1.0,
        n_specific_factors: int | None = None,
        **module_kwargs: Any,
    ) -> None:
        super().__init__(adata)
        n_genes = self.summary_stats.n_vars
        study_key = self.adata_manager.registry["setup_args"].get("study_key")
        if study_key is None:
            if n_specific_factors:
                raise ValueError(
                    f"n_specific_factors={n_specific_factors!r} needs studies, but the AnnData "
                    "was registered without a study_key. Register it with "
                    "`SparseVAE.setup_anndata(adata, ..., study_key='<obs column>')`, or leave "
                    "n_specific_factors out for a single-study model."
                )
            n_specific_factors = 0
        else:
            if n_specific_factors is None:
                n_specific_factors = DEFAULT_N_SPECIFIC_FACTORS
            if (
                not isinstance(n_specific_factors, int | np.integer)
                or isinstance(n_specific_factors, bool)
                or not 1 <= n_specific_factors <= n_genes
            ):
                raise ValueError(
                    "n_specific_factors must be an integer between 1 and the number of genes "
                    f"({n_genes}) for a multi-study model, got {n_specific_factors!r}. For shared "
                    "factors only, register the AnnData without study_key."
                )
        if (
            not isinstance(n_factors, int | np.integer)
            or isinstance(n_factors, bool)
            or not 1 <= n_factors <= n_genes
        ):
            raise ValueError(
                f"n_factors must be an integer between 1 and the number of genes ({n_genes}), "
                f"got {n_factors!r}."
            )
        if likelihood != "auto" and likelihood not in LIKELIHOODS:
            raise ValueError(
                f"likelihood must be 'auto' or one of {LIKELIHOODS}, got {likelihood!r}."
            )
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight}.")
        X = self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        stats = matrix_stats(X)
        if likelihood == "auto":
            likelihood = "nb" if stats.is_integer and not stats.has_negative else "gaussian"
        where = data_location(self.adata_manager.registry["setup_args"].get("layer"))
        data_kwargs: dict[str, torch.Tensor] = {}
        if likelihood != "gaussian":
            check_counts(stats, likelihood, where)
            offset = np.log((stats.col_sums + 0.1) / max(stats.total, 1.0))
            data_kwargs["gene_offset"] = torch.as_tensor(offset, dtype=torch.float32)
        else:
            # Constant genes get scale 1 (their standardised value is 0 anyway).
            scale = np.where(stats.col_stds > 1e-8, stats.col_stds, 1.0)
            data_kwargs["gene_loc"] = torch.as_tensor(stats.col_means, dtype=torch.float32)
            data_kwargs["gene_scale"] = torch.as_tensor(scale, dtype=torch.float32)
        self.module = self._module_cls(
            n_input=n_genes,
            n_factors=int(n_factors),
            n_hidden=n_hidden,
            n_layers=n_layers,
            likelihood=likelihood,
            mask=mask,
            lambda0=lambda0,
            lambda1=lambda1,
            a=a,
            b=b,
            weight_prior_precision=weight_prior_precision,
            kl_weight=kl_weight,
            **data_kwargs,
            **(
                {"n_specific_factors": int(n_specific_factors), "n_studies": len(self.studies)}
                if n_specific_factors
                else {}
            ),
            **module_kwargs,
        )
        bad = self.module.non_finite_parameters()
        if bad:
            raise ValueError(
                f"The model's initial parameters are not finite ({', '.join(bad[:5])}), so it "
                f"cannot be trained. Check {where} for extreme values."
            )
        self.likelihood = likelihood
        factors = f"{n_factors} factors"
        if n_specific_factors:
            factors = (
                f"{n_factors} shared + {n_specific_factors} specific factors, "
                f"{len(self.studies)} studies ({study_key!r})"
            )
        self._model_summary_string = (
            f"SparseVAE: {factors}, likelihood={likelihood}, mask={mask}, "
            f"n_hidden={n_hidden}, n_layers={n_layers}, lambda0={lambda0}, lambda1={lambda1}, "
            f"kl_weight={kl_weight}"
        )
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------------ setup
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = None,
        size_factor_key: str | None = None,
        study_key: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Register an AnnData for SparseVAE.

        The data are checked first (NaN or infinite values, too few cells, missing layer or size
        factors, missing or single studies); on a failed check nothing is written to ``adata``.

        Parameters
        ----------
        adata
            AnnData with cells in rows and genes in columns.
        layer
            Layer holding the data (raw counts for a count likelihood); ``None`` uses ``adata.X``.
        size_factor_key
            Column of ``adata.obs`` with each cell's library size (size factor) for count
            likelihoods; defaults to the cell's total count.
        study_key
            Column of ``adata.obs`` naming each cell's study (donor, disease, technology,
            species, ...): registers a multi-study model, with shared factors and, per study,
            study-specific factors decoded through the study's own mask. It needs at least two
            studies and no missing value; study names are used as strings, in the order of the
            column's categories (sorted for a non-categorical column), and must be unique as
            strings and differ from ``"shared"``. ``None`` (default): the
            single-study model.
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.

        Returns
        -------
        None. ``adata`` is registered with the model class (scvi-tools records an identifier in
        ``adata.uns``); the data themselves are not changed.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        # scvi-tools' load() calls setup_anndata with the saved registry (``source_registry``);
        # SparseVAE.load has then checked the data against the trained model already.
        loading = "source_registry" in kwargs
        check_not_backed(adata)
        check_registrable(adata)
        if not loading:
            check_n_cells(adata)
        check_finite(get_matrix(adata, layer), data_location(layer))
        if size_factor_key is not None:
            if size_factor_key not in adata.obs:
                raise KeyError(f"size_factor_key {size_factor_key!r} is not a column of adata.obs.")
            sf = np.asarray(adata.obs[size_factor_key], dtype=float)
            if not np.all(np.isfinite(sf)) or np.any(sf <= 0):
                raise ValueError(
                    f"adata.obs[{size_factor_key!r}] must hold finite positive size factors."
                )
        if study_key is not None and not loading:
            check_study_column(adata, study_key)
        anndata_fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=False),
            NumericalObsField(REGISTRY_KEYS.SIZE_FACTOR_KEY, size_factor_key, required=False),
        ]
        if study_key is not None:
            anndata_fields.append(CategoricalObsField(STUDY_KEY, study_key))
        adata_manager = AnnDataManager(fields=anndata_fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    def _validate_anndata(self, adata: AnnData | None = None, copy_if_view: bool = True):
        if adata is not None and adata is not self.adata:
            # New data get the checks of training data, before scvi-tools registers them.
            check_not_backed(adata)
            self._check_var_names(adata.var_names)
            layer = self.adata_manager.registry["setup_args"].get("layer")
            check_new_data(adata, layer, self.likelihood)
            if self.is_multistudy:
                check_known_studies(adata, self.study_key, self.studies)
        return super()._validate_anndata(adata, copy_if_view=copy_if_view)

    # ------------------------------------------------------------------------ studies
    @property
    def study_key(self) -> str | None:
        """Column of ``adata.obs`` with the studies (``None`` for a single-study model)."""
        return self.adata_manager.registry["setup_args"].get("study_key")

    @property
    def is_multistudy(self) -> bool:
        """Whether the model has study-specific factors and masks."""
        return self.study_key is not None

    @property
    def studies(self) -> list[str]:
        """Names of the studies, as strings, in the order of the specific masks.

        ``[]`` for a single-study model.
        """
        if self.study_key is None:
            return []
        state = self.adata_manager.get_state_registry(STUDY_KEY)
        return [str(c) for c in state.categorical_mapping]

    @property
    def mask_kinds(self) -> list[str]:
        """Valid ``kind`` values of :meth:`get_mask`: ``"shared"`` and, multi-study, each study."""
        return ["shared", *self.studies]

    def _kind_index(self, kind: str | None) -> int | None:
        """``None`` for the shared mask, else the position of study ``kind``."""
        if kind is None or kind == "shared":
            return None
        studies = self.studies
        if not studies:
            raise ValueError(
                f"Unknown mask kind {kind!r}: this single-study model has only the shared mask "
                "(kind=None or 'shared')."
            )
        if str(kind) not in studies:
            raise ValueError(f"Unknown mask kind {kind!r}; valid kinds are {self.mask_kinds}.")
        return studies.index(str(kind))

    def _study_codes(
        self, adata: AnnData | None = None, indices: Sequence[int] | None = None
    ) -> np.ndarray | None:
        """Study index of each cell (``None`` for a single-study model)."""
        if not self.is_multistudy:
            return None
        adata = self._validate_anndata(adata)
        manager = self.get_anndata_manager(adata, required=True)
        codes = np.asarray(manager.get_from_registry(STUDY_KEY)).reshape(-1).astype(np.int64)
        return codes if indices is None else codes[np.asarray(indices)]

    def _check_var_names(self, var_names: Sequence[str]) -> None:
        expected = pd.Index(self.adata.var_names)
        _compare_var_names(expected, pd.Index(var_names))

    # ------------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int | None = None,
        lr: float = 1e-2,
        batch_size: int = 128,
        early_stopping: bool = False,
        train_size: float | None = None,
        validation_size: float | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        n_epochs_kl_warmup: int | None = None,
        n_epochs_prior_warmup: int | None = None,
        n_epochs_lambda0_ramp: int | None = None,
        n_epochs_shared_first: int | None = None,
        n_epochs_fixed_correlation: int | None = None,
        plan_kwargs: dict[str, Any] | None = None,
        **trainer_kwargs: Any,
    ):
        """Train the model with Lightning (on a GPU when one is available).

        Parameters
        ----------
        max_epochs
            Number of passes over the data; default :func:`default_max_epochs` (about 300k cell
            visits, between 20 and 400 epochs).
        lr
            Adam learning rate.
        batch_size
            Minibatch size.
        early_stopping
            Stop when the validation ELBO stops improving (holds out ``1 - train_size`` cells).
            It starts watching once the mask prior is at full strength (after
            ``n_epochs_prior_warmup + n_epochs_lambda0_ramp`` epochs), because the schedule
            itself moves the ELBO; pass ``early_stopping_warmup_epochs`` to change that.
        train_size
            Fraction of cells used for training; default 1.0, or 0.9 with early stopping.
        validation_size
            Fraction of cells used for validation; default ``1 - train_size``.
        accelerator
            Lightning accelerator (``"auto"``, ``"cpu"``, ``"gpu"``, ...).
        devices
            Lightning devices.
        n_epochs_kl_warmup
            Linear KL warm-up length in epochs; ``None`` uses the full KL weight from the start.
        n_epochs_prior_warmup
            Epochs at the start without the mask prior (the network first learns to use every
            factor); default 20% of ``max_epochs`` for count likelihoods and 0 (off) for
            ``gaussian`` (:func:`~sparsevae.train.prior_schedule`). Count data need it; for
            Gaussian data, turn it on (with ``n_epochs_lambda0_ramp``) when factors are strongly
            correlated and one gets switched off. Measurements: user guide, "Why the defaults
            are what they are".
        n_epochs_lambda0_ramp
            Epochs, after the warm-up, over which the spike rate climbs from ``1.5 * lambda1`` to
            ``lambda0`` with ``eta`` held at 0.5. ``0`` applies ``lambda0`` at once; default 40%
            of ``max_epochs`` for count likelihoods and 0 for ``gaussian``. See
            :class:`~sparsevae.train.SparseVAETrainingPlan`.
        n_epochs_shared_first
            Multi-study models: epochs at the start during which only the shared factors reach
            the decoder, so that they take the programs common to all studies first. Default
            ``None``: 0 (off); it cures some role swaps and causes others (user guide, "Why the
            defaults are what they are"). Ignored by single-study models.
        n_epochs_fixed_correlation
            Models with ``latent_prior="correlated"``: epochs at the start during which the
            prior's correlation ``R`` stays the identity, so the factors separate before ``R``
            is learned. Default ``None``: 20. Ignored by other models.
        plan_kwargs
            Passed to :class:`~sparsevae.train.SparseVAETrainingPlan`.
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` (Lightning), e.g. ``enable_progress_bar``.

        Returns
        -------
        The result of scvi-tools' train runner.
        """
        check_n_cells(self.adata)
        if max_epochs is None:
            max_epochs = default_max_epochs(self.adata.n_obs)
        if train_size is None:
            train_size = 0.9 if early_stopping else 1.0
        plan_kwargs = {
            "lr": lr,
            "n_epochs_shared_first": n_epochs_shared_first,
            "n_epochs_fixed_correlation": n_epochs_fixed_correlation,
            "n_epochs_kl_warmup": n_epochs_kl_warmup,
            "n_epochs_prior_warmup": n_epochs_prior_warmup,
            "n_epochs_lambda0_ramp": n_epochs_lambda0_ramp,
            **(plan_kwargs or {}),
        }
        schedule = prior_schedule(
            max_epochs,
            self.module.is_count,
            plan_kwargs["n_epochs_prior_warmup"],
            plan_kwargs["n_epochs_lambda0_ramp"],
        )
        # Log the epoch metrics even when an epoch has fewer than Lightning's default 50 steps.
        trainer_kwargs.setdefault("log_every_n_steps", 1)
        full_prior_epoch = schedule.full_prior_epoch
        if early_stopping:
            # The schedule moves the validation ELBO; early stopping must not act before it ends.
            trainer_kwargs.setdefault("early_stopping_warmup_epochs", full_prior_epoch)
        datasplitter_kwargs = dict(trainer_kwargs.pop("datasplitter_kwargs", None) or {})
        if "drop_last" not in datasplitter_kwargs and self._lone_last_cell(train_size, batch_size):
            # A minibatch of one cell breaks the encoder's BatchNorm; drop it (another cell at
            # random each epoch, as the loader shuffles).
            datasplitter_kwargs["drop_last"] = True
        # Lightning keeps the modules' train/eval state; after inference (eval mode) a further
        # train() call would otherwise run without dropout.
        self.module.train()
        result = super().train(
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            train_size=train_size,
            validation_size=validation_size,
            batch_size=batch_size,
            early_stopping=early_stopping,
            plan_kwargs=plan_kwargs,
            datasplitter_kwargs=datasplitter_kwargs,
            **trainer_kwargs,
        )
        bad = self.module.non_finite_parameters()
        if bad:
            raise DivergenceError(
                f"Training diverged: parameters are NaN or infinite after training "
                f"({', '.join(bad[:3])}). Lower the learning rate (e.g. `model.train(lr=1e-3)`) "
                "or check the data for extreme values."
            )
        epochs_run = int(self.trainer.current_epoch)
        if self.module.prior is not None and epochs_run <= full_prior_epoch:
            _warn(
                f"Training ended after {epochs_run} epochs, before the mask prior reached full "
                f"strength (epoch {full_prior_epoch + 1}: warm-up {schedule.warmup} and "
                f"spike ramp {schedule.ramp} epochs), so eta was never fitted and the "
                "inclusion probabilities do not select genes. Train for more epochs, or shorten "
                "n_epochs_prior_warmup / n_epochs_lambda0_ramp."
            )
        if not self._warn_if_collapsed():
            self._warn_if_misassigned()
        return result

    def _lone_last_cell(self, train_size: float, batch_size: int) -> bool:
        """Whether the training cells would leave a last minibatch of a single cell."""
        n_train = int(np.ceil(train_size * self.adata.n_obs))
        return n_train > batch_size and n_train % batch_size == 1

    @torch.no_grad()
    def _warn_if_collapsed(self, max_cells: int = 2000) -> bool:
        """Warn when the encoder's posterior collapsed to the prior (factors carry no signal).

        The mean KL of ``q(z | x)`` to the prior over up to ``max_cells`` training cells (the
        training history is not kept when Lightning's logger is off). Returns whether it warned.
        """
        if self.module.prior is not None and self._all_factors_off():
            _warn(
                "Every factor was switched off: no mask entry left the spike (all |w| < "
                "log(lambda0/lambda1)/(lambda0-lambda1)) and no gene has p* >= 0.5, so the "
                "factors explain nothing. Usually the encoder collapsed to the prior early in "
                "training (a KL warm-up, `model.train(n_epochs_kl_warmup=20)`, usually fixes "
                "it); otherwise the prior is too strong for these data (try a smaller "
                "`b` or `lambda0`)."
            )
            return True
        n = self.adata.n_obs
        rng = np.random.default_rng(0)
        idx = np.sort(rng.choice(n, size=min(n, max_cells), replace=False))
        was_training = self.module.training
        self.module.eval()
        total, count = 0.0, 0
        # fork_rng: the check samples z, and must not move the user's random stream.
        with torch.random.fork_rng():
            for tensors in self._make_data_loader(adata=self.adata, indices=idx, batch_size=512):
                _, _, losses = self.module(tensors)
                kl = losses.kl_local
                kl = sum(kl.values()) if isinstance(kl, dict) else kl
                total += float(kl.sum())
                count += int(kl.shape[0])
        last = total / max(count, 1)
        self.module.train(was_training)
        if np.isfinite(last) and last < COLLAPSE_KL:
            _warn(
                "Posterior collapse: the factors carry almost no information about the cells "
                f"(KL of the encoder's posterior to the prior: {last:.3g} nats per cell), so "
                "every factor is noise and the mask prior switches them off. Retrain with a KL "
                "warm-up, e.g. `model.train(n_epochs_kl_warmup=20)`, or with another seed "
                "(`scvi.settings.seed`) or fewer factors."
            )
            return True
        return False

    def _warn_if_misassigned(self, max_cells: int = 2000) -> None:
        """Multi-study: warn when the shared and specific masks look swapped.

        A shared factor quiet in some study, or a program in every study's specific
        mask (see :func:`sparsevae.tl.check_shared_specific`).
        """
        if not self.is_multistudy or self.module.prior is None:
            return
        n = self.adata.n_obs
        idx = np.sort(np.random.default_rng(0).choice(n, size=min(n, max_cells), replace=False))
        was_training = self.module.training
        with torch.random.fork_rng():
            z = self.get_latent_representation(indices=idx)
        self.module.train(was_training)
        codes = pd.Categorical(
            self.adata.obs[self.study_key].astype(str).to_numpy()[idx], categories=self.studies
        ).codes
        selections = {k: is_selected(self.get_inclusion_probabilities(k)) for k in self.mask_kinds}
        checks = shared_specific_checks(z, codes, self.factor_names, selections)
        if checks.ok:
            return
        _warn(
            "The multi-study fit looks misassigned: "
            + "; ".join(checks.problems)
            + ". Refit with another seed (`scvi.settings.seed`) and check the new fit with "
            "`sparsevae.tl.check_shared_specific(model)`; if the checks keep failing, reconsider "
            "the numbers of shared and specific factors."
        )

    def _all_factors_off(self) -> bool:
        """Whether every factor of every mask is switched off (unused and unselected)."""
        prior = self.module.prior
        for kind in self.mask_kinds:
            W, eta = self.get_mask(kind), self.get_eta(kind)
            n_selected = is_selected(self.get_inclusion_probabilities(kind)).sum(axis=0)
            off, _ = factor_use(W.abs().max(axis=0), n_selected, eta, prior.w_off, prior.eta_off)
            if not off.all():
                return False
        return True

    # ------------------------------------------------------------------------ results
    @property
    def factor_names(self) -> list[str]:
        """Names of the factors, in the column order of :meth:`get_latent_representation`.

        Single-study: ``factor_0``, ``factor_1``, .... Multi-study: the shared factors
        ``shared_0``, ..., ``shared_{K-1}`` then the specific factors ``specific_0``, ...,
        ``specific_{K_spec-1}``.
        """
        if not self.is_multistudy:
            return [f"factor_{k}" for k in range(self.module.n_factors)]
        return self.shared_factor_names + self.specific_factor_names

    @property
    def shared_factor_names(self) -> list[str]:
        """Names of the factors decoded through the shared mask (all factors, single-study)."""
        if not self.is_multistudy:
            return self.factor_names
        return [f"shared_{k}" for k in range(self.module.n_factors)]

    @property
    def specific_factor_names(self) -> list[str]:
        """Names of the study-specific factors (``[]`` for a single-study model)."""
        return [f"specific_{k}" for k in range(getattr(self.module, "n_specific_factors", 0))]

    def kind_factor_names(self, kind: str | None = None) -> list[str]:
        """Names of the factors (columns) of mask ``kind``.

        Parameters
        ----------
        kind
            ``None`` or ``"shared"``: the shared factors; a study name: the specific factors.

        Returns
        -------
        List of factor names.
        """
        if self._kind_index(kind) is None:
            return self.shared_factor_names
        return self.specific_factor_names

    @torch.inference_mode()
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        batch_size: int | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Factors of each cell (posterior means by default).

        Parameters
        ----------
        adata
            AnnData with the same genes as the training data; default the training data.
        indices
            Cells to use; default all.
        give_mean
            Return the posterior mean (``True``) or one sample.
        batch_size
            Minibatch size for inference.
        **kwargs
            Passed to :meth:`scvi.model.base.VAEMixin.get_latent_representation`.

        Returns
        -------
        Array of shape ``(n_cells, n_factors)``, columns named by :attr:`factor_names`.
        Multi-study: ``n_factors + n_specific_factors`` columns, the shared factors
        (``shared_k``) then the specific ones (``specific_k``). Specific factor ``specific_k`` of
        a cell from study ``s`` acts through column ``k`` of study ``s``'s mask, so it is a
        different program in each study: compare it within a study, not across studies.
        """
        z = super().get_latent_representation(
            adata=adata, indices=indices, give_mean=give_mean, batch_size=batch_size, **kwargs
        )
        if not np.all(np.isfinite(z)):
            raise FloatingPointError(
                "The factors contain NaN or infinite values: the model's parameters are not "
                "finite. Retrain with a lower learning rate."
            )
        return z

    def _genes_by_factors(self, values: torch.Tensor, kind: str | None = None) -> pd.DataFrame:
        return pd.DataFrame(
            values.detach().cpu().numpy(),
            index=pd.Index(self.adata.var_names, name="gene"),
            columns=self.kind_factor_names(kind),
        )

    def get_mask(self, kind: str | None = None) -> pd.DataFrame:
        """The decoder mask ``W`` (genes x factors); all ones for ``mask=None``.

        Parameters
        ----------
        kind
            ``None`` (default) or ``"shared"``: the shared mask (the only mask of a single-study
            model), columns :attr:`shared_factor_names`. A study name (multi-study): that study's
            specific mask, columns :attr:`specific_factor_names`.

        Returns
        -------
        DataFrame indexed by gene with one column per factor.
        """
        return self._genes_by_factors(self._module_mask(kind).W, kind)

    def _module_mask(self, kind: str | None) -> ModuleMask:
        """The module's mask of ``kind`` (the shared mask first, then one per study)."""
        s = self._kind_index(kind)
        return self.module.masks()[0 if s is None else s + 1]

    def _require_prior(self) -> None:
        if self.module.prior is None:
            raise ValueError(
                "This model has no mask prior (mask=None, the plain VAE), so it has no inclusion "
                "probabilities or factor weights. Use mask='ssl'."
            )

    def get_inclusion_probabilities(self, kind: str | None = None) -> pd.DataFrame:
        """Posterior inclusion probabilities ``p*`` of the mask entries (genes x factors).

        Parameters
        ----------
        kind
            Which mask: ``None``/``"shared"`` or a study name, see :meth:`get_mask`.

        Returns
        -------
        DataFrame indexed by gene with one column per factor, values in ``[0, 1]``.
        """
        self._require_prior()
        return self._genes_by_factors(self._module_mask(kind).p_star, kind)

    def get_eta(self, kind: str | None = None) -> pd.Series:
        """Each factor's prior inclusion weight ``eta_k`` (the expected share of genes it selects).

        Parameters
        ----------
        kind
            Which mask: ``None``/``"shared"`` or a study name, see :meth:`get_mask`.

        Returns
        -------
        Series indexed by factor name.
        """
        self._require_prior()
        eta = self._module_mask(kind).eta
        names = self.kind_factor_names(kind)
        return pd.Series(eta.detach().cpu().numpy(), index=names, name="eta")

    def get_latent_correlation(self) -> pd.DataFrame:
        """The factors' prior correlation matrix ``R`` (``z ~ N(0, R)``).

        Learned with the module keyword ``latent_prior="correlated"``
        (``SparseVAE(adata, latent_prior="correlated")``); the identity with the default
        ``latent_prior="normal"``. Multi-study models: over the shared then the specific factors.

        Returns
        -------
        DataFrame (factors x factors) indexed by factor name.
        """
        with torch.no_grad():
            L = self.module.latent_scale_tril()
            R = (L @ L.T).cpu().numpy()
        names = list(self.factor_names)
        return pd.DataFrame(R, index=names, columns=names)

    def write_results(
        self,
        adata: AnnData | None = None,
        key_added: str = "sparsevae",
        overwrite: bool = False,
        effects: bool = True,
    ) -> AnnData:
        """Write factors, mask, inclusion probabilities and settings into an AnnData.

        Writes ``obsm[f"X_{key_added}"]`` (factors), ``varm[f"{key_added}_W"]`` (mask),
        ``varm[f"{key_added}_pstar"]`` (inclusion probabilities; not for ``mask=None``),
        ``varm[f"{key_added}_effect"]`` (signed gene effects, see :meth:`get_gene_effects`; with
        ``effects=True``) and ``uns[key_added]`` (``eta``, factor names, the layout
        ``mask_kinds``, ``W_keys``, ``pstar_keys``, ``effect_keys``, the prior's thresholds
        ``prior`` and the settings). :mod:`sparsevae.tl` and :mod:`sparsevae.pl` read them back.

        Multi-study models write, instead of the single mask: ``varm[f"{key_added}_W_shared"]``,
        ``varm[f"{key_added}_pstar_shared"]``, ``varm[f"{key_added}_effect_shared"]`` and, for
        each study, ``varm[f"{key_added}_W_{study}"]``, ``varm[f"{key_added}_pstar_{study}"]`` and
        ``varm[f"{key_added}_effect_{study}"]`` (a ``/`` in a study name becomes ``_``; effects
        of a study without cells in ``adata`` are NaN). ``obsm[f"X_{key_added}"]`` holds the
        shared then the specific factors, and ``uns[key_added]`` records the layout:
        ``factor_names``, ``shared_factor_names``, ``specific_factor_names``, ``study_key``,
        ``studies``, ``mask_kinds`` (``["shared", *studies]``), ``W_keys``, ``pstar_keys`` and
        ``effect_keys`` (the varm keys in the order of ``mask_kinds``), ``eta_shared`` and
        ``eta_specific`` (studies x specific factors).

        Parameters
        ----------
        adata
            AnnData with the same genes as the training data; default the training data.
        key_added
            Base name of the keys.
        overwrite
            Replace existing keys; by default an existing key raises an error and nothing is
            written.
        effects
            Also compute and write the signed gene effects (one decoder pass per factor over
            the cells; set ``False`` to skip it on large data).

        Returns
        -------
        The AnnData written to.
        """
        adata = self.adata if adata is None else adata
        self._check_var_names(adata.var_names)
        kinds = self.mask_kinds
        has_prior = self.module.prior is not None
        # Single-study: f"{key}_W"; multi-study: one key per mask, f"{key}_W_{kind}".
        suffix = [f"_{k.replace('/', '_')}" for k in kinds] if self.is_multistudy else [""]
        W_keys = [f"{key_added}_W{x}" for x in suffix]
        pstar_keys = [f"{key_added}_pstar{x}" for x in suffix] if has_prior else []
        effect_keys = [f"{key_added}_effect{x}" for x in suffix] if effects else []
        keys = {
            "obsm": [f"X_{key_added}"],
            "varm": W_keys + pstar_keys + effect_keys,
            "uns": [key_added],
        }
        if len(set(keys["varm"])) < len(keys["varm"]):
            raise ValueError(
                f"Study names {self.studies} give clashing keys once '/' is replaced by '_'."
            )
        if not overwrite:
            _check_no_clash(adata, keys)
        # Compute everything first, so that a failure writes nothing.
        z = self.get_latent_representation(adata)
        effect_values = [self._effects_or_nan(adata, kind) for kind in kinds] if effects else []
        adata.obsm[f"X_{key_added}"] = z
        for kind, key in zip(kinds, W_keys, strict=True):
            adata.varm[key] = self.get_mask(kind).to_numpy()
        for kind, key in zip(kinds, pstar_keys, strict=False):  # none without a prior
            adata.varm[key] = self.get_inclusion_probabilities(kind).to_numpy()
        for value, key in zip(effect_values, effect_keys, strict=True):
            adata.varm[key] = value
        uns: dict[str, Any] = {
            "factor_names": self.factor_names,
            "mask_kinds": kinds,
            "W_keys": W_keys,
            "pstar_keys": pstar_keys,
            "effect_keys": effect_keys,
            "params": {
                k: (v if v is not None else "None")
                for k, v in self.init_params_["non_kwargs"].items()
            },
            "likelihood": self.likelihood,
        }
        uns["params"]["likelihood"] = self.likelihood
        if self.is_multistudy:
            uns["shared_factor_names"] = self.shared_factor_names
            uns["specific_factor_names"] = self.specific_factor_names
            uns["study_key"] = self.study_key
            uns["studies"] = self.studies
        if has_prior:
            uns["prior"] = self.module.prior.thresholds()
            if self.is_multistudy:
                uns["eta_shared"] = self.get_eta("shared").to_numpy()
                uns["eta_specific"] = np.stack([self.get_eta(s).to_numpy() for s in self.studies])
            else:
                uns["eta"] = self.get_eta().to_numpy()
        adata.uns[key_added] = uns
        return adata

    def _effects_or_nan(self, adata: AnnData, kind: str) -> np.ndarray:
        """Gene effects of mask ``kind``; NaN for a study without cells in ``adata``."""
        if kind != "shared":
            cells = adata.obs[self.study_key].astype(str)
            if not (cells == kind).any():
                return np.full((adata.n_vars, len(self.specific_factor_names)), np.nan)
        return self.get_gene_effects(adata, kind=kind).to_numpy()

    # ------------------------------------------------------------------------ save / load
    @classmethod
    def load(
        cls,
        dir_path: str | os.PathLike,
        adata: AnnData | None = None,
        *,
        prefix: str | None = None,
        **kwargs: Any,
    ) -> SparseVAE:
        """Load a saved model, checking ``adata`` like training data.

        The model file is read with a restricted unpickler that builds only the data types a
        genuine file holds, so a crafted file cannot run code; anything else raises
        :class:`~sparsevae.model.UnsafeModelFileError`. Still, load model files only from
        trusted sources.

        Parameters
        ----------
        dir_path
            Folder written by :meth:`save`.
        adata
            AnnData to attach; default the AnnData saved with the model (``save_anndata=True``).
            It must have the model's genes and, multi-study, cells of the trained studies only
            (any subset of them); its data get the checks of training data.
        prefix
            Prefix of the saved file names, as given to :meth:`save`.
        **kwargs
            Passed to :meth:`scvi.model.base.BaseModelClass.load` (e.g. ``accelerator``).

        Returns
        -------
        The loaded model.
        """
        file_name = f"{prefix or ''}model.pt"
        saved = read_model_file(os.path.join(dir_path, file_name))
        registry = saved["attr_dict"].get("registry_", {})
        if registry.get("model_name", cls.__name__) != cls.__name__:
            raise ValueError(
                f"{dir_path} holds a {registry['model_name']} model, not a {cls.__name__}."
            )
        if adata is None:
            adata_path = os.path.join(dir_path, f"{prefix or ''}adata.h5ad")
            if os.path.exists(adata_path):
                adata = anndata.read_h5ad(adata_path)
        else:
            check_not_backed(adata)
            _compare_var_names(pd.Index(saved["var_names"]), pd.Index(adata.var_names))
            setup_args = registry.get("setup_args", {})
            likelihood = saved["attr_dict"]["init_params_"]["non_kwargs"]["likelihood"]
            check_new_data(adata, setup_args.get("layer"), likelihood)
            study_key = setup_args.get("study_key")
            if study_key is not None:
                state = registry["field_registries"][STUDY_KEY]["state_registry"]
                studies = [str(c) for c in state["categorical_mapping"]]
                check_known_studies(adata, study_key, studies)
        # scvi-tools reads the file again, with pickle's full powers: give it a copy written
        # from the objects the restricted reader built, never the original bytes.
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(saved, os.path.join(tmp, file_name))
            return super().load(tmp, adata=adata, prefix=prefix, **kwargs)


def _check_no_clash(adata: AnnData, keys: dict[str, list[str]]) -> None:
    clash = [
        f"adata.{attr}[{k!r}]" for attr, ks in keys.items() for k in ks if k in getattr(adata, attr)
    ]
    if clash:
        raise KeyError(
            f"{', '.join(clash)} already exist. Pass overwrite=True to replace them or "
            "choose another key_added."
        )


def _compare_var_names(expected: pd.Index, got: pd.Index) -> None:
    if expected.equals(got):
        return
    missing = expected.difference(got)
    extra = got.difference(expected)
    if len(missing) == 0 and len(extra) == 0:
        detail = "the same genes in a different order"
        fix = "Reorder them with `adata = adata[:, model_genes].copy()`."
    else:
        detail = (
            f"{len(missing)} of the model's {len(expected)} genes are missing "
            f"(e.g. {list(missing[:3])}) and {len(extra)} are extra (e.g. {list(extra[:3])})"
        )
        fix = (
            "Subset to the model's genes, in the same order, e.g. "
            "`adata = adata[:, model.adata.var_names].copy()`, if all are present."
        )
    raise ValueError(f"The AnnData's genes do not match the trained model: {detail}. {fix}")
