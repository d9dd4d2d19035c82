"""Speed and memory benchmark of the Sparse VAE at the paper's Zeisel shape.

The shape is 3005 cells x 558 genes, 15 factors, hidden width 100, 2 decoder hidden layers and
minibatches of 512 cells, on simulated negative binomial counts
(:func:`sparsevae.datasets.simulate_programs`). Every configuration runs in its own subprocess
(this script re-invoked with ``--only NAME``), so that its peak resident memory
(``ru_maxrss``) is its own. The configurations are:

``matmul_peak``
    GFLOP/s of a 2048 x 2048 fp32 matmul: the machine's practical arithmetic peak.
``sparsevae``
    :meth:`sparsevae.SparseVAE.train` (Lightning, full training step with the EM update).
``torch_loop``
    The reference algorithm: a hand-written torch training loop (encoder, decoder, NB loss,
    backward, Adam, EM step) whose decoder is evaluated with a Python loop over genes
    (:meth:`sparsevae.nn.MaskedDecoder.forward_loop`). It is slow, so only a few minibatches
    are timed and the epoch time is extrapolated from the time per cell.
``torch_batched``
    The same hand-written loop with the batched decoder
    (:meth:`sparsevae.nn.MaskedDecoder.forward`): the ratio to ``torch_loop`` isolates the
    decoder algorithm. Also times the decoder's forward and backward pass alone.
``scvi``
    :class:`scvi.model.SCVI` at the same shape (``n_latent=15``, ``n_hidden=100``, NB
    likelihood, scvi-tools' default single hidden layer).

Each result is printed to stdout as one JSON object per line; ratios between configurations
measured in the same run and an estimate of the arithmetic floor of the decoder follow. Logs go
to stderr. ``s_per_epoch`` is the median epoch time without the first epoch for the Lightning
runs (timed by a callback), the median over full epochs for ``torch_batched`` and the time per
cell times the number of cells for ``torch_loop`` (``"extrapolated": true``). Memory is the
child's peak RSS (``ru_maxrss``), the peak just before the measured work and, on GPU,
``torch.cuda.max_memory_allocated``. Every line carries the machine description, including the
1-minute load average: timings taken on a busy machine are not comparable.

Decoder FLOPs per epoch (forward and backward, backward counted as twice the forward) are
``3 * 2 * n_cells * n_genes * (K * H + (n_layers - 1) * H * H + H)``.

Scaling (``--scaling``)
-----------------------
Seconds per epoch and memory of ``sparsevae`` (:class:`sparsevae.SparseVAE`, NB), ``scvi``
(:class:`scvi.model.SCVI`) and ``linear_scvi`` (:class:`scvi.model.LinearSCVI`) on simulated
counts as the number of cells (1k to 100k, 558 genes), of genes (500 to 5000, 3000 cells) and the
hidden width (50 to 200; SparseVAE only) grow; minibatches of 128, 15 factors. Each configuration
trains two epochs of at most ``--scaling-batches`` minibatches (Lightning's
``limit_train_batches``); ``s_per_epoch`` is the second epoch's time per minibatch times the
number of minibatches of a full epoch (``"extrapolated": true`` when fewer than all were run);
``cpu_s_per_epoch`` is the same in process CPU time which, with ``--threads 1``, does not depend on
how busy a shared machine is (the cost model is then fitted on it).
Memory: ``train_rss_increase_mib`` is the largest resident set size sampled every 5 ms during
training minus the size just before it (so the simulation's own peak does not hide it).

Cost model, checked by a least-squares fit printed as ``"name": "cost_model"`` lines:

- SparseVAE: every gene runs the shared network on its own masked factors, so an epoch costs
  ``t = a N + b N G (K H + (n_layers - 1) H^2 + H)``: linear in cells and genes, quadratic in
  the hidden width once ``H >> K``. Memory of the saved activations grows as
  ``batch x G x H x n_layers`` (no dependence on ``N``) until activation checkpointing caps it.
- SCVI / LinearSCVI: ``t = a N + b N G H`` (the encoder's and decoder's ``G x H`` layers): linear
  in cells and genes; LinearSCVI's decoder is ``K x G``.

Examples
--------
Quick check (under two minutes)::

    PYTHONPATH=src python benchmarks/speed.py --quick

Scaling grid (quick: a few small shapes)::

    PYTHONPATH=src python benchmarks/speed.py --scaling --threads 1 \
        --out benchmarks/results/speed_scaling.jsonl

Full run on two CPU threads::

    PYTHONPATH=src python benchmarks/speed.py --threads 2

One configuration only::

    PYTHONPATH=src python benchmarks/speed.py --only sparsevae --epochs 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from _common import TRAINER_KWARGS, cpu_model, package_version, quiet_logs, stdout_to_stderr

N_CELLS = 3005
N_GENES = 558
N_FACTORS = 15
N_HIDDEN = 100
N_LAYERS = 2
BATCH_SIZE = 512
GENES_PER_PROGRAM = 30
LR = 1e-2
MATMUL_N = 2048

CONFIGS = ("matmul_peak", "sparsevae", "torch_loop", "torch_batched", "scvi")
SCALING_MODELS = ("sparsevae", "scvi", "linear_scvi")
SCALING_BATCH_SIZE = 128
SCALING_CELLS = (1000, 3000, 10000, 30000, 100000)
SCALING_GENES = (500, 1000, 2000, 5000)
SCALING_HIDDEN = (50, 100, 200)
SCALING_BASE = {"n_cells": 3000, "n_genes": 558, "n_hidden": 100}


# --------------------------------------------------------------------------- helpers
def decoder_flops_per_epoch(
    n_cells: int = N_CELLS,
    n_genes: int = N_GENES,
    n_factors: int = N_FACTORS,
    n_hidden: int = N_HIDDEN,
    n_layers: int = N_LAYERS,
) -> float:
    """FLOPs of the decoder's forward and backward pass over one epoch.

    Parameters
    ----------
    n_cells, n_genes, n_factors, n_hidden, n_layers
        The problem shape.

    Returns
    -------
    Number of floating point operations (multiply and add counted separately).
    """
    per_gene_cell = n_factors * n_hidden + (n_layers - 1) * n_hidden * n_hidden + n_hidden
    return 3.0 * 2.0 * n_cells * n_genes * per_gene_cell


def machine_info(threads: int, device: str) -> dict[str, Any]:
    """Describe the machine and software the benchmark runs on.

    Parameters
    ----------
    threads
        Torch intra-op threads.
    device
        Resolved device (``"cpu"`` or ``"cuda"``) or the requested one.

    Returns
    -------
    JSON-serialisable dict.
    """
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model(),
        "threads": threads,
        "device": device,
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "scvi_tools": package_version("scvi-tools"),
        "lightning": package_version("lightning"),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    if "torch" in sys.modules and device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.5g}")
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


def emit(record: dict[str, Any], stream: TextIO) -> None:
    """Write one result as a JSON line and flush.

    Parameters
    ----------
    record
        The result.
    stream
        Where to write (the real stdout).
    """
    stream.write(json.dumps(_round(record)) + "\n")
    stream.flush()


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (Linux reports ``ru_maxrss`` in KiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 if sys.platform != "darwin" else rss / 2**20


# --------------------------------------------------------------------------- child side
class Bench:
    """State shared by the measurements of one configuration (run in a child process).

    Parameters
    ----------
    args
        Parsed command line arguments.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        if args.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            self.device = args.device
        if self.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda requested but CUDA is not available.")
        self.args = args
        self.torch = torch

    def sync(self) -> None:
        """Wait for queued GPU work (no-op on CPU)."""
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def reset_peak(self) -> None:
        """Reset the GPU peak-memory counter (no-op on CPU)."""
        if self.device == "cuda":
            self.torch.cuda.reset_peak_memory_stats()

    def memory(self, rss_before: float) -> dict[str, Any]:
        """Peak memory of this process.

        Parameters
        ----------
        rss_before
            ``ru_maxrss`` (MiB) just before the measured work (after imports and data set-up).

        Returns
        -------
        dict with the peak RSS, the peak before the measurement and, on GPU, the peak allocated
        CUDA memory.
        """
        peak = peak_rss_mib()
        out: dict[str, Any] = {
            "peak_rss_mib": peak,
            "rss_before_mib": rss_before,
            "peak_rss_increase_mib": peak - rss_before,
        }
        if self.device == "cuda":
            out["cuda_max_allocated_mib"] = self.torch.cuda.max_memory_allocated() / 2**20
        return out

    def accelerator(self) -> str:
        """Lightning accelerator name for the resolved device."""
        return "gpu" if self.device == "cuda" else "cpu"


