"""The iVAE's simulation: identifiability from a conditional prior p(z | u), one JSON line per fit.

Usage: ``python benchmarks/ivae.py [--quick] [--seeds 0 1 2 3 4] [--max-epochs N]``.

Data: :func:`sparsevae.datasets.simulate_ivae` (5 non-stationary Gaussian sources whose means
and variances change across 40 segments, mixed by a random invertible 3-layer leaky-ReLU
network into 20 features, plus noise); the segment is ``u``. 300 epochs (the package default
for 4000 cells is 75; the iVAE paper trains to convergence; ``--max-epochs`` changes it).
Methods, all Gaussian likelihood, 5 factors, package defaults otherwise: ``vae``
(``mask=None``), ``sparse`` (the Sparse VAE), ``ivae`` (``mask=None,
latent_prior="conditional"``), ``sparse_conditional`` (both). Score:
:func:`sparsevae.tl.mcc` (mean |Pearson r| of the posterior means with the true sources after
the best one-to-one matching). Target (issue 18): iVAE MCC >= 0.9 and at least 0.2 above the
VAE's. The last lines are one summary per method (mean and sd over seeds).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import scvi
import torch
from _common import TRAINER_KWARGS, command_line, machine_info, mean_std, quiet_logs

import sparsevae

METHODS: dict[str, dict[str, Any]] = {
    "vae": {"mask": None},
    "sparse": {"mask": "ssl"},
    "ivae": {"mask": None, "latent_prior": "conditional"},
    "sparse_conditional": {"mask": "ssl", "latent_prior": "conditional"},
}
QUICK = {"n_per_segment": 50, "n_segments": 20, "max_epochs": 40}


def fit(
    method: str,
    seed: int,
    n_per_segment: int,
    n_segments: int,
    max_epochs: int | None,
    encode_auxiliary: bool = False,
) -> dict[str, Any]:
    """Fit one method on one simulated data set and score it."""
    ad = sparsevae.datasets.simulate_ivae(
        n_per_segment=n_per_segment, n_segments=n_segments, seed=seed
    )
    kwargs = dict(METHODS[method])
    conditional = kwargs.get("latent_prior") == "conditional"
    if conditional and encode_auxiliary:
        kwargs["encode_auxiliary"] = True
    sparsevae.SparseVAE.setup_anndata(ad, auxiliary_key="segment" if conditional else None)
    scvi.settings.seed = seed
    model = sparsevae.SparseVAE(ad, n_factors=5, likelihood="gaussian", **kwargs)
    t0 = time.perf_counter()
    model.train(max_epochs=max_epochs, **TRAINER_KWARGS)
    seconds = time.perf_counter() - t0
    z = model.get_latent_representation()
    score = sparsevae.tl.mcc(z, ad.obsm["true_factors"])
    return {
        "benchmark": "ivae",
        "record": "fit",
        "method": method,
        "encode_auxiliary": bool(conditional and encode_auxiliary),
        "seed": seed,
        "n_cells": ad.n_obs,
        "n_segments": n_segments,
        "n_epochs": int(model.trainer.current_epoch),
        "mcc": round(score["mcc"], 4),
        "mcc_per_factor": [round(float(v), 4) for v in score["per_factor"]],
        "mcc_spearman": round(sparsevae.tl.mcc(z, ad.obsm["true_factors"], "spearman")["mcc"], 4),
        "elbo": round(float(model.get_elbo()), 3),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    """Run the benchmark and print one JSON line per fit, then one per method."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small data, 2 seeds (< 2 minutes)")
    parser.add_argument("--seeds", type=int, nargs="*", default=None)
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument(
        "--encode-auxiliary", action="store_true", help="conditional methods: q(z | x, u)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    quiet_logs()
    seeds = args.seeds if args.seeds is not None else ([0, 1] if args.quick else [0, 1, 2, 3, 4])
    size = QUICK if args.quick else {"n_per_segment": 100, "n_segments": 40, "max_epochs": 300}
    max_epochs = args.max_epochs or size["max_epochs"]
    meta = {
        "record": "meta",
        "benchmark": "ivae",
        "mode": "quick" if args.quick else "full",
        "command": command_line(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "settings": {
            **size,
            "max_epochs": max_epochs,
            "seeds": seeds,
            "methods": args.methods,
            "encode_auxiliary": args.encode_auxiliary,
        },
        "machine": machine_info(threads=1),
    }
    print(json.dumps(meta), flush=True)
    records: dict[str, list[dict[str, Any]]] = {m: [] for m in args.methods}
    for seed in seeds:
        for method in args.methods:
            rec = fit(
                method, seed, size["n_per_segment"], size["n_segments"], max_epochs,
                args.encode_auxiliary,
            )  # fmt: skip
            records[method].append(rec)
            print(json.dumps(rec), flush=True)
    for method, recs in records.items():
        mean, sd = mean_std([r["mcc"] for r in recs])
        print(
            json.dumps(
                {
                    "benchmark": "ivae",
                    "record": "summary",
                    "method": method,
                    "seeds": [r["seed"] for r in recs],
                    "mcc_mean": round(mean, 4),
                    "mcc_sd": round(sd, 4),
                    "mcc_spearman_mean": round(
                        float(np.mean([r["mcc_spearman"] for r in recs])), 4
                    ),
                    "seconds_mean": round(float(np.mean([r["seconds"] for r in recs])), 1),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
