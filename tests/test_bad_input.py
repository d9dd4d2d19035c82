"""Bad and awkward input: each case gets a clear error (type and a phrase naming the problem) and
leaves the user's AnnData exactly as it was, or is handled correctly.

The AnnData is compared deeply before and after (X, layers, obs, var, obsm, varm, uns).
"""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import sparsevae
from sparsevae import SparseVAE
from sparsevae.model import UnsafeModelFileError
from sparsevae.train import DivergenceError

from .conftest import QUIET, small_counts


def two_studies(n_cells: int = 120) -> anndata.AnnData:
    adata = small_counts(n_cells)
    adata.obs["study"] = pd.Categorical(np.where(np.arange(n_cells) % 2, "A", "B"))
    return adata


# --------------------------------------------------------------------------- deep comparison
def _same(a, b, where: str) -> None:
    if sp.issparse(a) or sp.issparse(b):
        assert sp.issparse(a) and sp.issparse(b) and a.format == b.format, where
        assert a.dtype == b.dtype, where
        a, b = a.toarray(), b.toarray()
    if isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b, obj=where)
    elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape, where
        np.testing.assert_array_equal(a, b, err_msg=where)  # NaN == NaN here
    elif isinstance(a, dict) or isinstance(b, dict):
        assert isinstance(a, dict) and isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            _same(a[k], b[k], f"{where}[{k!r}]")
    else:
        assert type(a) is type(b) and a == b, where


def snapshot(adata: anndata.AnnData) -> dict:
    """A deep copy of everything a user could see change."""
    return {
        "X": adata.X.copy() if adata.X is not None else None,
        "layers": {k: v.copy() for k, v in adata.layers.items()},
        "obs": adata.obs.copy(),
        "var": adata.var.copy(),
        "obsm": {k: np.array(v, copy=True) for k, v in adata.obsm.items()},
        "varm": {k: np.array(v, copy=True) for k, v in adata.varm.items()},
        "uns": {k: v for k, v in adata.uns.items()},
        "is_view": adata.is_view,
    }


def assert_unchanged(adata: anndata.AnnData, snap: dict) -> None:
    now = snapshot(adata)
    if snap["X"] is None:
        assert now["X"] is None
    else:
        _same(now["X"], snap["X"], "X")
    for part in ("layers", "obs", "var", "obsm", "varm", "uns", "is_view"):
        _same(now[part], snap[part], part)


def expect_error(adata, action, exc, phrase):
    """``action()`` raises ``exc`` whose message contains ``phrase``; ``adata`` is unchanged."""
    snap = snapshot(adata)
    with pytest.raises(exc, match=phrase):
        action()
    assert_unchanged(adata, snap)


# --------------------------------------------------------------------------- setup_anndata
def _with(value_setter):
    adata = small_counts()
    value_setter(adata)
    return adata


def _dense_with(i, j, value):
    def set_(adata):
        X = adata.X.toarray()
        X[i, j] = value
        adata.X = X

    return set_


def _backed(tmp_path):
    path = tmp_path / "b.h5ad"
    small_counts().write_h5ad(path)
    return anndata.read_h5ad(path, backed="r")


SETUP_CASES = {
    "nan": (lambda: _with(_dense_with(3, 4, np.nan)), {}, ValueError, "NaN"),
    "inf": (lambda: _with(_dense_with(3, 4, np.inf)), {}, ValueError, "infinite"),
    "nan_in_layer": (
        lambda: _with(lambda a: a.layers.__setitem__("counts", _nan_dense(a))),
        {"layer": "counts"}, ValueError, "NaN",
    ),
    "missing_layer": (small_counts, {"layer": "nope"}, KeyError, "Layer 'nope' not found"),
    "too_few_cells": (lambda: small_counts()[:5].copy(), {}, ValueError, "at least 10"),
    "single_cell": (lambda: small_counts()[:1].copy(), {}, ValueError, "at least 10"),
    "no_genes": (lambda: small_counts()[:, []].copy(), {}, ValueError, "no genes"),
    "object_dtype": (
        lambda: _with(lambda a: setattr(a, "X", a.X.toarray().astype(object))),
        {}, TypeError, "real numbers",
    ),
    "view": (lambda: small_counts()[:100], {}, ValueError, "is a view"),
    "duplicated_genes": (
        lambda: _with(lambda a: setattr(a, "var_names", ["g"] * a.n_vars)),
        {}, ValueError, "var_names are not unique",
    ),
    "study_column_missing": (small_counts, {"study_key": "donor"}, KeyError, "not a column"),
    "study_nan": (
        lambda: _with(lambda a: a.obs.__setitem__("s", [None] + ["A", "B"] * 59 + ["A"])),
        {"study_key": "s"}, ValueError, "without a study",
    ),
    "one_study": (
        lambda: _with(lambda a: a.obs.__setitem__("s", "A")),
        {"study_key": "s"}, ValueError, "single study",
    ),
    "unused_study_category": (
        lambda: _with(
            lambda a: a.obs.__setitem__(
                "s", pd.Categorical(["A", "B"] * 60, categories=["A", "B", "C"])
            )
        ),
        {"study_key": "s"}, ValueError, "categories without cells",
    ),
    "study_named_shared": (
        lambda: _with(lambda a: a.obs.__setitem__("s", ["shared", "B"] * 60)),
        {"study_key": "s"}, ValueError, "named 'shared'",
    ),
    "studies_equal_as_strings": (
        lambda: _with(lambda a: a.obs.__setitem__("s", np.array([1, "1"] * 60, dtype=object))),
        {"study_key": "s"}, ValueError, "not unique as strings",
    ),
    "size_factor_missing": (small_counts, {"size_factor_key": "sf"}, KeyError, "not a column"),
    "size_factor_zero": (
        lambda: _with(lambda a: a.obs.__setitem__("sf", 0.0)),
        {"size_factor_key": "sf"}, ValueError, "finite positive",
    ),
}  # fmt: skip


