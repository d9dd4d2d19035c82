"""Anchor genes, top genes and identifiability checks of a trained SparseVAE."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "IdentifiabilityReport",
    "anchor_genes",
    "covariance_violations",
    "identifiability_report",
    "top_genes",
]


# ---------------------------------------------------------------------------- helpers
def _check_min_pstar(min_pstar: float) -> float:
    if not isinstance(min_pstar, int | float | np.floating) or not 0.0 < min_pstar <= 1.0:
        raise ValueError(f"min_pstar must be a number in (0, 1], got {min_pstar!r}.")
    return float(min_pstar)


def _require_prior(model: Any, what: str) -> None:
    if not hasattr(model, "get_mask") or not hasattr(model, "module"):
        raise TypeError(f"{what} expects a trained SparseVAE model, got {type(model).__name__}.")
    if getattr(model.module, "prior", None) is None:
        raise ValueError(
            f"{what} needs the mask's inclusion probabilities p*, but this model has no mask prior "
            "(mask=None, the plain VAE). Train with mask='ssl', or rank genes by "
            "model.get_gene_effects()."
        )


def _kind_kwargs(kind: str | None) -> dict[str, str]:
    """``{"kind": kind}``, or nothing for the default mask (so duck-typed models work too)."""
    return {} if kind is None else {"kind": kind}


def _gene_effects(model: Any, kind: str | None) -> Any:
    """Signed gene effects of mask ``kind``: the model's getter, else computed from the model."""
    getter = getattr(model, "get_gene_effects", None)
    if getter is not None:
        return getter(**_kind_kwargs(kind))
    from ..model._interpret import compute_gene_effects

    return compute_gene_effects(model, kind=kind)


def _kind_names(model: Any, kind: str | None) -> list[str]:
    """Factor names of mask ``kind`` (all factors of a single-study model)."""
    getter = getattr(model, "kind_factor_names", None)
    if getter is None:
        if kind not in (None, "shared"):
            raise ValueError(f"Unknown mask kind {kind!r}: this model has only the shared mask.")
        return list(model.factor_names)
    return list(getter(kind))


def _is_multistudy(model: Any) -> bool:
    return bool(getattr(model, "is_multistudy", False))


def _resolve_factors(
    model: Any, factors: Sequence[str | int] | str | int | None, kind: str | None = None
) -> list[str]:
    """Factor names from names or integer positions; default all factors of mask ``kind``."""
    names = _kind_names(model, kind)
    if factors is None:
        return names
    if isinstance(factors, str | int | np.integer):
        factors = [factors]
    out: list[str] = []
    for f in factors:
        if isinstance(f, int | np.integer) and not isinstance(f, bool):
            if not 0 <= f < len(names):
                raise ValueError(f"Factor index {f} is out of range for {len(names)} factors.")
            out.append(names[int(f)])
        elif f in names:
            out.append(str(f))
        else:
            raise ValueError(f"Unknown factor {f!r}; the model's factors are {names}.")
    return out


