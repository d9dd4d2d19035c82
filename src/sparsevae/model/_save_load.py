"""Reading a saved model file without running code from it.

``torch.save`` writes a pickle, and unpickling can call any function the file names. A model
file is therefore read with a restricted unpickler (the "restricting globals" recipe of Python's
``pickle`` documentation): it builds tensors, plain containers and the few data types a genuine
SparseVAE file holds (numpy arrays, the pandas tables of the training history, scipy sparse
matrices of files written by 0.1.0) and refuses any other function or class before calling it.
(torch's own ``weights_only=True`` reader cannot be used: it refuses the ``defaultdict`` that
scvi-tools stores in every file.)
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import tempfile
import types
from typing import Any

import anndata
import pandas as pd
import torch
from anndata import AnnData

from ..module import STUDY_KEY
from ._validate import check_known_studies, check_new_data, compare_var_names

__all__ = ["SaveLoadMixin", "UnsafeModelFileError", "read_model_file"]

#: Legacy setup arguments: files written by 0.1.0 recorded local variables of
#: ``setup_anndata`` (the data matrix and a message fragment) as if they were arguments.
LEGACY_SETUP_ARGS = ("X", "where")

#: Globals a genuine model file may name, as ``(module, name)`` in the pickle -> where to find
#: them in the installed packages (several candidates where packages moved them).
_ALLOWED: dict[tuple[str, str], tuple[str, ...]] = {
    ("collections", "OrderedDict"): ("collections.OrderedDict",),
    ("collections", "defaultdict"): ("collections.defaultdict",),
    ("builtins", "dict"): ("builtins.dict",),
    ("builtins", "list"): ("builtins.list",),
    ("builtins", "set"): ("builtins.set",),
    ("builtins", "frozenset"): ("builtins.frozenset",),
    ("builtins", "slice"): ("builtins.slice",),
    ("builtins", "bytes"): ("builtins.bytes",),
    ("builtins", "bytearray"): ("builtins.bytearray",),
    ("builtins", "complex"): ("builtins.complex",),
    ("_codecs", "encode"): ("_codecs.encode",),
    ("torch._utils", "_rebuild_tensor_v2"): ("torch._utils._rebuild_tensor_v2",),
    ("torch._utils", "_rebuild_parameter"): ("torch._utils._rebuild_parameter",),
    ("torch", "Size"): ("torch.Size",),
    ("torch", "device"): ("torch.device",),
    ("numpy", "ndarray"): ("numpy.ndarray",),
    ("numpy", "dtype"): ("numpy.dtype",),
    ("numpy.core.multiarray", "_reconstruct"): (
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray._reconstruct",
    ),
    ("numpy._core.multiarray", "_reconstruct"): (
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray._reconstruct",
    ),
    ("numpy.core.multiarray", "scalar"): (
        "numpy._core.multiarray.scalar",
        "numpy.core.multiarray.scalar",
    ),
    ("numpy._core.multiarray", "scalar"): (
        "numpy._core.multiarray.scalar",
        "numpy.core.multiarray.scalar",
    ),
    # pandas 3 pickles its public names
    ("pandas", "DataFrame"): ("pandas.DataFrame",),
    ("pandas", "Series"): ("pandas.Series",),
    ("pandas", "Index"): ("pandas.Index",),
    ("pandas", "RangeIndex"): ("pandas.RangeIndex",),
    ("pandas", "StringDtype"): ("pandas.StringDtype",),
    ("pandas.arrays", "StringArray"): ("pandas.arrays.StringArray",),
    ("pandas._libs.arrays", "__pyx_unpickle_NDArrayBacked"): (
        "pandas._libs.arrays.__pyx_unpickle_NDArrayBacked",
    ),
    # pandas 2 pickles the defining modules
    ("pandas.core.frame", "DataFrame"): ("pandas.core.frame.DataFrame",),
    ("pandas.core.series", "Series"): ("pandas.core.series.Series",),
    ("pandas.core.internals.managers", "BlockManager"): (
        "pandas.core.internals.managers.BlockManager",
    ),
    ("pandas.core.internals.managers", "SingleBlockManager"): (
        "pandas.core.internals.managers.SingleBlockManager",
    ),
    ("pandas._libs.internals", "_unpickle_block"): ("pandas._libs.internals._unpickle_block",),
    ("pandas.core.indexes.base", "_new_Index"): ("pandas.core.indexes.base._new_Index",),
    ("pandas.core.indexes.base", "Index"): ("pandas.core.indexes.base.Index",),
    ("pandas.core.indexes.range", "RangeIndex"): ("pandas.core.indexes.range.RangeIndex",),
    ("scipy.sparse._csr", "csr_matrix"): ("scipy.sparse._csr.csr_matrix",),
    ("scipy.sparse._csc", "csc_matrix"): ("scipy.sparse._csc.csc_matrix",),
    ("scipy.sparse._csr", "csr_array"): ("scipy.sparse._csr.csr_array",),
    ("scipy.sparse._csc", "csc_array"): ("scipy.sparse._csc.csc_array",),
}


class UnsafeModelFileError(ValueError):
    """Raised when a model file holds objects that a genuine SparseVAE file does not."""


def _resolve(dotted: str) -> Any | None:
    module, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


class _ForbiddenGlobalError(pickle.UnpicklingError):
    """A pickle named a function or class outside the allow-list."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that builds only the allowed globals (``find_class`` is its only way to them)."""

    def find_class(self, module: str, name: str) -> Any:
        module = "builtins" if module == "__builtin__" else module
        candidates = _ALLOWED.get((module, name))
        obj = next((o for o in map(_resolve, candidates or ()) if o is not None), None)
        if obj is None and module == "numpy.dtypes" and name.endswith("DType"):
            obj = _resolve(f"numpy.dtypes.{name}")  # numpy's dtype classes, e.g. Float32DType
        if obj is None and module == "torch" and isinstance(_resolve(f"torch.{name}"), torch.dtype):
            obj = _resolve(f"torch.{name}")  # torch's dtypes, e.g. torch.float32
        if obj is None:
            raise _ForbiddenGlobalError(f"forbidden global {module}.{name}")
        return obj


