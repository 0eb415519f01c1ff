"""Hostile inputs for the hardening tests and the fuzz suite (issues 12 and 13): edits of checkpoints (as loaded
dicts, or as zip archives with their CRC-32s recomputed) and of ONNX artifact folders (re-hashed, so that only
ldmkit's own checks can catch them), and seeded generators of many such cases.

Each generator yields ``Case(name, make)``: ``make(tmp)`` builds the hostile file or folder under the folder
``tmp`` and returns the CLI arguments to run on it. Generators are seeded (``random.Random(seed)``), so a
failing case is reproduced by its name and seed. tests/fuzz.py runs them (``generators``), tests/test_fuzz.py a
subset. A case may also carry ``around(tmp)``, a context manager the fuzz driver holds while the command runs,
for what the command line cannot say: a disk that fills up (``failing_writes``), a folder another trainer holds
(``holding_lock``), a signal at a given training step (``signal_at_step``).

torch and onnx are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import zipfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path


def write_random_checkpoint(path: Path, config, seed: int) -> Path:
    """A checkpoint at ``path`` (the engine's writer, EMA = U-Net) of freshly initialised networks for ``config``,
    drawn from ``seed``, whose zero-initialised layers are redrawn from N(0, 0.1²) so every output is O(1). The
    tiny models of the tests and the fuzz suite."""
    import torch

    from ldmkit.engine.checkpoint import make_checkpoint, save_checkpoint
    from ldmkit.engine.models import VAE, UNet

    torch.manual_seed(seed)
    nets = [VAE.from_config(config.vae), UNet.from_config(config.unet)]
    with torch.no_grad():
        for p in (p for net in nets for p in net.parameters() if not p.any()):
            p.normal_(0.0, 0.1)
    vae, unet = (net.state_dict() for net in nets)
    save_checkpoint(path, make_checkpoint(config, vae, unet, unet))
    return path

DIGEST_KEY = "sha256"


# ------------------------------------------------------------------------------------------ checkpoints


def deep_list(depth: int):
    """A list nested ``depth`` deep, built without recursion."""
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def set_first(ckpt: dict, part: str, change) -> None:
    """Replace the first tensor of state dict ``part`` by ``change(tensor)``."""
    key = next(iter(ckpt[part]))
    ckpt[part][key] = change(ckpt[part][key])


def quantised(t):
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that quantised tensors are deprecated
        return torch.quantize_per_tensor(t.float(), 0.1, 0, torch.quint8)


def edited_checkpoint(src: Path, dst: Path, edit, digest: bool = True) -> Path:
    """``src`` loaded, edited in place by ``edit(ckpt)``, saved to ``dst`` with torch.save: with the digest of
    the edited content (a forger who knows the format; ``digest``) or none (an older ldmkit's file)."""
    import torch

    from ldmkit.engine.checkpoint import content_digest

    ckpt = torch.load(src, weights_only=True)
    ckpt.pop(DIGEST_KEY, None)
    edit(ckpt)
    if digest:
        ckpt[DIGEST_KEY] = content_digest(ckpt)
    torch.save(ckpt, dst)
    return dst


def deep_pickle_checkpoint(src: Path, dst: Path, depth: int) -> Path:
    """``src`` with ``metrics = {"m": a list nested depth deep}``, spliced into the pickle directly (torch.save
    itself recurses and cannot write one 100,000 deep); no digest."""
    import pickle

    mark = "DEEP-NESTING-MARK"
    edited_checkpoint(src, dst, lambda c: c.update(metrics={"m": mark}), digest=False)
    old = pickle.BINUNICODE + len(mark).to_bytes(4, "little") + mark.encode()
    new = pickle.EMPTY_LIST * depth + pickle.APPEND * (depth - 1)
    return rezip(dst, dst.with_suffix(".deep"), lambda name, data: data.replace(old, new)
                 if name.endswith("data.pkl") else data).replace(dst)


def rezip(src: Path, dst: Path, change: Callable[[str, bytes], bytes]) -> Path:
    """The zip archive ``src`` rewritten member by member to ``dst`` as ``change(name, data)`` gives them, with
    their CRC-32s recomputed (a careful tamperer, bit rot under a file system that re-checksums, a bad copy)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info, change(info.filename, zin.read(info.filename)))
    return dst


def tensor_members(path: Path) -> list[str]:
    """The names of the tensor-data members of a torch.save archive, largest first."""
    with zipfile.ZipFile(path) as z:
        members = [i for i in z.infolist() if "/data/" in i.filename and i.file_size > 0]
    return [i.filename for i in sorted(members, key=lambda i: -i.file_size)]


def rezip_changed_tensor_byte(src: Path, dst: Path, where: str = "middle of the largest tensor",
                              rng: random.Random | None = None) -> Path:
    """``src`` with one byte of one tensor changed (XOR a nonzero value), CRCs recomputed. ``where``: "first
    tensor", "middle of the largest tensor", "last byte of a tensor", or "random" (member, offset and value
    from ``rng``)."""
    members = tensor_members(src)
    rng = rng or random.Random(0)
    target = {"first tensor": min(members), "middle of the largest tensor": members[0],
              "last byte of a tensor": members[-1], "random": rng.choice(members)}[where]
    flip = rng.randrange(1, 256) if where == "random" else 0x40

    def change(name: str, data: bytes) -> bytes:
        if name != target:
            return data
        i = {"first tensor": 0, "last byte of a tensor": len(data) - 1}.get(where, len(data) // 2)
        if where == "random":
            i = rng.randrange(len(data))
        return data[:i] + bytes([data[i] ^ flip]) + data[i + 1:]

    return rezip(src, dst, change)


# ------------------------------------------------------------------------------------------ ONNX folders


def copy_artifact(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def sha256_file(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def edit_manifest(art: Path, edit) -> None:
    path = art / "sampler.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def rehash(art: Path) -> None:
    """sampler.json's sha256 of each file set to the file's: the hashes no longer tell an edit."""
    def fix(m):
        for entry in m["files"].values():
            entry["sha256"] = sha256_file(art / entry["path"])
    edit_manifest(art, fix)


def retag(art: Path) -> None:
    """Each model's ldmkit metadata digest set to that of sampler.json's (edited) model, then every file
    re-hashed: an edit of sampler.json as consistent as a forger who knows the format can make it."""
    import onnx

    from ldmkit.common import from_dict
    from ldmkit.export import manifest as M
    from ldmkit.export.runtime import META_DIGEST

    try:
        model = from_dict(M.Model, json.loads((art / "sampler.json").read_text())["model"], "model")
        digest = M.model_digest(model)
    except (ValueError, TypeError, KeyError, RecursionError):
        digest = None  # the edit does not even read as a model: leave the metadata as it is
    for name in M.FILES.values():
        if digest is not None:
            proto = onnx.load(art / name)
            for prop in proto.metadata_props:
                if prop.key == META_DIGEST:
                    prop.value = digest
            onnx.save(proto, art / name)
    rehash(art)


def edit_weight(path: Path, rng: random.Random | None = None) -> None:
    """One element of one weight of an ONNX model changed (the largest initializer, or one ``rng`` picks);
    the model stays valid."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    inits = sorted(model.graph.initializer, key=lambda t: -int(np.prod(t.dims)))
    init = rng.choice(inits[:8]) if rng else inits[0]
    array = numpy_helper.to_array(init).copy()
    if array.size:
        array.flat[rng.randrange(array.size) if rng else 0] += 1
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    onnx.save(model, path)


# ------------------------------------------------------------------------------------ seeded generators


@dataclass(frozen=True)
class Case:
    """One fuzz case: ``make(tmp)`` builds it under ``tmp`` and returns the ``ldmkit`` arguments to run."""

    name: str
    make: Callable[[Path], list[str]]
    around: Callable[[Path], AbstractContextManager] | None = None


def checkpoint_cases(ckpt: Path, seed: int, count: int) -> Iterator[Case]:
    """Mutated checkpoints sampled with ``ldmkit sample``, checked with ``ldmkit verify`` or exported: random byte
    changes (CRCs kept, so the zip check may catch them, or recomputed), truncations, tensor bytes changed
    under recomputed CRCs, and structural edits of the loaded dict with or without a forged digest."""
    rng = random.Random(seed)
    data = ckpt.read_bytes()
    structural = [
        ("nan weight", lambda c, r: _first(c, r).fill_(float("nan"))),
        ("huge weights", lambda c, r: [t.fill_(r.choice([1e30, -1e30, 3e38])) for t in c["ema"].values()
                                       if t.is_floating_point()]),
        ("dtype", lambda c, r: _retype(c, r)),
        ("shape", lambda c, r: _reshape(c, r)),
        ("config number", lambda c, r: _config_number(c, r)),
        ("step", lambda c, r: c.update(step=r.choice([-1, 2**62, 2**63, 1.5, "7", None]))),
        ("drop key", lambda c, r: c.pop(r.choice(["ema", "vae", "config", "step", "format"]))),
        ("nesting", lambda c, r: c.update(metrics={"x": deep_list(r.choice([65, 200]))})),
    ]
    for i in range(count):
        kind = rng.choice(["bytes", "truncate", "tensor byte", "structure", "deep pickle"])
        sub = random.Random(rng.getrandbits(64))
        verb = rng.choices(["sample", "verify", "export"], [10, 8, 1])[0]

        def args(path: Path, verb=verb) -> list[str]:
            if verb == "export":
                return ["export", "onnx", str(path), "-o", str(path.parent / "onnx")]
            return [verb, str(path)] + (["-n", "2", "--steps", "2", "-o", str(path.with_suffix(".png"))]
                                        if verb == "sample" else [])

        if kind == "bytes":
            def make(tmp, sub=sub, args=args):
                b = bytearray(data)
                for _ in range(sub.randrange(1, 4)):
                    b[sub.randrange(len(b))] ^= sub.randrange(1, 256)
                (tmp / "c.pt").write_bytes(bytes(b))
                return args(tmp / "c.pt")
        elif kind == "truncate":
            def make(tmp, sub=sub, args=args):
                (tmp / "c.pt").write_bytes(data[: sub.randrange(len(data))])
                return args(tmp / "c.pt")
        elif kind == "deep pickle":
            def make(tmp, sub=sub, args=args):
                return args(deep_pickle_checkpoint(ckpt, tmp / "c.pt", sub.choice([65, 5000, 100_000])))
        elif kind == "tensor byte":
            def make(tmp, sub=sub, args=args):
                return args(rezip_changed_tensor_byte(ckpt, tmp / "c.pt", "random", sub))
        else:
            label, edit = structural[sub.randrange(len(structural))]
            forge = sub.random() < 0.5 and label != "nesting"  # (content_digest needs bounded nesting)
            kind = f"structure/{label}/{'forged' if forge else 'no'} digest"

            def make(tmp, sub=sub, args=args, edit=edit, forge=forge):
                return args(edited_checkpoint(ckpt, tmp / "c.pt", lambda c: edit(c, sub), forge))
        yield Case(f"checkpoint {i} {kind} {verb} (seed {seed})", make)


def _first(c, r):
    part = r.choice(["vae", "unet", "ema"])
    return c[part][r.choice(sorted(c[part]))]


def _retype(c, r):
    import torch

    part = r.choice(["vae", "unet", "ema"])
    key = r.choice(sorted(c[part]))
    c[part][key] = c[part][key].to(r.choice([torch.bool, torch.int64, torch.uint8, torch.float64, torch.float16]))


def _reshape(c, r):
    part = r.choice(["vae", "unet", "ema"])
    key = r.choice(sorted(c[part]))
    c[part][key] = c[part][key].reshape(-1)[:-1] if c[part][key].numel() > 1 else c[part][key].reshape(1, 1)


def _config_number(c, r):
    section = r.choice(["vae", "unet", "diffusion", "train"])
    key = r.choice(sorted(k for k, v in c["config"][section].items() if isinstance(v, (int, float))
                          and not isinstance(v, bool)))
    c["config"][section][key] = r.choice([0, -1, 10**10, 2**63, 1e30, float("inf"), float("nan"), 1e-30])


def artifact_cases(art: Path, seed: int, count: int) -> Iterator[Case]:
    """Mutated export folders, sampled with ``ldmkit sample`` (and ``--graph``): sampler.json fields set to
    hostile values and re-hashed (or re-tagged: each model's metadata digest made to match, as a forger
    would), model bytes changed and re-hashed, weights edited and re-hashed, files swapped, deep JSON."""
    rng = random.Random(seed)
    values = [0, -1, 1e30, float("inf"), float("nan"), 10**10, 2**63, "x", None, [], {}, [1, 2, 3], True, 1e-30,
              [2, 4, 4], [2, 8, 8], [1, 32, 32], [3, 16, 16], 5, 2.0, 0.5]
    fields = [("model", "T"), ("model", "latent_scale"), ("model", "latent_shape"), ("model", "image_shape"),
              ("model", "num_classes"), ("model", "null_class"), ("model", "alpha_bars"), ("model", "defaults"),
              ("opset",), ("model", "graph_samplers"), ("model", "prediction")]
    for i in range(count):
        kind = rng.choice(["field", "field, re-tagged", "model bytes", "weight", "swap", "json"])
        sub = random.Random(rng.getrandbits(64))
        graph = rng.random() < 0.3

        def args(folder: Path, graph=graph) -> list[str]:
            return ["sample", str(folder), "-n", "2", "--steps", "2", "-o", str(folder.parent / "g.npy")] + (
                ["--graph"] if graph else [])

        if kind.startswith("field"):
            def make(tmp, sub=sub, args=args, kind=kind):
                a = copy_artifact(art, tmp / "art")
                path = fields[sub.randrange(len(fields))]
                value = values[sub.randrange(len(values))]
                edit_manifest(a, lambda m: _set(m, path, value))
                (retag if kind.endswith("re-tagged") else rehash)(a)
                return args(a)
        elif kind == "model bytes":
            def make(tmp, sub=sub, args=args):
                a = copy_artifact(art, tmp / "art")
                f = a / sub.choice(["unet.onnx", "vae_decoder.onnx", "sampler.onnx"])
                b = bytearray(f.read_bytes())
                if sub.random() < 0.3:
                    b = b[: sub.randrange(len(b))]
                else:
                    b[sub.randrange(len(b))] ^= sub.randrange(1, 256)
                f.write_bytes(bytes(b))
                rehash(a)
                return args(a)
        elif kind == "weight":
            def make(tmp, sub=sub, args=args):
                a = copy_artifact(art, tmp / "art")
                edit_weight(a / sub.choice(["unet.onnx", "vae_decoder.onnx", "sampler.onnx"]), sub)
                rehash(a)
                return args(a)
        elif kind == "swap":
            def make(tmp, sub=sub, args=args):
                a = copy_artifact(art, tmp / "art")
                x, y = sub.sample(["unet.onnx", "vae_decoder.onnx", "sampler.onnx"], 2)
                (a / x).rename(a / "tmp")
                (a / y).rename(a / x)
                (a / "tmp").rename(a / y)
                rehash(a)
                return args(a)
        else:
            def make(tmp, sub=sub, args=args):
                a = copy_artifact(art, tmp / "art")
                depth = sub.choice([65, 1000, 100_000])
                (a / "sampler.json").write_text("[" * depth + "]" * depth)
                return args(a)
        yield Case(f"artifact {i} {kind}{' --graph' if graph else ''} (seed {seed})", make)


def _set(m: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        m = m[key]
    m[path[-1]] = value


def argument_cases(ckpt: Path, art: Path, seed: int, count: int) -> Iterator[Case]:
    """Hostile command-line values for ``ldmkit sample`` on a good checkpoint or folder."""
    rng = random.Random(seed)
    options = {"-n": ["0", "-1", "1000000000", "1e9", "10001", "x", ""],
               "--class": ["-1", "10", "99999999999999999999999", "1.5", "nan"],
               "--guidance": ["-1", "1e30", "1e308", "inf", "nan", "100.0001", "-0.0"],
               "--steps": ["0", "51", "10000000000", "-3", "2.5"],
               "--eta": ["-1", "inf", "nan", "1e30"],
               "--seed": ["-1", str(10**30), "x"],
               "--sampler": ["euler", "", "DDIM"]}
    for i in range(count):
        opt = rng.choice(sorted(options))
        value = rng.choice(options[opt])
        source = rng.choice([ckpt, art])
        graph = source == art and rng.random() < 0.5

        def make(tmp, opt=opt, value=value, source=source, graph=graph):
            return ["sample", str(source), "--steps", "2", "-n", "2", opt, value, "-o", str(tmp / "g.npy")] + (
                ["--graph"] if graph else [])
        yield Case(f"argument {i} {opt} {value!r}{' --graph' if graph else ''} on "
                   f"{'folder' if source == art else 'checkpoint'} (seed {seed})", make)


# ------------------------------------------------------------------------------------------ the trainer


def tamper_optimizer(ckpt: dict, kind: str) -> dict:
    """A copy of the loaded U-Net-stage checkpoint ``ckpt`` with its optimizer state (or step) tampered with as
    ``kind`` says (one of ``OPTIMIZER_TAMPERINGS``)."""
    import torch

    ckpt = {**ckpt, "optimizer": {**ckpt["optimizer"], "state": dict(ckpt["optimizer"]["state"]),
                                  "param_groups": [dict(g) for g in ckpt["optimizer"]["param_groups"]]}}
    opt, group, first = ckpt["optimizer"], ckpt["optimizer"]["param_groups"][0], ckpt["optimizer"]["state"][0]
    if kind == "empty":
        ckpt["optimizer"] = {}
    elif kind == "shape":
        opt["state"][0] = {**first, "exp_avg": torch.zeros(3, 3)}
    elif kind == "dtype":
        opt["state"][0] = {**first, "exp_avg": first["exp_avg"].double()}
    elif kind == "sparse":
        opt["state"][0] = {**first, "exp_avg_sq": first["exp_avg_sq"].to_sparse()}
    elif kind == "nan":
        opt["state"][0] = {**first, "exp_avg": torch.full_like(first["exp_avg"], float("nan"))}
    elif kind == "negative":
        opt["state"][0] = {**first, "exp_avg_sq": -torch.ones_like(first["exp_avg_sq"])}
    elif kind == "step":
        opt["state"][0] = {**first, "step": torch.tensor(1e6)}
    elif kind == "key":
        opt["state"][10 ** 6] = first
    elif kind == "groups":
        opt["param_groups"].append(dict(group))
    elif kind == "params":
        group["params"] = group["params"][:-1]
    elif kind == "betas":
        group["betas"] = (0.5, 0.5)
    elif kind == "weight_decay":
        group["weight_decay"] = torch.tensor([1.0, 2.0])
    elif kind == "lr":
        group["lr"] = float("inf")
    elif kind == "ckpt_step":
        ckpt["step"] = 10 ** 9  # the most a checkpoint may hold (more is refused at load, whatever the run)
    else:
        raise ValueError(f"unknown tampering {kind!r}")
    return ckpt


OPTIMIZER_TAMPERINGS = ("empty", "shape", "dtype", "sparse", "nan", "negative", "step", "key", "groups", "params",
                        "betas", "weight_decay", "lr", "ckpt_step")


def write_checkpoint(ckpt: dict, path: Path) -> Path:
    """Write the loaded checkpoint ``ckpt`` with the engine's own writer, from its parts (as a consistent,
    tampered-with file would be, whatever integrity data the writer adds)."""
    from ldmkit.engine import checkpoint as C
    from ldmkit.engine.config import Config

    C.save_checkpoint(path, C.make_checkpoint(Config.from_dict(ckpt["config"]), ckpt["vae"], ckpt["unet"],
                                              ckpt["ema"], ckpt["optimizer"], ckpt["step"], ckpt["metrics"]))
    return path


@contextlib.contextmanager
def failing_writes(fail_at: int, code: int = errno.ENOSPC, counted=None) -> Iterator[list]:
    """While the block runs, the ``fail_at``-th file written through ``common.atomic_write`` (1-based, counted
    over every ldmkit module that writes with it: checkpoints, config.json, eval.json, images, golden files;
    only the paths ``counted(Path)`` is true of, where given) fails on its first write as a full disk (ENOSPC),
    a quota (EDQUOT), a refused write (EACCES) or a read-only file system (EROFS) does: the real writer's
    clean-up runs. Yields the counted paths written so far."""
    import importlib
    import sys

    from ldmkit import common

    for name in ("ldmkit.cli", "ldmkit.images", "ldmkit.reference.golden", "ldmkit.engine.checkpoint",
                 "ldmkit.engine.train"):  # every writer, loaded now (a module loaded in the block would miss it)
        importlib.import_module(name)
    real, calls = common.atomic_write, []

    class Failing:
        def write(self, data):
            raise OSError(code, os.strerror(code))

    @contextlib.contextmanager
    def atomic_write(path, binary=True):
        fail = False
        if counted is None or counted(Path(path)):
            calls.append(path)
            fail = len(calls) == fail_at
        with real(path, binary) as f:
            yield Failing() if fail else f

    users = [m for name, m in list(sys.modules.items()) if name.startswith("ldmkit") and m is not common
             and getattr(m, "atomic_write", None) is real]
    for m in users:
        m.atomic_write = atomic_write
    try:
        yield calls
    finally:
        for m in users:
            m.atomic_write = real


@contextlib.contextmanager
def holding_lock(folder: Path) -> Iterator[None]:
    """Hold the trainer's lock on run folder ``folder`` (``engine.train.lock_folder``'s flock on its lock file)
    for the block, as a running trainer does; flock locks belong to the open file, so even a trainer started in
    this same process finds it held."""
    import fcntl

    from ldmkit.engine.train import LOCK

    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def signal_at_step(sig: signal.Signals, step: int) -> Iterator[None]:
    """While the block runs, a trainer sends ``sig`` to its own process once it has logged global step
    ``step`` (as a scheduler's SIGTERM or a Ctrl-C arriving during the next step)."""
    from ldmkit.engine import train as T

    log = T.Trainer.log

    def log_then_signal(self, stage, record):
        log(self, stage, record)
        if self.step == step:
            os.kill(os.getpid(), sig)

    T.Trainer.log = log_then_signal
    try:
        yield
    finally:
        T.Trainer.log = log


TRAIN_STEPS = (2, 4)  # the fuzz trainer's VAE and U-Net steps: a checkpoint every 2


def trainer_targets(folder: Path) -> Path:
    """What the trainer's cases start from, in ``folder``: digits.npz (64 built-in digits), config.json (a tiny
    config: ``TRAIN_STEPS``, batches of 8, T = 50), cut/ (its run stopped after step 4, in the U-Net stage, with
    a checkpoint there: resumable) and done/ (its finished run)."""
    import numpy as np

    from ldmkit.engine import train as T
    from ldmkit.engine.config import Config, DiffusionConfig, TrainConfig, UNetConfig, VAEConfig

    folder.mkdir(parents=True, exist_ok=True)
    data = Path(__file__).resolve().parents[1] / "src" / "ldmkit" / "data" / "mnist8k.npz"
    with np.load(data) as f:
        np.savez(folder / "digits.npz", images=f["images"][:64], labels=f["labels"][:64])
    config = Config(data={"spec": str(folder / "digits.npz")},
                    vae=VAEConfig(base_channels=8, channel_mult=(1, 2, 2), latent_channels=2, groups=4),
                    unet=UNetConfig(in_channels=2, base_channels=16, channel_mult=(1, 2), attention_levels=(1,),
                                    num_heads=2, num_classes=10, groups=4),
                    diffusion=DiffusionConfig(T=50),
                    train=TrainConfig(vae_steps=TRAIN_STEPS[0], unet_steps=TRAIN_STEPS[1], vae_batch_size=8,
                                      batch_size=8, checkpoint_every=2, log_every=1, warmup_steps=1, lr=1e-3,
                                      vae_lr=1e-3))
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    T.train(Config.from_dict(config.to_dict()), folder / "cut", device="cpu", stop_after=sum(TRAIN_STEPS) - 2)
    T.train(Config.from_dict(config.to_dict()), folder / "done", device="cpu")
    return folder


def _hostile_config(base: dict, r: random.Random) -> tuple[str, str]:
    """(label, config.json text): ``base`` with one hostile edit, among them the reproductions of issue 13
    (lr = Infinity, recon_logvar = NaN, data without spec) and deep nesting."""
    config = json.loads(json.dumps(base))
    values = [float("nan"), float("inf"), float("-inf"), 1e308, -1, 0, 10**12, 2**63, "x", None, [], {}, True,
              1e-30, 3, 0.5, [1, 2], -0.0]
    kind = r.choice(["field", "field", "field", "lr inf", "recon_logvar nan", "no spec", "nesting", "key", "text"])
    if kind == "field":
        section = r.choice(["vae", "unet", "diffusion", "train", None])
        where = config if section is None else config[section]
        key = r.choice(sorted(k for k in where if k not in ("compile", "data")))  # (compile: minutes, not cases)
        value = r.choice(values)
        where[key] = value
        return f"{section or 'config'}.{key} = {value!r}", json.dumps(config)
    if kind == "lr inf":
        config["train"]["lr"] = float("inf")
    elif kind == "recon_logvar nan":
        config["vae"]["recon_logvar"] = float("nan")
    elif kind == "no spec":
        config["data"] = r.choice([{}, {"source": "x"}, None, [], {"spec": None}, {"spec": ""},
                                   {"spec": "/nonexistent"}])
    elif kind == "nesting":
        depth = r.choice([65, 1000, 100_000])
        return f"nesting {depth}", json.dumps(config).replace('"gaussian"', "[" * depth + "]" * depth)
    elif kind == "key":
        section = r.choice(["vae", "unet", "diffusion", "train"])
        if r.random() < 0.5:
            config[section].pop(r.choice(sorted(config[section])))
        else:
            config[section]["unknown"] = 1
    else:
        text = json.dumps(config)
        return "text", r.choice([text[: r.randrange(len(text))], "[1, 2]", "", "\xff\xfe", "null", text + "x"])
    return kind, json.dumps(config)


def trainer_cases(targets: Path, seed: int, count: int) -> Iterator[Case]:
    """``ldmkit train`` and ``ldmkit eval`` under attack (issue 13), from ``trainer_targets``: hostile
    config.json files and train arguments; --resume from a checkpoint whose optimizer state or step was
    tampered with; a second trainer on a locked folder; a checkpoint (or config.json) write failing as a full
    disk or a refused write does; SIGTERM or SIGINT at a random step (exit status 75, or 2 when that write
    fails too); eval with hostile arguments or a checkpoint with NaN or huge weights. The kinds take turns, so
    even a short run has each."""
    rng = random.Random(seed)
    base = json.loads((targets / "config.json").read_text())
    total = sum(TRAIN_STEPS)
    kinds = ["config", "resume", "lock", "disk", "signal", "eval", "eval checkpoint", "arguments"]
    codes = [errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS]

    def train(tmp: Path, *extra) -> list[str]:
        return ["train", "--out", str(tmp / "run"), "--device", "cpu", "--quiet", *map(str, extra)]

    def resumable(tmp: Path) -> Path:
        shutil.copytree(targets / "cut", tmp / "run")
        return tmp / "run"

    def fresh_config(tmp: Path) -> Path:
        shutil.copy(targets / "config.json", tmp / "config.json")
        return tmp / "config.json"

    def evaluate(ckpt: Path, tmp: Path, *extra) -> list[str]:
        return ["eval", str(ckpt), "--nll-images", "0", "--per-class", "1", "--steps", "2", "--device", "cpu",
                *extra, "-o", str(tmp / "eval.json")]

    for i in range(count):
        kind = kinds[i % len(kinds)]
        sub = random.Random(rng.getrandbits(64))
        around = None
        if kind == "config":
            label, text = _hostile_config(base, sub)

            def make(tmp, text=text):
                (tmp / "config.json").write_text(text)
                return train(tmp, "--config", tmp / "config.json")
        elif kind == "resume":
            label = sub.choice([*OPTIMIZER_TAMPERINGS, "step total + 1", "step total", "step -1 (forged)"])

            def make(tmp, label=label):
                import torch

                run = resumable(tmp)
                ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
                if label == "step total + 1" or label == "step total":
                    write_checkpoint({**ckpt, "step": total + (label == "step total + 1")}, run / "checkpoint.pt")
                elif label == "step -1 (forged)":
                    edited_checkpoint(run / "checkpoint.pt", run / "checkpoint.pt", lambda c: c.update(step=-1))
                else:
                    write_checkpoint(tamper_optimizer(ckpt, label), run / "checkpoint.pt")
                return train(tmp, "--resume")
        elif kind == "lock":
            label = sub.choice(["--resume", "a fresh run"])

            def make(tmp, label=label):
                if label == "--resume":
                    resumable(tmp)
                    return train(tmp, "--resume")
                (tmp / "run").mkdir()
                return train(tmp, "--config", fresh_config(tmp))

            def around(tmp):
                return holding_lock(tmp / "run")
        elif kind == "disk":
            code, resume = sub.choice(codes), sub.random() < 0.5
            fail_at = sub.randrange(1, 3 if resume else 5)  # config.json, then the checkpoints (of 2, 4, 6; of 6)
            label = f"write {fail_at} fails with {errno.errorcode[code]}{', resumed' if resume else ''}"

            def make(tmp, resume=resume):
                if resume:
                    resumable(tmp)
                    return train(tmp, "--resume")
                return train(tmp, "--config", fresh_config(tmp))

            def around(tmp, fail_at=fail_at, code=code):
                return failing_writes(fail_at, code)
        elif kind == "signal":
            sig, at = sub.choice([signal.SIGTERM, signal.SIGINT]), sub.randrange(1, total + 1)
            fail = sub.random() < 0.25  # and the checkpoint written on the signal fails too
            label = f"{sig.name} after step {at}{', its checkpoint write failing' if fail else ''}"

            def make(tmp):
                return train(tmp, "--config", fresh_config(tmp))

            def around(tmp, sig=sig, at=at, fail=fail):
                stack = contextlib.ExitStack()
                stack.enter_context(signal_at_step(sig, at))
                if fail:  # config.json, then one checkpoint per 2 steps before the signal's
                    stack.enter_context(failing_writes(2 + at // 2))
                return stack
        elif kind == "eval":
            option = sub.choice(["--per-class", "--nll-images", "--steps", "--guidance", "--guidance-rescale",
                                 "--sampler", "--seed", "-o", "disk"])
            value = sub.choice({"--per-class": ["-1", "1001", str(10**12), "x"],
                                "--nll-images": ["-1", "x", "100000"],
                                "--steps": ["0", "-3", "51", str(10**10)],
                                "--guidance": ["nan", "inf", "1e30", "1e308", "-1", "100.0001"],
                                "--guidance-rescale": ["nan", "inf", "-1", "2"],
                                "--sampler": ["euler", "", "DDIM"],
                                "--seed": ["-1", str(10**30)],
                                "-o": ["missing/eval.json", ""],
                                "disk": [str(code) for code in codes]}[option])
            label = f"{option} {value!r}"

            def make(tmp, option=option, value=value):
                args = evaluate(targets / "done" / "checkpoint.pt", tmp)
                if option == "-o":
                    args[-1] = str(tmp / value) if value else value
                elif option != "disk":
                    args[-2:-2] = [option, value]
                return args

            if option == "disk":
                def around(tmp, code=int(value)):
                    return failing_writes(1, code)
        elif kind == "eval checkpoint":
            label = sub.choice(["NaN EMA, digest dropped", "NaN EMA, forged digest", "inf VAE, digest dropped",
                                "huge weights", "latent_scale inf, forged digest", "tensor byte"])

            def make(tmp, label=label):
                src, dst = targets / "done" / "checkpoint.pt", tmp / "checkpoint.pt"
                if label == "tensor byte":
                    rezip_changed_tensor_byte(src, dst, "random", random.Random(len(label)))
                elif label == "huge weights":
                    edited_checkpoint(src, dst, lambda c: [t.fill_(1e30) for t in c["ema"].values()
                                                           if t.is_floating_point()])
                elif label.startswith("latent_scale"):
                    edited_checkpoint(src, dst, lambda c: c["config"].update(latent_scale=float("inf")))
                else:
                    part = "ema" if "EMA" in label else "vae"
                    fill = float("nan") if "NaN" in label else float("inf")
                    edited_checkpoint(src, dst, lambda c: set_first(c, part, lambda t: t.clone().fill_(fill)),
                                      digest="forged" in label)
                return evaluate(dst, tmp)
        else:
            option, value = sub.choice([("--vae-steps", "-1"), ("--unet-steps", str(10**12)), ("--batch-size", "0"),
                                        ("--batch-size", str(10**9)), ("--seed", "-1"), ("--seed", str(2**64)),
                                        ("--precision", "fp8"), ("--data", "/nonexistent"), ("--data", ""),
                                        ("--resume", None), ("--config", "missing.json"), ("--out", "file"),
                                        ("--device", "tpu"), ("--preset", "huge")])
            label = f"{option} {value!r}"

            def make(tmp, option=option, value=value):
                args = train(tmp, "--config", fresh_config(tmp))
                if option == "--resume":
                    return [*args, "--resume"]
                if option == "--config":
                    return [*args[:-2], "--config", str(tmp / value)]
                if option == "--out":
                    (tmp / "file").write_text("not a folder")
                    return ["train", "--config", str(tmp / "config.json"), "--out", str(tmp / "file"), "--quiet"]
                return [*args, option, value]
        yield Case(f"train {i} {kind}: {label} (seed {seed})", make, around)
