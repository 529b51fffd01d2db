"""The methods: ToMe, ReToM and ToDo validate their fields and delegate to the
algorithms; the registry that the command line, eval, train and benchmarks build from.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from .algorithms import CACHES, MATCHINGS, Plan, TODO_METHODS, identity, plan_functions, retom_plan, retom_representatives, todo_pool, tome_dst_mask, tome_plan, unit_rows
from .checks import check_flags, check_hw, check_positive_int, check_ratio, check_tokens, is_int
from .interface import BlockMerge, IDENTITY, MergeMethod


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
        check_positive_int(self.sx, "sx")
        check_positive_int(self.sy, "sy")
        check_ratio(self.ratio, [self.sx * self.sy], f"{self.sy}x{self.sx} cells")
        if not isinstance(self.use_rand, bool):
            raise ValueError(f"use_rand must be a bool, got {self.use_rand!r}")
        check_flags(self)

    def check_grid(self, hw, downsample: int = 1) -> None:
        h, w = check_hw(hw)
        if h < self.sy or w < self.sx:
            raise ValueError(f"ToMe cells of {self.sy}x{self.sx} do not fit a {h}x{w} grid")

    def check(self, grids, key=None) -> None:
        super().check(grids, key)
        if self.use_rand and key is None and any(self.applies(d) for d in grids):
            raise ValueError("ToMe(use_rand=True) draws random destinations: pass "
                             "key=jax.random.key(...) (or use_rand=False)")

    def dst_mask(self, hw, key=None):
        """``[h * w]`` bool, True at the dst tokens (see `tome_dst_mask`)."""
        return tome_dst_mask(check_hw(hw), (self.sy, self.sx), key)

    def plan(self, metric, hw, key=None, *, downsample: int = 1):
        """``(merge, unmerge)`` for tokens on an ``(h, w)`` grid, matched by ``metric``.

        ``key`` draws the dst cells when ``use_rand`` (required then, whatever the batch).
        As tomesd does, randomness is switched off for an odd batch: the key is then
        ignored. ``downsample`` is accepted for symmetry with ReToM and unused.
        """
        B, N = check_tokens(metric, hw, "metric")
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
    matching:   ``"local"`` (a source merges into its own window's representative),
                ``"near"`` (into the most similar representative of the windows within
                ``reach`` window steps of its own: ``(2 reach + 1)**2`` dot products per
                source) or ``"global"`` (into its most similar representative, as ToMe's
                matching).
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
    reach:      ``"near"`` matching: how many window steps away a representative may be
                (1: the 3x3 windows around a source's own, 2: 5x5).
    kv_only:    merge self-attention's keys and values only (``BlockMerge.kv_down``):
                every query is kept, so nothing is unmerged and attention stays one call
                of ``N`` queries against ``N - r`` keys (the AsymRnR / ToDo idea with
                ReToM's windows and representatives). Self-attention only.
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
    kv_only: bool = False
    reach: int = 1

    def __post_init__(self):
        window, schedule = _parse_windows(self.window, self.schedule)
        object.__setattr__(self, "window", window)
        object.__setattr__(self, "schedule", schedule)
        shapes = sorted({s for spec in self._specs() for s in _shapes(spec)})
        check_ratio(self.ratio, [a * b for a, b in shapes], f"windows {shapes}")
        if self.matching not in MATCHINGS:
            raise ValueError(f"unknown matching {self.matching!r}; choose one of {MATCHINGS}")
        if self.cache not in CACHES:
            raise ValueError(f"unknown cache {self.cache!r}; choose one of {CACHES}")
        if self.cache_step is not None and (not is_int(self.cache_step) or self.cache_step < 0):
            raise ValueError(f"cache_step must be None or an int >= 0, got {self.cache_step!r}")
        if self.cache_step is not None and schedule and schedule[-1][0] > self.cache_step:
            raise ValueError(
                f"the window schedule changes at step {schedule[-1][0]}, after cache_step "
                f"{self.cache_step}: the cached selection would not fit the new windows "
                f"(put every change at or before cache_step)")
        check_flags(self)
        check_positive_int(self.reach, "reach")
        if not isinstance(self.kv_only, bool):
            raise ValueError(f"kv_only must be a bool, got {self.kv_only!r}")
        if self.kv_only and (self.merge_crossattn or self.merge_mlp or not self.merge_attn):
            raise ValueError("ReToM(kv_only=True) merges self-attention's keys and values "
                             "only: leave merge_attn=True, merge_crossattn=False, "
                             "merge_mlp=False")

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
        if not is_int(step) or step < 0:
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
        h, w = check_hw(hw)
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

    def _windows(self, hw, window):
        """`plan_functions`' ``windows`` for local matching (merges stay in a window)."""
        return (tuple(hw), window) if self.matching == "local" else None

    def representatives(self, metric, hw, *, downsample: int = 1):
        """``[B, nW]`` int32: each whole window's representative (`retom_representatives`)."""
        check_tokens(metric, hw, "metric")
        self.check_grid(hw, downsample)
        return retom_representatives(unit_rows(metric), tuple(hw), self.window_for(downsample))

    def plan(self, metric, hw, key=None, *, downsample: int = 1):
        """``(merge, unmerge)`` for tokens on an ``(h, w)`` grid, matched by ``metric``.
        ``key`` is accepted for symmetry with ToMe and unused (the rule is deterministic)."""
        check_tokens(metric, hw, "metric")
        self.check_grid(hw, downsample)
        r = self._r(hw, downsample)
        if r <= 0:
            return IDENTITY
        window, u = self.window_for(downsample), unit_rows(metric)
        rep = retom_representatives(u, tuple(hw), window)
        return plan_functions(retom_plan(u, tuple(hw), window, rep, r, self.matching, self.reach),
                              self._windows(hw, window))

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
        check_positive_int(batch, "batch")
        self.check_grid(hw, downsample)
        (h, w), (wh, ww) = check_hw(hw), self.window_for(downsample)
        N, nW, r = h * w, (h // wh) * (w // ww), self._r(hw, downsample)
        if self.cache == "representatives":
            return {"representatives": jnp.zeros((batch, nW), jnp.int32)}
        zeros = lambda n: jnp.zeros((batch, n), jnp.int32)  # noqa: E731
        return {"plan": Plan(zeros(N - r), zeros(r), zeros(r), zeros(N), zeros(N - r))}

    def plan_cached(self, metric, hw, cache, use_cache, *, downsample: int = 1):
        """``(merge, unmerge, new_cache)``: the plan from the cached selection where
        ``use_cache`` (a bool scalar, may be traced) is True, else the fresh one;
        ``new_cache`` holds the selection used."""
        B, _ = check_tokens(metric, hw, "metric")
        self.check_grid(hw, downsample)
        _check_cache(self, cache, B, hw, downsample)
        use_cache = jnp.asarray(use_cache)
        if use_cache.shape != () or use_cache.dtype != bool:
            raise ValueError(
                f"use_cache must be a bool scalar, got {use_cache.dtype}{list(use_cache.shape)}"
            )
        r = self._r(hw, downsample)
        if r <= 0:
            return identity, identity, cache
        window, u = self.window_for(downsample), unit_rows(metric)
        rep = retom_representatives(u, tuple(hw), window)
        if self.cache == "representatives":
            rep = jnp.where(use_cache, cache["representatives"], rep)
            plan = retom_plan(u, tuple(hw), window, rep, r, self.matching, self.reach)
            new_cache = {"representatives": rep}
        else:
            fresh = retom_plan(u, tuple(hw), window, rep, r, self.matching, self.reach)
            plan = jax.tree.map(lambda c, f: jnp.where(use_cache, c, f), cache["plan"], fresh)
            new_cache = {"plan": plan}
        merge, unmerge = plan_functions(plan, self._windows(hw, window))
        return merge, unmerge, new_cache

    def for_block(self, tokens, grid, downsample, key=None, cache=None, use_cache=False):
        if self.cache_step is None:
            return self._block(*self.plan(tokens, grid, downsample=downsample)), None
        if cache is None:  # no state given: plan afresh, return the cache a first step leaves
            cache = self.init_cache(tokens.shape[0], grid, downsample=downsample)
            use_cache = jnp.array(False)
        m, u, new = self.plan_cached(tokens, grid, cache, use_cache, downsample=downsample)
        return self._block(m, u), new

    def _block(self, merge, unmerge) -> BlockMerge:
        """The plan on the selected branches, or (``kv_only``) on self-attention's keys and
        values alone: ``kv_down = merge``, every query kept, no unmerge."""
        if self.kv_only:
            return BlockMerge(kv_down=merge)
        return BlockMerge.branches(self, merge, unmerge)


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
        check_positive_int(self.factor, "factor")
        check_positive_int(self.max_downsample, "max_downsample")
        if self.method not in TODO_METHODS:
            raise ValueError(f"unknown ToDo method {self.method!r}; choose one of {TODO_METHODS}")

    def windows(self, downsample: int) -> list:
        return [(0, (self.factor, self.factor))]

    def check_grid(self, hw, downsample: int = 1) -> None:
        h, w = check_hw(hw)
        if self.factor > h or self.factor > w:
            raise ValueError(f"ToDo factor {self.factor} is larger than the {h}x{w} grid")

    def downsample(self, x, hw):
        """``[B, h * w, C] -> [B, (h // f) * (w // f), C]`` (`todo_pool`)."""
        check_tokens(x, hw, "x")
        self.check_grid(hw)
        return todo_pool(x, tuple(hw), self.factor, self.method)

    def for_block(self, tokens, grid, downsample, key=None, cache=None, use_cache=False):
        return BlockMerge(kv_down=lambda t: self.downsample(t, grid)), None


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
        schedule = sorted(items) if all(is_int(k) for k, _ in items) else items
    if not isinstance(schedule, (tuple, list)):
        raise ValueError(f"schedule must be ((step, window), ...), got {schedule!r}")
    normalized = []
    for item in schedule:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"schedule entries are (step, window) pairs, got {item!r}")
        step, spec = item
        if not is_int(step) or step < 1:
            raise ValueError(f"schedule steps must be ints >= 1 (step 0 uses window), "
                             f"got {step!r}")
        if normalized and step <= normalized[-1][0]:
            raise ValueError(f"schedule steps must increase, got {step} after "
                             f"{normalized[-1][0]}")
        normalized.append((int(step), _window_spec(spec, f"window at step {step}")))
    return window, tuple(normalized)


