"""Write ``docs/benchmarks.md`` and its figures from the JSON-lines results of the benchmarks.

Reads ``benchmarks/results/{identifiability,zeisel,speed_scaling,speed,multistudy}.jsonl``
(each written by the script's ``--out`` or its standard output; when a file holds several runs,
the last one is used: a run starts at its ``meta`` record), writes markdown tables and
matplotlib figures (``docs/figures/bench_*.png``) and
stamps the date, the machine and the commands. Never edit ``docs/benchmarks.md`` by hand.

Examples
--------
::

    python benchmarks/make_report.py
    python benchmarks/make_report.py --results benchmarks/results --docs docs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(Path(__file__).resolve().parent))
from identifiability import METHODS as ID_METHODS  # noqa: E402  (the script's own list)

ID_LABELS = {
    "sparsevae": "Sparse VAE",
    "sparsevae_corr": "Sparse VAE, correlated prior",
    "sparsevae_sched": "Sparse VAE, prior schedule",
    "sparsevae_corr_sched": "Sparse VAE, correlated prior and prior schedule",
    "vae": "VAE",
    "beta_vae": "beta-VAE (2)",
    "vsc": "VSC",
}
Z_LABELS = {
    "sparsevae_nb": "Sparse VAE (NB, counts)",
    "sparsevae_nb_corr": "Sparse VAE (NB, counts), correlated prior",
    "sparsevae_gaussian": "Sparse VAE (Gaussian, log-norm.)",
    "vae_nb": "VAE (NB, counts)",
    "vae_gaussian": "VAE (Gaussian, log-norm.)",
    "scvi": "scVI (NB)",
    "linear_scvi": "LinearSCVI (NB)",
    "pca": "PCA",
    "nmf": "NMF",
    "fa": "Factor analysis",
}
PAPER_ZEISEL = [
    ("Sparse VAE", "0.95 (0.003)"),
    ("VAE", "0.94 (0.016)"),
    ("NMF", "0.91 (0.007)"),
    ("VSC", "0.89 (0.062)"),
]


# ----------------------------------------------------------------------------- reading
def read_last_run(path: Path) -> list[dict[str, Any]]:
    """Records of the last run in a JSON-lines file (a run starts at a ``meta`` record)."""
    runs = read_runs(path)
    return runs[-1] if runs else []


def read_runs(path: Path) -> list[list[dict[str, Any]]]:
    """Records of every run in a JSON-lines file, in file order."""
    if not path.exists():
        return []
    runs: list[list[dict[str, Any]]] = [[]]
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        rec = json.loads(line)
        if rec.get("record") == "meta" or rec.get("name") == "meta":
            runs.append([])
        runs[-1].append(rec)
    return [r for r in runs if r]


def meta_of(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's meta record (empty if none)."""
    for r in records:
        if r.get("record") == "meta" or r.get("name") == "meta":
            return r
    return {}


def fmt(x: Any, digits: int = 3) -> str:
    """Format a number for a table (``-`` when missing)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, int | float):
        return f"{x:.{digits}f}"
    return str(x)


def pm(mean: Any, sd: Any, digits: int = 3) -> str:
    """``mean (sd)``."""
    if mean is None or (isinstance(mean, float) and not math.isfinite(mean)):
        return "-"
    return f"{mean:.{digits}f} ({sd:.{digits}f})"


def machine_line(machine: dict[str, Any]) -> str:
    """One line describing the machine of a run."""
    if not machine:
        return "unknown machine"
    parts = [
        machine.get("platform") or "",
        machine.get("cpu_model") or "",
        f"{machine.get('cpu_count')} CPUs",
        f"{machine.get('threads')} torch thread(s)",
        f"torch {machine.get('torch')}",
        f"scvi-tools {machine.get('scvi_tools')}",
    ]
    if machine.get("gpu"):
        parts.append(machine["gpu"])
    if machine.get("git"):
        parts.append(f"git {machine['git']}")
    if machine.get("loadavg_1m") is not None:
        parts.append(f"load average {machine['loadavg_1m']} at start")
    return ", ".join(p for p in parts if p)


def describe_mode(meta: dict[str, Any]) -> str:
    """The run's mode; a run recorded as ``full`` with less than the protocol reads ``reduced``."""
    mode = str(meta.get("mode", "?"))
    st = meta.get("settings", {})
    if mode != "full" or not st:
        return mode
    if meta.get("benchmark") == "identifiability" and (
        st.get("seeds", 25) < 25 or st.get("epochs", 300) < 300 or len(st.get("rhos", [])) < 5
    ):
        return f"reduced ({st.get('seeds')} seeds of the paper's 25)"
    if meta.get("benchmark") == "zeisel" and (
        st.get("seeds", 5) < 5 or st.get("epochs") is not None or st.get("n_cells") is not None
    ):
        return f"reduced ({st.get('seeds')} seed(s), epochs {st.get('epochs') or 'default'})"
    return mode


def run_header(meta: dict[str, Any]) -> list[str]:
    """Markdown lines: command, mode, start time, machine, note."""
    lines = [
        f"- Command: `{meta.get('command', '?')}`",
        f"- Mode: {describe_mode(meta)}; started {meta.get('started', '?')}",
        f"- Machine: {machine_line(meta.get('machine', {}))}",
    ]
    if meta.get("package_path"):
        lines.append(f"- Package imported from: `{meta['package_path']}`")
    if meta.get("note"):
        lines.append(f"- Note: {meta['note']}")
    return lines


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and population sd of the finite values."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / len(vals))


def check(ok: bool | None) -> str:
    """Met / not met / not measured."""
    return "not measured" if ok is None else ("**met**" if ok else "**not met**")


# ----------------------------------------------------------------------------- sections
def superseded(run: list[dict[str, Any]], later: list[list[dict[str, Any]]]) -> bool:
    """Whether a later identifiability run has the same settings and every fit this one has
    (the same method, rho and seed): a merged re-run that carries this run's fits forward."""
    free = {"methods", "note", "out", "threads", "rhos", "seeds"}

    def settings(r: list[dict[str, Any]]) -> dict[str, Any]:
        return {k: v for k, v in meta_of(r).get("settings", {}).items() if k not in free}

    def keys(r: list[dict[str, Any]]) -> set[tuple[Any, ...]]:
        return {(x["method"], x["rho"], x["seed"]) for x in r if x.get("record") == "fit"}

    own = keys(run)
    return bool(own) and any(
        settings(other) == settings(run) and own <= keys(other) for other in later
    )


def identifiability_section(runs: list[list[dict[str, Any]]], fig_dir: Path) -> list[str]:
    """Tables, figures and target checks of every identifiability run."""
    out = ["## 1. Identifiability on the paper's simulation", ""]
    if not runs:
        return [
            *out,
            "Not run yet: `PYTHONPATH=src python benchmarks/identifiability.py --seeds 25 "
            "--out benchmarks/results/identifiability.jsonl`.",
            "",
        ]
    runs = [r for i, r in enumerate(runs) if not superseded(r, runs[i + 1 :])]
    for i, records in enumerate(runs, start=1):
        meta = meta_of(records)
        if len(runs) > 1:
            methods = sorted({r["method"] for r in records if r.get("record") == "fit"})
            out += [f"### Run {i} ({describe_mode(meta)}; {', '.join(methods)})", ""]
        out += identifiability_run(records, fig_dir, i)
    return out


