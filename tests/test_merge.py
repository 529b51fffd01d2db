"""Tests of retom_jax.merge: ToMe against tomesd, ReToM against a literal NumPy reading
of RETOM.md, ToDo against torch, plus the properties every plan must have."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tomesd import merge as tomesd_merge

from retom_jax.merge.methods import ReToM, ToDo, ToMe
from retom_jax.merge.interface import grid_for, loop_segments
from tests.util import rel_err


def normal(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def closure_vars(fn):
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__)))


def merge_roundtrip(cfg, hw, **kw):
    """jit(metric, x, y, key) -> (merge(x), unmerge(merge(x)), unmerge(y)) for one config."""

    @jax.jit
    def run(metric, x, y, key=None):
        merge, unmerge = cfg.plan(metric, hw, key, **kw)
        merged = merge(x)
        return merged, unmerge(merged), unmerge(y)

    return run


def check_groups(x, roundtrip, r):
    """unmerge(merge(x)) on generic x: exactly N - r distinct rows per batch element;
    a row shared by a group of tokens is the group's mean; a lone row is the token itself."""
    x, roundtrip = np.asarray(x), np.asarray(roundtrip)
    for xb, rb in zip(x, roundtrip):
        _, inverse = np.unique(rb, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        assert inverse.max() + 1 == len(xb) - r
        for g in range(inverse.max() + 1):
            members = np.flatnonzero(inverse == g)
            if len(members) == 1:
                np.testing.assert_array_equal(rb[members[0]], xb[members[0]])
            else:
                mean = xb[members].mean(0)
                np.testing.assert_allclose(rb[members[0]], mean, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# ToMe
# --------------------------------------------------------------------------------------


def tomesd_no_rand(metric, x, hw, sx, sy, ratio, no_rand=True):
    """tomesd's merge(x) and unmerge(merge(x)) with top-left dsts (or, ``no_rand=False``,
    those its ``torch.randint`` draws), its dsts put in position order (tomesd orders them
    by torch's unstable argsort)."""
    h, w = hw
    m, u = tomesd_merge.bipartite_soft_matching_random2d(
        torch.from_numpy(metric), w, h, sx, sy, int(h * w * ratio), no_rand=no_rand,
        generator=None if no_rand else torch.Generator()
    )
    merged = m(torch.from_numpy(x)).numpy()
    roundtrip = u(torch.from_numpy(merged)).numpy()
    b_idx = closure_vars(u)["b_idx"].reshape(-1).numpy()
    merged[:, -len(b_idx):] = merged[:, -len(b_idx):][:, np.argsort(b_idx)]
    return merged, roundtrip


# (grid, stride, ratio, batch): grids divisible and not by the stride, ratios up to the max
TOMESD_CASES = [
    ((8, 8), (2, 2), 0.5, 2),
    ((7, 9), (2, 2), 0.3, 1),
    ((6, 10), (2, 2), 0.75, 2),
    ((8, 8), (3, 2), 5 / 6, 1),
    ((7, 9), (3, 2), 0.5, 2),
    ((6, 10), (3, 2), 0.3, 2),
]


@pytest.mark.parametrize("hw,stride,ratio,batch", TOMESD_CASES)
def test_tome_matches_tomesd(hw, stride, ratio, batch):
    (sx, sy), N, C = stride, hw[0] * hw[1], 16
    metric, x = normal(0, (batch, N, C)), normal(1, (batch, N, C))
    expected, expected_roundtrip = tomesd_no_rand(metric, x, hw, sx, sy, ratio)
    y = normal(2, expected.shape)
    cfg = ToMe(ratio=ratio, sx=sx, sy=sy, use_rand=False)
    merged, roundtrip, _ = merge_roundtrip(cfg, hw)(metric, x, y)
    assert merged.shape == expected.shape
    assert rel_err(merged, expected) <= 1e-6
    assert rel_err(roundtrip, expected_roundtrip) <= 1e-6
    check_groups(x, roundtrip, int(N * ratio))


@pytest.mark.parametrize("hw,stride,ratio,batch", [c for c in TOMESD_CASES if c[3] % 2 == 0])
def test_tome_random_plan_equals_tomesd(monkeypatch, hw, stride, ratio, batch):
    """Random destinations (tomesd's default): tomesd given the cell positions our key
    draws (its torch.randint replaced by ours) merges exactly as our plan does."""
    (sx, sy), N, C = stride, hw[0] * hw[1], 16
    key = jax.random.key(11)
    pick = np.asarray(jax.random.randint(key, (hw[0] // sy, hw[1] // sx), 0, sx * sy))
    drawn = []

    def randint(high, size, **kwargs):
        drawn.append((high, tuple(size)))
        return torch.from_numpy(pick.astype(np.int64)).reshape(size)

    monkeypatch.setattr(torch, "randint", randint)
    metric, x = normal(0, (batch, N, C)), normal(1, (batch, N, C))
    expected, expected_roundtrip = tomesd_no_rand(metric, x, hw, sx, sy, ratio, no_rand=False)
    assert drawn == [(sx * sy, pick.shape + (1,))]
    cfg = ToMe(ratio=ratio, sx=sx, sy=sy, use_rand=True)
    merged, roundtrip, _ = merge_roundtrip(cfg, hw)(metric, x, normal(2, expected.shape), key)
    assert rel_err(merged, expected) <= 1e-6
    assert rel_err(roundtrip, expected_roundtrip) <= 1e-6
    # the draw matters: top-left destinations give another result
    assert rel_err(tomesd_no_rand(metric, x, hw, sx, sy, ratio)[1], expected_roundtrip) > 1e-2


@pytest.mark.parametrize("sx,sy", [(2, 2), (3, 2)])
def test_tome_random_destinations_cover_every_cell_position(sx, sy):
    """Every position of a cell is drawn, about equally often (tomesd: randint(sy * sx))."""
    cfg, hw = ToMe(sx=sx, sy=sy), (24 * sy, 24 * sx)  # 576 cells
    mask = np.asarray(cfg.dst_mask(hw, jax.random.key(0))).reshape(24, sy, 24, sx)
    where = mask.transpose(0, 2, 1, 3).reshape(576, sy * sx).argmax(-1)
    counts = np.bincount(where, minlength=sy * sx)
    assert counts.min() > 0.6 * 576 / (sx * sy), counts


def test_bf16_merge_sums_in_float32():
    """bf16 tokens are averaged in float32 and rounded once: the merged tokens equal the
    float32 merge of the same bf16 values rounded to bf16 (a bf16 running sum of ~16
    tokens of size ~3 is off by several bf16 steps)."""
    cfg, hw = ToMe(ratio=0.9, sx=4, sy=4, use_rand=False), (16, 16)  # 15 sources per dst
    metric = normal(0, (2, 256, 8))
    x16 = jnp.asarray(normal(1, (2, 256, 8)) * 0.3 + 3.0, jnp.bfloat16)

    @jax.jit
    def both(metric, x16):
        merge, _ = cfg.plan(metric, hw)
        return merge(x16), merge(x16.astype(jnp.float32))

    got, ref = both(metric, x16)
    assert got.dtype == jnp.bfloat16
    got, want = np.asarray(got, np.float32), np.asarray(ref.astype(jnp.bfloat16), np.float32)
    ulp = 2.0 ** (np.floor(np.log2(np.abs(want))) - 7)
    assert np.abs(got - want).max() <= ulp.max()  # at most one bf16 step anywhere
    assert np.mean(got != want) < 0.01


def test_tome_dst_mask():
    cfg = ToMe(sx=3, sy=2)
    hw = (7, 10)  # 3 x 3 whole cells, a row and a column outside them
    top_left = np.asarray(jax.jit(lambda: cfg.dst_mask(hw))()).reshape(hw)
    expected = np.zeros(hw, bool)
    expected[0:6:2, 0:9:3] = True
    np.testing.assert_array_equal(top_left, expected)
    draw = jax.jit(lambda key: cfg.dst_mask(hw, key).reshape(hw))
    masks = [np.asarray(draw(jax.random.PRNGKey(k))) for k in range(4)]
    for mask in masks:
        cells = mask[:6, :9].reshape(3, 2, 3, 3).sum(axis=(1, 3))
        np.testing.assert_array_equal(cells, 1)  # one dst in every whole cell
        assert not mask[6:].any() and not mask[:, 9:].any()
    assert len({m.tobytes() for m in masks}) == 4  # different keys, different draws
    np.testing.assert_array_equal(masks[0], draw(jax.random.PRNGKey(0)))  # deterministic


def test_tome_random_key_and_single_compile():
    cfg, hw, traces = ToMe(ratio=0.5), (8, 8), []

    @jax.jit
    def run(metric, x, y, key):
        traces.append(1)
        merge, unmerge = cfg.plan(metric, hw, key)
        merged = merge(x)
        return merged, unmerge(merged), unmerge(y)

    metric = np.repeat(normal(0, (1, 64, 16)), 2, axis=0)  # identical batch elements
    x = np.repeat(normal(1, (1, 64, 16)), 2, axis=0)
    y = normal(2, (2, 32, 16))
    k0, k1 = jax.random.PRNGKey(0), jax.random.PRNGKey(1)
    a = [np.asarray(t) for t in run(metric, x, y, k0)]
    np.testing.assert_array_equal(a[0][0], a[0][1])  # one draw shared by the batch
    for got, again in zip(a, run(metric, x, y, k0)):
        np.testing.assert_array_equal(got, again)  # deterministic for a key
    assert not np.array_equal(a[2], run(metric, x, y, k1)[2])  # another key, other dsts
    check_groups(x, a[1], 32)
    run(normal(3, (2, 64, 16)), normal(4, (2, 64, 16)), y, k1)
    assert len(traces) == 1  # new keys and tokens, same program

    # An odd batch switches randomness off, as tomesd does: the key is then ignored.
    expected, expected_roundtrip = tomesd_no_rand(metric[:1], x[:1], hw, 2, 2, 0.5)
    for key in (k0, k1):
        merged, roundtrip, _ = run(metric[:1], x[:1], y[:1], key)
        assert rel_err(merged, expected) <= 1e-6
        assert rel_err(roundtrip, expected_roundtrip) <= 1e-6


# --------------------------------------------------------------------------------------
# ReToM against a literal reading of RETOM.md
# --------------------------------------------------------------------------------------


def retom_reference(metric, x, hw, window, ratio, matching, reps=None, ties=None):
    """ReToM in plain NumPy (float64), one token at a time. Returns merge(x), the output
    slots (per batch element, the tokens each slot holds) and the representatives (as
    indices inside each window). ``ties`` (a dict), if given, counts the ties met: windows
    whose best tokens tie while differing, and batch elements where the r-th and (r+1)-th
    best sources tie."""
    metric, x = (np.asarray(a, np.float64) for a in (metric, x))
    B, N, _ = x.shape
    (h, w), (wh, ww) = hw, window
    windows = [
        [(i * wh + a) * w + (j * ww + b) for a in range(wh) for b in range(ww)]
        for i in range(h // wh) for j in range(w // ww)
    ]
    r = min(int(N * ratio), len(windows) * (wh * ww - 1))
    merged_out, slots_out, reps_out = [], [], []
    for bi in range(B):
        u = metric[bi] / np.linalg.norm(metric[bi], axis=1, keepdims=True)
        if reps is None:  # highest mean similarity to the window's other tokens, first wins
            rep = []
            for win in windows:
                means = [np.mean([u[p] @ u[q] for q in win if q != p]) for p in win]
                rep.append(max(range(len(win)), key=lambda k: (means[k], -k)))
                best = [p for p, m in zip(win, means) if m == max(means)]
                differ = any((metric[bi, p] != metric[bi, best[0]]).any() for p in best)
                if ties is not None and differ:
                    ties["windows"] = ties.get("windows", 0) + 1
        else:
            rep = [int(k) for k in reps[bi]]
        dsts = [win[k] for win, k in zip(windows, rep)]
        # sources: each window's other tokens (windows in order), then the tokens outside
        srcs = [p for win, d in zip(windows, dsts) for p in win if p != d]
        srcs += [p for p in range(N) if not any(p in win for win in windows)]
        score, match = [], []
        for p in srcs:
            home = [j for j, win in enumerate(windows) if p in win]
            if not home:  # outside whole windows: never merged
                score.append(-np.inf)
                match.append(None)
            elif matching == "local":
                score.append(u[p] @ u[dsts[home[0]]])
                match.append(home[0])
            else:  # "global": every representative; "near": those one window step away
                sims = [u[p] @ u[d] for d in dsts]
                nw = w // ww
                cands = [k for k in range(len(dsts)) if matching == "global" or (
                    abs(k // nw - home[0] // nw) <= 1 and abs(k % nw - home[0] % nw) <= 1)]
                j = max(cands, key=lambda k: (sims[k], -k))
                score.append(sims[j])
                match.append(j)
        order = sorted(range(len(srcs)), key=lambda i: -score[i])  # stable: ties in srcs order
        if ties is not None and 0 < r < len(srcs) and score[order[r - 1]] == score[order[r]]:
            ties["cutoff"] = ties.get("cutoff", 0) + 1
        groups = [[d] for d in dsts]
        for i in order[:r]:
            groups[match[i]].append(srcs[i])
        slots = [[srcs[i]] for i in order[r:]] + groups
        merged_out.append([x[bi, g].mean(0) for g in slots])
        slots_out.append(slots)
        reps_out.append(rep)
    return np.array(merged_out), slots_out, np.array(reps_out)


def unmerge_reference(slots, y):
    """Every token takes the value of the slot holding it."""
    out = np.zeros((len(slots), sum(map(len, slots[0])), y.shape[-1]), y.dtype)
    for b, slots_b in enumerate(slots):
        for s, tokens in enumerate(slots_b):
            out[b, tokens] = y[b, s]
    return out


def palette_tokens(seed, batch, hw, C=16):
    """Piecewise-constant tokens: a few +-1 colours painted in blocks (2x2 in even, 3x3 in
    odd batch elements) that straddle the windows. Every similarity is exact in float32,
    so ties are exact ties."""
    rng = np.random.default_rng(seed)
    palette = rng.choice([-1.0, 1.0], size=(5, C)).astype(np.float32)
    h, w = hw
    out = []
    for b in range(batch):
        size = 2 + b % 2
        labels = rng.integers(0, 5, size=(h // size + 2, w // size + 2))
        labels = labels.repeat(size, 0).repeat(size, 1)
        labels = np.roll(labels, rng.integers(0, size, size=2), axis=(0, 1))[:h, :w]
        labels[rng.random((h, w)) < 0.1] = rng.integers(0, 5)  # scattered odd tokens
        out.append(palette[labels.reshape(-1)])
    return np.stack(out)


def gradient_tokens(seed, batch, hw, C=16):
    """A smooth image (each channel a slanted plane) plus a little noise."""
    rng = np.random.default_rng(seed)
    h, w = hw
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    planes = rng.standard_normal((batch, 3, C))
    tok = (planes[:, 0, None, None] + planes[:, 1, None, None] * yy[..., None]
           + planes[:, 2, None, None] * xx[..., None])
    tok = tok + 0.05 * rng.standard_normal(tok.shape)
    return tok.reshape(batch, h * w, C).astype(np.float32)


# Two batch elements of each kind, from these seeds (the palette seed is one that ties in
# every RETOM_CASE, as checked by test_retom_structured_data_exercises_ties_and_choices).
DATA = {
    "random": lambda hw: normal(0, (2, hw[0] * hw[1], 16)),
    "palette": lambda hw: palette_tokens(5, 2, hw),
    "gradient": lambda hw: gradient_tokens(2, 2, hw),
}


# (matching, window, ratio): windows square and not; the 1 - 1/area ratios run out of
# window sources on the 9 x 11 grid (divisible by none of the windows), so r is clamped.
RETOM_CASES = [
    ("local", (2, 2), 0.3),
    ("local", (2, 3), 1 - 1 / 6),
    ("local", (4, 4), 0.5),
    ("global", (2, 2), 0.75),
    ("global", (3, 2), 0.3),
    ("global", (4, 4), 1 - 1 / 16),
    ("near", (2, 2), 0.5),
    ("near", (2, 3), 0.3),
]


@pytest.mark.parametrize("matching,window,ratio", RETOM_CASES)
def test_retom_matches_reference(matching, window, ratio):
    hw = (9, 11)
    # random, piecewise-constant (exact ties) and smooth tokens, two of each, in one batch
    metric = np.concatenate([make(hw) for make in DATA.values()])
    x = normal(10, metric.shape[:2] + (6,))
    cfg = ReToM(ratio=ratio, window=window, matching=matching)
    exp_merged, slots, exp_reps = retom_reference(metric, x, hw, window, ratio, matching)
    y = normal(20, exp_merged.shape)

    @jax.jit
    def run(metric, x, y):
        merge, unmerge = cfg.plan(metric, hw)
        merged = merge(x)
        return cfg.representatives(metric, hw), merged, unmerge(merged), unmerge(y)

    reps, merged, roundtrip, unmerged = run(metric, x, y)
    np.testing.assert_array_equal(reps, exp_reps)
    assert rel_err(merged, exp_merged) <= 1e-5
    np.testing.assert_array_equal(unmerged, unmerge_reference(slots, y))
    check_groups(x, roundtrip, x.shape[1] - exp_merged.shape[1])


def test_retom_structured_data_exercises_ties_and_choices():
    """Guard on the test data above: the palette tokens do produce exact ties (between
    representative candidates that differ, and at the cut between merged and kept), and
    the smooth tokens make the representative rule choose other than the first token."""
    hw, x = (9, 11), np.zeros((2, 99, 1))
    for matching, window, ratio in RETOM_CASES:
        ties = {}
        retom_reference(DATA["palette"](hw), x, hw, window, ratio, matching, ties=ties)
        assert ties.get("windows", 0) > 0, (matching, window, ties)
        if ratio <= 0.5:  # (the larger ratios merge every window source: no cut to tie at)
            assert ties.get("cutoff", 0) > 0, (matching, window, ties)
        _, _, reps = retom_reference(DATA["gradient"](hw), x, hw, window, ratio, matching)
        assert (reps != 0).mean() > 0.5


def test_retom_per_level_windows():
    cfg = ReToM(ratio=0.5, window={2: (4, 4), 1: (2, 3)}, max_downsample=2)
    assert cfg.window == ((1, (2, 3)), (2, (4, 4)))
    assert cfg.window_for(2) == (4, 4) and cfg.window_for(1) == (2, 3)
    assert hash(cfg) == hash(ReToM(ratio=0.5, window={1: (2, 3), 2: (4, 4)}, max_downsample=2))
    hw = (9, 11)
    metric, x = normal(0, (1, 99, 8)), normal(1, (1, 99, 8))
    for downsample, window in ((1, (2, 3)), (2, (4, 4))):
        exp_merged, _, _ = retom_reference(metric, x, hw, window, 0.5, "local")
        merged, _, _ = merge_roundtrip(cfg, hw, downsample=downsample)(metric, x, exp_merged)
        assert rel_err(merged, exp_merged) <= 1e-5
    with pytest.raises(ValueError, match="no window for downsample 3"):
        cfg.plan(metric, hw, downsample=3)


def test_retom_window_schedule():
    """Windows over the steps: each step runs the window in force, plans as a fixed-window
    config would, and a loop is cut wherever the window or the cache use changes."""
    cfg = ReToM(ratio=0.5, window=(2, 2), schedule={3: {1: (4, 4)}, 1: (1, 2)})
    assert cfg.schedule == ((1, (1, 2)), (3, ((1, (4, 4)),)))  # sorted, normalized
    assert hash(cfg) == hash(ReToM(ratio=0.5, schedule=((1, [1, 2]), (3, {1: (4, 4)}))))
    assert [cfg.window_at(i) for i in range(5)] == [(2, 2), (1, 2), (1, 2)] + [((1, (4, 4)),)] * 2
    assert cfg.at_step(2) == ReToM(ratio=0.5, window=(1, 2))
    assert ReToM().at_step(7) is not None and ReToM().at_step(7) == ReToM()
    hw = (8, 12)
    metric, x = normal(0, (2, 96, 8)), normal(1, (2, 96, 8))
    for step, window in ((0, (2, 2)), (2, (1, 2)), (4, (4, 4))):
        exp_merged, _, _ = retom_reference(metric, x, hw, window, 0.5, "local")
        merged, _, _ = merge_roundtrip(cfg.at_step(step), hw)(metric, x, exp_merged)
        assert rel_err(merged, exp_merged) <= 1e-5
    with pytest.raises(ValueError, match="take at_step"):
        cfg.plan(metric, hw)
    with pytest.raises(ValueError, match=r"window 4x4 \(from step 3\) is larger than the 3x8"):
        cfg.check_grid((3, 8))

    assert loop_segments(cfg, 5) == [(0, 1, cfg.at_step(0), None), (1, 3, cfg.at_step(1), None),
                                     (3, 5, cfg.at_step(3), None)]
    assert loop_segments(cfg, 2) == [(0, 1, cfg.at_step(0), None), (1, 2, cfg.at_step(1), None)]
    cached = ReToM(schedule=((2, (4, 4)),), cache_step=2, cache="plan")
    assert [(lo, hi, m.window, r) for lo, hi, m, r in loop_segments(cached, 6)] == [
        (0, 2, (2, 2), False), (2, 3, (4, 4), False), (3, 6, (4, 4), True)]
    assert loop_segments(ReToM(cache_step=0), 1) == [(0, 1, ReToM(cache_step=0), False)]
    tome = ToMe()
    assert loop_segments(tome, 4) == [(0, 4, tome, None)]
    assert loop_segments(None, 4) == [(0, 4, None, None)]
    with pytest.raises(ValueError, match="num_steps must be a positive int"):
        loop_segments(cfg, 0)


# --------------------------------------------------------------------------------------
# Properties of every plan
# --------------------------------------------------------------------------------------

CONFIGS = [
    ToMe(ratio=0.5, use_rand=True),
    ToMe(ratio=0.6, sx=3, sy=2, use_rand=False),
    ReToM(ratio=0.5, window=(2, 2), matching="local"),
    ReToM(ratio=0.7, window=(2, 3), matching="global"),
]


def group_mean_grad(roundtrip, weights):
    """d/dx sum(weights * unmerge(merge(x))): each token gets the mean of its group's weights."""
    grad = np.zeros_like(weights)
    for b, rows in enumerate(np.asarray(roundtrip)):
        _, group = np.unique(rows, axis=0, return_inverse=True)
        group = group.reshape(-1)
        for g in range(group.max() + 1):
            grad[b, group == g] = weights[b, group == g].mean(0)
    return grad


@pytest.mark.parametrize("cfg", CONFIGS, ids=["ToMe-rand", "ToMe-3x2", "ReToM-local", "ReToM-global"])
def test_plan_properties(cfg):
    hw, key = (7, 9), jax.random.PRNGKey(3)
    metric, x, weights = normal(0, (2, 63, 16)), normal(1, (2, 63, 16)), normal(2, (2, 63, 16))
    r = int(63 * cfg.ratio)

    # ratio 0: the identity
    merge0, unmerge0 = type(cfg)(ratio=0.0).plan(metric, hw, key)
    assert merge0(x) is x and unmerge0(x) is x

    @jax.jit
    def run(metric, x, weights, key):
        merge, unmerge = cfg.plan(metric, hw, key)
        merged = merge(x)
        # any float dtype: bf16 in, bf16 out (the plan itself is computed in float32)
        merge16, unmerge16 = cfg.plan(metric.astype(jnp.bfloat16), hw, key)
        merge_r, unmerge_r = cfg.plan(metric.astype(jnp.bfloat16).astype(jnp.float32), hw, key)
        x16 = x.astype(jnp.bfloat16)
        out16, out_r = unmerge16(merge16(x16)), unmerge_r(merge_r(x16.astype(jnp.float32)))
        # gradients w.r.t. the tokens, through merge and unmerge
        linear_grad = jax.grad(lambda x: jnp.sum(weights * unmerge(merge(x))))(x)

        def loss(x):  # the plan from x itself: its indices carry no gradient
            merge, unmerge = cfg.plan(x, hw, key)
            return jnp.sum(jnp.sin(unmerge(jnp.tanh(merge(x)))) * weights)

        return merged, unmerge(merged), out16, out_r, linear_grad, jax.grad(loss)(x)

    merged, roundtrip, out16, out_r, linear_grad, grad = run(metric, x, weights, key)
    assert merged.shape == (2, 63 - r, 16)
    check_groups(x, roundtrip, r)  # kept tokens unchanged, merged groups come back equal
    assert out16.dtype == jnp.bfloat16
    # float32 sums rounded once to bf16: within half a bf16 step (2**-9 relative) of the
    # float32 result (measured 1.2e-3 to 1.35e-3; a bf16 running sum gives 2.3e-3 to 3.3e-3)
    assert rel_err(out16.astype(jnp.float32), out_r) <= 2.0 ** -9
    expected_grad = group_mean_grad(roundtrip, weights)
    np.testing.assert_allclose(linear_grad, expected_grad, rtol=1e-5, atol=1e-6)
    grad = np.asarray(grad)
    assert np.isfinite(grad).all()
    assert (np.linalg.norm(grad, axis=-1) > 0).all()  # kept, dst and merged tokens alike


# --------------------------------------------------------------------------------------
# ReToM caching
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cache", ["representatives", "plan"])
def test_retom_cache(cache):
    hw, window = (9, 11), (2, 3)
    cfg = ReToM(ratio=0.5, window=window, matching="global", cache_step=2, cache=cache)
    now, before = palette_tokens(5, 2, hw), gradient_tokens(6, 2, hw)
    x = normal(7, (2, 99, 6))
    traces = []

    @jax.jit
    def step(metric, x, cache, use_cache):
        traces.append(1)
        merge, unmerge, new_cache = cfg.plan_cached(metric, hw, cache, use_cache)
        return merge(x), new_cache

    empty = cfg.init_cache(2, hw)
    fresh_before, cache_before = step(before, x, empty, False)  # the caching step
    fresh_now, cache_now = step(now, x, empty, False)
    reused, cache_reused = step(now, x, cache_before, True)
    again, _ = step(before, x, cache_now, jnp.asarray(True))
    assert len(traces) == 1  # one program for every value of metric, cache and use_cache

    def reference(metric, reps=None):
        return retom_reference(metric, x, hw, window, 0.5, "global", reps)

    merged_before, _, reps_before = reference(before)
    merged_now, _, reps_now = reference(now)
    assert (reps_before != reps_now).any()  # the two selections differ
    assert rel_err(fresh_before, merged_before) <= 1e-5  # use_cache False: the fresh plan
    assert rel_err(fresh_now, merged_now) <= 1e-5
    if cache == "representatives":
        np.testing.assert_array_equal(cache_before["representatives"], reps_before)
        np.testing.assert_array_equal(cache_now["representatives"], reps_now)
        # the cached representatives, matched with the current metric
        expected, expected_again = reference(now, reps_before)[0], reference(before, reps_now)[0]
    else:  # the whole matching of the other metric
        expected, expected_again = merged_before, merged_now
    assert rel_err(reused, expected) <= 1e-5
    assert rel_err(again, expected_again) <= 1e-5
    assert not np.allclose(reused, fresh_now)
    for a, b in zip(jax.tree.leaves(cache_reused), jax.tree.leaves(cache_before)):
        np.testing.assert_array_equal(a, b)  # what was used is what is carried on


def test_retom_use_cache_steps():
    assert [bool(ReToM(cache_step=2).use_cache(s)) for s in range(5)] == [False] * 3 + [True] * 2
    assert not any(bool(ReToM().use_cache(s)) for s in range(5))
    assert bool(jax.jit(ReToM(cache_step=0).use_cache)(jnp.asarray(1)))


def test_retom_cache_errors():
    cfg = ReToM(cache_step=0)
    metric = jnp.ones((2, 64, 4))
    with pytest.raises(ValueError, match="cache does not fit"):
        cfg.plan_cached(metric, (8, 8), cfg.init_cache(1, (8, 8)), False)
    with pytest.raises(ValueError, match="cache does not fit"):
        cfg.plan_cached(metric, (8, 8), ReToM(cache="plan").init_cache(2, (8, 8)), False)
    with pytest.raises(ValueError, match="use_cache must be a bool scalar"):
        cfg.plan_cached(metric, (8, 8), cfg.init_cache(2, (8, 8)), jnp.zeros(2, bool))


# --------------------------------------------------------------------------------------
# ToDo
# --------------------------------------------------------------------------------------


def todo_reference(x, hw, factor, method):
    B, N, C = x.shape
    (h, w) = hw
    oh, ow = h // factor, w // factor
    grid = x.reshape(B, h, w, C).astype(np.float64)
    out = np.zeros((B, oh, ow, C))
    for i in range(oh):
        for j in range(ow):
            if method == "nearest":
                out[:, i, j] = grid[:, (i * h) // oh, (j * w) // ow]
            else:
                r0, r1 = (i * h) // oh, math.ceil((i + 1) * h / oh)
                c0, c1 = (j * w) // ow, math.ceil((j + 1) * w / ow)
                out[:, i, j] = grid[:, r0:r1, c0:c1].mean(axis=(1, 2))
    return out.reshape(B, oh * ow, C)


def test_todo_downsample():
    for seed, (hw, factor) in enumerate([((8, 8), 2), ((7, 9), 2), ((20, 27), 3), ((11, 6), 4)]):
        x = normal(seed, (2, hw[0] * hw[1], 5))

        @jax.jit
        def run(x):
            return [ToDo(factor, method).downsample(x, hw) for method in ("nearest", "avg")]

        grid = torch.from_numpy(x).reshape(2, *hw, 5).permute(0, 3, 1, 2)
        size = (hw[0] // factor, hw[1] // factor)
        for got, method, torch_mode in zip(run(x), ("nearest", "avg"), ("nearest", "area")):
            assert rel_err(got, todo_reference(x, hw, factor, method)) <= 1e-6
            expected = F.interpolate(grid, size=size, mode=torch_mode)
            assert rel_err(got, expected.permute(0, 2, 3, 1).reshape(2, -1, 5).numpy()) <= 1e-6
    # nearest on a divisible grid is the top-left token of every cell; dtypes are kept
    x = normal(9, (1, 48, 3))
    nearest, avg16 = jax.jit(lambda x: (
        ToDo(2).downsample(x, (6, 8)), ToDo(2, "avg").downsample(x.astype(jnp.bfloat16), (6, 8))
    ))(x)
    np.testing.assert_array_equal(nearest, x.reshape(1, 6, 8, 3)[:, ::2, ::2].reshape(1, 12, 3))
    assert avg16.dtype == jnp.bfloat16
    assert ToDo(factor=1).downsample(x, (6, 8)) is x


# --------------------------------------------------------------------------------------
# Grids, levels and validation
# --------------------------------------------------------------------------------------


def test_grid_for():
    assert grid_for((64, 64), 4096) == (1, (64, 64))
    assert grid_for((64, 64), 1024) == (2, (32, 32))
    assert grid_for((96, 72), 108) == (8, (12, 9))
    assert grid_for((65, 65), 33 * 33) == (2, (33, 33))  # odd latents: ceil at each level
    assert grid_for((65, 65), 17 * 17) == (4, (17, 17))
    assert grid_for((128, 128), 4096) == (2, (64, 64))  # SDXL's first attention level
    with pytest.raises(ValueError, match="do not form a grid"):
        grid_for((64, 64), 1000)
    with pytest.raises(ValueError, match="num_tokens must be"):
        grid_for((8, 8), 65)
    with pytest.raises(ValueError, match="latent_hw must be"):
        grid_for((8,), 8)


def test_applies():
    for cls in (ToMe, ReToM, ToDo):
        assert cls().applies(1) and not cls().applies(2)
        assert cls(max_downsample=2).applies(2) and not cls(max_downsample=2).applies(4)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: ToMe(ratio=0.8), r"ratio must be in \[0, 0.75\]"),
        (lambda: ToMe(ratio=-0.1), "ratio must be in"),
        (lambda: ToMe(ratio=0.8, sx=3, sy=2), None),  # 0.8 <= 5/6 is fine
        (lambda: ToMe(ratio=float("nan")), "ratio must be a finite number"),
        (lambda: ToMe(sx=0), "sx must be a positive int"),
        (lambda: ToMe(sy=-1), "sy must be a positive int"),
        (lambda: ToMe(sx=2.0), "sx must be a positive int"),
        (lambda: ToMe(max_downsample=0), "max_downsample must be a positive int"),
        (lambda: ToMe(use_rand=1), "use_rand must be a bool"),
        (lambda: ToMe(merge_mlp="yes"), "merge_mlp must be a bool"),
        (lambda: ReToM(ratio=0.8), "ratio must be in"),
        (lambda: ReToM(ratio=0.8, window=(2, 3)), None),
        (lambda: ReToM(ratio=0.8, window={1: (2, 3), 2: (2, 2)}), "ratio must be in"),
        (lambda: ReToM(window=(0, 2)), "dimensions must be positive"),
        (lambda: ReToM(window=(2, 2, 2)), "window must be a pair"),
        (lambda: ReToM(window={0: (2, 2)}), "positive downsample"),
        (lambda: ReToM(window={1: (2, -2)}), "dimensions must be positive"),
        (lambda: ReToM(window=((1, (2, 2)), (1, (3, 3)))), "window given twice"),
        (lambda: ReToM(matching="nearest"), "unknown matching"),
        (lambda: ReToM(kv_only=1), "kv_only must be a bool"),
        (lambda: ReToM(kv_only=True, merge_mlp=True), r"kv_only=True\) merges self-attention"),
        (lambda: ReToM(kv_only=True, merge_attn=False), "leave merge_attn=True"),
        (lambda: ReToM(cache="keys"), "unknown cache"),
        (lambda: ReToM(cache_step=-1), "cache_step must be None or an int"),
        (lambda: ReToM(max_downsample=0), "max_downsample must be a positive int"),
        (lambda: ReToM(schedule=((0, (2, 2)),)), "schedule steps must be ints >= 1"),
        (lambda: ReToM(schedule=((2, (2, 2)), (2, (4, 4)))), "schedule steps must increase"),
        (lambda: ReToM(schedule=((3, (2, 2)), (1, (4, 4)))), "must increase, got 1 after 3"),
        (lambda: ReToM(schedule=((1.5, (2, 2)),)), "schedule steps must be ints"),
        (lambda: ReToM(schedule=((1, (2, 0)),)), "dimensions must be positive"),
        (lambda: ReToM(schedule=((1,),)), r"entries are \(step, window\) pairs"),
        (lambda: ReToM(schedule=(2, 2)), r"entries are \(step, window\) pairs"),
        (lambda: ReToM(schedule="4x4"), "schedule must be"),
        (lambda: ReToM(ratio=0.6, schedule=((5, (1, 2)),)), r"ratio must be in \[0, 0.5\]"),
        (lambda: ReToM(schedule=((5, (4, 4)),), cache_step=4), "changes at step 5, after cache_step 4"),
        (lambda: ReToM(schedule=((4, (4, 4)),), cache_step=4), None),
        (lambda: ToDo(factor=0), "factor must be a positive int"),
        (lambda: ToDo(method="bilinear"), "unknown ToDo method"),
        (lambda: ToDo(max_downsample=-2), "max_downsample must be a positive int"),
    ],
)
def test_config_validation(make, match):
    if match is None:
        make()
    else:
        with pytest.raises(ValueError, match=match):
            make()


def test_call_validation():
    """Bad calls fail while tracing, before anything is compiled (eval_shape only traces)."""
    metric = jax.ShapeDtypeStruct((2, 64, 4), jnp.float32)

    def raises(match, fn, *args):
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(fn, *args)

    raises("needs a PRNG key", lambda m: ToMe().plan(m, (8, 8)), metric)
    no_rand = ToMe(use_rand=False)
    raises("has 64 tokens but the grid 8x9 has 72", lambda m: no_rand.plan(m, (8, 9)), metric)
    raises(r"\[batch, tokens, channels\]", lambda m: ReToM().plan(m[0], (8, 8)), metric)
    raises("must be a float array", lambda m: ReToM().plan(m.astype(jnp.int32), (8, 8)), metric)
    raises("hw must be a pair of positive ints", lambda m: ReToM().plan(m, (64,)), metric)
    raises("hw must be a pair of positive ints", lambda m: ToDo().downsample(m, (8, 8.0)), metric)

    def merge_wrong_batch(m):
        merge, _ = ToMe(use_rand=False).plan(m, (8, 8))
        return merge(m[:1])

    def unmerge_wrong_length(m):
        _, unmerge = ReToM().plan(m, (8, 8))
        return unmerge(m)

    raises(r"merge expects \[2, 64, channels\]", merge_wrong_batch, metric)
    raises(r"unmerge expects \[2, 32, channels\]", unmerge_wrong_length, metric)
    # grids too small for the config
    small = jax.ShapeDtypeStruct((1, 24, 4), jnp.float32)
    tome, retom, todo = ToMe(sx=3, use_rand=False), ReToM(window=(4, 4)), ToDo(factor=4)
    raises("cells of 2x3 do not fit a 1x24 grid", lambda m: tome.plan(m, (1, 24)), small)
    raises("cells of 2x3 do not fit a 1x8 grid", lambda: ToMe(sx=3).check_grid((1, 8)))
    raises("window 4x4 is larger than the 3x8 grid", lambda m: retom.plan(m, (3, 8)), small)
    raises("window 4x4 is larger than the 3x8 grid", lambda: retom.init_cache(1, (3, 8)))
    raises("factor 4 is larger than the 3x8 grid", lambda m: todo.downsample(m, (3, 8)), small)
    ToDo(factor=3).check_grid((3, 8))
    ToMe(sx=3).check_grid((2, 3))
    ReToM(window=(3, 8)).check_grid((3, 8))


@pytest.mark.parametrize("hw,window", [((9, 11), (2, 3)), ((8, 8), (2, 2)), ((7, 5), (3, 1))])
def test_window_tokens_is_the_window_table_gather(hw, window):
    """The reshape/transpose form equals gathering `window_tables`' positions."""
    from retom_jax.merge.algorithms import window_tables, window_tokens

    x = normal(3, (2, hw[0] * hw[1], 5))
    win_pos, _ = window_tables(hw, window)
    np.testing.assert_array_equal(window_tokens(jnp.asarray(x), hw, window), x[:, win_pos])

