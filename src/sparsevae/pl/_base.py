"""What every plot shares: saving and showing a figure, argument checks."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ANCHOR_COLOR = "tab:red"
SELECTED_COLOR = "tab:blue"
OTHER_COLOR = "lightgray"


def finish(fig: Figure, show: bool | None, save: str | os.PathLike | None) -> None:
    """Save and/or show a figure, following scanpy's ``autoshow`` when ``show`` is None."""
    import matplotlib.pyplot as plt

    if save is not None:
        fig.savefig(os.fspath(save), dpi=150, bbox_inches="tight")
    if show is None:
        import scanpy as sc

        show = bool(sc.settings.autoshow) and save is None
    if show:
        plt.show()


def check_positive_int(name: str, value: Any) -> int:
    """``value`` as an int, or a clear error if it is not a positive integer."""
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)
