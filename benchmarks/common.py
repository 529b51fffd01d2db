"""Shared pieces of the benchmarks: model configs, random UNets, timing, JSON output,
merge-method factories and the ``FreeMerge`` probe.

Timing follows the project's rules (and the device notes' method): every measured call is
synchronised with ``jax.block_until_ready``; compilation is done and timed first, apart
(``lower`` + ``compile``); then a few warm-up calls; then at least 10 timed calls, of
which we report the median with the 10th and 90th percentiles. Results are written as
JSON with the device, the library versions, the date and the exact command line.

Nothing here asserts a speed: the scripts measure and report.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

# The benchmarks import ``retom_jax`` from the repository when run as scripts from a
# checkout without an editable install.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from retom_jax.demo import DEMO_UNET  # noqa: E402
from retom_jax.merge.interface import BlockMerge, MergeMethod  # noqa: E402
from retom_jax.models.unet import init_unet  # noqa: E402
from retom_jax.models.weights import random_state  # noqa: E402

# --------------------------------------------------------------------------------------
# UNet configs: the real architectures, written out as diffusers config.json dicts
# --------------------------------------------------------------------------------------

# runwayml/stable-diffusion-v1-5 unet/config.json (the fields that shape the model).
SD15 = {
    "act_fn": "silu",
    "attention_head_dim": 8,  # diffusers' misnomer: 8 heads (of 40, 80, 160 channels)
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
}

# stabilityai/stable-diffusion-2-1 unet/config.json: linear projections, heads of 64,
# OpenCLIP-H text states (1024), attention upcast to float32.
SD21 = {
    **SD15,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "dual_cross_attention": False,
    "sample_size": 96,
    "upcast_attention": True,
    "use_linear_projection": True,
}

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json.
SDXL = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# Tiny versions of the same families for CPU smoke runs (seconds to compile).
SD15_TINY = dict(DEMO_UNET)  # the demo pipeline's UNet (retom_jax.demo)
SDXL_TINY = {
    "block_out_channels": [32, 64], "layers_per_block": 1, "sample_size": 16,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 32, "attention_head_dim": [2, 4], "norm_num_groups": 8,
    "transformer_layers_per_block": [1, 2], "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 16 + 6 * 8,
}

MODELS = {"sd15": SD15, "sd21": SD21, "sdxl": SDXL,
          "sd15-tiny": SD15_TINY, "sdxl-tiny": SDXL_TINY}
TEXT_TOKENS = 77


def family(model: str) -> str:
    """``"sdxl"`` for SDXL-shaped UNets (no attention at the top level), else ``"sd"``."""
    return "sdxl" if model.startswith("sdxl") else "sd"


def unet_config(config):
    """A ``retom_jax.UNetConfig`` from a config dict (or one already built)."""
    from retom_jax.models.unet import UNetConfig

    return config if isinstance(config, UNetConfig) else UNetConfig.from_dict(dict(config))


def first_attention_level(config) -> int:
    """Downsample factor of the UNet's first attention level: 1 on SD1.x/2.x, 2 on SDXL."""
    return min(unet_config(config).attention_downsamples())


def text_embeds_dim(config) -> int | None:
    """Width of SDXL's ``added_cond_kwargs["text_embeds"]`` (pooled text), or None."""
    cfg = unet_config(config)
    if cfg.addition_embed_type != "text_time":
        return None
    return cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim


def cross_dim(config) -> int:
    return unet_config(config).cross_attention_dim[0]


