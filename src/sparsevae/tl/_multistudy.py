"""Multi-study summaries: which genes load on shared programs and which on study-specific ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ._anchors import _check_min_pstar, _require_prior

__all__ = [
    "MultiStudyChecks",
    "SharedSpecificGenes",
    "check_shared_specific",
    "mask_f1",
    "shared_specific_genes",
]


@dataclass(repr=False)
class SharedSpecificGenes:
    """Result of :func:`shared_specific_genes`.

    Attributes
    ----------
    genes
        One row per gene (index ``gene``) with the columns ``shared`` (the shared factors that
        select the gene, ``;``-separated, ``""`` for none), ``n_shared``, one column
        ``specific_in_<study>`` per study (the specific factors of that study that select it),
        ``n_specific`` (specific selections summed over studies), ``studies`` (the studies where
        a specific factor selects it, ``;``-separated) and ``label``: ``"shared"`` (shared
        factors only), ``"specific to <study>"`` (specific factors of one study only; several
        studies are listed comma-separated), ``"both"`` (shared and specific factors) or
        ``"none"``.
    factors
        One row per factor of each mask: ``kind`` (``"shared"`` or the study), ``factor``,
        ``n_genes`` (genes it selects) and ``eta``.
    min_pstar
        Selection threshold used.
    """

    genes: pd.DataFrame
    factors: pd.DataFrame
    min_pstar: float = 0.5

    @property
    def label_counts(self) -> pd.Series:
        """Number of genes per label."""
        return self.genes["label"].value_counts()

    def summary(self) -> str:
        """Readable summary: genes per label and per factor.

        Returns
        -------
        The summary text.
        """
        lines = [f"Genes by program type (selected: p* >= {self.min_pstar:g})"]
        for label, n in self.label_counts.items():
            lines.append(f"  {label}: {n}")
        lines.append("Genes per factor")
        for kind, df in self.factors.groupby("kind", sort=False):
            counts = ", ".join(f"{f} {n}" for f, n in zip(df["factor"], df["n_genes"], strict=True))
            lines.append(f"  {kind}: {counts}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.summary())


def _joined(selected: pd.DataFrame) -> pd.Series:
    """``;``-joined names of the selected columns, per row."""
    cols = np.asarray(selected.columns).astype(str)
    values = selected.to_numpy(dtype=bool)
    return pd.Series([";".join(cols[row]) for row in values], index=selected.index, dtype=object)


def shared_specific_genes(model: Any, min_pstar: float = 0.5) -> SharedSpecificGenes:
    """Which genes a multi-study model assigns to shared programs and which to one study.

    A factor selects gene ``j`` when the inclusion probability of its mask entry is at least
    ``min_pstar``: for a shared factor, in the shared mask; for a specific factor, in that
    study's mask.

    Parameters
    ----------
    model
        A trained multi-study :class:`~sparsevae.SparseVAE` (registered with ``study_key``)
        with a mask prior (``mask="ssl"``).
    min_pstar
        Selection threshold on ``p*``, in ``(0, 1]``.

    Returns
    -------
    A :class:`SharedSpecificGenes` with the per-gene table ``.genes`` (factors per mask and a
    label: ``"shared"``, ``"specific to <study>"``, ``"both"`` or ``"none"``), the per-factor
    table ``.factors`` (number of genes) and a ``summary()``.

    Examples
    --------
    >>> res = sparsevae.tl.shared_specific_genes(model)
    >>> res.genes.query("label == 'specific to donor_A'")
    >>> res.factors
    """
    _require_prior(model, "shared_specific_genes")
    if not getattr(model, "is_multistudy", False):
        raise ValueError(
            "shared_specific_genes needs a multi-study model: register the AnnData with "
            "`SparseVAE.setup_anndata(adata, ..., study_key='<obs column>')` and train a model "
            "with n_specific_factors. For a single-study model use sparsevae.tl.anchor_genes."
        )
    min_pstar = _check_min_pstar(min_pstar)
    studies = list(model.studies)
    sel_shared = model.get_inclusion_probabilities("shared") >= min_pstar
    genes = pd.DataFrame(index=sel_shared.index)
    genes["shared"] = _joined(sel_shared)
    genes["n_shared"] = sel_shared.sum(axis=1).astype(int)
    n_specific = np.zeros(len(genes), dtype=int)
    in_study = np.zeros((len(genes), len(studies)), dtype=bool)
    factor_rows = [
        {"kind": "shared", "factor": f, "n_genes": int(sel_shared[f].sum()), "eta": float(e)}
        for f, e in model.get_eta("shared").items()
    ]
    for s, study in enumerate(studies):
        sel = model.get_inclusion_probabilities(study) >= min_pstar
        genes[f"specific_in_{study}"] = _joined(sel)
        counts = sel.sum(axis=1).to_numpy(dtype=int)
        n_specific += counts
        in_study[:, s] = counts > 0
        factor_rows.extend(
            {"kind": study, "factor": f, "n_genes": int(sel[f].sum()), "eta": float(e)}
            for f, e in model.get_eta(study).items()
        )
    genes["n_specific"] = n_specific
    names = np.asarray(studies, dtype=object)
    genes["studies"] = [";".join(names[row]) for row in in_study]
    has_shared = genes["n_shared"].to_numpy() > 0
    has_specific = n_specific > 0
    label = np.where(has_shared, "shared", "none").astype(object)
    label[has_shared & has_specific] = "both"
    only_specific = ~has_shared & has_specific
    label[only_specific] = [
        "specific to " + ", ".join(names[row]) for row in in_study[only_specific]
    ]
    genes["label"] = label
    factors = pd.DataFrame(factor_rows, columns=["kind", "factor", "n_genes", "eta"])
    return SharedSpecificGenes(genes=genes, factors=factors, min_pstar=min_pstar)


def mask_f1(selected: pd.DataFrame | np.ndarray, truth: pd.DataFrame | np.ndarray) -> pd.DataFrame:
    """Recovery of known gene programs by a mask, after matching factors to programs.

    Learned factors are matched one to one to true programs by the Hungarian algorithm on the
    F1 score of their gene sets (maximising the total F1); the F1 of a gene set ``A`` against a
    true program ``B`` is ``2 |A & B| / (|A| + |B|)``.

    Parameters
    ----------
    selected
        Genes x learned factors, boolean (e.g. ``model.get_inclusion_probabilities(kind) >= 0.5``).
    truth
        Genes x true programs, boolean or 0/1 (e.g. ``adata.varm["true_mask_shared"]`` of
        :func:`sparsevae.datasets.simulate_multistudy`).

    Returns
    -------
    DataFrame with one row per true program (``program``: its column name or position) and the
    columns ``factor`` (the matched learned factor, ``None`` when there are fewer factors than
    programs), ``f1``, ``precision``, ``recall`` and ``n_selected`` (genes the factor selects).

    Examples
    --------
    >>> sel = model.get_inclusion_probabilities("shared") >= 0.5
    >>> sparsevae.tl.mask_f1(sel, adata.varm["true_mask_shared"])["f1"].mean()
    """
    from scipy.optimize import linear_sum_assignment

    factor_names = (
        [str(c) for c in selected.columns]
        if isinstance(selected, pd.DataFrame)
        else [str(k) for k in range(np.shape(selected)[1])]
    )
    program_names = (
        [str(c) for c in truth.columns]
        if isinstance(truth, pd.DataFrame)
        else [str(k) for k in range(np.shape(truth)[1])]
    )
    A = np.asarray(selected, dtype=float) > 0
    B = np.asarray(truth, dtype=float) > 0
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[0]:
        raise ValueError(
            f"selected and truth must be genes x factors with the same genes, got shapes "
            f"{A.shape} and {B.shape}."
        )
    inter = A.T.astype(float) @ B.astype(float)  # factors x programs
    sizes = A.sum(0)[:, None] + B.sum(0)[None, :]
    f1 = np.divide(2.0 * inter, sizes, out=np.zeros_like(inter), where=sizes > 0)
    rows, cols = linear_sum_assignment(-f1)
    match = dict(zip(cols.tolist(), rows.tolist(), strict=True))
    records = []
    for b, name in enumerate(program_names):
        a = match.get(b)
        n_true = int(B[:, b].sum())
        if a is None:
            records.append(
                {"program": name, "factor": None, "f1": 0.0, "precision": np.nan,
                 "recall": 0.0, "n_selected": 0}
            )  # fmt: skip
            continue
        n_sel = int(A[:, a].sum())
        hit = float(inter[a, b])
        records.append(
            {
                "program": name,
                "factor": factor_names[a],
                "f1": float(f1[a, b]),
                "precision": hit / n_sel if n_sel else np.nan,
                "recall": hit / n_true if n_true else np.nan,
                "n_selected": n_sel,
            }
        )
    table = pd.DataFrame(
        records, columns=["program", "factor", "f1", "precision", "recall", "n_selected"]
    )
    # Object dtype keeps None for unmatched programs (pandas 3 would infer a string column and
    # turn None into NaN).
    table["factor"] = pd.Series([r["factor"] for r in records], index=table.index, dtype=object)
    return table


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
    """

    activity: pd.DataFrame
    confined: pd.DataFrame
    repeated: pd.DataFrame
    min_ratio: float = 3.0
    min_jaccard: float = 0.5
    min_pstar: float = 0.5

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


