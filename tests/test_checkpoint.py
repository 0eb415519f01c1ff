"""The checkpoint file: round trip, atomic writes, and a clear one-line error for every bad file."""

from __future__ import annotations

import copy
import functools

import pytest

torch = pytest.importorskip("torch")

from ldmkit.engine import checkpoint as ckpt_mod  # noqa: E402
from ldmkit.engine.checkpoint import (  # noqa: E402
    FORMAT_VERSION,
    load_checkpoint,
    make_checkpoint,
    save_checkpoint,
)
from ldmkit.engine.config import Config, UNetConfig, VAEConfig  # noqa: E402
from ldmkit.engine.models import VAE, UNet  # noqa: E402

PNG_BYTES = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x00\x00\x00\x00:~\x9bU"
             b"\x00\x00\x00\nIDATx\x9cc\xf8\x0f\x00\x01\x01\x01\x00\x1b\xb6\xeeV\x00\x00\x00\x00IEND\xaeB`\x82")


def _tiny_config():
    return Config(vae=VAEConfig(base_channels=8, channel_mult=(1, 2), latent_channels=2, groups=4, image_size=16),
                  unet=UNetConfig(in_channels=2, base_channels=8, channel_mult=(1, 2), attention_levels=(1,),
                                  num_heads=2, num_classes=3, groups=4),
                  latent_shape=(2, 8, 8), latent_scale=1.5)


@functools.cache
def _base_ckpt():
    torch.manual_seed(0)
    cfg = _tiny_config()
    vae, unet = VAE.from_config(cfg.vae), UNet.from_config(cfg.unet)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    unet(torch.randn(2, 2, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 3])).square().sum().backward()
    opt.step()  # a non-empty optimizer state
    ema = {k: v.clone() + 1 for k, v in unet.state_dict().items()}
    return make_checkpoint(cfg, vae.state_dict(), unet.state_dict(), ema, opt.state_dict(), 7,
                           {"loss": 0.25, "history": [1.0, 0.5]})


def _ckpt(step=7):
    """A fresh copy of a small valid checkpoint dict."""
    return {**copy.deepcopy(_base_ckpt()), "step": step}


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _ckpt())
    return path


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        elif isinstance(a[key], dict):
            _assert_same(a[key], b[key])
        else:
            assert a[key] == b[key], key


def test_round_trip(good):
    ckpt = load_checkpoint(good)
    _assert_same(ckpt, _ckpt())
    assert ckpt["format"] == {"name": "ldmkit", "version": FORMAT_VERSION}
    assert Config.from_dict(ckpt["config"]) == _tiny_config()
    unet = UNet.from_config(Config.from_dict(ckpt["config"]).unet)
    unet.load_state_dict(ckpt["ema"])
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    opt.load_state_dict(ckpt["optimizer"])  # resumable


def test_loads_with_weights_only(good):
    torch.load(good, weights_only=True)  # nothing but tensors and plain containers


def test_overwrite_replaces_and_leaves_no_temp_files(good):
    save_checkpoint(good, _ckpt(step=8))
    assert load_checkpoint(good)["step"] == 8
    assert [p.name for p in good.parent.iterdir()] == ["checkpoint.pt"]


