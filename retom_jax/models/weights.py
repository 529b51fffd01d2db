"""Reading diffusers/transformers checkpoint folders into Flax NNX modules, without torch.

A checkpoint folder holds ``config.json`` and safetensors weights named
``{stem}.safetensors`` (``stem`` is ``diffusion_pytorch_model`` for diffusers, ``model``
for transformers), optionally as a ``.fp16`` variant or sharded behind
``{stem}.safetensors.index.json``.

Our modules name their submodules exactly as the PyTorch models do, so a parameter path
such as ``('down_blocks', 0, 'resnets', 1, 'conv1', 'kernel')`` maps to the PyTorch key
``down_blocks.0.resnets.1.conv1.weight`` through the short table ``RENAME`` below and a
transpose of matrix and convolution kernels. Any missing, unexpected or wrongly shaped key
is an error that names it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes  # registers bfloat16 with NumPy, which safetensors' NumPy reader needs
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

# Flax parameter name -> PyTorch parameter name.
RENAME = {"kernel": "weight", "scale": "weight", "embedding": "weight"}

ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64,
    "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}


def one_line(text, limit: int = 600) -> str:
    """``text`` on one line (line breaks as spaces), at most ``limit`` characters: a
    longer one keeps its start and end around `` ... `` (a config value's repr can be
    megabytes)."""
    text = str(text).replace("\r", " ").replace("\n", " ")
    if len(text) <= limit:
        return text
    keep = limit - 5
    return text[: keep * 2 // 3] + " ... " + text[len(text) - (keep - keep * 2 // 3):]


class CheckpointError(ValueError):
    """A checkpoint folder or weight file is missing, corrupt or does not fit the model.
    Its message is one line of at most 600 characters (`one_line`)."""

    def __init__(self, message="", *args):
        super().__init__(one_line(message), *args)


# ----------------------------------------------------------------------------- files

def _open_safetensors(path):
    """An open ``safetensors`` handle (NumPy arrays; bfloat16 through ml_dtypes, imported
    above), or a CheckpointError saying what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weight file not found: {path}")
    try:
        return safe_open(str(path), framework="numpy")
    except SafetensorError as e:
        why = str(e).removeprefix("Error while deserializing header: ")
        if "too small" in why:
            raise CheckpointError(f"{path} is not a safetensors file: only "
                                  f"{path.stat().st_size} bytes") from None
        if "JSON" in why or "UTF" in why.upper():
            raise CheckpointError(f"{path} is corrupt: its header is not valid JSON ({why})") from None
        raise CheckpointError(f"{path} is corrupt or truncated ({why})") from None


class StoredTensor:
    """One tensor of an open safetensors file: ``shape`` and ``dtype`` from the header,
    values read when asked for: all of them (``np.asarray(t)``) or only the part an index
    selects (``t[idx]``, what each device reads when a model is loaded sharded)."""

    __slots__ = ("_handle", "name", "shape", "dtype")

    def __init__(self, handle, name: str):
        view = handle.get_slice(name)
        self._handle, self.name = handle, name
        self.shape = tuple(view.get_shape())
        if view.get_dtype() not in ST_DTYPES:
            raise CheckpointError(f"tensor {name!r} has dtype {view.get_dtype()}, which "
                                  f"retom-jax does not read")
        self.dtype = np.dtype(ST_DTYPES[view.get_dtype()])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, idx) -> np.ndarray:
        if idx == ():
            return np.asarray(self)
        return self._handle.get_slice(self.name)[idx]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self._handle.get_tensor(self.name)
        return array if dtype is None else array.astype(dtype)

    def __repr__(self):
        return f"StoredTensor({self.name!r}, {self.dtype.name}{list(self.shape)})"


def open_safetensors(path) -> dict[str, StoredTensor]:
    """The tensors of one ``.safetensors`` file by name, read lazily (`StoredTensor`)."""
    handle = _open_safetensors(path)
    return {name: StoredTensor(handle, name) for name in handle.keys()}


