"""Identifiability on the paper's simulation (Moran et al. 2022, section 5.1): DCI versus rho.

Data: :func:`sparsevae.datasets.simulate_moran2022` (7 features from 2 factors with correlation
``rho``), ``--n-train`` cells to train on and ``--n-test`` held-out cells drawn from the same
simulation. Methods, all with 2 latent codes, hidden width 100, the same epochs and minibatches
of 128:

``sparsevae``
    :class:`sparsevae.SparseVAE` (Gaussian likelihood, Spike-and-Slab Lasso mask).
``sparsevae_corr``
    The same with the learned factor correlation (``latent_prior="correlated"``).
``sparsevae_sched`` / ``sparsevae_corr_sched``
    ``sparsevae`` / ``sparsevae_corr`` trained with the prior schedule that count likelihoods
    use by default (``n_epochs_prior_warmup`` 20% and ``n_epochs_lambda0_ramp`` 40% of the
    epochs; the Gaussian default is the paper's full prior from the first step).
``vae``
    The same model without a mask (``mask=None``).
``beta_vae``
    ``mask=None`` with ``kl_weight=2``.
``vsc``
    Variational Sparse Coding (Tonolini et al. 2020), ``benchmarks/_vsc.py``.

Metrics of each fit (one JSON line, ``"record": "fit"``):

- DCI disentanglement, completeness and informativeness (:func:`sparsevae.tl.dci`: gradient
  boosted trees per true factor on the training cells' posterior-mean codes, 20% of them held out
  for informativeness);
- held-out MSE of the reconstruction (posterior-mean code, decoded mean) on the test cells, in
  the data's units (``heldout_mse``) and per standardised feature (``heldout_mse_std``);
- mask recovery: codes are matched to the true factors by the Hungarian assignment on
  ``|Spearman|``; the dependency of feature ``j`` on code ``k`` is the mean absolute decoder
  Jacobian on the standardised scale times the code's sd, normalised over codes per feature;
  ``mask_auroc`` is its AUROC against the true 7 x 2 mask (any method). For ``sparsevae`` also
  ``mask_pstar_accuracy`` (share of the 14 entries where ``p* > 0.5`` matches the truth),
  ``mask_pstar_exact`` and ``mask_W_auroc`` (AUROC of the row-normalised ``|W|``).

A fit whose codes are all constant (posterior collapse) is flagged ``"collapsed": true`` and
scored D = C = I = 0 and mask AUROC 0.5 (it carries no information), not dropped.

At the end one ``"record": "summary"`` line per method and rho: mean and sd over seeds.

Examples
--------
Quick check (under two minutes)::

    PYTHONPATH=src python benchmarks/identifiability.py --quick

Full run (5 rhos x 25 seeds x 4 methods; hours on 2 CPU cores)::

    PYTHONPATH=src python benchmarks/identifiability.py --seeds 25 \
        --out benchmarks/results/identifiability.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    TRAINER_KWARGS,
    Emitter,
    add_mean_sd,
    command_line,
    guarded_fit,
    import_sparsevae,
    machine_info,
    posterior_means,
    quiet_logs,
    stdout_to_stderr,
)

METHODS = (
    "sparsevae",
    "sparsevae_corr",
    "sparsevae_sched",
    "sparsevae_corr_sched",
    "vae",
    "beta_vae",
    "vsc",
)
RHOS = (0.0, 0.2, 0.4, 0.6, 0.8)
N_LATENT = 2
N_HIDDEN = 100
BATCH_SIZE = 128


def match_codes(z: np.ndarray, factors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Match codes to true factors by the Hungarian assignment on ``|Spearman|``.

    Returns
    -------
    ``(order, corr)``: code index matched to each factor and the matched ``|Spearman|``.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.stats import spearmanr

    k, m = z.shape[1], factors.shape[1]
    C = np.zeros((k, m))
    for a in range(k):
        for b in range(m):
            r = spearmanr(z[:, a], factors[:, b])[0]
            C[a, b] = 0.0 if not np.isfinite(r) else abs(r)
    rows, cols = linear_sum_assignment(-C)
    order = np.empty(m, dtype=int)
    order[cols] = rows
    return order, C[order, np.arange(m)]


def jacobian_dependency(decode: Any, z: np.ndarray) -> np.ndarray:
    """Mean absolute Jacobian of the decoder, scaled by each code's sd: ``(n_features, n_codes)``.

    Parameters
    ----------
    decode
        Function from a ``(n, K)`` tensor of codes to a ``(n, G)`` tensor (standardised scale).
    z
        Codes at which to evaluate it.
    """
    import torch

    zt = torch.as_tensor(z, dtype=torch.float32).requires_grad_(True)
    out = decode(zt)
    rows = []
    for j in range(out.shape[1]):
        (grad,) = torch.autograd.grad(out[:, j].sum(), zt, retain_graph=True)
        rows.append(grad.abs().mean(0).detach().numpy())
    return np.stack(rows) * z.std(0)[None, :]


def mask_scores(dependency: np.ndarray, true_mask: np.ndarray, order: np.ndarray) -> float:
    """AUROC of the row-normalised dependency (codes in matched order) against the true mask."""
    from sklearn.metrics import roc_auc_score

    d = np.abs(dependency[:, order])
    d = d / np.clip(d.sum(1, keepdims=True), 1e-12, None)
    return float(roc_auc_score(true_mask.ravel() > 0, d.ravel()))


def fit_scvi_style(
    method: str, train: Any, test: Any, args: argparse.Namespace, seed: int
) -> dict[str, Any]:
    """Fit a SparseVAE-family model and return codes, reconstructions and mask information."""
    import scvi
    import torch

    sparsevae = import_sparsevae()
    scvi.settings.seed = seed
    train = train.copy()
    test = test.copy()
    sparsevae.SparseVAE.setup_anndata(train)
    kwargs: dict[str, Any] = {"likelihood": "gaussian", "n_hidden": N_HIDDEN}
    if method.startswith("sparsevae_corr"):
        kwargs["latent_prior"] = "correlated"
    elif not method.startswith("sparsevae"):
        kwargs["mask"] = None
    schedule: dict[str, Any] = {}
    if method.endswith("_sched"):
        schedule = {
            "n_epochs_prior_warmup": round(0.2 * args.epochs),
            "n_epochs_lambda0_ramp": round(0.4 * args.epochs),
        }
    if method == "beta_vae":
        kwargs["kl_weight"] = args.beta
    if method.startswith("sparsevae"):
        kwargs.update(json.loads(args.module_kwargs))
        schedule.update(json.loads(args.train_kwargs))
    model = sparsevae.SparseVAE(train, n_factors=N_LATENT, **kwargs)
    t0 = time.perf_counter()
    model.train(
        max_epochs=args.epochs,
        batch_size=BATCH_SIZE,
        accelerator="cpu",
        **schedule,
        **TRAINER_KWARGS,
    )
    seconds = time.perf_counter() - t0
    z_train, _, _ = posterior_means(model, train)
    _, x_hat, _ = posterior_means(model, test)
    module = model.module

    def decode(z: torch.Tensor) -> torch.Tensor:
        return module.decoder(z)[..., 0]

    out: dict[str, Any] = {
        "z_train": z_train,
        "x_hat_test": x_hat,
        "dependency": jacobian_dependency(decode, z_train[:500]),
        "train_seconds": seconds,
    }
    if method.startswith("sparsevae"):
        out["pstar"] = model.get_inclusion_probabilities().to_numpy()
        out["W"] = model.get_mask().to_numpy()
    return out


def fit_vsc(train: Any, test: Any, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Fit the VSC baseline."""
    import torch
    from _vsc import VSC

    torch.manual_seed(seed)
    x = np.asarray(train.X)
    model = VSC(x.shape[1], N_LATENT, n_hidden=N_HIDDEN, alpha=args.vsc_alpha)
    t0 = time.perf_counter()
    model.fit(x, epochs=args.epochs, batch_size=BATCH_SIZE, lr=args.vsc_lr, seed=seed)
    seconds = time.perf_counter() - t0
    z_train = model.transform(x)
    return {
        "z_train": z_train,
        "x_hat_test": model.reconstruct(np.asarray(test.X)),
        "dependency": jacobian_dependency(model.decode_standardised, z_train[:500]),
        "train_seconds": seconds,
    }


