"""Helpers shared by the parity tests."""
import numpy as np


def rel_err(actual, expected) -> float:
    """``||actual - expected|| / ||expected||`` over all elements (float64)."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"shape {a.shape} != expected {e.shape}"
    return float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-30))


def to_numpy(t):
    """A torch tensor (or anything array-like) as a float32/ints NumPy array."""
    if hasattr(t, "detach"):
        t = t.detach().cpu()
        if t.dtype.is_floating_point:
            t = t.float()
        return t.numpy()
    return np.asarray(t)
