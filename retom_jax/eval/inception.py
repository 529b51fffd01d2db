"""The InceptionV3 of FID, as pytorch-fid runs it, in JAX, reading pytorch-fid's weight
file ``pt_inception-2015-12-05-6726825d.pth`` without torch.

pytorch-fid's network is torchvision's InceptionV3 with the blocks of the TensorFlow FID
graph: average pools that leave padding out of the mean (``Mixed_5b``-``5d``, ``6b``-
``6e``, ``7b``) and a max pool in the last block's pool branch (``7c``). Images in [0, 1]
are resized to 299x299 (bilinear, half-pixel centres, no antialiasing: PyTorch's
``F.interpolate(..., align_corners=False)``), scaled to [-1, 1], and the 2048 channels of
the final average pool are the features.

Every convolution is followed by BatchNorm (eps 1e-3) and ReLU (``BasicConv2d``); the
parameters are a plain dict ``{conv name: {"kernel" (HWIO), "scale", "bias"}}`` with the
BatchNorm folded into a per-channel scale and bias. Channel counts come from the weight
file, so a narrower network of the same structure (the tests use one) loads the same way.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..models.weights import key_mismatch
from .torch_pickle import TorchFileError, load_torch_file

__all__ = ["InceptionError", "FID_WEIGHTS", "load_inception", "inception_features",
           "Inception", "resize_bilinear"]

FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
BN_EPS = 1e-3


class InceptionError(ValueError):
    """The Inception weight file is missing or does not hold pytorch-fid's network."""


# ----------------------------------------------------------------------------- structure
# Each block: its convolutions as (name, stride, padding "same" (k // 2) or 0).

def _same(name):
    return (name, 1, "same")


_A = [_same("branch1x1"), _same("branch5x5_1"), _same("branch5x5_2"), _same("branch3x3dbl_1"),
      _same("branch3x3dbl_2"), _same("branch3x3dbl_3"), _same("branch_pool")]
_B = [("branch3x3", 2, 0), _same("branch3x3dbl_1"), _same("branch3x3dbl_2"),
      ("branch3x3dbl_3", 2, 0)]
_C = [_same("branch1x1")] + [_same(f"branch7x7_{i}") for i in (1, 2, 3)] + [
    _same(f"branch7x7dbl_{i}") for i in range(1, 6)] + [_same("branch_pool")]
_D = [_same("branch3x3_1"), ("branch3x3_2", 2, 0), _same("branch7x7x3_1"),
      _same("branch7x7x3_2"), _same("branch7x7x3_3"), ("branch7x7x3_4", 2, 0)]
_E = [_same(n) for n in ("branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b",
                         "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3a",
                         "branch3x3dbl_3b", "branch_pool")]
STEM = [("Conv2d_1a_3x3", 2, 0), ("Conv2d_2a_3x3", 1, 0), ("Conv2d_2b_3x3", 1, "same"),
        ("Conv2d_3b_1x1", 1, 0), ("Conv2d_4a_3x3", 1, 0)]
BLOCKS = [("Mixed_5b", "A", _A), ("Mixed_5c", "A", _A), ("Mixed_5d", "A", _A),
          ("Mixed_6a", "B", _B), ("Mixed_6b", "C", _C), ("Mixed_6c", "C", _C),
          ("Mixed_6d", "C", _C), ("Mixed_6e", "C", _C), ("Mixed_7a", "D", _D),
          ("Mixed_7b", "E1", _E), ("Mixed_7c", "E2", _E)]


def conv_layout() -> dict[str, tuple[int, object]]:
    """Every BasicConv2d of the network: ``{dotted name: (stride, padding)}``."""
    out = {name: (stride, pad) for name, stride, pad in STEM}
    for block, _, convs in BLOCKS:
        out.update({f"{block}.{name}": (stride, pad) for name, stride, pad in convs})
    return out


# ----------------------------------------------------------------------------- weights

