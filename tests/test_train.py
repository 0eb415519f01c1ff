"""Training: resume gives the parameters of an uninterrupted run, 2-process DDP (gloo) gives those of one
process with the same global batch, a NaN loss stops training and leaves the last checkpoint as it was,
and bad input is refused with one line and exit status 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

from ldmkit.cli import main  # noqa: E402
from ldmkit.common import DEFAULT_GUIDANCE  # noqa: E402
from ldmkit.engine import train as T  # noqa: E402
from ldmkit.engine.checkpoint import load_checkpoint  # noqa: E402
from ldmkit.engine.config import Config, DiffusionConfig, TrainConfig, UNetConfig, VAEConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """256 built-in digits with labels, as an .npz (a small dataset keeps these tests fast)."""
    with np.load(ROOT / "src" / "ldmkit" / "data" / "mnist8k.npz") as f:
        images, labels = f["images"][:256], f["labels"][:256]
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    np.savez(path, images=images, labels=labels)
    return path


def tiny_config(data, **train) -> Config:
    defaults = dict(vae_steps=4, vae_batch_size=16, unet_steps=6, batch_size=16, checkpoint_every=2, log_every=1,
                    warmup_steps=3, lr=1e-3, vae_lr=1e-3)
    return Config(data={"spec": str(data)},
                  vae=VAEConfig(base_channels=8, channel_mult=(1, 2, 2), latent_channels=2, groups=4),
                  unet=UNetConfig(in_channels=2, base_channels=16, channel_mult=(1, 2), attention_levels=(1,),
                                  num_heads=2, num_classes=10, groups=4),
                  diffusion=DiffusionConfig(T=50), train=TrainConfig(**{**defaults, **train}))


def params(path):
    ckpt = load_checkpoint(path)
    return {f"{part}.{k}": v for part in ("vae", "unet", "ema") for k, v in ckpt[part].items()}


def assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


@pytest.mark.parametrize("stop_after", [3, 7])  # inside the VAE stage, and inside the U-Net stage
def test_resume_gives_the_uninterrupted_parameters(digits, tmp_path, stop_after):
    """A run stopped after `stop_after` steps (checkpoints every 2) and resumed ends bit-identical to an
    uninterrupted run with the same seed, EMA and optimizer state included."""
    full = T.train(tiny_config(digits), tmp_path / "full", device="cpu")
    T.train(tiny_config(digits), tmp_path / "cut", device="cpu", stop_after=stop_after)
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["step"] == stop_after - stop_after % 2
    resumed = T.train(tiny_config(digits), tmp_path / "cut", device="cpu", resume=True)
    assert_same(params(full), params(resumed))
    lines = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 11)) and {r["stage"] for r in lines} == {"vae", "unet"}


def test_progress_callback(digits, tmp_path):
    """progress(label, done, total, record): record None when a stage starts (at the resumed position),
    then once per step with the step's metrics record."""
    calls = []
    T.train(tiny_config(digits), tmp_path / "run", device="cpu", stop_after=7, progress=lambda *a: calls.append(a))
    T.train(tiny_config(digits), tmp_path / "run", device="cpu", resume=True, progress=lambda *a: calls.append(a))
    seen = [(label, done, total, record and record["step"]) for label, done, total, record in calls]
    assert seen == [("VAE", 0, 4, None), *[("VAE", i, 4, i) for i in range(1, 5)],
                    ("U-Net", 0, 6, None), *[("U-Net", i, 6, 4 + i) for i in range(1, 4)],
                    ("U-Net", 2, 6, None), *[("U-Net", i, 6, 4 + i) for i in range(3, 7)]]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert calls[-1][3] == lines[-1]

