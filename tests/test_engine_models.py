"""The engine's configs and networks: shapes, the class/null embedding, determinism, exportability."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from ldmkit.engine.config import (  # noqa: E402
    PRESETS,
    Config,
    DiffusionConfig,
    TrainConfig,
    UNetConfig,
    VAEConfig,
    preset,
)
from ldmkit.engine.models import VAE, SelfAttention, UNet, timestep_embedding  # noqa: E402

TINY_UNET = dict(in_channels=4, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                 num_heads=2, num_classes=10, dropout=0.0, groups=4)


def _randomize(module, seed=0):
    """Overwrite every parameter with noise so zero-initialised layers stop hiding the inputs' effect."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module


def _inputs(b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 8, 8, generator=g), torch.tensor([1, 500, 1000][:b])


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_plain_dicts(name):
    cfg = preset(name)
    d = cfg.to_dict()

    def plain(v):
        if isinstance(v, dict):
            return all(isinstance(k, str) and plain(x) for k, x in v.items())
        if isinstance(v, list):
            return all(plain(x) for x in v)
        return v is None or isinstance(v, (bool, int, float, str))

    assert plain(d)
    assert Config.from_dict(d) == cfg
    assert cfg.vae.latent_shape[1] % cfg.unet.downsampling == 0


def test_preset_unknown_name():
    with pytest.raises(ValueError, match=r"preset must be one of \['demo', 'small', 'base'\], got 'huge'"):
        preset("huge")


def test_demo_preset_sizes():
    cfg = preset("demo")
    assert cfg.vae.image_size == 32 and cfg.vae.latent_shape == (4, 8, 8)
    assert cfg.unet.num_classes == 10 and len(cfg.unet.channel_mult) <= 3


def test_from_dict_rejects_unknown_missing_and_mistyped_keys():
    d = Config().to_dict()
    d["vae"]["colour"] = 1
    with pytest.raises(ValueError, match=r"config\.vae has unknown key\(s\) \['colour'\]"):
        Config.from_dict(d)
    d = Config().to_dict()
    del d["train"]["lr"]
    with pytest.raises(ValueError, match=r"config\.train is missing key\(s\) \['lr'\]"):
        Config.from_dict(d)
    d = Config().to_dict()
    d["unet"]["num_classes"] = "10"
    with pytest.raises(ValueError, match=r"config\.unet\.num_classes must be int, got str"):
        Config.from_dict(d)
    d = Config().to_dict()
    d["train"]["compile"] = 1
    with pytest.raises(ValueError, match=r"config\.train\.compile must be bool"):
        Config.from_dict(d)
    with pytest.raises(ValueError, match="config must be a dict"):
        Config.from_dict([1, 2])


def test_from_dict_accepts_ints_for_floats_and_lists_for_tuples():
    d = Config().to_dict()
    d["train"]["lr"] = 1
    d["latent_shape"], d["latent_scale"] = [4, 8, 8], 2
    cfg = Config.from_dict(d)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.vae.channel_mult == (1, 2, 2) and cfg.latent_shape == (4, 8, 8) and cfg.latent_scale == 2.0


@pytest.mark.parametrize("make, match", [
    (lambda: VAEConfig(base_channels=12, groups=8), "divisible by groups"),
    (lambda: VAEConfig(image_size=30), "divisible by the downsampling factor 4"),
    (lambda: VAEConfig(likelihood="laplace"), "likelihood must be one of"),
    (lambda: UNetConfig(attention_levels=(2,)), r"attention_levels must be in 0\.\.1"),
    (lambda: UNetConfig(num_heads=3), "not divisible by num_heads"),
    (lambda: UNetConfig(num_classes=-1), r"num_classes must be in \[0, 100000\], got -1"),
    (lambda: DiffusionConfig(schedule="quadratic"), "schedule must be one of"),
    (lambda: DiffusionConfig(prediction="score"), "prediction must be one of"),
    (lambda: TrainConfig(precision="fp16"), "precision must be one of"),
    (lambda: TrainConfig(ema_decay=1.0), r"ema_decay must be in \[0, 1\)"),
    (lambda: Config(unet=UNetConfig(in_channels=3)), "must equal vae.latent_channels"),
    (lambda: Config(unet=UNetConfig(channel_mult=(1, 1, 1, 1, 1))), "not divisible by the U-Net's downsampling"),
    (lambda: Config(latent_shape=(4, 4, 4)), "does not match the VAE's"),
])
def test_config_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ---------------------------------------------------------------------------------------------- models
def test_timestep_embedding_formula():
    t = torch.tensor([0, 7, 1000])
    emb = timestep_embedding(t, 8)
    assert emb.shape == (3, 8) and emb.dtype == torch.float32
    for row, tv in enumerate([0, 7, 1000]):
        for i in range(4):
            f = 10000.0 ** (-i / 4)
            assert emb[row, i].item() == pytest.approx(math.cos(tv * f), abs=1e-4)
            assert emb[row, 4 + i].item() == pytest.approx(math.sin(tv * f), abs=1e-4)


