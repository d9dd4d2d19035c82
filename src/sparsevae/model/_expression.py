"""scvi-tools' expression API for count likelihoods: normalised expression, DE, predictive samples.

:class:`scvi.model.base.RNASeqMixin` provides :meth:`differential_expression` unchanged; it
calls :meth:`ExpressionMixin.get_normalized_expression`, which is written here because
scvi-tools' version looks up a batch covariate that this model does not register.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.model.base import RNASeqMixin

from ..module import STUDY_KEY
from ._validate import refuse_unsorted_backed_indices

__all__ = ["ExpressionMixin"]

#: Rows (cells x posterior draws) decoded at once by the expression methods.
MAX_DECODED_ROWS = 1024


def _no_transform_batch(transform_batch: Any) -> None:
    if transform_batch is None:
        return
    if isinstance(transform_batch, Sequence) and not isinstance(transform_batch, str):
        if all(t is None for t in transform_batch):
            return
    raise NotImplementedError(
        f"transform_batch={transform_batch!r}: SparseVAE has no batch covariate to condition on "
        "(a multi-study model decodes each cell through its own study's mask). Leave "
        "transform_batch out."
    )


class ExpressionMixin(RNASeqMixin):
    """Expected expression, differential expression and predictive samples (count likelihoods).

    The decoder's expected count of gene ``j`` in cell ``i`` is ``mu_ij = l_i exp(f_j(z_i) +
    c(z_i))`` (library size ``l_i``, composition offset ``c``); the normalised expression is
    ``rho_ij = mu_ij / sum_g mu_ig``, the share of the cell's counts expected for gene ``j``, as
    scVI's ``px.scale``.
    """

    def _require_counts(self, what: str) -> None:
        if self.module.likelihood == "gaussian":
            raise NotImplementedError(
                f"{what} needs a count likelihood (nb, zinb or poisson); this model was trained "
                "with likelihood='gaussian' on normalised data. Use "
                "`scanpy.tl.rank_genes_groups` on the data for differential expression, and "
                "`model.get_gene_effects()` for the factors' effect on each gene; or train on "
                "raw counts (`SparseVAE.setup_anndata(adata, layer='counts')`)."
            )

    def _decoded_samples(
        self, tensors: dict[str, torch.Tensor], n_samples: int
    ) -> Iterator[tuple[int, Any]]:
        """``(draws, px)`` for ``n_samples`` posterior draws of a minibatch's factors.

        The draws are decoded together, stacked along the cell axis (draw-major), in chunks of
        at most :data:`MAX_DECODED_ROWS` rows.
        """
        module = self.module
        study = tensors.get(STUDY_KEY) if module.is_multistudy else None
        inference = module.inference(
            x=tensors[REGISTRY_KEYS.X_KEY],
            size_factor=tensors.get(REGISTRY_KEYS.SIZE_FACTOR_KEY),
            study=study,
        )
        n_cells = inference["z"].shape[0]
        per_chunk = max(1, MAX_DECODED_ROWS // max(n_cells, 1))
        for start in range(0, n_samples, per_chunk):
            draws = min(per_chunk, n_samples - start)
            z = inference["qz"].sample((draws,)).reshape(draws * n_cells, -1)
            library = inference["library"].repeat(draws, 1)
            kwargs = {} if study is None else {"study": study.repeat(draws, 1)}
            yield draws, module.generative(z=z, library=library, **kwargs)["px"]

    def _eval_batches(
        self, adata: AnnData, indices: Any, batch_size: int | None, **loader_kwargs: Any
    ) -> Iterator[dict[str, torch.Tensor]]:
        """The minibatches of ``adata``, with the module in eval mode (restored afterwards)."""
        refuse_unsorted_backed_indices(self.adata if adata is None else adata, indices)
        module = self.module
        was_training = module.training
        module.eval()
        try:
            yield from self._make_data_loader(
                adata=adata, indices=indices, batch_size=batch_size, **loader_kwargs
            )
        finally:
            module.train(was_training)

    @staticmethod
    def _gene_mask(adata: AnnData, gene_list: Sequence[str] | None) -> np.ndarray:
        """Boolean mask of the genes in ``gene_list`` (all genes for ``None``)."""
        if gene_list is None:
            return np.ones(adata.n_vars, dtype=bool)
        mask = np.asarray(adata.var_names.isin(gene_list))
        if not mask.any():
            raise ValueError("None of the genes in gene_list are among the model's genes.")
        return mask

    @staticmethod
    def _mean_of(px: Any) -> torch.Tensor:
        """Expected count of the negative binomial (before zero inflation) or Poisson."""
        return px.rate if isinstance(px, torch.distributions.Poisson) else px.mu

    @torch.inference_mode()
    def get_normalized_expression(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        transform_batch: Any = None,
        gene_list: Sequence[str] | None = None,
        library_size: float | Literal["latent"] = 1,
        n_samples: int = 1,
        n_samples_overall: int | None = None,
        weights: Literal["uniform"] | None = None,
        batch_size: int | None = None,
        return_mean: bool = True,
        return_numpy: bool | None = None,
        silent: bool = True,
        **kwargs: Any,
    ) -> np.ndarray | pd.DataFrame:
        """Decoded expression of each gene, normalised per cell (scVI's ``rho``).

        As :meth:`scvi.model.SCVI.get_normalized_expression` for this model: ``n_samples``
        posterior samples of each cell's factors are decoded into ``rho_ij`` (expected share of
        the cell's counts), scaled by ``library_size``. Count likelihoods only.

        Parameters
        ----------
        adata
            AnnData with the model's genes; default the training data.
        indices
            Cells to use; default all.
        transform_batch
            Not supported (the model has no batch covariate); leave it ``None``.
        gene_list
            Return only these genes.
        library_size
            Multiply ``rho`` by this number (e.g. ``1e4`` for counts per 10,000), or
            ``"latent"``: the expected counts ``mu`` at each cell's observed library size.
        n_samples
            Posterior samples per cell; with ``return_mean`` their mean is returned.
        n_samples_overall
            Draw this many samples in all, from cells chosen at random (used by
            :meth:`differential_expression`); overrides ``n_samples``.
        weights
            ``None`` or ``"uniform"`` (importance weights are not supported).
        batch_size
            Cells decoded at once; default ``scvi.settings.batch_size``.
        return_mean
            Average the ``n_samples`` samples (else return all of them).
        return_numpy
            Return an array instead of a DataFrame (cells x genes); default ``False`` unless
            several samples per cell are returned.
        silent
            Accepted for compatibility with scvi-tools (no progress bar is shown).
        **kwargs
            Accepted for compatibility with scvi-tools' signature; must be empty.

        Returns
        -------
        ``(n_cells, n_genes)`` DataFrame (cells x genes), or an array of shape
        ``(n_samples, n_cells, n_genes)`` when ``return_mean=False`` and ``n_samples > 1``, or
        ``(n_samples_overall, n_genes)`` with ``n_samples_overall``.

        Examples
        --------
        >>> rho = model.get_normalized_expression(library_size=1e4)  # cells x genes
        """
        self._require_counts("get_normalized_expression")
        _no_transform_batch(transform_batch)
        if weights not in (None, "uniform"):
            raise NotImplementedError(
                f"weights={weights!r} is not supported by SparseVAE; use weights='uniform'."
            )
        if kwargs:
            raise TypeError(f"Unexpected arguments: {sorted(kwargs)}.")
        if library_size != "latent" and not (
            isinstance(library_size, int | float | np.number) and library_size > 0
        ):
            raise ValueError(
                f"library_size must be a positive number or 'latent', got {library_size!r}."
            )
        if not isinstance(n_samples, int | np.integer) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}.")
        adata = self._validate_anndata(adata)
        if indices is None:
            indices = np.arange(adata.n_obs)
        indices = np.asarray(indices)
        if n_samples_overall is not None:
            n_samples = int(n_samples_overall) // max(len(indices), 1) + 1
        gene_mask = self._gene_mask(adata, gene_list)
        exprs: list[np.ndarray] = []
        for tensors in self._eval_batches(adata, indices, batch_size):
            samples = []
            for draws, px in self._decoded_samples(tensors, n_samples):
                mu = self._mean_of(px)
                if library_size == "latent":
                    out = mu
                else:
                    out = mu / mu.sum(-1, keepdim=True) * float(library_size)
                out = out[..., gene_mask].cpu().numpy()
                samples.append(out.reshape(draws, -1, out.shape[-1]))
            exprs.append(np.concatenate(samples))  # (S, B, G)
        values = np.concatenate(exprs, axis=1)  # (S, n_cells, G)
        if n_samples_overall is not None:
            flat = values.reshape(-1, values.shape[-1])
            pick = torch.randint(flat.shape[0], (int(n_samples_overall),)).numpy()
            return flat[pick]
        if return_mean or n_samples == 1:
            values = values.mean(0)
        elif return_numpy is False:
            raise ValueError("Several samples per cell are returned as an array: set return_numpy.")
        if return_numpy or values.ndim == 3:
            return values
        return pd.DataFrame(
            values, index=adata.obs_names[indices], columns=adata.var_names[gene_mask]
        )

    def differential_expression(
        self, adata: AnnData | None = None, *args: Any, **kwargs: Any
    ) -> pd.DataFrame:
        """Differential expression between groups of cells, as scvi-tools computes it.

        :meth:`scvi.model.base.RNASeqMixin.differential_expression` on this model's
        :meth:`get_normalized_expression`: ``mode="vanilla"`` (Bayes factors of
        ``rho_1 > rho_2``) or ``mode="change"`` (posterior probability that the log fold change
        exceeds ``delta``, with ``lfc_mean``, ``lfc_median``, ``proba_de``,
        ``is_de_fdr_<target>`` and raw-count statistics). Count likelihoods only. The
        arguments (``groupby``, ``group1``, ``group2``, ``idx1``, ``idx2``, ``mode``,
        ``delta``, ``fdr_target``, ...) are scvi-tools'; ``batch_correction`` and ``weights=
        "importance"`` are not supported.

        Parameters
        ----------
        adata
            AnnData with the model's genes; default the training data.
        *args, **kwargs
            scvi-tools' arguments (``groupby``, ``group1``, ``group2``, ``idx1``, ``idx2``,
            ``mode``, ``delta``, ``fdr_target``, ...).

        Returns
        -------
        DataFrame with one row per gene (per group for one-vs-rest comparisons).

        Examples
        --------
        >>> de = model.differential_expression(groupby="cell_type", group1="B", mode="change")
        >>> de[de["is_de_fdr_0.05"]].sort_values("lfc_mean").tail()
        """
        self._require_counts("differential_expression")
        if kwargs.get("batch_correction"):
            raise NotImplementedError("batch_correction is not supported: the model has no batch.")
        return super().differential_expression(adata, *args, **kwargs)

    @torch.inference_mode()
    def posterior_predictive_sample(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        transform_batch: Any = None,
        n_samples: int = 1,
        gene_list: Sequence[str] | None = None,
        batch_size: int | None = None,
        dataloader: Iterator[dict[str, torch.Tensor]] | None = None,
        silent: bool = True,
        **data_loader_kwargs: Any,
    ) -> Any:
        """Counts drawn from the posterior predictive ``p(x_new | x)``, as in scvi-tools.

        For each cell, ``n_samples`` draws of its factors from ``q(z | x)``, each decoded and
        sampled from the likelihood (at the cell's library size). Count likelihoods only.

        Parameters
        ----------
        adata
            AnnData with the model's genes; default the training data.
        indices
            Cells to use; default all.
        transform_batch
            Not supported; leave it ``None``.
        n_samples
            Draws per cell.
        gene_list
            Return only these genes.
        batch_size
            Cells decoded at once; default ``scvi.settings.batch_size``.
        dataloader
            Not supported (pass ``adata`` and ``indices``).
        silent
            Accepted for compatibility (no progress bar).
        **data_loader_kwargs
            Passed to the data loader.

        Returns
        -------
        :class:`sparse.GCXS` of shape ``(n_cells, n_genes)`` if ``n_samples == 1``, else
        ``(n_cells, n_genes, n_samples)``, as scvi-tools returns it.
        """
        import sparse

        self._require_counts("posterior_predictive_sample")
        _no_transform_batch(transform_batch)
        if dataloader is not None:
            raise NotImplementedError("dataloader is not supported; pass adata and indices.")
        if not isinstance(n_samples, int | np.integer) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}.")
        adata = self._validate_anndata(adata)
        gene_mask = self._gene_mask(adata, gene_list)
        out = []
        for tensors in self._eval_batches(adata, indices, batch_size, **data_loader_kwargs):
            n_cells = tensors[REGISTRY_KEYS.X_KEY].shape[0]
            draws = [
                px.sample()[:, gene_mask].reshape(k, n_cells, -1)
                for k, px in self._decoded_samples(tensors, n_samples)
            ]
            x = torch.cat(draws)  # (S, B, G)
            x = x[0] if n_samples == 1 else x.permute(1, 2, 0)
            out.append(sparse.GCXS.from_numpy(x.cpu().numpy()))
        return sparse.concatenate(out, axis=0)

    @torch.inference_mode()
    def get_likelihood_parameters(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        n_samples: int = 1,
        give_mean: bool = False,
        batch_size: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Parameters of the count likelihood for each cell and gene, as in scvi-tools.

        Parameters
        ----------
        adata
            AnnData with the model's genes; default the training data.
        indices
            Cells to use; default all.
        n_samples
            Posterior draws of the factors per cell.
        give_mean
            Average over the draws (else return them all when ``n_samples > 1``).
        batch_size
            Cells decoded at once; default ``scvi.settings.batch_size``.

        Returns
        -------
        dict with ``"mean"`` (expected counts), ``"dispersions"`` (negative binomial ``theta``,
        per gene, broadcast to cells; absent for ``"poisson"``) and ``"dropout"`` (zero-inflation
        logits, ``"zinb"`` only), each ``(n_cells, n_genes)`` or ``(n_samples, n_cells,
        n_genes)``.
        """
        self._require_counts("get_likelihood_parameters")
        if not isinstance(n_samples, int | np.integer) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}.")
        adata = self._validate_anndata(adata)
        parts: dict[str, list[np.ndarray]] = {}
        for tensors in self._eval_batches(adata, indices, batch_size):
            n_cells = tensors[REGISTRY_KEYS.X_KEY].shape[0]
            batch: dict[str, list[np.ndarray]] = {}
            for draws, px in self._decoded_samples(tensors, n_samples):
                values = {"mean": self._mean_of(px)}
                if not isinstance(px, torch.distributions.Poisson):
                    values["dispersions"] = px.theta.expand_as(values["mean"])
                if self.module.likelihood == "zinb":
                    values["dropout"] = px.zi_logits
                for key, v in values.items():
                    batch.setdefault(key, []).append(v.cpu().numpy().reshape(draws, n_cells, -1))
            for key, v in batch.items():
                parts.setdefault(key, []).append(np.concatenate(v))
        out = {key: np.concatenate(v, axis=1) for key, v in parts.items()}
        if give_mean or n_samples == 1:
            out = {key: v.mean(0) for key, v in out.items()}
        return out

    def get_loadings(self, kind: str | None = None) -> pd.DataFrame:
        """Signed loadings of genes on factors, as :meth:`scvi.model.LinearSCVI.get_loadings`.

        The average over cells of ``d f_j(z) / d z_k``, the decoder's linear predictor of gene
        ``j`` differentiated by factor ``k`` (:meth:`get_gene_effects` with ``scale="link"``):
        for counts, the log fold change of gene ``j``'s expected expression per unit of factor
        ``k``. For LinearSCVI's linear decoder this is exactly its loading matrix. Which genes a
        factor *selects* is the mask's business: :meth:`get_mask` and
        :meth:`get_inclusion_probabilities`.

        Parameters
        ----------
        kind
            Multi-study models: ``None``/``"shared"`` (default) or a study name, as in
            :meth:`get_gene_effects`.

        Returns
        -------
        DataFrame, genes x factors.
        """
        return self.get_gene_effects(scale="link", kind=kind)

    def get_latent_library_size(self, *args: Any, **kwargs: Any) -> np.ndarray:
        """Not available: the library size is observed (total counts or ``size_factor_key``).

        Parameters
        ----------
        *args, **kwargs
            scvi-tools' arguments (ignored).

        Returns
        -------
        Nothing: it raises :class:`NotImplementedError`, naming the alternative.
        """
        raise NotImplementedError(
            "SparseVAE does not infer a latent library size: it uses each cell's observed total "
            "count (or the size_factor_key given to setup_anndata)."
        )

    def get_importance_weights(self, *args: Any, **kwargs: Any) -> np.ndarray:
        """Not available: importance-weighted expression is not supported (use uniform weights).

        Parameters
        ----------
        *args, **kwargs
            scvi-tools' arguments (ignored).

        Returns
        -------
        Nothing: it raises :class:`NotImplementedError`, naming the alternative.
        """
        raise NotImplementedError(
            "Importance weights are not supported by SparseVAE; use weights='uniform'."
        )

    def get_feature_correlation_matrix(self, *args: Any, **kwargs: Any) -> pd.DataFrame:
        """Not available; correlate samples of :meth:`get_normalized_expression` instead.

        Parameters
        ----------
        *args, **kwargs
            scvi-tools' arguments (ignored).

        Returns
        -------
        Nothing: it raises :class:`NotImplementedError`, naming the alternative.
        """
        raise NotImplementedError(
            "get_feature_correlation_matrix is not available for SparseVAE; use "
            "`model.get_normalized_expression(n_samples=..., return_mean=False)` and "
            "correlate its samples, or `sparsevae.tl` on the written results."
        )
