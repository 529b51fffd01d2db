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

from .alpha import DDIM, PNDM
from .core import DDIMState, DPMState, PLMSState, SigmaState
from .flow_match import FlowMatchEuler, FlowMatchState
from .sigma import DPMSolverMultistep, Euler, EulerAncestral

__all__ = ["DDIM", "PNDM", "Euler", "EulerAncestral", "DPMSolverMultistep", "FlowMatchEuler",
           "FlowMatchState", "DDIMState",
           "PLMSState", "SigmaState", "DPMState", "SCHEDULER_CLASSES", "SCHEDULER_NAMES",
           "from_config", "load_scheduler"]

# ---------------------------------------------------------------------------------------
# Construction from diffusers configs
# ---------------------------------------------------------------------------------------

SCHEDULER_CLASSES = {
    "DDIMScheduler": DDIM,
    "PNDMScheduler": PNDM,
    "EulerDiscreteScheduler": Euler,
    "EulerAncestralDiscreteScheduler": EulerAncestral,
    "DPMSolverMultistepScheduler": DPMSolverMultistep,
    "FlowMatchEulerDiscreteScheduler": FlowMatchEuler,
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

SCHEDULER_NAMES = tuple(_ALIASES) + tuple(SCHEDULER_CLASSES)


def _resolve_name(name: str):
    if name in SCHEDULER_CLASSES:
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
        if cls_name not in SCHEDULER_CLASSES:
            raise ValueError(
                f"unsupported scheduler class {cls_name!r}; supported: " + ", ".join(SCHEDULER_CLASSES)
            )
    cls = SCHEDULER_CLASSES[cls_name]
    merged = {**dict(config), **forced, **overrides}
    if cls is FlowMatchEuler:  # flow matching: its own options (null shifts: defaults)
        return FlowMatchEuler.from_config(merged)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(
            f"{cls.__name__} has no option(s) {sorted(unknown)}; options: {sorted(fields)}"
        )
    kwargs = {k: v for k, v in merged.items() if k in fields}
    if cls is PNDM:  # diffusers' default is the Runge-Kutta warm-up
        kwargs["skip_prk_steps"] = bool(merged.get("skip_prk_steps", False))
    if isinstance(kwargs.get("trained_betas"), list):
        kwargs["trained_betas"] = tuple(kwargs["trained_betas"])
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
            with open(c, "rb") as fh:
                try:
                    cfg = json.loads(fh.read())
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise ValueError(f"{c} is not valid JSON: {exc}") from None
            try:
                return from_config(cfg, name=name, **overrides)
            except (ValueError, TypeError) as exc:
                from ..models.weights import one_line

                raise ValueError(f"{c}: {one_line(exc)}") from None
    raise FileNotFoundError(
        "no scheduler config found; looked for " + " and ".join(repr(c) for c in candidates)
    )