#: What ``torch.load(pickle_module=...)`` needs of a pickle module.
_restricted_pickle = types.ModuleType("sparsevae_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler  # type: ignore[attr-defined]
_restricted_pickle.load = lambda f, **kw: _RestrictedUnpickler(f, **kw).load()  # type: ignore[attr-defined]
_restricted_pickle.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]


def read_model_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a file written by :meth:`~sparsevae.SparseVAE.save`, running no code from it.

    Parameters
    ----------
    path
        The ``model.pt`` file.

    Returns
    -------
    The saved dict (``model_state_dict``, ``var_names``, ``attr_dict``), with legacy setup
    arguments removed from the registry.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    UnsafeModelFileError
        The file names a function or class outside the allow-list, or is not a model file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No saved SparseVAE at {path} (expected the file save() writes).")
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        saved = torch.load(
            io.BytesIO(raw), map_location="cpu", pickle_module=_restricted_pickle,
            weights_only=False,
        )  # fmt: skip
    except _ForbiddenGlobalError as err:
        raise UnsafeModelFileError(
            f"{path} holds objects that are not allowed in a SparseVAE model file ({err}), so it "
            "was not loaded and nothing in it was run. A model file can carry code: load model "
            "files only from trusted sources."
        ) from None
    except Exception as err:  # a damaged or foreign file: torch raises many kinds
        raise UnsafeModelFileError(
            f"{path} is not a SparseVAE model file (it could not be read: {err})."
        ) from None
    if not isinstance(saved, dict) or not {"model_state_dict", "var_names", "attr_dict"} <= set(
        saved
    ):
        raise UnsafeModelFileError(
            f"{path} is not a SparseVAE model file (it lacks the model_state_dict, var_names and "
            "attr_dict entries that save() writes)."
        )
    attr_dict = saved["attr_dict"]
    registry = attr_dict.get("registry_", {}) if isinstance(attr_dict, dict) else {}
    setup_args = registry.get("setup_args") if isinstance(registry, dict) else None
    if isinstance(setup_args, dict):
        for key in LEGACY_SETUP_ARGS:
            setup_args.pop(key, None)
    _add_open_gates(saved)
    _keep_old_prior_defaults(saved)
    return saved


