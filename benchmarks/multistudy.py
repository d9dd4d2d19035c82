"""Multi-study SparseVAE on simulated data and on real counts with planted programs, JSON lines.

Usage: ``python benchmarks/multistudy.py [--quick] [--seeds 0 1 2] [--studies 2 3 5]``; on real
counts with planted study-specific programs: ``python benchmarks/multistudy.py --real pbmc
[--quick] [--seeds 0 1 2] [--folds 1.5 2 4 8] [--n-studies 2]`` (below).

One line per fit (``"benchmark": "multistudy"``): the F1 of the shared mask against the shared
programs and of each study's mask against that study's programs (learned factors matched to true
programs by the Hungarian algorithm on gene-set F1, :func:`sparsevae.tl.mask_f1`, selection
``p* >= 0.5``), ``absorbed`` (the share of study-specific program genes that the shared mask
selects: 0 when no specific program leaks into the shared factors), the cross-validated
cell-type accuracy (:func:`sparsevae.tl.celltype_accuracy`) from the shared factors, from all
factors and, as the ceiling, from the true shared factors, the training time per epoch, and the
verdict of :func:`sparsevae.tl.check_shared_specific` (``check_ok``, ``check_problems``): whether
the fit's own checks, which need no truth, flag a misassigned fit. ``--extra-factors 0 1`` also
fits every configuration with one surplus factor per mask (the usual situation: the numbers of
programs are not known).

One line per study count (``"benchmark": "multistudy_cost"``): seconds per training epoch of the
multi-study model and of a single-study model of the same size (``n_shared + n_specific``
factors, same data, hidden width and batch size) and their ratio: the cost of gathering each
cell's mask by its study.

``--quick``: 3 studies, one seed, a smaller simulation (about 1.5 minutes on 2 shared cores).
``--tutorial-size --extra-factors 1 --no-cost``: the multi-study tutorial's simulation and
numbers of factors (one surplus per mask), seeds 0-11 (about 15 minutes).
Full run: 2, 3 and 5 studies x seeds 0-2, 400 genes (3 shared programs and 1 per study, 30 genes
each), 400 cells per study, 100 epochs (about 20-30 minutes).

Real counts (``--real pbmc`` or ``--real zeisel``, ``"benchmark": "multistudy_real"``): does a
program present in one study only land in that study's specific mask, on a real background?
The cells of :func:`sparsevae.datasets.pbmc68k_reduced_counts` (700 cells, 765 genes) or of
``../shared/data/zeisel2015.h5ad`` (3005 cells, its 1000 seurat_v3 HVGs; the run is skipped
with a ``"record": "skipped"`` line when the file is absent) are split into ``--n-studies``
studies (2-4) at random, stratified by cell type (``--split random``, the only split: neither
data set has a study-like covariate; pbmc's ``phase`` is scored from the expression and has 17
G2M cells, ``louvain`` is a clustering). Program ``p`` is planted in study ``study_p`` (two
programs, in ``study_0`` and ``study_1``): in half of its cells (``--planted-fraction``), each
gene of the set gets ``Poisson(x * (fold - 1) * a)`` extra counts, ``a ~ Uniform(0.5, 1.5)``
per cell (see ``_real_background.py``). Gene sets: pbmc, Hallmark INTERFERON_GAMMA_RESPONSE
(29 genes present) in study_0 and MTORC1_SIGNALING (22 present, the one shared gene dropped)
in study_1; Zeisel's copy has no gene names, so 25 random HVGs detected in >= 10% of cells per
program (drawn per seed). The model is the user's: package defaults, ``n_factors`` 10 (pbmc) or
15 (Zeisel), ``n_specific_factors=3``, ``max_epochs`` the package default (400 for pbmc, 100
for Zeisel) unless ``--max-epochs``. One line per (seed, fold) fit: per planted program, the
shares of its genes that :func:`sparsevae.tl.shared_specific_genes` labels ``specific to`` the
right study (``specific_right_study``, the target), ``shared`` (the failure mode), ``both``,
``none`` or specific to another study, and their means over programs (``planted_*``); for the
data's own programs, among the genes that some mask selects and that were not planted, the
shares labelled ``shared`` (``data_genes_shared``, target >= 0.9), ``both`` and specific; the
cell-type accuracy of the shared factors (:func:`sparsevae.tl.celltype_accuracy`); and the
verdict of :func:`sparsevae.tl.check_shared_specific`. One summary line per fold: the means
over seeds. With fold 1 among ``--folds`` (nothing planted; it runs first), each seed's unplanted
fit is the background the other folds are scored against (:func:`against_background`): planted
genes that it already selects belong to the data's own programs, where ``both`` is the right
label, and the target is asked of the other genes (``planted_specific_right_study_new``).

``--module-kwargs`` and ``--train-kwargs`` (JSON, either mode) are passed to ``SparseVAE(...)``
and ``model.train(...)``, e.g. ``--train-kwargs '{"kl_free_bits_specific": 0}'`` to compare
with the free bits of the specific factors off; each fit line records them.

``python benchmarks/multistudy.py --real pbmc --quick``: seed 0, fold 4, 40 epochs (66 s on one
thread). At the package defaults one pbmc fit (400 epochs) took 12-13 minutes on one thread of
the shared 2-core machine (1.8-2.0 s per epoch at load 2-3; 1.45 s at load 1.1), so
``--real pbmc --seeds 0 1 2 --folds 2 4 8`` (nine fits) takes about 2 hours; a Zeisel fit (100
epochs of about 10 s) about 17 minutes. ``benchmarks/results/multistudy_real.jsonl`` holds
runs at the defaults of their time; the last, of session 20, ``--real pbmc --folds 8`` and
``--folds 4`` for seeds 0-4 (one process per seed and fold), scored against session 19's
fold-1 fits of the same seeds.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import scvi
import torch

import sparsevae

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _real_background as real
from _common import TRAINER_KWARGS as QUIET
from _common import command_line, machine_info

QUICK_REAL_EPOCHS = 40


def simulate(n_studies: int, seed: int, size: dict[str, int]) -> Any:
    """The benchmark's simulation."""
    return sparsevae.datasets.simulate_multistudy(
        n_studies=n_studies,
        n_genes=size["n_genes"],
        n_shared=size["n_shared"],
        n_specific=size["n_specific"],
        genes_per_program=size["genes_per_program"],
        n_cells_per_study=size["n_cells_per_study"],
        seed=seed,
    )


