"""Scale: training from data on disk (backed AnnData) and passes over the cells in batches."""

from __future__ import annotations

import os

import anndata
import numpy as np
import scvi
import torch

from sparsevae import SparseVAE

from .conftest import QUIET, small_counts


def test_trains_from_a_backed_h5ad_without_loading_it(tmp_path):
    adata = small_counts(n_cells=150)
    adata.write_h5ad(tmp_path / "counts.h5ad")
    backed = anndata.read_h5ad(tmp_path / "counts.h5ad", backed="r")
    SparseVAE.setup_anndata(backed)
    scvi.settings.seed = 0
    model = SparseVAE(backed, n_factors=2, n_hidden=8)
    model.train(max_epochs=3, **QUIET)
    assert backed.isbacked  # the counts were never loaded into the AnnData
    model.write_results(backed, batch_size=32)
    z = backed.obsm["X_sparsevae"]
    assert z.shape == (150, 2) and np.isfinite(z).all()
    assert np.isfinite(backed.varm["sparsevae_effect"]).all()
    # The same cells in memory give the same factors and effects from the trained network.
    memory = backed.to_memory()
    np.testing.assert_allclose(model.get_latent_representation(memory), z, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        model.get_gene_effects(memory, batch_size=7).to_numpy(),
        backed.varm["sparsevae_effect"],
        rtol=1e-4,
        atol=1e-6,
    )


def _ddp_fit(tmp_path, n_proc: int) -> str:
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "scripts" / "ddp_fit.py"
    out = str(tmp_path / f"fit{n_proc}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, str(script), out, str(n_proc)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_two_ddp_processes_keep_one_em_state_and_agree_with_one_process(tmp_path):
    # Lightning DDP on CPU (gloo), 2 processes x 32 cells per step against 1 process x 64.
    from scipy.optimize import linear_sum_assignment

    two = _ddp_fit(tmp_path, 2)
    one = _ddp_fit(tmp_path, 1)
    rank0 = torch.load(f"{two}_rank0.pt")
    rank1 = torch.load(f"{two}_rank1.pt")
    single = torch.load(f"{one}_rank0.pt")
    # After every optimiser step, p*, eta, W, the gates and the schedule's flags were identical.
    assert rank0["steps"] == rank1["steps"] == single["steps"] > 0
    assert rank0["max_diff"] == 0.0 and rank1["max_diff"] == 0.0
    for key in ("prior.p_star", "prior.eta", "decoder.W", "decoder.gate"):
        assert torch.equal(rank0["state"][key], rank1["state"][key]), key
    # The mixture prior, placed and refitted on the cells of both processes, is the same in both.
    assert rank0["mixture"].keys() == rank1["mixture"].keys()
    for key, value in rank0["mixture"].items():
        torch.testing.assert_close(value, rank1["mixture"][key], rtol=0, atol=0)
    # The rotation after the warm-up: measured on the cells of both processes, the same in both.
    assert rank0["rotation_max_diff"] == 0.0 and rank1["rotation_max_diff"] == 0.0
    torch.testing.assert_close(rank0["rotation"], rank1["rotation"], rtol=0, atol=0)
    assert not torch.allclose(rank0["rotation"], torch.eye(4, dtype=rank0["rotation"].dtype))
    # Against one process with the same seed and total minibatch: the same active factors
    # (matched by correlation), selecting the same genes.
    sel2 = (rank0["state"]["prior.p_star"] >= 0.5).numpy()
    sel1 = (single["state"]["prior.p_star"] >= 0.5).numpy()
    act2, act1 = np.flatnonzero(sel2.any(0)), np.flatnonzero(sel1.any(0))
    assert len(act2) == len(act1) >= 2
    z2, z1 = np.load(f"{two}_z.npy")[:, act2], np.load(f"{one}_z.npy")[:, act1]
    corr = np.abs(np.corrcoef(z2.T, z1.T)[: len(act2), len(act2) :])
    rows, cols = linear_sum_assignment(-corr)
    for i, j in zip(rows, cols, strict=True):
        assert corr[i, j] >= 0.9
        a, b = sel2[:, act2[i]], sel1[:, act1[j]]
        assert (a & b).sum() / (a | b).sum() >= 0.8


def test_bf16_autocast_gives_the_loss_of_fp32_and_trains():
    # Mixed precision: Lightning's precision="bf16-mixed" reaches the model through train().
    adata = small_counts(n_cells=150)
    SparseVAE.setup_anndata(adata)
    scvi.settings.seed = 0
    model = SparseVAE(adata, n_factors=2, n_hidden=8)
    model.train(max_epochs=3, precision="bf16-mixed", **QUIET)
    assert np.isfinite(model.get_latent_representation()).all()
    model.module.eval()
    batch = next(iter(model._make_data_loader(adata=adata, batch_size=150)))
    with torch.no_grad():
        torch.manual_seed(0)
        full = float(model.module(batch)[2].loss)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.manual_seed(0)
            half = float(model.module(batch)[2].loss)
    assert abs(half / full - 1) < 0.01


def test_backed_cells_come_back_in_the_order_asked(tmp_path):
    # scvi-tools reads a backed file's rows in sorted order; the factors must still follow the
    # order of `indices`, and passes that cannot reorder refuse unsorted cells clearly.
    import pytest

    adata = small_counts(n_cells=150)
    adata.write_h5ad(tmp_path / "counts.h5ad")
    SparseVAE.setup_anndata(adata)
    model = SparseVAE(adata, n_factors=2, n_hidden=8)
    model.train(max_epochs=2, **QUIET)
    backed = anndata.read_h5ad(tmp_path / "counts.h5ad", backed="r")
    idx = [5, 3, 100, 1]
    np.testing.assert_allclose(
        model.get_latent_representation(backed, indices=idx),
        model.get_latent_representation(adata)[idx],
        rtol=1e-5,
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="increasing order"):
        model.get_normalized_expression(backed, indices=idx)
