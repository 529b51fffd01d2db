"""One progress line on stderr, for sampling steps, training steps and evaluation images."""
from __future__ import annotations

import sys
import time


def clock(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``."""
    h, rest = divmod(int(round(seconds)), 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """``desc [####....] n/total loss L  r steps/s  elapsed ETA  what``.

    ``update(loss=, what=)`` after each unit of work (``loss``: shown as a running mean).
    On a terminal the line is redrawn at most every ``every`` seconds; elsewhere (a log
    file) a line is written at most every ``max(every, 10)`` seconds; ``every=0`` writes a
    line at every update. The last update always writes.
    """

    def __init__(self, total: int, start: int = 0, desc: str = "", stream=None,
                 every: float = 0.5, unit: str = "steps"):
        self.total, self.n, self.n0, self.desc, self.unit = total, start, start, desc, unit
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = max(every, 10.0) if every and not self.tty else every
        self.t0, self.last, self.loss = time.perf_counter(), 0.0, None

    @property
    def steps_per_second(self) -> float:
        return (self.n - self.n0) / max(time.perf_counter() - self.t0, 1e-9)

    def update(self, loss: float | None = None, n: int = 1, what: str = "") -> None:
        self.n += n
        if loss is not None:
            self.loss = loss if self.loss is None else 0.9 * self.loss + 0.1 * loss
        now = time.perf_counter()
        if now - self.last < self.every and self.n < self.total:
            return
        self.last = now
        elapsed, done = now - self.t0, self.n - self.n0
        eta = elapsed / done * (self.total - self.n) if done else 0.0
        filled = int(24 * self.n / max(self.total, 1))
        parts = [f"{self.desc} " if self.desc else "",
                 f"[{'#' * filled}{'.' * (24 - filled)}] {self.n}/{self.total}",
                 f" loss {self.loss:.4f}" if self.loss is not None else "",
                 f" {done / max(elapsed, 1e-9):.2f} {self.unit}/s" if self.unit else "",
                 f" elapsed {clock(elapsed)} ETA {clock(eta)}", f" {what}" if what else ""]
        self.stream.write(("\r" if self.tty else "") + "".join(parts) + ("" if self.tty else "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()