def identifiability_run(records: list[dict[str, Any]], fig_dir: Path, index: int) -> list[str]:
    """Tables, figure and target check of one identifiability run."""
    out: list[str] = []
    meta = meta_of(records)
    fits = [r for r in records if r.get("record") == "fit"]
    ok = [r for r in fits if "error" not in r]
    settings = meta.get("settings", {})
    out += run_header(meta)
    out += [
        f"- Settings: {settings.get('n_train')} training and {settings.get('n_test')} held-out "
        f"cells per data set, {settings.get('epochs')} epochs, "
        f"seeds 0..{settings.get('seeds', 0) - 1}, 2 latent codes; {len(ok)} fits "
        f"({len(fits) - len(ok)} failed, "
        f"{sum(bool(r.get('collapsed')) for r in ok)} collapsed and scored 0).",
        "",
        "`simulate_moran2022`: 7 features from 2 factors with correlation rho; DCI by "
        "`sparsevae.tl.dci` (gradient-boosted trees, Eastwood and Williams 2018). Mask AUROC: "
        "row-normalised mean |decoder Jacobian| x code sd against the true 7 x 2 mask, codes "
        "matched to factors by |Spearman| (any method). Held-out MSE per standardised feature "
        "(posterior-mean codes, decoded means). Mean (sd) over seeds.",
        "",
    ]
    rhos = sorted({r["rho"] for r in ok})
    methods = [m for m in ID_METHODS if any(r["method"] == m for r in ok)]
    groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in ok:
        groups[(r["method"], r["rho"])].append(r)

    def table(
        key: str, title: str, digits: int = 3, only: tuple[str, ...] | None = None
    ) -> list[str]:
        lines = [f"**{title}**", "", "| method | " + " | ".join(f"rho={x:g}" for x in rhos) + " |"]
        lines.append("|---|" + "---|" * len(rhos))
        for m in methods:
            if only is not None and m not in only:
                continue
            cells = []
            for rho in rhos:
                vals = [r.get(key) for r in groups[(m, rho)] if r.get(key) is not None]
                cells.append(pm(*mean_sd(vals), digits=digits) if vals else "-")
            lines.append(f"| {ID_LABELS.get(m, m)} | " + " | ".join(cells) + " |")
        return [*lines, ""]

    out += table("dci_disentanglement", "DCI disentanglement (higher is better)")
    out += table("dci_completeness", "DCI completeness")
    out += table("dci_informativeness", "DCI informativeness (test R^2 of the trees)")
    out += table("heldout_mse_std", "Held-out MSE, standardised features (lower is better)")
    out += table("mask_auroc", "Mask recovery AUROC (decoder Jacobian)")
    sparse_methods = tuple(m for m in methods if m.startswith("sparsevae"))
    if sparse_methods:
        out += table(
            "mask_pstar_accuracy",
            "Sparse VAE: share of mask entries right (p* > 0.5)",
            only=sparse_methods,
        )

    # Figure.
    fig_path = fig_dir / f"bench_identifiability_dci_{index}.png"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for m in methods:
            ms = [mean_sd([r["dci_disentanglement"] for r in groups[(m, rho)]]) for rho in rhos]
            axes[0].errorbar(
                rhos,
                [a for a, _ in ms],
                yerr=[b for _, b in ms],
                marker="o",
                capsize=3,
                label=ID_LABELS.get(m, m),
            )
            ms = [mean_sd([r["heldout_mse_std"] for r in groups[(m, rho)]]) for rho in rhos]
            axes[1].errorbar(
                rhos,
                [a for a, _ in ms],
                yerr=[b for _, b in ms],
                marker="o",
                capsize=3,
                label=ID_LABELS.get(m, m),
            )
        axes[0].set(xlabel="factor correlation rho", ylabel="DCI disentanglement", ylim=(0, 1.02))
        axes[1].set(xlabel="factor correlation rho", ylabel="held-out MSE (standardised)")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(fig_path, dpi=120)
        plt.close(fig)
        out += [f"![DCI and held-out MSE versus rho](figures/{fig_path.name})", ""]
    except Exception as err:  # matplotlib missing or broken: tables only
        out += [f"(figure not drawn: {err})", ""]

    # Targets.
    def m_of(method: str, rho: float, key: str) -> float:
        return mean_sd([r.get(key) for r in groups[(method, rho)]])[0]

    for ours in sparse_methods if "vae" in methods else ():
        name = ID_LABELS[ours]
        d_ours = {rho: m_of(ours, rho, "dci_disentanglement") for rho in rhos}
        d_vae = {rho: m_of("vae", rho, "dci_disentanglement") for rho in rhos}
        below_vae = [rho for rho in rhos if d_ours[rho] < d_vae[rho]]
        ge_vae = not below_vae
        low = [rho for rho in rhos if rho <= 0.4]
        below_09 = [rho for rho in low if d_ours[rho] < 0.9]
        hi = not below_09 if low else None
        ratios = [
            m_of(ours, rho, "heldout_mse_std") / m_of("vae", rho, "heldout_mse_std") for rho in rhos
        ]
        mse = all(r <= 1.05 for r in ratios)
        quick = " (quick run: not a test of the targets)" if meta.get("mode") == "quick" else ""
        out += [
            f"**Targets, {name}** (on the means over seeds){quick}:",
            "",
            f"- {name} DCI >= VAE's at every rho: {check(ge_vae)}"
            + (
                " (below at rho = "
                + ", ".join(f"{r:g}: {d_ours[r]:.3f} vs {d_vae[r]:.3f}" for r in below_vae)
                + ")"
                if below_vae
                else ""
            ),
            f"- {name} DCI >= 0.9 at rho <= 0.4: {check(hi)}"
            + (
                " (below at rho = " + ", ".join(f"{r:g}: {d_ours[r]:.3f}" for r in below_09) + ")"
                if below_09
                else ""
            ),
            f"- {name} held-out MSE no worse than VAE's (at most 5% above) at every rho: "
            f"{check(mse)}; ratio to VAE by rho: " + ", ".join(f"{r:.2f}" for r in ratios),
            "",
        ]
        out += identifiability_analysis(groups, rhos, ours)
    return out


def _codes_selecting(fits: list[dict[str, Any]]) -> list[tuple[Any, int]]:
    """Per fit with ``p*``: the number of features each code selects (``p* > 0.5``) and the
    number of features."""
    import numpy as np

    return [
        ((np.asarray(r["pstar"]) > 0.5).sum(axis=0), len(r["pstar"]))
        for r in fits
        if r.get("pstar") is not None
    ]


def switched_off(fits: list[dict[str, Any]]) -> int:
    """Number of fits with a code that selects no feature (no ``p* > 0.5``)."""
    return sum(int((n == 0).any()) for n, _ in _codes_selecting(fits))


def code_selects_everything(fits: list[dict[str, Any]]) -> int:
    """Number of fits with a code that selects every feature."""
    return sum(int((n == g).any()) for n, g in _codes_selecting(fits))


