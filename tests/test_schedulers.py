"""Parity of retom_jax.schedulers with the diffusers torch schedulers built from the same
config dicts: timesteps, sigmas, whole sampling trajectories fed identical model outputs
(and identical ancestral noise), jit + fori_loop equivalence, loading and errors."""
import json

import diffusers
import diffusers.schedulers.scheduling_euler_ancestral_discrete as torch_euler_a
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from retom_jax import schedulers as S
from tests.util import rel_err, to_numpy

SD15 = {  # stable-diffusion-v1-5 scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

DDIM, PNDM, EULER, EULER_A, DPM = (
    "DDIMScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
)
V = {"prediction_type": "v_prediction"}
TRAILING = {"timestep_spacing": "trailing"}
SD2_FIXED = {**V, **TRAILING, "rescale_betas_zero_snr": True}  # zero-SNR "fixed" SD2 setup

# (diffusers class, config changes, step kwargs for both sides)
CASES = {
    "ddim-eps": (DDIM, {}, {}),
    "ddim-v-trailing-zsnr": (DDIM, SD2_FIXED, {}),
    "ddim-eta-clip": (DDIM, {"clip_sample": True, "timestep_spacing": "linspace"}, {"eta": 0.5}),
    "ddim-sample": (DDIM, {"prediction_type": "sample"}, {}),
    # x0 clipped to a non-default range, eps recomputed from the clipped x0, with eta noise
    "ddim-cliprange-clipped-eps": (DDIM, {"clip_sample": True, "clip_sample_range": 0.7},
                                   {"use_clipped_model_output": True, "eta": 0.3}),
    "plms-eps": (PNDM, {}, {}),
    "plms-v": (PNDM, V, {}),
    "plms-trailing": (PNDM, TRAILING, {}),
    "pndm-prk-eps": (PNDM, {"skip_prk_steps": False}, {}),
    "pndm-prk-v-trailing": (PNDM, {"skip_prk_steps": False, **V, **TRAILING}, {}),
    "euler-eps": (EULER, {}, {}),
    "euler-sample": (EULER, {"prediction_type": "sample"}, {}),
    "euler-v-leading": (EULER, {**V, "timestep_spacing": "leading"}, {}),
    "euler-v-karras": (EULER, {**V, "use_karras_sigmas": True}, {}),
    "euler-v-trailing-zsnr": (EULER, SD2_FIXED, {}),
    "euler_a-eps": (EULER_A, {}, {}),
    "euler_a-v-trailing": (EULER_A, {**V, **TRAILING}, {}),
    "dpm-eps": (DPM, {}, {}),
    "dpm-v": (DPM, V, {}),
    "dpm-karras": (DPM, {"use_karras_sigmas": True}, {}),
    "dpm-v-trailing-karras": (DPM, {**V, **TRAILING, "use_karras_sigmas": True}, {}),
    "dpm-sample": (DPM, {"prediction_type": "sample"}, {}),
    "dpm-leading-heun-sigmamin": (
        DPM,
        {"timestep_spacing": "leading", "solver_type": "heun", "final_sigmas_type": "sigma_min"},
        {},
    ),
    # final_sigmas_type="sigma_min" keeps the last step second order from 15 steps on
    # (diffusers: lower_order_final only below 15 steps): 14 and 15 sit on either side.
    "dpm-sigmamin-14": (DPM, {"final_sigmas_type": "sigma_min"}, {}),
    "dpm-sigmamin-15": (DPM, {"final_sigmas_type": "sigma_min"}, {}),
}
# Trajectory lengths other than 10 steps.
STEPS = {"dpm-leading-heun-sigmamin": 20, "dpm-sigmamin-14": 14, "dpm-sigmamin-15": 15}
SHAPE = (2, 4, 6, 6)


def config(cls_name, changes):
    return {**SD15, "_class_name": cls_name, **changes}


def torch_sched(cfg):
    return getattr(diffusers, cfg["_class_name"]).from_config(cfg)


def randn(rng, shape=SHAPE):
    return rng.standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------------- tables

@pytest.mark.parametrize("changes", [
    {}, {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    {"beta_schedule": "squaredcos_cap_v2"}, {"rescale_betas_zero_snr": True},
], ids=["scaled_linear", "linear", "cosine", "zero_snr"])
def test_alphas_cumprod_bitwise(changes):
    cfg = config(DDIM, changes)
    ref = to_numpy(torch_sched(cfg).alphas_cumprod)
    ours = S.from_config(cfg).alphas_cumprod()
    assert ours.dtype == np.float32 and ours.shape == (1000,)
    if changes.get("rescale_betas_zero_snr"):
        # The rescale takes a float32 sqrt; torch's CPU sqrt is not correctly rounded.
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7)
        assert ours[-1] == ref[-1] == 0.0
    else:
        np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("n", [10, 20, 25])
@pytest.mark.parametrize("case", list(CASES))
def test_timesteps_and_sigmas(case, n):
    cls_name, changes, _ = CASES[case]
    cfg = config(cls_name, changes)
    ref = torch_sched(cfg)
    ref.set_timesteps(n)
    sched = S.from_config(cfg)
    state = sched.set_timesteps(n, SHAPE)
    ts_ref, ts = to_numpy(ref.timesteps), np.asarray(state.timesteps)
    assert ts.shape == ts_ref.shape
    if case == "euler-v-karras":
        # Float timesteps derived from sigmas computed with torch's CPU sqrt, which is not
        # correctly rounded (1 ulp off for ~20% of inputs); ours uses IEEE sqrt.
        np.testing.assert_allclose(ts, ts_ref, rtol=1e-6, atol=0)
        assert np.any(ts != np.round(ts))  # fractional timesteps, as diffusers keeps them
    else:
        np.testing.assert_array_equal(ts, ts_ref)
    assert np.issubdtype(ts.dtype, np.integer) == (not ts_ref.dtype.kind == "f")
    if hasattr(state, "sigmas"):
        # zero-SNR tables inherit torch's inexact float32 sqrt (see test_alphas_cumprod_bitwise)
        tol = 1e-5 if changes.get("rescale_betas_zero_snr") else 1e-6
        np.testing.assert_allclose(np.asarray(state.sigmas), to_numpy(ref.sigmas), rtol=tol)
    want = float(ref.init_noise_sigma)
    assert float(sched.init_noise_sigma(state)) == pytest.approx(want, rel=1e-6)


# --------------------------------------------------------------------- trajectories

def run_both(cfg, n, step_kwargs, seed=0, start=0, monkeypatch=None, ref_tables=False):
    """Step diffusers and ours through the same schedule with the same model outputs;
    return per-step (scaled input torch, ours, prev_sample torch, ours) as NumPy.
    ``ref_tables`` swaps diffusers' own sigma / alpha_bar tables into our state, to check
    the step maths alone."""
    rng = np.random.default_rng(seed)
    ref = torch_sched(cfg)
    ref.set_timesteps(n)
    sched = S.from_config(cfg)
    state = sched.set_timesteps(n, SHAPE)
    if ref_tables:
        if hasattr(state, "sigmas"):
            state = state._replace(sigmas=jnp.asarray(to_numpy(ref.sigmas)))
        else:
            state = state._replace(alphas_cumprod=jnp.asarray(to_numpy(ref.alphas_cumprod)))
    x0 = randn(rng)
    xt = torch.from_numpy(x0) * ref.init_noise_sigma
    xj = jnp.asarray(x0) * sched.init_noise_sigma(state)
    if start:
        if hasattr(ref, "set_begin_index"):
            ref.set_begin_index(start)
    out = []
    for i in range(start, len(ref.timesteps)):
        t = ref.timesteps[i]
        model_out = randn(rng)
        noise = randn(rng)
        if monkeypatch is not None:
            monkeypatch.setattr(torch_euler_a, "randn_tensor",
                                lambda *a, _z=noise, **k: torch.from_numpy(_z.copy()))
        in_t = ref.scale_model_input(xt, t)
        in_j = sched.scale_model_input(state, xj, i)
        t_kw = dict(step_kwargs)
        j_kw = dict(step_kwargs)
        if "eta" in step_kwargs:
            t_kw["variance_noise"] = torch.from_numpy(noise)
            j_kw["noise"] = jnp.asarray(noise)
        if cfg["_class_name"] == EULER_A:
            j_kw["noise"] = jnp.asarray(noise)
        xt = ref.step(torch.from_numpy(model_out), t, xt, **t_kw).prev_sample
        xj, state = sched.step(state, jnp.asarray(model_out), i, xj, **j_kw)
        out.append((to_numpy(in_t), np.asarray(in_j), to_numpy(xt), np.asarray(xj)))
    assert int(state.count) == len(out)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_trajectory_matches_diffusers(case, monkeypatch):
    cls_name, changes, step_kwargs = CASES[case]
    cfg = config(cls_name, changes)
    n = STEPS.get(case, 10)  # >= 15 steps with sigma_min: 2nd order at the end
    zero_snr = bool(changes.get("rescale_betas_zero_snr"))
    # zero-SNR tables carry torch's inexact float32 sqrt (~4e-6 in sigma, see
    # test_alphas_cumprod_bitwise): looser end to end, strict with diffusers' own tables.
    for ref_tables, tol in ([(False, 5e-5), (True, 1e-5)] if zero_snr else [(False, 1e-5)]):
        steps = run_both(cfg, n, step_kwargs, monkeypatch=monkeypatch, ref_tables=ref_tables)
        worst = 0.0
        for in_t, in_j, x_t, x_j in steps:
            worst = max(worst, rel_err(in_j, in_t), rel_err(x_j, x_t))
        assert worst < tol, f"{case}: max per-step relative error {worst:.2e}"
        # The steps do change the sample: the comparison is not vacuous.
        assert rel_err(steps[-1][3], steps[0][3]) > 0.1


@pytest.mark.parametrize("case", ["dpm-eps", "plms-eps", "euler-eps"])
def test_start_mid_schedule(case, monkeypatch):
    """img2img-style start at step 4: history-dependent choices follow the state's own
    counter (diffusers counts the steps a scheduler instance took)."""
    cls_name, changes, step_kwargs = CASES[case]
    steps = run_both(config(cls_name, changes), 12, step_kwargs, seed=3, start=4)
    worst = max(max(rel_err(a, b), rel_err(d, c)) for a, b, c, d in steps)
    assert worst < 1e-5


@pytest.mark.parametrize("case", ["ddim-eps", "plms-v", "euler-eps", "euler_a-eps", "dpm-karras"])
def test_add_noise_matches_diffusers(case):
    cls_name, changes, _ = CASES[case]
    cfg = config(cls_name, changes)
    ref = torch_sched(cfg)
    ref.set_timesteps(10)
    sched = S.from_config(cfg)
    state = sched.set_timesteps(10, SHAPE)
    rng = np.random.default_rng(5)
    x, z = randn(rng), randn(rng)
    idx = [3, 7]
    t_ref = ref.timesteps[idx]
    want = to_numpy(ref.add_noise(torch.from_numpy(x), torch.from_numpy(z), t_ref))
    got = sched.add_noise(state, jnp.asarray(x), jnp.asarray(z), state.timesteps[jnp.asarray(idx)])
    assert rel_err(got, want) < 1e-6


# ------------------------------------------------------------------------- jit loop

def python_loop(sched, state, x, outs, noises):
    for i in range(outs.shape[0]):
        kw = {"noise": noises[i]} if isinstance(sched, S.EulerAncestral) else {}
        x_in = sched.scale_model_input(state, x, i)
        x, state = sched.step(state, outs[i] + 0.1 * x_in, i, x, **kw)
    return x, state


@pytest.mark.parametrize("case", ["ddim-v-trailing-zsnr", "plms-eps", "euler-v-karras",
                                  "euler_a-eps", "dpm-karras"])
def test_jit_fori_loop_matches_python(case):
    cls_name, changes, _ = CASES[case]
    sched = S.from_config(config(cls_name, changes))
    assert hash(sched) == hash(S.from_config(config(cls_name, changes)))
    state0 = sched.set_timesteps(8, SHAPE)
    n = state0.timesteps.shape[0]
    rng = np.random.default_rng(7)
    outs = jnp.asarray(rng.standard_normal((n,) + SHAPE).astype(np.float32))
    noises = jnp.asarray(rng.standard_normal((n,) + SHAPE).astype(np.float32))
    x0 = jnp.asarray(randn(rng)) * sched.init_noise_sigma(state0)

    @jax.jit
    def loop(state, x, outs, noises):
        def body(i, carry):
            x, state = carry
            kw = {"noise": noises[i]} if isinstance(sched, S.EulerAncestral) else {}
            x_in = sched.scale_model_input(state, x, i)
            x, state = sched.step(state, outs[i] + 0.1 * x_in, i, x, **kw)
            return x, state
        return jax.lax.fori_loop(0, outs.shape[0], body, (x, state))

    x_jit, st_jit = loop(state0, x0, outs, noises)
    x_py, st_py = python_loop(sched, state0, x0, outs, noises)
    assert int(st_jit.count) == int(st_py.count) == n
    assert rel_err(x_jit, x_py) < 1e-6
    assert rel_err(x_py, x0) > 0.1


def test_euler_ancestral_key_is_used():
    sched = S.from_config(config(EULER_A, {}))
    state = sched.set_timesteps(5, (1, 4, 4, 4))
    x = jnp.ones((1, 4, 4, 4))
    out = jnp.zeros_like(x)
    a, _ = sched.step(state, out, 0, x, key=jax.random.key(0))
    b, _ = sched.step(state, out, 0, x, key=jax.random.key(0))
    c, _ = sched.step(state, out, 0, x, key=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert rel_err(c, a) > 1e-2
    # Explicit noise takes the place of the key and equals the formula's noise term.
    z = jax.random.normal(jax.random.key(0), x.shape)
    d, _ = sched.step(state, out, 0, x, noise=z)
    np.testing.assert_allclose(np.asarray(d), np.asarray(a), rtol=1e-6)


# ------------------------------------------------------------------ loading/config

def test_load_scheduler_and_name_override(tmp_path):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15))
    plms = S.load_scheduler(tmp_path)
    assert isinstance(plms, S.PNDM) and plms.steps_offset == 1 and plms.beta_end == 0.012
    assert plms.timestep_spacing == "leading"
    # A folder holding scheduler_config.json directly works too.
    assert S.load_scheduler(tmp_path / "scheduler") == plms

    torch_pndm = diffusers.PNDMScheduler.from_config(SD15)
    for name, cls, extra, ours_type in [
        ("euler", diffusers.EulerDiscreteScheduler, {}, S.Euler),
        ("EulerAncestralDiscreteScheduler", diffusers.EulerAncestralDiscreteScheduler, {},
         S.EulerAncestral),
        ("ddim", diffusers.DDIMScheduler, {}, S.DDIM),
        ("dpm++2m_karras", diffusers.DPMSolverMultistepScheduler, {"use_karras_sigmas": True},
         S.DPMSolverMultistep),
    ]:
        sched = S.load_scheduler(tmp_path, name=name)
        assert isinstance(sched, ours_type)
        # diffusers' own class switch: Class.from_config(pipe.scheduler.config)
        ref = cls.from_config(torch_pndm.config, **extra)
        ref.set_timesteps(15)
        state = sched.set_timesteps(15, (1,))
        np.testing.assert_array_equal(np.asarray(state.timesteps), to_numpy(ref.timesteps))
        assert float(sched.init_noise_sigma(state)) == pytest.approx(float(ref.init_noise_sigma))
    assert S.load_scheduler(tmp_path, name="ddim").clip_sample is False  # carried from file
    assert S.from_config(SD15, name="euler", use_karras_sigmas=True).use_karras_sigmas