def test_self_attention_matches_softmax_formula():
    torch.manual_seed(0)
    attn = _randomize(SelfAttention(8, num_heads=2, groups=4)).eval()
    x = torch.randn(2, 8, 3, 3)
    qkv = attn.qkv(attn.norm(x)).reshape(2, 3, 2, 4, 9)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # (B, heads, d, L)
    w = torch.softmax(torch.einsum("bhdi,bhdj->bhij", q, k) / 2.0, dim=-1)  # 1/√d, d = 4
    out = torch.einsum("bhij,bhdj->bhdi", w, v).reshape(2, 8, 3, 3)
    torch.testing.assert_close(attn(x), x + attn.proj(out), rtol=1e-5, atol=1e-5)


def test_unet_shapes_and_zero_initial_output():
    torch.manual_seed(0)
    unet = UNet(**TINY_UNET).eval()
    x, t = _inputs()
    out = unet(x, t, torch.tensor([0, 5, 10]))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.count_nonzero(out) == 0  # zero-initialised output conv
    assert unet.class_emb.num_embeddings == 11  # ten classes and the null class


@pytest.mark.parametrize("cfg", ["demo", "small", "base"])
def test_unet_from_preset_shapes(cfg):
    c = preset(cfg)
    with torch.device("meta"):
        unet = UNet.from_config(c.unet)
    x = torch.empty(2, *c.vae.latent_shape, device="meta")
    out = unet(x, torch.tensor([1, 2], device="meta"), torch.tensor([0, c.unet.num_classes], device="meta"))
    assert out.shape == x.shape


def test_unet_class_and_null_embedding():
    torch.manual_seed(0)
    unet = _randomize(UNet(**TINY_UNET)).eval()
    x, t = _inputs()
    null = torch.full((3,), 10)
    with torch.no_grad():
        out_none, out_null = unet(x, t), unet(x, t, null)
        out_a, out_b = unet(x, t, torch.tensor([0, 0, 0])), unet(x, t, torch.tensor([3, 3, 3]))
    torch.testing.assert_close(out_none, out_null, rtol=0, atol=0)
    assert (out_a - out_b).abs().max() > 1e-3
    assert (out_a - out_null).abs().max() > 1e-3
    # the label acts per example: changing example 0's class leaves the others alone
    with torch.no_grad():
        mixed = unet(x, t, torch.tensor([3, 0, 0]))
    torch.testing.assert_close(mixed[1:], out_a[1:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[:1], out_b[:1], rtol=1e-5, atol=1e-6)


def test_unconditional_unet_refuses_labels():
    unet = UNet(**{**TINY_UNET, "num_classes": 0}).eval()
    x, t = _inputs()
    assert unet.class_emb is None and unet(x, t).shape == x.shape
    with pytest.raises(ValueError, match="y must be None for an unconditional U-Net"):
        unet(x, t, torch.tensor([0, 1, 2]))


def test_unet_is_deterministic_on_cpu_with_a_seed():
    def run():
        torch.manual_seed(123)
        unet = UNet(**{**TINY_UNET, "dropout": 0.1})
        _randomize(unet.out)  # make the output depend on the inputs
        x, t = _inputs()
        out = unet(x, t, torch.tensor([1, 2, 3]))  # train mode: dropout draws from the seeded generator
        out.square().mean().backward()
        return out.detach(), unet.conv_in.weight.grad

    (a, ga), (b, gb) = run(), run()
    assert torch.equal(a, b) and torch.equal(ga, gb)


def test_unet_exports_with_torch_export():
    torch.manual_seed(0)
    unet = _randomize(UNet(**TINY_UNET)).eval()
    x, t = _inputs()
    y = torch.tensor([0, 4, 10])
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(unet, (x, t, y), dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))
    x2, t2 = torch.randn(5, 4, 8, 8), torch.tensor([1, 2, 3, 4, 5])
    y2 = torch.tensor([0, 1, 2, 3, 10])
    torch.testing.assert_close(ep.module()(x2, t2, y2), unet(x2, t2, y2), rtol=1e-5, atol=1e-5)


def test_vae_shapes_for_the_demo_config():
    cfg = preset("demo").vae
    torch.manual_seed(0)
    vae = VAE.from_config(cfg).eval()
    x = torch.rand(2, cfg.in_channels, cfg.image_size, cfg.image_size) * 2 - 1
    mean, logvar = vae.encode(x)
    assert mean.shape == logvar.shape == (2, *cfg.latent_shape)
    assert vae.decode(mean).shape == x.shape
    out, m2, _ = vae(x, noise=torch.zeros_like(mean))
    torch.testing.assert_close(m2, mean)
    torch.testing.assert_close(out, vae.decode(mean))  # zero noise: z = mean


def test_vae_bernoulli_decodes_into_the_image_range():
    torch.manual_seed(0)
    vae = _randomize(VAE(1, 8, (1, 2), 1, 2, 4, "bernoulli"))
    z = 10 * torch.randn(3, 2, 8, 8)
    logits = vae.decode_params(z)
    torch.testing.assert_close(vae.decode(z), 2 * torch.sigmoid(logits) - 1)
    assert vae.decode(z).abs().max() <= 1


def test_vae_reparameterisation_uses_the_noise():
    torch.manual_seed(0)
    vae = _randomize(VAE(1, 8, (1, 2), 1, 2, 4, "gaussian")).eval()
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    mean, logvar = vae.encode(x)
    noise = torch.randn_like(mean)
    out, _, _ = vae(x, noise=noise)
    torch.testing.assert_close(out, vae.decode_params(mean + torch.exp(0.5 * logvar) * noise))
