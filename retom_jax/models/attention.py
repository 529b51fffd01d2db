"""One attention entry point for every model in the package.

`dot_product_attention` picks the kernel per call, from what is known at trace time:

- ``"cudnn"``: cuDNN flash attention through ``jax.nn.dot_product_attention``. Used by
  ``"auto"`` on GPU for fp16/bf16 inputs whose head size is a multiple of 8 and at most 128.
- ``"splash"``: the Pallas TPU splash attention kernel
  (``jax.experimental.pallas.ops.tpu.splash_attention``), which never materialises the
  logits. Used by ``"auto"`` on TPU when the query sequence has at least
  `SPLASH_MIN_TOKENS` tokens and the head size is at most `SPLASH_MAX_HEAD_DIM`. Block
  sizes come from the sequence lengths (`splash_block_size`); sequences are padded to a
  whole number of blocks (padded keys are masked out through segment ids, padded queries
  are dropped) and head sizes to a multiple of 128 lanes (zero columns, which change no
  logit). Outside a TPU it runs only in Pallas interpret mode
  (``with jax.experimental.pallas.tpu.force_tpu_interpret_mode(): ...``), slowly: that is
  how the tests check it on CPU.
- ``"xla"``: the plain XLA formulation (softmax in float32). The fallback everywhere
  else: CPU, TPU below `SPLASH_MIN_TOKENS`, fp32 on GPU, odd head sizes, boolean masks.
  When the float32 logits of a call (``batch * heads * q_tokens * kv_tokens * 4`` bytes)
  exceed `XLA_CHUNK_BYTES`, the queries are processed in chunks (a ``lax.map`` over query
  blocks, each block's softmax exact over all keys), so at most about `XLA_CHUNK_BYTES`
  of logits are live at once. The choice is static (from shapes), so it never recompiles.

``implementation`` overrides the choice (benchmarks compare them). It is a static,
hashable string, so it can be a ``jax.jit`` static argument.

The platform that decides is the one a program is compiled FOR, not the host's: inside
``with target(mesh):`` (models given a ``mesh`` enter it around their forward pass) it is
the mesh devices' platform, so a program compiled for TPU devices from a CPU host (``jax.
experimental.topologies``, ``retom_jax.analysis.tpu``) picks splash. On a mesh of more than
one device, splash runs per shard through ``jax.shard_map`` (`sharded_splash_attention`):
the batch split over ``data`` x ``fsdp`` (or the heads, when the batch does not divide),
the queries' tokens over ``spatial`` (keys and values whole there), so XLA never gathers
q, k and v around the kernel.
"""
from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
from jax import lax

IMPLEMENTATIONS = ("auto", "cudnn", "xla", "splash")

# The XLA path chunks its queries when one call's float32 logits would exceed this many
# bytes. A module-level setting read at trace time: change it before a function is traced
# (``retom_jax.attention.XLA_CHUNK_BYTES = ...``; ``math.inf`` turns chunking off), or pass
# ``chunk_bytes=`` to `dot_product_attention`.
XLA_CHUNK_BYTES = 1 << 28  # 256 MiB

# "auto" picks splash on TPU from this many query tokens on (XLA below). Low enough that
# merged self-attention keeps the kernel: at 4,096 a 64 x 64 grid merged by half (2,048
# tokens) fell back to XLA, which writes its float32 logits to HBM, and the roofline
# estimate of the merged UNet call on a v5e came out 14x the unmerged one.
SPLASH_MIN_TOKENS = 1024
# Head sizes above this fall back to XLA (the kernel's VMEM tiles grow with the head size).
SPLASH_MAX_HEAD_DIM = 256
# Candidate block sizes along a sequence, largest first (multiples of the 128 lanes).
SPLASH_BLOCKS = (512, 256, 128)
_LANES = 128


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def splash_interpret_mode() -> bool:
    """Whether Pallas TPU kernels run interpreted here
    (``jax.experimental.pallas.tpu.force_tpu_interpret_mode()`` is active)."""
    try:
        from jax._src import config as jax_config  # the flag has no public reader
    except ImportError:  # pragma: no cover - a JAX without it
        return False
    flag = getattr(jax_config, "pallas_tpu_interpret_mode_context_manager", None)
    return flag is not None and bool(flag.value)


# The compile target of the code being traced: (platform, mesh or None), or None (the host's
# default backend). Set by `target`.
_TARGET: contextvars.ContextVar = contextvars.ContextVar("retom_jax_attention_target",
                                                         default=None)


def _platform_of(devices) -> str:
    platform = devices[0].platform
    return "gpu" if platform in ("cuda", "rocm") else platform


