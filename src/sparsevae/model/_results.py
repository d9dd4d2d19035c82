"""Results: factors, masks and inclusion probabilities, and write_results()."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scvi
import torch
from anndata import AnnData

from ..module import ModuleMask
from ._checks import effect_cells, within_study_effects
from ._validate import unsorted_backed_indices

__all__ = ["ResultsMixin"]


class ResultsMixin:
    """Getters and :meth:`write_results` of :class:`~sparsevae.SparseVAE`."""

    @torch.inference_mode()
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        batch_size: int | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Factors of each cell (posterior means by default).

        Parameters
        ----------
        adata
            AnnData with the same genes as the training data; default the training data.
        indices
            Cells to use; default all.
        give_mean
            Return the posterior mean (``True``) or one sample.
        batch_size
            Minibatch size for inference.
        **kwargs
            Passed to :meth:`scvi.model.base.VAEMixin.get_latent_representation`.

        Returns
        -------
        Array of shape ``(n_cells, n_factors)``, columns named by :attr:`factor_names`.
        Multi-study: ``n_factors + n_specific_factors`` columns, the shared factors
        (``shared_k``) then the specific ones (``specific_k``). Specific factor ``specific_k`` of
        a cell from study ``s`` acts through column ``k`` of study ``s``'s mask, so it is a
        different program in each study: compare it within a study, not across studies.
        """
        order = None
        if unsorted_backed_indices(self.adata if adata is None else adata, indices):
            # A backed file is read in increasing row order: ask for the cells sorted, then put
            # the rows back in the order asked.
            order = np.argsort(np.asarray(indices), kind="stable")
            indices = np.asarray(indices)[order]
        z = super().get_latent_representation(
            adata=adata, indices=indices, give_mean=give_mean, batch_size=batch_size, **kwargs
        )
        if order is not None:
            restored = np.empty_like(z)
            restored[order] = z
            z = restored
        if not np.all(np.isfinite(z)):
            raise FloatingPointError(
                "The factors contain NaN or infinite values: the model's parameters are not "
                "finite. Retrain with a lower learning rate."
            )
        return z

    def _genes_by_factors(self, values: torch.Tensor, kind: str | None = None) -> pd.DataFrame:
        return pd.DataFrame(
            values.detach().cpu().numpy(),
            index=pd.Index(self.adata.var_names, name="gene"),
            columns=self.kind_factor_names(kind),
        )

    def get_mask(self, kind: str | None = None) -> pd.DataFrame:
        """The decoder mask ``W`` (genes x factors); all ones for ``mask=None``.

        Parameters
        ----------
        kind
            ``None`` (default) or ``"shared"``: the shared mask (the only mask of a single-study
            model), columns :attr:`shared_factor_names`. A study name (multi-study): that study's
            specific mask, columns :attr:`specific_factor_names`.

        Returns
        -------
        DataFrame indexed by gene with one column per factor.
        """
        return self._genes_by_factors(self._module_mask(kind).W, kind)

    def _module_mask(self, kind: str | None) -> ModuleMask:
        """The module's mask of ``kind`` (the shared mask first, then one per study)."""
        s = self._kind_index(kind)
        return self.module.masks()[0 if s is None else s + 1]

    def _require_prior(self) -> None:
        if self.module.prior is None:
            raise ValueError(
                "This model has no mask prior (mask=None, the plain VAE), so it has no inclusion "
                "probabilities or factor weights. Use mask='ssl'."
            )

    def get_inclusion_probabilities(self, kind: str | None = None) -> pd.DataFrame:
        """Posterior inclusion probabilities ``p*`` of the mask entries (genes x factors).

        Parameters
        ----------
        kind
            Which mask: ``None``/``"shared"`` or a study name, see :meth:`get_mask`.

        Returns
        -------
        DataFrame indexed by gene with one column per factor, values in ``[0, 1]``.
        """
        self._require_prior()
        return self._genes_by_factors(self._module_mask(kind).p_star, kind)

    def get_eta(self, kind: str | None = None) -> pd.Series:
        """Each factor's prior inclusion weight ``eta_k`` (the expected share of genes it selects).

        Parameters
        ----------
        kind
            Which mask: ``None``/``"shared"`` or a study name, see :meth:`get_mask`.

        Returns
        -------
        Series indexed by factor name.
        """
        self._require_prior()
        eta = self._module_mask(kind).eta
        names = self.kind_factor_names(kind)
        return pd.Series(eta.detach().cpu().numpy(), index=names, name="eta")

    def get_latent_correlation(self) -> pd.DataFrame:
        """The factors' prior correlation matrix ``R`` (``z ~ N(0, R)``).

        Learned with the module keyword ``latent_prior="correlated"``
        (``SparseVAE(adata, latent_prior="correlated")``); the identity with the default
        ``latent_prior="normal"``. Multi-study models: over the shared then the specific factors.

        Returns
        -------
        DataFrame (factors x factors) indexed by factor name.
        """
        with torch.no_grad():
            L = self.module.latent_scale_tril()
            R = (L @ L.T).cpu().numpy()
        names = list(self.factor_names)
        return pd.DataFrame(R, index=names, columns=names)

    def write_results(
        self,
        adata: AnnData | None = None,
        key_added: str = "sparsevae",
        overwrite: bool = False,
        effects: bool = True,
        batch_size: int | None = None,
    ) -> AnnData:
        """Write factors, mask, inclusion probabilities and settings into an AnnData.

        Writes ``obsm[f"X_{key_added}"]`` (factors), ``varm[f"{key_added}_W"]`` (mask),
        ``varm[f"{key_added}_pstar"]`` (inclusion probabilities; not for ``mask=None``),
        ``varm[f"{key_added}_effect"]`` (signed gene effects, see :meth:`get_gene_effects`; with
        ``effects=True``) and ``uns[key_added]`` (``eta``, factor names, the layout
        ``mask_kinds``, ``W_keys``, ``pstar_keys``, ``effect_keys``, the prior's thresholds
        ``prior`` and the settings ``params``: the model's options and the module's scalar
        ones, such as ``spike_gate`` and ``prior_cells``). :mod:`sparsevae.tl` and
        :mod:`sparsevae.pl` read them back.

        Multi-study models write, instead of the single mask: ``varm[f"{key_added}_W_shared"]``,
        ``varm[f"{key_added}_pstar_shared"]``, ``varm[f"{key_added}_effect_shared"]`` and, for
        each study, ``varm[f"{key_added}_W_{study}"]``, ``varm[f"{key_added}_pstar_{study}"]`` and
        ``varm[f"{key_added}_effect_{study}"]`` (a ``/`` in a study name becomes ``_``; effects
        of a study without cells in ``adata`` are NaN). ``obsm[f"X_{key_added}"]`` holds the
        shared then the specific factors, and ``uns[key_added]`` records the layout:
        ``factor_names``, ``shared_factor_names``, ``specific_factor_names``, ``study_key``,
        ``studies``, ``mask_kinds`` (``["shared", *studies]``), ``W_keys``, ``pstar_keys`` and
        ``effect_keys`` (the varm keys in the order of ``mask_kinds``), ``eta_shared`` and
        ``eta_specific`` (studies x specific factors); with ``effects=True``, also
        ``study_effects`` (shared factors x studies x genes: how much each shared factor makes
        each gene vary within each study, on at most 2000 cells, NaN for a study without cells),
        from which :func:`~sparsevae.tl.check_shared_specific` runs its gene-level check without
        the model.

        Models with ``latent_prior="mixture"`` also write each cell's most probable cluster to
        ``obs[f"{key_added}_cluster"]`` (categorical) and its cluster probabilities
        (:meth:`get_cluster_probabilities`) to ``obsm[f"{key_added}_cluster_probabilities"]``;
        ``uns[key_added]["mixture_weights"]`` holds the mixture's weights.

        Parameters
        ----------
        adata
            AnnData with the same genes as the training data; default the training data.
        key_added
            Base name of the keys.
        overwrite
            Replace existing keys; by default an existing key raises an error and nothing is
            written.
        effects
            Also compute and write the signed gene effects (a forward and a backward pass of
            the decoder over the cells; set ``False`` to skip it on large data).
        batch_size
            Cells processed at once; default ``scvi.settings.batch_size``. Memory is bounded by
            it, not by the number of cells: raise it on a GPU, lower it if memory runs short.

        Returns
        -------
        The AnnData written to.
        """
        adata = self.adata if adata is None else adata
        self._check_var_names(adata.var_names)
        kinds = self.mask_kinds
        has_prior = self.module.prior is not None
        # Single-study: f"{key}_W"; multi-study: one key per mask, f"{key}_W_{kind}".
        suffix = [f"_{k.replace('/', '_')}" for k in kinds] if self.is_multistudy else [""]
        W_keys = [f"{key_added}_W{x}" for x in suffix]
        pstar_keys = [f"{key_added}_pstar{x}" for x in suffix] if has_prior else []
        effect_keys = [f"{key_added}_effect{x}" for x in suffix] if effects else []
        mixture = self.module.latent_prior == "mixture"
        keys = {
            "obsm": [f"X_{key_added}"]
            + ([f"{key_added}_cluster_probabilities"] if mixture else []),
            "varm": W_keys + pstar_keys + effect_keys,
            "uns": [key_added],
            "obs": [f"{key_added}_cluster"] if mixture else [],
        }
        if len(set(keys["varm"])) < len(keys["varm"]):
            raise ValueError(
                f"Study names {self.studies} give clashing keys once '/' is replaced by '_'."
            )
        if not overwrite:
            _check_no_clash(adata, keys)
        # Compute everything first, so that a failure writes nothing.
        z = self.get_latent_representation(adata, batch_size=batch_size)
        effect_values = []
        if effects:
            tables = self._gene_effect_tables(
                z, self._study_codes(adata), "expression", batch_size or scvi.settings.batch_size
            )
            effect_values = [tables[kind].to_numpy() for kind in kinds]
        study_effects = None
        if effects and has_prior and self.is_multistudy:
            keep = effect_cells(adata.n_obs)
            study_effects = within_study_effects(
                self.module,
                z[keep],
                self._study_codes(adata)[keep],
                list(range(self.module.n_factors)),
            )
        probs = self.get_cluster_probabilities(adata, batch_size=batch_size) if mixture else None
        adata.obsm[f"X_{key_added}"] = z
        if probs is not None:
            adata.obsm[f"{key_added}_cluster_probabilities"] = probs.to_numpy()
            labels = np.asarray(probs.columns)[probs.to_numpy().argmax(1)]
            adata.obs[f"{key_added}_cluster"] = pd.Categorical(labels, categories=probs.columns)
        for kind, key in zip(kinds, W_keys, strict=True):
            adata.varm[key] = self.get_mask(kind).to_numpy()
        for kind, key in zip(kinds, pstar_keys, strict=False):  # none without a prior
            adata.varm[key] = self.get_inclusion_probabilities(kind).to_numpy()
        for value, key in zip(effect_values, effect_keys, strict=True):
            adata.varm[key] = value
        uns: dict[str, Any] = {
            "factor_names": self.factor_names,
            "mask_kinds": kinds,
            "W_keys": W_keys,
            "pstar_keys": pstar_keys,
            "effect_keys": effect_keys,
            "params": {
                k: (v if v is not None else "None")
                for k, v in self.init_params_["non_kwargs"].items()
            },
            "likelihood": self.likelihood,
        }
        uns["params"]["likelihood"] = self.likelihood
        # The module's options that decide the masks (spike_gate, prior_cells, ...): scalars only.
        for k, v in self.init_params_["kwargs"].get("module_kwargs", {}).items():
            if v is None or isinstance(v, bool | int | float | str):
                uns["params"][k] = v if v is not None else "None"
        if self.is_multistudy:
            uns["shared_factor_names"] = self.shared_factor_names
            uns["specific_factor_names"] = self.specific_factor_names
            uns["study_key"] = self.study_key
            uns["studies"] = self.studies
        if mixture:
            uns["mixture_weights"] = self.get_mixture_weights().to_numpy()
        if has_prior:
            uns["prior"] = self.module.prior.thresholds()
            if self.is_multistudy:
                uns["eta_shared"] = self.get_eta("shared").to_numpy()
                uns["eta_specific"] = np.stack([self.get_eta(s).to_numpy() for s in self.studies])
                if study_effects is not None:
                    uns["study_effects"] = study_effects
            else:
                uns["eta"] = self.get_eta().to_numpy()
        adata.uns[key_added] = uns
        return adata


def _check_no_clash(adata: AnnData, keys: dict[str, list[str]]) -> None:
    clash = [
        f"adata.{attr}[{k!r}]" for attr, ks in keys.items() for k in ks if k in getattr(adata, attr)
    ]
    if clash:
        raise KeyError(
            f"{', '.join(clash)} already exist. Pass overwrite=True to replace them or "
            "choose another key_added."
        )
