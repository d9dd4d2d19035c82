"""Tools on trained models."""

from ._metrics import celltype_accuracy

__all__ = ["celltype_accuracy"]