def _selection(
    model: Any, min_pstar: float, kind: str | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Mask ``W``, inclusion probabilities ``p*`` and the selection ``p* >= min_pstar``."""
    W = model.get_mask(**_kind_kwargs(kind))
    pstar = model.get_inclusion_probabilities(**_kind_kwargs(kind))
    return W, pstar, pstar >= min_pstar


def _other_selections(model: Any, min_pstar: float, kind: str | None = None) -> np.ndarray:
    """Per gene, the selections outside mask ``kind`` that a gene of that kind also decodes from.

    Zero for a single-study model. Multi-study: for a study's mask, the number of shared factors
    that select the gene (in that study the gene sees both masks); for the shared mask, the
    largest number of specific factors selecting the gene in any one study (an anchor of a
    shared factor must be an anchor in every study). An integer array in the order of the genes
    (positional, so duplicated gene names do no harm).
    """
    n_genes = len(model.adata.var_names)
    if not _is_multistudy(model):
        return np.zeros(n_genes, dtype=int)
    if kind is None or kind == "shared":
        counts = [
            (model.get_inclusion_probabilities(kind=s) >= min_pstar).to_numpy().sum(axis=1)
            for s in model.studies
        ]
        return np.max(counts, axis=0).astype(int)
    shared = model.get_inclusion_probabilities(kind="shared") >= min_pstar
    return shared.to_numpy().sum(axis=1).astype(int)


# ---------------------------------------------------------------------------- anchors
def anchor_genes(
    model: Any,
    min_pstar: float = 0.5,
    factors: Sequence[str | int] | str | int | None = None,
    anchors_only: bool = False,
    n_top: int | None = None,
    kind: str | None = None,
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
    model
        A trained :class:`~sparsevae.SparseVAE` with a mask prior (``mask="ssl"``).
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
    _require_prior(model, "anchor_genes")
    min_pstar = _check_min_pstar(min_pstar)
    if n_top is not None and (not isinstance(n_top, int | np.integer) or n_top < 1):
        raise ValueError(f"n_top must be a positive integer or None, got {n_top!r}.")
    W, pstar, selected = _selection(model, min_pstar, kind)
    n_selecting = selected.sum(axis=1) + _other_selections(model, min_pstar, kind)
    frames = []
    for factor in _resolve_factors(model, factors, kind):
        genes = selected.index[selected[factor].to_numpy()]
        df = pd.DataFrame(
            {
                "factor": factor,
                "gene": genes.astype(str),
                "weight": W.loc[genes, factor].to_numpy(dtype=float),
                "pstar": pstar.loc[genes, factor].to_numpy(dtype=float),
                "is_anchor": (n_selecting.loc[genes] == 1).to_numpy(),
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
    model: Any,
    n: int = 20,
    factors: Sequence[str | int] | str | int | None = None,
    kind: str | None = None,
) -> pd.DataFrame:
    """The ``n`` top genes of each factor, ranked by ``p*`` then by ``|W|``.

    Parameters
    ----------
    model
        A trained :class:`~sparsevae.SparseVAE` with a mask prior (``mask="ssl"``).
    n
        Number of genes per factor (at most the number of genes).
    factors
        Factors to show (names or integer positions); default all.
    kind
        Which mask: ``None``/``"shared"`` or a study name (multi-study), see
        :func:`anchor_genes`.

    Returns
    -------
    DataFrame with one column per factor and one row per rank (index ``rank``, starting at 1)
    holding gene names. Genes are listed whether or not the mask selects them; use
    :func:`anchor_genes` for the selected genes only.

    Examples
    --------
    >>> sparsevae.tl.top_genes(model, n=10)
    """
    _require_prior(model, "top_genes")
    if not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}.")
    W, pstar, _ = _selection(model, 0.5, kind)
    n = min(int(n), W.shape[0])
    genes = np.asarray(W.index).astype(str)
    table = {}
    for factor in _resolve_factors(model, factors, kind):
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


def _default_eta_min(model: Any) -> float:
    """The ``eta`` of a factor whose inclusion probabilities sum to half a gene."""
    prior = model.module.prior
    a = float(getattr(prior, "a", 1.0))
    n_genes = int(getattr(prior, "n_genes", model.adata.n_vars))
    b = float(getattr(prior, "b", n_genes))
    return float((0.5 + a - 1.0) / (a + b + n_genes - 2.0))


def _default_w_off(model: Any) -> float:
    """``|w|`` where the spike and slab Laplace densities cross (equal weights)."""
    return float(model.module.prior.w_off)


def _factor_table(
    model: Any,
    min_pstar: float,
    eta_min: float,
    min_anchors: int,
    kind: str | None,
    w_off: float = 0.0,
) -> pd.DataFrame:
    """Per-factor selection, anchors, eta, mask size and status of mask ``kind``."""
    _, _, selected = _selection(model, min_pstar, kind)
    names = _kind_names(model, kind)
    eta = model.get_eta(**_kind_kwargs(kind)).reindex(names).to_numpy(dtype=float)
    n_selected = selected.sum(axis=0).reindex(names).to_numpy(dtype=int)
    single = (selected.sum(axis=1) + _other_selections(model, min_pstar, kind)) == 1
    n_anchors = selected[single].sum(axis=0).reindex(names).to_numpy(dtype=int)
    W = model.get_mask(**_kind_kwargs(kind))
    max_abs_w = W.abs().max(axis=0).reindex(names).to_numpy(dtype=float)
    not_selected = (eta < eta_min) | (n_selected == 0)
    in_use = max_abs_w >= w_off
    switched_off = not_selected & ~in_use
    unselected = not_selected & in_use
    identifiable = (n_anchors >= min_anchors) & ~not_selected
    return pd.DataFrame(
        {
            "factor": names,
            "n_selected": n_selected,
            "n_anchors": n_anchors,
            "eta": eta,
            "max_abs_w": max_abs_w,
            "switched_off": switched_off,
            "unselected": unselected,
            "identifiable": identifiable,
        }
    )


def identifiability_report(
    model: Any,
    adata: AnnData | None = None,
    min_pstar: float = 0.5,
    eta_min: float | None = None,
    min_anchors: int = 2,
    z: np.ndarray | None = None,
    kind: str | None = None,
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
    switched off nor identifiable (seen on pbmc68k: ``eta`` 1.6e-4, yet the largest ``|w|``
    well above the spike region and large gene effects).

    Parameters
    ----------
    model
        A trained :class:`~sparsevae.SparseVAE` with a mask prior (``mask="ssl"``).
    adata
        AnnData on which the factors' covariance is computed; default the training data.
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
    _require_prior(model, "identifiability_report")
    min_pstar = _check_min_pstar(min_pstar)
    if not isinstance(min_anchors, int | np.integer) or min_anchors < 1:
        raise ValueError(f"min_anchors must be a positive integer, got {min_anchors!r}.")
    eta_min = _default_eta_min(model) if eta_min is None else float(eta_min)
    if not np.isfinite(eta_min) or eta_min < 0:
        raise ValueError(f"eta_min must be a finite number >= 0, got {eta_min!r}.")
    w_off = _default_w_off(model)
    factors = _factor_table(model, min_pstar, eta_min, int(min_anchors), kind, w_off)
    names = factors["factor"].tolist()
    study = model._kind_index(kind) if _is_multistudy(model) else None
    # The factors whose covariance is checked: a study's factors include the shared ones.
    context = factors
    if study is not None:
        shared = _factor_table(model, min_pstar, eta_min, int(min_anchors), "shared", w_off)
        context = pd.concat([shared, factors], ignore_index=True)
    context_names = context["factor"].tolist()
    all_names = list(model.factor_names)
    if z is None:
        z = model.get_latent_representation(adata=adata)
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] != len(all_names):
        raise ValueError(f"z must have shape (n_cells, {len(all_names)}), got {z.shape}.")
    if study is not None:
        codes = model._study_codes(adata)
        if len(codes) != z.shape[0]:
            raise ValueError(
                f"z has {z.shape[0]} rows but the AnnData has {len(codes)} cells: pass the z of "
                "the cells of `adata` (default: the training data)."
            )
        z = z[codes == study]
    z = z[:, [all_names.index(f) for f in context_names]]
    violations = covariance_violations(z, context_names)
    if study is not None:
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
