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
