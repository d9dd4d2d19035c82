"""Fit a small SparseVAE with 1 or 2 processes (Lightning DDP on CPU, gloo); used by test_scale.

Usage: ``python ddp_fit.py OUT N_PROCESSES``. Lightning's DDP launcher runs this script once
more for rank 1. Every rank records, after every optimiser step, its mask prior's EM state and
schedule flags, and the largest difference of that state from rank 0's (gathered across
ranks); at the end each rank saves its module state and records to ``OUT_rank{r}.pt`` and rank 0
the factors to ``OUT_z.npy``.
"""

from __future__ import annotations

import os
import sys
import warnings

import lightning.pytorch as pl
import numpy as np
import scvi
import torch

import sparsevae
from sparsevae import SparseVAE


class EMStateCheck(pl.Callback):
    """After every step: the EM state and schedule of this rank against rank 0's."""

    def __init__(self) -> None:
        self.max_diff = 0.0
        self.steps = 0

    def on_train_batch_end(self, trainer, plan, outputs, batch, batch_idx) -> None:
        module = plan.module
        prior = module.prior
        flags = torch.tensor(
            [prior.spike_rate, module.prior_scale, float(module.gate_on), float(plan._em_on)],
            dtype=torch.float64,
        )
        parts = [prior.p_star, prior.eta, module.decoder.W.detach(), module.decoder.gate, flags]
        state = torch.cat([p.reshape(-1).double() for p in parts])
        everyone = trainer.strategy.all_gather(state)  # (world, n)
        if everyone.dim() == 2:
            diff = (everyone - everyone[0]).abs().max().item()
            self.max_diff = max(self.max_diff, diff)
        self.steps += 1


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    out, n_proc = sys.argv[1], int(sys.argv[2])
    adata = sparsevae.datasets.simulate_programs(
        n_cells=400, n_genes=60, n_factors=3, genes_per_program=15, n_shared_genes=0, seed=0
    )
    SparseVAE.setup_anndata(adata)
    scvi.settings.seed = 0
    # The settings this comparison was made for (the exact MAP weight, no gates, no rotation
    # after the warm-up): with the count defaults one of the two fits of these 400 cells and 30
    # epochs keeps a single factor, which would test the fit rather than the processes.
    model = SparseVAE(adata, n_factors=4, n_hidden=16, spike_gate=False, prior_cells=None)
    check = EMStateCheck()
    kwargs = dict(
        accelerator="cpu", devices=n_proc, enable_progress_bar=False, logger=False,
        enable_checkpointing=False, enable_model_summary=False, callbacks=[check],
    )  # fmt: skip
    if n_proc > 1:
        kwargs["strategy"] = "ddp"
    # The same total minibatch: 64 cells in one process, 32 in each of two.
    model.train(max_epochs=30, batch_size=64 // n_proc, rotate_after_warmup=False, **kwargs)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    state = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    saved = {"state": state, "max_diff": check.max_diff, "steps": check.steps}
    if n_proc > 1:
        # The mixture prior is placed (k-means) and refitted (EM) on the cells of every process.
        mixture = SparseVAE(adata, n_factors=3, n_hidden=16, latent_prior="mixture", n_components=3)
        kwargs["callbacks"] = []
        mixture.train(max_epochs=6, batch_size=32, **kwargs)
        prior = mixture.module.mixture_prior
        saved["mixture"] = {k: v.detach().clone() for k, v in prior.state_dict().items()}
        # The count defaults with the rotation after the warm-up, measured on the cells of
        # every process: both ranks rotate alike and keep one EM state.
        rotated = SparseVAE(adata, n_factors=4, n_hidden=16)
        rot_check = EMStateCheck()
        kwargs["callbacks"] = [rot_check]
        rotated.train(max_epochs=10, batch_size=32, **kwargs)
        saved["rotation"] = torch.as_tensor(rotated.warmup_rotation_)
        saved["rotation_max_diff"] = rot_check.max_diff
    torch.save(saved, f"{out}_rank{rank}.pt")
    if rank == 0:
        np.save(f"{out}_z.npy", model.get_latent_representation())


if __name__ == "__main__":
    main()
