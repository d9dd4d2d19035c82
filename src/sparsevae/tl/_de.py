"""Differential expression between groups, stored as scanpy's ``rank_genes_groups`` stores it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from anndata import AnnData

if TYPE_CHECKING:
    from ..model import SparseVAE

__all__ = ["differential_expression"]


def differential_expression(
    model: SparseVAE,
    adata: AnnData,
    groupby: str,
    groups: list[str] | None = None,
    reference: str = "rest",
    delta: float = 0.25,
    key_added: str = "rank_genes_groups_sparsevae",
    **kwargs: Any,
) -> pd.DataFrame:
    """Genes that differ between groups, from the model, in scanpy's ``rank_genes_groups`` layout.

    Runs :meth:`~sparsevae.SparseVAE.differential_expression` (scvi-tools' ``change`` mode:
    the posterior probability that the log fold change exceeds ``delta``) for each group
    against ``reference`` and stores the result in ``adata.uns[key_added]`` as
    :func:`scanpy.tl.rank_genes_groups` does, so that :func:`scanpy.get.rank_genes_groups_df`
    and :func:`scanpy.pl.rank_genes_groups` (``key=key_added``) work. Count likelihoods only.

    In that layout ``scores`` is the log Bayes factor, ``logfoldchanges`` scvi-tools'
    ``lfc_mean`` (log2), ``pvals`` the posterior probability that the gene is *not*
    differentially expressed, and ``pvals_adj`` the posterior expected false discovery rate of
    the genes ranked up to it (scvi-tools' FDR control): they are Bayesian quantities, not
    p-values.

    Parameters
    ----------
    model
        A trained :class:`~sparsevae.SparseVAE` with a count likelihood.
    adata
        The model's AnnData (or new data with its genes); the result is written into it.
    groupby
        Categorical column of ``adata.obs``.
    groups
        Groups to test; default all.
    reference
        ``"rest"`` or one group's name.
    delta
        Smallest log fold change that counts as a difference (scvi-tools' ``delta``).
    key_added
        Key of ``adata.uns`` to write.
    **kwargs
        Passed to :meth:`~sparsevae.SparseVAE.differential_expression`.

    Returns
    -------
    The full table, one row per (group, gene), as scvi-tools returns it plus a ``group``
    column.

    Examples
    --------
    >>> sparsevae.tl.differential_expression(model, adata, "cell_type")
    >>> sc.pl.rank_genes_groups(adata, key="rank_genes_groups_sparsevae")
    """
    if groupby not in adata.obs:
        raise KeyError(f"groupby={groupby!r} is not a column of adata.obs.")
    labels = adata.obs[groupby].astype(str)
    names = list(pd.unique(labels))
    if groups is None:
        groups = [g for g in names if g != reference]
    unknown = [g for g in [*groups, reference] if g != "rest" and g not in names]
    if unknown:
        raise ValueError(f"Unknown groups {unknown} in adata.obs[{groupby!r}]; groups: {names}.")
    tables = []
    for group in groups:
        de = model.differential_expression(
            adata,
            groupby=groupby,
            group1=[group],
            group2=None if reference == "rest" else reference,
            mode="change",
            delta=delta,
            silent=True,
            **kwargs,
        )
        de = de.sort_values("proba_de", ascending=False, kind="stable")
        de["fdr"] = np.cumsum(1.0 - de["proba_de"].to_numpy()) / np.arange(1, len(de) + 1)
        tables.append(de.assign(group=str(group)))
    fields = {
        "names": lambda t: t.index.astype(str).to_numpy(dtype=object),
        "scores": lambda t: t["bayes_factor"].to_numpy(dtype=np.float32),
        "logfoldchanges": lambda t: t["lfc_mean"].to_numpy(dtype=np.float32),
        "pvals": lambda t: (1.0 - t["proba_de"]).to_numpy(dtype=np.float64),
        "pvals_adj": lambda t: t["fdr"].to_numpy(dtype=np.float64),
    }
    uns: dict[str, Any] = {
        "params": {
            "groupby": groupby,
            "reference": reference,
            "method": "sparsevae_change",
            "use_raw": False,
            "layer": None,
            "corr_method": "posterior_fdr",
            "delta": float(delta),
        }
    }
    for field, get in fields.items():
        columns = {str(g): get(t) for g, t in zip(groups, tables, strict=True)}
        uns[field] = pd.DataFrame(columns).to_records(index=False)
    adata.uns[key_added] = uns
    return pd.concat(tables)
