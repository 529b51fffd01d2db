"""Merge overhead of one self-attention call.

One self-attention layer as in SD1.5's top level (C = 320 channels, 8 heads of 40): the
q/k/v/out projections and ``retom_jax.attention.dot_product_attention``, on a batch of
tokens on a square grid. Timed:

- ``none``: the unmerged call on N tokens;
- ``free``: the `FreeMerge` probe (keep N - r tokens by a slice, tile back): attention on
  N - r tokens with no merging cost at all;
- each method: plan (from the tokens) + merge + attention on N - r tokens + unmerge.

From those: ``saved_ms = none - free`` (the attention time merging can save at this
ratio), ``overhead_ms = method - free`` (what the method's plan/merge/unmerge costs) and
``overhead_pct_of_saving = 100 * overhead / saved``. The goal reported against: ReToM's
overhead at most 10% of the attention time saved (``goal_met``).

Cached ReToM variants: ``retom_cached`` plans from cached representatives and
``retom_cached_plan`` reuses a whole cached plan, with the "use the cache" flag known at
trace time (the cost a step that reuses the cache needs); the ``*_traced`` variants pass
the flag as a traced argument, as the UNet does inside a sampling loop (where
``plan_cached`` selects with ``jnp.where``, so the fresh selection is still computed).

    python benchmarks/merge_overhead.py --preset cpu --out results/merge_overhead_cpu.json
    python benchmarks/merge_overhead.py --preset gpu --out results/merge_overhead_h100.json
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import jax, jnp  # noqa: E402

METHODS = {
    "none": "unmerged attention on N tokens",
    "free": "FreeMerge probe: slice to N - r, attention, tile back (zero merging cost)",
    "tome": "ToMe (tomesd): 2x2 cells, random dst, global bipartite matching",
    "retom": "ReToM, local matching, 2x2 windows",
    "retom_global": "ReToM, global matching against the representatives",
    "retom_cached": "ReToM, plan from cached representatives (flag known at trace time)",
    "retom_cached_traced": "ReToM, cached representatives, traced flag (as in the UNet)",
    "retom_cached_plan": "ReToM, whole plan cached: merge + unmerge only",
    "retom_cached_plan_traced": "ReToM, cached plan, traced flag (as in the UNet)",
    "todo": "ToDo factor 2: keys/values pooled 2x2, all queries (compare with free_todo)",
    "free_todo": "ToDo's probe: keys/values sliced to N/4",
}
RETOM_GOAL_PCT = 10.0

PRESETS = {
    "cpu": dict(tokens=[256, 1024], ratios=[0.5], dtype="fp32", iters=10, warmup=2, inner=1,
                rotate=2),
    "gpu": dict(tokens=[4096, 16384], ratios=[0.3, 0.5, 0.75], dtype="bf16", iters=30,
                warmup=5, inner=10, rotate=4),
}


def make_weights(channels, inner, dtype, key):
    ks = jax.random.split(key, 5)
    scale = channels ** -0.5
    w = {n: (jax.random.normal(k, (channels, inner), jnp.float32) * scale).astype(dtype)
         for n, k in zip(("q", "k", "v"), ks[:3])}
    w["o"] = (jax.random.normal(ks[3], (inner, channels), jnp.float32) * inner ** -0.5).astype(dtype)
    w["ob"] = (0.02 * jax.random.normal(ks[4], (channels,), jnp.float32)).astype(dtype)
    return w


def attention_layer(w, x, kv_tokens=None, *, heads, head_dim, implementation):
    """diffusers' self-attention (no biases on q/k/v, biased output projection)."""
    from retom_jax.models.attention import dot_product_attention

    b = x.shape[0]
    kv = x if kv_tokens is None else kv_tokens
    q = (x @ w["q"]).reshape(b, -1, heads, head_dim)
    k = (kv @ w["k"]).reshape(b, -1, heads, head_dim)
    v = (kv @ w["v"]).reshape(b, -1, heads, head_dim)
    o = dot_product_attention(q, k, v, implementation=implementation)
    return o.reshape(b, -1, heads * head_dim) @ w["o"] + w["ob"]


