"""Plots for interpreting trained SparseVAE models: anchors, top genes, enrichment, history."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from ..model import SparseVAE
from ..priors import DEFAULT_MIN_PSTAR
from ..tl import FitData, anchor_genes, check_min_pstar, read_results
from ..tl import top_genes as tl_top_genes
from ..train import PriorSchedule, prior_schedule
from ._base import (
    ANCHOR_COLOR,
    OTHER_COLOR,
    SELECTED_COLOR,
    check_positive_int,
    finish,
    switched_off,
)
from ._plots import mask_heatmap

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

__all__ = [
    "anchor_heatmap",
    "enrichment_dotplot",
    "factors_embedding",
    "top_genes",
    "training_history",
]


def _grid(
    n_panels: int, ncols: int, panel_size: tuple[float, float], **kwargs: Any
) -> tuple[Figure, np.ndarray]:
    """A figure with ``n_panels`` axes, ``ncols`` per row; axes beyond them are removed."""
    import matplotlib.pyplot as plt

    ncols = max(1, min(ncols, n_panels))
    nrows = int(np.ceil(n_panels / ncols))
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(panel_size[0] * ncols, panel_size[1] * nrows),
        squeeze=False,
        **kwargs,
    )
    flat = axes.ravel()
    for ax in flat[n_panels:]:
        ax.remove()
    return fig, flat[:n_panels]


def _plain_formatter(values: np.ndarray) -> FuncFormatter:
    """Tick labels as plain decimals (no offset or exponent), trailing zeros dropped."""
    from matplotlib.ticker import FuncFormatter

    top = float(np.nanmax(np.abs(values), initial=0.0))
    decimals = max(0, int(np.ceil(-np.log10(top))) + 2) if top > 0 else 1

    def label(x: float, pos: int | None = None) -> str:
        text = f"{x:.{decimals}f}"
        text = text.rstrip("0").rstrip(".") if "." in text else text
        return "0" if text in ("", "-0") else text

    return FuncFormatter(label)


def _note_figure(text: str) -> Figure:
    """A small figure holding only a note (nothing to plot)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 2.5))
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9)
    ax.set_axis_off()
    return fig


