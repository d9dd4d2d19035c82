"""Cell-type prediction and held-out reconstruction on Zeisel et al. (2015), 15 factors.

Data: ``../shared/data/zeisel2015.h5ad`` (3005 cells, raw UMI counts in ``X``, 7 level-1 classes
in ``obs.level1class``). Genes: the ``--n-genes`` (default 558, the paper's shape) most variable
genes (scanpy ``seurat_v3`` on the counts). Log-normalised data: ``normalize_total(1e4)`` over all
4000 genes, ``log1p``, then the same gene subset.

For every seed, ``--heldout`` (10%) of the cells, stratified by class, are held out; every method
is fitted on the other 90% and then encodes all cells. Methods (15 factors each):

``sparsevae_nb`` / ``sparsevae_gaussian``
    :class:`sparsevae.SparseVAE` on counts (NB) / on log-normalised data (Gaussian).
``sparsevae_nb_corr``
    ``sparsevae_nb`` with the learned factor correlation (``latent_prior="correlated"``).
``vae_nb`` / ``vae_gaussian``
    The same without a mask (``mask=None``).
``scvi`` / ``linear_scvi``
    scvi-tools' ``SCVI`` and ``LinearSCVI`` on counts (NB likelihood, their default widths).
``pca`` / ``nmf`` / ``fa``
    scikit-learn's PCA, NMF and FactorAnalysis on the log-normalised data.
``pca_k{K}`` (e.g. ``pca_k9``; not in the default list)
    PCA with ``K`` components instead of 15: how accuracy grows with the number of factors a
    method uses (the Sparse VAE's prior switches some of its 15 off).

Per fit (one JSON line, ``"record": "fit"``):

- ``accuracy``: stratified 5-fold cross-validated accuracy of a logistic regression on the
  standardised factors of all cells (:func:`sparsevae.tl.celltype_accuracy`, fold seed = seed);
- ``heldout_nll``: negative log-likelihood per held-out cell (summed over genes) given its
  posterior-mean factors, for the VAE-type models (counts for NB models, log-normalised values for
  Gaussian ones: compare within a likelihood);
- ``heldout_mse_lognorm``: MSE on the log-normalised scale of held-out cells for every method
  (count models: ``log1p(1e4 mu / total)`` of the decoded mean ``mu``). It favours the methods
  that fit that scale directly (Gaussian, PCA, FA, NMF);
- SparseVAE: ``active_factors`` (factors selecting at least one gene, by the rule of
  :func:`sparsevae.tl.identifiability_report`), ``identifiable_factors`` (active with at least
  two anchors), ``anchors_per_factor`` (genes selected by that factor only),
  ``median_selected_share`` (median over active factors of the share of genes selected);
- VAE-type models (SparseVAE, VAE, scVI, LinearSCVI): ``factor_kl`` (per factor, largest first,
  the mean over training cells of ``KL(q(z_k | x) || N(0, 1))``) and ``factors_in_use`` (factors
  with a KL above 0.1 nats; a VAE leaves the factors it does not need at the prior), so the
  Sparse VAE's active factors can be set beside the number of factors the VAE itself uses.

After the fits, one ``"record": "stability"`` line per SparseVAE / VAE method fitted from two or
more seeds: :func:`sparsevae.tl.factor_stability` over the seeds' factors of all cells (median
matched ``|r|``, median anchor-set Jaccard, reproducible factors). ``--module-kwargs`` passes
options to the SparseVAE methods (e.g. ``'{"spike_gate": true, "prior_cells": 200}'``).

At the end one ``"record": "summary"`` line per method: mean and sd over seeds.

Examples
--------
Quick check (under two minutes; 1000 cells, 200 genes, a few epochs)::

    PYTHONPATH=src python benchmarks/zeisel.py --quick

Full run (5 seeds; hours on 2 CPU cores)::

    PYTHONPATH=src python benchmarks/zeisel.py --out benchmarks/results/zeisel.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    MIN_FACTOR_KL,
    SHARED,
    TRAINER_KWARGS,
    Emitter,
    add_mean_sd,
    command_line,
    factor_kl,
    guarded_fit,
    import_sparsevae,
    machine_info,
    posterior_means,
    quiet_logs,
    stdout_to_stderr,
)

DATA = SHARED / "data" / "zeisel2015.h5ad"
LABEL_KEY = "level1class"
N_FACTORS = 15
METHODS = (
    "sparsevae_nb",
    "sparsevae_nb_corr",
    "sparsevae_gaussian",
    "vae_nb",
    "vae_gaussian",
    "scvi",
    "linear_scvi",
    "pca",
    "nmf",
    "fa",
)
PAPER = {
    "sparsevae": (0.95, 0.003),
    "vae": (0.94, 0.016),
    "nmf": (0.91, 0.007),
    "vsc": (0.89, 0.062),
}


def load(path: Path, n_genes: int, n_cells: int | None, seed: int) -> Any:
    """Read the data, subsample cells (stratified) if asked, select genes, add log-normalised data.

    Returns
    -------
    AnnData with counts in ``X`` and ``layers["counts"]``, log-normalised values in
    ``layers["lognorm"]`` and the all-gene total count in ``obs["total_all"]``.
    """
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp

    adata = ad.read_h5ad(path)
    if n_cells is not None and n_cells < adata.n_obs:
        from sklearn.model_selection import train_test_split

        keep, _ = train_test_split(
            np.arange(adata.n_obs),
            train_size=n_cells,
            stratify=adata.obs[LABEL_KEY],
            random_state=seed,
        )
        adata = adata[np.sort(keep)].copy()
    X = adata.X.tocsr() if sp.issparse(adata.X) else sp.csr_matrix(adata.X)
    adata.X = X.astype(np.float32)
    adata.obs["total_all"] = np.asarray(X.sum(1)).ravel()
    adata.layers["counts"] = adata.X.copy()
    sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=n_genes, layer="counts")
    lognorm = sc.pp.normalize_total(adata, target_sum=1e4, inplace=False)["X"]
    adata.layers["lognorm"] = sp.csr_matrix(lognorm).log1p()
    adata = adata[:, adata.var["highly_variable"].to_numpy()].copy()
    return adata


def dense(x: Any) -> np.ndarray:
    """A dense float64 array."""
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)


def mask_summary(model: Any) -> dict[str, Any]:
    """Active and identifiable factors and anchors per factor, by the package's own rules
    (:func:`sparsevae.tl.identifiability_report`)."""
    sparsevae = import_sparsevae()
    f = sparsevae.tl.identifiability_report(model).factors
    active = f[~f["switched_off"] & ~f["unselected"]]
    return {
        "active_factors": len(active),
        "in_use_no_gene": int(f["unselected"].sum()),
        "identifiable_factors": int(f["identifiable"].sum()),
        "all_active_identifiable": bool(len(active) > 0 and active["identifiable"].all()),
        "genes_per_factor": f["n_selected"].tolist(),
        "anchors_per_factor": f["n_anchors"].tolist(),
        "factors_with_2_anchors": int((f["n_anchors"] >= 2).sum()),
        "median_selected_share": float(active["n_selected"].median() / model.adata.n_vars)
        if len(active)
        else 0.0,
        "eta": model.get_eta().to_numpy().tolist(),
    }


#: Per method, the AnnData of all cells with each seed's results (``write_results``), for the
#: stability record at the end of the run.
FITS: dict[str, list[Any]] = defaultdict(list)
#: The seeds of those fits, in the same order.
FIT_SEEDS: dict[str, list[int]] = defaultdict(list)


def stability_records(fits: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Per method fitted from two or more seeds: how reproducible its factors are
    (:func:`sparsevae.tl.factor_stability`, the first seed as reference)."""
    sparsevae = import_sparsevae()
    out = []
    for method, ads in fits.items():
        if len(ads) < 2:
            continue
        stab = sparsevae.tl.factor_stability(ads)
        active = stab.factors[stab.factors["active"]]
        out.append(
            {
                "record": "stability",
                "benchmark": "zeisel",
                "method": method,
                "n_fits": len(ads),
                "seeds": FIT_SEEDS.get(method, []),
                "median_abs_r": stab.median_abs_r,
                # None where no reference factor has anchors (Jaccard of empty sets)
                "median_jaccard_anchors": None
                if np.isnan(stab.median_jaccard_anchors)
                else stab.median_jaccard_anchors,
                "reproducible_factors": int(active["reproducible"].sum()),
                "active_reference_factors": len(active),
                "per_factor_median_abs_r": active["median_abs_r"].round(3).tolist(),
            }
        )
    return out