@contextlib.contextmanager
def target(mesh=None, devices=None):
    """Trace attention for ``mesh`` (a ``jax.sharding.Mesh``) or ``devices``: ``"auto"``
    picks the kernel for their platform (a TPU mesh on a CPU host: splash), and splash on a
    mesh of several devices runs through ``shard_map``. ``target()`` (nothing) is a no-op.
    Read at trace time: enter it around ``jax.jit(f).lower(...)`` or inside the traced
    function (a jitted function traced once keeps the kernel it traced with)."""
    if mesh is None and devices is None:
        yield
        return
    devices = list(mesh.devices.flat) if mesh is not None else list(devices)
    token = _TARGET.set((_platform_of(devices), mesh if mesh is not None and mesh.size > 1
                         else None))
    try:
        yield
    finally:
        _TARGET.reset(token)


def target_platform() -> str:
    """The platform attention is traced for: the active `target`'s, else the host's
    ``jax.default_backend()``."""
    current = _TARGET.get()
    return current[0] if current is not None else jax.default_backend()


def target_mesh():
    """The active `target`'s mesh when it has more than one device (else None)."""
    current = _TARGET.get()
    return current[1] if current is not None else None


def _splash_unavailable() -> str | None:
    """Why splash attention cannot run here (None if it can)."""
    if target_platform() == "tpu" or splash_interpret_mode():
        return None
    return (f"splash attention needs a TPU (or Pallas interpret mode: "
            f"jax.experimental.pallas.tpu.force_tpu_interpret_mode()); this JAX backend is "
            f"{target_platform()!r}: use attention='auto' or 'xla'")


def check_implementation(implementation: str) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}"
        )
    if implementation == "splash" and (why := _splash_unavailable()):
        raise ValueError(why)
    return implementation


def cudnn_supports(dtype, head_dim: int) -> bool:
    """Whether cuDNN flash attention accepts this dtype and head size."""
    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and (
        head_dim % 8 == 0 and head_dim <= 128
    )


def splash_supports(head_dim: int) -> bool:
    """Whether the splash path takes this head size (else the call goes through XLA)."""
    return 0 < head_dim <= SPLASH_MAX_HEAD_DIM


def splash_block_size(tokens: int) -> int:
    """Block size for a sequence of ``tokens``: the largest of `SPLASH_BLOCKS` whose padding
    adds at most an eighth of the sequence (the smallest block otherwise)."""
    for block in SPLASH_BLOCKS:
        if (_round_up(tokens, block) - tokens) * 8 <= tokens:
            return block
    return SPLASH_BLOCKS[-1]


def resolve_implementation(implementation: str, dtype, head_dim: int, q_tokens: int = 0,
                           backend: str | None = None) -> str:
    """The kernel a call will use: ``"cudnn"``, ``"splash"`` or ``"xla"``.

    ``q_tokens``: the query sequence length (``"auto"`` picks splash on TPU from
    `SPLASH_MIN_TOKENS` on). ``backend`` defaults to `target_platform` (the compile
    target's platform inside `target`, else ``jax.default_backend()``).
    """
    if implementation not in IMPLEMENTATIONS:
        check_implementation(implementation)
    backend = backend or target_platform()
    if implementation == "auto":
        if backend == "gpu":
            return "cudnn" if cudnn_supports(dtype, head_dim) else "xla"
        if backend == "tpu" and q_tokens >= SPLASH_MIN_TOKENS and splash_supports(head_dim):
            return "splash"
        return "xla"
    if implementation == "cudnn" and backend != "gpu":
        raise ValueError(f"cuDNN attention needs a GPU; this JAX backend is "
                         f"{backend!r}: use attention='auto' or 'xla'")
    if implementation == "cudnn" and not cudnn_supports(dtype, head_dim):
        raise ValueError(
            f"cuDNN attention needs fp16/bf16 and a head size that is a multiple of 8 "
            f"and at most 128; got {jnp.dtype(dtype).name} with head size {head_dim}"
        )
    if implementation == "splash":
        if backend != "tpu" and not splash_interpret_mode():
            check_implementation("splash")  # raises its one-line error
        return "splash" if splash_supports(head_dim) else "xla"  # per call
    return implementation


