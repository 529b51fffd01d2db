"""XLA scratch memory and FLOPs of one UNet call, compiled ahead and never run (issue 10).

The UNet (random-weight architecture, or only its shapes: no parameter is ever filled) is
lowered with `jax.jit(UNet.apply).lower(...)` on abstract arguments and compiled; the
compiled program's ``memory_analysis()`` (XLA's buffer assignment: temp/scratch bytes,
arguments, outputs) and ``cost_analysis()`` (FLOPs, bytes accessed) are recorded. Nothing
is executed, so a program that needs more memory than the machine has is still measured.

XLA's cost analysis counts a loop body once, whatever its trip count, so the chunked
program's raw ``gflops`` leaves out all but one chunk of each chunked attention call.
``gflops_per_trip`` adds them back: every chunked call met while tracing is compiled on its
own, chunked and plain, and the difference of their FLOP counts is added.

``--layer-speed``: also times one self-attention call of the model's first level (its
shape at ``--size``), plain and chunked, median of ``--iters`` synchronised calls.

Each row is one (method, XLA attention mode): ``--chunk-bytes`` sets
`retom_jax.attention.XLA_CHUNK_BYTES` for the rows (``inf``: never chunk, the plain
formulation that materialises every logit, i.e. the behaviour before the chunked fallback).

    nice -n 10 python benchmarks/attention_memory.py --out results/attention_memory_cpu.json
    python benchmarks/attention_memory.py --model sd15-tiny --size 128 --chunk-bytes inf 4096

Compiling the full SD1.5 UNet at 1024 px on a CPU takes minutes per row.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
from common import jax, jnp  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(common.MODELS), default="sd15")
    p.add_argument("--size", type=int, default=1024, help="image size in pixels (square)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--methods", nargs="*", default=["none", "retom"],
                   choices=[m for m in common.METHODS if m != "free_todo"],
                   help="merge methods (free: the zero-overhead probe)")
    p.add_argument("--max-downsample", type=int, nargs="+",
                   help="also measure each merging method at these max_downsample values "
                        "(default: the method's own, as in unet_speed.py)")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--attention", default="xla", help="attention implementation (default xla)")
    p.add_argument("--chunk-bytes", nargs="+", default=["inf", "default"],
                   help="values of XLA_CHUNK_BYTES to measure: bytes, 'inf' (never chunk) or "
                        "'default' (the library's); default: inf default")
    p.add_argument("--layer-speed", action="store_true",
                   help="also time one first-level self-attention call, plain vs chunked")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", help="JSON file to write (rewritten after each row)")
    return p.parse_args(argv)


def chunk_value(text: str, default):
    if text == "default":
        return default
    if text == "inf":
        return math.inf
    return int(float(text))


def flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    return float(cost.get("flops", float("nan")))


class ChunkRecorder:
    """Wraps `retom_jax.attention.xla_attention` while a program is traced: records the
    shapes of the calls that chunk their queries."""

    def __init__(self, attn):
        self.attn, self.calls = attn, []

    def __enter__(self):
        self.original = original = self.attn.xla_attention
        attn, calls = self.attn, self.calls

        def recording(q, k, v, *, mask=None, is_causal=False, chunk_bytes=None):
            b, tq, h, _ = q.shape
            if attn.xla_chunk_size(b, h, tq, k.shape[1], chunk_bytes) < tq:
                if mask is not None:
                    raise NotImplementedError("the FLOP correction handles unmasked calls")
                calls.append((jax.ShapeDtypeStruct(q.shape, q.dtype),
                              jax.ShapeDtypeStruct(k.shape, k.dtype),
                              jax.ShapeDtypeStruct(v.shape, v.dtype), is_causal, chunk_bytes))
            return original(q, k, v, mask=mask, is_causal=is_causal, chunk_bytes=chunk_bytes)

        attn.xla_attention = recording
        return self

    def __exit__(self, *exc):
        self.attn.xla_attention = self.original

    def missing_gflops(self) -> float:
        """FLOPs of the chunk trips XLA's cost analysis does not count, in GFLOP."""
        total, cache = 0.0, {}
        for q, k, v, causal, chunk in self.calls:
            key = (q.shape, k.shape, v.shape, str(q.dtype), causal, chunk)
            if key not in cache:
                f = {c: flops(jax.jit(lambda q, k, v, c=c: self.original(
                    q, k, v, is_causal=causal, chunk_bytes=c)).lower(q, k, v).compile())
                     for c in (chunk, math.inf)}
                cache[key] = f[math.inf] - f[chunk]
            total += cache[key]
        return total / 1e9


