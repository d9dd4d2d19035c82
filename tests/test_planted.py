"""Planted truth on count data: one trained model, checked against the known programs.

``simulate_programs`` plants 8 gene programs of 30 genes (25 anchors and 5 genes shared with the
next program) in negative-binomial counts with nonlinear maps. The model is fit with 10 factors,
two more than exist, so the identifiability report must flag the extra ones.

One random start. At the package defaults since session 21 (spike gates, ``prior_cells=200``
and the varimax rotation after the warm-up) ten single starts (``scvi.settings.seed`` 0-9,
data seed 0; ``benchmarks/planted_starts.py``) all recovered every program (|r| >= 0.979, mean
mask F1 0.993-1.0, smallest program F1 >= 0.971). With the earlier defaults one start in ten
merged two programs, so the fit kept the better of two starts by ELBO. In session 23's fresh
environment start 1 lost programs again (smallest |r| 0.19, before the mask decision too); in
session 24 single starts recovered every program from 7 of 10 seeds (1, 5 and 7 did not) and
``train(n_restarts=3)`` from 1, 5 and 7 as well. This test uses start 0 (user guide,
"Stability across random starts").
"""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import sparsevae

torch.set_num_threads(1)
pytestmark = pytest.mark.slow

QUIET = {
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
}
N_TRUE = 8
N_FIT = 10


@pytest.fixture(scope="module")
def fitted():
    import scvi

    scvi.settings.seed = 0
    adata = sparsevae.datasets.simulate_programs(
        n_cells=1000, n_genes=400, n_factors=N_TRUE, seed=0
    )
    sparsevae.SparseVAE.setup_anndata(adata, layer="counts")
    model = sparsevae.SparseVAE(adata, n_factors=N_FIT)
    model.train(max_epochs=100, **QUIET)
    z = model.get_latent_representation()
    zt = adata.obsm["true_factors"]
    corr = np.corrcoef(zt.T, z.T)[:N_TRUE, N_TRUE:]
    rows, cols = linear_sum_assignment(-np.abs(corr))
    match = dict(zip(rows.tolist(), cols.tolist(), strict=True))  # true -> learned
    return adata, model, corr, match


def _programs(adata) -> dict[str, list[str]]:
    mask = adata.varm["true_mask"] > 0
    names = adata.var_names
    return {f"PROG_{k}": list(names[mask[:, k]]) for k in range(N_TRUE)}


def test_factors_recovered(fitted):
    """Every planted factor has a distinct learned factor with |Pearson| >= 0.9."""
    _, _, corr, match = fitted
    got = [abs(corr[t, k]) for t, k in match.items()]
    assert min(got) >= 0.9, got


def test_mask_recovers_programs(fitted):
    """Each planted program's genes are the selected genes (p* > 0.5) of its factor: mean F1 >= 0.95
    and every program F1 >= 0.9 (ten single starts: mean 0.993-1.0, smallest >= 0.971)."""
    adata, model, _, match = fitted
    P = model.get_inclusion_probabilities().to_numpy()
    T = adata.varm["true_mask"] > 0
    f1 = []
    for t, k in match.items():
        sel = P[:, k] > 0.5
        tp = (sel & T[:, t]).sum()
        f1.append(2 * tp / (sel.sum() + T[:, t].sum()))
    assert np.mean(f1) >= 0.95 and min(f1) >= 0.9, np.round(f1, 2)


def test_enrich_finds_each_program_for_its_factor(fitted):
    """ORA with the true programs as gene sets: program t is the top term of its factor at
    FDR < 0.05."""
    adata, model, _, match = fitted
    res = sparsevae.tl.enrich(model, _programs(adata), method="ora")
    names = model.factor_names
    for t, k in match.items():
        sub = res[res.factor == names[k]].sort_values("pvalue")
        assert len(sub), f"no enrichment for {names[k]}"
        top = sub.iloc[0]
        assert top.term == f"PROG_{t}" and top.fdr < 0.05, sub.head(3)


def test_anchor_listing_recovers_planted_anchors(fitted):
    """Anchors (selected for exactly one factor) against the planted anchors of the matched
    factor: precision >= 0.9 and recall >= 0.7 over all programs (measured 0.95 and 0.77; anchors
    next to shared genes are sometimes selected on a second factor too)."""
    adata, model, _, match = fitted
    anchors = sparsevae.tl.anchor_genes(model, anchors_only=True)
    names = model.factor_names
    is_anchor = adata.var["is_anchor"].to_numpy() & (adata.var["program"].to_numpy() >= 0)
    truth = {
        (names[match[t]], g)
        for t in range(N_TRUE)
        for g in adata.var_names[is_anchor & (adata.var["program"].to_numpy() == t)]
    }
    found = set(zip(anchors.factor, anchors.gene, strict=True))
    tp = len(found & truth)
    precision, recall = tp / max(1, len(found)), tp / len(truth)
    assert precision >= 0.9 and recall >= 0.7, (precision, recall)


def test_report_flags_the_extra_factors(fitted):
    """Fitting 10 factors to 8 programs: the 2 unmatched ones are switched off or anchorless,
    and every matched one is identifiable."""
    _, model, _, match = fitted
    report = sparsevae.tl.identifiability_report(model)
    table = report.factors.set_index("factor")
    names = model.factor_names
    extra = [names[k] for k in range(N_FIT) if k not in match.values()]
    assert len(extra) == N_FIT - N_TRUE
    for f in extra:
        row = table.loc[f]
        assert row.switched_off or row.n_anchors < report.min_anchors, row
        assert not row.identifiable
    for k in match.values():
        assert table.loc[names[k], "identifiable"], table.loc[names[k]]
    assert "switched off" in str(report) or "anchor" in str(report)


def test_gene_effect_signs_match_planted_maps(fitted):
    """The signed effect of a factor on its program's anchor genes has the planted sign (after
    aligning the sign of the learned factor with the true one): >= 90% agreement."""
    adata, model, corr, match = fitted
    eff = model.get_gene_effects().to_numpy()
    sign = adata.varm["true_effect_sign"]
    anchor = adata.var["is_anchor"].to_numpy()
    agree, total = 0, 0
    for t, k in match.items():
        genes = np.flatnonzero((sign[:, t] != 0) & anchor)
        s = np.sign(eff[genes, k]) * np.sign(corr[t, k])
        agree += int((s == sign[genes, t]).sum())
        total += len(genes)
    assert agree / total >= 0.9, agree / total


def test_results_in_anndata(fitted):
    adata, model, _, _ = fitted
    out = adata.copy()
    model.write_results(out)
    assert out.obsm["X_sparsevae"].shape == (adata.n_obs, N_FIT)
    assert np.isfinite(out.obsm["X_sparsevae"]).all()
    pstar = pd.DataFrame(out.varm["sparsevae_pstar"], index=out.var_names)
    assert ((pstar > 0.5).sum(0) > 0).sum() >= N_TRUE
