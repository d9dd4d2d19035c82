"""Command line interface: ``sparsevae demo`` and ``sparsevae fit``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData

    from .model import SparseVAE

__all__ = ["main"]


class _CLIError(Exception):
    """An error reported to the user as one line, without a traceback."""


class _Parser(argparse.ArgumentParser):
    """Argument parser whose errors are one line on stderr, with exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def _int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``, described as ``what`` in the error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


#: ``fit --spike-gate`` choices and the ``SparseVAE(spike_gate=...)`` values they stand for.
_SPIKE_GATES: dict[str, bool | str] = {"off": False, "on": True, "specific": "specific"}


def _prior_options(args: argparse.Namespace) -> dict[str, Any]:
    """``spike_gate`` and ``prior_cells`` as given (``--prior-cells 0``: all cells); none else."""
    options: dict[str, Any] = {}
    if args.spike_gate is not None:
        options["spike_gate"] = _SPIKE_GATES[args.spike_gate]
    if args.prior_cells is not None:
        options["prior_cells"] = args.prior_cells or None
    return options


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sparsevae",
        description="Sparse VAE: interpretable nonlinear factor models for single-cell data.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    demo = sub.add_parser(
        "demo",
        help="fit a SparseVAE to bundled PBMC counts and write results and plots",
        description=(
            "Fit a SparseVAE to approximate counts of scanpy's bundled pbmc68k_reduced "
            "(700 cells, 765 genes; no download) and write adata.h5ad, top_genes.csv, "
            "mask_heatmap.png and umap_factors.png into the output folder. It uses the "
            "package's setting for counts, spike gates with the mask prior weighed against "
            "200 cells; --spike-gate off --prior-cells 0 fits the exact MAP weight without gates."
        ),
    )
    demo.add_argument("--out", default="sparsevae_demo", help="output folder (created)")
    demo.add_argument(
        "--max-epochs",
        type=_positive_int,
        default=100,
        help="epochs (default: 100, a few minutes on a laptop CPU)",
    )
    demo.add_argument("--n-factors", type=_positive_int, default=10, help="number of factors")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.add_argument(
        "--spike-gate",
        default="on",
        choices=["off", "on"],
        help="on: a factor's mask says which genes it acts on (default: on)",
    )
    demo.add_argument(
        "--prior-cells",
        type=_non_negative_int,
        default=200,
        help="weigh the mask prior against at most this many cells; 0: all cells, the exact MAP "
        "weight (default: 200, the package's for counts)",
    )

    fit = sub.add_parser(
        "fit",
        help="fit a SparseVAE to an .h5ad file and write the results",
        description=(
            "Read IN.h5ad, fit a SparseVAE and write OUT.h5ad with the factors "
            "(obsm['X_<key>']), mask (varm['<key>_W']), inclusion probabilities "
            "(varm['<key>_pstar']) and settings (uns['<key>'])."
        ),
    )
    fit.add_argument("input", metavar="IN.h5ad", help="input AnnData")
    fit.add_argument("output", metavar="OUT.h5ad", help="output AnnData")
    fit.add_argument("--n-factors", type=_positive_int, required=True, help="number of factors")
    fit.add_argument("--layer", default=None, help="layer with the data (default: X)")
    fit.add_argument(
        "--likelihood",
        default="auto",
        choices=["auto", "nb", "zinb", "poisson", "gaussian"],
        help="observation model (auto: nb for integer counts, else gaussian)",
    )
    fit.add_argument(
        "--study-key",
        default=None,
        help="obs column naming each cell's study: fits the multi-study model (shared factors "
        "plus study-specific factors with one mask per study)",
    )
    fit.add_argument(
        "--n-specific-factors",
        type=_positive_int,
        default=None,
        help="study-specific factors of the multi-study model (default 5; needs --study-key)",
    )
    fit.add_argument(
        "--max-epochs", type=_positive_int, default=None, help="epochs (default: model default)"
    )
    fit.add_argument("--batch-size", type=_positive_int, default=128, help="minibatch size")
    fit.add_argument(
        "--prior-cells",
        type=_non_negative_int,
        default=None,
        help="weigh the mask prior against at most this many cells (e.g. 200: sparse masks with "
        "anchors on real counts with thousands of cells); 0: all cells, the exact MAP (default: "
        "the model's, 200 for counts, else all cells)",
    )
    fit.add_argument(
        "--spike-gate",
        default=None,
        choices=list(_SPIKE_GATES),
        help="on: the decoder sees mask entries with p* < 0.5 as zero, so a factor's mask says "
        "which genes it acts on; with --prior-cells 200 the recipe for sparse masks with anchors "
        "on real counts. specific: gate the study-specific masks only (default: the model's, on "
        "for counts, else off)",
    )
    fit.add_argument("--seed", type=int, default=0, help="random seed (scvi.settings.seed)")
    fit.add_argument(
        "--accelerator",
        default="auto",
        choices=["auto", "cpu", "gpu", "cuda", "mps", "tpu"],
        help="Lightning accelerator (default auto: a GPU when there is one)",
    )
    fit.add_argument(
        "--no-effects",
        action="store_true",
        help="skip the signed gene effects (varm[KEY_effect]): a forward and a backward "
        "decoder pass over the cells, the slow part of writing results on large data",
    )
    fit.add_argument("--key-added", default="sparsevae", help="base name of the result keys")
    fit.add_argument("--save-model", metavar="DIR", default=None, help="also save the model here")
    fit.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing OUT, model folder and result keys",
    )
    return parser


