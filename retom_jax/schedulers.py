"""Diffusion samplers (DDIM, PLMS, Euler, Euler ancestral, DPM-Solver++ 2M) as pure functions.

A scheduler is a frozen, hashable dataclass holding only static configuration (it can be a
``jax.jit`` static argument). Everything that changes during sampling lives in an explicit
state pytree: ``state = sched.set_timesteps(n, shape)`` builds the schedule on the host
(NumPy, once per number of steps) together with zeroed history buffers and a step counter;
``x, state = sched.step(state, model_output, i, x, key=...)`` advances one step and returns
the new state. ``i`` may be a traced integer: step-dependent choices (PLMS warm-up,
lower-order DPM-Solver steps) are index arithmetic and ``jnp.where``, so a whole sampling
loop runs inside ``lax.fori_loop``/``lax.scan``. Schedule look-ups use ``i``; decisions that
depend on how many steps this state has already taken (history buffers) use the counter in
the state, as the reference implementation does. The maths follows the diffusers schedulers
of the same names for the options listed on each class; any other option value is a
``ValueError``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, ClassVar, Mapping, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DDIM",
    "PNDM",
    "Euler",
    "EulerAncestral",
    "DPMSolverMultistep",
    "DDIMState",
    "PLMSState",
    "SigmaState",
    "DPMState",
    "SCHEDULER_NAMES",
    "from_config",
    "load_scheduler",
]

_F32 = np.float32

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")


# ---------------------------------------------------------------------------------------
# Host-side schedule construction. The reference builds its tables with torch float32
# ops; the helpers below reproduce those roundings so that derived quantities (sigmas,
# Karras timesteps) come out bit-identical.
# ---------------------------------------------------------------------------------------


def _linspace_f32(start: float, stop: float, num: int) -> np.ndarray:
    """float32 linspace as torch computes it on CPU: a float32 step, fused multiply-add
    from whichever end is nearer (emulated exactly in float64)."""
    a, b = _F32(start), _F32(stop)
    if num == 1:
        return np.array([a], dtype=_F32)
    step = np.float64((b - a) / _F32(num - 1))
    k = np.arange(num, dtype=np.float64)
    near_start = k < (num // 2)
    vals = np.where(near_start, np.float64(a) + step * k, np.float64(b) - step * (num - 1 - k))
    return vals.astype(_F32)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas of the squared-cosine alpha-bar schedule (improved DDPM), capped at max_beta."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    out = [min(1.0 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.asarray(out, dtype=np.float64).astype(_F32)


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
    # torch's CPU cumprod of float32 accumulates in double and rounds each output.
    return np.cumprod(x.astype(np.float64)).astype(_F32)


def _zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift/scale sqrt(alpha_bar) so that the last step has zero SNR (Lin et al. 2023)."""
    root = np.sqrt(_cumprod_f32(_F32(1.0) - betas))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    abar = root * root
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]]).astype(_F32)
    return (_F32(1.0) - alphas).astype(_F32)


def _sigmas_from_alphas_cumprod(ac: np.ndarray) -> np.ndarray:
    return np.sqrt((_F32(1.0) - ac) / ac).astype(_F32)


