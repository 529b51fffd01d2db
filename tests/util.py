"""Helpers shared by the parity tests."""
import os
import sys

import numpy as np


def rel_err(actual, expected) -> float:
    """``||actual - expected|| / ||expected||`` over all elements (float64)."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"shape {a.shape} != expected {e.shape}"
    return float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-30))


def assert_close(actual, expected, bound, what=""):
    """``rel_err(actual, expected) <= bound`` (see `check_bound`); returns the error."""
    return check_bound(rel_err(actual, expected), bound, what)


def check_bound(err, bound, what=""):
    """``err <= bound``; with ``PRINT_ERRORS=1`` in the environment every measured error
    is printed (how the bounds were set: about 10x the largest measured error)."""
    if os.environ.get("PRINT_ERRORS"):
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
        print(f"\nMEASURED {test} {what}: {err:.3g} (bound {bound:.0e})", file=sys.stderr)
    assert err <= bound, f"{what} relative error {err:.3g} > {bound:.0e}"
    return err


def to_numpy(t):
    """A torch tensor (or anything array-like) as a float32/ints NumPy array."""
    if hasattr(t, "detach"):
        t = t.detach().cpu()
        if t.dtype.is_floating_point:
            t = t.float()
        return t.numpy()
    return np.asarray(t)



def track_tomesd_blocks(monkeypatch, model):
    """Count the blocks a tomesd-patched torch UNet ``model`` runs (patch it before or
    after this): tomesd
    calls ``compute_merge`` once per transformer block of each UNet call, in call order.
    Returns a dict updated before each block: ``call`` (UNet call, i.e. denoising step),
    ``block`` (index over the whole UNet, as ours are numbered) and ``downsample``."""
    import math

    import tomesd.patch

    blocks = sum(any(c.__name__ == "BasicTransformerBlock" for c in type(m).__mro__)
                 for m in model.modules())
    assert blocks, "the torch model has no transformer blocks"
    original = tomesd.patch.compute_merge
    where = {"count": 0}

    def compute_merge(x, tome_info):
        h, w = tome_info["size"]
        call, block = divmod(where["count"], blocks)
        where.update(count=where["count"] + 1, call=call, block=block,
                     downsample=int(math.ceil(math.sqrt(h * w // x.shape[1]))))
        return original(x, tome_info)

    monkeypatch.setattr(tomesd.patch, "compute_merge", compute_merge)
    return where


def feed_tomesd_destinations(monkeypatch, model, key_of):
    """Make tomesd draw the random destinations our ``ToMe`` draws.

    tomesd draws ``torch.randint(sy * sx, (h // sy, w // sx, 1))`` in the blocks that
    merge. Patched here: the draw of UNet call ``c``, block ``k`` is
    ``jax.random.randint(key_of(c, k), (h // sy, w // sx), 0, sy * sx)``, exactly what
    ``ToMe.dst_mask`` draws from the key it is given. ``model``: the torch UNet. Returns
    the list of ``(call, block)`` pairs that drew, filled as it runs.
    """
    import jax
    import torch

    where, drawn = track_tomesd_blocks(monkeypatch, model), []

    def randint(high, size, *args, **kwargs):
        drawn.append((where["call"], where["block"]))
        pick = jax.random.randint(key_of(where["call"], where["block"]), tuple(size[:2]), 0, high)
        return torch.from_numpy(np.asarray(pick, np.int64)).reshape(tuple(size))

    monkeypatch.setattr(torch, "randint", randint)
    return drawn


def swap_in_retom(monkeypatch, model, cfg):
    """tomesd's matching in a tomesd-patched torch UNet ``model`` replaced by ReToM's plan
    (``cfg``), run where tomesd merges: the window in force at each UNet call
    (``cfg.at_step``) and, with ``cache_step``, each block's selection cached at that call
    and reused after it. The merge/unmerge functions go through NumPy (no gradients)."""
    import jax.numpy as jnp
    import tomesd.merge
    import torch

    where, caches = track_tomesd_blocks(monkeypatch, model), {}

    def matching(metric, w, h, sx, sy, r, no_rand=False, generator=None):
        step, block, down = where["call"], where["block"], where["downsample"]
        m, metric = cfg.at_step(step), jnp.asarray(metric.numpy())
        if m.cache_step is None:
            merge, unmerge = m.plan(metric, (h, w), downsample=down)
        else:
            reuse = step > m.cache_step
            cache = caches[block] if reuse else m.init_cache(metric.shape[0], (h, w),
                                                             downsample=down)
            merge, unmerge, caches[block] = m.plan_cached(metric, (h, w), cache,
                                                          jnp.asarray(reuse), downsample=down)

        def as_torch(f):
            return lambda x: torch.from_numpy(np.array(f(jnp.asarray(x.numpy()))))
        return as_torch(merge), as_torch(unmerge)

    monkeypatch.setattr(tomesd.merge, "bipartite_soft_matching_random2d", matching)
    return where


def run_on_host_devices(module: str, out, devices: int = 8, timeout: int = 1800) -> list:
    """Run ``python -m {module} OUT.json`` in a subprocess with ``devices`` host CPU
    devices (``XLA_FLAGS=--xla_force_host_platform_device_count``) and return the JSON
    report it writes; its stderr's tail is the failure message."""
    import json
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(root),
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
               + f" --xla_force_host_platform_device_count={devices}")
    proc = subprocess.run([sys.executable, "-m", module, str(out)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(Path(out).read_text())
    assert rows[0]["devices"] == devices
    return rows
