"""Packaging and the dependency rule (docs/design.md): what imports what, and what an installed wheel holds.

The import checks run in a subprocess with a ``sys.meta_path`` finder that makes the forbidden modules
unimportable, so they hold whatever happens to be installed in the test environment.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A prelude for `python -c`: make the named top-level modules (and their submodules) unimportable.
BLOCKER = textwrap.dedent(
    """
    import sys

    class _Blocker:
        blocked = {blocked!r}

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.blocked:
                raise ImportError(f"{{name}} is blocked in this test")
            return None

    sys.meta_path.insert(0, _Blocker())
    """
)


def run_python(code: str, *, blocked=(), cwd=None, env=None, args=()) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (this one's), with ``blocked`` top-level modules unimportable."""
    prelude = BLOCKER.format(blocked=set(blocked)) if blocked else "import sys\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        cwd=cwd if cwd is not None else ROOT,
        env=env,
        timeout=300,
    )


def _check(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


# ------------------------------------------------------------------------------------ dependency rule


def test_reference_imports_without_torch():
    """ldmkit.reference and every submodule import where torch (and the ONNX stack) cannot be found."""
    out = _check(
        run_python(
            """
            import importlib, json, pkgutil
            import ldmkit.reference as ref
            names = [m.name for m in pkgutil.walk_packages(ref.__path__, ref.__name__ + ".")]
            for name in names:
                importlib.import_module(name)
            heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "onnx", "onnxruntime"})
            print(json.dumps({"modules": names, "heavy": heavy}))
            """,
            blocked={"torch", "onnx", "onnxruntime", "onnxscript"},
        )
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result["heavy"] == []
    assert "torch" not in result["heavy"]


def test_reference_imports_only_numpy():
    """docs/design.md: ldmkit.reference depends on numpy only (plus the standard library)."""
    out = _check(
        run_python(
            """
            import importlib, json, pkgutil
            before = set(sys.modules)
            import ldmkit.reference as ref
            for m in pkgutil.walk_packages(ref.__path__, ref.__name__ + "."):
                importlib.import_module(m.name)
            new = {m.split(".")[0] for m in set(sys.modules) - before}
            third_party = sorted(m for m in new if m not in sys.stdlib_module_names and not m.startswith("_"))
            print(json.dumps(third_party))
            """
        )
    )
    third_party = set(json.loads(out.strip().splitlines()[-1]))
    assert third_party <= {"ldmkit", "numpy"}, f"ldmkit.reference imports {sorted(third_party - {'ldmkit', 'numpy'})}"


def test_cli_help_runs_and_imports_nothing_heavy():
    """``python -m ldmkit --help`` exits 0 and imports neither torch nor numpy."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "ldmkit", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout and "golden" in proc.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert "torch" not in imported
    assert "numpy" not in imported


@pytest.mark.parametrize("argv", [["--help"], ["golden", "--help"], ["--version"]])
def test_cli_help_with_torch_and_numpy_blocked(argv):
    out = _check(
        run_python(
            """
            import json
            from ldmkit.cli import main
            try:
                main(json.loads(sys.argv[1]), prog_name="ldmkit", standalone_mode=False)
            finally:
                assert "torch" not in sys.modules and "numpy" not in sys.modules
            """,
            blocked={"torch", "numpy", "onnx", "onnxruntime"},
            args=[json.dumps(argv)],
        )
    )
    assert "ldmkit" in out


# ------------------------------------------------------------------------------------- package layout


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def test_every_package_folder_is_listed_in_pyproject():
    """Every folder with an __init__.py under a mapped package must be listed in [tool.setuptools] packages."""
    setup = _pyproject()["tool"]["setuptools"]
    listed = set(setup["packages"])
    package_dir = setup["package-dir"]
    missing = []
    for pkg, folder in package_dir.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            if any(part in {"__pycache__"} or part.startswith(".") for part in rel.parts):
                continue
            name = ".".join(part for part in (pkg, *rel.parts) if part)
            if name not in listed:
                missing.append(name)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"


def test_resources_reachable_in_this_environment():
    """Golden data and the built-in dataset resolve through importlib.resources (editable or not)."""
    import ldmkit
    import ldmkit.engine
    import ldmkit.export
    import ldmkit.golden
    import ldmkit.reference  # noqa: F401

    assert (importlib.resources.files("ldmkit") / "data" / "mnist8k.npz").is_file()
    golden = importlib.resources.files("ldmkit.golden")
    assert (golden / "manifest.json").is_file()
    from ldmkit.cli import default_golden_dir

    assert (default_golden_dir() / "manifest.json").is_file()


# ----------------------------------------------------------------------------------- installed wheel

_COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache",
    ".hypothesis", "runs", "node_modules", ".coverage*", "htmlcov",
)  # fmt: skip


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> tuple[Path, Path]:
    """Build a wheel from a copy of the tree (no build/ or egg-info left in the repo) and install it."""
    import setuptools

    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    assert (major, minor) >= (70, 1), f"wheel build needs setuptools >= 70.1 (dev extra), not {setuptools.__version__}"
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_COPY_IGNORE)
    dist = tmp / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    proc = subprocess.run(
        [*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(dist)],
        capture_output=True, text=True, cwd=tmp, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = dist.glob("ldmkit-*.whl")
    target = tmp / "site"
    proc = subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        capture_output=True, text=True, cwd=tmp, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return wheel, target


@pytest.mark.slow
def test_wheel_contents(installed_wheel):
    wheel, target = installed_wheel
    import ldmkit

    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert "ldmkit/data/mnist8k.npz" in names
    assert "ldmkit/golden/manifest.json" in names
    assert "ldmkit/reference/__init__.py" in names
    for npz in sorted((ROOT / "golden").glob("*.npz")):
        assert f"ldmkit/golden/{npz.name}" in names
    # one top-level import name: nothing else is installed beside ldmkit (no global reference/, tests/ ...)
    top = {n.split("/")[0] for n in names}
    assert top == {"ldmkit", f"ldmkit-{ldmkit.__version__}.dist-info"}, sorted(top)
    entry_points = (target / f"ldmkit-{ldmkit.__version__}.dist-info" / "entry_points.txt").read_text()
    assert "ldmkit = ldmkit.cli:main" in entry_points


@pytest.mark.slow
def test_installed_wheel_imports_and_resources(installed_wheel, tmp_path):
    """From the installed wheel alone (source tree not on the path): imports, resources and the CLI."""
    _, target = installed_wheel
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP"}}
    env["PYTHONPATH"] = str(target)
    out = _check(
        run_python(
            """
            import importlib, importlib.metadata, importlib.resources, json
            import ldmkit
            mods = {}
            for name in ["ldmkit", "ldmkit.reference", "ldmkit.engine", "ldmkit.export", "ldmkit.golden",
                         "ldmkit.cli"]:
                mods[name] = importlib.import_module(name).__file__
            golden = importlib.resources.files("ldmkit.golden")
            print(json.dumps({
                "files": mods,
                "mnist": (importlib.resources.files("ldmkit") / "data" / "mnist8k.npz").is_file(),
                "golden": sorted(p.name for p in golden.iterdir()),
                "version": ldmkit.__version__,
                "dist_version": importlib.metadata.version("ldmkit"),
            }))
            """,
            cwd=tmp_path,
            env=env,
        )
    )
    info = json.loads(out.strip().splitlines()[-1])
    for name, file in info["files"].items():
        assert Path(file).resolve().is_relative_to(target.resolve()), f"{name} came from {file}, not the wheel"
    assert info["mnist"]
    assert "manifest.json" in info["golden"]
    assert info["version"] == info["dist_version"]

    proc = subprocess.run(
        [sys.executable, "-m", "ldmkit", "--version"], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"ldmkit {info['version']}"


# ------------------------------------------------------------------- engine: no CLI, sampling without training


def test_engine_imports_neither_click_nor_the_cli():
    """ldmkit.engine and every submodule import where click cannot be found, and none imports the command
    line: the engine reports training progress through a callback that the CLI draws."""
    pytest.importorskip("torch")
    out = _check(
        run_python(
            """
            import importlib, json, pkgutil
            import ldmkit.engine as engine
            names = [m.name for m in pkgutil.walk_packages(engine.__path__, engine.__name__ + ".")]
            for name in names:
                importlib.import_module(name)
            cli = sorted(m for m in sys.modules if m in {"ldmkit.cli", "ldmkit.__main__"} or m.startswith("click"))
            print(json.dumps({"modules": names, "cli": cli}))
            """,
            blocked={"click"},
        )
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert {"ldmkit.engine.train", "ldmkit.engine.sample", "ldmkit.engine.device"} <= set(result["modules"])
    assert result["cli"] == []
    assert "ldmkit.cli" not in result["cli"]


def test_sampling_modules_do_not_import_training():
    """Sampling and evaluation (and resolve_device, which their commands use) import without the training
    module."""
    pytest.importorskip("torch")
    out = _check(
        run_python(
            """
            import json
            import ldmkit.engine.evaluate
            import ldmkit.engine.sample
            from ldmkit.engine.device import resolve_device
            assert str(resolve_device("cpu")) == "cpu"
            print(json.dumps(sorted(m for m in sys.modules if m.startswith("ldmkit."))))
            """
        )
    )
    modules = json.loads(out.strip().splitlines()[-1])
    assert "ldmkit.engine.sample" in modules and "ldmkit.engine.evaluate" in modules
    assert "ldmkit.engine.train" not in modules


def test_sample_and_eval_commands_do_not_import_training(tmp_path):
    """``ldmkit sample`` and ``ldmkit eval`` on a checkpoint run without importing ldmkit.engine.train."""
    pytest.importorskip("torch")
    out = _check(
        run_python(
            """
            import json
            from pathlib import Path

            import torch

            from ldmkit.cli import main
            from ldmkit.engine.checkpoint import make_checkpoint, save_checkpoint
            from ldmkit.engine.config import Config, DiffusionConfig, UNetConfig, VAEConfig
            from ldmkit.engine.models import VAE, UNet

            config = Config(vae=VAEConfig(base_channels=8, channel_mult=(1, 2, 2), latent_channels=2, groups=4),
                            unet=UNetConfig(in_channels=2, base_channels=16, channel_mult=(1, 2),
                                            attention_levels=(1,), num_heads=2, num_classes=10, groups=4),
                            diffusion=DiffusionConfig(T=20), latent_shape=(2, 8, 8), latent_scale=1.0)
            torch.manual_seed(0)
            vae, unet = VAE.from_config(config.vae).state_dict(), UNet.from_config(config.unet).state_dict()
            ckpt = Path(sys.argv[1]) / "checkpoint.pt"
            save_checkpoint(ckpt, make_checkpoint(config, vae, unet, unet))
            for argv in (["sample", str(ckpt), "-n", "2", "--steps", "2", "--device", "cpu",
                          "-o", str(ckpt.with_name("grid.npy"))],
                         ["eval", str(ckpt), "--nll-images", "0", "--per-class", "0", "--device", "cpu"]):
                main(argv, prog_name="ldmkit", standalone_mode=False)
            print(json.dumps("ldmkit.engine.train" in sys.modules))
            """,
            args=[str(tmp_path)],
        )
    )
    assert (tmp_path / "grid.npy").is_file() and (tmp_path / "eval.json").is_file()
    assert json.loads(out.strip().splitlines()[-1]) is False


@pytest.mark.slow
def test_pyright_follows_the_installed_wheel(installed_wheel, tmp_path):
    """Static tools follow a wheel install too: with only the installed wheel on pyright's path (an
    interpreter without ldmkit, the wheel's folder as an extra path), a user's script resolves every part."""
    from test_static import _pyright, _unresolved

    _, target = installed_wheel
    base = getattr(sys, "_base_executable", sys.executable)
    assert subprocess.run([base, "-c", "import ldmkit"], capture_output=True).returncode != 0, (
        "the base interpreter must not have ldmkit for this test")
    script = tmp_path / "user_script.py"
    script.write_text("import ldmkit.cli\nimport ldmkit.engine.sample\nimport ldmkit.export.runtime\n"
                      "from ldmkit.reference.samplers import SAMPLERS\n"
                      "from ldmkit.reference.schedules import Schedule\n"
                      "print(SAMPLERS, Schedule.named('linear', 10).alpha_bars, ldmkit.cli.main)\n")
    (tmp_path / "pyrightconfig.json").write_text(json.dumps({"extraPaths": [str(target)]}))
    report = _pyright("--project", str(tmp_path / "pyrightconfig.json"), "--pythonpath", base, str(script),
                      cwd=tmp_path, python=None)
    assert not _unresolved(report), "\n".join(_unresolved(report))
