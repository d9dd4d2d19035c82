"""A fit's results as ``tl`` and ``pl`` read them: from an AnnData or from a model.

:meth:`~sparsevae.SparseVAE.write_results` stores the factors, the masks, their inclusion
probabilities, ``eta``, the gene effects and the prior's thresholds in an AnnData; every
function of ``tl`` and ``pl`` reads them through :func:`read_results`, so a saved ``.h5ad``
serves interpretation without the model. Given a model, the same object is built from its
getters (factors and effects computed once, when first needed). The rules that interpret a mask
(which genes a factor selects, which are anchors, which factors are switched off) are written
here once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from ..model import SparseVAE, effect_cells, within_study_effects
from ..priors import (
    DEFAULT_MIN_PSTAR,
    SpikeSlabLasso,
    anchors,
    factor_use,
    is_selected,
    n_selecting,
)

__all__ = ["DEFAULT_KEY", "FactorMask", "Results", "check_min_pstar", "read_results"]

#: Key under which :meth:`~sparsevae.SparseVAE.write_results` stores results by default.
DEFAULT_KEY = "sparsevae"


def check_min_pstar(min_pstar: float) -> float:
    """Validate a selection threshold on ``p*``.

    Parameters
    ----------
    min_pstar
        The threshold, a number in ``(0, 1]``.

    Returns
    -------
    The threshold as a float.
    """
    if not isinstance(min_pstar, int | float | np.floating) or not 0.0 < min_pstar <= 1.0:
        raise ValueError(f"min_pstar must be a number in (0, 1], got {min_pstar!r}.")
    return float(min_pstar)


@dataclass
class FactorMask:
    """One mask of a fit: the shared mask, or a study's specific mask.

    Attributes
    ----------
    kind
        ``"shared"`` or the study's name.
    W
        Genes x factors, the mask entries.
    pstar
        Genes x factors, the inclusion probabilities (``None`` without a mask prior).
    eta
        Each factor's prior inclusion weight (``None`` without a mask prior).
    """

    kind: str
    W: pd.DataFrame
    pstar: pd.DataFrame | None
    eta: pd.Series | None

    @property
    def factors(self) -> list[str]:
        """The factor names of this mask."""
        return [str(c) for c in self.W.columns]


@dataclass
class Results:
    """A fit's results, read by :func:`read_results`; see the module docstring.

    Attributes
    ----------
    masks
        The masks by kind (``"shared"`` first, then each study).
    factor_names
        All factor names, in the column order of the factors.
    study_key
        The ``obs`` column of the studies (``None`` for a single-study fit).
    studies
        The study names (``[]`` for a single-study fit).
    w_off
        ``|w|`` below which a mask entry counts as unused (the spike/slab crossing).
    eta_off
        ``eta`` below which a factor counts as selecting no gene (half a gene's worth).
    model
        The model, when the results were read from one (needed only for the network).
    cells
        With a model: the AnnData whose cells the factors are computed for (``None``: the
        training data).
    """

    masks: dict[str, FactorMask]
    factor_names: list[str]
    study_key: str | None = None
    studies: list[str] = field(default_factory=list)
    w_off: float | None = None
    eta_off: float | None = None
    model: SparseVAE | None = None
    cells: AnnData | None = None
    _latent: Callable[[], np.ndarray] | None = None
    _study_codes: Callable[[], np.ndarray] | None = None
    _effects: Callable[[str], pd.DataFrame | None] | None = None
    _study_effects: np.ndarray | None = None
    _cache: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ layout
    @property
    def kinds(self) -> list[str]:
        """The mask kinds: ``"shared"`` and, multi-study, each study."""
        return list(self.masks)

    @property
    def is_multistudy(self) -> bool:
        """Whether the fit has study-specific masks."""
        return bool(self.studies)

    @property
    def has_prior(self) -> bool:
        """Whether the masks have inclusion probabilities (a mask prior)."""
        return self.masks["shared"].pstar is not None

    @property
    def genes(self) -> pd.Index:
        """The gene names."""
        return self.masks["shared"].W.index

    def mask(self, kind: str | None = None) -> FactorMask:
        """The mask ``kind``.

        Parameters
        ----------
        kind
            ``None`` or ``"shared"``: the shared mask; a study name: that study's mask.

        Returns
        -------
        The :class:`FactorMask`.
        """
        kind = "shared" if kind is None else str(kind)
        if kind not in self.masks:
            if not self.is_multistudy:
                raise ValueError(
                    f"Unknown mask kind {kind!r}: this single-study fit has only the shared mask "
                    "(kind=None or 'shared')."
                )
            raise ValueError(f"Unknown mask kind {kind!r}; valid kinds are {self.kinds}.")
        return self.masks[kind]

    def require_prior(self, what: str) -> None:
        """Raise a clear error if the fit has no mask prior (the plain VAE).

        Parameters
        ----------
        what
            The function that needs it, named in the message.

        Returns
        -------
        None.
        """
        if not self.has_prior:
            raise ValueError(
                f"{what} needs the mask's inclusion probabilities p*, but this fit has no mask "
                "prior (mask=None, the plain VAE). Train with mask='ssl', or rank genes by the "
                "gene effects (model.get_gene_effects())."
            )

    def require_multistudy(self, what: str) -> None:
        """Raise a clear error if the fit is single-study.

        Parameters
        ----------
        what
            The function that needs it, named in the message.

        Returns
        -------
        None.
        """
        if not self.is_multistudy:
            raise ValueError(
                f"{what} needs a multi-study model: register the AnnData with "
                "`SparseVAE.setup_anndata(adata, ..., study_key='<obs column>')` and train a "
                "model with n_specific_factors. For a single-study model use "
                "sparsevae.tl.anchor_genes."
            )

    def resolve_factors(
        self, factors: Sequence[str | int] | str | int | None, kind: str | None = None
    ) -> list[str]:
        """Factor names of mask ``kind`` from names or integer positions.

        Parameters
        ----------
        factors
            Names or positions; ``None``: all factors of the mask.
        kind
            Which mask, see :meth:`mask`.

        Returns
        -------
        List of factor names.
        """
        names = self.mask(kind).factors
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
                raise ValueError(f"Unknown factor {f!r}; the factors are {names}.")
        return out

    # ------------------------------------------------------------------ the rules
    def selected(self, kind: str | None, min_pstar: float = DEFAULT_MIN_PSTAR) -> pd.DataFrame:
        """Genes x factors: factor ``k`` selects gene ``j`` when ``p*_jk >= min_pstar``.

        Parameters
        ----------
        kind
            Which mask, see :meth:`mask`.
        min_pstar
            The selection threshold.

        Returns
        -------
        Boolean DataFrame, genes x factors.
        """
        self.require_prior("Selecting genes")
        return is_selected(self.mask(kind).pstar, min_pstar)

    def n_selecting(self, kind: str | None, min_pstar: float) -> pd.Series:
        """Per gene, the factors that select it among those it decodes from, seen from ``kind``.

        Single-study: the factors of the mask. Multi-study, for a study's mask: its specific
        factors plus the shared factors (in that study a gene sees both); for the shared mask:
        the shared factors plus the most specific factors selecting the gene in any one study
        (an anchor of a shared factor must be an anchor in every study).

        Parameters
        ----------
        kind
            Which mask, see :meth:`mask`.
        min_pstar
            The selection threshold.

        Returns
        -------
        Integer Series indexed by gene.
        """
        kind = "shared" if kind is None else str(kind)
        counts = n_selecting({k: self.selected(k, min_pstar) for k in self.kinds}, kind)
        return pd.Series(counts, index=self.mask(kind).W.index)

    def anchors(self, kind: str | None, min_pstar: float) -> pd.DataFrame:
        """Genes x factors: selected by the factor and by no other factor the gene decodes from.

        Parameters
        ----------
        kind
            Which mask, see :meth:`mask`.
        min_pstar
            The selection threshold.

        Returns
        -------
        Boolean DataFrame, genes x factors.
        """
        kind = "shared" if kind is None else str(kind)
        selected = {k: self.selected(k, min_pstar) for k in self.kinds}
        own = selected[kind]
        return pd.DataFrame(anchors(selected, kind), index=own.index, columns=own.columns)

    def factor_status(
        self, kind: str | None, min_pstar: float, eta_min: float | None = None
    ) -> pd.DataFrame:
        """Per factor of mask ``kind``: genes selected, anchors, eta, and whether it is in use.

        A factor *selects nothing* when ``eta < eta_min`` or no gene has ``p* >= min_pstar``;
        it is *switched off* when, in addition, every ``|w| < w_off`` (the decoder does not use
        it), and *in use but unselected* otherwise.

        Parameters
        ----------
        kind
            Which mask, see :meth:`mask`.
        min_pstar
            The selection threshold.
        eta_min
            The ``eta`` below which a factor selects nothing; default :attr:`eta_off`.

        Returns
        -------
        DataFrame with the columns ``factor``, ``n_selected``, ``n_anchors``, ``eta``,
        ``max_abs_w``, ``switched_off``, ``unselected``.
        """
        mask = self.mask(kind)
        names = mask.factors
        eta_min = self.eta_off if eta_min is None else eta_min
        selected = self.selected(kind, min_pstar)
        eta = mask.eta.reindex(names).to_numpy(dtype=float)
        n_selected = selected.sum(axis=0).reindex(names).to_numpy(dtype=int)
        n_anchors = self.anchors(kind, min_pstar).sum(axis=0).reindex(names).to_numpy(dtype=int)
        max_abs_w = mask.W.abs().max(axis=0).reindex(names).to_numpy(dtype=float)
        switched_off, unselected = factor_use(max_abs_w, n_selected, eta, self.w_off, eta_min)
        return pd.DataFrame(
            {
                "factor": names,
                "n_selected": n_selected,
                "n_anchors": n_anchors,
                "eta": eta,
                "max_abs_w": max_abs_w,
                "switched_off": switched_off,
                "unselected": unselected,
            }
        )

    # ------------------------------------------------------------------ per cell
    @property
    def latent(self) -> np.ndarray:
        """The factors of each cell (cells x :attr:`factor_names`)."""
        if "latent" not in self._cache:
            if self._latent is None:
                raise KeyError("These results hold no factors per cell.")
            self._cache["latent"] = np.asarray(self._latent(), dtype=np.float64)
        return self._cache["latent"]

    def latent_rows(self, indices: np.ndarray) -> np.ndarray:
        """The factors of some cells; a model encodes only those cells.

        Parameters
        ----------
        indices
            Positions of the cells.

        Returns
        -------
        Array, cells x :attr:`factor_names`.
        """
        if self.model is not None and "latent" not in self._cache:
            z = self.model.get_latent_representation(self.cells, indices=indices)
            return np.asarray(z, dtype=np.float64)
        return self.latent[indices]

    @property
    def study_codes(self) -> np.ndarray:
        """Each cell's study as a position in :attr:`studies` (multi-study fits)."""
        self.require_multistudy("Study codes")
        if "codes" not in self._cache:
            self._cache["codes"] = self._study_codes()
        return self._cache["codes"]

    def study_effects(
        self, z: np.ndarray | None = None, codes: np.ndarray | None = None
    ) -> np.ndarray | None:
        """How much each shared factor makes each gene vary within each study.

        Parameters
        ----------
        z, codes
            With a model: the factors and the study positions of the cells to measure on
            (default every cell); at most 2000 of them are used.

        Returns
        -------
        Array, shared factors x studies x genes (see
        :meth:`sparsevae.nn.MaskedDecoder.within_study_effects`): computed by the model, or
        stored by ``write_results``; ``None`` when neither is available (results written
        without effects, or by an older version).
        """
        self.require_multistudy("Within-study effects")
        if self.model is None:
            stored = self._study_effects
            expected = (len(self.masks["shared"].factors), len(self.studies), len(self.genes))
            if stored is not None and stored.shape != expected:
                raise ValueError(
                    f"The stored within-study effects have shape {stored.shape}, not {expected} "
                    "(shared factors x studies x genes): the AnnData's genes changed after "
                    "write_results. Write the results again on this AnnData, or pass the model."
                )
            return stored
        if z is None or codes is None:
            codes = self.study_codes
            keep = effect_cells(len(codes))
            z = self.latent_rows(keep)
        else:
            keep = effect_cells(len(codes))
            z = z[keep]
        return within_study_effects(
            self.model.module, z, codes[keep], list(range(len(self.masks["shared"].factors)))
        )

    def effects(self, kind: str | None = None) -> pd.DataFrame:
        """Signed gene effects of the factors of mask ``kind``.

        Parameters
        ----------
        kind
            Which mask, see :meth:`mask`.

        Returns
        -------
        DataFrame, genes x factors: stored by ``write_results`` or computed by the model.
        """
        kind = self.mask(kind).kind
        cache_key = f"effects:{kind}"
        if cache_key not in self._cache:
            value = self._effects(kind) if self._effects is not None else None
            if value is None:
                raise KeyError(
                    "No gene effects are stored for these results: write them with "
                    "`model.write_results(adata, effects=True)` or pass the model."
                )
            self._cache[cache_key] = value
        return self._cache[cache_key]


def _codes_of(obs_column: pd.Series, studies: list[str]) -> np.ndarray:
    return pd.Categorical(obs_column.astype(str), categories=studies).codes.astype(np.int64)


def _from_model(model: SparseVAE, adata: AnnData | None) -> Results:
    has_prior = model.module.prior is not None
    masks = {
        kind: FactorMask(
            kind=kind,
            W=model.get_mask(kind),
            pstar=model.get_inclusion_probabilities(kind) if has_prior else None,
            eta=model.get_eta(kind) if has_prior else None,
        )
        for kind in model.mask_kinds
    }
    cells = model.adata if adata is None else adata
    thresholds = model.module.prior.thresholds() if has_prior else {}

    def study_codes() -> np.ndarray:
        return _codes_of(cells.obs[model.study_key], model.studies)

    def effects(kind: str) -> pd.DataFrame:
        return model.get_gene_effects(adata, kind=kind)

    return Results(
        masks=masks,
        factor_names=list(model.factor_names),
        study_key=model.study_key,
        studies=list(model.studies),
        w_off=thresholds.get("w_off"),
        eta_off=thresholds.get("eta_off"),
        model=model,
        cells=adata,
        _latent=lambda: model.get_latent_representation(adata),
        _study_codes=study_codes,
        _effects=effects,
    )


def _thresholds_from_params(uns: Any, shared: FactorMask) -> dict[str, float]:
    """The prior's thresholds from the stored hyperparameters (results written by 0.1.0)."""
    params = uns.get("params", {})
    if shared.pstar is None or "lambda0" not in params:
        return {}

    def value(name: str, default: float | None) -> float | None:
        v = params.get(name, default)
        return None if v is None or (isinstance(v, str) and v == "None") else float(v)

    n_genes, n_factors = shared.W.shape
    prior = SpikeSlabLasso(
        n_genes,
        n_factors,
        lambda0=value("lambda0", 10.0),
        lambda1=value("lambda1", 1.0),
        a=value("a", 1.0),
        b=value("b", None),
    )
    return prior.thresholds()


def _from_anndata(adata: AnnData, key: str) -> Results:
    if key not in adata.uns or f"X_{key}" not in adata.obsm:
        raise KeyError(
            f"No SparseVAE results under key {key!r} in this AnnData (adata.uns[{key!r}] and "
            f"adata.obsm['X_{key}']): run `model.write_results(adata, key_added={key!r})` first, "
            "or pass the trained model."
        )
    uns = adata.uns[key]
    kinds = [str(k) for k in uns.get("mask_kinds", ["shared"])]
    W_keys = list(uns.get("W_keys", [f"{key}_W"]))
    default_pstar = [f"{key}_pstar"] if f"{key}_pstar" in adata.varm else []
    pstar_keys = list(uns.get("pstar_keys", default_pstar))
    effect_keys = list(
        uns.get("effect_keys", [f"{key}_effect"] if f"{key}_effect" in adata.varm else [])
    )
    shared_names = [str(f) for f in uns.get("shared_factor_names", uns["factor_names"])]
    specific_names = [str(f) for f in uns.get("specific_factor_names", [])]
    if "eta_shared" in uns:
        etas = [np.asarray(uns["eta_shared"]), *np.asarray(uns["eta_specific"])]
    else:
        etas = [np.asarray(uns["eta"])] if "eta" in uns else []
    genes = pd.Index(adata.var_names, name="gene")

    def table(varm_key: str, names: list[str]) -> pd.DataFrame:
        if varm_key not in adata.varm:
            raise KeyError(f"adata.varm[{varm_key!r}] is missing: write the results again.")
        return pd.DataFrame(np.asarray(adata.varm[varm_key]), index=genes, columns=names)

    masks = {}
    for i, kind in enumerate(kinds):
        names = shared_names if i == 0 else specific_names
        masks[kind] = FactorMask(
            kind=kind,
            W=table(W_keys[i], names),
            pstar=table(pstar_keys[i], names) if pstar_keys else None,
            eta=pd.Series(etas[i], index=names, name="eta") if etas else None,
        )
    studies = [str(s) for s in uns.get("studies", [])]
    study_key = uns.get("study_key")
    study_key = None if study_key in (None, "None") else str(study_key)
    thresholds = uns.get("prior") or _thresholds_from_params(uns, masks["shared"])

    def study_codes() -> np.ndarray:
        if study_key not in adata.obs:
            raise KeyError(f"adata.obs[{study_key!r}] (the cells' studies) is missing.")
        return _codes_of(adata.obs[study_key], studies)

    def effects(kind: str) -> pd.DataFrame | None:
        if not effect_keys:
            return None
        i = kinds.index(kind)
        return table(effect_keys[i], shared_names if i == 0 else specific_names)

    return Results(
        masks=masks,
        factor_names=[str(f) for f in uns["factor_names"]],
        study_key=study_key,
        studies=studies,
        w_off=float(thresholds["w_off"]) if "w_off" in thresholds else None,
        eta_off=float(thresholds["eta_off"]) if "eta_off" in thresholds else None,
        _latent=lambda: adata.obsm[f"X_{key}"],
        _study_codes=study_codes,
        _effects=effects,
        _study_effects=(
            np.asarray(uns["study_effects"], dtype=np.float64) if "study_effects" in uns else None
        ),
    )


def read_results(
    data: AnnData | SparseVAE | Results, key: str = DEFAULT_KEY, adata: AnnData | None = None
) -> Results:
    """Read a fit's results from an AnnData that ``write_results`` filled, or from a model.

    Parameters
    ----------
    data
        An AnnData with results under ``key`` (``model.write_results(adata)``, or the output
        of ``sparsevae fit``), or a trained :class:`~sparsevae.SparseVAE`.
    key
        The ``key_added`` the results were written with (AnnData only).
    adata
        Model only: the cells whose factors and studies are used; default the training data.

    Returns
    -------
    The :class:`Results`.
    """
    if isinstance(data, Results):
        return data
    if isinstance(data, SparseVAE):
        return _from_model(data, adata)
    if isinstance(data, AnnData):
        if adata is not None:
            raise ValueError(
                "adata= is for a model; these results are read from the AnnData itself."
            )
        return _from_anndata(data, key)
    raise TypeError(
        "Expected an AnnData with SparseVAE results (model.write_results(adata)) or a trained "
        f"SparseVAE, got {type(data).__name__}."
    )
