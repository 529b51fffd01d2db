"""The attention dispatch: kernel choice, numerics against torch SDPA, and its errors."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.experimental.pallas import tpu as pltpu

from retom_jax.models import attention
from retom_jax.models.attention import check_implementation, cudnn_supports, dot_product_attention, resolve_implementation, splash_block_size, xla_chunk_size
from tests.util import rel_err


def qkv(b=2, tq=9, tk=7, h=3, d=8, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randn(b, t, h, d).astype(np.float32) for t in (tq, tk, tk)]


def torch_sdpa(q, k, v, **kw):
    t = lambda a: torch.from_numpy(a).transpose(1, 2)  # noqa: E731  [B, H, T, D]
    return F.scaled_dot_product_attention(t(q), t(k), t(v), **kw).transpose(1, 2).numpy()


def test_matches_torch_sdpa_fp32():
    q, k, v = qkv()
    assert rel_err(dot_product_attention(q, k, v), torch_sdpa(q, k, v)) <= 1e-5


def test_causal_and_boolean_mask():
    q, k, v = qkv(tq=6, tk=6)
    assert rel_err(dot_product_attention(q, k, v, is_causal=True),
                   torch_sdpa(q, k, v, is_causal=True)) <= 1e-5
    mask = np.random.RandomState(1).rand(2, 1, 6, 6) > 0.3
    mask[..., 0] = True  # every query sees at least one key
    assert rel_err(dot_product_attention(q, k, v, mask=jnp.asarray(mask)),
                   torch_sdpa(q, k, v, attn_mask=torch.from_numpy(mask))) <= 1e-5


@pytest.mark.parametrize("dtype,tol", [(jnp.bfloat16, 2e-2), (jnp.float16, 2e-3)])
def test_half_precision_runs_and_keeps_its_dtype(dtype, tol):
    q, k, v = qkv()
    out = jax.jit(dot_product_attention)(*(jnp.asarray(a, dtype) for a in (q, k, v)))
    assert out.dtype == dtype
    assert rel_err(out, torch_sdpa(q, k, v)) <= tol


def test_kernel_choice():
    assert cudnn_supports(jnp.bfloat16, 40) and cudnn_supports(jnp.float16, 128)
    assert not cudnn_supports(jnp.float32, 64)
    assert not cudnn_supports(jnp.bfloat16, 36) and not cudnn_supports(jnp.bfloat16, 136)
    on_gpu = jax.default_backend() == "gpu"
    assert resolve_implementation("auto", jnp.bfloat16, 64) == ("cudnn" if on_gpu else "xla")
    assert resolve_implementation("auto", jnp.float32, 64) == "xla"
    assert resolve_implementation("xla", jnp.bfloat16, 64) == "xla"


def test_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        dot_product_attention(q, k, v, implementation="flash")
    with pytest.raises(ValueError, match=r"\[batch, tokens, heads, head_dim\]"):
        dot_product_attention(q[0], k[0], v[0])
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="cuDNN attention needs a GPU"):
            dot_product_attention(q, k, v, implementation="cudnn")
    else:
        with pytest.raises(ValueError, match="needs fp16/bf16"):
            dot_product_attention(q, k, v, implementation="cudnn")


# --------------------------------------------------------------------------------------
# The chunked XLA fallback (issue 10)
# --------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames="is_causal")
def _plain_xla(q, k, v, mask=None, is_causal=False):
    """The unchunked XLA formulation (the reference of the chunked path and of splash)."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                        implementation="xla")


def test_chunk_size_from_shapes():
    assert xla_chunk_size(2, 8, 4096, 4096, chunk_bytes=1 << 40) == 4096  # small: one piece
    # 2*8*16384*16384*4 bytes = 16 GiB over 256 MiB: 64 chunks of 256 queries
    assert xla_chunk_size(2, 8, 16384, 16384, chunk_bytes=1 << 28) == 256
    assert xla_chunk_size(1, 1, 10, 7, chunk_bytes=4 * 7 * 3) == 3  # 4 chunks: 3, 3, 3, 1
    assert xla_chunk_size(1, 1, 10, 7, chunk_bytes=0) == 1
    assert attention.XLA_CHUNK_BYTES == 1 << 28