def _bad(path, text):
    return InceptionError(f"{path} does not hold pytorch-fid's FID Inception weights: {text}")


def inception_params(state: dict, where: str = "the weights") -> dict:
    """pytorch-fid's state dict (NumPy arrays) as our parameters, or an InceptionError
    naming the keys that are missing, unexpected or malformed."""
    if not isinstance(state, dict):
        raise _bad(where, f"it holds a {type(state).__name__}, not a state dict")
    layout = conv_layout()
    expected = {f"{n}.{p}" for n in layout
                for p in ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean",
                          "bn.running_var")}
    ignored = {k for k in state if k.startswith("fc.") or k.endswith("num_batches_tracked")}
    problems = key_mismatch(expected, set(state) - ignored, limit=6)
    if problems:
        raise _bad(where, "; ".join(problems))
    params = {}
    for name in layout:
        w = np.asarray(state[f"{name}.conv.weight"], np.float32)
        bn = [np.asarray(state[f"{name}.bn.{k}"], np.float32)
              for k in ("weight", "bias", "running_mean", "running_var")]
        if w.ndim != 4 or any(b.shape != (w.shape[0],) for b in bn):
            raise _bad(where, f"{name} has a conv weight of shape {list(w.shape)} and "
                              f"BatchNorm vectors of shapes {[list(b.shape) for b in bn]}")
        gamma, beta, mean, var = bn
        scale = gamma / np.sqrt(var + BN_EPS)
        params[name] = {"kernel": jnp.asarray(w.transpose(2, 3, 1, 0)),
                        "scale": jnp.asarray(scale), "bias": jnp.asarray(beta - mean * scale)}
    return params


# ----------------------------------------------------------------------------- forward

def _basic_conv(p, x, stride, padding):
    kh, kw = p["kernel"].shape[:2]
    pad = ((kh // 2, kh // 2), (kw // 2, kw // 2)) if padding == "same" else ((0, 0), (0, 0))
    y = jax.lax.conv_general_dilated(x, p["kernel"], (stride, stride), pad,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST)
    return jax.nn.relu(y * p["scale"] + p["bias"])


def _max_pool(x, stride, pad=0):
    padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                                 padding)


def _avg_pool_exclude_pad(x):
    """3x3, stride 1, padding 1; the mean over the window's pixels inside the image."""
    padding = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), padding)
    ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), padding)
    return total / count