def _nan_dense(adata):
    X = adata.X.toarray()
    X[0, 0] = np.nan
    return X


@pytest.mark.parametrize("case", sorted(SETUP_CASES))
def test_setup_anndata_refuses(case):
    make, kwargs, exc, phrase = SETUP_CASES[case]
    adata = make()
    expect_error(adata, lambda: SparseVAE.setup_anndata(adata, **kwargs), exc, phrase)
    assert not any(k.startswith("_scvi") for k in adata.uns)


def test_backed_anndata_with_bad_values_is_refused(tmp_path):
    # Data that stay on disk get the same checks, read in blocks of rows.
    adata = small_counts()
    X = adata.X.toarray()
    X[3, 4] = np.nan
    adata.X = sp.csr_matrix(X)
    adata.write_h5ad(tmp_path / "nan.h5ad")
    backed = anndata.read_h5ad(tmp_path / "nan.h5ad", backed="r")
    with pytest.raises(ValueError, match="NaN"):
        SparseVAE.setup_anndata(backed)
    assert not any(k.startswith("_scvi") for k in backed.uns)


# --------------------------------------------------------------------------- model creation
def _log1p(adata):
    adata.X = np.log1p(adata.X.toarray())


def _negative(adata):
    adata.X = -adata.X.toarray()


def _empty_cell(adata):
    X = adata.X.toarray()
    X[7] = 0
    adata.X = X


