"""SD3 / SD3.5 transformer (MMDiT): parity with diffusers' SD3Transformer2DModel on tiny
random configs (SD3.0; SD3.5 with qk-norm and a dual-attention layer), and merging of the
image tokens against a torch reference built from diffusers' own submodules with the same
plan."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel

from retom_jax import ReToM, ToDo, ToMe
from retom_jax.models.sd3 import load_sd3_transformer
from tests.test_flux import TorchMerge
from tests.util import assert_close, rel_err

TOL = 1e-5  # float32: measured 2e-7 to 3e-7

TINY = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
            pooled_projection_dim=10, out_channels=4, pos_embed_max_size=12)
VARIANTS = {"sd3": {}, "sd35": dict(dual_attention_layers=(0, 1), qk_norm="rms_norm")}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for name, extra in VARIANTS.items():
        torch.manual_seed(0)
        model = SD3Transformer2DModel(**TINY, **extra).eval()
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (model, load_sd3_transformer(folder))
    return out


def inputs(b, h, w, seed=0):
    rng = np.random.RandomState(seed)
    return (rng.randn(b, 4, h, w).astype(np.float32), rng.randn(b, 5, 12).astype(np.float32),
            rng.randn(b, 10).astype(np.float32), rng.uniform(1, 999, b).astype(np.float32))


def torch_out(model, args):
    with torch.no_grad():
        return model(*(torch.from_numpy(a) for a in args)).sample.numpy()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parity_fp32(models, name):
    model, sd3 = models[name]
    args = inputs(2, 8, 12)
    assert_close(sd3(*args).sample, torch_out(model, args), TOL)


def t_attn(attn, hq, hk, text):
    """diffusers' JointAttnProcessor2_0 on separate image queries / keys (image first)."""
    heads = lambda t: t.unflatten(-1, (attn.heads, -1))  # noqa: E731
    norm = lambda n, t: t if n is None else n(t)  # noqa: E731
    q, k, v = norm(attn.norm_q, heads(attn.to_q(hq))), norm(attn.norm_k, heads(attn.to_k(hk))), heads(attn.to_v(hk))
    m = q.shape[1]
    if text is not None:
        q = torch.cat([q, norm(attn.norm_added_q, heads(attn.add_q_proj(text)))], 1)
        k = torch.cat([k, norm(attn.norm_added_k, heads(attn.add_k_proj(text)))], 1)
        v = torch.cat([v, heads(attn.add_v_proj(text))], 1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    out = out.transpose(1, 2).flatten(2)
    img = attn.to_out[0](out[:, :m])
    txt = attn.to_add_out(out[:, m:]) if text is not None and attn.to_add_out is not None else None
    return img, txt


def torch_merged(model, args, method):
    s, e, p, t = (torch.from_numpy(a) for a in args)
    flags = (getattr(method, "merge_attn", True), getattr(method, "merge_mlp", False))
    grid = (s.shape[2] // 2, s.shape[3] // 2)
    with torch.no_grad():
        x = model.pos_embed(s)
        temb = model.time_text_embed(t, p)
        c = model.context_embedder(e)
        for blk in model.transformer_blocks:
            tm = TorchMerge(method, x, grid, None, False)
            kv = lambda h: tm.kv(h) if tm.kind == "todo" else tm.m(h, flags[0])  # noqa: E731
            if blk.use_dual_attention:
                nx, gate, shift2, scale2, gate2, nx2, gate3 = blk.norm1(x, emb=temb)
            else:
                nx, gate, shift2, scale2, gate2 = blk.norm1(x, emb=temb)
            if blk.context_pre_only:
                nc = blk.norm1_context(c, temb)
            else:
                nc, c_gate, c_shift2, c_scale2, c_gate2 = blk.norm1_context(c, emb=temb)
            img, txt = t_attn(blk.attn, tm.m(nx, flags[0]), kv(nx), nc)
            x = x + gate[:, None] * tm.u(img, flags[0])
            if blk.use_dual_attention:
                img2, _ = t_attn(blk.attn2, tm.m(nx2, flags[0]), kv(nx2), None)
                x = x + gate3[:, None] * tm.u(img2, flags[0])
            n2 = blk.norm2(x) * (1 + scale2[:, None]) + shift2[:, None]
            x = x + gate2[:, None] * tm.u(blk.ff(tm.m(n2, flags[1])), flags[1])
            if not blk.context_pre_only:
                c = c + c_gate[:, None] * txt
                n2c = blk.norm2_context(c) * (1 + c_scale2[:, None]) + c_shift2[:, None]
                c = c + c_gate2[:, None] * blk.ff_context(n2c)
        x = model.proj_out(model.norm_out(x, temb))
        b, (h, w) = x.shape[0], grid
        x = x.reshape(b, h, w, 2, 2, -1)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(b, -1, h * 2, w * 2).numpy()


@pytest.mark.parametrize("method", [
    ReToM(ratio=0.5, window=(2, 2), merge_mlp=True),
    ToMe(ratio=0.5, use_rand=False),
    ToDo(factor=2, method="nearest"),
], ids=["retom-mlp", "tome", "todo"])
def test_merged_equals_torch_reference(models, method):
    model, sd3 = models["sd35"]
    args = inputs(2, 12, 16, seed=1)
    ref = torch_merged(model, args, method)
    assert_close(sd3(*args, merge=method).sample, ref, TOL)
    assert rel_err(ref, torch_out(model, args)) > 1e-3