# ---------------------------------------------------------------------------- helpers
def _use_agg() -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)


def _top_genes(adata: AnnData, key: str, n_top: int = 20) -> pd.DataFrame:
    """Top selected genes of each factor by ``|W|`` (:func:`sparsevae.tl.anchor_genes`)."""
    from . import tl

    columns = ["factor", "rank", "gene", "weight", "pstar"]
    return tl.anchor_genes(adata, n_top=n_top, key=key)[columns]


def _train(
    model: SparseVAE, max_epochs: int | None, batch_size: int = 128, accelerator: str = "auto"
) -> tuple[int, float]:
    """Train with the progress bar; return the number of epochs and the seconds taken.

    The summary that ``train()`` logs is printed by the caller instead (to stdout).
    """
    import logging

    from .model import default_max_epochs

    epochs = max_epochs if max_epochs is not None else default_max_epochs(model.adata.n_obs)
    start = time.perf_counter()
    log = logging.getLogger("sparsevae")
    level = log.level
    log.setLevel(max(level, logging.WARNING))
    try:
        model.train(max_epochs=epochs, batch_size=batch_size, accelerator=accelerator)
    finally:
        log.setLevel(level)
    return epochs, time.perf_counter() - start


def _set_seed(seed: int) -> None:
    import scvi

    scvi.settings.seed = seed