def _import_sparsevae() -> Any:
    try:
        import sparsevae
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        import sparsevae
    return sparsevae


def _simulate() -> Any:
    sparsevae = _import_sparsevae()
    return sparsevae.datasets.simulate_programs(
        n_cells=N_CELLS, n_genes=N_GENES, n_factors=N_FACTORS, genes_per_program=GENES_PER_PROGRAM
    )


def _epoch_timer(bench: Bench) -> Any:
    """A Lightning callback that records the wall and process CPU time of every training epoch."""
    from lightning.pytorch.callbacks import Callback

    class EpochTimer(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.cpu_times: list[float] = []
            self._start = 0.0
            self._cpu_start = 0.0

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            bench.sync()
            self._start = time.perf_counter()
            self._cpu_start = time.process_time()

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            bench.sync()
            self.times.append(time.perf_counter() - self._start)
            self.cpu_times.append(time.process_time() - self._cpu_start)

    return EpochTimer()


def _epoch_summary(times: list[float], wall: float, epochs: int) -> dict[str, Any]:
    steady = times[1:] if len(times) > 1 else times
    return {
        "s_per_epoch": statistics.median(steady),
        "min_s_per_epoch": min(steady),
        "first_epoch_s": times[0] if times else None,
        "epoch_times_s": times,
        "train_wall_s": wall,
        "train_wall_per_epoch_s": wall / epochs,
        "epochs": epochs,
        "extrapolated": False,
    }


def _with_flops(result: dict[str, Any]) -> dict[str, Any]:
    flops = decoder_flops_per_epoch()
    result["decoder_gflop_per_epoch"] = flops / 1e9
    result["decoder_gflops_achieved"] = flops / 1e9 / result["s_per_epoch"]
    return result


def run_matmul_peak(bench: Bench) -> dict[str, Any]:
    """Measure the GFLOP/s of a 2048 x 2048 fp32 matmul (best of several repeats)."""
    torch = bench.torch
    a = torch.randn(MATMUL_N, MATMUL_N, device=bench.device)
    b = torch.randn(MATMUL_N, MATMUL_N, device=bench.device)
    rss_before = peak_rss_mib()
    bench.reset_peak()
    reps = 3 if bench.args.quick else 10
    if bench.device == "cuda":
        reps *= 20
    torch.mm(a, b)
    bench.sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        bench.sync()
        times.append(time.perf_counter() - t0)
    flops = 2.0 * MATMUL_N**3
    return {
        "gflops_best": flops / min(times) / 1e9,
        "gflops_median": flops / statistics.median(times) / 1e9,
        "n": MATMUL_N,
        "repeats": reps,
        **bench.memory(rss_before),
    }


def run_sparsevae(bench: Bench) -> dict[str, Any]:
    """Time :meth:`sparsevae.SparseVAE.train` per epoch."""
    sparsevae = _import_sparsevae()
    adata = _simulate()
    sparsevae.SparseVAE.setup_anndata(adata)
    model = sparsevae.SparseVAE(
        adata, n_factors=N_FACTORS, n_hidden=N_HIDDEN, n_layers=N_LAYERS, likelihood="nb"
    )
    timer = _epoch_timer(bench)
    epochs = bench.args.epochs
    rss_before = peak_rss_mib()
    bench.reset_peak()
    t0 = time.perf_counter()
    model.train(
        max_epochs=epochs,
        batch_size=BATCH_SIZE,
        accelerator=bench.accelerator(),
        devices=1,
        callbacks=[timer],
        **TRAINER_KWARGS,
    )
    bench.sync()
    wall = time.perf_counter() - t0
    result = _epoch_summary(timer.times, wall, epochs)
    result.update(likelihood=model.likelihood, **bench.memory(rss_before))
    return _with_flops(result)


def run_scvi(bench: Bench) -> dict[str, Any]:
    """Time :meth:`scvi.model.SCVI.train` per epoch at the same shape."""
    import scvi

    adata = _simulate()
    scvi.model.SCVI.setup_anndata(adata)
    model = scvi.model.SCVI(adata, n_latent=N_FACTORS, n_hidden=N_HIDDEN, gene_likelihood="nb")
    timer = _epoch_timer(bench)
    epochs = bench.args.epochs
    rss_before = peak_rss_mib()
    bench.reset_peak()
    t0 = time.perf_counter()
    model.train(
        max_epochs=epochs,
        batch_size=BATCH_SIZE,
        train_size=1.0,
        accelerator=bench.accelerator(),
        devices=1,
        callbacks=[timer],
        **TRAINER_KWARGS,
    )
    bench.sync()
    wall = time.perf_counter() - t0
    result = _epoch_summary(timer.times, wall, epochs)
    result.update(
        n_latent=N_FACTORS,
        n_hidden=N_HIDDEN,
        n_layers=model.module.n_layers if hasattr(model.module, "n_layers") else 1,
        gene_likelihood="nb",
        **bench.memory(rss_before),
    )
    return result


class TorchTrainer:
    """A hand-written training loop of the SparseVAE module with a choice of decoder algorithm.

    Each step encodes a minibatch, decodes it, evaluates the negative ELBO with the NB likelihood
    plus the mask prior, back-propagates, takes an Adam step and runs the prior's EM update, as
    :meth:`sparsevae.SparseVAE.train` does.

    Parameters
    ----------
    bench
        Benchmark state (device, torch).
    """

    def __init__(self, bench: Bench) -> None:
        sparsevae = _import_sparsevae()
        torch = bench.torch
        adata = _simulate()
        sparsevae.SparseVAE.setup_anndata(adata)
        model = sparsevae.SparseVAE(
            adata, n_factors=N_FACTORS, n_hidden=N_HIDDEN, n_layers=N_LAYERS, likelihood="nb"
        )
        self.bench = bench
        self.module = model.module.to(bench.device).train()
        x = adata.X.toarray() if hasattr(adata.X, "toarray") else adata.X
        self.x = torch.as_tensor(x, dtype=torch.float32, device=bench.device)
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=LR)
        generator = torch.Generator().manual_seed(0)
        self.order = torch.randperm(N_CELLS, generator=generator).to(bench.device)

    def batches(self) -> list[Any]:
        """Cell indices of the minibatches of one epoch."""
        return list(self.order.split(BATCH_SIZE))

    def loss(self, x: Any, decode: Callable[[Any], Any]) -> Any:
        """Negative ELBO per cell plus the prior penalty divided by the number of cells."""
        torch = self.bench.torch
        from scvi.distributions import NegativeBinomial
        from torch.distributions import Normal, kl_divergence

        module = self.module
        total = x.sum(-1, keepdim=True)
        x_enc = torch.log1p(x * (1e4 / total.clamp_min(1.0)))
        qz, z = module.encoder(x_enc)
        out = decode(z)
        mu = torch.exp(out[..., 0] + torch.log(total.clamp_min(1e-8)))
        px = NegativeBinomial(mu=mu, theta=torch.exp(module.log_theta))
        nll = -px.log_prob(x).sum(-1)
        kl = kl_divergence(qz, Normal(torch.zeros_like(z), torch.ones_like(z))).sum(-1)
        return torch.mean(nll + kl) + module.prior_penalty() / N_CELLS

    def step(self, idx: Any, decode: Callable[[Any], Any]) -> float:
        """One training step on the cells ``idx``; returns its wall time in seconds."""
        self.bench.sync()
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self.x[idx], decode)
        loss.backward()
        self.optimizer.step()
        self.module.em_step()
        self.bench.sync()
        return time.perf_counter() - t0


