"""CLIP image tower, preprocessing and CLIP score against transformers (same weights)."""
import numpy as np
import pytest
import torch

from retom_jax.eval.clip_vision import DEFAULT_CLIP, ImageProcessor, clip_scores, clip_score, load_clip
from retom_jax.models.weights import CheckpointError
from tests.eval_tiny import CLIP_IMAGE, save_tiny_clip
from tests.util import rel_err, to_numpy

PROMPTS = ["a photo of a cat", "a dog", "a painting of the dog with a cat",
           "photo", "the cat in a painting"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    model = save_tiny_clip(folder)
    return folder, model, load_clip(folder)


def _images(seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(40, 52), (37, 30), (30, 30), (64, 45), (33, 71)]  # portrait, landscape, odd
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


def test_preprocessing_matches_clip_image_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    ref = CLIPImageProcessorPil(size={"shortest_edge": CLIP_IMAGE},
                                crop_size={"height": CLIP_IMAGE, "width": CLIP_IMAGE})
    ours = ImageProcessor(CLIP_IMAGE, (CLIP_IMAGE, CLIP_IMAGE))
    images = _images()
    want = np.stack([ref(images=im, return_tensors="np")["pixel_values"][0] for im in images])
    got = ours(images)
    assert got.shape == want.shape == (5, 3, CLIP_IMAGE, CLIP_IMAGE)
    assert np.abs(got - want).max() < 2e-6  # measured 2.4e-7 (float32 rounding)
    # floats in [0, 1] are the same images
    assert np.abs(ours([im / 255.0 for im in images]) - got).max() < 1e-6


def test_image_embeddings_match_transformers(tiny_clip):
    folder, model, clip = tiny_clip
    pix = np.random.default_rng(1).standard_normal((3, 3, CLIP_IMAGE, CLIP_IMAGE)).astype(np.float32)
    last, pooled, embeds = clip.vision(pix)
    with torch.no_grad():
        out = model.vision_model(torch.tensor(pix))
        ref_embeds = model.visual_projection(out.pooler_output)
    errs = [rel_err(last, to_numpy(out.last_hidden_state)),
            rel_err(pooled, to_numpy(out.pooler_output)), rel_err(embeds, to_numpy(ref_embeds))]
    assert max(errs) < 3e-6, errs  # measured ~2.5e-7


def test_vision_only_model(tmp_path):
    model = save_tiny_clip(tmp_path, seed=3, vision_only=True)
    clip = load_clip(tmp_path)
    assert clip.text is None
    pix = np.random.default_rng(2).standard_normal((2, 3, CLIP_IMAGE, CLIP_IMAGE)).astype(np.float32)
    with torch.no_grad():
        ref = model(pixel_values=torch.tensor(pix)).image_embeds
    assert rel_err(clip.image_embeds(pix), to_numpy(ref)) < 3e-6
    with pytest.raises(ValueError, match="no text tower"):
        clip.text_embeds(["a cat"])


def test_clip_score_matches_torch(tiny_clip):
    """torchmetrics' definition with transformers' model and processor: per image
    100 * cos(image, text), the score max(mean, 0)."""
    from transformers import CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder, model, clip = tiny_clip
    images = _images(5)
    tok = CLIPTokenizer.from_pretrained(str(folder))
    proc = CLIPImageProcessorPil(size={"shortest_edge": CLIP_IMAGE},
                                 crop_size={"height": CLIP_IMAGE, "width": CLIP_IMAGE})
    with torch.no_grad():
        pix = torch.tensor(np.stack([proc(images=im, return_tensors="np")["pixel_values"][0]
                                     for im in images]))
        img = model.get_image_features(pixel_values=pix)
        text = tok(PROMPTS, padding=True, return_tensors="pt")
        txt = model.get_text_features(**text)
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        want = to_numpy(100 * (img * txt).sum(-1)).astype(np.float64)
    got = clip_scores(clip, images, PROMPTS, batch_size=4)  # a padded last batch
    # measured 2.3e-5 on scores up to 29 (8e-7 relative)
    assert np.abs(got - want).max() < 1e-5 * max(np.abs(want).max(), 1.0), (got, want)
    assert clip_score(clip, images, PROMPTS, 4) == pytest.approx(max(want.mean(), 0.0), abs=1e-4)
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_scores(clip, images, PROMPTS[:2])


def test_missing_clip_names_the_repo(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CheckpointError, match=f"put {DEFAULT_CLIP} there") as e:
        load_clip(DEFAULT_CLIP)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="not found"):
        load_clip(str(tmp_path / "nope.bin"))
