"""Does a compiled program fit the device's memory? Checked before the program runs.

XLA's ``compiled.memory_analysis()`` gives what a program allocates besides its
arguments (temporaries and outputs); the arguments (the weights, the latents) are on the
device already. That is compared with the device's free memory (an accelerator's
``memory_stats()``; on the CPU the machine's available RAM), and a program that cannot
fit is refused with one line saying what would fit, instead of running into an
out-of-memory error after a long wait. ``RETOM_JAX_MEMORY_CHECK=0`` turns the check off
(for example where swap or unified memory makes more room than reported).
"""
from __future__ import annotations

import math
import os

__all__ = ["available_bytes", "program_bytes", "check_fits", "format_bytes"]


def available_bytes(device) -> int | None:
    """Free memory of ``device`` in bytes, or None when it cannot be told."""
    if device.platform != "cpu":
        try:
            stats = device.memory_stats() or {}
        except Exception:  # noqa: BLE001 - a backend without memory stats
            return None
        limit = stats.get("bytes_limit")
        if not limit:
            return None
        return int(limit) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def program_bytes(compiled) -> int | None:
    """Bytes a compiled program allocates when it runs (temporaries and outputs, less
    outputs that reuse argument buffers), or None without a memory analysis."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if m is None:
        return None
    return int(m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def check_fits(compiled, device, *, batch: int, height: int, width: int,
               multiple: int = 8) -> None:
    """ValueError (one line) if ``compiled`` (a sampling program for ``batch`` images of
    ``height`` x ``width`` pixels) needs more memory than ``device`` has free.

    The message gives a size and an image count that fit. Memory grows at least linearly
    with the pixel count and the batch (attention without flash grows faster), so scaling
    both down linearly gives sizes that are sure to fit, if not the largest."""
    if os.environ.get("RETOM_JAX_MEMORY_CHECK", "1") == "0":
        return
    need = program_bytes(compiled)
    free = available_bytes(device)
    if not need or free is None or need <= free:
        return
    share = max(free, 0) / need
    side = math.sqrt(share)
    h = int(height * side) // multiple * multiple
    w = int(width * side) // multiple * multiple
    size = (f"at most {h}x{w} fits for {batch} image(s)" if h >= multiple and w >= multiple
            else f"no size fits for {batch} image(s)")
    fewer = int(batch * share)
    count = f", or {fewer} image(s) at {height}x{width}" if 1 <= fewer < batch else ""
    where = "RAM" if device.platform == "cpu" else "memory"
    raise ValueError(
        f"{batch} image(s) at {height}x{width} need {format_bytes(need)} to sample but "
        f"the {device.platform.upper()} has {format_bytes(max(free, 0))} of free {where}: "
        f"{size}{count} (estimated from XLA's memory analysis; RETOM_JAX_MEMORY_CHECK=0 "
        f"skips the check)")
