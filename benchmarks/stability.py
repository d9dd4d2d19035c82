"""Do fits from different random starts give the same factors? One JSON line per fit and method.

Usage: ``python benchmarks/stability.py [--data zeisel|pbmc] [--seeds 5] [--methods sparsevae vae]
[--n-restarts 1] [--auxiliary-key KEY] [--quick]``.

Each method is fitted from ``scvi.settings.seed`` 0..N-1 on the same cells (package defaults,
15 factors, counts with the NB likelihood). A ``fit`` line per fit gives the active and
identifiable factors (``tl.identifiability_report``), anchors per factor, the median number of
genes selected per active factor, the training ELBO and the cell-type accuracy of the factors
(``tl.celltype_accuracy``); a ``stability`` line per method gives ``tl.factor_stability`` over
the fits: the median matched |correlation| and anchor-set Jaccard of the active factors, and
how many are reproducible. The VAE (``mask=None``) is identified only up to rotation, so its
matches are the baseline to beat. ``pca``, ``nmf`` and ``fa`` (15 components on the
log-normalised counts of the same genes) give the peers' cell-type accuracy in the same run.

Data: ``zeisel`` reads ``../shared/data/zeisel2015.h5ad`` (1000 ``seurat_v3`` genes, as
``zeisel.py``); ``pbmc`` uses scanpy's bundled ``pbmc68k_reduced`` with approximate counts
(``sparsevae.datasets.pbmc68k_reduced_counts``, 765 genes).

Saved fits: ``--save-dir DIR`` writes every fit (its AnnData with the results of
``write_results``) to ``DIR/{data}_{method}_s{seed}.h5ad``; ``--fits-from DIR`` fits nothing and
prints the ``stability`` lines of the fits saved there (so the seeds of one study can be fitted
in two processes: ``--first-seed 0 --seeds 3`` and ``--first-seed 3 --seeds 3``). With four or
more fits the stability line also gives ``split_half_consensus_anchors``: the fits are split in
two halves, each half's consensus anchors (genes that are anchors of the factor in at least half
of its fits, ``FactorStability.consensus_anchors``) are compared, and the median Jaccard index
over the active factors is reported, beside the single fits' ``median_jaccard_anchors``.

Conditional prior (issue 18): ``--auxiliary-key`` names an ``obs`` column used as ``u`` by the
methods ``ivae`` (``mask=None, latent_prior="conditional"``) and ``sparse_conditional``
(``latent_prior="conditional"`` with the mask); e.g. ``--data pbmc --methods vae ivae
--auxiliary-key bulk_labels`` asks whether a prior conditional on the cell type makes the
factors reproducible across starts where the VAE's are not.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from _common import (
    SHARED,
    TRAINER_KWARGS,
    import_sparsevae,
    machine_info,
    quiet_logs,
    stdout_to_stderr,
)

N_FACTORS = 15
#: Linear peers on the log-normalised counts (accuracy only; no stability line).
LINEAR = ("pca", "nmf", "fa")
#: Methods with the conditional prior (they need ``--auxiliary-key``).
CONDITIONAL = ("ivae", "sparse_conditional")


def load(data: str, n_cells: int | None) -> tuple[Any, str]:
    """The AnnData (counts in ``layers["counts"]``) and its cell-type column."""
    sparsevae = import_sparsevae()
    if data == "pbmc":
        adata = sparsevae.datasets.pbmc68k_reduced_counts()
        label = "bulk_labels"
    else:
        from zeisel import load as load_zeisel

        adata = load_zeisel(SHARED / "data" / "zeisel2015.h5ad", 1000, None, 0)
        label = "level1class"
    if n_cells is not None and n_cells < adata.n_obs:
        keep = np.sort(np.random.default_rng(0).choice(adata.n_obs, n_cells, replace=False))
        adata = adata[keep].copy()
    return adata, label


def fit(method: str, adata: Any, label: str, seed: int, args: argparse.Namespace) -> Any:
    """Fit one model and return it with its JSON record."""
    import scvi

    sparsevae = import_sparsevae()
    scvi.settings.seed = seed
    ad = adata.copy()
    conditional = method in CONDITIONAL
    if conditional and args.auxiliary_key is None:
        raise SystemExit(f"method {method!r} needs --auxiliary-key")
    sparsevae.SparseVAE.setup_anndata(
        ad, layer="counts", auxiliary_key=args.auxiliary_key if conditional else None
    )
    model = sparsevae.SparseVAE(
        ad,
        n_factors=N_FACTORS,
        mask="ssl" if method in ("sparsevae", "sparse_conditional") else None,
        **({"latent_prior": "conditional"} if conditional else {}),
        **(json.loads(args.module_kwargs) if method == "sparsevae" else {}),
    )
    t0 = time.perf_counter()
    train_kwargs = json.loads(args.train_kwargs) if method == "sparsevae" else {}
    model.train(
        max_epochs=args.epochs, n_restarts=args.n_restarts, **train_kwargs, **TRAINER_KWARGS
    )
    seconds = time.perf_counter() - t0
    model.write_results(ad, effects=False)
    labels = ad.obs[label].astype(str)
    counts = labels.value_counts()
    keep = labels.map(counts).to_numpy() >= 2  # cross-validation needs 2 cells per type
    n_splits = int(min(5, counts[counts >= 2].min()))
    acc = sparsevae.tl.celltype_accuracy(
        ad.obsm["X_sparsevae"][keep], labels[keep], n_splits=n_splits
    )
    record: dict[str, Any] = {
        "record": "fit",
        "method": method,
        "seed": seed,
        "n_restarts": args.n_restarts,
        "module_kwargs": json.loads(args.module_kwargs) if method == "sparsevae" else {},
        "train_kwargs": train_kwargs,
        "elbo": round(float(model.get_elbo()), 3),
        "accuracy": round(float(acc["mean"]), 4),
        "train_seconds": round(seconds, 1),
    }
    if conditional:
        record["auxiliary_key"] = args.auxiliary_key
    if method in ("sparsevae", "sparse_conditional"):
        report = sparsevae.tl.identifiability_report(ad)
        f = report.factors
        active = f[~f["switched_off"]]
        # Whether the mask describes the decoder (gene effects on the selected genes).
        fid = sparsevae.tl.mask_fidelity(model)
        weighty = fid.loc[fid["relative_effect"] >= 0.1, "share_selected"].dropna()
        record.update(
            {
                "unfaithful_factors": fid.loc[~fid["faithful"], "factor"].tolist(),
                "effect_share_selected": round(float(weighty.median()), 3)
                if len(weighty)
                else None,
                "active_factors": len(active),
                "identifiable_factors": int(f["identifiable"].sum()),
                "anchors_per_factor": f["n_anchors"].tolist(),
                "median_selected_per_active_factor": float(active["n_selected"].median())
                if len(active)
                else 0.0,
                "n_genes": int(ad.n_vars),
            }
        )
    return ad, record


def fit_linear(method: str, adata: Any, label: str, seed: int) -> dict[str, Any]:
    """PCA, NMF or factor analysis (15 components) on the log-normalised counts of the same
    genes, scored like the models: a peer's cell-type accuracy from the same run."""
    import scanpy as sc
    from sklearn.decomposition import NMF, PCA, FactorAnalysis

    sparsevae = import_sparsevae()
    x = sc.pp.normalize_total(adata, target_sum=1e4, layer="counts", inplace=False)["X"]
    x = np.log1p(np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64))
    t0 = time.perf_counter()
    if method == "pca":
        z = PCA(n_components=N_FACTORS, random_state=seed).fit_transform(x)
    elif method == "nmf":
        z = NMF(N_FACTORS, init="nndsvda", max_iter=500, random_state=seed).fit_transform(x)
    else:
        z = FactorAnalysis(n_components=N_FACTORS, random_state=seed).fit_transform(x)
    seconds = time.perf_counter() - t0
    labels = adata.obs[label].astype(str)
    counts_per_type = labels.value_counts()
    keep = labels.map(counts_per_type).to_numpy() >= 2
    n_splits = int(min(5, counts_per_type[counts_per_type >= 2].min()))
    acc = sparsevae.tl.celltype_accuracy(z[keep], labels[keep], n_splits=n_splits)
    return {
        "record": "fit",
        "method": method,
        "seed": seed,
        "accuracy": round(float(acc["mean"]), 4),
        "train_seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the fits and print the JSON lines."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=["zeisel", "pbmc"], default="zeisel")
    p.add_argument("--seeds", type=int, default=5, help="random starts 0..N-1")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=["sparsevae", "vae"])
    p.add_argument("--epochs", type=int, default=None, help="default: the package's")
    p.add_argument("--n-restarts", type=int, default=1)
    p.add_argument("--n-cells", type=int, default=None, help="subsample cells")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--module-kwargs",
        default="{}",
        help="JSON of extra SparseVAE arguments for the Sparse VAE, e.g. '{\"spike_gate\": false}'",
    )
    p.add_argument(
        "--train-kwargs",
        default="{}",
        help="JSON of model.train arguments for the Sparse VAE, e.g. '{\"kl_free_bits\": 0.5}'",
    )
    p.add_argument(
        "--auxiliary-key", default=None, help="obs column used as u by ivae, sparse_conditional"
    )
    p.add_argument("--save-dir", default=None, help="write each fit's AnnData here (h5ad)")
    p.add_argument(
        "--fits-from", default=None, help="fit nothing: stability of the fits saved in this folder"
    )
    p.add_argument("--quick", action="store_true", help="pbmc, 200 cells, 2 seeds, 3 epochs")
    args = p.parse_args(argv)
    if args.quick:
        args.data, args.n_cells, args.seeds, args.epochs = "pbmc", 200, 2, 3
    import torch

    torch.set_num_threads(args.threads)
    quiet_logs()
    sparsevae = import_sparsevae()
    with stdout_to_stderr() as out:
        run(args, sparsevae, out)
    return 0


