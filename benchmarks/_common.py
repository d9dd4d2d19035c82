"""Helpers shared by the benchmark scripts: JSON lines, machine description, quiet training."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

TRAINER_KWARGS: dict[str, Any] = {
    "enable_progress_bar": False,
    "logger": False,
    "enable_checkpointing": False,
    "enable_model_summary": False,
}


def import_sparsevae() -> Any:
    """Import the package, from ``src/`` when it is not installed."""
    try:
        import sparsevae
    except ImportError:
        sys.path.insert(0, str(ROOT / "src"))
        import sparsevae
    return sparsevae


def package_version(name: str) -> str | None:
    """Installed version of a distribution, or ``None``."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (Linux), or the platform's processor string."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """Describe the machine and software (JSON-serialisable)."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": threads,
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "scvi_tools": package_version("scvi-tools"),
        "sklearn": package_version("scikit-learn"),
        "sparsevae": package_version("sparsevae"),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    with contextlib.suppress(Exception):
        import subprocess

        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
        if rev.returncode == 0:
            info["git"] = rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    return info


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.5g}")
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_round(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return _round(value.tolist())
    return value


class Emitter:
    """Write results as JSON lines to a stream and, optionally, append them to a file.

    Parameters
    ----------
    stream
        Where to print (the real stdout).
    path
        Optional JSON-lines file the records are appended to.
    """

    def __init__(self, stream: TextIO, path: str | Path | None = None) -> None:
        self.stream = stream
        self.path = Path(path) if path else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, record: dict[str, Any]) -> None:
        line = json.dumps(_round(record))
        self.stream.write(line + "\n")
        self.stream.flush()
        if self.path is not None:
            with self.path.open("a") as fh:
                fh.write(line + "\n")


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[TextIO]:
    """Send everything written to stdout (Python or C level) to stderr.

    Yields
    ------
    A text stream on the original stdout, for the JSON results.
    """
    sys.stdout.flush()
    saved_fd = os.dup(1)
    real_stdout = os.fdopen(saved_fd, "w", buffering=1)
    saved_sys_stdout = sys.stdout
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        yield real_stdout
    finally:
        sys.stdout.flush()
        sys.stdout = saved_sys_stdout
        os.dup2(saved_fd, 1)
        real_stdout.close()


def quiet_logs() -> None:
    """Lower the verbosity of Lightning, scvi-tools and Python warnings."""
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "scvi", "sparsevae"):
        logging.getLogger(name).setLevel(logging.ERROR)


def command_line() -> str:
    """The command that started this process, relative to the repository root."""
    script = Path(sys.argv[0])
    with contextlib.suppress(ValueError):
        script = script.resolve().relative_to(ROOT)
    import shlex

    args = list(sys.argv[1:])
    for i, a in enumerate(args[:-1]):
        if a == "--note":  # shown on its own; keep the command readable
            args[i + 1] = "..."
    return shlex.join(["python", str(script), *args])


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation, NaN-aware."""
    import numpy as np

    arr = np.asarray([v for v in values if v is not None], dtype=float)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std())


def add_mean_sd(summary: dict[str, Any], records: list[dict[str, Any]], keys: Any) -> None:
    """Add ``<key>_mean`` and ``<key>_sd`` over ``records`` to ``summary`` for each key present."""
    for key in keys:
        vals = [r[key] for r in records if key in r]
        if vals:
            summary[f"{key}_mean"], summary[f"{key}_sd"] = mean_std(vals)


def posterior_means(model: Any, adata: Any, batch_size: int = 256) -> tuple[Any, Any, Any]:
    """Posterior-mean factors, the decoded mean of the data and the per-cell NLL.

    Uses scvi-tools' module hooks (``_get_inference_input``, ``inference``,
    ``_get_generative_input``, ``generative``) with ``z`` set to the posterior mean, so it works
    for :class:`sparsevae.SparseVAE` and for scvi-tools' VAEs.

    Parameters
    ----------
    model
        A trained scvi-tools-style model.
    adata
        Cells to encode and decode (registered like the training data).
    batch_size
        Minibatch size.

    Returns
    -------
    ``(z, mean, nll)``: arrays ``(n_cells, n_factors)``, ``(n_cells, n_genes)`` and
    ``(n_cells,)`` (negative log-likelihood of the cell's data, summed over genes, given its
    posterior-mean factors).
    """
    import numpy as np
    import torch
    from scvi import REGISTRY_KEYS

    adata = model._validate_anndata(adata)
    loader = model._make_data_loader(adata=adata, batch_size=batch_size, shuffle=False)
    module = model.module
    module.eval()
    zs, means, nlls = [], [], []
    with torch.inference_mode():
        for tensors in loader:
            inf = dict(module.inference(**module._get_inference_input(tensors)))
            qz = inf["qz"]
            inf["z"] = qz.loc
            gen = module.generative(**module._get_generative_input(tensors, inf))
            px = gen["px"]
            x = tensors[REGISTRY_KEYS.X_KEY].to(qz.loc.device)
            means.append(px.mean.cpu().numpy())
            nlls.append(-px.log_prob(x).sum(-1).cpu().numpy())
            zs.append(qz.loc.cpu().numpy())
    return np.concatenate(zs), np.concatenate(means), np.concatenate(nlls)


#: A factor whose posterior differs from its prior by less than this (mean KL per cell, nats)
#: carries no information: the VAE has collapsed it.
MIN_FACTOR_KL = 0.1


def factor_kl(model: Any, adata: Any, batch_size: int = 256) -> Any:
    """Per factor, the mean over cells of ``KL(q(z_k | x) || N(0, 1))`` (nats).

    A VAE leaves the factors it does not need at their prior (KL near 0: posterior collapse),
    so the number of factors with a KL above :data:`MIN_FACTOR_KL` is how many the fit uses,
    whatever the mask says. Uses the module hooks as :func:`posterior_means` does.

    Returns
    -------
    Array ``(n_factors,)``.
    """
    import numpy as np
    import torch

    adata = model._validate_anndata(adata)
    loader = model._make_data_loader(adata=adata, batch_size=batch_size, shuffle=False)
    module = model.module
    module.eval()
    total, n = None, 0
    with torch.inference_mode():
        for tensors in loader:
            qz = module.inference(**module._get_inference_input(tensors))["qz"]
            m, v = qz.loc.double(), qz.scale.double().pow(2)
            kl = (0.5 * (m.pow(2) + v - 1.0 - v.log())).sum(0).cpu().numpy()
            total = kl if total is None else total + kl
            n += m.shape[0]
    return np.asarray(total) / max(n, 1)


def guarded_fit(
    benchmark: str,
    run: Callable[[], dict[str, Any]],
    keys: dict[str, Any],
    emit: Callable[[dict[str, Any]], None],
    label: Callable[[dict[str, Any]], str],
) -> tuple[dict[str, Any], bool]:
    """Run one fit, turning an exception into an ``error`` record; emit and log it.

    Returns the record and whether the fit succeeded.
    """
    t0 = time.perf_counter()
    ok = True
    try:
        rec = run()
    except Exception as err:  # report and go on
        rec = {"record": "fit", **keys, "error": f"{type(err).__name__}: {err}"}
        ok = False
    rec["wall_seconds"] = time.perf_counter() - t0
    rec["benchmark"] = benchmark
    emit(rec)
    where = " ".join(f"{k}={v}" for k, v in keys.items() if k != "method")
    print(
        f"[{benchmark}] {where} {keys.get('method', '')}: {label(rec)} "
        f"({rec['wall_seconds']:.1f} s)",
        file=sys.stderr,
        flush=True,
    )
    return rec, ok
