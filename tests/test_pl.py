"""Plots: scanpy's show/return and save conventions, ``ax=``, and what each plot marks."""

from itertools import pairwise
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

import sparsevae

from .conftest import QUIET, hand_weights

torch.set_num_threads(1)

# factor_0: genes 0-5 and 6 (shared with factor_1); factor_1: 6-11; factor_2: 12-14;
# factor_3: nothing, W = 0 and eta ~ 0 (switched off).
SELECTION = {0: [*range(6), 6], 1: [6, *range(7, 12)], 2: [12, 13, 14], 3: []}
N_GENES, N_FACTORS = 30, 4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    adata = sparsevae.datasets.simulate_programs(
        n_cells=120, n_genes=N_GENES, n_factors=3, genes_per_program=8, n_shared_genes=0, seed=0
    )
    sparsevae.SparseVAE.setup_anndata(adata, layer="counts")
    m = sparsevae.SparseVAE(adata, n_factors=N_FACTORS, n_hidden=16)
    m.train(
        max_epochs=4,
        batch_size=64,
        n_epochs_prior_warmup=1,
        n_epochs_lambda0_ramp=1,
        **QUIET,
    )
    W = torch.as_tensor(hand_weights(SELECTION, N_GENES, N_FACTORS))
    with torch.no_grad():
        m.module.decoder.W.copy_(W)
        m.module.prior.p_star.copy_(torch.where(W != 0, 0.99, 0.01))
        m.module.prior.eta.copy_(torch.tensor([0.2, 0.2, 0.1, 1e-6]))
    return m


@pytest.fixture(scope="module")
def adata(model):
    out = model.adata.copy()
    model.write_results(out)
    out.obsm["X_umap"] = np.random.default_rng(0).normal(size=(out.n_obs, 2))
    out.obs["group"] = pd.Categorical(np.where(np.arange(out.n_obs) % 2, "a", "b"))
    return out


@pytest.fixture
def enrichment():
    return pd.DataFrame(
        {
            "factor": ["factor_0", "factor_0", "factor_1"],
            "term": ["PROG_A", "OTHER", "PROG_B"],
            "pvalue": [1e-6, 0.2, 1e-4],
            "fdr": [1e-5, 0.3, 1e-3],
            "overlap": [6, 1, 5],
        }
    )


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def settings():
    """scanpy's settings, restored afterwards (monkeypatch cannot undo their class properties)."""
    names = ["autoshow", "autosave", "figdir", "file_format_figs", "plot_suffix"]
    old = {name: getattr(sc.settings, name) for name in names}
    yield sc.settings
    for name, value in old.items():
        setattr(sc.settings, name, value)


def _calls(model, adata, enrichment):
    """Each plot with small arguments, and what it returns when not shown."""
    return {
        "mask_heatmap": (lambda **kw: sparsevae.pl.mask_heatmap(model, n_top=3, **kw), Axes),
        "anchor_heatmap": (lambda **kw: sparsevae.pl.anchor_heatmap(model, n_top=3, **kw), Axes),
        "enrichment_dotplot": (
            lambda **kw: sparsevae.pl.enrichment_dotplot(enrichment, **kw),
            Axes,
        ),
        "top_genes": (lambda **kw: sparsevae.pl.top_genes(adata, n=3, **kw), Figure),
        "factors_embedding": (
            lambda **kw: sparsevae.pl.factors_embedding(adata, "umap", obs_keys="group", **kw),
            Figure,
        ),
        "training_history": (lambda **kw: sparsevae.pl.training_history(model, **kw), Figure),
    }


PLOTS = [
    "mask_heatmap",
    "anchor_heatmap",
    "enrichment_dotplot",
    "top_genes",
    "factors_embedding",
    "training_history",
]


# ---------------------------------------------------------------------------- show / return
@pytest.mark.filterwarnings("ignore:.*non-interactive:UserWarning")
@pytest.mark.parametrize("name", PLOTS)
def test_return_none_when_shown_else_the_plot(name, model, adata, enrichment, settings):
    plot, kind = _calls(model, adata, enrichment)[name]
    assert plot(show=True) is None
    assert isinstance(plot(show=False), kind)
    # show=None follows scanpy's autoshow
    settings.autoshow = False
    assert isinstance(plot(), kind)
    settings.autoshow = True
    assert plot() is None