def split_half_consensus_anchors(fits: list[Any], sparsevae: Any) -> float | None:
    """Median Jaccard index, over the first half's active factors, of the consensus anchors
    (anchors in at least half of the fits) of two halves of the fits; ``None`` below 4 fits
    or without masks."""
    if len(fits) < 4:
        return None
    half = len(fits) // 2
    a = sparsevae.tl.factor_stability(fits[:half])
    b = sparsevae.tl.factor_stability(fits[half:])
    if a.anchor_consensus.isna().all().all():
        return None
    link = sparsevae.tl.factor_stability([fits[0], fits[half]]).matches.set_index("factor")
    anchors_a, anchors_b = a.consensus_anchors(0.5), b.consensus_anchors(0.5)
    values = []
    for factor in a.factors.loc[a.factors["active"], "factor"]:
        partner = link.loc[factor, "matched"]
        ga = set(anchors_a[str(factor)])
        gb = set() if partner is None or pd.isna(partner) else set(anchors_b[str(partner)])
        union = ga | gb
        values.append(len(ga & gb) / len(union) if union else np.nan)  # as tl.factor_stability
    values = [v for v in values if not np.isnan(v)]
    return round(float(np.median(values)), 4) if values else None


def stability_record(
    method: str, seeds: list[int], fits: list[Any], args: Any, sparsevae: Any
) -> dict[str, Any]:
    """The ``stability`` JSON record of one method's fits."""
    stab = sparsevae.tl.factor_stability(fits)
    f = stab.factors
    active = f[f["active"]]
    return {
        "record": "stability",
        "method": method,
        "seeds": seeds,
        "n_restarts": args.n_restarts,
        "active_factors_reference": len(active),
        "median_abs_r": round(stab.median_abs_r, 4),
        "median_jaccard_selected": None
        if active["median_jaccard_selected"].isna().all()
        else round(float(active["median_jaccard_selected"].median()), 4),
        "median_jaccard_anchors": None
        if np.isnan(stab.median_jaccard_anchors)
        else round(stab.median_jaccard_anchors, 4),
        "split_half_consensus_anchors": split_half_consensus_anchors(fits, sparsevae),
        "reproducible_factors": int(active["reproducible"].sum()),
        "per_factor_median_abs_r": [round(x, 3) for x in active["median_abs_r"]],
    }


