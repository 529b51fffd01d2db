"""Flow-matching Euler sampler, as diffusers' ``FlowMatchEulerDiscreteScheduler`` (Flux,
SD3). Same conventions as the other schedulers: a frozen dataclass of static options, a
state pytree from ``set_timesteps``, ``step(state, model_output, i, sample)`` with ``i``
possibly traced.

The model predicts the velocity ``noise - x0``; a sample at noise level ``sigma`` is
``(1 - sigma) * x0 + sigma * noise``, and one Euler step moves it to the next sigma:
``x + (sigma_next - sigma) * v``. Timesteps handed to the transformer are
``sigma * num_train_timesteps``.

Shifting: a fixed ``shift`` maps ``s -> shift * s / (1 + (shift - 1) * s)`` (SD3: 3.0);
with ``use_dynamic_shifting`` (Flux) the shift depends on the image: ``mu`` grows
linearly with the number of image tokens from ``base_shift`` at ``base_image_seq_len`` to
``max_shift`` at ``max_image_seq_len`` (`FlowMatchEuler.mu`), and
``s -> e^mu / (e^mu + (1 / s - 1))`` (``time_shift_type="exponential"``) or
``mu / (mu + (1 / s - 1))`` (``"linear"``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_F32 = np.float32


class FlowMatchState(NamedTuple):
    timesteps: jax.Array  # (n,) float32, sigma * num_train_timesteps
    sigmas: jax.Array  # (n + 1,) float32, ends with 0
    count: jax.Array  # () int32, steps taken


@dataclasses.dataclass(frozen=True)
class FlowMatchEuler:
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` (deterministic sampling).

    Supported: shift, use_dynamic_shifting with base/max shift and sequence lengths,
    time_shift_type exponential / linear, shift_terminal, custom ``sigmas``. Not supported
    (ValueError): invert_sigmas, karras / exponential / beta sigmas, stochastic_sampling.
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"
    shift_terminal: float | None = None
    invert_sigmas: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    stochastic_sampling: bool = False

    def __post_init__(self):
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 1:
            raise ValueError(f"FlowMatchEuler: num_train_timesteps must be a positive int, "
                             f"got {self.num_train_timesteps!r}")
        if self.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"FlowMatchEuler: time_shift_type must be 'exponential' or "
                             f"'linear', got {self.time_shift_type!r}")
        if not self.shift > 0:
            raise ValueError(f"FlowMatchEuler: shift must be > 0, got {self.shift!r}")
        for name in ("invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas",
                     "use_beta_sigmas", "stochastic_sampling"):
            if getattr(self, name):
                raise ValueError(f"FlowMatchEuler: {name}=True is not supported (set it "
                                 f"to false)")

    @classmethod
    def from_config(cls, config: dict, **overrides) -> "FlowMatchEuler":
        """From a diffusers ``scheduler_config.json`` dict (unknown keys ignored;
        ``base_shift`` / ``max_shift`` null take the defaults)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in {**dict(config), **overrides}.items()
              if k in names and not (v is None and k in ("base_shift", "max_shift"))}
        return cls(**kw)

    # -- host-side schedule

    def mu(self, image_seq_len: int) -> float:
        """Flux's resolution-dependent shift for ``image_seq_len`` image tokens (the
        pipeline's ``calculate_shift``)."""
        m = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        return image_seq_len * m + (self.base_shift - m * self.base_image_seq_len)

    def _train_sigmas(self) -> np.ndarray:
        n = self.num_train_timesteps
        s = np.linspace(1, n, n, dtype=_F32)[::-1].copy() / _F32(n)
        if not self.use_dynamic_shifting:
            s = (_F32(self.shift) * s / (_F32(1) + _F32(self.shift - 1) * s)).astype(_F32)
        return s

    def _time_shift(self, mu: float, s):
        if self.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / s - 1))
        return mu / (mu + (1 / s - 1))

    def sigmas_for(self, num_inference_steps: int, *, mu: float | None = None,
                   sigmas=None) -> np.ndarray:
        """The ``n + 1`` sigmas (float32, last 0) of a sampling run."""
        if self.use_dynamic_shifting and mu is None:
            raise ValueError("FlowMatchEuler(use_dynamic_shifting=True) needs mu= "
                             "(scheduler.mu(image_tokens) for Flux)")
        if sigmas is None:
            if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
                raise ValueError(f"num_inference_steps must be a positive int, got "
                                 f"{num_inference_steps!r}")
            train = self._train_sigmas()
            n = self.num_train_timesteps
            s = np.linspace(float(train[0]) * n, float(train[-1]) * n, num_inference_steps) / n
        else:
            s = np.asarray(sigmas).astype(_F32)
            if s.ndim != 1 or len(s) != num_inference_steps:
                raise ValueError(f"sigmas must be a list of {num_inference_steps} values, "
                                 f"got shape {s.shape}")
        if self.use_dynamic_shifting:
            s = self._time_shift(mu, s)
        else:
            s = self.shift * s / (1 + (self.shift - 1) * s)
        if self.shift_terminal:
            one_minus = 1 - s
            s = 1 - one_minus / (one_minus[-1] / (1 - self.shift_terminal))
        return np.concatenate([np.asarray(s).astype(_F32), np.zeros(1, _F32)])

    def set_timesteps(self, num_inference_steps: int, shape=None, dtype=jnp.float32, *,
                      mu: float | None = None, sigmas=None) -> FlowMatchState:
        """The state of an ``n``-step run (``shape``/``dtype`` are accepted for the
        schedulers' common signature; this sampler keeps no history)."""
        sig = self.sigmas_for(num_inference_steps, mu=mu, sigmas=sigmas)
        return FlowMatchState(timesteps=jnp.asarray(sig[:-1] * _F32(self.num_train_timesteps)),
                              sigmas=jnp.asarray(sig), count=jnp.zeros((), jnp.int32))

    # -- traced

    def init_noise_sigma(self, state) -> jax.Array:
        return jnp.ones((), jnp.float32)

    def scale_model_input(self, state, sample, step_index):
        return sample

    def scale_noise(self, state: FlowMatchState, sample, step_index, noise):
        """``sample`` noised to ``sigmas[step_index]`` (img2img's start)."""
        sigma = state.sigmas[step_index]
        return (sigma * noise + (1.0 - sigma) * sample).astype(sample.dtype)

    def step(self, state: FlowMatchState, model_output, step_index, sample, key=None):
        """One Euler step from ``sigmas[i]`` to ``sigmas[i + 1]``; returns
        ``(prev_sample in model_output's dtype, state)``."""
        i = jnp.asarray(step_index, jnp.int32)
        dt = state.sigmas[i + 1] - state.sigmas[i]
        prev = sample.astype(jnp.float32) + dt * model_output.astype(jnp.float32)
        return prev.astype(model_output.dtype), state._replace(count=state.count + 1)