def build(method, ratio, hw, attn):
    """``(fn, extra_args)``: a function ``fn(w, x, *extra)`` for the method, and a function
    making its extra arguments from ``x`` (PRNG key, caches)."""
    from retom_jax import ReToM, ToDo, ToMe

    if method == "none":
        return (lambda w, x: attn(w, x)), (lambda x, i: ())
    if method in ("free", "tome", "retom", "retom_global"):
        cfg = {"free": common.FreeMerge(ratio=ratio), "tome": ToMe(ratio=ratio),
               "retom": ReToM(ratio=ratio), "retom_global": ReToM(ratio=ratio, matching="global")
               }[method]

        def fn(w, x, key):
            m, u = cfg.plan(x, hw, key=key)
            return u(attn(w, m(x)))
        return fn, (lambda x, i: (jax.random.key(i),))
    if method.startswith("retom_cached"):
        cache = "plan" if method.startswith("retom_cached_plan") else "representatives"
        cfg = ReToM(ratio=ratio, cache_step=0, cache=cache)
        traced = method.endswith("_traced")

        def fill(x, i):
            # the cache a caching step leaves (computed from these tokens, outside the timing)
            empty = cfg.init_cache(x.shape[0], hw)
            filled = jax.jit(lambda x, c: cfg.plan_cached(x, hw, c, False)[2])(x, empty)
            return (filled, jnp.asarray(True)) if traced else (filled,)

        if traced:
            def fn(w, x, cached, flag):
                m, u, _ = cfg.plan_cached(x, hw, cached, flag)
                return u(attn(w, m(x)))
        else:
            def fn(w, x, cached):
                m, u, _ = cfg.plan_cached(x, hw, cached, True)
                return u(attn(w, m(x)))
        return fn, fill
    if method in ("todo", "free_todo"):
        cfg = ToDo(factor=2) if method == "todo" else common.FreeToDo(factor=2)
        return (lambda w, x: attn(w, x, cfg.downsample(x, hw))), (lambda x, i: ())
    raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--tokens", type=int, nargs="+", help="token counts (perfect squares)")
    p.add_argument("--ratios", type=float, nargs="+", help="default: gpu 0.3 0.5 0.75, cpu 0.5")
    p.add_argument("--methods", nargs="+", choices=list(METHODS),
                   help="default: all (none and free are always measured)")
    p.add_argument("--dtype", help="bf16 (gpu preset), fp16, fp32 (cpu preset: XLA:CPU "
                   "bf16 is emulated and slow)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=40)
    p.add_argument("--channels", type=int, default=320)
    p.add_argument("--attention", choices=["auto", "cudnn", "xla", "splash"], default="auto")
    p.add_argument("--iters", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--inner", type=int, help="calls per timing sample (pipelined)")
    p.add_argument("--rotate", type=int, help="input sets used in turn")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; no new row is started after it")
    p.add_argument("--out", help="JSON file to write")
    args = p.parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    for n in args.tokens:
        if math.isqrt(n) ** 2 != n:
            p.error(f"--tokens {n} is not a perfect square (tokens form a square grid)")
    methods = args.methods or list(METHODS)
    probes = ["none", "free"] + (["free_todo"] if "todo" in methods else [])
    args.methods = probes + [m for m in methods if m not in probes]  # references first
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    dtype = common.parse_dtype(args.dtype)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    meta = common.run_meta("merge_overhead", argv, settings, script=__file__)
    meta["methods"] = {m: METHODS[m] for m in args.methods}
    meta["goal"] = f"ReToM overhead <= {RETOM_GOAL_PCT}% of the attention time saved"
    writer = common.ResultWriter(args.out, meta)
    budget = common.Budget(args.time_budget)
    from functools import partial
    attn = partial(attention_layer, heads=args.heads, head_dim=args.head_dim,
                   implementation=args.attention)
    w = make_weights(args.channels, args.heads * args.head_dim, dtype, jax.random.key(0))
    stopped = False
    for n in args.tokens:
        side = math.isqrt(n)
        hw = (side, side)
        xs = [jax.random.normal(jax.random.key(100 + i), (args.batch, n, args.channels),
                                jnp.float32).astype(dtype) for i in range(args.rotate)]
        none_ms = None
        for ratio in args.ratios:
            free_ms = free_todo_ms = None
            for method in args.methods:
                if method == "none" and none_ms is not None:
                    continue  # measured once per token count
                if method in ("todo", "free_todo") and ratio != args.ratios[0]:
                    continue  # ToDo's reduction is fixed by its factor: once per size
                if budget.exhausted():
                    stopped = True
                    break
                row = dict(tokens=n, grid=list(hw), batch=args.batch, heads=args.heads,
                           head_dim=args.head_dim, channels=args.channels,
                           dtype=common.dtype_name(dtype), attention=args.attention,
                           method=method, ratio=common.ratio_for(method, ratio)
                           if method != "none" else 0.0)
                if method in ("todo", "free_todo"):
                    row["kv_tokens"] = (side // 2) ** 2
                else:
                    row["tokens_after_merge"] = n - int(n * row["ratio"])
                try:
                    fn, extra = build(method, ratio, hw, attn)
                    arg_sets = [(w, x, *extra(x, i)) for i, x in enumerate(xs)]
                    compiled, info = common.compile_jitted(jax.jit(fn), *arg_sets[0])
                    timing = common.time_calls(compiled, arg_sets, warmup=args.warmup,
                                               iters=args.iters, inner=args.inner)
                    row.update(timing, compile_s=info["compile_s"], trace_s=info["trace_s"])
                except Exception as e:  # noqa: BLE001 - record and go on (e.g. out of memory)
                    row.update(median_ms=None, error=common.short_error(e))
                ms = row.get("median_ms")
                if method == "none":
                    none_ms = ms
                elif method == "free":
                    free_ms = ms
                elif method == "free_todo":
                    free_todo_ms = ms
                ref = free_todo_ms if method == "todo" else free_ms
                row["unmerged_ms"] = none_ms
                row["free_ms"] = ref if method not in ("none",) else None
                if none_ms is not None and ref is not None and method != "none":
                    saved = none_ms - ref
                    row["saved_ms"] = saved
                    if ms is not None and method not in ("free", "free_todo"):
                        row["overhead_ms"] = ms - ref
                        row["overhead_pct_of_saving"] = (100.0 * (ms - ref) / saved
                                                         if saved > 0 else None)
                if ms is not None and none_ms:
                    row["speedup"] = none_ms / ms
                if method.startswith("retom") and row.get("overhead_pct_of_saving") is not None:
                    row["goal_met"] = row["overhead_pct_of_saving"] <= RETOM_GOAL_PCT
                writer.add(row)
            if stopped:
                break
        if stopped:
            break
    writer.finish(stopped_by_budget=stopped)
    print_table(writer.rows)
    if args.out:
        print(f"wrote {args.out}")
    return 0


def print_table(rows):
    print("| tokens | ratio | method | median ms | p10-p90 | saved ms | overhead ms | "
          "overhead % of saving | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    f = common.fmt_ms
    for r in rows:
        pct = r.get("overhead_pct_of_saving")
        spread = (f"{f(r.get('p10_ms'))}-{f(r.get('p90_ms'))}"
                  if r.get("median_ms") is not None else r.get("error", "-"))
        sp = r.get("speedup")
        print(f"| {r['tokens']} | {r['ratio']:.2f} | {r['method']} | {f(r.get('median_ms'))} | "
              f"{spread} | {f(r.get('saved_ms'))} | {f(r.get('overhead_ms'))} | "
              f"{'-' if pct is None else f'{pct:.0f}%'} | "
              f"{'-' if sp is None else f'{sp:.2f}x'} |")


if __name__ == "__main__":
    sys.exit(main())
