"""Step caching (DeepCache, arXiv 2312.00858): reuse the deep UNet features of an earlier
denoising step and recompute only the outer levels.

``StepCache(interval=3, depth=1)`` runs a full UNet call every ``interval`` calls (the
first call of a loop always) and, in between, a shallow call: ``conv_in``, the outermost
``depth`` down blocks and the matching up blocks, fed with the feature the last full call
computed where the deeper part meets them (``UNet.apply_cached``). The schedule is static
(which calls are full depends only on the call's index), so a sampling loop compiles one
step program per kind of call. ``interval=1`` is the uncached loop.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

__all__ = ["StepCache", "Preset", "FAST", "parse_step_cache"]


def _pos_int(value, name, low=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"StepCache {name} must be an int >= {low}, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class StepCache:
    """``interval``: a full UNet call every this many calls (1: no caching). ``depth``:
    how many outer down/up blocks a shallow call runs (1 = only the highest-resolution
    level; at most the UNet's number of levels). Hashable: part of a compiled program's
    static configuration."""
    interval: int = 3
    depth: int = 1

    def __post_init__(self):
        object.__setattr__(self, "interval", _pos_int(self.interval, "interval"))
        object.__setattr__(self, "depth", _pos_int(self.depth, "depth"))

    @property
    def active(self) -> bool:
        """Whether any call is shallow (``interval > 1``)."""
        return self.interval > 1

    def is_full(self, i) -> bool:
        """Whether loop call ``i`` (0 = the loop's first) is a full call (Python int)."""
        return i % self.interval == 0

    def traced_is_full(self, i):
        """``is_full`` for a traced loop counter: a boolean scalar."""
        return jnp.asarray(i) % self.interval == 0

    def counts(self, num_calls: int) -> tuple[int, int]:
        """``(full, shallow)``: how many calls of each kind a loop of ``num_calls`` runs."""
        full = -(-num_calls // self.interval)
        return full, num_calls - full

    def check(self, levels: int):
        """ValueError when ``depth`` does not fit a UNet with ``levels`` levels."""
        if self.depth > levels:
            raise ValueError(f"StepCache depth={self.depth} is deeper than the UNet "
                             f"({levels} levels): use depth 1..{levels}")

    def describe(self) -> str:
        return f"step cache every {self.interval}, depth {self.depth}"


def parse_step_cache(interval, depth=1) -> StepCache | None:
    """The CLI's ``--step-cache N`` and ``--step-cache-depth D``: None for no interval or
    interval 1 (no caching), else ``StepCache(N, D)``."""
    if interval is None or interval == 1:
        return None
    return StepCache(interval, depth)


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named speed setting: token merging (``method`` at ``ratio``, at the UNet's first
    attention level) stacked with a step cache (``interval``, ``depth``)."""
    method: str
    ratio: float
    interval: int
    depth: int = 1

    @property
    def step_cache(self) -> StepCache:
        return StepCache(self.interval, self.depth)

    def merge(self, first_level: int = 1):
        """The merge config on a UNet whose first attention level is ``first_level``."""
        from ..merge import from_options

        return from_options(self.method, ratio=self.ratio, max_downsample=first_level)

    def describe(self) -> str:
        merge = {"todo": "todo (factor 2)", "none": "no merging"}.get(
            self.method, f"{self.method} {self.ratio:g}")
        return f"{merge} + step cache every {self.interval} (depth {self.depth})"


# ``--fast``: picked from the demo model's quality/FLOPs front (docs/step_caching.md): the
# interval is what lowers XLA's FLOP count (SD 1.5 at 512 px, 30 steps: 0.44x; SDXL at
# 1024 px: 0.21x); merging at these sizes lowers it by 1% or less, so the preset does not
# merge (add --merge to stack it).
FAST = Preset("none", 0.0, 8, 1)
