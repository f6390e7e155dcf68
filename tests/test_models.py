"""Built-in models: they build, run, trace with torch.fx, thin with width; user models load by reference."""

import functools
import os
import sys

import pytest
import torch
import torch.fx
from torch import nn

from hwprune.errors import ModelError
from hwprune.models import build_model, list_models

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers_models.py for the 'module:function' form

SHAPES = [(1, 10, 8), (1, 10, 28), (3, 10, 32)]
BUILTINS = ["small-resnet", "resnet20", "resnet56", "vgg16-bn", "mobilenetv2"]




def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@functools.lru_cache(maxsize=None)
def full_params(name: str) -> int:
    """Parameters of the width-1 model for 3x32x32 input (cached: VGG-16 takes a while to initialise)."""
    return n_params(build_model(name, in_channels=3, num_classes=10, input_size=32))


def test_list_models():
    assert list_models() == sorted(BUILTINS)


@pytest.mark.parametrize("name", BUILTINS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_builtin_forward_and_trace(name, shape):
    c, k, s = shape
    torch.manual_seed(0)
    model = build_model(name, in_channels=c, num_classes=k, input_size=s).eval()
    x = torch.randn(2, c, s, s)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, k)
    assert torch.isfinite(y).all()
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), y)


@pytest.mark.parametrize("name", BUILTINS)
def test_width_makes_it_thinner(name):
    kw = dict(in_channels=3, num_classes=10, input_size=32)
    half = build_model(name, **kw, width=0.5)
    assert n_params(half) < 0.4 * full_params(name)  # roughly quadratic in width
    assert half(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    tiny = build_model(name, **kw, width=0.01)  # every layer keeps at least one channel
    assert tiny(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_published_sizes():
    """Parameter counts match the papers' CIFAR models (ResNet-20 0.27M, ResNet-56 0.85M, VGG-16 14.7M)."""
    assert round(full_params("resnet20") / 1e6, 2) == 0.27
    assert round(full_params("resnet56") / 1e6, 2) == 0.86
    assert round(full_params("vgg16-bn") / 1e6, 1) == 14.7
    assert round(full_params("mobilenetv2") / 1e6, 1) == 2.2


def test_small_resnet_structure():
    m = build_model("small-resnet", in_channels=1, num_classes=10, input_size=8)
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert {c.out_channels for c in convs} == {80, 160}
    assert any(c.kernel_size == (1, 1) and c.stride == (2, 2) for c in convs), "1x1 downsampling shortcut"
    assert any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())
    bns = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)]
    assert all(torch.all(b.weight == 1) and torch.all(b.bias == 0) for b in bns)


def test_vgg_skips_pools_on_small_inputs():
    pools = lambda s: sum(isinstance(mod, nn.MaxPool2d) for mod in  # noqa: E731
                          build_model("vgg16-bn", in_channels=1, num_classes=10, input_size=s, width=0.1).modules())
    assert (pools(8), pools(28), pools(32)) == (3, 4, 5)


def test_names_are_forgiving_and_unknown_names_list_the_valid_ones():
    assert isinstance(build_model("VGG16_BN", in_channels=1, num_classes=3, input_size=8, width=0.1), nn.Module)
    with pytest.raises(ModelError, match="unknown model 'resnet18'.*small-resnet"):
        build_model("resnet18", in_channels=3, num_classes=10, input_size=32)
    with pytest.raises(ModelError, match="in_channels=0"):
        build_model("resnet20", in_channels=0, num_classes=10, input_size=32)
    with pytest.raises(ModelError, match="width=-1"):
        build_model("resnet20", in_channels=3, num_classes=10, input_size=32, width=-1)


def test_reference_form_calls_the_user_function():
    m = build_model("helpers_models:tiny_net", in_channels=1, num_classes=7, input_size=8)
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 7)
    m = build_model("helpers_models:fixed_net", in_channels=1, num_classes=3, input_size=8)
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 3)  # called with no arguments
    m = build_model("helpers_models:fixed_net", in_channels=1, num_classes=2, input_size=8)  # more logits than classes
    with pytest.raises(ModelError, match="returns 3 logits per input, but the data has 10 classes"):
        build_model("helpers_models:fixed_net", in_channels=1, num_classes=10, input_size=8)  # fewer: training would crash
    m = build_model("helpers_models:wide_net", in_channels=1, num_classes=5, input_size=8, width=0.5)
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 5) and m[1].out_features == 4


@pytest.mark.parametrize("ref, message", [
    ("helpers_models:", "malformed"),
    (":tiny_net", "malformed"),
    ("helpers_models:tiny net", "malformed"),
    ("a:b:c", "malformed"),
    ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
    ("helpers_models:missing", "has no attribute 'missing'.*tiny_net"),
    ("helpers_models:NOT_CALLABLE", "is a int, not a function"),
    ("helpers_models:needs_depth", "requires depth"),
    ("helpers_models:not_a_model", "returned a dict, expected a torch.nn.Module"),
])
def test_reference_errors_name_the_string(ref, message):
    with pytest.raises(ModelError, match=message) as info:
        build_model(ref, in_channels=1, num_classes=10, input_size=8)
    assert repr(ref) in str(info.value)


def test_reference_width_needs_a_width_parameter():
    with pytest.raises(ModelError, match="takes no 'width' parameter"):
        build_model("helpers_models:tiny_net", in_channels=1, num_classes=10, input_size=8, width=0.5)


def test_errors_raised_by_user_code_name_the_function_and_keep_the_cause():
    with pytest.raises(ModelError, match=r"'helpers_models:broken': the function, called with .*, raised "
                                         r"RuntimeError: .*boom") as info:
        build_model("helpers_models:broken", in_channels=1, num_classes=10, input_size=8)
    assert 'helpers_models.py", line' in str(info.value) and "in broken" in str(info.value)  # the user's frame
    assert isinstance(info.value.__cause__, RuntimeError)
