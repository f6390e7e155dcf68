"""Typed errors for everything a user can get wrong.

Every error hwprune raises for bad input is a ``HwpruneError`` (a ``ValueError``), and its message
says what was found, what was expected and what to do. The CLI prints the message alone, without a
traceback.
"""


class HwpruneError(ValueError):
    """Base class: a problem with the user's input or environment, with a message that says what to do."""


class TargetError(HwpruneError):
    """A target YAML file is missing, malformed or names something impossible."""


class ModelError(HwpruneError):
    """The model cannot be traced, grouped or sliced as asked (names the layer and the op)."""


class BudgetError(HwpruneError):
    """A budget that cannot be met, with the reachable range."""


class DataError(HwpruneError):
    """A dataset that cannot be found or read."""


class PlanError(HwpruneError):
    """A plan that does not match the model it is applied to."""


class CheckpointError(HwpruneError):
    """A checkpoint or run folder that cannot be used to resume."""


class RuntimeUnavailable(HwpruneError):
    """The target's runtime or device cannot be reached from this machine."""


class TvmUnavailable(RuntimeUnavailable):
    """TVM is not installed (it is an optional extra)."""


class ProfileError(HwpruneError):
    """A latency profile that is missing, malformed, or does not cover the model (names file and key)."""


class ExportError(HwpruneError):
    """A run folder that cannot be exported as asked."""


class DivergedError(HwpruneError):
    """Training diverged (the loss or the unit scores became NaN or infinite, or a layer collapsed); the
    last good checkpoint is kept."""
