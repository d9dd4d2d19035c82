"""Checks of user input that raise clear errors before anything is written to the AnnData."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

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


def _row_chunks(X) -> Iterator[Any]:
    """``X`` in blocks of :data:`_STATS_CHUNK_ROWS` rows (in memory or backed by a file)."""
    for start in range(0, X.shape[0], _STATS_CHUNK_ROWS):
        yield X[start : start + _STATS_CHUNK_ROWS]


def unsorted_backed_indices(adata: AnnData, indices: Any) -> bool:
    """Whether ``indices`` ask for cells of a backed AnnData out of increasing order.

    scvi-tools reads the rows of a file-backed matrix in sorted order, so such a request would
    come back in another order than asked.
    """
    if indices is None or not adata.isbacked:
        return False
    idx = np.asarray(indices)
    return bool(idx.ndim == 1 and len(idx) > 1 and np.any(np.diff(idx) < 0))


def refuse_unsorted_backed_indices(adata: AnnData, indices: Any) -> None:
    """Raise if :func:`unsorted_backed_indices`."""
    if unsorted_backed_indices(adata, indices):
        raise ValueError(
            "This AnnData is backed by a file, whose rows are read in increasing order; pass "
            "the cells in that order: `indices=np.sort(indices)`."
        )


def check_finite(X, where: str) -> None:
    """Raise if ``X`` is not numeric or contains NaN or infinite values (read in row blocks)."""
    n_nan = n_inf = 0
    for chunk in _row_chunks(X):
        v = _values(chunk)
        if not np.issubdtype(v.dtype, np.number) or np.issubdtype(v.dtype, np.complexfloating):
            raise TypeError(
                f"{where} must hold real numbers, got dtype {v.dtype}. Convert it, e.g. "
                "`adata.X = adata.X.astype(np.float32)`."
            )
        bad = ~np.isfinite(v)
        if bad.any():
            nan = int(np.isnan(v).sum())
            n_nan += nan
            n_inf += int(bad.sum()) - nan
    if n_nan or n_inf:
        raise ValueError(
            f"{where} contains {n_nan} NaN and {n_inf} infinite values. Remove or impute them "
            "(e.g. `adata = adata[:, np.isfinite(adata.X).all(0)]` to drop affected genes) before "
            "calling setup_anndata."
        )


def check_registrable(adata: AnnData) -> None:
    """Raise if ``adata`` cannot be registered as it is (a view, or duplicated gene names)."""
    if adata.is_view:
        raise ValueError(
            "adata is a view of another AnnData (e.g. `adata[cells]`); setup_anndata registers "
            "the AnnData in place, so it needs one of its own: `adata = adata[cells].copy()`."
        )
    duplicated = adata.var_names[adata.var_names.duplicated()]
    if len(duplicated):
        raise ValueError(
            f"adata.var_names are not unique ({len(duplicated)} duplicates, e.g. "
            f"{list(duplicated[:3])}), so genes could not be told apart in the results. Make "
            "them unique first: `adata.var_names_make_unique()`."
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


#: Rows summed at once by :func:`matrix_stats` (bounds the float64 copy it makes).
_STATS_CHUNK_ROWS = 8192


def matrix_stats(X) -> MatrixStats:
    """Compute the statistics needed to choose and check a likelihood.

    Sums run in float64 over chunks of rows, so float16 or float32 data with large library sizes
    do not overflow and the copy stays small.
    """
    n_obs, n_vars = X.shape
    is_integer, has_negative = True, False
    row_sums = np.zeros(n_obs, dtype=np.float64)
    col_sums = np.zeros(n_vars, dtype=np.float64)
    col_sq = np.zeros(n_vars, dtype=np.float64)
    for start, chunk in zip(range(0, n_obs, _STATS_CHUNK_ROWS), _row_chunks(X), strict=True):
        chunk = chunk.astype(np.float64) if sp.issparse(chunk) else np.asarray(chunk, np.float64)
        v = _values(chunk)
        if v.size:
            is_integer = is_integer and bool(np.all(np.mod(v, 1) == 0))
            has_negative = has_negative or bool((v < 0).any())
        row_sums[start : start + chunk.shape[0]] = np.asarray(chunk.sum(axis=1)).ravel()
        col_sums += np.asarray(chunk.sum(axis=0)).ravel()
        sq = chunk.multiply(chunk) if sp.issparse(chunk) else np.square(chunk)
        col_sq += np.asarray(sq.sum(axis=0)).ravel()
    col_means = col_sums / max(n_obs, 1)
    col_stds = np.sqrt(np.clip(col_sq / max(n_obs, 1) - col_means**2, 0.0, None))
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


def data_location(layer: str | None) -> str:
    """How error messages name the registered data: ``adata.X`` or ``adata.layers[...]``."""
    return f"adata.layers[{layer!r}]" if layer is not None else "adata.X"


def check_new_data(adata: AnnData, layer: str | None, likelihood: str) -> None:
    """Run the checks of training data on an AnnData given to a trained model.

    Parameters
    ----------
    adata
        The new AnnData.
    layer
        The layer the model was registered with (``None``: ``adata.X``).
    likelihood
        The model's likelihood; count likelihoods also refuse negative, non-integer and empty
        cells.
    """
    X = get_matrix(adata, layer)
    where = data_location(layer)
    check_finite(X, where)
    if likelihood != "gaussian":
        check_counts(matrix_stats(X), likelihood, where)


def check_known_studies(adata: AnnData, study_key: str, studies: list[str]) -> None:
    """Raise if the cells of ``adata`` are not all from the trained ``studies``.

    A subset of the studies is fine (a study without cells is simply not used).
    """
    if study_key not in adata.obs:
        raise ValueError(
            f"This multi-study model needs each cell's study in adata.obs[{study_key!r}], which "
            f"this AnnData lacks. Add it (one of {studies})."
        )
    col = adata.obs[study_key]
    refuse_missing_studies(col, study_key, f"set their study to one of {studies}")
    unknown = sorted(set(col.astype(str)) - set(studies))
    if unknown:
        raise ValueError(
            f"adata.obs[{study_key!r}] has studies the model never saw: {unknown[:5]} "
            f"(it was trained on {studies}). A study's specific mask is learned from its cells, "
            "so a new study needs a model trained with it; restrict the AnnData to the known "
            f"studies (`adata[adata.obs[{study_key!r}].astype(str).isin(model.studies)]`)."
        )


def _obs_column(adata: AnnData, key: str, what: str) -> pd.Series:
    """``adata.obs[key]``, or a KeyError naming the argument ``what`` and the columns there are."""
    if key not in adata.obs:
        raise KeyError(
            f"{what} {key!r} is not a column of adata.obs (columns: "
            f"{list(adata.obs.columns)[:10]})."
        )
    return adata.obs[key]


def _refuse_unused_categories(col: pd.Series, key: str) -> None:
    """Raise if the categorical column ``adata.obs[key]`` has categories without cells."""
    if not isinstance(col.dtype, pd.CategoricalDtype):
        return
    unused = [c for c in col.cat.categories if c not in set(col.unique())]
    if unused:
        raise ValueError(
            f"adata.obs[{key!r}] has categories without cells: {unused[:5]}. Remove them "
            f"(`adata.obs[{key!r}] = adata.obs[{key!r}].cat.remove_unused_categories()`)."
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
    col = _obs_column(adata, study_key, "study_key")
    refuse_missing_studies(
        col,
        study_key,
        "give them a study of their own (e.g. 'unknown') before calling setup_anndata",
    )
    _refuse_unused_categories(col, study_key)
    if isinstance(col.dtype, pd.CategoricalDtype):
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


def compare_var_names(expected: pd.Index, got: pd.Index) -> None:
    """Raise a clear error if ``got`` is not the model's genes ``expected`` in order."""
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


