"""Training: the train() method and the checks that run after it."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
import pandas as pd
import scvi
import torch

from ..priors import MIN_EFFECT_SHARE, anchors, effect_share, factor_use, is_selected
from ..train import (
    MULTISTUDY_FREE_BITS_SPECIFIC,
    ROTATE_AFTER_WARMUP,
    DivergenceError,
    default_max_epochs,
    prior_schedule,
)
from ._checks import MAX_EFFECT_CELLS, effect_cells, shared_specific_checks, within_study_effects
from ._reassign import MoveConfinedFactors
from ._validate import (
    check_n_cells,
)

logger = logging.getLogger(__name__)

__all__ = ["COLLAPSE_KL", "DEFAULT_TRAIN_SIZE", "TrainingMixin"]

#: Share of the cells used for training by default: all of them. scvi-tools holds out 10%; here
#: that cost identifiability (user guide, "Why the defaults are what they are"), so validation
#: curves are opt-in (``train(train_size=0.9)``).
DEFAULT_TRAIN_SIZE = 1.0

#: Below this KL (nats per cell, summed over factors) at the last epoch, training warns of
#: posterior collapse. Healthy fits have several nats per cell.
COLLAPSE_KL = 0.05


def _first_sentence(msg: str) -> str:
    return msg.split(": ")[0] if len(msg.split(": ")[0]) < 90 else msg[:87] + "..."


class TrainingMixin:
    """Training of :class:`~sparsevae.SparseVAE` (Lightning, through scvi-tools)."""

    def train(
        self,
        max_epochs: int | None = None,
        lr: float = 1e-2,
        batch_size: int = 128,
        early_stopping: bool = False,
        train_size: float | None = None,
        validation_size: float | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        n_epochs_kl_warmup: int | None = None,
        n_epochs_prior_warmup: int | None = None,
        n_epochs_lambda0_ramp: int | None = None,
        n_epochs_shared_first: int | None = None,
        n_epochs_fixed_correlation: int | None = None,
        kl_free_bits: float = 0.0,
        kl_free_bits_specific: float | None = None,
        rotate_after_warmup: bool | None = None,
        n_epochs_mask_average: int | None = None,
        n_epochs_mask_settle: int | None = None,
        plan_kwargs: dict[str, Any] | None = None,
        n_restarts: int = 1,
        move_confined: bool = True,
        **trainer_kwargs: Any,
    ):
        """Train the model with Lightning (on a GPU when one is available).

        Parameters
        ----------
        max_epochs
            Number of passes over the data; default :func:`default_max_epochs` (about 300k cell
            visits, between 20 and 400 epochs).
        lr
            Adam learning rate.
        batch_size
            Minibatch size.
        early_stopping
            Stop when the validation ELBO stops improving (holds out ``1 - train_size`` cells).
            It starts watching once the mask prior is at full strength (after
            ``n_epochs_prior_warmup + n_epochs_lambda0_ramp`` epochs), because the schedule
            itself moves the ELBO; pass ``early_stopping_warmup_epochs`` to change that.
        train_size
            Fraction of cells used for training; default :data:`DEFAULT_TRAIN_SIZE` (1.0: every
            cell, unlike scvi-tools' 0.9, see the user guide's "Why the defaults are what they
            are"), or 0.9 with early stopping. Below 1, the other cells give validation curves
            in ``model.history`` every epoch (pass ``check_val_every_n_epoch`` to thin them).
        validation_size
            Fraction of cells used for validation; default ``1 - train_size``.
        accelerator
            Lightning accelerator (``"auto"``, ``"cpu"``, ``"gpu"``, ...).
        devices
            Lightning devices: e.g. ``2`` with ``strategy="ddp"`` for two GPUs (or two CPU
            processes with ``accelerator="cpu"``). See the user guide, "Large data".
        n_epochs_kl_warmup
            Linear KL warm-up length in epochs; ``None`` uses the full KL weight from the start.
        n_epochs_prior_warmup
            Epochs at the start without the mask prior (the network first learns to use every
            factor); default 20% of ``max_epochs`` for count likelihoods and 0 (off) for
            ``gaussian`` (:func:`~sparsevae.train.prior_schedule`). Count data need it; for
            Gaussian data, turn it on (with ``n_epochs_lambda0_ramp``) when factors are strongly
            correlated and one gets switched off. Measurements: user guide, "Why the defaults
            are what they are".
        n_epochs_lambda0_ramp
            Epochs, after the warm-up, over which the spike rate climbs from ``1.5 * lambda1`` to
            ``lambda0`` with ``eta`` held at 0.5. ``0`` applies ``lambda0`` at once; default 40%
            of ``max_epochs`` for count likelihoods and 0 for ``gaussian``. See
            :class:`~sparsevae.train.SparseVAETrainingPlan`.
        n_epochs_shared_first
            Multi-study models: epochs at the start during which only the shared factors reach
            the decoder, so that they take the programs common to all studies first. Default
            ``None``: 0 (off); it cures some role swaps and causes others (user guide, "Why the
            defaults are what they are"). Ignored by single-study models.
        n_epochs_fixed_correlation
            Models with ``latent_prior="correlated"``: epochs at the start during which the
            prior's correlation ``R`` stays the identity, so the factors separate before ``R``
            is learned. Default ``None``: 20. Ignored by other models.
        kl_free_bits
            Free bits of the KL term (nats per factor), on every factor, until the mask prior
            reaches full strength: the encoder gains nothing by collapsing a factor onto the
            prior early. Default 0 (off): on every factor they keep surplus factors in use.
            Multi-study models have them on their specific factors by default
            (``kl_free_bits_specific``).
        kl_free_bits_specific
            Multi-study models: free bits of the study-specific factors only, on the same
            schedule. Default ``None``: ``MULTISTUDY_FREE_BITS_SPECIFIC`` (0.5), so that a
            study's factor is not given up before the decoder finds the study's program. Set
            0 when the specific masks select many genes beyond their study's program, or to
            compare with a fit without them; ignored by single-study models. Measurements:
            user guide, "The multi-study model".
        rotate_after_warmup
            At the end of the mask prior's warm-up, rotate the factors to the varimax rotation
            of their loadings on the genes, so that the mask prior starts from the same basis
            whatever the random start (during the warm-up the model is a plain VAE, whose factors
            are identified only up to a rotation). Default ``None``:
            :data:`~sparsevae.train.ROTATE_AFTER_WARMUP`. Applies to single-study models with
            ``latent_prior="normal"`` and a warm-up (count likelihoods by default); ignored by
            others. The rotation is kept in ``model.warmup_rotation_``. Turn it off to
            reproduce a fit made before it existed, or to start the mask prior from the
            warm-up's own basis (e.g. when comparing starts on purpose). Measurements: user
            guide, "Why the defaults are what they are".
        n_epochs_mask_average
            Models with gates on their masks (count data by default): the selection is decided
            from ``p*`` averaged over the ends of this many epochs before the last
            ``n_epochs_mask_settle``, instead of from the last EM step, whose ``p*`` flickers
            for entries near 0.5. Default ``None``: 5% of ``max_epochs`` with gates, 0
            without (:func:`~sparsevae.train.prior_schedule`).
        n_epochs_mask_settle
            Epochs at the end with the selection decided: EM stops, the gates stay as decided,
            each mask entry is charged its part's rate (slab if selected, spike if not) and the
            network refits to the decided masks. Default ``None``: 5% of ``max_epochs`` with
            gates, 0 without. Set both to 0 to read the masks from the last EM step (the
            earlier behaviour; measurements: user guide, "Why the defaults are what they are").
        plan_kwargs
            Passed to :class:`~sparsevae.train.SparseVAETrainingPlan`.
        n_restarts
            Fit from this many random starts and keep the fit with the highest ELBO on the
            training data (``get_elbo()``); the ELBOs of all starts are kept in
            ``model.restart_elbos_``. Costs ``n_restarts`` times the training time; use it when
            fits from different seeds disagree (user guide, "Stability across random starts").
            Start ``r`` is the fit that ``scvi.settings.seed + r`` gives (network and
            minibatch order), so ``n_restarts=3`` from seed 0 keeps the best of seeds 0-2.
        move_confined
            Multi-study models: at the end of each epoch from half-way through the epochs
            with the full mask prior until a quarter of them remain (pausing for a tenth of
            them after each move, while the masks refit), hand every shared factor that varies
            in one study only to an unused specific factor of that study, and every program
            that all studies' specific masks carry on one specific factor to an unused shared
            factor, or exchange the two when no unused factor is left (gene by gene when the
            shared factor carries several studies' programs on different genes, also with the
            slot most alike across studies when none is free or repeated; the checks of
            :func:`~sparsevae.tl.check_shared_specific`); then hand the genes that a shared
            factor drives in one study only to a copy of it in an unused specific factor of that
            study. The remaining epochs refit the masks.
            What moved is kept in ``model.moved_factors_``. Turn it off to leave the
            assignment to the likelihood (user guide, "The multi-study model"). Ignored by
            single-study models.
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` (Lightning), e.g. ``enable_progress_bar``, or
            ``strategy="ddp"`` for distributed data parallel training: each process trains on
            its share of every epoch's cells with ``batch_size`` cells per step, the gradients
            are averaged, the encoder's batch statistics are synchronised on GPUs
            (``sync_batchnorm=True``) and the mask prior's EM runs identically in every process.

        Returns
        -------
        The result of scvi-tools' train runner. At the end, a summary (:meth:`training_summary`)
        goes to the ``sparsevae`` logger (level INFO).
        """
        self.train_problems_: list[str] = []
        if (
            not isinstance(n_restarts, int | np.integer)
            or isinstance(n_restarts, bool)
            or n_restarts < 1
        ):
            raise ValueError(f"n_restarts must be a positive integer, got {n_restarts!r}.")
        kwargs = dict(
            max_epochs=max_epochs, lr=lr, batch_size=batch_size, early_stopping=early_stopping,
            train_size=train_size, validation_size=validation_size, accelerator=accelerator,
            devices=devices, n_epochs_kl_warmup=n_epochs_kl_warmup,
            n_epochs_prior_warmup=n_epochs_prior_warmup,
            n_epochs_lambda0_ramp=n_epochs_lambda0_ramp,
            n_epochs_shared_first=n_epochs_shared_first,
            n_epochs_fixed_correlation=n_epochs_fixed_correlation, kl_free_bits=kl_free_bits,
            kl_free_bits_specific=kl_free_bits_specific,
            rotate_after_warmup=rotate_after_warmup,
            n_epochs_mask_average=n_epochs_mask_average,
            n_epochs_mask_settle=n_epochs_mask_settle,
            plan_kwargs=plan_kwargs, move_confined=move_confined, **trainer_kwargs,
        )  # fmt: skip
        if n_restarts == 1:
            result = self._fit_once(**kwargs)
        else:
            result = self._fit_restarts(int(n_restarts), kwargs)
        if not self._warn_if_collapsed():
            self._warn_if_misassigned()
            self._warn_if_unfaithful()
            self._warn_if_mixture_collapsed()
        logger.info(self.training_summary())
        return result

    def _warn(self, msg: str) -> None:
        """A training warning: to the warnings module, the log and :meth:`training_summary`."""
        warnings.warn(msg, UserWarning, stacklevel=4)
        logger.warning(msg)
        if not hasattr(self, "train_problems_"):
            self.train_problems_ = []
        self.train_problems_.append(msg)

    def training_summary(self) -> str:
        """A short report of the last :meth:`train` call.

        Epochs run, the last training (and validation) ELBO per cell, how many factors are
        active, identifiable (at least two anchor genes) and switched off, and the checks that
        failed. ``train()`` logs it at the end; the CLI prints it.

        Returns
        -------
        Text of a few lines; see :func:`sparsevae.tl.identifiability_report` for the details
        behind the factor counts.
        """
        if not self.is_trained:
            return "SparseVAE: not trained yet."
        history = getattr(self, "history_", None) or {}

        def last(key: str) -> float | None:
            frame = history.get(key)
            if frame is None or len(frame.dropna()) == 0:
                return None
            return float(frame.dropna().iloc[-1, 0])

        epochs = len(history["elbo_train"].dropna()) if "elbo_train" in history else None
        elbo = [f"training {v:.1f}" for v in [last("elbo_train")] if v is not None]
        elbo += [f"validation {v:.1f}" for v in [last("elbo_validation")] if v is not None]
        lines = [
            "SparseVAE training: "
            + (f"{epochs} epochs" if epochs is not None else "epochs not logged")
            + (f"; -ELBO per cell: {', '.join(elbo)}" if elbo else "")
        ]
        if self.module.prior is not None:
            prior = self.module.prior
            selected = {
                k: is_selected(self.get_inclusion_probabilities(k)) for k in self.mask_kinds
            }
            for kind in self.mask_kinds:
                W, eta = self.get_mask(kind), self.get_eta(kind)
                n_sel = selected[kind].sum(axis=0).to_numpy()
                off, unselected = factor_use(
                    W.abs().max(axis=0).to_numpy(), n_sel, eta.to_numpy(), prior.w_off,
                    prior.eta_off,
                )  # fmt: skip
                n_anchors = anchors(selected, kind).sum(axis=0)
                active = ~off & ~unselected
                identifiable = active & (n_anchors >= 2)
                where = f" ({kind} mask)" if self.is_multistudy else ""
                lines.append(
                    f"factors{where}: {int(active.sum())} active of {len(off)}, "
                    f"{int(identifiable.sum())} identifiable (>= 2 anchor genes), "
                    f"{int(off.sum())} switched off"
                    + (
                        f", {int(unselected.sum())} in use with no selected gene"
                        if unselected.any()
                        else ""
                    )
                )
            for m in getattr(self, "moved_factors_", []):
                if m["kind"] == "to_specific":
                    lines.append(
                        f"moved: shared factor {m['factor']} varied in {m['study']} only; it is "
                        f"now {m['study']}'s specific_{m['slot']}"
                    )
                elif m["kind"] == "to_shared":
                    lines.append(
                        f"moved: specific_{m['slot']} carried one program in every study; it is "
                        f"now shared factor {m['factor']}"
                    )
                elif m["kind"] == "split_to_specific":
                    lines.append(
                        f"split: shared factor {m['factor']} drove {m['n_genes']} of its genes in "
                        f"{m['study']} only; they are now on {m['study']}'s specific_{m['slot']}"
                    )
                elif m["kind"] == "swap_split":
                    lines.append(
                        f"swapped by gene: shared factor {m['factor']} carried programs of "
                        f"{m['studies'].replace(';', ', ')} on {m['n_genes']} genes; it "
                        f"exchanged roles with specific_{m['slot']} (each study's slot took the "
                        "factor's genes of that study, the factor the slot's program)"
                    )
                else:
                    lines.append(
                        f"swapped: shared factor {m['factor']} (varied in {m['study']} only) and "
                        f"specific_{m['slot']} (one program in every study)"
                    )
            lines.append("details: sparsevae.tl.identifiability_report(model)")
        if self.module.latent_prior == "mixture":
            st = self._mixture_stats()
            lines.append(
                f"mixture: {st['n_components']} components, {st['n_holding']} holding cells, the "
                f"largest {100 * st['largest_share']:.0f}% of them; {st['reseeded']} re-seedings"
            )
        problems = getattr(self, "train_problems_", [])
        if problems:
            lines.append("checks failed: " + "; ".join(_first_sentence(p) for p in problems))
            lines.append("(see the warnings above for what to do)")
        else:
            lines.append("checks: no problem found")
        return "\n".join(lines)

    def _fit_once(
        self,
        max_epochs: int | None,
        lr: float,
        batch_size: int,
        early_stopping: bool,
        train_size: float | None,
        validation_size: float | None,
        accelerator: str,
        devices: int | list[int] | str,
        n_epochs_kl_warmup: int | None,
        n_epochs_prior_warmup: int | None,
        n_epochs_lambda0_ramp: int | None,
        n_epochs_shared_first: int | None,
        n_epochs_fixed_correlation: int | None,
        plan_kwargs: dict[str, Any] | None,
        kl_free_bits: float = 0.0,
        kl_free_bits_specific: float | None = None,
        rotate_after_warmup: bool | None = None,
        n_epochs_mask_average: int | None = None,
        n_epochs_mask_settle: int | None = None,
        move_confined: bool = True,
        **trainer_kwargs: Any,
    ) -> Any:
        """One training run from the module's current initialisation (see :meth:`train`)."""
        check_n_cells(self.adata)
        if max_epochs is None:
            max_epochs = default_max_epochs(self.adata.n_obs)
        if train_size is None:
            train_size = 0.9 if early_stopping else DEFAULT_TRAIN_SIZE
        if train_size < 1.0 and validation_size != 0:
            trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
        plan_kwargs = {
            "lr": lr,
            "n_epochs_shared_first": n_epochs_shared_first,
            "n_epochs_fixed_correlation": n_epochs_fixed_correlation,
            "n_epochs_kl_warmup": n_epochs_kl_warmup,
            "n_epochs_prior_warmup": n_epochs_prior_warmup,
            "n_epochs_lambda0_ramp": n_epochs_lambda0_ramp,
            "kl_free_bits": kl_free_bits,
            "kl_free_bits_specific": self._free_bits_specific(kl_free_bits_specific),
            "rotate_after_warmup": ROTATE_AFTER_WARMUP
            if rotate_after_warmup is None
            else bool(rotate_after_warmup),
            "n_epochs_mask_average": n_epochs_mask_average,
            "n_epochs_mask_settle": n_epochs_mask_settle,
            **(plan_kwargs or {}),
        }
        schedule = prior_schedule(
            max_epochs,
            self.module.is_count,
            plan_kwargs["n_epochs_prior_warmup"],
            plan_kwargs["n_epochs_lambda0_ramp"],
            self.module.spike_gate,
            plan_kwargs["n_epochs_mask_average"],
            plan_kwargs["n_epochs_mask_settle"],
        )
        # Log the epoch metrics even when an epoch has fewer than Lightning's default 50 steps.
        trainer_kwargs.setdefault("log_every_n_steps", 1)
        on_gpu = accelerator in ("gpu", "cuda") or (
            accelerator == "auto" and torch.cuda.is_available()
        )
        if _is_ddp(trainer_kwargs.get("strategy")) and on_gpu:
            # The encoder's batch statistics over the cells of every process, as one process
            # with the whole minibatch would compute them (PyTorch syncs them on GPUs only).
            trainer_kwargs.setdefault("sync_batchnorm", True)
        full_prior_epoch = schedule.full_prior_epoch
        if early_stopping:
            # The schedule moves the validation ELBO; early stopping must not act before it ends.
            trainer_kwargs.setdefault("early_stopping_warmup_epochs", full_prior_epoch)
        datasplitter_kwargs = dict(trainer_kwargs.pop("datasplitter_kwargs", None) or {})
        if "drop_last" not in datasplitter_kwargs and self._lone_last_cell(train_size, batch_size):
            # A minibatch of one cell breaks the encoder's BatchNorm; drop it (another cell at
            # random each epoch, as the loader shuffles).
            datasplitter_kwargs["drop_last"] = True
        mover = None
        self.moved_factors_: list[dict[str, Any]] = []
        if (
            move_confined
            and self.is_multistudy
            and self.module.prior is not None
            and self.module.latent_prior != "correlated"
        ):
            mover = MoveConfinedFactors(self)
            trainer_kwargs["callbacks"] = [*trainer_kwargs.get("callbacks", []), mover]
        # Lightning keeps the modules' train/eval state; after inference (eval mode) a further
        # train() call would otherwise run without dropout.
        self.module.train()
        result = super().train(
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            train_size=train_size,
            validation_size=validation_size,
            batch_size=batch_size,
            early_stopping=early_stopping,
            plan_kwargs=plan_kwargs,
            datasplitter_kwargs=datasplitter_kwargs,
            **trainer_kwargs,
        )
        if mover is not None:
            self.moved_factors_ = list(mover.moves)
        rotation = self.trainer.lightning_module.rotation_
        self.warmup_rotation_ = None if rotation is None else rotation.detach().cpu().numpy()
        bad = self.module.non_finite_parameters()
        if bad:
            raise DivergenceError(
                f"Training diverged: parameters are NaN or infinite after training "
                f"({', '.join(bad[:3])}). Lower the learning rate (e.g. `model.train(lr=1e-3)`) "
                "or check the data for extreme values."
            )
        epochs_run = int(self.trainer.current_epoch)
        # Masks are final only once the prior reached full strength (else the warning below).
        self._masks_final = self.module.prior is None or epochs_run > full_prior_epoch
        if not self._masks_final:
            self._warn(
                f"Training ended after {epochs_run} epochs, before the mask prior reached full "
                f"strength (epoch {full_prior_epoch + 1}: warm-up {schedule.warmup} and "
                f"spike ramp {schedule.ramp} epochs), so eta was never fitted and the "
                "inclusion probabilities do not select genes. Train for more epochs, or shorten "
                "n_epochs_prior_warmup / n_epochs_lambda0_ramp."
            )
        return result

    def _fit_restarts(self, n_restarts: int, kwargs: dict[str, Any]) -> Any:
        """Fit from ``n_restarts`` starts; keep the one with the highest training ELBO.

        Start ``r > 0`` is the fit that ``scvi.settings.seed = seed + r`` gives (a fresh network
        and a fresh minibatch order: re-seeding the network alone leaves every start with the
        same minibatch order); ``scvi.settings.seed`` is restored afterwards.
        """
        user_seed = scvi.settings.seed
        base = user_seed if user_seed is not None else 0
        best: tuple[float, dict[str, torch.Tensor], Any, Any] | None = None
        elbos = []
        try:
            for r in range(n_restarts):
                if r > 0:
                    scvi.settings.seed = base + r
                    self.module = self._module_cls(**self._module_kwargs)
                    self.is_trained_ = False
                result = self._fit_once(**kwargs)
                elbo = float(self.get_elbo())
                elbos.append(elbo)
                if best is None or elbo > best[0]:
                    state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
                    best = (elbo, state, self.history_, result)
        finally:
            scvi.settings.seed = user_seed
        _, state, history, result = best
        self.module.load_state_dict(state)
        self.history_ = history
        self.restart_elbos_ = elbos
        return result

    def _free_bits_specific(self, value: float | None) -> float:
        """``kl_free_bits_specific`` with its default filled in (0 for single-study models)."""
        if not self.module.is_multistudy:
            return 0.0
        return MULTISTUDY_FREE_BITS_SPECIFIC if value is None else float(value)

    def _lone_last_cell(self, train_size: float, batch_size: int) -> bool:
        """Whether the training cells would leave a last minibatch of a single cell."""
        n_train = int(np.ceil(train_size * self.adata.n_obs))
        return n_train > batch_size and n_train % batch_size == 1

    @torch.no_grad()
    def _warn_if_collapsed(self, max_cells: int = 2000) -> bool:
        """Warn when the encoder's posterior collapsed to the prior (factors carry no signal).

        The mean KL of ``q(z | x)`` to the prior over up to ``max_cells`` training cells (the
        training history is not kept when Lightning's logger is off). Returns whether it warned.
        """
        if self.module.prior is not None and self._all_factors_off():
            self._warn(
                "Every factor was switched off: no mask entry left the spike (all |w| < "
                "log(lambda0/lambda1)/(lambda0-lambda1)) and no gene has p* >= 0.5, so the "
                "factors explain nothing. Usually the encoder collapsed to the prior early in "
                "training (a KL warm-up, `model.train(n_epochs_kl_warmup=20)`, usually fixes "
                "it); otherwise the prior is too strong for these data (try a smaller "
                "`b` or `lambda0`)."
            )
            return True
        n = self.adata.n_obs
        rng = np.random.default_rng(0)
        idx = np.sort(rng.choice(n, size=min(n, max_cells), replace=False))
        was_training = self.module.training
        self.module.eval()
        total, count = 0.0, 0
        # fork_rng: the check samples z, and must not move the user's random stream.
        with torch.random.fork_rng():
            for tensors in self._make_data_loader(adata=self.adata, indices=idx, batch_size=512):
                _, _, losses = self.module(tensors)
                kl = losses.kl_local
                kl = sum(kl.values()) if isinstance(kl, dict) else kl
                total += float(kl.sum())
                count += int(kl.shape[0])
        last = total / max(count, 1)
        self.module.train(was_training)
        if np.isfinite(last) and last < COLLAPSE_KL:
            self._warn(
                "Posterior collapse: the factors carry almost no information about the cells "
                f"(KL of the encoder's posterior to the prior: {last:.3g} nats per cell), so "
                "every factor is noise and the mask prior switches them off. Retrain with a KL "
                "warm-up, e.g. `model.train(n_epochs_kl_warmup=20)`, or with another seed "
                "(`scvi.settings.seed`) or fewer factors."
            )
            return True
        return False

    def _warn_if_misassigned(self, max_cells: int = MAX_EFFECT_CELLS) -> None:
        """Multi-study: warn when the shared and specific masks look swapped.

        A shared factor quiet in some study, or a program in every study's specific
        mask (see :func:`sparsevae.tl.check_shared_specific`).
        """
        if not self.is_multistudy or self.module.prior is None:
            return
        idx = effect_cells(self.adata.n_obs, max_cells)
        was_training = self.module.training
        with torch.random.fork_rng():
            z = self.get_latent_representation(indices=idx)
        self.module.train(was_training)
        codes = pd.Categorical(
            self.adata.obs[self.study_key].astype(str).to_numpy()[idx], categories=self.studies
        ).codes
        selections = {k: is_selected(self.get_inclusion_probabilities(k)) for k in self.mask_kinds}
        effects = within_study_effects(self.module, z, codes, list(range(self.module.n_factors)))
        checks = shared_specific_checks(z, codes, self.factor_names, selections, effects=effects)
        if checks.ok:
            return
        self._warn(
            "The multi-study fit looks misassigned: "
            + "; ".join(checks.problems)
            + ". Refit with another seed (`scvi.settings.seed`) and check the new fit with "
            "`sparsevae.tl.check_shared_specific(model)`; if the checks keep failing, reconsider "
            "the numbers of shared and specific factors."
        )

    def _warn_if_unfaithful(self, max_cells: int = MAX_EFFECT_CELLS) -> None:
        """Warn when factors act mostly through genes their mask does not select.

        The rule of :func:`sparsevae.tl.mask_fidelity` on up to ``max_cells`` cells; masks
        whose spike gates are closed (unselected entries exactly zero) are skipped.
        """
        module = self.module
        if module.prior is None or not getattr(self, "_masks_final", True):
            return
        idx = effect_cells(self.adata.n_obs, max_cells)
        found = []
        for kind in self.mask_kinds:
            gated = module.gate_shared if kind == "shared" else module.gate_specific
            if module.gate_on and gated:
                continue
            with torch.random.fork_rng():
                effects = self.get_gene_effects(indices=idx, kind=kind)
            selected = is_selected(self.get_inclusion_probabilities(kind))[effects.columns]
            share, _, faithful = effect_share(effects.to_numpy(), selected.to_numpy())
            found += [
                f"{name} ({100 * sh:.0f}%)"
                for name, sh, ok in zip(effects.columns, share, faithful, strict=True)
                if not ok
            ]
        if not found:
            return
        self._warn(
            f"{len(found)} factor(s) act mostly through genes their mask does not select (share "
            f"of the gene effects on selected genes: {', '.join(found)}; at least "
            f"{100 * MIN_EFFECT_SHARE:.0f}% expected), so their selected genes, anchors and "
            "enrichment do not describe them. Train with `spike_gate=True` (on real counts with "
            "`prior_cells=200` too), which makes every unselected entry exactly zero for the "
            "decoder; details: `sparsevae.tl.mask_fidelity(model)`."
        )

    def _warn_if_mixture_collapsed(self, max_share: float = 0.9) -> None:
        """``latent_prior="mixture"``: warn when one component holds almost every cell."""
        if self.module.latent_prior != "mixture":
            return
        st = self._mixture_stats()
        if st["largest_share"] > max_share:
            self._warn(
                f"The mixture prior put {100 * st['largest_share']:.0f}% of the cells in one of "
                f"its {st['n_components']} components, so its clusters say little. Train longer "
                "(`max_epochs`), or try fewer components; Leiden on the factors "
                "(`sc.tl.leiden` on obsm['X_sparsevae']) is the alternative."
            )

    def _all_factors_off(self) -> bool:
        """Whether every factor of every mask is switched off (unused and unselected)."""
        prior = self.module.prior
        for kind in self.mask_kinds:
            W, eta = self.get_mask(kind), self.get_eta(kind)
            n_selected = is_selected(self.get_inclusion_probabilities(kind)).sum(axis=0)
            off, _ = factor_use(W.abs().max(axis=0), n_selected, eta, prior.w_off, prior.eta_off)
            if not off.all():
                return False
        return True


def _is_ddp(strategy: Any) -> bool:
    """Whether a Lightning strategy (name or object) is distributed data parallel."""
    if strategy is None:
        return False
    if isinstance(strategy, str):
        return "ddp" in strategy
    from lightning.pytorch.strategies import DDPStrategy

    return isinstance(strategy, DDPStrategy)
