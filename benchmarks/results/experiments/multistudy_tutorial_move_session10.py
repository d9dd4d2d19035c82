"""The multi-study tutorial's simulation with and without train(move_confined=...), JSON lines.

Usage: ``PYTHONPATH=src python <this file> 1|0 [JSON] <seeds...>`` (1: moves on; JSON: options
of ``SparseVAE``, e.g. ``'{"spike_gate": true, "prior_cells": 200}'``, session 15). See README.md.
"""

import json
import logging
import sys
import warnings

import scvi
import torch

import sparsevae

warnings.filterwarnings("ignore")
torch.set_num_threads(1)
for name in ("sparsevae", "lightning", "lightning.pytorch", "scvi"):
    logging.getLogger(name).setLevel(logging.ERROR)
QUIET = {
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
    "logger": False,
}
move = sys.argv[1] == "1"
rest = sys.argv[2:]
options = json.loads(rest.pop(0)) if rest and rest[0].startswith("{") else {}
for seed in [int(x) for x in rest]:
    ad = sparsevae.datasets.simulate_multistudy(
        n_studies=3,
        n_genes=240,
        n_shared=2,
        n_specific=1,
        genes_per_program=30,
        n_cells_per_study=300,
        seed=seed,
    )
    scvi.settings.seed = seed
    sparsevae.SparseVAE.setup_anndata(ad, study_key="study")
    m = sparsevae.SparseVAE(ad, n_factors=3, n_specific_factors=2, **options)
    m.train(max_epochs=100, move_confined=move, **QUIET)
    f1 = {}
    for kind in m.mask_kinds:
        key = "true_mask_shared" if kind == "shared" else f"true_mask_{kind}"
        if key in ad.varm:
            sel = m.get_inclusion_probabilities(kind) >= 0.5
            f1[kind] = round(float(sparsevae.tl.mask_f1(sel, ad.varm[key])["f1"].mean()), 3)
    label = sparsevae.tl.shared_specific_genes(m).genes["label"]
    truth = ad.var["truth"]
    program = truth != "none"
    acc = float((label[program].to_numpy() == truth[program].to_numpy()).mean())
    checks = sparsevae.tl.check_shared_specific(m)
    record = {
        "seed": seed,
        "move": move,
        "moved": m.moved_factors_,
        "f1": f1,
        "label_acc": round(acc, 3),
        "ok": checks.ok,
        "problems": checks.problems,
    }
    print(json.dumps(record), flush=True)
