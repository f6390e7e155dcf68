"""Structured regularizers behind one interface; importing this package registers them all."""

from .base import (REGISTRY, RegContext, Regularizer, SeparationProgress, SparsitySchedule, StrengthController,
                   build_regularizer, make_config, register, separation)
from . import autoprune, baselines, fluctuation, gradual, ista, oneshot, polarization, wgsef  # noqa: F401  (registers)

__all__ = ["REGISTRY", "RegContext", "Regularizer", "SeparationProgress", "SparsitySchedule", "separation", "StrengthController", "build_regularizer", "make_config", "register"]
