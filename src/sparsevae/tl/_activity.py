"""Which factors differ between groups of cells: factor activity by group."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy.stats import false_discovery_control, mannwhitneyu

from ._results import DEFAULT_KEY, read_results

__all__ = ["factor_activity"]


def factor_activity(
    adata: AnnData,
    groupby: str,
    groups: list[str] | None = None,
    reference: str = "rest",
    key: str = DEFAULT_KEY,
    include_off: bool = False,
) -> pd.DataFrame:
    """Which factors differ between groups of cells (scanpy's ``rank_genes_groups`` for factors).

    For each group of ``adata.obs[groupby]`` and each factor, the cells of the group are
    compared with the ``reference`` cells by a two-sided Mann-Whitney U test on the factor
    values (``adata.obsm[f"X_{key}"]``, written by ``model.write_results``), with
    Benjamini-Hochberg adjusted p-values over all tests. Factor values have no natural unit, so
    the effect size is the difference of means in standard deviations of the factor (over all
    cells), and the AUROC of the group against the reference.

    Parameters
    ----------
    adata
        AnnData filled by :meth:`~sparsevae.SparseVAE.write_results`.
    groupby
        Categorical column of ``adata.obs`` (e.g. cell type, condition).
    groups
        Groups to test; default all.
    reference
        ``"rest"`` (every other cell) or the name of one group.
    key
        The ``key_added`` of ``write_results``.
    include_off
        Also test factors the prior switched off (they carry no signal; off by default).

    Returns
    -------
    DataFrame with one row per (group, factor), sorted by group then by decreasing
    ``|effect|``: ``group``, ``factor``, ``mean`` and ``mean_reference`` (factor means),
    ``effect`` (difference of means / factor sd), ``auroc``, ``pval``, ``pval_adj``.

    Examples
    --------
    >>> model.write_results(adata)
    >>> act = sparsevae.tl.factor_activity(adata, "cell_type")
    >>> act.query("pval_adj < 0.05 and abs(effect) > 1")
    """
    if groupby not in adata.obs:
        raise KeyError(f"groupby={groupby!r} is not a column of adata.obs.")
    labels = adata.obs[groupby]
    if labels.isna().any():
        raise ValueError(f"adata.obs[{groupby!r}] has missing values; drop or label those cells.")
    labels = labels.astype(str).to_numpy()
    names = list(pd.unique(labels))
    res = read_results(adata, key)
    z = np.asarray(res.latent, dtype=float)
    factors = list(res.factor_names)
    if not include_off and res.has_prior:
        off = set()
        for kind in res.kinds:
            status = res.factor_status(kind, min_pstar=0.5)
            off |= set(status.loc[status["switched_off"], "factor"])
        keep = [i for i, f in enumerate(factors) if f not in off]
        z, factors = z[:, keep], [factors[i] for i in keep]
    if groups is None:
        groups = [g for g in names if g != reference]
    unknown = [g for g in [*groups, reference] if g != "rest" and g not in names]
    if unknown:
        raise ValueError(f"Unknown groups {unknown} in adata.obs[{groupby!r}]; groups: {names}.")
    sd = z.std(axis=0)
    sd[sd == 0] = 1.0
    rows = []
    for group in groups:
        in_group = labels == str(group)
        ref = ~in_group if reference == "rest" else labels == reference
        if in_group.sum() < 2 or ref.sum() < 2:
            raise ValueError(f"Group {group!r} or its reference has fewer than 2 cells.")
        a, b = z[in_group], z[ref]
        test = mannwhitneyu(a, b, axis=0, alternative="two-sided")
        auroc = test.statistic / (len(a) * len(b))
        for k, factor in enumerate(factors):
            rows.append(
                {
                    "group": str(group),
                    "factor": factor,
                    "mean": a[:, k].mean(),
                    "mean_reference": b[:, k].mean(),
                    "effect": (a[:, k].mean() - b[:, k].mean()) / sd[k],
                    "auroc": auroc[k],
                    "pval": test.pvalue[k],
                }
            )
    out = pd.DataFrame(rows)
    if out.empty:
        return out.assign(pval_adj=[])
    out["pval_adj"] = false_discovery_control(np.nan_to_num(out["pval"].to_numpy(), nan=1.0))
    order = out.assign(_abs=out["effect"].abs()).sort_values(
        ["group", "_abs"], ascending=[True, False], kind="stable"
    )
    return order.drop(columns="_abs").reset_index(drop=True)
