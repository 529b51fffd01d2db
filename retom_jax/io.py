"""Writing the files a command makes: atomically, never over a file it was not asked to
replace, and with one line when the disk is full.

Every write goes to a temporary file in the destination's own folder (same file system),
is flushed to disk, then renamed into place (``os.replace``): a reader, or a crash, sees
the old file or the new one, never a fragment. With ``overwrite=False`` the rename is a
hard link that fails if the name exists (no window between a check and the write).
A failed write (disk full, permissions, a read-only file system) removes the temporary
file and raises :class:`OutputError` naming the file; an existing file is left as it was.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["OutputError", "atomic_write", "write_bytes", "write_text", "write_json",
           "save_image", "check_output_file"]


class OutputError(ValueError):
    """A file a command was asked to write cannot be written (one line)."""


def _why(e: OSError) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full"
    return e.strerror or str(e)


def check_output_file(path, overwrite: bool = False, what: str = "--out") -> Path:
    """``path`` as a file that may be written: not a folder, its folder a folder (or
    makeable), and not an existing file unless ``overwrite``. Checked before any work."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {str(path)!r} is a folder: name a file in it")
    if path.exists() and not overwrite:
        raise OutputError(f"{what} {str(path)!r} exists: pass --overwrite to replace it, or "
                          f"name another file")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"{what} {str(path)!r}: {str(folder)!r} is a file, not a folder")
    return path


def atomic_write(path, write: Callable, overwrite: bool = True) -> Path:
    """Write ``path`` through ``write(file)`` (a binary file object) atomically; see the
    module's docstring. Makes the missing parent folders."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot make the folder of {path}: {_why(e)}") from None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if the name exists: no check-then-write race
            except FileExistsError:
                raise OutputError(f"{path} exists (made while this command ran): pass "
                                  f"--overwrite to replace it") from None
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV):
                    raise
                if path.exists():  # a file system without hard links
                    raise OutputError(f"{path} exists: pass --overwrite to replace it") from None
                os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {_why(e)} (an existing file there is "
                          f"unchanged)") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_bytes(path, data: bytes, overwrite: bool = True) -> Path:
    return atomic_write(path, lambda f: f.write(data), overwrite)


def write_text(path, text: str, overwrite: bool = True) -> Path:
    return write_bytes(path, text.encode("utf-8"), overwrite)


def write_json(path, value, overwrite: bool = True, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(value, indent=indent) + "\n", overwrite)


def save_image(image, path, overwrite: bool = True, format: str | None = None) -> Path:
    """A PIL image written atomically; the format from the file name unless given."""
    from PIL import Image

    path = Path(path)
    fmt = format or Image.registered_extensions().get(path.suffix.lower()) or "PNG"
    return atomic_write(path, lambda f: image.save(f, format=fmt), overwrite)