def dot_product_attention(q, k, v, *, mask=None, is_causal=False, implementation="auto",
                          chunk_bytes=None):
    """Multi-head attention on ``[batch, tokens, heads, head_dim]`` arrays.

    Scale is ``head_dim ** -0.5``. ``mask`` (optional) is a boolean array broadcastable to
    ``[batch, heads, q_tokens, kv_tokens]``, True where attention is allowed.
    ``chunk_bytes``: the XLA path's chunking threshold (default `XLA_CHUNK_BYTES`).
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention expects [batch, tokens, heads, head_dim] arrays, got shapes "
            f"{q.shape}, {k.shape}, {v.shape}"
        )
    impl = resolve_implementation(implementation, q.dtype, q.shape[-1], q_tokens=q.shape[1])
    if impl in ("cudnn", "splash") and mask is not None:
        impl = "xla"  # arbitrary boolean masks go through XLA
    dtype = q.dtype
    if impl == "splash":
        mesh = target_mesh()
        if mesh is not None:
            return sharded_splash_attention(q, k, v, mesh, is_causal=is_causal).astype(dtype)
        return splash_attention(q, k, v, is_causal=is_causal).astype(dtype)
    if impl == "cudnn":
        out = jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation="cudnn")
        return out.astype(dtype)
    if dtype == jnp.float16 and target_platform() == "cpu":
        # XLA:CPU has no fp16 dot with fp32 accumulation: compute in fp32 there.
        q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    out = xla_attention(q, k, v, mask=mask, is_causal=is_causal, chunk_bytes=chunk_bytes)
    return out.astype(dtype)


# --------------------------------------------------------------------------------------
# XLA, chunked over queries when the logits are large
# --------------------------------------------------------------------------------------

def xla_chunk_size(batch: int, heads: int, q_tokens: int, kv_tokens: int,
                   chunk_bytes=None) -> int:
    """Query tokens per chunk of the XLA path (``q_tokens``: no chunking). The chunk count
    is the float32 logit bytes over the threshold, rounded up; chunks are as even as
    possible (the last one may be shorter)."""
    limit = XLA_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    logit_bytes = batch * heads * q_tokens * kv_tokens * 4
    if logit_bytes <= limit or q_tokens <= 1:
        return q_tokens
    chunks = min(q_tokens, math.ceil(logit_bytes / max(limit, 1)))
    return -(-q_tokens // chunks)


def _plain(q, k, v, mask, is_causal):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                        implementation="xla")


def xla_attention(q, k, v, *, mask=None, is_causal=False, chunk_bytes=None):
    """XLA attention; queries in chunks of `xla_chunk_size` when the logits are large.

    Each chunk is the plain formulation on a slice of the queries (its softmax runs over
    every key), so the result equals the unchunked one: a causal mask becomes an explicit
    mask with the chunk's query offset.
    """
    b, tq, h, _ = q.shape
    tk = k.shape[1]
    size = xla_chunk_size(b, h, tq, tk, chunk_bytes)
    if size >= tq:
        return _plain(q, k, v, mask, is_causal)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.ndim > 4:
            raise ValueError(f"mask must broadcast to [batch, heads, q_tokens, kv_tokens], "
                             f"got shape {mask.shape}")
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    per_query_mask = mask is not None and mask.shape[2] != 1

    def chunk(q_part, mask_part, start):
        n = q_part.shape[1]
        m = mask_part if mask is not None else None
        if is_causal:
            causal = (start + lax.iota(jnp.int32, n))[:, None] >= lax.iota(jnp.int32, tk)[None, :]
            m = causal[None, None] if m is None else jnp.logical_and(m, causal)
        return _plain(q_part, k, v, m, False)

    full = tq // size
    head = full * size
    qs = jnp.moveaxis(q[:, :head].reshape(b, full, size, *q.shape[2:]), 1, 0)
    if per_query_mask:
        ms = mask[:, :, :head].reshape(*mask.shape[:2], full, size, tk)
        ms = jnp.moveaxis(ms, 2, 0)
    else:
        ms = jnp.zeros((full,), jnp.bool_)  # placeholder, the whole mask is closed over
    starts = jnp.arange(full, dtype=jnp.int32) * size

    def body(args):
        q_part, m_part, start = args
        return chunk(q_part, m_part if per_query_mask else mask, start)

    out = lax.map(body, (qs, ms, starts))  # [full, b, size, h, d]
    out = jnp.moveaxis(out, 0, 1).reshape(b, head, *out.shape[3:])
    if head < tq:
        tail_mask = mask[:, :, head:] if per_query_mask else mask
        out = jnp.concatenate([out, chunk(q[:, head:], tail_mask, head)], axis=1)
    return out


# --------------------------------------------------------------------------------------
# Splash (Pallas, TPU)
# --------------------------------------------------------------------------------------

def splash_attention(q, k, v, *, is_causal=False, interpret=False):
    """Splash attention on ``[batch, tokens, heads, head_dim]`` arrays (scale
    ``head_dim ** -0.5``), padded to whole blocks and 128-lane head sizes and cut back.

    Batch and heads are folded into the kernel's head axis. Padded keys get segment id 1
    (queries have 0), so no real query attends to them; padded queries are dropped.
    ``interpret=True``: Pallas's generic interpreter (any backend, several devices; the
    TPU interpret mode of ``force_tpu_interpret_mode`` overrides it).
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, tq, h, d = q.shape
    tk = k.shape[1]
    if k.shape != (b, tk, h, d) or v.shape[:3] != (b, tk, h):
        raise ValueError(f"splash attention needs q/k/v of one batch, head count and head "
                         f"size; got {q.shape}, {k.shape}, {v.shape}")
    dv = v.shape[-1]
    bq, bkv = splash_block_size(tq), splash_block_size(tk)
    tq_pad, tk_pad = _round_up(tq, bq), _round_up(tk, bkv)
    d_pad, dv_pad = _round_up(d, _LANES), _round_up(dv, _LANES)

    def fold(x, tokens, width):  # [b, t, h, e] -> [b*h, tokens, width], zero padded
        x = jnp.pad(x, ((0, 0), (0, tokens - x.shape[1]), (0, 0), (0, width - x.shape[3])))
        return jnp.swapaxes(x, 1, 2).reshape(b * h, tokens, width)

    scaled = (q.astype(jnp.float32) * (d ** -0.5)).astype(q.dtype)
    qf, kf, vf = fold(scaled, tq_pad, d_pad), fold(k, tk_pad, d_pad), fold(v, tk_pad, dv_pad)
    shape = (tq_pad, tk_pad)
    head_mask = sa.CausalMask(shape) if is_causal else sa.FullMask(shape)
    blocks = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                           block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                           block_q_dq=bq, block_kv_dq=bkv)
    kernel = sa.make_splash_mha(sa.MultiHeadMask([head_mask] * (b * h)), block_sizes=blocks,
                                head_shards=1, q_seq_shards=1, interpret=interpret)
    segments = None
    if tk_pad != tk:
        segments = sa.SegmentIds(q=jnp.zeros((tq_pad,), jnp.int32),
                                 kv=(jnp.arange(tk_pad) >= tk).astype(jnp.int32))
    out = kernel(qf, kf, vf, segments)  # [b*h, tq_pad, dv_pad]
    out = out.reshape(b, h, tq_pad, dv_pad)[:, :, :tq, :dv]
    return jnp.swapaxes(out, 1, 2)


