"""Throughput of ``retom-jax serve`` on the demo model: one client sending one request at a
time (every call a batch of 1) against 32 concurrent clients (calls batched up to 8), and
the loopback load test's latency figures.

    python benchmarks/serve_throughput.py --steps 20 --out serve.json

The server runs in this process (uvicorn in a thread, 127.0.0.1); every bucket's program
is compiled before anything is timed. Nothing here asserts a speed.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sequential", type=int, default=24, help="requests sent one at a time")
    p.add_argument("--requests", type=int, default=300, help="requests of the load test")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait", type=float, default=0.05)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    import jax
    import retom_jax as rj
    from retom_jax.serve import create_app, serve_in_background
    from retom_jax.serve.loadtest import load_test, one_at_a_time

    pipe = rj.load_pipeline("demo")
    buckets = tuple(b for b in (1, 2, 4, 8, 16, 32) if b <= a.max_batch)
    app = create_app(pipe, buckets=buckets, max_batch=a.max_batch, max_wait=a.max_wait,
                     default_steps=a.steps)
    t0 = time.perf_counter()
    app.state.engine.warmup()
    compile_s = time.perf_counter() - t0
    srv = serve_in_background(app)
    try:
        one_at_a_time(srv.url, 2, steps=a.steps)  # warm
        seq = one_at_a_time(srv.url, a.sequential, steps=a.steps)
        calls0 = app.state.batcher.calls
        load = load_test(srv.url, a.requests, a.clients, steps=a.steps, time_limit=1800)
        calls = app.state.batcher.calls - calls0
    finally:
        srv.stop()
    out = {"command": "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
           "device": str(jax.devices()[0]), "cpu_count": __import__("os").cpu_count(),
           "platform": platform.platform(), "steps": a.steps, "size": pipe.default_size,
           "compile_s": compile_s, "one_at_a_time_rps": seq,
           "batched_rps": load["throughput_rps"], "speedup": load["throughput_rps"] / seq,
           "mean_batch": a.requests / calls if calls else None, "load_test": load}
    text = json.dumps(out, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