def _keep_old_prior_defaults(saved: dict[str, Any]) -> None:
    """Files that do not record ``spike_gate`` and ``prior_cells`` load with both off.

    Models on counts record both since they default to them
    (:data:`~sparsevae.module.COUNT_DEFAULTS`); a file without them was written before
    that, or by a model whose defaults are these (the module's), so further training keeps them.
    """
    init = saved["attr_dict"].get("init_params_")
    kwargs = init.setdefault("kwargs", {}) if isinstance(init, dict) else None
    if not isinstance(kwargs, dict):
        return
    module_kwargs = kwargs.setdefault("module_kwargs", {})
    if isinstance(module_kwargs, dict):
        module_kwargs.setdefault("spike_gate", False)
        module_kwargs.setdefault("prior_cells", None)


def _add_open_gates(saved: dict[str, Any]) -> None:
    """Files from before the spike gates: every gate open.

    Such a model was trained with every mask entry reaching the decoder, so it is loaded with
    its gates open (and, as it records neither option, with ``spike_gate=False`` and
    ``prior_cells=None``: :func:`_keep_old_prior_defaults`).
    """
    state = saved["model_state_dict"]
    if not isinstance(state, dict) or "decoder.W" not in state or "decoder.gate" in state:
        return
    state["decoder.gate"] = torch.ones_like(state["decoder.W"])
    if "decoder.W_specific" in state:
        state["decoder.gate_specific"] = torch.ones_like(state["decoder.W_specific"])


class SaveLoadMixin:
    """Loading of :class:`~sparsevae.SparseVAE` through the restricted reader."""

    @classmethod
    def load(
        cls,
        dir_path: str | os.PathLike,
        adata: AnnData | None = None,
        *,
        prefix: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Load a saved model, checking ``adata`` like training data.

        The model file is read with a restricted unpickler that builds only the data types a
        genuine file holds, so a crafted file cannot run code; anything else raises
        :class:`~sparsevae.model.UnsafeModelFileError`. Still, load model files only from
        trusted sources.

        Parameters
        ----------
        dir_path
            Folder written by :meth:`save`.
        adata
            AnnData to attach; default the AnnData saved with the model (``save_anndata=True``).
            It must have the model's genes and, multi-study, cells of the trained studies only
            (any subset of them); its data get the checks of training data.
        prefix
            Prefix of the saved file names, as given to :meth:`save`.
        **kwargs
            Passed to :meth:`scvi.model.base.BaseModelClass.load` (e.g. ``accelerator``).

        Returns
        -------
        The loaded model.
        """
        file_name = f"{prefix or ''}model.pt"
        saved = read_model_file(os.path.join(dir_path, file_name))
        registry = saved["attr_dict"].get("registry_", {})
        if registry.get("model_name", cls.__name__) != cls.__name__:
            raise ValueError(
                f"{dir_path} holds a {registry['model_name']} model, not a {cls.__name__}."
            )
        if adata is None:
            adata_path = os.path.join(dir_path, f"{prefix or ''}adata.h5ad")
            if os.path.exists(adata_path):
                adata = anndata.read_h5ad(adata_path)
        else:
            compare_var_names(pd.Index(saved["var_names"]), pd.Index(adata.var_names))
            setup_args = registry.get("setup_args", {})
            likelihood = saved["attr_dict"]["init_params_"]["non_kwargs"]["likelihood"]
            check_new_data(adata, setup_args.get("layer"), likelihood)
            study_key = setup_args.get("study_key")
            if study_key is not None:
                state = registry["field_registries"][STUDY_KEY]["state_registry"]
                studies = [str(c) for c in state["categorical_mapping"]]
                check_known_studies(adata, study_key, studies)
        # scvi-tools reads the file again, with pickle's full powers: give it a copy written
        # from the objects the restricted reader built, never the original bytes.
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(saved, os.path.join(tmp, file_name))
            return super().load(tmp, adata=adata, prefix=prefix, **kwargs)
