"""Interpretability of a trained SparseVAE: how much each gene responds to each factor."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["InterpretabilityMixin"]

EffectScale = Literal["expression", "link"]


class InterpretabilityMixin:
    """Interpretability methods for :class:`~sparsevae.SparseVAE` (gene effects of factors)."""

    def get_gene_effects(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int = 1024,
        scale: EffectScale = "expression",
        kind: str | None = None,
    ) -> pd.DataFrame:
        """Average effect of each factor on each gene: ``mean_i d E[x_ij] / d z_ik``.

        The derivative of the decoder's expected expression of gene ``j`` with respect to factor
        ``k`` is evaluated at each cell's posterior mean ``z_i`` and averaged over cells. The
        mask enters through the decoder, so a gene that a factor does not select usually has a
        small effect on that factor (not always zero: an entry with ``p* < 0.5`` can keep a
        modest ``|w|``); unlike ``W`` the effect is signed and in data units. It is
        computed exactly with forward-mode automatic differentiation, one pass per factor and
        batch of cells (no loop over genes).

        Parameters
        ----------
        adata
            AnnData with the model's genes; default the training data.
        indices
            Cells to average over; default all.
        batch_size
            Cells decoded at once.
        scale
            ``"expression"`` (default): the expected expression. For the Gaussian likelihood this
            is the mean in data units, ``gene_loc_j + gene_scale_j f_j(z)``. For count likelihoods
            (``"nb"``, ``"zinb"``, ``"poisson"``) it is the expected **normalised** expression per
            unit library size, ``exp(f_j(z))`` (the mean of cell ``i`` is this times its library
            size ``l_i``; for ``"zinb"`` it is the negative binomial mean, before zero inflation).
            ``"link"``: the decoder's linear predictor ``f_j(z)`` itself: the log expected
            expression for counts (effects are log fold changes per unit of ``z_k``), the
            standardised mean (per gene standard deviation) for Gaussian data. ``"link"`` is
            scale-free across genes, which suits ranking genes.
        kind
            Multi-study models: ``None``/``"shared"`` (default) gives the effects of the shared
            factors, averaged over all cells (each decoded through its own study's mask); a study
            name gives the effects of the specific factors in that study, averaged over its
            cells. Single-study models accept only ``None``/``"shared"`` (all factors).

        Returns
        -------
        DataFrame indexed by gene with one column per factor.

        Examples
        --------
        >>> effects = model.get_gene_effects()
        >>> effects["factor_0"].sort_values().tail(10)  # genes that factor_0 turns up most
        """
        if scale not in ("expression", "link"):
            raise ValueError(f"scale must be 'expression' or 'link', got {scale!r}.")
        if not isinstance(batch_size, int | np.integer) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        s = self._kind_index(kind) if self.is_multistudy else None
        if not self.is_multistudy and kind not in (None, "shared"):
            raise ValueError(f"Unknown mask kind {kind!r}: this model has only the shared mask.")
        z = self.get_latent_representation(adata=adata, indices=indices, batch_size=batch_size)
        if len(z) == 0:
            raise ValueError("No cells to average over: indices is empty.")
        tables = self._gene_effect_tables(z, self._study_codes(adata, indices), scale, batch_size)
        table = tables["shared" if s is None else self.studies[s]]
        if table.isna().all().all():
            raise ValueError(f"No cells of study {kind!r} to average over.")
        return table

    def _gene_effect_tables(
        self,
        z: np.ndarray,
        study_codes: np.ndarray | None,
        scale: EffectScale,
        batch_size: int,
    ) -> dict[str, pd.DataFrame]:
        """Gene effects of every mask (``"shared"``, then each study) from the cells' factors.

        One pass over the cells in batches (:meth:`~sparsevae.nn.MaskedDecoder.effect_sums`
        gives all masks at once). Shared factors are averaged over all cells, study ``s``'s
        specific factors over its cells (NaN for a study without cells).
        """
        module = self.module
        decoder = module.decoder
        device = next(module.parameters()).device
        z = np.asarray(z, dtype=np.float32)
        exp_output = scale == "expression" and module.likelihood != "gaussian"
        shared = torch.zeros(decoder.n_genes, decoder.n_factors, dtype=torch.float64)
        specific = None
        was_training = module.training
        module.eval()
        try:
            for start in range(0, len(z), batch_size):
                zb = torch.as_tensor(z[start : start + batch_size], device=device)
                study = None
                if study_codes is not None:
                    study = torch.as_tensor(study_codes[start : start + batch_size], device=device)
                sh, sp = decoder.effect_sums(zb, study, exp_output=exp_output)
                shared += sh.cpu()
                if sp is not None:
                    specific = sp.cpu() if specific is None else specific + sp.cpu()
        finally:
            module.train(was_training)
        scale_by = None
        if scale == "expression" and module.likelihood == "gaussian":
            scale_by = module.gene_scale.detach().cpu().double().unsqueeze(1)
        genes = pd.Index(np.asarray(self.adata.var_names).astype(str), name="gene")

        def table(total: torch.Tensor, n: int, names: list[str]) -> pd.DataFrame:
            if scale_by is not None:
                total = total * scale_by
            values = total.numpy() / n if n else np.full(tuple(total.shape), np.nan)
            return pd.DataFrame(values, index=genes, columns=names)

        tables = {"shared": table(shared, len(z), list(self.shared_factor_names))}
        if specific is not None and study_codes is not None:
            counts = np.bincount(study_codes, minlength=len(self.studies))
            for i, study_name in enumerate(self.studies):
                tables[study_name] = table(
                    specific[i], int(counts[i]), list(self.specific_factor_names)
                )
        return tables