def auxiliary_is_categorical(col: pd.Series) -> bool:
    """Whether an auxiliary column is categorical (category, string, object or bool dtype).

    Numbers are continuous; store categories coded as numbers as a categorical column.
    """
    return not (pd.api.types.is_numeric_dtype(col.dtype) and not pd.api.types.is_bool_dtype(col))


def check_auxiliary_column(adata: AnnData, auxiliary_key: str) -> None:
    """Raise if ``adata.obs[auxiliary_key]`` cannot be the ``u`` of the conditional prior."""
    col = _obs_column(adata, auxiliary_key, "auxiliary_key")
    n_missing = int(col.isna().sum())
    if n_missing:
        raise ValueError(
            f"adata.obs[{auxiliary_key!r}] has {n_missing} missing values; the conditional prior "
            f"needs u for every cell. Drop those cells (`adata = adata[adata.obs["
            f"{auxiliary_key!r}].notna()].copy()`) or fill them in."
        )
    if not auxiliary_is_categorical(col):
        values = col.to_numpy(dtype=float)
        if not np.all(np.isfinite(values)):
            raise ValueError(f"adata.obs[{auxiliary_key!r}] has infinite values.")
        if float(np.std(values)) == 0.0:
            raise ValueError(
                f"adata.obs[{auxiliary_key!r}] is constant; p(z | u) needs u to vary across cells."
            )
        return
    _refuse_unused_categories(col, auxiliary_key)
    if col.astype(str).nunique() < 2:
        raise ValueError(
            f"adata.obs[{auxiliary_key!r}] holds a single category; the conditional prior needs "
            "u to take at least two values (use latent_prior='normal' otherwise)."
        )


def check_known_auxiliary(adata: AnnData, auxiliary_key: str, categories: list[str] | None) -> None:
    """Raise if new cells lack ``u`` or have categories unseen at training.

    ``categories`` is ``None`` for a continuous ``u``.
    """
    if auxiliary_key not in adata.obs:
        raise ValueError(
            f"This model's prior is conditional on adata.obs[{auxiliary_key!r}], which this "
            "AnnData lacks. Add it (the same variable as at training)."
        )
    col = adata.obs[auxiliary_key]
    n_missing = int(col.isna().sum())
    if n_missing:
        raise ValueError(
            f"adata.obs[{auxiliary_key!r}] has {n_missing} missing values; every cell needs u."
        )
    if categories is None:
        if auxiliary_is_categorical(col):
            raise ValueError(
                f"adata.obs[{auxiliary_key!r}] must be numeric: the model was trained on a "
                "continuous u."
            )
        if not np.all(np.isfinite(col.to_numpy(dtype=float))):
            raise ValueError(f"adata.obs[{auxiliary_key!r}] has infinite values.")
        return
    unknown = sorted(set(col.astype(str)) - set(categories))
    if unknown:
        raise ValueError(
            f"adata.obs[{auxiliary_key!r}] has categories the model never saw: {unknown[:5]} "
            f"(it was trained on {categories[:10]}). p(z | u) is learned per category, so a "
            "new category needs a model trained with it; restrict the AnnData to the known "
            f"categories (`adata[adata.obs[{auxiliary_key!r}].astype(str).isin("
            "model.auxiliary_categories)]`)."
        )
