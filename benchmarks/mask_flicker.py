"""How steady is a fitted mask? Selection over the last epochs of a fit, and across starts.

Usage: ``python benchmarks/mask_flicker.py [--data zeisel|pbmc] [--seeds 0 1] [--last 15]
[--module-kwargs '{"prior_cells": 100}'] [--train-kwargs '{...}'] [--quick]``.

Each seed is a random start (``scvi.settings.seed``) with the package defaults (15 factors,
counts, the data of ``benchmarks/stability.py``). A Lightning callback keeps the inclusion
probabilities ``p*`` (``model.module.prior.p_star``) at the end of each of the last ``--last``
epochs. One ``fit`` line per seed: for each kept epoch, the median over the final active factors
of the Jaccard index of the factor's selected genes (``p* >= 0.5``) and of its anchors with those
of the last epoch; the number of selected entries and how many have ``p*`` in ``[0.5, 0.6)``.
With two or more seeds, one ``across`` line per further seed against the first: the selected-gene
and anchor Jaccard of the matched active factors (Hungarian assignment on the factors'
|correlation| over the cells) when the selection is read from the last epoch, from a majority
vote over the last 5 epochs, or from the mean ``p*`` over the kept epochs.
Session 22 (Zeisel, seeds 0 and 1): consecutive final epochs matched at 0.71 (selected) and 0.38
(anchors); across the starts the anchor Jaccard was 0.14 read at the last epoch and 0.39 by the
5-epoch vote (``benchmarks/results/experiments/zeisel_mask_flicker_session22.jsonl``).
Since session 23 the package decides gated masks from ``p*`` averaged over 5% of the epochs and
keeps them fixed over the last 5%, so at the defaults the kept epochs of that phase do not move;
to measure the EM's own flicker, as session 22 did, pass ``--train-kwargs
'{"n_epochs_mask_average": 0, "n_epochs_mask_settle": 0}'``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
from _common import TRAINER_KWARGS, import_sparsevae, quiet_logs, stdout_to_stderr
from scipy.optimize import linear_sum_assignment
from stability import N_FACTORS, load


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    union = int((a | b).sum())
    return float((a & b).sum() / union) if union else float("nan")


def _median(values: list[float]) -> float | None:
    values = [v for v in values if not np.isnan(v)]
    return round(float(np.median(values)), 4) if values else None


def fit(adata: Any, seed: int, last: int, args: argparse.Namespace) -> dict[str, Any]:
    """Fit one start and keep ``p*`` at the end of each of the last ``last`` epochs."""
    import scvi
    from lightning.pytorch.callbacks import Callback

    sparsevae = import_sparsevae()
    kept: dict[int, np.ndarray] = {}

    class KeepPstar(Callback):
        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            if trainer.current_epoch >= trainer.max_epochs - last:
                kept[trainer.current_epoch] = pl_module.module.prior.p_star.cpu().numpy().copy()

    scvi.settings.seed = seed
    ad = adata.copy()
    sparsevae.SparseVAE.setup_anndata(ad, layer="counts")
    model = sparsevae.SparseVAE(ad, n_factors=N_FACTORS, **json.loads(args.module_kwargs))
    model.train(
        max_epochs=args.epochs,
        callbacks=[KeepPstar()],
        **json.loads(args.train_kwargs),
        **TRAINER_KWARGS,
    )
    epochs = sorted(kept)
    return {
        "seed": seed,
        "epochs": epochs,
        "pstar": np.stack([kept[e] for e in epochs]),
        "z": model.get_latent_representation(),
    }


def sets(pstar: np.ndarray, sparsevae: Any) -> tuple[np.ndarray, np.ndarray]:
    """Selected genes and anchors of a ``p*`` matrix, by the package's rules."""
    selected = np.asarray(sparsevae.priors.is_selected(pstar))
    return selected, np.asarray(sparsevae.priors.anchors({"shared": selected}))


