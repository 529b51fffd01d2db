"""Flux transformer: parity with diffusers' FluxTransformer2DModel (dev and schnell
shapes, tiny random configs), loading, input checks, and token merging in the joint
blocks against a torch reference built from diffusers' own submodules with the same plan.
"""
import copy
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel
from diffusers.models.embeddings import apply_rotary_emb

from retom_jax import CheckpointError, ReToM, ToDo, ToMe
from retom_jax.models.flux import image_ids, load_flux_transformer
from tests.test_merge import closure_vars
from tests.util import assert_close, rel_err

TOL = 1e-5  # float32: measured 2e-7 to 1e-6

TINY = dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
            pooled_projection_dim=12, axes_dims_rope=(4, 6, 6))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``{"dev": (torch model, folder), "schnell": ...}`` (dev has the guidance embedder)."""
    out = {}
    for name, guidance in (("schnell", False), ("dev", True)):
        torch.manual_seed(0)
        model = FluxTransformer2DModel(**TINY, guidance_embeds=guidance).eval()
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (model, folder)
    return out


def inputs(b, h, w, t=5, guidance=True, seed=0):
    rng = np.random.RandomState(seed)
    return dict(hidden_states=rng.randn(b, h * w, 8).astype(np.float32),
                encoder_hidden_states=rng.randn(b, t, 24).astype(np.float32),
                pooled_projections=rng.randn(b, 12).astype(np.float32),
                timestep=rng.uniform(0.1, 1.0, b).astype(np.float32),
                img_ids=image_ids(h, w), txt_ids=np.zeros((t, 3), np.float32),
                guidance=rng.uniform(1, 5, b).astype(np.float32) if guidance else None)


def torch_out(model, args):
    kw = {k: None if v is None else torch.from_numpy(v) for k, v in args.items()}
    with torch.no_grad():
        return model(**kw).sample.numpy()


def jax_args(args):
    return [None if v is None else jnp.asarray(v) for v in args.values()]


@pytest.mark.parametrize("name,b,h,w", [("dev", 2, 4, 6), ("schnell", 1, 5, 5)])
def test_parity_fp32(models, name, b, h, w):
    model, folder = models[name]
    flux = load_flux_transformer(folder)
    args = inputs(b, h, w, guidance=name == "dev")
    out = flux(*jax_args(args), grid=(h, w)).sample
    assert out.shape == (b, h * w, 8)
    assert_close(out, torch_out(model, args), TOL)


def test_bf16_and_fp16_variant(models, tmp_path):
    model, folder = models["schnell"]
    copy.deepcopy(model).half().save_pretrained(tmp_path, variant="fp16")
    flux = load_flux_transformer(tmp_path, dtype="bf16", param_dtype="float32", variant="fp16")
    args = inputs(1, 4, 4, guidance=False)
    out = flux(*jax_args(args)).sample
    assert out.dtype == jnp.bfloat16
    assert rel_err(np.asarray(out, np.float32), torch_out(model, args)) < 5e-2


def test_loading_errors(models, tmp_path):
    _, folder = models["dev"]
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_layers"] = 3
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing key.*transformer_blocks.2"):
        load_flux_transformer(bad)
    cfg["_class_name"] = "SD3Transformer2DModel"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not a FluxTransformer2DModel"):
        load_flux_transformer(bad)


def test_input_checks(models):
    flux = load_flux_transformer(models["dev"][1])
    args = inputs(2, 4, 4)
    a = jax_args(args)
    with pytest.raises(ValueError, match="pass guidance"):
        flux(*a[:-1])
    with pytest.raises(ValueError, match="not a square grid"):
        flux(*jax_args(inputs(1, 2, 3)), merge=ReToM())
    with pytest.raises(ValueError, match="grid 3x3 has 9 cells"):
        flux(*a, grid=(3, 3))
    with pytest.raises(ValueError, match="hidden_states must be"):
        flux(a[0][..., :4], *a[1:])


# --------------------------------------------------------------------------- merging


def t_merge(x, plan):
    out = []
    for b in range(x.shape[0]):
        acc = x[b][plan.out_pos[b]].clone()
        acc.index_add_(0, plan.merged_slot[b], x[b][plan.merged_pos[b]])
        out.append(acc / plan.count[b][:, None].to(x.dtype))
    return torch.stack(out)


def t_unmerge(y, plan):
    return torch.stack([y[b][plan.slot_of[b]] for b in range(y.shape[0])])


def t_pool(x, grid, factor, method):
    b, n, c = x.shape
    g = x.transpose(1, 2).reshape(b, c, *grid)
    small = F.interpolate(g, size=(grid[0] // factor, grid[1] // factor),
                          mode="nearest" if method == "nearest" else "area")
    return small.flatten(2).transpose(1, 2)


class TorchMerge:
    """What a block does in the torch reference: from the JAX method's plan (computed on
    the torch block's own input tokens), merge/unmerge done in torch by the plan's
    indices; ToDo pools in torch."""

    def __init__(self, method, tokens, grid, cache, use_cache):
        self.kind, self.plan, self.grid, self.method = None, None, grid, method
        if isinstance(method, ToDo):
            self.kind = "todo"
            return
        bm, self.new_cache = method.for_block(jnp.asarray(tokens.numpy()), grid, 1, None,
                                              cache, use_cache)
        fn = bm.attn[0] if bm.attn[0].__closure__ else bm.mlp[0]
        plan = closure_vars(fn)["plan"]
        self.plan = type(plan)(*(torch.from_numpy(np.array(a)).long() for a in plan))
        self.kind = "merge"

    def m(self, x, on=True):
        return t_merge(x, self.plan) if self.kind == "merge" and on else x

    def u(self, x, on=True):
        return t_unmerge(x, self.plan) if self.kind == "merge" and on else x

    def kv(self, x):
        if self.kind != "todo":
            return None
        return t_pool(x, self.grid, self.method.factor, self.method.method)


def t_rope(model, txt_ids, img_ids_b):
    """Per batch element cos/sin of ``txt + image`` ids, with diffusers' FluxPosEmbed."""
    return [model.pos_embed(torch.cat([txt_ids, ids], 0)) for ids in img_ids_b]


