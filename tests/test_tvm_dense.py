"""The TVM dense path: hand-scheduled builds compute what torch computes; the library loads alone."""

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("tvm")

from hwprune.errors import ModelError
from hwprune.graph import discover_groups
from hwprune.models import build_model
from hwprune.apply.slicing import slice_model
from hwprune.runtimes.tvm.dense import build_dense
from hwprune.runtimes.tvm.dense.kernels import conv_tile

from conftest import cli_env
from test_groups import random_keep
from topologies import TOPOLOGIES, randomize_bn

HAND_TOPOLOGIES = ["residual", "depthwise", "concat"]  # the others use ops the hand path refuses


def _close(build, model, x, tol=1e-4):
    ref = model(x).detach().numpy()
    got = build.run(x)
    assert got.shape == ref.shape
    # absolute 1e-4 on outputs of order one; relative beyond that (BN-randomized nets reach 1e2)
    assert np.max(np.abs(got - ref)) <= tol * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("name", HAND_TOPOLOGIES)
def test_hand_build_matches_torch_on_sliced_topologies(name):
    cls, shape = TOPOLOGIES[name]
    torch.manual_seed(0)
    model = randomize_bn(cls()).eval()
    x = torch.randn(shape)
    groups = discover_groups(model, x)
    # random widths: channel counts that are not multiples of 8 exercise the zero padding
    sliced = slice_model(copy.deepcopy(model), groups, random_keep(groups, 3)).eval()
    build = build_dense(sliced, x, "host-cpu")
    assert build.schedule == "hand" and "hand schedule" in build.label
    _close(build, sliced, x)


@pytest.mark.parametrize("name,channels,size,width", [
    ("small-resnet", 1, 8, 0.3), ("resnet20", 3, 32, 0.25),
    pytest.param("mobilenetv2", 3, 16, 0.25, marks=pytest.mark.slow),
    pytest.param("vgg16-bn", 3, 32, 0.125, marks=pytest.mark.slow),
])
def test_hand_build_matches_torch_on_builtin_models(name, channels, size, width):
    torch.manual_seed(0)
    model = randomize_bn(build_model(name, in_channels=channels, num_classes=10, input_size=size, width=width)).eval()
    x = torch.randn(1, channels, size, size)
    _close(build_dense(model, x, "host-cpu"), model, x)


def test_pooling_and_linear_variants_match_torch():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 12, 3, padding=1, bias=True)
            self.c2 = nn.Conv2d(12, 12, 3, padding=2, dilation=2, stride=2)
            self.fc1 = nn.Linear(12 * 4 * 4, 20)
            self.fc2 = nn.Linear(20, 3)

        def forward(self, x):
            x = nn.functional.max_pool2d(torch.relu(self.c(x)), 3, stride=2, padding=1, ceil_mode=True)
            x = nn.functional.avg_pool2d(self.c2(x), 2, stride=1, count_include_pad=False, padding=1)
            return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 11, 11)
    _close(build_dense(model, x, "host-cpu"), model, x)


def test_unsupported_op_names_the_layer():
    cls, shape = TOPOLOGIES["squeeze-excite"]
    model = cls().eval()
    with pytest.raises(ModelError, match="sigmoid|gelu|mul") as e:
        build_dense(model, torch.randn(shape), "host-cpu")
    assert "schedule='default'" in str(e.value)


def test_default_schedule_builds_any_model_and_says_so():
    cls, shape = TOPOLOGIES["squeeze-excite"]
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(shape)
    build = build_dense(model, x, "host-cpu", schedule="default")
    assert "untuned" in build.label
    _close(build, model, x)


def test_exported_library_runs_with_the_tvm_runtime_alone(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(build_model("small-resnet", in_channels=1, num_classes=10, input_size=8, width=0.2)).eval()
    x = torch.randn(1, 1, 8, 8)
    lib = build_dense(model, x, "host-cpu").export(tmp_path / "model.so")
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "ref.npy", model(x).detach().numpy())
    # a fresh interpreter without hwprune (tvm-ffi itself imports torch when it is installed)
    code = (
        "import sys, numpy as np, tvm\n"
        "from tvm import relax\n"
        f"d = {str(tmp_path)!r}\n"
        "vm = relax.VirtualMachine(tvm.runtime.load_module(d + '/model.so'), tvm.cpu())\n"
        "out = vm['main'](tvm.runtime.tensor(np.load(d + '/x.npy'))).numpy()\n"
        "assert 'hwprune' not in sys.modules\n"
        "print(float(np.abs(out - np.load(d + '/ref.npy')).max()))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.strip().splitlines()[-1]) < 1e-4
    assert lib.stat().st_size > 0


@pytest.mark.parametrize("blocks,oh,ow,expected", [
    (10, 8, 8, (2, 1, 4)),   # two output blocks x 4 pixels: 8 accumulators
    (1, 32, 32, (1, 1, 8)),  # one block: a row of 8 pixels
    (20, 4, 4, (2, 1, 4)),
    (8, 1, 1, (8, 1, 1)),    # a 1x1 map: eight output blocks
    (3, 7, 7, (1, 1, 7)),
])
def test_register_tile_keeps_about_eight_accumulators(blocks, oh, ow, expected):
    to, rh, rw = conv_tile(blocks, oh, ow)
    assert (to, rh, rw) == expected
    assert blocks % to == 0 and oh % rh == 0 and ow % rw == 0 and to * rh * rw <= 12
