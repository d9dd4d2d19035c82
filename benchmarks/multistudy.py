"""Multi-study SparseVAE on simulate_multistudy: mask recovery, cell types and cost, JSON lines.

Usage: ``python benchmarks/multistudy.py [--quick] [--seeds 0 1 2] [--studies 2 3 5]``.

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
from _common import command_line, machine_info

QUIET = {
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
    "logger": False,
}


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
    )
    t0 = time.perf_counter()
    model.train(
        max_epochs=max_epochs,
        batch_size=size["batch_size"],
        n_epochs_shared_first=shared_first,
        n_epochs_kl_warmup=kl_warmup,
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
        "n_epochs_kl_warmup": kl_warmup,
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
        help="epochs with only the shared factors (default: the package's, 20%% of epochs)",
    )
    parser.add_argument(
        "--kl-warmup",
        type=int,
        default=None,
        help="epochs of linear KL warm-up (default: the package's)",
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("scvi").setLevel(logging.ERROR)
    torch.set_num_threads(1)
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
                )
                print(json.dumps(record), flush=True)
        if not args.no_cost:
            print(json.dumps(cost(n_studies, size, cost_epochs)), flush=True)


if __name__ == "__main__":
    main()
