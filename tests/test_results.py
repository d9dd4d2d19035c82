"""tl and pl read the AnnData that write_results filled: the same answers as from the model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import sparsevae
from sparsevae.cli import main

from .test_multistudy import hand_model  # noqa: F401  (fixture)


def _roundtrip(adata: ad.AnnData, tmp_path: Path) -> ad.AnnData:
    path = tmp_path / "results.h5ad"
    adata.write_h5ad(path)
    return ad.read_h5ad(path)


def test_multistudy_tools_read_the_anndata(hand_model, tmp_path):  # noqa: F811
    model = hand_model
    written = _roundtrip(model.write_results(model.adata.copy()), tmp_path)
    for kind in model.mask_kinds:
        pd.testing.assert_frame_equal(
            sparsevae.tl.anchor_genes(written, kind=kind),
            sparsevae.tl.anchor_genes(model, kind=kind),
        )
        pd.testing.assert_frame_equal(
            sparsevae.tl.top_genes(written, n=3, kind=kind),
            sparsevae.tl.top_genes(model, n=3, kind=kind),
        )
        from_adata = sparsevae.tl.identifiability_report(written, kind=kind)
        from_model = sparsevae.tl.identifiability_report(model, kind=kind)
        pd.testing.assert_frame_equal(from_adata.factors, from_model.factors)
        pd.testing.assert_frame_equal(
            from_adata.covariance_violations, from_model.covariance_violations
        )
        pd.testing.assert_frame_equal(
            sparsevae.tl.to_network(written, kind=kind, weight="effect"),
            sparsevae.tl.to_network(model, kind=kind, weight="effect"),
            atol=1e-5,
        )
    pd.testing.assert_frame_equal(
        sparsevae.tl.shared_specific_genes(written).genes,
        sparsevae.tl.shared_specific_genes(model).genes,
    )
    a, b = sparsevae.tl.check_shared_specific(written), sparsevae.tl.check_shared_specific(model)
    pd.testing.assert_frame_equal(a.activity, b.activity, atol=1e-6)
    assert a.problems == b.problems


def test_results_key_and_missing_results(hand_model):  # noqa: F811
    model = hand_model
    adata = model.adata.copy()
    with pytest.raises(KeyError, match="write_results"):
        sparsevae.tl.anchor_genes(adata)
    model.write_results(adata, key_added="run2", effects=False)
    assert len(sparsevae.tl.anchor_genes(adata, key="run2"))
    with pytest.raises(KeyError, match="No gene effects are stored"):
        sparsevae.tl.to_network(adata, key="run2", weight="effect")
    with pytest.raises(TypeError, match="Expected an AnnData"):
        sparsevae.tl.anchor_genes("not a fit")


def test_a_fit_file_serves_tl_and_pl_in_a_fresh_process(tmp_path):
    """`sparsevae fit`, then tl and pl on the written file in a new Python process."""
    adata = sparsevae.datasets.simulate_programs(
        n_cells=150, n_genes=60, n_factors=3, genes_per_program=15, seed=0
    )
    adata.write_h5ad(tmp_path / "in.h5ad")
    argv = ["fit", str(tmp_path / "in.h5ad"), str(tmp_path / "out.h5ad"), "--layer", "counts"]
    assert main([*argv, "--n-factors", "3", "--max-epochs", "3"]) == 0
    script = (
        "import matplotlib; matplotlib.use('Agg')\n"
        "import anndata, sparsevae\n"
        f"out = anndata.read_h5ad({str(tmp_path / 'out.h5ad')!r})\n"
        "anchors = sparsevae.tl.anchor_genes(out)\n"
        "report = sparsevae.tl.identifiability_report(out)\n"
        "ax = sparsevae.pl.mask_heatmap(out, show=False)\n"
        "print(len(anchors), len(report.factors), ax.get_title())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    _, n_factors, title = done.stdout.split(maxsplit=2)
    assert int(n_factors) == 3 and "SparseVAE mask" in title


def test_single_study_results_match_the_model(tmp_path):
    adata = sparsevae.datasets.simulate_programs(
        n_cells=120, n_genes=40, n_factors=2, genes_per_program=15, n_shared_genes=2, seed=0
    )
    sparsevae.SparseVAE.setup_anndata(adata)
    model = sparsevae.SparseVAE(adata, n_factors=2, n_hidden=8)
    from .conftest import QUIET

    model.train(max_epochs=3, **QUIET)
    written = _roundtrip(model.write_results(adata.copy()), tmp_path)
    res = sparsevae.tl.read_results(written)
    assert res.kinds == ["shared"] and not res.is_multistudy
    assert res.w_off == pytest.approx(model.module.prior.w_off)
    np.testing.assert_allclose(res.latent, model.get_latent_representation(), atol=1e-6)
    r1 = sparsevae.tl.identifiability_report(written)
    r2 = sparsevae.tl.identifiability_report(model)
    pd.testing.assert_frame_equal(r1.factors, r2.factors)
    assert r1.eta_min == pytest.approx(r2.eta_min)


def test_results_written_without_thresholds_get_them_from_the_settings(hand_model, tmp_path):  # noqa: F811
    """AnnData written by 0.1.0 lack uns[key]['prior']; the thresholds come from the stored
    hyperparameters, through the prior itself."""
    model = hand_model
    adata = model.write_results(model.adata.copy())
    del adata.uns["sparsevae"]["prior"]
    res = sparsevae.tl.read_results(_roundtrip(adata, tmp_path))
    assert res.w_off == pytest.approx(model.module.prior.w_off)
    assert res.eta_off == pytest.approx(model.module.prior.eta_off)