# ---------------------------------------------------------------------------- anchors
def anchor_heatmap(
    data: FitData,
    *,
    n_top: int = 10,
    values: Literal["W", "pstar"] = "W",
    min_pstar: float = 0.5,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | os.PathLike | None = None,
    kind: str | None = None,
    key: str = "sparsevae",
) -> Axes | None:
    """Mask heatmap (:func:`~sparsevae.pl.mask_heatmap`) with the anchor genes marked.

    Anchor genes (selected by one factor only, see :func:`sparsevae.tl.anchor_genes`) get a red,
    bold label and a red star in the column of their factor; other selected entries a white dot.

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
        Axes to draw in (e.g. one panel of your own grid); default a new figure.
    show
        Show the figure and return ``None``; default ``scanpy.settings.autoshow``. Pass
        ``False`` to get the Axes back.
    save
        As in scanpy: ``True`` writes ``sc.settings.figdir / "anchor_heatmap.<ext>"``, a string
        suffix such as ``"_run1.pdf"`` writes ``figdir / "anchor_heatmap_run1.pdf"``; a path
        (``pathlib.Path``, or a string with a ``/``) is written as given.
    kind
        Multi-study models: which mask, ``None``/``"shared"`` (default) or a study name; anchors
        as defined by :func:`sparsevae.tl.anchor_genes` for that mask.
    key
        The ``key_added`` the results were written with (AnnData only).

    Returns
    -------
    The matplotlib Axes with the heatmap, or ``None`` when the figure was shown.

    Examples
    --------
    >>> sparsevae.pl.anchor_heatmap(model, n_top=8, show=False)
    """
    res = read_results(data, key)
    anchors = anchor_genes(res, min_pstar=min_pstar, anchors_only=True, kind=kind)
    ax = mask_heatmap(
        res,
        n_top=n_top,
        values=values,
        threshold=min_pstar,
        ax=ax,
        show=False,
        save=False,
        kind=kind,
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
        dots = [c for c in ax.collections if c.get_gid() == "selected"]
        size = 3.0 * float(dots[0].get_sizes()[0]) if dots else 30.0
        xlim, ylim = ax.get_xlim(), ax.get_ylim()
        ax.scatter(
            xs,
            ys,
            marker="*",
            s=size,
            color=ANCHOR_COLOR,
            edgecolors="white",
            lw=0.3,
            gid="anchor",
            zorder=4,
        )
        ax.set_xlim(xlim)
        ax.set_ylim(ylim)
    title = f"{ax.get_title()}\nred stars and labels: anchor genes ({len(anchors)} in all)"
    ax.set_title(title, fontsize=9)
    return finish(ax.figure, ax, name="anchor_heatmap", show=show, save=save)


def top_genes(
    data: FitData,
    *,
    n: int = 10,
    factors: Sequence[str | int] | str | int | None = None,
    values: Literal["W", "pstar", "effect"] = "W",
    effects: pd.DataFrame | None = None,
    min_pstar: float = 0.5,
    include_off: bool = False,
    ncols: int = 4,
    show: bool | None = None,
    save: bool | str | os.PathLike | None = None,
    kind: str | None = None,
    key: str = "sparsevae",
) -> Figure | None:
    """Bar plot of each factor's top genes (ranked by ``p*`` then ``|W|``), one panel per factor.

    Bars are red for anchor genes, blue for other selected genes (``p* >= min_pstar``) and grey
    for genes the mask does not select.

    Parameters
    ----------
    data
        An AnnData with results or a trained model, see :func:`anchor_heatmap`.
    n
        Genes per factor.
    factors
        Factors to plot (names or integer positions); default all factors in use. Factors named
        here are drawn even when switched off.
    values
        Bar length: the signed mask entry ``W``, the inclusion probability ``p*``, or the signed
        gene effect (``model.get_gene_effects()``).
    effects
        Precomputed genes x factors effects for ``values="effect"``; default the stored ones
        (AnnData) or computed (model).
    min_pstar
        Selection threshold on ``p*`` for the colours and for which factors are switched off.
    include_off
        Also draw the factors that are switched off (they select no gene and the decoder does
        not use them, see :func:`sparsevae.tl.identifiability_report`); by default they are left
        out.
    ncols
        Panels per row.
    show
        Show the figure and return ``None``; default ``scanpy.settings.autoshow``. Pass
        ``False`` to get the Figure back.
    save
        As in scanpy: ``True`` writes ``sc.settings.figdir / "top_genes.<ext>"``, a string
        suffix such as ``"_run1.pdf"`` writes ``figdir / "top_genes_run1.pdf"``; a path
        (``pathlib.Path``, or a string with a ``/``) is written as given.
    kind
        Multi-study models: which mask, ``None``/``"shared"`` (default) or a study name.
    key
        The ``key_added`` the results were written with (AnnData only).

    Returns
    -------
    The matplotlib Figure (one Axes per factor in ``fig.axes``), or ``None`` when shown. When
    every factor is switched off it holds a note saying so.

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
    res.require_prior("top_genes")
    chosen = res.resolve_factors(factors, kind)
    off = switched_off(res, kind, min_pstar)
    if factors is None and not include_off:
        chosen = [f for f in chosen if f not in off]
    if not chosen:
        fig = _note_figure("Every factor is switched off\n(include_off=True draws them anyway)")
        return finish(fig, fig, name="top_genes", show=show, save=save)
    table = tl_top_genes(res, n=n, factors=chosen, kind=kind)
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

    longest = max(len(str(g)) for g in table.to_numpy().ravel())
    width = 1.9 + 0.055 * longest  # room for the gene names, then about 1.8 in of bars
    n_cols = min(ncols, table.shape[1])
    width = max(width, 3.6 / n_cols)  # the legend above needs about 3.6 in
    fig, axes = _grid(table.shape[1], n_cols, (width, 0.22 * len(table) + 1.0))
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
        ax.set_ylim(len(genes) - 0.5, -0.5)
        ax.axvline(0.0, color="black", lw=0.5)
        ax.grid(False)
        ax.set_title(f"{factor} (switched off)" if factor in off else str(factor), fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(axis="both", length=2, pad=1)
        ax.tick_params(axis="x", labelsize=7)
        # Plain numbers (no "1e-3" offset text) on few ticks, so that labels never collide.
        ax.xaxis.set_major_locator(MaxNLocator(nbins=3, min_n_ticks=2))
        ax.xaxis.set_major_formatter(_plain_formatter(vals))
    handles = [
        Patch(color=ANCHOR_COLOR, label="anchor"),
        Patch(color=SELECTED_COLOR, label=f"selected (p* \u2265 {min_pstar:g})"),
        Patch(color=OTHER_COLOR, label="not selected"),
    ]
    fig.legend(handles=handles, loc="upper center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()), w_pad=1.0)
    return finish(fig, fig, name="top_genes", show=show, save=save)


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
    save: bool | str | os.PathLike | None = None,
) -> Axes | None:
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
        Axes to draw in (e.g. one panel of your own grid); default a new figure sized to the
        terms.
    show
        Show the figure and return ``None``; default ``scanpy.settings.autoshow``. Pass
        ``False`` to get the Axes back.
    save
        As in scanpy: ``True`` writes ``sc.settings.figdir / "enrichment_dotplot.<ext>"``, a
        string suffix such as ``"_run1.pdf"`` writes ``figdir / "enrichment_dotplot_run1.pdf"``;
        a path (``pathlib.Path``, or a string with a ``/``) is written as given.

    Returns
    -------
    The matplotlib Axes, or ``None`` when the figure was shown.

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
        return finish(fig, ax, name="enrichment_dotplot", show=show, save=save)

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
    return finish(fig, ax, name="enrichment_dotplot", show=show, save=save)


# ---------------------------------------------------------------------------- embeddings
def _switched_off_in_obsm(adata: AnnData, key: str) -> set[str]:
    """Switched-off factors of the results stored with the factors ``adata.obsm[key]``.

    Multi-study: a shared factor by the shared mask, a study-specific factor when it is switched
    off in every study. Empty when the AnnData holds no readable results.
    """
    try:
        res = read_results(adata, key.removeprefix("X_"))
    except (KeyError, ValueError, TypeError):
        return set()
    off = switched_off(res, "shared", DEFAULT_MIN_PSTAR)
    per_study = [switched_off(res, kind, DEFAULT_MIN_PSTAR) for kind in res.kinds[1:]]
    return off | set.intersection(*per_study) if per_study else off


def factors_embedding(
    adata: AnnData,
    basis: str = "umap",
    *,
    factors: Sequence[str | int] | None = None,
    key: str = "X_sparsevae",
    obs_keys: Sequence[str] | str | None = None,
    include_off: bool = False,
    ncols: int = 4,
    panel_size: tuple[float, float] = (3.2, 3.0),
    show: bool | None = None,
    save: bool | str | os.PathLike | None = None,
    **kwargs: Any,
) -> Figure | None:
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
        Factors to show (names or integer positions); default all factors in use. Names come
        from ``adata.uns[key.removeprefix("X_")]["factor_names"]`` when present, else
        ``factor_k``. Factors named here are drawn even when switched off.
    key
        ``obsm`` key of the factors.
    obs_keys
        Columns of ``adata.obs`` to show first (e.g. cell types).
    include_off
        Also draw the factors that are switched off (by the results stored with the factors,
        see :func:`sparsevae.tl.identifiability_report`; a study-specific factor only when off
        in every study); by default they are left out.
    ncols
        Panels per row.
    panel_size
        Width and height of one panel in inches; enlarge for many cells.
    show
        Show the figure and return ``None``; default ``scanpy.settings.autoshow``. Pass
        ``False`` to get the Figure back.
    save
        As in scanpy: ``True`` writes ``sc.settings.figdir / "factors_embedding.<ext>"``, a
        string suffix such as ``"_run1.pdf"`` writes ``figdir / "factors_embedding_run1.pdf"``;
        a path (``pathlib.Path``, or a string with a ``/``) is written as given.
    **kwargs
        Passed to :func:`scanpy.pl.embedding` for each panel (defaults: ``cmap="RdBu_r"``,
        ``vcenter=0``).

    Returns
    -------
    The matplotlib Figure (one Axes per panel, plus the colour bars, in ``fig.axes``), or
    ``None`` when shown.

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
        off = set() if include_off else _switched_off_in_obsm(adata, key)
        chosen = [i for i, name in enumerate(names) if name not in off]
        if not chosen:
            logger.warning("Every factor is switched off; include_off=True draws them anyway.")
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
    colors = obs_keys + [names[i] for i in chosen]
    if not colors:
        fig = _note_figure("Every factor is switched off\n(include_off=True draws them anyway)")
        return finish(fig, fig, name="factors_embedding", show=show, save=save)
    # Default dot size: scanpy's (120000 / n_cells) for its 4-inch panels, scaled to ours.
    kwargs.setdefault("size", 120000 / max(adata.n_obs, 1) * (min(panel_size) / 4.0) ** 2)
    # One scanpy panel per axes of our own grid, packed by the constrained layout with their
    # colour bars. The obs panels get their own rows (a subfigure), so that the room their
    # legends need does not widen a column of factor panels.
    n_cols = min(ncols, len(colors))
    groups = [g for g in (obs_keys, colors[len(obs_keys) :]) if g]
    rows = [int(np.ceil(len(g) / n_cols)) for g in groups]
    fig = plt.figure(
        figsize=(panel_size[0] * n_cols, panel_size[1] * sum(rows)), layout="constrained"
    )
    parts = fig.subfigures(len(groups), 1, height_ratios=rows, squeeze=False).ravel()
    for part, group, n_rows in zip(parts, groups, rows, strict=True):
        axes = part.subplots(n_rows, n_cols, squeeze=False).ravel()
        for ax in axes[len(group) :]:
            ax.remove()
        for ax, color in zip(axes, group, strict=False):
            sc.pl.embedding(tmp, basis=basis, color=color, ax=ax, show=False, **kwargs)
    return finish(fig, fig, name="factors_embedding", show=show, save=save)


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


def _is_constant(splits: dict[str, pd.Series]) -> bool:
    """Whether a metric's curves hold at least two points and never change."""
    values = np.concatenate([s.to_numpy(dtype=float) for s in splits.values()])
    if len(values) < 2:
        return False
    return bool(np.ptp(values) <= 1e-12 * max(1.0, float(np.abs(values).max())))


def _prior_phases(model: Any, n_epochs: int) -> tuple[PriorSchedule | None, bool]:
    """The run's prior schedule, and whether it was derived from the defaults.

    The training plan of the last run records it (``model.trainer.lightning_module.schedule``);
    a loaded model has no trainer, so the defaults of :func:`~sparsevae.train.prior_schedule`
    for the epochs in the history are assumed. ``None`` without a mask prior.
    """
    module = getattr(model, "module", None)
    if module is None or getattr(module, "prior", None) is None:
        return None, False
    try:
        schedule = model.trainer.lightning_module.schedule
    except (AttributeError, RuntimeError):
        schedule = None
    if isinstance(schedule, PriorSchedule):
        return schedule, False
    return prior_schedule(n_epochs, bool(getattr(module, "is_count", True))), True


def _draw_phases(
    fig: Figure, axes: Sequence[Axes], schedule: PriorSchedule, derived: bool, last_epoch: float
) -> None:
    """Shade the warm-up and the spike ladder and mark the start of the full prior."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    warm, full = schedule.warmup, schedule.full_prior_epoch
    if full == 0:
        return  # the full prior from the first epoch: nothing to mark
    end = last_epoch + 0.5  # phase edges lie between epochs
    handles = []
    for ax in axes:
        xlim = ax.get_xlim()
        if warm > 0:
            ax.axvspan(-0.5, min(warm - 0.5, end), color="0.8", alpha=0.5, lw=0, zorder=0)
        if schedule.ramp > 0 and warm - 0.5 < end:
            ax.axvspan(warm - 0.5, min(full - 0.5, end), color="tab:orange", alpha=0.15, lw=0)
        if full - 0.5 < end:
            ax.axvline(full - 0.5, color="0.3", ls="--", lw=0.8)
        ax.set_xlim(xlim)
    if warm > 0:
        handles.append(Patch(color="0.8", alpha=0.5, label=f"warm-up, no mask prior ({warm})"))
    if schedule.ramp > 0:
        handles.append(
            Patch(color="tab:orange", alpha=0.15, label=f"spike-rate ladder ({schedule.ramp})")
        )
    if full - 0.5 < end:
        handles.append(
            Line2D([], [], color="0.3", ls="--", lw=0.8, label=f"full prior from {full}")
        )
    title = "prior schedule, epochs" + (" (default lengths assumed)" if derived else "")
    fig.legend(
        handles=handles,
        loc="upper center",
        ncol=len(handles),
        fontsize=7,
        title=title,
        title_fontsize=7,
        frameon=False,
    )


def training_history(
    model: SparseVAE,
    *,
    keys: Sequence[str] | None = None,
    phases: bool = True,
    ncols: int = 3,
    show: bool | None = None,
    save: bool | str | os.PathLike | None = None,
) -> Figure | None:
    """Training curves of a model: one panel per metric, train and validation together.

    The phases of the mask prior's schedule (warm-up without the prior, spike-rate ladder,
    full prior; see :class:`~sparsevae.train.SparseVAETrainingPlan`) are shaded in every panel.

    Parameters
    ----------
    model
        A trained model with a ``history`` dict of DataFrames (scvi-tools' ``model.history``,
        keys like ``"elbo_train"``, ``"reconstruction_loss_train"``, ``"kl_local_train"``).
    keys
        Metrics to plot (e.g. ``["elbo", "kl_local"]``, without the ``_train`` /
        ``_validation`` suffix); default all recorded whose curve is not constant (such as
        ``kl_weight`` without a KL warm-up).
    phases
        Mark the prior schedule's phases. They come from the last training run; for a loaded
        model, the default lengths for the epochs recorded are assumed (said in the legend).
    ncols
        Panels per row.
    show
        Show the figure and return ``None``; default ``scanpy.settings.autoshow``. Pass
        ``False`` to get the Figure back.
    save
        As in scanpy: ``True`` writes ``sc.settings.figdir / "training_history.<ext>"``, a
        string suffix such as ``"_run1.pdf"`` writes ``figdir / "training_history_run1.pdf"``;
        a path (``pathlib.Path``, or a string with a ``/``) is written as given.

    Returns
    -------
    The matplotlib Figure (one Axes per metric in ``fig.axes``), or ``None`` when shown; when
    nothing was recorded (e.g. training with ``logger=False``) it holds a note saying so.

    Examples
    --------
    >>> sparsevae.pl.training_history(model, keys=["elbo", "kl_local"], show=False)
    """
    ncols = check_positive_int("ncols", ncols)
    history = model.history or {}
    groups = _history_groups(dict(history))
    if keys is not None:
        unknown = [k for k in keys if k not in groups]
        if unknown:
            raise KeyError(f"No history for {unknown}; recorded metrics: {sorted(groups)}.")
        groups = {k: groups[k] for k in keys}
    else:  # leave out constant curves, unless every curve is
        groups = {k: v for k, v in groups.items() if not _is_constant(v)} or groups
    if not groups:
        fig = _note_figure(
            "No training history recorded\n(not trained yet, or trained with logger=False)"
        )
        return finish(fig, fig, name="training_history", show=show, save=save)
    fig, axes = _grid(len(groups), ncols, (3.6, 2.6))
    last = -np.inf
    for ax, (metric, splits) in zip(axes, groups.items(), strict=True):
        for split, series in splits.items():
            index = np.asarray(series.index, dtype=float)
            last = max(last, index.max())
            ax.plot(index, series.to_numpy(), marker="." if len(series) < 30 else None, label=split)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(splits) > 1 or "" not in splits:
            ax.legend(fontsize=7, frameon=False)
    schedule, derived = _prior_phases(model, int(last) + 1) if phases else (None, False)
    top = 1.0
    if schedule is not None and schedule.full_prior_epoch > 0:
        _draw_phases(fig, axes, schedule, derived, last)
        top = 1.0 - 0.45 / fig.get_figheight()
    fig.tight_layout(rect=(0, 0, 1, top))
    return finish(fig, fig, name="training_history", show=show, save=save)