def identifiability_analysis(
    groups: dict[tuple[str, float], list[dict[str, Any]]],
    rhos: list[float],
    method: str = "sparsevae",
) -> list[str]:
    """Counts, from the fit records, of the two ways Sparse VAE fits fall short."""
    label = ID_LABELS.get(method, method)
    lines = [f"**What the {label} fits show** (counted from the fit records):", ""]
    for rho in rhos:
        fits = [r for r in groups[(method, rho)] if r.get("pstar") is not None]
        if not fits:
            continue
        n_off, n_all = switched_off(fits), code_selects_everything(fits)
        lines.append(
            f"- rho={rho:g}: {len(fits)} {label} fits; one code switched off (no feature with "
            f"p* > 0.5) in {n_off}; a code selecting every feature in {n_all}."
        )
    if method == "sparsevae":
        lines += [
            "",
            "With correlated factors the fits settle on decorrelated codes: one code follows "
            "one factor and selects every feature, the other follows what is left of the second "
            "factor. The N(0, I) prior on the codes charges correlated codes about -0.5 log "
            "det(corr) nats per cell (the aggregate posterior's mismatch with the prior), far "
            "more than the mask penalty (scaled by 1/N per cell, as a prior should be) rewards "
            "the sparse solution. At high rho the prior then switches the second code off, "
            "which is why the held-out error rises there. A smaller `b` (1 instead of G) kept "
            "both codes on but left the mask dense (DCI about 0.2-0.25 at rho = 0.6; measured "
            "on 3 seeds outside this run), so it is not a fix; the correlated prior "
            '(`latent_prior="correlated"`) removes the charge.',
            "",
        ]
        return lines
    low = []
    for rho in rhos:
        bad = [r["seed"] for r in groups[(method, rho)] if r["dci_disentanglement"] < 0.5]
        if bad:
            low.append(f"rho={rho:g}: seeds {', '.join(str(b) for b in bad)}")
    low_text = "; ".join(low) if low else "none"
    if method.endswith("_sched"):
        base = method.removesuffix("_sched")
        change = [
            f"rho={rho:g}: {switched_off(groups[(base, rho)])} without, "
            f"{switched_off(groups[(method, rho)])} with"
            for rho in rhos
            if groups.get((base, rho))
            and switched_off(groups[(base, rho)]) != switched_off(groups[(method, rho)])
        ]
        lines += [
            "",
            "The prior schedule (the count likelihoods' default: no mask penalty for the first "
            "20% of the epochs, then a ladder of spike rates with `eta` held at 0.5, then the "
            "full prior) lets both codes learn a factor before the prior can switch one off. "
            f"Fits with a code switched off, against {ID_LABELS.get(base, base)} without the "
            f"schedule: {'; '.join(change) if change else 'no change'}. It can go wrong the "
            "other way: with `eta` held, one code may come to select every feature and carry "
            f"both factors while the other is left with little. Fits with DCI < 0.5: {low_text}.",
            "",
        ]
    else:
        lines += [
            "",
            "With a learned correlation R the codes may stay correlated, so the fit no longer "
            "pays for keeping the sparse mask. Its failures: both codes can follow the same "
            "factor (the prior allows near-duplicate codes) and the other factor is lost, seen "
            "while R was learned from the first step (runs before commit 0bb389b; R is now held "
            "at the identity for the first 20 epochs, `train(n_epochs_fixed_correlation=)`); "
            "and at high rho one code is switched off, as with N(0, I) (counts above). Fits "
            f"with DCI < 0.5: {low_text}.",
            "",
        ]
    return lines


