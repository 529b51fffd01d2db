"""Pipelines against diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline.

Tiny random pipelines are built with diffusers, saved, loaded with ``load_pipeline`` and
run from the same NCHW latents; float32 images must agree to TOL (relative; ~10x the
largest error measured, see ``PRINT_ERRORS=1`` in tests/util.py). The random paths get the
same randomness on both sides: diffusers' Euler ancestral noise and tomesd's random
destinations are replaced by what our keys draw (``step_keys``). Merging is checked
inside the compiled loop against the torch pipeline patched by tomesd (ToMe with random
destinations; ReToM's plan swapped in for tomesd's matching, with its cache and window
schedule), as are the compile cache and the input validation.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tomesd

from retom_jax import CheckpointError, ReToM, ToDo, ToMe
from retom_jax.pipelines.stable_diffusion import StableDiffusionPipeline, StableDiffusionXLPipeline
from retom_jax.pipelines.loading import load_pipeline
from tests.pipeline_helpers import (feed_ancestral_noise, latents_for, reference, step_keys,
                                    with_torch_scheduler)
from tests.pipeline_helpers import sd, sd2, sdxl  # noqa: F401 - module-scoped fixtures
from tests.util import assert_close, feed_tomesd_destinations, rel_err, swap_in_retom

TOL = 2e-5  # float32 images: measured 0.4e-6 to 3e-6 (SD2 v-prediction the largest)
BF16_TOL = 3e-2  # bfloat16 pipeline: measured 1.7e-2 to 2.0e-2
PROMPTS = ["the cat", "a photo of a dog"]
# The SD calls share one static configuration where they can (two prompts, 32x24 pixels,
# three steps, guidance on), so that their plain (unmerged) program compiles only once.
SD_KW = dict(negative_prompt=["", "blurry painting"], num_inference_steps=3,
             guidance_scale=7.5, height=32, width=24)
XL_KW = dict(num_inference_steps=3, guidance_scale=6.0, height=32, width=24)


# ----------------------------------------------------------------------------- SD parity

def test_sd_ddim_batch_negative_nonsquare(sd):
    """Two prompts, one negative prompt each, 32x24 pixels, DDIM."""
    torch_pipe, pipe, _ = sd
    assert isinstance(pipe, StableDiffusionPipeline)
    lat = latents_for(2, 32, 24)
    kw = SD_KW
    ref = reference(torch_pipe, PROMPTS, lat, **kw)
    out = pipe(PROMPTS, latents=lat, output_type="np", **kw)
    assert out.images.shape == (2, 32, 24, 3) and out.images.dtype == np.float32
    assert_close(out.images, ref, TOL)
    # The check can fail: the other prompt order gives a clearly different image.
    assert rel_err(pipe(PROMPTS[::-1], latents=lat, output_type="np", **kw).images, ref) > 2e-2

    # Seeds, latents, prompts and the guidance value are arguments: nothing recompiles.
    traces = pipe.trace_count
    seeded = pipe(["a red car", "the dog"], seed=5, output_type="np", **kw)  # draws its noise
    assert pipe.trace_count == traces
    compiles = pipe.compile_count
    runs = [pipe(["a red car", "the dog"], seed=6, output_type="np", **kw),
            pipe(PROMPTS[::-1], latents=lat * 0.5, output_type="np",
                 **{**kw, "guidance_scale": 3.0})]
    assert all(r.compile_seconds == 0.0 for r in runs)
    assert (pipe.compile_count, pipe.trace_count) == (compiles, traces)
    assert rel_err(seeded.images, runs[0].images) > 2e-2


def test_sd_dpm_solver_images_per_prompt(sd):
    """DPM-Solver++ 2M (second-order steps) from the scheduler name, no negative prompt
    (empty unconditional prompt), two images per prompt."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    torch_pipe, sd_pipe, folder = sd
    pipe = sd_pipe.with_scheduler("dpm++2m")  # the same models, shared
    assert pipe.unet is sd_pipe.unet and type(sd_pipe.scheduler).__name__ == "DDIM"
    # As a diffusers user switches schedulers: from the config read back from the folder
    # (its options, leading spacing included, carry over to the new class).
    saved = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    dpm = DPMSolverMultistepScheduler.from_config(saved.config)
    assert dpm.config.timestep_spacing == "leading"
    torch_dpm = type(torch_pipe)(**{**torch_pipe.components, "scheduler": dpm},
                                 requires_safety_checker=False)
    torch_dpm.set_progress_bar_config(disable=True)
    lat = latents_for(2, 32, 32, seed=1)
    kw = dict(num_inference_steps=4, guidance_scale=5.0, num_images_per_prompt=2)
    ref = reference(torch_dpm, "a cat", lat, **kw)
    out = pipe("a cat", latents=lat, output_type="np", **kw)
    assert_close(out.images, ref, TOL)
    assert rel_err(out.images[0], out.images[1]) > 2e-2  # different noise per image


