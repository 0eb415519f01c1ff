"""Training: stage 1 the VAE (L9), stage 2 the class-conditional latent U-Net (L4/L5 with V1 scaling,
label dropout for classifier-free guidance, warm-up then cosine learning-rate decay), on one process or
many (torchrun → DDP).

Determinism and resume. Every random draw of step s is made from a CPU generator seeded by (seed, stage,
s), for the whole global batch, and each rank takes its own rows; the batch indices come from a
``DistributedSampler`` (seeded, ``set_epoch``) sliced at the step's position in the epoch. So a resumed
run, or a run on N processes with the same global batch, sees exactly the data and noise of an
uninterrupted single-process run, and ends with the same parameters (to float tolerance under DDP).
The checkpoint's ``step`` counts both stages (VAE steps first), which is all a resume needs.

Structure: :func:`train` sets up the process, data and config; :class:`Trainer` holds the run's state,
restores a checkpoint and runs the one step loop (forward, optimize, log, checkpoint); :func:`train_vae`
and :func:`train_unet` describe each stage's step to it as a :class:`Stage`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DistributedSampler

from ldmkit.common import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, atomic_write
from ldmkit.images import write_images
from ldmkit.reference.latent import latent_std

from . import diffusion as D
from .checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from .config import Config
from .data import load_dataset
from .device import resolve_device
from .models import VAE, UNet
from .sample import generate

CHECKPOINT = "checkpoint.pt"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint was left as it was."""


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


