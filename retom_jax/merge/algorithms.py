"""Token merging for the UNet's transformer blocks: ToMe, ReToM and ToDo.

All three shrink the token sequence an attention layer works on. On a block whose ``h x w``
token grid is at most ``max_downsample`` times smaller than the latent:

- **ToMe** (token merging for SD, the ``tomesd`` baseline). The grid is cut into
  ``sy x sx`` cells with one destination (dst) token each, at a random place or top-left;
  every other token is a source. Each source finds its most similar dst (cosine
  similarity, bipartite soft matching); the ``r = int(N * ratio)`` sources with the best
  matches are averaged into their dst.
- **ReToM** (local representative tokens). The grid is cut into ``wh x ww`` windows; each
  window's dst is its *representative*: the token whose mean cosine similarity to the
  window's other tokens is highest. A source merges into its own window's representative
  (``matching="local"``), into the most similar representative of the windows within
  ``reach`` window steps of its own (``"near"``) or into the most similar representative
  anywhere (``"global"``);
  either way the ``r`` best-matched sources over the whole grid are merged, and tokens
  outside whole windows never merge. The window shape may differ per UNet level and change
  over the denoising steps; the representatives (or the whole matching) can be computed at
  one step (``cache_step``) and reused at every later step.
- **ToDo** (token downsampling). No matching: keys and values of self-attention are pooled
  on the grid; queries keep every token, so nothing needs unmerging.

ToMe and ReToM produce a :class:`Plan` (index arrays only) and turn it into two functions:
``merge`` ``[B, N, C] -> [B, N - r, C]`` (the kept sources, best-matched first, then one
token per dst, each the plain mean of the dst and the sources merged into it) and
``unmerge`` ``[B, N - r, C] -> [B, N, C]`` (every token takes the output of the slot it
went into). Every shape is decided by static numbers (grid, cell or window, ``r``); the
index values are computed from the data inside ``jax.jit``, without gradients (gradients
flow through ``merge`` and ``unmerge`` to the tokens). Similarities are computed in float32
whatever the token dtype; ties go to the lowest index everywhere (a representative inside
its window, a dst in ``argmax``, a source in the ranking).

The file reads top to bottom: the algorithms as pure functions; the interface the UNet
calls (:class:`MergeMethod`, :class:`BlockMerge`); the three configuration classes, frozen
dataclasses (hashable, so static arguments of jitted functions) that validate their fields
(``ValueError`` at trace time) and delegate to the algorithms; then the helpers for the
window schedule and the sampling loop's segments, and the argument checks.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

MATCHINGS = ("local", "near", "global")
CACHES = ("representatives", "plan")
TODO_METHODS = ("nearest", "avg")


# --------------------------------------------------------------------------------------
# 1. The algorithms (pure functions of arrays and static numbers)
# --------------------------------------------------------------------------------------


class Plan(NamedTuple):
    """Index arrays of one merge, batch-first. ``M = N - r`` output slots.

    out_pos:     [B, M] the token each output slot starts from (kept sources, then dsts)
    merged_pos:  [B, r] the merged sources ...
    merged_slot: [B, r] ... and the slot each is added into
    slot_of:     [B, N] the slot every token ends up in (what unmerge gathers)
    count:       [B, M] how many tokens are averaged in each slot
    """

    out_pos: jax.Array
    merged_pos: jax.Array
    merged_slot: jax.Array
    slot_of: jax.Array
    count: jax.Array


def identity(x):
    return x


def _take(x, idx):
    """Per batch element ``x[b][idx[b]]``: ``[B, N, ...]`` with ``[B, K]`` -> ``[B, K, ...]``."""
    return jax.vmap(lambda xb, ib: xb[ib])(x, idx)


def unit_rows(metric):
    """Tokens scaled to unit length, in float32 and without gradient."""
    m = jax.lax.stop_gradient(metric).astype(jnp.promote_types(metric.dtype, jnp.float32))
    return m / jnp.maximum(jnp.linalg.norm(m, axis=-1, keepdims=True), 1e-12)


def matching_plan(src_pos, dst_pos, score, match, r: int) -> Plan:
    """Merge the ``r`` best-scoring sources into the dst they matched.

    src_pos [B, S], dst_pos [B, D]: token positions of the sources and destinations.
    score [B, S]: each source's similarity to its match (``-inf``: never merged).
    match [B, S]: index into ``dst_pos`` of each source's dst.
    Sources are ranked by score, best first, ties in ``src_pos`` order; the output slots
    are the kept sources in that ranking, then the dsts in ``dst_pos`` order.
    """
    B, S = score.shape
    D = dst_pos.shape[1]
    N, M = S + D, S + D - r
    order = jnp.argsort(-score, axis=1, stable=True)
    merged, kept = order[:, :r], order[:, r:]
    out_pos = jnp.concatenate([jnp.take_along_axis(src_pos, kept, 1), dst_pos], axis=1)
    merged_pos = jnp.take_along_axis(src_pos, merged, 1)
    merged_slot = (S - r) + jnp.take_along_axis(match, merged, 1)

    def inverse(out_b, pos_b, slot_b):
        slot_of = jnp.zeros(N, jnp.int32).at[out_b].set(jnp.arange(M, dtype=jnp.int32))
        return slot_of.at[pos_b].set(slot_b)

    slot_of = jax.vmap(inverse)(out_pos, merged_pos, merged_slot)
    count = jax.vmap(lambda s: jnp.ones(M, jnp.int32).at[s].add(1))(merged_slot)
    return Plan(out_pos.astype(jnp.int32), merged_pos.astype(jnp.int32),
                merged_slot.astype(jnp.int32), slot_of, count)


def plan_functions(plan: Plan, windows=None) -> tuple[Callable, Callable]:
    """The ``(merge, unmerge)`` pair that carries out a plan.

    ``windows``: ``(hw, window)`` when the plan's dsts are one per whole window (in window
    order, the last ``nW`` slots) and every source merged into a dst lies in its window
    (ReToM's local matching). Then a dst slot is a masked sum over its window's tokens
    (a reshape of the grid and a reduction) instead of a scatter-add of the merged
    sources: the same means, summed in window order.
    """
    B, N = plan.slot_of.shape
    M = plan.out_pos.shape[1]

    def check(x, n, name):
        if x.ndim != 3 or x.shape[:2] != (B, n):
            raise ValueError(f"{name} expects [{B}, {n}, channels] tokens, got shape {x.shape}")

    hw, window, nW, into = None, None, 0, None
    if windows is not None:
        hw, window = windows
        slots = window_tokens(plan.slot_of[..., None], hw, window)[..., 0]  # [B, nW, A]
        nW = slots.shape[1]
        into = slots == (M - nW) + jnp.arange(nW)[:, None]  # in the window's dst

    def merge(x):
        check(x, N, "merge")
        acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
        if windows is None:
            acc = _take(x, plan.out_pos).astype(acc_dtype)
            sources = _take(x, plan.merged_pos).astype(acc_dtype)
            acc = jax.vmap(lambda a, s, v: a.at[s].add(v))(acc, plan.merged_slot, sources)
        else:
            kept = _take(x, plan.out_pos[:, :M - nW]).astype(acc_dtype)
            grouped = jnp.where(into[..., None], window_tokens(x, hw, window), 0)
            acc = jnp.concatenate([kept, grouped.astype(acc_dtype).sum(2)], axis=1)
        return (acc / plan.count[..., None].astype(acc_dtype)).astype(x.dtype)

    def unmerge(x):
        check(x, M, "unmerge")
        return _take(x, plan.slot_of)

    return merge, unmerge


# -- ToMe: one dst per cell, bipartite soft matching (tomesd) ---------------------------


def tome_dst_mask(hw, cell, key=None):
    """``[h * w]`` bool, True at the dst tokens: one per whole ``(sy, sx)`` cell, at a
    random place drawn from ``key`` (the same for every batch element), or top-left if key
    is None. Tokens outside whole cells are sources."""
    (h, w), (sy, sx) = hw, cell
    hc, wc = h // sy, w // sx
    if key is None:
        pick = jnp.zeros((hc, wc), jnp.int32)
    else:
        pick = jax.random.randint(key, (hc, wc), 0, sy * sx)
    rows = jnp.arange(hc)[:, None] * sy + pick // sx
    cols = jnp.arange(wc)[None, :] * sx + pick % sx
    return jnp.zeros((h, w), bool).at[rows, cols].set(True).reshape(h * w)


def tome_plan(metric, hw, cell, r: int, key=None) -> Plan:
    """ToMe's plan: every source matched to its most similar dst (``tome_dst_mask``), the
    ``r`` best matches merged."""
    B, N = metric.shape[:2]
    is_dst = tome_dst_mask(hw, cell, key)
    D = (hw[0] // cell[0]) * (hw[1] // cell[1])
    order = jnp.argsort(jnp.where(is_dst, 0, 1), stable=True)  # dsts, then sources
    dst_pos, src_pos = order[:D], order[D:]  # each in token order
    u = unit_rows(metric)
    sim = jnp.einsum("bsc,bdc->bsd", u[:, src_pos], u[:, dst_pos])
    src_pos, dst_pos = jnp.broadcast_to(src_pos, (B, N - D)), jnp.broadcast_to(dst_pos, (B, D))
    return matching_plan(src_pos, dst_pos, sim.max(-1), sim.argmax(-1), r)


# -- ReToM: representatives of windows ---------------------------------------------------


def window_tables(hw, window):
    """Static layout: ``win_pos [nW, A]``, the token positions of each whole window
    (windows row-major, tokens row-major inside), and ``outside``, the positions of the
    tokens in no whole window (ascending)."""
    (h, w), (wh, ww) = hw, window
    i, j, a, b = np.ix_(np.arange(h // wh), np.arange(w // ww), np.arange(wh), np.arange(ww))
    win_pos = ((i * wh + a) * w + (j * ww + b)).reshape((h // wh) * (w // ww), wh * ww)
    outside = np.setdiff1d(np.arange(h * w), win_pos)
    return win_pos.astype(np.int32), outside.astype(np.int32)


def neighbour_windows(hw, window, reach: int = 1):
    """Static: ``near [nW, K]``, for each whole window the indices of the whole windows
    within ``reach`` window steps (itself and its up to ``(2 reach + 1)**2 - 1``
    neighbours), ascending, padded with its own index, and ``valid [nW, K]``, False at the
    padding (``K = (2 reach + 1)**2``, or fewer on a small grid of windows)."""
    (h, w), (wh, ww) = hw, window
    nh, nw = h // wh, w // ww
    rows = []
    for i in range(nh):
        for j in range(nw):
            rows.append([a * nw + b for a in range(max(i - reach, 0), min(i + reach + 1, nh))
                         for b in range(max(j - reach, 0), min(j + reach + 1, nw))])
    K = max(len(r) for r in rows)
    near = np.array([r + [k] * (K - len(r)) for k, r in enumerate(rows)], np.int32)
    valid = np.array([[True] * len(r) + [False] * (K - len(r)) for r in rows])
    return near, valid


def retom_representatives(u, hw, window):
    """``[B, nW]`` int32: each whole window's representative as an index inside the window
    (row-major): the token of highest mean similarity to the window's other tokens.
    ``u``: unit-length tokens ``[B, N, C]``."""
    tokens = window_tokens(u, hw, window)  # [B, nW, A, C]
    B, nW, A, _ = tokens.shape
    if A == 1:
        return jnp.zeros((B, nW), jnp.int32)
    # Sum over the others l of u_k . u_l = u_k . (window sum - u_k): elementwise products
    # reduced over the channels (lane-wide vector work), not A x A matmuls per window,
    # which a TPU's MXU would pad to whole 8 x 128 tiles.
    others = jnp.sum(tokens * (tokens.sum(2, keepdims=True) - tokens), axis=-1) / (A - 1)
    return jnp.argmax(others, axis=-1).astype(jnp.int32)


def window_tokens(x, hw, window):
    """``[B, h * w, C] -> [B, nW, A, C]``: the tokens of each whole window in
    `window_tables` order, by a reshape and a transpose of the grid (no gather)."""
    (h, w), (wh, ww) = hw, window
    B, C = x.shape[0], x.shape[-1]
    nh, nw = h // wh, w // ww
    grid = x.reshape(B, h, w, C)[:, :nh * wh, :nw * ww]
    grid = grid.reshape(B, nh, wh, nw, ww, C).transpose(0, 1, 3, 2, 4, 5)
    return grid.reshape(B, nh * nw, wh * ww, C)


def retom_plan(u, hw, window, rep, r: int, matching: str, reach: int = 1) -> Plan:
    """ReToM's plan given the representatives ``rep [B, nW]`` (the dsts).

    Sources, in this order: each window's other tokens (windows in order), then the tokens
    outside whole windows, which never merge (score ``-inf``). ``"local"``: a source's
    match is its own window's representative; ``"near"``: the most similar one of the
    windows within ``reach`` window steps (`neighbour_windows`; ties to the lowest window
    index); ``"global"``: the most similar one.
    """
    B = u.shape[0]
    win_pos, outside = window_tables(hw, window)
    n_out = len(outside)
    nW, A = win_pos.shape
    windows = jnp.arange(nW)[:, None]
    rep_pos = jnp.asarray(win_pos)[windows[:, 0], rep]  # [B, nW]: the dsts
    # The A - 1 other tokens of each window: in-window indices 0..A-2, each at or after
    # the representative shifted up by one, so that ``rep`` itself is skipped.
    k = jnp.arange(A - 1)
    others = jnp.asarray(win_pos)[windows, k + (k >= rep[..., None])]  # [B, nW, A-1]
    src_pos = jnp.concatenate(
        [others.reshape(B, -1), jnp.broadcast_to(outside, (B, n_out))], axis=1
    )
    # Windows by reshape (no token gather); each window's representative picked by a
    # one-hot select over its A tokens. Similarities are elementwise products summed over
    # the channels: the per-window products are too small for a TPU's MXU tiles.
    tokens = window_tokens(u, hw, window)  # [B, nW, A, C]
    pick = jnp.arange(A) == rep[..., None]  # [B, nW, A]
    u_rep = jnp.sum(jnp.where(pick[..., None], tokens, 0.0), axis=2)  # [B, nW, C]
    if matching == "local":
        sim = jnp.sum(tokens * u_rep[:, :, None], axis=-1)  # [B, nW, A]
        score = jnp.take_along_axis(sim, k + (k >= rep[..., None]), axis=2).reshape(B, -1)
        match = jnp.broadcast_to(jnp.repeat(jnp.arange(nW), A - 1), score.shape)
    elif matching == "near":
        near, valid = neighbour_windows(hw, window, reach)  # [nW, K]
        cand = u_rep[:, near]  # [B, nW, K, C]: the reps of the nearby windows
        u_src = jnp.take_along_axis(tokens, (k + (k >= rep[..., None]))[..., None], axis=2)
        sim = jnp.sum(u_src[:, :, :, None] * cand[:, :, None], axis=-1)  # [B, nW, A-1, K]
        sim = jnp.where(valid[:, None, :], sim, -jnp.inf)
        best = sim.argmax(-1)  # [B, nW, A-1]: ties to the lowest window index
        score = sim.max(-1).reshape(B, -1)
        match = jnp.take_along_axis(jnp.asarray(near)[None], best.reshape(B, nW, -1),
                                    axis=2).reshape(B, -1)
    else:
        u_src = _take(u, others.reshape(B, -1))
        sim = jnp.einsum("bsc,bdc->bsd", u_src, u_rep)  # [B, S, nW]: large, MXU-sized
        score, match = sim.max(-1), sim.argmax(-1)
    score = jnp.concatenate([score, jnp.full((B, n_out), -jnp.inf, score.dtype)], axis=1)
    match = jnp.concatenate([match, jnp.zeros((B, n_out), match.dtype)], axis=1)
    return matching_plan(src_pos, rep_pos, score, match, r)


# -- ToDo: keys and values pooled on the grid -------------------------------------------


def _area_weights(n: int, m: int) -> np.ndarray:
    """``[m, n]`` averaging matrix: output i is the mean of inputs
    ``[floor(i n / m), ceil((i + 1) n / m))`` (adaptive average pooling)."""
    weights = np.zeros((m, n), np.float32)
    for i in range(m):
        lo, hi = (i * n) // m, -((-(i + 1) * n) // m)
        weights[i, lo:hi] = 1.0 / (hi - lo)
    return weights


def todo_pool(x, hw, factor: int, method: str):
    """``[B, h * w, C] -> [B, (h // f) * (w // f), C]``: ``"nearest"`` picks input
    ``floor(i * h / (h // f))`` per axis, ``"avg"`` averages (adaptive average pooling)."""
    if factor == 1:
        return x
    (h, w), (B, _, C) = hw, x.shape
    oh, ow = h // factor, w // factor
    grid = x.reshape(B, h, w, C)
    if method == "nearest":
        rows, cols = (np.arange(oh) * h) // oh, (np.arange(ow) * w) // ow
        out = grid[:, rows][:, :, cols]
    else:
        acc = grid.astype(jnp.promote_types(x.dtype, jnp.float32))
        acc = jnp.einsum("ih,bhwc->biwc", _area_weights(h, oh), acc)
        out = jnp.einsum("jw,biwc->bijc", _area_weights(w, ow), acc).astype(x.dtype)
    return out.reshape(B, oh * ow, C)