def test_sd_without_guidance_latent_output(sd):
    """guidance_scale <= 1: no unconditional batch (as diffusers); "latent" output; the
    latents alone set the size (12x16 latents: 24x32 pixels)."""
    torch_pipe, pipe, _ = sd
    lat = latents_for(1, 24, 32, seed=2)
    kw = dict(num_inference_steps=3, guidance_scale=1.0)
    ref = reference(torch_pipe, "a red car", lat, output_type="latent", height=24, width=32,
                    **kw)
    out = pipe("a red car", latents=lat, output_type="latent", **kw)
    assert out.images.shape == (1, 4, 12, 16)
    assert_close(out.images, ref, TOL)


def test_sd_pndm_matches_diffusers(sd):
    """SD 1.5's own scheduler, PLMS: one UNet call more than steps (the warm-up)."""
    from diffusers import PNDMScheduler

    torch_pipe, sd_pipe, folder = sd
    pipe = sd_pipe.with_scheduler("pndm")
    torch_pndm = with_torch_scheduler(torch_pipe, folder, PNDMScheduler, skip_prk_steps=True)
    lat = latents_for(2, 32, 24, seed=8)
    ref = reference(torch_pndm, PROMPTS, lat, **SD_KW)
    out = pipe(PROMPTS, latents=lat, output_type="np", **SD_KW)
    assert_close(out.images, ref, TOL)
    assert rel_err(ref, reference(torch_pipe, PROMPTS, lat, **SD_KW)) > 1e-2  # not DDIM


def test_sd_euler_ancestral_matches_diffusers(sd, monkeypatch):
    """A stochastic sampler: diffusers' Euler ancestral fed the noise our key draws at
    each step (the loop key folded with the step index), same images; another key gives
    other noise."""
    from diffusers import EulerAncestralDiscreteScheduler

    torch_pipe, sd_pipe, folder = sd
    pipe = sd_pipe.with_scheduler("euler_a")
    torch_ea = with_torch_scheduler(torch_pipe, folder, EulerAncestralDiscreteScheduler)
    lat, key = latents_for(2, 32, 24, seed=7), jax.random.key(7)
    steps = feed_ancestral_noise(monkeypatch, key, lat.shape)
    ref = reference(torch_ea, PROMPTS, lat, **SD_KW)
    assert steps == [0, 1, 2]
    out = pipe(PROMPTS, latents=lat, key=key, output_type="np", **SD_KW)
    assert_close(out.images, ref, TOL)
    other = pipe(PROMPTS, latents=lat, key=jax.random.key(8), output_type="np", **SD_KW)
    assert rel_err(other.images, ref) > 1e-2


def test_sd2_v_prediction_matches_diffusers(sd2):
    """SD 2.x: v-prediction, linear projections, upcast attention, three UNet levels."""
    torch_pipe, pipe, _ = sd2
    lat = latents_for(2, 32, 24, seed=9)
    ref = reference(torch_pipe, PROMPTS, lat, **SD_KW)
    out = pipe(PROMPTS, latents=lat, output_type="np", **SD_KW)
    assert_close(out.images, ref, TOL)


def test_sd_bf16_pipeline_stays_close(sd):
    """bfloat16 weights and activations (float32 latents) against the float32 torch
    pipeline: measured 1.7e-2 to 2.0e-2 relative over 8 latents (seeds 0-7, these
    prompts); the bound is 1.5x the largest."""
    torch_pipe, _, folder = sd
    pipe = load_pipeline(folder, dtype="bf16")
    for seed in (0, 6):
        lat = latents_for(2, 32, 24, seed=seed)
        ref = reference(torch_pipe, PROMPTS, lat, **SD_KW)
        out = pipe(PROMPTS, latents=lat, output_type="np", **SD_KW)
        assert out.images.dtype == np.float32
        assert_close(out.images, ref, BF16_TOL)


# ----------------------------------------------------------------------------- SDXL parity