def zeisel_section(records: list[dict[str, Any]], fig_dir: Path) -> list[str]:
    """Tables and target check of the Zeisel benchmark."""
    out = ["## 2. Cell-type prediction on Zeisel et al. (2015)", ""]
    if not records:
        return [
            *out,
            "Not run yet: `PYTHONPATH=src python benchmarks/zeisel.py "
            "--out benchmarks/results/zeisel.jsonl`.",
            "",
        ]
    meta = meta_of(records)
    fits = [r for r in records if r.get("record") == "fit"]
    ok = [r for r in fits if "error" not in r]
    st = meta.get("settings", {})
    out += run_header(meta)
    out += [
        f"- Data: {meta.get('shape', ['?', '?'])[0]} cells x {meta.get('shape', ['?', '?'])[1]} "
        f"genes, 15 factors, {st.get('seeds')} seed(s), {int(100 * (st.get('heldout') or 0))}% "
        f"of cells held out; SparseVAE/VAE epochs: {st.get('epochs') or 'package default'}, "
        f"scVI epochs: {st.get('scvi_epochs') or 'scvi-tools default'}.",
        "",
        "Accuracy: 5-fold cross-validated logistic regression on the factors of all cells "
        "(`sparsevae.tl.celltype_accuracy`); mean (sd) over seeds. Held-out NLL per cell given "
        "its posterior-mean factors (compare within a likelihood: NB on counts, Gaussian on "
        "log-normalised values). Held-out MSE on the log-normalised scale (all methods; it "
        "favours the methods that fit that scale directly).",
        "",
    ]
    if meta.get("mode") == "quick":
        out += [
            "> Quick mode: a subsample, few genes and a few epochs. These numbers check that the "
            "script runs; they say nothing about the methods.",
            "",
        ]
    if fits and len(ok) < len(fits):
        errs = sorted({f"{r['method']}: {r['error']}" for r in fits if "error" in r})
        out += ["Failed fits: " + "; ".join(errs), ""]
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in ok:
        groups[r["method"]].append(r)
    out += [
        "| method | accuracy | held-out NLL | held-out MSE (log-norm.) | active factors "
        "| factors with >= 2 anchors | anchors per factor (seed 0) | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    # PCA with fewer components (pca_k<K>) after the 15-factor methods, by K.
    pca_k = sorted((m for m in groups if m.startswith("pca_k")), key=lambda m: int(m[5:]))
    # The methods in the order of Z_LABELS (sparse models first), then any others.
    order = sorted((m for m in groups if m not in pca_k), key=z_rank) + pca_k
    for m in order:
        rs = groups[m]
        anchors = rs[0].get("anchors_per_factor")
        if len(rs) == 1:  # one seed: show the spread over the folds instead of a zero sd
            acc_cell = f"{rs[0]['accuracy']:.3f} (folds: {rs[0].get('accuracy_fold_sd', 0):.3f})"
        else:
            acc_cell = pm(*mean_sd([r["accuracy"] for r in rs]))
        out.append(
            f"| {z_label(m)} | {acc_cell} "
            f"| {pm(*mean_sd([r.get('heldout_nll') for r in rs]), digits=1)} "
            f"| {pm(*mean_sd([r.get('heldout_mse_lognorm') for r in rs]))} "
            f"| {fmt(mean_sd([r.get('active_factors') for r in rs])[0], 1)} "
            f"| {fmt(mean_sd([r.get('factors_with_2_anchors') for r in rs])[0], 1)} "
            f"| {', '.join(map(str, anchors)) if anchors else '-'} "
            f"| {fmt(mean_sd([r.get('train_seconds') for r in rs])[0], 0)} |"
        )
    out += ["", "The paper's table (accuracy, mean (sd) over 5 seeds):", ""]
    out += ["| method | accuracy |", "|---|---|"]
    out += [f"| {a} | {b} |" for a, b in PAPER_ZEISEL]
    out.append("")

    def acc(m: str) -> float:
        return mean_sd([r["accuracy"] for r in groups.get(m, [])])[0]

    ours = [m for m in ("sparsevae_nb", "sparsevae_nb_corr", "sparsevae_gaussian") if m in groups]
    if ours:
        best = max(ours, key=acc)
        others = [m for m in groups if not m.startswith(("sparsevae", "pca_k"))]
        beat = all(acc(best) >= acc(m) for m in others) if others else None
        nll_pairs = [
            (a, b)
            for a, b in (
                ("sparsevae_nb", "vae_nb"),
                ("sparsevae_nb_corr", "vae_nb"),
                ("sparsevae_gaussian", "vae_gaussian"),
            )
            if a in groups and b in groups
        ]
        nll_ok = (
            all(
                mean_sd([r["heldout_nll"] for r in groups[a]])[0]
                <= mean_sd([r["heldout_nll"] for r in groups[b]])[0]
                for a, b in nll_pairs
            )
            if nll_pairs
            else None
        )
        quick = " (quick run: not a test of the targets)" if meta.get("mode") == "quick" else ""
        higher = sorted((m for m in others if acc(m) > acc(best)), key=acc, reverse=True)

        def nll(m: str) -> float:
            return mean_sd([r["heldout_nll"] for r in groups[m]])[0]

        nll_detail = "; ".join(f"{nll(a):.1f} vs {nll(b):.1f} ({a} vs {b})" for a, b in nll_pairs)
        out += [
            f"**Targets** (best Sparse VAE variant: {Z_LABELS[best]}, accuracy {acc(best):.3f})"
            f"{quick}:",
            "",
            f"- accuracy >= 0.95: {check(acc(best) >= 0.95)}",
            f"- at least as high as every baseline in the same run: {check(beat)}"
            + (
                " (higher: " + ", ".join(f"{Z_LABELS.get(m, m)} {acc(m):.3f}" for m in higher) + ")"
                if higher
                else ""
            ),
            f"- held-out NLL no worse than the VAE with the same likelihood: {check(nll_ok)}"
            + (f" ({nll_detail})" if nll_detail else ""),
            *mask_target_lines(groups.get("sparsevae_nb", []), records),
            "",
        ]
        if "sparsevae_nb" in groups:
            out += [ZEISEL_WHY, ""]
        out += factors_used_lines(groups, ours, acc)
    out += zeisel_stability_lines(records)
    return out


#: Why the Sparse VAE's mask and fit targets on Zeisel are hard to meet together; the figures
#: behind it are in the user guide (kept there, so that this text does not go stale).
ZEISEL_WHY = (
    'Why targets are missed (measurements: user guide, "Why the defaults are what they are", '
    "`n_epochs_mask_average`): the neuron-glia factor selects about 800 of the 1000 genes, and "
    "the likelihood wants nearly all of those entries (closing one costs the fit far more than "
    "the prior charges for keeping it: `benchmarks/entry_evidence.py`), so the other factors "
    "find anchors only among the genes it leaves, and whether a gene is an anchor turns on "
    "secondary entries held near the selection threshold (`p*` near 0.5) that differ a little "
    "between starts: the matched factors agree (|r|) while the anchor sets differ. A stricter "
    "decision (`p* >= 0.6`) gave steadier anchors on Zeisel but a clearly worse held-out NLL, "
    "and halved the anchor agreement on pbmc68k_reduced; dropping the entries the likelihood "
    "does not pay for changed it little on either. Those secondary entries are what the dense "
    "VAE and the linear methods keep, so sparser masks cost held-out NLL and accuracy. The "
    "VAE with the same likelihood and network uses 9-10 of its 15 factors (those whose "
    "posterior differs from the prior; `factors_in_use` of `zeisel.py`), so at least 10 active "
    "factors asks for about as many as the data give the VAE."
)


def mask_target_lines(fits: list[dict[str, Any]], records: list[dict[str, Any]]) -> list[str]:
    """Issue 20's mask and stability targets for the Sparse VAE on counts (``sparsevae_nb``):
    per fit, at least 10 active factors, every active factor identifiable, a median selected
    share of at most 20% of the genes; across seeds, median matched |r| >= 0.9 and anchor-set
    Jaccard >= 0.5."""
    fits = [r for r in fits if r.get("active_factors") is not None]
    if not fits:
        return []
    active = [r["active_factors"] for r in fits]
    ident = [r.get("identifiable_factors") for r in fits]
    share = [r.get("median_selected_share") for r in fits]
    lines = [
        f"- Sparse VAE (NB): at least 10 active factors in every fit: {check(min(active) >= 10)} "
        f"({min(active)}-{max(active)})",
        "- every active factor identifiable (>= 2 anchors) in every fit: "
        f"{check(all(i == a for i, a in zip(ident, active, strict=True)))} "
        f"({', '.join(f'{i} of {a}' for i, a in zip(ident, active, strict=True))})",
    ]
    if all(x is not None for x in share):
        lines.append(
            f"- median selected genes per active factor <= 20% of genes in every fit: "
            f"{check(max(share) <= 0.2)} ({min(share):.1%}-{max(share):.1%})"
        )
    stab = [
        r
        for r in records
        if r.get("record") == "stability"
        and r.get("method") == "sparsevae_nb"
        and not r.get("partial")
    ]
    for r in stab:
        jac = r.get("median_jaccard_anchors")
        lines.append(
            f"- factors across seeds (median matched |r| >= 0.9): "
            f"{check(r['median_abs_r'] >= 0.9)} ({r['median_abs_r']:.3f}); anchor sets (median "
            f"Jaccard >= 0.5): {check(jac is not None and jac >= 0.5)} ({fmt(jac, 3)})"
        )
    return lines


def zeisel_stability_lines(records: list[dict[str, Any]]) -> list[str]:
    """The table of the run's ``stability`` lines (``tl.factor_stability`` over its seeds)."""
    stab = [r for r in records if r.get("record") == "stability" and not r.get("partial")]
    if not stab:
        return []
    lines = [
        "**Stability across random starts** (`sparsevae.tl.factor_stability` over the fits of "
        "all cells, the first seed as the reference; the issue's targets: median matched |r| "
        ">= 0.9 and median anchor-set Jaccard >= 0.5). A VAE's factors are identified only up "
        "to a rotation, so its matches are the baseline.",
        "",
        "| method | seeds | median matched abs r | median anchor Jaccard | reproducible / active |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(stab, key=lambda r: z_rank(r.get("method", "?"))):
        seeds = r.get("seeds")
        seed_text = ", ".join(str(x) for x in seeds) if seeds else str(r.get("n_fits", "?"))
        jac = r.get("median_jaccard_anchors")
        lines.append(
            f"| {z_label(r.get('method', '?'))} | {seed_text} | {fmt(r.get('median_abs_r'), 3)} "
            f"| {'-' if jac is None else fmt(jac, 3)} | {r.get('reproducible_factors', '-')} / "
            f"{r.get('active_reference_factors', '-')} |"
        )
    return [*lines, ""]


def z_rank(method: str) -> int:
    """Position of a Zeisel method in the report's tables: the order of :data:`Z_LABELS`."""
    labels = list(Z_LABELS)
    return labels.index(method) if method in labels else len(labels)


def z_label(method: str) -> str:
    """Row label of a Zeisel method (``pca_k<K>``: PCA with ``K`` components)."""
    if method.startswith("pca_k"):
        return f"PCA, {method[5:]} components"
    return Z_LABELS.get(method, method)


def factors_used_lines(
    groups: dict[str, list[dict[str, Any]]], ours: list[str], acc: Any
) -> list[str]:
    """Accuracy against the number of factors in use: PCA with K components (``pca_k<K>``)
    next to the Sparse VAE variants' active factors."""
    pca_k = sorted((m for m in groups if m.startswith("pca_k")), key=lambda m: int(m[5:]))
    if not pca_k:
        return []
    curve = {int(m[5:]): acc(m) for m in pca_k}
    if "pca" in groups:
        curve[15] = acc("pca")
    points = ", ".join(f"{k}: {a:.3f}" for k, a in sorted(curve.items()))
    lines = [
        "**Accuracy and the number of factors in use.** PCA's accuracy by number of "
        f"components: {points}. The baselines use all 15 factors; the Sparse VAE's prior "
        "switches off the factors the data do not need (`active factors` above: factors "
        "selecting at least one gene). Each Sparse VAE variant next to PCA with the number of "
        "components nearest to its mean number of active factors:"
    ]
    for m in ours:
        active = mean_sd([r.get("active_factors") for r in groups[m]])[0]
        if math.isnan(active):
            continue
        k = min(curve, key=lambda c: (abs(c - active), c))
        near = f"; PCA with {k} components: {curve[k]:.3f}"
        lines.append(
            f"- {Z_LABELS.get(m, m)}: {active:.1f} active factors, accuracy {acc(m):.3f}{near}."
        )
    return [lines[0], "", *lines[1:], ""]


def slopes(cost: dict[str, Any], axis: str) -> str:
    """``measured / model`` log-log slope of time along one axis."""
    m = cost.get(f"loglog_slope_{axis}")
    if m is None:
        return "-"
    return f"{m:.2f} / {fmt(cost.get(f'model_loglog_slope_{axis}'), 2)}"


def speed_section(
    scaling: list[dict[str, Any]], zeisel_shape: list[dict[str, Any]], fig_dir: Path
) -> list[str]:
    """Tables, figures and cost-model check of the speed benchmarks."""
    out = ["## 3. Speed and scaling", ""]
    if zeisel_shape:
        meta = meta_of(zeisel_shape)
        out += ["### At the Zeisel shape (3005 cells x 558 genes)", ""]
        out += run_header(meta)
        out += ["", "| configuration | s / epoch | peak RSS increase (MiB) |", "|---|---|---|"]
        for r in zeisel_shape:
            if "s_per_epoch" in r:
                out.append(
                    f"| {r['name']} | {fmt(r['s_per_epoch'], 2)}"
                    f"{' (extrapolated)' if r.get('extrapolated') else ''} "
                    f"| {fmt(r.get('peak_rss_increase_mib'), 0)} |"
                )
        for r in zeisel_shape:
            if "ratio" in r:
                out.append(f"| ratio {r['name']} ({r['meaning']}) | {fmt(r['ratio'], 2)} | |")
        out.append("")
    if not scaling:
        return [
            *out,
            "Scaling not run yet: `PYTHONPATH=src python benchmarks/speed.py --scaling "
            "--out benchmarks/results/speed_scaling.jsonl`.",
            "",
        ]
    meta = meta_of(scaling)
    rows = [r for r in scaling if str(r.get("name", "")).startswith("scaling:")]
    try:  # refit with the current cost model code, so the report follows it
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from speed import cost_models

        costs = cost_models(rows)
    except Exception:  # fall back on the fits printed by the run
        costs = [r for r in scaling if r.get("name") == "cost_model"]
    out += ["### Scaling with cells, genes and hidden width", ""]
    out += run_header(meta)
    out += [
        "",
        "Simulated NB counts (`simulate_programs`), 15 factors, minibatches of 128. Seconds per "
        "epoch = time per minibatch in the second of two short epochs x minibatches per epoch "
        "(extrapolated where fewer minibatches were run). Wall time depends on how busy the "
        "shared machine was (see the load average above); with one torch thread, process CPU "
        "time does not, so the figure and the cost model use CPU time when it was recorded. "
        "Memory: largest sampled resident set size during training minus the size at its start.",
        "",
    ]
    if meta.get("mode") == "quick":
        out += ["> Quick mode: a few small shapes only.", ""]
    out += [
        "| model | cells | genes | hidden | wall s / epoch | CPU s / epoch | CPU s / minibatch "
        "| training RSS increase (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['name']} | error: {r['error']} | | | | | | |")
            continue
        sh = r["shape"]
        out.append(
            f"| {r['model']} | {sh['n_cells']} | {sh['n_genes']} | {sh['n_hidden']} "
            f"| {fmt(r['s_per_epoch'], 2)}{'*' if r.get('extrapolated') else ''} "
            f"| {fmt(r.get('cpu_s_per_epoch'), 2)} | {fmt(r.get('cpu_s_per_batch'), 4)} "
            f"| {fmt(r.get('train_rss_increase_mib'), 0)} |"
        )
    out += ["", "`*` extrapolated from the timed minibatches.", ""]
    if costs:
        out += [
            "**Cost model.** SparseVAE: every gene runs the shared network on its own masked "
            "factors, so an epoch costs `t = a N + b N G (K H + (L-1) H^2 + H)` (N cells, G genes,"
            " K factors, H hidden width, L decoder layers): linear in cells and genes, quadratic "
            "in H once H >> K; saved activations grow as batch x G x H x L, not with N. "
            "scVI/LinearSCVI: `t = a N + b N G H`, linear in cells, genes and H. Fitted by "
            "least squares on relative errors:",
            "",
            "| model | formula | time | b (s per unit) | effective GFLOP/s | max / median "
            "relative error | log-log slope in cells | in genes | in hidden |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in costs:
            out.append(
                f"| {c['model']} | `{c['formula']}` | {c.get('time', 'wall time')} "
                f"| {c['b_s_per_unit']:.3g} "
                f"| {fmt(c.get('effective_gflops'), 1)} "
                f"| {fmt(c['max_abs_rel_error'], 2)} / {fmt(c['median_abs_rel_error'], 2)} "
                f"| {slopes(c, 'cells')} | {slopes(c, 'genes')} | {slopes(c, 'hidden')} |"
            )
        for c in costs:
            if "memory_c1" in c:
                out += [
                    "",
                    f"Memory ({c['model']}): `{c['memory_model']}` fits with c0 = "
                    f"{c['memory_c0_mib']:.0f} MiB and c1 = {c['memory_c1']:.2f} (the training "
                    "working set is that many times one minibatch's saved decoder activations), "
                    f"largest relative error {c['memory_max_abs_rel_error']:.2f}; log-log slope of "
                    f"memory in cells: {fmt(c.get('memory_loglog_slope_cells'), 2)} (0: the "
                    "number of cells does not matter).",
                ]
        out += [
            "",
            "Log-log slopes are given as measured / predicted by the fitted model at the same "
            "shapes. The per-cell term `a N` (encoder, data loading, optimiser step) makes the "
            "slope in genes fall below 1 where genes are few; for SparseVAE, the FLOP count "
            "grows faster with H than the time does, because wider layers run at a higher FLOP "
            "rate.",
            "",
        ]
    fig_path = fig_dir / "bench_speed_scaling.png"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ok = [r for r in rows if "s_per_epoch" in r]
        tkey = "cpu_s_per_epoch" if all("cpu_s_per_epoch" in r for r in ok) else "s_per_epoch"
        fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))

        def most_common(rs: list[dict[str, Any]], key: str) -> int:
            values = [r["shape"][key] for r in rs]
            return max(set(values), key=values.count)

        def series(rs: list[dict[str, Any]], axis: str, fixed: dict[str, int]) -> list[Any]:
            pts = [
                (r["shape"][axis], r[tkey], r.get("train_rss_increase_mib") or 0.0)
                for r in rs
                if all(r["shape"][k] == v for k, v in fixed.items())
            ]
            return sorted(pts)

        colors = {"sparsevae": "C2", "scvi": "C1", "linear_scvi": "C0"}
        for model in sorted({r["model"] for r in ok}):
            rs = [r for r in ok if r["model"] == model]
            c = colors.get(model)
            n0, g0, h0 = (most_common(rs, k) for k in ("n_cells", "n_genes", "n_hidden"))
            by_n = series(rs, "n_cells", {"n_genes": g0, "n_hidden": h0})
            by_g = series(rs, "n_genes", {"n_cells": n0, "n_hidden": h0})
            by_h = series(rs, "n_hidden", {"n_cells": n0, "n_genes": g0})
            if len(by_n) > 1:
                axes[0].plot(
                    [p[0] for p in by_n],
                    [p[1] for p in by_n],
                    marker="o",
                    color=c,
                    label=f"{model} ({g0} genes)",
                )
            if len(by_g) > 1:
                axes[1].plot(
                    [p[0] for p in by_g],
                    [p[1] for p in by_g],
                    marker="o",
                    color=c,
                    label=f"{model} ({n0} cells)",
                )
                axes[2].plot(
                    [p[0] for p in by_g], [p[2] for p in by_g], marker="o", color=c, label=model
                )
            if len(by_h) > 1:
                axes[3].plot(
                    [p[0] for p in by_h],
                    [p[1] for p in by_h],
                    marker="o",
                    color=c,
                    label=f"{model} ({n0} x {g0})",
                )
        ylabel = "CPU s / epoch" if tkey == "cpu_s_per_epoch" else "s / epoch"
        axes[0].set(xscale="log", yscale="log", xlabel="cells", ylabel=ylabel)
        axes[1].set(xscale="log", yscale="log", xlabel="genes", ylabel=ylabel)
        axes[2].set(xscale="log", xlabel="genes", ylabel="training RSS increase (MiB)")
        axes[3].set(xscale="log", yscale="log", xlabel="hidden width", ylabel=ylabel)
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        for ax, key in zip(axes, ("n_cells", "n_genes", "n_genes", "n_hidden"), strict=True):
            ticks = sorted({r["shape"][key] for r in ok})
            if ticks and key != "n_cells":
                ax.set_xticks(ticks)
                ax.xaxis.set_major_formatter(ScalarFormatter())
                ax.xaxis.set_minor_formatter(NullFormatter())
                ax.tick_params(axis="x", labelrotation=45)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(fig_path, dpi=120)
        plt.close(fig)
        out += [f"![Seconds per epoch and memory versus shape](figures/{fig_path.name})", ""]
    except Exception as err:
        out += [f"(figure not drawn: {err})", ""]
    return out


def this_machine() -> str:
    """The machine the report is generated on."""
    try:
        import torch

        tv = torch.__version__
    except ImportError:
        tv = "not installed"
    return (
        f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"torch {tv}"
    )


def check_cell(x: dict[str, Any]) -> str:
    """The table cell for a fit's ``check_shared_specific`` verdict."""
    if "check_ok" not in x:
        return "-"
    if x["check_ok"]:
        return "ok"
    flagged = []
    for problem in x["check_problems"]:
        if problem.startswith("shared factor "):
            flagged.append(problem.split()[2])  # "shared factor NAME (...) varies in ..."
        else:  # "specific factors A, B, C select the same ..."
            factors = problem.removeprefix("specific factors ").split(" select")[0]
            flagged.append(f"repeated {factors}")
    return "flagged: " + "; ".join(flagged)


def multistudy_fit_table(records: list[dict[str, Any]], is_fit: Any) -> list[str]:
    """One multi-study fit run: its header, the per-fit table and the summary lines."""
    meta = meta_of(records)
    fits = [x for x in records if is_fit(x)]
    out = (
        run_header(meta)
        if meta
        else [
            "- Command: not recorded in the file (written before the script printed a meta "
            "record); the settings are in each line.",
        ]
    )
    f0 = fits[0]
    out += [
        f"- Simulation: {f0['n_genes']} genes, {f0['n_shared']} shared programs and "
        f"{f0['n_specific']} per study, {f0['n_cells_per_study']} cells per study; "
        f"{f0['max_epochs']} epochs; `n_epochs_shared_first` = "
        f"{f0.get('n_epochs_shared_first', 'package default')}.",
        "",
        "| studies | extra | seed | shared F1 (per program) | specific F1 (per study) "
        "| absorbed | check | accuracy, shared factors | accuracy, true factors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for x in fits:
        spec = ", ".join(f"{v[0]:.2f}" if len(v) == 1 else str(v)
                         for v in x["f1_specific"].values())  # fmt: skip
        shared = ", ".join(f"{v:.2f}" for v in x["f1_shared"])
        out.append(
            f"| {x['n_studies']} | {x.get('extra_factors', 0)} | {x['seed']} | {shared} "
            f"| {spec} | {x['absorbed']:.2f} | {check_cell(x)} "
            f"| {x['celltype_accuracy_shared']:.3f} "
            f"| {x['celltype_accuracy_true_factors']:.3f} |"
        )
    good = [
        x for x in fits
        if min(x["f1_shared"]) >= 0.8
        and min(v for vs in x["f1_specific"].values() for v in vs) >= 0.8
    ]  # fmt: skip
    bad = [x for x in fits if x not in good]
    out += [
        "",
        f"Fits with every mask's F1 >= 0.8: {len(good)} of {len(fits)}. Of the others, "
        f"{sum(x['absorbed'] > 0.2 for x in bad)} are role swaps (`absorbed` > 0.2: the "
        "shared mask selects more than 20% of the specific programs' genes, a shared "
        "factor carries the studies' own programs and the specific masks take a shared "
        "program or nothing) and "
        f"{sum(max(x['f1_shared']) == 0 and x['absorbed'] == 0 for x in bad)} lost every "
        "program (no mask matches any program: the prior switched the factors off).",
    ]
    checked = [x for x in fits if "check_ok" in x]
    if checked:
        # Lost everything: no factor selects genes, so the check has nothing to look at
        # (train()'s collapse warning covers it).
        lost = [
            x for x in checked
            if max(x["f1_shared"]) == 0
            and max(v for vs in x["f1_specific"].values() for v in vs) == 0
        ]  # fmt: skip
        # Misassigned: a study's program in the shared mask, or a mask that misses its program.
        wrong = [x for x in checked if (x in bad or x["absorbed"] > 0.2) and x not in lost]
        right = [x for x in checked if x not in wrong and x not in lost]
        out += [
            "",
            "The fits' own checks (`check_shared_specific`, no truth needed): "
            f"{sum(not x['check_ok'] for x in wrong)} of {len(wrong)} misassigned fits (a "
            "mask F1 < 0.8 or `absorbed` > 0.2) flagged; "
            f"{sum(not x['check_ok'] for x in right)} of {len(right)} right fits flagged. "
            "Misassignments within one mask (two programs merged into one factor, or one "
            "lost) are not what the check looks for."
            + (
                f" Not counted: {len(lost)} fit(s) that lost every program, which the check "
                "cannot judge (no factor selects a gene; `train()` warns of that instead)."
                if lost
                else ""
            ),
        ]
    return [*out, ""]


def multistudy_section(runs: list[list[dict[str, Any]]]) -> list[str]:
    """Mask recovery and cost of the multi-study model (``benchmarks/multistudy.py``)."""
    out = ["## 4. Multi-study model", ""]

    def is_fit(x: dict[str, Any]) -> bool:
        return x.get("benchmark") == "multistudy" and x.get("record") != "meta"

    fit_runs = [r for r in runs if any(is_fit(x) for x in r)]
    cost_runs = [r for r in runs if any(x.get("benchmark") == "multistudy_cost" for x in r)]
    if not fit_runs and not cost_runs:
        return [
            *out,
            "Not run yet: `PYTHONPATH=src python benchmarks/multistudy.py > "
            "benchmarks/results/multistudy.jsonl`.",
            "",
        ]
    out += [
        "`simulate_multistudy`: shared programs active in every study and one specific program "
        "per study, nonlinear maps, negative binomial counts; the model is fitted with the true "
        "numbers of shared and specific factors (extra = 0) or with surplus factors per mask. "
        "F1: learned factors matched to true programs "
        "(Hungarian algorithm on gene-set F1, selection p* >= 0.5). `absorbed`: share of the "
        "specific programs' genes that the shared mask selects (0 is right). Cell-type accuracy: "
        "5-fold logistic regression on the shared factors, next to the same on the true shared "
        "factors. Check: the verdict of `sparsevae.tl.check_shared_specific`, which needs no "
        "truth (ok, or the flagged shared factor / repeated program).",
        "",
    ]
    # The last run of each simulation size (the default benchmark and --tutorial-size).
    last_by_size: dict[tuple, list[dict[str, Any]]] = {}
    for run in fit_runs:
        f0 = next(x for x in run if is_fit(x))
        key = (f0["n_genes"], f0["n_shared"], f0["n_specific"], f0["n_cells_per_study"])
        last_by_size.pop(key, None)
        last_by_size[key] = run
    for records in last_by_size.values():
        out += multistudy_fit_table(records, is_fit)
    if cost_runs:
        records = cost_runs[-1]
        meta = meta_of(records)
        costs = [x for x in records if x.get("benchmark") == "multistudy_cost"]
        out += ["**Cost of the per-cell mask gather**", ""]
        out += [*run_header(meta), ""] if meta else []
        out += [
            "Seconds per training epoch of the multi-study model and of a single-study model "
            "with the same number of factors (same data, width and batch size), measured in the "
            "same process:",
            "",
            "| studies | cells | single-study s/epoch | multi-study s/epoch | ratio |",
            "|---|---|---|---|---|",
        ]
        for c in costs:
            out.append(
                f"| {c['n_studies']} | {c['n_cells']} | {c['seconds_per_epoch_single']:.2f} "
                f"| {c['seconds_per_epoch_multi']:.2f} | {c['cost_ratio']:.2f} |"
            )
        out.append("")
    return out


Row = Callable[[dict[str, Any]], str]


def run_tables(
    title: str,
    runs: list[list[dict[str, Any]]],
    not_run: str,
    intro: str,
    record: str,
    head: list[str],
    row: Row,
    after: Callable[[list[dict[str, Any]]], list[str]] | None = None,
) -> list[str]:
    """A report section: its intro, then per run the run's header and one table row per record
    of kind ``record`` (``after`` adds lines below a run's table)."""
    out = [title, ""]
    if not runs:
        return [*out, f"Not run yet: `{not_run}`.", ""]
    out += [intro, ""]
    for records in runs:
        rows = [x for x in records if x.get("record") == record]
        if not rows:
            continue
        out += [*run_header(meta_of(records)), ""]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += [row(x) for x in rows]
        if after is not None:
            out += after(records)
        out.append("")
    return out


def cells(*values: Any) -> str:
    """A markdown table row."""
    return "| " + " | ".join(str(v) for v in values) + " |"


def multistudy_real_section(runs: list[list[dict[str, Any]]]) -> list[str]:
    """Planted study-only programs on real counts (``benchmarks/multistudy.py --real``)."""
    intro = (
        "Real counts split into random studies (stratified by cell type); in half of one study's "
        "cells the counts of a gene set are scaled up by `fold` (pbmc: Hallmark "
        "IFN-gamma response in study_0, MTORC1 signalling in study_1; Zeisel: random expressed "
        'genes). `specific`: share of the planted genes labelled "specific to" the right study '
        "(the issue's target: >= 0.8); `in specific mask`: share selected by a specific factor "
        'of the right study (label "specific to" it, or "both" when a shared factor also '
        "selects the gene); `detected`: the same among the planted genes detected in at least "
        "25% of the planted cells (up-scaling leaves zeros at zero, so a rarely detected gene "
        "carries almost no planted signal); `shared`: planted genes labelled shared; "
        "`data genes shared`: the data's own selected genes labelled shared (target >= 0.9). "
        "With fold 1 in the run (nothing planted), each seed's unplanted fit tells the planted "
        "genes of the data's own programs (`own`: the share it selects; for them `both` is the "
        "right label) from the new ones; `placed right`: new genes specific to the right study "
        "only, own genes in the right study's specific mask. "
        "Accuracy: 5-fold logistic regression of cell type on the shared factors. One table per "
        "run."
    )

    def row(f: dict[str, Any]) -> str:
        moved = (
            ", ".join(
                ("split " if m.get("kind") == "split_to_specific" else "")
                + f"{m.get('factor', '')}->{m.get('study', m.get('slot', ''))}"
                for m in f.get("moved", [])
            )
            or "-"
        )
        return cells(
            f["data"], f"{f['fold']:g}", f["seed"], fmt(f["planted_specific_right_study"], 2),
            fmt(f.get("planted_in_right_specific_mask"), 2),
            fmt(f.get("planted_in_right_specific_mask_detected"), 2),
            fmt(f["planted_shared"], 2), fmt(f.get("planted_own_in_background"), 2),
            fmt(f.get("planted_placed_right"), 2), fmt(f["data_genes_shared"], 2),
            fmt(f["celltype_accuracy_shared"], 3), check(f["check_ok"]), moved,
        )  # fmt: skip

    def per_program(records: list[dict[str, Any]]) -> list[str]:
        """Below a run's table: per fold, each program's mean share in the right specific mask."""
        out = []
        for x in records:
            by_program = x.get("in_right_specific_mask_by_program")
            if x.get("record") != "summary" or not by_program or x.get("fold") == 1:
                continue  # fold 1: nothing planted
            shares = ", ".join(f"{k} {v:.2f}" for k, v in by_program.items())
            line = (
                f"- Fold {x['fold']:g}, mean over seeds {x['seeds']}: planted genes in the right "
                f"study's specific mask, per program: {shares}; checks pass {x['checks_ok']}"
            )
            abs_r, on_specific = (
                x.get("captured_abs_r_by_program"),
                x.get("captured_on_specific_by_program", {}),
            )
            pca = x.get("pca_abs_r_by_program", {})
            if abs_r:  # runs since session 19
                line += (
                    "; the factor closest to each program's activity, |r| per seed: "
                    + ", ".join(
                        f"{k} {' '.join(f'{r:.2f}' for r in v)} (a specific factor in "
                        f"{on_specific.get(k, '?')}; PCA of the study's cells: "
                        f"{' '.join(f'{r:.2f}' for r in pca.get(k, []))})"
                        for k, v in abs_r.items()
                    )
                )
            out.append(line)
        return ["", *out] if out else []

    head = ["data", "fold", "seed", "specific", "in specific mask",
            "in specific mask, detected", "shared", "own", "placed right", "data genes shared",
            "accuracy", "check", "moved"]  # fmt: skip
    return run_tables(
        "## 5. Multi-study model on real counts", runs,
        "python benchmarks/multistudy.py --real pbmc >> benchmarks/results/multistudy_real.jsonl",
        intro, "fit", head, row, after=per_program,
    )  # fmt: skip


def ivae_section(runs: list[list[dict[str, Any]]]) -> list[str]:
    """The iVAE's simulation (``benchmarks/ivae.py``)."""
    intro = (
        "`simulate_ivae`: 5 Gaussian sources whose means and variances change across 40 segments "
        "(`u` = segment), mixed by a random invertible 3-layer leaky-ReLU network into 20 "
        "features plus noise. MCC: mean |Pearson r| of the posterior means with the true sources "
        "after the best one-to-one matching (`sparsevae.tl.mcc`). Target: the iVAE >= 0.9 and at "
        "least 0.2 above the VAE. Mean (sd) over seeds; one table per run."
    )
    labels = {"vae": "VAE", "sparse": "Sparse VAE", "ivae": "iVAE (conditional prior)",
              "sparse_conditional": "Sparse VAE + conditional prior"}  # fmt: skip

    def row(x: dict[str, Any]) -> str:
        return cells(labels.get(x["method"], x["method"]), pm(x["mcc_mean"], x["mcc_sd"]),
                     fmt(x["mcc_spearman_mean"]), fmt(x["seconds_mean"], 1))  # fmt: skip

    def after(records: list[dict[str, Any]]) -> list[str]:
        st = meta_of(records).get("settings", {})
        return [
            "",
            f"Settings: {st.get('n_segments')} segments x {st.get('n_per_segment')} cells, "
            f"epochs {st.get('max_epochs') or 'default'}, encoder sees u: "
            f"{'yes' if st.get('encode_auxiliary') else 'no'}.",
        ]

    return run_tables(
        "## 6. Conditional prior (iVAE) on the iVAE's simulation", runs,
        "python benchmarks/ivae.py > benchmarks/results/ivae.jsonl", intro, "summary",
        ["method", "MCC (Pearson)", "MCC (Spearman)", "seconds per fit"], row, after,
    )  # fmt: skip


def clustering_section(runs: list[list[dict[str, Any]]]) -> list[str]:
    """Mixture-prior clusters on Zeisel (``benchmarks/clustering.py``)."""
    intro = (
        '`SparseVAE(latent_prior="mixture", n_components=7)` on Zeisel counts: each cell\'s most '
        "probable component, against Leiden (resolution 1) on the same model's factors and on "
        "scVI's latent space (15 dimensions; with `--with-normal` also on a SparseVAE with the "
        "N(0, I) prior). The mixture is told the number of level-1 classes; Leiden finds more "
        "clusters, which lowers its ARI more than its NMI. ARI and NMI "
        "against the 7 level-1 and 48 level-2 classes; mean (sd) over seeds. Target: the "
        "mixture >= Leiden on scVI at level 1."
    )
    labels = {"mixture": "mixture prior (its clusters)", "leiden_sparsevae": "Leiden on the "
              "mixture model's factors", "leiden_normal": "Leiden on SparseVAE (N(0, I))",
              "leiden_scvi": "Leiden on scVI"}  # fmt: skip

    def row(x: dict[str, Any]) -> str:
        return cells(
            labels.get(x["method"], x["method"]), fmt(x["n_clusters_mean"], 1),
            pm(x["ari_level1_mean"], x["ari_level1_sd"]),
            pm(x["nmi_level1_mean"], x["nmi_level1_sd"]),
            pm(x["ari_level2_mean"], x["ari_level2_sd"]),
            pm(x["nmi_level2_mean"], x["nmi_level2_sd"]),
        )  # fmt: skip

    def after(records: list[dict[str, Any]]) -> list[str]:
        fits = [x for x in records if x.get("method") == "mixture" and x.get("record") == "fit"]
        if not fits:
            return []
        empty = sum(f["empty_components"] for f in fits)
        return [
            "",
            f"Mixture fits: {empty} empty component(s) in {len(fits)} fit(s); largest "
            "component's share of the cells "
            + ", ".join(fmt(f["largest_component_share"], 2) for f in fits)
            + "; re-seedings "
            + ", ".join(str(f["reseeded"]) for f in fits)
            + ".",
        ]

    head = ["method", "clusters", "ARI level 1", "NMI level 1", "ARI level 2", "NMI level 2"]
    return run_tables(
        "## 7. Mixture prior: cell clusters on Zeisel", runs,
        "python benchmarks/clustering.py > benchmarks/results/clustering.jsonl", intro,
        "summary", head, row, after,
    )  # fmt: skip


def named_genes_section(runs: list[list[dict[str, Any]]]) -> list[str]:
    """Factors named by gene sets on pbmc68k_reduced (``benchmarks/named_genes.py``)."""
    intro = (
        "SparseVAE (10 factors) on `pbmc68k_reduced` counts; the selected genes (p* >= 0.5) of "
        "every active factor tested by over-representation against MSigDB C8 (cell-type "
        "signatures), Hallmark and GO Biological Process 2021 (`sparsevae.tl.enrich`, "
        "background: the model's 765 genes). *Named*: some set at FDR < 0.05. *Cell type*: the "
        "`bulk_labels` type whose cells differ most from the others along the factor (Cohen's "
        "d; a cell-type factor when |d| >= 1). *Marker anchors*: the factor's anchors that are "
        "canonical markers of that type (the table in the script). Target (issue 20): at least "
        "70% of the active factors named. Per fit, then per active factor of the first seed."
    )

    def row(f: dict[str, Any]) -> str:
        return cells(
            f["seed"], f["active_factors"], f["identifiable_factors"],
            f"{f['n_named']} of {f['active_factors']} ({fmt(f['named_share'], 2)})",
            f"{f['celltype_factors_with_marker_anchor']} of {f['celltype_factors']}",
            fmt(f["median_selected_per_active_factor"], 0), fmt(f["accuracy"]),
        )  # fmt: skip

    def factor_row(r: dict[str, Any]) -> str:
        best = {
            name: f"{r[f'top_{name}']} ({fmt(r[f'fdr_{name}'], 2)})" if r.get(f"top_{name}")
            else "-"
            for name in ("C8", "Hallmark")
        }  # fmt: skip
        return cells(
            r["factor"], r["n_selected"], r["n_anchors"], best["C8"], best["Hallmark"],
            f"{r['celltype']} ({fmt(r['celltype_d'], 2)})",
            ", ".join(r["anchor_markers"]) or "-", ", ".join(r["anchors"][:5]) or "-",
        )  # fmt: skip

    def after(records: list[dict[str, Any]]) -> list[str]:
        seed0 = next(x["seed"] for x in records if x.get("record") == "fit")
        rows = [x for x in records if x.get("record") == "factor" and x.get("seed") == seed0]
        head = ["factor", "genes", "anchors", "best C8 set (FDR)", "best Hallmark (FDR)",
                "cell type (d)", "marker anchors", "first anchors"]  # fmt: skip
        return ["", f"Seed {seed0}:", "", cells(*head), "|" + "---|" * len(head),
                *(factor_row(r) for r in rows)]  # fmt: skip

    head = ["seed", "active", "identifiable", "named", "cell-type factors with a marker anchor",
            "median genes per active factor", "accuracy"]  # fmt: skip
    return run_tables(
        "## 8. Named genes on pbmc68k_reduced", runs,
        "python benchmarks/named_genes.py --out benchmarks/results/named_genes.jsonl", intro,
        "fit", head, row, after,
    )  # fmt: skip


def out_of_core_section(runs: list[list[dict[str, Any]]]) -> list[str]:
    """Training from a backed h5ad (``benchmarks/out_of_core.py``)."""
    intro = (
        "Simulated sparse counts (2000 genes, about 8% non-zero) written to an `.h5ad` block by "
        "block, opened with `read_h5ad(path, backed='r')` and trained on minibatches read from "
        "the file (`SparseVAE.setup_anndata` reads the counts in blocks of rows). Each run is a "
        "fresh process; memory is its peak resident set (`ru_maxrss`). `--batches` minibatches "
        "are trained; the epoch time is extrapolated from the time per cell. In-memory rows: "
        "the same file loaded into memory (sparse)."
    )

    def row(r: dict[str, Any]) -> str:
        if "error" in r:
            return cells(f"{r['cells']:,}", "backed" if r["backed"] else "in memory",
                         "failed", "", "", "", "", "")  # fmt: skip
        return cells(
            f"{r['cells']:,}", "backed" if r["backed"] else "in memory", fmt(r["file_mb"], 0),
            fmt(r["seconds_per_1000_cells"], 2), fmt(r["epoch_seconds_extrapolated"], 0),
            fmt(r["rss_after_train_mb"], 0), fmt(r.get("write_results_seconds"), 0),
            fmt(r.get("rss_after_write_results_mb"), 0),
        )  # fmt: skip

    def after(records: list[dict[str, Any]]) -> list[str]:
        return (
            [
                "",
                f"Memory cost model over the backed runs: {fmt(c['fixed_mb'], 0)} MiB + "
                f"{fmt(c['bytes_per_cell'], 0)} bytes per cell.",
            ]
            if (c := next((x for x in records if x.get("record") == "cost_model"), None))
            else []
        )

    head = ["cells", "data", "file MiB", "s per 1000 cells", "epoch s (extrapolated)",
            "peak RSS MiB after training", "write_results s", "peak RSS MiB after it"]  # fmt: skip
    return run_tables(
        "## 9. Large data: training from disk", runs,
        "python benchmarks/out_of_core.py --out benchmarks/results/out_of_core.jsonl", intro,
        "run", head, row, after,
    )  # fmt: skip


def build(results: Path, docs: Path) -> str:
    """Build the markdown page (and figures) from the results folder."""
    fig_dir = docs / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    for stale in fig_dir.glob("bench_*.png"):  # this script owns these; redraw them all
        stale.unlink()
    ident = read_runs(results / "identifiability.jsonl")
    zeisel = read_last_run(results / "zeisel.jsonl")
    scaling = read_last_run(results / "speed_scaling.jsonl")
    speed = read_last_run(results / "speed.jsonl")
    multistudy = read_runs(results / "multistudy.jsonl")
    rel = results.resolve()
    try:
        rel = rel.relative_to(ROOT)
    except ValueError:
        pass
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by benchmarks/make_report.py from benchmarks/results/*.jsonl. "
        "Do not edit by hand. -->",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M %Z')} by `python benchmarks/make_report.py` "
        f"on {this_machine()}, from the JSON lines in `{rel}/`. Each section states the command, "
        "mode and machine of its own run. Reproduce with the commands given; every script prints "
        "one JSON line per result and has a `--quick` mode (under two minutes).",
        "",
    ]
    lines += identifiability_section(ident, fig_dir)
    lines += zeisel_section(zeisel, fig_dir)
    lines += speed_section(scaling, speed, fig_dir)
    lines += multistudy_section(multistudy)
    lines += multistudy_real_section(read_runs(results / "multistudy_real.jsonl"))
    lines += ivae_section(read_runs(results / "ivae.jsonl"))
    lines += clustering_section(read_runs(results / "clustering.jsonl"))
    lines += named_genes_section(read_runs(results / "named_genes.jsonl"))
    lines += out_of_core_section(read_runs(results / "out_of_core.jsonl"))
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the report."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--docs", type=Path, default=ROOT / "docs")
    args = p.parse_args(argv)
    text = build(args.results, args.docs)
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / "benchmarks.md").write_text(text)
    print(f"wrote {args.docs / 'benchmarks.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
