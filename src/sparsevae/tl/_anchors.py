"""Anchor genes, top genes and identifiability checks of a trained SparseVAE."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from ..model import SparseVAE
from ._results import DEFAULT_KEY, Results, check_min_pstar, read_results

__all__ = [
    "IdentifiabilityReport",
    "anchor_genes",
    "covariance_violations",
    "identifiability_report",
    "top_genes",
]

#: What the functions of ``tl`` and ``pl`` accept: an AnnData with results, or a model.
FitData = AnnData | SparseVAE | Results


# ---------------------------------------------------------------------------- anchors
def anchor_genes(
    data: FitData,
    min_pstar: float = 0.5,
    factors: Sequence[str | int] | str | int | None = None,
    anchors_only: bool = False,
    n_top: int | None = None,
    kind: str | None = None,
    *,
    key: str = DEFAULT_KEY,
) -> pd.DataFrame:
    """Genes selected by each factor's mask, ranked, with their anchor status.

    Gene ``j`` is selected by factor ``k`` when its inclusion probability ``p*_jk >= min_pstar``.
    It is an **anchor** of factor ``k`` when it is selected by ``k`` and by no other factor: the
    identifiability theorem of the Sparse VAE asks for at least two anchors per factor.

    Multi-study models: ``kind`` picks the mask. For a study, a gene sees the shared factors and
    that study's specific factors, so a gene of a specific factor is an anchor when no other
    specific factor of the study and no shared factor selects it. For ``"shared"``, an anchor
    must also be selected by no specific factor of any study.

    Parameters
    ----------
    data
        An AnnData with results (``model.write_results(adata)``, or the output of ``sparsevae
        fit``) or a trained :class:`~sparsevae.SparseVAE`; with a mask prior (``mask="ssl"``).
    min_pstar
        Selection threshold on ``p*``, in ``(0, 1]``.
    factors
        Factors to list (names or integer positions); default all.
    anchors_only
        Keep only the anchor genes.
    n_top
        Keep at most this many genes per factor (after ``anchors_only``).
    kind
        Which mask: ``None`` (default) or ``"shared"``: the shared mask (the only one of a
        single-study model); a study name: that study's specific mask.
    key
        The ``key_added`` the results were written with (AnnData only).

    Returns
    -------
    Long DataFrame with one row per selected (factor, gene) pair and the columns ``factor``,
    ``gene``, ``weight`` (the signed mask entry ``w_jk``), ``pstar``, ``is_anchor`` and ``rank``
    (1 = largest ``|weight|`` within the factor, counted before ``anchors_only``), ordered by
    factor then rank.

    Examples
    --------
    >>> anchors = sparsevae.tl.anchor_genes(model)
    >>> anchors[anchors.is_anchor].groupby("factor").head(5)
    """
    res = read_results(data, key)
    res.require_prior("anchor_genes")
    min_pstar = check_min_pstar(min_pstar)
    if n_top is not None and (not isinstance(n_top, int | np.integer) or n_top < 1):
        raise ValueError(f"n_top must be a positive integer or None, got {n_top!r}.")
    mask = res.mask(kind)
    W, pstar, selected = mask.W, mask.pstar, res.selected(kind, min_pstar)
    is_anchor = res.anchors(kind, min_pstar)
    frames = []
    for factor in res.resolve_factors(factors, kind):
        rows = selected[factor].to_numpy()
        df = pd.DataFrame(
            {
                "factor": factor,
                "gene": selected.index[rows].astype(str),
                "weight": W[factor].to_numpy(dtype=float)[rows],
                "pstar": pstar[factor].to_numpy(dtype=float)[rows],
                "is_anchor": is_anchor[factor].to_numpy()[rows],
            }
        )
        order = np.argsort(-np.abs(df["weight"].to_numpy()), kind="stable")
        df = df.iloc[order].reset_index(drop=True)
        df["rank"] = np.arange(1, len(df) + 1)
        if anchors_only:
            df = df[df["is_anchor"]]
        if n_top is not None:
            df = df.head(int(n_top))
        frames.append(df)
    columns = ["factor", "gene", "weight", "pstar", "is_anchor", "rank"]
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    out = out[columns].astype(
        {"factor": str, "gene": str, "weight": float, "pstar": float, "is_anchor": bool}
    )
    out["rank"] = out["rank"].astype(int)
    return out.reset_index(drop=True)


def top_genes(
    data: FitData,
    n: int = 20,
    factors: Sequence[str | int] | str | int | None = None,
    kind: str | None = None,
    *,
    key: str = DEFAULT_KEY,
) -> pd.DataFrame:
    """The ``n`` top genes of each factor, ranked by ``p*`` then by ``|W|``.

    Parameters
    ----------
    data
        An AnnData with results or a trained model, see :func:`anchor_genes`.
    n
        Number of genes per factor (at most the number of genes).
    factors
        Factors to show (names or integer positions); default all.
    kind
        Which mask: ``None``/``"shared"`` or a study name (multi-study), see
        :func:`anchor_genes`.
    key
        The ``key_added`` the results were written with (AnnData only).

    Returns
    -------
    DataFrame with one column per factor and one row per rank (index ``rank``, starting at 1)
    holding gene names. Genes are listed whether or not the mask selects them; use
    :func:`anchor_genes` for the selected genes only.

    Examples
    --------
    >>> sparsevae.tl.top_genes(model, n=10)
    """
    res = read_results(data, key)
    res.require_prior("top_genes")
    if not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}.")
    W, pstar = res.mask(kind).W, res.mask(kind).pstar
    n = min(int(n), W.shape[0])
    genes = np.asarray(W.index).astype(str)
    table = {}
    for factor in res.resolve_factors(factors, kind):
        # lexsort: last key is the primary one.
        order = np.lexsort((-np.abs(W[factor].to_numpy()), -pstar[factor].to_numpy()))
        table[factor] = genes[order[:n]]
    return pd.DataFrame(table, index=pd.RangeIndex(1, n + 1, name="rank"))


# ---------------------------------------------------------------------------- identifiability
def covariance_violations(z: np.ndarray, factor_names: Sequence[str] | None = None) -> pd.DataFrame:
    """Factor pairs that break ``min(Var z_k, Var z_k') > |Cov(z_k, z_k')|``.

    This is the second condition of the Sparse VAE's identifiability theorem (besides two anchor
    genes per factor).

    Parameters
    ----------
    z
        Factors, shape ``(n_cells, n_factors)``, e.g. the posterior means.
    factor_names
        Names of the factors; default ``factor_0``, ``factor_1``, ...

    Returns
    -------
    DataFrame with one row per violating pair ``k < k'`` and the columns ``factor_1``,
    ``factor_2``, ``var_1``, ``var_2``, ``covariance`` and ``correlation``; empty when the
    condition holds.
    """
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"z must be 2-D (cells x factors), got shape {z.shape}.")
    n_cells, n_factors = z.shape
    names = [f"factor_{k}" for k in range(n_factors)] if factor_names is None else factor_names
    names = [str(f) for f in names]
    if len(names) != n_factors:
        raise ValueError(f"Got {len(names)} factor names for {n_factors} factors.")
    if n_cells < 2:
        raise ValueError("At least two cells are needed to estimate covariances.")
    if not np.all(np.isfinite(z)):
        raise ValueError("z contains NaN or infinite values.")
    cov = np.atleast_2d(np.cov(z, rowvar=False))
    var = np.diag(cov)
    rows = []
    for k in range(n_factors):
        for k2 in range(k + 1, n_factors):
            c = cov[k, k2]
            if min(var[k], var[k2]) <= abs(c):
                denom = np.sqrt(var[k] * var[k2])
                rows.append(
                    {
                        "factor_1": names[k],
                        "factor_2": names[k2],
                        "var_1": float(var[k]),
                        "var_2": float(var[k2]),
                        "covariance": float(c),
                        "correlation": float(c / denom) if denom > 0 else float("nan"),
                    }
                )
    columns = ["factor_1", "factor_2", "var_1", "var_2", "covariance", "correlation"]
    return pd.DataFrame(rows, columns=columns)


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """JSON-friendly records (Python scalars, NaN as None)."""
    out = []
    for rec in df.to_dict(orient="records"):
        clean: dict[str, Any] = {}
        for key, value in rec.items():
            if isinstance(value, np.generic):
                value = value.item()
            if isinstance(value, float) and not np.isfinite(value):
                value = None
            clean[str(key)] = value
        out.append(clean)
    return out


@dataclass(repr=False)
class IdentifiabilityReport:
    """Result of :func:`identifiability_report`.

    Attributes
    ----------
    factors
        One row per factor: ``factor``, ``n_selected`` (genes with ``p* >= min_pstar``),
        ``n_anchors`` (selected genes selected by no other factor), ``eta``, ``max_abs_w``
        (the largest ``|w_jk|`` of the factor's mask column), ``switched_off`` (``eta <
        eta_min`` or no selected gene, *and* every ``|w_jk| < w_off``: the decoder does not use
        the factor), ``unselected`` (``eta < eta_min`` or no selected gene, but some ``|w_jk| >=
        w_off``: the decoder still uses the factor, yet the prior selects none of its genes) and
        ``identifiable`` (at least ``min_anchors`` anchors, neither switched off nor
        unselected).
    covariance_violations
        Factor pairs breaking ``min(Var z_k, Var z_k') > |Cov(z_k, z_k')|`` on the posterior
        means (see :func:`covariance_violations`), with a column ``involves_switched_off``.
    covariance
        Covariance matrix of the posterior means (factors x factors).
    min_pstar
        Selection threshold used.
    eta_min
        Threshold below which a factor's ``eta`` counts as switched off.
    min_anchors
        Anchors needed per factor.
    w_off
        Mask entries with ``|w| < w_off`` count as unused: the point where the spike and slab
        densities cross, ``log(lambda0 / lambda1) / (lambda0 - lambda1)``.
    """

    factors: pd.DataFrame
    covariance_violations: pd.DataFrame
    covariance: pd.DataFrame = field(default_factory=pd.DataFrame)
    min_pstar: float = 0.5
    eta_min: float = 0.0
    min_anchors: int = 2
    w_off: float = 0.0

    @property
    def active_factors(self) -> list[str]:
        """Factors that are not switched off."""
        return self.factors.loc[~self.factors["switched_off"], "factor"].tolist()

    @property
    def identifiable_factors(self) -> list[str]:
        """Factors with enough anchors that are not switched off."""
        return self.factors.loc[self.factors["identifiable"], "factor"].tolist()

    @property
    def active_violations(self) -> pd.DataFrame:
        """Covariance violations between two active (not switched off) factors."""
        v = self.covariance_violations
        return v[~v["involves_switched_off"]] if len(v) else v

    @property
    def is_identifiable(self) -> bool:
        """Whether all active factors pass both checks (and at least one factor is active)."""
        active = ~self.factors["switched_off"]
        return bool(
            active.any()
            and self.factors.loc[active, "identifiable"].all()
            and len(self.active_violations) == 0
        )

    def summary(self) -> str:
        """Readable multi-line summary.

        Returns
        -------
        The summary text.
        """
        f = self.factors
        n_off = int(f["switched_off"].sum())
        n_unsel = int(f["unselected"].sum())
        n_ident = int(f["identifiable"].sum())
        n_few = len(f) - n_off - n_unsel - n_ident
        counts = f"{n_few} with too few anchors, "
        if n_unsel:
            counts += f"{n_unsel} in use but with no selected gene, "
        lines = [
            f"SparseVAE identifiability report (selected: p* >= {self.min_pstar:g}; "
            f"switched off: eta < {self.eta_min:.3g} or no selected gene, and every "
            f"|w| < {self.w_off:.3g})",
            f"  {len(f)} factors: {n_ident} identifiable (>= {self.min_anchors} anchor genes), "
            f"{counts}{n_off} switched off",
        ]
        width = max([len("factor"), *(len(str(x)) for x in f["factor"])])
        lines.append(f"  {'factor':<{width}}  {'selected':>8}  {'anchors':>7}  {'eta':>9}  status")
        for row in f.itertuples(index=False):
            if row.switched_off:
                status = "switched off"
            elif row.unselected:
                status = f"in use (max |w| {row.max_abs_w:.3g}) but no gene selected"
            elif row.identifiable:
                status = "identifiable"
            else:
                status = f"too few anchors (< {self.min_anchors})"
            lines.append(
                f"  {row.factor!s:<{width}}  {row.n_selected:>8d}  {row.n_anchors:>7d}  "
                f"{row.eta:>9.3g}  {status}"
            )
        v = self.covariance_violations
        cond = "min(Var z_k, Var z_k') > |Cov(z_k, z_k')|"
        active = self.active_violations
        n_off_pairs = len(v) - len(active)
        if len(active) == 0:
            lines.append(f"  Covariance condition {cond}: holds for all pairs of active factors.")
        else:
            lines.append(
                f"  Covariance condition {cond}: violated by {len(active)} pair(s) of active "
                "factors:"
            )
            for row in active.itertuples(index=False):
                lines.append(
                    f"    {row.factor_1} - {row.factor_2}: Var {row.var_1:.3g}, {row.var_2:.3g}; "
                    f"Cov {row.covariance:.3g} (corr {row.correlation:.2f})"
                )
        if n_off_pairs:
            lines.append(
                f"  ({n_off_pairs} more violating pair(s) involve a switched-off factor; see "
                ".covariance_violations.)"
            )
        verdict = "identifiable" if self.is_identifiable else "NOT identifiable"
        lines.append(f"  Overall: the active factors are {verdict} by these checks.")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return self.summary()

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.summary())

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dictionary of the report.

        Returns
        -------
        dict with ``min_pstar``, ``eta_min``, ``min_anchors``, ``is_identifiable``,
        ``identifiable_factors``, ``factors`` (list of per-factor records) and
        ``covariance_violations`` (list of per-pair records).
        """
        return {
            "min_pstar": float(self.min_pstar),
            "eta_min": float(self.eta_min),
            "w_off": float(self.w_off),
            "min_anchors": int(self.min_anchors),
            "is_identifiable": self.is_identifiable,
            "identifiable_factors": [str(x) for x in self.identifiable_factors],
            "factors": _records(self.factors),
            "covariance_violations": _records(self.covariance_violations),
        }