def test_sdxl_matches_diffusers(sdxl):
    """Euler (init_noise_sigma > 1), two prompts; with a negative prompt, then without
    one (force_zeros_for_empty_prompt: zero unconditional embeddings)."""
    torch_pipe, pipe, _ = sdxl
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert pipe.force_zeros_for_empty_prompt
    lat = latents_for(2, 32, 24, seed=3)
    kw = XL_KW
    ref = reference(torch_pipe, ["the cat", "a red car"], lat, negative_prompt="blurry", **kw)
    out = pipe(["the cat", "a red car"], latents=lat, negative_prompt="blurry",
               output_type="np", **kw)
    assert_close(out.images, ref, TOL)
    compiles = pipe.compile_count
    ref_zero = reference(torch_pipe, ["the cat", "a red car"], lat, **kw)
    zero = pipe(["the cat", "a red car"], latents=lat, output_type="np", **kw)
    assert_close(zero.images, ref_zero, TOL)
    assert rel_err(ref_zero, ref) > 2e-2
    assert pipe.compile_count == compiles + 1  # only the text encoding (zero negatives)


# ----------------------------------------------------------------------------- merging

def test_tome_random_matches_tomesd_in_the_pipeline(sd, monkeypatch):
    """ToMe with random destinations (its default) against tomesd patching the torch
    pipeline, tomesd drawing what our keys draw: block k of step i draws from
    fold_in(merge key of step i, k). A new draw at every step and in every block."""
    torch_pipe, pipe, _ = sd
    lat, key = latents_for(2, 32, 24, seed=4), jax.random.key(4)
    plain = pipe(PROMPTS, latents=lat, output_type="np", **SD_KW).images
    tomesd.apply_patch(torch_pipe, ratio=0.5, max_downsample=1)  # use_rand=True
    try:
        drawn = feed_tomesd_destinations(
            monkeypatch, torch_pipe.unet,
            lambda step, block: jax.random.fold_in(step_keys(key, step)[1], block))
        ref = reference(torch_pipe, PROMPTS, lat, **SD_KW)
    finally:
        tomesd.remove_patch(torch_pipe)
    assert [c for c, _ in drawn] == [0] * 5 + [1] * 5 + [2] * 5  # 5 merging blocks a step
    out = pipe(PROMPTS, latents=lat, key=key, output_type="np", merge=ToMe(ratio=0.5),
               **SD_KW)
    assert_close(out.images, ref, TOL)
    assert 1e-3 < rel_err(ref, plain) < 0.5  # merging changed the image, a little


def test_retom_cache_is_carried_and_reused(sd, monkeypatch):
    """ReToM(cache_step=1) inside the compiled loop equals the torch pipeline with ReToM's
    plan (cached at step 1) where tomesd merges, and the step-by-step path, whose
    callback shows the state carried from step to step: its counter advances, and the
    representatives chosen at step 1 (which differ from step 0's) stay for step 2."""
    torch_pipe, pipe, _ = sd
    lat = latents_for(2, 32, 24, seed=11)
    kw = dict(SD_KW, latents=lat, output_type="np")
    plain = pipe(PROMPTS, **kw).images
    merge = ReToM(ratio=0.5, cache_step=1)
    fused = pipe(PROMPTS, merge=merge, **kw).images
    assert_close(fused, retom_reference(torch_pipe, monkeypatch, merge, lat), TOL)
    states = []
    stepped = pipe(PROMPTS, merge=merge, progress=True,
                   callback=lambda i, x, s: states.append(jax.device_get(s)), **kw).images
    assert np.abs(stepped - fused).max() <= 1e-5
    assert 1e-3 < rel_err(fused, plain) < 0.5

    assert [int(s["step"]) for s in states] == [1, 2, 3]
    reps = [jax.tree.leaves(s["blocks"]) for s in states]
    assert reps[0], "ReToM carried no state"
    for a, b in zip(reps[1], reps[2]):  # step 2 reuses what step 1 chose
        np.testing.assert_array_equal(a, b)
    assert any((a != b).any() for a, b in zip(reps[0], reps[1])), \
        "steps 0 and 1 chose the same representatives: the reuse check proves nothing"


def retom_reference(torch_pipe, monkeypatch, merge, latents, **kw):
    """The torch pipeline's images with ReToM's plan where tomesd merges (window and
    cache as ``merge`` has them at each step)."""
    tomesd.apply_patch(torch_pipe, ratio=merge.ratio, max_downsample=merge.max_downsample,
                       use_rand=False, merge_attn=merge.merge_attn,
                       merge_crossattn=merge.merge_crossattn, merge_mlp=merge.merge_mlp)
    try:
        with monkeypatch.context() as patch:
            swap_in_retom(patch, torch_pipe.unet, merge)
            return reference(torch_pipe, PROMPTS, latents, **{**SD_KW, **kw})
    finally:
        tomesd.remove_patch(torch_pipe)


