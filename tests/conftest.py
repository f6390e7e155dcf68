"""Shared test settings.

Tests run torch on one thread: on a loaded 2-core machine the default OpenMP threads spin-wait and the
same tests took 13 s to 66 s; with one thread they are steady. Subprocesses get OMP_NUM_THREADS=1.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def one_line_error(capsys, argv, *needles) -> str:
    """Run the CLI in this process; it must exit 2 with one line on stderr that contains every needle."""
    from hwprune.cli.main import main

    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip().count("\n") == 0 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def cli_env() -> dict:
    """Environment for running ``python -m hwprune`` in a subprocess: one thread, tests importable."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(TESTS.parent), env.get("PYTHONPATH", "")])
    return env
