"""One UNet call, with and without token merging.

For each model (random weights at the real architecture, or ``--weights`` for a real UNet
folder), image size, batch, method and ratio: one jitted call of the pure
``UNet.apply`` (parameters are arguments, not constants), compiled first and apart
(``compile_s``), then warmed up and timed (median of at least 10 synchronised calls).
Each merging row also gets ``ideal_ms``: the same UNet with the `FreeMerge` probe at the
same ratio and levels (merging that costs nothing), so the table shows how far each method
is from the limit its attention sizes allow.

    python benchmarks/unet_speed.py --preset tiny --out results/unet_tiny.json   # CPU smoke
    python benchmarks/unet_speed.py --preset gpu --models sd15 --out results/unet_sd15_h100.json
    python benchmarks/unet_speed.py --preset gpu --models sdxl --torch --out results/unet_sdxl_h100.json

``--torch`` first runs ``torch_unet_speed.py`` (diffusers + tomesd, same configs) in a
subprocess, before JAX touches the device, and puts its rows in the same file.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
from common import jax, jnp  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(common.UNET_PRESETS), default="tiny",
                   help="tiny: CPU smoke configs; gpu: the real architectures")
    p.add_argument("--models", nargs="+", choices=sorted(common.MODELS),
                   help="default: the preset's (gpu: sd15 sdxl)")
    p.add_argument("--sizes", type=int, nargs="+",
                   help="image sizes in pixels (square), for every model; default: per model")
    p.add_argument("--batch", type=int, nargs="+", help="batch sizes (default 2)")
    p.add_argument("--methods", nargs="+", choices=[m for m in common.METHODS
                                                    if not m.startswith("free")],
                   help="default: all for the model (none is always measured)")
    p.add_argument("--ratios", type=float, nargs="+", help="default: gpu 0.3 0.5 0.75, tiny 0.5")
    p.add_argument("--dtype", help="bf16 (gpu default), fp16, fp32 (tiny default)")
    p.add_argument("--attention", choices=["auto", "cudnn", "xla", "splash"], default="auto")
    p.add_argument("--weights", help="a diffusers UNet folder (or pipeline folder) instead of "
                                     "random weights; --models then only names the rows")
    p.add_argument("--no-ideal", action="store_true", help="skip the FreeMerge probes")
    p.add_argument("--iters", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--inner", type=int, default=1, help="calls per timing sample")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; no new row is started after it (rows written so far stay)")
    p.add_argument("--torch", action="store_true",
                   help="also run torch_unet_speed.py (diffusers + tomesd) on the same configs")
    p.add_argument("--out", help="JSON file to write (rewritten after each row)")
    args = p.parse_args(argv)
    preset = common.UNET_PRESETS[args.preset]
    for k in ("ratios", "dtype", "iters", "warmup", "batch"):
        if getattr(args, k) is None:
            setattr(args, k, preset[k])
    if args.models is None:
        args.models = preset["models"] if not args.weights else ["weights"]
    if args.weights and len(args.models) != 1:
        p.error("--weights loads one UNet: give at most one --models label")
    args.sizes_for = {m: args.sizes or preset["sizes"].get(m) or
                      common.UNET_PRESETS["gpu"]["sizes"].get(m, [512]) for m in args.models}
    for m, sizes in args.sizes_for.items():
        for s in sizes:
            if s % 8:
                p.error(f"image size {s} is not a multiple of 8")
    return args


# ----------------------------------------------------------------------------- one row

TIMING_KEYS = ("median_ms", "p10_ms", "p90_ms", "min_ms", "iters", "inner", "compile_s",
               "trace_s", "xla_temp_gb", "xla_total_gb", "peak_gb")

def make_fn(unet, merge, attention, static_step=None):
    """The pure UNet call for one merge config: params are the first argument.

    ``static_step``: replace the merge state's (traced) step by this constant, so that
    ReToM's "use the cache" flag is known at trace time and the fresh selection it does
    not use is removed from the program (what a sampling loop split at ``cache_step``
    would run); None keeps the step traced, as in ``retom_jax.pipeline``'s loop.
    """
    def fn(params, sample, timesteps, ehs, added, key, state):
        if static_step is not None and state is not None:
            state = dict(state, step=static_step)
        return unet.apply(params, sample, timesteps, ehs, added, merge=merge,
                          merge_state=state, key=key if merge is not None else None,
                          attention=attention)
    return fn


def measure(unet, merge, inputs, args, static_step=False):
    """Compile and time one UNet call; returns the timing dict (with compile info)."""
    sample, timesteps, ehs, added = inputs
    key = jax.random.key(1)
    state = None
    stateful = getattr(merge, "cache_step", None) is not None
    if stateful:
        state = unet.init_merge_state(sample.shape, ehs.shape, merge, added)
    call_args = (unet.params, sample, timesteps, ehs, added, key, state)
    static = stateful and static_step
    fn = jax.jit(make_fn(unet, merge, args.attention))
    if not static:
        compiled, info = common.compile_jitted(fn, *call_args)
    if stateful:
        # Step 0 is the caching step: it fills the cache from real tokens. The timed calls
        # run at step 1, which reuses it (the steps after the caching one).
        _, state = (fn if static else compiled)(*call_args)
        state = dict(state, step=jnp.ones_like(state["step"]))
        call_args = call_args[:-1] + (state,)
    if static:
        fn = jax.jit(make_fn(unet, merge, args.attention, static_step=jnp.ones((), jnp.int32)))
        compiled, info = common.compile_jitted(fn, *call_args)
    timing = common.time_calls(compiled, [call_args], warmup=args.warmup, iters=args.iters,
                               inner=args.inner)
    timing.update(compile_s=info["compile_s"], trace_s=info["trace_s"],
                  xla_temp_gb=info["xla_temp_gb"], xla_total_gb=info["xla_total_gb"],
                  peak_gb=common.peak_memory_gb())
    return timing


# ----------------------------------------------------------------------------- torch side

def run_torch(args, out_dir) -> tuple[list[dict], dict]:
    """Run torch_unet_speed.py in a subprocess (before JAX takes the device)."""
    out = Path(out_dir) / "torch_rows.json"
    methods = [m for m in (args.methods or ["none", "tome", "tome_md2"])
               if m in ("none", "tome", "tome_md2")]
    cmd = [sys.executable, str(HERE / "torch_unet_speed.py"), "--preset", args.preset,
           "--models", *args.models, "--batch", *map(str, args.batch),
           "--ratios", *map(str, args.ratios), "--iters", str(args.iters),
           "--warmup", str(args.warmup), "--methods", *(methods or ["none"]), "--out", str(out)]
    if args.sizes:
        cmd += ["--sizes", *map(str, args.sizes)]
    if args.weights:
        cmd += ["--weights", args.weights]
    print("torch side:", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sys.stdout.write(proc.stdout[-4000:])
    if proc.returncode != 0 or not out.exists():
        sys.stderr.write(proc.stderr[-4000:])
        return [], {"torch_error": f"torch_unet_speed.py exited {proc.returncode}"}
    data = json.loads(out.read_text())
    meta = data.get("meta", {})
    return data.get("rows", []), {"torch_meta": meta}


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch_rows, torch_meta = [], {}
    if args.torch:
        with tempfile.TemporaryDirectory() as tmp:
            torch_rows, torch_meta = run_torch(args, tmp)

    dtype = common.parse_dtype(args.dtype)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "sizes_for")}
    settings["sizes"] = args.sizes_for
    meta = common.run_meta("unet_speed", argv, settings, script=__file__)
    meta["methods"] = {m: common.METHODS[m] for m in common.METHODS}
    meta.update(torch_meta)
    writer = common.ResultWriter(args.out, meta)
    for r in torch_rows:
        writer.add(r)
    budget = common.Budget(args.time_budget)
    stopped = False

    for model in args.models:
        if stopped:
            break
        try:
            if args.weights:
                from retom_jax import load_unet
                unet = load_unet(args.weights, dtype, attention=args.attention)
                label = model if model != "weights" else f"weights:{Path(args.weights).name}"
            else:
                unet = common.random_unet(common.MODELS[model], dtype, attention=args.attention)
                label = model
        except Exception as e:  # noqa: BLE001
            writer.add(dict(framework="jax", model=model, method="none",
                            error=f"could not build the UNet: {common.short_error(e)}"))
            continue
        cfg = unet.config
        first = common.first_attention_level(cfg)
        methods = args.methods or common.UNET_PRESETS[args.preset].get("methods", {}).get(
            model) or common.default_methods("sdxl" if first > 1 else model)
        methods = ["none"] + [m for m in methods if m != "none"]
        for size in args.sizes_for[model]:
            for batch in args.batch:
                if stopped:
                    break
                inputs = common.unet_inputs(cfg, batch, size, size, dtype)
                base = dict(framework="jax", model=label, height=size, width=size, batch=batch,
                            dtype=common.dtype_name(dtype), attention=args.attention)
                none_ms = none_row = None
                ideal_cache: dict = {}

                def run(method, ratio):
                    merge = common.make_merge(method, ratio, first)
                    row = dict(base, method=method,
                               ratio=0.0 if method == "none" else common.ratio_for(method, ratio),
                               max_downsample=None if merge is None else merge.max_downsample,
                               merges=common.merges_anywhere(merge, cfg))
                    if merge is not None and not row["merges"] and none_row:
                        # e.g. tomesd's defaults on SDXL: every block gets no plan, so the
                        # traced program is the one measured for "none": reuse its timing.
                        row.update({k: none_row.get(k) for k in TIMING_KEYS})
                        row["note"] = ("merges nowhere in this UNet (max_downsample too small): "
                                       "same program as none, its timing reused")
                        return row
                    try:
                        if merge is not None:
                            unet.check_merge(merge, (size // 8, size // 8), key=jax.random.key(0))
                        row.update(measure(unet, merge, inputs, args,
                                           static_step=method.endswith("_static")))
                    except Exception as e:  # noqa: BLE001 - e.g. out of memory: record, go on
                        row.update(median_ms=None, error=common.short_error(e))
                    return row

                def ideal(method, ratio):
                    """The probe's time for this method's ratio and levels (measured once,
                    written as its own row)."""
                    probe = common.ideal_for(method)
                    if probe is None or args.no_ideal:
                        return None
                    md = common.make_merge(method, ratio, first).max_downsample
                    if probe == "free_todo":
                        pm = common.FreeToDo(factor=common.TODO_FACTOR, max_downsample=md)
                    else:
                        pm = common.FreeMerge(ratio=ratio, max_downsample=md)
                    k = (probe, common.ratio_for(probe, ratio), md)
                    if k in ideal_cache:
                        return ideal_cache[k]
                    if not common.merges_anywhere(pm, cfg):
                        ideal_cache[k] = none_ms  # merging nowhere: the ideal is no merging
                        return none_ms
                    row = dict(base, method=probe, ratio=k[1], max_downsample=md, merges=True)
                    try:
                        row.update(measure(unet, pm, inputs, args))
                    except Exception as e:  # noqa: BLE001
                        row.update(median_ms=None, error=common.short_error(e))
                    if none_ms and row.get("median_ms"):
                        row["speedup"] = none_ms / row["median_ms"]
                    writer.add(row)
                    ideal_cache[k] = row.get("median_ms")
                    return ideal_cache[k]

                for method in methods:
                    ratios = [0.0] if method == "none" else (
                        [args.ratios[0]] if method == "todo" else args.ratios)
                    for ratio in ratios:
                        if budget.exhausted():
                            stopped = True
                            break
                        ideal_ms = ideal(method, ratio) if method != "none" else None
                        row = run(method, ratio)
                        if method == "none":
                            none_ms, none_row = row.get("median_ms"), row
                        ms = row.get("median_ms")
                        if method != "none":
                            row["ideal_ms"] = ideal_ms
                            if ideal_ms and none_ms:
                                row["ideal_speedup"] = none_ms / ideal_ms
                        if ms and none_ms:
                            row["speedup"] = none_ms / ms
                        writer.add(row)
                        print(f"{label} {size}px b{batch} {method} {row['ratio']:.2f}: "
                              f"{common.fmt_ms(ms)} ms (ideal {common.fmt_ms(row.get('ideal_ms'))})"
                              + (f" ERROR {row['error']}" if row.get("error") else ""), flush=True)
                    if stopped:
                        break
        del unet
    writer.finish(stopped_by_budget=stopped)
    import report
    print()
    print(report.unet_table(writer.rows))
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
