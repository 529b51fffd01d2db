"""UNet parity with diffusers' torch UNet2DConditionModel, loading, and input checks."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from retom_jax import CheckpointError
from retom_jax.models.unet import UNetConfig, load_unet
from tests.tiny import FAMILIES, SDXL_TEXT_EMBEDS, torch_unet
from tests.util import assert_close, rel_err

TOL = 1e-5  # float32: measured 1.1e-6 to 1.5e-6


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One saved tiny checkpoint and its torch model per family."""
    out = {}
    for name, cfg in FAMILIES.items():
        model = torch_unet(cfg)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (model, folder)
    return out


def inputs(name, batch, h, w, seed=0, tokens=7):
    rng = np.random.RandomState(seed)
    cross = FAMILIES[name]["cross_attention_dim"]
    x = rng.randn(batch, 4, h, w).astype(np.float32)
    ehs = rng.randn(batch, tokens, cross).astype(np.float32)
    t = rng.randint(0, 1000, size=batch)
    added = None
    if name == "sdxl":
        added = {"text_embeds": rng.randn(batch, SDXL_TEXT_EMBEDS).astype(np.float32),
                 "time_ids": np.tile(np.array([[h * 8, w * 8, 0, 0, h * 8, w * 8]], np.float32),
                                     (batch, 1)) + rng.randint(0, 3, (batch, 6))}
    return x, t, ehs, added


def torch_out(model, x, t, ehs, added):
    kw = {}
    if added is not None:
        kw["added_cond_kwargs"] = {k: torch.from_numpy(np.asarray(v, np.float32))
                                   for k, v in added.items()}
    with torch.no_grad():
        return model(torch.from_numpy(x), torch.from_numpy(np.asarray(t)),
                     torch.from_numpy(ehs), **kw).sample.numpy()


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("batch,h,w", [(2, 16, 16), (1, 8, 12), (3, 12, 8)])
def test_parity_fp32(checkpoints, name, batch, h, w):
    model, folder = checkpoints[name]
    unet = load_unet(folder)
    x, t, ehs, added = inputs(name, batch, h, w)
    out = unet(x, t, ehs, added).sample
    assert out.shape == (batch, 4, h, w) and out.dtype == jnp.float32
    assert_close(out, torch_out(model, x, t, ehs, added), TOL)


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_latent_not_divisible_by_upsampling(checkpoints, name):
    """Odd latent sizes make diffusers forward explicit upsample sizes."""
    model, folder = checkpoints[name]
    x, t, ehs, added = inputs(name, 2, 13, 10)
    assert_close(load_unet(folder)(x, t, ehs, added).sample, torch_out(model, x, t, ehs, added), TOL)


def test_scalar_timestep_broadcasts(checkpoints):
    model, folder = checkpoints["sd1"]
    x, _, ehs, _ = inputs("sd1", 2, 8, 8)
    assert_close(load_unet(folder)(x, 321, ehs).sample, torch_out(model, x, np.array(321), ehs, None),
                 TOL)


def test_norm_eps_match_diffusers(checkpoints):
    """Every GroupNorm and LayerNorm has diffusers' epsilon, module by module (the
    transformer blocks' LayerNorms use 1e-5, their GroupNorm 1e-6, the resnets norm_eps)."""
    for name, (model, folder) in checkpoints.items():
        unet = load_unet(folder)
        module = nnx.merge(unet.graphdef, unet.params)
        seen = 0
        for path, node in nnx.iter_graph(module):
            if isinstance(node, (nnx.LayerNorm, nnx.GroupNorm)):
                ref = model.get_submodule(".".join(str(p) for p in path))
                assert node.epsilon == ref.eps, (name, path, node.epsilon, ref.eps)
                seen += 1
        assert seen == sum(isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm))
                           for m in model.modules())


def test_transformer_block_small_activations(checkpoints):
    """proj_in scaled down 1000x: the transformer blocks' LayerNorms see activations of
    variance ~1e-6, where their epsilon (1e-5) matters; the UNet must still match."""
    import copy

    model, folder = checkpoints["sd1"]
    small = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in small.named_parameters():
            if ".proj_in." in n:
                p.mul_(1e-3)
    unet = load_unet(folder)
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: v * 1e-3 if "'proj_in'" in jax.tree_util.keystr(path) else v,
        unet.params)
    x, t, ehs, _ = inputs("sd1", 1, 8, 8)
    out = unet._jitted(params, x, t, ehs, None).sample
    ref = torch_out(small, x, t, ehs, None)
    assert_close(out, ref, TOL)
    assert rel_err(ref, torch_out(model, x, t, ehs, None)) > 1e-3  # the scaling mattered


