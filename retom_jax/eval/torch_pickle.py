"""Reading a PyTorch ``torch.save`` file of tensors without torch, and without running
code from the file.

Both of torch's formats are read: the zip archive (torch >= 1.6: ``<name>/data.pkl`` and
one ``<name>/data/<key>`` file per storage) and the legacy stream (a magic number, the
protocol version, system info, the pickled object, the storage keys, then each storage's
element count and bytes). The pickle goes through a restricted unpickler, in the spirit of
``torch.load(weights_only=True)``: the only globals it resolves are the tensor rebuild
functions, the typed storage classes and ``collections.OrderedDict``; the object may hold
those and plain containers. Any other global is an error that names it, never an import.

Hostile files are refused in bounded time and memory: every storage must fit in the file
(a zip member is read only up to the bytes its tensors need, and a member whose declared
size is far beyond its compressed size, a zip bomb, is refused before decompressing), the
tensors together may not hold more than twice their storages' elements, and the object is
checked and copied visiting each shared container once (a pickle that nests ``a = [a, a]``
50 deep holds 51 lists, not 2**50), at most 64 levels deep and without cycles.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np

__all__ = ["TorchFileError", "load_torch_file"]

# torch.<Name>Storage -> element dtype
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
MAX_PICKLE_BYTES = 64 << 20  # the data.pkl of a zip archive (the object, not the tensors)
MAX_RATIO = 64  # declared / compressed size of a zip member beyond which it is a bomb
MAX_NODES = 1_000_000  # containers and items the plain-data check visits


class TorchFileError(ValueError):
    """A PyTorch file that is not a plain file of tensors, or is corrupt (one line)."""

    def __init__(self, message="", *args):
        super().__init__(" ".join(str(message).splitlines())[:600], *args)


class _StorageType:
    """Stands in for ``torch.FloatStorage`` etc.: only its element dtype matters."""

    def __init__(self, name: str):
        self.name, self.dtype = name, np.dtype(STORAGE_DTYPES[name])

    def __repr__(self):
        return f"torch.{self.name}"


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    """The NumPy view a tensor's (storage, offset, size, stride) describes."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise TorchFileError("a tensor refers to something that is not a storage")
    try:
        offset = int(storage_offset)
        size = tuple(int(s) for s in size)
        stride = tuple(int(s) for s in stride)
    except (TypeError, ValueError):
        raise TorchFileError("a tensor has a malformed offset, size or stride") from None
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride):
        raise TorchFileError(f"a tensor has a malformed layout: offset {offset}, size "
                             f"{list(size)}, stride {list(stride)}")
    if any(s == 0 for s in size):
        return np.zeros(size, storage.dtype)
    if int(np.prod(size, dtype=object)) > storage.size:
        raise TorchFileError(f"a tensor of size {list(size)} has more elements than its "
                             f"storage ({storage.size}): not a saved tensor")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise TorchFileError(f"a tensor of size {list(size)} reaches element {last} of a "
                             f"storage of {storage.size}: the file is corrupt")
    item = storage.dtype.itemsize
    return np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                           strides=[s * item for s in stride], writeable=False)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    if not isinstance(data, np.ndarray):
        raise TorchFileError("a parameter does not hold a tensor")
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, load_storage):
        super().__init__(file)
        self._load_storage = load_storage

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise TorchFileError(f"the file asks for {module}.{name}, which a file of tensors "
                             f"does not need; refusing to load it (only tensors, storages "
                             f"and plain containers are read)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise TorchFileError(f"unexpected persistent id {str(pid)[:80]}: not a storage")
        _, kind, key, _location, numel = pid[:5]
        if not isinstance(numel, int) or numel < 0:
            raise TorchFileError(f"storage {key!r} has a malformed element count {numel!r}")
        return self._load_storage(kind.dtype, str(key), numel)


def _unpickle(data, load_storage):
    try:
        return _Unpickler(data if hasattr(data, "read") else io.BytesIO(data), load_storage).load()
    except TorchFileError:
        raise
    except Exception as e:  # malformed pickle stream: one line, no traceback from inside
        raise TorchFileError(f"the pickle in it is malformed ({type(e).__name__}: {e})") from None


def _check_plain(obj, path):
    """Only arrays, numbers, strings, None and containers of them; each shared container
    visited once, no cycles, at most 64 levels and `MAX_NODES` items, and the arrays
    together at most twice the elements of the storages they view (or 1M elements)."""
    done, active = set(), set()
    count = [0, 0]  # items visited, array elements
    storages = {}

    def visit(o, depth):
        count[0] += 1
        if count[0] > MAX_NODES:
            raise TorchFileError(f"{path}: holds more than {MAX_NODES} objects: not a "
                                 f"file of tensors")
        if isinstance(o, np.ndarray):
            if id(o) not in done:
                done.add(id(o))
                base = o.base if o.base is not None else o
                while getattr(base, "base", None) is not None:
                    base = base.base
                storages[id(base)] = getattr(base, "size", o.size)
                count[1] += o.size
            return
        if isinstance(o, (int, float, bool, str, bytes, type(None))):
            return
        if not isinstance(o, (dict, list, tuple)):
            raise TorchFileError(f"{path} holds a {type(o).__name__}, not tensors and plain "
                                 f"containers")
        if id(o) in done:
            return
        if id(o) in active:
            raise TorchFileError(f"{path}: a container holds itself: not a file of tensors")
        if depth > 64:
            raise TorchFileError(f"{path}: nested too deeply")
        active.add(id(o))
        for v in (x for kv in o.items() for x in kv) if isinstance(o, dict) else o:
            visit(v, depth + 1)
        active.discard(id(o))
        done.add(id(o))

    visit(obj, 0)
    limit = 2 * sum(storages.values()) + (1 << 20)
    if count[1] > limit:
        raise TorchFileError(f"{path}: its tensors hold {count[1]} elements, more than "
                             f"twice their storages' {sum(storages.values())}: refusing to "
                             f"copy them")


def _read_member(z, info, size: int, path, what: str) -> bytes:
    """``size`` bytes of a zip member, refusing a zip bomb before decompressing."""
    if info.file_size < size:
        raise TorchFileError(f"{path} is corrupt: {what} has {info.file_size} bytes, "
                             f"{size} expected")
    if info.file_size > MAX_RATIO * info.compress_size + (1 << 20):
        raise TorchFileError(f"{path}: {what} claims {info.file_size} bytes from "
                             f"{info.compress_size} compressed: a zip bomb, refused")
    with z.open(info) as f:
        raw = f.read(size)
    if len(raw) != size:
        raise TorchFileError(f"{path} is truncated in {what}")
    return raw


def _load_zip(path: Path):
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise TorchFileError(f"{path} is a zip file but not a torch.save archive "
                                 f"(no <name>/data.pkl)")
        root = pkl[0].rsplit("/", 1)[0]
        order = "little"
        if f"{root}/byteorder" in names:
            info = z.getinfo(f"{root}/byteorder")
            order = _read_member(z, info, min(info.file_size, 16), path, "byteorder")
            order = order.decode(errors="replace").strip()
        cache = {}
        budget = [sum(i.file_size for i in z.infolist())]

        def storage(dtype, key, numel):
            if key not in cache:
                member = f"{root}/data/{key}"
                if member not in names:
                    raise TorchFileError(f"{path} is corrupt: storage {key!r} is missing")
                size = numel * dtype.itemsize
                if size > budget[0]:
                    raise TorchFileError(f"{path} is corrupt: its storages need more bytes "
                                         f"than the archive holds")
                budget[0] -= size
                raw = _read_member(z, z.getinfo(member), size, path, f"storage {key!r}")
                array = np.frombuffer(raw, dtype.newbyteorder("<" if order == "little" else ">"),
                                      count=numel)
                cache[key] = array.astype(dtype)
            return cache[key]

        info = z.getinfo(pkl[0])
        if info.file_size > MAX_PICKLE_BYTES:
            raise TorchFileError(f"{path}: its data.pkl claims {info.file_size} bytes, more "
                                 f"than a file of tensors needs ({MAX_PICKLE_BYTES})")
        return _unpickle(_read_member(z, info, info.file_size, path, "data.pkl"), storage)


def _load_legacy(path: Path):
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        if _unpickle(f, None) != _LEGACY_MAGIC:
            raise TorchFileError(f"{path} is neither a torch.save zip archive nor a legacy "
                                 f"torch.save file")
        if _unpickle(f, None) != _LEGACY_PROTOCOL:
            raise TorchFileError(f"{path}: unsupported legacy torch.save protocol")
        info = _unpickle(f, None)
        little = not isinstance(info, dict) or info.get("little_endian", True)
        storages = {}

        def storage(dtype, key, numel):
            # The bytes come after the object: tensors are views of arrays filled below.
            if key not in storages:
                if numel * dtype.itemsize > file_size:
                    raise TorchFileError(f"storage {key!r} claims {numel} elements, more "
                                         f"than the file's {file_size} bytes hold")
                storages[key] = np.zeros(numel, dtype)
            return storages[key]

        obj = _unpickle(f, storage)
        keys = _unpickle(f, None)
        if not isinstance(keys, list):
            raise TorchFileError(f"{path} is corrupt: no storage key list")
        for key in keys:
            head = f.read(8)
            if len(head) != 8:
                raise TorchFileError(f"{path} is truncated before storage {key!r}")
            (numel,) = struct.unpack("<q" if little else ">q", head)
            target = storages.get(str(key))
            if target is None or numel != target.size:
                raise TorchFileError(f"{path} is corrupt: storage {key!r} does not match "
                                     f"the tensors that use it")
            raw = f.read(numel * target.dtype.itemsize)
            if len(raw) != numel * target.dtype.itemsize:
                raise TorchFileError(f"{path} is truncated in storage {key!r}")
            target[...] = np.frombuffer(raw, target.dtype.newbyteorder("<" if little else ">"))
    return obj


def _copies(obj, memo=None):
    """The object with every array a contiguous copy (tensors are views until here); a
    shared container or array stays shared (one copy)."""
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, np.ndarray):
        out = np.array(obj)
    elif isinstance(obj, dict):
        out = type(obj)((_copies(k, memo), _copies(v, memo)) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        out = type(obj)(_copies(v, memo) for v in obj)
    else:
        return obj
    memo[id(obj)] = out
    return out


def load_torch_file(path):
    """The object in a ``torch.save`` file, tensors as NumPy arrays; ``TorchFileError``
    (one line) for anything but tensors, storages and plain containers."""
    path = Path(path)
    if not path.is_file():
        raise TorchFileError(f"file not found: {path}")
    if zipfile.is_zipfile(path):
        try:
            obj = _load_zip(path)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError,
                NotImplementedError, RuntimeError) as e:
            raise TorchFileError(f"{path} is a corrupt zip archive ({type(e).__name__}: "
                                 f"{str(e)[:200]})") from None
    else:
        try:
            obj = _load_legacy(path)
        except TorchFileError as e:
            msg = str(e)
            raise TorchFileError(msg if str(path) in msg else f"{path}: {msg}") from None
    _check_plain(obj, str(path))
    return _copies(obj)
