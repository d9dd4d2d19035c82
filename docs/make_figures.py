"""Draw the figures of the documentation into ``docs/_static`` (deterministic, a few seconds).

Run ``python docs/make_figures.py`` after changing it and commit the PNG files: the docs build
does not run it.

- ``sparsevae_overview.png`` (home page): left, the masked decoder (one shared network, each gene
  sees only the factors its mask row lets through); right, a sparse mask with anchor genes, the
  planted mask of :func:`sparsevae.datasets.simulate_programs` drawn by
  :func:`sparsevae.pl.mask_heatmap`.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

import sparsevae

STATIC = Path(__file__).resolve().parent / "_static"
FACTOR_COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52"]


def _arrow(ax, start, end, color="0.35", lw=1.0, style="-|>", alpha=1.0):
    ax.add_patch(
        FancyArrowPatch(
            start, end, arrowstyle=style, mutation_scale=9, color=color, lw=lw, alpha=alpha
        )
    )


def _box(ax, xy, w, h, text, fc, ec="0.3", fontsize=9, color="black"):
    ax.add_patch(
        FancyBboxPatch(xy, w, h, boxstyle="round,pad=0.02,rounding_size=0.08", fc=fc, ec=ec, lw=1)
    )
    ax.text(
        xy[0] + w / 2, xy[1] + h / 2, text, ha="center", va="center", fontsize=fontsize, color=color
    )


def draw_schematic(ax) -> None:
    """The masked decoder for two genes: an anchor of factor 1 and a gene of factors 2 and 4."""
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 7)
    ax.set_axis_off()
    ax.set_title("masked decoder: gene j sees only the factors in its mask row $w_j$", fontsize=10)

    # Factors z_i.
    ys = [5.6, 4.4, 3.2, 2.0]
    for k, (y, c) in enumerate(zip(ys, FACTOR_COLORS, strict=True)):
        ax.add_patch(plt.Circle((0.9, y), 0.36, fc=c, ec="white", lw=1.5))
        ax.text(0.9, y, f"$z_{k + 1}$", ha="center", va="center", color="white", fontsize=10)
    ax.text(0.9, 6.45, "factors\nof cell i", ha="center", va="center", fontsize=8)

    # Two genes with their mask rows.
    genes = [
        ("gene j: an anchor of $z_1$", "j", [0.9, 0, 0, 0], 5.0, 0.62),
        ("gene j': loads on $z_2$ and $z_4$", "j'", [0, 0.7, 0, 0.5], 2.4, -0.62),
    ]
    for label, j, row, yc, label_dy in genes:
        # Mask row: four cells, coloured where the factor passes.
        for k, w in enumerate(row):
            x = 2.6 + 0.42 * k
            fc = FACTOR_COLORS[k] if w > 0 else "0.92"
            ax.add_patch(
                plt.Rectangle(
                    (x, yc - 0.21),
                    0.38,
                    0.42,
                    fc=fc,
                    ec="white",
                    alpha=0.35 + 0.65 * w if w > 0 else 1.0,
                )
            )
            if w > 0:
                _arrow(ax, (1.28, ys[k]), (x + 0.19, yc + 0.24), color=FACTOR_COLORS[k], lw=1.2)
            else:
                _arrow(
                    ax,
                    (1.28, ys[k]),
                    (x + 0.19, yc + 0.24),
                    color="0.85",
                    lw=0.5,
                    style="-",
                    alpha=0.5,
                )
        ax.text(3.43, yc - 0.55, rf"$w_{{{j}}} \odot z_i$", ha="center", va="center", fontsize=8)
        _arrow(ax, (4.35, yc), (5.05, 3.8 if yc > 3.5 else 3.2))
        # Output head.
        _box(ax, (7.55, yc - 0.32), 0.95, 0.64, f"head$_{{{j}}}$", fc="#F2F2F2", fontsize=8)
        _arrow(ax, (6.95, 3.8 if yc > 3.5 else 3.2), (7.55, yc))
        _arrow(ax, (8.5, yc), (9.0, yc))
        ax.text(9.05, yc, rf"$x_{{i{j}}}$", ha="left", va="center", fontsize=11)
        ax.text(8.4, yc + label_dy, label, ha="center", va="center", fontsize=8)

    # One shared network.
    _box(
        ax,
        (5.05, 2.6),
        1.9,
        1.8,
        "$f_\\theta$\none network\nshared by\nall genes",
        fc="#E8EEF7",
        fontsize=8.5,
    )
    ax.text(
        5,
        0.75,
        "Spike-and-Slab Lasso prior on W: most entries are pushed to zero;\n"
        "a gene that loads on a single factor is an anchor of that factor.",
        ha="center",
        va="center",
        fontsize=8,
        color="0.25",
    )


def planted_mask() -> pd.DataFrame:
    """The planted mask of a small ``simulate_programs`` design, with smooth magnitudes."""
    adata = sparsevae.datasets.simulate_programs(
        n_cells=50, n_genes=48, n_factors=4, genes_per_program=10, n_shared_genes=2, seed=0
    )
    mask = np.asarray(adata.varm["true_mask"], dtype=float)
    rng = np.random.default_rng(0)
    weights = mask * rng.uniform(0.6, 1.0, size=mask.shape)
    return pd.DataFrame(
        weights,
        index=adata.var_names,
        columns=[f"factor_{k + 1}" for k in range(mask.shape[1])],
    )


def main() -> None:
    """Write the figures."""
    STATIC.mkdir(exist_ok=True)
    plt.rcParams.update({"font.family": "DejaVu Sans", "svg.hashsalt": "sparsevae"})
    fig = plt.figure(figsize=(11, 4.6))
    gs = fig.add_gridspec(1, 2, width_ratios=[1.75, 1.0], wspace=0.25)
    draw_schematic(fig.add_subplot(gs[0]))
    ax = fig.add_subplot(gs[1])
    sparsevae.pl.mask_heatmap(planted_mask(), n_top=10, ax=ax, show=False)
    ax.set_title(
        "a sparse mask W (genes x factors):\nshared genes load on two factors", fontsize=10
    )
    ax.set_ylabel("genes")
    ax.figure.axes[-1].set_ylabel("$|w_{jk}|$")
    ax.tick_params(axis="y", labelsize=5)
    out = STATIC / "sparsevae_overview.png"
    fig.savefig(out, dpi=130, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