def t_attention(attn, txt, img_q, img_kv, rope_q, rope_k, added):
    heads = lambda t: t.unflatten(-1, (-1, attn.head_dim))  # noqa: E731
    if added:
        tq, tk, tv = (attn.norm_added_q(heads(attn.add_q_proj(txt))),
                      attn.norm_added_k(heads(attn.add_k_proj(txt))), heads(attn.add_v_proj(txt)))
    else:
        tq, tk, tv = (attn.norm_q(heads(attn.to_q(txt))), attn.norm_k(heads(attn.to_k(txt))),
                      heads(attn.to_v(txt)))
    q = torch.cat([tq, attn.norm_q(heads(attn.to_q(img_q)))], 1)
    k = torch.cat([tk, attn.norm_k(heads(attn.to_k(img_kv)))], 1)
    v = torch.cat([tv, heads(attn.to_v(img_kv))], 1)
    q = torch.cat([apply_rotary_emb(q[i:i + 1], rope_q[i], sequence_dim=1)
                   for i in range(q.shape[0])])
    k = torch.cat([apply_rotary_emb(k[i:i + 1], rope_k[i], sequence_dim=1)
                   for i in range(k.shape[0])])
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)


def torch_merged(model, args, method, grid, state=None):
    """diffusers' Flux transformer run block by block from its own submodules, with the
    image tokens merged by ``method``'s plans. Returns (output, {path: new cache})."""
    a = {k: None if v is None else torch.from_numpy(v) for k, v in args.items()}
    flags = (getattr(method, "merge_attn", True), getattr(method, "merge_mlp", False))
    caches = {}
    with torch.no_grad():
        x = model.x_embedder(a["hidden_states"])
        t = a["timestep"] * 1000
        temb = (model.time_text_embed(t, a["guidance"] * 1000, a["pooled_projections"])
                if a["guidance"] is not None else model.time_text_embed(t, a["pooled_projections"]))
        c = model.context_embedder(a["encoder_hidden_states"])
        B, T = x.shape[0], c.shape[1]
        ids = a["img_ids"][None].expand(B, -1, -1)
        blocks = [(f"transformer_blocks.{i}", blk) for i, blk in enumerate(model.transformer_blocks)]
        blocks += [(f"single_transformer_blocks.{i}", blk)
                   for i, blk in enumerate(model.single_transformer_blocks)]
        for path, blk in blocks:
            cache = use = None
            if state is not None:
                cache, use = state["blocks"][path], method.use_cache(state["step"])
            tm = TorchMerge(method, x, grid, cache, use)
            if tm.kind == "merge" and getattr(tm, "new_cache", None) is not None:
                caches[path] = tm.new_cache
            ids_q = tm.m(ids, flags[0])
            ids_k = tm.kv(ids) if tm.kind == "todo" else ids_q
            rope_q, rope_k = t_rope(model, a["txt_ids"], ids_q), t_rope(model, a["txt_ids"], ids_k)
            if path.startswith("transformer"):
                nx, gate, shift2, scale2, gate2 = blk.norm1(x, emb=temb)
                nc, c_gate, c_shift2, c_scale2, c_gate2 = blk.norm1_context(c, emb=temb)
                hq = tm.m(nx, flags[0])
                hk = tm.kv(nx) if tm.kind == "todo" else hq
                out = t_attention(blk.attn, nc, hq, hk, rope_q, rope_k, added=True)
                x = x + gate[:, None] * tm.u(blk.attn.to_out[0](out[:, T:]), flags[0])
                c = c + c_gate[:, None] * blk.attn.to_add_out(out[:, :T])
                n2 = blk.norm2(x) * (1 + scale2[:, None]) + shift2[:, None]
                x = x + gate2[:, None] * tm.u(blk.ff(tm.m(n2, flags[1])), flags[1])
                n2c = blk.norm2_context(c) * (1 + c_scale2[:, None]) + c_shift2[:, None]
                c = c + c_gate2[:, None] * blk.ff_context(n2c)
            else:
                n, gate = blk.norm(torch.cat([c, x], 1), emb=temb)
                nc, nx = n[:, :T], n[:, T:]
                hq = tm.m(nx, flags[0])
                hk = tm.kv(nx) if tm.kind == "todo" else hq
                out = t_attention(blk.attn, nc, hq, hk, rope_q, rope_k, added=False)
                mlp = lambda h: blk.act_mlp(blk.proj_mlp(h))  # noqa: E731
                c_out = blk.proj_out(torch.cat([out[:, :T], mlp(nc)], -1))
                x_out = blk.proj_out(torch.cat([tm.u(out[:, T:], flags[0]),
                                                tm.u(mlp(tm.m(nx, flags[1])), flags[1])], -1))
                x, c = x + gate[:, None] * x_out, c + gate[:, None] * c_out
        x = model.norm_out(x, temb)
        return model.proj_out(x).numpy(), caches


