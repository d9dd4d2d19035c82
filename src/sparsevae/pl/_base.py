"""What every plot shares: saving and showing a figure, argument checks."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..tl import Results

logger = logging.getLogger(__name__)

ANCHOR_COLOR = "tab:red"
SELECTED_COLOR = "tab:blue"
OTHER_COLOR = "lightgray"

#: The ``save`` argument of every plot: see :func:`finish`.
Save = bool | str | os.PathLike | None

T = TypeVar("T")

# Extensions scanpy recognises at the end of a ``save`` suffix (``savefig_or_show``).
_SUFFIX_EXTENSIONS = (".svg", ".pdf", ".png")


def save_path(name: str, save: Save) -> Path | None:
    """Where a plot named ``name`` is written, following scanpy's ``save`` convention.

    ``True`` writes ``figdir / f"{name}{plot_suffix}.{file_format_figs}"`` (scanpy's settings);
    a string is a suffix appended to ``name``, whose extension (``.png``, ``.pdf``, ``.svg``)
    sets the format; a path (``os.PathLike``, or a string with a directory separator) is
    written as given; ``None`` follows ``scanpy.settings.autosave``; ``False`` saves nothing.
    """
    import scanpy as sc

    if save is None:
        save = bool(sc.settings.autosave)
    if save is False:
        return None
    if isinstance(save, os.PathLike):
        return Path(save)
    if isinstance(save, str) and any(s and s in save for s in ("/", os.sep, os.altsep)):
        return Path(save)
    if save is True:
        suffix, ext = "", None
    elif isinstance(save, str):
        suffix, ext = save, None
        for try_ext in _SUFFIX_EXTENSIONS:
            if suffix.endswith(try_ext):
                suffix, ext = suffix.removesuffix(try_ext), try_ext[1:]
                break
    else:
        raise TypeError(
            f"save must be True, a file-name suffix or a path, got {type(save).__name__}."
        )
    ext = ext or sc.settings.file_format_figs
    figdir = Path(sc.settings.figdir)
    figdir.mkdir(parents=True, exist_ok=True)
    return figdir / f"{name}{suffix}{sc.settings.plot_suffix}.{ext}"


def finish(fig: Figure, result: T, *, name: str, show: bool | None, save: Save) -> T | None:
    """Save and/or show a figure as scanpy does; return ``result`` unless it was shown.

    Parameters
    ----------
    fig
        The figure to save.
    result
        What the plot returns when not shown (its Axes, or the Figure for multi-panel plots).
    name
        The plot's name, the start of the file name with ``save=True`` or a suffix.
    show
        Show the figure (``plt.show()``); ``None``: ``scanpy.settings.autoshow``.
    save
        See :func:`save_path`.

    Returns
    -------
    ``None`` when the figure was shown, else ``result``.
    """
    import matplotlib.pyplot as plt
    import scanpy as sc
    from matplotlib import rcParams

    path = save_path(name, save)
    if path is not None:
        dpi = rcParams["savefig.dpi"]
        dpi = dpi if not isinstance(dpi, str) and dpi >= 150 else 150
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
        logger.info("saved figure to %s", path)
    show = bool(sc.settings.autoshow) if show is None else bool(show)
    if not show:
        return result
    plt.show()
    if path is not None:
        plt.close(fig)  # as scanpy: a saved and shown figure is done with
    return None


def switched_off(res: Results, kind: str | None, min_pstar: float) -> set[str]:
    """Names of the factors of mask ``kind`` that are switched off (the rule of ``tl``).

    Empty without a mask prior, or for results that lack the prior's thresholds.
    """
    if not res.has_prior or res.w_off is None or res.eta_off is None:
        return set()
    status = res.factor_status(kind, min_pstar)
    return set(status.loc[status["switched_off"], "factor"].astype(str))


def check_positive_int(name: str, value: Any) -> int:
    """``value`` as an int, or a clear error if it is not a positive integer."""
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)
