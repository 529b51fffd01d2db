"""The PyTorch peer: diffusers' ``UNet2DConditionModel`` with and without tomesd.

Same configs, sizes, batches and ratios as ``unet_speed.py``, rows in the same JSON format
(``framework: "torch"``), so one table can put the peer beside ours. Random weights
(diffusers' own initialisation), fp16 on CUDA / fp32 on CPU, PyTorch SDPA attention
(diffusers' default processor), ``torch.inference_mode``. On CUDA each call is timed with
CUDA events; on CPU with a host clock. ``tome`` is ``tomesd.apply_patch(unet, ratio=r)``
with tomesd's defaults (max_downsample=1: it merges nothing on SDXL); ``tome_md2`` adds
``max_downsample=2``. Peak memory: ``torch.cuda.max_memory_allocated`` since a reset
before the row (CUDA only).

Skipped cleanly, with a message and a JSON file without rows, when torch, diffusers or
tomesd is missing.

    python benchmarks/torch_unet_speed.py --preset tiny --out results/torch_tiny.json
    python benchmarks/torch_unet_speed.py --preset gpu --models sd15 --out results/torch_sd15_h100.json
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata as md
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The configs and presets live in common.py, which imports jax; this script does not use
# it on the device, so keep JAX off the GPU entirely.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(HERE))
import common  # noqa: E402

METHODS = ("none", "tome", "tome_md2")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(common.UNET_PRESETS), default="tiny")
    p.add_argument("--models", nargs="+", help=f"{sorted(common.MODELS)} (with --weights: "
                   "one label for the rows)")
    p.add_argument("--sizes", type=int, nargs="+")
    p.add_argument("--batch", type=int, nargs="+")
    p.add_argument("--methods", nargs="+", choices=METHODS)
    p.add_argument("--ratios", type=float, nargs="+")
    p.add_argument("--dtype", choices=["auto", "fp16", "bf16", "fp32"], default="auto",
                   help="auto: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--weights", help="a diffusers UNet folder instead of random weights")
    p.add_argument("--iters", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--time-budget", type=float, default=None)
    p.add_argument("--out")
    args = p.parse_args(argv)
    preset = common.UNET_PRESETS[args.preset]
    for k in ("ratios", "iters", "warmup", "batch"):
        if getattr(args, k) is None:
            setattr(args, k, preset[k])
    args.models = args.models or (["weights"] if args.weights else preset["models"])
    if args.weights and len(args.models) != 1:
        p.error("--weights loads one UNet: give at most one --models label")
    if not args.weights:
        bad = [m for m in args.models if m not in common.MODELS]
        if bad:
            p.error(f"unknown models {bad}; choose from {sorted(common.MODELS)}")
    args.sizes_for = {m: args.sizes or preset["sizes"].get(m) or
                      common.UNET_PRESETS["gpu"]["sizes"].get(m, [512]) for m in args.models}
    return args


def meta_for(argv, args, torch_available: bool, reason: str | None = None) -> dict:
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "sizes_for")}
    settings["sizes"] = args.sizes_for
    meta = {
        "benchmark": "torch_unet_speed",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": common.command_line(argv, __file__),
        "settings": settings,
        "versions": {"python": platform.python_version()},
    }
    for name in ("torch", "diffusers", "tomesd", "numpy"):
        try:
            meta["versions"][name] = md.version(name)
        except md.PackageNotFoundError:
            meta["versions"][name] = None
    if reason:
        meta["skipped"] = reason
    return meta


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        import diffusers  # noqa: F401
        import tomesd
        import torch
    except ImportError as e:
        reason = f"torch side skipped: {e.name or e} is not installed (needs torch, diffusers, tomesd)"
        print(reason)
        writer = common.ResultWriter(args.out, meta_for(argv, args, False, reason))
        writer.finish()
        return 0
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # no dtype-cast notices between the rows

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = {"auto": torch.float16 if cuda else torch.float32, "fp16": torch.float16,
             "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    meta = meta_for(argv, args, True)
    meta["device"] = {"backend": device.type,
                      "device_kind": torch.cuda.get_device_name(device) if cuda
                      else (platform.processor() or platform.machine()),
                      "platform": platform.platform(), "cpu_count": os.cpu_count()}
    writer = common.ResultWriter(args.out, meta)
    budget = common.Budget(args.time_budget)
    torch.manual_seed(0)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def time_call(fn):
        for _ in range(args.warmup):
            fn()
        sync()
        times = []
        for _ in range(args.iters):
            if cuda:
                start, end = (torch.cuda.Event(enable_timing=True),
                              torch.cuda.Event(enable_timing=True))
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return {"median_ms": statistics.median(times), "p10_ms": common.percentile(times, 10),
                "p90_ms": common.percentile(times, 90), "min_ms": min(times),
                "iters": args.iters, "inner": 1}

    stopped = False
    for model_name in args.models:
        if stopped:
            break
        try:
            if args.weights:
                sub = "unet" if (Path(args.weights) / "unet").is_dir() else None
                unet = UNet2DConditionModel.from_pretrained(args.weights, torch_dtype=dtype,
                                                            subfolder=sub)
                config = dict(unet.config)
                label = (model_name if model_name != "weights"
                         else f"weights:{Path(args.weights).name}")
            else:
                config = common.MODELS[model_name]
                with torch.device(device):  # initialised on the device: fast even for SDXL
                    unet = UNet2DConditionModel(**common.torch_config(config))
                unet = unet.to(dtype)
                label = model_name
            unet = unet.to(device).eval()
        except Exception as e:  # noqa: BLE001
            writer.add(dict(framework="torch", model=model_name, method="none",
                            error=f"could not build the UNet: {common.short_error(e)}"))
            continue
        try:
            from diffusers.models.attention_processor import AttnProcessor2_0
            unet.set_attn_processor(AttnProcessor2_0())
        except Exception:  # noqa: BLE001 - already the default on torch 2
            pass
        cross = config["cross_attention_dim"]
        cross = cross[0] if isinstance(cross, (list, tuple)) else cross
        te = common.text_embeds_dim(config)
        sdxl = common.first_attention_level(config) > 1
        methods = args.methods or [m for m in METHODS if m != "tome_md2" or sdxl]
        methods = ["none"] + [m for m in methods if m != "none"]
        for size in args.sizes_for[model_name]:
            for batch in args.batch:
                g = torch.Generator(device=device).manual_seed(0)
                sample = torch.randn(batch, 4, size // 8, size // 8, generator=g, device=device,
                                     dtype=dtype)
                ehs = torch.randn(batch, common.TEXT_TOKENS, cross, generator=g, device=device,
                                  dtype=dtype)
                t = torch.full((batch,), 500, device=device, dtype=torch.long)
                added = None
                if te is not None:
                    added = {"text_embeds": torch.randn(batch, te, generator=g, device=device,
                                                        dtype=dtype),
                             "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch,
                                                      device=device, dtype=dtype)}

                @torch.inference_mode()
                def call():
                    return unet(sample, t, ehs, added_cond_kwargs=added).sample

                none_ms = None
                for method in methods:
                    for ratio in ([0.0] if method == "none" else args.ratios):
                        if budget.exhausted():
                            stopped = True
                            break
                        md_ = 2 if method == "tome_md2" else 1
                        row = dict(framework="torch", model=label, height=size, width=size,
                                   batch=batch, method=method, ratio=ratio,
                                   max_downsample=None if method == "none" else md_,
                                   dtype=str(dtype).replace("torch.", ""), attention="sdpa",
                                   compile_s=None)
                        try:
                            if method != "none":
                                tomesd.apply_patch(unet, ratio=ratio, max_downsample=md_)
                            if cuda:
                                torch.cuda.reset_peak_memory_stats(device)
                            t0 = time.perf_counter()
                            call()
                            sync()
                            row["first_call_s"] = time.perf_counter() - t0
                            row.update(time_call(call))
                            row["peak_gb"] = (torch.cuda.max_memory_allocated(device) / 1e9
                                              if cuda else None)
                        except Exception as e:  # noqa: BLE001 - e.g. out of memory
                            row.update(median_ms=None, error=common.short_error(e))
                        finally:
                            if method != "none":
                                tomesd.remove_patch(unet)
                        if method == "none":
                            none_ms = row.get("median_ms")
                        if none_ms and row.get("median_ms"):
                            row["speedup"] = none_ms / row["median_ms"]
                        writer.add(row)
                        print(f"torch {label} {size}px b{batch} {method} {ratio:.2f}: "
                              f"{common.fmt_ms(row.get('median_ms'))} ms"
                              + (f" ERROR {row['error']}" if row.get("error") else ""),
                              flush=True)
                    if stopped:
                        break
                if stopped:
                    break
        del unet
        if cuda:
            torch.cuda.empty_cache()
    writer.finish(stopped_by_budget=stopped)
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