def _block(params, prefix, kind, x):
    layout = conv_layout()

    def c(name, y):
        stride, pad = layout[f"{prefix}.{name}"]
        return _basic_conv(params[f"{prefix}.{name}"], y, stride, pad)

    cat = partial(jnp.concatenate, axis=-1)
    if kind == "A":
        return cat([c("branch1x1", x), c("branch5x5_2", c("branch5x5_1", x)),
                    c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x))),
                    c("branch_pool", _avg_pool_exclude_pad(x))])
    if kind == "B":
        return cat([c("branch3x3", x),
                    c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x))),
                    _max_pool(x, 2)])
    if kind == "C":
        b7 = c("branch7x7_3", c("branch7x7_2", c("branch7x7_1", x)))
        d = x
        for i in range(1, 6):
            d = c(f"branch7x7dbl_{i}", d)
        return cat([c("branch1x1", x), b7, d, c("branch_pool", _avg_pool_exclude_pad(x))])
    if kind == "D":
        b7 = x
        for i in range(1, 5):
            b7 = c(f"branch7x7x3_{i}", b7)
        return cat([c("branch3x3_2", c("branch3x3_1", x)), b7, _max_pool(x, 2)])
    # E1 / E2
    b3 = c("branch3x3_1", x)
    d = c("branch3x3dbl_2", c("branch3x3dbl_1", x))
    pool = _max_pool(x, 1, 1) if kind == "E2" else _avg_pool_exclude_pad(x)
    return cat([c("branch1x1", x), c("branch3x3_2a", b3), c("branch3x3_2b", b3),
                c("branch3x3dbl_3a", d), c("branch3x3dbl_3b", d), c("branch_pool", pool)])


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` weights of PyTorch's bilinear resize (align_corners=False), with
    the source positions rounded as PyTorch's CPU kernel rounds them: a float32 scale and
    ``scale * (i + 0.5) - 0.5`` rounded once to float32 (a fused multiply-add)."""
    scale = np.float32(n_in / n_out)
    src = (np.float64(scale) * (np.arange(n_out) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = src.astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = (src - i0.astype(np.float32)).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    np.add.at(m, (np.arange(n_out), i0), np.float32(1.0) - frac)
    np.add.at(m, (np.arange(n_out), i1), frac)
    return m


def resize_bilinear(images, size=(299, 299)):
    """``[B, H, W, C]`` -> ``[B, size[0], size[1], C]`` as ``F.interpolate(mode="bilinear",
    align_corners=False)`` does it (no antialiasing)."""
    h, w = images.shape[1:3]
    mh, mw = _resize_matrix(h, size[0]), _resize_matrix(w, size[1])
    hp = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,bhwc->bowc", mh, images, precision=hp)
    return jnp.einsum("pw,bowc->bopc", mw, x, precision=hp)


def inception_features(params, images, resize: bool = True):
    """2048-d pool features ``[B, C]`` of images ``[B, H, W, 3]`` in [0, 1] (pure; jit it).
    ``resize=False`` skips the resize to 299 (the network takes 75x75 and up)."""
    x = jnp.asarray(images, jnp.float32)
    if resize:
        x = resize_bilinear(x)
    x = 2.0 * x - 1.0
    layout = conv_layout()
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
        x = _basic_conv(params[name], x, *layout[name])
    x = _max_pool(x, 2)
    for name in ("Conv2d_3b_1x1", "Conv2d_4a_3x3"):
        x = _basic_conv(params[name], x, *layout[name])
    x = _max_pool(x, 2)
    for block, kind, _ in BLOCKS:
        x = _block(params, block, kind, x)
    return jnp.mean(x, axis=(1, 2))


_features_jit = jax.jit(inception_features, static_argnames="resize")


class Inception:
    """Loaded FID Inception: ``inception(images)`` -> pool features (jitted)."""

    mesh = None  # a jax.sharding.Mesh: batches split over data x fsdp (eval.metrics.shard_models)

    def __init__(self, params, source: str = ""):
        self.params, self.source = params, source
        self.features = int(sum(params[f"Mixed_7c.{n}"]["kernel"].shape[-1]
                                for n in ("branch1x1", "branch3x3_2a", "branch3x3_2b",
                                          "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool")))

    def __call__(self, images, resize: bool = True):
        shape = tuple(np.shape(images))
        if len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"images must be [batch, height, width, 3] in [0, 1], got shape "
                             f"{list(shape)}")
        if not resize and min(shape[1:3]) < 75:
            raise ValueError(f"InceptionV3 needs images of at least 75x75, got "
                             f"{shape[1]}x{shape[2]}")
        x = images
        if self.mesh is not None:
            from ..sharding import shard_batch

            x = shard_batch(np.asarray(x, np.float32), self.mesh)
        return _features_jit(self.params, jnp.asarray(x, jnp.float32), resize=resize)

    def __repr__(self):
        return f"Inception({self.source or 'weights'}, features={self.features})"


def load_inception(path) -> Inception:
    """pytorch-fid's weight file (``pt_inception-2015-12-05-*.pth``), read without torch."""
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise InceptionError(
            f"Inception weights not found: {p}. Put pytorch-fid's {FID_WEIGHTS} there (from "
            f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS}"
            f", fetched on a machine with network); retom-jax never downloads")
    try:
        state = load_torch_file(p)
    except TorchFileError as e:
        raise InceptionError(str(e)) from None
    return Inception(inception_params(state, str(p)), str(p))

