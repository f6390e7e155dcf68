"""Helpers shared by the built-in model families: channel rounding, init and argument checks."""

from __future__ import annotations

from torch import nn

from ..errors import ModelError


def scaled(channels: int, width: float) -> int:
    """Channels of a layer after a width multiplier: ``max(1, round(channels * width))``.

        >>> scaled(64, 0.5), scaled(3, 0.1)
        (32, 1)
    """
    return max(1, int(round(channels * width)))


def check_args(family: str, *, in_channels, num_classes, input_size, width) -> None:
    """Raise ``ModelError`` unless the shared builder arguments are usable.

        >>> check_args("resnet20", in_channels=3, num_classes=10, input_size=32, width=1.0)
    """
    for key, value in (("in_channels", in_channels), ("num_classes", num_classes), ("input_size", input_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelError(
                f"{family}: {key}={value!r} is not usable; expected a positive integer "
                f"(e.g. {key}=1 for grayscale input). Pass the dataset's value, e.g. bundle.{key}."
            )
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0 or width != width:
        raise ModelError(
            f"{family}: width={width!r} is not usable; expected a positive number "
            f"(1.0 = the published widths, 0.5 = half the channels in every layer)."
        )


def kaiming_init(model: nn.Module) -> nn.Module:
    """Kaiming-normal (fan_out, ReLU) convs, BN weight 1 / bias 0, Linear default (Kaiming-uniform) with zero bias.

        >>> m = kaiming_init(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
        >>> bool((m[1].weight == 1).all())
        True
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            m.reset_parameters()
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model
