"""FlowMatchEuler against diffusers' FlowMatchEulerDiscreteScheduler: schedules (fixed
shift, Flux's resolution-dependent shift, linear time shift, shift_terminal, custom
sigmas) and sampling steps."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from retom_jax.schedulers.flow_match import FlowMatchEuler

FLUX = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096)


@pytest.mark.parametrize("config,steps,flux_sigmas,tokens", [
    ({}, 10, False, None),
    ({"shift": 3.0}, 28, False, None),                       # SD3
    (FLUX, 28, True, 4096),                                   # Flux-dev at 1024 px
    (FLUX, 4, True, 1024),                                    # schnell-like, 512 px
    ({**FLUX, "time_shift_type": "linear"}, 7, True, 700),
    ({"shift": 2.0, "shift_terminal": 0.1}, 9, False, None),
])
def test_schedule_and_steps_match_diffusers(config, steps, flux_sigmas, tokens):
    ref = FlowMatchEulerDiscreteScheduler(**config)
    ours = FlowMatchEuler.from_config(dict(ref.config))
    kw, ref_kw = {}, {}
    if flux_sigmas:
        kw["sigmas"] = ref_kw["sigmas"] = np.linspace(1.0, 1 / steps, steps)
    if config.get("use_dynamic_shifting"):
        kw["mu"] = ref_kw["mu"] = ours.mu(tokens)
    ref.set_timesteps(steps, **ref_kw)
    state = ours.set_timesteps(steps, (2, 3, 4), **kw)
    np.testing.assert_allclose(state.sigmas, ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(state.timesteps, ref.timesteps.numpy(), rtol=1e-6, atol=1e-4)

    rng = np.random.RandomState(0)
    x = rng.randn(2, 3, 4).astype(np.float32)
    xt, xj = torch.from_numpy(x), jnp.asarray(x)
    step = jax.jit(ours.step)
    for i, t in enumerate(ref.timesteps):
        out = rng.randn(2, 3, 4).astype(np.float32)
        xt = ref.step(torch.from_numpy(out), t, xt).prev_sample
        xj, state = step(state, jnp.asarray(out), i, xj)
        np.testing.assert_allclose(np.asarray(xj), xt.numpy(), rtol=1e-5, atol=1e-5)
    assert int(state.count) == steps


def test_mu_is_flux_calculate_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    s = FlowMatchEuler(**FLUX)
    for n in (256, 1024, 4096, 6000):
        assert s.mu(n) == pytest.approx(calculate_shift(n, 256, 4096, 0.5, 1.15), rel=1e-12)


def test_scale_noise_matches_diffusers():
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(10)
    ours = FlowMatchEuler(shift=3.0)
    state = ours.set_timesteps(10)
    rng = np.random.RandomState(1)
    x, noise = rng.randn(1, 4, 2, 2).astype(np.float32), rng.randn(1, 4, 2, 2).astype(np.float32)
    expected = ref.scale_noise(torch.from_numpy(x), ref.timesteps[3:4], torch.from_numpy(noise))
    got = ours.scale_noise(state, jnp.asarray(x), 3, jnp.asarray(noise))
    np.testing.assert_allclose(np.asarray(got), expected.numpy(), rtol=1e-6, atol=1e-6)


def test_unsupported_options_and_missing_mu():
    with pytest.raises(ValueError, match="use_karras_sigmas=True is not supported"):
        FlowMatchEuler(use_karras_sigmas=True)
    with pytest.raises(ValueError, match="needs mu="):
        FlowMatchEuler(use_dynamic_shifting=True).set_timesteps(4)
