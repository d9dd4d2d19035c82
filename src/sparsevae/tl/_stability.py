"""Reproducibility of factors across fits of the same data (random starts, subsamples)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from ._anchors import FitData
from ._results import DEFAULT_KEY, Results, check_min_pstar, read_results

__all__ = ["FactorStability", "factor_stability"]


@dataclass(repr=False)
class FactorStability:
    """Result of :func:`factor_stability`.

    Attributes
    ----------
    factors
        One row per factor of the reference fit: ``factor``, ``active`` (not switched off in the
        reference), ``median_abs_r`` and ``min_abs_r`` (absolute correlation with the matched factor
        of the other fits), ``median_jaccard_selected`` and ``median_jaccard_anchors`` (of the
        selected genes and of the anchors, with the matched factor), and ``reproducible``
        (``median_abs_r >= min_abs_r`` and, where the fits have masks, ``median_jaccard_anchors
        >= min_jaccard``).
    matches
        One row per (other fit, reference factor): ``fit``, ``factor`` (the reference's),
        ``matched`` (the other fit's factor), ``abs_r``, ``jaccard_selected``,
        ``jaccard_anchors``.
    consensus
        Genes x reference factors: the share of fits in which the (matched) factor selects the
        gene; ``NaN`` for fits without a mask prior.
    anchor_consensus
        Genes x reference factors: the share of fits in which the gene is an anchor of the
        (matched) factor; ``NaN`` for fits without a mask prior.
    min_abs_r, min_jaccard, min_pstar
        Thresholds used.
    """

    factors: pd.DataFrame
    matches: pd.DataFrame
    consensus: pd.DataFrame
    anchor_consensus: pd.DataFrame
    min_abs_r: float = 0.9
    min_jaccard: float = 0.5
    min_pstar: float = 0.5

    @property
    def median_abs_r(self) -> float:
        """Median over the active reference factors of their median matched absolute correlation."""
        active = self.factors[self.factors["active"]]
        return float(active["median_abs_r"].median()) if len(active) else float("nan")

    @property
    def median_jaccard_anchors(self) -> float:
        """Median over the active reference factors of their median anchor-set Jaccard index."""
        active = self.factors[self.factors["active"]]
        return float(active["median_jaccard_anchors"].median()) if len(active) else float("nan")

    def consensus_genes(self, min_share: float = 0.5) -> dict[str, list[str]]:
        """Genes that at least ``min_share`` of the fits select, per reference factor.

        Parameters
        ----------
        min_share
            Share of fits, in ``(0, 1]``.

        Returns
        -------
        ``{factor: [genes]}``, genes in decreasing share.
        """
        return _above(self.consensus, min_share)

    def consensus_anchors(self, min_share: float = 0.5) -> dict[str, list[str]]:
        """Genes that are anchors of the factor in at least ``min_share`` of the fits.

        A single fit's anchor set moves between random starts (genes at the edge of another
        factor's mask come and go); the anchors that most fits agree on are the ones to read.

        Parameters
        ----------
        min_share
            Share of fits, in ``(0, 1]``.

        Returns
        -------
        ``{factor: [genes]}``, genes in decreasing share.
        """
        return _above(self.anchor_consensus, min_share)

    def summary(self) -> str:
        """Readable summary.

        Returns
        -------
        The summary text.
        """
        f = self.factors
        n_fits = int(self.matches["fit"].nunique()) + 1 if len(self.matches) else 1
        active = f[f["active"]]
        lines = [
            f"Factor stability over {n_fits} fits (reference: fit 0; reproducible: median "
            f"|r| >= {self.min_abs_r:g} and anchor Jaccard >= {self.min_jaccard:g})",
            f"  {int(active['reproducible'].sum())} of {len(active)} active factors "
            f"reproducible; median |r| {self.median_abs_r:.3f}, median anchor Jaccard "
            f"{self.median_jaccard_anchors:.3f}",
        ]
        lines.extend("  " + line for line in f.round(3).to_string(index=False).splitlines())
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.summary())


def _above(share: pd.DataFrame, min_share: float) -> dict[str, list[str]]:
    """Per column, the genes with ``share >= min_share``, in decreasing share."""
    if not 0.0 < min_share <= 1.0:
        raise ValueError(f"min_share must be in (0, 1], got {min_share}.")
    out = {}
    for factor in share.columns:
        col = share[factor].dropna()
        col = col[col >= min_share].sort_values(ascending=False, kind="stable")
        out[str(factor)] = [str(g) for g in col.index]
    return out


def _jaccard(a: np.ndarray | None, b: np.ndarray | None) -> float:
    if a is None or b is None:
        return float("nan")
    union = int((a | b).sum())
    return float((a & b).sum() / union) if union else float("nan")


def _abs_corr(za: np.ndarray, zb: np.ndarray) -> np.ndarray:
    """|Pearson correlation| of every column of ``za`` with every column of ``zb``."""
    a = (za - za.mean(0)) / np.where(za.std(0) > 0, za.std(0), np.inf)
    b = (zb - zb.mean(0)) / np.where(zb.std(0) > 0, zb.std(0), np.inf)
    return np.abs(a.T @ b / len(za))


def _match(corr: np.ndarray, active_ref: np.ndarray, active: np.ndarray) -> dict[int, int]:
    """One-to-one matches of reference factors (rows) to another fit's (columns) by ``|r|``.

    Factors in use are matched among themselves first; the reference's switched-off factors then
    take what is left. A reference factor in use left without a partner in use is unmatched.
    """
    match: dict[int, int] = {}
    rows, cols = np.flatnonzero(active_ref), np.flatnonzero(active)
    r_idx, c_idx = linear_sum_assignment(-corr[np.ix_(rows, cols)])
    match.update(zip(rows[r_idx].tolist(), cols[c_idx].tolist(), strict=True))
    rest_rows = np.flatnonzero(~active_ref)
    rest_cols = np.setdiff1d(np.arange(corr.shape[1]), list(match.values()))
    r_idx, c_idx = linear_sum_assignment(-corr[np.ix_(rest_rows, rest_cols)])
    match.update(zip(rest_rows[r_idx].tolist(), rest_cols[c_idx].tolist(), strict=True))
    return match


def factor_stability(
    fits: Sequence[FitData],
    *,
    kind: str | None = None,
    min_pstar: float = 0.5,
    min_abs_r: float = 0.9,
    min_jaccard: float = 0.5,
    key: str = DEFAULT_KEY,
) -> FactorStability:
    """How reproducible each factor is across fits of the same cells.

    The factors of every fit are matched one to one to those of the first fit (the reference)
    by the Hungarian algorithm on the absolute correlation of their values over the cells, the
    factors in use with the factors in use: a switched-off factor (no effect on the decoder)
    can still vary a little over the cells and correlate with a real one, and is no counterpart
    of it. A reference factor in use that finds no factor in use in another fit is unmatched
    there (``abs_r`` and Jaccard indices 0). For each reference factor it reports the matched
    absolute correlation and the Jaccard indices of the selected genes and of the anchor genes,
    and a consensus: the share of fits selecting each gene and the share of fits in which it is
    an anchor. An identifiable model gives the same factors from every start; a plain VAE's
    factors are identified only up to rotation, so their matches are weak.

    Parameters
    ----------
    fits
        Two or more fits of the same cells, in the same order: AnnData with results, trained
        models, or both (e.g. one model per ``scvi.settings.seed``).
    kind
        Multi-study fits: which mask's factors, ``None``/``"shared"`` or a study name.
    min_pstar
        Selection threshold on ``p*``, in ``(0, 1]``.
    min_abs_r
        Median matched absolute correlation for a factor to count as reproducible.
    min_jaccard
        Median anchor-set Jaccard index for a factor to count as reproducible (fits with masks).
    key
        The ``key_added`` the results were written with (AnnData only).

    Returns
    -------
    A :class:`FactorStability` with the per-factor table ``.factors``, the matches ``.matches``,
    the consensus ``.consensus`` and ``.anchor_consensus`` (read with ``consensus_genes()`` and
    ``consensus_anchors()``) and a ``summary()``.

    Examples
    --------
    >>> models = []
    >>> for seed in range(5):
    ...     scvi.settings.seed = seed
    ...     m = sparsevae.SparseVAE(adata); m.train(); models.append(m)
    >>> stab = sparsevae.tl.factor_stability(models)
    >>> print(stab.summary())
    >>> stab.consensus_anchors(0.8)  # anchors in at least 80% of the fits, per factor
    """
    if len(fits) < 2:
        raise ValueError(f"factor_stability needs at least two fits, got {len(fits)}.")
    min_pstar = check_min_pstar(min_pstar)
    results: list[Results] = [read_results(f, key) for f in fits]
    ref = results[0]
    genes = ref.genes
    for i, res in enumerate(results[1:], start=1):
        if not res.genes.equals(genes):
            raise ValueError(f"Fit {i} has other genes than fit 0; compare fits of the same data.")

    def columns(res: Results) -> tuple[np.ndarray, list[str], Any, Any, np.ndarray]:
        names = res.mask(kind).factors
        z = res.latent[:, [res.factor_names.index(f) for f in names]]
        if not res.has_prior:
            return z, names, None, None, np.ones(len(names), dtype=bool)
        return (
            z,
            names,
            res.selected(kind, min_pstar).to_numpy(),
            res.anchors(kind, min_pstar).to_numpy(),
            ~res.factor_status(kind, min_pstar)["switched_off"].to_numpy(),
        )

    z0, names0, sel0, anc0, active0 = columns(ref)
    rows = []
    selected_count = np.zeros((len(genes), len(names0)))
    anchor_count = np.zeros((len(genes), len(names0)))
    n_with_masks = 0
    if sel0 is not None:
        selected_count += sel0
        anchor_count += anc0
        n_with_masks += 1
    for i, res in enumerate(results[1:], start=1):
        z, names, sel, anc, active = columns(res)
        if z.shape[0] != z0.shape[0]:
            raise ValueError(
                f"Fit {i} has {z.shape[0]} cells and fit 0 has {z0.shape[0]}: compare fits of "
                "the same cells."
            )
        corr = _abs_corr(z0, z)
        match = _match(corr, active0, active)
        if sel is not None:
            n_with_masks += 1
        for k, factor in enumerate(names0):
            m = match.get(k)
            if m is None:
                rows.append({"fit": i, "factor": factor, "matched": None, "abs_r": 0.0,
                             "jaccard_selected": 0.0, "jaccard_anchors": 0.0})  # fmt: skip
                continue
            if sel is not None:
                selected_count[:, k] += sel[:, m]
                anchor_count[:, k] += anc[:, m]
            rows.append(
                {
                    "fit": i,
                    "factor": factor,
                    "matched": names[m],
                    "abs_r": float(corr[k, m]),
                    "jaccard_selected": _jaccard(
                        None if sel0 is None else sel0[:, k], None if sel is None else sel[:, m]
                    ),
                    "jaccard_anchors": _jaccard(
                        None if anc0 is None else anc0[:, k], None if anc is None else anc[:, m]
                    ),
                }
            )
    matches = pd.DataFrame(
        rows, columns=["fit", "factor", "matched", "abs_r", "jaccard_selected", "jaccard_anchors"]
    )
    grouped = matches.groupby("factor", sort=False)
    factors = pd.DataFrame({"factor": names0, "active": active0})
    for col, agg, name in [
        ("abs_r", "median", "median_abs_r"),
        ("abs_r", "min", "min_abs_r"),
        ("jaccard_selected", "median", "median_jaccard_selected"),
        ("jaccard_anchors", "median", "median_jaccard_anchors"),
    ]:
        factors[name] = grouped[col].agg(agg).reindex(names0).to_numpy(dtype=float)
    anchors_ok = factors["median_jaccard_anchors"].fillna(np.inf) >= min_jaccard
    if not ref.has_prior:
        anchors_ok[:] = True
    factors["reproducible"] = (factors["median_abs_r"] >= min_abs_r) & anchors_ok
    consensus, anchor_consensus = (
        pd.DataFrame(count / n_with_masks if n_with_masks else np.nan, index=genes, columns=names0)
        for count in (selected_count, anchor_count)
    )
    return FactorStability(
        factors=factors,
        matches=matches,
        consensus=consensus,
        anchor_consensus=anchor_consensus,
        min_abs_r=float(min_abs_r),
        min_jaccard=float(min_jaccard),
        min_pstar=min_pstar,
    )
