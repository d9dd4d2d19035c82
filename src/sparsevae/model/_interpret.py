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
        module = self.module
        likelihood = module.likelihood
        z_all = self.get_latent_representation(adata=adata, indices=indices, batch_size=batch_size)
        z_all = np.asarray(z_all, dtype=np.float32)
        n_cells, n_factors = z_all.shape
        if n_cells == 0:
            raise ValueError("No cells to average over: indices is empty.")
        # Multi-study: each cell is decoded with its own study's mask; the shared factors are
        # averaged over all cells, study s's specific factors over the cells of study s.
        study_codes = self._study_codes(adata, indices)
        factor_idx = list(range(n_factors))
        names = list(self.factor_names)
        s = None  # the study whose specific factors are asked for
        if study_codes is not None:
            s = self._kind_index(kind)
            n_shared = len(self.shared_factor_names)
            if s is None:
                factor_idx = list(range(n_shared))
            else:
                keep = np.flatnonzero(study_codes == s)
                if len(keep) == 0:
                    raise ValueError(f"No cells of study {kind!r} to average over.")
                z_all, study_codes = z_all[keep], study_codes[keep]
                n_cells = len(keep)
                factor_idx = list(range(n_shared, n_factors))
            names = [names[k] for k in factor_idx]
        elif kind not in (None, "shared"):
            raise ValueError(f"Unknown mask kind {kind!r}: this model has only the shared mask.")
        device = next(module.parameters()).device
        decoder = module.decoder
        total = torch.zeros(decoder.n_genes, len(factor_idx), dtype=torch.float64, device=device)
        exp_output = scale == "expression" and likelihood != "gaussian"
        was_training = module.training
        module.eval()
        try:
            for start in range(0, n_cells, batch_size):
                zb = torch.as_tensor(z_all[start : start + batch_size], device=device)
                study_batch = None
                if study_codes is not None:
                    study_batch = torch.as_tensor(study_codes[start : start + batch_size])
                    study_batch = study_batch.to(device)
                shared, specific = decoder.effect_sums(zb, study_batch, exp_output=exp_output)
                total += shared if s is None else specific[s]
        finally:
            module.train(was_training)
        if scale == "expression" and likelihood == "gaussian":
            total *= module.gene_scale.to(total).unsqueeze(1)
        effects = (total / n_cells).cpu().numpy()
        return pd.DataFrame(
            effects,
            index=pd.Index(np.asarray(self.adata.var_names).astype(str), name="gene"),
            columns=names,
        )
