"""Issues 12 and 13, the load / validate / sample side: every reproduction of a hostile input there gives exit
status 2 and exactly one line (no traceback, nothing written); checkpoints carry a sha256 of their content that
`ldmkit sample`, `ldmkit export onnx` and `ldmkit verify` check; no path writes NaN or inf images or metrics.

The mutations live in ``tests/mutations.py`` (shared with the fuzz suite, tests/test_fuzz.py)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mutations as mut  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from ldmkit.cli import main  # noqa: E402
from ldmkit.common import LdmkitNote  # noqa: E402
from ldmkit.engine.checkpoint import DIGEST_KEY, content_digest, load_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def one_line_exit_2(args, *expected: str, output: Path | None = None) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    text = result.output
    assert result.exit_code == 2, text
    assert len(text.strip().splitlines()) == 1 and text.startswith("Error: "), text
    for part in expected:
        assert part in " ".join(text.split()), text
    assert output is None or not output.exists()
    return text


@pytest.fixture(scope="module")
def ckpt_path(tiny_checkpoints):
    return tiny_checkpoints["cond"]


# ---------------------------------------------------------------------------------------- checkpoints

# name → (edit of the loaded checkpoint dict, forged digest?, what the one line must say)
CHECKPOINT_CASES = {
    "sparse tensor": (lambda c: mut.set_first(c, "unet", lambda t: t.to_sparse()), False, "dense"),
    "meta tensor": (lambda c: mut.set_first(c, "unet", lambda t: torch.empty_like(t, device="meta")), False,
                    "meta"),
    "quantised tensor": (lambda c: mut.set_first(c, "ema", lambda t: mut.quantised(t)), False, "quantised"),
    "bool weights": (lambda c: mut.set_first(c, "ema", lambda t: t.bool()), True, "has dtype torch.bool"),
    "int64 weights": (lambda c: mut.set_first(c, "vae", lambda t: t.long()), True, "has dtype torch.int64"),
    "uint8 weights": (lambda c: mut.set_first(c, "unet", lambda t: t.to(torch.uint8)), True, "dtype torch.uint8"),
    "complex weights": (lambda c: mut.set_first(c, "ema", lambda t: t.to(torch.complex64)), True, "complex64"),
    "NaN in EMA": (lambda c: mut.set_first(c, "ema", lambda t: t.clone().fill_(float("nan"))), True,
                   "holds non-finite weights"),
    "inf in VAE": (lambda c: mut.set_first(c, "vae", lambda t: t.clone().fill_(float("inf"))), True,
                   "holds non-finite weights"),
    "latent_scale inf": (lambda c: c["config"].update(latent_scale=float("inf")), True, "latent_scale must be in"),
    "latent_scale 1e30": (lambda c: c["config"].update(latent_scale=1e30), True, "latent_scale must be in"),
    "T 1e7": (lambda c: c["config"]["diffusion"].update(T=10**7), True, "DiffusionConfig.T must be in [1, 10000]"),
    "recon_logvar NaN": (lambda c: c["config"]["vae"].update(recon_logvar=float("nan")), True,
                         "VAEConfig.recon_logvar must be in"),
    "lr inf": (lambda c: c["config"]["train"].update(lr=float("inf")), True, "TrainConfig.lr must be in"),
    "step 2**62": (lambda c: c.update(step=2**62), True, "checkpoint step must be an int in 0..1000000000"),
    "data without spec": (lambda c: c["config"].update(data={}), True, "Config.data must hold 'spec'"),
    "image_size 4096": (lambda c: c["config"]["vae"].update(image_size=4096), True, "image_size must be in"),
    "base_channels 1e5": (lambda c: c["config"]["unet"].update(base_channels=100_000), True,
                          "base_channels must be in"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_hostile_checkpoints_one_line(ckpt_path, tmp_path, case):
    edit, forge, expected = CHECKPOINT_CASES[case]
    bad = mut.edited_checkpoint(ckpt_path, tmp_path / "bad.pt", edit, digest=forge)
    out = tmp_path / "grid.png"
    one_line_exit_2(["sample", bad, "-n", 2, "--steps", 2, "-o", out], expected, output=out)
    one_line_exit_2(["verify", bad], expected)


def test_pickle_nested_100000_deep(ckpt_path, tmp_path):
    bad = mut.deep_pickle_checkpoint(ckpt_path, tmp_path / "deep.pt", 100_000)
    one_line_exit_2(["sample", bad, "-n", 2, "-o", tmp_path / "g.png"], "nests lists/objects more than 64 deep")
    one_line_exit_2(["verify", bad], "more than 64 deep")


def test_huge_weights_give_no_nan_images(ckpt_path, tmp_path):
    """EMA weights of 1e30 are finite, so they load; the sampler's output is not, and nothing is written."""
    bad = mut.edited_checkpoint(ckpt_path, tmp_path / "bad.pt",
                                lambda c: [t.fill_(1e30) for t in c["ema"].values() if t.is_floating_point()])
    out = tmp_path / "images.npy"
    one_line_exit_2(["sample", bad, "-n", 2, "--steps", 2, "-o", out], "sampling produced NaN or inf in the sampler",
                    output=out)
    one_line_exit_2(["eval", bad, "--nll-images", 0, "--per-class", 1, "--steps", 2, "-o", tmp_path / "e.json"],
                    "in the sampler", output=tmp_path / "e.json")


