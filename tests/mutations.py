"""Hostile inputs for the hardening tests and the fuzz suite (issues 12 and 13): edits of checkpoints (as loaded
dicts, or as zip archives with their CRC-32s recomputed) and of ONNX artifact folders (re-hashed, so that only
ldmkit's own checks can catch them), and seeded generators of many such cases.

Each generator yields ``Case(name, make)``: ``make(tmp)`` builds the hostile file or folder under the folder
``tmp`` and returns the CLI arguments to run on it. Generators are seeded (``random.Random(seed)``), so a
failing case is reproduced by its name and seed. tests/test_fuzz.py runs them; a trainer-side generator
(signals, disk full, locks) can be added beside these and to ``GENERATORS``.

torch and onnx are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import random
import shutil
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

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
