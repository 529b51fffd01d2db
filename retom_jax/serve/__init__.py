"""``retom-jax serve``: an HTTP server over one loaded, compiled pipeline (AUTOMATIC1111-
compatible and native endpoints, request batching, a web page). Needs the ``serve`` extra
(``pip install retom-jax[serve]``: fastapi, uvicorn, pydantic); importing this package
does not (its names load on first use), so the command line works without it."""
import importlib

_NAMES = {"create_app": "app", "TOKEN_ENV": "app", "Batcher": "batching", "Job": "batching",
          "Engine": "engine", "initial_noise": "engine", "BackgroundServer": "run",
          "serve_in_background": "run"}

__all__ = sorted(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