def test_retom_window_schedule_in_the_loop(sd, monkeypatch):
    """ReToM windows 2x2, then 4x4 from step 1, where the selection is cached for step 2:
    the compiled loop (one piece per window, then the reuse piece) and the step-by-step
    path equal the torch pipeline with ReToM's plan at each step; the schedule changes the
    result."""
    torch_pipe, pipe, _ = sd
    lat = latents_for(2, 32, 24, seed=6)
    merge = ReToM(ratio=0.5, window=(2, 2), schedule=((1, (4, 4)),), cache_step=1)
    kw = dict(SD_KW, latents=lat, output_type="np")
    fused = pipe(PROMPTS, merge=merge, **kw).images
    stepped = pipe(PROMPTS, merge=merge, progress=True, **kw).images
    expected = retom_reference(torch_pipe, monkeypatch, merge, lat)
    assert_close(fused, expected, TOL)
    assert_close(stepped, expected, TOL)
    last_only = retom_reference(torch_pipe, monkeypatch,
                                ReToM(ratio=0.5, window=(4, 4), cache_step=1), lat)
    assert rel_err(expected, last_only) > 1e-3  # step 0 really used other windows
    with pytest.raises(ValueError, match=r"window 32x32 is larger than the 16x12 grid "
                                         r"\(the schedule's windows from step 2\)"):
        pipe(PROMPTS, merge=ReToM(schedule=((2, (32, 32)),)), **kw)


def test_progress_path_runs_the_fused_loops_pieces(sd):
    """The progress path steps through the same loop pieces as the fused program: the same
    images (ToMe's random destinations, ReToM's cache; the window schedule: above), and
    its step programs are keyed by the piece alone. ReToM configs that differ only in
    cache_step share them, the output type recompiles only the decoder's program, and the
    decoder's program is not compiled again for another merge config."""
    _, pipe, _ = sd
    kw = dict(SD_KW, seed=3, output_type="np")
    for merge in (ToMe(ratio=0.5), ReToM(ratio=0.5, cache_step=1)):
        fused = pipe(PROMPTS, merge=merge, **kw).images
        ticks = []
        stepped = pipe(PROMPTS, merge=merge, progress=True,
                       callback=lambda i, x, s: ticks.append(i), **kw).images
        assert np.abs(stepped - fused).max() <= 1e-6, merge
        assert ticks == [0, 1, 2]

    def programs(name):
        return sum(k[0] == name for k in pipe._compiled)

    compiles = pipe.compile_count
    pipe(PROMPTS, merge=ReToM(ratio=0.5, cache_step=0), progress=True, **kw)
    assert pipe.compile_count == compiles  # step 0 fresh, steps 1-2 cached: same programs
    finish = programs("finish")
    pipe(PROMPTS, merge=ReToM(ratio=0.5, cache_step=0), progress=True,
         **dict(kw, output_type="latent"))  # only the (no-)decoder program can be new
    assert pipe.compile_count - compiles == programs("finish") - finish <= 1
    finish, steps = programs("finish"), programs("step")
    pipe(PROMPTS, merge=ReToM(ratio=0.3), progress=True, **kw)
    assert programs("finish") == finish and programs("step") == steps + 1


def test_compile_ahead(sd):
    """compile() builds the program a call with the same options then runs at once, for
    any prompt text, seed or guidance value; it samples nothing."""
    _, pipe, _ = sd
    merge = ReToM(ratio=0.3, matching="global")
    options = dict(num_inference_steps=3, height=32, width=24, merge=merge)
    traces = pipe.trace_count
    seconds = pipe.compile(["x", "y"], negative_prompt=["", ""], **options)
    assert seconds > 0 and pipe.trace_count == traces + 1
    assert pipe.compile(["x", "y"], **options) == 0.0
    compiles = pipe.compile_count
    out = pipe(PROMPTS, guidance_scale=3.0, seed=9, output_type="np", **options)
    assert out.compile_seconds == 0.0 and pipe.compile_count == compiles
    assert out.images.shape == (2, 32, 24, 3)
    with pytest.raises(ValueError, match="larger than the 16x12 grid"):
        pipe.compile("x", num_inference_steps=3, height=32, width=24,
                     merge=ReToM(window=(32, 32)))