def test_failed_write_leaves_the_old_file_intact(good, monkeypatch):
    before = good.read_bytes()

    def failing_save(obj, f, *args, **kwargs):
        f.write(before[: len(before) // 2])  # a partial write, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(good, _ckpt(step=99))
    assert good.read_bytes() == before
    assert [p.name for p in good.parent.iterdir()] == ["checkpoint.pt"]
    monkeypatch.undo()
    assert load_checkpoint(good)["step"] == 7


def test_interrupted_write_leaves_the_old_file_intact(good, monkeypatch):
    before = good.read_bytes()

    def interrupted(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(good, _ckpt(step=99))
    assert good.read_bytes() == before and len(list(good.parent.iterdir())) == 1


def test_save_refuses_an_invalid_checkpoint_before_writing(good):
    before = good.read_bytes()
    bad = _ckpt()
    bad["unet"]["conv_in.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"conv_in\.weight"):
        save_checkpoint(good, bad)
    assert good.read_bytes() == before and len(list(good.parent.iterdir())) == 1


def test_save_to_a_missing_folder(tmp_path):
    with pytest.raises(OSError, match=r"^could not write .*/nope/c\.pt: No such file or directory$"):
        save_checkpoint(tmp_path / "nope" / "c.pt", _ckpt())
    assert list(tmp_path.iterdir()) == []


def _one_line_error(path, match, exc=ValueError):
    with pytest.raises(exc, match=match) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    return message


def test_missing_file_and_directory(tmp_path):
    _one_line_error(tmp_path / "none.pt", "does not exist", FileNotFoundError)
    _one_line_error(tmp_path, "is not an ldmkit checkpoint: not a file")


@pytest.mark.parametrize("content", [
    pytest.param(PNG_BYTES, id="png"),
    pytest.param(bytes(range(256)) * 8, id="random-bytes"),
    pytest.param(b"", id="empty"),
])
def test_not_a_torch_file(tmp_path, content):
    path = tmp_path / "c.pt"
    path.write_bytes(content)
    _one_line_error(path, r"is not an ldmkit checkpoint: not a readable torch file")


def test_truncated(good):
    data = good.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 100):
        good.write_bytes(data[:cut])
        _one_line_error(good, r"is not an ldmkit checkpoint: not a readable torch file")


def test_corrupted_bytes(good):
    data = bytearray(good.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 64] = b"\xff" * 64
    good.write_bytes(bytes(data))
    _one_line_error(good, r"is not an ldmkit checkpoint")


class _Foreign:
    pass


@pytest.mark.parametrize("obj, match", [
    pytest.param({"a": 1}, r"it holds a dict with keys \['a'\], without format", id="foreign-dict"),
    pytest.param(torch.zeros(3), r"it holds Tensor, without format", id="tensor"),
    pytest.param([1, 2], r"it holds list", id="list"),
    pytest.param({"format": {"name": "other", "version": 1}}, r"without format \{'name': 'ldmkit'\}", id="other-name"),
    pytest.param(_Foreign(), r"not a readable torch file", id="pickled-class"),
])
def test_foreign_torch_files(tmp_path, obj, match):
    path = tmp_path / "c.pt"
    torch.save(obj, path)
    _one_line_error(path, match)


@pytest.mark.parametrize("version, match", [
    (2, r"format version 2 is not supported; this ldmkit reads version 1 \(upgrade ldmkit\)"),
    (0, r"format version 0 is not supported; this ldmkit reads version 1$"),
    ("1", r"format version '1' is not supported"),
    (True, r"format version True is not supported"),
])
def test_wrong_version(tmp_path, version, match):
    ckpt = _ckpt()
    ckpt["format"]["version"] = version
    path = tmp_path / "c.pt"
    torch.save(ckpt, path)
    _one_line_error(path, match)


def _saved(tmp_path, edit):
    ckpt = _ckpt()
    edit(ckpt)
    path = tmp_path / "c.pt"
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.pop("ema"), r"is missing key\(s\) \['ema'\]"),
    (lambda c: c["config"]["unet"].pop("dropout"),
     r"bad checkpoint config: config\.unet is missing key\(s\) \['dropout'\]"),
    (lambda c: c["config"].update(extra=1), r"bad checkpoint config: config has unknown key\(s\) \['extra'\]"),
    (lambda c: c.update(step=-1), r"checkpoint step must be an int in 0..1000000000, got -1"),
    (lambda c: c.update(metrics=[1]), r"checkpoint metrics must be a dict, got list"),
    (lambda c: c["unet"].update({"conv_in.weight": torch.zeros(8, 2, 3, 3 + 1)}),
     r"checkpoint unet\['conv_in.weight'\] has shape \(8, 2, 3, 4\), but the config's model has \(8, 2, 3, 3\)"),
    (lambda c: c["ema"].pop("out.2.bias"), r"checkpoint ema is missing 'out.2.bias' \(shape \(2,\)\)"),
    (lambda c: c["vae"].update({"decoder.99.weight": torch.zeros(1)}),
     r"checkpoint vae has 'decoder.99.weight', which the config's model does not have"),
    (lambda c: c["vae"].update({"encoder.0.weight": [1.0]}), r"vae\['encoder.0.weight'\] must be a tensor, got list"),
    (lambda c: c.update(unet=[1]), r"checkpoint unet must be a state dict, got list"),
    # a checkpoint whose config says a wider U-Net than its weights: the first mismatching key is named
    (lambda c: c["config"]["unet"].update(base_channels=16),
     r"checkpoint unet\['time_mlp.0.weight'\] has shape \(32, 8\), but the config's model has \(64, 16\)"),
])
def test_bad_contents(tmp_path, edit, match):
    _one_line_error(_saved(tmp_path, edit), match)


def test_ddp_prefixed_state_dict_is_named(tmp_path):
    def prefix(c):
        c["unet"] = {f"module.{k}": v for k, v in c["unet"].items()}

    msg = _one_line_error(_saved(tmp_path, prefix), r"checkpoint unet is missing 'time_mlp.0.weight'")
    assert "module." not in msg.split("missing")[0]


def test_checkpoint_module_does_not_leave_the_cpu(good):
    ckpt = load_checkpoint(good)
    assert all(v.device.type == "cpu" for v in ckpt["unet"].values())
    assert ckpt_mod.KEYS == ("format", "config", "vae", "unet", "ema", "optimizer", "step", "metrics")
