"""The user-facing SparseVAE model class: construction and registration of the data.

Its capabilities live in mixins: studies and factor layout (``_studies``), training
(``_training``), results (``_results``), gene effects (``_interpret``), scvi-tools' expression
API (``_expression``), loading (``_save_load``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField, NumericalObsField
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin, VAEMixin

from ..module import (
    AUXILIARY_KEY,
    COUNT_DEFAULTS,
    LATENT_PRIORS,
    LIKELIHOODS,
    STUDY_KEY,
    SparseVAEModule,
)
from ..train import SparseVAETrainingPlan, default_max_epochs
from ._expression import ExpressionMixin
from ._interpret import InterpretabilityMixin
from ._latent_prior import LatentPriorMixin
from ._results import ResultsMixin
from ._save_load import SaveLoadMixin
from ._studies import StudiesMixin
from ._training import TrainingMixin
from ._validate import (
    auxiliary_is_categorical,
    check_auxiliary_column,
    check_counts,
    check_finite,
    check_known_auxiliary,
    check_known_studies,
    check_n_cells,
    check_new_data,
    check_registrable,
    check_study_column,
    compare_var_names,
    data_location,
    get_matrix,
    matrix_stats,
)

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_N_SPECIFIC_FACTORS", "SparseVAE", "default_max_epochs"]

#: Study-specific factors of a multi-study model when ``n_specific_factors`` is not given.
DEFAULT_N_SPECIFIC_FACTORS = 5


class SparseVAE(
    TrainingMixin,
    ResultsMixin,
    StudiesMixin,
    InterpretabilityMixin,
    LatentPriorMixin,
    ExpressionMixin,
    SaveLoadMixin,
    VAEMixin,
    UnsupervisedTrainingMixin,
    BaseModelClass,
):
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
    latent_prior
        Prior of the factors. ``"normal"`` (default): ``N(0, I)``, the paper's. ``"conditional"``:
        the iVAE's ``p(z | u)``, a Gaussian whose mean and variance per factor depend on the
        covariate ``u`` registered with ``setup_anndata(..., auxiliary_key=...)`` (condition,
        time point, donor, pseudotime); factors whose distribution changes across ``u`` become
        identifiable even without a mask. ``"mixture"``: a Gaussian mixture with
        ``n_components`` components that clusters the cells
        (:meth:`get_cluster_probabilities`). ``"correlated"``: ``N(0, R)`` with a learned
        correlation ``R``. See the user guide, "Priors of the factors".
    n_components
        ``latent_prior="mixture"``: number of components (clusters); between 2 and the number of
        cells. Ignored by other priors.
    **module_kwargs
        Passed to :class:`~sparsevae.module.SparseVAEModule` (e.g. ``n_layers_encoder``,
        ``dropout_rate``, ``spike_gate``, ``prior_cells``). Models with a count likelihood
        default to ``spike_gate=True, prior_cells=200``
        (:data:`~sparsevae.module.COUNT_DEFAULTS`): without them real counts give dense masks
        without anchors, and a program of one study stays on the shared masks (user guide,
        "Why the defaults are what they are"); pass ``spike_gate=False, prior_cells=None`` for
        the exact MAP weight without gates.

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
        latent_prior: Literal["normal", "conditional", "mixture", "correlated"] = "normal",
        n_components: int = 10,
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
        prior_kwargs = self._latent_prior_kwargs(latent_prior, n_components)
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
        if likelihood != "gaussian" and mask is not None:
            # Counts: gates and a prior against at most 200 cells, unless given.
            module_kwargs = {**COUNT_DEFAULTS, **module_kwargs}
        # Kept so that train(n_restarts=...) can start again from a fresh initialisation.
        self._module_kwargs = dict(
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
                {
                    "n_specific_factors": int(n_specific_factors),
                    "n_studies": len(self.studies),
                    "study_shares": self._study_cell_counts().tolist(),
                }
                if n_specific_factors
                else {}
            ),
            **prior_kwargs,
            **module_kwargs,
        )
        self.module = self._module_cls(**self._module_kwargs)
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
            f"kl_weight={kl_weight}, latent_prior={latent_prior}"
            + (f" (n_components={n_components})" if latent_prior == "mixture" else "")
            + (f" (u: {self.auxiliary_key!r})" if latent_prior == "conditional" else "")
        )
        self.init_params_ = self._get_init_params(locals())

    def _latent_prior_kwargs(self, latent_prior: str, n_components: int) -> dict[str, Any]:
        """Module arguments of the factors' prior, checked against the registered data."""
        if latent_prior not in LATENT_PRIORS:
            raise ValueError(f"latent_prior must be one of {LATENT_PRIORS}, got {latent_prior!r}.")
        out: dict[str, Any] = {"latent_prior": latent_prior}
        if latent_prior == "conditional":
            if self.auxiliary_key is None:
                raise ValueError(
                    "latent_prior='conditional' needs the covariate u: register it with "
                    "`SparseVAE.setup_anndata(adata, ..., auxiliary_key='<obs column>')`."
                )
            categories = self.auxiliary_categories
            if categories is not None:
                out["n_auxiliary_categories"] = len(categories)
            else:
                u = np.asarray(self.adata_manager.get_from_registry(AUXILIARY_KEY), dtype=float)
                out["auxiliary_loc"] = float(u.mean())
                out["auxiliary_scale"] = float(u.std())
        elif self.auxiliary_key is not None:
            raise ValueError(
                f"The AnnData was registered with auxiliary_key={self.auxiliary_key!r}, which "
                "only latent_prior='conditional' uses. Pass latent_prior='conditional', or "
                "register the AnnData without auxiliary_key."
            )
        if latent_prior == "mixture":
            n_obs = self.summary_stats.n_cells
            if (
                not isinstance(n_components, int | np.integer)
                or isinstance(n_components, bool)
                or not 2 <= n_components <= n_obs
            ):
                raise ValueError(
                    f"n_components must be an integer between 2 and the number of cells "
                    f"({n_obs}), got {n_components!r}."
                )
            out["n_components"] = int(n_components)
        return out

    # ------------------------------------------------------------------------ setup
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = None,
        size_factor_key: str | None = None,
        study_key: str | None = None,
        auxiliary_key: str | None = None,
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
        auxiliary_key
            Column of ``adata.obs`` with the observed covariate ``u`` of
            ``latent_prior="conditional"`` (the iVAE): categorical (category, string or bool
            dtype: a prior per category; at least two) or continuous (numeric dtype: the prior's
            mean and variance are a small network of ``u``). No missing values. Store categories
            coded as numbers as a categorical column.
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
        if auxiliary_key is not None and not loading:
            check_auxiliary_column(adata, auxiliary_key)
        anndata_fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=False),
            NumericalObsField(REGISTRY_KEYS.SIZE_FACTOR_KEY, size_factor_key, required=False),
        ]
        if study_key is not None:
            anndata_fields.append(CategoricalObsField(STUDY_KEY, study_key))
        if auxiliary_key is not None:
            categorical = auxiliary_is_categorical(adata.obs[auxiliary_key])
            field = CategoricalObsField if categorical else NumericalObsField
            anndata_fields.append(field(AUXILIARY_KEY, auxiliary_key))
        adata_manager = AnnDataManager(fields=anndata_fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    def _validate_anndata(self, adata: AnnData | None = None, copy_if_view: bool = True):
        if adata is not None and adata is not self.adata:
            # New data get the checks of training data, before scvi-tools registers them.
            self._check_var_names(adata.var_names)
            layer = self.adata_manager.registry["setup_args"].get("layer")
            check_new_data(adata, layer, self.likelihood)
            if self.is_multistudy:
                check_known_studies(adata, self.study_key, self.studies)
            if self.auxiliary_key is not None:
                check_known_auxiliary(adata, self.auxiliary_key, self.auxiliary_categories)
        return super()._validate_anndata(adata, copy_if_view=copy_if_view)

    # ------------------------------------------------------------------------ studies

    def _check_var_names(self, var_names: Sequence[str]) -> None:
        expected = pd.Index(self.adata.var_names)
        compare_var_names(expected, pd.Index(var_names))
