"""Metrics of learned factors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = ["celltype_accuracy"]


def celltype_accuracy(
    X: np.ndarray,
    labels: Sequence | np.ndarray | pd.Series,
    n_splits: int = 5,
    seed: int = 0,
) -> dict[str, float]:
    """Cross-validated accuracy of predicting cell types from the factors.

    A logistic regression (``max_iter=1000``) on standardised features is fitted in stratified
    ``n_splits``-fold cross-validation.

    Parameters
    ----------
    X
        Factors, shape ``(n_cells, n_factors)`` (e.g. ``adata.obsm["X_sparsevae"]``).
    labels
        Cell-type label of each cell.
    n_splits
        Number of folds; must not exceed the size of the smallest class.
    seed
        Random seed of the fold assignment.

    Returns
    -------
    ``{"mean": ..., "std": ..., "n_splits": ...}``: mean and standard deviation of the fold
    accuracies.

    Examples
    --------
    >>> sparsevae.tl.celltype_accuracy(adata.obsm["X_sparsevae"], adata.obs["bulk_labels"])
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[:, None]
    y = np.asarray(labels).astype(str)
    if X.ndim != 2 or X.shape[0] != y.shape[0]:
        raise ValueError(
            f"X must be 2-D with one row per label; got shape {X.shape} and {y.shape[0]} labels."
        )
    if not np.all(np.isfinite(X)):
        raise ValueError("X contains NaN or infinite values.")
    _, class_counts = np.unique(y, return_counts=True)
    if len(class_counts) < 2:
        raise ValueError("labels must contain at least two classes.")
    if n_splits < 2 or n_splits > class_counts.min():
        raise ValueError(
            f"n_splits must be between 2 and the size of the smallest class "
            f"({class_counts.min()}), got {n_splits}."
        )
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    scores = cross_val_score(clf, X, y, cv=cv, scoring="accuracy")
    return {"mean": float(scores.mean()), "std": float(scores.std()), "n_splits": int(n_splits)}
