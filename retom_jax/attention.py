"""One attention entry point for every model in the package.

`dot_product_attention` picks the kernel per call, from what is known at trace time:

- ``"cudnn"``: cuDNN flash attention through ``jax.nn.dot_product_attention``. Used by
  ``"auto"`` on GPU for fp16/bf16 inputs whose head size is a multiple of 8 and at most 128.
- ``"xla"``: the plain XLA formulation (softmax in float32). The fallback everywhere
  else: CPU, TPU, fp32, odd head sizes.

``implementation`` overrides the choice (benchmarks compare the two). It is a static,
hashable string, so it can be a ``jax.jit`` static argument.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "cudnn", "xla")


def check_implementation(implementation: str) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}"
        )
    return implementation


def cudnn_supports(dtype, head_dim: int) -> bool:
    """Whether cuDNN flash attention accepts this dtype and head size."""
    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and (
        head_dim % 8 == 0 and head_dim <= 128
    )


def resolve_implementation(implementation: str, dtype, head_dim: int) -> str:
    """The kernel a call will use: ``"cudnn"`` or ``"xla"``."""
    check_implementation(implementation)
    if implementation == "auto":
        on_gpu = jax.default_backend() == "gpu"
        return "cudnn" if on_gpu and cudnn_supports(dtype, head_dim) else "xla"
    if implementation == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(f"cuDNN attention needs a GPU; this JAX backend is "
                         f"{jax.default_backend()!r}: use attention='auto' or 'xla'")
    if implementation == "cudnn" and not cudnn_supports(dtype, head_dim):
        raise ValueError(
            f"cuDNN attention needs fp16/bf16 and a head size that is a multiple of 8 "
            f"and at most 128; got {jnp.dtype(dtype).name} with head size {head_dim}"
        )
    return implementation


def dot_product_attention(q, k, v, *, mask=None, is_causal=False, implementation="auto"):
    """Multi-head attention on ``[batch, tokens, heads, head_dim]`` arrays.

    Scale is ``head_dim ** -0.5``. ``mask`` (optional) is a boolean array broadcastable to
    ``[batch, heads, q_tokens, kv_tokens]``, True where attention is allowed.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention expects [batch, tokens, heads, head_dim] arrays, got shapes "
            f"{q.shape}, {k.shape}, {v.shape}"
        )
    impl = resolve_implementation(implementation, q.dtype, q.shape[-1])
    if impl == "cudnn" and mask is not None:
        impl = "xla"  # arbitrary boolean masks go through XLA
    dtype = q.dtype
    if impl == "xla" and dtype == jnp.float16 and jax.default_backend() == "cpu":
        # XLA:CPU has no fp16 dot with fp32 accumulation: compute in fp32 there.
        q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                       implementation=impl)
    return out.astype(dtype)
