"""FluxPipeline: images equal to diffusers' FluxPipeline given the same latents (tiny
random dev and schnell pipelines), compile(), progress, merging through the pipeline."""
import numpy as np
import pytest
import torch

import retom_jax as rj
from retom_jax.pipelines.flux import FluxPipeline, load_flux_pipeline, pack
from tests.flux_helpers import TEXT_TOKENS, save_flux
from tests.util import assert_close, rel_err

TOL = 1e-4  # float32 images after 4 steps and the VAE


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux_dev")
    torch_pipe = save_flux(folder, guidance=True)
    return torch_pipe, load_flux_pipeline(folder), folder


def reference(torch_pipe, prompt, latents, **kw):
    with torch.no_grad():
        return torch_pipe(prompt, latents=torch.from_numpy(latents), output_type="np",
                          max_sequence_length=TEXT_TOKENS, **kw).images


def test_images_equal_diffusers(dev):
    torch_pipe, pipe, _ = dev
    h, w = 32, 24
    latents = pack(np.random.RandomState(0).randn(2, 16, h // 2, w // 2).astype(np.float32))
    prompts = ["a photo of a red cat", "a blue square"]
    ref = reference(torch_pipe, prompts, np.asarray(latents), height=h, width=w,
                    num_inference_steps=4, guidance_scale=4.0)
    out = pipe(prompts, num_inference_steps=4, guidance_scale=4.0, height=h, width=w,
               latents=latents, max_sequence_length=TEXT_TOKENS, output_type="np")
    assert out.images.shape == (2, h, w, 3)
    assert_close(out.images, ref, TOL)
    # progress runs the same step function from Python: the same images
    again = pipe(prompts, num_inference_steps=4, guidance_scale=4.0, height=h, width=w,
                 latents=latents, max_sequence_length=TEXT_TOKENS, output_type="np",
                 progress=True)
    assert_close(again.images, out.images, 1e-6)


def test_compile_then_call_and_merge(dev):
    _, pipe, _ = dev
    kw = dict(num_inference_steps=2, height=32, width=32, max_sequence_length=TEXT_TOKENS,
              output_type="np")
    merge = rj.ReToM(ratio=0.5, merge_mlp=True, cache_step=0)
    assert pipe.compile("a cat", merge=merge, **kw) > 0
    out = pipe("a cat", seed=1, merge=merge, **kw)
    assert out.compile_seconds == 0.0
    plain = pipe("a cat", seed=1, **kw)
    assert 1e-4 < rel_err(out.images, plain.images) < 0.5
    pil = pipe("a dog", seed=1, num_inference_steps=1, height=16, width=16,
               max_sequence_length=TEXT_TOKENS)
    assert pil.images[0].size == (16, 16)


def test_load_pipeline_dispatches_and_checks(dev):
    _, _, folder = dev
    pipe = rj.load_pipeline(folder)
    assert isinstance(pipe, FluxPipeline)
    with pytest.raises(ValueError, match="multiple of 4"):
        pipe("a cat", height=30, width=32, max_sequence_length=TEXT_TOKENS)
    with pytest.raises(ValueError, match="latents must be packed"):
        pipe("a cat", height=32, width=32, latents=np.zeros((1, 10, 64), np.float32),
             max_sequence_length=TEXT_TOKENS)


def test_cli_generate(dev, tmp_path, capsys):
    from retom_jax.cli import main
    _, _, folder = dev
    out = tmp_path / "flux.png"
    assert main(["generate", "--model", str(folder), "--prompt", "a red cat", "--steps", "1",
                 "--height", "16", "--width", "16", "--out", str(out), "--merge", "retom",
                 "--ratio", "0.5"]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "loaded FluxPipeline" in text and "merge_mlp=True" in text


def test_fsdp_mesh_matches_unsharded(tmp_path):
    """Kernels split over fsdp=4 (4 host devices, one subprocess): the same images."""
    from tests.util import run_on_host_devices
    rows = run_on_host_devices("tests.flux_mesh_cases", tmp_path / "mesh.json", devices=4,
                               timeout=900)
    assert rows[0]["split_kernels"] > 10
    for row in rows[1:]:
        assert row["rel"] < 1e-5, row