# tq 23 with 5 chunks of 5 queries: 4 full chunks and a tail of 3
@pytest.mark.parametrize("case", ["plain", "mask_per_query", "mask_per_key", "causal",
                                  "causal_and_mask"])
def test_chunked_equals_plain_fp32(case):
    q, k, v = (jnp.asarray(a) for a in qkv(b=2, tq=23, tk=19, h=3, d=8, seed=3))
    rng = np.random.RandomState(4)
    mask = None
    if case in ("mask_per_query", "causal_and_mask"):
        mask = rng.rand(2, 1, 23, 19) > 0.3
    elif case == "mask_per_key":
        mask = rng.rand(2, 3, 1, 19) > 0.3
    if mask is not None:
        mask[..., 0] = True
        mask = jnp.asarray(mask)
    causal = case.startswith("causal")
    small = 2 * 3 * 5 * 19 * 4  # the logits of 5 queries
    assert xla_chunk_size(2, 3, 23, 19, small) == 5
    plain = _plain_xla(q, k, v, mask, causal)
    chunked = jax.jit(lambda q, k, v, m: dot_product_attention(
        q, k, v, mask=m, is_causal=causal, implementation="xla", chunk_bytes=small))(q, k, v, mask)
    assert rel_err(chunked, plain) <= 1e-6


def test_chunked_module_threshold_and_bf16(monkeypatch):
    """The module constant drives the choice; in bf16 every chunk is the plain formulation on
    its slice of queries, bit for bit (XLA:CPU's dot kernels sum in a shape-dependent order,
    so the full-size plain call can differ from either by one bf16 rounding)."""
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in qkv(b=1, tq=37, tk=29, h=2, d=16, seed=5))
    monkeypatch.setattr(attention, "XLA_CHUNK_BYTES", 2 * 8 * 29 * 4)  # chunks of 8 queries
    chunked = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, implementation="xla"))(q, k, v)
    assert chunked.dtype == jnp.bfloat16
    for start in (0, 8, 32):  # a full chunk, another, the tail of 5
        part = _plain_xla(q[:, start:start + 8], k, v)
        np.testing.assert_array_equal(np.asarray(chunked[:, start:start + 8], np.float32),
                                      np.asarray(part, np.float32))
    full = _plain_xla(q, k, v)
    assert rel_err(np.asarray(chunked, np.float32), np.asarray(full, np.float32)) <= 4e-3
    monkeypatch.setattr(attention, "XLA_CHUNK_BYTES", 1 << 40)  # never: the plain program
    assert "while" not in jax.jit(lambda q: dot_product_attention(
        q, k, v, implementation="xla")).lower(q).as_text()


def test_chunked_program_holds_only_chunk_logits():
    """Compiled (never run) at 4096 queries x 4096 keys x 8 heads: 512 MiB of logits
    plain, XLA scratch falls ~an order of magnitude with 16 MiB chunks."""
    spec = jax.ShapeDtypeStruct((1, 4096, 8, 8), jnp.float32)

    def temp(chunk_bytes):
        f = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, implementation="xla",
                                                           chunk_bytes=chunk_bytes))
        return f.lower(spec, spec, spec).compile().memory_analysis().temp_size_in_bytes

    plain, chunked = temp(math.inf), temp(1 << 24)
    assert plain >= 512 * 2**20
    assert chunked <= plain / 8


# --------------------------------------------------------------------------------------
# Splash (Pallas TPU kernel), checked on CPU in Pallas interpret mode (issue 10)
# --------------------------------------------------------------------------------------

@pytest.fixture
def interpret():
    with pltpu.force_tpu_interpret_mode():
        yield


