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
        chunks (about 4 MB) keep the working set in cache: measured fastest on CPU.
    max_saved_elements
        When gradients are needed and the activations of a whole minibatch would exceed this many
        elements, each chunk is recomputed in the backward pass (activation checkpointing) instead
        of being stored, so memory stays bounded for thousands of genes.
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
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}.")
        self.n_genes = n_genes
        self.n_factors = n_factors
        self.n_hidden = n_hidden
        self.n_layers = n_layers
        self.n_output = n_output
        self.learn_mask = learn_mask
        self.max_chunk_elements = int(max_chunk_elements)
        self.max_saved_elements = int(max_saved_elements)

        if learn_mask:
            # Start every gene connected to every factor, with some spread so that the prior's EM
            # step has something to separate.
            self.W = nn.Parameter(0.5 + 0.1 * torch.rand(n_genes, n_factors))
        else:
            self.register_buffer("W", torch.ones(n_genes, n_factors))

        self.first = nn.Linear(n_factors, n_hidden)
        self.hidden = nn.ModuleList([nn.Linear(n_hidden, n_hidden) for _ in range(n_layers - 1)])
        bound = 1.0 / math.sqrt(n_hidden)
        self.head_weight = nn.Parameter(
            torch.empty(n_genes, n_hidden, n_output).uniform_(-bound, bound)
        )
        self.head_bias = nn.Parameter(torch.zeros(n_genes, n_output))

    def weight_sq_norm(self) -> torch.Tensor:
        """Sum of squares of the network's weights (shared layers and heads; no biases, no mask).

        Returns
        -------
        Scalar tensor.
        """
        total = self.first.weight.pow(2).sum() + self.head_weight.pow(2).sum()
        for layer in self.hidden:
            total = total + layer.weight.pow(2).sum()
        return total

    def chunk_size(self, n_cells: int) -> int:
        """Number of genes evaluated at once for a minibatch of ``n_cells`` cells."""
        per_gene = max(1, n_cells * self.n_hidden)
        return int(max(1, min(self.n_genes, self.max_chunk_elements // per_gene)))

    def forward(self, z: torch.Tensor, genes: slice | None = None) -> torch.Tensor:
        """Decode factors into per-gene outputs.

        Parameters
        ----------
        z
            Factors, shape ``(n_cells, n_factors)``.
        genes
            Optional slice of genes to decode (default: all genes).

        Returns
        -------
        Tensor of shape ``(n_cells, n_genes, n_output)`` (genes restricted to ``genes``).
        """
        start, stop = (0, self.n_genes) if genes is None else (genes.start or 0, genes.stop)
        step = self.chunk_size(z.shape[0])
        saved = z.shape[0] * (stop - start) * self.n_hidden * self.n_layers
        recompute = torch.is_grad_enabled() and saved > self.max_saved_elements
        outs = []
        for g0 in range(start, stop, step):
            block = slice(g0, min(g0 + step, stop))
            if recompute:
                outs.append(checkpoint(self._decode_block, z, block, use_reentrant=False))
            else:
                outs.append(self._decode_block(z, block))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
        return out.permute(1, 0, 2)

    def _decode_block(self, z: torch.Tensor, genes: slice) -> torch.Tensor:
        """Decode a block of genes; returns ``(n_block_genes, n_cells, n_output)``."""
        w = self.W[genes]  # (g, K)
        g = w.shape[0]
        # First layer with the mask folded in: A_j = W1 diag(w_j), shape (g, H, K).
        a = self.first.weight.unsqueeze(0) * w.unsqueeze(1)
        h = F.linear(z, a.reshape(g * self.n_hidden, self.n_factors))  # (B, g*H)
        h = h.view(z.shape[0], g, self.n_hidden).transpose(0, 1)  # (g, B, H) view
        h = torch.relu(h + self.first.bias)
        h = h.contiguous()
        for layer in self.hidden:
            h = torch.relu(F.linear(h, layer.weight, layer.bias))
        # Per-gene head: (g, B, H) @ (g, H, O) + (g, 1, O)
        return torch.baddbmm(self.head_bias[genes].unsqueeze(1), h, self.head_weight[genes])

    def forward_loop(self, z: torch.Tensor) -> torch.Tensor:
        """Reference evaluation with a Python loop over genes (slow; for tests and benchmarks).

        Parameters
        ----------
        z
            Factors, shape ``(n_cells, n_factors)``.

        Returns
        -------
        Tensor of shape ``(n_cells, n_genes, n_output)``.
        """
        outs = []
        for j in range(self.n_genes):
            h = torch.relu(self.first(z * self.W[j]))
            for layer in self.hidden:
                h = torch.relu(layer(h))
            outs.append(h @ self.head_weight[j] + self.head_bias[j])
        return torch.stack(outs, dim=1)
