"""Varimax: the orthogonal rotation of a loading matrix with the sparsest columns."""

from __future__ import annotations

import numpy as np

__all__ = ["varimax"]


def varimax(loadings: np.ndarray, max_iter: int = 500, tol: float = 1e-10) -> np.ndarray:
    """Orthogonal rotation ``R`` that maximises the varimax criterion of ``loadings @ R``.

    The criterion is the summed variance of the squared loadings within each column (Kaiser
    1958): high when every column has a few large entries and many near zero. The iteration
    starts from the principal axes of the loadings, so that it reaches the same optimum from
    any rotation of them (the criterion has local optima). The result is
    put in a canonical form, so that loadings that differ only by a rotation give the same
    rotated loadings: columns in decreasing sum of squares, each signed so that the sum of its
    cubed loadings is positive.

    Parameters
    ----------
    loadings
        ``(n_features, n_factors)`` matrix.
    max_iter
        Most iterations of the SVD update.
    tol
        Stop when the criterion grows by less than this relative amount.

    Returns
    -------
    ``(n_factors, n_factors)`` orthogonal matrix.
    """
    L = np.asarray(loadings, dtype=np.float64)
    if L.ndim != 2:
        raise ValueError(f"loadings must be a matrix, got shape {L.shape}.")
    p, k = L.shape
    if k < 2 or p == 0:
        return np.eye(k)
    # Start from the principal axes of the loadings, not from the identity: the criterion has
    # local optima, and a start that turns with the loadings makes the result the same for
    # every rotation of them.
    _, R = np.linalg.eigh(L.T @ L)
    R = R[:, ::-1]
    last = 0.0
    for _ in range(max_iter):
        rotated = L @ R
        target = rotated**3 - rotated * ((rotated**2).sum(axis=0) / p)
        u, s, vt = np.linalg.svd(L.T @ target)
        R = u @ vt
        value = float(s.sum())
        if value <= last * (1.0 + tol):
            break
        last = value
    rotated = L @ R
    order = np.argsort(-(rotated**2).sum(axis=0), kind="stable")
    R = R[:, order]
    signs = np.where((rotated[:, order] ** 3).sum(axis=0) < 0, -1.0, 1.0)
    return R * signs
