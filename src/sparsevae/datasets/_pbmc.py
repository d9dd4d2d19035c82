"""Bundled PBMC data with approximate raw counts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

__all__ = ["pbmc68k_reduced_counts"]

# ``pbmc68k_reduced().raw.X`` is ``log1p(counts / n_counts * 1e4)``, where ``n_counts`` is each
# cell's total over all genes of the original data (``raw`` only keeps 765 of them, so the rows of
# ``expm1(raw.X)`` do not sum to a constant). Checked: the smallest non-zero entry of each row of
# ``expm1(raw.X)`` (one count) times ``n_counts`` is 1e4 to within 0.1% for every cell.
_TARGET_SUM = 1e4


def pbmc68k_reduced_counts() -> AnnData:
    """Approximate integer counts of scanpy's bundled ``pbmc68k_reduced`` (700 cells, 765 genes).

    The counts are recovered from the log-normalised ``raw`` matrix of
    :func:`scanpy.datasets.pbmc68k_reduced` as
    ``round(expm1(raw.X) * n_counts / 1e4)``, since ``raw.X`` holds
    ``log1p(counts / n_counts * 1e4)``. No download is needed.

    Returns
    -------
    AnnData with the counts in ``X`` (CSR, float32) and ``layers["counts"]``, the cell annotations
    of the original (``bulk_labels``, ``louvain``, ``n_counts``, ...) in ``obs``, and the 765 genes
    of ``raw`` as ``var_names``.

    Examples
    --------
    >>> adata = sparsevae.datasets.pbmc68k_reduced_counts()
    >>> sparsevae.SparseVAE.setup_anndata(adata, layer="counts")
    """
    import scanpy as sc

    ref = sc.datasets.pbmc68k_reduced()
    raw = sp.csr_matrix(ref.raw.X, dtype=np.float64)
    n_counts = np.asarray(ref.obs["n_counts"], dtype=np.float64)
    scale = np.repeat(n_counts / _TARGET_SUM, np.diff(raw.indptr))
    values = np.expm1(raw.data) * scale
    counts = np.rint(values)
    max_dev = float(np.max(np.abs(values - counts), initial=0.0))
    if max_dev > 0.35:  # pragma: no cover - guards against a change of the bundled file
        raise ValueError(
            "Could not recover integer counts from pbmc68k_reduced().raw: the values are "
            f"{max_dev:.2f} away from integers."
        )
    X = sp.csr_matrix((counts.astype(np.float32), raw.indices, raw.indptr), shape=raw.shape)
    X.eliminate_zeros()
    adata = AnnData(
        X=X,
        obs=ref.obs.copy(),
        var=pd.DataFrame(index=pd.Index(ref.raw.var_names.astype(str))),
    )
    adata.layers["counts"] = X.copy()
    if "bulk_labels_colors" in ref.uns:
        adata.uns["bulk_labels_colors"] = list(ref.uns["bulk_labels_colors"])
    return adata
