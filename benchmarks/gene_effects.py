"""Gene effects of all factors: one backward pass against one forward-mode pass per factor.

Usage: ``python benchmarks/gene_effects.py [--genes 1000] [--factors 15] [--cells 512]
[--threads 1] [--quick]``.

Times, on one batch of cells of a random masked decoder (hidden width 100, two hidden layers),
:meth:`sparsevae.nn.MaskedDecoder.effect_sums` (what ``get_gene_effects`` and ``write_results``
use) against the per-factor forward-mode derivatives it replaced (``torch.func.jvp`` with the
tangent ``e_k`` for each factor ``k``), both on the expression scale, and checks that they agree.
One JSON line: the seconds of each (best of ``--repeats``), their ratio measured in this run, and
the largest relative difference of the results.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import Emitter, command_line, import_sparsevae, machine_info, stdout_to_stderr


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--genes", type=int, default=1000)
    p.add_argument("--factors", type=int, default=15)
    p.add_argument("--cells", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="200 genes, 128 cells, 1 repeat")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.genes, args.cells, args.repeats = 200, 128, 1
    torch.set_num_threads(args.threads)
    sparsevae = import_sparsevae()
    torch.manual_seed(0)
    dec = sparsevae.nn.MaskedDecoder(args.genes, args.factors, n_hidden=100, n_layers=2)
    dec.eval()
    with torch.no_grad():
        dec.W.copy_(torch.randn_like(dec.W) * (torch.rand_like(dec.W) < 0.3))
    z = torch.randn(args.cells, args.factors)

    def per_factor() -> torch.Tensor:
        cols = []
        with torch.no_grad():
            for k in range(args.factors):
                tangent = torch.zeros_like(z)
                tangent[:, k] = 1.0
                out, d = torch.func.jvp(lambda t: dec(t)[..., 0], (z,), (tangent,))
                cols.append((d * torch.exp(out)).sum(0, dtype=torch.float64))
        return torch.stack(cols, dim=1)

    def one_pass() -> torch.Tensor:
        return dec.effect_sums(z, exp_output=True)[0]

    def best(fn) -> tuple[float, torch.Tensor]:
        times, result = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - t0)
        return min(times), result

    with stdout_to_stderr() as out:
        emit = Emitter(out, args.out)
        t_loop, ref = best(per_factor)
        t_pass, new = best(one_pass)
        emit({
            "record": "gene_effects", "command": command_line(), "genes": args.genes,
            "factors": args.factors, "cells": args.cells, "per_factor_jvp_seconds": t_loop,
            "one_backward_pass_seconds": t_pass, "speedup": t_loop / t_pass,
            "max_relative_difference": float((new - ref).abs().max() / ref.abs().max()),
            "machine": machine_info(args.threads),
        })  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