def read_safetensors(path) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file as NumPy arrays."""
    handle = _open_safetensors(path)
    return {name: handle.get_tensor(name) for name in handle.keys()}


def read_safetensors_metadata(path) -> dict[str, str]:
    """The ``__metadata__`` strings of a ``.safetensors`` file's header ({} if none)."""
    return dict(_open_safetensors(path).metadata() or {})


def weight_files(folder, stem: str, variant: str | None = None) -> list[Path]:
    """The safetensors files of one model folder (several when sharded)."""
    folder = Path(folder)
    names = [f"{stem}.{variant}" if variant else stem] + ([] if variant else [f"{stem}.fp16"])
    for name in names:
        single = folder / f"{name}.safetensors"
        index = folder / f"{name}.safetensors.index.json"
        if single.is_file():
            return [single]
        if index.is_file():
            return shard_files(index)
    pickles = sorted(p.name for p in folder.glob(f"{stem}*.bin"))
    hint = (f" It has PyTorch pickles ({', '.join(pickles)}), which are not read without torch: "
            "re-save the model with safe_serialization=True." if pickles else "")
    wanted = " or ".join(f"{n}.safetensors[.index.json]" for n in names)
    raise CheckpointError(f"no weights in {folder}: expected {wanted}.{hint}")


def shard_files(index) -> list[Path]:
    """The shard files a ``*.safetensors.index.json`` names, each a relative path inside
    the index's own folder (a path that leaves it, ``../x`` or ``/abs``, is refused)."""
    index = Path(index)
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError,
            OSError) as e:
        raise CheckpointError(f"{index} is not a valid shard index "
                              f"({type(e).__name__}: {str(e)[:120]})") from None
    files = []
    for shard in shards:
        # lexical: the Hugging Face cache links each file to a blob outside the folder
        if (not isinstance(shard, str) or not shard or "\0" in shard
                or os.path.isabs(shard) or os.path.normpath(shard).split(os.sep)[0] == ".."
                or os.path.normpath(shard) == "."):
            raise CheckpointError(f"{index} names the shard {str(shard)[:120]!r}, which is "
                                  f"not a file in {index.parent}: refused")
        files.append(index.parent / shard)
    if not files:
        raise CheckpointError(f"{index} names no shard files")
    return files


def read_state_dict(folder, stem: str, variant: str | None = None) -> dict[str, StoredTensor]:
    """The tensors of a model folder's (possibly sharded) weights, read lazily."""
    state = {}
    for file in weight_files(folder, stem, variant):
        state.update(open_safetensors(file))
    return state


def read_json(folder, name: str) -> dict:
    """The JSON object in ``folder/name``, or a CheckpointError saying what is wrong."""
    path = Path(folder) / name
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {name}")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return value


def read_config(folder) -> dict:
    return read_json(folder, "config.json")


# The built-in demo model: a diffusers pipeline folder inside the package. "demo" names it
# wherever a model folder is named (load_pipeline, load_unet, ...; a folder called demo is
# "./demo").
DEMO_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "demo"


def alias_folder(path_or_repo_id):
    """``path_or_repo_id`` with the alias "demo" resolved to the demo model's folder."""
    if str(path_or_repo_id) != "demo":
        return path_or_repo_id
    if not (DEMO_ASSETS / "model_index.json").is_file():
        raise CheckpointError(
            f"the demo model's weights are missing from {DEMO_ASSETS}: reinstall retom-jax, "
            f"or make them with 'retom-jax train --demo --out FOLDER' and pass that folder")
    return DEMO_ASSETS


def cached_snapshot(repo_id: str, what: str = "local folder") -> Path:
    """The local Hugging Face cache's snapshot of ``repo_id``; never touches the network."""
    repo_id = str(repo_id)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise CheckpointError(f"{repo_id!r} is neither a {what} nor a Hugging Face repo id")
    from huggingface_hub import constants, snapshot_download

    cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache))
    except Exception:
        raise CheckpointError(
            f"{repo_id!r} is not a local folder and is not in the local Hugging Face cache "
            f"({cache}). retom-jax never downloads weights: fetch them where there is "
            f"network (`hf download {repo_id}`), then pass the folder or copy the cache here."
        ) from None


