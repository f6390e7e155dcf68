"""A user's walk through every training method and budget kind: settings that cannot work are refused
before any training, and what a run writes says what it did (nothing printed as ``None``).

Real CLI runs on the tiny residual CNN (helpers_models.tiny_resnet), a few seconds each.
"""

import json

import pytest

from conftest import one_line_error

from hwprune.budget import Budget
from hwprune.errors import HwpruneError
from hwprune.training.config import FitConfig

FAST = ["--target", "host-cpu", "--model", "helpers_models:tiny_resnet", "--no-latency", "--quiet"]


@pytest.mark.parametrize("allocation", ["global", "sensitivity"])
def test_fluctuation_standardize_with_an_allocation_it_cannot_use_is_refused_before_training(capsys, tmp_path,
                                                                                             allocation):
    # It was refused only at the projection: after the dense epochs (15 by default), leaving a checkpoint
    # in --out that binds the folder to these flags, so the corrected command was refused there too.
    out = tmp_path / "run"
    one_line_error(capsys, ["fit", *FAST, "--sparsity", "0.5", "--epochs", "1", "0", "1", "--method", "fluctuation",
                            "--method-option", "standardize=true", "--allocation", allocation, "--out", str(out)],
                   "standardize=true", f"--allocation {allocation}", "--allocation learned")
    assert not out.exists()
    with pytest.raises(HwpruneError, match="standardize=true"):  # the Python API refuses it up front too
        FitConfig(budget=Budget("sparsity", 0.5), method="fluctuation", method_options={"standardize": True},
                  allocation=allocation)
    # the allocations it can use are accepted
    FitConfig(budget=Budget("sparsity", 0.5), method="fluctuation", method_options={"standardize": True},
              allocation="learned")


@pytest.fixture(scope="module")
def no_latency_run(tmp_path_factory):
    """A finished run with --no-latency (the epochs at 0: the tiny model as built, pruned and exported)."""
    from hwprune.cli.main import main

    out = tmp_path_factory.mktemp("walk") / "run"
    assert main(["fit", *FAST, "--sparsity", "0.5", "--epochs", "0", "0", "0", "--latency-repeats", "20",
                 "--out", str(out)]) == 0
    return out


def test_a_run_without_latency_says_so_in_report_md(no_latency_run):
    md = (no_latency_run / "report.md").read_text()
    assert "None" not in md, [line for line in md.splitlines() if "None" in line]
    assert "latency: not measured (--no-latency)" in md
    assert "latency_ms" not in json.loads((no_latency_run / "report.json").read_text())


def test_remeasure_times_a_finished_run_and_is_refused_where_there_is_none(capsys, tmp_path, no_latency_run):
    import shutil

    from hwprune.cli.main import main

    # --remeasure on a run made with --no-latency: "exporting and timing it again" timed nothing
    run = tmp_path / "finished"
    shutil.copytree(no_latency_run, run)
    assert main(["fit", "--resume", str(run), "--remeasure"]) == 0
    capsys.readouterr()
    report = json.loads((run / "report.json").read_text())
    assert report["latency_ms"]["dense"] > 0 and report["latency_ms"]["pruned"] > 0
    assert "latency: not measured" not in (run / "report.md").read_text()
    one_line_error(capsys, ["fit", "--resume", str(run), "--remeasure", "--no-latency"], "--remeasure", "--no-latency")
    # --remeasure where no finished run is: it trained a whole new run (15/15/10 epochs by default)
    new = tmp_path / "new"
    typed = [a for a in FAST if a != "--no-latency"]
    one_line_error(capsys, ["fit", *typed, "--sparsity", "0.5", "--epochs", "0", "0", "0", "--remeasure", "--out",
                            str(new)], "--remeasure", f"{new} holds no finished run")
    assert not new.exists()


def test_option_errors_name_what_was_typed(capsys):
    one_line_error(capsys, ["fit", *FAST, "--sparsity", "0.5", "--method", "uniform", "--method-option", "x=1"],
                   "--method-option x=1", "'uniform' has no setting x; it has no settings")
    err = one_line_error(capsys, ["fit", *FAST, "--sparsity", "0.5", "--allocation-option", "floor=abc"],
                         "--allocation-option floor=abc: expected numbers")
    assert "{" not in err


def test_a_resumed_run_names_the_setting_it_keeps(capsys, no_latency_run):
    # "--allocation 'uniform' differs from the run's None": the run used the default
    err = one_line_error(capsys, ["fit", "--resume", str(no_latency_run), "--allocation", "uniform"],
                         "--allocation 'uniform' differs from the run's default")
    assert "None" not in err


@pytest.mark.parametrize("method", ["group-lasso", "slimming", "deephoyer"])
@pytest.mark.parametrize("strength", ["-1", "0"])
def test_a_strength_that_is_not_positive_is_refused_by_every_method(capsys, tmp_path, method, strength):
    # wgsef, polarization and ista-bn refused it; these three trained with it (a negative L1 rewards large
    # scales; the controller only multiplies the strength, so with adaptive=false nothing corrects it)
    out = tmp_path / "run"
    one_line_error(capsys, ["fit", *FAST, "--sparsity", "0.5", "--epochs", "0", "1", "0", "--method", method,
                            "--method-option", f"strength={strength}", "--method-option", "adaptive=false",
                            "--out", str(out)],
                   f"--method-option strength={strength}", "expected a positive number")
    assert not out.exists()
