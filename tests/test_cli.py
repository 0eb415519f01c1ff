"""The command line skeleton: help, version and the error convention (one line, exit status 2)."""

from __future__ import annotations

import json
import sys
import types

import click
import pytest
from click.testing import CliRunner

import ldmkit
from ldmkit.cli import LdmkitGroup, handle_errors, main


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        return CliRunner()  # click >= 8.2 keeps stderr apart


def test_help_lists_commands():
    result = _runner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    assert "golden" in result.output


def test_golden_help_lists_check_and_regen():
    result = _runner().invoke(main, ["golden", "--help"])
    assert result.exit_code == 0, result.output
    assert "check" in result.output and "regen" in result.output


def test_version():
    result = _runner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"ldmkit {ldmkit.__version__}"


def _dummy_group(exc: BaseException) -> click.Group:
    @click.group(cls=LdmkitGroup)
    def cli():
        pass

    @cli.command()
    def boom():
        raise exc

    @cli.group()
    def sub():
        pass

    @sub.command()
    def deeper():
        raise exc

    return cli


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("steps must be >= 1, got 0"),
        TypeError("schedule must be a Schedule, got str"),
        FileNotFoundError(2, "No such file or directory", "missing.pt"),
        OSError("disk full\nwhile writing checkpoint.pt"),
    ],
    ids=["ValueError", "TypeError", "FileNotFoundError", "OSError-multiline"],
)
@pytest.mark.parametrize("args", [["boom"], ["sub", "deeper"]], ids=["command", "subgroup-command"])
def test_user_errors_become_one_line_exit_2(exc, args):
    result = _runner().invoke(_dummy_group(exc), args)
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in result.stderr
    assert " ".join(str(exc).split()) in lines[0]


def test_other_exceptions_are_not_swallowed():
    result = _runner().invoke(_dummy_group(RuntimeError("a bug")), ["boom"])
    assert isinstance(result.exception, RuntimeError)


def test_handle_errors_decorator():
    @click.command()
    @handle_errors
    def cmd():
        raise ValueError("bad --eta: must be in [0, 1], got 2")

    result = _runner().invoke(cmd, [])
    assert result.exit_code == 2
    assert result.stderr.strip() == "Error: bad --eta: must be in [0, 1], got 2"


def test_golden_check_missing_dir_is_one_line_error(tmp_path):
    result = _runner().invoke(main, ["golden", "check", "--dir", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("Error: golden directory not found")


def _fake_reference_golden(monkeypatch, check_problems, written=()):
    """Stand in for ldmkit.reference.golden so the CLI plumbing is tested on its own."""
    fake = types.ModuleType("ldmkit.reference.golden")
    calls = []

    def check(directory):
        calls.append(("check", directory))
        return list(check_problems)

    def regen(directory):
        calls.append(("regen", directory))
        return list(written)

    fake.check, fake.regen = check, regen
    import ldmkit.reference

    monkeypatch.setitem(sys.modules, "ldmkit.reference.golden", fake)
    monkeypatch.setattr(ldmkit.reference, "golden", fake, raising=False)
    return calls


def _golden_dir(tmp_path):
    d = tmp_path / "golden"
    d.mkdir()
    for name in ("schedules.npz", "samplers.npz"):
        (d / name).write_bytes(b"")
    (d / "manifest.json").write_text(json.dumps({"version": ldmkit.__version__, "files": []}))
    return d


def test_golden_check_ok(tmp_path, monkeypatch):
    d = _golden_dir(tmp_path)
    calls = _fake_reference_golden(monkeypatch, [])
    result = _runner().invoke(main, ["golden", "check", "--dir", str(d)])
    assert result.exit_code == 0, result.output
    assert calls == [("check", d)]
    assert result.stdout.splitlines() == ["ok    samplers.npz", "ok    schedules.npz", "golden check: 2 files OK"]


def test_golden_check_mismatch_exits_1(tmp_path, monkeypatch):
    d = _golden_dir(tmp_path)
    _fake_reference_golden(monkeypatch, ["samplers.npz: ddim_eta0 differs (max abs err 1e-3)"])
    result = _runner().invoke(main, ["golden", "check", "--dir", str(d)])
    assert result.exit_code == 1
    assert "FAIL  samplers.npz" in result.stdout
    assert "ok    schedules.npz" in result.stdout
    assert "ddim_eta0 differs" in result.stderr


def test_golden_regen_reports_files(tmp_path, monkeypatch):
    d = tmp_path / "new" / "golden"
    calls = _fake_reference_golden(monkeypatch, [], written=["schedules.npz", "manifest.json"])
    result = _runner().invoke(main, ["golden", "regen", "--dir", str(d)])
    assert result.exit_code == 0, result.output
    assert calls == [("regen", d)]
    assert d.is_dir()
    assert "golden regen: 2 files written" in result.stdout


def test_missing_optional_dependency_is_a_one_line_hint():
    exc = ModuleNotFoundError("No module named 'torch'", name="torch")
    result = _runner().invoke(_dummy_group(exc), ["boom"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "Error: this command needs torch, which is not installed: pip install 'ldmkit[engine]'"
    )


def test_other_missing_modules_keep_their_traceback():
    exc = ModuleNotFoundError("No module named 'ldmkit.typo'", name="ldmkit.typo")
    result = _runner().invoke(_dummy_group(exc), ["boom"])
    assert isinstance(result.exception, ModuleNotFoundError)
