"""Cell clusters from the mixture prior on Zeisel against Leiden, one JSON line per result.

Usage: ``python benchmarks/clustering.py [--quick] [--seeds 0 1 2 3 4] [--n-genes 1000]
[--max-epochs N] [--n-cells N]``.

Data: ``../shared/data/zeisel2015.h5ad`` (counts, the ``--n-genes`` seurat_v3 HVGs), labels
``level1class`` (7 classes) and ``level2class`` (48). Per seed (``scvi.settings.seed``):

- ``mixture``: ``SparseVAE(latent_prior="mixture", n_components=7)`` (15 factors, package
  defaults otherwise): each cell's most probable component;
- ``leiden_sparsevae``: Leiden (resolution 1, scanpy defaults, 15 neighbours) on the same model's
  factors;
- ``leiden_normal`` (with ``--with-normal``): Leiden on a SparseVAE with the ``N(0, I)`` prior;
- ``leiden_scvi``: Leiden on scVI's latent space (15 dimensions, its defaults, same epochs).

Scores: ARI and NMI against level 1 and level 2. Target (issue 18): the mixture at least as
good as Leiden on scVI at level 1. Summary lines give mean and sd per method. The fraction of
components left empty and the re-seedings are reported per fit. Skips with a reason when the data
are absent.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import scvi
import torch
from _common import SHARED, TRAINER_KWARGS, command_line, machine_info, mean_std, quiet_logs

import sparsevae

ZEISEL = SHARED / "data" / "zeisel2015.h5ad"
LEVELS = ("level1class", "level2class")


def load(n_genes: int, n_cells: int | None, seed: int) -> Any:
    """Zeisel counts on ``n_genes`` seurat_v3 HVGs (a stratified subsample of ``n_cells``)."""
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp

    adata = ad.read_h5ad(ZEISEL)
    if n_cells is not None and n_cells < adata.n_obs:
        from sklearn.model_selection import train_test_split

        keep, _ = train_test_split(
            np.arange(adata.n_obs), train_size=n_cells, stratify=adata.obs[LEVELS[0]],
            random_state=seed,
        )  # fmt: skip
        adata = adata[np.sort(keep)].copy()
    X = adata.X.tocsr() if sp.issparse(adata.X) else sp.csr_matrix(adata.X)
    adata.X = X.astype(np.float32)
    adata.layers["counts"] = adata.X.copy()
    sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=n_genes, layer="counts")
    return adata[:, adata.var["highly_variable"].to_numpy()].copy()


def scores(adata: Any, labels: np.ndarray) -> dict[str, float]:
    """ARI and NMI of ``labels`` against both levels."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    out = {"n_clusters": len(np.unique(labels))}
    for level in LEVELS:
        truth = adata.obs[level].astype(str).to_numpy()
        short = level.replace("class", "")
        out[f"ari_{short}"] = round(float(adjusted_rand_score(truth, labels)), 4)
        out[f"nmi_{short}"] = round(float(normalized_mutual_info_score(truth, labels)), 4)
    return out


def leiden(adata: Any, rep: np.ndarray, seed: int) -> np.ndarray:
    """Leiden clusters (resolution 1) on the kNN graph of a representation."""
    import anndata as ad
    import scanpy as sc

    tmp = ad.AnnData(np.zeros((adata.n_obs, 1), dtype=np.float32))
    tmp.obsm["rep"] = np.asarray(rep, dtype=np.float32)
    sc.pp.neighbors(tmp, use_rep="rep", random_state=seed)
    sc.tl.leiden(tmp, random_state=seed, flavor="igraph", n_iterations=2, directed=False)
    return tmp.obs["leiden"].astype(str).to_numpy()


QUIET = TRAINER_KWARGS


