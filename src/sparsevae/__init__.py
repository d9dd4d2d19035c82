"""sparsevae: identifiable, interpretable nonlinear factors of single-cell data."""

import logging as _logging

from . import datasets, pl, tl
from ._version import __version__
from .model import SparseVAE

# As scvi-tools does for its own logger: INFO messages (the summary after training) are shown;
# configure logging.getLogger("sparsevae") to change that.
_logger = _logging.getLogger("sparsevae")
if not _logger.handlers:
    _handler = _logging.StreamHandler()
    _handler.setFormatter(_logging.Formatter("%(message)s"))
    _logger.addHandler(_handler)
    _logger.setLevel(_logging.INFO)
    _logger.propagate = False

__all__ = ["SparseVAE", "__version__", "datasets", "pl", "tl"]
