"""Step caching (DeepCache): the UNet's full and shallow calls against diffusers' blocks run
the same way (tests/step_cache_ref.py), the StepCache config, and the pipeline's cached
loop against a step-cached torch pipeline."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import retom_jax as rj
from retom_jax.models.unet import load_unet
from tests.step_cache_ref import cached_forward
from tests.test_unet import inputs
from tests.tiny import FAMILIES, torch_unet
from tests.util import assert_close

TOL = 1e-5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name, cfg in FAMILIES.items():
        model = torch_unet(cfg, seed=5)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (model, load_unet(folder))
    return out


def _torch(model, x, t, ehs, added, depth, feature=None):
    kw = None if added is None else {k: torch.from_numpy(np.asarray(v, np.float32))
                                     for k, v in added.items()}
    with torch.no_grad():
        out, feat = cached_forward(model, torch.from_numpy(x), torch.from_numpy(np.asarray(t)),
                                   torch.from_numpy(ehs), kw, depth=depth, feature=feature)
    return out, feat


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("h,w", [(16, 16), (12, 10)])
def test_full_and_shallow_calls_match_diffusers_blocks(checkpoints, name, h, w):
    """A full call's output and feature, then a shallow call at another step (other
    latents and timestep) reusing that feature, at every depth, square and odd sizes."""
    model, unet = checkpoints[name]
    x, t, ehs, added = inputs(name, 2, h, w, seed=1)
    x2, t2, _, _ = inputs(name, 2, h, w, seed=2)
    for depth in range(1, len(FAMILIES[name]["block_out_channels"]) + 1):
        ref, feat = _torch(model, x, t, ehs, added, depth)
        mine = unet.apply_cached(unet.params, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ehs),
                                 added, depth=depth)
        assert_close(np.asarray(mine.sample), ref.numpy(), TOL)
        assert_close(np.transpose(np.asarray(mine.feature), (0, 3, 1, 2)), feat.numpy(), TOL)
        assert mine.feature.shape == unet.feature_shape(x.shape, depth)
        ref2, _ = _torch(model, x2, t2, ehs, added, depth, feature=feat)
        mine2 = unet.apply_cached(unet.params, jnp.asarray(x2), jnp.asarray(t2),
                                  jnp.asarray(ehs), added, depth=depth, feature=mine.feature)
        assert_close(np.asarray(mine2.sample), ref2.numpy(), TOL)
        assert mine2.feature is mine.feature or np.array_equal(mine2.feature, mine.feature)
        plain = unet.apply(unet.params, jnp.asarray(x2), jnp.asarray(t2), jnp.asarray(ehs),
                           added).sample  # the shallow call is not the full one
        assert np.abs(np.asarray(plain) - np.asarray(mine2.sample)).max() > 1e-3


def test_shallow_call_keeps_retom_cache_of_blocks_it_skips(checkpoints):
    """ReToM's carried cache: a shallow call updates the blocks it runs, keeps the others,
    and the state keeps its structure (so that it can be a loop carry)."""
    import jax

    _, unet = checkpoints["sd2"]
    x, t, ehs, _ = inputs("sd2", 2, 16, 16)
    merge = rj.ReToM(ratio=0.5, cache_step=0, max_downsample=2)
    state = unet.init_merge_state(x.shape, ehs.shape, merge)
    full = unet.apply_cached(unet.params, jnp.asarray(x), t, jnp.asarray(ehs), depth=1,
                             merge=merge, merge_state=state)
    shallow = unet.apply_cached(unet.params, jnp.asarray(x) + 1, t, jnp.asarray(ehs), depth=1,
                                feature=full.feature, merge=merge,
                                merge_state=full.merge_state)
    assert (jax.tree.structure(shallow.merge_state) == jax.tree.structure(full.merge_state))
    assert int(shallow.merge_state["step"]) == 2


# ----------------------------------------------------------------------------- the pipeline

from tests.pipeline_helpers import (latents_for, reference, sd, sdxl,  # noqa: E402,F401
                                    with_torch_scheduler)
from tests.step_cache_ref import patch_step_cache  # noqa: E402
from tests.util import rel_err  # noqa: E402

PROMPTS = ["the cat", "a photo of a dog"]
SD_KW = dict(negative_prompt=["", "blurry painting"], num_inference_steps=5,
             guidance_scale=7.5, height=32, width=24)
PIPE_TOL = 2e-5


def cached_reference(torch_pipe, cache, prompts, latents, **kw):
    remove = patch_step_cache(torch_pipe.unet, cache.interval, cache.depth)
    try:
        return reference(torch_pipe, prompts, latents, **kw)
    finally:
        remove()


def test_interval_one_is_the_uncached_loop(sd):
    _, pipe, _ = sd
    kw = dict(SD_KW, seed=1, output_type="np")
    plain = pipe(PROMPTS, **kw).images
    compiles = pipe.compile_count
    same = pipe(PROMPTS, step_cache=rj.StepCache(interval=1, depth=1), **kw).images
    np.testing.assert_array_equal(same, plain)
    assert pipe.compile_count == compiles  # the very same program


def test_cached_loop_matches_step_cached_diffusers(sd):
    """DDIM with guidance, a full call every 2 steps: the fused loop (lax.cond picks the
    kind of call), the progress path (one program per kind) and the torch pipeline whose
    UNet runs diffusers' blocks on the same schedule; no recompile for another seed."""
    torch_pipe, pipe, _ = sd
    cache = rj.StepCache(interval=2, depth=1)
    lat = latents_for(2, 32, 24, seed=3)
    kw = dict(SD_KW, latents=lat, output_type="np")
    ref = cached_reference(torch_pipe, cache, PROMPTS, lat, **SD_KW)
    fused = pipe(PROMPTS, step_cache=cache, **kw).images
    assert_close(fused, ref, PIPE_TOL)
    ticks = []
    stepped = pipe(PROMPTS, step_cache=cache, progress=True,
                   callback=lambda i, x, s: ticks.append(i), **kw).images
    assert_close(stepped, ref, PIPE_TOL)
    assert ticks == list(range(5))
    plain = reference(torch_pipe, PROMPTS, lat, **SD_KW)
    assert 1e-3 < rel_err(ref, plain) < 0.5  # caching changed the image, a little
    compiles = pipe.compile_count
    out = pipe(PROMPTS[::-1], seed=4, step_cache=cache, **dict(SD_KW, output_type="np"))
    assert out.compile_seconds == 0.0 and pipe.compile_count == compiles
    assert pipe.compile(PROMPTS, step_cache=cache, num_inference_steps=5, height=32,
                        width=24) == 0.0


