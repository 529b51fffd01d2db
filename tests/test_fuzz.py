"""Property-based fuzzing of everything retom-jax reads from a user (issue #23).

Each target generates hostile inputs with hypothesis (a fixed budget, ``derandomize=True``
so CI sees the same cases every run) and checks three things of every case:

- it ends in success or in one of the project's own errors (`project_error`), whose
  message is one line of at most 1200 characters: never another exception;
- it ends within a time limit (`case_limit`: a hang or a pathological loop fails);
- it touches no file outside the folder it was told to write (`Arena`: sentinel files
  beside each case's folder, and the case folder itself when it was told to write none).

Outcomes are counted per target; ``pytest -s tests/test_fuzz.py`` prints the table.
The budget is set by ``FUZZ_SCALE`` (default 1: about 400 cases in a couple of minutes).
"""
from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import pickle
import signal
import struct
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import retom_jax  # noqa: E402
from retom_jax.eval.inception import InceptionError  # noqa: E402
from retom_jax.eval.torch_pickle import TorchFileError, load_torch_file  # noqa: E402
from retom_jax.images import ImageFileError  # noqa: E402
from retom_jax.models.weights import CheckpointError  # noqa: E402

PACKAGE = os.path.dirname(retom_jax.__file__)
SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
STATS: dict = collections.defaultdict(collections.Counter)


def _project_types():
    types = [CheckpointError, TorchFileError, InceptionError, ImageFileError]
    try:
        from retom_jax.train import TrainError
    except ImportError:  # pragma: no cover - the training module moved
        from retom_jax.train.errors import TrainError
    return tuple(types + [TrainError])


PROJECT_TYPES = _project_types()


def budget(n: int, seconds: float = 20.0):
    """hypothesis settings for ``n`` cases (times FUZZ_SCALE), reproducible."""
    return settings(max_examples=max(1, int(n * SCALE)), derandomize=True, database=None,
                    deadline=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))


def project_error(e: BaseException) -> bool:
    """One of the project's error types, or a ValueError raised by retom_jax's own code
    (the project's convention for a bad argument)."""
    if isinstance(e, PROJECT_TYPES):
        return True
    if type(e) is ValueError:
        tb = e.__traceback__
        last = None
        while tb is not None:
            last, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
        return last is not None and last.startswith(PACKAGE)
    return False


class CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def case_limit(seconds: float):
    """Fail a case that runs longer than ``seconds`` (SIGALRM: main thread only)."""
    fired = []

    def handler(signum, frame):
        fired.append(True)
        raise CaseTimeout(f"a case ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert not fired, f"a case ran longer than {seconds} s (the error was swallowed)"


def outcome(target: str, fn, seconds: float = 10.0):
    """Run one case: success or a project error (counted), else the test fails."""
    start = time.perf_counter()
    try:
        with case_limit(seconds):
            result = fn()
    except CaseTimeout:
        STATS[target]["TIMEOUT"] += 1
        raise
    except Exception as e:  # noqa: BLE001 - classifying is the point
        kind = type(e).__name__
        STATS[target][kind] += 1
        if not project_error(e):
            raise AssertionError(f"{target}: {kind} is not a project error: {e!r}"[:2000]) from e
        msg = str(e)
        if os.environ.get("FUZZ_VERBOSE"):
            print(f"[{target}] {kind}: {msg[:160]}")
        assert "\n" not in msg and len(msg) <= 1200, f"{target}: not one short line: {msg[:300]!r}"
        return e
    STATS[target]["ok"] += 1
    STATS[target]["_seconds"] += time.perf_counter() - start
    return result


def _snapshot(root: Path) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st_ = p.lstat()
            out[str(p.relative_to(root))] = (st_.st_size, st_.st_mtime_ns)
    return out


class Arena:
    """A temporary folder per case: ``case`` (where the case's inputs are made),
    ``outside`` (sentinel files a path traversal would reach) and ``write`` (the only
    folder the code under test is told to write in)."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="fuzz-"))
        self.case, self.outside, self.write = (self.root / n for n in ("case", "outside", "write"))
        for d in (self.case, self.outside, self.write):
            d.mkdir()
        (self.outside / "secret.safetensors").write_bytes(_safetensors_bytes(
            {"w": np.ones((2, 2), np.float32)}))
        (self.outside / "secret.json").write_text("{}")
        self.before = None

    def seal(self):
        """Inputs are ready: from now on only ``write`` may change."""
        self.before = {n: _snapshot(self.root / n) for n in ("case", "outside")}
        self.top = sorted(os.listdir(self.root))

    def check(self):
        assert sorted(os.listdir(self.root)) == self.top, "a file was made beside the case"
        for n, snap in self.before.items():
            assert _snapshot(self.root / n) == snap, f"the {n} folder was changed"

    def close(self):
        import shutil

        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def arena():
    a = Arena()
    try:
        yield a
        if a.before is not None:
            a.check()
    finally:
        a.close()


@pytest.fixture(scope="module", autouse=True)
def report():
    """The repository's own files are never touched; print the outcomes table."""
    repo = Path(__file__).resolve().parents[1]

    def state():
        import subprocess

        r = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"],
                           cwd=repo, capture_output=True, text=True)
        return r.stdout if r.returncode == 0 else None

    before = state()
    yield
    after = state()
    if before is not None:
        assert after == before, "the fuzz run changed files in the repository"
    lines = ["", "fuzz outcomes (cases per target, by kind):"]
    for target, counts in sorted(STATS.items()):
        n = sum(v for k, v in counts.items() if not k.startswith("_"))
        kinds = ", ".join(f"{k} {v}" for k, v in counts.most_common() if not k.startswith("_"))
        lines.append(f"  {target}: {n} cases: {kinds}")
    print("\n".join(lines))
    out = os.environ.get("FUZZ_STATS")
    if out:
        Path(out).write_text(json.dumps({k: dict(v) for k, v in STATS.items()}, indent=1))


