"""How a fitted Spike-and-Slab Lasso mask is read: the rules, written once.

They work on torch tensors, numpy arrays and pandas objects alike.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DEFAULT_MIN_PSTAR", "factor_use", "is_selected"]

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
