"""Does a mask describe its decoder? The share of each factor's gene effects on selected genes."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..priors import MIN_EFFECT_SHARE, MIN_RELATIVE_EFFECT, effect_share
from ._anchors import FitData
from ._results import DEFAULT_KEY, check_min_pstar, read_results

__all__ = ["mask_fidelity"]


def mask_fidelity(
    data: FitData,
    kind: str | None = None,
    min_pstar: float = 0.5,
    min_share: float = MIN_EFFECT_SHARE,
    min_relative_effect: float = MIN_RELATIVE_EFFECT,
    *,
    key: str = DEFAULT_KEY,
) -> pd.DataFrame:
    """How much of each factor's effect on the genes goes through the genes its mask selects.

    A mask is read as "factor ``k`` reaches gene ``j`` when ``p*_jk >= min_pstar``". That
    reading holds only if the decoder does not reach the other genes: without spike gates an
    entry in the spike (small ``|w_jk|``) still passes signal, which the gene's own output layer
    can scale up. This function measures it with the decoder's gene effects
    (:meth:`~sparsevae.SparseVAE.get_gene_effects`): per factor, the share of ``sum_j |effect_jk|``
    on its selected genes. A factor whose effect is large but mostly outside its selected genes
    (``faithful`` is ``False``) is not described by its mask: its selected genes, anchors and
    enrichment say little about what it does. Refit with ``spike_gate=True`` (user guide, "Why
    the defaults are what they are"), which makes every unselected entry exactly zero for the
    decoder.

    Parameters
    ----------
    data
        An AnnData with results written with effects (``model.write_results(adata)``) or a
        trained :class:`~sparsevae.SparseVAE` (effects computed on its training data).
    kind
        Which mask: ``None``/``"shared"`` or a study name (multi-study).
    min_pstar
        Selection threshold on ``p*``, in ``(0, 1]``.
    min_share
        A factor is faithful when at least this share of its effect is on its selected genes.
    min_relative_effect
        Factors whose total effect is below this fraction of the largest factor's are too weak
        to judge (switched off, or nearly): they count as faithful.
    key
        The ``key_added`` the results were written with (AnnData only).

    Returns
    -------
    DataFrame with one row per factor: ``factor``, ``n_selected``, ``effect`` (``sum_j
    |effect_jk|``), ``relative_effect`` (over the largest factor's), ``share_selected`` (share of
    ``effect`` on the selected genes; ``NaN`` for a factor without effect) and ``faithful``.

    Examples
    --------
    >>> fid = sparsevae.tl.mask_fidelity(model)
    >>> fid.query("not faithful")  # factors whose mask does not say what they do
    """
    res = read_results(data, key)
    res.require_prior("mask_fidelity")
    min_pstar = check_min_pstar(min_pstar)
    for name, value in (("min_share", min_share), ("min_relative_effect", min_relative_effect)):
        if isinstance(value, bool) or not np.isfinite(value) or not 0 <= value <= 1:
            raise ValueError(f"{name} must be a number between 0 and 1, got {value!r}.")
    names = res.mask(kind).factors
    selected = res.selected(kind, min_pstar)[names].to_numpy(dtype=bool)
    effects = np.abs(res.effects(kind)[names].to_numpy(dtype=float))
    share, relative, faithful = effect_share(effects, selected, min_share, min_relative_effect)
    return pd.DataFrame(
        {
            "factor": names,
            "n_selected": selected.sum(axis=0).astype(int),
            "effect": effects.sum(axis=0),
            "relative_effect": relative,
            "share_selected": share,
            "faithful": faithful,
        }
    )