@pytest.mark.parametrize("dtype,tol", [("bfloat16", 3e-2), ("float16", 5e-3)])
def test_half_precision_stays_close(checkpoints, dtype, tol):
    model, folder = checkpoints["sd2"]
    unet = load_unet(folder, dtype=dtype)
    assert all(p.dtype == jnp.dtype(dtype) for p in jax.tree_util.tree_leaves(unet.params))
    x, t, ehs, _ = inputs("sd2", 2, 8, 8)
    out = unet(x, t, ehs).sample
    assert out.dtype == jnp.dtype(dtype)
    assert_close(out, torch_out(model, x, t, ehs, None), tol, dtype)


def test_bf16_activations_fp32_params(checkpoints):
    _, folder = checkpoints["sd1"]
    unet = load_unet(folder, dtype="bf16", param_dtype="fp32")
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(unet.params))
    x, t, ehs, _ = inputs("sd1", 1, 8, 8)
    assert unet(x, t, ehs).sample.dtype == jnp.bfloat16


def test_one_compilation_serves_all_timesteps(checkpoints):
    _, folder = checkpoints["sd1"]
    unet = load_unet(folder)
    x, _, ehs, _ = inputs("sd1", 2, 8, 8)
    outs = [unet(x, np.array([t, t]), ehs).sample for t in (999, 500, 1)]
    assert unet._jitted._cache_size() == 1
    assert rel_err(outs[0], outs[2]) > 1e-3  # the timestep really changes the output


def test_apply_is_pure_under_user_jit(checkpoints):
    model, folder = checkpoints["sdxl"]
    unet = load_unet(folder)
    x, t, ehs, added = inputs("sdxl", 2, 8, 8)
    out = jax.jit(unet.apply)(unet.params, x, t, ehs, added).sample
    assert_close(out, torch_out(model, x, t, ehs, added), TOL)


# ---------------------------------------------------------------- loading

