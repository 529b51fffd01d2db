"""Argument checks shared by the merge methods (ValueError with the reason).
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


# --------------------------------------------------------------------------------------
# 5. Argument checks
# --------------------------------------------------------------------------------------


def is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_hw(hw, name="hw") -> tuple[int, int]:
    ok = isinstance(hw, (tuple, list)) and len(hw) == 2
    if not ok or not all(is_int(v) and v > 0 for v in hw):
        raise ValueError(f"{name} must be a pair of positive ints (height, width), got {hw!r}")
    return int(hw[0]), int(hw[1])


def check_tokens(x, hw, name) -> tuple[int, int]:
    """Validate a ``[B, N, C]`` token array on an ``(h, w)`` grid; return ``(B, N)``."""
    h, w = check_hw(hw)
    if getattr(x, "ndim", None) != 3:
        raise ValueError(f"{name} must be a [batch, tokens, channels] array, got shape "
                         f"{getattr(x, 'shape', None)}")
    if x.shape[1] != h * w:
        raise ValueError(f"{name} has {x.shape[1]} tokens but the grid {h}x{w} has {h * w}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a float array, got {x.dtype}")
    return x.shape[0], x.shape[1]


def check_positive_int(value, name):
    if not is_int(value) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_ratio(ratio, areas, what):
    """``ratio`` must lie in ``[0, 1 - 1/area]`` for every cell/window area."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
        raise ValueError(f"ratio must be a finite number, got {ratio!r}")
    top = min(1.0 - 1.0 / a for a in areas)
    if not 0.0 <= ratio <= top + 1e-12:
        raise ValueError(
            f"ratio must be in [0, {top:.4g}] (1 - 1/area for {what}), got {ratio!r}"
        )


def check_flags(cfg):
    for name, value in (("merge_attn", cfg.merge_attn), ("merge_crossattn", cfg.merge_crossattn),
                        ("merge_mlp", cfg.merge_mlp)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a bool, got {value!r}")
    check_positive_int(cfg.max_downsample, "max_downsample")