def run_seed(
    adata: Any, seed: int, max_epochs: int | None, n_components: int, with_normal: bool
) -> list[dict]:
    """All methods for one seed."""
    out = []
    base = {"benchmark": "clustering", "record": "fit", "seed": seed}

    ad = adata.copy()
    sparsevae.SparseVAE.setup_anndata(ad, layer="counts")
    scvi.settings.seed = seed
    model = sparsevae.SparseVAE(ad, latent_prior="mixture", n_components=n_components)
    t0 = time.perf_counter()
    model.train(max_epochs=max_epochs, **QUIET)
    seconds = time.perf_counter() - t0
    probs = model.get_cluster_probabilities().to_numpy()
    hard = probs.argmax(1)
    counts = np.bincount(hard, minlength=n_components)
    prior = model.module.mixture_prior
    out.append({
        **base, "method": "mixture", **scores(ad, hard.astype(str)),
        "empty_components": int((counts == 0).sum()),
        "largest_component_share": round(float(counts.max() / counts.sum()), 4),
        "reseeded": int(prior.n_reseeded), "seconds": round(seconds, 1),
    })  # fmt: skip
    z = model.get_latent_representation()
    out.append({**base, "method": "leiden_sparsevae", **scores(ad, leiden(ad, z, seed))})

    if with_normal:
        ad = adata.copy()
        sparsevae.SparseVAE.setup_anndata(ad, layer="counts")
        scvi.settings.seed = seed
        normal = sparsevae.SparseVAE(ad)
        normal.train(max_epochs=max_epochs, **QUIET)
        z = normal.get_latent_representation()
        out.append({**base, "method": "leiden_normal", **scores(ad, leiden(ad, z, seed))})

    ad = adata.copy()
    scvi.model.SCVI.setup_anndata(ad, layer="counts")
    scvi.settings.seed = seed
    ref = scvi.model.SCVI(ad, n_latent=15)
    ref.train(max_epochs=max_epochs or sparsevae.train.default_max_epochs(ad.n_obs), **QUIET)
    z = ref.get_latent_representation()
    out.append({**base, "method": "leiden_scvi", **scores(ad, leiden(ad, z, seed))})
    return out


def main() -> None:
    """Run the benchmark and print one JSON line per result, then one per method."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="500 cells, 20 epochs, 1 seed")
    parser.add_argument("--seeds", type=int, nargs="*", default=None)
    parser.add_argument("--n-genes", type=int, default=1000)
    parser.add_argument("--n-cells", type=int, default=None)
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--n-components", type=int, default=7)
    parser.add_argument(
        "--with-normal", action="store_true", help="also Leiden on a SparseVAE with N(0, I)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    quiet_logs()
    if not ZEISEL.exists():
        print(json.dumps({"record": "skipped", "reason": f"{ZEISEL} is absent"}))
        return
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2, 3, 4])
    n_cells = args.n_cells or (500 if args.quick else None)
    max_epochs = args.max_epochs or (20 if args.quick else None)
    adata = load(args.n_genes if not args.quick else 300, n_cells, 0)
    meta = {
        "record": "meta",
        "benchmark": "clustering",
        "mode": "quick" if args.quick else "full",
        "command": command_line(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "settings": {
            "n_cells": adata.n_obs,
            "n_genes": adata.n_vars,
            "seeds": seeds,
            "max_epochs": max_epochs,
            "n_components": args.n_components,
        },
        "machine": machine_info(threads=1),
    }
    print(json.dumps(meta), flush=True)
    records: list[dict[str, Any]] = []
    for seed in seeds:
        for rec in run_seed(adata, seed, max_epochs, args.n_components, args.with_normal):
            records.append(rec)
            print(json.dumps(rec), flush=True)
    for method in dict.fromkeys(r["method"] for r in records):
        recs = [r for r in records if r["method"] == method]
        summary = {"benchmark": "clustering", "record": "summary", "method": method}
        for key in ("ari_level1", "nmi_level1", "ari_level2", "nmi_level2", "n_clusters"):
            mean, sd = mean_std([r[key] for r in recs])
            summary[f"{key}_mean"], summary[f"{key}_sd"] = round(mean, 4), round(sd, 4)
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
