"""Training: stage 1 the VAE (L9), stage 2 the class-conditional latent U-Net (L4/L5 with V1 scaling,
label dropout for classifier-free guidance, warm-up then cosine learning-rate decay), on one process or
many (torchrun → DDP).

Determinism and resume. Every random draw of step s is made from a CPU generator seeded by (seed, stage,
s), for the whole global batch, and each rank takes its own rows; the batch indices come from a
``DistributedSampler`` (seeded, ``set_epoch``) sliced at the step's position in the epoch. So a resumed
run, or a run on N processes with the same global batch, sees exactly the data and noise of an
uninterrupted single-process run, and ends with the same parameters (to float tolerance under DDP).
The checkpoint's ``step`` counts both stages (VAE steps first), which is all a resume needs.

Stopping and safety. SIGTERM or SIGINT (what a scheduler, a spot instance or Ctrl-C sends) does not end the
run at once: the step in progress finishes, the checkpoint is written, and :class:`Preempted` is raised (the
command line exits with status 75). Under torchrun the stop flag travels in the all-reduce that already
averages each step's loss, so every rank stops after the same step at no extra cost. A trainer holds an
OS lock on the run folder (a second one is refused; the lock dies with its process), removes temporary
files an interrupted write left there, and never writes a checkpoint with a non-finite parameter.

Structure: :func:`train` sets up the process, data and config; :class:`Trainer` holds the run's state,
restores a checkpoint and runs the one step loop (forward, optimize, log, checkpoint); :func:`train_vae`
and :func:`train_unet` describe each stage's step to it as a :class:`Stage`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DistributedSampler

from ldmkit.common import (
    DEFAULT_GUIDANCE,
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    MAX_SAMPLES,
    atomic_write,
    write_errors,
)
from ldmkit.images import write_images
from ldmkit.reference.latent import latent_std

from . import diffusion as D
from .checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from .config import GRID_PER_CLASS, Config
from .data import load_dataset
from .device import resolve_device
from .models import VAE, UNet
from .sample import generate

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the run folder is not locked there
    fcntl = None

CHECKPOINT = "checkpoint.pt"
LOCK = ".train.lock"  # in the run folder: holds the pid of the trainer that has it locked
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingDiverged(RuntimeError):
    """The loss or a parameter became NaN or Inf; the last good checkpoint was left as it was."""


class Preempted(Exception):
    """SIGTERM or SIGINT stopped training after a whole step, and the checkpoint holds that step. ``main``:
    raised on rank 0 (the process that reports it)."""

    def __init__(self, message: str, main: bool = True):
        super().__init__(message)
        self.main = main


@dataclass
class Run:
    """Where this process runs: device, rank and world size (1 without torchrun)."""

    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def start_run(device: str = "auto") -> Run:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on the CPU)."""
    dev = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Run(dev)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Run(dev, rank, world)


def _generator(seed: int, stage: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + stage * 100_000_007 + step)


def _rows(x: torch.Tensor, run: Run) -> torch.Tensor:
    """This rank's rows of a global-batch tensor (rank r takes rows r, r + world, …, as DistributedSampler)."""
    return x[run.rank::run.world]


class Batches:
    """Global-batch indices for any step: a DistributedSampler's seeded permutation for the step's epoch,
    sliced at the step's position, so batches are addressable by step (resume) and split across ranks."""

    def __init__(self, n: int, batch_size: int, seed: int, run: Run):
        if batch_size % run.world:
            raise ValueError(f"batch size {batch_size} must be divisible by the number of processes {run.world}")
        self.local = batch_size // run.world
        self.sampler = DistributedSampler(range(n), num_replicas=run.world, rank=run.rank, shuffle=True, seed=seed,
                                          drop_last=True)
        self.per_epoch = len(self.sampler) // self.local
        if self.per_epoch == 0:
            raise ValueError(f"the dataset ({n} examples) is smaller than one batch ({batch_size})")
        self._epoch, self._indices = None, None

    def __call__(self, step: int) -> torch.Tensor:
        epoch, pos = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._epoch, self._indices = epoch, torch.tensor(list(iter(self.sampler)))
        return self._indices[pos * self.local:(pos + 1) * self.local]


