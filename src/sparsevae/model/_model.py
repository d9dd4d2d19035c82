"""The user-facing SparseVAE model class."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import LayerField, NumericalObsField
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin, VAEMixin

from ..module import LIKELIHOODS, SparseVAEModule
from ..train import SparseVAETrainingPlan
from ._interpret import InterpretabilityMixin
from ._validate import (
    check_counts,
    check_finite,
    check_n_cells,
    get_matrix,
    matrix_stats,
)

logger = logging.getLogger(__name__)

__all__ = ["SparseVAE", "default_max_epochs"]


def default_max_epochs(n_obs: int) -> int:
    """Default number of epochs: about 300k cell passes, between 20 and 400 epochs.

    Parameters
    ----------
    n_obs
        Number of cells.

    Returns
    -------
    Number of epochs.
    """
    return int(np.clip(round(300_000 / max(n_obs, 1)), 20, 400))


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
        cell's library size.
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
        the mask so that inclusion probabilities mean something (see
        :class:`~sparsevae.module.SparseVAEModule`). ``0`` turns it off.
    kl_weight
        Weight of the KL term; values above 1 give the beta-VAE baseline.
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
        weight_prior_precision: float = 1.0,
        kl_weight: float = 1.0,
        **module_kwargs: Any,
    ) -> None:
        super().__init__(adata)
        n_genes = self.summary_stats.n_vars
        if not isinstance(n_factors, int | np.integer) or not 1 <= n_factors <= n_genes:
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
        where = self._data_description()
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
            **module_kwargs,
        )
        self.likelihood = likelihood
        self._model_summary_string = (
            f"SparseVAE: {n_factors} factors, likelihood={likelihood}, mask={mask}, "
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
        **kwargs: Any,
    ) -> None:
        """Register an AnnData for SparseVAE.

        The data are checked first (NaN or infinite values, too few cells, missing layer or size
        factors); on a failed check nothing is written to ``adata``.

        Parameters
        ----------
        adata
            AnnData with cells in rows and genes in columns.
        layer
            Layer holding the data (raw counts for a count likelihood); ``None`` uses ``adata.X``.
        size_factor_key
            Column of ``adata.obs`` with each cell's library size (size factor) for count
            likelihoods; defaults to the cell's total count.
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.
        """
        check_n_cells(adata)
        X = get_matrix(adata, layer)
        where = f"adata.layers[{layer!r}]" if layer is not None else "adata.X"
        check_finite(X, where)
        if size_factor_key is not None:
            if size_factor_key not in adata.obs:
                raise KeyError(f"size_factor_key {size_factor_key!r} is not a column of adata.obs.")
            sf = np.asarray(adata.obs[size_factor_key], dtype=float)
            if not np.all(np.isfinite(sf)) or np.any(sf <= 0):
                raise ValueError(
                    f"adata.obs[{size_factor_key!r}] must hold finite positive size factors."
                )
        setup_method_args = cls._get_setup_method_args(**locals())
        anndata_fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=False),
            NumericalObsField(REGISTRY_KEYS.SIZE_FACTOR_KEY, size_factor_key, required=False),
        ]
        adata_manager = AnnDataManager(fields=anndata_fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    def _data_description(self) -> str:
        layer = self.adata_manager.registry["setup_args"].get("layer")
        return f"adata.layers[{layer!r}]" if layer is not None else "adata.X"

    def _validate_anndata(self, adata: AnnData | None = None, copy_if_view: bool = True):
        if adata is not None and adata is not self.adata:
            self._check_var_names(adata.var_names)
        return super()._validate_anndata(adata, copy_if_view=copy_if_view)

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
        plan_kwargs
            Passed to :class:`~sparsevae.train.SparseVAETrainingPlan`.
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` (Lightning), e.g. ``enable_progress_bar``.

        Returns
        -------
        The result of scvi-tools' train runner.
        """
        if max_epochs is None:
            max_epochs = default_max_epochs(self.adata.n_obs)
        if train_size is None:
            train_size = 0.9 if early_stopping else 1.0
        plan_kwargs = {"lr": lr, "n_epochs_kl_warmup": n_epochs_kl_warmup, **(plan_kwargs or {})}
        # Log the epoch metrics even when an epoch has fewer than Lightning's default 50 steps.
        trainer_kwargs.setdefault("log_every_n_steps", 1)
        return super().train(
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            train_size=train_size,
            validation_size=validation_size,
            batch_size=batch_size,
            early_stopping=early_stopping,
            plan_kwargs=plan_kwargs,
            **trainer_kwargs,
        )

    # ------------------------------------------------------------------------ results
    @property
    def factor_names(self) -> list[str]:
        """Names of the factors: ``factor_0``, ``factor_1``, ...."""
        return [f"factor_{k}" for k in range(self.module.n_factors)]

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
        Array of shape ``(n_cells, n_factors)``.
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

    def _genes_by_factors(self, values: torch.Tensor) -> pd.DataFrame:
        return pd.DataFrame(
            values.detach().cpu().numpy(),
            index=pd.Index(self.adata.var_names, name="gene"),
            columns=self.factor_names,
        )

    def get_mask(self) -> pd.DataFrame:
        """The decoder mask ``W`` (genes x factors); all ones for ``mask=None``.

        Returns
        -------
        DataFrame indexed by gene with one column per factor.
        """
        return self._genes_by_factors(self.module.decoder.W)

    def _require_prior(self) -> None:
        if self.module.prior is None:
            raise ValueError(
                "This model has no mask prior (mask=None, the plain VAE), so it has no inclusion "
                "probabilities or factor weights. Use mask='ssl'."
            )

    def get_inclusion_probabilities(self) -> pd.DataFrame:
        """Posterior inclusion probabilities ``p*`` of the mask entries (genes x factors).

        Returns
        -------
        DataFrame indexed by gene with one column per factor, values in ``[0, 1]``.
        """
        self._require_prior()
        return self._genes_by_factors(self.module.prior.p_star)

    def get_eta(self) -> pd.Series:
        """Each factor's prior inclusion weight ``eta_k`` (the expected share of genes it selects).

        Returns
        -------
        Series indexed by factor name.
        """
        self._require_prior()
        return pd.Series(
            self.module.prior.eta.detach().cpu().numpy(), index=self.factor_names, name="eta"
        )

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
        ``effects=True``) and ``uns[key_added]`` (``eta``, factor names and settings).

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
        keys = {
            "obsm": [f"X_{key_added}"],
            "varm": [f"{key_added}_W"]
            + ([f"{key_added}_pstar"] if self.module.prior else [])
            + ([f"{key_added}_effect"] if effects else []),
            "uns": [key_added],
        }
        if not overwrite:
            clash = [
                f"adata.{attr}[{k!r}]"
                for attr, ks in keys.items()
                for k in ks
                if k in getattr(adata, attr)
            ]
            if clash:
                raise KeyError(
                    f"{', '.join(clash)} already exist. Pass overwrite=True to replace them or "
                    "choose another key_added."
                )
        z = self.get_latent_representation(adata)
        adata.obsm[f"X_{key_added}"] = z
        effect = self.get_gene_effects(adata).to_numpy() if effects else None
        adata.varm[f"{key_added}_W"] = self.get_mask().to_numpy()
        if effect is not None:
            adata.varm[f"{key_added}_effect"] = effect
        uns: dict[str, Any] = {
            "factor_names": self.factor_names,
            "params": {
                k: (v if v is not None else "None")
                for k, v in self.init_params_["non_kwargs"].items()
            },
            "likelihood": self.likelihood,
        }
        uns["params"]["likelihood"] = self.likelihood
        if self.module.prior is not None:
            adata.varm[f"{key_added}_pstar"] = self.get_inclusion_probabilities().to_numpy()
            uns["eta"] = self.get_eta().to_numpy()
        adata.uns[key_added] = uns
        return adata

    # ------------------------------------------------------------------------ save / load
    @classmethod
    def load(cls, dir_path: str, adata: AnnData | None = None, **kwargs: Any) -> SparseVAE:
        """Load a saved model, checking that ``adata`` has the genes it was trained on.

        Parameters
        ----------
        dir_path
            Folder written by :meth:`save`.
        adata
            AnnData to attach; default the AnnData saved with the model.
        **kwargs
            Passed to :meth:`scvi.model.base.BaseModelClass.load`.

        Returns
        -------
        The loaded model.
        """
        if adata is not None:
            prefix = kwargs.get("prefix") or ""
            path = os.path.join(dir_path, f"{prefix}model.pt")
            if not os.path.exists(path):
                raise FileNotFoundError(f"No saved SparseVAE at {path}.")
            saved = torch.load(path, map_location="cpu", weights_only=False)
            _compare_var_names(pd.Index(saved["var_names"]), pd.Index(adata.var_names))
        return super().load(dir_path, adata=adata, **kwargs)


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
