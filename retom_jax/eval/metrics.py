"""Image-quality metrics: FID, CMMD, PSNR, SSIM (and the CLIP score in clip_vision).

- FID: Frechet distance between Gaussians fitted to Inception pool features, as
  pytorch-fid computes it (mean, ``np.cov`` covariance; the matrix square root's trace in
  float64 from symmetric eigendecompositions: ``tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2)``).
- CMMD (Jayasumana et al. 2024, google-research ``cmmd``): the minimum-variance MMD
  estimate between L2-normalised CLIP image embeddings with a Gaussian RBF kernel,
  sigma 10, times 1000. Images are resized whole to the CLIP model's square size
  (bicubic, ``jax.image.resize``) and normalised with CLIP's mean and std, as that code does.
- PSNR and SSIM between two images, images in [0, 1] (``data_range`` 1). SSIM follows
  Wang et al. 2004 as scikit-image's ``structural_similarity(gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=-1)``: an 11-tap
  Gaussian window, K1 0.01, K2 0.03, the mean over pixels at least 5 from the border,
  averaged over channels. ``gaussian=False`` gives its default instead (7x7 uniform
  window, sample covariance).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["fid_stats", "frechet_distance", "fid", "mmd", "cmmd", "cmmd_embeddings",
           "psnr", "ssim", "shard_models"]

CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0


# ----------------------------------------------------------------------------- FID

def fid_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` of ``[N, D]`` features in float64 (sigma with ``N - 1``)."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 feature rows [N, D], got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2)`` for covariance matrices."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} / {mu2.shape}, sigma "
                         f"{s1.shape} / {s2.shape}")
    r = _sqrt_psd(s1)
    inner = np.linalg.eigvalsh((r @ s2 @ r + (r @ s2 @ r).T) / 2)
    tr_covmean = float(np.sqrt(np.clip(inner, 0.0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def fid(features1, features2) -> float:
    """FID between two sets of Inception pool features ``[N, D]``."""
    return frechet_distance(*fid_stats(features1), *fid_stats(features2))


# ----------------------------------------------------------------------------- CMMD

@jax.jit
def mmd(x, y):
    """The biased (minimum-variance) MMD estimate with a Gaussian RBF kernel (sigma 10),
    times 1000: CMMD's distance between embedding sets ``[N, D]`` and ``[M, D]``."""
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    gamma = 1.0 / (2.0 * CMMD_SIGMA ** 2)
    xx, yy = jnp.sum(x * x, -1), jnp.sum(y * y, -1)

    def kernel_mean(a, b, na, nb):
        d2 = na[:, None] + nb[None, :] - 2.0 * (a @ b.T)
        return jnp.mean(jnp.exp(-gamma * d2))

    return CMMD_SCALE * (kernel_mean(x, x, xx, xx) + kernel_mean(y, y, yy, yy)
                         - 2.0 * kernel_mean(x, y, xx, yy))


@partial(jax.jit, static_argnums=(0, 3))
def _cmmd_embed(graphdef, params, images, size, mean, std):
    x = jax.image.resize(images, images.shape[:1] + (size, size, 3), method="bicubic")
    x = (x - mean) / std
    from flax import nnx
    emb = nnx.merge(graphdef, params)(jnp.transpose(x, (0, 3, 1, 2)))[2]
    return emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)


def cmmd_embeddings(clip, images, batch_size: int = 16) -> np.ndarray:
    """L2-normalised CLIP image embeddings as CMMD makes them, from ``[N, H, W, 3]``
    images (uint8, or floats in [0, 1]; a list of equal-size PIL images works too)."""
    v = clip.vision
    mean = jnp.asarray(v.processor.mean, jnp.float32)
    std = jnp.asarray(v.processor.std, jnp.float32)
    out = []
    for i in range(0, len(images), batch_size):
        chunk = _float_images(images[i:i + batch_size])  # converted one batch at a time
        n = len(chunk)
        if n < batch_size:  # one compiled shape
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, 0)])
        if v.mesh is not None:  # the batch split over the mesh (see shard_models)
            from ..sharding import shard_batch

            chunk = shard_batch(chunk, v.mesh)
        emb = _cmmd_embed(v.graphdef, v.params, jnp.asarray(chunk), v.config.image_size,
                          mean, std)
        out.append(np.asarray(emb)[:n])
    return np.concatenate(out)


def cmmd(clip, images1, images2, batch_size: int = 16) -> float:
    """CMMD between two image sets."""
    return float(mmd(cmmd_embeddings(clip, images1, batch_size),
                     cmmd_embeddings(clip, images2, batch_size)))


def _float_images(images) -> np.ndarray:
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im) for im in images])
    a = np.asarray(images)
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3], got shape {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    return a.astype(np.float32)


def shard_models(mesh, clip=None, inception=None) -> None:
    """Put the metric models on ``mesh``: parameters placed by the sharding rules (large
    kernels split over ``fsdp``, the rest replicated), and their image batches (CLIP
    score, CMMD embeddings, Inception features) split over ``data`` and ``fsdp`` from then
    on, so each batch must be a multiple of ``data x fsdp`` (the eval batch size)."""
    from ..sharding import shard_params

    if clip is not None:
        clip.vision.params = shard_params(clip.vision.params, mesh)
        clip.vision.mesh = mesh
        if clip.text is not None:
            clip.text.params = shard_params(clip.text.params, mesh)
    if inception is not None:
        inception.params = shard_params(inception.params, mesh)
        inception.mesh = mesh


# ----------------------------------------------------------------------------- PSNR / SSIM

@jax.jit
def psnr(a, b):
    """PSNR in dB of images in [0, 1] (``[..., H, W, C]``; one value per leading index)."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    mse = jnp.mean((a - b) ** 2, axis=(-3, -2, -1))
    return 10.0 * jnp.log10(1.0 / mse)


def _gaussian_taps(sigma: float, truncate: float = 3.5) -> np.ndarray:
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return (w / w.sum()).astype(np.float32)


def _filter_valid(x, taps):
    """Separable filter over H and W of ``[B, H, W, C]``, 'valid' region only."""
    k = len(taps)
    h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
    rows = sum(float(taps[i]) * x[:, i:i + h] for i in range(k))
    return sum(float(taps[i]) * rows[:, :, i:i + w] for i in range(k))


@partial(jax.jit, static_argnames=("gaussian", "sigma", "win_size"))
def ssim(a, b, *, gaussian: bool = True, sigma: float = 1.5, win_size: int = 7):
    """Mean SSIM of images in [0, 1], ``[B, H, W, C]`` (or ``[H, W, C]``) -> ``[B]``."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    single = a.ndim == 3
    if single:
        a, b = a[None], b[None]
    if gaussian:
        taps = _gaussian_taps(sigma)
        cov_norm = 1.0
    else:
        taps = np.full(win_size, 1.0 / win_size, np.float32)
        np_ = win_size * win_size
        cov_norm = np_ / (np_ - 1.0)
    if min(a.shape[1:3]) < len(taps):
        raise ValueError(f"SSIM's {len(taps)}x{len(taps)} window does not fit "
                         f"{a.shape[1]}x{a.shape[2]} images")
    f = lambda x: _filter_valid(x, taps)  # noqa: E731
    ux, uy = f(a), f(b)
    vx = cov_norm * (f(a * a) - ux * ux)
    vy = cov_norm * (f(b * b) - uy * uy)
    vxy = cov_norm * (f(a * b) - ux * uy)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    out = jnp.mean(s, axis=(1, 2, 3))
    return out[0] if single else out