def test_nan_loss_stops_and_keeps_the_last_checkpoint(digits, tmp_path, monkeypatch):
    out = tmp_path / "run"
    T.train(tiny_config(digits), out, device="cpu", stop_after=6)
    before = (out / "checkpoint.pt").read_bytes()
    original = T.D.mse_per_example
    monkeypatch.setattr(T.D, "mse_per_example", lambda p, t: original(p, t) * float("nan"))
    with pytest.raises(T.TrainingDiverged, match=r"U-Net loss became nan at step 6.*untouched"):
        T.train(tiny_config(digits), out, device="cpu", resume=True)
    assert (out / "checkpoint.pt").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(digits, tmp_path):
    """torchrun with 2 CPU processes (gloo), per-process batch 8, against 1 process with batch 16: the
    same parameters after 4 VAE and 6 U-Net steps, to float32 tolerance (all-reduce sums in another order)."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(tiny_config(digits, checkpoint_every=0).to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    base = ["-m", "ldmkit", "train", "--config", str(cfg), "--device", "cpu", "--quiet"]
    one = subprocess.run([sys.executable, *base, "--out", str(tmp_path / "one")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *base, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same(params(tmp_path / "one" / "checkpoint.pt"), params(tmp_path / "two" / "checkpoint.pt"), atol=2e-5)


def test_cli_train_and_sample(digits, tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(tiny_config(digits).to_dict()))
    out = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(main, ["train", "--config", str(cfg), "--out", str(out), "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (out / "checkpoint.pt").is_file() and (out / "config.json").is_file()
    ckpt = str(out / "checkpoint.pt")
    result = runner.invoke(main, ["sample", ckpt, "-n", "10", "--steps", "3", "-o", str(tmp_path / "g.npy")])
    assert result.exit_code == 0, result.output
    images = np.load(tmp_path / "g.npy")
    assert images.shape == (10, 1, 28, 28) and images.dtype == np.float32  # the digits' own size, not 32×32
    assert images.min() >= 0 and images.max() <= 1
    for sampler in ("ddpm", "heun", "dpmpp2m"):
        result = runner.invoke(main, ["sample", ckpt, "-n", "3", "--steps", "3", "--sampler", sampler, "--class", "4",
                                      "-o", str(tmp_path / f"{sampler}.png")])
        assert result.exit_code == 0, result.output
        assert (tmp_path / f"{sampler}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The same seed gives the same images.
    runner.invoke(main, ["sample", ckpt, "-n", "10", "--steps", "3", "-o", str(tmp_path / "h.npy")])
    np.testing.assert_array_equal(np.load(tmp_path / "h.npy"), images)


@pytest.fixture(scope="module")
def tiny_checkpoint(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    return T.train(tiny_config(digits, unet_steps=1, vae_steps=1), out, device="cpu")


@pytest.mark.parametrize("args, message", [
    (["--class", "10"], "class id must be in 0..9"),
    (["--class", "-1"], "class id must be in 0..9"),
    (["--steps", "51"], "steps must be in 1..50"),
    (["--sampler", "euler_a"], "sampler must be one of"),
    (["--eta", "-0.5"], "eta must be >= 0"),
    (["--eta", "0.5", "--sampler", "heun"], "eta applies to the ddim sampler only"),
    (["--guidance", "-1"], "guidance must be >= 0"),
])
def test_cli_sample_bad_arguments(tiny_checkpoint, tmp_path, args, message):
    grid = tmp_path / "grid.png"
    result = CliRunner().invoke(main, ["sample", str(tiny_checkpoint), "-o", str(grid), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not grid.exists()


def test_cli_train_bad_input(digits, tmp_path):
    runner = CliRunner()
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(tiny_config(digits, unet_steps=1, vae_steps=1).to_dict()))
    out = tmp_path / "run"
    assert runner.invoke(main, ["train", "--config", str(cfg), "--out", str(out), "--quiet"]).exit_code == 0
    before = (out / "checkpoint.pt").read_bytes()
    result = runner.invoke(main, ["train", "--config", str(cfg), "--out", str(out), "--quiet"])
    assert result.exit_code == 2 and "pass --resume" in result.output
    assert (out / "checkpoint.pt").read_bytes() == before
    result = runner.invoke(main, ["train", "--config", str(cfg), "--out", str(tmp_path / "new"), "--resume"])
    assert result.exit_code == 2 and "does not exist" in result.output
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((10, 5), dtype=np.float32))
    result = runner.invoke(main, ["train", "--config", str(cfg), "--data", str(bad), "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and str(bad) in result.output
    result = runner.invoke(main, ["train", "--preset", "huge", "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "preset must be one of" in result.output
    (tmp_path / "notjson.json").write_text("{")
    result = runner.invoke(main, ["train", "--config", str(tmp_path / "notjson.json"), "--out", str(tmp_path / "d")])
    assert result.exit_code == 2 and "is not valid JSON" in result.output


def test_sample_from_bad_checkpoints(tmp_path):
    runner = CliRunner()
    png = tmp_path / "grid.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    foreign = tmp_path / "foreign.pt"
    torch.save({"a": torch.zeros(2)}, foreign)
    for path, message in ((png, "is not an ldmkit checkpoint"), (foreign, "is not an ldmkit checkpoint"),
                          (tmp_path / "missing.pt", "does not exist"), (tmp_path, "is a folder")):
        result = runner.invoke(main, ["sample", str(path), "-o", str(tmp_path / "out.png")])
        assert result.exit_code == 2, (path, result.output)
        assert message in result.output and len(result.output.strip().splitlines()) == 1
    result = runner.invoke(main, ["sample", str(foreign), "-o", str(tmp_path / "no" / "out.png")])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = runner.invoke(main, ["sample", str(foreign), "-o", str(tmp_path / "out.jpg")])
    assert result.exit_code == 2 and ".png" in result.output


def test_cli_eval_writes_json(tiny_checkpoint, tmp_path):
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(main, ["eval", str(tiny_checkpoint), "--nll-images", "3", "--per-class", "2",
                                       "--guidance-rescale", "0.5", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["nll_images"] == 3 and report["nll_dims"] == 32 * 32
    parts = report["decoder_nats"] + report["posterior_nats"] + report["prior_nats"]
    assert report["nll_bits_per_dim"] == pytest.approx(parts / (1024 * np.log(2)), rel=1e-9)
    assert report["recon_psnr_db"] == pytest.approx(10 * np.log10(1 / report["recon_mse"]))
    assert 0 <= report["nearest_mean_accuracy_samples"] <= 1 and report["nearest_mean_accuracy_test"] > 0.5
    assert report["sampler"] == f"dpmpp2m 10 steps, guidance {DEFAULT_GUIDANCE}" and report["samples"] == 20
    assert (report["quality_sampler"], report["quality_steps"], report["quality_guidance"],
            report["quality_guidance_rescale"]) == ("dpmpp2m", 10, DEFAULT_GUIDANCE, 0.5)
    assert 0 <= report["quality_accuracy"] <= 1 and report["quality_samples"] == 20
    assert report["quality_fd"] >= 0 and report["quality_fd_floor"] > 0
    assert report["quality_fd_ratio"] == pytest.approx(report["quality_fd"] / report["quality_fd_floor"])
    assert report["quality_held_out_images"] == report["test_images"] == 32
    assert "quality_accuracy" in result.output and "quality_fd_ratio" in result.output
    result = CliRunner().invoke(main, ["eval", str(tiny_checkpoint), "--nll-images", "0", "--per-class", "1",
                                       "--sampler", "dpmpp2m", "--steps", "3", "--guidance", "1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["sampler"] == "dpmpp2m 3 steps, guidance 1.0" and report["quality_samples"] == 10
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "missing.pt")])
    assert result.exit_code == 2 and "does not exist" in result.output


@pytest.mark.parametrize("args, message", [
    (["--steps", "51"], "steps must be in 1..50"),
    (["--sampler", "euler_a"], "sampler must be one of"),
    (["--guidance", "-1"], "guidance must be >= 0"),
])
def test_cli_eval_bad_arguments(tiny_checkpoint, tmp_path, args, message):
    """Bad sampling arguments are refused before anything runs: one line, exit 2, no eval.json."""
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(main, ["eval", str(tiny_checkpoint), "-o", str(out), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_cli_sample_refuses_bad_checkpoints(tiny_checkpoint, tmp_path):
    """Truncated, corrupted, wrong-version and shape-mismatched checkpoints: one line, exit 2, no output."""
    data = tiny_checkpoint.read_bytes()
    cases = {"truncated.pt": data[: len(data) // 2],
             "corrupt.pt": data[:4096] + bytes(b ^ 0xFF for b in data[4096:4160]) + data[4160:]}
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    ckpt.pop("sha256")  # edited as by an older ldmkit, which recorded no digest (an edit under one is corruption)
    torch.save({**ckpt, "format": {"name": "ldmkit", "version": 99}}, tmp_path / "version.pt")
    key = next(iter(ckpt["unet"]))
    torch.save({**ckpt, "unet": {**ckpt["unet"], key: torch.zeros(3, 3)}}, tmp_path / "shape.pt")
    messages = {"truncated.pt": "not an ldmkit checkpoint", "corrupt.pt": "not an ldmkit checkpoint",
                "version.pt": "version 99 is not supported", "shape.pt": "has shape (3, 3)"}
    for name, message in messages.items():
        out = tmp_path / f"{name}.png"
        result = CliRunner().invoke(main, ["sample", str(tmp_path / name), "-o", str(out)])
        assert result.exit_code == 2, (name, result.output)
        assert message in result.output and len(result.output.strip().splitlines()) == 1, (name, result.output)
        assert not out.exists()


def test_cli_sample_unconditional_refuses_class_and_guidance(digits, tmp_path):
    config = tiny_config(digits, unet_steps=1, vae_steps=1)
    config.unet.num_classes = 0
    ckpt = T.train(config, tmp_path / "uncond", device="cpu")
    for args, message in ((["--class", "3"], "the model is unconditional"),
                          (["--guidance", "2"], "guidance was given but the model is unconditional")):
        result = CliRunner().invoke(main, ["sample", str(ckpt), "--steps", "3", "-o", str(tmp_path / "g.png"), *args])
        assert result.exit_code == 2 and message in result.output, result.output
    result = CliRunner().invoke(main, ["sample", str(ckpt), "-n", "4", "--steps", "3", "-o", str(tmp_path / "g.png")])
    assert result.exit_code == 0, result.output


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_trained_on_28x28_digits_samples_are_28x28_everywhere(digits, tmp_path):
    """The digits are 28×28, padded to 32×32 for the VAE: the checkpoint records content_size [28, 28] (and keeps
    it through a resume), and the engine, ``ldmkit sample`` (.npy and grid), the exported vae_decoder.onnx, the
    runtime's sample and sample_graph and ``ldmkit sample DIR --graph`` all give 28×28 images: the centre of what
    the same checkpoint without content_size (as written before ldmkit recorded it) gives, which still loads and
    gives 32×32. The 2-pixel border is sliced here by hand ([2:30]), independently of ``center_crop``."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)
    from ldmkit.engine.sample import generate, models_from_checkpoint, sample_noise
    from ldmkit.export.manifest import FORMAT_VERSION
    from ldmkit.export.onnx_export import export_onnx
    from ldmkit.export.runtime import OnnxSampler

    out = tmp_path / "run"
    T.train(tiny_config(digits, vae_steps=2, unet_steps=3), out, device="cpu", stop_after=4)
    path = T.train(tiny_config(digits, vae_steps=2, unet_steps=3), out, device="cpu", resume=True)
    ckpt = load_checkpoint(path)
    assert ckpt["config"]["data"]["content_size"] == [28, 28] and ckpt["config"]["vae"]["image_size"] == 32
    assert json.loads((out / "config.json").read_text())["data"]["content_size"] == [28, 28]
    old = {**ckpt, "config": {**ckpt["config"], "data": {k: v for k, v in ckpt["config"]["data"].items()
                                                          if k != "content_size"}}}
    torch.save(old, tmp_path / "old.pt")

    config, vae, unet = models_from_checkpoint(ckpt)
    old_config, _, _ = models_from_checkpoint(load_checkpoint(tmp_path / "old.pt"))
    assert config.output_size == (28, 28) and old_config.output_size == (32, 32)
    noise = sample_noise(config, 4, 3, seed=5)
    new_images = generate(config, vae, unet, 4, [0, 1, 2, 3], "ddim", 3, noise=noise)
    old_images = generate(old_config, vae, unet, 4, [0, 1, 2, 3], "ddim", 3, noise=noise)
    assert new_images.shape == (4, 1, 28, 28) and old_images.shape == (4, 1, 32, 32)
    np.testing.assert_array_equal(new_images, old_images[..., 2:30, 2:30])

    runner = CliRunner()
    for source, side in ((path, 28), (tmp_path / "old.pt", 32)):
        result = runner.invoke(main, ["sample", str(source), "-n", "10", "--steps", "2", "-o", str(tmp_path / "a.npy")])
        assert result.exit_code == 0, result.output
        assert np.load(tmp_path / "a.npy").shape == (10, 1, side, side)
    result = runner.invoke(main, ["sample", str(path), "-n", "20", "--steps", "2", "-o", str(tmp_path / "grid.png")])
    assert result.exit_code == 0, result.output
    assert png_size(tmp_path / "grid.png") == (10 * 30 + 2, 2 * 30 + 2)  # 10 per row, 28 + 2 pixels of padding

    art = export_onnx(path, tmp_path / "onnx", steps=3, log=lambda line: None)
    manifest = json.loads((art / "sampler.json").read_text())
    assert manifest["model"]["image_shape"] == [1, 28, 28] and manifest["format"]["version"] == FORMAT_VERSION
    sampler = OnnxSampler(art, provider="cpu")
    z = noise[0].numpy()
    with torch.inference_mode():
        full = ((vae.decode(noise[0] * config.latent_scale).clamp(-1, 1) + 1) / 2).numpy()
    decoded = sampler.decode(z)
    assert decoded.shape == (4, 1, 28, 28) and np.abs(decoded - full[..., 2:30, 2:30]).max() <= 1e-4
    python = sampler.sample(4, [0, 1, 2, 3], "ddim", 3, noise=(z, None))
    graph = sampler.sample_graph(4, [0, 1, 2, 3], 3, noise=(z, None), sampler="ddim")
    assert python.shape == graph.shape == (4, 1, 28, 28)
    assert np.abs(python - new_images).max() <= 1e-4 and np.abs(graph - new_images).max() <= 1e-4
    result = runner.invoke(main, ["sample", str(art), "--graph", "-n", "3", "--steps", "2", "-o",
                                  str(tmp_path / "b.npy")])
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "b.npy").shape == (3, 1, 28, 28)