def layer_speed(attn, config, size, batch, dtype, iters, chunk_bytes):
    """Median ms of one self-attention call at the first attention level, plain vs chunked."""
    level = common.first_attention_level(config)
    i = level.bit_length() - 1  # the UNet block of that downsample factor
    heads = config.num_attention_heads[i]
    head_dim = config.block_out_channels[i] // heads
    tokens = (size // 8 // level) ** 2
    keys = jax.random.split(jax.random.key(0), 3)
    shape = (batch, tokens, heads, head_dim)
    q, k, v = (jax.random.normal(key, shape, dtype) for key in keys)
    rows = []
    for setting, cb in (("inf", math.inf), ("default", chunk_bytes)):
        f = jax.jit(lambda q, k, v, cb=cb: attn.dot_product_attention(
            q, k, v, implementation="xla", chunk_bytes=cb))
        compiled, info = common.compile_jitted(f, q, k, v)
        timing = common.time_calls(compiled, [(q, k, v)], warmup=1, iters=iters)
        rows.append({"kind": "layer", "shape": list(shape), "chunk_setting": setting,
                     "chunk_bytes": cb, **info, **timing})
    return rows


def method_configs(args, first):
    """(method, merge config) rows: each method at its own max_downsample, then at each
    ``--max-downsample`` value that differs."""
    import dataclasses

    for method in args.methods:
        merge = common.make_merge(method, args.ratio, first)
        yield method, merge
        for md in args.max_downsample or ():
            if merge is not None and md != merge.max_downsample:
                yield method, dataclasses.replace(merge, max_downsample=md)


def main(argv=None):
    args = parse_args(argv)
    from flax import nnx

    from retom_jax.models import attention as attn
    from retom_jax.models.unet import UNet, UNet2DConditionModel
    from retom_jax.models.weights import abstract_module

    config = common.unet_config(common.MODELS[args.model])
    dtype = common.parse_dtype(args.dtype)
    default_chunk = attn.XLA_CHUNK_BYTES
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    settings["default_chunk_bytes"] = default_chunk
    writer = common.ResultWriter(args.out, common.run_meta(
        "attention_memory", argv, settings, script=__file__))

    module = abstract_module(lambda rngs: UNet2DConditionModel(
        config, attention=args.attention, dtype=dtype, param_dtype=dtype, rngs=rngs))
    graphdef, params = nnx.split(module)
    params = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    unet = UNet(config, graphdef, params, dtype, args.attention)
    inputs = jax.eval_shape(lambda: common.unet_inputs(
        config, args.batch, args.size, args.size, dtype))
    first = common.first_attention_level(config)

    try:
        for chunk_text in args.chunk_bytes:
            attn.XLA_CHUNK_BYTES = chunk_value(chunk_text, default_chunk)
            for method, merge in method_configs(args, first):
                jitted = jax.jit(lambda p, s, t, e, a, merge=merge: unet.apply(
                    p, s, t, e, a, merge=merge))
                t0 = time.perf_counter()
                with ChunkRecorder(attn) as recorder:
                    compiled, info = common.compile_jitted(jitted, params, *inputs)
                cost = compiled.cost_analysis()
                cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
                gflops = cost.get("flops", float("nan")) / 1e9
                row = {"kind": "unet", "model": args.model, "size": args.size, "batch": args.batch,
                       "dtype": common.dtype_name(dtype), "method": method,
                       "max_downsample": None if merge is None else merge.max_downsample,
                       "ratio": args.ratio if merge is not None else 0.0,
                       "attention": args.attention,
                       "chunk_bytes": attn.XLA_CHUNK_BYTES, "chunk_setting": chunk_text,
                       **info, "gflops": gflops, "chunked_calls": len(recorder.calls),
                       "gflops_per_trip": gflops + recorder.missing_gflops(),
                       "bytes_accessed_gb": cost.get("bytes accessed", float("nan")) / 1e9,
                       "wall_s": time.perf_counter() - t0}
                writer.add(row)
                print(f"{method:>6} md={row['max_downsample']} chunk={chunk_text:>8}: temp {row['xla_temp_gb']:.2f} GB, "
                      f"total {row['xla_total_gb']:.2f} GB, {row['gflops']:.0f} GFLOP "
                      f"({row['gflops_per_trip']:.0f} counting every chunk), "
                      f"compile {row['compile_s']:.0f} s", flush=True)
                del compiled
        if args.layer_speed:
            attn.XLA_CHUNK_BYTES = default_chunk
            for row in layer_speed(attn, config, args.size, args.batch, dtype, args.iters,
                                   default_chunk):
                writer.add(row)
                print(f" layer chunk={row['chunk_setting']:>8} {row['shape']}: "
                      f"{row['median_ms']:.1f} ms, temp {row['xla_temp_gb']:.2f} GB", flush=True)
    finally:
        attn.XLA_CHUNK_BYTES = default_chunk
    writer.finish()
    return writer.rows


if __name__ == "__main__":
    main()