def test_todo_and_sdxl_retom_run_compiled(sd, sdxl, monkeypatch):
    _, pipe, _ = sd
    kw = dict(SD_KW, seed=2, output_type="np")
    plain = pipe(PROMPTS, **kw).images
    todo = pipe(PROMPTS, merge=ToDo(factor=2), **kw).images
    assert 1e-3 < rel_err(todo, plain) < 0.5
    # SDXL's first attention level is at downsample 2: ReToM merges there.
    torch_xl, xl, _ = sdxl
    lat = latents_for(2, 32, 24, seed=2)
    kw = dict(XL_KW, latents=lat, output_type="np")
    prompts = ["the cat", "a red car"]
    plain = xl(prompts, **kw).images
    compiles = xl.compile_count
    merge = ReToM(ratio=0.5, max_downsample=2)
    merged = xl(prompts, merge=merge, **kw).images
    assert xl.compile_count == compiles + 1  # one program for the whole merged loop
    assert 1e-3 < rel_err(merged, plain) < 0.5
    # against the torch SDXL pipeline with ReToM's plan where tomesd merges
    tomesd.apply_patch(torch_xl, ratio=0.5, max_downsample=2, use_rand=False)
    try:
        swap_in_retom(monkeypatch, torch_xl.unet, merge)
        ref = reference(torch_xl, prompts, lat, **XL_KW)
    finally:
        tomesd.remove_patch(torch_xl)
    assert_close(merged, ref, TOL)


# ----------------------------------------------------------------------------- validation

def test_bad_inputs_fail_before_compiling(sd, sdxl):
    _, pipe, _ = sd
    compiles, traces = pipe.compile_count, pipe.trace_count
    bad = [
        (dict(height=31), "height=31 is not a multiple of 2"),
        (dict(width=0), "width must be a positive int"),
        (dict(prompt=[]), "empty list"),
        (dict(prompt=["a", 3]), "string or a non-empty list of strings"),
        (dict(prompt=["a", "b"], negative_prompt=["c"]), "negative_prompt has 1 entries but "
                                                          "prompt has 2"),
        (dict(negative_prompt="blurry", guidance_scale=1.0), "no effect with guidance_scale"),
        (dict(negative_prompt="blurry", guidance_scale=0.5), "no effect with guidance_scale"),
        (dict(latents=np.zeros((1, 4, 8, 8), np.float32), height=32, width=32),
         r"latents must have shape \[1, 4, 16, 16\]"),
        (dict(latents=np.zeros((4, 16, 16), np.float32)), "latents must be NCHW"),
        (dict(latents=np.zeros((1, 4, 16, 16), np.int32)), "float array"),
        (dict(num_inference_steps=0), "num_inference_steps must be an int >= 1"),
        (dict(num_inference_steps=2000), "num_inference_steps=2000 must be between"),
        (dict(output_type="tensor"), "unknown output_type"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(merge=ReToM(window=(32, 32))), "larger than the 16x16 grid"),
        (dict(merge="retom"), "merge must be ToMe, ReToM or ToDo"),
        (dict(seed=1, key=jax.random.key(1)), "either seed or key"),
        (dict(guidance_scale="high"), "guidance_scale must be a number"),
    ]
    for kwargs, message in bad:
        kwargs = {"prompt": "a cat", "num_inference_steps": 2, **kwargs}
        with pytest.raises(ValueError, match=message):
            pipe(**kwargs)
    assert (pipe.compile_count, pipe.trace_count) == (compiles, traces)
    _, xl, _ = sdxl
    with pytest.raises(ValueError, match="merges nowhere"):  # SDXL has no attention at level 1
        xl("a cat", merge=ReToM(max_downsample=1))


def test_loading_errors(sd, tmp_path):
    _, _, folder = sd
    with pytest.raises(CheckpointError, match="no model_index.json"):
        load_pipeline(folder / "unet")
    with pytest.raises(CheckpointError, match="neither a local pipeline folder"):
        load_pipeline(tmp_path / "missing" / "folder")

    def copy(index_edit=None, drop=()):
        dst = tmp_path / f"copy{len(os.listdir(tmp_path))}"
        dst.mkdir()
        index = json.loads((folder / "model_index.json").read_text())
        if index_edit:
            index_edit(index)
        (dst / "model_index.json").write_text(json.dumps(index))
        for sub in folder.iterdir():
            if sub.is_dir() and sub.name not in drop:
                os.symlink(sub, dst / sub.name)
        return dst

    with pytest.raises(CheckpointError, match="'KandinskyPipeline'.*loads StableDiffusion"):
        load_pipeline(copy(lambda i: i.update(_class_name="KandinskyPipeline")))
    with pytest.raises(CheckpointError, match="component folder vae/ is missing"):
        load_pipeline(copy(drop=("vae",)))
    with pytest.raises(CheckpointError, match="declares no text_encoder"):
        load_pipeline(copy(lambda i: i.update(text_encoder=[None, None])))
    with pytest.raises(ValueError, match="unknown scheduler 'heun'"):
        load_pipeline(folder, scheduler="heun")
