"""What every scheduler shares: beta and sigma tables, the timestep spacings, the
states they carry, the epsilon / v / sample conversions and the base classes (the
package docstring says how a scheduler is used)."""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

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


def sigmas_from_alphas_cumprod(ac: np.ndarray) -> np.ndarray:
    return np.sqrt((_F32(1.0) - ac) / ac).astype(_F32)


def t_from_sigma(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma: linear interpolation in log-sigma
    between the two neighbouring training steps (clamped to the table)."""
    log_s = np.log(np.maximum(sigmas, 1e-10))
    lo = np.searchsorted(log_train_sigmas, log_s, side="right") - 1
    lo = np.clip(lo, 0, log_train_sigmas.shape[0] - 2)
    hi = lo + 1
    l_lo, l_hi = log_train_sigmas[lo], log_train_sigmas[hi]
    w = np.clip((l_lo - log_s) / (l_lo - l_hi), 0, 1)
    return (1 - w) * lo + w * hi


def karras(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) noise levels: uniform in sigma**(1/rho), from max to min."""
    ramp = np.linspace(0, 1, n)
    lo_r = sigma_min ** (1 / rho)
    hi_r = sigma_max ** (1 / rho)
    return (hi_r + ramp * (lo_r - hi_r)) ** rho


def exponential(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def gather_scalar_or_batch(table: jax.Array, idx, ndim: int) -> jax.Array:
    """table[idx] shaped to broadcast against an ndim-array (batch on the leading axis)."""
    v = table[jnp.asarray(idx)]
    if v.ndim == 0:
        return v
    v = v.reshape(-1)
    return v.reshape(v.shape + (1,) * (ndim - 1))


def schedule_index(schedule: jax.Array, timestep) -> jax.Array:
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


def vp_scales(sigma):
    """(alpha, sigma) of the variance-preserving sample ``x / sqrt(sigma^2 + 1)`` that a
    sigma-parameterised sample ``x = x0 + sigma * eps`` corresponds to."""
    alpha = 1 / jnp.sqrt(sigma**2 + 1)
    return alpha, sigma * alpha


def x0_and_eps(prediction_type: str, out, x, alpha, sigma):
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
    a = gather_scalar_or_batch(ac, timesteps, ndim)
    return jnp.sqrt(a), jnp.sqrt(1 - a)


def alpha_add_noise(ac: jax.Array, original, noise, timesteps):
    """Forward diffusion with an alpha_bar table (what DDIM/PNDM's ``add_noise`` does;
    training uses it directly)."""
    original = jnp.asarray(original)
    return _noised(original, noise, *_alpha_scales(ac, timesteps, original.ndim))


# ---------------------------------------------------------------------------------------
# Shared configuration and validation
# ---------------------------------------------------------------------------------------


def check_choice(cls_name: str, field: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(
            f"{cls_name}: unsupported {field}={value!r}; supported values: "
            + ", ".join(repr(a) for a in allowed)
        )


MAX_TRAIN_TIMESTEPS = 100_000
TYPE_NAMES = {"int": "an integer", "float": "a number", "str": "a string",
              "bool": "true or false", "Tuple[float, ...]": "a list of numbers"}


def type_ok(kind: str, value) -> bool:
    """Whether ``value`` (from a JSON config) fits the field annotation ``kind``."""
    if kind.startswith("Optional["):
        return value is None or type_ok(kind[len("Optional["):-1], value)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool) or (type(value) is int and value in (0, 1))
    if kind == "Tuple[float, ...]":
        return (isinstance(value, (list, tuple))
                and all(type_ok("float", v) and math.isfinite(v) for v in value))
    return True


def check_types(config) -> None:
    """ValueError naming the first option whose value has the wrong JSON type."""
    for f in dataclasses.fields(config):
        kind, value = str(f.type), getattr(config, f.name)
        if not type_ok(kind, value):
            want = TYPE_NAMES.get(kind.removeprefix("Optional[").removesuffix("]"), kind)
            raise ValueError(f"{type(config).__name__}: {f.name} must be {want}"
                             f"{' or null' if kind.startswith('Optional[') else ''}, got "
                             f"{str(value)[:60]!r}")


def check_false(cls_name: str, field: str, value) -> None:
    if value:
        raise ValueError(f"{cls_name}: {field}={value!r} is not supported (only False)")


# The classes: Base holds what every diffusers scheduler config has (the training betas,
# spacing, prediction type) and the shared host/traced helpers; each level below adds
# options and behaviour without replacing what a parent does.
#
#   Base ─┬─ PNDM (+ AlphaTables)
#          └─ ZeroSNR (rescale_betas_zero_snr) ─┬─ DDIM (+ AlphaTables)
#                                                └─ SigmaBase ─┬─ EulerAncestral (+ VEInput)
#                                                               └─ SigmaLadder ─┬─ Euler (+ VEInput)
#                                                                                └─ DPMSolverMultistep


@dataclasses.dataclass(frozen=True)
class Base:
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
        check_types(self)
        if not 2 <= self.num_train_timesteps <= MAX_TRAIN_TIMESTEPS:
            raise ValueError(f"{name}: num_train_timesteps must be an int in [2, "
                             f"{MAX_TRAIN_TIMESTEPS}], got {self.num_train_timesteps}")
        for field in ("beta_start", "beta_end"):
            if not 0.0 <= getattr(self, field) < 1.0:
                raise ValueError(f"{name}: {field} must be in [0, 1), got "
                                 f"{getattr(self, field)!r}")
        if not 0 <= self.steps_offset < self.num_train_timesteps:
            raise ValueError(f"{name}: steps_offset must be in [0, num_train_timesteps), "
                             f"got {self.steps_offset}")
        if self.trained_betas is not None:
            tb = tuple(float(b) for b in self.trained_betas)
            object.__setattr__(self, "trained_betas", tb)
            if len(tb) != self.num_train_timesteps:
                raise ValueError(
                    f"{name}: trained_betas has {len(tb)} entries but num_train_timesteps="
                    f"{self.num_train_timesteps}"
                )
        else:
            check_choice(name, "beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 2:
            raise ValueError(f"{name}: num_train_timesteps must be an int >= 2")
        check_choice(name, "prediction_type", self.prediction_type, self._PREDICTIONS)
        check_choice(name, "timestep_spacing", self.timestep_spacing, SPACINGS)
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
class ZeroSNR(Base):
    """Adds ``rescale_betas_zero_snr``: the training betas rescaled so that the last step
    has zero SNR (Lin et al. 2023)."""

    rescale_betas_zero_snr: bool = False

    def _betas(self) -> np.ndarray:
        betas = super()._betas()
        return _zero_terminal_snr(betas) if self.rescale_betas_zero_snr else betas


class AlphaTables:
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

