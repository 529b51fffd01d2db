"""The interface the UNet (and any model with token merging) calls: the block's grid,
:class:`BlockMerge` and :class:`MergeMethod`, and the sampling loop's static pieces.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

import jax.numpy as jnp
from .algorithms import identity
from .checks import check_hw, check_positive_int, is_int


# --------------------------------------------------------------------------------------
# 2. The interface the UNet calls
# --------------------------------------------------------------------------------------


def grid_for(latent_hw, num_tokens: int) -> tuple[int, tuple[int, int]]:
    """The downsample level and token grid of a block, as tomesd infers them.

    ``latent_hw`` is the latent's ``(H, W)``; a block with ``num_tokens`` tokens is at
    ``downsample = ceil(sqrt(H * W // num_tokens))`` and its grid is
    ``(ceil(H / downsample), ceil(W / downsample))``.
    """
    H, W = check_hw(latent_hw, "latent_hw")
    if not is_int(num_tokens) or not 0 < num_tokens <= H * W:
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


IDENTITY = (identity, identity)


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
# 4. Window schedules and the sampling loop's segments
# --------------------------------------------------------------------------------------


def loop_segments(merge, num_steps: int):
    """The static pieces of a sampling loop of ``num_steps`` UNet calls:
    ``[(lo, hi, config, reuse)]``, steps ``lo <= i < hi`` each running ``config`` (no
    schedule left in it). ``reuse`` (for ``UNet.apply``) is None without a cache carried
    between calls, else whether those steps reuse the cached selection. Pieces start at 0,
    at each window change of a ReToM schedule and after ReToM's ``cache_step``."""
    check_positive_int(num_steps, "num_steps")
    if merge is None:
        return [(0, num_steps, None, None)]
    return merge.segments(num_steps)
