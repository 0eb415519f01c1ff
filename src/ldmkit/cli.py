"""The ``ldmkit`` command line (click).

Only click is imported at module level: numpy, torch, onnx and the parts of ldmkit that need them are
imported inside each command, so ``ldmkit --help`` stays fast and never imports torch.

Error convention: every command and group built on :class:`LdmkitCommand` / :class:`LdmkitGroup`
(the default for anything added to :func:`main` with ``@main.command()`` or ``@main.group()``) turns a
``ValueError``, ``TypeError`` or ``OSError`` (``FileNotFoundError`` included) raised inside it, and a
usage error of click's (a bad option value), into a one-line ``Error: ...`` on stderr and exit status 2,
never a traceback. Any other exception is a bug and keeps its traceback, except a ``ModuleNotFoundError``
for an optional dependency (torch, onnx, ...), which becomes a one-line hint naming the extra to install
(also exit status 2). Warnings raised inside a command (NumPy's RuntimeWarnings, torch's) are held back:
a failing command prints its one error line only; a passing one prints ldmkit's own notes
(``common.LdmkitNote``) as ``note: ...`` lines on stderr at the end and drops the rest.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from pathlib import Path

import click

from ldmkit.common import (
    DEFAULT_GUIDANCE,
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    MAX_GUIDANCE,
    MAX_SAMPLES,
    LdmkitNote,
    __version__,
    atomic_write,
    one_line,
)

#: Exceptions that mean "bad input" (arguments, files, data), reported as one line with exit status 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, OSError)

#: Exit status for bad input, the same as click's own usage errors.
USER_ERROR_EXIT = 2

#: Exit status of ``ldmkit train`` stopped by SIGTERM or SIGINT after writing its checkpoint: sysexits.h's
#: EX_TEMPFAIL ("temporary failure; the user is invited to retry"), i.e. run it again with --resume. Not
#: 128 + the signal number (143, 130), which is what a shell reports for a process the signal killed
#: without saving; SLURM, Kubernetes and torchrun read no meaning into a worker's status besides non-zero.
PREEMPTED_EXIT = 75

#: Optional dependencies and the extra that installs each; a command that needs a missing one fails
#: with a one-line hint (exit status 2) instead of a ModuleNotFoundError traceback.
OPTIONAL_DEPENDENCIES: dict[str, str] = {
    "torch": "engine",
    "onnx": "export",
    "onnxscript": "export",
    "onnxruntime": "export",
    "PIL": "images",
}


class CommandError(click.ClickException):
    """A user-facing error: click prints ``Error: <message>`` on stderr and exits with status 2."""

    exit_code = USER_ERROR_EXIT


def _missing_extra(exc: ModuleNotFoundError) -> CommandError | None:
    top = (exc.name or "").split(".")[0]
    extra = OPTIONAL_DEPENDENCIES.get(top)
    if extra is None:
        return None
    return CommandError(f"this command needs {top}, which is not installed: pip install 'ldmkit[{extra}]'")


@contextlib.contextmanager
def user_errors():
    """Turn bad-input exceptions raised in the block into :class:`CommandError` and hold back its warnings
    (the convention above)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        except click.UsageError as exc:  # click's own would add the usage and a hint: three more lines
            raise CommandError(one_line(exc.format_message())) from exc
        except click.ClickException:
            raise
        except USER_ERRORS as exc:
            raise CommandError(one_line(exc)) from exc
        except ModuleNotFoundError as exc:
            error = _missing_extra(exc)
            if error is None:
                raise
            raise error from exc
    for note in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, LdmkitNote)):
        click.echo(f"note: {one_line(note)}", err=True)


def _reraise_user_errors(invoke):
    @functools.wraps(invoke)
    def wrapper(self, ctx):
        with user_errors():
            return invoke(self, ctx)

    return wrapper


class LdmkitCommand(click.Command):
    """A click command that applies the ldmkit error convention (see the module docstring)."""

    invoke = _reraise_user_errors(click.Command.invoke)


class LdmkitGroup(click.Group):
    """A click group whose own callback and every subcommand/subgroup follow the ldmkit error convention."""

    command_class = LdmkitCommand
    group_class = type  # subgroups made with @group.group() are LdmkitGroup too

    invoke = _reraise_user_errors(click.Group.invoke)