def vae_loss(vae, x: torch.Tensor, noise: torch.Tensor, config: Config):
    """L9 per pixel: (−log p(x given z) + β·KL(q(z given x) ‖ N(0, I)))/D with z = μ + σ ⊙ ε (K3, K4, or the
    Bernoulli likelihood on (x + 1)/2). Returns (loss, reconstruction MSE, KL per example)."""
    out, mean, logvar = vae(x, noise)
    d = x[0].numel()
    if config.vae.likelihood == "gaussian":
        lv = config.vae.recon_logvar
        nll = 0.5 * ((x - out).pow(2) * math.exp(-lv) + lv + math.log(2 * math.pi)).flatten(1).sum(1)
        recon = out
    else:
        nll = torch.nn.functional.binary_cross_entropy_with_logits(out, (x + 1) / 2, reduction="none").flatten(1).sum(1)
        recon = 2 * torch.sigmoid(out) - 1
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1)
    loss = (nll + config.train.kl_weight * kl).mean() / d
    return loss, (recon - x).pow(2).mean().detach(), kl.mean().detach()


@torch.no_grad()
def encode_latents(vae: VAE, images: torch.Tensor, device, batch_size: int = 500):
    """(mean, logvar) of q(z given x) for every image, on the CPU (stage 2's latent cache)."""
    means, logvars = [], []
    vae.eval()
    for i in range(0, len(images), batch_size):
        m, lv = vae.encode(images[i:i + batch_size].to(device))
        means.append(m.float().cpu())
        logvars.append(lv.float().cpu())
    return torch.cat(means), torch.cat(logvars)


def unet_lr(s: int, tc) -> float:
    """The U-Net's learning rate at stage-2 step s: linear warm-up over ``warmup_steps``, then cosine decay
    to 0 at ``unet_steps`` — a function of the step alone, so a resumed run follows it exactly."""
    if s < tc.warmup_steps:
        return tc.lr * (s + 1) / tc.warmup_steps
    span = max(tc.unet_steps - tc.warmup_steps, 1)
    return tc.lr * 0.5 * (1 + math.cos(math.pi * (s - tc.warmup_steps) / span))


def _agree(loss: torch.Tensor, stop: bool, run: Run) -> tuple[float, bool]:
    """The loss averaged over all ranks and whether any rank was asked to stop, in one all-reduce (every
    rank gets both, so a NaN or a signal anywhere stops all after the same step)."""
    value = torch.stack([loss.detach().float().reshape(()), torch.tensor(float(stop), device=loss.device)])
    if run.world > 1:
        dist.all_reduce(value)
        value[0] /= run.world
    return float(value[0]), bool(value[1] > 0)


