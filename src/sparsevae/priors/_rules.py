"""How a fitted Spike-and-Slab Lasso mask is read: the rules, written once.

They work on torch tensors, numpy arrays and pandas objects alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_MIN_PSTAR",
    "MIN_EFFECT_SHARE",
    "MIN_RELATIVE_EFFECT",
    "anchors",
    "effect_share",
    "factor_use",
    "is_selected",
    "n_selecting",
]

#: The default selection threshold on ``p*`` (the posterior odds of slab against spike are 1).
DEFAULT_MIN_PSTAR = 0.5


def is_selected(pstar: Any, min_pstar: float = DEFAULT_MIN_PSTAR) -> Any:
    """Factor ``k`` selects gene ``j`` when its inclusion probability ``p*_jk >= min_pstar``.

    Parameters
    ----------
    pstar
        Inclusion probabilities (genes x factors).
    min_pstar
        The threshold.

    Returns
    -------
    Boolean values of the same shape and type.
    """
    return pstar >= min_pstar


def factor_use(
    max_abs_w: Any, n_selected: Any, eta: Any, w_off: float, eta_off: float
) -> tuple[Any, Any]:
    """Which factors are switched off, and which are in use although they select no gene.

    A factor *selects nothing* when ``eta < eta_off`` or it selects no gene. It is *switched
    off* when, in addition, every ``|w| < w_off`` (the decoder does not use it), and *in use
    but unselected* when some ``|w| >= w_off``.

    Parameters
    ----------
    max_abs_w
        Per factor, the largest ``|w_jk|`` of its mask column.
    n_selected
        Per factor, the number of genes it selects.
    eta
        Per factor, its prior inclusion weight.
    w_off
        The spike/slab crossing (:attr:`SpikeSlabLasso.w_off`).
    eta_off
        The ``eta`` of half a selected gene (:attr:`SpikeSlabLasso.eta_off`).

    Returns
    -------
    ``(switched_off, unselected)``, boolean per factor.
    """
    selects_nothing = (eta < eta_off) | (n_selected == 0)
    in_use = max_abs_w >= w_off
    return selects_nothing & ~in_use, selects_nothing & in_use


#: A factor is described by its mask when at least this share of its gene effects is on the genes
#: it selects (:func:`effect_share`).
MIN_EFFECT_SHARE = 0.5
#: Factors whose summed effect is below this fraction of the largest factor's are too weak to
#: judge (:func:`effect_share`).
MIN_RELATIVE_EFFECT = 0.1


def effect_share(
    effects: Any,
    selected: Any,
    min_share: float = MIN_EFFECT_SHARE,
    min_relative_effect: float = MIN_RELATIVE_EFFECT,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per factor, the share of its gene effects on the genes it selects, and whether it suffices.

    Parameters
    ----------
    effects
        Gene effects (genes x factors; their absolute values are used).
    selected
        Boolean selections, genes x factors.
    min_share
        A factor is *faithful* (described by its mask) when at least this share of its summed
        ``|effect|`` is on its selected genes.
    min_relative_effect
        Factors whose summed ``|effect|`` is below this fraction of the largest factor's count as
        faithful: too weak to judge.

    Returns
    -------
    ``(share, relative, faithful)`` per factor; ``share`` is ``NaN`` for a factor without effect.
    """
    e = np.abs(np.asarray(effects, dtype=np.float64))
    sel = np.asarray(selected, dtype=bool)
    total = e.sum(axis=0)
    inside = (e * sel).sum(axis=0)
    largest = float(total.max()) if total.size else 0.0
    relative = total / largest if largest > 0 else np.zeros_like(total)
    share = np.divide(inside, total, out=np.full_like(total, np.nan), where=total > 0)
    faithful = (relative < min_relative_effect) | (np.nan_to_num(share, nan=1.0) >= min_share)
    return share, relative, faithful


def n_selecting(selected: Mapping[str, Any], kind: str = "shared") -> np.ndarray:
    """Per gene, the factors that select it among those it decodes from, seen from mask ``kind``.

    Single-study (``selected`` holds only ``"shared"``): the factors of the mask. Multi-study,
    for a study's mask: its specific factors plus the shared factors (in that study a gene sees
    both); for the shared mask: the shared factors plus the most specific factors selecting the
    gene in any one study (an anchor of a shared factor must be an anchor in every study).

    Parameters
    ----------
    selected
        Boolean selections (genes x factors) of every mask, keyed by ``"shared"`` and, for
        multi-study fits, each study's name.
    kind
        The mask seen from.

    Returns
    -------
    Integer array, one value per gene.
    """
    own = np.asarray(selected[kind]).sum(axis=1)
    studies = [k for k in selected if k != "shared"]
    if not studies:
        return own
    if kind == "shared":
        return own + np.max([np.asarray(selected[s]).sum(axis=1) for s in studies], axis=0)
    return own + np.asarray(selected["shared"]).sum(axis=1)


def anchors(selected: Mapping[str, Any], kind: str = "shared") -> np.ndarray:
    """Anchor genes of mask ``kind``: selected by the factor and by no other factor they see.

    Parameters
    ----------
    selected
        Boolean selections of every mask, as for :func:`n_selecting`.
    kind
        The mask whose anchors are returned.

    Returns
    -------
    Boolean array, genes x factors of mask ``kind``.
    """
    single = n_selecting(selected, kind) == 1
    return np.asarray(selected[kind], dtype=bool) & single[:, None]
