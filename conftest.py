"""Root pytest configuration: runs the tutorials (``tutorials/*.ipynb``, via nbmake) in fast mode.

The tutorial notebooks read ``SPARSEVAE_FAST`` in their first cell: ``1`` means few epochs and
subsampled data, so that all of them execute in a few minutes. Their stored outputs come from a
full run (``SPARSEVAE_FAST=0``). Notebooks that read files from ``../shared`` (the project's shared
data) are skipped with a reason when that folder is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared"

#: Files under ``../shared`` that a tutorial reads, by notebook name.
NEEDS_SHARED = {
    "01_zeisel.ipynb": "data/zeisel2015.h5ad",
    "02_enrichment.ipynb": "genesets/h.all.v7.5.1.symbols.gmt",
}


def pytest_configure(config: pytest.Config) -> None:
    """Put the tutorials in fast mode (the kernels nbmake starts inherit the environment)."""
    os.environ.setdefault("SPARSEVAE_FAST", "1")
    os.environ.setdefault("SPARSEVAE_SHARED", str(SHARED))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tutorials slow; skip those whose shared input files are missing."""
    for item in items:
        if str(item.fspath).endswith(".ipynb"):
            item.add_marker(pytest.mark.slow)
        needed = NEEDS_SHARED.get(Path(str(item.fspath)).name)
        if needed and not (SHARED / needed).exists():
            item.add_marker(pytest.mark.skip(reason=f"needs ../shared/{needed} (absent)"))
