"""Scale: training from data on disk (backed AnnData) and passes over the cells in batches."""

from __future__ import annotations

import anndata
import numpy as np
import scvi

from sparsevae import SparseVAE

from .conftest import QUIET, small_counts


def test_trains_from_a_backed_h5ad_without_loading_it(tmp_path):
    adata = small_counts(n_cells=150)
    adata.write_h5ad(tmp_path / "counts.h5ad")
    backed = anndata.read_h5ad(tmp_path / "counts.h5ad", backed="r")
    SparseVAE.setup_anndata(backed)
    scvi.settings.seed = 0
    model = SparseVAE(backed, n_factors=2, n_hidden=8)
    model.train(max_epochs=3, **QUIET)
    assert backed.isbacked  # the counts were never loaded into the AnnData
    model.write_results(backed, batch_size=32)
    z = backed.obsm["X_sparsevae"]
    assert z.shape == (150, 2) and np.isfinite(z).all()
    assert np.isfinite(backed.varm["sparsevae_effect"]).all()
    # The same cells in memory give the same factors and effects from the trained network.
    memory = backed.to_memory()
    np.testing.assert_allclose(model.get_latent_representation(memory), z, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        model.get_gene_effects(memory, batch_size=7).to_numpy(),
        backed.varm["sparsevae_effect"],
        rtol=1e-4,
        atol=1e-6,
    )