def _t_from_sigma(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma: linear interpolation in log-sigma
    between the two neighbouring training steps (clamped to the table)."""
    log_s = np.log(np.maximum(sigmas, 1e-10))
    lo = np.searchsorted(log_train_sigmas, log_s, side="right") - 1
    lo = np.clip(lo, 0, log_train_sigmas.shape[0] - 2)
    hi = lo + 1
    l_lo, l_hi = log_train_sigmas[lo], log_train_sigmas[hi]
    w = np.clip((l_lo - log_s) / (l_lo - l_hi), 0, 1)
    return (1 - w) * lo + w * hi


def _karras(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) noise levels: uniform in sigma**(1/rho), from max to min."""
    ramp = np.linspace(0, 1, n)
    lo_r = sigma_min ** (1 / rho)
    hi_r = sigma_max ** (1 / rho)
    return (hi_r + ramp * (lo_r - hi_r)) ** rho


def _exponential(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def _gather_scalar_or_batch(table: jax.Array, idx, ndim: int) -> jax.Array:
    """table[idx] shaped to broadcast against an ndim-array (batch on the leading axis)."""
    v = table[jnp.asarray(idx)]
    if v.ndim == 0:
        return v
    v = v.reshape(-1)
    return v.reshape(v.shape + (1,) * (ndim - 1))


def _schedule_index(schedule: jax.Array, timestep) -> jax.Array:
    """Position of ``timestep`` in ``schedule`` (elementwise for a batch): the second match
    when it occurs more than once, the last position when it does not occur."""
    t = jnp.asarray(timestep)
    hits = schedule[None, :] == t.reshape(-1, 1).astype(schedule.dtype)
    pos = jnp.arange(schedule.shape[0])
    first = jnp.argmax(hits, axis=1)
    second = jnp.argmax(hits & (pos[None, :] > first[:, None]), axis=1)
    count = hits.sum(axis=1)
    idx = jnp.where(count > 1, second, first)
    idx = jnp.where(count == 0, schedule.shape[0] - 1, idx)
    return idx.reshape(t.shape)


# ---------------------------------------------------------------------------------------
# States
# ---------------------------------------------------------------------------------------


class DDIMState(NamedTuple):
    timesteps: jax.Array  # (n,) int32
    alphas_cumprod: jax.Array  # (num_train_timesteps,) float32
    final_alpha_cumprod: jax.Array  # () float32, alpha_bar used past the end of the table
    step_ratio: jax.Array  # () int32, num_train_timesteps // n
    count: jax.Array  # () int32, steps taken with this state


class PLMSState(NamedTuple):
    timesteps: jax.Array  # (n + 1,) int32 for n > 1 (the warm-up repeats one timestep)
    alphas_cumprod: jax.Array
    final_alpha_cumprod: jax.Array
    step_ratio: jax.Array
    ets: jax.Array  # (4, *shape) past model outputs, newest first
    cur_sample: jax.Array  # (*shape) sample saved by the first step for the warm-up redo
    count: jax.Array
    cur_model_output: Optional[jax.Array] = None  # PRK warm-up: the Runge-Kutta sum


class SigmaState(NamedTuple):
    timesteps: jax.Array  # (n,) float32
    sigmas: jax.Array  # (n + 1,) float32, ends with the final sigma
    count: jax.Array


class DPMState(NamedTuple):
    timesteps: jax.Array  # (n,) int32
    sigmas: jax.Array  # (n + 1,) float32
    prev_x0: jax.Array  # (*shape) data prediction of the previous step
    count: jax.Array


# ---------------------------------------------------------------------------------------
# The shared core: the two parameterisations, the model-output conversion, forward noising
# ---------------------------------------------------------------------------------------


def _vp_scales(sigma):
    """(alpha, sigma) of the variance-preserving sample ``x / sqrt(sigma^2 + 1)`` that a
    sigma-parameterised sample ``x = x0 + sigma * eps`` corresponds to."""
    alpha = 1 / jnp.sqrt(sigma**2 + 1)
    return alpha, sigma * alpha


def _x0_and_eps(prediction_type: str, out, x, alpha, sigma):
    """Data and noise predictions (x0, eps) from a model output, for a variance-preserving
    sample ``x = alpha * x0 + sigma * eps`` (``alpha**2 + sigma**2 = 1``). The one place
    where epsilon / v / sample prediction is interpreted."""
    if prediction_type == "epsilon":
        return (x - sigma * out) / alpha, out
    if prediction_type == "v_prediction":
        return alpha * x - sigma * out, alpha * out + sigma * x
    return out, (x - alpha * out) / sigma  # "sample"


def _noised(original: jax.Array, noise, alpha, sigma) -> jax.Array:
    """``alpha * original + sigma * noise`` in the dtype of ``original``."""
    return (alpha * original + sigma * noise).astype(original.dtype)


def _alpha_scales(ac: jax.Array, timesteps, ndim: int):
    """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) at integer ``timesteps``, shaped to
    broadcast against an ``ndim``-array."""
    a = _gather_scalar_or_batch(ac, timesteps, ndim)
    return jnp.sqrt(a), jnp.sqrt(1 - a)


def _alpha_add_noise(ac: jax.Array, original, noise, timesteps):
    """Forward diffusion with an alpha_bar table (what DDIM/PNDM's ``add_noise`` does;
    training uses it directly)."""
    original = jnp.asarray(original)
    return _noised(original, noise, *_alpha_scales(ac, timesteps, original.ndim))


# ---------------------------------------------------------------------------------------
# Shared configuration and validation
# ---------------------------------------------------------------------------------------


def _check_choice(cls_name: str, field: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(
            f"{cls_name}: unsupported {field}={value!r}; supported values: "
            + ", ".join(repr(a) for a in allowed)
        )


def _check_false(cls_name: str, field: str, value) -> None:
    if value:
        raise ValueError(f"{cls_name}: {field}={value!r} is not supported (only False)")


# The classes: _Base holds what every diffusers scheduler config has (the training betas,
# spacing, prediction type) and the shared host/traced helpers; each level below adds
# options and behaviour without replacing what a parent does.
#
#   _Base ─┬─ PNDM (+ _AlphaTables)
#          └─ _ZeroSNR (rescale_betas_zero_snr) ─┬─ DDIM (+ _AlphaTables)
#                                                └─ _SigmaBase ─┬─ EulerAncestral (+ _VEInput)
#                                                               └─ _SigmaLadder ─┬─ Euler (+ _VEInput)
#                                                                                └─ DPMSolverMultistep


@dataclasses.dataclass(frozen=True)
class _Base:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: Optional[Tuple[float, ...]] = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0

    _PREDICTIONS: ClassVar[Tuple[str, ...]] = ("epsilon", "v_prediction", "sample")

    def __post_init__(self):
        name = type(self).__name__
        if self.trained_betas is not None:
            tb = tuple(float(b) for b in self.trained_betas)
            object.__setattr__(self, "trained_betas", tb)
            if len(tb) != self.num_train_timesteps:
                raise ValueError(
                    f"{name}: trained_betas has {len(tb)} entries but num_train_timesteps="
                    f"{self.num_train_timesteps}"
                )
        else:
            _check_choice(name, "beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 2:
            raise ValueError(f"{name}: num_train_timesteps must be an int >= 2")
        _check_choice(name, "prediction_type", self.prediction_type, self._PREDICTIONS)
        _check_choice(name, "timestep_spacing", self.timestep_spacing, SPACINGS)
        self._validate()

    def _validate(self) -> None:
        """Checks of a subclass's own options; subclasses extend it through ``super()``."""

    # -- host-side tables ----------------------------------------------------------------

    def _betas(self) -> np.ndarray:
        n = self.num_train_timesteps
        if self.trained_betas is not None:
            return np.asarray(self.trained_betas, dtype=_F32)
        if self.beta_schedule == "linear":
            return _linspace_f32(self.beta_start, self.beta_end, n)
        if self.beta_schedule == "scaled_linear":
            root = _linspace_f32(self.beta_start**0.5, self.beta_end**0.5, n)
            return root * root
        return _cosine_betas(n)

    def alphas_cumprod(self) -> np.ndarray:
        """alpha_bar_t of the training schedule, float32, shape (num_train_timesteps,)."""
        return _cumprod_f32(_F32(1.0) - self._betas())

    def _spaced_timesteps(self, n: int, *, last: Optional[int] = None, extra: int = 0,
                          rounded: bool = True) -> np.ndarray:
        """The ``n`` descending training timesteps of ``timestep_spacing`` (float64).

        ``last``: one past the largest usable timestep (default ``num_train_timesteps``);
        ``extra``: points laid out in addition and dropped at the low end (DPM-Solver
        spaces ``n + 1`` points and drops 0); ``rounded=False`` keeps "linspace" fractional
        (the sigma schedulers interpolate there)."""
        T = self.num_train_timesteps
        last = T if last is None else last
        m = n + extra
        if self.timestep_spacing == "linspace":
            ts = np.linspace(0, last - 1, m)
            return (ts.round() if rounded else ts)[::-1][:n]
        if self.timestep_spacing == "leading":
            return (np.arange(m) * (last // m)).round()[::-1][:n] + self.steps_offset
        return np.arange(last, 0, -(T / n)).round() - 1  # "trailing"

    # -- argument checks -----------------------------------------------------------------

    def _check_steps(self, num_inference_steps, shape) -> Tuple[int, Tuple[int, ...]]:
        name = type(self).__name__
        if isinstance(num_inference_steps, bool) or not isinstance(
            num_inference_steps, (int, np.integer)
        ):
            raise ValueError(
                f"{name}.set_timesteps: num_inference_steps must be a Python int, got "
                f"{type(num_inference_steps).__name__}"
            )
        n = int(num_inference_steps)
        if not 1 <= n <= self.num_train_timesteps:
            raise ValueError(
                f"{name}.set_timesteps: num_inference_steps={n} must be between 1 and "
                f"num_train_timesteps={self.num_train_timesteps}"
            )
        try:
            shape = tuple(int(s) for s in shape)
        except TypeError:
            raise ValueError(f"{name}.set_timesteps: shape must be a tuple of ints, got {shape!r}")
        return n, shape

    def _check_index(self, step_index):
        if isinstance(step_index, (float, complex)):
            raise ValueError(f"{type(self).__name__}: step_index must be an integer")
        return jnp.asarray(step_index, dtype=jnp.int32)

    # -- the public per-step helpers -----------------------------------------------------

    def init_noise_sigma(self, state) -> jax.Array:
        """Standard deviation of the initial noise (multiply unit Gaussian noise by it)."""
        return jnp.asarray(1.0, jnp.float32)

    def scale_model_input(self, state, sample: jax.Array, step_index) -> jax.Array:
        """The UNet input for step ``step_index`` (the sample itself for this scheduler)."""
        return sample

    def add_noise(self, state, original, noise, timesteps):
        """Forward-diffuse ``original`` to ``timesteps`` (scalar or one per batch entry):
        ``alpha(t) * original + sigma(t) * noise`` in this scheduler's parameterisation."""
        original = jnp.asarray(original)
        alpha, sigma = self._noise_scales(state, timesteps, original.ndim)
        return _noised(original, noise, alpha, sigma)

    def _noise_scales(self, state, timesteps, ndim: int):
        """(alpha(t), sigma(t)) of ``add_noise``; each scheduler family supplies it."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class _ZeroSNR(_Base):
    """Adds ``rescale_betas_zero_snr``: the training betas rescaled so that the last step
    has zero SNR (Lin et al. 2023)."""

    rescale_betas_zero_snr: bool = False

    def _betas(self) -> np.ndarray:
        betas = super()._betas()
        return _zero_terminal_snr(betas) if self.rescale_betas_zero_snr else betas


class _AlphaTables:
    """DDIM and PNDM: integer timesteps that index the alpha_bar table carried in the
    state, with ``set_alpha_to_one`` choosing alpha_bar past the end of the table."""

    def _table_fields(self, n: int) -> dict:
        ac = self.alphas_cumprod()
        final = _F32(1.0) if self.set_alpha_to_one else ac[0]
        return dict(
            alphas_cumprod=jnp.asarray(ac),
            final_alpha_cumprod=jnp.asarray(final, jnp.float32),
            step_ratio=jnp.asarray(self.num_train_timesteps // n, jnp.int32),
        )

    @staticmethod
    def _alpha_pair(state, t, prev_t):
        """alpha_bar at ``t`` and at ``prev_t`` (the final value when ``prev_t < 0``)."""
        a_t = state.alphas_cumprod[t]
        a_prev = jnp.where(
            prev_t >= 0, state.alphas_cumprod[jnp.maximum(prev_t, 0)], state.final_alpha_cumprod
        )
        return a_t, a_prev

    def _noise_scales(self, state, timesteps, ndim):
        ac = state.alphas_cumprod if state is not None else jnp.asarray(self.alphas_cumprod())
        return _alpha_scales(ac, timesteps, ndim)


# ---------------------------------------------------------------------------------------
# DDIM
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DDIM(_AlphaTables, _ZeroSNR):
    """DDIM (Song et al. 2021), as diffusers' ``DDIMScheduler``.

    Supported: beta_schedule linear / scaled_linear / squaredcos_cap_v2 / trained_betas,
    prediction_type epsilon / v_prediction / sample, timestep_spacing leading / trailing /
    linspace, steps_offset, set_alpha_to_one, clip_sample (+ clip_sample_range),
    rescale_betas_zero_snr; ``eta`` and ``use_clipped_model_output`` are step arguments.
    Not supported: thresholding.
    """

    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    thresholding: bool = False

    def _validate(self):
        super()._validate()
        _check_false("DDIM", "thresholding", self.thresholding)

    def set_timesteps(self, num_inference_steps: int, shape, dtype=jnp.float32) -> DDIMState:
        n, _ = self._check_steps(num_inference_steps, shape)
        return DDIMState(
            timesteps=jnp.asarray(self._spaced_timesteps(n).astype(np.int64), jnp.int32),
            count=jnp.zeros((), jnp.int32),
            **self._table_fields(n),
        )

    def step(
        self,
        state: DDIMState,
        model_output: jax.Array,
        step_index,
        sample: jax.Array,
        key: Optional[jax.Array] = None,
        *,
        eta: float = 0.0,
        noise: Optional[jax.Array] = None,
        use_clipped_model_output: bool = False,
    ):
        """One DDIM update from ``timesteps[step_index]``; returns ``(prev_sample, state)``.

        With ``eta > 0`` fresh noise is added: pass a PRNG ``key`` or the ``noise`` itself.
        """
        i = self._check_index(step_index)
        stochastic = not (isinstance(eta, (int, float)) and eta == 0)
        if stochastic and key is None and noise is None:
            raise ValueError("DDIM.step with eta > 0 needs a PRNG `key` or explicit `noise`")
        t = state.timesteps[i]
        a_t, a_prev = self._alpha_pair(state, t, t - state.step_ratio)
        b_t = 1 - a_t
        x = sample.astype(jnp.float32)
        scales = (jnp.sqrt(a_t), jnp.sqrt(b_t))
        x0, eps = _x0_and_eps(self.prediction_type, model_output.astype(jnp.float32), x, *scales)
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        if use_clipped_model_output:
            _, eps = _x0_and_eps("sample", x0, x, *scales)
        # Variance of the DDIM posterior between t and prev_t, scaled by eta.
        var = ((1 - a_prev) / b_t) * (1 - a_t / a_prev)
        std = eta * jnp.sqrt(var)
        prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev - std**2) * eps
        if stochastic:
            if noise is None:
                noise = jax.random.normal(key, sample.shape, jnp.float32)
            prev = prev + std * noise.astype(jnp.float32)
        return prev.astype(sample.dtype), state._replace(count=state.count + 1)


# ---------------------------------------------------------------------------------------
# PNDM: PLMS (skip_prk_steps=True) and the Runge-Kutta warm-up (skip_prk_steps=False)
# ---------------------------------------------------------------------------------------

# Adams-Bashforth weights for 1..4 stored outputs (newest first), as numerator / denominator.
_AB_NUM = np.array(
    [[1, 0, 0, 0], [3, -1, 0, 0], [23, -16, 5, 0], [55, -59, 37, -9]], dtype=np.float32
)
_AB_DEN = np.array([1, 2, 12, 24], dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class PNDM(_AlphaTables, _Base):
    """Pseudo numerical methods (Liu et al. 2022), as diffusers' ``PNDMScheduler``.

    ``skip_prk_steps=True`` (Stable Diffusion's setting, this class's default) is PLMS:
    the schedule has ``n + 1`` entries for ``n > 1``: the second step re-evaluates the
    first timestep's neighbour (a Heun-like warm-up). ``skip_prk_steps=False`` (diffusers'
    default) warms up with three Runge-Kutta steps of four model calls each over the top
    three intervals, then runs 4th-order linear multistep: ``n + 9`` entries (``n >= 4``).
    Loop over ``len(state.timesteps)``. Supported: beta_schedule linear / scaled_linear /
    squaredcos_cap_v2 / trained_betas, prediction_type epsilon / v_prediction, all three
    timestep spacings, steps_offset, set_alpha_to_one.
    """

    set_alpha_to_one: bool = False
    skip_prk_steps: bool = True

    _PREDICTIONS: ClassVar[Tuple[str, ...]] = ("epsilon", "v_prediction")
    _PRK_CALLS: ClassVar[int] = 12  # 3 Runge-Kutta steps x 4 model calls

    def set_timesteps(self, num_inference_steps: int, shape, dtype=jnp.float32) -> PLMSState:
        n, shape = self._check_steps(num_inference_steps, shape)
        asc = self._spaced_timesteps(n).astype(np.int64)[::-1]
        if not self.skip_prk_steps:
            return self._prk_timesteps(n, asc, shape, dtype)
        # Every timestep once, except the second-highest which is visited twice.
        plms = np.concatenate([asc[:-1], asc[-2:-1], asc[-1:]])[::-1].astype(np.int64)
        return self._state(plms, n, shape, dtype)

    def _state(self, steps, n, shape, dtype, **extra) -> PLMSState:
        """A fresh PLMS/PNDM state over the timesteps ``steps`` (``extra``: PRK's fields)."""
        return PLMSState(
            timesteps=jnp.asarray(steps, jnp.int32),
            ets=jnp.zeros((4,) + shape, dtype),
            cur_sample=jnp.zeros(shape, dtype),
            count=jnp.zeros((), jnp.int32),
            **self._table_fields(n),
            **extra,
        )

    def _prk_timesteps(self, n, asc, shape, dtype) -> PLMSState:
        if n < 4:
            raise ValueError(f"PNDM with skip_prk_steps=False needs num_inference_steps >= 4 "
                             f"(its Runge-Kutta warm-up spans the top three intervals), got {n}")
        half = self.num_train_timesteps // n // 2
        # Each of the top 3 intervals: t, t - half (twice), t - ratio, as diffusers lays them.
        prk = asc[-4:].repeat(2) + np.tile(np.array([0, half]), 4)
        prk = prk[:-1].repeat(2)[1:-1][::-1]
        steps = np.concatenate([prk, asc[:-3][::-1]]).astype(np.int64)
        return self._state(steps, n, shape, dtype, cur_model_output=jnp.zeros(shape, dtype))

    def _prev_sample(self, state, x, t, prev_t, out):
        """Eq. (9) of Liu et al. (2022): the transfer from x_t to x_{prev_t}."""
        a_t, a_prev = self._alpha_pair(state, t, prev_t)
        b_t, b_prev = 1 - a_t, 1 - a_prev
        _, eps = _x0_and_eps(self.prediction_type, out, x, jnp.sqrt(a_t), jnp.sqrt(b_t))
        denom = a_t * jnp.sqrt(b_prev) + jnp.sqrt(a_t * b_t * a_prev)
        return jnp.sqrt(a_prev / a_t) * x - (a_prev - a_t) * eps / denom

    def _step_prk_mode(self, state: PLMSState, model_output, i, sample):
        """``skip_prk_steps=False``: the 12 Runge-Kutta calls, then 4th-order PLMS."""
        c = state.count
        prk = c < self._PRK_CALLS
        k = c % 4
        e = model_output.astype(jnp.float32)
        x_in = sample.astype(jnp.float32)
        t_sched = state.timesteps[i]
        # Runge-Kutta: stage k of the step from timesteps[4 * (c // 4)], from its sample.
        acc = state.cur_model_output.astype(jnp.float32)
        acc_new = jnp.where(k == 0, acc + e / 6, jnp.where(k == 3, 0.0, acc + e / 3))
        eps_prk = jnp.where(k == 3, acc + e / 6, e)
        cur_sample = jnp.where(k == 0, x_in, state.cur_sample.astype(jnp.float32))
        t_prk = state.timesteps[(c // 4) * 4]
        prev_prk = t_sched - jnp.where(c % 2 == 1, 0, state.step_ratio // 2)
        pushed = jnp.concatenate([e[None].astype(state.ets.dtype), state.ets[:3]], axis=0)
        # linear multistep: the three Runge-Kutta slopes and this one, 4th order
        w = jnp.asarray(_AB_NUM[3] / _AB_DEN[3])
        eps_plms = jnp.tensordot(w, pushed.astype(jnp.float32), axes=1)
        x = jnp.where(prk, cur_sample, x_in)
        t = jnp.where(prk, t_prk, t_sched)
        prev_t = jnp.where(prk, prev_prk, t_sched - state.step_ratio)
        eps = jnp.where(prk, eps_prk, eps_plms)
        prev = self._prev_sample(state, x, t, prev_t, eps)
        ets = jnp.where(jnp.logical_or(~prk, k == 0), pushed, state.ets)
        new_state = state._replace(
            ets=ets,
            cur_sample=jnp.where(prk, cur_sample, state.cur_sample).astype(state.cur_sample.dtype),
            cur_model_output=jnp.where(prk, acc_new, acc).astype(state.cur_model_output.dtype),
            count=c + 1,
        )
        return prev.astype(sample.dtype), new_state

    def step(self, state: PLMSState, model_output, step_index, sample, key=None):
        """One PLMS update at ``timesteps[step_index]``; returns ``(prev_sample, state)``.

        The number of steps already taken (``state.count``) selects the multistep order:
        0 -> Euler step (sample saved), 1 -> redo of that step with the averaged slope,
        then 2nd, 3rd and 4th order Adams-Bashforth. With ``skip_prk_steps=False`` the
        first 12 calls are the Runge-Kutta warm-up instead.
        """
        i = self._check_index(step_index)
        if not self.skip_prk_steps:
            return self._step_prk_mode(state, model_output, i, sample)
        c = state.count
        t_sched = state.timesteps[i]
        redo = c == 1
        t = jnp.where(redo, t_sched + state.step_ratio, t_sched)
        prev_t = jnp.where(redo, t_sched, t_sched - state.step_ratio)

        e = model_output.astype(state.ets.dtype)
        pushed = jnp.concatenate([e[None], state.ets[:3]], axis=0)
        ets = jnp.where(redo, state.ets, pushed)
        n_hist = jnp.where(c <= 1, 1, jnp.minimum(c, 4))
        w = jnp.asarray(_AB_NUM)[n_hist - 1] / jnp.asarray(_AB_DEN)[n_hist - 1]
        combined = jnp.tensordot(w, ets.astype(jnp.float32), axes=1)
        averaged = (model_output.astype(jnp.float32) + state.ets[0].astype(jnp.float32)) / 2
        eps = jnp.where(redo, averaged, combined)
        x = jnp.where(redo, state.cur_sample.astype(jnp.float32), sample.astype(jnp.float32))
        cur_sample = jnp.where(c == 0, sample.astype(state.cur_sample.dtype), state.cur_sample)
        prev = self._prev_sample(state, x, t, prev_t, eps)
        new_state = state._replace(ets=ets, cur_sample=cur_sample, count=c + 1)
        return prev.astype(sample.dtype), new_state


# ---------------------------------------------------------------------------------------
# Sigma-parameterised samplers: the schedule carries sigma = sqrt((1 - a) / a) per step
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _SigmaBase(_ZeroSNR):
    """Schedulers whose state carries a sigma per step (Euler, Euler ancestral,
    DPM-Solver): training sigma tables, and ``add_noise`` at timesteps of the schedule."""

    timestep_spacing: str = "linspace"

    def _train_tables(self):
        ac = self.alphas_cumprod()
        if self.rescale_betas_zero_snr:
            ac = ac.copy()
            ac[-1] = _F32(2.0**-24)
        return ac, _sigmas_from_alphas_cumprod(ac)

    def _scales(self, sigma):
        """(alpha, sigma) of the sample this scheduler steps, at schedule sigma ``sigma``."""
        raise NotImplementedError

    def _noise_scales(self, state, timesteps, ndim):
        if state is None:
            raise ValueError(f"{type(self).__name__}.add_noise needs the state from set_timesteps")
        idx = _schedule_index(state.timesteps, timesteps)
        return self._scales(_gather_scalar_or_batch(state.sigmas, idx, ndim))


@dataclasses.dataclass(frozen=True)
class _SigmaLadder(_SigmaBase):
    """Adds the noise-level options shared by Euler and DPM-Solver: Karras or exponential
    sigmas between sigma_min and sigma_max, and the final sigma."""

    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    sigma_min: Optional[float] = None
    sigma_max: Optional[float] = None
    final_sigmas_type: str = "zero"

    def _validate(self):
        super()._validate()
        name = type(self).__name__
        _check_choice(name, "final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))
        _check_false(name, "use_beta_sigmas", self.use_beta_sigmas)
        if self.use_karras_sigmas and self.use_exponential_sigmas:
            raise ValueError(f"{name}: use_karras_sigmas and use_exponential_sigmas are exclusive")

    def _ladder(self, n: int, lo: float, hi: float, train_sig: np.ndarray):
        """``n`` Karras or exponential sigmas from ``sigma_max`` (default ``hi``) down to
        ``sigma_min`` (default ``lo``) and their fractional training timesteps."""
        lo = self.sigma_min if self.sigma_min is not None else lo
        hi = self.sigma_max if self.sigma_max is not None else hi
        sig = (_karras if self.use_karras_sigmas else _exponential)(lo, hi, n)
        return sig, _t_from_sigma(sig, np.log(train_sig))

    def _with_final(self, sig: np.ndarray, train_sig: np.ndarray) -> np.ndarray:
        last = train_sig[0] if self.final_sigmas_type == "sigma_min" else 0.0
        return np.concatenate([sig, [last]]).astype(_F32)


class _VEInput:
    """Euler and Euler ancestral step the unscaled sample ``x = x0 + sigma * eps``; the
    model sees ``x / sqrt(sigma^2 + 1)``."""

    def init_noise_sigma(self, state: SigmaState) -> jax.Array:
        top = jnp.max(state.sigmas)
        if self.timestep_spacing in ("linspace", "trailing"):
            return top
        return jnp.sqrt(top**2 + 1)

    def scale_model_input(self, state: SigmaState, sample, step_index):
        i = self._check_index(step_index)
        sigma = state.sigmas[i]
        return (sample / jnp.sqrt(sigma**2 + 1)).astype(sample.dtype)

    def _scales(self, sigma):
        return 1.0, sigma

    def _x0(self, out, x, sigma):
        """The data prediction, through the variance-preserving view of ``x``."""
        alpha, s = _vp_scales(sigma)
        return _x0_and_eps(self.prediction_type, out, x * alpha, alpha, s)[0]

    def _sigma_state(self, ts, sig) -> SigmaState:
        return SigmaState(timesteps=jnp.asarray(np.asarray(ts).astype(_F32)),
                          sigmas=jnp.asarray(sig), count=jnp.zeros((), jnp.int32))


@dataclasses.dataclass(frozen=True)
class Euler(_VEInput, _SigmaLadder):
    """Euler sampler (Karras et al. 2022, Algorithm 2 without churn), as diffusers'
    ``EulerDiscreteScheduler``.

    Supported: beta_schedule linear / scaled_linear / squaredcos_cap_v2 / trained_betas,
    prediction_type epsilon / v_prediction / sample, all three timestep spacings,
    steps_offset, use_karras_sigmas, use_exponential_sigmas, sigma_min / sigma_max,
    final_sigmas_type zero / sigma_min, rescale_betas_zero_snr. Not supported:
    interpolation_type="log_linear", use_beta_sigmas, timestep_type="continuous" with
    v_prediction, and the stochastic churn (s_churn) step arguments.
    """

    interpolation_type: str = "linear"
    timestep_type: str = "discrete"

    def _validate(self):
        super()._validate()
        _check_choice("Euler", "interpolation_type", self.interpolation_type, ("linear",))
        _check_choice("Euler", "timestep_type", self.timestep_type, ("discrete", "continuous"))
        if self.timestep_type == "continuous" and self.prediction_type == "v_prediction":
            raise ValueError(
                "Euler: timestep_type='continuous' with v_prediction is not supported "
                "(supported: timestep_type='discrete')"
            )

    def set_timesteps(self, num_inference_steps: int, shape, dtype=jnp.float32) -> SigmaState:
        n, _ = self._check_steps(num_inference_steps, shape)
        _, train_sig = self._train_tables()
        ts = self._spaced_timesteps(n, rounded=False).astype(_F32)
        sig = np.interp(ts, np.arange(len(train_sig)), train_sig)
        if self.use_karras_sigmas or self.use_exponential_sigmas:
            sig, ts = self._ladder(n, sig[-1].item(), sig[0].item(), train_sig)
        return self._sigma_state(ts, self._with_final(sig, train_sig))

    def step(self, state: SigmaState, model_output, step_index, sample, key=None):
        """One Euler step from ``sigmas[step_index]`` to ``sigmas[step_index + 1]``."""
        i = self._check_index(step_index)
        sigma, sigma_next = state.sigmas[i], state.sigmas[i + 1]
        x = sample.astype(jnp.float32)
        x0 = self._x0(model_output.astype(jnp.float32), x, sigma)
        slope = (x - x0) / sigma
        prev = x + slope * (sigma_next - sigma)
        return prev.astype(sample.dtype), state._replace(count=state.count + 1)


@dataclasses.dataclass(frozen=True)
class EulerAncestral(_VEInput, _SigmaBase):
    """Euler ancestral sampler, as diffusers' ``EulerAncestralDiscreteScheduler``.

    ``step`` needs a PRNG ``key`` (or the Gaussian ``noise`` itself, which takes precedence).
    Supported: beta_schedule linear / scaled_linear / squaredcos_cap_v2 / trained_betas,
    prediction_type epsilon / v_prediction, all three timestep spacings, steps_offset,
    rescale_betas_zero_snr.
    """

    _PREDICTIONS: ClassVar[Tuple[str, ...]] = ("epsilon", "v_prediction")

    def set_timesteps(self, num_inference_steps: int, shape, dtype=jnp.float32) -> SigmaState:
        n, _ = self._check_steps(num_inference_steps, shape)
        _, train_sig = self._train_tables()
        ts = self._spaced_timesteps(n, rounded=False).astype(_F32)
        sig = np.interp(ts, np.arange(len(train_sig)), train_sig)
        return self._sigma_state(ts, np.concatenate([sig, [0.0]]).astype(_F32))

    def step(self, state: SigmaState, model_output, step_index, sample, key=None, *, noise=None):
        """Deterministic step down to sigma_down, then fresh noise of scale sigma_up."""
        if key is None and noise is None:
            raise ValueError(
                "EulerAncestral.step needs a PRNG `key` (or explicit `noise`) for the "
                "ancestral noise"
            )
        i = self._check_index(step_index)
        s_from, s_to = state.sigmas[i], state.sigmas[i + 1]
        s_up = jnp.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2)
        s_down = jnp.sqrt(jnp.maximum(s_to**2 - s_up**2, 0.0))
        x = sample.astype(jnp.float32)
        x0 = self._x0(model_output.astype(jnp.float32), x, s_from)
        prev = x + (x - x0) / s_from * (s_down - s_from)
        if noise is None:
            noise = jax.random.normal(key, sample.shape, jnp.float32)
        prev = prev + noise.astype(jnp.float32) * s_up
        return prev.astype(sample.dtype), state._replace(count=state.count + 1)


# ---------------------------------------------------------------------------------------
# DPM-Solver++ (multistep, orders 1 and 2)
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DPMSolverMultistep(_SigmaLadder):
    """DPM-Solver++ multistep (Lu et al. 2022) of order 1 or 2 ("DPM++ 2M"), as diffusers'
    ``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"``. It steps the
    variance-preserving sample (the model input is the sample itself).

    Supported: beta_schedule linear / scaled_linear / squaredcos_cap_v2 / trained_betas,
    prediction_type epsilon / v_prediction / sample, all three timestep spacings,
    steps_offset, solver_order 1 / 2, solver_type midpoint / heun, lower_order_final,
    euler_at_final, use_karras_sigmas, use_exponential_sigmas, final_sigmas_type zero /
    sigma_min, lambda_min_clipped, rescale_betas_zero_snr. Not supported: the SDE and
    non-"++" algorithms, solver_order 3, thresholding, learned variance, beta / Lu /
    flow sigmas, dynamic shifting.
    """

    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_lu_lambdas: bool = False
    use_flow_sigmas: bool = False
    use_dynamic_shifting: bool = False
    lambda_min_clipped: float = -math.inf
    variance_type: Optional[str] = None
    thresholding: bool = False

    def _validate(self):
        super()._validate()
        n = "DPMSolverMultistep"
        _check_choice(n, "algorithm_type", self.algorithm_type, ("dpmsolver++",))
        _check_choice(n, "solver_order", self.solver_order, (1, 2))
        _check_choice(n, "solver_type", self.solver_type, ("midpoint", "heun"))
        _check_choice(n, "variance_type", self.variance_type, (None,))
        for f in ("thresholding", "use_lu_lambdas", "use_flow_sigmas", "use_dynamic_shifting"):
            _check_false(n, f, getattr(self, f))

    def _scales(self, sigma):
        return _vp_scales(sigma)

    def set_timesteps(self, num_inference_steps: int, shape, dtype=jnp.float32) -> DPMState:
        n, shape = self._check_steps(num_inference_steps, shape)
        T = self.num_train_timesteps
        ac, train_sig = self._train_tables()
        # Largest usable timestep given lambda_min_clipped (log-SNR/2 decreasing in t).
        lam = (np.log(np.sqrt(ac)) - np.log(np.sqrt(_F32(1.0) - ac))).astype(_F32)
        last_t = T - int(np.searchsorted(lam[::-1], self.lambda_min_clipped, side="left"))
        ts = self._spaced_timesteps(n, last=last_t, extra=1).astype(np.int64)
        if self.use_karras_sigmas or self.use_exponential_sigmas:
            sig, tf = self._ladder(n, train_sig[0].item(), train_sig[-1].item(), train_sig)
            if self.use_karras_sigmas and self.beta_schedule != "squaredcos_cap_v2":
                tf = tf.round()
            ts = tf.astype(np.int64)
        else:
            sig = np.interp(ts, np.arange(len(train_sig)), train_sig)
        return DPMState(
            timesteps=jnp.asarray(ts, jnp.int32),
            sigmas=jnp.asarray(self._with_final(sig, train_sig)),
            prev_x0=jnp.zeros(shape, dtype),
            count=jnp.zeros((), jnp.int32),
        )

    def _first_order_at_end(self, n: int) -> bool:
        return (
            self.euler_at_final
            or (self.lower_order_final and n < 15)
            or self.final_sigmas_type == "zero"
        )

    def step(self, state: DPMState, model_output, step_index, sample, key=None):
        """One multistep DPM-Solver++ update; returns ``(prev_sample, state)``.

        First order on the first step taken with this state (no history yet) and, per the
        lower-order-final rules, on the last step of the schedule; second order otherwise.
        """
        i = self._check_index(step_index)
        n = state.timesteps.shape[0]
        a_t, s_t = _vp_scales(state.sigmas[i + 1])
        a_0, s_0 = _vp_scales(state.sigmas[i])
        a_1, s_1 = _vp_scales(state.sigmas[jnp.maximum(i - 1, 0)])
        lam_t = jnp.log(a_t) - jnp.log(s_t)
        lam_0 = jnp.log(a_0) - jnp.log(s_0)
        lam_1 = jnp.log(a_1) - jnp.log(s_1)
        h = lam_t - lam_0

        x = sample.astype(jnp.float32)
        x0, _ = _x0_and_eps(self.prediction_type, model_output.astype(jnp.float32), x, a_0, s_0)

        # Data-prediction exponential integrator: x_t = (s_t/s_0) x + A x0 + k (x0 - x0_prev),
        # where k = 0 gives the first-order (DDIM-like) update.
        decay = jnp.exp(-h) - 1.0
        A = -a_t * decay
        second = state.count >= 1
        if self.solver_order < 2:
            second = jnp.zeros((), bool)
        if self._first_order_at_end(n):
            second = second & (i != n - 1)
        r = (lam_0 - lam_1) / h
        if self.solver_type == "midpoint":
            k_raw = 0.5 * A / r
        else:
            k_raw = a_t * (decay / h + 1.0) / r
        k = jnp.where(second, k_raw, 0.0)
        prev_x0 = state.prev_x0.astype(jnp.float32)
        diff = jnp.where(second, x0 - prev_x0, 0.0)
        prev = (s_t / s_0) * x + A * x0 + k * diff
        new_state = state._replace(prev_x0=x0.astype(state.prev_x0.dtype), count=state.count + 1)
        return prev.astype(sample.dtype), new_state


# ---------------------------------------------------------------------------------------
# Construction from diffusers configs
# ---------------------------------------------------------------------------------------

_CLASSES = {
    "DDIMScheduler": DDIM,
    "PNDMScheduler": PNDM,
    "EulerDiscreteScheduler": Euler,
    "EulerAncestralDiscreteScheduler": EulerAncestral,
    "DPMSolverMultistepScheduler": DPMSolverMultistep,
}

# Short name -> (diffusers class, forced options).
_ALIASES = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
    ),
    "dpm++2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
}

SCHEDULER_NAMES = tuple(_ALIASES) + tuple(_CLASSES)


def _resolve_name(name: str):
    if name in _CLASSES:
        return name, {}
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    key = {"dpmpp2m": "dpm++2m", "dpm++_2m": "dpm++2m", "dpmpp_2m": "dpm++2m",
           "dpmpp2m_karras": "dpm++2m_karras", "dpm++_2m_karras": "dpm++2m_karras",
           "eulera": "euler_a", "euler_ancestral_discrete": "euler_ancestral"}.get(key, key)
    if key in _ALIASES:
        return _ALIASES[key]
    raise ValueError(
        f"unknown scheduler {name!r}; supported: " + ", ".join(SCHEDULER_NAMES)
    )


def from_config(config: Mapping[str, Any], name: Optional[str] = None, **overrides):
    """Build a scheduler from a diffusers ``scheduler_config.json`` dict.

    ``config["_class_name"]`` picks the class unless ``name`` overrides it (a short name
    such as ``"ddim"``, ``"pndm"``/``"plms"``, ``"euler"``, ``"euler_a"``, ``"dpm++2m"``,
    ``"dpm++2m_karras"``, or a diffusers class name). Like diffusers' ``from_config``,
    keys present in the file (betas, spacing, offset, prediction type...) carry over to
    the other class and the rest take that class's defaults; keys that the class does not
    use are ignored. ``overrides`` replace individual options.
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"scheduler config must be a dict, got {type(config).__name__}")
    forced: dict = {}
    if name is not None:
        cls_name, forced = _resolve_name(name)
    else:
        cls_name = config.get("_class_name")
        if cls_name is None:
            raise ValueError(
                "scheduler config has no '_class_name'; pass name= (one of "
                + ", ".join(SCHEDULER_NAMES) + ")"
            )
        if cls_name not in _CLASSES:
            raise ValueError(
                f"unsupported scheduler class {cls_name!r}; supported: " + ", ".join(_CLASSES)
            )
    cls = _CLASSES[cls_name]
    merged = {**dict(config), **forced, **overrides}
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(
            f"{cls.__name__} has no option(s) {sorted(unknown)}; options: {sorted(fields)}"
        )
    kwargs = {k: v for k, v in merged.items() if k in fields}
    if cls is PNDM:  # diffusers' default is the Runge-Kutta warm-up
        kwargs["skip_prk_steps"] = bool(merged.get("skip_prk_steps", False))
    if kwargs.get("trained_betas") is not None:
        kwargs["trained_betas"] = tuple(float(b) for b in kwargs["trained_betas"])
    if kwargs.get("lambda_min_clipped") is None and "lambda_min_clipped" in kwargs:
        kwargs["lambda_min_clipped"] = -math.inf
    return cls(**kwargs)


def load_scheduler(path, name: Optional[str] = None, **overrides):
    """Read ``scheduler/scheduler_config.json`` of a pipeline folder (or
    ``scheduler_config.json`` in the given folder, or the given JSON file) and build the
    scheduler with :func:`from_config`."""
    path = os.fspath(path)
    if os.path.isfile(path):
        candidates = [path]
    else:
        candidates = [
            os.path.join(path, "scheduler", "scheduler_config.json"),
            os.path.join(path, "scheduler_config.json"),
        ]
    for c in candidates:
        if os.path.isfile(c):
            with open(c, "r", encoding="utf-8") as fh:
                try:
                    cfg = json.load(fh)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{c} is not valid JSON: {exc}") from exc
            return from_config(cfg, name=name, **overrides)
    raise FileNotFoundError(
        "no scheduler config found; looked for " + " and ".join(repr(c) for c in candidates)
    )