def identifiability_report(
    data: FitData,
    adata: AnnData | None = None,
    min_pstar: float = 0.5,
    eta_min: float | None = None,
    min_anchors: int = 2,
    z: np.ndarray | None = None,
    kind: str | None = None,
    *,
    key: str = DEFAULT_KEY,
) -> IdentifiabilityReport:
    """Check the conditions of the Sparse VAE's identifiability theorem on a trained model.

    The theorem (Moran et al. 2022) needs (i) at least two anchor genes per factor (genes that the
    mask lets through to that factor only) and (ii) ``min(Var z_k, Var z_k') > |Cov(z_k, z_k')|``
    for every pair of factors. (i) is read from the mask's inclusion probabilities, (ii) from the
    covariance of the posterior means of the factors. Factors that the prior switched off (``eta``
    near zero, or no selected gene, and no mask entry above ``w_off``: the decoder does not use
    them) are reported as such: they carry no signal and are not expected to be identifiable.
    A factor with ``eta`` near zero or no selected gene whose mask still has large entries is
    reported as *in use but with no selected gene*: the decoder uses it, so it is neither
    switched off nor identifiable.

    Parameters
    ----------
    data
        An AnnData with results or a trained model, see :func:`anchor_genes`.
    adata
        Model only: AnnData on which the factors' covariance is computed; default the training
        data.
    min_pstar
        Selection threshold on ``p*``, in ``(0, 1]``.
    eta_min
        A factor with ``eta_k < eta_min`` counts as switched off. Default: the ``eta`` that the
        prior's EM update gives a factor whose inclusion probabilities sum to half a gene,
        ``(0.5 + a - 1) / (a + b + G - 2)``.
    min_anchors
        Anchors needed for a factor to count as identifiable (the theorem's 2).
    z
        Precomputed factors (cells x factors) to use instead of
        ``model.get_latent_representation(adata)``.
    kind
        Multi-study models: which factors to check. ``None``/``"shared"`` (default): the
        shared factors, with the covariance of their posterior means over all cells. A study
        name: that study's specific factors; anchors are counted in the study's view (a gene
        selected by a shared factor is not an anchor of a specific factor, see
        :func:`anchor_genes`), and the covariance condition is checked on the study's cells for
        every pair of the study's factors (shared and specific) that involves a specific one.
    key
        The ``key_added`` the results were written with (AnnData only).

    Returns
    -------
    An :class:`IdentifiabilityReport`; ``print(report)`` gives a summary, ``report.factors`` and
    ``report.covariance_violations`` the tables, ``report.to_dict()`` a JSON-friendly dict.

    Examples
    --------
    >>> report = sparsevae.tl.identifiability_report(model)
    >>> print(report)
    >>> report.factors.query("identifiable")
    """
    res = read_results(data, key, adata=adata)
    res.require_prior("identifiability_report")
    min_pstar = check_min_pstar(min_pstar)
    if not isinstance(min_anchors, int | np.integer) or min_anchors < 1:
        raise ValueError(f"min_anchors must be a positive integer, got {min_anchors!r}.")
    eta_min = res.eta_off if eta_min is None else float(eta_min)
    if not np.isfinite(eta_min) or eta_min < 0:
        raise ValueError(f"eta_min must be a finite number >= 0, got {eta_min!r}.")
    w_off = float(res.w_off)

    def table(kind: str | None) -> pd.DataFrame:
        t = res.factor_status(kind, min_pstar, eta_min)
        selects = ~(t["switched_off"] | t["unselected"])
        t["identifiable"] = (t["n_anchors"] >= int(min_anchors)) & selects
        return t

    factors = table(kind)
    names = factors["factor"].tolist()
    study = res.mask(kind).kind if res.is_multistudy else "shared"
    # The factors whose covariance is checked: a study's factors include the shared ones.
    context = factors
    if study != "shared":
        context = pd.concat([table("shared"), factors], ignore_index=True)
    context_names = context["factor"].tolist()
    all_names = res.factor_names
    z = res.latent if z is None else np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] != len(all_names):
        raise ValueError(f"z must have shape (n_cells, {len(all_names)}), got {z.shape}.")
    if study != "shared":
        codes = res.study_codes
        if len(codes) != z.shape[0]:
            raise ValueError(
                f"z has {z.shape[0]} rows but the AnnData has {len(codes)} cells: pass the z of "
                "the cells of `adata` (default: the training data)."
            )
        z = z[codes == res.studies.index(study)]
    z = z[:, [all_names.index(f) for f in context_names]]
    violations = covariance_violations(z, context_names)
    if study != "shared":
        keep = violations["factor_1"].isin(names) | violations["factor_2"].isin(names)
        violations = violations[keep].reset_index(drop=True)
    off = set(context.loc[context["switched_off"], "factor"])
    violations["involves_switched_off"] = [
        (a in off) or (b in off)
        for a, b in zip(violations["factor_1"], violations["factor_2"], strict=True)
    ]
    violations["involves_switched_off"] = violations["involves_switched_off"].astype(bool)
    cov = pd.DataFrame(
        np.atleast_2d(np.cov(z, rowvar=False)), index=context_names, columns=context_names
    )
    return IdentifiabilityReport(
        factors=factors,
        covariance_violations=violations,
        covariance=cov,
        min_pstar=min_pstar,
        eta_min=eta_min,
        min_anchors=int(min_anchors),
        w_off=w_off,
    )
