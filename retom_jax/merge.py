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
  (``matching="local"``) or into the most similar representative anywhere (``"global"``);
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

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

MATCHINGS = ("local", "global")
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


def _identity(x):
    return x


def _take(x, idx):
    """Per batch element ``x[b][idx[b]]``: ``[B, N, ...]`` with ``[B, K]`` -> ``[B, K, ...]``."""
    return jax.vmap(lambda xb, ib: xb[ib])(x, idx)


def _unit(metric):
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


def plan_functions(plan: Plan) -> tuple[Callable, Callable]:
    """The ``(merge, unmerge)`` pair that carries out a plan."""
    B, N = plan.slot_of.shape
    M = plan.out_pos.shape[1]

    def check(x, n, name):
        if x.ndim != 3 or x.shape[:2] != (B, n):
            raise ValueError(f"{name} expects [{B}, {n}, channels] tokens, got shape {x.shape}")

    def merge(x):
        check(x, N, "merge")
        acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
        acc = _take(x, plan.out_pos).astype(acc_dtype)
        sources = _take(x, plan.merged_pos).astype(acc_dtype)
        acc = jax.vmap(lambda a, s, v: a.at[s].add(v))(acc, plan.merged_slot, sources)
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
    u = _unit(metric)
    sim = jnp.einsum("bsc,bdc->bsd", u[:, src_pos], u[:, dst_pos])
    src_pos, dst_pos = jnp.broadcast_to(src_pos, (B, N - D)), jnp.broadcast_to(dst_pos, (B, D))
    return matching_plan(src_pos, dst_pos, sim.max(-1), sim.argmax(-1), r)


# -- ReToM: representatives of windows ---------------------------------------------------


