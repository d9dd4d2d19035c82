"""Neural network building blocks."""

from ._decoder import MaskedDecoder

__all__ = ["MaskedDecoder"]
