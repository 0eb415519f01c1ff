"""Training: stage 1 the VAE (L9), stage 2 the class-conditional latent U-Net (L4/L5 with V1 scaling,
label dropout for classifier-free guidance, warm-up then cosine learning-rate decay), on one process or
many (torchrun → DDP).

Determinism and resume. Every random draw of step s is made from a CPU generator seeded by (seed, stage,
s), for the whole global batch, and each rank takes its own rows; the batch indices come from a
``DistributedSampler`` (seeded, ``set_epoch``) sliced at the step's position in the epoch. So a resumed
run, or a run on N processes with the same global batch, sees exactly the data and noise of an
uninterrupted single-process run, and ends with the same parameters (to float tolerance under DDP).
The checkpoint's ``step`` counts both stages (VAE steps first), which is all a resume needs.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DistributedSampler

from ldmkit.images import write_images
from ldmkit.reference.latent import latent_std
from ldmkit.reference.schedules import Schedule

from . import diffusion as D
from .checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from .config import Config
from .data import load_dataset
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


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA when available), 'cpu' or 'cuda'; ValueError for CUDA where there is none."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be one of ['auto', 'cpu', 'cuda'], got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but torch sees no CUDA device")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


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


class Logger:
    """metrics.jsonl lines and the progress bar, on rank 0 only."""

    def __init__(self, out: Path, run: Run, progress: bool):
        self.path, self.run, self.show = out / "metrics.jsonl", run, progress and run.main
        self.bar, self.text = None, ""

    def stage(self, label: str, total: int, done: int):
        if self.bar is not None:
            self.bar.render_finish()
        self.bar = None
        if self.show:
            self.bar = click.progressbar(length=total, label=label, file=click.get_text_stream("stderr"),
                                         item_show_func=lambda _: self.text, show_pos=True)
            self.bar.update(done)

    def step(self, record: dict, write: bool):
        if not self.run.main:
            return
        self.text = f"loss {record['loss']:.4f} {record['images_per_s']:.0f} img/s"
        if self.bar is not None:
            self.bar.update(1)
        if write:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def close(self):
        if self.bar is not None:
            self.bar.render_finish()
            self.bar = None


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


def train(config: Config, out, device: str = "auto", resume: bool = False, progress: bool = True,
          stop_after: int | None = None) -> Path:
    """Train both stages into folder ``out`` (checkpoint.pt, metrics.jsonl, samples/); returns the checkpoint
    path. ``resume`` continues from ``out``/checkpoint.pt (its config wins). ``stop_after``: stop after
    that many global steps, as a killed run would (for tests)."""
    run = start_run(device)
    out = Path(out)
    ckpt_path = prepare_output(out, resume) if run.main else out / CHECKPOINT
    if run.world > 1:
        dist.barrier()
    state = load_checkpoint(ckpt_path) if resume else None
    if state is not None:
        config = Config.from_dict(state["config"])
    tc = config.train
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
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")

    torch.manual_seed(tc.seed)
    vae, unet = VAE.from_config(config.vae), UNet.from_config(config.unet)
    ema = AveragedModel(unet, multi_avg_fn=get_ema_multi_avg_fn(tc.ema_decay))
    step = 0
    if state is not None:
        vae.load_state_dict(state["vae"])
        unet.load_state_dict(state["unet"])
        ema.module.load_state_dict(state["ema"])
        step = state["step"]
        ema.n_averaged.fill_(max(step - config.train.vae_steps, 0))
    vae, unet, ema = vae.to(run.device), unet.to(run.device), ema.to(run.device)
    log = Logger(out, run, progress)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if tc.precision == "bf16" and run.device.type == "cuda"
                else nullcontext())
    t_start = time.perf_counter()

    def save(opt, metrics):
        if run.main:
            ema.n_averaged.fill_(max(step - tc.vae_steps, 0))
            save_checkpoint(ckpt_path, make_checkpoint(config, vae.state_dict(), unet.state_dict(),
                                                       ema.module.state_dict(), opt.state_dict(), step, metrics))
        if run.world > 1:
            dist.barrier()

    def update(loss, module, opt, stage: str) -> float:
        """Backward, clip, and step, unless the loss (averaged over ranks) is not finite: then stop with the
        parameters and the last checkpoint untouched. Returns the averaged loss."""
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), tc.grad_clip)
        value = _all_mean(loss, run)
        if not math.isfinite(value):
            log.close()
            raise TrainingDiverged(f"the {stage} loss became {value} at step {step}: training stopped; the last good "
                                   f"checkpoint ({ckpt_path if ckpt_path.exists() else 'none yet'}) is untouched")
        opt.step()
        return value

    # ---------------------------------------------------------------- stage 1: the VAE
    opt = torch.optim.AdamW(vae.parameters(), lr=tc.vae_lr, weight_decay=tc.weight_decay)
    if state is not None and step < tc.vae_steps:
        opt.load_state_dict(state["optimizer"])
    if step < tc.vae_steps:
        model = DistributedDataParallel(vae) if run.world > 1 else vae
        model.train()
        batches = Batches(len(images), tc.vae_batch_size, tc.seed, run)
        log.stage("VAE  ", tc.vae_steps, step)
        while step < tc.vae_steps:
            if stop_after is not None and step >= stop_after:
                log.close()
                return ckpt_path
            t0 = time.perf_counter()
            g = _generator(tc.seed, 1, step)
            x = images[batches(step)].to(run.device)
            noise = _rows(torch.randn((tc.vae_batch_size, *config.vae.latent_shape), generator=g), run).to(run.device)
            with autocast:
                loss, mse, kl = vae_loss(model, x, noise, config)
            value = update(loss, vae, opt, "VAE")
            step += 1
            record = {"stage": "vae", "step": step, "loss": value, "recon_mse": float(mse), "kl": float(kl),
                      "images_per_s": tc.vae_batch_size / (time.perf_counter() - t0),
                      "elapsed_s": time.perf_counter() - t_start}
            log.step(record, step % tc.log_every == 0 if tc.log_every else False)
            if step == tc.vae_steps or (tc.checkpoint_every and step % tc.checkpoint_every == 0):
                save(opt, {"vae_loss": value})

    # ---------------------------------------------------------------- latent cache and scale (V1)
    vae.eval().requires_grad_(False)
    mean, logvar = encode_latents(vae, images, run.device)
    if config.latent_scale is None:
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=_generator(tc.seed, 3, 0))
        config.latent_scale = latent_std(z.double().numpy())
        config.latent_shape = tuple(mean.shape[1:])

    # ---------------------------------------------------------------- stage 2: the latent U-Net
    schedule = Schedule.named(config.diffusion.schedule, config.diffusion.T)
    opt = torch.optim.AdamW(unet.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    total = tc.vae_steps + tc.unet_steps
    if state is not None and state["step"] > tc.vae_steps:
        opt.load_state_dict(state["optimizer"])
    model = DistributedDataParallel(unet) if run.world > 1 else unet
    compiled = torch.compile(model) if tc.compile else model
    model.train()
    batches = Batches(len(images), tc.batch_size, tc.seed, run)
    null = config.unet.num_classes
    shape = config.latent_shape
    log.stage("U-Net", tc.unet_steps, step - tc.vae_steps)
    metrics = {}
    while step < total:
        if stop_after is not None and step >= stop_after:
            log.close()
            return ckpt_path
        s = step - tc.vae_steps
        t0 = time.perf_counter()
        torch.manual_seed(_generator(tc.seed, 4 + run.rank, s).initial_seed())  # dropout, if any
        g = _generator(tc.seed, 2, s)
        idx = batches(s)
        B = tc.batch_size
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
        with autocast:
            pred = compiled(x_t, t, y)
        loss = D.mse_per_example(pred, D.training_target(z0, eps, x_t, t, schedule, config.diffusion.prediction)).mean()
        value = update(loss, unet, opt, "U-Net")
        ema.update_parameters(unet)
        step += 1
        record = {"stage": "unet", "step": step, "loss": value, "lr": opt.param_groups[0]["lr"],
                  "images_per_s": B / (time.perf_counter() - t0), "elapsed_s": time.perf_counter() - t_start}
        log.step(record, step % tc.log_every == 0 if tc.log_every else False)
        metrics = {"unet_loss": value}
        if run.main and tc.sample_every and (step - tc.vae_steps) % tc.sample_every == 0:
            write_sample_grid(config, vae, ema.module, out / "samples" / f"step{step:07d}.png")
        if step == total or (tc.checkpoint_every and step % tc.checkpoint_every == 0):
            save(opt, metrics)
    log.close()
    if run.world > 1:
        dist.barrier()
    return ckpt_path


def write_sample_grid(config: Config, vae: VAE, unet: UNet, path: Path, per_class: int = 8, steps: int = 50,
                      guidance: float = 3.0, seed: int = 0) -> Path:
    """A grid with one row per class (or 8 rows unconditionally), DDIM with guidance, EMA weights."""
    path.parent.mkdir(parents=True, exist_ok=True)
    k = config.unet.num_classes
    labels = np.repeat(np.arange(k), per_class) if k else None
    was_training = unet.training
    unet.eval()
    images = generate(config, vae, unet, k * per_class if k else 8 * per_class, labels, "ddim", steps,
                      guidance=guidance if k else None, seed=seed)
    unet.train(was_training)
    return write_images(path, images, nrow=per_class)