#: Two specific factors hold the same program only if their overlap is at least this many times
#: the overlap expected of random gene sets of their sizes (``|A| |B| / n_genes``). Dense masks
#: (hundreds of genes per factor) overlap by chance with a Jaccard index above 0.5; a repeated
#: 30-gene program of 400 genes overlaps about 10 times more than chance.
MIN_FOLD_OVER_CHANCE = 2.0


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
            union = int((a | b).sum())
            shared = int((a & b).sum())
            jac[i, j] = jac[j, i] = shared / union if union else 0.0
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


def check_shared_specific(
    model: Any,
    adata: Any = None,
    min_ratio: float = 3.0,
    min_jaccard: float = 0.5,
    min_pstar: float = 0.5,
    max_cells: int | None = None,
) -> MultiStudyChecks:
    """Check that a multi-study fit put shared programs in the shared mask and vice versa.

    A multi-study fit can land in a wrong but stable configuration, more often when there are
    more factors than programs: a surplus *shared* factor can carry the programs of one or
    some studies (it then varies in those, and is pinned in the others), or each study's
    *specific* mask can hold a copy of one shared program. Neither changes the fit much, so
    neither is visible in the loss; both are visible after training:

    - ``confined``: a shared factor that selects genes, whose posterior mean varies ``min_ratio``
      times less in some study than in another (a shared factor should vary in every study; a
      shared program that one study truly lacks, such as that of a cell type absent from it, is
      flagged too, and is worth knowing about);
    - ``repeated``: specific factors of several studies whose gene sets overlap (Jaccard index
      >= ``min_jaccard``, and at least twice the overlap of random sets of their sizes, so that
      dense masks are not grouped by chance); a program present in every study belongs in the
      shared mask.

    Parameters
    ----------
    model
        A trained multi-study :class:`~sparsevae.SparseVAE` with a mask prior.
    adata
        AnnData to compute the factors on; default the training data.
    min_ratio
        Flag a shared factor whose largest spread in a study is at least this multiple of its
        smallest (``> 1``).
    min_jaccard
        Overlap, in ``(0, 1]``, above which two specific factors hold the same program.
    min_pstar
        Selection threshold on ``p*``, in ``(0, 1]``.
    max_cells
        Use at most this many cells (a random subset, fixed seed); default all.

    Returns
    -------
    A :class:`MultiStudyChecks` with ``activity``, ``confined``, ``repeated``, the list
    ``problems`` (empty when the fit looks consistent), ``ok`` and a ``summary()``.

    Examples
    --------
    >>> checks = sparsevae.tl.check_shared_specific(model)
    >>> checks.ok
    >>> print(checks.summary())
    """
    _require_prior(model, "check_shared_specific")
    if not getattr(model, "is_multistudy", False):
        raise ValueError(
            "check_shared_specific needs a multi-study model (registered with study_key and "
            "trained with n_specific_factors)."
        )
    min_pstar = _check_min_pstar(min_pstar)
    if not min_ratio > 1:
        raise ValueError(f"min_ratio must be > 1, got {min_ratio!r}.")
    if not 0 < min_jaccard <= 1:
        raise ValueError(f"min_jaccard must be in (0, 1], got {min_jaccard!r}.")
    adata = model._validate_anndata(adata)
    indices = None
    if max_cells is not None and adata.n_obs > max_cells:
        rng = np.random.default_rng(0)
        indices = np.sort(rng.choice(adata.n_obs, size=int(max_cells), replace=False))
    z = model.get_latent_representation(adata, indices=indices)
    codes = model._study_codes(adata, indices)
    studies = list(model.studies)
    activity = pd.DataFrame(
        [[float(z[codes == s, k].std()) if (codes == s).sum() > 1 else np.nan
          for s in range(len(studies))] for k in range(z.shape[1])],
        index=pd.Index(model.factor_names, name="factor"),
        columns=pd.Index(studies, name="study"),
    )  # fmt: skip
    sel_shared = model.get_inclusion_probabilities("shared") >= min_pstar
    rows = []
    for factor in model.shared_factor_names:
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
        sel = model.get_inclusion_probabilities(study) >= min_pstar
        sets.extend(
            (study, str(f), sel[f].to_numpy()) for f in sel.columns if int(sel[f].sum()) >= 2
        )
    repeated = _repeated_programs(sets, len(studies), min_jaccard)
    return MultiStudyChecks(
        activity=activity,
        confined=confined,
        repeated=repeated,
        min_ratio=float(min_ratio),
        min_jaccard=float(min_jaccard),
        min_pstar=min_pstar,
    )
