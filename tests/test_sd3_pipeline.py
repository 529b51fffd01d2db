"""StableDiffusion3Pipeline: images equal to diffusers' given the same latents (tiny random
SD3.5-style pipeline, with classifier-free guidance and a negative prompt), merging."""
import numpy as np
import pytest
import torch

import retom_jax as rj
from tests.flux_helpers import save_sd3
from tests.util import assert_close, rel_err

TOL = 1e-4


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3")
    return save_sd3(folder), rj.load_pipeline(folder)


def test_images_equal_diffusers(sd3):
    torch_pipe, pipe = sd3
    assert isinstance(pipe, rj.StableDiffusion3Pipeline)
    latents = np.random.RandomState(0).randn(2, 16, 12, 16).astype(np.float32)
    prompts = ["a photo of a red cat", "a blue square"]
    kw = dict(height=24, width=32, num_inference_steps=3, guidance_scale=5.0,
              negative_prompt=["blurry", "a dog"], max_sequence_length=16)
    with torch.no_grad():
        ref = torch_pipe(prompts, latents=torch.from_numpy(latents), output_type="np", **kw).images
    out = pipe(prompts, latents=latents, output_type="np", **kw)
    assert_close(out.images, ref, TOL)
    merged = pipe(prompts, latents=latents, output_type="np",
                  merge=rj.ReToM(ratio=0.5, merge_mlp=True, cache_step=1), **kw)
    assert 1e-4 < rel_err(merged.images, ref) < 0.5


def test_cli_generate_sd3(sd3, tmp_path, capsys):
    from retom_jax.cli import main
    _, pipe = sd3
    out = tmp_path / "sd3.png"
    assert main(["generate", "--model", str(pipe.folder), "--prompt", "a red cat",
                 "--negative-prompt", "blurry", "--steps", "1", "--height", "16",
                 "--width", "16", "--out", str(out), "--merge", "todo"]) == 0
    assert out.is_file() and "loaded StableDiffusion3Pipeline" in capsys.readouterr().out