# ---------------------------------------------------------------------------- demo
def _run_demo(args: argparse.Namespace) -> None:
    _use_agg()
    import matplotlib.pyplot as plt
    import numpy as np
    import scanpy as sc

    from . import pl, tl
    from .datasets import pbmc68k_reduced_counts
    from .model import SparseVAE

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise _CLIError(f"--out {str(out)!r} exists and is not a folder.")
    out.mkdir(parents=True, exist_ok=True)

    _set_seed(args.seed)
    adata = pbmc68k_reduced_counts()
    SparseVAE.setup_anndata(adata, layer="counts")
    model = SparseVAE(adata, n_factors=args.n_factors, **_prior_options(args))
    epochs, seconds = _train(model, args.max_epochs)

    model.write_results(adata, key_added="sparsevae", overwrite=True)
    _top_genes(adata, "sparsevae", n_top=20).to_csv(out / "top_genes.csv", index=False)

    ax = pl.mask_heatmap(adata, n_top=10, show=False, save=out / "mask_heatmap.png")
    plt.close(ax.figure)

    sc.pp.neighbors(adata, use_rep="X_sparsevae", random_state=args.seed)
    sc.tl.umap(adata, random_state=args.seed)
    fig = sc.pl.umap(
        adata, color="bulk_labels", show=False, return_fig=True, title="UMAP of SparseVAE factors"
    )
    fig.savefig(out / "umap_factors.png", dpi=150, bbox_inches="tight")
    plt.close(fig)

    adata.write_h5ad(out / "adata.h5ad")

    labels = adata.obs["bulk_labels"]
    n_splits = int(min(5, labels.value_counts().min()))
    acc = tl.celltype_accuracy(adata.obsm["X_sparsevae"], labels, n_splits=n_splits)
    from .priors import DEFAULT_MIN_PSTAR

    results = tl.read_results(adata)
    selected = results.selected("shared")
    n_selected, n_any = selected.sum(axis=0), int(selected.any(axis=1).sum())
    n_anchors = results.anchors("shared", DEFAULT_MIN_PSTAR).sum(axis=0)

    lines = [
        "SparseVAE demo: pbmc68k_reduced (approximate counts)",
        f"  cells: {adata.n_obs}  genes: {adata.n_vars}  factors: {model.module.n_factors}",
        f"  likelihood: {model.likelihood}  epochs: {epochs}  training time: {seconds:.1f} s",
        f"  spike gates: {args.spike_gate}  prior weighed against: "
        + (f"{int(model.module.prior_cells)} cells" if model.module.prior_cells else "all cells"),
        f"  selected genes (p* >= {DEFAULT_MIN_PSTAR}) and anchors (selected by that factor "
        f"only) per factor, {n_any} genes in total:",
    ]
    width = max(len(str(f)) for f in n_selected.index)
    lines += [
        f"    {f!s:<{width}}  {int(n):4d} genes  {int(n_anchors[f]):4d} anchors"
        for f, n in n_selected.items()
    ]
    if n_any == 0:
        lines.append(
            f"  note: no mask entry has p* >= {DEFAULT_MIN_PSTAR}, so top_genes.csv is empty; "
            "mask_heatmap.png shows the largest |W| instead."
        )
    lines += [
        f"  cell-type prediction from the factors (bulk_labels, {acc['n_splits']}-fold logistic "
        f"regression): accuracy {acc['mean']:.3f} +/- {acc['std']:.3f}",
        f"  chance (majority class): {np.max(labels.value_counts(normalize=True)):.3f}",
        f"  wrote {out / 'adata.h5ad'}, {out / 'top_genes.csv'}, {out / 'mask_heatmap.png'}, "
        f"{out / 'umap_factors.png'}",
    ]
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------------------- fit
def _check_fit_paths(args: argparse.Namespace) -> None:
    src = Path(args.input)
    if not src.exists():
        raise _CLIError(f"input file {args.input!r} does not exist.")
    if not src.is_file():
        raise _CLIError(f"input {args.input!r} is not a file.")
    dst = Path(args.output)
    if dst.resolve() == src.resolve():
        raise _CLIError("OUT.h5ad must differ from IN.h5ad.")
    if dst.exists() and not args.overwrite:
        raise _CLIError(f"output {args.output!r} exists; pass --overwrite to replace it.")
    if not dst.parent.resolve().is_dir():
        raise _CLIError(f"the folder of output {args.output!r} does not exist.")
    if args.save_model is not None:
        model_dir = Path(args.save_model)
        if model_dir.exists() and any(model_dir.iterdir()) and not args.overwrite:
            raise _CLIError(
                f"model folder {args.save_model!r} exists and is not empty; pass --overwrite."
            )


def _read(path: str) -> AnnData:
    import anndata as ad

    try:
        return ad.read_h5ad(path)
    except Exception as e:
        raise _CLIError(f"could not read {path!r} as an .h5ad file: {_one_line(e)}") from e


