"""Checks of user input that raise clear errors before anything is written to the AnnData."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

MIN_CELLS = 10


@dataclass(frozen=True)
class MatrixStats:
    """Summary of a data matrix used to choose and check the likelihood."""

    is_integer: bool
    has_negative: bool
    n_empty_cells: int
    col_sums: np.ndarray
    col_means: np.ndarray
    col_stds: np.ndarray
    total: float


def get_matrix(adata: AnnData, layer: str | None):
    """Return ``adata.X`` or ``adata.layers[layer]``, with a clear error if it is missing."""
    if layer is None:
        if adata.X is None:
            raise ValueError(
                "adata.X is empty. Pass `layer=` naming the layer that holds the data."
            )
        return adata.X
    if layer not in adata.layers:
        raise KeyError(
            f"Layer {layer!r} not found in adata.layers (available: {list(adata.layers)}). "
            "Pass `layer=None` to use adata.X."
        )
    return adata.layers[layer]


def _values(X) -> np.ndarray:
    if sp.issparse(X):
        return np.asarray(X.data)
    return np.asarray(X)


def check_finite(X, where: str) -> None:
    """Raise if ``X`` contains NaN or infinite values."""
    v = _values(X)
    if not np.issubdtype(v.dtype, np.number):
        raise TypeError(f"{where} must be numeric, got dtype {v.dtype}.")
    bad = ~np.isfinite(v)
    if bad.any():
        n_nan = int(np.isnan(v).sum())
        n_inf = int(bad.sum()) - n_nan
        raise ValueError(
            f"{where} contains {n_nan} NaN and {n_inf} infinite values. Remove or impute them "
            "(e.g. `adata = adata[:, np.isfinite(adata.X).all(0)]` to drop affected genes) before "
            "calling setup_anndata."
        )


def check_n_cells(adata: AnnData) -> None:
    """Raise if there are too few cells to train on."""
    if adata.n_obs < MIN_CELLS:
        raise ValueError(
            f"adata has {adata.n_obs} cells; SparseVAE needs at least {MIN_CELLS} to train "
            "(its encoder uses batch statistics). Use more cells."
        )
    if adata.n_vars < 1:
        raise ValueError("adata has no genes.")


def matrix_stats(X) -> MatrixStats:
    """Compute the statistics needed to choose and check a likelihood."""
    v = _values(X)
    is_integer = bool(np.all(np.mod(v, 1) == 0)) if v.size else True
    has_negative = bool((v < 0).any()) if v.size else False
    row_sums = np.asarray(X.sum(axis=1)).ravel()
    col_sums = np.asarray(X.sum(axis=0), dtype=np.float64).ravel()
    n_obs = X.shape[0]
    col_means = col_sums / max(n_obs, 1)
    sq = X.multiply(X) if hasattr(X, "multiply") else np.square(X)
    col_sq = np.asarray(sq.sum(axis=0), dtype=np.float64).ravel() / max(n_obs, 1)
    col_stds = np.sqrt(np.clip(col_sq - col_means**2, 0.0, None))
    return MatrixStats(
        is_integer=is_integer,
        has_negative=has_negative,
        n_empty_cells=int((row_sums <= 0).sum()),
        col_sums=col_sums,
        col_means=col_means,
        col_stds=col_stds,
        total=float(row_sums.sum()),
    )


def check_counts(stats: MatrixStats, likelihood: str, where: str) -> None:
    """Raise if the data cannot be modelled with a count likelihood."""
    if stats.has_negative:
        raise ValueError(
            f"{where} contains negative values, which a count likelihood ({likelihood!r}) cannot "
            "model. Register the raw counts (`SparseVAE.setup_anndata(adata, layer='counts')`) or "
            "use `likelihood='gaussian'` for normalised or scaled data."
        )
    if not stats.is_integer:
        raise ValueError(
            f"{where} contains non-integer values, but likelihood {likelihood!r} models counts. "
            "Register the raw counts (`SparseVAE.setup_anndata(adata, layer='counts')`) or use "
            "`likelihood='gaussian'` for log-normalised data."
        )
    if stats.n_empty_cells:
        raise ValueError(
            f"{where} has {stats.n_empty_cells} cells with zero total counts, which carry no "
            "information for a count likelihood. Remove them first, e.g. "
            "`sc.pp.filter_cells(adata, min_counts=1)`."
        )


def refuse_missing_studies(col: pd.Series, study_key: str, remedy: str) -> None:
    """Raise if the study column ``col`` has missing values; ``remedy`` ends the message."""
    n_missing = int(col.isna().sum())
    if n_missing:
        raise ValueError(
            f"adata.obs[{study_key!r}] has {n_missing} cells without a study (missing values). "
            f"Drop them (`adata = adata[adata.obs[{study_key!r}].notna()].copy()`) or {remedy}."
        )


def check_study_column(adata: AnnData, study_key: str) -> list[str]:
    """Raise if ``adata.obs[study_key]`` cannot define the studies of a multi-study model.

    Returns
    -------
    The study names as strings.
    """
    if study_key not in adata.obs:
        raise KeyError(
            f"study_key {study_key!r} is not a column of adata.obs (columns: "
            f"{list(adata.obs.columns)[:10]})."
        )
    col = adata.obs[study_key]
    refuse_missing_studies(
        col,
        study_key,
        "give them a study of their own (e.g. 'unknown') before calling setup_anndata",
    )
    if isinstance(col.dtype, pd.CategoricalDtype):
        unused = [c for c in col.cat.categories if c not in set(col.unique())]
        if unused:
            raise ValueError(
                f"adata.obs[{study_key!r}] has categories without cells: {unused[:5]}. Remove them "
                f"(`adata.obs[{study_key!r}] = adata.obs[{study_key!r}].cat."
                "remove_unused_categories()`)."
            )
        values = list(col.cat.categories)
    else:
        values = sorted(col.unique(), key=str)
    names = [str(v) for v in values]
    if len(names) < 2:
        raise ValueError(
            f"adata.obs[{study_key!r}] holds a single study ({names[0]!r}); a multi-study model "
            "needs at least two. Leave study_key out to fit a single-study model."
        )
    if len(set(names)) < len(names):
        raise ValueError(
            f"The studies of adata.obs[{study_key!r}] are not unique as strings: {names[:10]}. "
            "Rename them."
        )
    if "shared" in names:
        raise ValueError(
            f"A study of adata.obs[{study_key!r}] is named 'shared', the name of the shared mask. "
            "Rename it."
        )
    return names
