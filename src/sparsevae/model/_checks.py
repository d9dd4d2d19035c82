"""Checks of a multi-study fit: shared programs in the shared mask, one study's in its own.

The arrays-level core of :func:`sparsevae.tl.check_shared_specific`, here so that training can
run it (``train()`` warns when the checks fail) without importing ``tl``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

__all__ = [
    "MAX_EFFECT_CELLS",
    "MIN_CONFINED_GENES",
    "MIN_FOLD_OVER_CHANCE",
    "MultiStudyChecks",
    "confined_genes",
    "effect_cells",
    "jaccard",
    "shared_specific_checks",
    "within_study_effects",
]

#: A shared factor carries a study's own program when at least this many of its genes depend on
#: it in that study only (fewer are read as noise).
MIN_CONFINED_GENES = 3
CONFINED_GENES_COLUMNS = ["factor", "study", "n_genes", "genes", "ratio"]
#: Cells (at most) on which the multi-study checks run (during training, at its end and in
#: ``tl``): the gene-level check runs the decoder once per shared factor, so a random subset
#: (fixed seed) keeps them cheap on large data.
MAX_EFFECT_CELLS = 2000


def effect_cells(n_cells: int, max_cells: int = MAX_EFFECT_CELLS) -> np.ndarray:
    """Positions of the cells the gene-level check uses: all, or a fixed random subset.

    Parameters
    ----------
    n_cells
        Number of cells available.
    max_cells
        Use at most this many.

    Returns
    -------
    Sorted positions.
    """
    keep = np.arange(n_cells)
    if n_cells > max_cells:
        keep = np.sort(np.random.default_rng(0).choice(keep, max_cells, replace=False))
    return keep


@dataclass(repr=False)
class MultiStudyChecks:
    """Result of :func:`check_shared_specific`.

    Attributes
    ----------
    activity
        Factors x studies: the standard deviation of each factor's posterior mean over the cells
        of each study. A shared factor should vary in every study; a specific factor only
        matters in its own study's column.
    confined
        One row per shared factor that selects genes (index ``factor``): ``n_genes``, ``ratio``
        (its largest spread in a study divided by its smallest), ``varies_in`` (the studies
        where its spread is within ``min_ratio`` of the largest, ``;``-separated), ``quiet_in``
        (the others) and ``flagged`` (``ratio >= min_ratio``: it hardly varies in some study,
        so it probably carries programs of the other studies rather than a shared one).
    repeated
        One row per program that specific factors of several studies select (gene sets with
        Jaccard index >= ``min_jaccard`` and an overlap at least ``MIN_FOLD_OVER_CHANCE`` times
        what two random sets of their sizes would share): ``factors`` (``study:factor``,
        ``;``-separated), ``n_studies``, ``n_genes`` (genes in their union), ``jaccard`` (the
        smallest pairwise index) and ``in_all_studies``. A program present in every study
        belongs in the shared mask.
    min_ratio, min_jaccard, min_pstar
        Thresholds used.
    confined_genes
        One row per shared factor and study whose selected genes include at least
        ``MIN_CONFINED_GENES`` that the factor drives in that study only (see
        :func:`confined_genes`): ``factor``, ``study``, ``n_genes``, ``genes`` (``;``-separated)
        and ``ratio`` (the median over those genes of the effect in the study over the largest
        in another). Such a factor mixes a shared program with one study's own, which belongs in
        that study's specific mask. Computed only when the network is at hand (a model, not
        written results); empty otherwise.
    """

    activity: pd.DataFrame
    confined: pd.DataFrame
    repeated: pd.DataFrame
    min_ratio: float = 3.0
    min_jaccard: float = 0.5
    min_pstar: float = 0.5
    confined_genes: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=CONFINED_GENES_COLUMNS)
    )

    @property
    def problems(self) -> list[str]:
        """One sentence per likely misassignment (empty when the fit looks consistent)."""
        out = []
        for factor, row in self.confined[self.confined["flagged"]].iterrows():
            varies = row["varies_in"].replace(";", ", ")
            quiet = row["quiet_in"].replace(";", ", ")
            out.append(
                f"shared factor {factor} ({row['n_genes']} genes) varies in {varies} but hardly "
                f"in {quiet} (spread {row['ratio']:.1f}x smaller): it probably carries a program "
                f"of {varies} rather than a shared one"
            )
        flagged = set(self.confined.index[self.confined["flagged"]].astype(str))
        for _, row in self.confined_genes.iterrows():
            if str(row["factor"]) in flagged:
                continue  # the whole factor is flagged above
            out.append(
                f"shared factor {row['factor']} drives {row['n_genes']} of its genes in "
                f"{row['study']} only (median {row['ratio']:.1f}x more than elsewhere): "
                f"probably a program of {row['study']} on a shared factor"
            )
        for _, row in self.repeated[self.repeated["in_all_studies"]].iterrows():
            out.append(
                f"specific factors {row['factors'].replace(';', ', ')} select the same "
                f"{row['n_genes']} genes in every study: a shared program split over the "
                "study-specific masks"
            )
        return out

    @property
    def ok(self) -> bool:
        """Whether each shared factor in use varies in every study and no program repeats in all."""
        return not self.problems

    def summary(self) -> str:
        """Readable summary of the checks.

        Returns
        -------
        The summary text.
        """
        lines = ["Spread of each factor's posterior mean within each study"]
        lines.extend("  " + line for line in self.activity.round(2).to_string().splitlines())
        problems = self.problems
        if not problems:
            lines.append(
                "Every shared factor in use varies in every study and no program repeats in every "
                "study's specific mask."
            )
        else:
            lines.append("Likely misassignments:")
            lines.extend(f"  - {p}" for p in problems)
            lines.append(
                "Refit with another seed (scvi.settings.seed); a fit whose checks pass is the "
                "one to interpret. If they keep failing, reconsider the numbers of factors."
            )
        partial = self.repeated[~self.repeated["in_all_studies"]]
        for _, row in partial.iterrows():
            lines.append(
                f"Note: {row['factors'].replace(';', ', ')} select the same {row['n_genes']} "
                f"genes in {row['n_studies']} studies (a program shared by some studies only)."
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.summary())


@torch.no_grad()
def within_study_effects(
    module: Any, z: np.ndarray, codes: np.ndarray, factors: list[int]
) -> np.ndarray:
    """Each factor's effect on each gene within each study (the module's decoder).

    See :meth:`sparsevae.nn.MaskedDecoder.within_study_effects`: ``(len(factors), n_studies,
    n_genes)``, computed on the cells ``z`` (posterior means) of studies ``codes``.
    """
    dec = module.decoder
    param = next(dec.parameters())
    was_training = dec.training
    dec.eval()
    try:
        effects = dec.within_study_effects(
            torch.as_tensor(z, dtype=param.dtype, device=param.device),
            torch.as_tensor(np.array(codes, dtype=np.int64), device=param.device),
            factors,
        )
    finally:
        dec.train(was_training)
    return effects.cpu().numpy()


def confined_genes(
    effects: np.ndarray,
    selected: pd.DataFrame,
    studies: list[str],
    min_ratio: float = 3.0,
    min_genes: int = MIN_CONFINED_GENES,
) -> pd.DataFrame:
    """Selected genes of shared factors that the factor drives in one study only.

    Gene ``j`` of shared factor ``k`` is confined to study ``s`` when it is selected and the
    factor's effect on it in ``s`` is at least ``min_ratio`` times its effect in every other
    study. It finds a study's program that shares a factor with a shared program, which the
    factor-level check (the spread of the factor) misses (multi-study guide, "Check every fit").

    Parameters
    ----------
    effects
        ``(n_shared_factors, n_studies, n_genes)``, from :func:`within_study_effects`.
    selected
        Genes x shared factors: which genes each factor selects.
    studies
        Study names, in the order of ``effects``' second axis.
    min_ratio
        Effect ratio (``> 1``) from which a gene counts as confined.
    min_genes
        Report a factor and study only with at least this many confined genes.

    Returns
    -------
    DataFrame with the columns ``factor``, ``study``, ``n_genes``, ``genes`` and ``ratio`` (one
    row per factor and study).
    """
    genes = np.asarray(selected.index).astype(str)
    rows = []
    for k, factor in enumerate(selected.columns):
        sel = selected[factor].to_numpy(dtype=bool)
        eff = np.nan_to_num(effects[k], nan=0.0)  # (S, G)
        if not sel.any() or eff.shape[0] < 2:
            continue
        top = eff.argmax(0)
        order = np.sort(eff, axis=0)
        best, second = order[-1], order[-2]
        ratio = np.divide(best, second, out=np.full_like(best, np.inf), where=second > 0)
        hit = sel & (best > 0) & (ratio >= min_ratio)
        for s, study in enumerate(studies):
            mine = hit & (top == s)
            if int(mine.sum()) >= min_genes:
                rows.append(
                    {"factor": str(factor), "study": study, "n_genes": int(mine.sum()),
                     "genes": ";".join(genes[mine]),
                     "ratio": round(float(np.median(ratio[mine])), 2)}
                )  # fmt: skip
    return pd.DataFrame(rows, columns=CONFINED_GENES_COLUMNS)


#: Two specific factors hold the same program only if their overlap is at least this many times
#: the overlap expected of random gene sets of their sizes (``|A| |B| / n_genes``). Dense masks
#: (hundreds of genes per factor) overlap by chance with a Jaccard index above 0.5; a repeated
#: 30-gene program of 400 genes overlaps about 10 times more than chance.
MIN_FOLD_OVER_CHANCE = 2.0


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard index of two boolean gene sets (0 when both are empty)."""
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 0.0