def test_pipeline_folder_variant_and_shards(checkpoints, tmp_path):
    model, folder = checkpoints["sd1"]
    x, t, ehs, _ = inputs("sd1", 1, 8, 8)
    ref = torch_out(model, x, t, ehs, None)
    # a pipeline folder: the unet/ subfolder is used
    shutil.copytree(folder, tmp_path / "pipe" / "unet")
    assert_close(load_unet(tmp_path / "pipe")(x, t, ehs).sample, ref, TOL)
    # an fp16 variant alone
    model.save_pretrained(tmp_path / "fp16", variant="fp16")
    assert_close(load_unet(tmp_path / "fp16", variant="fp16")(x, t, ehs).sample, ref, TOL)
    assert_close(load_unet(tmp_path / "fp16")(x, t, ehs).sample, ref, TOL)
    # sharded weights behind an index
    model.save_pretrained(tmp_path / "shards", max_shard_size="100KB")
    assert (tmp_path / "shards" / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert_close(load_unet(tmp_path / "shards")(x, t, ehs).sample, ref, TOL)


def test_bf16_checkpoint(checkpoints, tmp_path):
    """Weights stored as BF16 (read without torch through ml_dtypes) load exactly."""
    model, _ = checkpoints["sd1"]
    half = torch_unet(FAMILIES["sd1"]).to(torch.bfloat16)
    half.save_pretrained(tmp_path / "bf16")
    reference = torch_unet(FAMILIES["sd1"]).float()
    reference.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    x, t, ehs, _ = inputs("sd1", 1, 8, 8)
    out = load_unet(tmp_path / "bf16")(x, t, ehs).sample
    assert_close(out, torch_out(reference.eval(), x, t, ehs, None), TOL)
    assert rel_err(out, torch_out(model, x, t, ehs, None)) > 1e-4  # bf16 rounding is visible


def test_repo_id_from_local_cache(checkpoints, tmp_path, monkeypatch):
    _, folder = checkpoints["sd1"]
    snap = tmp_path / "hub" / "models--someone--tiny-sd" / "snapshots" / "abc123"
    shutil.copytree(folder, snap / "unet")
    (tmp_path / "hub" / "models--someone--tiny-sd" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-sd" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert load_unet("someone/tiny-sd").config.block_out_channels == (32, 64)
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache.*hf download"):
        load_unet("someone/not-there")


def copy(folder, dst):
    shutil.copytree(folder, dst)
    return dst


def test_missing_things(checkpoints, tmp_path):
    _, folder = checkpoints["sd1"]
    with pytest.raises(CheckpointError, match="neither a local folder nor"):
        load_unet(tmp_path / "nope" / "deeper")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_unet(tmp_path / "empty")
    d = copy(folder, tmp_path / "noweights")
    (d / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights in"):
        load_unet(d)
    (d / "diffusion_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="PyTorch pickles"):
        load_unet(d)


def test_corrupt_safetensors(checkpoints, tmp_path):
    _, folder = checkpoints["sd1"]
    d = copy(folder, tmp_path / "trunc")
    f = d / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_unet(d)
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_unet(d)
    f.write_bytes(b"\x01")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_unet(d)


def _rewrite(path, edit):
    from safetensors.numpy import load_file, save_file
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_key_errors_name_the_key(checkpoints, tmp_path):
    _, folder = checkpoints["sd1"]
    key = "down_blocks.0.attentions.0.proj_in.weight"
    d = copy(folder, tmp_path / "extra")
    _rewrite(d / "diffusion_pytorch_model.safetensors",
             lambda t: t.update({"foo.bar.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\): foo\.bar\.weight"):
        load_unet(d)
    d = copy(folder, tmp_path / "missing")
    _rewrite(d / "diffusion_pytorch_model.safetensors", lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): " + key.replace(".", r"\.")):
        load_unet(d)
    d = copy(folder, tmp_path / "shape")
    _rewrite(d / "diffusion_pytorch_model.safetensors",
             lambda t: t.update({key: np.zeros((32, 31, 1, 1), np.float32)}))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.") + r" has shape \[32, 31, 1, 1\]"):
        load_unet(d)


def test_config_that_does_not_match_weights(checkpoints, tmp_path):
    _, folder = checkpoints["sd1"]
    d = copy(folder, tmp_path / "mismatch")
    cfg = json.loads((d / "config.json").read_text())
    cfg["cross_attention_dim"] = 16
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not fit the model built from its config.json.*attn2.to_k"):
        load_unet(d)


def test_unsupported_config_options(checkpoints, tmp_path):
    _, folder = checkpoints["sd1"]
    for key, value, msg in [("class_embed_type", "timestep", "class_embed_type"),
                            ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"],
                             "SimpleCrossAttnDownBlock2D"),
                            ("addition_embed_type", "image", "addition_embed_type"),
                            ("_class_name", "UNet2DModel", "not a UNet2DConditionModel")]:
        d = copy(folder, tmp_path / key)
        cfg = json.loads((d / "config.json").read_text())
        cfg[key] = value
        (d / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=msg):
            load_unet(d)
    with pytest.raises(ValueError, match="unsupported dtype"):
        load_unet(folder, dtype="int8")
    with pytest.raises(ValueError, match="unknown attention implementation"):
        load_unet(folder, attention="flash3")


def test_config_reads_head_counts():
    from tests.tiny import SD1, SD2
    assert UNetConfig.from_dict(SD1).num_attention_heads == (4, 4)
    assert UNetConfig.from_dict(SD2).num_attention_heads == (2, 4, 4)
    assert UNetConfig.from_dict({**SD2, "num_attention_heads": 2}).num_attention_heads == (2, 2, 2)


# ---------------------------------------------------------------- call checks

def test_bad_inputs_fail_before_compiling(checkpoints):
    _, folder = checkpoints["sd1"]
    unet = load_unet(folder)
    x, t, ehs, _ = inputs("sd1", 2, 8, 8)
    with pytest.raises(ValueError, match="sample must be NCHW"):
        unet(x[0], t, ehs)
    with pytest.raises(ValueError, match="has 3 channels"):
        unet(x[:, :3], t, ehs)
    with pytest.raises(ValueError, match=r"encoder_hidden_states must be \[batch, tokens, 24\]"):
        unet(x, t, ehs[..., :8])
    with pytest.raises(ValueError, match="encoder_hidden_states has batch 1"):
        unet(x, t, ehs[:1])
    with pytest.raises(ValueError, match="timesteps must be a scalar"):
        unet(x, np.arange(3), ehs)
    assert unet._jitted._cache_size() == 0


def test_sdxl_needs_added_cond(checkpoints):
    _, folder = checkpoints["sdxl"]
    unet = load_unet(folder)
    x, t, ehs, added = inputs("sdxl", 2, 8, 8)
    with pytest.raises(ValueError, match="SDXL UNet: pass added_cond_kwargs"):
        unet(x, t, ehs)
    with pytest.raises(ValueError, match=r"text_embeds'\] must be \[2, 16\]"):
        unet(x, t, ehs, {**added, "text_embeds": added["text_embeds"][:, :8]})
