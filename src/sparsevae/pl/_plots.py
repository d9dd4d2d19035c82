"""Plots of trained SparseVAE models."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from ..tl import FitData, read_results
from ._base import finish

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["mask_heatmap"]


def _mask_tables(
    data: FitData | pd.DataFrame,
    values: Literal["W", "pstar"],
    threshold: float | None,
    kind: str | None,
    key: str,
) -> tuple[pd.DataFrame, pd.DataFrame, str, str]:
    """Values to plot, boolean selection, the colorbar label and the selection rule in words."""
    threshold = 0.5 if threshold is None else threshold
    if isinstance(data, pd.DataFrame):
        shown = data.astype(float).abs()
        return shown, shown > threshold, "value", f"|value| > {threshold:g}"
    if values not in ("W", "pstar"):
        raise ValueError(f"values must be 'W' or 'pstar', got {values!r}.")
    res = read_results(data, key)
    mask = res.mask(kind)
    if not res.has_prior:
        if values == "pstar":
            raise ValueError("This fit has no mask prior (mask=None), so it has no p*.")
        W = mask.W.abs()
        return W, W > threshold, "|W|", f"|W| > {threshold:g}"
    selected = res.selected(kind, threshold)
    rule = f"p* \u2265 {threshold:g}"
    if values == "pstar":
        return mask.pstar, selected, "inclusion probability p*", rule
    return mask.W.abs(), selected, "|W|", rule


def mask_heatmap(
    data: FitData | pd.DataFrame,
    *,
    n_top: int = 10,
    values: Literal["W", "pstar"] = "W",
    threshold: float | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | os.PathLike | None = None,
    kind: str | None = None,
    key: str = "sparsevae",
) -> Axes | None:
    """Heatmap of the decoder mask for the genes it selects, ordered by their main factor.

    A gene is selected by a factor when its inclusion probability ``p*`` exceeds ``threshold``
    (for a DataFrame, or a model without a mask prior: when ``|value|`` does). Each selected gene
    is assigned to the factor where its value is largest; genes are grouped by that factor and
    sorted within each group, keeping the ``n_top`` strongest per factor. A white dot marks each
    selected entry (gene, factor), whatever its colour; the title says so. When no gene passes the
    threshold, the ``n_top`` strongest genes of each factor are shown instead, without dots
    (noted in the title).

    Parameters
    ----------
    data
        An AnnData with results (``model.write_results(adata)``, or the output of ``sparsevae
        fit``), a trained :class:`~sparsevae.SparseVAE`, or a genes x factors DataFrame of
        values (e.g. ``model.get_mask()``).
    n_top
        Maximum number of genes shown per factor.
    values
        For a model: plot ``|W|`` (``"W"``, mask magnitudes) or ``p*`` (``"pstar"``).
    threshold
        Selection threshold; default 0.5 (on ``p*`` for a model with a prior, on ``|value|``
        otherwise).
    ax
        Axes to draw in (e.g. one panel of your own grid); default a new figure sized to the
        number of genes.
    show
        Show the figure (``plt.show()``) and return ``None``; default ``scanpy.settings.autoshow``.
        Pass ``False`` to get the Axes back.
    save
        As in scanpy: ``True`` writes ``sc.settings.figdir / "mask_heatmap.<file_format_figs>"``;
        a string suffix such as ``"_run1.pdf"`` writes ``figdir / "mask_heatmap_run1.pdf"`` (no
        extension: ``sc.settings.file_format_figs``). A path (``pathlib.Path``, or a string
        with a ``/``) is written as given.
    kind
        For a multi-study model: which mask, ``None``/``"shared"`` (default) or a study name
        (see :meth:`~sparsevae.SparseVAE.get_mask`); the title names it.
    key
        The ``key_added`` the results were written with (AnnData only).

    Returns
    -------
    The matplotlib Axes with the heatmap, or ``None`` when the figure was shown.

    Examples
    --------
    >>> ax = sparsevae.pl.mask_heatmap(model, n_top=8, show=False)
    >>> sparsevae.pl.mask_heatmap(model, save="_run1.pdf")  # figures/mask_heatmap_run1.pdf
    """
    import matplotlib.pyplot as plt

    if not isinstance(n_top, int | np.integer) or n_top < 1:
        raise ValueError(f"n_top must be a positive integer, got {n_top!r}.")
    shown, selected, label, rule = _mask_tables(data, values, threshold, kind, key)
    note = ""
    marked = selected
    if not selected.to_numpy().any():
        note = " (no gene passes the threshold: top genes by value)"
        selected = pd.DataFrame(True, index=shown.index, columns=shown.columns)

    masked = shown.where(selected, -np.inf)
    main = masked.to_numpy().argmax(axis=1)
    has_any = selected.to_numpy().any(axis=1)
    genes: list[str] = []
    boundaries: list[int] = []
    floor = 0.01 * float(np.nanmax(shown.to_numpy(), initial=0.0))  # invisible entries
    for k, factor in enumerate(shown.columns):
        in_group = has_any & (main == k)
        group = shown.loc[in_group, factor].sort_values(ascending=False).head(n_top)
        group = group[group > floor]
        if len(group):
            genes.extend(group.index.astype(str))
            boundaries.append(len(genes))
    mat = shown.loc[genes].to_numpy(dtype=float)

    if ax is None:
        height = float(np.clip(0.16 * len(genes) + 1.5, 3.0, 40.0))
        width = float(np.clip(0.45 * shown.shape[1] + 2.5, 4.0, 20.0))
        _, ax = plt.subplots(figsize=(width, height))
    fig = ax.figure
    vmax = float(np.nanmax(mat)) if mat.size else 1.0
    im = ax.imshow(
        mat if mat.size else np.zeros((1, shown.shape[1])),
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        vmin=0.0,
        vmax=vmax if vmax > 0 else 1.0,
    )
    ax.grid(False)  # scanpy's figure settings turn grids on; lines across a heat map mislead
    ax.set_xticks(range(shown.shape[1]))
    ax.set_xticklabels([str(c) for c in shown.columns], rotation=90)
    ax.set_yticks(range(len(genes)))
    ax.set_yticklabels(genes, fontsize=6 if len(genes) > 40 else 8)
    for b in boundaries[:-1]:
        ax.axhline(b - 0.5, color="white", linewidth=0.5)
    ax.set_xlabel("factor")
    ax.set_ylabel(f"genes ({len(genes)})")
    which = "" if kind is None else f" ({kind})"
    title = f"SparseVAE mask{which}{note}"
    fig.colorbar(im, ax=ax, label=label, shrink=0.6)
    if not note:
        _mark_selected(ax, marked.loc[genes].to_numpy(dtype=bool))
        title += f"\nwhite dots: selected entries ({rule})"
    ax.set_title(title, fontsize=9)
    return finish(fig, ax, name="mask_heatmap", show=show, save=save)


def _mark_selected(ax: Axes, selected: np.ndarray) -> None:
    """A white dot on each selected cell (genes x factors) of a heat map drawn in ``ax``."""
    rows, cols = np.nonzero(selected)
    if not len(rows):
        return
    box = ax.get_window_extent()  # pixels; a dot about a third of a cell wide
    cell = min(box.height / selected.shape[0], box.width / selected.shape[1])
    size = float(np.clip((0.35 * cell * 72.0 / ax.figure.dpi) ** 2, 2.0, 30.0))
    xlim, ylim = ax.get_xlim(), ax.get_ylim()
    ax.scatter(
        cols,
        rows,
        s=size,
        color="white",
        edgecolors="black",
        linewidths=0.3,
        gid="selected",
        zorder=3,
    )
    ax.set_xlim(xlim)
    ax.set_ylim(ylim)
