"""Multi-study summaries: which genes load on shared programs and which on study-specific ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ._anchors import _check_min_pstar, _require_prior

__all__ = ["SharedSpecificGenes", "mask_f1", "shared_specific_genes"]


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
    return pd.DataFrame(
        records, columns=["program", "factor", "f1", "precision", "recall", "n_selected"]
    )