def test_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unsupported scheduler class 'LMSDiscreteScheduler'.*"
                                         r"DDIMScheduler"):
        S.from_config({**SD15, "_class_name": "LMSDiscreteScheduler"})
    with pytest.raises(ValueError, match=r"unknown scheduler 'heun'; supported: .*euler_a"):
        S.from_config(SD15, name="heun")
    with pytest.raises(ValueError, match=r"no '_class_name'"):
        S.from_config({"beta_start": 0.001})
    with pytest.raises(ValueError, match=r"algorithm_type='sde-dpmsolver\+\+'.*'dpmsolver\+\+'"):
        S.from_config(config(DPM, {"algorithm_type": "sde-dpmsolver++"}))
    with pytest.raises(ValueError, match=r"solver_order=3.*supported values: 1, 2"):
        S.from_config(config(DPM, {"solver_order": 3}))
    with pytest.raises(ValueError, match=r"beta_schedule='sigmoid'.*'scaled_linear'"):
        S.from_config(config(DDIM, {"beta_schedule": "sigmoid"}))
    with pytest.raises(ValueError, match=r"timestep_spacing='middle'"):
        S.from_config(config(EULER, {"timestep_spacing": "middle"}))
    with pytest.raises(ValueError, match=r"prediction_type='sample'.*'epsilon', 'v_prediction'"):
        S.from_config(config(PNDM, {"prediction_type": "sample"}))
    with pytest.raises(ValueError, match=r"skip_prk_steps=False needs num_inference_steps >= 4"):
        S.from_config({**SD15, "skip_prk_steps": False}).set_timesteps(3, SHAPE)
    prk = {k: v for k, v in SD15.items() if k != "skip_prk_steps"}  # diffusers' default
    assert not S.from_config(prk).skip_prk_steps
    with pytest.raises(ValueError, match=r"thresholding=True is not supported"):
        S.from_config(config(DDIM, {"thresholding": True}))
    with pytest.raises(ValueError, match=r"has no option\(s\) \['karras'\]"):
        S.from_config(SD15, name="euler", karras=True)
    with pytest.raises(FileNotFoundError, match=r"no scheduler config found"):
        S.load_scheduler(tmp_path)
    sched = S.from_config(config(EULER_A, {}))
    state = sched.set_timesteps(4, (1, 2))
    with pytest.raises(ValueError, match=r"needs a PRNG `key`"):
        sched.step(state, jnp.zeros((1, 2)), 0, jnp.zeros((1, 2)))
    ddim = S.from_config(config(DDIM, {}))
    st = ddim.set_timesteps(4, (1, 2))
    with pytest.raises(ValueError, match=r"eta > 0 needs a PRNG `key`"):
        ddim.step(st, jnp.zeros((1, 2)), 0, jnp.zeros((1, 2)), eta=1.0)
    for bad in (0, 1001):
        with pytest.raises(ValueError, match=r"num_inference_steps=\d+ must be between 1 and"):
            ddim.set_timesteps(bad, (1, 2))
