"""Real-count backgrounds with planted study-specific programs (``multistudy.py --real``).

The cells of a real data set are split into studies at random (stratified by cell type), and
in half of one study's cells the counts of a gene set are scaled up: each planted cell ``i``
gets an activity ``a_i ~ Uniform(0.5, 1.5)`` and, for each gene ``g`` of the set,
``Poisson(x_ig * (fold - 1) * a_i)`` extra counts, so that its expected count is multiplied by
``1 + (fold - 1) * a_i`` (zeros stay zero: up-scaling cannot be done by thinning). Every
other count is the data's own. The truth (genes, study, cells, fold) is kept in
``adata.uns["planted_programs"]`` and the activities in ``obs["planted_activity"]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from _common import SHARED

ZEISEL = SHARED / "data" / "zeisel2015.h5ad"
HALLMARK = SHARED / "genesets" / "h.all.v7.5.1.symbols.gmt"
# Planted in study_0, study_1, ... in this order; a later set loses the genes of earlier ones.
PBMC_SETS = ("HALLMARK_INTERFERON_GAMMA_RESPONSE", "HALLMARK_MTORC1_SIGNALING")
MIN_GENES = 15
ZEISEL_GENES_PER_PROGRAM = 25
ZEISEL_MIN_DETECTED = 0.1  # random genes are drawn among HVGs detected in >= 10% of cells
N_PROGRAMS = 2

DATASETS: dict[str, dict[str, Any]] = {
    "pbmc": {"label_key": "bulk_labels", "n_factors": 10},
    "zeisel": {"label_key": "level1class", "n_factors": 15, "n_top_genes": 1000},
}


def load(name: str) -> Any | None:
    """The counts of a data set (``X`` and ``layers["counts"]``), or ``None`` if absent.

    ``pbmc``: :func:`sparsevae.datasets.pbmc68k_reduced_counts` (700 cells, 765 genes).
    ``zeisel``: ``../shared/data/zeisel2015.h5ad``, the 1000 seurat_v3 HVGs of the counts.
    """
    import sparsevae

    if name == "pbmc":
        adata = sparsevae.datasets.pbmc68k_reduced_counts()
    elif name == "zeisel":
        if not ZEISEL.exists():
            return None
        import anndata as ad
        import scanpy as sc

        adata = ad.read_h5ad(ZEISEL)
        X = adata.X.tocsr() if sp.issparse(adata.X) else sp.csr_matrix(adata.X)
        adata.X = X.astype(np.float32)
        adata.layers["counts"] = adata.X.copy()
        sc.pp.highly_variable_genes(
            adata, flavor="seurat_v3", n_top_genes=DATASETS["zeisel"]["n_top_genes"]
        )
        adata = adata[:, adata.var["highly_variable"].to_numpy()].copy()
    else:
        raise ValueError(f"unknown data set {name!r}")
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    adata.layers["counts"] = adata.X.copy()
    return adata


def read_gmt(path: Path) -> dict[str, list[str]]:
    """``{name: genes}`` of a GMT file."""
    sets = {}
    for line in Path(path).read_text().splitlines():
        parts = line.rstrip("\n").split("\t")
        if len(parts) > 2:
            sets[parts[0]] = parts[2:]
    return sets


def split_studies(labels: np.ndarray, n_studies: int, rng: np.random.Generator) -> np.ndarray:
    """Random study names ``study_k``, stratified by cell type (each type dealt round-robin)."""
    study = np.empty(len(labels), dtype=object)
    for label in np.unique(labels):
        cells = rng.permutation(np.flatnonzero(labels == label))
        offset = rng.integers(n_studies)  # so small types do not all land in study_0
        study[cells] = [f"study_{(offset + k) % n_studies}" for k in range(len(cells))]
    return study


def choose_programs(
    adata: Any, name: str, n_programs: int, rng: np.random.Generator
) -> list[tuple[str, list[str]]]:
    """Disjoint gene sets to plant: Hallmark sets (pbmc) or random expressed HVGs (zeisel)."""
    genes = list(adata.var_names)
    if name == "pbmc":
        if n_programs > len(PBMC_SETS):
            raise ValueError(f"at most {len(PBMC_SETS)} planted programs for pbmc")
        hallmark = read_gmt(HALLMARK)
        present = set(genes)
        taken: set[str] = set()
        programs = []
        for set_name in PBMC_SETS[:n_programs]:
            kept = [g for g in dict.fromkeys(hallmark[set_name]) if g in present and g not in taken]
            if len(kept) < MIN_GENES:
                raise ValueError(f"{set_name}: only {len(kept)} genes present and not planted")
            taken.update(kept)
            programs.append((set_name, kept))
        return programs
    # Zeisel's copy has no gene names (gene0000...): random expressed genes among the HVGs.
    X = adata.layers["counts"]
    detected = np.asarray((X > 0).mean(0)).ravel()
    pool = rng.permutation(np.flatnonzero(detected >= ZEISEL_MIN_DETECTED))
    k = ZEISEL_GENES_PER_PROGRAM
    if len(pool) < k * n_programs:
        raise ValueError("not enough expressed genes to plant")
    return [
        (f"random_{p}", sorted(genes[j] for j in pool[p * k : (p + 1) * k]))
        for p in range(n_programs)
    ]


def plant(
    adata: Any,
    programs: list[tuple[str, list[str]]],
    fold: float,
    fraction: float,
    seed: int,
) -> Any:
    """A copy with program ``p`` planted in ``fraction`` of study ``study_p``'s cells.

    The planted cells and activities depend on ``seed`` only, not on ``fold``.
    """
    rng = np.random.default_rng([seed, 1])
    noise = np.random.default_rng([seed, 2])
    adata = adata.copy()
    counts = adata.layers["counts"].toarray().astype(np.float64)
    activity = np.zeros(adata.n_obs)
    study = adata.obs["study"].to_numpy()
    truth = []
    for p, (set_name, genes) in enumerate(programs):
        target = f"study_{p}"
        in_study = np.flatnonzero(study == target)
        cells = np.sort(rng.choice(in_study, size=round(fraction * len(in_study)), replace=False))
        a = rng.uniform(0.5, 1.5, size=len(cells))
        activity[cells] = a
        cols = adata.var_names.get_indexer(genes)
        block = counts[np.ix_(cells, cols)]
        extra = noise.poisson(block * (fold - 1.0) * a[:, None])
        counts[np.ix_(cells, cols)] = block + extra
        truth.append(
            {
                "name": set_name,
                "study": target,
                "genes": list(genes),
                "cells": adata.obs_names[cells].tolist(),
                "fold": fold,
                "mean_fold": float(np.mean(1 + (fold - 1.0) * a)),
                "realised_fold": float((block.sum() + extra.sum()) / max(block.sum(), 1.0)),
            }
        )
    adata.layers["counts"] = sp.csr_matrix(counts, dtype=np.float32)
    adata.X = adata.layers["counts"].copy()
    adata.obs["planted_activity"] = activity
    adata.uns["planted_programs"] = truth
    return adata


def background(name: str, n_studies: int, seed: int, n_programs: int = N_PROGRAMS) -> Any:
    """The data with random studies (``obs["study"]``) and the gene sets to plant, or ``None``."""
    adata = load(name)
    if adata is None:
        return None, None
    rng = np.random.default_rng(seed)
    labels = adata.obs[DATASETS[name]["label_key"]].astype(str).to_numpy()
    adata.obs["study"] = split_studies(labels, n_studies, rng)
    programs = choose_programs(adata, name, min(n_programs, n_studies), rng)
    return adata, programs


def detected_share(adata: Any, truth: dict[str, Any]) -> np.ndarray:
    """Per planted gene, the share of the planted cells where its (planted) count is nonzero."""
    cells = adata.obs_names.get_indexer(truth["cells"])
    cols = adata.var_names.get_indexer(truth["genes"])
    block = adata.layers["counts"][cells][:, cols]
    return np.asarray((block > 0).mean(0)).ravel()
