"""Plots for interpreting trained SparseVAE models: anchors, top genes, enrichment, history."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from ..model import SparseVAE
from ..tl import FitData, anchor_genes, check_min_pstar, read_results
from ..tl import top_genes as tl_top_genes
from ._base import ANCHOR_COLOR, OTHER_COLOR, SELECTED_COLOR, check_positive_int, finish
from ._plots import mask_heatmap

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "anchor_heatmap",
    "enrichment_dotplot",
    "factors_embedding",
    "top_genes",
    "training_history",
]


def _grid(n_panels: int, ncols: int, panel_size: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    import matplotlib.pyplot as plt

    ncols = max(1, min(ncols, n_panels))
    nrows = int(np.ceil(n_panels / ncols))
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(panel_size[0] * ncols, panel_size[1] * nrows),
        squeeze=False,
    )
    flat = axes.ravel()
    for ax in flat[n_panels:]:
        ax.set_visible(False)
    return fig, flat[:n_panels]


# ---------------------------------------------------------------------------- anchors
def anchor_heatmap(
    data: FitData,
    *,
    n_top: int = 10,
    values: Literal["W", "pstar"] = "W",
    min_pstar: float = 0.5,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    kind: str | None = None,
    key: str = "sparsevae",
) -> Axes:
    """Mask heatmap (:func:`~sparsevae.pl.mask_heatmap`) with the anchor genes marked.

    Anchor genes (selected by one factor only, see :func:`sparsevae.tl.anchor_genes`) get a red,
    bold label and a star in the column of their factor.

    Parameters
    ----------
    data
        An AnnData with results (``model.write_results(adata)``) or a trained
        :class:`~sparsevae.SparseVAE`; with a mask prior.
    n_top
        Maximum number of genes shown per factor.
    values
        Plot ``|W|`` (``"W"``) or ``p*`` (``"pstar"``).
    min_pstar
        Selection threshold on ``p*``.
    ax
        Axes to draw in; default a new figure.
    show
        Show the figure; default: show unless ``save`` is given, following
        ``scanpy.settings.autoshow``.
    save
        Path to save the figure to (format from the extension).
    kind
        Multi-study models: which mask, ``None``/``"shared"`` (default) or a study name; anchors
        as defined by :func:`sparsevae.tl.anchor_genes` for that mask.
    key
        The ``key_added`` the results were written with (AnnData only).

    Returns
    -------
    The matplotlib Axes with the heatmap.

    Examples
    --------
    >>> sparsevae.pl.anchor_heatmap(model, n_top=8, show=False)
    """
    res = read_results(data, key)
    anchors = anchor_genes(res, min_pstar=min_pstar, anchors_only=True, kind=kind)
    ax = mask_heatmap(
        res, n_top=n_top, values=values, threshold=min_pstar, ax=ax, show=False, kind=kind
    )
    factor_pos = {str(t.get_text()): i for i, t in enumerate(ax.get_xticklabels())}
    anchor_of = dict(zip(anchors["gene"], anchors["factor"], strict=True))
    xs, ys = [], []
    for row, label in enumerate(ax.get_yticklabels()):
        gene = str(label.get_text())
        if gene in anchor_of:
            label.set_color(ANCHOR_COLOR)
            label.set_fontweight("bold")
            if anchor_of[gene] in factor_pos:
                xs.append(factor_pos[anchor_of[gene]])
                ys.append(row)
    if xs:
        ax.scatter(xs, ys, marker="*", s=30, color=ANCHOR_COLOR, edgecolors="white", lw=0.3)
    ax.set_title(f"{ax.get_title()}\nanchor genes in red ({len(anchors)} in all)", fontsize=9)
    finish(ax.figure, show, save)
    return ax


def top_genes(
    data: FitData,
    *,
    n: int = 10,
    factors: Sequence[str | int] | str | int | None = None,
    values: Literal["W", "pstar", "effect"] = "W",
    effects: pd.DataFrame | None = None,
    min_pstar: float = 0.5,
    ncols: int = 4,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    kind: str | None = None,
    key: str = "sparsevae",
) -> Figure:
    """Bar plot of each factor's top genes (ranked by ``p*`` then ``|W|``).

    Bars are red for anchor genes, blue for other selected genes (``p* >= min_pstar``) and grey
    for genes the mask does not select.

    Parameters
    ----------
    data
        An AnnData with results or a trained model, see :func:`anchor_heatmap`.
    n
        Genes per factor.
    factors
        Factors to plot (names or integer positions); default all.
    values
        Bar length: the signed mask entry ``W``, the inclusion probability ``p*``, or the signed
        gene effect (``model.get_gene_effects()``).
    effects
        Precomputed genes x factors effects for ``values="effect"``; default the stored ones
        (AnnData) or computed (model).
    min_pstar
        Selection threshold on ``p*`` for the colours.
    ncols
        Panels per row.
    show
        Show the figure; default: show unless ``save`` is given, following
        ``scanpy.settings.autoshow``.
    save
        Path to save the figure to.
    kind
        Multi-study models: which mask, ``None``/``"shared"`` (default) or a study name.
    key
        The ``key_added`` the results were written with (AnnData only).

    Returns
    -------
    The matplotlib Figure.

    Examples
    --------
    >>> sparsevae.pl.top_genes(model, n=8, factors=[0, 1], show=False)
    """
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    n = check_positive_int("n", n)
    ncols = check_positive_int("ncols", ncols)
    min_pstar = check_min_pstar(min_pstar)
    if values not in ("W", "pstar", "effect"):
        raise ValueError(f"values must be 'W', 'pstar' or 'effect', got {values!r}.")
    res = read_results(data, key)
    table = tl_top_genes(res, n=n, factors=factors, kind=kind)
    pstar = res.mask(kind).pstar
    if values == "W":
        shown, xlabel = res.mask(kind).W, "W"
    elif values == "pstar":
        shown, xlabel = pstar, "p*"
    else:
        # precomputed effects may be on either scale (expression or link): label them plainly
        xlabel = "gene effect" if effects is not None else "effect on expected expression"
        shown = res.effects(kind) if effects is None else effects
    selected = res.selected(kind, min_pstar)
    is_anchor = res.anchors(kind, min_pstar)

    fig, axes = _grid(table.shape[1], ncols, (3.0, 0.25 * len(table) + 1.2))
    for ax, factor in zip(axes, table.columns, strict=True):
        genes = table[factor].tolist()
        vals = shown.loc[genes, factor].to_numpy(dtype=float)
        colors = [
            (ANCHOR_COLOR if is_anchor.loc[g, factor] else SELECTED_COLOR)
            if selected.loc[g, factor]
            else OTHER_COLOR
            for g in genes
        ]
        y = np.arange(len(genes))
        ax.barh(y, vals, color=colors)
        ax.set_yticks(y)
        ax.set_yticklabels(genes, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(0.0, color="black", lw=0.5)
        ax.set_title(str(factor), fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
    handles = [
        Patch(color=ANCHOR_COLOR, label="anchor"),
        Patch(color=SELECTED_COLOR, label="selected"),
        Patch(color=OTHER_COLOR, label="not selected"),
    ]
    fig.legend(handles=handles, loc="upper right", fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    finish(fig, show, save)
    return fig


# ---------------------------------------------------------------------------- enrichment
def enrichment_dotplot(
    enrich_df: pd.DataFrame,
    *,
    n_terms: int = 5,
    max_fdr: float | None = None,
    color: str | None = None,
    size: str = "overlap",
    factors: Sequence[str] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
) -> Axes:
    """Dot plot of the top enriched gene sets per factor (output of :func:`sparsevae.tl.enrich`).

    Parameters
    ----------
    enrich_df
        Result of :func:`sparsevae.tl.enrich` (columns ``factor``, ``term``, ``pvalue``, ``fdr``,
        ``overlap``, and ``nes`` for prerank).
    n_terms
        Terms kept per factor (smallest p-values).
    max_fdr
        Keep only rows with ``fdr <= max_fdr``; default keep all.
    color
        Column mapped to colour: default ``"nes"`` when present (prerank, diverging colours),
        else ``-log10(fdr)``. Any numeric column, or ``"-log10(fdr)"`` / ``"-log10(pvalue)"``.
    size
        Numeric column mapped to dot size.
    factors
        Factors (columns) to show, in order; default those in ``enrich_df``.
    ax
        Axes to draw in; default a new figure.
    show
        Show the figure; default: show unless ``save`` is given, following
        ``scanpy.settings.autoshow``.
    save
        Path to save the figure to.

    Returns
    -------
    The matplotlib Axes.

    Examples
    --------
    >>> enr = sparsevae.tl.enrich(model, "h.all.v7.5.1.symbols.gmt")
    >>> sparsevae.pl.enrichment_dotplot(enr, n_terms=3, show=False)
    """
    import matplotlib.pyplot as plt

    n_terms = check_positive_int("n_terms", n_terms)
    needed = {"factor", "term", "pvalue", "fdr"}
    if not isinstance(enrich_df, pd.DataFrame) or not needed <= set(enrich_df.columns):
        raise ValueError(
            f"enrich_df must be a DataFrame from sparsevae.tl.enrich with columns {sorted(needed)}."
        )
    df = enrich_df.copy()
    if max_fdr is not None:
        df = df[df["fdr"] <= max_fdr]
    if factors is not None:
        df = df[df["factor"].isin(list(factors))]
    if color is None:
        color = "nes" if "nes" in df.columns else "-log10(fdr)"
    for col in ("fdr", "pvalue"):
        df[f"-log10({col})"] = -np.log10(np.clip(df[col].astype(float), 1e-300, 1.0))
    for col, what in ((color, "color"), (size, "size")):
        if col not in df.columns:
            raise ValueError(f"{what} column {col!r} is not in enrich_df.")
    df = df.sort_values("pvalue", kind="stable").groupby("factor", sort=False).head(n_terms)

    if ax is None:
        n_rows = max(1, df["term"].nunique())
        n_cols = max(1, df["factor"].nunique())
        longest = int(df["term"].astype(str).str.len().max()) if len(df) else 10
        height = float(np.clip(0.28 * n_rows + 1.5, 2.5, 30.0))
        width = float(np.clip(0.55 * n_cols + 0.07 * longest + 3.0, 4.0, 24.0))
        _, ax = plt.subplots(figsize=(width, height))
    fig = ax.figure
    if df.empty:
        ax.text(0.5, 0.5, "no enrichment results to show", ha="center", va="center")
        ax.set_axis_off()
        finish(fig, show, save)
        return ax

    factor_order = list(factors) if factors is not None else list(enrich_df["factor"])
    present = set(df["factor"])
    factor_order = [f for f in dict.fromkeys(factor_order) if f in present]
    factor_pos = {f: i for i, f in enumerate(factor_order)}
    # Terms grouped by the first factor (in column order) where they appear.
    by_factor = df.assign(_pos=df["factor"].map(factor_pos)).sort_values("_pos", kind="stable")
    term_order = list(dict.fromkeys(by_factor["term"]))
    x = df["factor"].map(factor_pos).to_numpy()
    y = df["term"].map({t: i for i, t in enumerate(term_order)}).to_numpy()
    sizes = df[size].astype(float).to_numpy()
    smax = float(np.nanmax(sizes)) if np.isfinite(sizes).any() and np.nanmax(sizes) > 0 else 1.0
    cvals = df[color].astype(float).to_numpy()
    if color == "nes":
        lim = float(np.nanmax(np.abs(cvals))) if np.isfinite(cvals).any() else 1.0
        cmap, vmin, vmax = "RdBu_r", -max(lim, 1e-9), max(lim, 1e-9)
    else:
        cmap, vmin, vmax = "viridis", None, None
    sc_ = ax.scatter(
        x,
        y,
        s=20 + 180 * sizes / smax,
        c=cvals,
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        edgecolors="black",
        linewidths=0.3,
    )
    ax.set_xticks(range(len(factor_order)))
    ax.set_xticklabels(factor_order, rotation=90)
    ax.set_yticks(range(len(term_order)))
    ax.set_yticklabels(term_order, fontsize=7)
    ax.set_xlim(-0.6, len(factor_order) - 0.4)
    ax.set_ylim(len(term_order) - 0.5, -0.5)
    ax.grid(True, lw=0.3, alpha=0.5)
    ax.set_axisbelow(True)
    fig.colorbar(sc_, ax=ax, label=color, shrink=0.6)
    for frac in (0.25, 1.0):
        ax.scatter([], [], s=20 + 180 * frac, color="gray", label=f"{size} {frac * smax:.3g}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.3, 1.0), fontsize=7, frameon=False)
    ax.set_title("Gene-set enrichment per factor", fontsize=9)
    finish(fig, show, save)
    return ax


# ---------------------------------------------------------------------------- embeddings
def factors_embedding(
    adata: AnnData,
    basis: str = "umap",
    *,
    factors: Sequence[str | int] | None = None,
    key: str = "X_sparsevae",
    obs_keys: Sequence[str] | str | None = None,
    ncols: int = 4,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    **kwargs: Any,
) -> Figure:
    """Cells in an embedding (UMAP, t-SNE, ...) coloured by each factor, through scanpy.

    ``adata`` is not modified: the factors are read from ``adata.obsm[key]`` (written by
    ``model.write_results(adata)``) and plotted from a temporary AnnData.

    Parameters
    ----------
    adata
        AnnData with the embedding in ``obsm[f"X_{basis}"]`` (or ``obsm[basis]``) and the factors
        in ``obsm[key]``.
    basis
        Embedding, e.g. ``"umap"`` (after ``sc.tl.umap``), ``"tsne"`` or ``"pca"``.
    factors
        Factors to show (names or integer positions); default all. Names come from
        ``adata.uns[key.removeprefix("X_")]["factor_names"]`` when present, else ``factor_k``.
    key
        ``obsm`` key of the factors.
    obs_keys
        Columns of ``adata.obs`` to show first (e.g. cell types).
    ncols
        Panels per row.
    show
        Show the figure; default: show unless ``save`` is given, following
        ``scanpy.settings.autoshow``.
    save
        Path to save the figure to.
    **kwargs
        Passed to :func:`scanpy.pl.embedding` (defaults: ``cmap="RdBu_r"``, ``vcenter=0``).

    Returns
    -------
    The matplotlib Figure.

    Examples
    --------
    >>> model.write_results(adata)
    >>> sc.pp.neighbors(adata, use_rep="X_sparsevae"); sc.tl.umap(adata)
    >>> sparsevae.pl.factors_embedding(adata, "umap", obs_keys="bulk_labels", show=False)
    """
    import anndata as ad
    import matplotlib.pyplot as plt
    import scanpy as sc

    ncols = check_positive_int("ncols", ncols)
    basis_key = f"X_{basis}" if f"X_{basis}" in adata.obsm else basis
    if basis_key not in adata.obsm:
        raise KeyError(
            f"No embedding adata.obsm['X_{basis}']: compute it first (e.g. "
            f"sc.pp.neighbors(adata, use_rep={key!r}); sc.tl.umap(adata))."
        )
    if key not in adata.obsm:
        raise KeyError(f"No factors in adata.obsm[{key!r}]: run model.write_results(adata) first.")
    z = np.asarray(adata.obsm[key], dtype=float)
    uns = adata.uns.get(key.removeprefix("X_"), {})
    names = [str(f) for f in uns.get("factor_names", [])] if isinstance(uns, dict) else []
    if len(names) != z.shape[1]:
        names = [f"factor_{k}" for k in range(z.shape[1])]
    if factors is None:
        chosen = list(range(z.shape[1]))
    else:
        chosen = []
        for f in [factors] if isinstance(factors, str | int) else factors:
            if isinstance(f, int | np.integer) and 0 <= f < len(names):
                chosen.append(int(f))
            elif f in names:
                chosen.append(names.index(f))
            else:
                raise ValueError(f"Unknown factor {f!r}; the factors are {names}.")
    obs_keys = [obs_keys] if isinstance(obs_keys, str) else list(obs_keys or [])
    for k in obs_keys:
        if k not in adata.obs:
            raise KeyError(f"{k!r} is not a column of adata.obs.")
    obs = adata.obs[obs_keys].copy()
    for i in chosen:
        obs[names[i]] = z[:, i]
    tmp = ad.AnnData(obs=obs, obsm={f"X_{basis}": np.asarray(adata.obsm[basis_key])})
    for k in obs_keys:
        if f"{k}_colors" in adata.uns:
            tmp.uns[f"{k}_colors"] = list(adata.uns[f"{k}_colors"])
    kwargs.setdefault("cmap", "RdBu_r")
    kwargs.setdefault("vcenter", 0)
    if obs_keys:
        kwargs.setdefault("wspace", 0.5)  # room for categorical legends
    colors = obs_keys + [names[i] for i in chosen]
    fig = sc.pl.embedding(
        tmp, basis=basis, color=colors, ncols=ncols, show=False, return_fig=True, **kwargs
    )
    if fig is None:  # pragma: no cover - older scanpy versions
        fig = plt.gcf()
    finish(fig, show, save)
    return fig


# ---------------------------------------------------------------------------- history
def _history_groups(history: dict[str, Any]) -> dict[str, dict[str, pd.Series]]:
    """Group history entries by metric: ``{metric: {"train": series, "validation": ...}}``."""
    groups: dict[str, dict[str, pd.Series]] = {}
    for name, value in history.items():
        if isinstance(value, pd.DataFrame):
            if value.shape[1] == 0 or value.shape[0] == 0:
                continue
            series = value.iloc[:, 0]
        elif isinstance(value, pd.Series):
            series = value
        else:
            continue
        series = pd.to_numeric(series, errors="coerce").dropna()
        if series.empty:
            continue
        if name.endswith("_train"):
            metric, split = name.removesuffix("_train"), "train"
        elif name.endswith("_validation"):
            metric, split = name.removesuffix("_validation"), "validation"
        elif name.startswith("train_"):
            metric, split = name.removeprefix("train_"), "train"
        elif name.startswith("validation_"):
            metric, split = name.removeprefix("validation_"), "validation"
        else:
            metric, split = name, ""
        groups.setdefault(metric, {})[split] = series
    return groups


def training_history(
    model: SparseVAE,
    *,
    keys: Sequence[str] | None = None,
    ncols: int = 3,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
) -> Figure:
    """Training curves of a model: one panel per metric, train and validation together.

    Parameters
    ----------
    model
        A trained model with a ``history`` dict of DataFrames (scvi-tools' ``model.history``,
        keys like ``"elbo_train"``, ``"reconstruction_loss_train"``, ``"kl_local_train"``).
    keys
        Metrics to plot (e.g. ``["elbo", "kl_local"]``, without the ``_train`` /
        ``_validation`` suffix); default all recorded.
    ncols
        Panels per row.
    show
        Show the figure; default: show unless ``save`` is given, following
        ``scanpy.settings.autoshow``.
    save
        Path to save the figure to.

    Returns
    -------
    The matplotlib Figure; when nothing was recorded (e.g. training with ``logger=False``) it
    holds a note saying so.

    Examples
    --------
    >>> sparsevae.pl.training_history(model, keys=["elbo", "kl_local"], show=False)
    """
    import matplotlib.pyplot as plt

    ncols = check_positive_int("ncols", ncols)
    history = model.history or {}
    groups = _history_groups(dict(history))
    if keys is not None:
        unknown = [k for k in keys if k not in groups]
        if unknown:
            raise KeyError(f"No history for {unknown}; recorded metrics: {sorted(groups)}.")
        groups = {k: groups[k] for k in keys}
    if not groups:
        fig, ax = plt.subplots(figsize=(4, 2.5))
        ax.text(
            0.5,
            0.5,
            "No training history recorded\n(not trained yet, or trained with logger=False)",
            ha="center",
            va="center",
            fontsize=9,
        )
        ax.set_axis_off()
        finish(fig, show, save)
        return fig
    fig, axes = _grid(len(groups), ncols, (3.6, 2.8))
    for ax, (metric, splits) in zip(axes, groups.items(), strict=True):
        for split, series in splits.items():
            index = np.asarray(series.index, dtype=float)
            ax.plot(index, series.to_numpy(), marker="." if len(series) < 30 else None, label=split)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(splits) > 1 or "" not in splits:
            ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    finish(fig, show, save)
    return fig
