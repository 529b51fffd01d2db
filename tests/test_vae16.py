"""The 16-channel VAE of Flux / SD3 (no quant convs, shift and scaling factors): the
existing VAE as a config variant, parity with diffusers' AutoencoderKL."""
import numpy as np
import torch

from retom_jax.models.vae import load_vae
from tests.test_vae import TOL, make_torch_vae, randn
from tests.util import assert_close


def test_flux_style_vae_parity(tmp_path):
    model = make_torch_vae(seed=2, latent_channels=16, use_quant_conv=False,
                           use_post_quant_conv=False, scaling_factor=0.3611,
                           shift_factor=0.1159)
    model.save_pretrained(tmp_path)
    vae = load_vae(tmp_path)
    c = vae.config
    assert (c.latent_channels, c.shift_factor, c.scaling_factor) == (16, 0.1159, 0.3611)
    assert vae.module.quant_conv is None and vae.module.post_quant_conv is None
    images, latents = randn(0, 1, 3, 32, 32), randn(1, 2, 16, 4, 6)
    with torch.no_grad():
        mean = model.encode(images).latent_dist.mean.numpy()
        decoded = model.decode(latents / 0.3611 + 0.1159).sample.numpy()
    assert_close(vae.encode(images.numpy()).mean, mean, TOL)
    z = latents.numpy() / c.scaling_factor + c.shift_factor  # how the Flux pipeline unscales
    assert_close(vae.decode(z), decoded, TOL)
