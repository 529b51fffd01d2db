"""Image-quality evaluation: CLIP score, CMMD, FID (pytorch-fid's InceptionV3), PSNR and
SSIM in JAX; the ``retom-jax eval`` command; merge maps.

Nothing here downloads: the CLIP model and the Inception weight file are read from local
files or the local Hugging Face cache.
"""
from .clip_vision import CLIP, ImageEncoder, ImageProcessor, VisionConfig, clip_score, clip_scores, load_clip

__all__ = ["CLIP", "ImageEncoder", "ImageProcessor", "VisionConfig", "clip_score",
           "clip_scores", "load_clip"]
