"""Built-in models, by name, and user models given as ``package.module:function`` or ``path/to/file.py:function``.

    >>> from hwprune.models import build_model, list_models
    >>> list_models()
    ['mobilenetv2', 'resnet20', 'resnet56', 'small-resnet', 'vgg16-bn']
    >>> model = build_model("small-resnet", in_channels=1, num_classes=10, input_size=8)

Every built-in is plain ``nn.Module`` code that ``torch.fx.symbolic_trace`` can trace, uses Kaiming
init, and takes ``width`` (a uniform channel multiplier: every layer gets ``max(1, round(c * width))``
channels), which is what the uniform-width baseline uses to rebuild a model thinner.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
import traceback
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import ModelError
from .mobilenet import MobileNetV2, mobilenetv2
from .resnet import ResNet, resnet20, resnet56, small_resnet
from .vgg import VGG, vgg16_bn

__all__ = ["build_model", "check_classifier", "list_models", "ResNet", "VGG", "MobileNetV2"]

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

    ``name`` is a built-in (see :func:`list_models`; case and ``_``/``-`` are ignored), a
    ``package.module:function`` reference, or a ``path/to/file.py:function`` reference (the path
    absolute or relative to the current directory; the file's folder is put on ``sys.path`` while it
    runs, so it can import its neighbours). **The reference forms import that module or run that file
    and call the function: they run the user's code.** The function is called with those of ``in_channels``,
    ``num_classes``, ``input_size`` (and ``width`` when it is not 1.0) that it accepts as keyword
    arguments (all of them if it takes ``**kwargs``), or with none if it takes no parameters; it must
    return an ``nn.Module``.

        >>> m = build_model("resnet20", in_channels=3, num_classes=10, input_size=32)
        >>> thin = build_model("resnet20", in_channels=3, num_classes=10, input_size=32, width=0.5)
        >>> m2 = build_model("mypkg.nets:make_net", in_channels=1, num_classes=10, input_size=28)  # doctest: +SKIP
        >>> m3 = build_model("examples/efficientnet_lite1.py:lite1_fashion", in_channels=1, num_classes=10,
        ...                  input_size=28)  # doctest: +SKIP
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelError(
            f"model name {name!r} is not usable; expected one of {', '.join(list_models())}, "
            f"a 'package.module:function' or a 'path/to/file.py:function' reference."
        )
    if is_file_reference(name):
        return _build_from_file(name, in_channels=in_channels, num_classes=num_classes,
                                input_size=input_size, width=width)
    if ":" in name:
        return _build_from_reference(name, in_channels=in_channels, num_classes=num_classes,
                                     input_size=input_size, width=width)
    builder = _BUILTINS.get(_canonical(name))
    if builder is None:
        raise ModelError(
            f"unknown model {name!r}; the built-in models are: {', '.join(list_models())}. "
            f"For your own model pass 'package.module:function' or 'path/to/file.py:function' (a function "
            f"that returns an nn.Module)."
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
            f"{type(e).__name__}: {e}.{_user_frames(e)}Fix the error in that module."
        ) from e
    return _call_model_function(ref, module, f"module {module_name!r}", attr, kwargs)


def is_file_reference(name: str) -> bool:
    """Whether ``name`` is the ``path/to/file.py:function`` form.

        >>> is_file_reference("nets/lite.py:make"), is_file_reference("mypkg.nets:make"), is_file_reference("resnet20")
        (True, False, False)
    """
    path, sep, _ = name.strip().rpartition(":")
    return bool(sep) and path.strip().endswith(".py")


def resolve_file_reference(ref: str) -> str:
    """A ``file.py:function`` reference with its path made absolute (from the current directory), so that
    a run folder can rebuild the model from anywhere; any other name as it is.

        >>> import os
        >>> resolve_file_reference("resnet20")
        'resnet20'
        >>> resolve_file_reference("nets/lite.py:make") == os.path.abspath("nets/lite.py") + ":make"
        True
    """
    if not is_file_reference(ref):
        return ref
    path, _, attr = ref.strip().rpartition(":")
    return f"{Path(path.strip()).expanduser().absolute()}:{attr.strip()}"


def model_tag(name: str) -> str:
    """A short name for run folders: ``nets/lite.py:make`` -> ``lite-make``; other names unchanged.

        >>> model_tag("/home/me/nets/lite.py:make"), model_tag("resnet20")
        ('lite-make', 'resnet20')
    """
    if not is_file_reference(name):
        return name
    path, _, attr = name.strip().rpartition(":")
    return f"{Path(path.strip()).stem}-{attr.strip()}"


def _build_from_file(ref: str, **kwargs) -> nn.Module:
    """``path/to/file.py:function``: run the file as a module (its folder on ``sys.path`` meanwhile) and
    call the function."""
    path_text, _, attr = (part.strip() for part in ref.strip().rpartition(":"))
    if not _DOTTED.match(attr):
        raise ModelError(f"model reference {ref!r} is malformed; expected 'path/to/file.py:function' (a Python "
                         f"name after the last ':'), e.g. 'models/net.py:make_net'.")
    path = Path(path_text).expanduser()
    where = path if path.is_absolute() else Path.cwd() / path
    if not where.is_file():
        raise ModelError(f"model reference {ref!r}: file {str(path)!r} does not exist"
                         + ("" if path.is_absolute() else f" (looked for {where}; a relative path is read from the "
                            "current directory)") + ".")
    where = where.resolve()
    stem = re.sub(r"\W", "_", where.stem)
    name = f"hwprune_user_model_{stem}_{hashlib.sha1(str(where).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, where)
    if spec is None or spec.loader is None:
        raise ModelError(f"model reference {ref!r}: {where} cannot be loaded as a Python file.")
    module = importlib.util.module_from_spec(spec)
    folder = str(where.parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    sys.modules[name] = module  # dataclasses, pickling and typing look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise ModelError(
            f"model reference {ref!r}: running file {str(path)!r} failed with {type(e).__name__}: {e}."
            f"{_user_frames(e)}Fix the error in that file."
        ) from e
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)
    return _call_model_function(ref, module, f"file {str(path)!r}", attr, kwargs)


def _call_model_function(ref: str, module, where: str, attr: str, kwargs: dict) -> nn.Module:
    """Look ``attr`` up in ``module`` (``where`` names it in errors), call it with the keywords it
    accepts, and check that it returned an ``nn.Module``."""
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                            and getattr(v, "__module__", module.__name__) == module.__name__)
            hint = f" Callables defined there: {', '.join(public[:12])}." if public else ""
            raise ModelError(f"model reference {ref!r}: {where} has no attribute {attr!r}.{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(
            f"model reference {ref!r}: {attr!r} in {where} is a {type(obj).__name__}, not a function; "
            f"it must be a function (or class) that returns an nn.Module."
        )
    example = torch.zeros(2, kwargs["in_channels"], kwargs["input_size"], kwargs["input_size"])
    num_classes = kwargs["num_classes"]
    call_kwargs = _accepted_kwargs(ref, obj, kwargs)
    try:
        model = obj(**call_kwargs)
    except Exception as e:
        # The user's code failed, not hwprune: one error naming the function and showing only the user's own
        # frames (the original exception stays attached as the cause, for the API and HWPRUNE_DEBUG=1).
        raise ModelError(
            f"model reference {ref!r}: the function, called with {call_kwargs}, raised "
            f"{type(e).__name__}: {e}.{_user_frames(e)}Fix the error in that function."
        ) from e
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model reference {ref!r}: function {attr!r} in {where} returned a {type(model).__name__}, expected a "
            f"torch.nn.Module. Return the model itself (not a state dict or a tuple)."
        )
    # A classifier for the data's inputs. A function given num_classes must build exactly that many outputs;
    # one that takes no num_classes may have more (an ImageNet head trained on 10 classes), never fewer
    check_classifier(model, example, num_classes, exact="num_classes" in call_kwargs,
                     what=f"model reference {ref!r}: the model")
    return model


def check_classifier(model: nn.Module, x: torch.Tensor, num_classes: int | None = None, *, exact: bool = True,
                     what: str = "the model") -> None:
    """Run ``model`` (evaluation mode, no gradients) on the input batch ``x`` and check that it returns
    what classification trains on: one tensor of logits ``(N, num_classes)`` (``exact=False``: at least
    ``num_classes`` logits). Raises :class:`ModelError` naming what it returned and what to change.

        >>> check_classifier(nn.Linear(4, 3), torch.zeros(2, 4), 3)
        >>> check_classifier(nn.Linear(4, 5), torch.zeros(2, 4), 3)
        Traceback (most recent call last):
        ...
        hwprune.errors.ModelError: the model returns a tensor of shape (2, 5) for a batch of 2 inputs of shape (4,); expected (2, 3): one logit per class of the data (3 classes). Give the last layer num_classes outputs (a model function that takes a num_classes parameter gets the data's count)
    """
    shape = tuple(x.shape[1:])
    was = [(m, m.training) for m in model.modules()]
    running: list[str] = []  # the modules whose forward is running, innermost last: where a failure is
    names = {m: n for n, m in model.named_modules()}

    def enter(m, args) -> None:
        running.append(names[m])

    def leave(m, args, out) -> None:  # returns None: the output stays the module's own
        running.pop()

    hooks = [m.register_forward_pre_hook(enter) for m in names] + [m.register_forward_hook(leave) for m in names]
    model.eval()  # BatchNorm's running statistics stay as they are
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        layer = running[-1] if running else ""
        at = f" at layer '{layer}' ({type(model.get_submodule(layer)).__name__})" if layer else ""
        raise ModelError(
            f"{what} fails on a batch of {len(x)} inputs of shape {shape} (the data's){at}: {type(e).__name__}: "
            f"{detail}.{_user_frames(e)}The model must accept the data's inputs: build it for them (a model "
            f"function gets in_channels, num_classes and input_size from the data when it accepts them; "
            f"--image-size changes the images' side), or choose data that fits the model."
        ) from e
    finally:
        for h in hooks:
            h.remove()
        for m, t in was:
            m.train(t)
    if not isinstance(out, torch.Tensor):
        if isinstance(out, dict):
            found = f"a {type(out).__name__} with keys {', '.join(map(repr, list(out)[:8]))}"
        elif isinstance(out, (tuple, list)):
            found = f"a {type(out).__name__} of {len(out)} items"
        else:
            found = f"a {type(out).__name__}"
        raise ModelError(
            f"{what} returns {found}; a classifier must return one tensor of logits, shape (N, "
            f"{num_classes if num_classes is not None else 'classes'}). Return the logits from forward (e.g. "
            f"`return out['logits']` or `return logits`), or wrap the model in a module whose forward does."
        )
    too_few = num_classes is not None and out.dim() == 2 and not exact and out.shape[1] < num_classes
    if too_few:
        raise ModelError(
            f"{what} returns {out.shape[1]} logits per input, but the data has {num_classes} classes: training "
            f"needs one logit per class. Give the last layer at least {num_classes} outputs (a model function that "
            f"takes a num_classes parameter gets the data's count)")
    if out.dim() != 2 or out.shape[0] != len(x) or (num_classes is not None and exact and out.shape[1] != num_classes):
        expected = f"({len(x)}, {num_classes})" if num_classes is not None else f"({len(x)}, classes)"
        raise ModelError(
            f"{what} returns a tensor of shape {tuple(out.shape)} for a batch of {len(x)} inputs of shape "
            f"{shape}; expected {expected}: one logit per class of the data"
            + (f" ({num_classes} classes)" if num_classes is not None else "")
            + ". Give the last layer num_classes outputs (a model function that takes a num_classes parameter "
            "gets the data's count)" + ("" if out.dim() == 2 else ", and flatten the features before it")
        )


_PACKAGE_DIR = Path(__file__).resolve().parent.parent
_TORCH_DIR = Path(torch.__file__).resolve().parent


def _user_frames(e: BaseException, limit: int = 6) -> str:
    """The traceback lines of ``e`` that are in the user's code (not hwprune's, not the import machinery's),
    innermost last, as an indented block on lines of its own; a single space when there are none."""
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if not f.filename.startswith("<") and not any(Path(f.filename).resolve().is_relative_to(d)
                                                            for d in (_PACKAGE_DIR, _TORCH_DIR))]
    if not frames:
        return " "
    lines = "".join(traceback.format_list(frames[-limit:])).rstrip("\n")
    return "\n" + lines + "\n"


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