def _repeated_programs(
    sets: list[tuple[str, str, np.ndarray]], n_studies: int, min_jaccard: float
) -> pd.DataFrame:
    """Groups of specific factors of different studies whose gene sets overlap."""
    n = len(sets)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    jac = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            if sets[i][0] == sets[j][0]:
                continue
            a, b = sets[i][2], sets[j][2]
            shared = int((a & b).sum())
            jac[i, j] = jac[j, i] = jaccard(a, b)
            chance = a.sum() * b.sum() / a.size
            if jac[i, j] >= min_jaccard and shared >= MIN_FOLD_OVER_CHANCE * chance:
                parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    rows = []
    for members in groups.values():
        studies = {sets[i][0] for i in members}
        if len(studies) < 2:
            continue
        pairs = [jac[i, j] for i in members for j in members if i < j and sets[i][0] != sets[j][0]]
        rows.append(
            {
                "factors": ";".join(f"{sets[i][0]}:{sets[i][1]}" for i in members),
                "n_studies": len(studies),
                "n_genes": int(np.logical_or.reduce([sets[i][2] for i in members]).sum()),
                "jaccard": round(float(min(pairs)), 3),
                "in_all_studies": len(studies) == n_studies,
            }
        )
    return pd.DataFrame(
        rows, columns=["factors", "n_studies", "n_genes", "jaccard", "in_all_studies"]
    )


