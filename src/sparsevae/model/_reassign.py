"""Multi-study training: hand shared factors that vary in one study only to that study's mask.

A shared factor that varies in one study and is quiet in the others fits as well as a specific
factor of that study (the symmetry described in the multi-study guide), so the likelihood does
not move it; likewise a program that every study's specific mask carries on the same specific
factor fits as well as a shared factor. From half-way through the epochs with the full mask prior
(the prior has switched the unused factors off by then) until a quarter of them remain, at the
end of each epoch (:meth:`MoveConfinedFactors.check_epochs`; after a move it pauses for a tenth of
those epochs, :meth:`MoveConfinedFactors.settle_epochs`, so that the masks refit first), this
callback runs the fit's own check
(:func:`shared_specific_checks`, the same that :func:`sparsevae.tl.check_shared_specific`
reports), hands every shared factor confined to one study over to an unused specific factor of
that study (:meth:`~sparsevae.module.SparseVAEModule.move_to_specific`), and every program
repeated on one specific factor in all studies to an unused shared factor
(:meth:`~sparsevae.module.SparseVAEModule.move_to_shared`), or, when no unused factor is left,
exchanges the two (:meth:`~sparsevae.module.SparseVAEModule.swap_roles`; gene by gene,
:meth:`~sparsevae.module.SparseVAEModule.swap_roles_by_gene`, with a shared factor that carries
the programs of several studies on different genes; such a factor, when it carries the programs
of two or more studies and no slot is free or repeated, swaps with the slot whose gene sets
overlap most across studies). Then, gene by gene:
a shared factor that drives some of its genes in one study only (:func:`confined_genes`: a
study's program that shares a factor with a shared one) hands those genes to a copy of itself in
an unused specific factor of that study
(:meth:`~sparsevae.module.SparseVAEModule.split_to_specific`). The remaining epochs refit the
masks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback

from ..priors import factor_use, is_selected
from ._checks import (
    CONFINED_GENES_COLUMNS,
    MAX_EFFECT_CELLS,
    confined_genes,
    effect_cells,
    jaccard,
    shared_specific_checks,
    within_study_effects,
)

if TYPE_CHECKING:
    from ._model import SparseVAE

__all__ = ["MoveConfinedFactors"]


class MoveConfinedFactors(Callback):
    """Lightning callback: move misassigned factors between the shared and specific masks.

    The checks behind a move are measured on one epoch's posterior means, and a confined factor's
    spread ratio can sit near ``min_ratio`` and cross it from one epoch to the next, or only once
    another program has moved off its factor; so the check runs at the end of every epoch of
    :meth:`check_epochs`, moves what it finds, and then pauses for :meth:`settle_epochs` epochs
    while the masks refit.

    Parameters
    ----------
    model
        The multi-study :class:`~sparsevae.SparseVAE` being trained.
    min_ratio
        A shared factor is confined when its spread (sd of its posterior means) in one study is
        at least ``min_ratio`` times its spread in every other study.
    max_cells
        Training cells (at most) on which the spreads are computed.
    """

    def __init__(
        self, model: SparseVAE, min_ratio: float = 3.0, max_cells: int = MAX_EFFECT_CELLS
    ) -> None:
        self.model = model
        self.min_ratio = float(min_ratio)
        self.max_cells = int(max_cells)
        self.moves: list[dict[str, Any]] = []
        self.next_check = 0

    @staticmethod
    def move_epoch(full_prior_epoch: int, max_epochs: int) -> int:
        """The first epoch after which factors may move: half-way through the full prior's epochs.

        By then ``eta`` has switched the unused factors off (it is held at 0.5 until the prior
        reaches full strength), and half of those epochs remain to refit the masks.
        """
        return full_prior_epoch + max(0, max_epochs - full_prior_epoch) // 2 - 1

    @classmethod
    def check_epochs(cls, full_prior_epoch: int, max_epochs: int) -> range:
        """The epochs after which the check may run.

        From :meth:`move_epoch` until a quarter of the full prior's epochs remain (at least one
        check), so that a quarter of them is left to refit the masks after the last possible move.
        """
        first = cls.move_epoch(full_prior_epoch, max_epochs)
        n_full = max(0, max_epochs - full_prior_epoch)
        return range(first, max(first + 1, max_epochs - max(1, n_full // 4)))

    @staticmethod
    def settle_epochs(full_prior_epoch: int, max_epochs: int) -> int:
        """Epochs without a check after a move: a tenth of the full prior's epochs (at least 1)."""
        return max(1, max(0, max_epochs - full_prior_epoch) // 10)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """In the check epochs, unless settling after a move, move the misassigned factors."""
        full_prior_epoch, max_epochs = pl_module.schedule.full_prior_epoch, int(trainer.max_epochs)
        epoch = int(pl_module.current_epoch)
        if epoch not in self.check_epochs(full_prior_epoch, max_epochs) or epoch < self.next_check:
            return
        moves = self.move(pl_module.module)
        if moves:
            self.moves.extend({**m, "epoch": epoch} for m in moves)
            self.next_check = epoch + 1 + self.settle_epochs(full_prior_epoch, max_epochs)

    @staticmethod
    def _free_slots(module: Any, masks: list[Any]) -> list[int]:
        """Specific factors that select no gene in any study (switched off or unselected)."""
        prior = module.prior_specific
        free = []
        for slot in range(module.n_specific_factors):
            off = [
                any(
                    factor_use(
                        float(m.W[:, slot].abs().max()), int(is_selected(m.p_star[:, slot]).sum()),
                        float(m.eta[slot]), prior.w_off, prior.eta_off,
                    )
                )
                for m in masks[1:]
            ]  # fmt: skip
            if all(off):
                free.append(slot)
        return free

    @staticmethod
    def _free_shared(module: Any, mask: Any) -> list[int]:
        """Shared factors that select no gene (switched off or unselected)."""
        prior = module.prior
        off, unselected = factor_use(
            mask.W.abs().amax(0).cpu().numpy(), is_selected(mask.p_star).sum(0).cpu().numpy(),
            mask.eta.cpu().numpy(), prior.w_off, prior.eta_off,
        )  # fmt: skip
        return [int(k) for k in np.flatnonzero(off | unselected)]

    @torch.no_grad()
    def move(self, module: Any) -> list[dict[str, Any]]:
        """Find confined shared factors and free specific slots; move; return what moved."""
        model = self.model
        idx = effect_cells(model.adata.n_obs, self.max_cells)
        was_training = module.training
        module.eval()
        parts = []
        # fork_rng: iterating a data loader draws from torch's global generator; the check must
        # not change training's later random draws (a fit where nothing moves is then the same
        # fit as with move_confined=False).
        with torch.random.fork_rng():
            for tensors in model._make_data_loader(adata=model.adata, indices=idx, batch_size=512):
                parts.append(module.posterior(tensors).loc.cpu().numpy())
        module.train(was_training)
        z = np.concatenate(parts)
        codes = pd.Categorical(
            model.adata.obs[model.study_key].astype(str).to_numpy()[idx],
            categories=model.studies,
        ).codes
        masks = module.masks()
        names = model.mask_kinds
        selections = {
            kind: pd.DataFrame(
                is_selected(m.p_star).cpu().numpy(), columns=model.kind_factor_names(kind)
            )
            for kind, m in zip(names, masks, strict=True)
        }
        checks = shared_specific_checks(
            z, codes, list(model.factor_names), selections, self.min_ratio
        )
        free = self._free_slots(module, masks)
        free_shared = self._free_shared(module, masks[0])
        moves: list[dict[str, Any]] = []
        confined = checks.confined
        pending_confined = []
        for factor, row in confined[confined["flagged"]].iterrows():
            varies = [v for v in str(row["varies_in"]).split(";") if v]
            if len(varies) != 1:
                continue
            k = list(model.shared_factor_names).index(str(factor))
            item = {"factor": str(factor), "study": varies[0], "n_genes": int(row["n_genes"]),
                    "ratio": float(row["ratio"])}  # fmt: skip
            if not free:
                pending_confined.append((k, item))
                continue
            slot = free.pop(0)
            module.move_to_specific(k, model.studies.index(varies[0]), slot)
            moves.append({"kind": "to_specific", **item, "slot": slot})
        stuck = []  # repeated slots with neither a free shared factor nor a confined one
        for _, row in checks.repeated.iterrows():
            slots = {str(f).split(":", 1)[1] for f in str(row["factors"]).split(";")}
            if not row["in_all_studies"] or len(slots) != 1:
                continue  # not in every study, or carried on different slots
            slot = list(model.specific_factor_names).index(slots.pop())
            item = {"slot": slot, "n_genes": int(row["n_genes"]), "jaccard": float(row["jaccard"])}
            if free_shared:
                k = free_shared.pop(0)
                module.move_to_shared(slot, k)
                moves.append({"kind": "to_shared", "factor": model.shared_factor_names[k], **item})
            elif pending_confined:
                k, conf = pending_confined.pop(0)
                module.swap_roles(k, model.studies.index(conf["study"]), slot)
                moves.append({"kind": "swap", **conf, "slot": slot})
            else:
                stuck.append(slot)
        if stuck:
            moves.extend(self._swap_split(module, z, codes, selections["shared"], stuck, moves))
        elif not free and not moves:
            # No free slot and no repeated one: a shared factor that carries the programs of
            # several studies, gene by gene, swaps with the slot that looks most like a shared
            # program (the specific slots then hold pieces of the program the factor lost).
            slot = self._most_repeated_slot(masks[1:])
            moves.extend(
                self._swap_split(
                    module, z, codes, selections["shared"], [slot], moves, min_studies=2
                )
            )
        if free:
            moves.extend(self._split(module, z, codes, selections["shared"], free, moves))
        return moves

    def _confined_table(
        self,
        module: Any,
        z: np.ndarray,
        codes: np.ndarray,
        selected: pd.DataFrame,
        moved: list[dict[str, Any]],
    ) -> pd.DataFrame:
        """:func:`confined_genes` of the shared factors that select genes and have not moved."""
        model = self.model
        taken = {m["factor"] for m in moved if "factor" in m}
        names = list(model.shared_factor_names)
        factors = [k for k, name in enumerate(names) if name not in taken and selected[name].any()]
        if not factors:
            return pd.DataFrame(columns=CONFINED_GENES_COLUMNS)
        effects = within_study_effects(module, z, codes, factors)
        selected = selected.set_axis(model.adata.var_names, axis=0)
        return confined_genes(
            effects, selected[[names[k] for k in factors]], model.studies, self.min_ratio
        )

    def _swap_split(
        self,
        module: Any,
        z: np.ndarray,
        codes: np.ndarray,
        selected: pd.DataFrame,
        slots: list[int],
        moved: list[dict[str, Any]],
        min_studies: int = 1,
    ) -> list[dict[str, Any]]:
        """Exchange slots with shared factors that carry study programs gene by gene.

        For a slot that carries one program in every study when no factor is free: a shared
        factor most of whose selected genes are confined to one study or another (each study's
        program on one shared factor) takes the slot's program, and each study's slot takes the
        factor's genes confined to that study (:meth:`SparseVAEModule.swap_roles_by_gene`).
        ``min_studies``: only factors with confined genes in at least this many studies.
        """
        model = self.model
        table = self._confined_table(module, z, codes, selected, moved)
        if table.empty:
            return []
        var_names = model.adata.var_names
        candidates = []
        for factor, rows in table.groupby("factor", sort=False):
            n_confined = int(rows["n_genes"].sum())
            if len(rows) < min_studies:
                continue
            if 2 * n_confined >= int(selected[factor].sum()):  # mostly study programs
                candidates.append((n_confined, str(factor), rows))
        candidates.sort(key=lambda c: -c[0])
        swaps = []
        for slot in slots:
            if not candidates:
                break
            n_confined, factor, rows = candidates.pop(0)
            genes = torch.zeros(len(model.studies), len(var_names), dtype=torch.bool)
            for _, row in rows.iterrows():
                genes[model.studies.index(row["study"])] = torch.as_tensor(
                    var_names.isin(row["genes"].split(";"))
                )
            k = list(model.shared_factor_names).index(factor)
            module.swap_roles_by_gene(k, slot, genes, drop_from_factor=genes.any(0))
            swaps.append(
                {"kind": "swap_split", "factor": factor, "studies": ";".join(rows["study"]),
                 "n_genes": n_confined, "slot": slot}
            )  # fmt: skip
        return swaps

    @staticmethod
    def _most_repeated_slot(specific_masks: list[Any]) -> int:
        """The specific slot whose selected genes overlap most across studies (mean Jaccard)."""
        sets = [is_selected(m.p_star).cpu().numpy() for m in specific_masks]
        best, best_score = 0, -1.0
        for slot in range(sets[0].shape[1]):
            scores = [
                jaccard(sets[i][:, slot], sets[j][:, slot])
                for i in range(len(sets))
                for j in range(i + 1, len(sets))
            ]
            score = float(np.mean(scores)) if scores else 0.0
            if score > best_score:
                best, best_score = slot, score
        return best

    def _split(
        self,
        module: Any,
        z: np.ndarray,
        codes: np.ndarray,
        selected: pd.DataFrame,
        free: list[int],
        moved: list[dict[str, Any]],
    ) -> list[dict[str, Any]]:
        """Hand the genes that a shared factor drives in one study only to a free slot."""
        model = self.model
        names = list(model.shared_factor_names)
        table = self._confined_table(module, z, codes, selected, moved)
        splits = []
        # One row, so one split, per factor and study (confined_genes).
        for _, row in table.sort_values("n_genes", ascending=False).iterrows():
            if not free:
                break
            slot = free.pop(0)
            genes = torch.as_tensor(model.adata.var_names.isin(row["genes"].split(";")))
            module.split_to_specific(
                names.index(row["factor"]), model.studies.index(row["study"]), slot, genes
            )
            splits.append(
                {"kind": "split_to_specific", "factor": row["factor"], "study": row["study"],
                 "n_genes": int(row["n_genes"]), "ratio": float(row["ratio"]), "slot": slot}
            )  # fmt: skip
        return splits
