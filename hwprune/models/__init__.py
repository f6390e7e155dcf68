"""Built-in models, by name, and user models given as ``package.module:function``.

    >>> from hwprune.models import build_model, list_models
    >>> list_models()
    ['mobilenetv2', 'resnet20', 'resnet56', 'small-resnet', 'vgg16-bn']
    >>> model = build_model("small-resnet", in_channels=1, num_classes=10, input_size=8)

Every built-in is plain ``nn.Module`` code that ``torch.fx.symbolic_trace`` can trace, uses Kaiming
init, and takes ``width`` (a uniform channel multiplier: every layer gets ``max(1, round(c * width))``
channels), which is what the uniform-width baseline uses to rebuild a model thinner.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Callable

from torch import nn

from ..errors import ModelError
from .mobilenet import MobileNetV2, mobilenetv2
from .resnet import ResNet, resnet20, resnet56, small_resnet
from .vgg import VGG, vgg16_bn

__all__ = ["build_model", "list_models", "ResNet", "VGG", "MobileNetV2"]

_BUILTINS: dict[str, Callable[..., nn.Module]] = {
    "small-resnet": small_resnet,
    "resnet20": resnet20,
    "resnet56": resnet56,
    "vgg16-bn": vgg16_bn,
    "mobilenetv2": mobilenetv2,
}

_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def list_models() -> list[str]:
    """Names of the built-in models, sorted.

        >>> "resnet20" in list_models()
        True
    """
    return sorted(_BUILTINS)


def _canonical(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def build_model(name: str, *, in_channels: int, num_classes: int, input_size: int, width: float = 1.0) -> nn.Module:
    """Build a fresh, randomly initialised model for inputs of shape ``(N, in_channels, input_size, input_size)``.

    ``name`` is a built-in (see :func:`list_models`; case and ``_``/``-`` are ignored) or a
    ``package.module:function`` reference. **The reference form imports that module and calls the
    function: it runs the user's code.** The function is called with those of ``in_channels``,
    ``num_classes``, ``input_size`` (and ``width`` when it is not 1.0) that it accepts as keyword
    arguments (all of them if it takes ``**kwargs``), or with none if it takes no parameters; it must
    return an ``nn.Module``.

        >>> m = build_model("resnet20", in_channels=3, num_classes=10, input_size=32)
        >>> thin = build_model("resnet20", in_channels=3, num_classes=10, input_size=32, width=0.5)
        >>> m2 = build_model("mypkg.nets:make_net", in_channels=1, num_classes=10, input_size=28)  # doctest: +SKIP
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelError(
            f"model name {name!r} is not usable; expected one of {', '.join(list_models())} "
            f"or a 'package.module:function' reference."
        )
    if ":" in name:
        return _build_from_reference(name, in_channels=in_channels, num_classes=num_classes,
                                     input_size=input_size, width=width)
    builder = _BUILTINS.get(_canonical(name))
    if builder is None:
        raise ModelError(
            f"unknown model {name!r}; the built-in models are: {', '.join(list_models())}. "
            f"For your own model pass 'package.module:function' (a function that returns an nn.Module)."
        )
    return builder(in_channels=in_channels, num_classes=num_classes, input_size=input_size, width=width)


def _build_from_reference(ref: str, **kwargs) -> nn.Module:
    module_name, _, attr = (part.strip() for part in ref.partition(":"))
    form = "expected 'package.module:function', e.g. 'mypkg.nets:make_net'"
    if ref.count(":") != 1 or not _DOTTED.match(module_name) or not _DOTTED.match(attr):
        raise ModelError(f"model reference {ref!r} is malformed; {form} (dotted Python names, one ':').")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ModelError(
            f"model reference {ref!r}: cannot import module {module_name!r} ({e}). Check the spelling, "
            f"and that its folder is on PYTHONPATH or the package is installed."
        ) from e
    except Exception as e:
        raise ModelError(
            f"model reference {ref!r}: importing module {module_name!r} failed with "
            f"{type(e).__name__}: {e}. Fix the error in that module."
        ) from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            hint = f" Callables there: {', '.join(public[:12])}." if public else ""
            raise ModelError(f"model reference {ref!r}: module {module_name!r} has no attribute {attr!r}.{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(
            f"model reference {ref!r}: {attr!r} is a {type(obj).__name__}, not a function; "
            f"it must be a function (or class) that returns an nn.Module."
        )
    call_kwargs = _accepted_kwargs(ref, obj, kwargs)
    try:
        model = obj(**call_kwargs)
    except Exception as e:
        e.add_note(f"(raised by the user's model function {ref!r}, called with {call_kwargs})")
        raise
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model reference {ref!r} returned a {type(model).__name__}, expected a torch.nn.Module. "
            f"Return the model itself (not a state dict or a tuple)."
        )
    return model


def _accepted_kwargs(ref: str, fn, kwargs: dict) -> dict:
    """The keyword arguments of ``kwargs`` that ``fn`` accepts; errors if a required one is missing."""
    width = kwargs.pop("width")
    if width != 1.0:
        kwargs["width"] = width
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: call with everything
        return kwargs
    params = sig.parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return kwargs
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    accepted = {k: v for k, v in kwargs.items() if k in names}
    missing = [p.name for p in params if p.default is p.empty
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in accepted]
    if missing:
        raise ModelError(
            f"model reference {ref!r}: the function requires {', '.join(missing)}, which hwprune cannot "
            f"supply; it can pass in_channels, num_classes, input_size and width as keywords. "
            f"Give the other parameters defaults."
        )
    if "width" in kwargs and "width" not in accepted:
        raise ModelError(
            f"model reference {ref!r}: width={width} was asked for, but the function takes no 'width' "
            f"parameter; add `width: float = 1.0` to it, or use width 1.0."
        )
    return accepted
