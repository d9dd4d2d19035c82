"""Training plan: scvi-tools' TrainingPlan plus the Spike-and-Slab Lasso EM step."""

from __future__ import annotations

from typing import Any

import torch
from scvi.module.base import BaseModuleClass
from scvi.train import TrainingPlan

__all__ = ["DivergenceError", "SparseVAETrainingPlan"]


class DivergenceError(RuntimeError):
    """Raised when the training loss becomes NaN or infinite."""


class SparseVAETrainingPlan(TrainingPlan):
    """Training plan for :class:`~sparsevae.SparseVAE`.

    After every optimiser step the mask prior's EM update (inclusion probabilities ``p*`` and
    factor weights ``eta``) runs without gradient. A non-finite loss stops training with
    :class:`DivergenceError` instead of producing NaN factors.

    Parameters
    ----------
    module
        A :class:`~sparsevae.module.SparseVAEModule`.
    lr
        Adam learning rate.
    weight_decay
        Adam weight decay (default 0: the mask already has its prior).
    n_epochs_kl_warmup
        Epochs over which the KL weight rises linearly from 0 to 1; ``None`` (default) uses the
        full weight from the start, as the paper does. scvi-tools' default of 400 epochs would
        silently under-weight the KL in runs of 100 epochs.
    **kwargs
        Passed to :class:`scvi.train.TrainingPlan`.
    """

    def __init__(
        self,
        module: BaseModuleClass,
        *,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        n_epochs_kl_warmup: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            module,
            lr=lr,
            weight_decay=weight_decay,
            n_epochs_kl_warmup=n_epochs_kl_warmup,
            **kwargs,
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Run scvi-tools' training step and stop on a non-finite loss."""
        loss = super().training_step(batch, batch_idx)
        if not torch.isfinite(loss):
            raise DivergenceError(
                f"Training diverged: the loss became {loss.item()} at epoch {self.current_epoch} "
                f"(step {self.global_step}). Lower the learning rate (e.g. "
                "`model.train(lr=1e-3)`), check the data for extreme values, or use a likelihood "
                "that suits the data (counts: 'nb'; normalised values: 'gaussian')."
            )
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """EM update of the mask prior after the optimiser step."""
        self.module.em_step()