def test_eval_refuses_a_nan_checkpoint_and_writes_nothing(ckpt_path, tmp_path):
    bad = mut.edited_checkpoint(ckpt_path, tmp_path / "bad.pt",
                                lambda c: mut.set_first(c, "ema", lambda t: t.clone().fill_(float("nan"))))
    out = tmp_path / "eval.json"
    one_line_exit_2(["eval", bad, "--nll-images", 0, "--per-class", 1, "-o", out], "non-finite weights", output=out)
    assert list(tmp_path.iterdir()) == [bad]


def test_eval_refuses_a_non_finite_metric(ckpt_path, tmp_path, monkeypatch):
    """Whatever stage of eval yields NaN or inf (here: the evaluation itself, patched), nothing is written."""
    from ldmkit.engine import evaluate

    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: {"recon_mse": 0.5, "nll_bits_per_dim": float("inf")})
    out = tmp_path / "eval.json"
    one_line_exit_2(["eval", ckpt_path, "-o", out], "nll_bits_per_dim is inf (non-finite); nothing was written",
                    output=out)


def test_eval_json_never_holds_nan(ckpt_path, tmp_path):
    """One NLL image: its standard error is undefined, and eval.json says null, not NaN."""
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(main, ["eval", str(ckpt_path), "--nll-images", "1", "--per-class", "0", "-o", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["nll_bits_per_dim_stderr"] is None


@pytest.mark.parametrize("args, expected", [
    (["-n", "1000000000"], "n must be an int >= 1 and at most 10000, got 1000000000"),
    (["-n", "1e9"], "'1e9' is not a valid integer"),
    (["--class", "99999999999999999999999"], "class id must be in 0..9, got 99999999999999999999999"),
    (["--guidance", "1e30"], "guidance must be >= 0 and at most 100, got 1e+30"),
    (["--guidance", "1e308"], "guidance must be >= 0 and at most 100"),
    (["--guidance", "nan"], "guidance must be >= 0 and at most 100"),
    (["--seed", "-1"], "Invalid value for '--seed'"),
    (["--seed", str(10**30)], "Invalid value for '--seed'"),
])
@pytest.mark.parametrize("source", ["checkpoint", "folder", "graph"])
def test_hostile_arguments_one_line(ckpt_path, onnx_artifacts, tmp_path, args, expected, source):
    src = ckpt_path if source == "checkpoint" else onnx_artifacts["cond"]
    out = tmp_path / "grid.png"
    one_line_exit_2(["sample", src, "--steps", 2, "-o", out, *args, *(["--graph"] if source == "graph" else [])],
                    expected, output=out)


def test_eval_per_class_bound(ckpt_path, tmp_path):
    one_line_exit_2(["eval", ckpt_path, "--per-class", 10**12, "-o", tmp_path / "e.json"],
                    "Invalid value for '--per-class'")


def test_eval_sample_count_is_checked_before_anything_is_drawn(ckpt_path, tmp_path, monkeypatch):
    """A checkpoint of 20,000 classes: even --per-class 1 would be 20,000 samples, beyond common.MAX_SAMPLES;
    refused (one line, nothing written) before the labels are built or a sample is drawn."""
    import ldmkit.engine.evaluate as E

    def widen(c):
        c["config"]["unet"]["num_classes"] = 20_000
        for part in ("unet", "ema"):
            key = next(k for k, v in c[part].items() if k.startswith("class_emb"))
            c[part][key] = torch.randn(20_001, c[part][key].shape[1])

    wide = mut.edited_checkpoint(ckpt_path, tmp_path / "wide.pt", widen)
    monkeypatch.setattr(E, "generate", lambda *a, **k: pytest.fail("sampling started"))
    monkeypatch.setattr(E.np, "repeat", lambda *a, **k: pytest.fail("labels built"))
    out = tmp_path / "e.json"
    one_line_exit_2(["eval", wide, "--nll-images", 0, "--per-class", 1, "-o", out],
                    "eval would draw 20000 samples (1 per class for 20000 classes), more than the 10000 one call "
                    "may: use --per-class 1 or less (or 0)", output=out)
    one_line_exit_2(["eval", ckpt_path, "--nll-images", 0, "--per-class", 1001, "-o", out], "--per-class", output=out)


def test_a_training_grid_beyond_the_sample_bound_is_refused_first(tmp_path):
    from ldmkit.engine.config import preset

    config = preset("demo").to_dict()
    config["unet"]["num_classes"], config["train"]["sample_every"] = 2000, 10
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    one_line_exit_2(["train", "--config", path, "--out", tmp_path / "run", "--quiet"],
                    "a sample grid of 2000 classes would draw 16000 images, more than 10000: set train.sample_every "
                    "to 0")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".train.lock"]


# ------------------------------------------------------------------------------ configs (ldmkit train)


@pytest.mark.parametrize("edit, expected", [
    (lambda c: c["vae"].update(image_size=4096), "VAEConfig.image_size must be in [1, 1024], got 4096"),
    (lambda c: c["unet"].update(base_channels=100_000), "UNetConfig.base_channels must be in [1, 4096]"),
    (lambda c: c["diffusion"].update(T=10**10), "DiffusionConfig.T must be in [1, 10000], got 10000000000"),
    (lambda c: c.update(data={}), "Config.data must hold 'spec'"),
    (lambda c: c["train"].update(lr=float("inf")), "TrainConfig.lr must be in [0.0, 10.0], got inf"),
    (lambda c: c["train"].update(kl_weight=float("nan")), "TrainConfig.kl_weight must be"),
    (lambda c: c["vae"].update(recon_logvar=float("nan")), "VAEConfig.recon_logvar must be in"),
    (lambda c: c["train"].update(unet_steps=10**12), "TrainConfig.unet_steps must be in [0, 1000000000]"),
    (lambda c: c.update(data={"spec": "DEEP"}), "nests lists/objects more than 64 deep"),
    (lambda c: c["unet"].update(base_channels=4096, channel_mult=[1, 1, 1], num_res_blocks=16),
     "parameters, more than the 2000000000 ldmkit builds"),
])
def test_hostile_configs_one_line(tmp_path, edit, expected):
    from ldmkit.engine.config import preset

    config = preset("demo").to_dict()
    edit(config)
    path = tmp_path / "config.json"
    # Python's json writes NaN and Infinity, as a hand-edited file may hold; "DEEP" becomes 100,000 nested lists
    path.write_text(json.dumps(config).replace('"DEEP"', "[" * 100_000 + "]" * 100_000))
    one_line_exit_2(["train", "--config", path, "--out", tmp_path / "run", "--quiet"], expected)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------- the digest (12.3)


def test_digest_is_recorded_and_verified(ckpt_path, tmp_path):
    raw = torch.load(ckpt_path, weights_only=True)
    recorded = raw.pop(DIGEST_KEY)
    assert len(recorded) == 64 and recorded == content_digest(raw)
    ckpt = load_checkpoint(ckpt_path)
    assert DIGEST_KEY not in ckpt
    result = CliRunner().invoke(main, ["verify", str(ckpt_path)])
    assert result.exit_code == 0 and result.output.startswith("OK: ") and "sha256 verified" in result.output


def test_digest_covers_every_tensor_byte():
    """The digest changes with any one element of any tensor, with dtype and shape, and with plain values;
    it does not depend on dict order."""
    base = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": {"x": [1, 2.5, "s"]}, "c": None}
    d = content_digest(base)
    assert content_digest({"c": None, "b": {"x": [1, 2.5, "s"]}, "a": base["a"].clone()}) == d
    variants = [{**base, "a": base["a"].reshape(3, 2)}, {**base, "a": base["a"].double()},
                {**base, "b": {"x": [1, 2.5000001, "s"]}}, {**base, "b": {"x": [1, 2.5, "t"]}},
                {**base, "b": {"x": (1, 2.5, "s")}}, {**base, "c": 0}]
    for i in range(6):
        a = base["a"].clone()
        a.view(-1).view(torch.int32)[i] ^= 1  # one bit of one element
        variants.append({**base, "a": a})
    digests = [content_digest(v) for v in variants]
    assert d not in digests and len(set(digests)) == len(digests)


@pytest.mark.gpu
def test_cuda_state_dicts_save_with_the_cpu_digest(ckpt_path, tmp_path):
    """The trainer saves the state dicts of models on CUDA: save_checkpoint takes them, and the digest it
    records is the one a CPU load verifies."""
    from ldmkit.engine.checkpoint import save_checkpoint

    ckpt = load_checkpoint(ckpt_path)
    on_cuda = {**ckpt, **{part: {k: t.cuda() for k, t in ckpt[part].items()} for part in ("vae", "unet", "ema")}}
    save_checkpoint(tmp_path / "c.pt", on_cuda)
    back = load_checkpoint(tmp_path / "c.pt")
    assert all(torch.equal(back["ema"][k], ckpt["ema"][k]) for k in ckpt["ema"])


@pytest.mark.parametrize("where", ["first tensor", "middle of the largest tensor", "last byte of a tensor"])
def test_changed_tensor_byte_with_crcs_recomputed_is_refused_everywhere(ckpt_path, tmp_path, where):
    bad = tmp_path / "checkpoint.pt"
    mut.rezip_changed_tensor_byte(ckpt_path, bad, where)
    message = "is corrupt: its content does not match the sha256 recorded"
    out = tmp_path / "grid.png"
    one_line_exit_2(["sample", bad, "-n", 2, "--steps", 2, "-o", out], message, output=out)
    one_line_exit_2(["export", "onnx", bad, "-o", tmp_path / "onnx"], message, output=tmp_path / "onnx")
    one_line_exit_2(["verify", bad], message)


def test_flipped_byte_order_is_refused(ckpt_path, tmp_path):
    bad = tmp_path / "checkpoint.pt"
    mut.rezip(ckpt_path, bad, lambda name, data: b"big" if name.endswith("/byteorder") else data)
    one_line_exit_2(["sample", bad, "-n", 2, "-o", tmp_path / "g.png"], "is corrupt")


def test_older_checkpoint_without_digest_loads_with_a_note(ckpt_path, tmp_path):
    old = mut.edited_checkpoint(ckpt_path, tmp_path / "old.pt", lambda c: None, digest=False)
    with pytest.warns(LdmkitNote, match="has no content digest"):
        load_checkpoint(old)
    result = subprocess.run([sys.executable, "-m", "ldmkit", "sample", str(old), "-n", "2", "--steps", "2", "-o",
                             str(tmp_path / "g.png")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [f"note: {old} has no content digest (written before ldmkit recorded one): "
                                          "it is checked for structure only, not for corruption"]
    result = CliRunner().invoke(main, ["verify", str(old)])
    assert result.exit_code == 0 and "no digest recorded" in result.output


# ------------------------------------------------------------------------- ONNX folders and sampling


def test_verify_folder(onnx_artifacts, tmp_path):
    result = CliRunner().invoke(main, ["verify", str(onnx_artifacts["cond"])])
    assert result.exit_code == 0 and result.output.startswith("OK: "), result.output
    art = mut.copy_artifact(onnx_artifacts["cond"], tmp_path / "art")
    mut.edit_weight(art / "vae_decoder.onnx")
    mut.rehash(art)
    one_line_exit_2(["verify", art], "sampler.onnx does not carry the weights and nodes of vae_decoder.onnx")
    one_line_exit_2(["verify", tmp_path / "nothing"], "does not exist")


@pytest.mark.parametrize("name, key", [("main/c1", "alpha_bars"), ("main/c4", "sqrt_recip_alpha_bars"),
                                       ("main/c6", "half_log_snr")])
def test_sampler_tables_are_checked_against_the_manifest(onnx_artifacts, tmp_path, name, key):
    """One value of one of sampler.onnx's own schedule tables changed (ᾱ, 1/√ᾱ or λ), every hash recomputed:
    the Python loop would not see it and sampler.onnx would run it, so the folder is refused at load."""
    import onnx
    from onnx import numpy_helper

    art = mut.copy_artifact(onnx_artifacts["cond"], tmp_path / "art")
    model = onnx.load(art / "sampler.onnx")
    init = next(t for t in model.graph.initializer if t.name == name)
    table = numpy_helper.to_array(init).copy()
    assert table.shape == (51,)  # T + 1: it is a table of the schedule
    if key == "alpha_bars":
        from ldmkit.reference.schedules import Schedule

        np.testing.assert_array_equal(table, Schedule.named("linear", 50).alpha_bars)
    table[25] *= 1.01
    init.CopyFrom(numpy_helper.from_array(table, name))
    onnx.save(model, art / "sampler.onnx")
    mut.rehash(art)
    message = f"sampler.onnx: its {key} table ({name}) is not the one sampler.json's schedule gives"
    one_line_exit_2(["verify", art], message)
    for graph in ([], ["--graph"]):
        one_line_exit_2(["sample", art, "-n", 2, "--steps", 2, "-o", tmp_path / "g.npy", *graph], message,
                        output=tmp_path / "g.npy")


def test_sampler_graph_with_a_broken_node_is_refused(onnx_artifacts, tmp_path):
    """Weights intact, one operator renamed, hashes recomputed: verify and --graph refuse it in one line."""
    import onnx

    art = mut.copy_artifact(onnx_artifacts["cond"], tmp_path / "art")
    model = onnx.load(art / "sampler.onnx")
    model.graph.node[0].op_type = "NoSuchOperator"
    onnx.save(model, art / "sampler.onnx")
    mut.rehash(art)
    message = "sampler.onnx cannot be loaded by onnxruntime"
    one_line_exit_2(["verify", art], message)
    one_line_exit_2(["sample", art, "-n", 2, "--steps", 2, "--graph", "-o", tmp_path / "g.npy"], message,
                    output=tmp_path / "g.npy")
    result = CliRunner().invoke(main, ["sample", str(art), "-n", "2", "--steps", "2", "-o", str(tmp_path / "g.npy")])
    assert result.exit_code == 0, result.output  # the Python loop does not run sampler.onnx


def test_non_finite_runtime_output_is_refused_by_stage(onnx_artifacts, monkeypatch):
    from ldmkit.common import NonFiniteOutput
    from ldmkit.export import runtime as rt

    s = rt.OnnxSampler(onnx_artifacts["cond"], provider="cpu")
    run = s._run
    monkeypatch.setattr(s, "_run", lambda session, role, *a: [r * np.float32(np.inf) if role == "unet" else r
                                                              for r in run(session, role, *a)])
    with pytest.raises(NonFiniteOutput, match=r"in the sampler: unet.onnx's output at t = 50"):
        s.sample(2, steps=2)
    monkeypatch.setattr(s, "_run", run)
    monkeypatch.setattr(s, "decode", lambda z: np.full((len(z), 1, 32, 32), np.nan, np.float32))
    with pytest.raises(NonFiniteOutput, match="in the VAE decoder"):
        s.sample(2, steps=2)


def test_one_stderr_line_in_a_real_process(onnx_artifacts, ckpt_path, tmp_path):
    """stderr as a user sees it (warnings, ONNX Runtime's own log lines included): exactly the one line."""
    bad = tmp_path / "c.pt"
    mut.rezip_changed_tensor_byte(ckpt_path, bad, "middle of the largest tensor")
    for args in (["sample", str(onnx_artifacts["cond"]), "-n", "2", "--guidance", "1e30", "-o", "g.png"],
                 ["sample", str(bad), "-n", "2", "-o", "g.png"],
                 ["sample", str(onnx_artifacts["cond"]), "-n", "x", "-o", "g.png"]):
        result = subprocess.run([sys.executable, "-m", "ldmkit", *args], capture_output=True, text=True, timeout=300,
                                cwd=tmp_path)
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stderr.startswith("Error: ") and result.stdout == ""


def test_cli_holds_back_warnings(monkeypatch):
    """A failing command prints one line whatever it warned; a passing one prints only ldmkit's notes."""
    import click

    from ldmkit.cli import LdmkitCommand

    def body(fail):
        np.float32(1e38) * np.float32(10)  # an overflow RuntimeWarning
        warnings.warn("a library's warning", UserWarning, stacklevel=1)
        warnings.warn(LdmkitNote("something to know"), stacklevel=1)
        if fail:
            raise ValueError("bad input")
        click.echo("done")

    cmd = click.Command("x", callback=body, params=[click.Option(["--fail"], is_flag=True)])
    cmd.__class__ = LdmkitCommand
    result = CliRunner().invoke(cmd, ["--fail"])
    assert result.exit_code == 2 and result.output == "Error: bad input\n"
    result = CliRunner().invoke(cmd, [])
    assert result.exit_code == 0 and result.output == "done\nnote: something to know\n"


# ---------------------------------------------------------------------------------- failed writes (13.1)


def stderr_one_line_exit_2(args, expected: str) -> None:
    """As ``one_line_exit_2``, for commands that print results on stdout before they write: stderr alone."""
    result = CliRunner().invoke(main, [str(a) for a in args])  # click >= 8.2 keeps stderr apart
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [f"Error: {expected}"], result.stderr


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_writers_name_the_path_on_a_failed_write(ckpt_path, tmp_path, code):
    """eval.json, an image grid and a golden file whose write fails as a full disk or a refused write does:
    one line naming the file and the cause, exit 2, no file or temporary file left."""
    for args, path in ((["eval", ckpt_path, "--nll-images", 0, "--per-class", 0, "-o", tmp_path / "e.json"],
                        tmp_path / "e.json"),
                       (["sample", ckpt_path, "-n", 2, "--steps", 2, "-o", tmp_path / "g.png"], tmp_path / "g.png"),
                       (["golden", "regen", "--dir", tmp_path / "golden"], tmp_path / "golden" / "schedules.npz")):
        with mut.failing_writes(1, code):
            stderr_one_line_exit_2(args, f"could not write {path}: {os.strerror(code)}")
        assert [p.name for p in tmp_path.rglob("*")] == ["golden"] * (args[0] == "golden")


def test_export_names_its_folder_on_a_full_disk(ckpt_path, tmp_path, monkeypatch):
    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", full)
    out = tmp_path / "onnx"
    stderr_one_line_exit_2(["export", "onnx", ckpt_path, "-o", out], f"could not write {out}: No space left on device")
    assert list(tmp_path.iterdir()) == []