@contextlib.contextmanager
def stop_signals() -> Iterator[list[str]]:
    """While the block runs, SIGTERM and SIGINT append their name to the yielded list instead of ending the
    process (the training loop reads it after each step); the previous handlers come back afterwards.
    Outside the main thread, where Python cannot install handlers, the list stays empty."""
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in STOP_SIGNALS:
        signal.signal(s, lambda signum, frame: received.append(signal.Signals(signum).name))
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def lock_folder(out: Path) -> Iterator[None]:
    """Create ``out`` and hold an exclusive ``fcntl.flock`` on ``out``/.train.lock for the block, with this
    process's pid in the file. The kernel drops the lock when the process ends, however it ends (kill -9
    included), so it never stays stuck. OSError naming the holder's pid if another trainer has it."""
    if fcntl is None:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise OSError(f"output folder {out} is not writable: cannot create {path} ({exc.strerror})") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise OSError(f"run folder {out} is in use by another trainer (pid {holder} holds {path}): wait for "
                          f"it to end or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def remove_stale_temp_files(out: Path) -> list[Path]:
    """Remove the temporary files (``common.atomic_write``'s ".NAME.XXXXXXXX.tmp") that an interrupted write
    of the trainer's own files left: the checkpoint, config.json and metrics.jsonl (``trim_metrics``) in ``out``,
    the grids in ``out``/samples.
    Call with the folder locked. Their paths."""
    patterns = {out: re.compile(rf"\.({re.escape(CHECKPOINT)}|config\.json|metrics\.jsonl)\.[0-9a-f]{{8}}\.tmp"),
                out / "samples": re.compile(r"\.step\d+\.png\.[0-9a-f]{8}\.tmp")}
    stale = sorted(p for folder, pattern in patterns.items() if folder.is_dir() for p in folder.iterdir()
                   if pattern.fullmatch(p.name) and p.is_file())
    for p in stale:
        p.unlink()
    return stale


def trim_metrics(path: Path, step: int) -> int:
    """Keep the lines of metrics.jsonl ``path`` that record steps up to ``step`` (the checkpoint's a run goes on
    from; 0 for a fresh start), dropping the later ones (a resumed run logs those steps again) and any line that
    is not a whole record (a kill or a full disk during a write), so a resumed run's metrics.jsonl is an
    uninterrupted run's. Rewritten atomically when anything is dropped; the number of lines dropped."""
    if not path.is_file():
        return 0
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the newline that ends the last whole line

    def kept(line: bytes) -> bool:
        try:
            record = json.loads(line)
        except ValueError:
            return False
        return isinstance(record, dict) and type(record.get("step")) is int and record["step"] <= step

    keep = [line for line in lines if kept(line)]
    if len(keep) < len(lines) or (not data.endswith(b"\n") and data):
        with write_errors(path, "; nothing was trained"), atomic_write(path) as f:
            f.write(b"".join(line + b"\n" for line in keep))
    return len(lines) - len(keep)


def prepare_output(out: Path, resume: bool) -> Path:
    """Create ``out``; refuse to start over an existing checkpoint unless resuming; check it is writable."""
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise PermissionError(f"output folder {out} is not writable")
    ckpt = out / CHECKPOINT
    if ckpt.exists() and not resume:
        raise FileExistsError(f"{ckpt} exists: pass --resume to continue that run, or choose another --out")
    if resume and not ckpt.exists():
        raise FileNotFoundError(f"--resume was given but {ckpt} does not exist")
    return ckpt


#: ``progress(label, done, total, record)``: see :func:`train`.
Progress = Callable[[str, int, int, dict | None], None]


@dataclass
class Stage:
    """One stage for :meth:`Trainer.loop`: the run's global steps ``first`` … ``first + steps − 1``.
    ``forward(s)`` draws stage step s's batch and noise and returns (loss, extra record fields);
    ``after_update`` runs after each optimizer step (the U-Net's EMA); ``after_step(s + 1)`` after each
    step is logged, on rank 0 (sample grids)."""

    name: str  # "vae" or "unet": the records' "stage"; the checkpoint's metric is "<name>_loss"
    label: str  # "VAE" or "U-Net": the progress label and the divergence message
    first: int
    steps: int
    batch_size: int  # global, for images_per_s
    net: torch.nn.Module  # whose gradients are clipped
    opt: torch.optim.Optimizer
    forward: Callable[[int], tuple[torch.Tensor, dict]]
    after_update: Callable[[], None] | None = None
    after_step: Callable[[int], None] | None = None


class Trainer:
    """A run's state (process, config, networks, EMA, both optimizers, the global step) and the step loop
    both stages share. Resuming happens here, once: the networks, the EMA, the step, and the optimizer of
    the stage the checkpoint was written in (checked against its network first). ``signals`` is the list
    of :func:`stop_signals`: once it holds a name, the loop stops after the step in progress."""

    def __init__(self, config: Config, out: Path, run: Run, state: dict | None, progress: Progress | None,
                 stop_after: int | None, signals: list[str] | None = None):
        self.config, self.tc, self.run, self.out = config, config.train, run, out
        self.ckpt_path = out / CHECKPOINT
        self.progress = progress if run.main else None
        self.stop_after = stop_after
        self.signals = signals if signals is not None else []
        tc = self.tc
        self.total = tc.vae_steps + tc.unet_steps
        torch.manual_seed(tc.seed)
        vae, unet = VAE.from_config(config.vae), UNet.from_config(config.unet)
        ema = AveragedModel(unet, multi_avg_fn=get_ema_multi_avg_fn(tc.ema_decay))
        self.step = self.saved_step = 0
        if state is not None:
            vae.load_state_dict(state["vae"])
            unet.load_state_dict(state["unet"])
            ema.module.load_state_dict(state["ema"])
            self.step = self.saved_step = state["step"]
        self.vae, self.unet, self.ema = vae.to(run.device), unet.to(run.device), ema.to(run.device)
        self.ema.n_averaged.fill_(max(self.step - tc.vae_steps, 0))
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=tc.vae_lr, weight_decay=tc.weight_decay)
        self.unet_opt = torch.optim.AdamW(self.unet.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        if state is not None:  # a checkpoint written at step s ≤ vae_steps holds the VAE's optimizer
            vae_stage = self.step <= tc.vae_steps
            opt = self.vae_opt if vae_stage else self.unet_opt
            check_optimizer_state(state["optimizer"], opt, self.step if vae_stage else self.step - tc.vae_steps,
                                  scheduled_lr=not vae_stage, where=f"{self.ckpt_path}: checkpoint optimizer")
            opt.load_state_dict(state["optimizer"])
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if tc.precision == "bf16" and run.device.type == "cuda" else nullcontext())
        self.t_start = time.perf_counter()

    def loop(self, stage: Stage) -> bool:
        """Run ``stage`` from the current step to its end: per step forward, :meth:`optimize`, a record
        (progress, metrics.jsonl every ``log_every``), a checkpoint every ``checkpoint_every`` steps and at
        the stage's end. False when ``stop_after`` stopped it first. When a rank was signalled to stop, the
        step finishes, the checkpoint is written and :class:`Preempted` is raised (unless that step was the
        run's last: then the run is complete)."""
        tc, end = self.tc, stage.first + stage.steps
        if self.progress is not None:
            self.progress(stage.label, self.step - stage.first, stage.steps, None)
        while self.step < end:
            if self.stop_after is not None and self.step >= self.stop_after:
                return False
            t0 = time.perf_counter()
            loss, extra = stage.forward(self.step - stage.first)
            value, stop = self.optimize(loss, stage)
            if stage.after_update is not None:
                stage.after_update()
            self.step += 1
            record = {"stage": stage.name, "step": self.step, "loss": value, **extra,
                      "images_per_s": stage.batch_size / (time.perf_counter() - t0),
                      "elapsed_s": time.perf_counter() - self.t_start}
            if self.run.main:
                self.log(stage, record)
                if stage.after_step is not None:
                    stage.after_step(self.step - stage.first)
            if stop or self.step == end or (tc.checkpoint_every and self.step % tc.checkpoint_every == 0):
                self.save(stage.opt, {f"{stage.name}_loss": value})
            if stop and self.step < self.total:
                by = self.signals[0] if self.signals else "a signal to another process"
                raise Preempted(f"stopped by {by} after step {self.step} of {self.total}: {self.ckpt_path} holds "
                                f"it; continue with --resume", main=self.run.main)
        return True

    def optimize(self, loss: torch.Tensor, stage: Stage) -> tuple[float, bool]:
        """Backward, clip, and step, unless the loss (averaged over ranks) is not finite: then raise
        :class:`TrainingDiverged` with the parameters and the last checkpoint untouched. Returns that loss
        and whether any rank was signalled to stop (:func:`_agree`)."""
        stage.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(stage.net.parameters(), self.tc.grad_clip)
        value, stop = _agree(loss, bool(self.signals), self.run)
        if not math.isfinite(value):
            raise TrainingDiverged(f"the {stage.label} loss became {value} at step {self.step}: training stopped; "
                                   f"{self.kept()}")
        stage.opt.step()
        return value, stop

    def kept(self) -> str:
        """What a stopped run leaves: "the last good checkpoint (PATH, step N) is untouched"."""
        if not self.ckpt_path.exists():
            return "no checkpoint was written yet"
        return f"the last good checkpoint ({self.ckpt_path}, step {self.saved_step}) is untouched"

    def log(self, stage: Stage, record: dict):
        """Report a step (rank 0): the progress callback, and a metrics.jsonl line every ``log_every`` steps."""
        if self.progress is not None:
            self.progress(stage.label, self.step - stage.first, stage.steps, record)
        if self.tc.log_every and self.step % self.tc.log_every == 0:
            path = self.out / "metrics.jsonl"
            with write_errors(path, f"; training stopped at step {self.step}; {self.kept()}"), open(path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def save(self, opt: torch.optim.Optimizer, metrics: dict):
        """Write the checkpoint (rank 0, atomically); every rank waits for it. A non-finite parameter (every
        rank holds the same ones) raises :class:`TrainingDiverged` instead, and a failed write (a full disk,
        no permission) an OSError of one line; the last good checkpoint stays as it was either way."""
        for label, net in (("VAE", self.vae), ("U-Net", self.unet), ("EMA", self.ema.module)):
            bad = next((k for k, v in net.state_dict().items() if not torch.isfinite(v).all()), None)
            if bad is not None:
                raise TrainingDiverged(f"the {label} parameter {bad} became non-finite at step {self.step}: training "
                                       f"stopped; {self.kept()}")
        if self.run.main:
            self.ema.n_averaged.fill_(max(self.step - self.tc.vae_steps, 0))
            ckpt = make_checkpoint(self.config, self.vae.state_dict(), self.unet.state_dict(),
                                   self.ema.module.state_dict(), opt.state_dict(), self.step, metrics)
            with write_errors(self.ckpt_path, f"; training stopped at step {self.step}; {self.kept()}"):
                save_checkpoint(self.ckpt_path, ckpt)
        self.saved_step = self.step
        if self.run.world > 1:
            dist.barrier()


def check_optimizer_state(saved, opt: torch.optim.Optimizer, steps_done: int, scheduled_lr: bool, where: str) -> None:
    """Check an optimizer state dict from a checkpoint against ``opt``, the fresh AdamW of the stage's network,
    before ``load_state_dict``: the same groups with the same parameter indices and the same hyperparameters
    (the learning rate excepted when the schedule sets it each step; keys this torch does not know, or that
    an older one did not write, are left to torch); per parameter, at most AdamW's "step", "exp_avg" and
    "exp_avg_sq", the step a whole number in 1..``steps_done`` (the stage's steps so far) and the moments
    dense CPU tensors of the parameter's dtype and shape, finite, the second one ≥ 0. ValueError naming
    ``where`` and the first problem."""
    fresh = opt.state_dict()
    if not isinstance(saved, dict) or set(saved) != {"state", "param_groups"}:
        what = f"keys {sorted(map(str, saved))[:4]}" if isinstance(saved, dict) else type(saved).__name__
        raise ValueError(f"{where} must be a torch optimizer state dict (keys 'state' and 'param_groups'), got "
                         f"{what}: the checkpoint cannot be resumed")
    groups = saved["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(fresh["param_groups"]):
        raise ValueError(f"{where} param_groups must be a list of {len(fresh['param_groups'])} group(s), got "
                         f"{f'{len(groups)} group(s)' if isinstance(groups, list) else type(groups).__name__}")
    for i, (group, want) in enumerate(zip(groups, fresh["param_groups"], strict=True)):
        if not isinstance(group, dict) or group.get("params") != want["params"]:
            raise ValueError(f"{where} param_groups[{i}] must list the parameters 0..{len(want['params']) - 1} "
                             f"of the network")
        for key, value in want.items():
            if key in group and key != "params" and not (key == "lr" and scheduled_lr) \
                    and (type(group[key]) is not type(value) or group[key] != value):
                raise ValueError(f"{where} param_groups[{i}][{key!r}] is {group[key]!r:.40}, but the run's "
                                 f"config gives {value!r}")
        if scheduled_lr and not (isinstance(group.get("lr"), float) and math.isfinite(group["lr"])
                                 and group["lr"] >= 0):
            raise ValueError(f"{where} param_groups[{i}]['lr'] must be a finite float >= 0, got "
                             f"{group.get('lr')!r:.40}")
    params = [p for g in opt.param_groups for p in g["params"]]
    state = saved["state"]
    if not isinstance(state, dict):
        raise ValueError(f"{where} state must be a dict, got {type(state).__name__}")
    for index, entry in state.items():
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(params):
            raise ValueError(f"{where} state has key {index!r:.40}, but the network has parameters "
                             f"0..{len(params) - 1}")
        _check_adamw_entry(entry, params[index], steps_done, f"{where} state[{index}]")


def _check_adamw_entry(entry, param: torch.Tensor, steps_done: int, where: str) -> None:
    if not isinstance(entry, dict) or set(entry) != {"step", "exp_avg", "exp_avg_sq"}:
        got = sorted(map(str, entry)) if isinstance(entry, dict) else type(entry).__name__
        raise ValueError(f"{where} must hold AdamW's 'step', 'exp_avg' and 'exp_avg_sq', got {got!r:.80}")
    step = entry["step"]
    value = step.item() if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_meta else step
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (1 <= value <= steps_done) \
            or value != int(value):
        raise ValueError(f"{where}['step'] must be a whole number in 1..{steps_done} (the stage's steps so far), "
                         f"got {value!r:.40}")
    for key in ("exp_avg", "exp_avg_sq"):
        t = entry[key]
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.device.type != "cpu" \
                or t.is_quantized or t.dtype != param.dtype or t.shape != param.shape:
            got = (f"{t.dtype} {t.layout} tensor of shape {tuple(t.shape)} on {t.device}"
                   if isinstance(t, torch.Tensor) else type(t).__name__)
            raise ValueError(f"{where}[{key!r}] must be a dense CPU {param.dtype} tensor of shape "
                             f"{tuple(param.shape)} (its parameter's), got a {got}")
        if not torch.isfinite(t).all() or (key == "exp_avg_sq" and (t < 0).any()):
            raise ValueError(f"{where}[{key!r}] holds a non-finite{' or negative' if key == 'exp_avg_sq' else ''} "
                             f"value")


def train_vae(tr: Trainer, images: torch.Tensor) -> bool:
    """Stage 1: the VAE on L9 (``vae_loss``), skipped when a resumed run is past it. False if stopped."""
    tc, run, config = tr.tc, tr.run, tr.config
    if tr.step >= tc.vae_steps:
        return True
    model = DistributedDataParallel(tr.vae) if run.world > 1 else tr.vae
    model.train()
    batches = Batches(len(images), tc.vae_batch_size, tc.seed, run)

    def forward(s: int):
        g = _generator(tc.seed, 1, s)
        x = images[batches(s)].to(run.device)
        noise = _rows(torch.randn((tc.vae_batch_size, *config.vae.latent_shape), generator=g), run).to(run.device)
        with tr.autocast:
            loss, mse, kl = vae_loss(model, x, noise, config)
        return loss, {"recon_mse": float(mse), "kl": float(kl)}

    return tr.loop(Stage("vae", "VAE", 0, tc.vae_steps, tc.vae_batch_size, tr.vae, tr.vae_opt, forward))


def train_unet(tr: Trainer, images: torch.Tensor, labels: torch.Tensor | None) -> bool:
    """Stage 2: the latent cache, the latent scale (V1) on a fresh run, then the class-conditional latent
    U-Net (L4/L5, with Min-SNR-γ weights R1 when the config asks; label dropout, ``unet_lr``), its EMA and
    sample grids. False if stopped."""
    tc, run, config = tr.tc, tr.run, tr.config
    tr.vae.eval().requires_grad_(False)
    mean, logvar = encode_latents(tr.vae, images, run.device)
    if config.latent_scale is None:
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=_generator(tc.seed, 3, 0))
        config.latent_scale = latent_std(z.double().numpy())
        config.latent_shape = tuple(mean.shape[1:])
    schedule = config.diffusion.make_schedule()
    weights = D.loss_weights(schedule, config.diffusion.prediction, config.diffusion.min_snr_gamma, run.device)
    opt = tr.unet_opt
    model = DistributedDataParallel(tr.unet) if run.world > 1 else tr.unet
    compiled = torch.compile(model) if tc.compile else model
    model.train()
    batches = Batches(len(images), tc.batch_size, tc.seed, run)
    null, shape, B = config.unet.num_classes, config.latent_shape, tc.batch_size

    def forward(s: int):
        torch.manual_seed(_generator(tc.seed, 4 + run.rank, s).initial_seed())  # dropout, if any
        g = _generator(tc.seed, 2, s)
        idx = batches(s)
        draws = (torch.randn((B, *shape), generator=g), torch.randint(1, config.diffusion.T + 1, (B,), generator=g),
                 torch.randn((B, *shape), generator=g), torch.rand((B,), generator=g) < tc.cond_drop_prob)
        eps_z, t, eps, drop = (_rows(v, run) for v in draws)
        z0 = ((mean[idx] + (0.5 * logvar[idx]).exp() * eps_z) / config.latent_scale).to(run.device)
        t, eps = t.to(run.device), eps.to(run.device)
        y = None
        if null:
            y = torch.where(drop, torch.full_like(labels[idx], null), labels[idx]).to(run.device)
        for group in opt.param_groups:
            group["lr"] = unet_lr(s, tc)
        x_t = D.q_sample(z0, t, eps, schedule)
        with tr.autocast:
            pred = compiled(x_t, t, y)
        target = D.training_target(z0, eps, x_t, t, schedule, config.diffusion.prediction)
        loss = D.mse_per_example(pred, target)
        if weights is not None:
            loss = loss * weights[t]
        return loss.mean(), {"lr": opt.param_groups[0]["lr"]}

    def sample_grid(done: int):
        if tc.sample_every and done % tc.sample_every == 0:
            write_sample_grid(config, tr.vae, tr.ema.module, tr.out / "samples" / f"step{tr.step:07d}.png")

    return tr.loop(Stage("unet", "U-Net", tc.vae_steps, tc.unet_steps, B, tr.unet, opt, forward,
                         after_update=lambda: tr.ema.update_parameters(tr.unet), after_step=sample_grid))


def train(config: Config, out, device: str = "auto", resume: bool = False, progress: Progress | None = None,
          stop_after: int | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Train both stages into folder ``out`` (checkpoint.pt, metrics.jsonl, samples/); returns the checkpoint
    path. ``resume`` continues from ``out``/checkpoint.pt (its config wins); resuming a run whose checkpoint
    holds all its steps does nothing ("already trained"), and a checkpoint step past them is refused.
    ``stop_after``: stop after that many global steps, as a killed run would (for tests).

    ``progress(label, done, total, record)``, if given, is called on rank 0 when a stage starts, with
    ``record`` None, and after each of its steps, with that step's metrics record (the dict of a
    metrics.jsonl line: "stage", "step", "loss", "images_per_s", …). ``label`` is "VAE" or "U-Net",
    ``done`` the steps of the stage done so far (more than 0 at the start of a resumed stage) and
    ``total`` the stage's steps. The command line draws its progress bars with it. ``log(line)``, if
    given, gets rank 0's notes (temporary files removed, a run already trained).

    Rank 0 holds ``out`` locked (:func:`lock_folder`) from start to end. SIGTERM or SIGINT on any rank
    stops every rank after the same step, with the checkpoint written: :class:`Preempted`. A non-finite
    loss or parameter raises :class:`TrainingDiverged`, a failed write an OSError; both leave the last
    good checkpoint as it was."""
    note = log if log is not None else (lambda line: None)
    run = start_run(device)
    out = Path(out)
    with contextlib.ExitStack() as held:
        signals = held.enter_context(stop_signals())
        ckpt_path = out / CHECKPOINT
        if run.main:
            held.enter_context(lock_folder(out))
            prepare_output(out, resume)
            for path in remove_stale_temp_files(out):
                note(f"removed {path}, left by an interrupted write")
        if run.world > 1:
            dist.barrier()
        state = load_checkpoint(ckpt_path) if resume else None
        if state is not None:
            config = Config.from_dict(state["config"])
            total = config.train.vae_steps + config.train.unet_steps
            if state["step"] > total:
                raise ValueError(f"{ckpt_path}: checkpoint step {state['step']} is past the end of its run "
                                 f"({config.train.vae_steps} VAE + {config.train.unet_steps} U-Net steps = {total}): "
                                 f"the checkpoint is inconsistent")
            if state["step"] == total:
                if run.main:
                    note(f"already trained: {ckpt_path} holds all {total} steps of its run; nothing to do")
                return ckpt_path
        if run.main:
            start = state["step"] if state is not None else 0
            dropped = trim_metrics(out / "metrics.jsonl", start)
            if dropped:
                note(f"dropped {dropped} line(s) of {out / 'metrics.jsonl'} past step {start}, where the run goes on "
                     f"from (logged before it stopped; logged again now)")
        grid = GRID_PER_CLASS * (config.unet.num_classes or 8)
        if config.train.sample_every and grid > MAX_SAMPLES:
            raise ValueError(f"a sample grid of {config.unet.num_classes} classes would draw {grid} images, more "
                             f"than {MAX_SAMPLES}: set train.sample_every to 0")
        if run.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        images, labels, description = load_dataset(config.data["spec"], "train", config.vae.image_size,
                                                   config.unet.num_classes or None)
        if labels is None and config.unet.num_classes:
            raise ValueError(f"dataset {config.data['spec']} has no labels but the config asks for a "
                             f"class-conditional model (unet.num_classes = {config.unet.num_classes}); set it to 0")
        config.data = {**config.data,
                       **{k: description[k] for k in ("source", "format", "num_examples", "content_size",
                                                      "num_classes")}}
        tr = Trainer(config, out, run, state, progress, stop_after, signals)
        if run.main:
            path = out / "config.json"
            with write_errors(path, "; nothing was trained"), atomic_write(path, binary=False) as f:
                f.write(json.dumps(config.to_dict(), indent=2) + "\n")
        if train_vae(tr, images) and train_unet(tr, images, labels) and run.world > 1:
            dist.barrier()  # no rank returns before the last checkpoint is written
    return ckpt_path


def write_sample_grid(config: Config, vae: VAE, unet: UNet, path: Path, per_class: int = GRID_PER_CLASS,
                      steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, seed: int = 0) -> Path:
    """A grid with one row per class (or 8 rows unconditionally): the default sampler, steps and guidance."""
    path.parent.mkdir(parents=True, exist_ok=True)
    k = config.unet.num_classes
    labels = np.repeat(np.arange(k), per_class) if k else None
    was_training = unet.training
    unet.eval()
    images = generate(config, vae, unet, k * per_class if k else 8 * per_class, labels, DEFAULT_SAMPLER, steps,
                      guidance=guidance if k else None, seed=seed)
    unet.train(was_training)
    return write_images(path, images, nrow=per_class)
