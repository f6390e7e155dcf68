"""The run report: a table, report.json, report.md and plots."""

from .report import (  # noqa: F401  (the public names, re-exported)
    Report, layer_table, plot_norms, plot_history,
)
