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

    The prior is brought in on a schedule (per epoch), in the spirit of the dynamic posterior
    exploration of Rockova and George (2018):

    1. *warm-up* (``n_epochs_prior_warmup`` epochs): no mask penalty and no EM; the network learns
       to use every factor (``W`` starts dense);
    2. *spike ladder* (``n_epochs_lambda0_ramp`` epochs): the spike rate climbs geometrically from
       ``1.5 * lambda1`` to ``lambda0`` while ``eta`` stays at its start value 0.5, so genes are
       separated into slab and spike gradually;
    3. full prior: spike rate ``lambda0`` and EM for ``p*`` and ``eta``.

    Without the schedule, on count data with hundreds of genes the penalty shrinks ``W`` before
    the decoder has learned to use the factors, ``eta_k`` falls to 0 and most factors never
    return (measured on ``simulate_programs``: 0 of 8 programs found without it, 8 of 8 with it).

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
    n_epochs_prior_warmup
        Epochs without mask penalty or EM at the start (``None`` or 0: none).
    n_epochs_lambda0_ramp
        Epochs of the spike-rate ladder after the warm-up (``None`` or 0: ``lambda0`` at once).
    n_epochs_shared_first
        Multi-study modules: epochs at the start during which the study-specific factors do not
        reach the decoder (``None`` or 0: none), so the shared factors take the programs common
        to all studies first.
    n_epochs_fixed_correlation
        Modules with ``latent_prior="correlated"``: epochs at the start during which the prior's
        correlation stays the identity (``None`` or 0: learned from the first step).
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
        n_epochs_prior_warmup: int | None = None,
        n_epochs_lambda0_ramp: int | None = None,
        n_epochs_shared_first: int | None = None,
        n_epochs_fixed_correlation: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            module,
            lr=lr,
            weight_decay=weight_decay,
            n_epochs_kl_warmup=n_epochs_kl_warmup,
            **kwargs,
        )
        for name, value in (
            ("n_epochs_prior_warmup", n_epochs_prior_warmup),
            ("n_epochs_lambda0_ramp", n_epochs_lambda0_ramp),
            ("n_epochs_shared_first", n_epochs_shared_first),
            ("n_epochs_fixed_correlation", n_epochs_fixed_correlation),
        ):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {value}.")
        self.n_epochs_prior_warmup = int(n_epochs_prior_warmup or 0)
        self.n_epochs_lambda0_ramp = int(n_epochs_lambda0_ramp or 0)
        self.n_epochs_shared_first = int(n_epochs_shared_first or 0)
        self.n_epochs_fixed_correlation = int(n_epochs_fixed_correlation or 0)
        self._em_on = True
        self._update_eta = True

    def on_train_epoch_start(self) -> None:
        """Set the mask prior's schedule (warm-up, spike ladder, full prior) for this epoch."""
        warm, ramp = self.n_epochs_prior_warmup, self.n_epochs_lambda0_ramp
        epoch = self.current_epoch
        self._em_on = epoch >= warm
        t = 1.0 if ramp == 0 else (epoch - warm) / ramp
        self._update_eta = t >= 1.0
        self.module.set_prior_schedule(penalty_on=self._em_on, ramp=t)
        if hasattr(self.module, "specific_on"):
            self.module.specific_on = epoch >= self.n_epochs_shared_first
        if hasattr(self.module, "correlation_on"):
            self.module.correlation_on = epoch >= self.n_epochs_fixed_correlation

    def on_train_end(self) -> None:
        """Leave the prior at its full strength (matters when training stops early)."""
        self.module.set_prior_schedule(penalty_on=True, ramp=1.0)
        if hasattr(self.module, "specific_on"):
            self.module.specific_on = True
        if hasattr(self.module, "correlation_on"):
            self.module.correlation_on = True

    def _divergence(self, what: str) -> DivergenceError:
        return DivergenceError(
            f"Training diverged: {what} at epoch {self.current_epoch} (step {self.global_step}). "
            "Lower the learning rate (e.g. `model.train(lr=1e-3)`), check the data for extreme "
            "values, or use a likelihood that suits the data (counts: 'nb'; normalised values: "
            "'gaussian')."
        )

    def _checked_step(self, step: Any, batch: dict[str, torch.Tensor], batch_idx: int) -> Any:
        """Run a training or validation step; non-finite parameters or loss raise DivergenceError.

        Non-finite parameters, or finite ones so large that the network's outputs overflow,
        make ``torch.distributions`` refuse its arguments (a ValueError) before any loss exists;
        that error is turned into a DivergenceError too.
        """
        try:
            loss = step(batch, batch_idx)
        except ValueError as err:
            bad = self.module.non_finite_parameters()
            if bad:
                raise self._divergence(
                    f"parameters became NaN or infinite ({', '.join(bad[:3])})"
                ) from err
            if str(err).startswith("Expected parameter"):  # torch.distributions' validation
                raise self._divergence("the network's outputs became NaN or infinite") from err
            raise
        if loss is not None and not torch.isfinite(loss):
            raise self._divergence(f"the loss became {loss.item()}")
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Run scvi-tools' training step and stop on divergence."""
        return self._checked_step(super().training_step, batch, batch_idx)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> Any:
        """Run scvi-tools' validation step and stop on divergence."""
        return self._checked_step(super().validation_step, batch, batch_idx)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """EM update of the mask prior after the optimiser step."""
        if self._em_on:
            self.module.em_step(update_eta=self._update_eta)
