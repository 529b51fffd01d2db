"""Parity of retom_jax.vae with diffusers' AutoencoderKL (same random weights), loading
and error handling."""
import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from diffusers import AutoencoderKL as TorchAutoencoderKL
from safetensors.numpy import load_file, save_file

from retom_jax.models.vae import VAE, DiagonalGaussian, VAEConfig, load_vae
from retom_jax.models.weights import CheckpointError
from tests.util import assert_close, rel_err, to_numpy

WEIGHTS = "diffusion_pytorch_model.safetensors"

TOL = 2e-5  # float32: measured ~1e-6 (encode) to ~2e-6 (decode)


def make_torch_vae(seed=0, **overrides):
    kwargs = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                  norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = TorchAutoencoderKL(**kwargs).eval()
    with torch.no_grad():
        # GroupNorm affine params default to 1/0: move them so a mis-mapped scale/bias shows.
        for mod in model.modules():
            if isinstance(mod, torch.nn.GroupNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae_tiny")
    model = make_torch_vae()
    model.save_pretrained(folder)
    return model, folder, load_vae(folder)


@pytest.fixture(scope="module")
def three_block(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae_3block")
    model = make_torch_vae(
        seed=1, block_out_channels=(32, 32, 64), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
        scaling_factor=0.13025)
    model.save_pretrained(folder)
    return model, folder, load_vae(folder)


def copy_folder(src, dst, **config_changes):
    shutil.copytree(src, dst)
    if config_changes:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config_changes)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def randn(seed, *shape):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


# ----------------------------------------------------------------------------- parity

def test_config_and_structure(tiny):
    model, _, vae = tiny
    c = vae.config
    assert isinstance(vae, VAE) and isinstance(c, VAEConfig)
    assert c.block_out_channels == (32, 64) and c.latent_channels == 4
    assert c.scaling_factor == pytest.approx(0.18215) and c.shift_factor is None
    assert c.vae_scale_factor == 2
    assert vae.dtype == jnp.float32 and not vae.upcast
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.scaling_factor = 1.0
    # single-head mid attention with head size = channels
    att = vae.module.encoder.mid_block.attentions[0]
    assert (att.heads, att.dim_head) == (1, 64)
    # every GroupNorm (resnets, attention, conv_norm_out) uses eps 1e-6 and 32 groups
    norms = [m for _, m in nnx.iter_graph(vae.module) if isinstance(m, nnx.GroupNorm)]
    assert len(norms) == sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules()) == 24
    assert {(n.epsilon, n.num_groups) for n in norms} == {(1e-6, 32)}


def test_decode_matches_torch(tiny):
    model, _, vae = tiny
    z = randn(0, 2, 4, 6, 10)  # batch 2, non-square latents
    with torch.no_grad():
        ref = to_numpy(model.decode(z).sample)
    out = vae.decode(z.numpy())
    assert out.shape == (2, 3, 12, 20) and out.dtype == jnp.float32
    assert_close(out, ref, TOL)
    np.testing.assert_array_equal(vae.decode(z), out)  # a CPU torch tensor works too


def test_encode_matches_torch(tiny):
    model, _, vae = tiny
    x = randn(1, 2, 3, 24, 40)  # batch 2, non-square images
    with torch.no_grad():
        dist = model.encode(x).latent_dist
    post = vae.encode(x.numpy())
    assert isinstance(post, DiagonalGaussian)
    assert post.mean.shape == (2, 4, 12, 20)
    assert_close(post.mean, to_numpy(dist.mean), TOL)
    assert_close(post.logvar, to_numpy(dist.logvar), TOL)
    assert_close(post.std, to_numpy(dist.std), TOL)
    np.testing.assert_array_equal(post.mode(), post.mean)


def test_three_blocks_without_quant_convs_or_attention(three_block):
    model, _, vae = three_block
    assert vae.config.vae_scale_factor == 4
    assert vae.module.quant_conv is None and vae.module.decoder.mid_block.attentions is None
    assert len(vae.module.decoder.up_blocks[0].resnets) == 3
    x, z = randn(2, 1, 3, 16, 24), randn(3, 1, 4, 4, 6)
    with torch.no_grad():
        dist = model.encode(x).latent_dist
        ref = to_numpy(model.decode(z).sample)
    post = vae.encode(x.numpy())
    assert_close(post.mean, to_numpy(dist.mean), TOL)
    assert_close(post.logvar, to_numpy(dist.logvar), TOL)
    out = vae.decode(z.numpy())
    assert out.shape == (1, 3, 16, 24)
    assert_close(out, ref, TOL)


