"""Studies and the layout of factors and masks: which factors each mask decodes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from anndata import AnnData

from ..module import STUDY_KEY

__all__ = ["StudiesMixin"]


class StudiesMixin:
    """Studies, mask kinds and factor names of :class:`~sparsevae.SparseVAE`."""

    @property
    def study_key(self) -> str | None:
        """Column of ``adata.obs`` with the studies (``None`` for a single-study model)."""
        return self.adata_manager.registry["setup_args"].get("study_key")

    @property
    def is_multistudy(self) -> bool:
        """Whether the model has study-specific factors and masks."""
        return self.study_key is not None

    @property
    def studies(self) -> list[str]:
        """Names of the studies, as strings, in the order of the specific masks.

        ``[]`` for a single-study model.
        """
        if self.study_key is None:
            return []
        state = self.adata_manager.get_state_registry(STUDY_KEY)
        return [str(c) for c in state.categorical_mapping]

    @property
    def mask_kinds(self) -> list[str]:
        """Valid ``kind`` values of :meth:`get_mask`: ``"shared"`` and, multi-study, each study."""
        return ["shared", *self.studies]

    def _kind_index(self, kind: str | None) -> int | None:
        """``None`` for the shared mask, else the position of study ``kind``."""
        if kind is None or kind == "shared":
            return None
        studies = self.studies
        if not studies:
            raise ValueError(
                f"Unknown mask kind {kind!r}: this single-study model has only the shared mask "
                "(kind=None or 'shared')."
            )
        if str(kind) not in studies:
            raise ValueError(f"Unknown mask kind {kind!r}; valid kinds are {self.mask_kinds}.")
        return studies.index(str(kind))

    def _study_codes(
        self, adata: AnnData | None = None, indices: Sequence[int] | None = None
    ) -> np.ndarray | None:
        """Study index of each cell (``None`` for a single-study model)."""
        if not self.is_multistudy:
            return None
        adata = self._validate_anndata(adata)
        manager = self.get_anndata_manager(adata, required=True)
        codes = np.asarray(manager.get_from_registry(STUDY_KEY)).reshape(-1).astype(np.int64)
        return codes if indices is None else codes[np.asarray(indices)]

    def _study_cell_counts(self) -> np.ndarray:
        """Cells of each study in the registered AnnData, in the order of :attr:`studies`."""
        codes = np.asarray(self.adata_manager.get_from_registry(STUDY_KEY)).reshape(-1)
        return np.bincount(codes.astype(np.int64), minlength=len(self.studies))

    @property
    def factor_names(self) -> list[str]:
        """Names of the factors, in the column order of :meth:`get_latent_representation`.

        Single-study: ``factor_0``, ``factor_1``, .... Multi-study: the shared factors
        ``shared_0``, ..., ``shared_{K-1}`` then the specific factors ``specific_0``, ...,
        ``specific_{K_spec-1}``.
        """
        if not self.is_multistudy:
            return [f"factor_{k}" for k in range(self.module.n_factors)]
        return self.shared_factor_names + self.specific_factor_names

    @property
    def shared_factor_names(self) -> list[str]:
        """Names of the factors decoded through the shared mask (all factors, single-study)."""
        if not self.is_multistudy:
            return self.factor_names
        return [f"shared_{k}" for k in range(self.module.n_factors)]

    @property
    def specific_factor_names(self) -> list[str]:
        """Names of the study-specific factors (``[]`` for a single-study model)."""
        return [f"specific_{k}" for k in range(self.module.n_specific_factors)]

    def kind_factor_names(self, kind: str | None = None) -> list[str]:
        """Names of the factors (columns) of mask ``kind``.

        Parameters
        ----------
        kind
            ``None`` or ``"shared"``: the shared factors; a study name: the specific factors.

        Returns
        -------
        List of factor names.
        """
        if self._kind_index(kind) is None:
            return self.shared_factor_names
        return self.specific_factor_names
