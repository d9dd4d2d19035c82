"""Multi-study summaries: which genes load on shared programs and which on study-specific ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from ..model import MultiStudyChecks, shared_specific_checks
from ._anchors import FitData
from ._results import DEFAULT_KEY, check_min_pstar, read_results

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


def shared_specific_genes(
    data: FitData, min_pstar: float = 0.5, *, key: str = DEFAULT_KEY
) -> SharedSpecificGenes:
    """Which genes a multi-study model assigns to shared programs and which to one study.

    A factor selects gene ``j`` when the inclusion probability of its mask entry is at least
    ``min_pstar``: for a shared factor, in the shared mask; for a specific factor, in that
    study's mask.

    Parameters
    ----------
    data
        An AnnData with the results of a multi-study fit (``model.write_results(adata)``) or a
        trained multi-study :class:`~sparsevae.SparseVAE` (registered with ``study_key``); with
        a mask prior (``mask="ssl"``).
    min_pstar
        Selection threshold on ``p*``, in ``(0, 1]``.
    key
        The ``key_added`` the results were written with (AnnData only).

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
    res = read_results(data, key)
    res.require_prior("shared_specific_genes")
    res.require_multistudy("shared_specific_genes")
    min_pstar = check_min_pstar(min_pstar)
    studies = res.studies
    sel_shared = res.selected("shared", min_pstar)
    genes = pd.DataFrame(index=sel_shared.index)
    genes["shared"] = _joined(sel_shared)
    genes["n_shared"] = sel_shared.sum(axis=1).astype(int)
    n_specific = np.zeros(len(genes), dtype=int)
    in_study = np.zeros((len(genes), len(studies)), dtype=bool)
    factor_rows = [
        {"kind": "shared", "factor": f, "n_genes": int(sel_shared[f].sum()), "eta": float(e)}
        for f, e in res.mask("shared").eta.items()
    ]
    for s, study in enumerate(studies):
        sel = res.selected(study, min_pstar)
        genes[f"specific_in_{study}"] = _joined(sel)
        counts = sel.sum(axis=1).to_numpy(dtype=int)
        n_specific += counts
        in_study[:, s] = counts > 0
        factor_rows.extend(
            {"kind": study, "factor": f, "n_genes": int(sel[f].sum()), "eta": float(e)}
            for f, e in res.mask(study).eta.items()
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


def check_shared_specific(
    data: FitData,
    adata: AnnData | None = None,
    min_ratio: float = 3.0,
    min_jaccard: float = 0.5,
    min_pstar: float = 0.5,
    max_cells: int | None = None,
    *,
    key: str = DEFAULT_KEY,
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
      shared mask;
    - ``confined_genes`` (with the model, or results written with ``effects=True``, which
      store the within-study effects it needs): genes that a shared factor
      drives ``min_ratio`` times more in one study than in any other, when a factor has at
      least three such genes; a study's program that shares a factor with a shared program,
      which the spread of the factor does not show.

    Parameters
    ----------
    data
        An AnnData with the results of a multi-study fit, or a trained multi-study
        :class:`~sparsevae.SparseVAE`; with a mask prior.
    adata
        Model only: AnnData to compute the factors on; default the training data.
    min_ratio
        Flag a shared factor whose largest spread in a study is at least this multiple of its
        smallest (``> 1``).
    min_jaccard
        Overlap, in ``(0, 1]``, above which two specific factors hold the same program.
    min_pstar
        Selection threshold on ``p*``, in ``(0, 1]``.
    max_cells
        Use at most this many cells (a random subset, fixed seed); default all (the gene-level
        check uses at most 2000).
    key
        The ``key_added`` the results were written with (AnnData only).

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
    res = read_results(data, key, adata=adata)
    res.require_prior("check_shared_specific")
    res.require_multistudy("check_shared_specific")
    min_pstar = check_min_pstar(min_pstar)
    if not min_ratio > 1:
        raise ValueError(f"min_ratio must be > 1, got {min_ratio!r}.")
    if not 0 < min_jaccard <= 1:
        raise ValueError(f"min_jaccard must be in (0, 1], got {min_jaccard!r}.")
    codes = res.study_codes
    if max_cells is not None and len(codes) > max_cells:
        rng = np.random.default_rng(0)
        indices = np.sort(rng.choice(len(codes), size=int(max_cells), replace=False))
        z, codes = res.latent_rows(indices), codes[indices]
    else:
        z = res.latent
    selections = {kind: res.selected(kind, min_pstar) for kind in res.kinds}
    return shared_specific_checks(
        z,
        codes,
        res.factor_names,
        selections,
        min_ratio,
        min_jaccard,
        min_pstar,
        res.study_effects(z, codes),
    )
