"""The fuzz suite of issue 12 (item 5): the seeded hostile cases of ``tests/mutations.py`` run through the
``ldmkit`` command line, and counted.

Every case runs as the command line runs, with stdout and stderr captured at the file-descriptor level (so
ONNX Runtime's and torch's own C++ log lines count too), in a driver process that runs a batch of cases; a
driver that dies (a crash: a signal, an abort) is restarted after the case it died in, which is counted as a
crash. Each case has ``CASE_TIMEOUT`` seconds (SIGALRM), beyond which it is a hang. A case passes when it

  * exits 2 with exactly one stderr line, ``Error: ...``, and leaves no output file, or
  * exits 0 with no stderr line other than ``note: ...`` lines and, for an .npy output, only finite values;

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


def generators(ckpt: Path, art: Path, seed: int, count: int) -> list:
    """The cases of a run: ``count`` in all, shared out among the generators (checkpoints 40%, folders 35%,
    arguments 25%). A new generator (the trainer's, say) adds its share here."""
    n_ckpt, n_art = round(count * 0.4), round(count * 0.35)
    return [*mut.checkpoint_cases(ckpt, seed, n_ckpt), *mut.artifact_cases(art, seed + 1, n_art),
            *mut.argument_cases(ckpt, art, seed + 2, count - n_ckpt - n_art)]


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


def _outputs(args: list[str]) -> list[Path]:
    """What a case may write: its -o file or folder."""
    return [Path(args[i + 1]) for i, a in enumerate(args[:-1]) if a == "-o"]


def judge(code, stdout: str, stderr: str, outputs: list[Path]) -> str:
    """"ok" or the failure (one of ``FAILURES``) of a case's result."""
    lines = stderr.splitlines()
    if code in ("hang", "traceback"):
        return code
    if "Traceback (most recent call last)" in stderr:
        return "traceback"
    written = [p for p in outputs if p.exists()]
    if code == 2:
        if written:
            return "output written on failure"
        return "ok" if len(lines) == 1 and lines[0].startswith("Error: ") else "stray stderr lines"
    if code == 0:
        for p in written:
            if p.suffix == ".npy":
                import numpy as np

                if not np.isfinite(np.load(p)).all():
                    return "non-finite output written"
        return "ok" if all(line.startswith("note: ") for line in lines) else "stray stderr lines"
    return "other exit status"


def drive(ckpt: Path, art: Path, seed: int, count: int, start: int, progress: Path, results: Path) -> None:
    """Run cases start.. of the run in this process, appending one JSON line per case to ``results`` and
    writing the index of the case under way to ``progress`` before it starts."""
    signal.signal(signal.SIGALRM, _alarm)
    cases = generators(ckpt, art, seed, count)
    for i in range(start, len(cases)):
        progress.write_text(str(i))
        with tempfile.TemporaryDirectory() as tmp:
            try:
                args = cases[i].make(Path(tmp))
            except Exception as exc:  # a generator's own failure is a bug of the suite, not of ldmkit
                raise RuntimeError(f"case {cases[i].name} could not be built: {exc}") from exc
            code, stdout, stderr = _invoke(args)
            verdict = judge(code, stdout, stderr, _outputs(args))
        with open(results, "a") as f:
            f.write(json.dumps({"i": i, "name": cases[i].name, "verdict": verdict, "code": code,
                                "stderr": stderr[-2000:]}) + "\n")


def run(ckpt: Path, art: Path, seed: int, count: int, workdir: Path) -> list[dict]:
    """Every case of the run through driver processes (restarted after a crash); one dict per case."""
    progress, results = workdir / "progress", workdir / "results.jsonl"
    results.write_text("")
    start = 0
    while start < count:
        subprocess.run([sys.executable, __file__, "--drive", str(ckpt), str(art), str(seed), str(count), str(start),
                        str(progress), str(results)], timeout=CASE_TIMEOUT * count + 600, check=False)
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


# -------------------------------------------------------------------------------------------- targets


def make_targets(folder: Path) -> tuple[Path, Path]:
    """A tiny class-conditional checkpoint (10 classes, T = 50) and its ONNX export, in ``folder``."""
    import torch

    from ldmkit.engine.checkpoint import make_checkpoint, save_checkpoint
    from ldmkit.engine.config import Config, DiffusionConfig, UNetConfig, VAEConfig
    from ldmkit.engine.models import VAE, UNet
    from ldmkit.export.onnx_export import export_onnx

    config = Config(vae=VAEConfig(base_channels=8, channel_mult=(1, 2, 2), latent_channels=2, groups=4),
                    diffusion=DiffusionConfig(T=50), latent_shape=(2, 8, 8), latent_scale=1.3,
                    unet=UNetConfig(in_channels=2, base_channels=16, channel_mult=(1, 2), attention_levels=(1,),
                                    num_heads=2, num_classes=10, groups=4))
    torch.manual_seed(0)
    nets = [VAE.from_config(config.vae), UNet.from_config(config.unet)]
    with torch.no_grad():
        for p in (p for net in nets for p in net.parameters() if not p.any()):
            p.normal_(0.0, 0.1)
    ckpt = folder / "checkpoint.pt"
    vae, unet = (net.state_dict() for net in nets)
    save_checkpoint(ckpt, make_checkpoint(config, vae, unet, unet))
    return ckpt, export_onnx(ckpt, steps=8, log=lambda line: None)


def main() -> int:
    if sys.argv[1:2] == ["--drive"]:
        ckpt, art, seed, count, start, progress, results = sys.argv[2:]
        with contextlib.suppress(KeyboardInterrupt):
            drive(Path(ckpt), Path(art), int(seed), int(count), int(start), Path(progress), Path(results))
        return 0
    parser = argparse.ArgumentParser(description="ldmkit's fuzz suite (issue 12): counts of each outcome")
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
    print(" ".join(f"{k}={v}" for k, v in result.items()))
    return 0 if result["ok"] == result["cases"] else 1


if __name__ == "__main__":
    sys.exit(main())