def run_torch_loop(bench: Bench) -> dict[str, Any]:
    """Time a few training steps with the per-gene Python loop and extrapolate to an epoch."""
    trainer = TorchTrainer(bench)
    decoder = trainer.module.decoder
    batches = trainer.batches()
    n_timed = min(bench.args.loop_batches, len(batches))
    rss_before = peak_rss_mib()
    bench.reset_peak()
    trainer.step(batches[0][:32], decoder.forward_loop)  # warm-up on a few cells
    times = [trainer.step(idx, decoder.forward_loop) for idx in batches[:n_timed]]
    cells = sum(len(idx) for idx in batches[:n_timed])
    s_per_epoch = sum(times) / cells * N_CELLS
    result = {
        "s_per_epoch": s_per_epoch,
        "extrapolated": True,
        "n_batches_timed": n_timed,
        "n_cells_timed": cells,
        "batch_times_s": times,
        "decoder": "MaskedDecoder.forward_loop",
        **bench.memory(rss_before),
    }
    return _with_flops(result)


def run_torch_batched(bench: Bench) -> dict[str, Any]:
    """Time full epochs of the hand-written loop with the batched decoder, and the decoder alone."""
    torch = bench.torch
    trainer = TorchTrainer(bench)
    decoder = trainer.module.decoder
    batches = trainer.batches()
    epochs = 1 if bench.args.quick else 2
    rss_before = peak_rss_mib()
    bench.reset_peak()
    trainer.step(batches[0], decoder.forward)  # warm-up
    epoch_times = [
        sum(trainer.step(idx, decoder.forward) for idx in batches) for _ in range(epochs)
    ]
    memory = bench.memory(rss_before)

    # Decoder alone: forward and backward over one epoch of random factors.
    z_all = torch.randn(N_CELLS, N_FACTORS, device=bench.device)
    dec_times = []
    for _ in range(epochs):
        bench.sync()
        t0 = time.perf_counter()
        for idx in batches:
            z = z_all[idx].requires_grad_(True)
            decoder(z).sum().backward()
        bench.sync()
        dec_times.append(time.perf_counter() - t0)
    decoder.zero_grad(set_to_none=True)
    dec_s = statistics.median(dec_times)
    flops = decoder_flops_per_epoch()
    result = {
        "s_per_epoch": statistics.median(epoch_times),
        "min_s_per_epoch": min(epoch_times),
        "epoch_times_s": epoch_times,
        "epochs": epochs,
        "extrapolated": False,
        "decoder": "MaskedDecoder.forward",
        "decoder_only_s_per_epoch": dec_s,
        "decoder_only_gflops_achieved": flops / 1e9 / dec_s,
        **memory,
    }
    return _with_flops(result)


