"""Tracing and group discovery."""

from .discover import discover_groups

__all__ = ["discover_groups"]