def _run_fit(args: argparse.Namespace) -> None:
    _check_fit_paths(args)
    adata = _read(args.input)
    if args.layer is not None and args.layer not in adata.layers:
        available = ", ".join(map(repr, adata.layers.keys())) or "none"
        raise _CLIError(f"layer {args.layer!r} not in {args.input!r} (layers: {available}).")
    if args.n_specific_factors is not None and args.study_key is None:
        raise _CLIError("--n-specific-factors needs --study-key (the obs column of the studies).")
    if args.spike_gate == "specific" and args.study_key is None:
        raise _CLIError(
            "--spike-gate specific gates the study-specific masks and needs --study-key; "
            "use --spike-gate on for a single-study fit."
        )
    if args.study_key is not None and args.study_key not in adata.obs:
        available = ", ".join(map(repr, adata.obs.columns[:20])) or "none"
        raise _CLIError(
            f"--study-key {args.study_key!r} is not a column of adata.obs in {args.input!r} "
            f"(columns: {available})."
        )

    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from .model import SparseVAE

    _set_seed(args.seed)
    SparseVAE.setup_anndata(adata, layer=args.layer, study_key=args.study_key)
    model = SparseVAE(
        adata,
        n_factors=args.n_factors,
        n_specific_factors=args.n_specific_factors,
        likelihood=args.likelihood,
        **_prior_options(args),
    )
    try:
        epochs, seconds = _train(
            model, args.max_epochs, batch_size=args.batch_size, accelerator=args.accelerator
        )
    except MisconfigurationException as e:
        raise _CLIError(f"--accelerator {args.accelerator!r}: {_one_line(e)}") from e
    print(model.training_summary(), flush=True)
    model.write_results(
        adata, key_added=args.key_added, overwrite=args.overwrite, effects=not args.no_effects
    )
    adata.write_h5ad(args.output)
    if args.save_model is not None:
        model.save(args.save_model, overwrite=True)
    from . import tl

    results = tl.read_results(adata, args.key_added)
    selected = {kind: results.selected(kind).sum(axis=0) for kind in results.kinds}
    counts = "; ".join(
        (f"{kind}: " if model.is_multistudy else "") + ", ".join(str(int(n)) for n in n_sel)
        for kind, n_sel in selected.items()
    )
    n_spec = model.module.n_specific_factors if model.is_multistudy else 0
    factors = f"{model.module.n_factors} factors" + (
        f" + {n_spec} specific factors x {len(model.studies)} studies" if n_spec else ""
    )
    effects = "" if args.no_effects else f", varm['{args.key_added}_effect...']"
    print(
        f"SparseVAE: {adata.n_obs} cells x {adata.n_vars} genes, {factors}, "
        f"likelihood {model.likelihood}, {epochs} epochs in {seconds:.1f} s; "
        f"selected genes per factor: {counts}",
        flush=True,
    )
    print(
        f"wrote {args.output} (obsm['X_{args.key_added}'], varm['{args.key_added}_W"
        f"{'_<shared|study>' if model.is_multistudy else ''}']{effects}, "
        f"uns['{args.key_added}'])" + (f" and model {args.save_model}" if args.save_model else ""),
        flush=True,
    )


# ---------------------------------------------------------------------------- entry point
def _one_line(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sparsevae`` command line interface.

    ``sparsevae demo`` fits a model to bundled PBMC counts and writes results and plots;
    ``sparsevae fit IN.h5ad OUT.h5ad --n-factors K`` fits a model to a file. Errors are printed
    as one ``error: ...`` line on stderr with exit code 2 (set ``SPARSEVAE_DEBUG=1`` for the
    traceback).

    Parameters
    ----------
    argv
        Arguments without the program name; default ``sys.argv[1:]``.

    Returns
    -------
    Exit code 0 on success (errors raise :class:`SystemExit` with code 2).
    """
    args = _build_parser().parse_args(argv)
    runner = {"demo": _run_demo, "fit": _run_fit}[args.command]
    try:
        runner(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:
        if os.environ.get("SPARSEVAE_DEBUG"):
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