def saved_fits(folder: str, data: str, method: str) -> tuple[list[int], list[Any]]:
    """The seeds and AnnData of the fits saved by ``--save-dir`` for one method, by seed."""
    import anndata as ad

    paths = Path(folder).glob(f"{data}_{method}_s*.h5ad")
    by_seed = sorted((int(p.stem.rsplit("_s", 1)[1]), p) for p in paths)
    return [s for s, _ in by_seed], [ad.read_h5ad(p) for _, p in by_seed]


def run(args: argparse.Namespace, sparsevae: Any, out: Any) -> None:
    """Fit every method from every seed; write the JSON lines to ``out``."""
    if args.fits_from is not None:
        for method in args.methods:
            seeds, fits = saved_fits(args.fits_from, args.data, method)
            if len(fits) < 2:
                raise SystemExit(f"fewer than two saved fits of {method!r} in {args.fits_from}")
            record = stability_record(method, seeds, fits, args, sparsevae)
            print(json.dumps({**record, "fits_from": args.fits_from}), file=out, flush=True)
        return
    adata, label = load(args.data, args.n_cells)
    print(json.dumps({"record": "meta", "benchmark": "stability", "data": args.data,
                      "n_cells": adata.n_obs, "n_genes": adata.n_vars, "argv": sys.argv[1:],
                      **machine_info(args.threads)}), file=out, flush=True)  # fmt: skip
    for method in args.methods:
        if method in LINEAR:
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                print(json.dumps(fit_linear(method, adata, label, seed)), file=out, flush=True)
            continue
        fits = []
        seeds = list(range(args.first_seed, args.first_seed + args.seeds))
        for seed in seeds:
            ad, record = fit(method, adata, label, seed, args)
            fits.append(ad)
            if args.save_dir is not None:
                Path(args.save_dir).mkdir(parents=True, exist_ok=True)
                ad.write_h5ad(Path(args.save_dir) / f"{args.data}_{method}_s{seed}.h5ad")
            print(json.dumps(record), file=out, flush=True)
        if len(fits) >= 2:
            record = stability_record(method, seeds, fits, args, sparsevae)
            print(json.dumps(record), file=out, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
