"""Metrics of learned factors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

__all__ = ["celltype_accuracy", "dci", "mcc"]


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


def _normalized_entropy(p: np.ndarray, base: int) -> np.ndarray:
    """Entropy (log base ``base``) of each row of ``p``; rows must sum to one."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return -terms.sum(axis=1) / np.log(base)


def dci(
    z: np.ndarray,
    factors: np.ndarray,
    test_size: float = 0.2,
    seed: int = 0,
    n_estimators: int = 100,
    max_depth: int = 3,
    importance_matrix: np.ndarray | None = None,
) -> dict[str, float | np.ndarray]:
    r"""DCI disentanglement, completeness and informativeness (Eastwood and Williams 2018).

    One gradient-boosted regression tree ensemble (scikit-learn's
    ``GradientBoostingRegressor``) per true factor predicts the factor from all learned codes; its
    impurity-based feature importances form column ``j`` of the importance matrix ``R``
    (codes x factors), the protocol of Moran et al. (2022). With ``P_ij = R_ij / sum_k R_ik``
    (row-normalised) and ``H_K`` the entropy in base ``K`` (number of factors):

    - disentanglement ``D = sum_i rho_i (1 - H_K(P_i.))`` with code weights
      ``rho_i = sum_j R_ij / sum_ij R_ij`` (1: every code captures at most one factor);
    - completeness ``C = mean_j (1 - H_D(R_.j / sum_i R_ij))`` in base ``D`` (number of codes)
      (1: every factor is captured by one code);
    - informativeness: the mean held-out :math:`R^2` of the regressors (1: the codes predict the
      factors perfectly), and the mean held-out normalised mean squared error.

    Parameters
    ----------
    z
        Learned codes, shape ``(n_cells, n_codes)``.
    factors
        True factors, shape ``(n_cells, n_factors)``, ``n_factors >= 2``.
    test_size
        Fraction of cells held out to score informativeness (the importances are fitted on the
        rest).
    seed
        Random seed of the split and of the tree ensembles.
    n_estimators, max_depth
        Passed to ``GradientBoostingRegressor``.
    importance_matrix
        A precomputed importance matrix ``(n_codes, n_factors)``: skips the regressions and scores
        it directly (informativeness is then NaN).

    Returns
    -------
    dict with ``disentanglement``, ``completeness``, ``informativeness`` (mean test
    :math:`R^2`), ``informativeness_nmse`` (mean test MSE over the factor's variance),
    ``disentanglement_per_code``, ``completeness_per_factor`` and ``importance_matrix``.

    Examples
    --------
    >>> scores = sparsevae.tl.dci(model.get_latent_representation(), adata.obsm["true_factors"])
    >>> scores["disentanglement"]
    """
    z = np.asarray(z, dtype=np.float64)
    factors = np.asarray(factors, dtype=np.float64)
    if z.ndim == 1:
        z = z[:, None]
    if factors.ndim != 2 or z.ndim != 2 or z.shape[0] != factors.shape[0]:
        raise ValueError(
            f"z and factors must be 2-D with the same number of rows; got {z.shape} and "
            f"{factors.shape}."
        )
    n_factors = factors.shape[1]
    n_codes = z.shape[1]
    if n_factors < 2:
        raise ValueError("DCI needs at least two true factors (the entropy is in base n_factors).")
    if not (np.all(np.isfinite(z)) and np.all(np.isfinite(factors))):
        raise ValueError("z and factors must be finite.")
    r2 = np.full(n_factors, np.nan)
    nmse = np.full(n_factors, np.nan)
    if importance_matrix is None:
        from sklearn.ensemble import GradientBoostingRegressor
        from sklearn.model_selection import train_test_split

        if not 0 < test_size < 1:
            raise ValueError(f"test_size must be in (0, 1), got {test_size}.")
        z_tr, z_te, f_tr, f_te = train_test_split(
            z, factors, test_size=test_size, random_state=seed
        )
        R = np.zeros((n_codes, n_factors))
        for j in range(n_factors):
            reg = GradientBoostingRegressor(
                n_estimators=n_estimators, max_depth=max_depth, random_state=seed
            )
            reg.fit(z_tr, f_tr[:, j])
            R[:, j] = np.abs(reg.feature_importances_)
            err = np.mean((reg.predict(z_te) - f_te[:, j]) ** 2)
            var = np.var(f_te[:, j])
            nmse[j] = err / var if var > 0 else np.nan
            r2[j] = 1.0 - nmse[j]
    else:
        R = np.abs(np.asarray(importance_matrix, dtype=np.float64))
        if R.shape != (n_codes, n_factors):
            raise ValueError(
                f"importance_matrix must have shape (n_codes, n_factors) = "
                f"{(n_codes, n_factors)}, got {R.shape}."
            )
    total = R.sum()
    if total <= 0:
        raise ValueError("The importance matrix is all zeros: the codes carry no information.")
    row = R.sum(axis=1)
    p_rows = np.divide(
        R, row[:, None], out=np.full_like(R, 1.0 / n_factors), where=row[:, None] > 0
    )
    d_code = 1.0 - _normalized_entropy(p_rows, n_factors)
    disentanglement = float(np.sum(d_code * row / total))
    col = R.sum(axis=0)
    p_cols = np.divide(R, col[None, :], out=np.full_like(R, 1.0 / n_codes), where=col[None, :] > 0)
    c_factor = 1.0 - _normalized_entropy(p_cols.T, n_codes) if n_codes > 1 else np.ones(n_factors)
    return {
        "disentanglement": disentanglement,
        "completeness": float(np.mean(c_factor)),
        "informativeness": float(np.mean(r2)),
        "informativeness_nmse": float(np.mean(nmse)),
        "disentanglement_per_code": d_code,
        "completeness_per_factor": c_factor,
        "importance_matrix": R,
    }