def run_one(method: str, rho: float, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Simulate, fit one method and score it."""
    sparsevae = import_sparsevae()
    n = args.n_train + args.n_test
    adata = sparsevae.datasets.simulate_moran2022(n_cells=n, rho=rho, seed=seed)
    train, test = adata[: args.n_train].copy(), adata[args.n_train :].copy()
    if method == "vsc":
        fit = fit_vsc(train, test, args, seed)
    else:
        fit = fit_scvi_style(method, train, test, args, seed)
    factors = train.obsm["true_factors"]
    true_mask = adata.varm["true_mask"]
    z = fit["z_train"]
    record: dict[str, Any] = {"record": "fit", "method": method, "rho": rho, "seed": seed}
    if not np.all(np.isfinite(z)):
        record["error"] = "non-finite codes"
        return record
    x_test = np.asarray(test.X, dtype=np.float64)
    x_hat = np.asarray(fit["x_hat_test"], dtype=np.float64)
    sd = np.asarray(train.X, dtype=np.float64).std(0)
    record.update(
        heldout_mse=float(np.mean((x_hat - x_test) ** 2)),
        heldout_mse_std=float(np.mean(((x_hat - x_test) / sd) ** 2)),
        train_seconds=fit["train_seconds"],
    )
    # Posterior collapse: every code constant. DCI is undefined; score it as 0 (no information,
    # no credit) and flag it rather than dropping the fit.
    collapsed = bool(np.all(z.std(0) < 1e-6 * max(1.0, float(np.abs(z).max()))))
    record["collapsed"] = collapsed
    if collapsed:
        record.update(
            dci_disentanglement=0.0,
            dci_completeness=0.0,
            dci_informativeness=0.0,
            mask_auroc=0.5,
            recovered=False,
        )
        order = np.arange(N_LATENT)
    else:
        scores = sparsevae.tl.dci(z, factors, seed=seed)
        order, corr = match_codes(z, factors)
        record.update(
            dci_disentanglement=scores["disentanglement"],
            dci_completeness=scores["completeness"],
            dci_informativeness=scores["informativeness"],
            importance_matrix=scores["importance_matrix"],
            spearman_matched=corr,
            # every true factor found: |Spearman| >= RECOVERED_SPEARMAN with its matched code
            recovered=bool(np.min(np.abs(corr)) >= RECOVERED_SPEARMAN),
            mask_auroc=mask_scores(fit["dependency"], true_mask, order),
        )
    if "pstar" in fit:
        P = fit["pstar"][:, order]
        sel = P > 0.5
        record.update(
            pstar=P,
            mask_pstar_accuracy=float(np.mean(sel == (true_mask > 0))),
            mask_pstar_exact=bool(np.all(sel == (true_mask > 0))),
            mask_W_auroc=mask_scores(np.abs(fit["W"]), true_mask, order),
        )
    return record


#: A fit recovers the truth when each true factor has |Spearman| >= this with its matched code.
RECOVERED_SPEARMAN = 0.9

SUMMARY_KEYS = (
    "dci_disentanglement",
    "dci_completeness",
    "dci_informativeness",
    "heldout_mse",
    "heldout_mse_std",
    "mask_auroc",
    "mask_pstar_accuracy",
    "train_seconds",
)


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sd over seeds per method and rho."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["method"], r["rho"])].append(r)
    out = []
    for (method, rho), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        ok = [r for r in rs if "error" not in r]
        summary: dict[str, Any] = {
            "record": "summary",
            "method": method,
            "rho": rho,
            "n_seeds": len(ok),
            "n_failed": len(rs) - len(ok),
            "n_collapsed": sum(bool(r.get("collapsed")) for r in ok),
            "recovered_share": (
                sum(bool(r.get("recovered")) for r in ok) / len(ok) if ok else None
            ),
        }
        add_mean_sd(summary, ok, SUMMARY_KEYS)
        out.append(summary)
    return out


def run_mode(args: argparse.Namespace) -> str:
    """``quick``, ``full`` (the paper's protocol: 5 rhos, 25 seeds, 300 epochs) or ``reduced``."""
    if args.quick:
        return "quick"
    full = (
        args.seeds >= 25
        and set(RHOS) <= set(args.rhos)
        and args.epochs >= 300
        and set(args.methods) == set(METHODS)
    )
    return "full" if full else "reduced"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (mode-dependent defaults filled in)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small run, under two minutes")
    p.add_argument("--rhos", type=float, nargs="+", default=None, help="factor correlations")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 25; quick 1)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 300; quick 40)")
    p.add_argument("--n-train", type=int, default=None, help="training cells (default 1000)")
    p.add_argument("--n-test", type=int, default=None, help="held-out cells (default 200)")
    p.add_argument("--beta", type=float, default=2.0, help="KL weight of the beta-VAE")
    p.add_argument("--vsc-alpha", type=float, default=0.5, help="VSC prior slab probability")
    p.add_argument("--vsc-lr", type=float, default=1e-3, help="VSC Adam learning rate")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--note", default=None, help="free text stored in the meta record")
    p.add_argument(
        "--module-kwargs", default="{}", help="JSON passed to SparseVAE(...) for sparsevae*"
    )
    p.add_argument(
        "--train-kwargs",
        default="{}",
        help="JSON passed to train(...) for sparsevae* (over the *_sched schedule)",
    )
    args = p.parse_args(argv)
    q = args.quick
    if args.rhos is None:
        args.rhos = [0.0, 0.8] if q else list(RHOS)
    if args.seeds is None:
        args.seeds = 1 if q else 25
    if args.epochs is None:
        args.epochs = 40 if q else 300
    if args.n_train is None:
        args.n_train = 500 if q else 1000
    if args.n_test is None:
        args.n_test = 100 if q else 200
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every (rho, seed, method) fit and print one JSON line each, then the summaries."""
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    with stdout_to_stderr() as real_stdout:
        quiet_logs()
        emit = Emitter(real_stdout, args.out)
        meta = {
            "record": "meta",
            "benchmark": "identifiability",
            "mode": run_mode(args),
            "command": command_line(),
            "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
            "machine": machine_info(args.threads),
            "package_path": str(Path(import_sparsevae().__file__).parent),
            "note": args.note,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        emit(meta)
        records = []
        status = 0
        # seeds outermost: a run stopped early still covers every rho
        for seed in range(args.seeds):
            for rho in args.rhos:
                for method in args.methods:
                    rec, ok = guarded_fit(
                        "identifiability",
                        lambda m=method, r=rho, sd=seed: run_one(m, r, sd, args),
                        {"method": method, "rho": rho, "seed": seed},
                        emit,
                        lambda r: f"D={r.get('dci_disentanglement', float('nan')):.3f}",
                    )
                    records.append(rec)
                    status = status if ok else 1
        for s in summarise(records):
            s["benchmark"] = "identifiability"
            emit(s)
    return status


if __name__ == "__main__":
    sys.exit(main())
