"""Training plan: scvi-tools' TrainingPlan plus the Spike-and-Slab Lasso EM step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from scvi.train import TrainingPlan

from ..module import SparseVAEModule

__all__ = [
    "MASK_AVERAGE_SHARE",
    "MASK_SETTLE_SHARE",
    "MULTISTUDY_FREE_BITS_SPECIFIC",
    "ROTATE_AFTER_WARMUP",
    "DivergenceError",
    "PriorSchedule",
    "SparseVAETrainingPlan",
    "default_max_epochs",
    "prior_schedule",
]

#: Count likelihoods: share of ``max_epochs`` without the mask prior at the start.
PRIOR_WARMUP_SHARE = 0.2
#: Count likelihoods: share of ``max_epochs`` of the spike-rate ladder after the warm-up.
LAMBDA0_RAMP_SHARE = 0.4
#: Gated masks: share of ``max_epochs`` over which ``p*`` is averaged before the selection is
#: decided (``SparseVAE.train(n_epochs_mask_average=)``).
MASK_AVERAGE_SHARE = 0.05
#: Gated masks: share of ``max_epochs`` at the end in which the network refits to the decided
#: masks (``SparseVAE.train(n_epochs_mask_settle=)``).
MASK_SETTLE_SHARE = 0.05
#: Multi-study models: default free bits (nats per factor) of the study-specific factors until
#: the mask prior is at full strength (``SparseVAE.train(kl_free_bits_specific=)``).
MULTISTUDY_FREE_BITS_SPECIFIC = 0.5
#: Default of ``SparseVAE.train(rotate_after_warmup=)``: rotate the factors to the varimax
#: rotation of their loadings at the end of the mask prior's warm-up.
ROTATE_AFTER_WARMUP = True
#: ``latent_prior="correlated"``: epochs with the prior's correlation held at the identity.
FIXED_CORRELATION_EPOCHS = 20
#: ``latent_prior="mixture"``: share of ``max_epochs`` with the ``N(0, I)`` prior before the
#: mixture's components are placed on the factors (k-means) and the mixture takes over.
MIXTURE_PRETRAIN_SHARE = 0.2


def default_max_epochs(n_obs: int) -> int:
    """Default number of epochs: about 300k cell passes, between 20 and 400 epochs.

    Parameters
    ----------
    n_obs
        Number of cells.

    Returns
    -------
    Number of epochs.
    """
    return int(np.clip(round(300_000 / max(n_obs, 1)), 20, 400))


@dataclass(frozen=True)
class PriorSchedule:
    """Epochs of the mask prior's warm-up and spike-rate ladder, and of the mask decision.

    Attributes
    ----------
    warmup
        Epochs without the mask penalty or EM.
    ramp
        Epochs of the spike-rate ladder after the warm-up.
    average
        Epochs at the end of the full prior, before :attr:`settle`, whose ``p*`` are averaged
        into the decided selection.
    settle
        Epochs at the end with the selection decided: no EM, the network refits to the masks.
    max_epochs
        Epochs of the training run.
    """

    warmup: int
    ramp: int
    average: int = 0
    settle: int = 0
    max_epochs: int = 0

    @property
    def full_prior_epoch(self) -> int:
        """The first epoch (0-based) with the full prior and EM for ``eta``."""
        return self.warmup + self.ramp

    @property
    def decides(self) -> bool:
        """Whether the selection is decided at the end (an average or a settle phase)."""
        return self.average > 0 or self.settle > 0

    @property
    def average_epoch(self) -> int:
        """The first epoch (0-based) whose ``p*`` (at its end) enters the average."""
        return self.max_epochs - self.settle - self.average

    @property
    def decide_epoch(self) -> int:
        """The epoch (0-based) at whose start the selection is decided (``max_epochs``: the end)."""
        return self.max_epochs - self.settle


def prior_schedule(
    max_epochs: int,
    count_likelihood: bool,
    n_epochs_prior_warmup: int | None = None,
    n_epochs_lambda0_ramp: int | None = None,
    gated: bool = False,
    n_epochs_mask_average: int | None = None,
    n_epochs_mask_settle: int | None = None,
) -> PriorSchedule:
    """The schedule of the mask prior, with the defaults filled in.

    Count likelihoods default to a warm-up of 20% and a ladder of 40% of ``max_epochs``; the
    Gaussian likelihood to none (the paper's full prior from the first step). Gated masks
    (``spike_gate``) default to deciding the selection from ``p*`` averaged over 5% of
    ``max_epochs`` and refitting the network to it over the last 5%; ungated ones to neither.
    Defaults that do not fit after the full prior's start are shortened. See the user guide's
    page on the defaults for why (``docs/user_guide/defaults.md``).

    Parameters
    ----------
    max_epochs
        Epochs of the training run.
    count_likelihood
        Whether the model has a count likelihood.
    n_epochs_prior_warmup, n_epochs_lambda0_ramp
        Values set by the user (``None``: the default).
    gated
        Whether the model has gates on its masks (``spike_gate``).
    n_epochs_mask_average, n_epochs_mask_settle
        Values set by the user (``None``: the default).

    Returns
    -------
    The :class:`PriorSchedule`.
    """
    for name, value in (
        ("n_epochs_prior_warmup", n_epochs_prior_warmup),
        ("n_epochs_lambda0_ramp", n_epochs_lambda0_ramp),
        ("n_epochs_mask_average", n_epochs_mask_average),
        ("n_epochs_mask_settle", n_epochs_mask_settle),
    ):
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0 or None, got {value}.")
    if n_epochs_prior_warmup is None:
        n_epochs_prior_warmup = round(PRIOR_WARMUP_SHARE * max_epochs) if count_likelihood else 0
    if n_epochs_lambda0_ramp is None:
        n_epochs_lambda0_ramp = round(LAMBDA0_RAMP_SHARE * max_epochs) if count_likelihood else 0
    room = max(0, int(max_epochs) - int(n_epochs_prior_warmup) - int(n_epochs_lambda0_ramp))
    settle, average = n_epochs_mask_settle, n_epochs_mask_average
    if settle is None:
        settle = min(round(MASK_SETTLE_SHARE * max_epochs) if gated else 0, room)
    if average is None:
        average = min(round(MASK_AVERAGE_SHARE * max_epochs) if gated else 0, max(0, room - settle))
    if settle + average > room:
        raise ValueError(
            f"n_epochs_mask_average + n_epochs_mask_settle ({average} + {settle}) must fit in "
            f"the {room} epochs after the mask prior reaches full strength (max_epochs "
            f"{max_epochs}, warm-up {n_epochs_prior_warmup}, spike ramp "
            f"{n_epochs_lambda0_ramp}); shorten them or train for more epochs."
        )
    return PriorSchedule(
        int(n_epochs_prior_warmup),
        int(n_epochs_lambda0_ramp),
        int(average),
        int(settle),
        int(max_epochs),
    )


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
    3. full prior: spike rate ``lambda0`` and EM for ``p*`` and ``eta``;
    4. *mask decision* (gated masks by default): ``p*`` is averaged over the epoch ends of the
       last ``n_epochs_mask_average`` epochs before the final ``n_epochs_mask_settle``; then the
       selection is decided from that average (:meth:`SparseVAEModule.decide_masks`: EM stops,
       the gates stay as decided, each entry is charged the rate of its part) and the network
       refits to the decided masks. With the gates the masks otherwise flicker from one EM
       step to the next for the entries near ``p* = 0.5``.

    The schedule's defaults come from :func:`prior_schedule` and the trainer's ``max_epochs``:
    on for count likelihoods, off for the Gaussian one (see the user guide's page on the prior).

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
        Epochs without mask penalty or EM at the start (0: none; ``None``: the default of
        :func:`prior_schedule`).
    n_epochs_lambda0_ramp
        Epochs of the spike-rate ladder after the warm-up (0: ``lambda0`` at once; ``None``:
        the default of :func:`prior_schedule`).
    n_epochs_shared_first
        Multi-study modules: epochs at the start during which the study-specific factors do not
        reach the decoder (``None`` or 0: none), so the shared factors take the programs common
        to all studies first.
    n_epochs_fixed_correlation
        Modules with ``latent_prior="correlated"``: epochs at the start during which the prior's
        correlation stays the identity (0: learned from the first step; ``None``:
        ``FIXED_CORRELATION_EPOCHS``, 20).
    kl_free_bits
        Free bits of the KL term, in nats per factor, until the mask prior reaches full
        strength: below it a factor's KL (mean over the minibatch) costs nothing, so the encoder
        does not collapse factors onto the prior before the decoder has found a use for them.
        0 (default): off. Only for the ``N(0, I)`` and conditional latent priors; the ELBO
        reported is the plain one. Measurements (multi-study simulations): user guide, "The
        multi-study model".
    kl_free_bits_specific
        Free bits of the study-specific factors only (multi-study modules), on the same
        schedule; a factor gets the larger of the two. 0 (default): off.
    n_epochs_mixture_pretrain
        Modules with ``latent_prior="mixture"``: epochs with the ``N(0, I)`` prior at the start;
        then the components are placed by k-means on the training cells' factors and the mixture
        takes over (``None``: ``MIXTURE_PRETRAIN_SHARE`` of ``max_epochs``, 20%). Started from
        random components, a GMVAE tends to put every cell in one component or to keep uniform
        assignments.
    n_epochs_mask_average
        Epochs whose ``p*`` (at each epoch's end) are averaged into the decided selection
        (``None``: the default of :func:`prior_schedule`, 5% of ``max_epochs`` with gates, else
        0). 0 with a settle phase: the selection is decided from the last EM step's ``p*``.
    n_epochs_mask_settle
        Epochs at the end in which the selection stays decided and the network refits to it
        (``None``: the default of :func:`prior_schedule`, 5% with gates, else 0). 0 with an
        average: the average is decided at the end of training, without a refit.
    rotate_after_warmup
        At the end of the mask prior's warm-up, rotate the factors to the varimax rotation of
        their loadings on the genes (:meth:`SparseVAEModule.rotate_factors`), so that the mask
        prior starts from the same basis whatever the random start: during the warm-up the
        model is a plain VAE, whose factors are identified only up to a rotation. Only modules
        that can rotate (``can_rotate``) and schedules with a warm-up. Default ``False`` here;
        :meth:`~sparsevae.SparseVAE.train` turns it on (``ROTATE_AFTER_WARMUP``).
    **kwargs
        Passed to :class:`scvi.train.TrainingPlan`.
    """

    def __init__(
        self,
        module: SparseVAEModule,
        *,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        n_epochs_kl_warmup: int | None = None,
        n_epochs_prior_warmup: int | None = None,
        n_epochs_lambda0_ramp: int | None = None,
        n_epochs_shared_first: int | None = None,
        n_epochs_fixed_correlation: int | None = None,
        n_epochs_mixture_pretrain: int | None = None,
        kl_free_bits: float = 0.0,
        kl_free_bits_specific: float = 0.0,
        n_epochs_mask_average: int | None = None,
        n_epochs_mask_settle: int | None = None,
        rotate_after_warmup: bool = False,
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
            ("n_epochs_shared_first", n_epochs_shared_first),
            ("n_epochs_fixed_correlation", n_epochs_fixed_correlation),
            ("n_epochs_mixture_pretrain", n_epochs_mixture_pretrain),
            ("n_epochs_mask_average", n_epochs_mask_average),
            ("n_epochs_mask_settle", n_epochs_mask_settle),
        ):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {value}.")
        for name, bits in (
            ("kl_free_bits", kl_free_bits),
            ("kl_free_bits_specific", kl_free_bits_specific),
        ):
            if not np.isfinite(bits) or bits < 0:
                raise ValueError(f"{name} must be a number >= 0, got {bits}.")
        self.kl_free_bits = float(kl_free_bits)
        self.kl_free_bits_specific = float(kl_free_bits_specific)
        self.rotate_after_warmup = bool(rotate_after_warmup)
        #: The rotation applied at the end of the warm-up (``None`` before, or without one).
        self.rotation_: torch.Tensor | None = None
        # Checked now, resolved against the trainer's max_epochs when training starts.
        prior_schedule(1, module.is_count, n_epochs_prior_warmup, n_epochs_lambda0_ramp)
        self._schedule_args = (
            n_epochs_prior_warmup, n_epochs_lambda0_ramp, module.spike_gate,
            n_epochs_mask_average, n_epochs_mask_settle,
        )  # fmt: skip
        self.schedule = PriorSchedule(0, 0)
        # Running sum of p* (one per mask prior) over the averaged epochs, their number, and
        # the module's mask_edits when the sum began.
        self._pstar_sum: list[torch.Tensor] | None = None
        self._n_averaged = 0
        self._edits_at_sum = 0
        self._decided = False
        self.n_epochs_shared_first = int(n_epochs_shared_first or 0)
        self.n_epochs_fixed_correlation = int(
            FIXED_CORRELATION_EPOCHS
            if n_epochs_fixed_correlation is None
            else n_epochs_fixed_correlation
        )
        self._mixture_pretrain_arg = n_epochs_mixture_pretrain
        self.n_epochs_mixture_pretrain = 0
        self._em_on = True
        self._update_eta = True

    @property
    def n_epochs_prior_warmup(self) -> int:
        """Epochs of the warm-up in this run (known once training has started)."""
        return self.schedule.warmup

    @property
    def n_epochs_lambda0_ramp(self) -> int:
        """Epochs of the spike-rate ladder in this run (known once training has started)."""
        return self.schedule.ramp

    def on_train_start(self) -> None:
        """Fill in the schedule's defaults from the trainer's ``max_epochs``."""
        max_epochs = int(self.trainer.max_epochs)
        self.schedule = prior_schedule(max_epochs, self.module.is_count, *self._schedule_args)
        arg = self._mixture_pretrain_arg
        self.n_epochs_mixture_pretrain = (
            round(MIXTURE_PRETRAIN_SHARE * max_epochs) if arg is None else int(arg)
        )
        self.module.release_masks()
        self._pstar_sum, self._n_averaged, self._decided = None, 0, False

    def on_train_epoch_start(self) -> None:
        """Set the mask prior's schedule (warm-up, spike ladder, full prior) for this epoch."""
        warm, ramp = self.schedule.warmup, self.schedule.ramp
        epoch = self.current_epoch
        if (
            self.rotate_after_warmup
            and warm > 0
            and epoch == warm
            and self.rotation_ is None
            and self.module.can_rotate
        ):
            self.rotation_ = self._rotate_to_varimax()
        if self.schedule.decides and epoch == self.schedule.decide_epoch and not self._decided:
            self._decide_masks()
        t = 1.0 if ramp == 0 else (epoch - warm) / ramp
        self._update_eta = t >= 1.0
        self.module.set_prior_schedule(penalty_on=epoch >= warm, ramp=t)
        self._em_on = epoch >= warm and not self._decided
        self.module.specific_on = epoch >= self.n_epochs_shared_first
        self.module.correlation_on = epoch >= self.n_epochs_fixed_correlation
        free = epoch < self.schedule.full_prior_epoch
        self.module.free_bits = self.kl_free_bits if free else 0.0
        self.module.free_bits_specific = self.kl_free_bits_specific if free else 0.0
        if epoch >= self.n_epochs_mixture_pretrain:
            self._place_mixture()

    @torch.no_grad()
    def _place_mixture(self) -> None:
        """``latent_prior="mixture"``: place the components on the training cells' factors, once."""
        module = self.module
        if module.latent_prior != "mixture" or bool(module.mixture_prior.initialised):
            return
        means, variances = self._posteriors()
        module.mixture_prior.init_components(means, variances)
        module.mixture_prior.em_update(means, variances)

    def on_train_epoch_end(self) -> None:
        """Add ``p*`` to the mask decision's average; refit a mixture prior's components (EM)."""
        module = self.module
        schedule = self.schedule
        if schedule.average_epoch <= self.current_epoch < schedule.decide_epoch:
            self._add_to_average()
        if not module.mixture_on:
            return
        means, variances = self._posteriors()
        module.mixture_prior.em_update(means, variances)

    @torch.no_grad()
    def _add_to_average(self) -> None:
        """Add this epoch's ``p*`` of every mask to the running average.

        A move of mask columns between the shared and specific masks (multi-study) starts the
        average again: the columns before and after it are different factors.
        """
        priors = self.module.mask_priors()
        if self._pstar_sum is None or self._edits_at_sum != self.module.mask_edits:
            self._pstar_sum = [torch.zeros_like(p.p_star) for p in priors]
            self._n_averaged = 0
            self._edits_at_sum = self.module.mask_edits
        for total, prior in zip(self._pstar_sum, priors, strict=True):
            total.add_(prior.p_star)
        self._n_averaged += 1

    def _decide_masks(self) -> None:
        """Decide every mask's selection from the averaged ``p*`` (or the current one)."""
        module = self.module
        if self._pstar_sum is not None and self._n_averaged > 0:
            p_stars = [total / self._n_averaged for total in self._pstar_sum]
        else:
            p_stars = [prior.p_star.clone() for prior in module.mask_priors()]
        module.set_prior_schedule(penalty_on=True, ramp=1.0)
        module.decide_masks(p_stars)
        self._decided = True

    @torch.no_grad()
    def _rotate_to_varimax(self) -> torch.Tensor:
        """Rotate the factors to the varimax rotation of their loadings (training cells)."""
        module = self.module
        was_training = module.training
        module.eval()
        K = module.n_factors
        sums: dict[str, torch.Tensor] = {}
        for batch in self.trainer.train_dataloader:
            z = module.posterior(batch).loc[:, :K].double()
            x = module.loading_expression(batch).double()
            parts = {
                "n": torch.tensor([float(x.shape[0])], device=x.device, dtype=x.dtype),
                "x": x.sum(0), "xx": x.pow(2).sum(0), "z": z.sum(0), "zz": z.T @ z,
                "xz": x.T @ z,
            }  # fmt: skip
            for key, value in parts.items():
                sums[key] = sums[key] + value if key in sums else value
        module.train(was_training)
        if int(getattr(self.trainer, "world_size", 1) or 1) > 1:
            sums = {k: self.trainer.strategy.reduce(v, reduce_op="sum") for k, v in sums.items()}
        n = sums["n"]
        mx, mz = sums["x"] / n, sums["z"] / n
        var_x = sums["xx"] / n - mx.pow(2)
        cov_z = sums["zz"] / n - mz[:, None] * mz[None, :]
        cov_xz = sums["xz"] / n - mx[:, None] * mz[None, :]
        rotation = module.varimax_rotation(cov_xz, var_x, cov_z)
        module.rotate_factors(rotation)
        return rotation

    @torch.no_grad()
    def _posteriors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior means and variances of the factors of every training cell (eval mode)."""
        module = self.module
        was_training = module.training
        module.eval()
        means, variances = [], []
        for batch in self.trainer.train_dataloader:
            qz = module.posterior(batch)
            means.append(qz.loc)
            variances.append(qz.scale.pow(2))
        module.train(was_training)
        return self._all_cells(torch.cat(means)), self._all_cells(torch.cat(variances))

    def _all_cells(self, values: torch.Tensor) -> torch.Tensor:
        """Rows of every process (distributed training), in rank order; the rows themselves else.

        Each process sees its own share of the cells; the mixture's placement and EM must see
        them all, so that every process fits the same components.
        """
        world = int(getattr(self.trainer, "world_size", 1) or 1)
        if world == 1:
            return values
        n = torch.tensor([values.shape[0]], device=values.device)
        sizes = self.trainer.strategy.all_gather(n).reshape(-1).tolist()
        padded = values.new_zeros((max(sizes), *values.shape[1:]))
        padded[: values.shape[0]] = values
        gathered = self.trainer.strategy.all_gather(padded)  # (world, max, ...)
        return torch.cat([gathered[r, :size] for r, size in enumerate(sizes)])

    def on_train_end(self) -> None:
        """Leave the prior at its full strength (matters when training stops early)."""
        self._place_mixture()
        schedule = self.schedule
        if not self._decided and schedule.average > 0 and self._n_averaged >= schedule.average:
            self._decide_masks()  # an average without a settle phase is decided at the end
        self.module.set_prior_schedule(penalty_on=True, ramp=1.0)
        if self.module.gate_on:
            self.module.close_spike_gates()
        # p* keeps the decided selection; a later EM step (another train() call) may move it.
        self.module.release_masks()
        self.module.specific_on = True
        self.module.correlation_on = True
        self.module.free_bits = 0.0
        self.module.free_bits_specific = 0.0

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
        if loss is not None and not self._finite_everywhere(loss):
            raise self._divergence(f"the loss became {loss.item()}")
        return loss

    def _finite_everywhere(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite in this process and, in distributed training, in all.

        Every process must stop at the same step: one that stopped alone would leave the others
        waiting for its gradients.
        """
        finite = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
        if int(getattr(self.trainer, "world_size", 1) or 1) > 1 and dist.is_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item() > 0)

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
