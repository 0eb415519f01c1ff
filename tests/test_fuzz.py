"""The fast subset of the fuzz suite (issue 12, item 5; tests/fuzz.py): seeded hostile checkpoints, export
folders and arguments through the command line, with zero tracebacks, crashes, hangs, non-finite outputs
written, outputs written on failure and stray stderr lines. `make fuzz` runs the full 1,200 cases."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

import fuzz

SUBSET = 200


def test_fuzz_subset(tiny_checkpoints, onnx_artifacts, tmp_path):
    records = fuzz.run(tiny_checkpoints["cond"], onnx_artifacts["cond"], seed=12, count=SUBSET, workdir=tmp_path)
    failures = [f"{r['verdict']}: {r['name']}: {r['stderr'].strip()[-300:]}" for r in records if r["verdict"] != "ok"]
    assert fuzz.counts(records) == {"cases": SUBSET, "ok": SUBSET, **dict.fromkeys(fuzz.FAILURES, 0)}, failures[:10]


def test_judge_counts_each_failure(tmp_path):
    """The judge is not a rubber stamp: each kind of bad result is named."""
    import numpy as np

    out = tmp_path / "x.npy"
    assert fuzz.judge(2, "", "Error: bad\n", [out]) == "ok"
    assert fuzz.judge(2, "", "warning\nError: bad\n", [out]) == "stray stderr lines"
    assert fuzz.judge(1, "", "Traceback (most recent call last):\n ...", []) == "traceback"
    assert fuzz.judge("hang", "", "", []) == "hang"
    assert fuzz.judge(0, "", "note: old file\n", [out]) == "ok"
    np.save(out, np.array([np.nan], dtype=np.float32))
    assert fuzz.judge(0, "", "", [out]) == "non-finite output written"
    assert fuzz.judge(2, "", "Error: bad\n", [out]) == "output written on failure"
    assert fuzz.judge(1, "", "Error: x\n", []) == "other exit status"