def test_content_size_is_checked(digits, tiny_checkpoint, tmp_path):
    """config.data.content_size: [height, width], ints in 1..image_size; one-line errors naming the key, and
    a checkpoint that holds a bad one is refused by ``ldmkit sample`` (exit status 2, no output)."""
    good = tiny_config(digits).to_dict()
    for size in ([28, 33], [0, 28], [28], [28.0, 28], [True, 28], "28x28"):
        d = {**good, "data": {**good["data"], "content_size": size}}
        with pytest.raises(ValueError, match=r"^Config.data.content_size must be \[height, width\], ints in 1..32 "
                                              r"\(vae.image_size\), got") as info:
            Config.from_dict(d)
        assert "\n" not in str(info.value)
    d = {**good, "data": {**good["data"], "content_size": [32, 7]}}
    assert Config.from_dict(d).output_size == (32, 7) and Config.from_dict(good).output_size == (32, 32)
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    ckpt.pop("sha256", None)  # an edit by hand: no content digest (which would call it corrupt)
    torch.save({**ckpt, "config": {**ckpt["config"], "data": {**ckpt["config"]["data"], "content_size": [40, 28]}}},
               tmp_path / "bad.pt")
    result = CliRunner().invoke(main, ["sample", str(tmp_path / "bad.pt"), "-o", str(tmp_path / "g.png")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "bad checkpoint config: Config.data.content_size must be [height, width], ints in 1..32" in result.output
    assert not (tmp_path / "g.png").exists()


def test_the_old_demo_recipe_stays_reachable_by_config(digits, tmp_path):
    """examples/configs/demo-eps.json is the demo recipe before the refinements (ε-prediction, 1,000 U-Net steps:
    BENCHMARKS.md, "Training recipes") and differs from the demo preset in nothing else; `train --config` runs it
    (here for one step of each stage on the test's digits)."""
    from ldmkit.common import read_json
    from ldmkit.engine.config import preset

    path = ROOT / "examples" / "configs" / "demo-eps.json"
    old, demo = Config.from_dict(read_json(path, "config")), preset("demo")
    assert (old.diffusion.prediction, old.train.unet_steps, old.data) == ("eps", 1000, {"spec": "mnist"})
    assert (demo.diffusion.prediction, demo.train.unet_steps) == ("v", 1500)
    old.diffusion.prediction, old.train.unet_steps, old.data = "v", 1500, demo.data
    assert old.to_dict() == demo.to_dict()
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--config", str(path), "--data", str(digits), "--vae-steps", "1",
                                       "--unet-steps", "1", "--out", str(out), "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(out / "checkpoint.pt")["config"]["diffusion"]["prediction"] == "eps"
