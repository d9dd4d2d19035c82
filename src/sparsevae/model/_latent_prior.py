"""The factors' prior: the auxiliary variable of the conditional prior, the mixture's clusters."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from ..module import AUXILIARY_KEY

__all__ = ["LatentPriorMixin"]


class LatentPriorMixin:
    """Conditional (iVAE) and mixture (GMVAE) priors of :class:`~sparsevae.SparseVAE`."""

    @property
    def auxiliary_key(self) -> str | None:
        """Column of ``adata.obs`` with the conditional prior's ``u`` (``None``: not registered)."""
        return self.adata_manager.registry["setup_args"].get("auxiliary_key")

    @property
    def auxiliary_categories(self) -> list[str] | None:
        """Categories of a categorical ``u``, as strings (``None``: continuous or no ``u``)."""
        if self.auxiliary_key is None:
            return None
        state = self.adata_manager.get_state_registry(AUXILIARY_KEY)
        mapping = state.get("categorical_mapping")
        return None if mapping is None else [str(c) for c in mapping]

    def _require_mixture(self, what: str) -> None:
        if self.module.latent_prior != "mixture":
            raise ValueError(
                f"{what} needs a model with latent_prior='mixture' (this one has "
                f"{self.module.latent_prior!r}). Create it with "
                "`SparseVAE(adata, latent_prior='mixture', n_components=...)`."
            )
        if not self.is_trained_:
            raise RuntimeError(f"{what} needs a trained model; call model.train() first.")

    @torch.inference_mode()
    def get_cluster_probabilities(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> pd.DataFrame:
        """Each cell's cluster probabilities under the mixture prior, ``p(c | z)``.

        Computed in closed form from the mixture's weights and components at each cell's
        posterior mean: ``p(c | z) = pi_c N(z; mu_c, sigma_c^2) / sum_c' pi_c' N(z; mu_c',
        sigma_c'^2)``.

        Parameters
        ----------
        adata
            AnnData with the model's genes; default the training data.
        indices
            Cells to use; default all.
        batch_size
            Minibatch size for inference.

        Returns
        -------
        DataFrame, cells x components (``cluster_0``, ...), rows summing to 1.

        Examples
        --------
        >>> probs = model.get_cluster_probabilities()
        >>> adata.obs["cluster"] = probs.to_numpy().argmax(1).astype(str)
        """
        self._require_mixture("get_cluster_probabilities")
        z = self.get_latent_representation(adata=adata, indices=indices, batch_size=batch_size)
        prior = self.module.mixture_prior
        device = prior.prior_means.device
        parts = []
        for start in range(0, len(z), 4096):
            zb = torch.as_tensor(z[start : start + 4096], device=device)
            parts.append(prior.responsibilities(zb).cpu().numpy())
        probs = np.concatenate(parts) if parts else np.zeros((0, prior.n_components))
        obs_names = (self.adata if adata is None else adata).obs_names
        if indices is not None:
            obs_names = obs_names[np.asarray(indices)]
        return pd.DataFrame(
            probs,
            index=obs_names,
            columns=[f"cluster_{c}" for c in range(prior.n_components)],
        )

    def get_mixture_weights(self) -> pd.Series:
        """The mixture prior's learned weights ``pi`` (one per component).

        Returns
        -------
        Series indexed by component (``cluster_0``, ...), summing to 1.
        """
        self._require_mixture("get_mixture_weights")
        with torch.no_grad():
            pi = self.module.mixture_prior.weights().cpu().numpy()
        return pd.Series(pi, index=[f"cluster_{c}" for c in range(len(pi))], name="weight")

    def _mixture_stats(self, max_cells: int = 20000) -> dict[str, float]:
        """Components holding cells, the largest one's share, and the re-seedings so far."""
        n = self.adata.n_obs
        idx = None
        if n > max_cells:
            idx = np.sort(np.random.default_rng(0).choice(n, size=max_cells, replace=False))
        probs = self.get_cluster_probabilities(indices=idx).to_numpy()
        counts = np.bincount(probs.argmax(1), minlength=probs.shape[1])
        return {
            "n_components": probs.shape[1],
            "n_holding": int((counts > 0).sum()),
            "largest_share": float(counts.max() / max(counts.sum(), 1)),
            "reseeded": int(self.module.mixture_prior.n_reseeded),
        }