def splash_partition(mesh, batch: int, heads: int, q_tokens: int, is_causal: bool = False):
    """``(q_spec, kv_spec)``: how `sharded_splash_attention` splits ``[batch, tokens, heads,
    head_dim]`` arrays over ``mesh``. The batch goes over the mesh's ``data`` and ``fsdp``
    axes (size > 1) when it divides, else the heads do when they divide, else those axes
    replicate the call; the query tokens go over ``spatial`` when it divides them (not for
    a causal mask, whose offsets a token split would change); keys and values stay whole
    along tokens (each query shard attends to every key)."""
    from jax.sharding import PartitionSpec as P

    sizes = dict(mesh.shape)
    axes = tuple(a for a in ("data", "fsdp") if sizes.get(a, 1) > 1)
    n = math.prod(sizes[a] for a in axes)
    group = None if not axes else axes[0] if len(axes) == 1 else axes
    b_axis = group if group is not None and batch % n == 0 else None
    h_axis = group if b_axis is None and group is not None and heads % n == 0 else None
    s = sizes.get("spatial", 1)
    t_axis = "spatial" if s > 1 and not is_causal and q_tokens % s == 0 else None
    return P(b_axis, t_axis, h_axis, None), P(b_axis, None, h_axis, None)


def sharded_splash_attention(q, k, v, mesh, *, is_causal=False, interpret=False):
    """`splash_attention` on each shard of ``mesh`` (``jax.shard_map``, split by
    `splash_partition`): the kernel sees its shard's batch rows / heads and query tokens.
    ``interpret``: as `splash_attention`'s (how the tests run it on host CPU devices)."""
    q_spec, kv_spec = splash_partition(mesh, q.shape[0], q.shape[2], q.shape[1], is_causal)

    def local(q, k, v):
        return splash_attention(q, k, v, is_causal=is_causal, interpret=interpret)

    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec),
                         out_specs=q_spec, check_vma=False)(q, k, v)