# --------------------------------------------------------------------------- scaling
def scaling_grid(quick: bool) -> list[str]:
    """Names ``scaling:MODEL:N_CELLS:N_GENES:N_HIDDEN`` of the scaling configurations.

    Parameters
    ----------
    quick
        A handful of small shapes instead of the full grid.

    Returns
    -------
    Configuration names, without duplicates, in run order.
    """
    base = SCALING_BASE
    if quick:
        shapes = [
            ("sparsevae", 1000, 500, 100),
            ("sparsevae", 3000, 500, 100),
            ("sparsevae", 1000, 1000, 100),
            ("scvi", 1000, 500, 128),
            ("linear_scvi", 1000, 500, 128),
        ]
    else:
        shapes = []
        for model in SCALING_MODELS:
            hidden = base["n_hidden"] if model == "sparsevae" else 128
            shapes += [(model, n, base["n_genes"], hidden) for n in SCALING_CELLS]
            shapes += [(model, base["n_cells"], g, hidden) for g in SCALING_GENES]
        shapes += [("sparsevae", base["n_cells"], base["n_genes"], h) for h in SCALING_HIDDEN]
    names = [f"scaling:{m}:{n}:{g}:{h}" for m, n, g, h in shapes]
    return list(dict.fromkeys(names))


class RSSSampler:
    """Sample this process's resident set size in a background thread (Linux ``/proc``)."""

    def __init__(self, interval: float = 0.005) -> None:
        import threading

        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def current_mib(self) -> float:
        """Current resident set size in MiB (0 where ``/proc`` is missing)."""
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * self._page / 2**20
        except OSError:
            return 0.0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current_mib())
            self._stop.wait(self.interval)

    def __enter__(self) -> RSSSampler:
        self.start = self.current_mib()
        self.peak = self.start
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current_mib())


