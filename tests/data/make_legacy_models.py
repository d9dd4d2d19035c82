"""Writes the model files that ``tests/test_load.py`` loads: files of an earlier release.

Run from the repository root at the commit named in ``tests/data/legacy_models/README.md``
(``python tests/data/make_legacy_models.py``). Each folder holds ``model.pt`` and ``adata.h5ad``
(``SparseVAE.save(..., save_anndata=True)``) and ``latent.npy``, the factors of the saved AnnData
computed by the model that wrote the file.
"""

from pathlib import Path

import numpy as np
import scvi
import torch

import sparsevae
from sparsevae import SparseVAE

torch.set_num_threads(1)
OUT = Path(__file__).resolve().parent / "legacy_models"
QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False}


def main() -> None:
    scvi.settings.seed = 0
    single = sparsevae.datasets.simulate_programs(
        n_cells=60, n_genes=20, n_factors=2, genes_per_program=6, n_shared_genes=1, seed=0
    )
    SparseVAE.setup_anndata(single)
    model = SparseVAE(single, n_factors=2, n_hidden=8)
    model.train(max_epochs=2, **QUIET)
    model.save(OUT / "single", overwrite=True, save_anndata=True)
    np.save(OUT / "single" / "latent.npy", model.get_latent_representation())

    multi = sparsevae.datasets.simulate_multistudy(
        n_studies=2,
        n_genes=24,
        n_shared=1,
        n_specific=1,
        n_cells_per_study=30,
        genes_per_program=6,
        seed=0,
    )
    SparseVAE.setup_anndata(multi, study_key="study")
    model = SparseVAE(multi, n_factors=2, n_specific_factors=1, n_hidden=8)
    model.train(max_epochs=2, **QUIET)
    model.save(OUT / "multi", overwrite=True, save_anndata=True)
    np.save(OUT / "multi" / "latent.npy", model.get_latent_representation())


if __name__ == "__main__":
    main()
