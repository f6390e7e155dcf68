"""The new methods from the command line: a bad option is one line that names it and the valid values."""

import pytest


@pytest.mark.parametrize("method, option, message", [
    ("autoprune", "ste=cubic", "autoprune ste 'cubic': expected one of leaky, softplus, linear"),
    ("polarization", "reduce=sum", "polarization reduce 'sum': expected one of max, mean"),
    ("ista-bn", "alpha=-1", "ista-bn alpha -1: expected a positive number"),
    ("wgsef", "hspg=maybe", "wgsef hspg 'maybe': expected true or false"),
    ("ista-bn", "rho=1", "method 'ista-bn' has no setting rho; its settings: strength, adaptive, alpha, fold"),
])
def test_bad_method_options_are_one_line_errors(tmp_path, monkeypatch, capsys, method, option, message):
    from hwprune.cli.main import main

    monkeypatch.chdir(tmp_path)
    code = main(["fit", "--target", "host-cpu", "--sparsity", "0.5", "--method", method, "--method-option", option,
                 "--out", "x", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.strip().count("\n") == 0 and "Traceback" not in err


@pytest.mark.parametrize("extra, message", [
    (["--allocation-option", "flor=0.5"], "--allocation-option flor: unknown; expected floor or cap"),
    (["--allocation-option", "floor=abc"], "expected numbers, e.g. floor=0.5 cap=2"),
    (["--allocation-option", "cap=0.5"], "cap=0.5: expected at least 1"),
    (["--allocation-option", "floor"], "--allocation-option 'floor': expected KEY=VALUE"),
    (["--method", "uniform", "--allocation", "global"], "--method uniform is a width multiplier"),
    (["--distill", "1.5"], "--distill 1.5: expected the weight of the teacher's loss, in [0, 1]"),
    (["--distill-shift", "-1"], "--distill-shift -1: expected a whole number of pixels >= 0"),
    (["--distill-mixup", "-0.5"], "--distill-mixup -0.5: expected the Beta(a, a) concentration"),
])
def test_bad_allocation_and_distill_settings_are_one_line_errors(tmp_path, monkeypatch, capsys, extra, message):
    """Refused before any data is loaded or any training starts."""
    from hwprune.cli.main import main

    monkeypatch.chdir(tmp_path)
    code = main(["fit", "--target", "host-cpu", "--sparsity", "0.5", "--out", "x", "--quiet"] + extra)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert not (tmp_path / "x" / "checkpoint.pt").exists()


def test_new_settings_leave_old_fingerprints_alone():
    """Runs written before allocation and distillation existed resume: at their defaults the new
    settings are not in the fingerprint; set, they are."""
    from hwprune.budget import Budget
    from hwprune.training.pipeline import FitConfig

    plain = FitConfig(budget=Budget("flops", 0.5)).fingerprint()
    assert not {"allocation", "allocation_options", "distill", "distill_temperature"} & set(plain)
    set_ = FitConfig(budget=Budget("flops", 0.5), allocation="uniform", distill=0.5).fingerprint()
    assert set_["allocation"] == "uniform" and set_["distill"] == 0.5


@pytest.mark.parametrize("option, message", [
    ("strength=abc", "wgsef strength 'abc': expected a number"),
    ("strength=nan", "wgsef strength nan: expected a finite number"),
    ("strength=inf", "wgsef strength inf: expected a finite number"),
    ('strength=!!python/object/apply:os.system ["true"]', "the value is not a plain number, word or true/false"),
    ("weighting=3", "wgsef weighting 3: expected a word"),
])
def test_option_values_of_the_wrong_kind_are_one_line_errors(tmp_path, monkeypatch, capsys, option, message):
    """Values YAML reads as the wrong type (or refuses: a python tag) are named, never a TypeError."""
    from hwprune.cli.main import main

    monkeypatch.chdir(tmp_path)
    code = main(["fit", "--target", "host-cpu", "--sparsity", "0.5", "--method", "wgsef", "--method-option", option,
                 "--out", "x", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.strip().count("\n") == 0 and "Traceback" not in err