def test_plms_warmup_and_sdxl_deeper_cache(sd, sdxl):
    """PLMS (its warm-up call is call 1 of the schedule) at interval 3; SDXL (Euler, the
    added conditioning) caching at depth 2 of 3."""
    from diffusers import PNDMScheduler

    torch_pipe, sd_pipe, folder = sd
    pipe = sd_pipe.with_scheduler("pndm")
    torch_pndm = with_torch_scheduler(torch_pipe, folder, PNDMScheduler, skip_prk_steps=True)
    cache = rj.StepCache(interval=3, depth=1)
    lat = latents_for(2, 32, 24, seed=8)
    ref = cached_reference(torch_pndm, cache, PROMPTS, lat, **SD_KW)
    out = pipe(PROMPTS, latents=lat, output_type="np", step_cache=cache, **SD_KW)
    assert_close(out.images, ref, PIPE_TOL)

    torch_xl, xl, _ = sdxl
    cache = rj.StepCache(interval=2, depth=2)
    kw = dict(num_inference_steps=4, guidance_scale=6.0, height=32, width=24)
    lat = latents_for(2, 32, 24, seed=5)
    prompts = ["the cat", "a red car"]
    ref = cached_reference(torch_xl, cache, prompts, lat, negative_prompt="blurry", **kw)
    out = xl(prompts, latents=lat, negative_prompt="blurry", output_type="np",
             step_cache=cache, **kw)
    assert_close(out.images, ref, PIPE_TOL)


def test_step_cache_checks(sd):  # noqa: F811
    _, pipe, _ = sd
    with pytest.raises(ValueError, match="interval must be an int >= 1"):
        rj.StepCache(interval=0)
    with pytest.raises(ValueError, match=r"depth=3 is deeper than the UNet \(2 levels\)"):
        pipe("x", step_cache=rj.StepCache(2, 3), num_inference_steps=2)
    with pytest.raises(ValueError, match="step_cache must be StepCache"):
        pipe("x", step_cache=3, num_inference_steps=2)
    assert rj.StepCache(3).counts(10) == (4, 6)


