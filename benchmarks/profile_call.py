"""Where the time of one UNet call goes: a ``jax.profiler`` trace, device ops by time.

Compiles one UNet call (random weights at the real architecture, as ``unet_speed.py``),
warms it up, traces ``--iters`` calls with ``jax.profiler.trace(create_perfetto_trace=True)``
and reads the Perfetto/Chrome JSON it writes: every device event (the GPU's streams; on a
CPU, the XLA ops of the host threads) is grouped by name and by a coarse kind (attention
kernel, matrix product, convolution, sort, scatter, gather, reduction, other fusion), and
the merge's own share is summed over the ops whose HLO names come from merging (sort,
scatter, gather and top-k). The table is printed and written as JSON.

    python benchmarks/profile_call.py --model sd15 --size 1024 --method retom --out results/profile.json
    python benchmarks/profile_call.py --model sd15-tiny --size 128 --dtype fp32 --out results/profile_tiny.json
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
from common import jax, jnp  # noqa: E402

# (kind, substrings of a lower-cased op/kernel name); the first match wins
KINDS = (
    ("convolution", ("conv",)),  # before attention: cuDNN names both ("cudnn-conv...")
    ("attention", ("fmha", "flash", "attention", "sdpa")),
    ("sort", ("sort", "topk", "top_k", "argsort")),
    ("scatter", ("scatter",)),
    ("gather", ("gather", "dynamic-slice", "dynamic_slice", "take")),
    ("matmul", ("gemm", "cublas", "cutlass", "dot", "matmul", "sm90_xmma", "wgmma")),
    ("reduction", ("reduce", "reduction")),
    ("copy", ("copy", "memcpy", "memset", "transpose")),
)
MERGE_KINDS = ("sort", "scatter", "gather")


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other fusion"


def device_events(trace: dict) -> list[dict]:
    """Complete events ('X') of the device processes (GPU streams), else of XLA op lines."""
    names = {e.get("pid"): e.get("args", {}).get("name", "")
             for e in trace.get("traceEvents", []) if e.get("ph") == "M"
             and e.get("name") == "process_name"}
    gpu = {pid for pid, n in names.items() if "/device:" in n and "gpu" in n.lower()
           or "/device:tpu" in n.lower()}
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    if gpu:
        return [e for e in events if e.get("pid") in gpu]
    # CPU: keep the events that name an HLO op (XLA:CPU's thunks), not Python frames
    return [e for e in events if "hlo_op" in e.get("args", {})
            or "long_name" in e.get("args", {})]


def summarize(events: list[dict], calls: int, top: int = 25) -> dict:
    """Per-call times by kind and the ``top`` ops; ``all_ops`` keeps every op (with its
    kernel name) so that a later reading can group them differently."""
    by_name: dict = collections.defaultdict(lambda: [0.0, 0])
    by_kind: dict = collections.defaultdict(float)
    for e in events:
        args = e.get("args", {})
        name = args.get("hlo_op") or e.get("name", "?")
        label = f"{name} [{e.get('name', '')[:60]}]" if args.get("hlo_op") else name
        by_name[label][0] += e["dur"] / 1e3
        by_name[label][1] += 1
        by_kind[kind_of(f"{name} {e.get('name', '')}")] += e["dur"] / 1e3
    total = sum(by_kind.values()) or 1.0
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])
    rows = ranked[:top]
    return dict(
        device_ms_per_call=total / calls,
        kinds={k: dict(ms_per_call=v / calls, share=v / total)
               for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        merge_share=sum(by_kind.get(k, 0.0) for k in MERGE_KINDS) / total,
        top_ops=[dict(op=n, ms_per_call=v[0] / calls, count_per_call=v[1] / calls,
                      share=v[0] / total) for n, v in rows],
        all_ops={n: round(v[0] / calls, 5) for n, v in ranked},
    )


def load_trace(logdir: Path) -> dict:
    files = sorted(logdir.rglob("*.trace.json.gz")) + sorted(logdir.rglob("perfetto_trace.json.gz"))
    if not files:
        raise SystemExit(f"no trace JSON written under {logdir}")
    with gzip.open(files[-1], "rt") as f:
        return json.load(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sd15", choices=sorted(common.MODELS))
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--method", default="retom",
                   choices=[m for m in common.METHODS if m != "free_todo"])
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--attention", default="auto")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--trace-dir", help="keep the raw trace here (default: a temporary folder)")
    p.add_argument("--out")
    args = p.parse_args(argv)

    import unet_speed

    dtype = common.parse_dtype(args.dtype)
    config = common.MODELS[args.model]
    unet = common.random_unet(config, dtype, attention=args.attention)
    first = common.first_attention_level(unet.config)
    if args.method == "free":
        merge = common.FreeMerge(ratio=args.ratio,
                                 max_downsample=common.make_merge("retom", args.ratio,
                                                                  first).max_downsample)
    else:
        merge = common.make_merge(args.method, args.ratio, first)
    sample, t, ehs, added = common.unet_inputs(config, args.batch, args.size, args.size, dtype)
    state = None
    if getattr(merge, "cache_step", None) is not None:
        state = unet.init_merge_state(sample.shape, ehs.shape, merge, added)
    fn = jax.jit(unet_speed.make_fn(unet, merge, args.attention))
    call = (unet.params, sample, t, ehs, added, jax.random.key(1), state)
    for _ in range(3):
        jax.block_until_ready(fn(*call))

    with tempfile.TemporaryDirectory() as tmp:
        logdir = Path(args.trace_dir or tmp)
        with jax.profiler.trace(str(logdir), create_perfetto_trace=True):
            for _ in range(args.iters):
                jax.block_until_ready(fn(*call))
        summary = summarize(device_events(load_trace(logdir)), args.iters, args.top)

    print(f"{args.model} {args.size}px b{args.batch} {args.method} {args.ratio} "
          f"{args.dtype}: {summary['device_ms_per_call']:.2f} ms of device ops per call; "
          f"merge ops (sort/scatter/gather) {summary['merge_share']:.1%}")
    for k, v in summary["kinds"].items():
        print(f"  {k:14s} {v['ms_per_call']:8.3f} ms  {v['share']:6.1%}")
    print("  top ops:")
    for r in summary["top_ops"]:
        print(f"  {r['ms_per_call']:8.3f} ms {r['share']:6.1%} x{r['count_per_call']:<4g} "
              f"{r['op'][:110]}")
    if args.out:
        meta = common.run_meta("profile_call", argv, vars(args), script=__file__)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(meta=meta, **summary), indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