MODEL_CASES = {
    "negative_for_nb": (_negative, {"likelihood": "nb"}, ValueError, "negative values"),
    "log1p_for_nb": (_log1p, {"likelihood": "nb"}, ValueError, "non-integer"),
    "fractional_for_poisson": (_log1p, {"likelihood": "poisson"}, ValueError, "non-integer"),
    "empty_cell": (_empty_cell, {}, ValueError, "zero total counts"),
    "n_factors_zero": (None, {"n_factors": 0}, ValueError, "n_factors must be an integer"),
    "n_factors_too_many": (None, {"n_factors": 41}, ValueError, "n_factors must be an integer"),
    "n_factors_float": (None, {"n_factors": 2.5}, ValueError, "n_factors must be an integer"),
    "n_factors_bool": (None, {"n_factors": True}, ValueError, "n_factors must be an integer"),
    "specific_without_studies": (None, {"n_specific_factors": 2}, ValueError, "needs studies"),
    "unknown_likelihood": (None, {"likelihood": "gauss"}, ValueError, "likelihood must be"),
    "negative_kl_weight": (None, {"kl_weight": -1.0}, ValueError, "kl_weight must be"),
    "unknown_mask": (None, {"mask": "dense"}, ValueError, "mask must be"),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_model_refuses(case):
    mutate, kwargs, exc, phrase = MODEL_CASES[case]
    adata = small_counts()
    if mutate is not None:
        mutate(adata)
    SparseVAE.setup_anndata(adata)
    kwargs = {"n_factors": 2, "n_hidden": 8, **kwargs}
    expect_error(adata, lambda: SparseVAE(adata, **kwargs), exc, phrase)


def test_n_specific_factors_out_of_range():
    adata = two_studies()
    SparseVAE.setup_anndata(adata, study_key="study")
    for bad in (0, True, 41):
        expect_error(
            adata,
            lambda bad=bad: SparseVAE(adata, n_factors=2, n_specific_factors=bad),
            ValueError,
            "n_specific_factors must be an integer",
        )


# --------------------------------------------------------------------------- a trained model
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    adata = small_counts()
    SparseVAE.setup_anndata(adata)
    model = SparseVAE(adata, n_factors=2, n_hidden=8)
    model.train(max_epochs=2, **QUIET)
    path = tmp_path_factory.mktemp("saved") / "model"
    model.save(path)
    return model, path


NEW_DATA_CASES = {
    "nan": (_dense_with(2, 2, np.nan), ValueError, "NaN"),
    "inf": (_dense_with(2, 2, np.inf), ValueError, "infinite"),
    "log1p_on_nb": (_log1p, ValueError, "non-integer"),
    "negative": (_negative, ValueError, "negative values"),
    "empty_cell": (_empty_cell, ValueError, "zero total counts"),
    "genes_reordered": (
        lambda a: a._inplace_subset_var(np.arange(a.n_vars)[::-1]),
        ValueError,
        "different order",
    ),
    "genes_missing": (lambda a: a._inplace_subset_var(np.arange(30)), ValueError, "missing"),
}
NEW_DATA_CALLS = {
    "get_latent_representation": lambda model, path, a: model.get_latent_representation(a),
    "write_results": lambda model, path, a: model.write_results(a),
    "get_gene_effects": lambda model, path, a: model.get_gene_effects(a),
    "load": lambda model, path, a: SparseVAE.load(path, adata=a),
}


@pytest.mark.parametrize("call", sorted(NEW_DATA_CALLS))
@pytest.mark.parametrize("case", sorted(NEW_DATA_CASES))
def test_new_data_gets_the_training_checks(trained, case, call):
    model, path = trained
    mutate, exc, phrase = NEW_DATA_CASES[case]
    adata = small_counts(seed=1)
    mutate(adata)
    expect_error(adata, lambda: NEW_DATA_CALLS[call](model, path, adata), exc, phrase)


def test_backed_new_data_are_checked_and_encoded_like_in_memory(trained, tmp_path):
    model, path = trained
    adata = _backed(tmp_path)
    z_backed = model.get_latent_representation(adata)
    z_memory = model.get_latent_representation(adata.to_memory())
    np.testing.assert_allclose(z_backed, z_memory, rtol=1e-5, atol=1e-6)
    loaded = SparseVAE.load(path, adata=adata)
    assert loaded.get_latent_representation(adata).shape == z_backed.shape
    bad = small_counts(seed=1)
    bad.X = sp.csr_matrix(np.log1p(bad.X.toarray()))
    bad.write_h5ad(tmp_path / "log.h5ad")
    with pytest.raises(ValueError, match="non-integer"):
        model.get_latent_representation(anndata.read_h5ad(tmp_path / "log.h5ad", backed="r"))


def test_write_results_refuses_existing_keys(trained):
    model, _ = trained
    adata = small_counts(seed=1)
    adata.obsm["X_sparsevae"] = np.zeros((adata.n_obs, 2))
    expect_error(adata, lambda: model.write_results(adata), KeyError, "already exist")


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="No saved SparseVAE"):
        SparseVAE.load(tmp_path / "nothing")


def test_foreign_file_is_refused(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"not a model at all")
    with pytest.raises(UnsafeModelFileError, match="not a SparseVAE model file"):
        SparseVAE.load(tmp_path)


# --------------------------------------------------------------------------- multi-study data
@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    adata = two_studies()
    SparseVAE.setup_anndata(adata, study_key="study")
    model = SparseVAE(adata, n_factors=2, n_specific_factors=1, n_hidden=8)
    model.train(max_epochs=2, **QUIET)
    path = tmp_path_factory.mktemp("saved_multi") / "model"
    model.save(path)
    return adata, model, path


def test_unseen_study_is_named(multi):
    adata, model, path = multi
    new = adata.copy()
    new.obs["study"] = pd.Categorical(np.where(np.arange(new.n_obs) % 3, "A", "C"))
    for call in (lambda: model.get_latent_representation(new),
                 lambda: SparseVAE.load(path, adata=new)):  # fmt: skip
        expect_error(new, call, ValueError, r"never saw: \['C'\]")