@pytest.mark.parametrize("tq,tk,d,causal", [
    (200, 77, 64, False),  # cross-attention: 77 text keys padded to one block of 128,
                           # 200 queries padded to two
    (200, 200, 40, True),  # self-attention, padded length and head size, causal mask
])
def test_splash_matches_xla_in_interpret_mode(interpret, tq, tk, d, causal):
    q, k, v = (jnp.asarray(a) for a in qkv(b=2, tq=tq, tk=tk, h=1, d=d, seed=6))
    ref = _plain_xla(q, k, v, is_causal=causal)
    f = lambda q, k, v: dot_product_attention(  # noqa: E731
        q, k, v, is_causal=causal, implementation="splash")
    assert "pallas_call" in str(jax.make_jaxpr(f)(q, k, v))  # the kernel, not a fallback
    out = jax.jit(f)(q, k, v)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert rel_err(out, ref) <= 1e-5


def test_splash_falls_back_per_call(interpret):
    q, k, v = (jnp.asarray(a) for a in qkv(b=1, tq=9, tk=7, h=1, d=264, seed=7))
    assert resolve_implementation("splash", jnp.float32, 264) == "xla"  # head size > 256
    f = jax.jit(lambda q, k, v, mask=None: dot_product_attention(
        q, k, v, mask=mask, implementation="splash"))
    assert "pallas_call" not in str(jax.make_jaxpr(f)(q, k, v))
    assert rel_err(f(q, k, v), _plain_xla(q, k, v)) <= 1e-6
    q, k, v = (jnp.asarray(a) for a in qkv(tq=6, tk=6))
    mask = jnp.asarray(np.tril(np.ones((6, 6), bool)))  # boolean masks go through XLA
    assert "pallas_call" not in str(jax.make_jaxpr(f)(q, k, v, mask))
    assert rel_err(f(q, k, v, mask), _plain_xla(q, k, v, mask)) <= 1e-6


def test_splash_dispatch_and_blocks():
    assert splash_block_size(77) == 128 and splash_block_size(300) == 128
    assert splash_block_size(4096) == 512 and splash_block_size(16384) == 512
    assert splash_block_size(4608 - 64) == 512  # 64 padded tokens of 4544
    assert splash_block_size(1000) == 512  # 24 padded tokens
    assert splash_block_size(700) == 256  # 512 would pad 324 tokens, 256 pads 68
    assert splash_block_size(640) == 128  # 512 or 256 would pad 384 / 128 tokens
    tpu = dict(backend="tpu")
    assert resolve_implementation("auto", jnp.bfloat16, 64, q_tokens=4096, **tpu) == "splash"
    # merged self-attention (4,096 tokens halved) keeps the kernel
    assert resolve_implementation("auto", jnp.bfloat16, 64, q_tokens=2048, **tpu) == "splash"
    assert resolve_implementation("auto", jnp.bfloat16, 64, q_tokens=1023, **tpu) == "xla"
    assert resolve_implementation("auto", jnp.float32, 40, q_tokens=16384, **tpu) == "splash"
    assert resolve_implementation("auto", jnp.float32, 512, q_tokens=16384, **tpu) == "xla"
    assert resolve_implementation("auto", jnp.bfloat16, 64, q_tokens=16384,
                                  backend="gpu") == "cudnn"
    assert resolve_implementation("auto", jnp.float32, 64, q_tokens=16384,
                                  backend="cpu") == "xla"
    assert resolve_implementation("splash", jnp.float32, 64, **tpu) == "splash"


def test_splash_errors_outside_tpu():
    if jax.default_backend() == "tpu":
        pytest.skip("splash runs here")
    with pytest.raises(ValueError, match="splash attention needs a TPU .*interpret mode"):
        check_implementation("splash")
    q, k, v = qkv()
    with pytest.raises(ValueError, match="splash attention needs a TPU"):
        dot_product_attention(q, k, v, implementation="splash")
    with pltpu.force_tpu_interpret_mode():
        assert check_implementation("splash") == "splash"