# ----------------------------------------------------------------------------- values

WEIRD_INTS = st.sampled_from([0, 1, -1, 2, 3, 7, 8, 2**31, 2**63, -2**63, 10**12, 10**30])
SCALARS = st.one_of(
    st.none(), st.booleans(), WEIRD_INTS, st.integers(-1000, 1000),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e30, -1e30, 1e-30, 0.5]),
    st.text(max_size=12), st.sampled_from(["x", "", "linear", "silu", "../../x", "\x00", "1e9"]),
)
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(
        st.text(max_size=8), inner, max_size=4), max_leaves=12)
BIG = st.sampled_from([list(range(20000)), "x" * 50000, {str(i): i for i in range(3000)}])
VALUES = st.one_of(JSON_VALUES, JSON_VALUES, JSON_VALUES, BIG)


def _dumps(value) -> str:
    return json.dumps(value, allow_nan=True)


# ----------------------------------------------------------------------------- config.json

def _configs():
    from tests.tiny import SD1, SD2, SDXL

    unet = {f: {"_class_name": "UNet2DConditionModel", **c} for f, c in
            (("sd1", SD1), ("sd2", SD2), ("sdxl", SDXL))}
    vae = {"_class_name": "AutoencoderKL", "block_out_channels": [32, 64],
           "down_block_types": ["DownEncoderBlock2D"] * 2,
           "up_block_types": ["UpDecoderBlock2D"] * 2, "norm_num_groups": 8,
           "latent_channels": 4, "sample_size": 32}
    text = {"architectures": ["CLIPTextModel"], "hidden_size": 32, "intermediate_size": 37,
            "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 1000,
            "max_position_embeddings": 77, "hidden_act": "quick_gelu"}
    vision = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
              "num_attention_heads": 4, "image_size": 32, "patch_size": 8,
              "projection_dim": 16}
    sched = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000,
             "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 1,
             "clip_sample": False, "set_alpha_to_one": False}
    return {**{f"unet-{k}": v for k, v in unet.items()}, "vae": vae, "text": text,
            "vision": vision, "scheduler": sched}


CONFIGS = _configs()


