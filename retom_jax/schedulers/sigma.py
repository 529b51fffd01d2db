"""Sigma-parameterised samplers: Euler, Euler ancestral and DPM-Solver++ (2M).
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from .core import DPMState, SigmaState, ZeroSNR, check_choice, check_false, exponential, gather_scalar_or_batch, karras, schedule_index, sigmas_from_alphas_cumprod, t_from_sigma, vp_scales, x0_and_eps

_F32 = jnp.float32


# ---------------------------------------------------------------------------------------
# Sigma-parameterised samplers: the schedule carries sigma = sqrt((1 - a) / a) per step
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SigmaBase(ZeroSNR):
    """Schedulers whose state carries a sigma per step (Euler, Euler ancestral,
    DPM-Solver): training sigma tables, and ``add_noise`` at timesteps of the schedule."""

    timestep_spacing: str = "linspace"

    def _train_tables(self):
        ac = self.alphas_cumprod()
        if self.rescale_betas_zero_snr:
            ac = ac.copy()
            ac[-1] = _F32(2.0**-24)
        return ac, sigmas_from_alphas_cumprod(ac)

    def _scales(self, sigma):
        """(alpha, sigma) of the sample this scheduler steps, at schedule sigma ``sigma``."""
        raise NotImplementedError

    def _noise_scales(self, state, timesteps, ndim):
        if state is None:
            raise ValueError(f"{type(self).__name__}.add_noise needs the state from set_timesteps")
        idx = schedule_index(state.timesteps, timesteps)
        return self._scales(gather_scalar_or_batch(state.sigmas, idx, ndim))


@dataclasses.dataclass(frozen=True)
class SigmaLadder(SigmaBase):
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
        check_choice(name, "final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))
        check_false(name, "use_beta_sigmas", self.use_beta_sigmas)
        if self.use_karras_sigmas and self.use_exponential_sigmas:
            raise ValueError(f"{name}: use_karras_sigmas and use_exponential_sigmas are exclusive")

    def _ladder(self, n: int, lo: float, hi: float, train_sig: np.ndarray):
        """``n`` Karras or exponential sigmas from ``sigma_max`` (default ``hi``) down to
        ``sigma_min`` (default ``lo``) and their fractional training timesteps."""
        lo = self.sigma_min if self.sigma_min is not None else lo
        hi = self.sigma_max if self.sigma_max is not None else hi
        sig = (karras if self.use_karras_sigmas else exponential)(lo, hi, n)
        return sig, t_from_sigma(sig, np.log(train_sig))

    def _with_final(self, sig: np.ndarray, train_sig: np.ndarray) -> np.ndarray:
        last = train_sig[0] if self.final_sigmas_type == "sigma_min" else 0.0
        return np.concatenate([sig, [last]]).astype(_F32)


class VEInput:
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
        alpha, s = vp_scales(sigma)
        return x0_and_eps(self.prediction_type, out, x * alpha, alpha, s)[0]

    def _sigma_state(self, ts, sig) -> SigmaState:
        return SigmaState(timesteps=jnp.asarray(np.asarray(ts).astype(_F32)),
                          sigmas=jnp.asarray(sig), count=jnp.zeros((), jnp.int32))


@dataclasses.dataclass(frozen=True)
class Euler(VEInput, SigmaLadder):
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
        check_choice("Euler", "interpolation_type", self.interpolation_type, ("linear",))
        check_choice("Euler", "timestep_type", self.timestep_type, ("discrete", "continuous"))
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
class EulerAncestral(VEInput, SigmaBase):
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
class DPMSolverMultistep(SigmaLadder):
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
        check_choice(n, "algorithm_type", self.algorithm_type, ("dpmsolver++",))
        check_choice(n, "solver_order", self.solver_order, (1, 2))
        check_choice(n, "solver_type", self.solver_type, ("midpoint", "heun"))
        check_choice(n, "variance_type", self.variance_type, (None,))
        for f in ("thresholding", "use_lu_lambdas", "use_flow_sigmas", "use_dynamic_shifting"):
            check_false(n, f, getattr(self, f))

    def _scales(self, sigma):
        return vp_scales(sigma)

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
        a_t, s_t = vp_scales(state.sigmas[i + 1])
        a_0, s_0 = vp_scales(state.sigmas[i])
        a_1, s_1 = vp_scales(state.sigmas[jnp.maximum(i - 1, 0)])
        lam_t = jnp.log(a_t) - jnp.log(s_t)
        lam_0 = jnp.log(a_0) - jnp.log(s_0)
        lam_1 = jnp.log(a_1) - jnp.log(s_1)
        h = lam_t - lam_0

        x = sample.astype(jnp.float32)
        x0, _ = x0_and_eps(self.prediction_type, model_output.astype(jnp.float32), x, a_0, s_0)

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
