"""The fast subset of the fuzz suite (issue 12, item 5; issue 13, item 6; tests/fuzz.py): seeded hostile
checkpoints, export folders, arguments and trainer runs (configs, tampered resumes, locked folders, failing
writes, signals, eval) through the command line, with zero tracebacks, crashes, hangs, non-finite outputs
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
    kinds = fuzz.kinds(records)
    assert {k: kinds[k] for k in fuzz.SHARES} == {"checkpoint": 70, "artifact": 60, "argument": 40, "train": 30}
    assert len([k for k in kinds if k.startswith("train/")]) == 8  # every kind of trainer case ran


def test_judge_counts_each_failure(tmp_path):
    """The judge is not a rubber stamp: each kind of bad result is named."""
    import numpy as np

    out = tmp_path / "x.npy"
    assert fuzz.judge(2, "", "Error: bad\n", []) == "ok"
    assert fuzz.judge(2, "", "warning\nError: bad\n", []) == "stray stderr lines"
    assert fuzz.judge(1, "", "Traceback (most recent call last):\n ...", []) == "traceback"
    assert fuzz.judge("hang", "", "", []) == "hang"
    np.save(out, np.array([0.5], dtype=np.float32))
    assert fuzz.judge(0, "", "note: old file\n", [out]) == "ok"
    assert fuzz.judge(2, "", "Error: bad\n", [out]) == "output written on failure"
    assert fuzz.judge(2, "", "Error: bad\n", [tmp_path / "gone.pt"]) == "output written on failure"  # removed
    np.save(out, np.array([np.nan], dtype=np.float32))
    assert fuzz.judge(0, "", "", [out]) == "non-finite output written"
    assert fuzz.judge(1, "", "Error: x\n", []) == "other exit status"
    (tmp_path / "eval.json").write_text('{"x": NaN}')
    assert fuzz.judge(0, "", "", [tmp_path / "eval.json"]) == "non-finite output written"
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert fuzz.judge(2, "", "Error: disk full\n", [run / "metrics.jsonl"]) == "ok"  # a trainer's record
    assert fuzz.judge(2, "", "Error: disk full\n", [run / "checkpoint.pt"]) == "output written on failure"
    assert fuzz.judge(75, "", "stopped by SIGTERM after step 3 of 6: ...\n", []) == "ok"
    assert fuzz.judge(75, "", "stopped by SIGTERM after step 3 of 6: ...\n", [run / "checkpoint.pt"]) == \
        "non-finite output written"
    assert fuzz.judge(75, "", "a warning\nstopped by SIGTERM after step 3 of 6: ...\n", []) == "stray stderr lines"
