"""Factor -> gene networks of a trained SparseVAE (decoupler-style long tables)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

from ._anchors import FitData
from ._results import DEFAULT_KEY, check_min_pstar, read_results

__all__ = ["to_network"]


def to_network(
    data: FitData,
    min_pstar: float = 0.5,
    weight: Literal["W", "effect"] = "W",
    effects: pd.DataFrame | None = None,
    kind: str | None = None,
    *,
    key: str = DEFAULT_KEY,
) -> pd.DataFrame:
    """The mask as a network from factors to the genes they select.

    Parameters
    ----------
    data
        An AnnData with results (``model.write_results(adata)``) or a trained
        :class:`~sparsevae.SparseVAE`; with a mask prior (``mask="ssl"``).
    min_pstar
        An edge ``factor -> gene`` is kept when the inclusion probability ``p* >= min_pstar``.
    weight
        Edge weight: ``"W"``, the signed mask entry ``w_jk`` (its sign is not interpretable on
        its own: the decoder is nonlinear), or ``"effect"``, the signed average effect of the
        factor on the gene's expected expression (``model.get_gene_effects()``).
    effects
        Precomputed genes x factors effects for ``weight="effect"``; default the stored ones
        (AnnData) or computed (model).
    kind
        Multi-study models: which mask, ``None``/``"shared"`` (default) or a study name, see
        :meth:`~sparsevae.SparseVAE.get_mask`.
    key
        The ``key_added`` the results were written with (AnnData only).

    Returns
    -------
    DataFrame with the columns ``source`` (factor), ``target`` (gene) and ``weight``, sorted by
    source then decreasing ``|weight|``: the format of decoupler's network arguments
    (``net=...``), e.g. to score the factors' programs in other data.

    Examples
    --------
    >>> net = sparsevae.tl.to_network(model, weight="effect")
    >>> import decoupler as dc
    >>> dc.mt.ulm(adata, net)  # doctest: +SKIP
    """
    res = read_results(data, key)
    res.require_prior("to_network")
    min_pstar = check_min_pstar(min_pstar)
    if weight not in ("W", "effect"):
        raise ValueError(f"weight must be 'W' or 'effect', got {weight!r}.")
    pstar = res.mask(kind).pstar
    if weight == "W":
        values = res.mask(kind).W
    else:
        if effects is None:
            effects = res.effects(kind)
        if not isinstance(effects, pd.DataFrame):
            raise TypeError("effects must be a genes x factors DataFrame.")
        values = effects.reindex(index=pstar.index, columns=pstar.columns)
        if values.isna().any().any():
            raise ValueError("effects must hold every gene and factor of the model.")
    selected = res.selected(kind, min_pstar).to_numpy()
    genes_idx, factor_idx = np.nonzero(selected)
    genes = np.asarray(pstar.index).astype(str)
    factors = np.asarray(pstar.columns).astype(str)
    net = pd.DataFrame(
        {
            "source": factors[factor_idx],
            "target": genes[genes_idx],
            "weight": values.to_numpy(dtype=float)[genes_idx, factor_idx],
        }
    )
    order = {f: i for i, f in enumerate(factors)}
    net = net.assign(_o=net["source"].map(order), _w=-net["weight"].abs())
    net = net.sort_values(["_o", "_w"], kind="stable").drop(columns=["_o", "_w"])
    return net.reset_index(drop=True)