def test_missing_study_column_and_values(multi):
    adata, model, path = multi
    new = adata.copy()
    del new.obs["study"]
    expect_error(new, lambda: SparseVAE.load(path, adata=new), ValueError, "lacks")
    new = adata.copy()
    new.obs["study"] = new.obs["study"].astype(object)
    new.obs.iloc[0, new.obs.columns.get_loc("study")] = None
    expect_error(new, lambda: model.get_latent_representation(new), ValueError, "without a study")


@pytest.mark.parametrize("categories", [["A"], ["A", "B"]])
def test_a_subset_of_the_studies_loads(multi, categories):
    """One trained study only (with or without the other as an unused category) loads and gives
    the same factors for those cells as the trained model."""
    adata, model, path = multi
    keep = np.flatnonzero(adata.obs["study"] == "A")
    sub = adata[keep].copy()
    sub.obs["study"] = pd.Categorical(["A"] * len(keep), categories=categories)
    for k in [k for k in sub.uns if k.startswith("_scvi")]:
        del sub.uns[k]
    loaded = SparseVAE.load(path, adata=sub)
    assert loaded.studies == ["A", "B"]
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation(indices=keep)
    )
    out = loaded.write_results(sub.copy())
    assert np.isnan(out.varm["sparsevae_effect_B"]).all()


# --------------------------------------------------------------------------- handled correctly
@pytest.mark.parametrize(
    "convert",
    [
        pytest.param(sp.csr_matrix, id="csr"),
        pytest.param(sp.csc_matrix, id="csc"),
        pytest.param(lambda X: X.toarray().astype(np.int64), id="int64"),
        pytest.param(lambda X: sp.csr_matrix(X.toarray().astype(np.int32)), id="int32-csr"),
        pytest.param(lambda X: X.toarray().astype(np.float16), id="float16"),
    ],
)
def test_matrix_formats_train(convert):
    adata = small_counts()
    adata.X = convert(adata.X)
    SparseVAE.setup_anndata(adata)
    model = SparseVAE(adata, n_factors=2, n_hidden=8)
    assert model.likelihood == "nb"
    model.train(max_epochs=1, **QUIET)
    assert np.isfinite(model.get_latent_representation()).all()


def test_float16_libraries_do_not_overflow():
    """Row sums above float16's maximum (65504) with every entry representable: the gene offsets
    are computed in float64 and stay finite."""
    adata = small_counts(n_genes=200)
    X = np.full((adata.n_obs, adata.n_vars), 500.0)
    X[:, ::2] += adata.X.toarray()[:, ::2]
    adata.X = X.astype(np.float16)
    assert np.isinf(adata.X.sum(axis=1)).all()  # the sum that used to be taken
    SparseVAE.setup_anndata(adata)
    model = SparseVAE(adata, n_factors=2, n_hidden=8)
    assert torch.isfinite(model.module.decoder.head_bias).all()
    assert model.module.non_finite_parameters() == []


def test_huge_counts_train_to_finite_factors():
    adata = small_counts()
    adata.X = adata.X.toarray() * 1e6
    SparseVAE.setup_anndata(adata)
    model = SparseVAE(adata, n_factors=2, n_hidden=8)
    model.train(max_epochs=2, **QUIET)
    assert np.isfinite(model.get_latent_representation()).all()


def test_non_finite_initial_parameters_are_refused(monkeypatch):
    adata = small_counts()
    SparseVAE.setup_anndata(adata)
    # The offsets come from the data's statistics; a broken statistic must not slip through.
    import sparsevae.model._model as model_module

    real = model_module.matrix_stats

    def broken(X):
        stats = real(X)
        stats.col_sums[0] = np.inf
        return stats

    monkeypatch.setattr(model_module, "matrix_stats", broken)
    expect_error(adata, lambda: SparseVAE(adata, n_factors=2), ValueError, "not finite")


def test_lone_last_cell_trains():
    """129 cells with batches of 128 would leave a minibatch of one cell (BatchNorm fails)."""
    adata = small_counts(n_cells=129)
    SparseVAE.setup_anndata(adata)
    model = SparseVAE(adata, n_factors=2, n_hidden=8)
    model.train(max_epochs=2, batch_size=128, **QUIET)
    assert np.isfinite(model.get_latent_representation()).all()


def test_duplicated_cell_names_are_accepted():
    adata = small_counts()
    adata.obs_names = ["cell"] * adata.n_obs
    SparseVAE.setup_anndata(adata)
    model = SparseVAE(adata, n_factors=2, n_hidden=8)
    model.train(max_epochs=1, **QUIET)
    assert model.get_latent_representation().shape == (adata.n_obs, 2)