def run_scaling(bench: Bench, name: str) -> dict[str, Any]:
    """Time two short epochs of one model at one shape and extrapolate to a full epoch.

    Parameters
    ----------
    bench
        Benchmark state.
    name
        ``scaling:MODEL:N_CELLS:N_GENES:N_HIDDEN``.

    Returns
    -------
    The measurement.
    """
    import math

    _, model_name, n_cells_s, n_genes_s, n_hidden_s = name.split(":")
    n_cells, n_genes, n_hidden = int(n_cells_s), int(n_genes_s), int(n_hidden_s)
    sparsevae = _import_sparsevae()
    adata = sparsevae.datasets.simulate_programs(
        n_cells=n_cells,
        n_genes=n_genes,
        n_factors=N_FACTORS,
        genes_per_program=GENES_PER_PROGRAM,
        seed=0,
    )
    del adata.layers["counts"]
    if model_name == "sparsevae":
        sparsevae.SparseVAE.setup_anndata(adata)
        model: Any = sparsevae.SparseVAE(
            adata, n_factors=N_FACTORS, n_hidden=n_hidden, n_layers=N_LAYERS, likelihood="nb"
        )
        extra: dict[str, Any] = {"train_size": 1.0}
    else:
        import scvi

        cls = scvi.model.SCVI if model_name == "scvi" else scvi.model.LinearSCVI
        cls.setup_anndata(adata)
        model = cls(adata, n_latent=N_FACTORS, n_hidden=n_hidden, gene_likelihood="nb")
        extra = {"train_size": 1.0}
    n_batches = math.ceil(n_cells / SCALING_BATCH_SIZE)
    timed = min(n_batches, bench.args.scaling_batches)
    timer = _epoch_timer(bench)
    rss_before = peak_rss_mib()
    bench.reset_peak()
    with RSSSampler() as sampler:
        t0 = time.perf_counter()
        model.train(
            max_epochs=2,
            batch_size=SCALING_BATCH_SIZE,
            accelerator=bench.accelerator(),
            devices=1,
            callbacks=[timer],
            limit_train_batches=timed,
            **extra,
            **TRAINER_KWARGS,
        )
        bench.sync()
        wall = time.perf_counter() - t0
    per_batch = timer.times[-1] / timed
    cpu_per_batch = timer.cpu_times[-1] / timed
    flops = decoder_flops_per_epoch(n_cells, n_genes, N_FACTORS, n_hidden, N_LAYERS)
    return {
        "model": model_name,
        "s_per_epoch": per_batch * n_batches,
        "s_per_batch": per_batch,
        "cpu_s_per_epoch": cpu_per_batch * n_batches,
        "cpu_s_per_batch": cpu_per_batch,
        "first_epoch_s": timer.times[0],
        "n_batches_timed": timed,
        "n_batches_per_epoch": n_batches,
        "extrapolated": timed < n_batches,
        "train_wall_s": wall,
        "train_rss_increase_mib": sampler.peak - sampler.start,
        "train_rss_start_mib": sampler.start,
        "decoder_gflop_per_epoch": flops / 1e9 if model_name == "sparsevae" else None,
        "shape": {
            "n_cells": n_cells,
            "n_genes": n_genes,
            "n_factors": N_FACTORS,
            "n_hidden": n_hidden,
            "n_layers": N_LAYERS if model_name == "sparsevae" else 1,
            "batch_size": SCALING_BATCH_SIZE,
        },
        **bench.memory(rss_before),
    }


