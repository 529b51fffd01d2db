"""The HTTP application of ``retom-jax serve`` (FastAPI on uvicorn).

Why FastAPI + uvicorn: a standard ASGI stack, so the event loop answers health checks,
job polls and bad requests while the model runs in the batcher's thread; pydantic checks
the request types and FastAPI writes the OpenAPI page (``/docs``) from the same models;
uvicorn handles SIGTERM gracefully (stops listening, finishes the requests in flight,
then runs the shutdown hook that drains the batcher). Gradio would add a large dependency
and its own queue in front of ours; one HTML file served by the same process works in a
browser, behind Colab's port proxy and in tests.

Endpoints: ``GET /`` (the page), ``GET /health``, ``POST /sdapi/v1/txt2img``,
``POST /sdapi/v1/img2img``, ``GET /sdapi/v1/samplers`` (AUTOMATIC1111 API),
``POST /retom/v1/generate`` (native, waits for the images), ``POST /retom/v1/jobs`` +
``GET /retom/v1/jobs/{id}`` (the same, polled with progress: what the page uses),
``/docs`` and ``/openapi.json``.
"""
from __future__ import annotations

import asyncio
import collections
import hmac
import json
import os
import time
from importlib import resources

from .batching import Batcher, Job, ShuttingDown
from .engine import Engine, encode_result
from .schemas import (GenerateRequest, GenerateResponse, ImagesResponse, Img2ImgRequest,
                      Limits, RequestError, Txt2ImgRequest)

__all__ = ["create_app", "TOKEN_ENV"]

TOKEN_ENV = "RETOM_JAX_SERVE_TOKEN"
OPEN_PATHS = {"/", "/health", "/docs", "/openapi.json", "/docs/oauth2-redirect"}
KEEP_JOBS = 256


def _json_response(status: int, message: str, headers=None, **extra):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


