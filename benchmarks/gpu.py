"""Speed and scaling benchmarks on a GPU in one command (issue 19), one JSON line per result.

Usage: ``python benchmarks/gpu.py [--quick] [--out benchmarks/results/gpu.jsonl]``.

Runs, in order, each in its own process and with its JSON lines passed through:

1. ``speed.py --device cuda``: the Zeisel shape (SparseVAE, the hand-written batched loop, the
   per-gene loop, scVI), with the matmul peak, the decoder's share of it and the SparseVAE/scVI
   ratio measured in the same run;
2. ``speed.py --device cuda --scaling``: seconds per epoch and memory as cells (to 100k), genes
   and the hidden width grow;
3. ``out_of_core.py --accelerator gpu``: training from a backed ``.h5ad`` with 100k and 1M cells
   x 2000 genes (minibatches of 1024 cells, 200 of them per run), and ``write_results`` at
   100k cells.

The first line records the device (``torch.cuda.get_device_name``, memory, driver). Without a
GPU it says so and, with ``--allow-cpu``, runs the same steps on the CPU (how the script is
tested); otherwise it stops with exit status 2. ``--quick`` shrinks every step to a smoke test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def device_record() -> dict:
    """The accelerator this run uses."""
    import torch

    rec: dict = {"record": "device", "benchmark": "gpu", "torch": torch.__version__,
                 "cuda_available": torch.cuda.is_available()}  # fmt: skip
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        rec.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            device_count=torch.cuda.device_count(),
            bf16_supported=bool(torch.cuda.is_bf16_supported()),
        )
    return rec


def steps(args: argparse.Namespace, device: str) -> list[list[str]]:
    """The benchmark commands to run."""
    py = sys.executable
    quick = ["--quick"] if args.quick else []
    speed = [py, str(HERE / "speed.py"), "--device", device, *quick]
    ooc = [py, str(HERE / "out_of_core.py"), "--accelerator", "gpu" if device == "cuda" else "cpu",
           "--dir", args.dir, "--write-results"]  # fmt: skip
    if args.quick:
        ooc += ["--cells", "5000", "--genes", "200", "--batches", "5"]
    else:
        ooc += ["--cells", "100000", "1000000", "--batches", "200", "--batch-size", "1024"]
    return [speed, [*speed, "--scaling"], ooc]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke test of every step")
    p.add_argument("--allow-cpu", action="store_true", help="run on the CPU when no GPU")
    p.add_argument("--dir", default="/tmp/sparsevae_ooc", help="where the h5ad files go")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per step")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    rec = device_record()
    sink = open(args.out, "a") if args.out else None

    def emit(line: str) -> None:
        print(line, flush=True)
        if sink is not None:
            sink.write(line + "\n")
            sink.flush()

    emit(json.dumps(rec))
    if not rec["cuda_available"] and not args.allow_cpu:
        print("[gpu] no CUDA device; pass --allow-cpu to run the steps on the CPU",
              file=sys.stderr)  # fmt: skip
        return 2
    device = "cuda" if rec["cuda_available"] else "cpu"
    status = 0
    for cmd in steps(args, device):
        t0 = time.perf_counter()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            emit(json.dumps({"record": "step", "command": cmd[1:], "error": "timeout"}))
            status = 1
            continue
        for line in done.stdout.splitlines():
            if line.startswith("{"):
                emit(line)
        emit(json.dumps({"record": "step", "command": [Path(cmd[1]).name, *cmd[2:]],
                         "returncode": done.returncode,
                         "seconds": round(time.perf_counter() - t0, 1)}))  # fmt: skip
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-3000:])
            status = 1
    if sink is not None:
        sink.close()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
