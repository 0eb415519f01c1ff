"""The fuzz suite of issues 12 and 13: the seeded hostile cases of ``tests/mutations.py`` run through the
``ldmkit`` command line, and counted.

Every case runs as the command line runs, with stdout and stderr captured at the file-descriptor level (so
ONNX Runtime's and torch's own C++ log lines count too), in a driver process that runs a batch of cases; a
driver that dies (a crash: a signal, an abort) is restarted after the case it died in, which is counted as a
crash. Each case has ``CASE_TIMEOUT`` seconds (SIGALRM), beyond which it is a hang. A case passes when it

  * exits 2 with exactly one stderr line, ``Error: ...``, and writes nothing: no file in its folder is new,
    changed or gone, except a trainer's own record of the run (its lock file, metrics.jsonl, config.json,
    sample grids) and its checkpoint, which must then load (sha256 and finite weights: the last good one), or
  * exits 0 with no stderr line other than ``note: ...`` lines, and every .npy, .json or checkpoint it wrote
    finite, or
  * exits 75 (``ldmkit train`` stopped by SIGTERM or SIGINT) with exactly its one ``stopped by ...`` line and
    a checkpoint that loads;

anything else is counted under its failure: traceback, crash, hang, non-finite output written, output written
on failure, stray stderr lines, other exit status.

    python tests/fuzz.py [--cases N] [--seed S]      # `make fuzz`: N cases (default 1200), counts printed
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import mutations as mut

CASE_TIMEOUT = 60
FAILURES = ("traceback", "crash", "hang", "non-finite output written", "output written on failure",
            "stray stderr lines", "other exit status")


SHARES = {"checkpoint": 0.35, "artifact": 0.3, "argument": 0.2, "train": 0.15}  # of a run's cases


def generators(ckpt: Path, art: Path, trainer: Path, seed: int, count: int) -> list:
    """The cases of a run: ``count`` in all, shared out among the generators as ``SHARES`` says (each case's
    name starts with its generator's key). ``trainer``: the folder of ``mutations.trainer_targets``."""
    n = {k: round(count * share) for k, share in SHARES.items()}
    n["argument"] = count - n["checkpoint"] - n["artifact"] - n["train"]
    return [*mut.checkpoint_cases(ckpt, seed, n["checkpoint"]), *mut.artifact_cases(art, seed + 1, n["artifact"]),
            *mut.argument_cases(ckpt, art, seed + 2, n["argument"]), *mut.trainer_cases(trainer, seed + 3, n["train"])]


# ------------------------------------------------------------------------------------------ the driver


class _Hang(BaseException):
    pass


def _alarm(signum, frame):
    raise _Hang


def _invoke(args: list[str]) -> tuple[object, str, str]:
    """(exit status or "traceback"/"hang", stdout, stderr) of ``ldmkit ARGS`` run in this process."""
    from ldmkit.cli import main

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        signal.alarm(CASE_TIMEOUT)
        try:
            try:
                main.main(args, prog_name="ldmkit", standalone_mode=True)
                code: object = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except _Hang:
                code = "hang"
            except BaseException:
                traceback.print_exc()
                code = "traceback"
        finally:
            signal.alarm(0)
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        out.seek(0)
        err.seek(0)
        return code, out.read().decode(errors="replace"), err.read().decode(errors="replace")


#: What a trainer may leave in its run folder when it fails: its record of the run, and the last good checkpoint.
RUN_RECORD = (".train.lock", "metrics.jsonl", "config.json")


def _snapshot(folder: Path) -> dict[Path, tuple]:
    return {p: (st.st_ino, st.st_size, st.st_mtime_ns) for p in folder.rglob("*") if p.is_file()
            for st in [p.stat()]}


def changes(before: dict, after: dict) -> list[Path]:
    """The files new, changed or gone between two ``_snapshot``s of a case's folder."""
    return sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))


def _finite_file(p: Path) -> bool:
    """Whether an output file holds only finite values (.npy, .json; a checkpoint must load: sha256, finite)."""
    if p.suffix == ".npy":
        import numpy as np

        return bool(np.isfinite(np.load(p)).all())
    if p.suffix == ".json":
        text = p.read_text()
        return not any(word in text for word in ("NaN", "Infinity"))
    if p.name == "checkpoint.pt":
        from ldmkit.engine.checkpoint import load_checkpoint

        try:
            load_checkpoint(p)
        except (ValueError, OSError):
            return False
    return True


def judge(code, stdout: str, stderr: str, written: list[Path]) -> str:
    """"ok" or the failure (one of ``FAILURES``) of a case's result; ``written``: the files it made, changed or
    removed (``changes``)."""
    lines = stderr.splitlines()
    if code in ("hang", "traceback"):
        return code
    if "Traceback (most recent call last)" in stderr:
        return "traceback"
    present = [p for p in written if p.exists()]
    if code == 2:
        kept = [p for p in present if p.name in RUN_RECORD or (p.name == "checkpoint.pt" and _finite_file(p))
                or (p.parent.name == "samples" and p.suffix == ".png")]
        if len(kept) < len(written):
            return "output written on failure"
        return "ok" if len(lines) == 1 and lines[0].startswith("Error: ") else "stray stderr lines"
    if code in (0, 75):
        if not all(_finite_file(p) for p in present):
            return "non-finite output written"
        if code == 75:
            return "ok" if len(lines) == 1 and lines[0].startswith("stopped by ") else "stray stderr lines"
        return "ok" if all(line.startswith("note: ") for line in lines) else "stray stderr lines"
    return "other exit status"