def _read_config(kind: str, folder: Path):
    from retom_jax.models.clip import TextEncoderConfig
    from retom_jax.eval.clip_vision import VisionConfig
    from retom_jax.schedulers import load_scheduler
    from retom_jax.models.unet import UNetConfig
    from retom_jax.models.vae import VAEConfig
    from retom_jax.models.weights import read_model_config

    if kind == "scheduler":
        return load_scheduler(folder / "config.json")
    cls = {"vae": VAEConfig, "text": TextEncoderConfig, "vision": VisionConfig}.get(
        kind, UNetConfig)
    return read_model_config(folder, None, cls)


@st.composite
def config_cases(draw):
    kind = draw(st.sampled_from(sorted(CONFIGS)))
    cfg = json.loads(json.dumps(CONFIGS[kind]))
    keys = sorted(cfg) + ["sample_size", "num_train_timesteps", "trained_betas",
                          "layers_per_block", "transformer_layers_per_block",
                          "projection_dim", "eos_token_id", "scaling_factor"]
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2, 3]))):
        key = draw(st.sampled_from(keys))
        if draw(st.integers(0, 5)) == 0:
            cfg.pop(key, None)
        else:
            cfg[key] = draw(VALUES)
    raw = _dumps(cfg)
    if draw(st.integers(0, 15)) == 0:  # broken files: truncated, not UTF-8, not an object
        raw = draw(st.sampled_from([raw[: len(raw) // 2], "\udcff", "[1, 2]", "null", ""]))
    return kind, raw


@budget(90)
@given(config_cases())
def test_fuzz_config_json(case):
    kind, raw = case
    with arena() as a:
        (a.case / "config.json").write_bytes(raw.encode("utf-8", "surrogateescape"))
        a.seal()
        outcome("config.json", lambda: _read_config(kind, a.case))


# ----------------------------------------------------------------------------- safetensors

ST_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3",
             "C64", "X", ""]


def _safetensors_bytes(tensors: dict, metadata: dict | None = None) -> bytes:
    from safetensors.numpy import save

    return save(tensors, metadata=metadata)


@st.composite
def safetensors_cases(draw):
    """Raw files: a header length, a JSON header (dtype, shape, data offsets, metadata)
    and data, each of which may lie; or a valid file cut or with one byte changed."""
    if draw(st.booleans()):
        tensors = {f"t{i}": np.full(draw(st.lists(st.integers(0, 4), max_size=3)), 0.5,
                                    draw(st.sampled_from([np.float32, np.float16, np.int8])))
                   for i in range(draw(st.integers(0, 3)))}
        raw = bytearray(_safetensors_bytes(tensors))
        how = draw(st.sampled_from(["keep", "keep", "cut", "byte"]))
        if how == "cut":
            raw = raw[: draw(st.integers(0, len(raw)))]
        elif how == "byte" and raw:
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        return bytes(raw)
    header, offset = {}, 0
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(ST_DTYPES))
        shape = draw(st.lists(st.one_of(st.integers(0, 5), WEIRD_INTS), max_size=4))
        size = draw(st.one_of(st.integers(0, 64), WEIRD_INTS))
        start = draw(st.one_of(st.just(offset), WEIRD_INTS))
        entry = {"dtype": dtype, "shape": shape, "data_offsets": [start, start + size]}
        if draw(st.integers(0, 6)) == 0:
            entry = draw(VALUES)
        header[draw(st.text(max_size=6)) + str(i)] = entry
        offset = start + size if isinstance(start, int) else offset
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.one_of(
            st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3), VALUES))
    text = _dumps(header).encode()
    length = draw(st.one_of(st.just(len(text)), WEIRD_INTS.filter(lambda v: 0 <= v < 2**64)))
    data = draw(st.binary(max_size=256))
    return struct.pack("<Q", length) + text + data


def _read_all(path):
    from retom_jax.models.weights import open_safetensors, read_safetensors_metadata

    tensors = open_safetensors(path)
    read_safetensors_metadata(path)
    return {k: np.asarray(t) for k, t in tensors.items()}


@budget(60)
@given(safetensors_cases())
def test_fuzz_safetensors_header(raw):
    with arena() as a:
        path = a.case / "model.safetensors"
        path.write_bytes(raw)
        a.seal()
        outcome("safetensors header", lambda: _read_all(path))


# ----------------------------------------------------------------------------- index