def test_apply_functions_are_pure_and_jittable(tiny):
    _, _, vae = tiny
    z = randn(4, 2, 4, 6, 10).numpy()
    doubled = jax.tree_util.tree_map(lambda p: p * 2, vae.params)

    @jax.jit
    def f(params, latents):
        return vae.apply_decode(params, latents)

    np.testing.assert_allclose(f(vae.params, z), vae.decode(z), rtol=1e-5, atol=1e-5)
    assert rel_err(f(doubled, z), vae.decode(z)) > 0.1  # really uses the params passed


def test_bf16_decode_close(tiny):
    model, folder, _ = tiny
    vae = load_vae(folder, dtype="bf16")
    assert vae.dtype == jnp.bfloat16
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree_util.tree_leaves(vae.params))
    z = randn(0, 2, 4, 6, 10)
    with torch.no_grad():
        ref = to_numpy(model.decode(z).sample)
    out = vae.decode(z.numpy())
    assert out.dtype == jnp.bfloat16
    assert_close(np.asarray(out, np.float32), ref, 3e-2, "bf16")


def test_sample_and_logvar_clamp(tiny):
    _, _, vae = tiny
    x = randn(5, 1, 3, 32, 32).numpy()
    post = vae.encode(x)
    key = jax.random.key(7)
    s = post.sample(key)
    expected = post.mean + post.std * jax.random.normal(key, post.mean.shape, jnp.float32)
    np.testing.assert_allclose(s, expected, rtol=1e-6, atol=1e-6)
    assert not np.allclose(s, post.sample(jax.random.key(8)))
    # the standardised noise is standard normal
    eps = np.asarray((s - post.mean) / post.std)
    assert abs(eps.mean()) < 0.1 and abs(eps.std() - 1.0) < 0.1
    assert post.kl().shape == (1,)

    # push the log-variance half of quant_conv far out: it is clamped to [-30, 20]
    params = jax.tree_util.tree_map(lambda p: p, vae.params)
    bias = params["quant_conv"]["bias"]
    encode = jax.jit(vae.apply_encode)
    for shift, bound in ((1e4, 20.0), (-1e4, -30.0)):
        params["quant_conv"]["bias"] = bias.at[4:].add(shift)
        clamped = encode(params, x)
        np.testing.assert_array_equal(clamped.logvar, np.full(clamped.logvar.shape, bound))
        np.testing.assert_allclose(clamped.mean, post.mean, rtol=1e-5, atol=1e-5)


def test_force_upcast(tiny, tmp_path):
    _, folder, vae32 = tiny
    z = randn(0, 2, 4, 6, 10).numpy()

    def out_dtype(vae):
        return jax.eval_shape(vae.apply_decode, vae.params, z).dtype

    # the saved config has force_upcast=True (diffusers' default): fp16 becomes fp32
    up = load_vae(folder, dtype=jnp.float16)
    assert up.upcast and up.dtype == jnp.float32 and up.param_dtype == jnp.float32
    assert out_dtype(up) == jnp.float32
    assert rel_err(up.decode(z), vae32.decode(z)) < 1e-6
    # ... unless the caller says no
    half = load_vae(folder, dtype="fp16", force_upcast=False)
    assert not half.upcast and half.dtype == jnp.float16 and out_dtype(half) == jnp.float16
    # bf16 is never upcast
    assert load_vae(folder, dtype="bf16").dtype == jnp.bfloat16
    # explicit param_dtype is kept while computing in fp32
    mixed = load_vae(folder, dtype="fp16", param_dtype="fp16")
    assert mixed.dtype == jnp.float32 and mixed.param_dtype == jnp.float16

    no_upcast = copy_folder(folder, tmp_path / "no_upcast", force_upcast=False)
    assert load_vae(no_upcast, dtype="fp16").dtype == jnp.float16
    assert load_vae(no_upcast, dtype="fp16", force_upcast=True).dtype == jnp.float32


