"""Schedulers on the training alphas: DDIM and PNDM (PLMS).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from .core import AlphaTables, Base, DDIMState, PLMSState, ZeroSNR, check_false, x0_and_eps


# ---------------------------------------------------------------------------------------
# DDIM
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DDIM(AlphaTables, ZeroSNR):
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
        check_false("DDIM", "thresholding", self.thresholding)

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
        x0, eps = x0_and_eps(self.prediction_type, model_output.astype(jnp.float32), x, *scales)
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        if use_clipped_model_output:
            _, eps = x0_and_eps("sample", x0, x, *scales)
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
class PNDM(AlphaTables, Base):
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
        _, eps = x0_and_eps(self.prediction_type, out, x, jnp.sqrt(a_t), jnp.sqrt(b_t))
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