SHARD_NAMES = st.one_of(
    st.sampled_from(["model-1.safetensors", "model-2.safetensors", "sub/model-3.safetensors"]),
    st.sampled_from(["model-1.safetensors", "model-2.safetensors", "sub/model-3.safetensors"]),
    st.sampled_from(["model-1.safetensors", "model-2.safetensors", "sub/model-3.safetensors"]),
    st.sampled_from(["model-1.safetensors", "model-2.safetensors", "sub/model-3.safetensors",
                     "../outside/secret.safetensors", "../../outside/secret.safetensors",
                     "sub/../../outside/secret.safetensors", "/etc/passwd", "", ".", "..",
                     "missing.safetensors", "a\x00b", "./model-1.safetensors",
                     "model-1.safetensors/"]),
    st.text(max_size=10), SCALARS)


@st.composite
def index_cases(draw):
    weight_map = {draw(st.text(max_size=6)) + str(i): draw(SHARD_NAMES)
                  for i in range(draw(st.integers(1, 3)))}
    index = {"metadata": {"total_size": 1}, "weight_map": weight_map}
    if draw(st.integers(0, 8)) == 0:
        index = draw(st.one_of(VALUES, st.just({"weight_map": draw(VALUES)})))
    return _dumps(index)


@budget(50)
@given(index_cases())
def test_fuzz_index_file(raw):
    from retom_jax.models.weights import read_state_dict, weight_files

    with arena() as a:
        (a.case / "sub").mkdir()
        for name in ("model-1", "model-2", "sub/model-3"):
            (a.case / f"{name}.safetensors").write_bytes(
                _safetensors_bytes({name.replace("/", "."): np.zeros(3, np.float32)}))
        (a.case / "model.safetensors.index.json").write_text(raw)
        a.seal()

        def load():
            files = weight_files(a.case, "model")
            for f in files:  # every shard lies inside the model folder
                assert os.path.realpath(f).startswith(os.path.realpath(a.case) + os.sep), f
            return {k: np.asarray(v) for k, v in read_state_dict(a.case, "model").items()}

        outcome("index file", load)


# ----------------------------------------------------------------------------- LoRA

def _tiny_params():
    from flax import nnx

    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.proj_in = nnx.Linear(4, 8, rngs=rngs)
            self.conv = nnx.Conv(3, 6, (3, 3), rngs=rngs)
            self.attn1 = nnx.Dict(to_q=nnx.Linear(8, 8, rngs=rngs))

    return nnx.split(Tiny(nnx.Rngs(0)))[1]


LORA_MODULES = ["proj_in", "conv", "attn1.to_q"] * 4 + ["attn1_to_q", "missing", "conv.x"]
LORA_PREFIXES = ["unet.", "lora_unet_"] * 6 + ["text_encoder.", "lora_te_", "vae.", ""]
LORA_SUFFIXES = [".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight",
                 ".alpha", ".lora.down.weight", ".lora.up.weight", ".dora_scale",
                 ".lora_B.bias", ".weight", ""]
LORA_VALUES = st.sampled_from(["normal"] * 12 + ["nan", "inf", "1e38", "zero"])


