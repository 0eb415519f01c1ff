"""V1/V2: the latent scale and the way back to pixels, against independent computations."""

import numpy as np
import pytest

from ldmkit.reference import latent


def test_V1_scaled_latents_have_unit_variance():
    """V1: z / std(z) has variance 1; std(z) agrees with a two-pass sum written out here."""
    rng = np.random.default_rng(0)
    z = 3.7 * rng.standard_normal((64, 4, 8, 8)) + 0.2
    std = latent.latent_std(z)
    flat = z.ravel()
    mean = sum(flat) / flat.size
    two_pass = np.sqrt(sum((v - mean) ** 2 for v in flat) / flat.size)
    assert std == pytest.approx(two_pass, rel=1e-12)
    assert latent.scale_latents(z, std).var() == pytest.approx(1.0, rel=1e-12)


def test_V2_decode_undoes_the_scale():
    """V2: a linear decoder applied through decode_sample sees the unscaled latents z_0 · std."""
    rng = np.random.default_rng(1)
    z = 0.3 * rng.standard_normal((5, 2, 4, 4))
    std = latent.latent_std(z)
    weights = rng.standard_normal(2)

    def decoder(zz):  # 1×1 "convolution" mixing channels
        return np.einsum("c,nchw->nhw", weights, zz)[:, None]

    out = latent.decode_sample(decoder, latent.scale_latents(z, std), std)
    np.testing.assert_allclose(out, decoder(z), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(latent.unscale_latents(latent.scale_latents(z, std), std), z, rtol=1e-12)


def test_V1_V2_bad_input():
    with pytest.raises(ValueError, match="at least 2 values"):
        latent.latent_std(np.ones(1))
    with pytest.raises(ValueError, match="zero spread"):
        latent.latent_std(np.ones((3, 2)))
    with pytest.raises(ValueError, match="std must be in"):
        latent.scale_latents(np.ones(3), 0.0)
    with pytest.raises(ValueError, match="std must be in"):
        latent.unscale_latents(np.ones(3), -1.0)
    with pytest.raises(TypeError, match="decoder must be callable"):
        latent.decode_sample("decoder", np.ones(3), 1.0)
    with pytest.raises(ValueError, match="finite"):
        latent.latent_std(np.array([1.0, np.nan]))
