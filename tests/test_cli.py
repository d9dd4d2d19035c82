"""End-to-end tests of the ``sparsevae`` command line interface."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import anndata as ad
import pandas as pd
import pytest
import torch

import sparsevae
from sparsevae.cli import main

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "out"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["demo", "--out", str(out), "--max-epochs", "3", "--n-factors", "5"])
    assert code == 0
    return out, buf.getvalue()


@pytest.fixture
def small_h5ad(tmp_path: Path) -> Path:
    adata = sparsevae.datasets.simulate_programs(
        n_cells=200, n_genes=100, n_factors=3, genes_per_program=20
    )
    path = tmp_path / "sim.h5ad"
    adata.write_h5ad(path)
    return path


def test_demo_writes_files(demo_run: tuple[Path, str]) -> None:
    out, _ = demo_run
    for name in ["adata.h5ad", "top_genes.csv", "mask_heatmap.png", "umap_factors.png"]:
        assert (out / name).is_file(), name
        assert (out / name).stat().st_size > 0, name
    adata = ad.read_h5ad(out / "adata.h5ad")
    assert adata.obsm["X_sparsevae"].shape == (700, 5)
    assert adata.varm["sparsevae_W"].shape == (765, 5)
    assert "bulk_labels" in adata.obs
    assert adata.uns["sparsevae"]["params"]["spike_gate"]
    assert adata.uns["sparsevae"]["params"]["prior_cells"] == 200
    top = pd.read_csv(out / "top_genes.csv")
    assert list(top.columns) == ["factor", "rank", "gene", "weight", "pstar"]
    assert top.groupby("factor").size().max() <= 20
    assert set(top["gene"]) <= set(adata.var_names)


def test_demo_summary(demo_run: tuple[Path, str]) -> None:
    _, text = demo_run
    assert "cells: 700" in text and "genes: 765" in text and "factors: 5" in text
    assert "likelihood: nb" in text and "epochs: 3" in text
    assert "spike gates: on  prior weighed against: 200 cells" in text  # the real-count recipe
    rows = re.findall(r"factor_\d+ +(\d+) genes +(\d+) anchors", text)
    assert len(rows) == 5 and all(int(a) <= int(g) for g, a in rows)
    match = re.search(r"accuracy (\d\.\d+) \+/- (\d\.\d+)", text)
    assert match is not None, text
    assert 0.0 <= float(match.group(1)) <= 1.0


def test_demo_package_defaults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demo", "--out", str(tmp_path / "out"), "--max-epochs", "1", "--n-factors", "2"]
    assert main([*argv, "--spike-gate", "off", "--prior-cells", "0"]) == 0
    adata = ad.read_h5ad(tmp_path / "out" / "adata.h5ad")
    params = adata.uns["sparsevae"]["params"]
    assert "spike gates: off  prior weighed against: all cells" in capsys.readouterr().out
    assert not params["spike_gate"] and params["prior_cells"] == "None"


def test_fit(small_h5ad: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fitted.h5ad"
    model_dir = tmp_path / "model"
    argv = [str(small_h5ad), str(out), "--n-factors", "3", "--layer", "counts"]
    argv += ["--max-epochs", "2", "--batch-size", "64", "--key-added", "svae"]
    argv += ["--prior-cells", "50", "--seed", "3", "--accelerator", "cpu", "--no-effects"]
    argv += ["--spike-gate", "on"]
    assert main(["fit", *argv, "--save-model", str(model_dir)]) == 0
    saved = torch.load(model_dir / "model.pt", weights_only=False)
    module_kwargs = saved["attr_dict"]["init_params_"]["kwargs"]["module_kwargs"]
    assert module_kwargs["prior_cells"] == 50 and module_kwargs["spike_gate"] is True
    adata = ad.read_h5ad(out)
    assert adata.obsm["X_svae"].shape == (200, 3)
    assert adata.varm["svae_W"].shape == (100, 3)
    assert adata.varm["svae_pstar"].shape == (100, 3)
    assert adata.uns["svae"]["likelihood"] == "nb"
    assert "svae_effect" not in adata.varm  # --no-effects
    assert (model_dir / "model.pt").is_file()
    printed = capsys.readouterr().out
    assert "wrote" in printed
    # the summary that train() logs, printed once
    assert printed.count("SparseVAE training: 2 epochs") == 1 and "identifiable" in printed

    # an existing output is not replaced without --overwrite
    with pytest.raises(SystemExit) as exc:
        main(["fit", *argv])
    assert exc.value.code == 2
    assert "--overwrite" in capsys.readouterr().err


def test_fit_seed_and_accelerator(small_h5ad: Path, tmp_path: Path, capsys) -> None:
    import scvi

    argv = [str(small_h5ad), "--n-factors", "2", "--layer", "counts", "--max-epochs", "1"]
    assert main(["fit", argv[0], str(tmp_path / "a.h5ad"), *argv[1:], "--seed", "5"]) == 0
    assert scvi.settings.seed == 5
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["fit", argv[0], str(tmp_path / "b.h5ad"), *argv[1:], "--accelerator", "foo"])
    assert exc.value.code == 2
    assert "--accelerator" in capsys.readouterr().err


def test_fit_multistudy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adata = sparsevae.datasets.simulate_multistudy(
        n_studies=2,
        n_shared=2,
        n_specific=1,
        n_cells_per_study=60,
        n_genes=40,
        genes_per_program=10,
        seed=0,
    )
    src = tmp_path / "multi.h5ad"
    adata.write_h5ad(src)
    out = tmp_path / "fitted.h5ad"
    argv = ["fit", str(src), str(out), "--n-factors", "2", "--study-key", "study"]
    argv += ["--spike-gate", "specific", "--save-model", str(tmp_path / "model")]
    assert main([*argv, "--n-specific-factors", "1", "--max-epochs", "2"]) == 0
    saved = torch.load(tmp_path / "model" / "model.pt", weights_only=False)
    assert saved["attr_dict"]["init_params_"]["kwargs"]["module_kwargs"]["spike_gate"] == "specific"
    fitted = ad.read_h5ad(out)
    assert fitted.uns["sparsevae"]["params"]["prior_cells"] == 200  # multi-study counts' default
    assert fitted.obsm["X_sparsevae"].shape == (120, 2 + 1)
    studies = sorted(adata.obs["study"].astype(str).unique())
    for kind in ["shared", *studies]:
        assert f"sparsevae_W_{kind}" in fitted.varm, kind
    assert fitted.varm[f"sparsevae_W_{studies[0]}"].shape == (40, 1)
    text = capsys.readouterr().out
    assert "2 factors + 1 specific factors x 2 studies" in text
    assert f"{studies[1]}: " in text


def test_missing_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.h5ad"
    with pytest.raises(SystemExit) as exc:
        main(["fit", str(missing), str(tmp_path / "out.h5ad"), "--n-factors", "3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "does not exist" in err and str(missing) in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "extra",
    [
        ["--layer", "nope"],  # bad input: missing layer
        ["--n-factors", "0"],  # bad argument
        ["--study-key", "nope"],  # study column missing
        ["--n-specific-factors", "2"],  # specific factors without studies
        ["--spike-gate", "specific"],  # specific gates without studies
        ["--spike-gate", "yes"],  # not a choice
    ],
)
def test_bad_input(
    small_h5ad: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    argv = ["fit", str(small_h5ad), str(tmp_path / "out.h5ad"), "--n-factors", "3", *extra]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.h5ad").exists()