def handle_errors(func):
    """Decorator form of the convention, for a callback used outside an Ldmkit command class."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with user_errors():
            return func(*args, **kwargs)

    return wrapper


@click.group(cls=LdmkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="ldmkit", message="%(prog)s %(version)s")
def main() -> None:
    """ldmkit: a latent-diffusion reference toolkit.

    NumPy reference formulas (ldmkit.reference), a PyTorch training engine (ldmkit.engine) and an ONNX
    export with a NumPy + ONNX Runtime sampler (ldmkit.export).
    """


# --------------------------------------------------------------------------------------------- golden


def default_golden_dir() -> Path:
    """The directory of the installed ``ldmkit.golden`` package (the source ``golden/`` in editable mode)."""
    from importlib.resources import files

    res = files("ldmkit.golden")
    path = Path(str(res))
    if not path.is_dir():  # e.g. a zipped install, where the package has no real directory
        raise FileNotFoundError(f"the ldmkit.golden package has no directory on disk ({res!r}); pass --dir")
    return path


_DIR_OPTION = click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of golden files. Default: the installed ldmkit.golden package directory.",
)


@main.group()
def golden() -> None:
    """Golden files: expected outputs of the reference for fixed seeds."""


@golden.command("check")
@_DIR_OPTION
def golden_check(directory: Path | None) -> None:
    """Recompute every golden file with the reference and compare (exit 1 on any mismatch)."""
    directory = directory if directory is not None else default_golden_dir()
    if not directory.is_dir():
        raise FileNotFoundError(f"golden directory not found: {directory}")
    from ldmkit.reference import golden as golden_ref

    problems = list(golden_ref.check(directory))
    cases = sorted(p.name for p in directory.glob("*.npz"))
    for name in cases:
        bad = any(name in problem for problem in problems)
        click.echo(f"{'FAIL' if bad else 'ok  '}  {name}")
    if problems:
        for problem in problems:
            click.echo(f"problem: {problem}", err=True)
        click.echo(f"golden check: {len(problems)} problem(s) in {directory}", err=True)
        click.get_current_context().exit(1)
    click.echo(f"golden check: {len(cases)} files OK")


@golden.command("regen")
@_DIR_OPTION
def golden_regen(directory: Path | None) -> None:
    """Regenerate the golden files (and manifest.json) from the current reference."""
    directory = directory if directory is not None else default_golden_dir()
    directory.mkdir(parents=True, exist_ok=True)
    from ldmkit.reference import golden as golden_ref

    written = list(golden_ref.regen(directory))
    for name in written:
        click.echo(f"wrote {name}")
    click.echo(f"golden regen: {len(written)} files written to {directory}")


# ------------------------------------------------------------------------------------------- train


class _StageBars:
    """``progress`` for ``ldmkit.engine.train.train``: a click progress bar per stage on stderr (label,
    position, "loss … img/s"); :meth:`close` finishes the last one."""

    def __init__(self):
        self.bar, self.text = None, ""

    def __call__(self, label: str, done: int, total: int, record: dict | None) -> None:
        if record is None:  # a stage starts (done > 0 when it resumes)
            self.close()
            self.text = ""
            self.bar = click.progressbar(length=total, label=f"{label:5}", file=click.get_text_stream("stderr"),
                                         item_show_func=lambda _: self.text, show_pos=True)
        else:
            self.text = f"loss {record['loss']:.4f} {record['images_per_s']:.0f} img/s"
        self.bar.update(done - self.bar.pos)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.render_finish()
            self.bar = None


@main.command()
@click.option("--data", default=None,
              help="'mnist' (the built-in 8,000 digits, the default), an IDX/.npz/.npy file, or a folder of images.")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run folder (checkpoint.pt, metrics.jsonl, samples/). Default: runs/PRESET.")
@click.option("--preset", default="demo", show_default=True, help="demo (2-core CPU, <= 10 min), small, base.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A config.json (as a run writes) instead of a preset.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@click.option("--vae-steps", type=click.IntRange(min=0), default=None, help="Override the preset.")
@click.option("--unet-steps", type=click.IntRange(min=0), default=None, help="Override the preset.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="U-Net global batch (override).")
@click.option("--seed", type=int, default=None, help="Override the preset's seed.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default=None, help="bf16 autocast (CUDA only).")
@click.option("--compile", "compile_", is_flag=True, default=None, help="torch.compile the U-Net.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(data, out, preset, config_file, device, resume, vae_steps, unet_steps, batch_size, seed, precision, compile_,
          quiet):
    """Train the VAE and the latent U-Net; writes OUT/checkpoint.pt. Under torchrun it uses DDP.

    SIGTERM or SIGINT (Ctrl-C) stops it after the step in progress, with the checkpoint written: one line
    on stderr and exit status 75; --resume continues bit-identically. A second trainer on the same --out
    is refused (exit status 2) while the first runs."""
    import time

    from ldmkit.engine import config as cfg
    from ldmkit.engine.train import Preempted, TrainingDiverged
    from ldmkit.engine.train import train as run_training

    if config_file is not None:
        from ldmkit.common import read_json

        config = cfg.Config.from_dict(read_json(config_file, "config"))
    else:
        config = cfg.preset(preset)
    if data is not None or config_file is None:
        config.data = {"spec": data or "mnist"}
    overrides = {"vae_steps": vae_steps, "unet_steps": unet_steps, "batch_size": batch_size, "seed": seed,
                 "precision": precision, "compile": compile_}
    for key, value in overrides.items():
        if value is not None:
            setattr(config.train, key, value)
    config.train.__post_init__()
    from ldmkit.engine.checkpoint import model_states

    model_states(config, str(config_file or f"preset {preset}"))  # the size bound, before anything is allocated
    out = out if out is not None else Path("runs") / preset
    start = time.perf_counter()
    bars = None if quiet else _StageBars()
    try:
        path = run_training(config, out, device=device, resume=resume, progress=bars, log=click.echo)
    except TrainingDiverged as exc:
        raise CommandError(one_line(exc)) from exc
    except Preempted as exc:
        if bars is not None:
            bars.close()
        if exc.main:
            click.echo(one_line(exc), err=True)
        click.get_current_context().exit(PREEMPTED_EXIT)
    finally:
        if bars is not None:
            bars.close()
    click.echo(f"trained in {time.perf_counter() - start:.0f} s: {path}")


# ------------------------------------------------------------------------------------------ sample


class SamplerChoice(click.Choice):
    """``click.Choice`` over the names of ``reference.samplers.SAMPLERS``, read when first needed (parsing
    ``--sampler`` or showing ``sample --help``), so that ``ldmkit --help`` imports no NumPy."""

    def __init__(self):
        super().__init__(())

    @property
    def choices(self):
        from ldmkit.reference.samplers import SAMPLERS

        return tuple(SAMPLERS)

    @choices.setter
    def choices(self, value):  # click.Choice.__init__ assigns the (empty) list it was given
        pass

    def convert(self, value, param, ctx):
        if value not in self.choices:  # one line, like every other bad argument (click's own adds the usage)
            raise CommandError(f"sampler must be one of {list(self.choices)}, got {value!r}")
        return value


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-n", "n", type=int, default=64, show_default=True, help=f"Number of images (1..{MAX_SAMPLES}).")
@click.option("--steps", type=click.IntRange(min=1), default=DEFAULT_STEPS, show_default=True)
@click.option("--sampler", type=SamplerChoice(), default=DEFAULT_SAMPLER, show_default=True)
@click.option("--eta", type=float, default=0.0, show_default=True, help="DDIM's eta (0: deterministic).")
@click.option("--class", "class_id", type=int, default=None, help="Class id (default: all classes in turn).")
@click.option("--guidance", type=float, default=None,
              help=f"Classifier-free guidance w, 0..{MAX_GUIDANCE:g} (default {DEFAULT_GUIDANCE:g} if conditional).")
@click.option("--guidance-rescale", type=float, default=None,
              help="Guidance rescale phi in [0, 1] (Lin et al.; default 0, or the ONNX folder's default).")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--graph", is_flag=True, help="ONNX folder only: one run of sampler.onnx (ddim or dpmpp2m, eta 0).")
@click.option("-o", "output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="grid.png (a grid) or images.npy (float32 (N, C, H, W) in [0, 1]).")
def sample(source, n, steps, sampler, eta, class_id, guidance, guidance_rescale, seed, device, graph, output):
    """Sample images from SOURCE, a checkpoint.pt or an ONNX folder.

    A checkpoint samples with the torch engine; a folder written by `ldmkit export onnx` with NumPy and ONNX
    Runtime only (--device picks the provider; a seed draws other noise there than in the engine), through the
    Python loop or, with --graph, in one run of sampler.onnx (the same images, to float32 round-off)."""
    from ldmkit.images import check_output_path, write_images

    check_output_path(output)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist (pass a checkpoint.pt or an ONNX artifact folder)")
    if source.is_dir():
        _sample_onnx(source, n, steps, sampler, eta, class_id, guidance, guidance_rescale, seed, device, graph,
                     output)
        return
    if graph:
        raise ValueError("--graph runs sampler.onnx: pass an ONNX artifact folder (ldmkit export onnx), "
                         "not a checkpoint")
    import torch

    from ldmkit.engine.checkpoint import load_checkpoint
    from ldmkit.engine.device import resolve_device
    from ldmkit.engine.sample import generate, models_from_checkpoint

    dev = resolve_device(device)
    config, vae, unet = models_from_checkpoint(load_checkpoint(source), dev)
    k = config.unet.num_classes
    if guidance is None and k:
        guidance = DEFAULT_GUIDANCE
    with torch.inference_mode():
        images = generate(config, vae, unet, n, class_id, sampler, steps, eta, guidance, seed,
                          guidance_rescale=guidance_rescale or 0.0)
    write_images(output, images, nrow=k if k and class_id is None else 8)
    click.echo(f"wrote {n} images to {output}")


def _sample_onnx(folder, n, steps, sampler, eta, class_id, guidance, guidance_rescale, seed, device, graph, output):
    """`ldmkit sample DIR`: the torch-free runtime (ldmkit.export.runtime) on an exported artifact."""
    from ldmkit.export.runtime import OnnxSampler
    from ldmkit.images import write_images

    runner = OnnxSampler(folder, provider=device)
    k = runner.num_classes
    if guidance is None and k:
        guidance = runner.model.defaults.guidance
    if guidance_rescale is None:
        guidance_rescale = runner.model.defaults.guidance_rescale if k else 0.0
    if graph:
        if eta != 0:
            raise ValueError(f"--graph runs sampler.onnx, whose samplers have no eta (got --eta {eta})")
        images = runner.sample_graph(n, class_id, steps, guidance, seed, sampler=sampler,
                                     guidance_rescale=guidance_rescale)
    else:
        images = runner.sample(n, class_id, sampler, steps, eta, guidance, seed, guidance_rescale=guidance_rescale)
    write_images(output, images, nrow=k if k and class_id is None else 8)
    click.echo(f"wrote {n} images to {output} (onnxruntime, {runner.provider}, {runner.precision} U-Net"
               f"{', sampler.onnx' if graph else ''})")


# ------------------------------------------------------------------------------------------ export


@main.group("export")
def export_group() -> None:
    """Export a trained checkpoint."""


@export_group.command("onnx")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Artifact folder. Default: an onnx folder beside the checkpoint.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default 18).")
@click.option("--steps", type=int, default=DEFAULT_STEPS, show_default=True, help="Default step count in sampler.json.")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--precision", type=click.Choice(["float64", "float32"]), default="float64", show_default=True,
              help="sampler.onnx's loop; float32 has no float64 tensor (for runtimes without float64 kernels).")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="An int8 U-Net in unet.onnx and sampler.onnx, calibrated on the model's own sampling and refused "
                   "if its samples are worse than float32's beyond a margin.")
def export_onnx_command(checkpoint, out, opset, steps, force, precision, quantize):
    """Write unet.onnx, vae_decoder.onnx, sampler.onnx and sampler.json (checked against the torch models)."""
    from ldmkit.export.onnx_export import DEFAULT_OPSET, export_onnx

    path = export_onnx(checkpoint, out, DEFAULT_OPSET if opset is None else opset, steps, force, log=click.echo,
                       precision=precision, quantize=quantize)
    click.echo(f"wrote {path}{' (int8 U-Net)' if quantize else ''}")


# -------------------------------------------------------------------------------------------- eval


@main.command("eval")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--nll-images", type=click.IntRange(min=0), default=100, show_default=True,
              help="Test images for the NLL bound (T U-Net calls per batch of 100; 0 skips it).")
@click.option("--per-class", type=click.IntRange(0, MAX_SAMPLES // 10), default=50, show_default=True,
              help="Samples per class for the sample statistics and quality (0 skips them).")
@click.option("--sampler", type=SamplerChoice(), default=DEFAULT_SAMPLER, show_default=True,
              help="Sampler of the samples.")
@click.option("--steps", type=click.IntRange(min=1), default=DEFAULT_STEPS, show_default=True)
@click.option("--guidance", type=float, default=None,
              help=f"Classifier-free guidance w, 0..{MAX_GUIDANCE:g} (default {DEFAULT_GUIDANCE:g} if conditional).")
@click.option("--guidance-rescale", type=float, default=0.0, show_default=True,
              help="Guidance rescale phi in [0, 1] (Lin et al.).")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("-o", "output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON file to write (default: eval.json beside the checkpoint).")
def evaluate(checkpoint, nll_images, per_class, sampler, steps, guidance, guidance_rescale, seed, device, output):
    """Test NLL (bits/dim, through the reference VLB), VAE reconstruction, sample statistics and sample quality
    against the held-out test split (a classifier's accuracy; Fréchet distance, its real-vs-real floor, the
    ratio)."""
    import json

    import torch

    from ldmkit.common import check_finite_floats
    from ldmkit.engine.checkpoint import load_checkpoint
    from ldmkit.engine.device import resolve_device
    from ldmkit.engine.evaluate import evaluate as run_eval

    output = output if output is not None else checkpoint.with_name("eval.json")
    if not output.parent.is_dir():
        raise FileNotFoundError(f"output folder {output.parent} does not exist")
    ckpt = load_checkpoint(checkpoint)
    with torch.inference_mode():
        result = run_eval(ckpt, resolve_device(device), nll_images, per_class, seed, sampler, steps, guidance,
                          guidance_rescale)
    check_finite_floats(result, f"evaluating {checkpoint}")
    for key, value in result.items():
        click.echo(f"{key:32s} {value:.4f}" if isinstance(value, float) else f"{key:32s} {value}")
    with atomic_write(output, binary=False) as f:
        f.write(json.dumps(result, indent=2) + "\n")
    click.echo(f"wrote {output}")


# ------------------------------------------------------------------------------------------ verify


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
def verify(path):
    """Check a checkpoint.pt or an ONNX artifact folder; print OK or what is wrong (exit 2).

    A checkpoint: readable with weights_only, its content matching the sha256 recorded when it was written,
    its config within bounds, every tensor dense, float32, of the config's shapes and finite. A folder: the
    checks ldmkit sample makes on load (sampler.json, each file's sha256, the graphs' inputs, outputs and
    metadata, sampler.onnx carrying the weights of unet.onnx and vae_decoder.onnx), and sampler.onnx loading
    in ONNX Runtime."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (pass a checkpoint.pt or an ONNX artifact folder)")
    if path.is_dir():
        from ldmkit.export.runtime import OnnxSampler

        runner = OnnxSampler(path, provider="cpu")
        runner.graph_session()  # sampler.onnx loads in ONNX Runtime, not only parses
        click.echo(f"OK: {path} is an ldmkit ONNX artifact ({len(runner.manifest.files)} files, sha256 and "
                   "weights consistent)")
        return
    from ldmkit.engine.checkpoint import DIGEST_KEY, load_checkpoint

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = load_checkpoint(path)
    legacy = any(issubclass(w.category, LdmkitNote) for w in caught)
    how = "structure checked, no digest recorded (an older ldmkit wrote it)" if legacy else f"{DIGEST_KEY} verified"
    click.echo(f"OK: {path} is an ldmkit checkpoint at step {ckpt['step']} ({how})")
