"""Static tools follow the package: pyright resolves every ``ldmkit.*`` import inside the repository and from
a script outside it, and sees ``Schedule``'s tables (docs/design.md: the src layout with links, README "Layout").

pyright is a dev dependency (pinned in pyproject.toml); its first run fetches its Node.js part from the npm
registry. The repository check counts only import resolution (the rest of pyright's type checking is not a
gate here); the outside script must come out with no error at all.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMPORT_RULES = {"reportMissingImports", "reportMissingModuleSource"}

pytestmark = pytest.mark.slow


def _pyright(*args, cwd, python: str | None = sys.executable) -> dict:
    """pyright's JSON report; ``python``: the interpreter whose packages it sees (None: set in ``args``)."""
    exe = shutil.which("pyright", path=str(Path(sys.executable).parent))
    assert exe is not None, "pyright is missing: install the dev extra (pip install -e '.[dev]')"
    interpreter = [] if python is None else ["--pythonpath", python]
    proc = subprocess.run([exe, "--outputjson", *interpreter, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert proc.stdout.strip().startswith("{"), f"pyright did not run: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return json.loads(proc.stdout)


def _unresolved(report: dict) -> list[str]:
    """Import-resolution diagnostics: a module that cannot be found, or a submodule that is not an attribute."""
    return [f"{d['file']}:{d['range']['start']['line'] + 1}: {d['message']}" for d in report["generalDiagnostics"]
            if d.get("rule") in IMPORT_RULES or "is not a known attribute of module \"ldmkit" in d["message"]]


def test_pyright_resolves_every_import_in_the_repository():
    report = _pyright("--project", str(ROOT / "pyproject.toml"), cwd=ROOT)
    assert 40 < report["summary"]["filesAnalyzed"] < 200  # this repository, not a folder above it
    assert not _unresolved(report), "\n".join(_unresolved(report))


def test_pyright_follows_the_installed_package_from_outside(tmp_path):
    """A user's script elsewhere: each part imports, go-to-definition has a file to go to (pyright resolves
    the modules to the source files), and Schedule's tables and the sampler table have types."""
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(
        """
        import ldmkit
        import ldmkit.cli
        import ldmkit.common
        import ldmkit.engine.sample
        import ldmkit.export.runtime
        import ldmkit.golden
        from ldmkit.engine.train import train
        from ldmkit.export.onnx_export import export_onnx
        from ldmkit.reference.samplers import SAMPLERS, ddim_step
        from ldmkit.reference.schedules import Schedule

        schedule = Schedule.named("linear", 10)
        table: float = float(schedule.alpha_bars[3] + schedule.posterior_variance[2] + schedule.log_snr[1])
        calls: int = SAMPLERS["heun"].model_calls(10)
        print(ldmkit.__version__, table, calls, ddim_step, train, export_onnx, ldmkit.engine.sample.generate,
              ldmkit.export.runtime.OnnxSampler, ldmkit.cli.main, ldmkit.common.SPACING)
        """))
    (tmp_path / "pyrightconfig.json").write_text("{}")  # its own project: pyright's defaults, nothing above
    report = _pyright("--project", str(tmp_path / "pyrightconfig.json"), str(script), cwd=tmp_path)
    errors = [f"{d['range']['start']['line'] + 1}: {d['message']}" for d in report["generalDiagnostics"]
              if d["severity"] == "error"]
    assert not errors, "\n".join(errors)