def test_merging_with_step_cache_matches_tomesd(sd, monkeypatch):
    """Step caching stacked with ToMe (random destinations: a shallow call's blocks draw
    the keys they draw in a full call) and with ReToM's representative cache (selected at
    step 1, a shallow call, reused after: the deep blocks keep what the full call at step 0
    chose), against tomesd patching the step-cached torch pipeline. ToDo runs too."""
    import jax
    import tomesd

    import tests.util
    from tests.pipeline_helpers import step_keys
    from tests.step_cache_ref import track_cached_blocks
    from tests.util import feed_tomesd_destinations, swap_in_retom

    torch_pipe, pipe, _ = sd
    cache = rj.StepCache(interval=2, depth=1)
    lat, key = latents_for(2, 32, 24, seed=4), jax.random.key(4)

    def tracked(patch):
        where, handle = track_cached_blocks(patch, torch_pipe.unet, cache.interval,
                                            cache.depth)
        handles.append(handle)
        patch.setattr(tests.util, "track_tomesd_blocks", lambda mp, model: where)

    for merge in (rj.ToMe(ratio=0.5), rj.ReToM(ratio=0.5, cache_step=1)):
        handles = []
        tomesd.apply_patch(torch_pipe, ratio=0.5, max_downsample=1,
                           use_rand=isinstance(merge, rj.ToMe))
        try:
            with monkeypatch.context() as patch:
                tracked(patch)
                if isinstance(merge, rj.ToMe):
                    drawn = feed_tomesd_destinations(
                        patch, torch_pipe.unet,
                        lambda step, block: jax.random.fold_in(step_keys(key, step)[1], block))
                else:
                    swap_in_retom(patch, torch_pipe.unet, merge)
                ref = cached_reference(torch_pipe, cache, PROMPTS, lat, **SD_KW)
        finally:
            tomesd.remove_patch(torch_pipe)
            for h in handles:
                h.remove()
        out = pipe(PROMPTS, latents=lat, key=key, output_type="np", merge=merge,
                   step_cache=cache, **SD_KW)
        assert_close(out.images, ref, PIPE_TOL)
        if isinstance(merge, rj.ToMe):  # the 5 merging blocks are all in the outer level
            assert drawn == [(c, b) for c in range(5) for b in (0, 1, 3, 4, 5)]
    kw = dict(SD_KW, seed=2, output_type="np")
    fused = pipe(PROMPTS, merge=rj.ToDo(factor=2), step_cache=cache, **kw).images
    stepped = pipe(PROMPTS, merge=rj.ToDo(factor=2), step_cache=cache, progress=True,
                   **kw).images
    assert np.abs(fused - stepped).max() <= 1e-5


# ----------------------------------------------------------------------------- command line

def test_cli_step_cache_and_fast(tmp_path, capsys):
    """generate --step-cache runs the demo with it; --fast fills in what is not given;
    eval's runs gain the cached twins and the preset's run."""
    import argparse

    from retom_jax.cli import main
    from retom_jax.cli.options import apply_fast, step_cache_from_args
    from retom_jax.eval.run import run_list, run_settings
    from retom_jax.pipelines.step_cache import FAST

    out = tmp_path / "x.png"
    assert main(["generate", "--model", "demo", "--prompt", "a red circle on a blue background",
                 "--steps", "3", "--step-cache", "2", "--out", str(out)]) == 0
    assert out.is_file() and "step cache every 2, depth 1" in capsys.readouterr().out

    args = argparse.Namespace(fast=True, merge="none", ratio=None, step_cache=None,
                              step_cache_depth=None)
    apply_fast(args)
    assert (args.merge, step_cache_from_args(args)) == (FAST.method, FAST.step_cache)
    assert args.ratio == (FAST.ratio if FAST.method in ("tome", "retom") else None)
    args = argparse.Namespace(fast=True, merge="retom", ratio=0.3, step_cache=2,
                              step_cache_depth=None)
    apply_fast(args)  # what is given wins
    assert (args.merge, args.ratio, step_cache_from_args(args)) == ("retom", 0.3,
                                                                    rj.StepCache(2))
    runs = run_list(["tome"], [0.5], rj.StepCache(3), fast=True)
    assert runs == [("none", None), ("tome", 0.5), ("none+cache", None), ("tome+cache", 0.5),
                    ("fast", None)]
    ns = argparse.Namespace(step_cache=3, step_cache_depth=None, window=None, matching=None,
                            todo_factor=None, max_downsample=None)
    assert run_settings(ns, "tome+cache", 0.5, 1) == (rj.ToMe(ratio=0.5), rj.StepCache(3))
    assert run_settings(ns, "fast", None, 1) == (FAST.merge(1), FAST.step_cache)