def cost_models(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fit the stated cost models to the scaling measurements and report how well they hold.

    SparseVAE: ``t = a N + b N G (K H + (L - 1) H^2 + H)``; SCVI and LinearSCVI:
    ``t = a N + b N G H``. Coefficients by non-negative least squares on relative errors; the
    record gives the fit's largest relative error and the log-log slopes of time in cells, genes
    and (SparseVAE) hidden width, estimated from the measurements along each axis.

    Parameters
    ----------
    results
        Scaling records (``"model"``, ``"s_per_epoch"``, ``"shape"``).

    Returns
    -------
    One record per model with at least two measurements.
    """
    import numpy as np
    from scipy.optimize import nnls

    out = []
    for model in SCALING_MODELS:
        rs = [r for r in results if r.get("model") == model and "s_per_epoch" in r]
        if len(rs) < 2:
            continue
        N = np.array([r["shape"]["n_cells"] for r in rs], dtype=float)
        G = np.array([r["shape"]["n_genes"] for r in rs], dtype=float)
        H = np.array([r["shape"]["n_hidden"] for r in rs], dtype=float)
        # With one thread, process CPU time is the work done and does not depend on how busy the
        # shared machine was; with more threads (or a GPU) use wall time.
        use_cpu = all(
            r.get("cpu_s_per_epoch") is not None
            and r.get("machine", {}).get("threads") == 1
            and r.get("machine", {}).get("device") == "cpu"
            for r in rs
        )
        key = "cpu_s_per_epoch" if use_cpu else "s_per_epoch"
        t = np.array([r[key] for r in rs], dtype=float)
        if model == "sparsevae":
            work = N * G * (N_FACTORS * H + (N_LAYERS - 1) * H**2 + H)
            formula = "t = a*N + b*N*G*(K*H + (L-1)*H^2 + H)"
        else:
            work = N * G * H
            formula = "t = a*N + b*N*G*H"
        A = np.stack([N, work], axis=1) / t[:, None]  # relative residuals
        coef, _ = nnls(A, np.ones_like(t))
        pred = np.stack([N, work], axis=1) @ coef
        rel = pred / t - 1.0
        record: dict[str, Any] = {
            "name": "cost_model",
            "model": model,
            "formula": formula,
            "time": "process CPU time" if use_cpu else "wall time",
            "a_s_per_cell": coef[0],
            "b_s_per_unit": coef[1],
            "effective_gflops": (
                6.0 * coef[1] ** -1 / 1e9 if model == "sparsevae" and coef[1] > 0 else None
            ),
            "max_abs_rel_error": float(np.max(np.abs(rel))),
            "median_abs_rel_error": float(np.median(np.abs(rel))),
            "n_points": len(rs),
            "points": [
                {
                    "n_cells": int(n),
                    "n_genes": int(g),
                    "n_hidden": int(h),
                    "s": float(s),
                    "pred_s": float(p),
                }
                for n, g, h, s, p in zip(N, G, H, t, pred, strict=True)
            ],
        }
        base = SCALING_BASE
        for axis, values, fixed in (
            (
                "cells",
                N,
                (G == base["n_genes"])
                & (H == H.max() if model != "sparsevae" else H == base["n_hidden"]),
            ),
            (
                "genes",
                G,
                (N == base["n_cells"])
                & (H == H.max() if model != "sparsevae" else H == base["n_hidden"]),
            ),
            ("hidden", H, (N == base["n_cells"]) & (G == base["n_genes"])),
        ):
            sel = fixed & np.isfinite(t)
            if len(np.unique(values[sel])) >= 2:
                slope = np.polyfit(np.log(values[sel]), np.log(t[sel]), 1)[0]
                record[f"loglog_slope_{axis}"] = float(slope)
                slope = np.polyfit(np.log(values[sel]), np.log(pred[sel]), 1)[0]
                record[f"model_loglog_slope_{axis}"] = float(slope)
        mem = np.array([r.get("train_rss_increase_mib") or np.nan for r in rs], dtype=float)
        if np.all(np.isfinite(mem)):
            record["train_rss_increase_mib_max"] = float(mem.max())
            if model == "sparsevae":
                # Saved activations of one minibatch: batch x G x H x n_layers float32 values.
                act = SCALING_BATCH_SIZE * G * H * N_LAYERS * 4 / 2**20
                slope, intercept = np.polyfit(act, mem, 1)
                pred_mem = intercept + slope * act
                record["memory_model"] = "rss_increase = c0 + c1 * (batch*G*H*n_layers*4 B)"
                record["memory_c0_mib"] = float(intercept)
                record["memory_c1"] = float(slope)
                record["memory_max_abs_rel_error"] = float(np.max(np.abs(pred_mem / mem - 1)))
                sel = G == SCALING_BASE["n_genes"]
                if sel.sum() >= 2:
                    record["memory_loglog_slope_cells"] = float(
                        np.polyfit(np.log(N[sel]), np.log(mem[sel]), 1)[0]
                    )
        out.append(record)
    return out


RUNNERS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "matmul_peak": run_matmul_peak,
    "sparsevae": run_sparsevae,
    "torch_loop": run_torch_loop,
    "torch_batched": run_torch_batched,
    "scvi": run_scvi,
}


def run_child(args: argparse.Namespace) -> int:
    """Run one configuration in this process and print its JSON line.

    Parameters
    ----------
    args
        Parsed arguments; ``args.only`` names the configuration.

    Returns
    -------
    Exit status.
    """
    name = args.only
    with stdout_to_stderr() as out:
        quiet_logs()
        record: dict[str, Any] = {"name": name}
        bench: Bench | None = None
        try:
            bench = Bench(args)
            quiet_logs()
            t0 = time.perf_counter()
            if name.startswith("scaling:"):
                record.update(run_scaling(bench, name))
            else:
                record.update(RUNNERS[name](bench))
            record["config_wall_s"] = time.perf_counter() - t0
            status = 0
        except Exception as err:
            record["error"] = f"{type(err).__name__}: {err}"
            status = 1
        device = bench.device if bench is not None else args.device
        record.setdefault("shape", _shape())
        record["machine"] = machine_info(args.threads, device)
        emit(record, out)
    return status


def _shape() -> dict[str, int]:
    return {
        "n_cells": N_CELLS,
        "n_genes": N_GENES,
        "n_factors": N_FACTORS,
        "n_hidden": N_HIDDEN,
        "n_layers": N_LAYERS,
        "batch_size": BATCH_SIZE,
    }


# --------------------------------------------------------------------------- parent side
def spawn(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one configuration in a fresh subprocess and return its result.

    Parameters
    ----------
    name
        Configuration name.
    args
        Parsed arguments of this process (passed on).

    Returns
    -------
    The child's JSON record, or a record with an ``error`` field.
    """
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--only",
        name,
        "--threads",
        str(args.threads),
        "--device",
        args.device,
        "--epochs",
        str(args.epochs),
        "--loop-batches",
        str(args.loop_batches),
        "--scaling-batches",
        str(args.scaling_batches),
    ]
    if args.quick:
        cmd.append("--quick")
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(args.threads)
    try:
        proc = subprocess.run(
            cmd, stdout=subprocess.PIPE, text=True, env=env, timeout=args.timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"name": name, "error": f"timed out after {args.timeout} s"}
    for line in reversed(proc.stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads(line)
    return {"name": name, "error": f"no result (exit status {proc.returncode})"}


def measure_here(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one scaling configuration in this process (quick mode).

    Parameters
    ----------
    name
        Scaling configuration name.
    args
        Parsed arguments.

    Returns
    -------
    The record, with an ``error`` field on failure.
    """
    record: dict[str, Any] = {"name": name, "in_process": True}
    with stdout_to_stderr():
        quiet_logs()
        try:
            bench = Bench(args)
            quiet_logs()
            t0 = time.perf_counter()
            record.update(run_scaling(bench, name))
            record["config_wall_s"] = time.perf_counter() - t0
            record["machine"] = machine_info(args.threads, bench.device)
        except Exception as err:
            record["error"] = f"{type(err).__name__}: {err}"
    return record


def _ratio(
    name: str,
    numerator: str,
    denominator: str,
    meaning: str,
    results: dict[str, dict[str, Any]],
) -> dict[str, Any] | None:
    num = results.get(numerator, {}).get("s_per_epoch")
    den = results.get(denominator, {}).get("s_per_epoch")
    if num is None or den is None:
        return None
    return {
        "name": name,
        "ratio": num / den,
        "numerator": f"{numerator}.s_per_epoch",
        "denominator": f"{denominator}.s_per_epoch",
        "meaning": meaning,
        "extrapolated": bool(
            results[numerator].get("extrapolated") or results[denominator].get("extrapolated")
        ),
    }


def summaries(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Ratios between configurations and the distance to the arithmetic floor.

    Parameters
    ----------
    results
        Records of the configurations, by name.

    Returns
    -------
    Records to print.
    """
    specs = [
        (
            "sparsevae_vs_loop",
            "torch_loop",
            "sparsevae",
            "speed-up of SparseVAE.train over the reference per-gene-loop training epoch",
        ),
        (
            "batched_vs_loop",
            "torch_loop",
            "torch_batched",
            "speed-up of the batched decoder over "
            "the per-gene loop, same hand-written training loop",
        ),
        (
            "sparsevae_vs_scvi",
            "sparsevae",
            "scvi",
            "SparseVAE.train epoch time as a multiple of scvi SCVI.train",
        ),
        (
            "sparsevae_vs_torch_batched",
            "sparsevae",
            "torch_batched",
            "SparseVAE.train (Lightning, "
            "scvi data loader) over the hand-written batched loop: framework overhead",
        ),
    ]
    out = [r for spec in specs if (r := _ratio(*spec, results)) is not None]
    peak = results.get("matmul_peak", {}).get("gflops_best")
    if peak:
        gflop = decoder_flops_per_epoch() / 1e9
        floor_s = gflop / peak
        record: dict[str, Any] = {
            "name": "flop_floor",
            "decoder_gflop_per_epoch": gflop,
            "matmul_peak_gflops": peak,
            "floor_s_per_epoch": floor_s,
        }
        for key in ("sparsevae", "torch_batched", "torch_loop"):
            s = results.get(key, {}).get("s_per_epoch")
            if s is not None:
                record[f"{key}_s_per_epoch"] = s
                record[f"{key}_x_floor"] = s / floor_s
                record[f"{key}_fraction_of_peak"] = floor_s / s
        dec = results.get("torch_batched", {}).get("decoder_only_s_per_epoch")
        if dec is not None:
            record["decoder_only_s_per_epoch"] = dec
            record["decoder_only_x_floor"] = dec / floor_s
            record["decoder_only_fraction_of_peak"] = floor_s / dec
        out.append(record)
    return out


def run_parent(args: argparse.Namespace, names: list[str]) -> int:
    """Run the configurations one after another in subprocesses and print all results.

    Parameters
    ----------
    args
        Parsed arguments.
    names
        Configurations to run.

    Returns
    -------
    Exit status (1 if any configuration failed).
    """
    results: dict[str, dict[str, Any]] = {}
    status = 0
    machine: dict[str, Any] = {}
    mode = "quick" if args.quick else "full"
    # Quick scaling runs measure in this process (no start-up cost per configuration); memory is
    # then the sampled increase during training, which the allocator's reuse can understate.
    in_process = args.scaling and args.quick
    out = _OutFile(args.out)
    out(
        {
            "name": "meta",
            "benchmark": "speed_scaling" if args.scaling else "speed",
            "mode": mode,
            "command": shlex.join(["python", "benchmarks/speed.py", *sys.argv[1:]]),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "machine": machine_info(args.threads, args.device),
        }
    )
    for name in names:
        print(f"[speed] running {name} ...", file=sys.stderr, flush=True)
        record = measure_here(name, args) if in_process else spawn(name, args)
        record["mode"] = mode
        results[name] = record
        if "error" in record:
            status = 1
        machine = record.get("machine", machine)
        out(record)
    extra = (
        cost_models([r for n, r in results.items() if n.startswith("scaling:")])
        if args.scaling
        else summaries(results)
    )
    for record in extra:
        record["mode"] = mode
        record["machine"] = machine or machine_info(args.threads, args.device)
        out(record)
    return status


class _OutFile:
    """Print records as JSON lines and append them to a file when one is given."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, record: dict[str, Any]) -> None:
        emit(record, sys.stdout)
        if self.path is not None:
            with self.path.open("a") as fh:
                emit(record, fh)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line.

    Parameters
    ----------
    argv
        Arguments (default ``sys.argv[1:]``).

    Returns
    -------
    The parsed arguments, with mode-dependent defaults filled in.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (under two minutes)")
    parser.add_argument(
        "--epochs", type=int, default=None, help="epochs of sparsevae and scvi (default 5; quick 2)"
    )
    parser.add_argument(
        "--loop-batches",
        type=int,
        default=None,
        help="minibatches timed with the per-gene loop (default 2; quick 1)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    parser.add_argument(
        "--only",
        default=None,
        help=f"comma-separated configurations to run, from {', '.join(CONFIGS)}; a single one "
        "runs in this process",
    )
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds allowed per configuration"
    )
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="run the scaling grid (cells, genes, hidden width) instead of the Zeisel shape",
    )
    parser.add_argument(
        "--scaling-batches",
        type=int,
        default=None,
        help="minibatches timed per scaling configuration (default 20; quick 4)",
    )
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 2 if args.quick else 5
    if args.loop_batches is None:
        args.loop_batches = 1 if args.quick else 2
    if args.scaling_batches is None:
        args.scaling_batches = 4 if args.quick else 20
    if args.epochs < 1 or args.loop_batches < 1 or args.threads < 1:
        parser.error("--epochs, --loop-batches and --threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point.

    Parameters
    ----------
    argv
        Command line arguments.

    Returns
    -------
    Exit status.
    """
    args = parse_args(argv)
    if args.only is not None and args.only.startswith("scaling:"):
        return run_child(args)
    if args.scaling:
        return run_parent(args, scaling_grid(args.quick))
    names = list(CONFIGS) if args.only is None else args.only.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        print(f"unknown configuration(s) {unknown}; choose from {CONFIGS}", file=sys.stderr)
        return 2
    if len(names) == 1 and args.only is not None:
        return run_child(args)
    return run_parent(args, names)


if __name__ == "__main__":
    sys.exit(main())