def fit(
    n_studies: int,
    seed: int,
    size: dict[str, int],
    max_epochs: int,
    shared_first: int | None = None,
    extra: int = 0,
    kl_warmup: int | None = None,
    move_confined: bool = True,
    module_kwargs: dict[str, Any] | None = None,
    train_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fit one multi-study SparseVAE (``extra`` surplus factors per mask) and score it."""
    ad = simulate(n_studies, seed, size)
    scvi.settings.seed = seed
    sparsevae.SparseVAE.setup_anndata(ad, study_key="study")
    model = sparsevae.SparseVAE(
        ad,
        n_factors=size["n_shared"] + extra,
        n_specific_factors=size["n_specific"] + extra,
        n_hidden=size["n_hidden"],
        **(module_kwargs or {}),
    )
    t0 = time.perf_counter()
    model.train(
        max_epochs=max_epochs,
        batch_size=size["batch_size"],
        n_epochs_shared_first=shared_first,
        n_epochs_kl_warmup=kl_warmup,
        move_confined=move_confined,
        **(train_kwargs or {}),
        **QUIET,
    )
    seconds = time.perf_counter() - t0
    checks = sparsevae.tl.check_shared_specific(model)
    shared_sel = model.get_inclusion_probabilities("shared") >= 0.5
    f1_shared = sparsevae.tl.mask_f1(shared_sel, ad.varm["true_mask_shared"])["f1"]
    f1_specific = {
        s: sparsevae.tl.mask_f1(
            model.get_inclusion_probabilities(s) >= 0.5, ad.varm[f"true_mask_{s}"]
        )["f1"].tolist()
        for s in model.studies
    }
    specific_genes = np.hstack([ad.varm[f"true_mask_{s}"] for s in model.studies]).any(1)
    absorbed = float(shared_sel.to_numpy().any(1)[specific_genes].mean())
    z = model.get_latent_representation()
    labels = ad.obs["cell_type"].to_numpy()
    acc_shared = sparsevae.tl.celltype_accuracy(z[:, : size["n_shared"] + extra], labels)["mean"]
    acc_all = sparsevae.tl.celltype_accuracy(z, labels)["mean"]
    z_true = ad.obsm["true_factors"][:, : size["n_shared"]]
    acc_true = sparsevae.tl.celltype_accuracy(z_true, labels)["mean"]
    all_specific = [f for fs in f1_specific.values() for f in fs]
    return {
        "benchmark": "multistudy",
        "n_studies": n_studies,
        "seed": seed,
        **{k: size[k] for k in ("n_genes", "n_shared", "n_specific", "n_cells_per_study")},
        "extra_factors": extra,
        "module_kwargs": module_kwargs or {},
        "train_kwargs": train_kwargs or {},
        "n_epochs_kl_warmup": kl_warmup,
        "move_confined": move_confined,
        "moved": model.moved_factors_,
        "max_epochs": max_epochs,
        "n_epochs_shared_first": model.trainer.lightning_module.n_epochs_shared_first,
        "f1_shared_mean": round(float(f1_shared.mean()), 4),
        "f1_shared": [round(float(f), 4) for f in f1_shared],
        "f1_specific_mean": round(float(np.mean(all_specific)), 4),
        "f1_specific": {s: [round(float(f), 4) for f in fs] for s, fs in f1_specific.items()},
        "absorbed": round(absorbed, 4),
        "celltype_accuracy_shared": round(acc_shared, 4),
        "celltype_accuracy_all": round(acc_all, 4),
        "celltype_accuracy_true_factors": round(acc_true, 4),
        "check_ok": checks.ok,
        "check_problems": checks.problems,
        "shared_spread_ratio": [round(float(r), 2) for r in checks.confined["ratio"]],
        "seconds_per_epoch": round(seconds / max_epochs, 4),
    }


def epoch_seconds(ad: Any, multistudy: bool, size: dict[str, int], n_epochs: int) -> float:
    """Best-of-two seconds per epoch of a short training run."""
    ad = ad.copy()
    sparsevae.SparseVAE.setup_anndata(ad, study_key="study" if multistudy else None)
    kwargs = (
        {"n_factors": size["n_shared"], "n_specific_factors": size["n_specific"]}
        if multistudy
        else {"n_factors": size["n_shared"] + size["n_specific"]}
    )
    best = np.inf
    for _ in range(2):
        model = sparsevae.SparseVAE(ad, n_hidden=size["n_hidden"], **kwargs)
        t0 = time.perf_counter()
        model.train(max_epochs=n_epochs, batch_size=size["batch_size"], **QUIET)
        best = min(best, (time.perf_counter() - t0) / n_epochs)
    return float(best)


def cost(n_studies: int, size: dict[str, int], n_epochs: int) -> dict[str, Any]:
    """Seconds per epoch, multi-study vs a single-study model of the same size."""
    ad = simulate(n_studies, 0, size)
    single = epoch_seconds(ad, False, size, n_epochs)
    multi = epoch_seconds(ad, True, size, n_epochs)
    return {
        "benchmark": "multistudy_cost",
        "n_studies": n_studies,
        "n_cells": ad.n_obs,
        "n_genes": ad.n_vars,
        "n_factors": size["n_shared"] + size["n_specific"],
        "n_hidden": size["n_hidden"],
        "batch_size": size["batch_size"],
        "seconds_per_epoch_single": round(single, 4),
        "seconds_per_epoch_multi": round(multi, 4),
        "cost_ratio": round(multi / single, 3),
    }


#: Real mode: planted genes detected (count > 0) in at least this share of the planted cells are
#: scored apart (``*_detected``).
DETECTED = 0.25


def label_shares(labels: Any, study: str | None = None) -> dict[str, float]:
    """Shares of genes per :func:`sparsevae.tl.shared_specific_genes` label."""
    labels = np.asarray(labels, dtype=object)
    n = max(len(labels), 1)
    shares = {
        "shared": float(np.sum(labels == "shared")) / n,
        "both": float(np.sum(labels == "both")) / n,
        "none": float(np.sum(labels == "none")) / n,
    }
    if study is not None:
        right = float(np.sum(labels == f"specific to {study}")) / n
        shares = {"specific_right_study": right, **shares}
        shares["specific_other"] = 1.0 - sum(shares.values())
    return {k: round(v, 4) for k, v in shares.items()}


def fit_real(
    data: str,
    background: Any,
    programs: list[tuple[str, list[str]]],
    split: str,
    seed: int,
    fold: float,
    max_epochs: int | None,
    fraction: float,
    n_specific: int,
    move_confined: bool = True,
    module_kwargs: dict[str, Any] | None = None,
    train_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Plant the programs into the real counts, fit (package defaults unless ``module_kwargs``
    or ``train_kwargs`` say otherwise), and score."""
    ad = real.plant(background, programs, fold, fraction, seed)
    info = real.DATASETS[data]
    n_shared = info["n_factors"]
    scvi.settings.seed = seed
    sparsevae.SparseVAE.setup_anndata(ad, layer="counts", study_key="study")
    model = sparsevae.SparseVAE(
        ad, n_factors=n_shared, n_specific_factors=n_specific, **(module_kwargs or {})
    )
    t0 = time.perf_counter()
    model.train(max_epochs=max_epochs, move_confined=move_confined, **(train_kwargs or {}), **QUIET)
    seconds = time.perf_counter() - t0
    n_epochs = int(model.trainer.lightning_module.current_epoch) or (max_epochs or 0)
    table = sparsevae.tl.shared_specific_genes(model).genes.reindex(ad.var_names)
    label = table["label"]
    z = model.get_latent_representation()
    scored = []
    planted: set[str] = set()
    for truth in ad.uns["planted_programs"]:
        planted.update(truth["genes"])
        in_studies = table.loc[truth["genes"], "studies"].fillna("").str.split(";")
        in_right = np.array([truth["study"] in s for s in in_studies])
        # Up-scaling leaves zeros at zero: a gene detected in few planted cells carries almost
        # no planted signal. Scored apart: genes detected in >= DETECTED of the planted cells.
        detected = real.detected_share(ad, truth) >= DETECTED
        scored.append(
            {
                "name": truth["name"],
                "study": truth["study"],
                "n_genes": len(truth["genes"]),
                "n_cells": len(truth["cells"]),
                "realised_fold": round(truth["realised_fold"], 3),
                **label_shares(label[truth["genes"]].to_numpy(), truth["study"]),
                # selected by a specific factor of the right study (label "specific to" it, or
                # "both": also by a shared factor, e.g. a cell-type marker the program contains)
                "in_right_specific_mask": round(float(in_right.mean()), 4),
                "n_detected": int(detected.sum()),
                "in_right_specific_mask_detected": round(float(in_right[detected].mean()), 4)
                if detected.any()
                else None,
                "labels": label[truth["genes"]].to_dict(),
                "in_right_specific_mask_genes": [
                    g for g, inside in zip(truth["genes"], in_right, strict=True) if inside
                ],
                **captured(model, z, truth),
                "pca_abs_r": pca_abs_r(ad, truth),
            }
        )
    own = label.drop(sorted(planted))
    own_selected = own[own != "none"].to_numpy()
    own_shares = label_shares(own_selected)
    checks = sparsevae.tl.check_shared_specific(model)
    # Whether the masks describe the decoder (without spike gates they need not).
    fidelity = {kind: sparsevae.tl.mask_fidelity(model, kind=kind) for kind in model.mask_kinds}
    labels = ad.obs[info["label_key"]].astype(str).to_numpy()
    acc_shared = sparsevae.tl.celltype_accuracy(z[:, :n_shared], labels)["mean"]
    return {
        "benchmark": "multistudy_real",
        "record": "fit",
        "data": data,
        "split": split,
        "n_studies": int(ad.obs["study"].nunique()),
        "seed": seed,
        "fold": fold,
        "n_cells": ad.n_obs,
        "n_genes": ad.n_vars,
        "n_factors": n_shared,
        "n_specific_factors": n_specific,
        "module_kwargs": module_kwargs or {},
        "train_kwargs": train_kwargs or {},
        "max_epochs": max_epochs,
        "n_epochs": n_epochs,
        "planted_fraction": fraction,
        "programs": scored,
        "planted_specific_right_study": round(
            float(np.mean([p["specific_right_study"] for p in scored])), 4
        ),
        "planted_in_right_specific_mask": round(
            float(np.mean([p["in_right_specific_mask"] for p in scored])), 4
        ),
        "planted_in_right_specific_mask_detected": round(
            float(np.mean([p["in_right_specific_mask_detected"] or 0.0 for p in scored])), 4
        ),
        "planted_shared": round(float(np.mean([p["shared"] for p in scored])), 4),
        "planted_both": round(float(np.mean([p["both"] for p in scored])), 4),
        "data_genes_selected": len(own_selected),
        "data_genes_shared": own_shares["shared"],
        "data_genes_both": own_shares["both"],
        "data_genes_specific": round(1.0 - own_shares["shared"] - own_shares["both"], 4)
        if len(own_selected)
        else 0.0,
        "celltype_accuracy_shared": round(float(acc_shared), 4),
        "check_ok": checks.ok,
        "check_problems": checks.problems,
        "unfaithful_factors": {
            kind: f.loc[~f["faithful"], "factor"].tolist() for kind, f in fidelity.items()
        },
        "effect_share_selected": {kind: median_share(f) for kind, f in fidelity.items()},
        "seconds": round(seconds, 1),
        "move_confined": move_confined,
        "moved": model.moved_factors_,
        "seconds_per_epoch": round(seconds / n_epochs, 4) if n_epochs else None,
    }


def captured(model: Any, z: np.ndarray, truth: dict[str, Any]) -> dict[str, Any]:
    """Which factor follows a planted program: the largest |correlation| with the planted activity.

    Over the cells of the planted study (``obs["planted_activity"]``, 0 outside the planted
    cells). ``captured_abs_r`` near 0: no factor carries the program (below the detection
    limit, whatever the masks say); ``captured_kind`` says whether the best factor is shared or
    specific (a specific factor of the planted study is where the program belongs).
    """
    in_study = (model.adata.obs["study"].astype(str) == truth["study"]).to_numpy()
    activity = model.adata.obs["planted_activity"].to_numpy()[in_study]
    zs = z[in_study]
    sd = zs.std(0)
    r = np.zeros(zs.shape[1])
    ok = sd > 0
    r[ok] = [abs(np.corrcoef(zs[:, k], activity)[0, 1]) for k in np.flatnonzero(ok)]
    best = int(np.argmax(r))
    name = str(model.factor_names[best])
    return {
        "captured_by": name,
        "captured_abs_r": round(float(r[best]), 4),
        "captured_kind": "shared" if name in model.shared_factor_names else "specific",
    }


#: Principal components of the planted study for :func:`pca_abs_r`.
PCA_COMPONENTS = 15


def pca_abs_r(adata: Any, truth: dict[str, Any]) -> float:
    """A peer's view of a planted program: the largest |r| of a principal component with it.

    PCA (``PCA_COMPONENTS``) of the planted study's cells, log-normalised counts (scanpy's
    ``normalize_total`` and ``log1p``), against the planted activity. Where no component follows
    the program either, a factor model without labels has little to find: a reference for the
    detection limit, beside :func:`captured`.
    """
    import scanpy as sc

    study = adata[(adata.obs["study"].astype(str) == truth["study"]).to_numpy()]
    sub = sc.AnnData(study.layers["counts"].copy())
    sc.pp.normalize_total(sub, target_sum=1e4)
    sc.pp.log1p(sub)
    n_comps = min(PCA_COMPONENTS, sub.n_obs - 1, sub.n_vars - 1)
    pcs = sc.pp.pca(sub, n_comps=n_comps, random_state=0, copy=True).obsm["X_pca"]
    activity = study.obs["planted_activity"].to_numpy()
    r = [abs(np.corrcoef(pcs[:, k], activity)[0, 1]) for k in range(n_comps) if pcs[:, k].std() > 0]
    return round(float(max(r, default=0.0)), 4)


def against_background(record: dict[str, Any], background: dict[str, Any]) -> None:
    """Score ``record``'s planted genes apart by whether the unplanted fit selects them.

    ``background`` is the fit of the same seed, split and options at fold 1 (nothing planted).
    A planted gene that the background fit already selects belongs to one of the data's own
    programs (e.g. HLA class II genes in the IFN-gamma set): "both" is then the right label, and
    the planted program should add the right study's specific mask. Per program, and as means
    (``planted_*_new`` and ``planted_*_own``), it adds: ``own_in_background`` (share of its genes
    the background fit selects in some mask), ``specific_right_study_new`` (among the other genes,
    the share labelled specific to the right study: the target's question where the data have
    no program of their own), ``in_right_specific_mask_own`` (among the own genes, the share
    also in the right study's specific mask) and ``placed_right`` (the share of all its genes
    labelled as they should be: a new gene specific to the right study only, an own gene in the
    right study's specific mask, whether a shared factor keeps it too or not).
    """
    by_name = {p["name"]: p for p in background["programs"]}
    for p in record["programs"]:
        before = by_name[p["name"]]["labels"]
        own = [g for g in p["labels"] if before[g] != "none"]
        new = [g for g in p["labels"] if before[g] == "none"]
        right = f"specific to {p['study']}"
        p["own_in_background"] = round(len(own) / len(p["labels"]), 4)
        p["specific_right_study_new"] = (
            round(float(np.mean([p["labels"][g] == right for g in new])), 4) if new else None
        )
        inside = set(p["in_right_specific_mask_genes"])
        p["in_right_specific_mask_own"] = (
            round(float(np.mean([g in inside for g in own])), 4) if own else None
        )
        right_new = sum(p["labels"][g] == right for g in new)
        right_own = sum(g in inside for g in own)
        p["placed_right"] = round((right_new + right_own) / len(p["labels"]), 4)
    for key in (k.removeprefix("planted_") for k in BACKGROUND_KEYS):
        values = [p[key] for p in record["programs"] if p[key] is not None]
        record[f"planted_{key}"] = round(float(np.mean(values)), 4) if values else None


def median_share(fidelity: Any) -> float | None:
    """Median share of effect on selected genes over the factors that matter (``None``: none)."""
    shares = fidelity.loc[fidelity["relative_effect"] >= 0.1, "share_selected"].dropna()
    return round(float(shares.median()), 3) if len(shares) else None


SUMMARY_KEYS = (
    "planted_specific_right_study",
    "planted_in_right_specific_mask",
    "planted_in_right_specific_mask_detected",
    "planted_shared",
    "planted_both",
    "data_genes_shared",
    "data_genes_both",
    "data_genes_specific",
    "celltype_accuracy_shared",
    "seconds",
)


#: Written by :func:`against_background` when the run has fold 1 (means over seeds if all have it).
BACKGROUND_KEYS = (
    "planted_own_in_background",
    "planted_specific_right_study_new",
    "planted_in_right_specific_mask_own",
    "planted_placed_right",
)


def summarise_real(fits: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over seeds of one (data, split, fold)'s fits."""
    first = fits[0]
    per_program: dict[str, list[float]] = {}
    in_mask: dict[str, list[float]] = {}
    abs_r: dict[str, list[float]] = {}
    pca_r: dict[str, list[float]] = {}
    on_specific: dict[str, list[bool]] = {}
    for f in fits:
        for p in f["programs"]:
            name = f"{p['name']} in {p['study']}"
            per_program.setdefault(name, []).append(p["specific_right_study"])
            in_mask.setdefault(name, []).append(p["in_right_specific_mask"])
            if "captured_abs_r" in p:
                abs_r.setdefault(name, []).append(p["captured_abs_r"])
                on_specific.setdefault(name, []).append(p["captured_kind"] == "specific")
            if "pca_abs_r" in p:
                pca_r.setdefault(name, []).append(p["pca_abs_r"])
    return {
        "benchmark": "multistudy_real",
        "record": "summary",
        **{k: first[k] for k in ("data", "split", "n_studies", "fold", "max_epochs")},
        "seeds": [f["seed"] for f in fits],
        **{f"{k}_mean": round(float(np.mean([f[k] for f in fits])), 4) for k in SUMMARY_KEYS},
        "specific_right_study_by_program": {
            k: round(float(np.mean(v)), 4) for k, v in per_program.items()
        },
        "in_right_specific_mask_by_program": {
            k: round(float(np.mean(v)), 4) for k, v in in_mask.items() if None not in v
        },
        # per program and seed: the best factor's |r| with the planted activity, and whether
        # that factor is a specific one (see captured())
        "captured_abs_r_by_program": {k: [round(x, 2) for x in v] for k, v in abs_r.items()},
        "captured_on_specific_by_program": {
            k: f"{sum(v)}/{len(v)}" for k, v in on_specific.items()
        },
        "pca_abs_r_by_program": {k: [round(x, 2) for x in v] for k, v in pca_r.items()},
        **{
            f"{k}_mean": round(float(np.mean([f[k] for f in fits])), 4)
            for k in BACKGROUND_KEYS
            if all(f.get(k) is not None for f in fits)
        },
        "checks_ok": f"{sum(f['check_ok'] for f in fits)}/{len(fits)}",
    }


def main_real(args: argparse.Namespace) -> None:
    """``--real``: real counts, random studies, planted study-specific programs."""
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    folds = [4.0] if args.quick and args.folds is None else (args.folds or [1.5, 2.0, 4.0, 8.0])
    folds = sorted(set(folds))  # fold 1 (nothing planted), when asked for, is each seed's baseline
    max_epochs = args.max_epochs or (QUICK_REAL_EPOCHS if args.quick else None)
    meta = {
        "record": "meta",
        "benchmark": "multistudy_real",
        "mode": "quick" if args.quick else "full",
        "command": command_line(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "settings": {
            "data": args.real,
            "split": args.split,
            "n_studies": args.n_studies,
            "seeds": seeds,
            "folds": folds,
            "max_epochs": max_epochs,
            "planted_fraction": args.planted_fraction,
            "n_factors": real.DATASETS[args.real]["n_factors"],
            "n_specific_factors": args.n_specific_factors,
            "module_kwargs": json.loads(args.module_kwargs),
            "train_kwargs": json.loads(args.train_kwargs),
        },
        "sparsevae_source": str(Path(sparsevae.__file__).parent),
        "machine": machine_info(threads=1),
    }
    print(json.dumps(meta), flush=True)
    fits: dict[float, list[dict[str, Any]]] = {fold: [] for fold in folds}
    for seed in seeds:
        background, programs = real.background(args.real, args.n_studies, seed)
        if background is None:
            reason = f"{real.ZEISEL} is absent"
            print(json.dumps({"record": "skipped", "data": args.real, "reason": reason}))
            return
        baseline = None
        for fold in folds:
            record = fit_real(
                args.real,
                background,
                programs,
                args.split,
                seed,
                fold,
                max_epochs,
                args.planted_fraction,
                args.n_specific_factors,
                not args.no_move,
                json.loads(args.module_kwargs),
                json.loads(args.train_kwargs),
            )
            if fold == 1.0:
                baseline = record
            elif baseline is not None:
                against_background(record, baseline)
            fits[fold].append(record)
            print(json.dumps(record), flush=True)
    for fold in folds:
        print(json.dumps(summarise_real(fits[fold])), flush=True)


def main() -> None:
    """Run the fits and print one JSON line each."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one small run (under 2 minutes)")
    parser.add_argument("--seeds", type=int, nargs="*", default=None)
    parser.add_argument("--studies", type=int, nargs="*", default=None)
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--no-cost", action="store_true", help="skip the cost comparison")
    parser.add_argument(
        "--tutorial-size",
        action="store_true",
        help="the multi-study tutorial's simulation (3 studies, 240 genes, 300 cells per study), "
        "seeds 0-11",
    )
    parser.add_argument(
        "--extra-factors",
        type=int,
        nargs="*",
        default=[0],
        help="surplus factors per mask beyond the true numbers, one set of fits per value",
    )
    parser.add_argument(
        "--shared-first-epochs",
        type=int,
        default=None,
        help="epochs with only the shared factors (default: the package's, 0)",
    )
    parser.add_argument(
        "--no-move",
        action="store_true",
        help="train(move_confined=False): leave misassigned factors where the likelihood put them",
    )
    parser.add_argument(
        "--kl-warmup",
        type=int,
        default=None,
        help="epochs of linear KL warm-up (default: the package's)",
    )
    real_mode = parser.add_argument_group("real counts (--real)")
    real_mode.add_argument(
        "--real",
        choices=sorted(real.DATASETS),
        default=None,
        help="real counts with planted study-specific programs instead of the simulation",
    )
    real_mode.add_argument(
        "--split",
        choices=["random"],
        default="random",
        help="how cells are split into studies: at random, stratified by cell type",
    )
    real_mode.add_argument(
        "--folds",
        type=float,
        nargs="*",
        default=None,
        help="effect sizes of the planted programs (default 1.5 2 4 8; --quick: 4)",
    )
    real_mode.add_argument("--n-studies", type=int, default=2, help="studies (2-4)")
    real_mode.add_argument(
        "--planted-fraction",
        type=float,
        default=0.5,
        help="share of the study's cells where the program is active",
    )
    real_mode.add_argument(
        "--n-specific-factors", type=int, default=3, help="specific factors per study"
    )
    real_mode.add_argument(
        "--module-kwargs",
        default="{}",
        help="JSON passed to SparseVAE(...) in either mode, e.g. '{\"spike_gate\": true}'",
    )
    real_mode.add_argument(
        "--train-kwargs",
        default="{}",
        help="JSON passed to model.train(...) in either mode, e.g. "
        "'{\"kl_free_bits_specific\": 0}'",
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("scvi").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    if args.real is not None:
        if not 2 <= args.n_studies <= 4:
            parser.error("--n-studies must be 2-4")
        main_real(args)
        return
    if args.tutorial_size:
        size = {
            "n_genes": 240, "n_shared": 2, "n_specific": 1, "genes_per_program": 30,
            "n_cells_per_study": 300, "n_hidden": 100, "batch_size": 128,
        }  # fmt: skip
        seeds, studies, max_epochs, cost_epochs = list(range(12)), [3], 100, 3
    elif args.quick:
        size = {
            "n_genes": 200, "n_shared": 2, "n_specific": 1, "genes_per_program": 30,
            "n_cells_per_study": 300, "n_hidden": 100, "batch_size": 128,
        }  # fmt: skip
        seeds, studies, max_epochs, cost_epochs = [0], [3], 100, 2
    else:
        size = {
            "n_genes": 400, "n_shared": 3, "n_specific": 1, "genes_per_program": 30,
            "n_cells_per_study": 400, "n_hidden": 100, "batch_size": 128,
        }  # fmt: skip
        seeds, studies, max_epochs, cost_epochs = [0, 1, 2], [2, 3, 5], 100, 3
    seeds = args.seeds if args.seeds is not None else seeds
    studies = args.studies if args.studies is not None else studies
    max_epochs = args.max_epochs or max_epochs
    meta = {
        "record": "meta",
        "benchmark": "multistudy",
        "mode": "quick" if args.quick else "full",
        "command": command_line(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "settings": {
            **size,
            "seeds": seeds,
            "studies": studies,
            "max_epochs": max_epochs,
            "shared_first_epochs": args.shared_first_epochs,
            "extra_factors": args.extra_factors,
            "kl_warmup": args.kl_warmup,
            "move_confined": not args.no_move,
            "module_kwargs": json.loads(args.module_kwargs),
            "train_kwargs": json.loads(args.train_kwargs),
            "cost": not args.no_cost,
        },
        "machine": machine_info(threads=1),
    }
    print(json.dumps(meta), flush=True)
    for n_studies in studies:
        for extra in args.extra_factors:
            for seed in seeds:
                record = fit(
                    n_studies,
                    seed,
                    size,
                    max_epochs,
                    args.shared_first_epochs,
                    extra,
                    args.kl_warmup,
                    not args.no_move,
                    json.loads(args.module_kwargs),
                    json.loads(args.train_kwargs),
                )
                print(json.dumps(record), flush=True)
        if not args.no_cost:
            print(json.dumps(cost(n_studies, size, cost_epochs)), flush=True)


if __name__ == "__main__":
    main()