@st.composite
def lora_cases(draw):
    tensors = {}
    kohya_file = draw(st.booleans())
    clean = draw(st.booleans())  # half the files only valid layers (values may still lie)

    def pick(strategy, valid):
        return draw(st.sampled_from(valid) if clean else strategy)

    for _ in range(draw(st.sampled_from([0, 1, 1, 2, 2, 3, 4]))):
        module = pick(st.sampled_from(LORA_MODULES), ["proj_in", "conv", "attn1.to_q"])
        rank = draw(st.integers(1, 3))
        pair = pick(st.sampled_from([True] * 8 + [False]), [True])
        prefix = pick(st.sampled_from(LORA_PREFIXES), ["unet."])
        if prefix in ("unet.", "lora_unet_"):  # one layout per file, mostly
            prefix = "lora_unet_" if kohya_file else "unet."
        kohya = prefix.startswith("lora_")
        name = prefix + (module.replace(".", "_") if kohya else module)
        shapes = {"proj_in": ((rank, 4), (8, rank)), "conv": ((rank, 3, 3, 3), (6, rank, 1, 1)),
                  "attn1.to_q": ((rank, 8), (8, rank))}.get(
            module.replace("_to_q", ".to_q"), ((rank, 5), (7, rank)))
        if not clean and draw(st.integers(0, 8)) == 0:
            shapes = tuple(tuple(draw(st.lists(st.integers(0, 9), max_size=5))) for _ in range(2))
        roles = [(".lora_down.weight", ".lora_up.weight") if kohya else
                 (".lora_A.weight", ".lora_B.weight")][0]
        if not pair:
            roles = (draw(st.sampled_from(LORA_SUFFIXES)),)
        for role, shape in zip(roles, shapes):
            kind = draw(LORA_VALUES)
            dtype = draw(st.sampled_from([np.float32] * 4 + [np.float16, np.int8]))
            value = {"normal": np.full(shape, 0.01), "nan": np.full(shape, np.nan),
                     "inf": np.full(shape, np.inf), "1e38": np.full(shape, 1e38),
                     "zero": np.zeros(shape)}[kind]
            with np.errstate(all="ignore"):
                tensors[name + role] = value.astype(dtype)
        if draw(st.integers(0, 5)) == 0:
            tensors[name + ".alpha"] = np.asarray(
                draw(st.sampled_from([4.0, 0.0, np.nan, np.inf, -1.0])), np.float32)
    meta = None
    if draw(st.integers(0, 3)) == 0:
        meta = {"lora_adapter_metadata": draw(st.one_of(
            st.just(_dumps({"unet.lora_alpha": pick(SCALARS, [2, 4.0, 8]), "unet.r": 2,
                            "unet.alpha_pattern": pick(VALUES, [{}, {"conv": 1.0}])})),
            st.text(max_size=10)))}
    scale = draw(st.one_of(st.just(1.0), st.floats(allow_nan=True, allow_infinity=True),
                           st.sampled_from([1e30, -1e30, 0.0])))
    return tensors, meta, scale


@budget(70)
@given(lora_cases())
def test_fuzz_lora(case):
    from retom_jax.models.lora import fuse_lora, parse_lora_spec, read_lora

    tensors, meta, scale = case
    params = _TINY.setdefault("params", _tiny_params())
    with arena() as a:
        path = a.case / "lora.safetensors"
        path.write_bytes(_safetensors_bytes(tensors, meta))
        a.seal()

        def load():
            file, s = parse_lora_spec((str(path), scale))
            lora = read_lora(file)
            for component, layers in lora.layers.items():
                fuse_lora(params, layers, s, component="unet", kohya=lora.kohya, where=file)

        outcome("LoRA", load)


_TINY: dict = {}


# ----------------------------------------------------------------------------- pickles