def torch_config(config: dict) -> dict:
    """The dict as ``diffusers.UNet2DConditionModel(**config)`` takes it."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()
            if not k.startswith("_")}


# --------------------------------------------------------------------------------------
# Random UNets and inputs
# --------------------------------------------------------------------------------------

def parse_dtype(name) -> Any:
    names = {"bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16, "fp16": jnp.float16,
             "float16": jnp.float16, "fp32": jnp.float32, "float32": jnp.float32}
    if not isinstance(name, str):
        return jnp.dtype(name).type
    if name not in names:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(names)}")
    return names[name]


def dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


# Random weights: `retom_jax.weights.random_state` (fast at SDXL size; speed does not
# depend on the values).
random_params = random_state


def random_unet(config: dict, dtype=jnp.bfloat16, seed: int = 0, attention: str = "auto"):
    """A ``retom_jax.UNet`` with random weights at the architecture ``config``."""
    unet = init_unet(dict(config), seed, dtype, attention=attention)
    jax.block_until_ready(unet.params)
    return unet


def unet_inputs(config: dict, batch: int, height: int, width: int, dtype, seed: int = 0):
    """``(sample, timesteps, encoder_hidden_states, added_cond_kwargs)`` for one UNet call
    on ``height x width`` pixel images (latent 8x smaller), random normal values."""
    if height % 8 or width % 8:
        raise ValueError(f"image size must be a multiple of 8, got {height}x{width}")
    k = jax.random.split(jax.random.key(seed), 3)
    c = unet_config(config).in_channels
    sample = jax.random.normal(k[0], (batch, c, height // 8, width // 8), dtype)
    timesteps = jnp.full((batch,), 500, jnp.int32)
    ehs = jax.random.normal(k[1], (batch, TEXT_TOKENS, cross_dim(config)), dtype)
    added = None
    te = text_embeds_dim(config)
    if te is not None:
        added = {"text_embeds": jax.random.normal(k[2], (batch, te), dtype),
                 "time_ids": jnp.tile(jnp.array([[height, width, 0, 0, height, width]],
                                                jnp.float32), (batch, 1))}
    return sample, timesteps, ehs, added


# --------------------------------------------------------------------------------------
# Zero-overhead probes
# --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FreeMerge(MergeMethod):
    """The zero-overhead limit of token merging, at the same attention sizes.

    ``merge`` keeps the first ``N - r`` tokens (a slice, no similarity, no plan),
    ``unmerge`` tiles them back to ``N`` tokens (one write of the full-size output, which
    any unmerge must do). ``r = int(N * ratio)`` as in ToMe. A merging method like the
    library's (``retom_jax.merge.MergeMethod``, one class): its time in the UNet is what a
    merging method would cost if planning, merging and unmerging were free
    (``ideal_ms``). Its outputs are meaningless.
    """

    ratio: float = 0.5
    max_downsample: int = 1
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False

    def __post_init__(self):
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"FreeMerge ratio must be in [0, 1), got {self.ratio!r}")

    def plan(self, metric, hw, key=None, *, downsample: int = 1):
        n = metric.shape[1]
        r = int(n * self.ratio)
        if r <= 0:
            return (lambda x: x), (lambda x: x)
        m = n - r

        def merge(x):
            return x[:, :m]

        def unmerge(x):
            reps = -(-n // m)
            return jnp.concatenate([x] * reps, axis=1)[:, :n] if reps > 1 else x

        return merge, unmerge

    def for_block(self, tokens, grid, downsample, key=None, cache=None, use_cache=False):
        return BlockMerge.branches(self, *self.plan(tokens, grid)), None


@dataclasses.dataclass(frozen=True)
class FreeToDo(MergeMethod):
    """The zero-overhead limit of ToDo: keys/values are the first ``N / factor**2`` tokens
    (a slice), queries keep every token."""

    factor: int = 2
    max_downsample: int = 1

    def downsample(self, x, hw):
        h, w = hw
        m = (h // self.factor) * (w // self.factor)
        return x[:, :m]

    def for_block(self, tokens, grid, downsample, key=None, cache=None, use_cache=False):
        return BlockMerge(kv_down=lambda t: self.downsample(t, grid)), None


# --------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------

# name -> what it is (README and --help)
METHODS = {
    "none": "no merging",
    "tome": "ToMe, tomesd defaults (max_downsample=1, 2x2 cells, random dst): nothing on SDXL",
    "tome_md2": "ToMe with max_downsample=2 (reaches SDXL's first attention level)",
    "retom": "ReToM, local matching, 2x2 windows, representatives recomputed each call",
    "retom_global": "ReToM, global (bipartite) matching against the representatives",
    "retom_near": "ReToM, matching against the representatives of the 3x3 nearby windows",
    "retom_near2": "ReToM, matching against the representatives of the 5x5 nearby windows",
    "retom_local": "ReToM, local matching (each source into its own window's representative)",
    "retom_kv": "ReToM(kv_only=True): self-attention's keys/values merged, queries kept",
    "retom_kv_near": "retom_kv with matching='near'",
    "retom_cached": "ReToM(cache_step=0, cache='representatives') at a step > 0: plan from "
                    "cached representatives",
    "retom_cached_plan": "ReToM(cache_step=0, cache='plan') at a step > 0: cached plan, "
                         "only merge/unmerge",
    "retom_cached_static": "retom_cached with the step known at trace time: the unused "
                           "fresh selection is compiled away (a loop split at cache_step)",
    "retom_cached_plan_static": "retom_cached_plan with the step known at trace time",
    "todo": "ToDo, keys/values pooled 2x2 (nearest): ratio 0.75 of the keys/values",
    "free": "FreeMerge probe: slice/tile, zero merging overhead (the ideal)",
    "free_todo": "FreeToDo probe: keys/values sliced (ToDo's ideal)",
}
MERGING_METHODS = [m for m in METHODS if m not in ("none", "free", "free_todo")]
TODO_FACTOR = 2


def max_downsample_for(method: str, first_level: int) -> int:
    """Where a method merges: tomesd's default (1) for ``tome``, 2 for ``tome_md2``, the
    UNet's first attention level for the others (``first_level``: 1 on SD1.x/2.x, 2 on
    SDXL, whose top level has no attention)."""
    if method == "tome":
        return 1
    if method == "tome_md2":
        return 2
    return first_level


def ratio_for(method: str, ratio: float) -> float:
    """The share of tokens a row removes: ToDo's is fixed by its factor (keys/values)."""
    if method in ("todo", "free_todo"):
        return 1.0 - 1.0 / TODO_FACTOR ** 2
    return ratio