def resolve_folder(path_or_repo_id, subfolder: str | None = None) -> Path:
    """A local model folder: ``path`` itself, ``path/subfolder`` for a pipeline folder, or
    a Hugging Face repo id found in the local cache ("demo": the built-in demo model).
    Never touches the network."""
    path = Path(os.path.expanduser(str(alias_folder(path_or_repo_id))))
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        if subfolder and (path / subfolder / "config.json").is_file():
            return path / subfolder
        where = f" nor in its {subfolder}/ subfolder" if subfolder else ""
        raise CheckpointError(f"{path} has no config.json{where}: not a model folder")
    return resolve_folder(cached_snapshot(path_or_repo_id), subfolder)


# ----------------------------------------------------------------------------- loaders

# Every model loader (UNet, VAE, text encoder, CLIP image tower) takes the same steps:
# read_model_config (resolve the folder, read config.json through the config class's
# from_dict), then load_module (build the module abstractly, read the weights, load them
# on a mesh or not). Config classes share one from_dict style: config_fields picks the
# keys that are dataclass fields (the dataclass holds the only defaults) and
# config_errors turns a bad value into a CheckpointError naming the file.


def config_fields(cls, raw: dict) -> dict:
    """The entries of a ``config.json`` dict that are fields of the dataclass ``cls``
    (lists as tuples). Other keys are ignored, as diffusers/transformers do; fields left
    out take the dataclass's defaults."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"a {cls.__name__} must be read from a JSON object, got "
                              f"{type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in names}


@contextlib.contextmanager
def config_errors(where: str):
    """Re-raise a ValueError/TypeError of reading a config as a one-line CheckpointError
    that starts with ``where`` (the config file)."""
    try:
        yield
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: {one_line(e, 300)}") from None


def dtypes(dtype, param_dtype=None) -> tuple:
    """``(dtype, param_dtype)`` parsed; the weights' dtype defaults to the compute dtype."""
    dtype = parse_dtype(dtype)
    return dtype, dtype if param_dtype is None else parse_dtype(param_dtype)


def read_model_config(path_or_repo_id, subfolder: str | None, config_cls):
    """``(folder, config)``: the model folder (`resolve_folder`) and its ``config.json``
    read by ``config_cls.from_dict(raw, where)``."""
    folder = resolve_folder(path_or_repo_id, subfolder)
    return folder, config_cls.from_dict(read_config(folder), where=str(folder / "config.json"))


def load_module(folder, build: Callable[[KeySource], nnx.Module], param_dtype, *,
                stem: str, variant: str | None = None, mesh=None,
                convert: Callable[[dict], dict] | None = None):
    """``(graphdef, params)`` of ``build(rngs)`` with the weights of ``folder``
    (``{stem}[.variant].safetensors``, sharded or not; ``convert`` renames keys). With a
    ``mesh`` each parameter is placed by ``sharding.param_placement`` and each device
    reads only its part of the file."""
    from ..sharding import param_placement

    state = read_state_dict(folder, stem, variant)
    if convert is not None:
        state = convert(state)
    return load_params(abstract_module(build), state, param_dtype, where=str(folder),
                       placement=param_placement(mesh))


class LoadedModel:
    """What the loaders return, the base of the VAE's and the encoders' wrappers:
    ``config``, ``graphdef`` and ``params`` (``module`` merges them), the compute
    ``dtype``, the weights' ``param_dtype`` and the ``mesh`` the parameters are placed on
    (None: not sharded)."""

    def __init__(self, config, graphdef, params, *, dtype, param_dtype=None, mesh=None):
        self.config, self.graphdef, self.params = config, graphdef, params
        self.dtype = jnp.dtype(dtype)
        self.param_dtype = jnp.dtype(dtype if param_dtype is None else param_dtype)
        self.mesh = mesh

    @property
    def module(self) -> nnx.Module:
        """The NNX module with these parameters."""
        return nnx.merge(self.graphdef, self.params)


