"""Tracing and group discovery."""

from . import attention, hf  # noqa: F401  (register nn.MultiheadAttention and transformers adapters)
from .discover import discover_groups

__all__ = ["discover_groups"]