class Guard:
    """ASGI middleware in front of the app: the bearer token (401), the body limit (413,
    read before the app sees the body) and the refusal of new requests while stopping
    (503)."""

    def __init__(self, app, state):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        token = self.state.token
        if token and path not in OPEN_PATHS:
            headers = dict(scope["headers"])
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return await _json_response(
                    401, "missing or wrong bearer token (Authorization: Bearer TOKEN)",
                    {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        if self.state.stopping and path != "/health":
            return await _json_response(503, "the server is shutting down")(scope, receive,
                                                                                send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = self.state.limits.max_body_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _json_response(413, f"request body over {limit} bytes")(
                scope, receive, send)
        body, more = [], True
        size = 0
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await _json_response(413, f"request body over {limit} bytes")(
                    scope, receive, send)
            body.append(chunk)
            more = message.get("more_body", False)
        data, sent = b"".join(body), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def create_app(pipe, *, token: str | None = None, max_batch: int | None = None,
               max_wait: float = 0.05, buckets=(1, 2, 4, 8), limits: Limits = Limits(),
               default_steps: int = 20, merge=None, loras=(), step_cache=None,
               model_name: str = "",
               warmup: bool = False):
    """The ASGI app serving ``pipe`` (a loaded pipeline). ``token`` (or the environment
    variable ``RETOM_JAX_SERVE_TOKEN``): the bearer token every API call must carry.
    Requests are batched up to ``max_batch`` images (default: the largest bucket) and
    ``max_wait`` seconds; ``buckets``: the batch sizes compiled (a call is padded to the
    next one); ``limits``: the ranges a request may ask for; ``loras``: ``(file, scale)``
    fused at start (a request's ``lora_scale`` multiplies the scales); ``merge``: the merge
    config of requests that name none (every A1111 request); ``warmup``: compile
    the default settings' programs now. ``app.state.engine`` / ``.batcher`` expose them."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException

    buckets = tuple(buckets)
    if max_batch is not None:
        buckets = tuple(b for b in buckets if b < max_batch) + (max_batch,)
    engine = Engine(pipe, limits=limits, buckets=buckets, default_steps=default_steps,
                    loras=loras, step_cache=step_cache, merge=merge)
    if warmup:
        engine.warmup()
    batcher = Batcher(engine.run, engine.max_batch, max_wait, engine.estimate)
    jobs: collections.OrderedDict = collections.OrderedDict()

    async def lifespan(app):
        yield
        app.state.stopping = True  # uvicorn has finished the requests in flight
        await asyncio.to_thread(batcher.close, True)

    app = FastAPI(title="retom-jax serve", version="0.1.0", lifespan=lifespan,
                  description="Stable Diffusion in JAX with token merging: AUTOMATIC1111-"
                              "compatible and native endpoints over one compiled pipeline, "
                              "with request batching.")
    app.state.engine, app.state.batcher, app.state.jobs = engine, batcher, jobs
    app.state.token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
    app.state.limits, app.state.stopping = limits, False
    app.state.model_name = model_name
    app.add_middleware(Guard, state=app.state)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _json_response(400, "the body is not valid JSON")
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
        return _json_response(422, f"{where}: {first.get('msg', 'invalid')}",
                              detail=json.loads(json.dumps(errors, default=str)))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return _json_response(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestError)
    async def request_error(request, exc):
        return _json_response(exc.status, str(exc))

    async def answer(job: Job):
        try:
            batcher.submit(job)
        except ShuttingDown as e:
            raise RequestError(str(e), 503) from None
        try:
            result = await asyncio.wrap_future(job.future)
        except ShuttingDown as e:
            raise RequestError(str(e), 503) from None
        except ValueError as e:
            raise RequestError(f"the pipeline refused the request: {e}") from None
        except Exception as e:  # noqa: BLE001 - fails this request only
            raise RequestError(f"the model failed on this request: {type(e).__name__}: "
                               f"{e}", 500) from None
        return await asyncio.to_thread(encode_result, result)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return (resources.files(__package__) / "static" / "index.html").read_text("utf-8")

    @app.get("/health")
    async def health():
        """Liveness and what the server serves (open without the token)."""
        return {"status": "stopping" if app.state.stopping else "ok",
                "model": app.state.model_name, "pipeline": type(pipe).__name__,
                "auth": bool(app.state.token), "queued": len(batcher.pending),
                "completed": batcher.completed, "calls": batcher.calls,
                "max_batch": engine.max_batch, "buckets": list(engine.buckets),
                "max_wait_s": batcher.max_wait,
                "defaults": {"steps": engine.default_steps,
                             "width": engine.default_size[1],
                             "height": engine.default_size[0],
                             "guidance_scale": engine.default_guidance},
                "limits": {"max_side": limits.max_side, "max_steps": limits.max_steps,
                           "max_images": min(limits.max_images, engine.max_batch),
                           "max_body_bytes": limits.max_body_bytes},
                "merge": "none" if engine.merge is None else repr(engine.merge),
                "loras": [f for f, _ in engine.loras]}

    def a1111_answer(request, images, info):
        return ImagesResponse(images=images, parameters=request.model_dump(
            exclude={"init_images"}), info=json.dumps(info))

    @app.post("/sdapi/v1/txt2img", response_model=ImagesResponse)
    async def txt2img(request: Txt2ImgRequest):
        """AUTOMATIC1111's txt2img: image i of the request uses seed + i."""
        job, info = engine.from_a1111(request, img2img=False)
        images, _ = await answer(job)
        return a1111_answer(request, images, info)

    @app.post("/sdapi/v1/img2img", response_model=ImagesResponse)
    async def img2img(request: Img2ImgRequest):
        """AUTOMATIC1111's img2img (init_images, denoising_strength); runs alone."""
        job, info = await asyncio.to_thread(engine.from_a1111, request, True)
        images, _ = await answer(job)
        return a1111_answer(request, images, info)

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return [{"name": n, "aliases": [], "options": {}}
                for n in ("DDIM", "PLMS", "Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras")]

    @app.post("/retom/v1/generate", response_model=GenerateResponse)
    async def generate(request: GenerateRequest):
        """Every retom-jax option; waits for the images (and the merge map if asked)."""
        t0 = time.perf_counter()
        job, info = await asyncio.to_thread(engine.from_native, request)
        images, picture = await answer(job)
        return GenerateResponse(images=images, seeds=info["seeds"], merge_map=picture,
                                info=info, seconds=round(time.perf_counter() - t0, 4))

    @app.post("/retom/v1/jobs", status_code=202)
    async def submit(request: GenerateRequest):
        """Queue a native request; poll ``GET /retom/v1/jobs/{id}``."""
        job, info = await asyncio.to_thread(engine.from_native, request)
        entry = {"job": job, "info": info, "task": asyncio.ensure_future(answer(job)),
                 "t0": time.perf_counter()}
        jobs[job.id] = entry
        while len(jobs) > KEEP_JOBS:
            jobs.popitem(last=False)
        return {"id": job.id, "state": job.state}

    @app.get("/retom/v1/jobs/{job_id}")
    async def status(job_id: str):
        """``state`` queued / running / done / failed; ``progress`` in [0, 1] while it
        runs (elapsed over the duration of the last call with these settings; null before
        one ran); the images once done."""
        entry = jobs.get(job_id)
        if entry is None:
            raise RequestError(f"no job {job_id!r} (finished jobs are kept for the last "
                               f"{KEEP_JOBS})", 404)
        job, task = entry["job"], entry["task"]
        out = {"id": job_id, "state": job.state, "queue_position": None, "progress": None,
               "info": entry["info"]}
        if job.state == "queued":
            out["queue_position"] = batcher.queue_position(job)
        elif job.state == "running" and job.expected_s:
            out["progress"] = min(0.99, (time.monotonic() - job.started) / job.expected_s)
        if task.done():
            if task.exception() is not None:
                e = task.exception()
                out.update(state="failed", error=str(e),
                           status=getattr(e, "status", 500))
            else:
                images, picture = task.result()
                out.update(state="done", progress=1.0, images=images, merge_map=picture,
                           seconds=round((job.finished or time.monotonic()) - job.created, 4))
        elif job.state in ("done", "failed"):
            out["state"] = "running"  # the PNGs are being written
        return out

    return app