def _all_mean(value: torch.Tensor, run: Run) -> float:
    """The mean of a per-rank scalar over all ranks (every rank gets it: a NaN anywhere stops all)."""
    value = value.detach().float().reshape(1)
    if run.world > 1:
        dist.all_reduce(value)
        value /= run.world
    return float(value)


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
    the stage the checkpoint was written in."""

    def __init__(self, config: Config, out: Path, run: Run, state: dict | None, progress: Progress | None,
                 stop_after: int | None):
        self.config, self.tc, self.run, self.out = config, config.train, run, out
        self.ckpt_path = out / CHECKPOINT
        self.progress = progress if run.main else None
        self.stop_after = stop_after
        tc = self.tc
        torch.manual_seed(tc.seed)
        vae, unet = VAE.from_config(config.vae), UNet.from_config(config.unet)
        ema = AveragedModel(unet, multi_avg_fn=get_ema_multi_avg_fn(tc.ema_decay))
        self.step = 0
        if state is not None:
            vae.load_state_dict(state["vae"])
            unet.load_state_dict(state["unet"])
            ema.module.load_state_dict(state["ema"])
            self.step = state["step"]
        self.vae, self.unet, self.ema = vae.to(run.device), unet.to(run.device), ema.to(run.device)
        self.ema.n_averaged.fill_(max(self.step - tc.vae_steps, 0))
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=tc.vae_lr, weight_decay=tc.weight_decay)
        self.unet_opt = torch.optim.AdamW(self.unet.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        if state is not None:  # a checkpoint written at step s ≤ vae_steps holds the VAE's optimizer
            (self.vae_opt if self.step <= tc.vae_steps else self.unet_opt).load_state_dict(state["optimizer"])
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if tc.precision == "bf16" and run.device.type == "cuda" else nullcontext())
        self.t_start = time.perf_counter()

    def loop(self, stage: Stage) -> bool:
        """Run ``stage`` from the current step to its end: per step forward, :meth:`optimize`, a record
        (progress, metrics.jsonl every ``log_every``), a checkpoint every ``checkpoint_every`` steps and at
        the stage's end. False when ``stop_after`` stopped it first."""
        tc, end = self.tc, stage.first + stage.steps
        if self.progress is not None:
            self.progress(stage.label, self.step - stage.first, stage.steps, None)
        while self.step < end:
            if self.stop_after is not None and self.step >= self.stop_after:
                return False
            t0 = time.perf_counter()
            loss, extra = stage.forward(self.step - stage.first)
            value = self.optimize(loss, stage)
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
            if self.step == end or (tc.checkpoint_every and self.step % tc.checkpoint_every == 0):
                self.save(stage.opt, {f"{stage.name}_loss": value})
        return True

    def optimize(self, loss: torch.Tensor, stage: Stage) -> float:
        """Backward, clip, and step, unless the loss (averaged over ranks) is not finite: then raise
        :class:`TrainingDiverged` with the parameters and the last checkpoint untouched. Returns that loss."""
        stage.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(stage.net.parameters(), self.tc.grad_clip)
        value = _all_mean(loss, self.run)
        if not math.isfinite(value):
            kept = self.ckpt_path if self.ckpt_path.exists() else "none yet"
            raise TrainingDiverged(f"the {stage.label} loss became {value} at step {self.step}: training stopped; "
                                   f"the last good checkpoint ({kept}) is untouched")
        stage.opt.step()
        return value

    def log(self, stage: Stage, record: dict):
        """Report a step (rank 0): the progress callback, and a metrics.jsonl line every ``log_every`` steps."""
        if self.progress is not None:
            self.progress(stage.label, self.step - stage.first, stage.steps, record)
        if self.tc.log_every and self.step % self.tc.log_every == 0:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def save(self, opt: torch.optim.Optimizer, metrics: dict):
        """Write the checkpoint (rank 0, atomically); every rank waits for it."""
        if self.run.main:
            self.ema.n_averaged.fill_(max(self.step - self.tc.vae_steps, 0))
            save_checkpoint(self.ckpt_path, make_checkpoint(self.config, self.vae.state_dict(), self.unet.state_dict(),
                                                            self.ema.module.state_dict(), opt.state_dict(), self.step,
                                                            metrics))
        if self.run.world > 1:
            dist.barrier()


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
          stop_after: int | None = None) -> Path:
    """Train both stages into folder ``out`` (checkpoint.pt, metrics.jsonl, samples/); returns the checkpoint
    path. ``resume`` continues from ``out``/checkpoint.pt (its config wins). ``stop_after``: stop after
    that many global steps, as a killed run would (for tests).

    ``progress(label, done, total, record)``, if given, is called on rank 0 when a stage starts, with
    ``record`` None, and after each of its steps, with that step's metrics record (the dict of a
    metrics.jsonl line: "stage", "step", "loss", "images_per_s", …). ``label`` is "VAE" or "U-Net",
    ``done`` the steps of the stage done so far (more than 0 at the start of a resumed stage) and
    ``total`` the stage's steps. The command line draws its progress bars with it."""
    run = start_run(device)
    out = Path(out)
    ckpt_path = prepare_output(out, resume) if run.main else out / CHECKPOINT
    if run.world > 1:
        dist.barrier()
    state = load_checkpoint(ckpt_path) if resume else None
    if state is not None:
        config = Config.from_dict(state["config"])
    if run.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    images, labels, description = load_dataset(config.data["spec"], "train", config.vae.image_size,
                                               config.unet.num_classes or None)
    if labels is None and config.unet.num_classes:
        raise ValueError(f"dataset {config.data['spec']} has no labels but the config asks for a class-conditional "
                         f"model (unet.num_classes = {config.unet.num_classes}); set it to 0")
    config.data = {**config.data, **{k: description[k] for k in ("source", "format", "num_examples", "num_classes")}}
    if run.main:
        with atomic_write(out / "config.json", binary=False) as f:
            f.write(json.dumps(config.to_dict(), indent=2) + "\n")
    tr = Trainer(config, out, run, state, progress, stop_after)
    if train_vae(tr, images) and train_unet(tr, images, labels) and run.world > 1:
        dist.barrier()  # no rank returns before the last checkpoint is written
    return ckpt_path


def write_sample_grid(config: Config, vae: VAE, unet: UNet, path: Path, per_class: int = 8,
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
