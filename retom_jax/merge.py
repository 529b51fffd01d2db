"""Token merging for the UNet's transformer blocks: ToMe, ReToM and ToDo.

All three shrink the token sequence an attention layer sees. The reference for what they
compute is ``RETOM.md`` (shared notes of the project); in short:

- **ToMe** (token merging for SD, the ``tomesd`` baseline). The ``h x w`` token grid is cut
  into ``sy x sx`` cells with one destination (dst) token each; every other token is a
  source. Each source finds its most similar dst (cosine similarity); the ``r`` sources
  with the best matches are averaged into their dst.
- **ReToM** (local representative tokens). The grid is cut into windows; each window's
  dst is its *representative*, the token with the highest mean similarity to the other
  tokens of the window. Sources merge into their own window's representative (``local``)
  or into the most similar representative anywhere (``global``). The representatives (or
  the whole matching) can be computed at one denoising step and reused afterwards.
- **ToDo** (token downsampling). No matching at all: keys and values are pooled on the
  grid before self-attention; queries keep every token, so nothing needs unmerging.

ToMe and ReToM produce a *plan* from a similarity metric (the block's input tokens) and
turn it into two functions:

- ``merge``:   ``[B, N, C] -> [B, N - r, C]``: the kept sources (best-matched first), then
  one token per dst, each the plain mean of the dst and the sources merged into it;
- ``unmerge``: ``[B, N - r, C] -> [B, N, C]``: every token takes the output of the slot it
  went into, so merged sources receive a copy of their dst's output.

A plan is only index arrays (see `Plan`): which token starts each output slot, which
sources are added into which slot, and the inverse map from token to slot. Every shape
is decided by static numbers (grid, cell or window shape, ``r``); the values are computed
on the device from the data, inside ``jax.jit``, without gradients. Gradients flow
through ``merge`` and ``unmerge`` with respect to the tokens themselves.

Similarities are cosine similarities computed in float32 whatever the token dtype (the
matrix products follow ``jax_default_matmul_precision``). Ties are broken the same way
everywhere: the lowest index wins (a representative inside its window, a dst in
``argmax``, a source in the ranking).

The configuration classes are frozen dataclasses, hashable, so they can be static
arguments of jitted functions; all validation raises ``ValueError`` at trace time.
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
# Grids and validation
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
    downsample = int(math.ceil(math.sqrt(H * W // num_tokens)))
    h, w = int(math.ceil(H / downsample)), int(math.ceil(W / downsample))
    if h * w != num_tokens:
        raise ValueError(
            f"{num_tokens} tokens do not form a grid of a {H}x{W} latent "
            f"(downsample {downsample} gives {h}x{w} = {h * w} tokens)"
        )
    return downsample, (h, w)


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
    for name in ("merge_attn", "merge_crossattn", "merge_mlp"):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{name} must be a bool, got {getattr(cfg, name)!r}")
    _check_positive_int(cfg.max_downsample, "max_downsample")


# --------------------------------------------------------------------------------------
# Plans: the representation shared by ToMe and ReToM
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


def _take(x, idx):
    """Per batch element ``x[b][idx[b]]``: ``[B, N, ...]`` with ``[B, K]`` -> ``[B, K, ...]``."""
    return jax.vmap(lambda xb, ib: xb[ib])(x, idx)


def _unit(metric):
    """Tokens scaled to unit length, in float32 and without gradient."""
    m = jax.lax.stop_gradient(metric).astype(jnp.promote_types(metric.dtype, jnp.float32))
    return m / jnp.maximum(jnp.linalg.norm(m, axis=-1, keepdims=True), 1e-12)


def _matching_plan(src_pos, dst_pos, score, match, r: int) -> Plan:
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


def _identity(x):
    return x


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


# --------------------------------------------------------------------------------------
# ToMe (tomesd)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToMe:
    """Token merging with one dst per ``sy x sx`` cell; options as ``tomesd.apply_patch``."""

    ratio: float = 0.5
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False

    def __post_init__(self):
        _check_positive_int(self.sx, "sx")
        _check_positive_int(self.sy, "sy")
        _check_ratio(self.ratio, [self.sx * self.sy], f"{self.sy}x{self.sx} cells")
        if not isinstance(self.use_rand, bool):
            raise ValueError(f"use_rand must be a bool, got {self.use_rand!r}")
        _check_flags(self)

    def applies(self, downsample: int) -> bool:
        return downsample <= self.max_downsample

    def check_grid(self, hw, downsample: int = 1) -> None:
        h, w = _check_hw(hw)
        if h < self.sy or w < self.sx:
            raise ValueError(f"ToMe cells of {self.sy}x{self.sx} do not fit a {h}x{w} grid")

    def dst_mask(self, hw, key=None):
        """``[h * w]`` bool, True at the dst tokens: one per whole cell, at a random place
        drawn from ``key`` (the same for every batch element), or top-left if key is None.
        Tokens outside whole cells are sources."""
        h, w = _check_hw(hw)
        hc, wc = h // self.sy, w // self.sx
        if key is None:
            pick = jnp.zeros((hc, wc), jnp.int32)
        else:
            pick = jax.random.randint(key, (hc, wc), 0, self.sy * self.sx)
        rows = jnp.arange(hc)[:, None] * self.sy + pick // self.sx
        cols = jnp.arange(wc)[None, :] * self.sx + pick % self.sx
        return jnp.zeros((h, w), bool).at[rows, cols].set(True).reshape(h * w)

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
        h, w = hw
        D = (h // self.sy) * (w // self.sx)
        r = min(int(N * self.ratio), N - D)
        if r <= 0:
            return _identity, _identity
        is_dst = self.dst_mask(hw, key if self.use_rand and B % 2 == 0 else None)
        order = jnp.argsort(jnp.where(is_dst, 0, 1), stable=True)  # dsts, then sources
        dst_pos, src_pos = order[:D], order[D:]  # each in token order
        u = _unit(metric)
        sim = jnp.einsum("bsc,bdc->bsd", u[:, src_pos], u[:, dst_pos])
        src_pos, dst_pos = jnp.broadcast_to(src_pos, (B, N - D)), jnp.broadcast_to(dst_pos, (B, D))
        plan = _matching_plan(src_pos, dst_pos, sim.max(-1), sim.argmax(-1), r)
        return plan_functions(plan)


# --------------------------------------------------------------------------------------
# ReToM (local representative tokens)
# --------------------------------------------------------------------------------------


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


def _window_tables(hw, window):
    """Static layout: ``win_pos [nW, A]``, the token positions of each whole window
    (windows row-major, tokens row-major inside), and ``outside``, the positions of the
    tokens in no whole window (ascending)."""
    (h, w), (wh, ww) = hw, window
    i, j, a, b = np.ix_(np.arange(h // wh), np.arange(w // ww), np.arange(wh), np.arange(ww))
    win_pos = ((i * wh + a) * w + (j * ww + b)).reshape((h // wh) * (w // ww), wh * ww)
    outside = np.setdiff1d(np.arange(h * w), win_pos)
    return win_pos.astype(np.int32), outside.astype(np.int32)


@dataclass(frozen=True)
class ReToM:
    """Merging into per-window representative tokens (arXiv 2507.12771, as read in RETOM.md).

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
        window = _window_spec(self.window)
        object.__setattr__(self, "window", window)
        schedule = self.schedule
        if isinstance(schedule, Mapping):  # {step: window}: in step order
            items = list(schedule.items())
            schedule = sorted(items) if all(_is_int(k) for k, _ in items) else items
        if not isinstance(schedule, (tuple, list)):
            raise ValueError(f"schedule must be ((step, window), ...), got {schedule!r}")
        steps, normalized = [], []
        for item in schedule:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ValueError(f"schedule entries are (step, window) pairs, got {item!r}")
            step, spec = item
            if not _is_int(step) or step < 1:
                raise ValueError(f"schedule steps must be ints >= 1 (step 0 uses window), "
                                 f"got {step!r}")
            if steps and step <= steps[-1]:
                raise ValueError(f"schedule steps must increase, got {step} after {steps[-1]}")
            steps.append(int(step))
            normalized.append((int(step), _window_spec(spec, f"window at step {step}")))
        object.__setattr__(self, "schedule", tuple(normalized))
        shapes = sorted({s for spec in self._specs() for s in _shapes(spec)})
        _check_ratio(self.ratio, [a * b for a, b in shapes], f"windows {shapes}")
        if self.matching not in MATCHINGS:
            raise ValueError(f"unknown matching {self.matching!r}; choose one of {MATCHINGS}")
        if self.cache not in CACHES:
            raise ValueError(f"unknown cache {self.cache!r}; choose one of {CACHES}")
        if self.cache_step is not None and (not _is_int(self.cache_step) or self.cache_step < 0):
            raise ValueError(f"cache_step must be None or an int >= 0, got {self.cache_step!r}")
        if self.cache_step is not None and steps and steps[-1] > self.cache_step:
            raise ValueError(
                f"the window schedule changes at step {steps[-1]}, after cache_step "
                f"{self.cache_step}: the cached selection would not fit the new windows "
                f"(put every change at or before cache_step)")
        _check_flags(self)

    def _specs(self):
        return [self.window] + [spec for _, spec in self.schedule]

    @property
    def per_level(self) -> bool:
        return isinstance(self.window[0], tuple)

    def applies(self, downsample: int) -> bool:
        return downsample <= self.max_downsample

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
            config = self.at_step(step)
            wh, ww = config.window_for(downsample)
            if wh > h or ww > w:
                at = f" (from step {step})" if step else ""
                raise ValueError(f"ReToM window {wh}x{ww}{at} is larger than the {h}x{w} grid")

    def _r(self, hw, downsample) -> int:
        """Tokens merged: ``int(N * ratio)``, at most the number of window sources."""
        (h, w), (wh, ww) = hw, self.window_for(downsample)
        return min(int(h * w * self.ratio), (h // wh) * (w // ww) * (wh * ww - 1))

    def representatives(self, metric, hw, *, downsample: int = 1):
        """``[B, nW]`` int32: each whole window's representative, as an index inside the
        window (row-major): the token with the highest mean cosine similarity to the
        window's other tokens; ties go to the lowest index."""
        _check_tokens(metric, hw, "metric")
        self.check_grid(hw, downsample)
        return self._representatives(_unit(metric), hw, downsample)

    def _representatives(self, u, hw, downsample):
        win_pos, _ = _window_tables(hw, self.window_for(downsample))
        nW, A = win_pos.shape
        if A == 1:
            return jnp.zeros((u.shape[0], nW), jnp.int32)
        tokens = u[:, win_pos]  # [B, nW, A, C]
        sim = jnp.einsum("bwkc,bwlc->bwkl", tokens, tokens)
        others = jnp.where(np.eye(A, dtype=bool), 0.0, sim).sum(-1) / (A - 1)
        return jnp.argmax(others, axis=-1).astype(jnp.int32)

    def _plan_for(self, u, hw, rep, r, downsample) -> Plan:
        """The matching plan given the representatives ``rep [B, nW]``.

        Sources, in this order: each window's other tokens (windows in order), then the
        tokens outside whole windows, which never merge (score ``-inf``).
        """
        B = u.shape[0]
        win_pos, outside = _window_tables(hw, self.window_for(downsample))
        n_out = len(outside)
        nW, A = win_pos.shape
        windows = jnp.arange(nW)[:, None]
        rep_pos = jnp.asarray(win_pos)[windows[:, 0], rep]  # [B, nW]: the dsts
        k = jnp.arange(A - 1)
        others = jnp.asarray(win_pos)[windows, k + (k >= rep[..., None])]  # [B, nW, A-1]
        src_pos = jnp.concatenate(
            [others.reshape(B, -1), jnp.broadcast_to(outside, (B, n_out))], axis=1
        )
        u_src = _take(u, others.reshape(B, -1))
        if self.matching == "local":
            u_rep = jnp.repeat(_take(u, rep_pos), A - 1, axis=1)
            score = jnp.sum(u_src * u_rep, axis=-1)
            match = jnp.broadcast_to(jnp.repeat(jnp.arange(nW), A - 1), score.shape)
        else:
            sim = jnp.einsum("bsc,bdc->bsd", u_src, _take(u, rep_pos))
            score, match = sim.max(-1), sim.argmax(-1)
        score = jnp.concatenate([score, jnp.full((B, n_out), -jnp.inf, score.dtype)], axis=1)
        match = jnp.concatenate([match, jnp.zeros((B, n_out), match.dtype)], axis=1)
        return _matching_plan(src_pos, rep_pos, score, match, r)

    def plan(self, metric, hw, key=None, *, downsample: int = 1):
        """``(merge, unmerge)`` for tokens on an ``(h, w)`` grid, matched by ``metric``.
        ``key`` is accepted for symmetry with ToMe and unused (the rule is deterministic)."""
        _check_tokens(metric, hw, "metric")
        self.check_grid(hw, downsample)
        r = self._r(hw, downsample)
        if r <= 0:
            return _identity, _identity
        u = _unit(metric)
        rep = self._representatives(u, hw, downsample)
        return plan_functions(self._plan_for(u, hw, rep, r, downsample))

    # -- reuse over denoising steps ----------------------------------------------------

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
        expected = jax.eval_shape(lambda: self.init_cache(B, hw, downsample=downsample))

        def describe(tree):
            return jax.tree.map(lambda a: (jnp.shape(a), jnp.result_type(a).name), tree)

        if jax.tree.structure(cache) != jax.tree.structure(expected) or (
            describe(cache) != describe(expected)
        ):
            raise ValueError(
                f"cache does not fit this ReToM config and grid: expected {describe(expected)}, "
                f"got {describe(cache)} (make it with init_cache)"
            )
        use_cache = jnp.asarray(use_cache)
        if use_cache.shape != () or use_cache.dtype != bool:
            raise ValueError(
                f"use_cache must be a bool scalar, got {use_cache.dtype}{list(use_cache.shape)}"
            )
        r = self._r(hw, downsample)
        if r <= 0:
            return _identity, _identity, cache
        u = _unit(metric)
        rep = self._representatives(u, hw, downsample)
        if self.cache == "representatives":
            rep = jnp.where(use_cache, cache["representatives"], rep)
            plan = self._plan_for(u, hw, rep, r, downsample)
            new_cache = {"representatives": rep}
        else:
            fresh = self._plan_for(u, hw, rep, r, downsample)
            plan = jax.tree.map(lambda c, f: jnp.where(use_cache, c, f), cache["plan"], fresh)
            new_cache = {"plan": plan}
        merge, unmerge = plan_functions(plan)
        return merge, unmerge, new_cache


def loop_segments(merge, num_steps: int):
    """The static pieces of a sampling loop of ``num_steps`` UNet calls:
    ``[(lo, hi, config, reuse)]``, steps ``lo <= i < hi`` each running ``config`` (no
    schedule left in it). ``reuse`` (for ``UNet.apply``) is None without a ReToM cache,
    else whether those steps reuse the cached selection. Pieces start at 0, at each
    window change of a ReToM schedule and after ReToM's ``cache_step``."""
    _check_positive_int(num_steps, "num_steps")
    if not isinstance(merge, ReToM):
        return [(0, num_steps, merge, None)]
    cuts = {0, num_steps} | {s for s, _ in merge.schedule if s < num_steps}
    if merge.cache_step is not None:
        cuts.add(min(merge.cache_step + 1, num_steps))
    cuts = sorted(cuts)
    return [(lo, hi, merge.at_step(lo),
             None if merge.cache_step is None else lo > merge.cache_step)
            for lo, hi in zip(cuts, cuts[1:])]


# --------------------------------------------------------------------------------------
# ToDo (token downsampling)
# --------------------------------------------------------------------------------------


def _area_weights(n: int, m: int) -> np.ndarray:
    """``[m, n]`` averaging matrix: output i is the mean of inputs
    ``[floor(i n / m), ceil((i + 1) n / m))`` (adaptive average pooling)."""
    weights = np.zeros((m, n), np.float32)
    for i in range(m):
        lo, hi = (i * n) // m, -((-(i + 1) * n) // m)
        weights[i, lo:hi] = 1.0 / (hi - lo)
    return weights


@dataclass(frozen=True)
class ToDo:
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

    def applies(self, downsample: int) -> bool:
        return downsample <= self.max_downsample

    def check_grid(self, hw, downsample: int = 1) -> None:
        h, w = _check_hw(hw)
        if self.factor > h or self.factor > w:
            raise ValueError(f"ToDo factor {self.factor} is larger than the {h}x{w} grid")

    def downsample(self, x, hw):
        """``[B, h * w, C] -> [B, (h // f) * (w // f), C]``."""
        B, N = _check_tokens(x, hw, "x")
        self.check_grid(hw)
        if self.factor == 1:
            return x
        (h, w), C = hw, x.shape[-1]
        oh, ow = h // self.factor, w // self.factor
        grid = x.reshape(B, h, w, C)
        if self.method == "nearest":
            rows, cols = (np.arange(oh) * h) // oh, (np.arange(ow) * w) // ow
            out = grid[:, rows][:, :, cols]
        else:
            acc = grid.astype(jnp.promote_types(x.dtype, jnp.float32))
            acc = jnp.einsum("ih,bhwc->biwc", _area_weights(h, oh), acc)
            out = jnp.einsum("jw,biwc->bijc", _area_weights(w, ow), acc).astype(x.dtype)
        return out.reshape(B, oh * ow, C)