# ----------------------------------------------------------------------------- mapping

def torch_key(path: tuple) -> str:
    *prefix, leaf = (str(p) for p in path)
    return ".".join([*prefix, RENAME.get(leaf, leaf)])


def to_flax_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 2:  # Linear: (out, in) -> (in, out)
        return array.T
    if leaf == "kernel" and array.ndim == 4:  # Conv: OIHW -> HWIO
        return array.transpose(2, 3, 1, 0)
    return array


class KeySource:
    """Stands in for ``nnx.Rngs`` while a module is built: every stream (``params()``,
    ``dropout()`` ...) hands out ``fold_in(key, i)`` for a Python counter ``i``.

    ``nnx.Rngs`` keeps its counters in NNX variables; under tracing each counter update
    makes JAX rescan the whole trace, so building SDXL abstractly took about a minute.
    """

    def __init__(self, key):
        self.key, self.count = key, 0

    def __call__(self):
        self.count += 1
        return jax.random.fold_in(self.key, self.count)

    def __getattr__(self, stream):  # any stream name: rngs.params(), rngs.dropout() ...
        if stream.startswith("__"):
            raise AttributeError(stream)
        return self.__call__


def abstract_module(build: Callable[[KeySource], nnx.Module]) -> nnx.Module:
    """The module's structure with shapes only: no parameter is initialised."""
    key = jax.random.key(0)
    return nnx.eval_shape(lambda: build(KeySource(key)))


def random_state(abstract_state, dtype, seed: int = 0, pool_size: int = 1 << 22):
    """Random values for an abstract NNX state (shapes only), fast at any model size.

    Values are copied from one pool of ``pool_size`` standard normals at a random offset
    per parameter (SDXL's 2.6 billion values take seconds; initialising in JAX compiles a
    program per shape). Kernels and embeddings are scaled by ``1 / sqrt(fan_in)``, norm
    scales are ``1 + 0.1 * noise``, biases ``0.02 * noise``: activations stay in a sensible
    range and nothing is exactly zero. For benchmarks and demos, not for training.
    """
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal(pool_size, dtype=np.float32)
    pure = {}
    for path, var in nnx.to_flat_state(abstract_state):
        leaf, shape = str(path[-1]), tuple(var.shape)
        size = int(np.prod(shape, dtype=np.int64))
        start = int(rng.integers(pool_size))
        reps = -(-(start + size) // pool_size)
        values = (np.tile(pool, reps) if reps > 1 else pool)[start:start + size].reshape(shape)
        if leaf == "scale":
            values = 1.0 + 0.1 * values
        elif leaf == "bias":
            values = 0.02 * values
        else:  # kernel (in, out) / (kh, kw, in, out), embedding (num, dim)
            fan_in = shape[-1] if leaf == "embedding" else int(np.prod(shape[:-1]))
            values = values / np.float32(np.sqrt(max(fan_in, 1)))
        pure[path] = jnp.asarray(values, dtype)
    return nnx.from_flat_state(pure)


def random_params(build: Callable[[KeySource], nnx.Module], dtype, seed: int = 0):
    """``(graphdef, params)`` of the module ``build(rngs)`` with `random_state` weights."""
    graphdef, abstract = nnx.split(abstract_module(build))
    return graphdef, random_state(abstract, dtype, seed)


def key_mismatch(expected, present, limit: int = 8) -> list[str]:
    """``"N missing key(s): a, b ..."`` and ``"N unexpected key(s): ..."`` for two sets of
    checkpoint keys (the first ``limit`` of each, sorted); empty when they agree."""
    out = []
    for what, keys in (("missing", sorted(set(expected) - set(present))),
                       ("unexpected", sorted(set(present) - set(expected)))):
        if keys:
            out.append(f"{len(keys)} {what} key(s): {', '.join(keys[:limit])}"
                       + (" ..." if len(keys) > limit else ""))
    return out


def load_params(module: nnx.Module, state_dict: dict, param_dtype,
                where: str = "checkpoint", key_map: Callable[[str], str] | None = None,
                placement: Callable | None = None):
    """Fill an abstract module with PyTorch-layout weights.

    ``state_dict`` maps PyTorch keys to arrays or `StoredTensor` s. Returns
    ``(graphdef, params)``: ``params`` is the module's state as a pytree of arrays in
    ``param_dtype``; ``nnx.merge(graphdef, params)`` rebuilds the module.
    ``placement(path, shape) -> Sharding`` (``sharding.param_placement(mesh)``) builds each
    array shard by shard: each device reads only its part of the weights.
    """
    graphdef, abstract = nnx.split(module)
    expected = {}
    for path, var in nnx.to_flat_state(abstract):
        key = torch_key(path)
        expected[key_map(key) if key_map else key] = (path, var)
    problems = key_mismatch(expected, state_dict)
    pure = {}
    for key, (path, var) in expected.items():
        if key not in state_dict:
            continue
        stored, leaf, want = state_dict[key], str(path[-1]), tuple(var.shape)
        if tuple(stored.shape) != to_torch_shape(want, leaf):
            problems.append(f"{key} has shape {list(stored.shape)} in the weights, "
                            f"the config implies {list(to_torch_shape(want, leaf))}")
            continue
        if placement is not None:
            # idx indexes the Flax layout; the same permutation gives the stored index.
            pure[path] = jax.make_array_from_callback(
                want, placement(path, want),
                lambda idx, a=stored, leaf=leaf: to_flax_layout(
                    np.asarray(a[to_torch_shape(tuple(idx), leaf)]), leaf).astype(param_dtype))
        else:
            pure[path] = jnp.asarray(to_flax_layout(np.asarray(stored), leaf)).astype(param_dtype)
    if problems:
        shown = problems[:6] + ([f"... and {len(problems) - 6} more"] if len(problems) > 6
                                else [])
        raise CheckpointError(f"the weights in {where} do not fit the model built from its "
                              f"config.json: " + "; ".join(shown))
    check_finite({torch_key(path): v for path, v in pure.items()}, f"the weights in {where}")
    return graphdef, nnx.from_flat_state(pure)


@jax.jit
def _finite_flags(arrays: list) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(a)) for a in arrays]) if arrays else jnp.ones(0, bool)


