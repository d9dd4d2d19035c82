"""Plots of trained SparseVAE models."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["mask_heatmap"]


def _mask_tables(
    model_or_df: Any,
    values: Literal["W", "pstar"],
    threshold: float | None,
    kind: str | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Values to plot, boolean selection and the colorbar label."""
    if isinstance(model_or_df, pd.DataFrame):
        df = model_or_df.astype(float)
        shown = df.abs()
        selected = shown > (0.5 if threshold is None else threshold)
        return shown, selected, "value"
    if not hasattr(model_or_df, "get_mask"):
        raise TypeError(
            "mask_heatmap expects a SparseVAE model or a genes x factors DataFrame, "
            f"got {type(model_or_df).__name__}."
        )
    model = model_or_df
    kind_kwargs = {} if kind is None else {"kind": kind}
    W = model.get_mask(**kind_kwargs).abs()
    has_prior = getattr(model.module, "prior", None) is not None
    if has_prior:
        pstar = model.get_inclusion_probabilities(**kind_kwargs)
        selected = pstar >= (0.5 if threshold is None else threshold)  # as tl.anchor_genes
    else:
        if values == "pstar":
            raise ValueError("This model has no mask prior (mask=None), so it has no p*.")
        selected = W > (0.5 if threshold is None else threshold)
    if values == "pstar":
        return pstar, selected, "inclusion probability p*"
    if values != "W":
        raise ValueError(f"values must be 'W' or 'pstar', got {values!r}.")
    return W, selected, "|W|"


def mask_heatmap(
    model_or_df: Any,
    *,
    n_top: int = 10,
    values: Literal["W", "pstar"] = "W",
    threshold: float | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    kind: str | None = None,
) -> Axes:
    """Heatmap of the decoder mask for the genes it selects, ordered by their main factor.

    A gene is selected by a factor when its inclusion probability ``p*`` exceeds ``threshold``
    (for a DataFrame, or a model without a mask prior: when ``|value|`` does). Each selected gene
    is assigned to the factor where its value is largest; genes are grouped by that factor and
    sorted within each group, keeping the ``n_top`` strongest per factor. When no gene passes the
    threshold, the ``n_top`` strongest genes of each factor are shown instead (noted in the title).

    Parameters
    ----------
    model_or_df
        A trained :class:`~sparsevae.SparseVAE`, or a genes x factors DataFrame of values (e.g.
        ``model.get_mask()``).
    n_top
        Maximum number of genes shown per factor.
    values
        For a model: plot ``|W|`` (``"W"``, mask magnitudes) or ``p*`` (``"pstar"``).
    threshold
        Selection threshold; default 0.5 (on ``p*`` for a model with a prior, on ``|value|``
        otherwise).
    ax
        Axes to draw in; default a new figure sized to the number of genes.
    show
        Show the figure (``plt.show()``); default: show unless ``save`` is given, following
        ``scanpy.settings.autoshow``.
    save
        Path to save the figure to (format from the extension).
    kind
        For a multi-study model: which mask, ``None``/``"shared"`` (default) or a study name
        (see :meth:`~sparsevae.SparseVAE.get_mask`); the title names it.

    Returns
    -------
    The matplotlib Axes with the heatmap.

    Examples
    --------
    >>> sparsevae.pl.mask_heatmap(model, n_top=8, save="mask.png", show=False)
    """
    import matplotlib.pyplot as plt

    if not isinstance(n_top, int | np.integer) or n_top < 1:
        raise ValueError(f"n_top must be a positive integer, got {n_top!r}.")
    shown, selected, label = _mask_tables(model_or_df, values, threshold, kind)
    note = ""
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
    ax.set_title(f"SparseVAE mask{which}{note}", fontsize=9)
    fig.colorbar(im, ax=ax, label=label, shrink=0.6)

    if save is not None:
        fig.savefig(os.fspath(save), dpi=150, bbox_inches="tight")
    if show is None:
        import scanpy as sc

        show = bool(sc.settings.autoshow) and save is None
    if show:
        plt.show()
    return ax