def make_merge(method: str, ratio: float, first_level: int = 1):
    """The merge config object for a method (None for ``"none"``): the library's
    ``cli.merge_config`` with the variant's options, or a zero-overhead probe."""
    from retom_jax.merge import from_options as merge_config

    md = max_downsample_for(method, first_level)
    if method == "free":
        return FreeMerge(ratio=ratio, max_downsample=md)
    if method == "free_todo":
        return FreeToDo(factor=TODO_FACTOR, max_downsample=md)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    base = method.split("_")[0]  # tome_md2 -> tome, retom_cached_plan_static -> retom
    options = {"retom_global": dict(matching="global"), "retom_near": dict(matching="near"),
               "retom_near2": dict(matching="near"),
               "retom_local": dict(matching="local"),
               "retom_kv_near": dict(matching="near")}.get(method, {})
    if method.startswith("retom_cached"):
        plan = method.startswith("retom_cached_plan")
        options = dict(cache_step=0, cache="plan" if plan else "representatives")
    merge = merge_config(base, ratio, md, todo_factor=TODO_FACTOR, **options)
    if method.startswith("retom_kv"):
        merge = dataclasses.replace(merge, kv_only=True)
    return dataclasses.replace(merge, reach=2) if method == "retom_near2" else merge


def merges_anywhere(merge, config) -> bool:
    """Whether ``merge`` applies at any attention level of the UNet (tomesd's defaults on
    SDXL do not)."""
    if merge is None:
        return False
    return any(merge.applies(d) for d in unet_config(config).attention_downsamples())


def default_methods(model: str) -> list[str]:
    """The methods a UNet run measures unless ``--methods`` says otherwise."""
    base = ["none", "tome", "retom", "retom_global", "retom_cached", "retom_cached_plan", "todo"]
    if family(model) == "sdxl":
        base.insert(2, "tome_md2")  # tomesd's default reaches nothing on SDXL
    return base


# Presets of the UNet benchmarks (shared by the JAX and the torch scripts).
UNET_PRESETS = {
    "tiny": dict(models=["sd15-tiny", "sdxl-tiny"],
                 sizes={"sd15-tiny": [128], "sdxl-tiny": [128]},
                 ratios=[0.5], dtype="fp32", iters=10, warmup=2, batch=[2],
                 # fewer programs on the SDXL-shaped one: the whole preset stays under a
                 # minute of CPU (each tiny program compiles in 2-4 s there)
                 methods={"sdxl-tiny": ["none", "tome", "retom"]}),
    "gpu": dict(models=["sd15", "sdxl"],
                sizes={"sd15": [512, 768, 1024, 1536, 2048], "sd21": [768, 1024, 1536],
                       "sdxl": [1024, 2048]},
                ratios=[0.3, 0.5, 0.75], dtype="bf16", iters=10, warmup=3, batch=[2]),
}


def ideal_for(method: str) -> str | None:
    """The probe whose time is a method's ``ideal_ms``."""
    if method == "none" or method.startswith("free"):
        return None
    return "free_todo" if method == "todo" else "free"


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------

def compile_jitted(jitted, *args):
    """Lower and compile ``jitted`` for ``args``; returns ``(compiled, info)``.

    ``info``: ``trace_s`` (tracing and lowering), ``compile_s`` (XLA compilation),
    ``xla_temp_gb`` / ``xla_total_gb`` (the compiled program's scratch memory and its
    arguments + outputs + scratch, from XLA's buffer assignment; None if not reported).
    """
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    info = {"trace_s": t1 - t0, "compile_s": t2 - t1, "xla_temp_gb": None, "xla_total_gb": None}
    try:
        m = compiled.memory_analysis()
        if m is not None:
            temp = m.temp_size_in_bytes
            total = (m.argument_size_in_bytes + m.output_size_in_bytes + temp
                     - m.alias_size_in_bytes)
            info["xla_temp_gb"], info["xla_total_gb"] = temp / 1e9, total / 1e9
    except Exception:  # noqa: BLE001 - not every backend reports it
        pass
    return compiled, info


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q))


