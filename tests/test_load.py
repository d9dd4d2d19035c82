"""Loading model files: no code from the file runs, genuine files round-trip exactly."""

from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pytest
import torch

from sparsevae import SparseVAE
from sparsevae.model import UnsafeModelFileError

LEGACY = Path(__file__).parent / "data" / "legacy_models"


class _Payload:
    """Unpickling this creates a file: what an attacker's model file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _payload_file(folder: Path, marker: Path, where: str) -> None:
    """A model file with the payload hidden in ``where``; a genuine file's layout otherwise."""
    saved = torch.load(LEGACY / "single" / "model.pt", weights_only=False)  # our own test file
    if where == "var_names":
        saved["var_names"] = _Payload(marker)
    elif where == "registry":
        saved["attr_dict"]["registry_"]["setup_args"]["layer"] = _Payload(marker)
    else:
        saved["model_state_dict"]["extra"] = _Payload(marker)
    folder.mkdir()
    torch.save(saved, folder / "model.pt")
    anndata.read_h5ad(LEGACY / "single" / "adata.h5ad").write_h5ad(folder / "adata.h5ad")


@pytest.mark.parametrize("where", ["var_names", "registry", "state_dict"])
@pytest.mark.parametrize("with_adata", [False, True])
def test_payload_file_runs_nothing(tmp_path: Path, where: str, with_adata: bool) -> None:
    marker = tmp_path / "PAYLOAD_RAN"
    _payload_file(tmp_path / "m", marker, where)
    # The payload is live: plain pickle loading runs it.
    torch.load(tmp_path / "m" / "model.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    adata = anndata.read_h5ad(LEGACY / "single" / "adata.h5ad") if with_adata else None
    with pytest.raises(UnsafeModelFileError, match=r"not allowed.*trusted sources"):
        SparseVAE.load(tmp_path / "m", adata=adata)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["single", "multi"])
@pytest.mark.parametrize("with_adata", [False, True])
def test_files_of_the_previous_release_load_exactly(kind: str, with_adata: bool) -> None:
    """Files written by 0.1.0 (tests/data/make_legacy_models.py) give the factors they gave."""
    folder = LEGACY / kind
    adata = anndata.read_h5ad(folder / "adata.h5ad") if with_adata else None
    model = SparseVAE.load(folder, adata=adata)
    expected = np.load(folder / "latent.npy")
    # The same weights; the arithmetic may differ in the last bits between library versions
    # (3.6e-7 with numpy 2.4 / scipy 1.17), while a wrong weight moves the factors by O(1).
    assert np.abs(model.get_latent_representation() - expected).max() <= 1e-5
    # 0.1.0 recorded the data matrix among the setup arguments; it is not carried forward.
    assert "X" not in model.adata_manager.registry["setup_args"]
    assert model.is_multistudy == (kind == "multi")
    # Trained before the spike gates: loaded with every gate open, and trained on without them
    # (also for a multi-study model on counts, whose new default has gates).
    assert not model.module.spike_gate and model.module.prior_cells is None
    assert bool((model.module.decoder.gate == 1).all())


def test_new_files_round_trip_exactly(tmp_path: Path) -> None:
    model = SparseVAE.load(LEGACY / "multi")
    model.save(tmp_path / "m", save_anndata=True)
    again = SparseVAE.load(tmp_path / "m")
    np.testing.assert_array_equal(
        again.get_latent_representation(), model.get_latent_representation()
    )
    for kind in model.mask_kinds:
        np.testing.assert_array_equal(again.get_mask(kind), model.get_mask(kind))
    # A new file holds no copy of the data in its registry.
    saved = torch.load(tmp_path / "m" / "model.pt", weights_only=False)
    assert set(saved["attr_dict"]["registry_"]["setup_args"]) == {
        "layer", "size_factor_key", "study_key", "auxiliary_key"
    }  # fmt: skip


def test_files_without_the_prior_options_load_with_the_old_defaults(tmp_path: Path) -> None:
    """A multi-study file written before the gates' multi-study default keeps them off."""
    model = SparseVAE.load(LEGACY / "multi")
    model.save(tmp_path / "m", save_anndata=True)
    saved = torch.load(tmp_path / "m" / "model.pt", weights_only=False)
    kwargs = saved["attr_dict"]["init_params_"]["kwargs"]["module_kwargs"]
    assert kwargs["spike_gate"] is False and kwargs["prior_cells"] is None
    del kwargs["spike_gate"], kwargs["prior_cells"]  # as written before the default changed
    assert "decoder.gate" in saved["model_state_dict"]  # a file from after the gates
    torch.save(saved, tmp_path / "m" / "model.pt")
    again = SparseVAE.load(tmp_path / "m")
    assert not again.module.spike_gate and again.module.prior_cells is None
