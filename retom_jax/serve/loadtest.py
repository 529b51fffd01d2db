"""A load test of a running server, on loopback: ``requests`` txt2img requests from
``clients`` concurrent clients, each with its own seed, bounded in time. Every answer is
checked to be the request's own (its ``all_seeds``), none lost, none answered twice
(the server's own count of answered jobs grows by exactly ``requests``).

``python -m retom_jax.serve.loadtest http://127.0.0.1:7860 --requests 300 --clients 32``
prints the figures as JSON (p50 / p99 latency, throughput).
"""
from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time

__all__ = ["load_test", "one_at_a_time", "main"]


def _client(url, token, timeout):
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url, headers=headers, timeout=timeout)


def load_test(url: str, requests: int = 300, clients: int = 32, *, steps: int = 2,
              prompt: str = "a red circle on a blue background", token: str | None = None,
              time_limit: float = 300.0, first_seed: int = 1000) -> dict:
    """Run the load test; returns the figures and the failures (a dict)."""
    if not url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
        raise ValueError(f"the load test runs on loopback only, got {url}")
    todo: queue.Queue = queue.Queue()
    for i in range(requests):
        todo.put(first_seed + i)
    answers: dict = {}
    errors: list = []
    latencies: list = []
    lock = threading.Lock()
    deadline = time.monotonic() + time_limit
    with _client(url, token, time_limit) as c:
        before = c.get("/health").json()["completed"]

    def work():
        with _client(url, token, time_limit) as c:
            while time.monotonic() < deadline:
                try:
                    seed = todo.get_nowait()
                except queue.Empty:
                    return
                t0 = time.perf_counter()
                try:
                    r = c.post("/sdapi/v1/txt2img", json={"prompt": prompt, "seed": seed,
                                                          "steps": steps})
                    dt = time.perf_counter() - t0
                    if r.status_code != 200:
                        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
                    got = json.loads(r.json()["info"])["all_seeds"]
                except Exception as e:  # noqa: BLE001 - counted as a failure
                    with lock:
                        errors.append(f"seed {seed}: {type(e).__name__}: {e}")
                    continue
                with lock:
                    latencies.append(dt)
                    answers.setdefault(seed, []).append(got)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=work) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    with _client(url, token, time_limit) as c:
        health = c.get("/health").json()
    wrong = [s for s, got in answers.items() if got != [[s]]]
    latencies.sort()

    def pct(p):
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else None

    return {"requests": requests, "clients": clients, "steps": steps,
            "answered": len(latencies), "lost": requests - len(answers) - len(errors),
            "errors": errors[:10], "error_count": len(errors), "wrong_or_twice": wrong,
            "server_answered": health["completed"] - before, "server_calls": health["calls"],
            "p50_s": pct(0.50), "p99_s": pct(0.99), "wall_s": wall,
            "throughput_rps": len(latencies) / wall if wall else None}


def one_at_a_time(url: str, requests: int = 16, *, steps: int = 2, token=None,
                  prompt: str = "a red circle on a blue background") -> float:
    """Requests per second with one client sending one request at a time."""
    with _client(url, token, 300) as c:
        t0 = time.perf_counter()
        for i in range(requests):
            r = c.post("/sdapi/v1/txt2img", json={"prompt": prompt, "seed": i, "steps": steps})
            r.raise_for_status()
        return requests / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m retom_jax.serve.loadtest",
                                description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--token", default=None)
    p.add_argument("--time-limit", type=float, default=300.0)
    a = p.parse_args(argv)
    out = load_test(a.url, a.requests, a.clients, steps=a.steps, token=a.token,
                    time_limit=a.time_limit)
    print(json.dumps(out, indent=1))
    return 0 if not out["errors"] and not out["lost"] and not out["wrong_or_twice"] else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
