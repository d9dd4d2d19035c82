"""Masked decoder: one shared network evaluated for every gene on its own masked factors."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["MaskedDecoder"]


class MaskedDecoder(nn.Module):
    r"""Per-gene masked decoder of the Sparse VAE.

    Gene ``j`` of cell ``i`` is decoded as ``head_j(f(w_j * z_i))``: ``f`` is one network shared by
    all genes (``n_factors -> n_hidden -> ... -> n_hidden``, ReLU), ``w_j`` is row ``j`` of the mask
    ``W`` (genes x factors) and ``head_j`` is a per-gene linear map ``n_hidden -> n_output``.

    All genes are computed in one batched computation laid out as ``(genes, cells, hidden)``;
    genes are processed in chunks so that the temporary activations stay below
    ``max_chunk_elements`` floats. The first layer is folded with the mask
    (``W_1 (w_j * z) = (W_1 diag(w_j)) z``), so the ``(genes, cells, factors)`` masked input is
    never materialised.

    **Multi-study** (``n_specific > 0``): the input is ``z = [z_shared, z_specific]`` and gene
    ``j`` of a cell from study ``s`` sees ``[w_j * z_shared, v_sj * z_specific]``, where ``W``
    (genes x ``n_factors``) is the shared mask and ``V`` (``n_studies`` x genes x ``n_specific``)
    holds one specific mask per study. The first layer splits into the shared part, folded as
    above, and the specific part ``W_1^spec (v_sj * z_specific)``, for which each cell's mask rows
    are gathered by its study index (``V[study, genes]``, shape ``(cells, genes, n_specific)``)
    and multiplied into its specific factors; one matrix product with ``W_1^spec`` then adds it
    to the first layer's pre-activation. No loop over studies, and the extra memory is
    ``cells x genes x n_specific`` per chunk (small: ``n_specific`` is much less than the hidden
    width).

    Parameters
    ----------
    n_genes
        Number of genes (output features).
    n_factors
        Number of latent factors.
    n_hidden
        Width of the shared network's hidden layers.
    n_layers
        Number of hidden layers of the shared network (the paper uses 2).
    n_output
        Outputs per gene (1 for a mean; 2 for a mean and a zero-inflation logit).
    learn_mask
        If ``False``, ``W`` is a fixed buffer of ones (the plain VAE baseline).
    max_chunk_elements
        Upper bound on the elements of one chunk's ``(genes, cells, hidden)`` activation. Small
        chunks (about 4 MB) keep the working set in cache, the fastest on CPU.
    max_saved_elements
        When gradients are needed and the activations of a whole minibatch would exceed this many
        elements, each chunk is recomputed in the backward pass (activation checkpointing) instead
        of being stored, so memory stays bounded for thousands of genes.
    n_specific
        Number of study-specific factors (0: the single-study model).
    n_studies
        Number of studies (one specific mask each); used when ``n_specific > 0``.
    specific_init
        Scale of the specific masks' initial values relative to the shared mask's (which start
        near 0.5-0.6). Below 1, the shared factors take up the structure common to all studies
        first, which breaks the symmetry between a shared factor and the specific factors:
        otherwise a shared program can end up copied into every study's specific mask while a
        shared factor carries the studies' specific programs (gated by the specific inputs).
        Too small (0.2) starves the specific masks (user guide, "Why the defaults are what they
        are").
    normalize_shared
        If ``True`` (default), the shared network's weights have a fixed scale: each column of the
        first layer (one per factor) and each row of the hidden layers has unit Euclidean norm
        (weight normalisation without a gain). This pins the scale of ``W``: otherwise column
        ``k`` of ``W`` can shrink by any factor while column ``k`` of the first layer grows by the
        same factor, leaving the decoder unchanged, and the sparsity prior on ``W`` would push
        every factor off. With it, the only remaining rescaling (all of ``W`` and the shared
        biases against all per-gene heads) is balanced gene for gene by the Gaussian prior on the
        heads, so the scale of ``|w_jk|`` does not depend on the number of genes.
    """

    def __init__(
        self,
        n_genes: int,
        n_factors: int,
        n_hidden: int = 100,
        n_layers: int = 2,
        n_output: int = 1,
        learn_mask: bool = True,
        max_chunk_elements: int = 2**20,
        max_saved_elements: int = 2**28,
        normalize_shared: bool = True,
        n_specific: int = 0,
        n_studies: int = 1,
        specific_init: float = 0.5,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}.")
        if n_specific < 0 or n_studies < 1:
            raise ValueError(
                f"n_specific must be >= 0 and n_studies >= 1, got {n_specific} and {n_studies}."
            )
        self.n_genes = n_genes
        self.n_factors = n_factors
        self.n_hidden = n_hidden
        self.n_layers = n_layers
        self.n_output = n_output
        self.learn_mask = learn_mask
        self.max_chunk_elements = int(max_chunk_elements)
        self.max_saved_elements = int(max_saved_elements)
        self.normalize_shared = bool(normalize_shared)

        if learn_mask:
            # Start every gene connected to every factor, with some spread so that the prior's EM
            # step has something to separate.
            self.W = nn.Parameter(0.5 + 0.1 * torch.rand(n_genes, n_factors))
        else:
            self.register_buffer("W", torch.ones(n_genes, n_factors))
        self.n_specific = int(n_specific)
        self.n_studies = int(n_studies)
        if self.n_specific:
            shape = (self.n_studies, n_genes, self.n_specific)
            if learn_mask:
                init = specific_init * (0.5 + 0.1 * torch.rand(*shape))
                self.W_specific = nn.Parameter(init)
            else:
                self.register_buffer("W_specific", torch.ones(*shape))
        if learn_mask:
            # Hard gates on the mask (1: the entry reaches the network, 0: it does not). All
            # open at the start; the module closes the entries its prior puts in the spike.
            self.register_buffer("gate", torch.ones(n_genes, n_factors))
            # Shared-mask entries handed to a study's specific mask during training (0): kept at
            # zero, without gradient, so the shared factor cannot take the genes back. Not
            # saved: it only constrains the training that made the hand-over.
            self.register_buffer("shared_keep", torch.ones(n_genes, n_factors), persistent=False)
            if self.n_specific:
                self.register_buffer("gate_specific", torch.ones(*shape))

        self.first = nn.Linear(n_factors + self.n_specific, n_hidden)
        self.hidden = nn.ModuleList([nn.Linear(n_hidden, n_hidden) for _ in range(n_layers - 1)])
        if self.normalize_shared:
            # With unit-norm weights the signal of a unit w_jk reaching a hidden unit is about
            # 1/sqrt(n_hidden); start the shared biases at zero so they do not drown it.
            with torch.no_grad():
                self.first.bias.zero_()
                for layer in self.hidden:
                    layer.bias.zero_()
        bound = 1.0 / math.sqrt(n_hidden)
        self.head_weight = nn.Parameter(
            torch.empty(n_genes, n_hidden, n_output).uniform_(-bound, bound)
        )
        self.head_bias = nn.Parameter(torch.zeros(n_genes, n_output))

    def weight_sq_norm(self) -> torch.Tensor:
        """Sum of squares of the free-scale weights (no biases, no mask).

        With ``normalize_shared`` these are the per-gene heads only (the shared layers have a fixed
        norm); otherwise the shared layers' weights are included too.

        Returns
        -------
        Scalar tensor.
        """
        total = self.head_weight.pow(2).sum()
        if not self.normalize_shared:
            total = total + self.first.weight.pow(2).sum()
            for layer in self.hidden:
                total = total + layer.weight.pow(2).sum()
        return total

    def shared_weights(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Effective weights of the shared network.

        Returns
        -------
        The first layer's weight ``(n_hidden, n_factors)`` and the hidden layers' weights
        ``(n_hidden, n_hidden)``, normalised when ``normalize_shared`` is set.
        """
        first = self.first.weight
        hidden = [layer.weight for layer in self.hidden]
        if self.normalize_shared:
            first = first / first.norm(dim=0, keepdim=True).clamp_min(1e-12)
            hidden = [w / w.norm(dim=1, keepdim=True).clamp_min(1e-12) for w in hidden]
        return first, hidden

    def gated_masks(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The masks as the network uses them: ``W`` (and ``W_specific``) times their gates.

        A closed gate makes its entry exactly zero in the forward pass. Its gradient passes
        straight through (as if the gate were open), so the likelihood can still pull a closed
        entry back out of the spike.

        Returns
        -------
        The shared mask ``(n_genes, n_factors)`` and the specific masks (``None`` without
        study-specific factors).
        """
        W = self.W
        V = self.W_specific if self.n_specific else None
        if not self.learn_mask:
            return W, V
        W = _straight_through(W, self.gate) * self.shared_keep
        if V is not None:
            V = _straight_through(V, self.gate_specific)
        return W, V

    def chunk_size(self, n_cells: int) -> int:
        """Number of genes evaluated at once for a minibatch of ``n_cells`` cells."""
        per_gene = max(1, n_cells * self.n_hidden)
        return int(max(1, min(self.n_genes, self.max_chunk_elements // per_gene)))

    @property
    def n_latent(self) -> int:
        """Width of the decoder's input: shared plus specific factors."""
        return self.n_factors + self.n_specific

    def _check_study(self, z: torch.Tensor, study: torch.Tensor | None) -> torch.Tensor | None:
        if not self.n_specific:
            return None
        if study is None:
            raise ValueError("A multi-study decoder needs each cell's study index (`study=`).")
        study = study.reshape(-1).long()
        if study.shape[0] != z.shape[0]:
            raise ValueError(f"Got {study.shape[0]} study indices for {z.shape[0]} cells.")
        return study

    def forward(
        self, z: torch.Tensor, genes: slice | None = None, study: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Decode factors into per-gene outputs.

        Parameters
        ----------
        z
            Factors, shape ``(n_cells, n_factors + n_specific)``.
        genes
            Optional slice of genes to decode (default: all genes).
        study
            Multi-study only: each cell's study index, shape ``(n_cells,)`` or ``(n_cells, 1)``.

        Returns
        -------
        Tensor of shape ``(n_cells, n_genes, n_output)`` (genes restricted to ``genes``).
        """
        start, stop = (0, self.n_genes) if genes is None else (genes.start or 0, genes.stop)
        step = self.chunk_size(z.shape[0])
        saved = z.shape[0] * (stop - start) * self.n_hidden * self.n_layers
        recompute = torch.is_grad_enabled() and saved > self.max_saved_elements
        first, hidden = self.shared_weights()
        masks = self.gated_masks()
        study = self._check_study(z, study)
        outs = []
        for g0 in range(start, stop, step):
            block = slice(g0, min(g0 + step, stop))
            if recompute:
                outs.append(
                    checkpoint(
                        self._decode_block,
                        z,
                        block,
                        first,
                        hidden,
                        masks,
                        study,
                        use_reentrant=False,
                    )
                )
            else:
                outs.append(self._decode_block(z, block, first, hidden, masks, study))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
        return out.permute(1, 0, 2)

    def _decode_block(
        self,
        z: torch.Tensor,
        genes: slice,
        first: torch.Tensor,
        hidden: list[torch.Tensor],
        masks: tuple[torch.Tensor, torch.Tensor | None],
        study: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decode a block of genes; returns ``(n_block_genes, n_cells, n_output)``."""
        pre = self._first_layer(z, genes, first, masks, study)
        return self._after_first_layer(pre, genes, hidden)

    def _first_layer(
        self,
        z: torch.Tensor,
        genes: slice,
        first: torch.Tensor,
        masks: tuple[torch.Tensor, torch.Tensor | None],
        study: torch.Tensor | None,
    ) -> torch.Tensor:
        """The first layer's pre-activation (without bias) of a block of genes, ``(g, B, H)``."""
        W, V = masks
        w = W[genes]  # (g, K)
        g = w.shape[0]
        K = self.n_factors
        z_shared, first_shared = (z[:, :K], first[:, :K]) if self.n_specific else (z, first)
        # First layer with the mask folded in: A_j = W1 diag(w_j), shape (g, H, K).
        a = first_shared.unsqueeze(0) * w.unsqueeze(1)
        h = F.linear(z_shared, a.reshape(g * self.n_hidden, K))  # (B, g*H)
        if self.n_specific:
            # Each cell's specific mask rows, gathered by study: (B, g, K_spec); their masked
            # specific factors go through the first layer's specific columns, and the product
            # is accumulated into h inside the matrix product (addmm).
            u = V[study, genes] * z[:, K:].unsqueeze(1)
            h = torch.addmm(
                h.view(-1, self.n_hidden), u.reshape(-1, self.n_specific), first[:, K:].t()
            )
        return h.view(z.shape[0], g, self.n_hidden).transpose(0, 1)  # (g, B, H) view

    def _after_first_layer(
        self, pre: torch.Tensor, genes: slice, hidden: list[torch.Tensor]
    ) -> torch.Tensor:
        """From the first layer's pre-activation ``(g, B, H)`` to the outputs ``(g, B, O)``."""
        h = torch.relu(pre + self.first.bias).contiguous()
        for layer, weight in zip(self.hidden, hidden, strict=True):
            h = torch.relu(F.linear(h, weight, layer.bias))
        # Per-gene head: (g, B, H) @ (g, H, O) + (g, 1, O)
        return torch.baddbmm(self.head_bias[genes].unsqueeze(1), h, self.head_weight[genes])

    def effect_sums(
        self,
        z: torch.Tensor,
        study: torch.Tensor | None = None,
        exp_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sums over cells of the derivatives of the first output with respect to each factor.

        Gene ``j`` depends on ``z`` only through its first layer's pre-activation
        ``a_ij = W_1 (w_j * z_i)``, and ``a_ij`` reaches no other gene. So one backward pass
        from all outputs gives ``d out_ij / d a_ij`` for every gene and cell at once, and the
        chain rule through the (linear) first layer gives every factor's derivative:
        ``d out_ij / d z_ik = w_jk (d out_ij / d a_ij) . W_1[:, k]``. The cost is one forward and
        one backward pass per block of genes, whatever the number of factors.

        Parameters
        ----------
        z
            Factors, shape ``(n_cells, n_factors + n_specific)``.
        study
            Multi-study only: each cell's study index.
        exp_output
            Differentiate ``exp(out_ij)`` instead of ``out_ij`` (counts: the expected normalised
            expression instead of its log).

        Returns
        -------
        The sums over cells for the shared factors, ``(n_genes, n_factors)``, and, with
        study-specific factors, per study over that study's cells, ``(n_studies, n_genes,
        n_specific)`` (else ``None``).
        """
        study = self._check_study(z, study)
        K = self.n_factors
        shared = torch.zeros(self.n_genes, K, dtype=torch.float64, device=z.device)
        specific = None
        if self.n_specific:
            specific = torch.zeros(
                self.n_studies, self.n_genes, self.n_specific, dtype=torch.float64,
                device=z.device,
            )  # fmt: skip
        with torch.no_grad():
            first, hidden = self.shared_weights()
            W, V = self.gated_masks()
        with torch.inference_mode(False):
            z = z.detach().clone()  # usable by autograd even if made under inference mode
            self._accumulate_effects(z, study, first, hidden, (W, V), exp_output, shared, specific)
        return shared, specific

    def _accumulate_effects(
        self,
        z: torch.Tensor,
        study: torch.Tensor | None,
        first: torch.Tensor,
        hidden: list[torch.Tensor],
        masks: tuple[torch.Tensor, torch.Tensor | None],
        exp_output: bool,
        shared: torch.Tensor,
        specific: torch.Tensor | None,
    ) -> None:
        """Add each gene block's effect sums to ``shared`` and ``specific`` (see effect_sums)."""
        W, V = masks
        K = self.n_factors
        onehot = None if specific is None else F.one_hot(study, self.n_studies).to(z.dtype)
        step = self.chunk_size(z.shape[0])
        for g0 in range(0, self.n_genes, step):
            block = slice(g0, min(g0 + step, self.n_genes))
            with torch.enable_grad():
                with torch.no_grad():
                    pre = self._first_layer(z, block, first, (W, V), study)
                pre = pre.detach().requires_grad_(True)
                out = self._after_first_layer(pre, block, hidden)[..., 0]  # (g, B)
                weight = torch.exp(out.detach()) if exp_output else torch.ones_like(out)
                (grad_pre,) = torch.autograd.grad(out, pre, weight)  # (g, B, H)
            with torch.no_grad():
                summed = grad_pre.sum(1)  # (g, H): the shared factors' effects are linear in it
                shared[block] += ((summed @ first[:, :K]) * W[block]).double()
                if specific is not None:
                    per_study = torch.einsum("gbh,bs->sgh", grad_pre, onehot)  # (S, g, H)
                    specific[:, block] += ((per_study @ first[:, K:]) * V[:, block]).double()
        return shared, specific

    @torch.no_grad()
    def within_study_effects(
        self, z: torch.Tensor, study: torch.Tensor, factors: list[int]
    ) -> torch.Tensor:
        """How much each factor makes each gene vary within each study.

        For factor ``k`` and study ``s``: the mean over the cells ``i`` of ``s`` of
        ``|out_ij(z_i) - out_ij(z_i with z_ik set to the median of z_k over s's cells)|``
        (first output, e.g. the log-rate). A shared factor that drives gene ``j`` in one study
        and hardly in another (its cells sit where the decoder is flat, or all at one value)
        has a large effect in the first and a small one in the second, whatever the spread of
        ``z_k`` itself.

        Parameters
        ----------
        z
            Factors, shape ``(n_cells, n_factors + n_specific)``.
        study
            Each cell's study index, shape ``(n_cells,)`` or ``(n_cells, 1)``.
        factors
            Indices of the factors to measure.

        Returns
        -------
        Tensor of shape ``(len(factors), n_studies, n_genes)``; ``nan`` for a study without
        cells.
        """
        study = study.reshape(-1).long()
        n_studies = max(self.n_studies, int(study.max()) + 1 if study.numel() else 1)
        onehot = F.one_hot(study, n_studies).to(z.dtype)  # (B, S)
        counts = onehot.sum(0)
        by_study = study if self.n_specific else None
        base = self.forward(z, study=by_study)[..., 0]  # (B, G)
        out = torch.full((len(factors), n_studies, self.n_genes), float("nan"), dtype=z.dtype)
        for row, k in enumerate(factors):
            moved = z.clone()
            for s in range(n_studies):
                cells = study == s
                if cells.any():
                    moved[cells, k] = z[cells, k].median()
            diff = (base - self.forward(moved, study=by_study)[..., 0]).abs()
            sums = onehot.T @ diff  # (S, G)
            seen = counts > 0
            out[row, seen] = (sums[seen] / counts[seen, None]).to(out.dtype)
        return out

    def forward_loop(self, z: torch.Tensor, study: torch.Tensor | None = None) -> torch.Tensor:
        """Reference evaluation with a Python loop over genes (slow; for tests and benchmarks).

        Parameters
        ----------
        z
            Factors, shape ``(n_cells, n_factors + n_specific)``.
        study
            Multi-study only: each cell's study index, shape ``(n_cells,)``.

        Returns
        -------
        Tensor of shape ``(n_cells, n_genes, n_output)``.
        """
        first, hidden = self.shared_weights()
        W, V = self.gated_masks()
        study = self._check_study(z, study)
        outs = []
        for j in range(self.n_genes):
            mask = W[j]
            if study is not None:  # the cell's own mask row: [w_j, v_{s_i, j}]
                mask = torch.cat([mask.expand(z.shape[0], -1), V[study, j]], dim=1)
            h = torch.relu(F.linear(z * mask, first, self.first.bias))
            for layer, weight in zip(self.hidden, hidden, strict=True):
                h = torch.relu(F.linear(h, weight, layer.bias))
            outs.append(h @ self.head_weight[j] + self.head_bias[j])
        return torch.stack(outs, dim=1)


def _straight_through(w: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``w * gate`` in the forward pass, with the gradient of ``w`` itself in the backward pass."""
    if not (torch.is_grad_enabled() and w.requires_grad):
        return w * gate
    return w + (w * gate - w).detach()