def nonfinite(arrays: dict) -> list[str]:
    """The names of the float arrays in ``arrays`` (``{name: array}``) that hold a NaN or
    an infinity; one jitted reduction and one host transfer for all of them."""
    names = [k for k, a in arrays.items() if jnp.issubdtype(jnp.result_type(a), jnp.inexact)]
    if not names:
        return []
    flags = np.asarray(_finite_flags([arrays[k] for k in names]))
    return [k for k, ok in zip(names, flags) if not ok]


def check_finite(arrays: dict, source: str, error=None) -> None:
    """``error`` (CheckpointError) naming ``source`` and the first arrays that hold a NaN
    or an infinity, if any does."""
    bad = nonfinite(arrays)
    if bad:
        raise (error or CheckpointError)(
            f"{source} hold NaN or infinite values ({len(bad)} array(s): "
            f"{', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}): refusing to use them")


def to_torch_shape(shape: tuple, leaf: str) -> tuple:
    """The PyTorch layout of a Flax shape (or of an index tuple: the same permutation)."""
    if leaf == "kernel" and len(shape) == 2:
        return shape[::-1]
    if leaf == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return shape


def parse_dtype(dtype) -> jnp.dtype:
    """``"bf16"``/``"bfloat16"``/``jnp.bfloat16`` ... -> a float dtype, or a clear error."""
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16",
               "float": "float32"}
    try:
        d = jnp.dtype(aliases.get(dtype, dtype) if isinstance(dtype, str) else dtype)
    except TypeError:
        d = None
    allowed = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if d not in allowed:
        raise ValueError(f"unsupported dtype {dtype!r}: use float32, bfloat16 or float16")
    return d


def param_count(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