class _Payload:
    """Pickles as a call of a foreign global (never run by the reader: the case checks
    that the marker folder it would make does not appear)."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _graph(draw, arena_, depth_max=60):
    """A plain object graph with sharing (each node may hold earlier nodes twice)."""
    import torch

    nodes = [draw(st.sampled_from([0, 1.5, "s", None, b"b"]))]
    bomb = draw(st.integers(0, 5)) == 0  # every node holds the previous one twice
    for _ in range(draw(st.integers(20 if bomb else 0, depth_max))):
        kind = draw(st.sampled_from(["list2", "list2", "dict", "tuple", "tensor", "scalar"]))
        prev = nodes[-1]
        other = prev if bomb else nodes[draw(st.integers(0, len(nodes) - 1))]
        kind = "list2" if bomb else kind
        if kind == "list2":
            nodes.append([prev, other])
        elif kind == "dict":
            nodes.append({"a": prev, "b": other})
        elif kind == "tuple":
            nodes.append((prev, other))
        elif kind == "tensor":
            shape = draw(st.lists(st.integers(0, 4), max_size=3))
            nodes.append(torch.ones(shape, dtype=draw(st.sampled_from(
                [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool]))))
        else:
            nodes.append(draw(SCALARS))
    obj = nodes[-1] if draw(st.booleans()) else {"state": nodes[-1]}
    foreign = draw(st.sampled_from([None] * 8 + ["mkdir", "eval", "counter", "path"]))
    if foreign:
        marker = str(arena_.write / "PAYLOAD_RAN")
        obj = {"x": obj, "evil": {"mkdir": _Payload(os.mkdir, (marker,)),
                                  "eval": _Payload(eval, (f"__import__('os').mkdir({marker!r})",)),
                                  "counter": collections.Counter("ab"),
                                  "path": Path("/tmp")}[foreign]}
    return obj


@st.composite
def pickle_cases(draw):
    return draw(st.data()), draw(st.sampled_from(["zip"] * 4 + ["legacy"] * 4 + ["raw"])), draw(
        st.sampled_from(["keep"] * 6 + ["truncate", "flip", "deflate"]))


def _write_pickle(data, fmt, damage, a):
    import torch

    obj = _graph(data.draw, a)
    buf = io.BytesIO()
    if fmt == "raw":  # a bare pickle stream (neither torch format)
        pickle.dump(obj, buf, protocol=data.draw(st.integers(0, 5)))
    else:
        torch.save(obj, buf, _use_new_zipfile_serialization=fmt == "zip")
    raw = buf.getvalue()
    if damage == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    elif damage == "flip" and raw:
        raw = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
        raw = bytes(raw)
    elif damage == "deflate" and fmt == "zip":
        with zipfile.ZipFile(io.BytesIO(raw)) as zin:
            out = io.BytesIO()
            with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
                for info in zin.infolist():
                    zout.writestr(info.filename, zin.read(info))
            raw = out.getvalue()
    return raw


@budget(80)
@given(pickle_cases())
def test_fuzz_pickles(case):
    data, fmt, damage = case
    with arena() as a:
        path = a.case / "weights.pth"
        path.write_bytes(_write_pickle(data, fmt, damage, a))
        a.seal()
        outcome("pickle", lambda: load_torch_file(path), seconds=15)
        assert not (a.write / "PAYLOAD_RAN").exists(), "a pickle payload ran"


# ----------------------------------------------------------------------------- CLI

class _Stop(Exception):
    """Raised where a command would load a model: its checks all passed."""


STOP_AT = ("load_pipeline", "build_demo_pipeline", "load_clip", "load_inception",
           "train_demo", "initialize_distributed")


@contextlib.contextmanager
def _no_models():
    """Every model loader in retom_jax's modules raises `_Stop` (parse and validation
    only: no model is built or compiled)."""
    import sys

    def stop(*args, **kwargs):
        raise _Stop()

    saved = []
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "retom_jax" or name.startswith("retom_jax.")):
            continue
        for attr in STOP_AT:
            if callable(getattr(module, attr, None)):
                saved.append((module, attr, getattr(module, attr)))
                setattr(module, attr, stop)
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def _data_folder(folder: Path):
    from PIL import Image

    folder.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "a.png")
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a cat"}\n')


CLI_VALUES = ["0", "1", "2", "8", "64", "-1", "1e30", "nan", "inf", "-inf", "0.5", "1.5",
              "100000", "99999999999999999999", "abc", "", "2x2", "0x0", "4x", "10:4x4",
              "none", "tome", "retom", "todo", "ddim", "euler", "bf16", "float64", "none,retom",
              "0.3,0.5", "data=1", "data=0", "spatial=2", "\u00e9\u00e8", "-", "--"]
CLI_FLAGS = {
    "generate": ["--prompt", "--negative-prompt", "--steps", "--guidance", "--height", "--width",
                 "--seed", "--num-images", "--scheduler", "--merge", "--ratio", "--max-downsample",
                 "--window", "--matching", "--cache-step", "--window-schedule", "--todo-factor",
                 "--dtype", "--lora", "--strength", "--init-image", "--guidance-rescale",
                 "--clip-skip", "--eta", "--original-size", "--mesh", "--overwrite"],
    "train": ["--resolution", "--lora-rank", "--lora-alpha", "--steps", "--batch-size", "--lr",
              "--warmup-steps", "--snr-gamma", "--max-grad-norm", "--weight-decay",
              "--caption-dropout", "--dtype", "--checkpoint-every", "--seed", "--merge",
              "--ratio", "--window", "--matching", "--todo-factor", "--mesh"],
    "eval": ["--prompts", "--num-prompts", "--methods", "--ratios", "--steps", "--seeds",
             "--guidance", "--height", "--width", "--scheduler", "--dtype", "--window",
             "--matching", "--cache-step", "--todo-factor", "--clip", "--inception",
             "--reference", "--batch-size", "--mesh"],
}


CLI_GOOD = {"--prompt": "a dog", "--negative-prompt": "blur", "--steps": "2", "--guidance": "3",
            "--height": "64", "--width": "64", "--seed": "7", "--num-images": "2",
            "--scheduler": "ddim", "--merge": "retom", "--ratio": "0.5", "--max-downsample": "1",
            "--window": "2x2", "--matching": "global", "--cache-step": "0",
            "--window-schedule": "1:4x4", "--todo-factor": "2", "--dtype": "bfloat16",
            "--strength": "0.5", "--guidance-rescale": "0.5", "--clip-skip": "1", "--eta": "0.5",
            "--original-size": "64x64", "--mesh": "data=1", "--resolution": "64",
            "--lora-rank": "4", "--lora-alpha": "4", "--batch-size": "1", "--lr": "1e-4",
            "--warmup-steps": "1", "--snr-gamma": "5", "--max-grad-norm": "1",
            "--weight-decay": "0.01", "--caption-dropout": "0.1", "--checkpoint-every": "1",
            "--prompts": "builtin", "--num-prompts": "2", "--methods": "none,retom",
            "--ratios": "0.3,0.5", "--seeds": "2", "--inception": "@case/file",
            "--clip": "@case", "--reference": "@case", "--init-image": "@case/file",
            "--lora": "@case/file"}


@st.composite
def cli_cases(draw):
    command = draw(st.sampled_from(["generate"] * 3 + ["train"] * 2 + ["eval"] * 2))
    flags = draw(st.lists(st.sampled_from(CLI_FLAGS[command]), max_size=5, unique=True))
    values = [draw(st.sampled_from(CLI_VALUES + ["@write", "@case", "@data", "@missing"]))
              if draw(st.integers(0, 2)) == 0 else CLI_GOOD.get(f, "1") for f in flags]
    out = draw(st.sampled_from(["@write/x.png", "@write/sub/x.png", "@write/x.txt", "@write",
                                "@data", "@data/sub", "@case/file", "@write/o"]))
    model = draw(st.sampled_from(["demo"] * 4 + ["@case", "@missing", "org/not-cached"]))
    return command, list(zip(flags, values)), out, model


def _cli_argv(case, a: Arena) -> list[str]:
    command, pairs, out, model = case
    subst = {"@write": str(a.write), "@case": str(a.case), "@data": str(a.case / "data"),
             "@missing": str(a.case / "missing")}

    def fill(v):
        for key, path in subst.items():
            if v.startswith(key):
                return path + v[len(key):]
        return v

    argv = [command, "--model", fill(model), "--out", fill(out)]
    if command == "generate":
        argv += ["--prompt", "a cat"]
    if command == "train":
        argv += ["--data", subst["@data"]]
    for flag, value in pairs:
        if flag == "--overwrite":
            argv.append(flag)
        else:
            argv += [flag, fill(value)] if not value.startswith("-") else [f"{flag}={value}"]
    return argv


def _run_cli(argv):
    import contextlib as cl

    from retom_jax.cli import main

    err = io.StringIO()
    with _no_models(), cl.redirect_stderr(err), cl.redirect_stdout(io.StringIO()):
        try:
            return main(argv)
        except SystemExit as e:
            text = err.getvalue().strip().splitlines()
            if e.code not in (0, None):
                assert text and text[-1].startswith("retom-jax"), f"exit {e.code}: {text[-3:]}"
                assert "Traceback" not in err.getvalue()
                raise CliUsageError(text[-1]) from None
            return 0
        except _Stop:
            return "checks passed"


class CliUsageError(ValueError):
    """`retom-jax: error: ...` (exit status 2)."""


PROJECT_TYPES = PROJECT_TYPES + (CliUsageError,)


@budget(100)
@given(cli_cases())
def test_fuzz_cli_arguments(case):
    with arena() as a:
        _data_folder(a.case / "data")
        (a.case / "file").write_text("a file")
        argv = _cli_argv(case, a)
        a.seal()
        outcome("CLI", lambda: _run_cli(argv), seconds=20)
