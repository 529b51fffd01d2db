"""The attention dispatch: kernel choice, numerics against torch SDPA, and its errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retom_jax.attention import cudnn_supports, dot_product_attention, resolve_implementation
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
