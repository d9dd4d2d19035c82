"""Training from data that stay on disk: a backed ``.h5ad`` (issue 19), one JSON line per run.

Usage: ``python benchmarks/out_of_core.py [--cells 100000 1000000] [--genes 2000]
[--batches 100] [--in-memory] [--write-results] [--dir /tmp/sparsevae_ooc] [--quick]``.

For every size, simulated sparse counts (cell types with their own gene programs, about 8% of
the entries non-zero) are written to ``--dir`` in blocks of cells, so the whole matrix is never
held in memory, not even as a sparse matrix, and the file is reused by later runs. Each run then
happens in a fresh process (so that its peak memory is its own): the file is opened with
``anndata.read_h5ad(path, backed="r")``, registered (``SparseVAE.setup_anndata``, which reads the
counts in blocks of rows for its checks and statistics), and the model trains on minibatches read
from the file by scvi-tools' data loader. ``--batches`` limits the run to that many minibatches
(Lightning's ``limit_train_batches``); the time per cell extrapolates to a full epoch.
``--in-memory`` adds the same run with the counts loaded into memory (sparse) for comparison;
``--write-results`` adds ``model.write_results`` (factors, masks, gene effects) over all cells.

Each line: cells, genes, file size, whether backed, the seconds of registration, model creation,
training and ``write_results``, the cells trained, seconds per 1000 cells, and the peak resident
memory (``ru_maxrss``) after each step. The ``"record": "cost_model"`` line fits peak memory
against the number of cells over the backed runs (bytes per cell).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    TRAINER_KWARGS,
    Emitter,
    command_line,
    import_sparsevae,
    machine_info,
    quiet_logs,
    stdout_to_stderr,
)

N_TYPES = 10
BLOCK = 50_000


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux: ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def simulate_h5ad(path: Path, n_cells: int, n_genes: int, seed: int = 0) -> None:
    """Write simulated counts to ``path`` block by block (never the whole matrix in memory).

    Each cell belongs to one of ``N_TYPES`` types; a type draws its non-zero genes from its own
    gene distribution (a shared Zipf-like profile times a type-specific program), and counts are
    ``1 + Geometric``. About 8% of the entries are non-zero.
    """
    import anndata as ad
    import h5py
    import pandas as pd
    import scipy.sparse as sp
    from anndata.io import sparse_dataset, write_elem

    rng = np.random.default_rng(seed)
    base = 1.0 / np.arange(1, n_genes + 1) ** 0.6
    rng.shuffle(base)
    programs = np.exp(rng.normal(0.0, 1.0, (N_TYPES, n_genes)))
    probs = base * programs
    probs /= probs.sum(1, keepdims=True)
    types = rng.integers(0, N_TYPES, n_cells)
    tmp = path.with_suffix(".part")
    with h5py.File(tmp, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        obs = pd.DataFrame(
            {"cell_type": pd.Categorical([f"type{t}" for t in types])},
            index=pd.Index([f"cell{i}" for i in range(n_cells)]),
        )
        var = pd.DataFrame(index=pd.Index([f"gene{j}" for j in range(n_genes)]))
        write_elem(f, "obs", obs)
        write_elem(f, "var", var)
        for name in ("obsm", "varm", "layers", "uns", "obsp", "varp"):
            write_elem(f, name, {})
        for start in range(0, n_cells, BLOCK):
            stop = min(start + BLOCK, n_cells)
            n = stop - start
            nnz = rng.poisson(0.08 * n_genes, n).clip(1, n_genes)
            rows, cols = [], []
            for t in range(N_TYPES):  # vectorised per type: sample gene indices with its profile
                cells = np.flatnonzero(types[start:stop] == t)
                total = int(nnz[cells].sum())
                genes = rng.choice(n_genes, total, p=probs[t])
                rows.append(np.repeat(cells, nnz[cells]))
                cols.append(genes)
            r, c = np.concatenate(rows), np.concatenate(cols)
            vals = (1 + rng.geometric(0.5, len(r))).astype(np.float32)
            block = sp.csr_matrix((vals, (r, c)), shape=(n, n_genes), dtype=np.float32)
            block.sum_duplicates()
            if start == 0:
                write_elem(f, "X", block)
            else:
                sparse_dataset(f["X"]).append(block)
    tmp.rename(path)
    ad.read_h5ad(path, backed="r").file.close()  # the file opens as an AnnData


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    """One run in this process: register, create, train and optionally write results."""
    import anndata as ad
    import scvi
    import torch

    torch.set_num_threads(args.threads)
    quiet_logs()
    sparsevae = import_sparsevae()
    path = Path(args.child)
    rec: dict[str, Any] = {"record": "run", "backed": not args.child_in_memory}
    rec.update(accelerator=args.accelerator, batch_size=args.batch_size)
    if torch.cuda.is_available():
        rec["gpu"] = torch.cuda.get_device_name(0)
    t0 = time.perf_counter()
    adata = ad.read_h5ad(path, backed=None if args.child_in_memory else "r")
    rec.update(cells=adata.n_obs, genes=adata.n_vars, file_mb=path.stat().st_size / 2**20)
    rec["read_seconds"] = time.perf_counter() - t0
    rec["rss_after_read_mb"] = peak_rss_mb()
    t0 = time.perf_counter()
    sparsevae.SparseVAE.setup_anndata(adata)
    rec["setup_seconds"] = time.perf_counter() - t0
    scvi.settings.seed = 0
    t0 = time.perf_counter()
    model = sparsevae.SparseVAE(adata, n_factors=15)
    rec["init_seconds"] = time.perf_counter() - t0
    rec["rss_after_init_mb"] = peak_rss_mb()
    batch_size = args.batch_size
    kwargs = dict(TRAINER_KWARGS)
    if args.batches:
        kwargs["limit_train_batches"] = args.batches
    t0 = time.perf_counter()
    model.train(max_epochs=1, batch_size=batch_size, accelerator=args.accelerator, **kwargs)
    seconds = time.perf_counter() - t0
    n_trained = min(adata.n_obs, (args.batches or 10**12) * batch_size)
    rec.update(
        train_seconds=seconds,
        cells_trained=n_trained,
        seconds_per_1000_cells=1000 * seconds / n_trained,
        epoch_seconds_extrapolated=seconds * adata.n_obs / n_trained,
        rss_after_train_mb=peak_rss_mb(),
    )
    if torch.cuda.is_available():
        rec["gpu_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if args.write_results:
        t0 = time.perf_counter()
        model.write_results(adata, batch_size=max(batch_size, 1024))
        rec["write_results_seconds"] = time.perf_counter() - t0
        rec["rss_after_write_results_mb"] = peak_rss_mb()
        rec["write_results_finite"] = bool(np.isfinite(adata.obsm["X_sparsevae"]).all())
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--batches", type=int, default=100, help="minibatches per run (0: an epoch)")
    p.add_argument("--in-memory", action="store_true", help="also train from memory")
    p.add_argument("--write-results", action="store_true", help="also time write_results")
    p.add_argument("--dir", default="/tmp/sparsevae_ooc", help="where the h5ad files go")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator (cpu, gpu, auto)")
    p.add_argument("--batch-size", type=int, default=128, help="cells per minibatch")
    p.add_argument("--quick", action="store_true", help="5000 cells x 200 genes, 5 batches")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--note", default=None, help="free text stored in the meta record")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-in-memory", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return 0
    if args.quick:
        args.cells, args.genes, args.batches = [5000], 200, 5
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    with stdout_to_stderr() as out:
        emit = Emitter(out, args.out)
        emit({"record": "meta", "benchmark": "out_of_core", "command": command_line(),
              "mode": "quick" if args.quick else "full",
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "note": args.note,
              "machine": machine_info(args.threads)})  # fmt: skip
        backed_runs = []
        for n in args.cells:
            path = folder / f"sim_{n}x{args.genes}.h5ad"
            if not path.exists():
                t0 = time.perf_counter()
                simulate_h5ad(path, n, args.genes)
                print(f"[out_of_core] wrote {path} in {time.perf_counter() - t0:.0f} s",
                      file=sys.stderr)  # fmt: skip
            modes = [False, True] if args.in_memory else [False]
            for in_memory in modes:
                cmd = [sys.executable, __file__, "--child", str(path), "--genes", str(args.genes),
                       "--batches", str(args.batches), "--threads", str(args.threads),
                       "--accelerator", args.accelerator,
                       "--batch-size", str(args.batch_size)]  # fmt: skip
                cmd += ["--child-in-memory"] if in_memory else []
                cmd += ["--write-results"] if args.write_results else []
                done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
                lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
                if done.returncode != 0 or not lines:
                    emit({"record": "run", "cells": n, "backed": not in_memory,
                          "error": done.stderr[-2000:]})  # fmt: skip
                    continue
                rec = json.loads(lines[-1])
                emit(rec)
                if rec["backed"]:
                    backed_runs.append(rec)
        if len(backed_runs) >= 2:
            n = np.array([r["cells"] for r in backed_runs], dtype=float)
            rss = np.array([r["rss_after_train_mb"] for r in backed_runs]) * 2**20
            slope, intercept = np.polyfit(n, rss, 1)
            emit({"record": "cost_model", "bytes_per_cell": slope,
                  "fixed_mb": intercept / 2**20, "fitted_on_cells": n.tolist()})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