def within(run: dict[str, Any], sparsevae: Any) -> dict[str, Any]:
    """The ``fit`` record: each kept epoch's selection against the last epoch's."""
    sel_last, anc_last = sets(run["pstar"][-1], sparsevae)
    active = np.where(sel_last.any(axis=0))[0]
    per_epoch = {}
    for e, p in zip(run["epochs"], run["pstar"], strict=True):
        sel, anc = sets(p, sparsevae)
        per_epoch[str(e)] = {
            "jaccard_selected": _median([_jaccard(sel[:, k], sel_last[:, k]) for k in active]),
            "jaccard_anchors": _median([_jaccard(anc[:, k], anc_last[:, k]) for k in active]),
            "anchors": int(anc.sum()),
        }
    p = run["pstar"][-1]
    return {
        "record": "fit",
        "seed": run["seed"],
        "active_factors": len(active),
        "selected_entries": int(sel_last.sum()),
        "entries_pstar_0.5_0.6": int(((p >= 0.5) & (p < 0.6)).sum()),
        "per_epoch": per_epoch,
    }


READINGS = {
    "last_epoch": lambda ps: ps[-1] >= 0.5,
    "vote_last5": lambda ps: (ps[-5:] >= 0.5).mean(axis=0) >= 0.5,
    "mean_pstar": lambda ps: ps.mean(axis=0) >= 0.5,
}


def across(first: dict[str, Any], other: dict[str, Any], sparsevae: Any) -> dict[str, Any]:
    """The ``across`` record: two starts compared under each way of reading the selection."""
    out: dict[str, Any] = {"record": "across", "seeds": [first["seed"], other["seed"]]}
    for name, read in READINGS.items():
        sel = [read(r["pstar"]) for r in (first, other)]
        anc = [np.asarray(sparsevae.priors.anchors({"shared": s})) for s in sel]
        act = [np.where(s.any(axis=0))[0] for s in sel]
        k = first["z"].shape[1]
        corr = np.abs(np.corrcoef(first["z"].T, other["z"].T)[:k, k:])
        rows, cols = linear_sum_assignment(-corr[np.ix_(act[0], act[1])])
        pairs = list(zip(act[0][rows], act[1][cols], strict=True))
        out[name] = {
            "jaccard_selected": _median([_jaccard(sel[0][:, a], sel[1][:, b]) for a, b in pairs]),
            "jaccard_anchors": _median([_jaccard(anc[0][:, a], anc[1][:, b]) for a, b in pairs]),
            "anchors": [int(x.sum()) for x in anc],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    """Fit the starts and print the JSON lines."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=["zeisel", "pbmc"], default="zeisel")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--last", type=int, default=15, help="epochs kept at the end of each fit")
    p.add_argument("--epochs", type=int, default=None, help="default: the package's")
    p.add_argument("--n-cells", type=int, default=None, help="subsample cells")
    p.add_argument("--module-kwargs", default="{}", help="JSON of extra SparseVAE arguments")
    p.add_argument("--train-kwargs", default="{}", help="JSON of extra model.train arguments")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="pbmc, 200 cells, 2 seeds, 12 epochs")
    args = p.parse_args(argv)
    if args.quick:
        args.data, args.n_cells, args.seeds, args.epochs, args.last = "pbmc", 200, [0, 1], 12, 5
    import torch

    torch.set_num_threads(args.threads)
    quiet_logs()
    sparsevae = import_sparsevae()
    with stdout_to_stderr() as out:
        adata, _ = load(args.data, args.n_cells)
        meta = {"record": "meta", "benchmark": "mask_flicker", "argv": sys.argv[1:]}
        print(json.dumps(meta), file=out, flush=True)
        runs = []
        for seed in args.seeds:
            runs.append(fit(adata, seed, args.last, args))
            print(json.dumps(within(runs[-1], sparsevae)), file=out, flush=True)
        for other in runs[1:]:
            print(json.dumps(across(runs[0], other, sparsevae)), file=out, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