@pytest.mark.parametrize("method", [
    ReToM(ratio=0.5, window=(2, 2), merge_mlp=True),
    ToMe(ratio=0.5, use_rand=False),
    ToMe(ratio=0.3, use_rand=False, merge_attn=False, merge_mlp=True),
    ToDo(factor=2, method="avg"),
], ids=["retom-mlp", "tome", "tome-mlp-only", "todo-avg"])
def test_merged_equals_torch_reference(models, method):
    model, folder = models["dev"]
    flux = load_flux_transformer(folder)
    grid = (6, 8)
    args = inputs(2, *grid, seed=1)
    ref, _ = torch_merged(model, args, method, grid)
    out = flux(*jax_args(args), merge=method, grid=grid).sample
    assert_close(out, ref, TOL)
    assert rel_err(ref, torch_out(model, args)) > 1e-3  # merging changed the output


def test_ratio_zero_is_the_plain_transformer(models):
    model, folder = models["schnell"]
    flux = load_flux_transformer(folder)
    args = inputs(2, 4, 4, guidance=False)
    out = flux(*jax_args(args), merge=ReToM(ratio=0.0)).sample
    assert_close(out, torch_out(model, args), TOL)


def test_retom_cache_across_steps(models):
    """ReToM(cache_step=0): the second call reuses the first call's representatives in
    every block (keyed by block path), within one compiled program."""
    model, folder = models["dev"]
    flux = load_flux_transformer(folder)
    grid, method = (4, 6), ReToM(ratio=0.5, window=(2, 2), cache_step=0, merge_mlp=True)
    first, second = inputs(2, *grid, seed=2), inputs(2, *grid, seed=3)
    state = flux.init_merge_state(first["hidden_states"].shape,
                                  first["encoder_hidden_states"].shape, method, grid=grid)
    assert set(state["blocks"]) == {"transformer_blocks.0", "transformer_blocks.1",
                                    "single_transformer_blocks.0", "single_transformer_blocks.1"}
    out1 = flux(*jax_args(first), merge=method, merge_state=state, grid=grid)
    ref1, _ = torch_merged(model, first, method, grid, state)
    assert_close(out1.sample, ref1, TOL)
    compiled = flux._jitted._cache_size()
    out2 = flux(*jax_args(second), merge=method, merge_state=out1.merge_state,
                grid=grid)
    assert flux._jitted._cache_size() == compiled
    ref2, _ = torch_merged(model, second, method, grid, out1.merge_state)
    assert_close(out2.sample, ref2, TOL)
    for path, cache in out2.merge_state["blocks"].items():  # reused, not re-selected
        np.testing.assert_array_equal(cache["representatives"],
                                      out1.merge_state["blocks"][path]["representatives"])
    fresh, _ = torch_merged(model, second, ReToM(ratio=0.5, window=(2, 2), merge_mlp=True), grid)
    assert rel_err(ref2, fresh) > 1e-4  # the cache made a difference
