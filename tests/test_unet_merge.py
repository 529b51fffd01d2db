"""Token merging inside the UNet: placement and semantics against torch references.

- ToMe equals diffusers' UNet patched by tomesd itself.
- ReToM is placed where tomesd places merging: tomesd's patched UNet, with its matching
  function swapped for ReToM's plan, equals our UNet with ReToM. (ReToM's plans are tested
  against a NumPy reference in test_merge.py.)
- ToDo equals diffusers' UNet whose self-attention keys/values are pooled by torch.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tomesd
import torch
import torch.nn.functional as F

from retom_jax import ReToM, ToDo, ToMe, load_unet
from retom_jax.merge.interface import BlockMerge, MergeMethod
from retom_jax.merge.algorithms import (plan_functions, retom_plan, retom_representatives,
                                        tome_plan)
from tests.test_unet import inputs, torch_out
from tests.tiny import FAMILIES, torch_unet
from tests.test_merge import closure_vars
from tests.util import assert_close, feed_tomesd_destinations, rel_err, swap_in_retom

TOL = 1e-5  # float32: measured ~1.3e-6


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for name in ("sd1", "sd2", "sdxl"):
        model = torch_unet(FAMILIES[name])
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (model, load_unet(folder))
    return out


def tomesd_out(model, args, **patch):
    tomesd.apply_patch(model, **patch)
    try:
        return torch_out(model, *args)
    finally:
        tomesd.remove_patch(model)


@pytest.mark.parametrize("name,ratio,max_downsample,branches", [
    ("sd1", 0.5, 1, (True, True, True)),    # every branch merged
    ("sd2", 0.3, 1, (True, False, False)),
    ("sd2", 0.75, 2, (True, False, False)),  # two levels merged
    ("sdxl", 0.5, 2, (True, False, False)),  # SDXL's first attention level is at downsample 2
])
def test_tome_equals_tomesd(models, name, ratio, max_downsample, branches):
    model, unet = models[name]
    args = inputs(name, 2, 13, 10)  # 13 rows: not divisible by the 2x2 stride
    flags = dict(merge_attn=branches[0], merge_crossattn=branches[1], merge_mlp=branches[2])
    ref = tomesd_out(model, args, ratio=ratio, max_downsample=max_downsample, use_rand=False,
                     **flags)
    out = unet(*args, merge=ToMe(ratio=ratio, max_downsample=max_downsample, use_rand=False,
                                 **flags)).sample
    assert_close(out, ref, TOL)
    assert rel_err(ref, torch_out(model, *args)) > 1e-2  # merging really changed the output


def test_tome_default_merges_nothing_on_sdxl(models):
    model, unet = models["sdxl"]
    args = inputs("sdxl", 2, 8, 8)
    out = unet(*args, merge=ToMe(use_rand=False)).sample
    assert_close(out, torch_out(model, *args), TOL)


def test_tome_random_destinations_use_the_key(models):
    _, unet = models["sd1"]
    args = inputs("sd1", 2, 8, 8)
    a = unet(*args, merge=ToMe(), key=jax.random.key(0)).sample
    compiled = unet._jitted._cache_size()
    b = unet(*args, merge=ToMe(), key=jax.random.key(0)).sample
    c = unet(*args, merge=ToMe(), key=jax.random.key(1)).sample
    assert unet._jitted._cache_size() == compiled  # a new key is data, not a new program
    np.testing.assert_array_equal(a, b)
    assert rel_err(a, c) > 1e-4
    with pytest.raises(ValueError, match="pass key="):
        unet(*args, merge=ToMe())


@pytest.mark.parametrize("name,ratio,max_downsample", [("sd1", 0.5, 1), ("sd2", 0.6, 2)])
def test_tome_random_equals_tomesd(models, monkeypatch, name, ratio, max_downsample):
    """Random destinations (the default): tomesd, fed the cells our keys draw (block k of
    the UNet draws from fold_in(key, k)), equals our UNet."""
    model, unet = models[name]
    args = inputs(name, 2, 13, 10)
    key = jax.random.key(3)
    tomesd.apply_patch(model, ratio=ratio, max_downsample=max_downsample, use_rand=True)
    try:
        drawn = feed_tomesd_destinations(monkeypatch, model,
                                         lambda call, block: jax.random.fold_in(key, block))
        ref = torch_out(model, *args)
    finally:
        tomesd.remove_patch(model)
    assert drawn and len({b for _, b in drawn}) == len(drawn)  # one draw per merging block
    out = unet(*args, merge=ToMe(ratio=ratio, max_downsample=max_downsample), key=key).sample
    assert rel_err(out, ref) <= 1e-5
    fixed = unet(*args, merge=ToMe(ratio=ratio, max_downsample=max_downsample,
                      use_rand=False)).sample
    assert rel_err(fixed, ref) > 1e-3  # the draws matter


def test_tome_blocks_draw_distinct_destinations():
    """Each transformer block of a UNet call draws its own destinations from the call's key
    (the same draw everywhere would merge the same cells in every block)."""
    from retom_jax.models.unet import MergeContext

    x = jnp.asarray(np.random.RandomState(0).randn(2, 64, 8), jnp.float32)
    blocks = [object() for _ in range(5)]
    paths = {id(b): str(i) for i, b in enumerate(blocks)}
    ctx = MergeContext(ToMe(ratio=0.5), (8, 8), paths, key=jax.random.key(0))
    dsts = []
    for block in blocks:
        plan = closure_vars(ctx.block(block, x, (8, 8)).attn[0])["plan"]
        dsts.append(tuple(np.sort(np.asarray(plan.out_pos[0, -16:]))))
    assert len(set(dsts)) == 5, dsts


@pytest.mark.parametrize("name,cfg", [
    ("sd2", ReToM(ratio=0.5, window=(2, 2), matching="local", max_downsample=2)),
    ("sd1", ReToM(ratio=0.6, window=(2, 3), matching="global", merge_mlp=True)),
    ("sdxl", ReToM(ratio=0.5, window=(2, 2), max_downsample=2)),
])
def test_retom_sits_where_tomesd_merges(models, monkeypatch, name, cfg):
    model, unet = models[name]
    args = inputs(name, 2, 13, 10)
    swap_in_retom(monkeypatch, model, cfg)
    ref = tomesd_out(model, args, ratio=cfg.ratio, max_downsample=cfg.max_downsample,
                     use_rand=False, merge_attn=cfg.merge_attn,
                     merge_crossattn=cfg.merge_crossattn, merge_mlp=cfg.merge_mlp)
    out = unet(*args, merge=cfg).sample
    assert_close(out, ref, TOL)
    assert rel_err(ref, torch_out(model, *args)) > 1e-2


def test_ratio_zero_is_the_plain_unet(models):
    model, unet = models["sd2"]
    args = inputs("sd2", 2, 8, 8)
    ref = torch_out(model, *args)
    for cfg in (ReToM(ratio=0.0, max_downsample=2), ToMe(ratio=0.0, use_rand=False)):
        assert_close(unet(*args, merge=cfg).sample, ref, TOL)


def torch_todo_out(model, args, factor, method, max_downsample):
    """diffusers' UNet with attn1's keys/values pooled on the token grid, in torch."""
    H, W = args[0].shape[2:]

    def pool(module, a, kw):
        x = a[0] if a else kw["hidden_states"]
        n = x.shape[1]
        down = int(math.ceil(math.sqrt(H * W // n)))
        if down > max_downsample:
            return None
        h, w = math.ceil(H / down), math.ceil(W / down)
        grid = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        small = F.interpolate(grid, size=(h // factor, w // factor),
                              mode="nearest" if method == "nearest" else "area")
        kw["encoder_hidden_states"] = small.flatten(2).transpose(1, 2)
        return a, kw

    hooks = [m.attn1.register_forward_pre_hook(pool, with_kwargs=True)
             for m in model.modules() if type(m).__name__ == "BasicTransformerBlock"]
    try:
        return torch_out(model, *args)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("name,factor,method,max_downsample", [
    ("sd1", 2, "nearest", 1), ("sd2", 2, "avg", 2), ("sdxl", 2, "nearest", 2),
])
def test_todo_equals_pooled_torch_attention(models, name, factor, method, max_downsample):
    model, unet = models[name]
    args = inputs(name, 2, 12, 10)
    ref = torch_todo_out(model, args, factor, method, max_downsample)
    out = unet(*args, merge=ToDo(factor=factor, method=method,
                                 max_downsample=max_downsample)).sample
    assert_close(out, ref, TOL)
    assert rel_err(ref, torch_out(model, *args)) > 1e-3


def torch_retom_kv_out(model, args, cfg):
    """diffusers' UNet whose attn1 keys/values are the block's normed tokens merged in torch
    (``scatter_reduce(..., "mean")`` as tomesd merges) by the plan ReToM's algorithm makes
    from the block's input (``retom_representatives`` / ``retom_plan``); queries untouched."""
    H, W = args[0].shape[2:]
    seen = {}

    def keep_input(module, a, kw):
        seen["x"] = a[0] if a else kw["hidden_states"]

    def merge_kv(module, a, kw):
        x = a[0] if a else kw["hidden_states"]
        n = x.shape[1]
        down = int(math.ceil(math.sqrt(H * W // n)))
        if down > cfg.max_downsample:
            return None
        hw, window = (math.ceil(H / down), math.ceil(W / down)), cfg.window_for(down)
        m = jnp.asarray(seen["x"].numpy())
        u = m / jnp.maximum(jnp.linalg.norm(m, axis=-1, keepdims=True), 1e-12)
        nW = (hw[0] // window[0]) * (hw[1] // window[1])
        r = min(int(n * cfg.ratio), nW * (window[0] * window[1] - 1))
        plan = retom_plan(u, hw, window, retom_representatives(u, hw, window), r, cfg.matching,
                          cfg.reach)
        idx = {k: torch.from_numpy(np.array(v)).long() for k, v in plan._asdict().items()}
        c = x.shape[-1]
        dst = x.gather(1, idx["out_pos"][..., None].expand(-1, -1, c))
        src = x.gather(1, idx["merged_pos"][..., None].expand(-1, -1, c))
        kw["encoder_hidden_states"] = dst.scatter_reduce(
            1, idx["merged_slot"][..., None].expand(-1, -1, c), src, reduce="mean")
        return a, kw

    blocks = [m for m in model.modules() if type(m).__name__ == "BasicTransformerBlock"]
    hooks = [b.register_forward_pre_hook(keep_input, with_kwargs=True) for b in blocks]
    hooks += [b.attn1.register_forward_pre_hook(merge_kv, with_kwargs=True) for b in blocks]
    try:
        return torch_out(model, *args)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("name,cfg", [
    ("sd1", ReToM(ratio=0.5, kv_only=True)),
    ("sdxl", ReToM(ratio=0.6, window=(2, 3), matching="near", max_downsample=2, kv_only=True)),
])
def test_retom_kv_only_equals_torch_merged_keys(models, name, cfg):
    """ReToM(kv_only=True): every query kept, self-attention's keys/values merged by the
    plan; equals diffusers' UNet with the same plan applied to attn1's keys/values."""
    model, unet = models[name]
    args = inputs(name, 2, 13, 10)
    ref = torch_retom_kv_out(model, args, cfg)
    out = unet(*args, merge=cfg).sample
    assert_close(out, ref, TOL)
    assert rel_err(ref, torch_out(model, *args)) > 1e-3  # the keys really were merged
    full = unet(*args, merge=dataclasses.replace(cfg, kv_only=False)).sample
    assert rel_err(out, full) > 1e-3  # and it is not the full merge


def test_retom_cache_is_reused_and_one_program_serves_all_steps(models):
    _, unet = models["sd2"]
    cfg = ReToM(ratio=0.5, max_downsample=2, cache_step=1)
    x, _, ehs, _ = inputs("sd2", 2, 8, 8)
    state = unet.init_merge_state(x.shape, ehs.shape, cfg)
    compiled = unet._jitted._cache_size()
    # down: one block at each of downsample 1 and 2; up: two at each
    assert int(state["step"]) == 0 and len(state["blocks"]) == 6
    # keyed by the block's path in the model, not by call order
    assert "down_blocks.0.attentions.0.transformer_blocks.0" in state["blocks"]
    states, outs = [], []
    rng = np.random.RandomState(5)
    samples = [x + rng.randn(*x.shape).astype(np.float32) * s for s in (0, 1, 2, 3)]
    for i, s in enumerate(samples):
        out, state = unet(s, np.array([900 - 200 * i] * 2), ehs, merge=cfg, merge_state=state)
        states.append(state)
        outs.append(out)
    assert [int(s["step"]) for s in states] == [1, 2, 3, 4]
    reps = [np.concatenate([np.ravel(b["representatives"]) for b in s["blocks"].values()])
            for s in states]
    assert not np.array_equal(reps[0], reps[1])  # steps 0 and 1 choose afresh
    np.testing.assert_array_equal(reps[1], reps[2])  # later steps reuse step 1's choice
    np.testing.assert_array_equal(reps[1], reps[3])
    assert unet._jitted._cache_size() == compiled + 1  # one program for all four steps
    # step 3 with the cache differs from planning afresh on the same input
    fresh = unet(samples[3], np.array([300, 300]), ehs,
                 merge=ReToM(ratio=0.5, max_downsample=2)).sample
    assert rel_err(outs[3], fresh) > 1e-6
    # while step 1 (the caching step itself) is the fresh plan
    fresh1 = unet(samples[1], np.array([700, 700]), ehs,
                  merge=ReToM(ratio=0.5, max_downsample=2)).sample
    assert rel_err(outs[1], fresh1) <= 1e-6


@dataclasses.dataclass(frozen=True)
class TopLeftToMe(MergeMethod):
    """A fourth method as one class: ToMe's matching with fixed top-left destinations,
    written from merge.py's pure functions."""
    ratio: float = 0.5
    max_downsample: int = 1
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = True
    seen: list = dataclasses.field(default_factory=list, compare=False, hash=False)

    def for_block(self, tokens, grid, downsample, key=None, cache=None, use_cache=False):
        self.seen.append((tuple(grid), downsample, key is None, cache))
        dst = (grid[0] // 2) * (grid[1] // 2)
        r = min(int(tokens.shape[1] * self.ratio), tokens.shape[1] - dst)
        plan = tome_plan(tokens, grid, (2, 2), r)
        return BlockMerge.branches(self, *plan_functions(plan)), None


def test_a_fourth_method_is_one_class(models):
    """A ``MergeMethod`` subclass runs through the UNet unchanged: called once per
    transformer block at the levels it applies to, with the block's grid, and its
    BlockMerge used on the branches it selects (here equal to ToMe without randomness)."""
    _, unet = models["sd1"]
    args = inputs("sd1", 2, 13, 10)
    method = TopLeftToMe()
    ours = unet(*args, merge=method)
    ref = unet(*args, merge=ToMe(use_rand=False, merge_mlp=True)).sample
    np.testing.assert_array_equal(ours.sample, ref)
    assert ours.merge_state is None  # it carries nothing between calls
    # sd1 (tiny): one block per down/up attention of the top level, 13x10 latent
    assert method.seen and all(s == ((13, 10), 1, True, None) for s in method.seen)
    assert rel_err(ref, unet(*args).sample) > 1e-3  # it did merge


def test_merge_config_errors_before_compiling(models):
    _, sdxl = models["sdxl"]
    _, sd1 = models["sd1"]
    args = inputs("sdxl", 2, 8, 8)
    compiled = sdxl._jitted._cache_size(), sd1._jitted._cache_size()
    with pytest.raises(ValueError, match="merges nowhere in this UNet.*raise max_downsample"):
        sdxl(*args, merge=ReToM())
    with pytest.raises(ValueError, match="window 8x8 is larger than the 4x4 grid"):
        sdxl(*args, merge=ReToM(window=(8, 8), ratio=0.5, max_downsample=2))
    with pytest.raises(ValueError, match="ToDo factor 16 is larger"):
        sd1(*inputs("sd1", 2, 8, 8), merge=ToDo(factor=16))
    with pytest.raises(ValueError, match="merge_state is only used by ReToM"):
        sd1(*inputs("sd1", 2, 8, 8), merge=ToMe(use_rand=False), merge_state={})
    with pytest.raises(ValueError, match="merge must be ToMe, ReToM or ToDo"):
        sd1(*inputs("sd1", 2, 8, 8), merge="retom")
    with pytest.raises(ValueError, match=r"a UNet call is one step: pass merge.at_step\(step\)"):
        sd1(*inputs("sd1", 2, 8, 8), merge=ReToM(schedule=((1, (4, 4)),)))
    assert (sdxl._jitted._cache_size(), sd1._jitted._cache_size()) == compiled  # nothing compiled


# One attention level, narrow: cheap to differentiate.
SMALL = dict(block_out_channels=(16,), layers_per_block=1, sample_size=8,
             down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
             cross_attention_dim=8, attention_head_dim=2, norm_num_groups=8)


def test_merged_unet_gradient_equals_torch(tmp_path):
    """Gradients through merge and unmerge (every branch merged): d(sum(w * unet(x)))/dx
    of our UNet with ToMe equals torch autograd through tomesd's patched UNet (whose plan,
    like ours, carries no gradient)."""
    model = torch_unet(SMALL, seed=1)
    model.save_pretrained(tmp_path)
    unet = load_unet(tmp_path)
    rng = np.random.RandomState(0)
    x = rng.randn(2, 4, 8, 6).astype(np.float32)
    ehs = rng.randn(2, 5, 8).astype(np.float32)
    t = np.array([700, 300])
    w = rng.randn(2, 4, 8, 6).astype(np.float32)
    cfg = ToMe(ratio=0.5, use_rand=False, merge_attn=True, merge_crossattn=True, merge_mlp=True)
    tomesd.apply_patch(model, ratio=0.5, max_downsample=1, use_rand=False, merge_attn=True,
                       merge_crossattn=True, merge_mlp=True)
    try:
        xt = torch.from_numpy(x).requires_grad_(True)
        (model(xt, torch.from_numpy(t), torch.from_numpy(ehs)).sample
         * torch.from_numpy(w)).sum().backward()
        ref = xt.grad.numpy()
        with torch.no_grad():
            merged_out = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ehs))
    finally:
        tomesd.remove_patch(model)
    assert rel_err(torch_out(model, x, t, ehs, None), merged_out.sample.numpy()) > 1e-2
    loss = lambda s: jnp.sum(w * unet.apply(unet.params, s, t, ehs, merge=cfg).sample)  # noqa: E731
    grad = jax.jit(jax.grad(loss))(jnp.asarray(x))
    assert rel_err(grad, ref) <= 1e-5, rel_err(grad, ref)


def test_static_reuse_drops_the_fresh_selection(models):
    """After cache_step a loop can fix ``reuse=True`` at trace time: same output as the
    run-time decision, and with cache="plan" the compiled program has no sort left."""
    _, unet = models["sd2"]
    cfg = ReToM(ratio=0.5, max_downsample=2, cache_step=0, cache="plan")
    x, t, ehs, _ = inputs("sd2", 2, 8, 8)
    state = unet.init_merge_state(x.shape, ehs.shape, cfg)
    _, state = unet(x, t, ehs, merge=cfg, merge_state=state)  # step 0 fills the cache
    x2 = x[::-1].copy()
    dynamic, _ = unet(x2, t, ehs, merge=cfg, merge_state=state)
    static, _ = unet(x2, t, ehs, merge=cfg, merge_state=state, reuse=True)
    np.testing.assert_allclose(static, dynamic, rtol=1e-6, atol=1e-6)

    def hlo(reuse):
        return unet._jitted.lower(unet.params, x2, t, ehs, None, merge=cfg, merge_state=state,
                                  key=None, attention=None, reuse=reuse).compile().as_text()
    assert "sort" in hlo(None) and "sort" not in hlo(True)