def test_gaussian_divergence_raises_divergence_error():
    """A learning rate far too large: NaN parameters make torch.distributions refuse its
    arguments; that surfaces as DivergenceError with its advice, not a torch ValueError."""
    adata = small_counts()
    adata.X = np.log1p(adata.X.toarray())
    SparseVAE.setup_anndata(adata)
    model = SparseVAE(adata, n_factors=2, n_hidden=8)
    with torch.no_grad():
        model.module.log_sigma2.fill_(float("nan"))
    with pytest.raises(DivergenceError, match="Lower the learning rate"):
        model.train(max_epochs=2, **QUIET)


@pytest.mark.parametrize("likelihood", ["nb", "zinb", "poisson", "gaussian"])
def test_divergence_from_a_huge_learning_rate(likelihood):
    adata = small_counts()
    if likelihood == "gaussian":
        adata.X = np.log1p(adata.X.toarray())
    SparseVAE.setup_anndata(adata)
    model = SparseVAE(adata, n_factors=2, n_hidden=8, likelihood=likelihood)
    with pytest.raises(DivergenceError, match="diverged"):
        model.train(max_epochs=30, lr=1e6, **QUIET)


# --------------------------------------------------------------------------- CLI
def test_cli_refuses_to_overwrite_and_leaves_the_input(tmp_path, capsys):
    """(Missing input files and bad options: tests/test_cli.py.)"""
    from sparsevae.cli import main

    small_counts().write_h5ad(tmp_path / "in.h5ad")
    before = (tmp_path / "in.h5ad").read_bytes()
    (tmp_path / "out.h5ad").write_text("keep me")
    with pytest.raises(SystemExit) as exc:
        main(["fit", str(tmp_path / "in.h5ad"), str(tmp_path / "out.h5ad"), "--n-factors", "2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "exists" in err and "--overwrite" in err and "Traceback" not in err
    assert (tmp_path / "out.h5ad").read_text() == "keep me"
    assert (tmp_path / "in.h5ad").read_bytes() == before


# --------------------------------------------------------------------------- the prior's schedule
def test_early_stopping_waits_for_the_full_prior():
    """A validation ELBO that never improves (min_delta huge) would stop at once; early stopping
    acts only after the schedule (40 epochs: warm-up 8, ramp 16), so eta is fitted."""
    adata = small_counts()
    SparseVAE.setup_anndata(adata)
    model = SparseVAE(adata, n_factors=2, n_hidden=8)
    model.train(
        max_epochs=40, early_stopping=True, early_stopping_patience=2,
        early_stopping_min_delta=1e12, **QUIET,
    )  # fmt: skip
    epochs = model.trainer.current_epoch
    assert 8 + 16 < epochs < 40, epochs
    assert not np.allclose(model.get_eta().to_numpy(), 0.5)


def test_training_that_ends_before_the_full_prior_warns():
    adata = small_counts()
    SparseVAE.setup_anndata(adata)
    model = SparseVAE(adata, n_factors=2, n_hidden=8)
    with pytest.warns(UserWarning, match="before the mask prior reached full strength"):
        model.train(max_epochs=4, n_epochs_prior_warmup=2, n_epochs_lambda0_ramp=4, **QUIET)


# --------------------------------------------------------------------------- gene sets, metrics
def test_gmt_with_a_repeated_set_name(tmp_path):
    path = tmp_path / "sets.gmt"
    path.write_text("A\tdesc\tg1\tg2\nB\tdesc\tg3\nA\tdesc\tg4\n")
    with pytest.raises(ValueError, match=r"repeats the gene set name 'A' \(first on line 1\)"):
        sparsevae.tl.read_gmt(path)


def test_gmt_that_is_not_utf8(tmp_path):
    path = tmp_path / "sets.gmt"
    path.write_bytes("A\tdesc\tg\xe9ne1\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8 text"):
        sparsevae.tl.read_gmt(path)


@pytest.mark.parametrize("empty", [{}, [{}]])
def test_enrich_without_gene_sets(trained, empty):
    model, _ = trained
    with pytest.raises(ValueError, match="No gene sets"):
        sparsevae.tl.enrich(model, empty)


def test_mask_f1_reports_none_for_unmatched_programs():
    selected = np.zeros((10, 1), dtype=bool)
    selected[:3, 0] = True
    truth = np.zeros((10, 2), dtype=bool)
    truth[:3, 0] = truth[5:8, 1] = True
    res = sparsevae.tl.mask_f1(selected, truth)
    assert res.loc[1, "factor"] is None and res["factor"].dtype == object
    assert res.loc[0, "factor"] == "0" and res.loc[0, "f1"] == 1.0
