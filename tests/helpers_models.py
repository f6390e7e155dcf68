"""Model functions for the ``package.module:function`` form of ``build_model`` (used by test_models.py)."""

from torch import nn


def tiny_net(in_channels, num_classes, input_size):
    """Takes the three builder arguments."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * input_size * input_size, num_classes))


def fixed_net():
    """Takes no arguments."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))


def wide_net(*, num_classes, width=1.0, **rest):
    """Takes width and swallows the rest."""
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(max(1, round(8 * width))), nn.ReLU(), nn.Linear(max(1, round(8 * width)), num_classes))


def needs_depth(depth, num_classes):
    """Has a required argument hwprune cannot supply."""
    return nn.Linear(depth, num_classes)


def not_a_model(**kwargs):
    """Returns something that is not an nn.Module."""
    return {"weight": 1}


def broken(**kwargs):
    """Raises inside the user's code."""
    raise RuntimeError("boom inside the user's model function")


NOT_CALLABLE = 3