def test_ax_is_honoured(model, enrichment):
    fig, axes = plt.subplots(2, 2, figsize=(10, 10))
    n_figures = len(plt.get_fignums())
    got = [
        sparsevae.pl.mask_heatmap(model, n_top=3, ax=axes[0, 0], show=False),
        sparsevae.pl.anchor_heatmap(model, n_top=3, ax=axes[0, 1], show=False),
        sparsevae.pl.enrichment_dotplot(enrichment, ax=axes[1, 0], show=False),
        sparsevae.pl.mask_heatmap(model.get_mask(), ax=axes[1, 1], show=False),
    ]
    assert [a is b for a, b in zip(got, axes.ravel(), strict=True)] == [True] * 4
    assert len(plt.get_fignums()) == n_figures  # no new figure
    for ax in got:
        assert ax.figure is fig and (ax.images or ax.collections)


# ---------------------------------------------------------------------------- save
@pytest.fixture
def figdir(tmp_path, settings):
    out = tmp_path / "figures"
    settings.figdir = out
    settings.file_format_figs = "png"
    settings.plot_suffix = ""
    settings.autosave = False
    return out


@pytest.mark.parametrize("name", PLOTS)
def test_save_true_writes_to_figdir(name, model, adata, enrichment, figdir):
    plot, _ = _calls(model, adata, enrichment)[name]
    plot(show=False, save=True)
    assert [p.name for p in figdir.iterdir()] == [f"{name}.png"]


def test_save_suffix_and_paths(model, figdir, tmp_path):
    def plot(save):
        return sparsevae.pl.mask_heatmap(model, n_top=3, show=False, save=save)

    plot("_run1")  # no extension: scanpy's file_format_figs
    plot("_run1.pdf")  # the extension sets the format
    sc.settings.file_format_figs = "svg"
    plot("_run2")
    assert sorted(p.name for p in figdir.iterdir()) == [
        "mask_heatmap_run1.pdf",
        "mask_heatmap_run1.png",
        "mask_heatmap_run2.svg",
    ]
    assert (figdir / "mask_heatmap_run1.pdf").read_bytes().startswith(b"%PDF")

    # an explicit path, as a Path or as a string with a directory separator
    plot(tmp_path / "explicit.png")
    plot(str(tmp_path / "as_string.pdf"))
    assert (tmp_path / "explicit.png").stat().st_size > 0
    assert (tmp_path / "as_string.pdf").read_bytes().startswith(b"%PDF")
    assert len(list(figdir.iterdir())) == 3  # nothing more in figdir

    # save=None follows scanpy's autosave; save=False never saves
    sc.settings.autosave = True
    sparsevae.pl.top_genes(model, n=3, show=False)
    sparsevae.pl.training_history(model, show=False, save=False)
    assert (figdir / "top_genes.svg").is_file()
    assert not any(p.name.startswith("training_history") for p in figdir.iterdir())
    with pytest.raises(TypeError, match="save"):
        plot(3)


@pytest.mark.filterwarnings("ignore:.*non-interactive:UserWarning")
def test_saved_and_shown_figure_is_closed(model, figdir):
    n_figures = len(plt.get_fignums())
    assert sparsevae.pl.top_genes(model, n=3, show=True, save=True) is None
    assert (figdir / "top_genes.png").is_file()
    assert len(plt.get_fignums()) == n_figures


# ---------------------------------------------------------------------------- content
def _titles(fig):
    return [ax.get_title() for ax in fig.axes if ax.get_title()]


def test_switched_off_factors_left_out_by_default(model, adata):
    status = sparsevae.tl.read_results(model).factor_status(None, 0.5)
    assert status.set_index("factor").switched_off.to_dict() == {
        "factor_0": False,
        "factor_1": False,
        "factor_2": False,
        "factor_3": True,
    }
    fig = sparsevae.pl.top_genes(model, n=3, show=False)
    assert _titles(fig) == ["factor_0", "factor_1", "factor_2"]
    fig = sparsevae.pl.top_genes(model, n=3, include_off=True, show=False)
    assert _titles(fig)[-1] == "factor_3 (switched off)"
    fig = sparsevae.pl.top_genes(model, n=3, factors=[3], show=False)  # asked for by name
    assert _titles(fig) == ["factor_3 (switched off)"]

    fig = sparsevae.pl.factors_embedding(adata, "umap", show=False)
    assert _titles(fig) == ["factor_0", "factor_1", "factor_2"]
    fig = sparsevae.pl.factors_embedding(adata, "umap", include_off=True, show=False)
    assert "factor_3" in _titles(fig)
    fig = sparsevae.pl.factors_embedding(adata, "umap", factors=["factor_3"], show=False)
    assert _titles(fig) == ["factor_3"]
    # without stored results (factors only), every factor is drawn
    bare = adata.copy()
    del bare.uns["sparsevae"]
    fig = sparsevae.pl.factors_embedding(bare, "umap", show=False)
    assert len(_titles(fig)) == N_FACTORS