def fit_vae_type(
    method: str, adata: Any, train_idx: np.ndarray, test_idx: np.ndarray, args: Any, seed: int
) -> dict[str, Any]:
    """Fit one of the scvi-tools-API models; return factors, held-out NLL and lognorm means."""
    import scvi

    scvi.settings.seed = seed
    counts = "_nb" in method or method in ("scvi", "linear_scvi")
    layer = "counts" if counts else "lognorm"
    train = adata[train_idx].copy()
    full = adata.copy()
    test = adata[test_idx].copy()
    epochs = args.epochs
    extra: dict[str, Any] = {}
    if method in ("scvi", "linear_scvi"):
        cls = scvi.model.SCVI if method == "scvi" else scvi.model.LinearSCVI
        cls.setup_anndata(train, layer=layer)
        model = cls(train, n_latent=N_FACTORS, gene_likelihood="nb")
        epochs = args.scvi_epochs
        batch_size = 128
    else:
        sparsevae = import_sparsevae()
        sparsevae.SparseVAE.setup_anndata(train, layer=layer)
        model = sparsevae.SparseVAE(
            train,
            n_factors=N_FACTORS,
            likelihood="nb" if counts else "gaussian",
            mask="ssl" if method.startswith("sparsevae") else None,
            latent_prior="correlated" if method.endswith("_corr") else "normal",
            **(json.loads(args.module_kwargs) if method.startswith("sparsevae") else {}),
        )
        batch_size = args.batch_size
    t0 = time.perf_counter()
    model.train(
        max_epochs=epochs,
        batch_size=batch_size,
        train_size=1.0,
        accelerator="cpu",
        **TRAINER_KWARGS,
    )
    seconds = time.perf_counter() - t0
    z_all, _, _ = posterior_means(model, full)
    _, mean_test, nll_test = posterior_means(model, test)
    if counts:
        total = test.obs["total_all"].to_numpy()[:, None]
        lognorm_hat = np.log1p(1e4 * mean_test / total)
    else:
        lognorm_hat = mean_test
    if method.startswith("sparsevae"):
        extra = mask_summary(model)
    kl = factor_kl(model, train)
    extra["factor_kl"] = np.round(np.sort(kl)[::-1], 3).tolist()
    extra["factors_in_use"] = int((kl > MIN_FACTOR_KL).sum())
    if method not in ("scvi", "linear_scvi"):
        kept = full.copy()
        del kept.layers["lognorm"]
        model.write_results(kept, effects=False)
        FITS[method].append(kept)
        FIT_SEEDS[method].append(seed)
        if args.save_dir is not None:
            # The file names of stability.py --save-dir: its --fits-from reads them back.
            Path(args.save_dir).mkdir(parents=True, exist_ok=True)
            kept.write_h5ad(Path(args.save_dir) / f"zeisel_{method}_s{seed}.h5ad")
    return {
        "z": z_all,
        "lognorm_hat": lognorm_hat,
        "heldout_nll": float(np.mean(nll_test)),
        "train_seconds": seconds,
        "epochs": int(model.history["train_loss_epoch"].shape[0])
        if "train_loss_epoch" in getattr(model, "history", {})
        else epochs,
        "likelihood": "nb" if counts else "gaussian",
        **extra,
    }


