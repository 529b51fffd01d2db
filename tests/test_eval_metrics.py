"""FID, CMMD, PSNR and SSIM against NumPy / SciPy / scikit-image references."""
import numpy as np
import pytest
import scipy.linalg
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from retom_jax.eval.metrics import fid_stats, frechet_distance, mmd, psnr, ssim


def reference_frechet(mu1, s1, mu2, s2, eps=1e-6):
    """pytorch-fid's formula with SciPy's sqrtm."""
    covmean, _ = scipy.linalg.sqrtm(s1.dot(s2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset).dot(s2 + offset))
    covmean = covmean.real
    diff = mu1 - mu2
    return diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


@pytest.mark.parametrize("n,d", [(200, 16), (40, 64)])  # full rank, and rank-deficient
def test_frechet_distance_matches_scipy(n, d):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
    b = 0.7 * rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 0.3
    mu1, s1 = fid_stats(a)
    mu2, s2 = fid_stats(b)
    assert np.allclose(s1, np.cov(a, rowvar=False)) and np.allclose(mu1, a.mean(0))
    want = reference_frechet(mu1, s1, mu2, s2)
    got = frechet_distance(mu1, s1, mu2, s2)
    # measured: 5e-14 (full rank), 1e-8 (rank-deficient: SciPy's sqrtm is the inexact one)
    assert got == pytest.approx(want, rel=1e-10 if n > d else 1e-6)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6 * np.trace(s1))
    with pytest.raises(ValueError, match="at least 2"):
        fid_stats(a[:1])


def reference_mmd(x, y, sigma=10.0, scale=1000.0):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    k = lambda p, q: np.exp(-((p[:, None] - q[None]) ** 2).sum(-1) / (2 * sigma ** 2)).mean()  # noqa: E731
    return scale * (k(x, x) + k(y, y) - 2 * k(x, y))


def test_mmd_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, 8))
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    y = rng.standard_normal((20, 8)) + 0.5
    y /= np.linalg.norm(y, axis=-1, keepdims=True)
    want = reference_mmd(x, y)
    assert float(mmd(x, y)) == pytest.approx(want, rel=5e-4)  # float32 as cmmd's code; 7e-5
    assert abs(float(mmd(x, x))) < 1e-3


def test_psnr_ssim_match_scikit_image():
    rng = np.random.default_rng(2)
    a = rng.random((3, 40, 33, 3), dtype=np.float32)
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape).astype(np.float32), 0, 1)
    b[1] = np.clip(a[1] * 0.5 + 0.2, 0, 1)  # a structural change too
    got_psnr = np.asarray(psnr(a, b))
    got_ssim = np.asarray(ssim(a, b))
    got_uniform = np.asarray(ssim(a, b, gaussian=False))
    for i in range(3):
        assert got_psnr[i] == pytest.approx(peak_signal_noise_ratio(a[i], b[i], data_range=1.0), rel=1e-6)
        want = structural_similarity(a[i], b[i], data_range=1.0, channel_axis=-1,
                                     gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert got_ssim[i] == pytest.approx(want, abs=1e-6)  # measured <= 6e-8
        want = structural_similarity(a[i], b[i], data_range=1.0, channel_axis=-1)
        assert got_uniform[i] == pytest.approx(want, abs=1e-6)  # measured <= 6e-8
    assert float(ssim(a[0], a[0])) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="window does not fit"):
        ssim(a[:, :8, :8], b[:, :8, :8])