def _window_tables(hw, window):
    """Static layout: ``win_pos [nW, A]``, the token positions of each whole window
    (windows row-major, tokens row-major inside), and ``outside``, the positions of the
    tokens in no whole window (ascending)."""
    (h, w), (wh, ww) = hw, window
    i, j, a, b = np.ix_(np.arange(h // wh), np.arange(w // ww), np.arange(wh), np.arange(ww))
    win_pos = ((i * wh + a) * w + (j * ww + b)).reshape((h // wh) * (w // ww), wh * ww)
    outside = np.setdiff1d(np.arange(h * w), win_pos)
    return win_pos.astype(np.int32), outside.astype(np.int32)


def retom_representatives(u, hw, window):
    """``[B, nW]`` int32: each whole window's representative as an index inside the window
    (row-major): the token of highest mean similarity to the window's other tokens.
    ``u``: unit-length tokens ``[B, N, C]``."""
    win_pos, _ = _window_tables(hw, window)
    nW, A = win_pos.shape
    if A == 1:
        return jnp.zeros((u.shape[0], nW), jnp.int32)
    tokens = u[:, win_pos]  # [B, nW, A, C]
    sim = jnp.einsum("bwkc,bwlc->bwkl", tokens, tokens)
    others = jnp.where(np.eye(A, dtype=bool), 0.0, sim).sum(-1) / (A - 1)
    return jnp.argmax(others, axis=-1).astype(jnp.int32)


def retom_plan(u, hw, window, rep, r: int, matching: str) -> Plan:
    """ReToM's plan given the representatives ``rep [B, nW]`` (the dsts).

    Sources, in this order: each window's other tokens (windows in order), then the tokens
    outside whole windows, which never merge (score ``-inf``). ``"local"``: a source's
    match is its own window's representative; ``"global"``: its most similar one.
    """
    B = u.shape[0]
    win_pos, outside = _window_tables(hw, window)
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
    u_src = _take(u, others.reshape(B, -1))
    if matching == "local":
        u_rep = jnp.repeat(_take(u, rep_pos), A - 1, axis=1)
        score = jnp.sum(u_src * u_rep, axis=-1)
        match = jnp.broadcast_to(jnp.repeat(jnp.arange(nW), A - 1), score.shape)
    else:
        sim = jnp.einsum("bsc,bdc->bsd", u_src, _take(u, rep_pos))
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


# --------------------------------------------------------------------------------------
# 2. The interface the UNet calls
# --------------------------------------------------------------------------------------


def grid_for(latent_hw, num_tokens: int) -> tuple[int, tuple[int, int]]:
    """The downsample level and token grid of a block, as tomesd infers them.

    ``latent_hw`` is the latent's ``(H, W)``; a block with ``num_tokens`` tokens is at
    ``downsample = ceil(sqrt(H * W // num_tokens))`` and its grid is
    ``(ceil(H / downsample), ceil(W / downsample))``.
    """
    H, W = _check_hw(latent_hw, "latent_hw")
    if not _is_int(num_tokens) or not 0 < num_tokens <= H * W:
        raise ValueError(
            f"num_tokens must be an int in [1, {H * W}] for a {H}x{W} latent, got {num_tokens!r}"
        )
    downsample = level_of(latent_hw, num_tokens)
    h, w = level_grid(latent_hw, downsample)
    if h * w != num_tokens:
        raise ValueError(
            f"{num_tokens} tokens do not form a grid of a {H}x{W} latent "
            f"(downsample {downsample} gives {h}x{w} = {h * w} tokens)"
        )
    return downsample, (h, w)


def level_of(latent_hw, num_tokens: int) -> int:
    """tomesd's downsample level of a block of ``num_tokens`` tokens (see `grid_for`)."""
    H, W = latent_hw
    return int(math.ceil(math.sqrt(H * W // num_tokens)))


def level_grid(latent_hw, downsample: int) -> tuple[int, int]:
    """The token grid at a downsample level: the latent's sides divided, rounded up."""
    return tuple(-(-int(s) // downsample) for s in latent_hw)


IDENTITY = (_identity, _identity)


@dataclass(frozen=True)
class BlockMerge:
    """What one transformer block does: a ``(merge, unmerge)`` pair around each branch
    (self-attention, cross-attention, feed-forward; merge after the branch's norm, unmerge
    before its residual add) and ``kv_down``, which pools self-attention's keys and values.
    The default changes nothing."""

    attn: tuple = IDENTITY
    crossattn: tuple = IDENTITY
    mlp: tuple = IDENTITY
    kv_down: Callable | None = None

    @classmethod
    def branches(cls, config, merge, unmerge) -> "BlockMerge":
        """``(merge, unmerge)`` on the branches ``config.merge_attn`` / ``merge_crossattn``
        / ``merge_mlp`` select."""
        on = (config.merge_attn, config.merge_crossattn, config.merge_mlp)
        return cls(*((merge, unmerge) if flag else IDENTITY for flag in on))


class MergeMethod:
    """What every merging method implements (ToMe, ReToM, ToDo, the benchmarks' probes).

    A method is a frozen dataclass with a ``max_downsample`` field: it runs on the blocks
    whose downsample level is at most that. The UNet calls ``check`` before tracing, then
    ``for_block`` once per transformer block; nothing else about the method is its
    business. Methods that carry a selection from one denoising step to the next
    (``carries_cache``) get back at each block the cache they returned there the step
    before; the loop's step counter decides ``use_cache``.
    """

    max_downsample: int
    #: tomesd merges nothing, silently, where no level applies; the others say so
    may_merge_nowhere = False

    def applies(self, downsample: int) -> bool:
        return downsample <= self.max_downsample

    def check_grid(self, hw, downsample: int = 1) -> None:
        """Raise ValueError when the method cannot run on an ``(h, w)`` token grid."""

    def check(self, grids: Mapping, key=None) -> None:
        """Raise ValueError when this method cannot run on a UNet call whose attention
        levels have the token grids ``grids`` (``{downsample: (h, w)}``)."""
        levels = [d for d in grids if self.applies(d)]
        if not levels and not self.may_merge_nowhere:
            raise ValueError(
                f"{type(self).__name__}(max_downsample={self.max_downsample}) merges nowhere "
                f"in this UNet: its attention runs at downsample factors {tuple(grids)} "
                f"(SDXL starts at 2): raise max_downsample")
        for d in levels:
            self.check_grid(grids[d], downsample=d)

    @property
    def carries_cache(self) -> bool:
        """Whether a sampling loop carries this method's selection between UNet calls."""
        return False

    def use_cache(self, step):
        """Whether UNet call ``step`` (0-based, may be traced) reuses the cached selection."""
        return jnp.zeros((), bool)

    def check_state(self, merge_state) -> None:
        """Raise ValueError when a UNet call's ``merge_state`` does not suit this method."""
        if merge_state is not None:
            raise ValueError("merge_state is only used by ReToM(cache_step=...)")

    def at_step(self, step: int) -> "MergeMethod":
        """The configuration a UNet call at denoising step ``step`` runs."""
        return self

    def stages(self) -> list:
        """``[(step, config)]``: each configuration a sampling loop runs, from the step it
        starts at (one, from 0, unless the method changes shape over the steps)."""
        return [(0, self)]

    def segments(self, num_steps: int) -> list:
        """``[(lo, hi, config, reuse)]``: see `loop_segments`."""
        return [(0, num_steps, self, None)]

    def check_steps(self, calls: int, steps: int) -> None:
        """Raise ValueError for step options that never take effect in a loop of ``calls``
        UNet calls (``steps`` asked for)."""

    def windows(self, downsample: int) -> list:
        """``[(step, (rows, cols))]``: the cells this method merges within at a level
        (``applies`` holds), each from the denoising step it starts at. A spatial shard
        boundary must not cut one (`sharding.check_split`). None for methods whose units
        have no fixed shape: ``[]``."""
        return []

    #: whether tokens outside whole windows stay unmerged (the CLI says so, once)
    merges_whole_windows_only = False

    def check_padding(self, batch: int, padded: int, guidance: bool) -> None:
        """Raise ValueError when padding a batch of ``batch`` prompts to ``padded`` (a
        mesh's batch shards) would change what this method computes for the real ones."""

    def for_program(self, reuse) -> "MergeMethod":
        """This config as a compiled loop piece with static ``reuse`` sees it: options
        that only choose the steps (fixed by ``reuse``) set to one value, so that configs
        differing only there share the program."""
        return self

    def for_block(self, tokens, grid, downsample: int, key=None, cache=None,
                  use_cache=False) -> tuple[BlockMerge, object]:
        """``(BlockMerge, new_cache)`` of one transformer block.

        tokens ``[B, N, C]``: the block's input (the similarity metric); ``grid``: its
        ``(h, w)``; ``downsample``: its level (``applies`` holds); ``key``: a PRNG key of
        this block (or None); ``cache``: what this method returned for this block at the
        previous call (None when the call carries no state); ``use_cache``: a bool, static
        or traced, whether to reuse it. ``new_cache`` is None for methods without one.
        """
        raise NotImplementedError


# --------------------------------------------------------------------------------------
# 3. The methods: validate the fields, delegate to the algorithms
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToMe(MergeMethod):
    """Token merging with one dst per ``sy x sx`` cell; options as ``tomesd.apply_patch``."""

    ratio: float = 0.5
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False

    may_merge_nowhere = True

    def windows(self, downsample: int) -> list:
        return [(0, (self.sy, self.sx))]

    def check_padding(self, batch: int, padded: int, guidance: bool) -> None:
        # tomesd switches the random destinations off for an odd UNet batch; without
        # guidance, padding an odd batch to an even one would switch them on
        if self.use_rand and not guidance and batch % 2 and padded % 2 == 0:
            raise ValueError(
                f"ToMe(use_rand=True) on an odd batch of {batch} without guidance runs "
                f"without randomness (as tomesd), but the mesh pads it to {padded}: use an "
                f"even batch, guidance, or ToMe(use_rand=False)")

    def __post_init__(self):
        _check_positive_int(self.sx, "sx")
        _check_positive_int(self.sy, "sy")
        _check_ratio(self.ratio, [self.sx * self.sy], f"{self.sy}x{self.sx} cells")
        if not isinstance(self.use_rand, bool):
            raise ValueError(f"use_rand must be a bool, got {self.use_rand!r}")
        _check_flags(self)

    def check_grid(self, hw, downsample: int = 1) -> None:
        h, w = _check_hw(hw)
        if h < self.sy or w < self.sx:
            raise ValueError(f"ToMe cells of {self.sy}x{self.sx} do not fit a {h}x{w} grid")

    def check(self, grids, key=None) -> None:
        super().check(grids, key)
        if self.use_rand and key is None and any(self.applies(d) for d in grids):
            raise ValueError("ToMe(use_rand=True) draws random destinations: pass "
                             "key=jax.random.key(...) (or use_rand=False)")

    def dst_mask(self, hw, key=None):
        """``[h * w]`` bool, True at the dst tokens (see `tome_dst_mask`)."""
        return tome_dst_mask(_check_hw(hw), (self.sy, self.sx), key)

    def plan(self, metric, hw, key=None, *, downsample: int = 1):
        """``(merge, unmerge)`` for tokens on an ``(h, w)`` grid, matched by ``metric``.

        ``key`` draws the dst cells when ``use_rand`` (required then, whatever the batch).
        As tomesd does, randomness is switched off for an odd batch: the key is then
        ignored. ``downsample`` is accepted for symmetry with ReToM and unused.
        """
        B, N = _check_tokens(metric, hw, "metric")
        self.check_grid(hw)
        if self.use_rand and key is None:
            raise ValueError("ToMe(use_rand=True) needs a PRNG key: plan(metric, hw, key)")
        D = (hw[0] // self.sy) * (hw[1] // self.sx)
        r = min(int(N * self.ratio), N - D)
        if r <= 0:
            return IDENTITY
        key = key if self.use_rand and B % 2 == 0 else None
        return plan_functions(tome_plan(metric, tuple(hw), (self.sy, self.sx), r, key))

    def for_block(self, tokens, grid, downsample, key=None, cache=None, use_cache=False):
        return BlockMerge.branches(self, *self.plan(tokens, grid, key=key)), None


@dataclass(frozen=True)
class ReToM(MergeMethod):
    """Merging into per-window representative tokens (arXiv 2507.12771).

    window:     ``(wh, ww)``, or per level a mapping ``{downsample: (wh, ww)}`` (stored
                as a sorted tuple of ``(downsample, (wh, ww))`` pairs).
    matching:   ``"local"`` (a source merges into its own window's representative) or
                ``"global"`` (into its most similar representative, as ToMe's matching).
    cache_step: denoising step (0-based) whose selection is reused at every later step;
                None recomputes it at every step.
    cache:      what is reused: ``"representatives"`` or the whole ``"plan"``.
    schedule:   windows that change over the denoising steps: ``((step, window), ...)``
                with increasing steps >= 1, each window a pair or a per-level mapping as
                ``window``; from ``step`` on (0-based UNet call index, as ``cache_step``)
                that window replaces the previous one. Window shapes are static, so a
                sampling loop runs one compiled piece per window (``loop_segments``; the
                pipeline does this) and a single UNet call needs ``at_step(step)``. With
                ``cache_step``, every change must come at or before it: the cached
                selection belongs to one window layout.
    """

    ratio: float = 0.5
    window: tuple = (2, 2)
    matching: str = "local"
    cache_step: int | None = None
    cache: str = "representatives"
    max_downsample: int = 1
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    schedule: tuple = ()

    def __post_init__(self):
        window, schedule = _parse_windows(self.window, self.schedule)
        object.__setattr__(self, "window", window)
        object.__setattr__(self, "schedule", schedule)
        shapes = sorted({s for spec in self._specs() for s in _shapes(spec)})
        _check_ratio(self.ratio, [a * b for a, b in shapes], f"windows {shapes}")
        if self.matching not in MATCHINGS:
            raise ValueError(f"unknown matching {self.matching!r}; choose one of {MATCHINGS}")
        if self.cache not in CACHES:
            raise ValueError(f"unknown cache {self.cache!r}; choose one of {CACHES}")
        if self.cache_step is not None and (not _is_int(self.cache_step) or self.cache_step < 0):
            raise ValueError(f"cache_step must be None or an int >= 0, got {self.cache_step!r}")
        if self.cache_step is not None and schedule and schedule[-1][0] > self.cache_step:
            raise ValueError(
                f"the window schedule changes at step {schedule[-1][0]}, after cache_step "
                f"{self.cache_step}: the cached selection would not fit the new windows "
                f"(put every change at or before cache_step)")
        _check_flags(self)

    # -- windows

    def _specs(self):
        return [self.window] + [spec for _, spec in self.schedule]

    @property
    def per_level(self) -> bool:
        return isinstance(self.window[0], tuple)

    merges_whole_windows_only = True

    def windows(self, downsample: int) -> list:
        return [(step, self.at_step(step).window_for(downsample))
                for step in [0] + [start for start, _ in self.schedule]]

    def window_at(self, step: int):
        """The window (a pair or per-level pairs) in force at denoising step ``step``."""
        if not _is_int(step) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        window = self.window
        for start, spec in self.schedule:
            if step >= start:
                window = spec
        return window

    def at_step(self, step: int) -> "ReToM":
        """This config with the window in force at ``step`` and no schedule: what a UNet
        call at that step runs (the same object when there is no schedule)."""
        if not self.schedule:
            return self
        return dataclasses.replace(self, window=self.window_at(step), schedule=())

    def window_for(self, downsample: int = 1) -> tuple[int, int]:
        if self.schedule:
            raise ValueError(
                "this ReToM changes windows over the steps (schedule=...): take "
                "at_step(step) for the call at that step (the pipeline does this itself)")
        if not self.per_level:
            return self.window
        levels = dict(self.window)
        if downsample not in levels:
            raise ValueError(
                f"ReToM has no window for downsample {downsample}; windows are given for "
                f"downsample {sorted(levels)}"
            )
        return levels[downsample]

    def check_grid(self, hw, downsample: int = 1) -> None:
        """Every window this config uses at ``downsample`` (scheduled ones too) fits."""
        h, w = _check_hw(hw)
        for step in [0] + [s for s, _ in self.schedule]:
            wh, ww = self.at_step(step).window_for(downsample)
            if wh > h or ww > w:
                at = f" (from step {step})" if step else ""
                raise ValueError(f"ReToM window {wh}x{ww}{at} is larger than the {h}x{w} grid")

    def check(self, grids, key=None) -> None:
        if self.schedule:
            raise ValueError(
                "ReToM(schedule=...) changes windows over the denoising steps and a UNet call "
                "is one step: pass merge.at_step(step) (the pipeline splits its loop itself)")
        super().check(grids, key)

    def check_steps(self, calls: int, steps: int) -> None:
        _check_retom_steps(self, calls, steps)

    def stages(self) -> list:
        return [(step, self.at_step(step)) for step in [0] + [s for s, _ in self.schedule]]

    def for_program(self, reuse) -> "ReToM":
        # with a static reuse, cache_step decides nothing inside the piece
        if reuse is None or self.cache_step is None or self.schedule:
            return self
        return dataclasses.replace(self, cache_step=0)

    def segments(self, num_steps: int) -> list:
        return _retom_segments(self, num_steps)

    def _r(self, hw, downsample) -> int:
        """Tokens merged: ``int(N * ratio)``, at most the number of window sources."""
        (h, w), (wh, ww) = hw, self.window_for(downsample)
        return min(int(h * w * self.ratio), (h // wh) * (w // ww) * (wh * ww - 1))

    # -- planning

    def representatives(self, metric, hw, *, downsample: int = 1):
        """``[B, nW]`` int32: each whole window's representative (`retom_representatives`)."""
        _check_tokens(metric, hw, "metric")
        self.check_grid(hw, downsample)
        return retom_representatives(_unit(metric), tuple(hw), self.window_for(downsample))

    def plan(self, metric, hw, key=None, *, downsample: int = 1):
        """``(merge, unmerge)`` for tokens on an ``(h, w)`` grid, matched by ``metric``.
        ``key`` is accepted for symmetry with ToMe and unused (the rule is deterministic)."""
        _check_tokens(metric, hw, "metric")
        self.check_grid(hw, downsample)
        r = self._r(hw, downsample)
        if r <= 0:
            return IDENTITY
        window, u = self.window_for(downsample), _unit(metric)
        rep = retom_representatives(u, tuple(hw), window)
        return plan_functions(retom_plan(u, tuple(hw), window, rep, r, self.matching))

    # -- reuse over denoising steps

    @property
    def carries_cache(self) -> bool:
        return self.cache_step is not None

    def check_state(self, merge_state) -> None:
        if self.cache_step is None:
            return super().check_state(merge_state)
        if merge_state is None:  # it would select afresh at every call: caching dropped
            raise ValueError(
                f"ReToM(cache_step={self.cache_step}) reuses representatives across calls "
                f"through merge_state: pass merge_state=unet.init_merge_state(...) and feed "
                f"each returned state to the next call (or drop cache_step)")

    def use_cache(self, step):
        """Whether step ``step`` (0-based, may be traced) reuses the cached selection."""
        if self.cache_step is None:
            return jnp.zeros((), bool)
        return jnp.asarray(step) > self.cache_step

    def init_cache(self, batch: int, hw, *, downsample: int = 1):
        """Zeros in the shape of what is reused: ``{"representatives": int32 [B, nW]}``,
        or ``{"plan": Plan}`` when ``cache="plan"``. It holds no usable selection until a
        ``plan_cached`` call with ``use_cache`` False (the caching step) has filled it."""
        _check_positive_int(batch, "batch")
        self.check_grid(hw, downsample)
        (h, w), (wh, ww) = _check_hw(hw), self.window_for(downsample)
        N, nW, r = h * w, (h // wh) * (w // ww), self._r(hw, downsample)
        if self.cache == "representatives":
            return {"representatives": jnp.zeros((batch, nW), jnp.int32)}
        zeros = lambda n: jnp.zeros((batch, n), jnp.int32)  # noqa: E731
        return {"plan": Plan(zeros(N - r), zeros(r), zeros(r), zeros(N), zeros(N - r))}

    def plan_cached(self, metric, hw, cache, use_cache, *, downsample: int = 1):
        """``(merge, unmerge, new_cache)``: the plan from the cached selection where
        ``use_cache`` (a bool scalar, may be traced) is True, else the fresh one;
        ``new_cache`` holds the selection used."""
        B, _ = _check_tokens(metric, hw, "metric")
        self.check_grid(hw, downsample)
        _check_cache(self, cache, B, hw, downsample)
        use_cache = jnp.asarray(use_cache)
        if use_cache.shape != () or use_cache.dtype != bool:
            raise ValueError(
                f"use_cache must be a bool scalar, got {use_cache.dtype}{list(use_cache.shape)}"
            )
        r = self._r(hw, downsample)
        if r <= 0:
            return _identity, _identity, cache
        window, u = self.window_for(downsample), _unit(metric)
        rep = retom_representatives(u, tuple(hw), window)
        if self.cache == "representatives":
            rep = jnp.where(use_cache, cache["representatives"], rep)
            plan = retom_plan(u, tuple(hw), window, rep, r, self.matching)
            new_cache = {"representatives": rep}
        else:
            fresh = retom_plan(u, tuple(hw), window, rep, r, self.matching)
            plan = jax.tree.map(lambda c, f: jnp.where(use_cache, c, f), cache["plan"], fresh)
            new_cache = {"plan": plan}
        merge, unmerge = plan_functions(plan)
        return merge, unmerge, new_cache

    def for_block(self, tokens, grid, downsample, key=None, cache=None, use_cache=False):
        if self.cache_step is None:
            return BlockMerge.branches(self, *self.plan(tokens, grid, downsample=downsample)), None
        if cache is None:  # no state given: plan afresh, return the cache a first step leaves
            cache = self.init_cache(tokens.shape[0], grid, downsample=downsample)
            use_cache = jnp.array(False)
        m, u, new = self.plan_cached(tokens, grid, cache, use_cache, downsample=downsample)
        return BlockMerge.branches(self, m, u), new


@dataclass(frozen=True)
class ToDo(MergeMethod):
    """Token downsampling (arXiv 2402.13573): keys/values pooled to ``(h//f, w//f)``.

    ``"nearest"`` picks input ``floor(i * h / (h // f))`` per axis, as
    ``F.interpolate(..., mode="nearest")`` does: the top-left token of each ``f x f`` cell
    when ``f`` divides the grid. ``"avg"`` averages each cell (adaptive average pooling,
    ``F.interpolate(..., mode="area")``; cells overlap by a token when ``f`` does not
    divide the grid).
    """

    factor: int = 2
    method: str = "nearest"
    max_downsample: int = 1

    def __post_init__(self):
        _check_positive_int(self.factor, "factor")
        _check_positive_int(self.max_downsample, "max_downsample")
        if self.method not in TODO_METHODS:
            raise ValueError(f"unknown ToDo method {self.method!r}; choose one of {TODO_METHODS}")

    def windows(self, downsample: int) -> list:
        return [(0, (self.factor, self.factor))]

    def check_grid(self, hw, downsample: int = 1) -> None:
        h, w = _check_hw(hw)
        if self.factor > h or self.factor > w:
            raise ValueError(f"ToDo factor {self.factor} is larger than the {h}x{w} grid")

    def downsample(self, x, hw):
        """``[B, h * w, C] -> [B, (h // f) * (w // f), C]`` (`todo_pool`)."""
        _check_tokens(x, hw, "x")
        self.check_grid(hw)
        return todo_pool(x, tuple(hw), self.factor, self.method)

    def for_block(self, tokens, grid, downsample, key=None, cache=None, use_cache=False):
        return BlockMerge(kv_down=lambda t: self.downsample(t, grid)), None


# --------------------------------------------------------------------------------------
# 4. Window schedules and the sampling loop's segments
# --------------------------------------------------------------------------------------


def loop_segments(merge, num_steps: int):
    """The static pieces of a sampling loop of ``num_steps`` UNet calls:
    ``[(lo, hi, config, reuse)]``, steps ``lo <= i < hi`` each running ``config`` (no
    schedule left in it). ``reuse`` (for ``UNet.apply``) is None without a cache carried
    between calls, else whether those steps reuse the cached selection. Pieces start at 0,
    at each window change of a ReToM schedule and after ReToM's ``cache_step``."""
    _check_positive_int(num_steps, "num_steps")
    if merge is None:
        return [(0, num_steps, None, None)]
    return merge.segments(num_steps)


def _retom_segments(merge: ReToM, num_steps: int):
    cuts = {0, num_steps} | {s for s, _ in merge.schedule if s < num_steps}
    if merge.cache_step is not None:
        cuts.add(min(merge.cache_step + 1, num_steps))
    cuts = sorted(cuts)
    return [(lo, hi, merge.at_step(lo),
             None if merge.cache_step is None else lo > merge.cache_step)
            for lo, hi in zip(cuts, cuts[1:])]


def _parse_windows(window, schedule):
    """ReToM's ``window`` and ``schedule`` as stored: a window spec (see `_window_spec`)
    and ``((step, spec), ...)`` with increasing steps >= 1 (from pairs or a mapping)."""
    window = _window_spec(window)
    if isinstance(schedule, Mapping):  # {step: window}: in step order
        items = list(schedule.items())
        schedule = sorted(items) if all(_is_int(k) for k, _ in items) else items
    if not isinstance(schedule, (tuple, list)):
        raise ValueError(f"schedule must be ((step, window), ...), got {schedule!r}")
    normalized = []
    for item in schedule:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"schedule entries are (step, window) pairs, got {item!r}")
        step, spec = item
        if not _is_int(step) or step < 1:
            raise ValueError(f"schedule steps must be ints >= 1 (step 0 uses window), "
                             f"got {step!r}")
        if normalized and step <= normalized[-1][0]:
            raise ValueError(f"schedule steps must increase, got {step} after "
                             f"{normalized[-1][0]}")
        normalized.append((int(step), _window_spec(spec, f"window at step {step}")))
    return window, tuple(normalized)


def _window_pair(value, name):
    ok = isinstance(value, (tuple, list)) and len(value) == 2
    if not ok or not all(_is_int(v) for v in value):
        raise ValueError(f"{name} must be a pair of ints (wh, ww), got {value!r}")
    if value[0] <= 0 or value[1] <= 0:
        raise ValueError(f"{name} dimensions must be positive, got {tuple(value)!r}")
    return int(value[0]), int(value[1])


def _window_spec(window, name="window"):
    """A window as stored: ``(wh, ww)``, or per level ``((downsample, (wh, ww)), ...)``
    sorted by downsample (from a mapping or pairs)."""
    if isinstance(window, Mapping):
        window = tuple(window.items())
    if not (isinstance(window, (tuple, list)) and window and all(
            isinstance(item, (tuple, list)) for item in window)):
        return _window_pair(window, name)
    levels = {}
    for item in window:
        if len(item) != 2 or not _is_int(item[0]) or item[0] <= 0:
            raise ValueError(
                f"per-level windows map a positive downsample to (wh, ww), got {item!r}")
        if int(item[0]) in levels:
            raise ValueError(f"{name} given twice for downsample {item[0]}")
        levels[int(item[0])] = _window_pair(item[1], f"{name} for downsample {item[0]}")
    return tuple(sorted(levels.items()))


def _shapes(spec):
    """The window shapes of a stored window spec."""
    return [s for _, s in spec] if isinstance(spec[0], tuple) else [spec]


def _check_retom_steps(merge: ReToM, calls: int, steps: int):
    """ReToM step options that would never take effect in a loop of ``calls`` UNet calls
    (``steps`` asked for; PLMS makes one call more) are errors, not silently ignored."""
    last = calls - 1
    loop = (f"{steps} steps run UNet calls 0-{last}" if calls == steps else
            f"{steps} steps run {calls} UNet calls, 0-{last}")
    if merge.cache_step is not None and merge.cache_step >= last:
        raise ValueError(
            f"ReToM cache_step={merge.cache_step} is never used: {loop}, and the cached "
            f"representatives are reused only by calls after cache_step (use a cache_step "
            f"below {last}, or none)")
    late = [s for s, _ in merge.schedule if s > last]
    if late:
        raise ValueError(f"ReToM's window schedule changes at step {late[0]}, which never "
                         f"comes: {loop}")
    previous = merge.window
    for step, window in merge.schedule:
        if window == previous:
            raise ValueError(f"ReToM's window schedule changes nothing at step {step}: the "
                             f"window in force there is already {window}")
        previous = window


# --------------------------------------------------------------------------------------
# 5. Argument checks
# --------------------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _check_hw(hw, name="hw") -> tuple[int, int]:
    ok = isinstance(hw, (tuple, list)) and len(hw) == 2
    if not ok or not all(_is_int(v) and v > 0 for v in hw):
        raise ValueError(f"{name} must be a pair of positive ints (height, width), got {hw!r}")
    return int(hw[0]), int(hw[1])


def _check_tokens(x, hw, name) -> tuple[int, int]:
    """Validate a ``[B, N, C]`` token array on an ``(h, w)`` grid; return ``(B, N)``."""
    h, w = _check_hw(hw)
    if getattr(x, "ndim", None) != 3:
        raise ValueError(f"{name} must be a [batch, tokens, channels] array, got shape "
                         f"{getattr(x, 'shape', None)}")
    if x.shape[1] != h * w:
        raise ValueError(f"{name} has {x.shape[1]} tokens but the grid {h}x{w} has {h * w}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a float array, got {x.dtype}")
    return x.shape[0], x.shape[1]


def _check_positive_int(value, name):
    if not _is_int(value) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_ratio(ratio, areas, what):
    """``ratio`` must lie in ``[0, 1 - 1/area]`` for every cell/window area."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
        raise ValueError(f"ratio must be a finite number, got {ratio!r}")
    top = min(1.0 - 1.0 / a for a in areas)
    if not 0.0 <= ratio <= top + 1e-12:
        raise ValueError(
            f"ratio must be in [0, {top:.4g}] (1 - 1/area for {what}), got {ratio!r}"
        )


def _check_flags(cfg):
    for name, value in (("merge_attn", cfg.merge_attn), ("merge_crossattn", cfg.merge_crossattn),
                        ("merge_mlp", cfg.merge_mlp)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a bool, got {value!r}")
    _check_positive_int(cfg.max_downsample, "max_downsample")


def _check_cache(merge: ReToM, cache, batch, hw, downsample):
    """``cache`` must have the structure, shapes and dtypes ``init_cache`` gives."""
    expected = jax.eval_shape(lambda: merge.init_cache(batch, hw, downsample=downsample))

    def describe(tree):
        return jax.tree.map(lambda a: (jnp.shape(a), jnp.result_type(a).name), tree)

    if jax.tree.structure(cache) != jax.tree.structure(expected) or (
        describe(cache) != describe(expected)
    ):
        raise ValueError(
            f"cache does not fit this ReToM config and grid: expected {describe(expected)}, "
            f"got {describe(cache)} (make it with init_cache)"
        )