def _window_pair(value, name):
    ok = isinstance(value, (tuple, list)) and len(value) == 2
    if not ok or not all(is_int(v) for v in value):
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
        if len(item) != 2 or not is_int(item[0]) or item[0] <= 0:
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


# --------------------------------------------------------------------------------------
# The registry: what the command line, eval, train and the benchmarks build from
# --------------------------------------------------------------------------------------

METHODS = {"tome": ToMe, "retom": ReToM, "todo": ToDo}
# Which methods use each option of :func:`from_options` (one given for another method is
# an error where options come from a user, e.g. the command line).
METHOD_OPTIONS = {"ratio": ("tome", "retom"), "window": ("tome", "retom"),
                  "matching": ("retom",), "cache_step": ("retom",), "schedule": ("retom",),
                  "todo_factor": ("todo",), "max_downsample": ("tome", "retom", "todo")}


def from_options(method: str, ratio: float = 0.5, max_downsample: int = 1, *,
                 window=(2, 2), matching: str = "local", cache_step=None, cache=None,
                 schedule=(), todo_factor: int = 2):
    """The merge config of ``method`` (a key of :data:`METHODS`, or "none" for None) from
    flat options, as the command line names them (ValueError if they make none)."""
    if method == "none":
        return None
    if method not in METHODS:
        raise ValueError(f"unknown merging method {method!r}; choose from "
                         f"{', '.join(METHODS)}, none")
    if method == "tome":
        sy, sx = window
        return ToMe(ratio=ratio, max_downsample=max_downsample, sx=sx, sy=sy)
    if method == "retom":
        extra = {} if cache is None else {"cache": cache}
        return ReToM(ratio=ratio, window=window, matching=matching, cache_step=cache_step,
                     max_downsample=max_downsample, schedule=tuple(schedule), **extra)
    return ToDo(factor=todo_factor, max_downsample=max_downsample)