def test_factors_embedding_keeps_obs_panels_apart(adata):
    fig = sparsevae.pl.factors_embedding(adata, "umap", obs_keys="group", ncols=2, show=False)
    assert _titles(fig) == ["group", "factor_0", "factor_1", "factor_2"]
    width, height = fig.get_size_inches()
    assert width < 8 and height < 10  # 2 columns, 1 + 2 rows of about 3 inches


def _dots(ax, gid):
    found = [c for c in ax.collections if c.get_gid() == gid]
    if not found:
        return set()
    xticks = [t.get_text() for t in ax.get_xticklabels()]
    yticks = [t.get_text() for t in ax.get_yticklabels()]
    return {(yticks[round(y)], xticks[round(x)]) for x, y in found[0].get_offsets()}


def test_mask_heatmap_marks_selected_entries(model):
    ax = sparsevae.pl.mask_heatmap(model, n_top=10, show=False)
    genes = model.adata.var_names
    expected = {(genes[j], f"factor_{k}") for k, js in SELECTION.items() for j in js}
    assert _dots(ax, "selected") == expected
    assert "selected" in ax.get_title() and "p*" in ax.get_title()
    # gene 6 is shown once, with a dot in both of its factors' columns
    assert [t.get_text() for t in ax.get_yticklabels()].count(genes[6]) == 1

    # stricter threshold: nothing passes, no dots and a note
    ax = sparsevae.pl.mask_heatmap(model, threshold=0.999, show=False)
    assert _dots(ax, "selected") == set() and "no gene passes" in ax.get_title()

    # anchors: a star in the anchor's column, on top of its dot
    ax = sparsevae.pl.anchor_heatmap(model, n_top=10, show=False)
    assert _dots(ax, "anchor") == expected - {(genes[6], "factor_0"), (genes[6], "factor_1")}

    # a DataFrame: selected where |value| > threshold
    values = pd.DataFrame({"a": [0.9, 0.1, 0.0], "b": [0.6, 0.0, -0.7]}, index=["g0", "g1", "g2"])
    ax = sparsevae.pl.mask_heatmap(values, show=False)
    assert _dots(ax, "selected") == {("g0", "a"), ("g0", "b"), ("g2", "b")}


def test_top_genes_has_plain_non_overlapping_ticks(model):
    fig = sparsevae.pl.top_genes(model, n=6, values="effect", include_off=True, show=False)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        assert ax.xaxis.get_offset_text().get_text() == ""
        labels = [t for t in ax.get_xticklabels() if t.get_text()]
        assert labels and not any("e" in t.get_text() for t in labels)
        boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: b.x0)
        assert all(a.x1 <= b.x0 for a, b in pairwise(boxes))
    # y labels of a panel do not run into its left neighbour
    left, right = fig.axes[0], fig.axes[1]
    names = [t.get_window_extent(renderer) for t in right.get_yticklabels()]
    assert min(b.x0 for b in names) > left.get_window_extent(renderer).x1


def test_training_history_phases_and_constant_curves(model):
    fig = sparsevae.pl.training_history(model, show=False)
    titles = _titles(fig)
    assert "kl_weight" not in titles  # constant without a KL warm-up
    assert {"elbo", "reconstruction_loss", "kl_local"} <= set(titles)
    # the run's schedule: warm-up 1 epoch, ladder 1 epoch, full prior from epoch 2
    ax = fig.axes[0]
    lines = [ln.get_xdata()[0] for ln in ax.lines if ln.get_linestyle() == "--"]
    assert lines == [1.5]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["warm-up, no mask prior (1)", "spike-rate ladder (1)", "full prior from 2"]
    assert "assumed" not in fig.legends[0].get_title().get_text()

    fig = sparsevae.pl.training_history(model, keys=["kl_weight"], phases=False, show=False)
    assert _titles(fig) == ["kl_weight"] and not fig.legends

    # a loaded model has no trainer: the default schedule for the epochs recorded
    loaded = SimpleNamespace(history=model.history, module=model.module)
    fig = sparsevae.pl.training_history(loaded, show=False)
    expected = sparsevae.train.prior_schedule(4, True)
    assert "assumed" in fig.legends[0].get_title().get_text()
    lines = [ln.get_xdata()[0] for ln in fig.axes[0].lines if ln.get_linestyle() == "--"]
    assert lines == [expected.full_prior_epoch - 0.5]

    class Untrained:
        history = None

    fig = sparsevae.pl.training_history(Untrained(), show=False)
    assert isinstance(fig, Figure) and "No training history" in fig.axes[0].texts[0].get_text()
