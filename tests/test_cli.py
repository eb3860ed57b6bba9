# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""The ``d3p-privacy`` command line (issue 25): errors name the command line's own flags and
print the subcommand's usage; values out of range are refused before any accounting."""

import re

import pytest

from d3p import dputil

GOOD = {
    "sigma": ["--epsilon", "1", "--delta", "1e-5", "--q", "0.01", "--num-iter", "100"],
    "epsilon": ["--sigma", "1", "--delta", "1e-5", "--q", "0.01", "--num-iter", "100"],
    "delta": ["--sigma", "1", "--epsilon", "1", "--q", "0.01", "--num-iter", "100"],
}
INTERNAL = re.compile(r"target_eps|num_iter|(?<!-)\bmaxeval\b|(?<!-)\btol\b")


def with_value(command, flag, value):
    args = list(GOOD[command])
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return [command, *args]


def refused(argv, capsys):
    """stderr of a run that must exit with argparse's usage-error status 2."""
    with pytest.raises(SystemExit) as exit_info:
        dputil.main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no report of a refused computation
    return captured.err


@pytest.fixture
def no_accounting(monkeypatch):
    """Fail the test if the accountant is called: range errors must come before any work."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the accountant ran for a refused command line")

    for name in ("calibrate_sigma", "compute_epsilon", "compute_delta"):
        monkeypatch.setattr(dputil, name, forbidden)


@pytest.mark.parametrize(
    "command, flag, value, message",
    [
        ("sigma", "--epsilon", "-1", "--epsilon must be > 0, got -1"),
        ("sigma", "--epsilon", "0", "--epsilon must be > 0, got 0"),
        ("delta", "--epsilon", "-0.5", "--epsilon must be >= 0, got -0.5"),
        ("epsilon", "--delta", "2", "--delta must be in (0, 1), got 2"),
        ("sigma", "--delta", "0", "--delta must be in (0, 1), got 0"),
        ("epsilon", "--sigma", "0", "--sigma must be > 0, got 0"),
        ("delta", "--sigma", "nan", "--sigma must be finite, got nan"),
        ("epsilon", "--q", "0", "--q must be in (0, 1], got 0"),
        ("sigma", "--q", "1.5", "--q must be in (0, 1], got 1.5"),
        ("epsilon", "--num-iter", "0", "--num-iter must be >= 1, got 0"),
        ("delta", "--num-iter", "inf", "--num-iter must be finite, got inf"),
        ("sigma", "--tol", "0", "--tol must be > 0, got 0"),
        ("sigma", "--maxeval", "0", "--maxeval must be >= 1, got 0"),
    ],
)
def test_out_of_range_values_name_the_flag(capsys, no_accounting, command, flag, value, message):
    err = refused(with_value(command, flag, value), capsys)
    assert f"d3p-privacy {command}: error: {message}" in err
    assert err.startswith(f"usage: d3p-privacy {command} ")  # the subcommand's usage
    assert not INTERNAL.search(err), err


def test_library_errors_are_given_with_the_flags(capsys):
    # dp-accounting's RDP accountant has no substitute relation for Poisson sampling: the
    # library refuses the combination; the command line says so with its flags
    err = refused(
        with_value("epsilon", "--accountant", "rdp") + ["--relation", "substitute"], capsys
    )
    assert err.startswith("usage: d3p-privacy epsilon ")
    assert "--accountant='rdp' does not support --relation='substitute'" in err
    assert not re.search(r"(?<!-)\b(accountant|relation)=", err)


def test_calibration_warnings_are_given_with_the_flags(capsys):
    # a tolerance the search cannot reach in one evaluation: the result is printed, and the
    # warning names --epsilon, --tol and --maxeval
    dputil.main(with_value("sigma", "--tol", "1e-12") + ["--maxeval", "1"])
    captured = capsys.readouterr()
    assert re.search(r"^sigma:\s+\d", captured.out, re.M)
    assert "d3p-privacy sigma: warning:" in captured.err
    assert "--epsilon=1.0" in captured.err and "--tol=1e-12" in captured.err
    assert "--maxeval=1" in captured.err
    assert not INTERNAL.search(captured.err), captured.err


@pytest.mark.parametrize("command", sorted(GOOD))
def test_good_values_still_give_the_report(capsys, command):
    dputil.main([command, *GOOD[command]])
    out = capsys.readouterr().out
    for field in ("accountant", "relation", "sampling", "steps", "sigma", "epsilon", "delta"):
        assert re.search(rf"^{field}:\s+\S", out, re.M), (field, out)
    assert "steps:      100" in out


def test_given_epsilon_zero_is_allowed_for_delta(capsys):
    # epsilon = 0 is a valid question for the delta command (only the target must be > 0)
    dputil.main(with_value("delta", "--epsilon", "0"))
    delta = float(re.search(r"^delta:\s+(\S+)", capsys.readouterr().out, re.M)[1])
    assert 0 < delta < 1
