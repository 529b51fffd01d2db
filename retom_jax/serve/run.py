"""Running the app: in the foreground with uvicorn (``retom-jax serve``; SIGTERM / Ctrl-C
finish the requests in flight, then stop), or in a background thread of this process
(``serve_in_background``: notebooks, tests)."""
from __future__ import annotations

import socket
import threading
import time

__all__ = ["BackgroundServer", "serve_in_background", "serve_forever", "free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    """A uvicorn server on ``host:port`` in a daemon thread; ``url``, ``stop()``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None,
                 log_level: str = "warning"):
        import uvicorn

        self.app, self.host = app, host
        self.port = port or free_port(host)
        config = uvicorn.Config(app, host=host, port=self.port, log_level=log_level,
                                lifespan="on", timeout_graceful_shutdown=None)
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # not the main thread
        self.thread = threading.Thread(target=self.server.run, name="retom-jax-serve",
                                       daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Stop listening, finish the requests in flight, drain the batcher."""
        self.server.should_exit = True
        self.thread.join(timeout)


def serve_in_background(app_or_pipe, host: str = "127.0.0.1", port: int | None = None,
                        **app_options) -> BackgroundServer:
    """Serve an app (or a pipeline: ``create_app(pipe, **app_options)``) from a thread of
    this process; returns the started ``BackgroundServer``."""
    from .app import create_app

    app = app_or_pipe
    if not hasattr(app, "router"):  # a pipeline
        app = create_app(app_or_pipe, **app_options)
    return BackgroundServer(app, host, port).start()


def serve_forever(app, host: str = "127.0.0.1", port: int = 7860,
                  log_level: str = "info") -> None:
    """uvicorn in the foreground (its SIGTERM / SIGINT handling: stop accepting, finish
    the requests in flight, run the app's shutdown, which drains the batcher)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, lifespan="on")