def test_pipeline_folder_and_legacy_attention_keys(tiny, tmp_path):
    _, folder, vae = tiny
    pipe = tmp_path / "pipe"
    (pipe / "vae").mkdir(parents=True)
    (pipe / "model_index.json").write_text("{}")
    shutil.copy(folder / "config.json", pipe / "vae" / "config.json")
    legacy = {}
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    n_renamed = 0
    for key, value in load_file(folder / WEIGHTS).items():
        for new, old in names.items():
            marker = f".attentions.0.{new}."
            if marker in key:
                key = key.replace(marker, f".attentions.0.{old}.")
                if value.ndim == 2:  # stored as a 1x1 convolution in old checkpoints
                    value = value[:, :, None, None]
                n_renamed += 1
        legacy[key] = value
    assert n_renamed == 16  # 4 projections x (weight, bias) x (encoder, decoder)
    save_file(legacy, pipe / "vae" / WEIGHTS)
    loaded = load_vae(pipe)
    assert jax.tree_util.tree_structure(loaded.params) == jax.tree_util.tree_structure(vae.params)
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(loaded.params), leaves(vae.params)):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- errors

def test_input_errors(tiny):
    _, _, vae = tiny
    with pytest.raises(ValueError, match=r"4 channels in axis 1.*got shape \(1, 3, 8, 8\)"):
        vae.decode(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="looks like NHWC"):
        vae.decode(np.zeros((1, 8, 8, 4), np.float32))
    with pytest.raises(ValueError, match=r"latents must have shape \[batch, 4, height, width\]"):
        vae.decode(np.zeros((4, 8, 8), np.float32))
    with pytest.raises(ValueError, match="3 channels in axis 1"):
        vae.encode(np.zeros((1, 4, 8, 8), np.float32))
    with pytest.raises(ValueError, match="multiples of 2, got 8x9"):
        vae.encode(np.zeros((1, 3, 8, 9), np.float32))
    with pytest.raises(ValueError, match="float array, got dtype uint8"):
        vae.encode(np.zeros((1, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="4 channels"):  # pure function checks too
        vae.apply_decode(vae.params, jnp.zeros((1, 3, 8, 8)))


def test_loader_argument_errors(tiny):
    _, folder, _ = tiny
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        load_vae(folder, dtype="int8")
    with pytest.raises(ValueError, match="force_upcast must be"):
        load_vae(folder, force_upcast="yes")
    with pytest.raises(ValueError, match="unknown attention implementation"):
        load_vae(folder, attention="flash")


def test_missing_files(tiny, tmp_path):
    _, folder, _ = tiny
    with pytest.raises(CheckpointError, match="neither a local folder nor"):
        load_vae(tmp_path / "does-not-exist")
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        load_vae("retom-jax-tests/no-such-vae-repo")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="has no config.json nor in its vae/ subfolder"):
        load_vae(empty)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(folder / "config.json", no_weights / "config.json")
    with pytest.raises(CheckpointError, match="no weights in"):
        load_vae(no_weights)
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.fp16\.safetensors"):
        load_vae(folder, variant="fp16")


def test_corrupt_weights(tiny, tmp_path):
    _, folder, _ = tiny
    bad = copy_folder(folder, tmp_path / "truncated")
    data = (bad / WEIGHTS).read_bytes()
    (bad / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_vae(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_vae(bad)


def test_config_weight_mismatch(tiny, tmp_path):
    _, folder, _ = tiny
    wide = copy_folder(folder, tmp_path / "wide", block_out_channels=[32, 96])
    with pytest.raises(CheckpointError, match=r"do not fit.*decoder\.conv_in\.weight has shape "
                                              r"\[64, 4, 3, 3\] in the weights, the config "
                                              r"implies \[96, 4, 3, 3\].*and \d+ more"):
        load_vae(wide)
    deeper = copy_folder(folder, tmp_path / "deeper", layers_per_block=2)
    with pytest.raises(CheckpointError,
                       match=r"32 missing key\(s\): decoder\.up_blocks\.0\.resnets\.2\."):
        load_vae(deeper)
    no_attn = copy_folder(folder, tmp_path / "no_attn", mid_block_add_attention=False)
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\):.*mid_block\.attentions\.0"):
        load_vae(no_attn)


@pytest.mark.parametrize("changes, message", [
    ({"_class_name": "UNet2DConditionModel"},
     "describes a UNet2DConditionModel, not an AutoencoderKL"),
    ({"down_block_types": ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]},
     "only DownEncoderBlock2D is implemented"),
    ({"up_block_types": ["UpDecoderBlock2D"]}, "up_block_types has 1 entries"),
    ({"norm_num_groups": 24}, r"\[32, 64\] are not divisible by norm_num_groups=24"),
    ({"act_fn": "gelu"}, "only 'silu'"),
    ({"latent_channels": 0}, "latent_channels must be a positive integer"),
])
def test_bad_config(tiny, tmp_path, changes, message):
    _, folder, _ = tiny
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    with pytest.raises(CheckpointError, match=message):
        VAEConfig.from_dict(cfg)