def drive(ckpt: Path, art: Path, trainer: Path, seed: int, count: int, start: int, progress: Path,
          results: Path) -> None:
    """Run cases start.. of the run in this process, appending one JSON line per case to ``results`` and
    writing the index of the case under way to ``progress`` before it starts."""
    signal.signal(signal.SIGALRM, _alarm)
    cases = generators(ckpt, art, trainer, seed, count)
    for i in range(start, len(cases)):
        progress.write_text(str(i))
        with tempfile.TemporaryDirectory() as tmp:
            try:
                args = cases[i].make(Path(tmp))
            except Exception as exc:  # a generator's own failure is a bug of the suite, not of ldmkit
                raise RuntimeError(f"case {cases[i].name} could not be built: {exc}") from exc
            before = _snapshot(Path(tmp))
            with cases[i].around(Path(tmp)) if cases[i].around else contextlib.nullcontext():
                code, stdout, stderr = _invoke(args)
            verdict = judge(code, stdout, stderr, changes(before, _snapshot(Path(tmp))))
        with open(results, "a") as f:
            f.write(json.dumps({"i": i, "name": cases[i].name, "verdict": verdict, "code": code,
                                "stderr": stderr[-2000:]}) + "\n")


def run(ckpt: Path, art: Path, seed: int, count: int, workdir: Path) -> list[dict]:
    """Every case of the run through driver processes (restarted after a crash), on one torch thread each;
    one dict per case. The trainer's targets are made in ``workdir`` first."""
    progress, results = workdir / "progress", workdir / "results.jsonl"
    trainer = mut.trainer_targets(workdir / "trainer")
    results.write_text("")
    start = 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    while start < count:
        subprocess.run([sys.executable, __file__, "--drive", str(ckpt), str(art), str(trainer), str(seed), str(count),
                        str(start), str(progress), str(results)], timeout=CASE_TIMEOUT * count + 600, check=False,
                       env=env)
        done = [json.loads(line) for line in results.read_text().splitlines()]
        last = max((r["i"] for r in done), default=start - 1)
        if last + 1 >= count:
            break
        crashed = int(progress.read_text()) if progress.exists() else last + 1
        if crashed != last + 1:
            raise RuntimeError(f"the fuzz driver stopped at case {crashed} after case {last}")
        with open(results, "a") as f:
            f.write(json.dumps({"i": crashed, "name": f"case {crashed}", "verdict": "crash", "code": None,
                                "stderr": ""}) + "\n")
        start = crashed + 1
    return [json.loads(line) for line in results.read_text().splitlines()]


def counts(records: list[dict]) -> dict:
    c = collections.Counter(r["verdict"] for r in records)
    return {"cases": len(records), "ok": c["ok"], **{f: c[f] for f in FAILURES}}


def kinds(records: list[dict]) -> dict:
    """Cases of each generator (``SHARES``' keys) and, for the trainer's, of each of its kinds."""
    c = collections.Counter(r["name"].split()[0] for r in records)
    c.update(f"train/{r['name'].split(':')[0].split(maxsplit=2)[2]}" for r in records if r["name"].startswith("train"))
    return dict(c)


# -------------------------------------------------------------------------------------------- targets


def make_targets(folder: Path) -> tuple[Path, Path]:
    """A tiny class-conditional checkpoint (10 classes, T = 50) and its ONNX export, in ``folder``."""

    from ldmkit.engine.config import Config, DiffusionConfig, UNetConfig, VAEConfig
    from ldmkit.export.onnx_export import export_onnx

    config = Config(vae=VAEConfig(base_channels=8, channel_mult=(1, 2, 2), latent_channels=2, groups=4),
                    diffusion=DiffusionConfig(T=50), latent_shape=(2, 8, 8), latent_scale=1.3,
                    unet=UNetConfig(in_channels=2, base_channels=16, channel_mult=(1, 2), attention_levels=(1,),
                                    num_heads=2, num_classes=10, groups=4))
    ckpt = mut.write_random_checkpoint(folder / "checkpoint.pt", config, 0)
    return ckpt, export_onnx(ckpt, steps=8, log=lambda line: None)


def main() -> int:
    if sys.argv[1:2] == ["--drive"]:
        ckpt, art, trainer, seed, count, start, progress, results = sys.argv[2:]
        with contextlib.suppress(KeyboardInterrupt):
            drive(Path(ckpt), Path(art), Path(trainer), int(seed), int(count), int(start), Path(progress),
                  Path(results))
        return 0
    parser = argparse.ArgumentParser(description="ldmkit's fuzz suite (issues 12, 13): counts of each outcome")
    parser.add_argument("--cases", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--show", type=int, default=5, help="failing cases to print")
    a = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, art = make_targets(Path(tmp))
        records = run(ckpt, art, a.seed, a.cases, Path(tmp))
    result = counts(records)
    for record in [r for r in records if r["verdict"] != "ok"][: a.show]:
        print(f"{record['verdict']}: {record['name']}: {record['stderr'].strip()[-400:]}")
    print("kinds: " + " ".join(f"{k}={v}" for k, v in kinds(records).items()))
    print(" ".join(f"{k}={v}" for k, v in result.items()))
    return 0 if result["ok"] == result["cases"] else 1


if __name__ == "__main__":
    sys.exit(main())
