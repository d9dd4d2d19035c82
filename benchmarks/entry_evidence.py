"""How much does the likelihood want each selected mask entry? One JSON line per fit and per pair.

Usage: ``python benchmarks/entry_evidence.py [--data zeisel|pbmc] [--seeds 2] [--model-dir DIR]
[--quick]``.

For every entry ``(j, k)`` that a fitted Sparse VAE selects, the entry is closed (its gate set to
0, the network kept as trained) and the change of gene ``j``'s negative log-likelihood, summed
over the training cells at their posterior-mean factors, is its *evidence*: the nats the fit
loses without it. Against it stands the prior's cost of keeping the entry, the difference of the
discrete spike-and-slab log prior between slab at ``|w_jk|`` and spike at zero,
``lambda1 |w_jk| + log(lambda0 / lambda1) + log((1 - eta_k) / eta_k)``, weighed as the training
objective weighs the mask prior (``N / min(N, prior_cells)``). The *score* is evidence minus
cost: an entry with a negative score is one the likelihood does not pay for.

A ``fit`` line gives, per active factor, the number of selected genes, how many sit near the
selection threshold (``p* < 0.6``), percentiles of the score and how many scores are negative.
A ``pair`` line compares two fits (``tl.factor_stability``): the median anchor-set and
selected-gene Jaccard indices with the package's selection (``p* >= 0.5``) and with the entries
of negative score dropped as well, the question being whether a likelihood-based decision would
give steadier anchors. Closing an entry without refitting the network overstates what the fit
loses, so the scores are an upper bound of the evidence.

Models are fitted at the package defaults (15 factors, counts, NB) from ``scvi.settings.seed``
``first_seed .. first_seed + seeds - 1`` and, with ``--model-dir``, saved there as
``{data}_s{seed}`` (``SparseVAE.save``) or loaded from there when present, so the fits can be
made in separate processes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from _common import TRAINER_KWARGS, import_sparsevae, machine_info, quiet_logs, stdout_to_stderr
from stability import N_FACTORS, load

#: Entries with ``p*`` below this count as near the selection threshold.
BORDERLINE_PSTAR = 0.6


def closing_evidence(model: Any, batch_size: int = 512) -> pd.DataFrame:
    """Per selected entry of the shared mask: evidence, prior cost and score (nats).

    Each pass closes at most one entry per gene (a closed entry changes only its gene's output),
    so the number of passes over the cells is the largest number of factors selecting one gene.

    Parameters
    ----------
    model
        A trained single-study :class:`sparsevae.SparseVAE` with a mask.
    batch_size
        Cells per minibatch.

    Returns
    -------
    One row per selected entry: ``gene`` (index), ``factor``, ``pstar``, ``abs_w``,
    ``evidence``, ``cost`` and ``score``.
    """
    import torch
    from scvi import REGISTRY_KEYS

    module = model.module
    module.eval()
    prior, gate = module.prior, module.decoder.gate
    selected = (prior.p_star >= 0.5).cpu().numpy()
    genes, factors = np.nonzero(selected)
    rank = np.zeros(len(genes), dtype=int)  # the entry's place among its gene's entries
    for j in np.unique(genes):
        rows = np.flatnonzero(genes == j)
        rank[rows] = np.arange(len(rows))
    n_passes = int(rank.max()) + 1 if len(rank) else 0
    evidence = np.zeros(len(genes))
    saved_gate = gate.clone()
    loader = model._make_data_loader(adata=model.adata, batch_size=batch_size, shuffle=False)
    n_cells = 0
    try:
        with torch.inference_mode():
            for tensors in loader:
                inf = dict(module.inference(**module._get_inference_input(tensors)))
                inf["z"] = inf["qz"].loc
                x = tensors[REGISTRY_KEYS.X_KEY].to(inf["z"].device)
                n_cells += x.shape[0]

                def nll() -> np.ndarray:
                    gen = module.generative(**module._get_generative_input(tensors, inf))  # noqa: B023
                    return -gen["px"].log_prob(x).sum(0).double().cpu().numpy()  # noqa: B023

                base = nll()
                for r in range(n_passes):
                    rows = np.flatnonzero(rank == r)
                    gate[genes[rows], factors[rows]] = 0.0
                    evidence[rows] += nll()[genes[rows]] - base[genes[rows]]
                    gate.copy_(saved_gate)
    finally:
        with torch.no_grad():
            gate.copy_(saved_gate)
    eta = prior.eta.cpu().numpy()[factors]
    abs_w = module.decoder.W.detach().abs().cpu().numpy()[genes, factors]
    l0, l1 = float(prior.lambda0), float(prior.lambda1)
    weight = n_cells / module.prior_divisor(n_cells)
    cost = weight * (l1 * abs_w + math.log(l0 / l1) + np.log((1.0 - eta) / eta))
    return pd.DataFrame(
        {
            "gene": genes,
            "factor": factors,
            "pstar": prior.p_star.cpu().numpy()[genes, factors],
            "abs_w": abs_w,
            "evidence": evidence,
            "cost": cost,
            "score": evidence - cost,
        }
    )


def fit_or_load(adata: Any, seed: int, args: argparse.Namespace) -> Any:
    """The model of ``seed``: loaded from ``--model-dir`` when saved there, else fitted."""
    import scvi

    sparsevae = import_sparsevae()
    path = None if args.model_dir is None else Path(args.model_dir) / f"{args.data}_s{seed}"
    if path is not None and (path / "model.pt").exists():
        return sparsevae.SparseVAE.load(str(path))
    scvi.settings.seed = seed
    ad = adata.copy()
    sparsevae.SparseVAE.setup_anndata(ad, layer="counts")
    model = sparsevae.SparseVAE(ad, n_factors=N_FACTORS)
    model.train(max_epochs=args.epochs, **TRAINER_KWARGS)
    if path is not None:
        model.save(str(path), save_anndata=True, overwrite=True)
    return model


def pct(values: Any, q: list[int]) -> list[float] | None:
    """Percentiles ``q`` of ``values``, rounded (``None`` without values)."""
    return np.percentile(values, q).round(1).tolist() if len(values) else None


def fit_record(seed: int, table: pd.DataFrame) -> dict[str, Any]:
    """The ``fit`` line: per factor, selections, borderline entries and scores."""
    per_factor = []
    for k, rows in table.groupby("factor"):
        s = rows["score"].to_numpy()
        per_factor.append(
            {
                "factor": int(k),
                "n_selected": len(rows),
                "n_borderline": int((rows["pstar"] < BORDERLINE_PSTAR).sum()),
                "score_p10_p50_p90": pct(s, [10, 50, 90]),
                "n_negative": int((s < 0).sum()),
            }
        )
    return {
        "record": "fit",
        "seed": seed,
        "n_selected": len(table),
        "n_negative": int((table["score"] < 0).sum()),
        "n_negative_borderline": int(
            ((table["score"] < 0) & (table["pstar"] < BORDERLINE_PSTAR)).sum()
        ),
        "evidence_p5_p50_p95": pct(table["evidence"], [5, 50, 95]),
        "cost_median": round(float(table["cost"].median()), 1) if len(table) else None,
        "factors": per_factor,
    }


def with_results(model: Any, table: pd.DataFrame | None) -> Any:
    """The model's AnnData with results; entries of negative score dropped when given a table."""
    ad = model.adata.copy()
    model.write_results(ad, effects=False)
    if table is not None:
        drop = table[table["score"] < 0]
        pstar = np.array(ad.varm["sparsevae_pstar"], dtype=float)
        pstar[drop["gene"].to_numpy(), drop["factor"].to_numpy()] = 0.0
        ad.varm["sparsevae_pstar"] = pstar
    return ad


def pair_record(seeds: tuple[int, int], fits: dict[str, list[Any]]) -> dict[str, Any]:
    """The ``pair`` line: stability of two fits under the default and the likelihood rule."""
    sparsevae = import_sparsevae()
    record: dict[str, Any] = {"record": "pair", "seeds": list(seeds)}
    for rule, pair in fits.items():
        t = sparsevae.tl.factor_stability(pair).factors
        record[rule] = {
            "median_abs_r": round(float(t["median_abs_r"].median()), 3),
            "median_jaccard_selected": round(float(t["median_jaccard_selected"].median()), 3),
            "median_jaccard_anchors": round(float(t["median_jaccard_anchors"].median()), 3),
        }
    return record


def run(args: argparse.Namespace, out: Any) -> None:
    """Fit or load the models and print the ``meta``, ``fit`` and ``pair`` lines to ``out``."""
    print(
        json.dumps({"record": "meta", "benchmark": "entry_evidence", "argv": sys.argv[1:],
                    **machine_info(args.threads)}),
        file=out, flush=True,
    )  # fmt: skip
    adata, _ = load(args.data, args.n_cells)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    default, likelihood = {}, {}
    for seed in seeds:
        t0 = time.perf_counter()
        model = fit_or_load(adata, seed, args)
        table = closing_evidence(model)
        record = fit_record(seed, table)
        record["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(record), file=out, flush=True)
        default[seed] = with_results(model, None)
        likelihood[seed] = with_results(model, table)
    for a, b in itertools.combinations(seeds, 2):
        fits = {
            "default": [default[a], default[b]],
            "likelihood_rule": [likelihood[a], likelihood[b]],
        }
        print(json.dumps(pair_record((a, b), fits)), file=out, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the probe and print its JSON lines."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=["zeisel", "pbmc"], default="zeisel")
    p.add_argument("--seeds", type=int, default=2, help="random starts (two or more for pairs)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="default: the package's")
    p.add_argument("--model-dir", default=None, help="save fitted models here / load them")
    p.add_argument("--n-cells", type=int, default=None, help="subsample cells")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="pbmc, 200 cells, 2 seeds, 20 epochs")
    args = p.parse_args(argv)
    if args.quick:
        args.data, args.n_cells, args.seeds, args.epochs = "pbmc", 200, 2, 20
    import torch

    torch.set_num_threads(args.threads)
    quiet_logs()
    with stdout_to_stderr() as out:
        run(args, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