def fit_linear(
    method: str, adata: Any, train_idx: np.ndarray, test_idx: np.ndarray, seed: int
) -> dict[str, Any]:
    """Fit PCA (``pca_k{K}``: with ``K`` components), NMF or factor analysis on the
    log-normalised data."""
    from sklearn.decomposition import NMF, PCA, FactorAnalysis

    x = dense(adata.layers["lognorm"])
    x_train, x_test = x[train_idx], x[test_idx]
    t0 = time.perf_counter()
    if method == "pca" or method.startswith("pca_k"):
        k = N_FACTORS if method == "pca" else int(method.removeprefix("pca_k"))
        est: Any = PCA(n_components=k, random_state=seed).fit(x_train)
        recon = est.inverse_transform(est.transform(x_test))
    elif method == "nmf":
        est = NMF(n_components=N_FACTORS, init="nndsvda", max_iter=500, random_state=seed)
        est.fit(x_train)
        recon = est.transform(x_test) @ est.components_
    else:
        est = FactorAnalysis(n_components=N_FACTORS, random_state=seed).fit(x_train)
        recon = est.transform(x_test) @ est.components_ + est.mean_
    seconds = time.perf_counter() - t0
    return {"z": est.transform(x), "lognorm_hat": recon, "train_seconds": seconds}


