"""Named genes on real counts: do the factors' selected genes name a known program? (issue 20, 5)

Usage: ``python benchmarks/named_genes.py [--seeds 0 1 2] [--module-kwargs '{...}']
[--n-factors 10] [--epochs N] [--quick]``.

Fits SparseVAE on scanpy's ``pbmc68k_reduced`` with approximate counts
(``sparsevae.datasets.pbmc68k_reduced_counts``, 700 cells, 765 genes, human symbols) and tests the
selected genes of every active factor (``p* >= 0.5``) for over-representation in three offline
collections from ``../shared/genesets/``: MSigDB C8 (cell-type signatures), Hallmark and GO
Biological Process 2021 (``sparsevae.tl.enrich``, background: the model's genes).

One JSON line per active factor (``record: "factor"``): its selected genes and anchors, the best
term of each collection and its FDR, whether any set has FDR < 0.05 (``named``), the cell type
that the factor marks (the type whose cells differ most from the others, Cohen's d on the
posterior means; a "cell-type factor" when ``|d| >= 1``), its anchors and which of them are
canonical markers of that type (the table ``MARKERS`` below: the marker genes of the scanpy
PBMC tutorial and of the Azimuth human PBMC reference, grouped to the ``bulk_labels`` types).
One line per fit (``record: "fit"``): active and identifiable factors, the share of active
factors that are named, the share of cell-type factors with at least one marker among their
anchors, and the cell-type accuracy of the factors. The target of issue 20: at least 70% of the
active factors named at FDR < 0.05, anchors of cell-type factors that are known markers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from _common import (
    SHARED,
    TRAINER_KWARGS,
    Emitter,
    command_line,
    import_sparsevae,
    machine_info,
    quiet_logs,
    stdout_to_stderr,
)

COLLECTIONS = {
    "C8": "c8.all.v7.5.1.symbols.gmt",
    "Hallmark": "h.all.v7.5.1.symbols.gmt",
    "GO_BP": "GO_Biological_Process_2021.gmt",
}

#: Canonical markers of the blood cell types of ``bulk_labels`` (scanpy's PBMC tutorial and the
#: Azimuth human PBMC reference). T-cell subtypes share the T-cell markers.
_T = ["CD3D", "CD3E", "CD3G", "CD2", "IL7R", "LTB", "IL32", "CD247", "TRAC", "LCK"]
MARKERS: dict[str, list[str]] = {
    "CD14+ Monocyte": ["CD14", "LYZ", "S100A8", "S100A9", "S100A12", "FCN1", "VCAN", "CST3",
                       "FCGR3A", "MS4A7", "LST1", "AIF1", "CTSS", "TYROBP", "FCER1G"],
    "CD19+ B": ["MS4A1", "CD79A", "CD79B", "CD19", "BANK1", "IGHM", "IGHD", "TCL1A", "CD22",
                "BLK", "FCRLA", "VPREB3", "IGKC", "IGLL5", "HLA-DQA1", "HLA-DQB1"],
    "CD56+ NK": ["GNLY", "NKG7", "KLRD1", "KLRF1", "GZMB", "GZMA", "GZMH", "PRF1", "NCAM1",
                 "FGFBP2", "SPON2", "CST7", "CTSW", "CCL5", "XCL1", "XCL2"],
    "Dendritic": ["FCER1A", "CLEC10A", "CD1C", "CLEC4C", "LILRA4", "IRF8", "HLA-DQA1",
                  "HLA-DRA", "HLA-DPB1", "CST3", "SERPINF1", "ITM2C", "PLD4", "IL3RA", "GZMB"],
    "CD34+": ["CD34", "PRSS57", "SPINK2", "CYTL1", "SOX4", "EGFL7", "SMIM24", "AVP", "CRHBP",
              "MYB", "STMN1", "TUBA1B", "TYMS", "MKI67"],
    "CD8+ Cytotoxic T": [*_T, "CD8A", "CD8B", "GZMK", "GZMH", "NKG7", "CCL5", "CST7"],
    "CD8+/CD45RA+ Naive Cytotoxic": [*_T, "CD8A", "CD8B", "CCR7", "SELL", "LEF1", "TCF7"],
    "CD4+/CD25 T Reg": [*_T, "FOXP3", "IL2RA", "CTLA4", "TIGIT", "RTKN2", "CD4"],
    "CD4+/CD45RO+ Memory": [*_T, "CD4", "IL7R", "S100A4", "CD69", "GPR183"],
    "CD4+/CD45RA+/CD25- Naive T": [*_T, "CD4", "CCR7", "SELL", "LEF1", "TCF7"],
}  # fmt: skip


def cohens_d(z: np.ndarray, labels: pd.Series) -> pd.DataFrame:
    """Cell types x factors: (mean in the type - mean elsewhere) / pooled sd."""
    rows = {}
    for t in labels.unique():
        inside = (labels == t).to_numpy()
        a, b = z[inside], z[~inside]
        pooled = np.sqrt((a.var(axis=0) * len(a) + b.var(axis=0) * len(b)) / len(z))
        rows[t] = (a.mean(axis=0) - b.mean(axis=0)) / np.maximum(pooled, 1e-12)
    return pd.DataFrame(rows).T


def fit(sparsevae: Any, adata: Any, seed: int, args: argparse.Namespace) -> tuple[Any, dict]:
    """Fit one model on a copy of ``adata`` and return the AnnData with its results."""
    import scvi

    scvi.settings.seed = seed
    ad = adata.copy()
    sparsevae.SparseVAE.setup_anndata(ad, layer="counts")
    model = sparsevae.SparseVAE(ad, n_factors=args.n_factors, **json.loads(args.module_kwargs))
    t0 = time.perf_counter()
    model.train(max_epochs=args.epochs, **TRAINER_KWARGS)
    seconds = time.perf_counter() - t0
    model.write_results(ad, effects=False)
    acc = sparsevae.tl.celltype_accuracy(ad.obsm["X_sparsevae"], ad.obs["bulk_labels"])
    return ad, {"train_seconds": round(seconds, 1), "accuracy": round(float(acc["mean"]), 4)}


def score(sparsevae: Any, ad: Any, gmts: dict[str, str]) -> tuple[list[dict], dict]:
    """Per active factor: names and markers; and the fit's summary."""
    report = sparsevae.tl.identifiability_report(ad)
    f = report.factors.set_index("factor")
    active = report.active_factors
    mask = sparsevae.tl.read_results(ad).masks["shared"]
    selected = mask.pstar >= 0.5
    table = sparsevae.tl.anchor_genes(ad, anchors_only=True)
    anchor_sets = {k: list(g["gene"]) for k, g in table.groupby("factor", observed=True)}
    enr = {
        name: sparsevae.tl.enrich(ad, path, method="ora", factors=active) if active else None
        for name, path in gmts.items()
    }
    labels = ad.obs["bulk_labels"].astype(str)
    d = cohens_d(np.asarray(ad.obsm["X_sparsevae"]), labels)
    d.columns = mask.factors
    rows = []
    for factor in active:
        genes = list(selected.index[selected[factor].to_numpy()])
        anchors_f = list(anchor_sets.get(factor, []))
        row: dict[str, Any] = {
            "record": "factor",
            "factor": factor,
            "n_selected": len(genes),
            "n_anchors": int(f.loc[factor, "n_anchors"]),
            "identifiable": bool(f.loc[factor, "identifiable"]),
        }
        named = False
        for name, table in enr.items():
            sub = table[table["factor"] == factor] if table is not None else None
            if sub is not None and len(sub):
                top = sub.sort_values("pvalue").iloc[0]
                row[f"top_{name}"] = str(top["term"])
                row[f"fdr_{name}"] = float(top["fdr"])
                named |= bool((sub["fdr"] < 0.05).any())
            else:
                row[f"top_{name}"], row[f"fdr_{name}"] = None, None
        row["named"] = named
        col = d[factor].abs()
        celltype = str(col.idxmax())
        row["celltype"] = celltype
        row["celltype_d"] = round(float(d.loc[celltype, factor]), 3)
        row["celltype_factor"] = bool(col.max() >= 1.0)
        markers = set(MARKERS.get(celltype, []))
        row["anchors"] = anchors_f[:15]
        row["anchor_markers"] = [g for g in anchors_f if g in markers]
        row["selected_markers"] = [g for g in genes if g in markers][:15]
        rows.append(row)
    celltype_rows = [r for r in rows if r["celltype_factor"]]
    summary = {
        "record": "fit",
        "active_factors": len(active),
        "identifiable_factors": int(f["identifiable"].sum()),
        "named_share": round(float(np.mean([r["named"] for r in rows])), 3) if rows else 0.0,
        "n_named": int(sum(r["named"] for r in rows)),
        "celltype_factors": len(celltype_rows),
        "celltype_factors_with_marker_anchor": int(
            sum(bool(r["anchor_markers"]) for r in celltype_rows)
        ),
        "median_selected_per_active_factor": float(
            np.median([r["n_selected"] for r in rows]) if rows else 0.0
        ),
    }
    return rows, summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n-factors", type=int, default=10)
    p.add_argument("--epochs", type=int, default=None, help="default: the package's")
    p.add_argument("--module-kwargs", default="{}", help="JSON passed to SparseVAE(...)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="3 epochs, one seed (a smoke test)")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--note", default=None, help="free text stored in the meta record")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = [0], 3
    gmts = {name: str(SHARED / "genesets" / file) for name, file in COLLECTIONS.items()}
    missing = [path for path in gmts.values() if not Path(path).is_file()]
    if missing:
        print(f"gene sets not found: {missing} (../shared/genesets beside the repository)",
              file=sys.stderr)  # fmt: skip
        return 2
    import torch

    torch.set_num_threads(args.threads)
    quiet_logs()
    with stdout_to_stderr() as out:
        emit = Emitter(out, args.out)
        emit({"record": "meta", "benchmark": "named_genes", "command": command_line(),
              "mode": "quick" if args.quick else "full",
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "note": args.note,
              "module_kwargs": json.loads(args.module_kwargs),
              "machine": machine_info(args.threads)})  # fmt: skip
        sparsevae = import_sparsevae()
        adata = sparsevae.datasets.pbmc68k_reduced_counts()
        fits = []
        for seed in args.seeds:
            ad, info = fit(sparsevae, adata, seed, args)
            rows, summary = score(sparsevae, ad, gmts)
            for row in rows:
                emit({"seed": seed, **row})
            summary = {"seed": seed, **summary, **info}
            emit(summary)
            fits.append(summary)
        emit({
            "record": "summary",
            "seeds": args.seeds,
            "named_share_mean": round(float(np.mean([s["named_share"] for s in fits])), 3),
            "active_mean": float(np.mean([s["active_factors"] for s in fits])),
            "identifiable_mean": float(np.mean([s["identifiable_factors"] for s in fits])),
            "accuracy_mean": round(float(np.mean([s["accuracy"] for s in fits])), 4),
        })  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
