"""Exporters: turn a (sliced) model into an artifact for the target's runtime."""