def run_one(method: str, adata: Any, seed: int, args: Any) -> dict[str, Any]:
    """Split, fit one method, score it."""
    from sklearn.model_selection import train_test_split

    sparsevae = import_sparsevae()
    labels = adata.obs[LABEL_KEY].astype(str).to_numpy()
    train_idx, test_idx = train_test_split(
        np.arange(adata.n_obs), test_size=args.heldout, stratify=labels, random_state=seed
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    if method in ("pca", "nmf", "fa") or method.startswith("pca_k"):
        fit = fit_linear(method, adata, train_idx, test_idx, seed)
    else:
        fit = fit_vae_type(method, adata, train_idx, test_idx, args, seed)
    z = fit.pop("z")
    lognorm_hat = fit.pop("lognorm_hat")
    acc = sparsevae.tl.celltype_accuracy(z, labels, n_splits=5, seed=seed)
    x_test = dense(adata.layers["lognorm"])[test_idx]
    return {
        "record": "fit",
        "method": method,
        "seed": seed,
        "accuracy": acc["mean"],
        "accuracy_fold_sd": acc["std"],
        "heldout_mse_lognorm": float(np.mean((lognorm_hat - x_test) ** 2)),
        "n_train": len(train_idx),
        "n_test": len(test_idx),
        **fit,
    }


SUMMARY_KEYS = (
    "accuracy",
    "heldout_nll",
    "heldout_mse_lognorm",
    "train_seconds",
    "active_factors",
    "identifiable_factors",
    "factors_with_2_anchors",
    "median_selected_share",
    "factors_in_use",
)


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sd over seeds per method."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[r["method"]].append(r)
    out = []
    for method, rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        s: dict[str, Any] = {
            "record": "summary",
            "method": method,
            "n_seeds": len(ok),
            "n_failed": len(rs) - len(ok),
        }
        add_mean_sd(s, ok, SUMMARY_KEYS)
        out.append(s)
    return out


def run_mode(args: argparse.Namespace) -> str:
    """``quick``, ``full`` (5 seeds, all cells, 558 genes, default epochs) or ``reduced``."""
    if args.quick:
        return "quick"
    full = (
        args.seeds >= 5
        and args.n_cells is None
        and args.n_genes == 558
        and args.epochs is None
        and args.scvi_epochs is None
        and set(args.methods) == set(METHODS)
    )
    return "full" if full else "reduced"


def method_name(text: str) -> str:
    """A ``--methods`` entry: one of :data:`METHODS` or ``pca_k<K>``."""
    if text in METHODS or re.fullmatch(r"pca_k[1-9][0-9]*", text):
        return text
    raise argparse.ArgumentTypeError(
        f"unknown method {text!r}: choose from {', '.join(METHODS)}, or pca_k<K>"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (mode-dependent defaults filled in)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small run, under two minutes")
    p.add_argument("--data", type=Path, default=DATA, help="path of zeisel2015.h5ad")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 5; quick 1)")
    p.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="start the seeds here (first-seed .. first-seed + N - 1): more seeds for a run "
        "already made, joined to it with merge_runs.py --more-seeds",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        type=method_name,
        help=f"any of {', '.join(METHODS)}, or pca_k<K> (PCA with K components)",
    )
    p.add_argument("--n-genes", type=int, default=None, help="genes (default 558; quick 200)")
    p.add_argument("--n-cells", type=int, default=None, help="subsample cells (quick 1000)")
    p.add_argument(
        "--epochs", type=int, default=None, help="SparseVAE/VAE epochs (default: the package's)"
    )
    p.add_argument("--scvi-epochs", type=int, default=None, help="SCVI/LinearSCVI epochs")
    p.add_argument("--batch-size", type=int, default=128, help="SparseVAE/VAE minibatch size")
    p.add_argument("--heldout", type=float, default=0.1, help="held-out share of cells")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    p.add_argument(
        "--module-kwargs",
        default="{}",
        help="JSON passed to SparseVAE(...) for the sparsevae_* methods, e.g. "
        '\'{"spike_gate": true, "prior_cells": 200}\'',
    )
    p.add_argument("--note", default=None, help="free text stored in the meta record")
    p.add_argument(
        "--save-dir",
        default=None,
        help="write each SparseVAE/VAE fit's AnnData (all cells, with results) here, as "
        "zeisel_<method>_s<seed>.h5ad: stability.py --data zeisel --fits-from reads them",
    )
    args = p.parse_args(argv)
    q = args.quick
    if args.seeds is None:
        args.seeds = 1 if q else 5
    if args.n_genes is None:
        args.n_genes = 200 if q else 558
    if args.n_cells is None and q:
        args.n_cells = 1000
    if args.epochs is None and q:
        args.epochs = 2
    if args.scvi_epochs is None and q:
        args.scvi_epochs = 5
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every (seed, method) fit, one JSON line each, then the summaries."""
    args = parse_args(argv)
    if not args.data.exists():
        print(f"[zeisel] data file {args.data} not found", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    status = 0
    with stdout_to_stderr() as real_stdout:
        quiet_logs()
        emit = Emitter(real_stdout, args.out)
        adata = load(args.data, args.n_genes, args.n_cells, seed=0)
        emit(
            {
                "record": "meta",
                "benchmark": "zeisel",
                "mode": run_mode(args),
                "command": command_line(),
                "settings": {
                    k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                },
                "shape": list(adata.shape),
                "classes": adata.obs[LABEL_KEY].value_counts().to_dict(),
                "paper_accuracy": PAPER,
                "machine": machine_info(args.threads),
                "package_path": str(Path(import_sparsevae().__file__).parent),
                "note": args.note,
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            }
        )
        records = []
        for n_done, seed in enumerate(range(args.first_seed, args.first_seed + args.seeds)):
            if n_done >= 2:
                # The stability of the seeds so far, so that a run stopped early keeps it.
                for s in stability_records(FITS):
                    emit({**s, "partial": True})
            for method in args.methods:
                rec, ok = guarded_fit(
                    "zeisel",
                    lambda m=method, sd=seed: run_one(m, adata, sd, args),
                    {"method": method, "seed": seed},
                    emit,
                    lambda r: f"acc={r.get('accuracy', float('nan')):.3f}",
                )
                records.append(rec)
                status = status if ok else 1
        for s in summarise(records):
            s["benchmark"] = "zeisel"
            emit(s)
        for s in stability_records(FITS):
            emit(s)
    return status


if __name__ == "__main__":
    sys.exit(main())
