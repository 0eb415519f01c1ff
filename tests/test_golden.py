"""The golden files: the reference still reproduces them (relative 1e-12), the check catches a changed
file, a changed formula and a broken manifest, and regen is reproducible. Golden files guard against
regressions; the proofs of correctness are the other tests."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ldmkit.cli import main
from ldmkit.reference import golden, kl, schedules

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def test_reference_reproduces_golden_files():
    assert golden.check(GOLDEN) == []


def test_cli_golden_check_passes():
    result = CliRunner().invoke(main, ["golden", "check", "--dir", str(GOLDEN)])
    assert result.exit_code == 0, result.output
    assert f"golden check: {len(golden.CASES)} files OK" in result.output


def test_regen_is_reproducible(tmp_path):
    """regen writes the arrays of the committed files again (to the golden tolerance)."""
    written = golden.regen(tmp_path)
    assert sorted(written) == sorted([f"{c}.npz" for c in golden.CASES] + ["manifest.json"])
    for case in golden.CASES:
        assert golden.compare(golden.load(GOLDEN, case), golden.load(tmp_path, case)) == []
    assert golden.check(tmp_path) == []


@pytest.fixture
def golden_copy(tmp_path):
    dst = tmp_path / "golden"
    shutil.copytree(GOLDEN, dst)
    return dst


def test_check_detects_edited_file(golden_copy):
    arrays = golden.load(golden_copy, "kl")
    arrays["out/normal_kl"] = arrays["out/normal_kl"] * (1 + 1e-9)
    golden._write_npz(golden_copy / "kl.npz", arrays)
    problems = golden.check(golden_copy)
    assert any(p.startswith("kl.npz: sha256") for p in problems)
    assert any("out/normal_kl" in p for p in problems)
    result = CliRunner().invoke(main, ["golden", "check", "--dir", str(golden_copy)])
    assert result.exit_code == 1


def test_check_detects_a_changed_formula(golden_copy, monkeypatch):
    """A 1e-9 relative change to K1 shows up in the KL and VLB cases."""
    original = kl.normal_kl
    monkeypatch.setattr(kl, "normal_kl", lambda *a: original(*a) * (1 + 1e-9))
    problems = golden.check(golden_copy)
    assert any(p.startswith("kl.npz: out/normal_kl") for p in problems)


def test_check_detects_a_changed_schedule_constant(golden_copy, monkeypatch):
    """Changing the cosine offset s from 0.008 to 0.0081 (S3) breaks the schedules case."""
    original = schedules.cosine_betas
    monkeypatch.setattr(schedules, "cosine_betas", lambda T, s=0.0081, max_beta=0.999: original(T, s, max_beta))
    problems = golden.check(golden_copy)
    assert any(p.startswith("schedules.npz: out/cosine/") for p in problems)


def test_check_reports_manifest_problems(golden_copy):
    (golden_copy / "samplers.npz").unlink()
    manifest = json.loads((golden_copy / "manifest.json").read_text())
    manifest["files"] = [e for e in manifest["files"] if e["file"] != "kl.npz"]
    manifest["files"].append({"file": "bogus.npz", "generator": "x", "sha256": "0"})
    (golden_copy / "manifest.json").write_text(json.dumps(manifest))
    problems = golden.check(golden_copy)
    assert "samplers.npz: file missing" in problems
    assert "kl.npz: not listed in manifest.json" in problems
    assert "bogus.npz: listed in manifest.json but no such case" in problems
    (golden_copy / "manifest.json").write_text("{not json")
    assert golden.check(golden_copy)[0].startswith("manifest.json: unreadable")


def test_golden_folder_is_small():
    total = sum(p.stat().st_size for p in GOLDEN.iterdir())
    assert total < 3_000_000


def test_compare_names_the_problem():
    e = {"a": np.ones(3), "b": np.zeros(2)}
    assert golden.compare(e, {"a": np.ones(3), "b": np.zeros(2)}) == []
    problems = golden.compare(e, {"a": np.ones(4), "c": np.zeros(2)})
    assert "a: shape (4,), expected (3,)" in problems
    assert "b: missing from the recomputation" in problems and "c: not in the file" in problems


def test_load_missing_case(tmp_path):
    with pytest.raises(FileNotFoundError, match="golden file not found"):
        golden.load(tmp_path, "kl")
