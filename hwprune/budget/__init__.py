"""Budgets, what they cost, and how widths are allocated to meet them.

:mod:`.projection` (Budget, project), :mod:`.cost` (FLOPs and parameter models), :mod:`.allocation`
(how many units each group keeps), :mod:`.sensitivity` (measured loss curves for the allocation)."""

from .projection import (  # noqa: F401  (the public names, re-exported)
    DEFAULT_ALLOCATION, BudgetKind, KINDS, Budget, Projection, reachable, check_budget, project,
)