def mcc(
    factors: np.ndarray,
    true_factors: np.ndarray,
    method: Literal["pearson", "spearman"] = "pearson",
) -> dict[str, Any]:
    """Mean correlation coefficient (MCC) of learned factors with the true ones.

    The identifiability metric of the nonlinear ICA literature (iVAE): absolute correlations
    between every learned and every true factor, learned factors matched one to one to the true
    ones by the Hungarian algorithm (maximising the total), averaged over the true factors.
    Up to permutation, sign and (for ``"spearman"``) monotone maps, 1 is perfect recovery.

    Parameters
    ----------
    factors
        Learned factors, cells x ``K``, with ``K`` at least the number of true factors (the
        surplus is left unmatched).
    true_factors
        True factors, cells x ``d``.
    method
        ``"pearson"`` (the iVAE paper's) or ``"spearman"``.

    Returns
    -------
    dict with ``mcc`` (the mean), ``per_factor`` (each true factor's matched ``|r|``) and
    ``match`` (the learned factor matched to each true factor).

    Examples
    --------
    >>> sparsevae.tl.mcc(model.get_latent_representation(), adata.obsm["true_factors"])["mcc"]
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.stats import rankdata

    z = np.asarray(factors, dtype=float)
    t = np.asarray(true_factors, dtype=float)
    if z.ndim != 2 or t.ndim != 2 or z.shape[0] != t.shape[0]:
        raise ValueError(
            f"factors and true_factors must be cells x factors with the same cells, got shapes "
            f"{z.shape} and {t.shape}."
        )
    if z.shape[1] < t.shape[1]:
        raise ValueError(
            f"Need at least as many learned factors ({z.shape[1]}) as true ones ({t.shape[1]})."
        )
    if method not in ("pearson", "spearman"):
        raise ValueError(f"method must be 'pearson' or 'spearman', got {method!r}.")
    if method == "spearman":
        z, t = rankdata(z, axis=0), rankdata(t, axis=0)
    zc, tc = z - z.mean(0), t - t.mean(0)
    norms = np.outer(np.linalg.norm(zc, axis=0), np.linalg.norm(tc, axis=0))
    corr = np.abs(np.divide(zc.T @ tc, norms, out=np.zeros_like(norms), where=norms > 0))
    rows, cols = linear_sum_assignment(-corr)
    per = np.zeros(t.shape[1])
    match = np.zeros(t.shape[1], dtype=int)
    per[cols] = corr[rows, cols]
    match[cols] = rows
    return {"mcc": float(per.mean()), "per_factor": per, "match": match}