def shared_specific_checks(
    z: np.ndarray,
    codes: np.ndarray,
    factor_names: list[str],
    selections: dict[str, pd.DataFrame],
    min_ratio: float = 3.0,
    min_jaccard: float = 0.5,
    min_pstar: float = 0.5,
    effects: np.ndarray | None = None,
) -> MultiStudyChecks:
    """The checks of :func:`sparsevae.tl.check_shared_specific`, on a fit's arrays.

    Parameters
    ----------
    z
        The factors of the cells (cells x ``factor_names``).
    codes
        Each cell's study, as a position among the studies.
    factor_names
        All factor names (shared then specific).
    selections
        Genes x factors selections by mask kind: ``"shared"`` first, then each study.
    min_ratio, min_jaccard, min_pstar
        See :func:`sparsevae.tl.check_shared_specific`.
    effects
        The shared factors' effects per study and gene (:func:`within_study_effects`), for the
        gene-level check (:func:`confined_genes`); ``None`` skips it.

    Returns
    -------
    A :class:`MultiStudyChecks`.
    """
    studies = [k for k in selections if k != "shared"]
    sel_shared = selections["shared"]
    activity = pd.DataFrame(
        [[float(z[codes == s, k].std()) if (codes == s).sum() > 1 else np.nan
          for s in range(len(studies))] for k in range(z.shape[1])],
        index=pd.Index(factor_names, name="factor"),
        columns=pd.Index(studies, name="study"),
    )  # fmt: skip
    rows = []
    for factor in [str(f) for f in sel_shared.columns]:
        n_genes = int(sel_shared[factor].sum())
        if n_genes == 0:
            continue
        spread = activity.loc[factor].to_numpy()
        seen = np.isfinite(spread)
        top, low = float(spread[seen].max()), float(spread[seen].min())
        ratio = top / low if low > 0 else np.inf
        varies = seen & (spread * min_ratio > top)
        rows.append(
            {"factor": factor, "n_genes": n_genes, "ratio": round(ratio, 2),
             "varies_in": ";".join(np.asarray(studies)[varies]),
             "quiet_in": ";".join(np.asarray(studies)[seen & ~varies]),
             "flagged": bool(ratio >= min_ratio)}
        )  # fmt: skip
    confined = pd.DataFrame(
        rows, columns=["factor", "n_genes", "ratio", "varies_in", "quiet_in", "flagged"]
    ).set_index("factor")
    sets = []
    for study in studies:
        sel = selections[study]
        sets.extend(
            (study, str(f), sel[f].to_numpy()) for f in sel.columns if int(sel[f].sum()) >= 2
        )
    repeated = _repeated_programs(sets, len(studies), min_jaccard)
    genes_table = (
        pd.DataFrame(columns=CONFINED_GENES_COLUMNS)
        if effects is None
        else confined_genes(effects, sel_shared, studies, min_ratio)
    )
    return MultiStudyChecks(
        activity=activity,
        confined=confined,
        repeated=repeated,
        min_ratio=float(min_ratio),
        min_jaccard=float(min_jaccard),
        min_pstar=float(min_pstar),
        confined_genes=genes_table,
    )