def time_calls(fn: Callable, arg_sets: Sequence[tuple], *, warmup: int = 3, iters: int = 10,
               inner: int = 1, sync: Callable = jax.block_until_ready) -> dict:
    """Time ``fn(*args)`` (already compiled); returns milliseconds per call.

    ``arg_sets``: one or more argument tuples, used in turn (rotating input sets keeps
    small inputs from being served from cache). Each sample is ``inner`` back-to-back
    calls followed by one synchronisation, divided by ``inner`` (``inner=1``: each call
    synchronised on its own, host dispatch included). ``warmup`` samples are discarded.
    Returns ``median_ms``, ``p10_ms``, ``p90_ms``, ``min_ms``, ``iters``, ``inner``.
    """
    if iters < 1 or inner < 1:
        raise ValueError("iters and inner must be >= 1")
    n = len(arg_sets)
    calls = 0

    def sample():
        nonlocal calls
        t0 = time.perf_counter()
        out = None
        for _ in range(inner):
            out = fn(*arg_sets[calls % n])
            calls += 1
        sync(out)
        return (time.perf_counter() - t0) * 1e3 / inner

    for _ in range(warmup):
        sample()
    times = [sample() for _ in range(iters)]
    return {"median_ms": statistics.median(times), "p10_ms": percentile(times, 10),
            "p90_ms": percentile(times, 90), "min_ms": min(times), "iters": iters,
            "inner": inner}


def peak_memory_gb(device=None) -> float | None:
    """The device allocator's high-water mark in GB (process-wide, never reset), or None
    where the backend reports no memory statistics (CPU)."""
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 1e9


# --------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------

def device_description() -> dict:
    d = jax.devices()[0]
    out = {"backend": jax.default_backend(), "device_kind": getattr(d, "device_kind", str(d)),
           "device_count": jax.device_count(), "platform": platform.platform(),
           "processor": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    out["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return out


def versions(*extra: str) -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "numpy", "retom-jax", *extra):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def command_line(argv=None, script: str | None = None) -> str:
    """The exact command: the interpreter, the script and its arguments (``argv`` given:
    the call came through ``main(argv)``, e.g. from the tests)."""
    if argv is None:
        args = list(sys.argv)
    else:
        args = [os.path.relpath(script) if script else sys.argv[0], *argv]
    return shlex.join([sys.executable, *map(str, args)])


def run_meta(benchmark: str, argv=None, settings: dict | None = None, extra_versions=(),
             with_device: bool = True, script: str | None = None) -> dict:
    meta = {
        "benchmark": benchmark,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(argv, script),
        "cwd": os.getcwd(),
        "versions": versions(*extra_versions),
        "settings": settings or {},
        "env": {k: os.environ[k] for k in ("JAX_PLATFORMS", "XLA_FLAGS", "CUDA_VISIBLE_DEVICES",
                                          "XLA_PYTHON_CLIENT_PREALLOCATE",
                                          "XLA_PYTHON_CLIENT_MEM_FRACTION") if k in os.environ},
    }
    if with_device:
        meta["device"] = device_description()
    return meta


def _clean(value):
    """JSON-safe: NaN/inf become null, NumPy scalars become Python numbers."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


class ResultWriter:
    """Collects rows and rewrites the JSON file after each one, so that a run cut short
    (a time limit, an out-of-memory crash) still leaves every finished row on disk."""

    def __init__(self, path: str | None, meta: dict):
        self.path = Path(path) if path else None
        self.meta = meta
        self.rows: list[dict] = []
        self.meta.setdefault("complete", False)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.flush()

    def add(self, row: dict) -> dict:
        self.rows.append(_clean(row))
        self.flush()
        return row

    def flush(self):
        if self.path is None:
            return
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps({"meta": _clean(self.meta), "rows": self.rows}, indent=1))
        tmp.replace(self.path)

    def finish(self, **meta):
        self.meta.update(meta)
        self.meta["complete"] = True
        self.flush()


def load_results(paths: Sequence[str]) -> list[dict]:
    """Rows of one or more result files, each row tagged with its file's device kind."""
    rows = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        meta = data.get("meta", {})
        dev = (meta.get("device") or {}).get("device_kind")
        for r in data.get("rows", []):
            r = dict(r)
            r.setdefault("device", dev)
            r.setdefault("benchmark", meta.get("benchmark"))
            rows.append(r)
    return rows


def fmt_ms(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if v < 10 else f"{v:.1f}"


class Budget:
    """Stop starting new rows after ``seconds`` (None: no limit)."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.start = time.perf_counter()

    def left(self) -> float:
        if self.seconds is None:
            return math.inf
        return self.seconds - (time.perf_counter() - self.start)

    def exhausted(self) -> bool:
        return self.left() <= 0


def short_error(e: BaseException, limit: int = 300) -> str:
    text = f"{type(e).__name__}: {e}"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
