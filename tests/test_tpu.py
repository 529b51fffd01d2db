"""TPU compiles from a CPU host (retom_jax.analysis.tpu), the roofline model, and attention
following its compile target (splash through shard_map on a mesh).

The compile tests need the ``libtpu`` package (the ``test`` extra installs it) and skip
without it; the sharded-splash test runs in Pallas interpret mode on 8 host CPU devices
in a subprocess (tests/tpu_cases.py).
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from retom_jax.models import attention
from retom_jax.analysis import roofline

ROOT = Path(__file__).resolve().parent.parent
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install 'jax[tpu]')")

# A compiled TPU program's shape: a 10-step loop around a 4096^2 matmul (fori_loop).
LOOP_HLO = """HloModule jit_f, entry_computation_layout={(bf16[4096,4096]{1,0})->bf16[4096,4096]{1,0}}

%body (arg: (s32[], bf16[4096,4096], bf16[4096,4096])) -> (s32[], bf16[4096,4096], bf16[4096,4096]) {
  %arg = (s32[]{:T(128)}, bf16[4096,4096]{1,0:T(8,128)(2,1)}, bf16[4096,4096]{1,0:T(8,128)(2,1)}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%arg), index=0
  %x = bf16[4096,4096]{1,0:T(8,128)(2,1)} get-tuple-element(%arg), index=1
  %w = bf16[4096,4096]{1,0:T(8,128)(2,1)} get-tuple-element(%arg), index=2
  %one = s32[]{:T(128)} constant(1)
  %next = s32[]{:T(128)} add(%i, %one)
  %y = bf16[4096,4096]{1,0:T(8,128)(2,1)} convolution(%x, %w), dim_labels=bf_io->bf
  ROOT %t = (s32[]{:T(128)}, bf16[4096,4096]{1,0:T(8,128)(2,1)}, bf16[4096,4096]{1,0:T(8,128)(2,1)}) tuple(%next, %y, %w)
}

%cond (arg.1: (s32[], bf16[4096,4096], bf16[4096,4096])) -> pred[] {
  %arg.1 = (s32[]{:T(128)}, bf16[4096,4096]{1,0:T(8,128)(2,1)}, bf16[4096,4096]{1,0:T(8,128)(2,1)}) parameter(0)
  %n = s32[]{:T(128)} constant(10)
  %j = s32[]{:T(128)} get-tuple-element(%arg.1), index=0
  ROOT %lt = pred[]{:T(512)} compare(%j, %n), direction=LT
}

ENTRY %main (a: bf16[4096,4096]) -> bf16[4096,4096] {
  %a = bf16[4096,4096]{1,0:T(8,128)(2,1)} parameter(0)
  %zero = s32[]{:T(128)} constant(0)
  %init = (s32[]{:T(128)}, bf16[4096,4096]{1,0:T(8,128)(2,1)}, bf16[4096,4096]{1,0:T(8,128)(2,1)}) tuple(%zero, %a, %a)
  %loop = (s32[]{:T(128)}, bf16[4096,4096]{1,0:T(8,128)(2,1)}, bf16[4096,4096]{1,0:T(8,128)(2,1)}) while(%init), condition=%cond, body=%body
  %small = bf16[2,40]{1,0:T(8,128)(2,1)} parameter(1)
  %k = bf16[40,40]{1,0:T(8,128)(2,1)} parameter(2)
  %d = bf16[2,40]{1,0:T(8,128)(2,1)} dot(%small, %k), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %out = bf16[4096,4096]{1,0:T(8,128)(2,1)} get-tuple-element(%loop), index=1
}
"""


def test_roofline_counts_loop_trips_and_tiles():
    r = roofline.roofline(LOOP_HLO, peak_flops=1e14, hbm_bandwidth=1e12)
    matmul = 2 * 4096 ** 3
    small = 2 * 8 * 128 * 128  # [2, 40] x [40, 40] padded to the (8, 128) tile
    assert r.loops == 1 and r.unknown_trip_counts == 0
    assert r.flops == pytest.approx(10 * matmul + small)
    # each step reads x and w and writes y: 3 x 32 MiB, ten times
    assert r.bytes >= 10 * 3 * 4096 * 4096 * 2
    assert r.compute_seconds >= 10 * matmul / 1e14


def test_padded_dims_follow_the_layout():
    assert roofline.shapes_in("f32[3,40]{1,0:T(8,128)}", padded=True) == [("f32", (8, 128))]
    assert roofline.shapes_in("f32[3,40]{0,1:T(8,128)}", padded=True) == [("f32", (128, 40))]
    assert roofline.nbytes("bf16[4,4]{1,0:T(8,128)(2,1)S(1)}") == 0  # in VMEM


class _Device:
    platform = "tpu"


def test_attention_follows_the_compile_target():
    # on this CPU host "auto" picks XLA; traced for TPU devices it picks splash
    assert attention.resolve_implementation("auto", jnp.bfloat16, 64, q_tokens=4096) == "xla"
    with attention.target(devices=[_Device()]):
        assert attention.target_platform() == "tpu"
        assert attention.resolve_implementation("auto", jnp.bfloat16, 64,
                                                q_tokens=4096) == "splash"
        assert attention.check_implementation("splash") == "splash"
    assert attention.target_platform() == "cpu"
    with attention.target():  # no target: the host's backend
        assert attention.resolve_implementation("auto", jnp.bfloat16, 64,
                                                q_tokens=4096) == "xla"


@pytest.fixture(scope="module")
def sharded_cases(tmp_path_factory):
    out = tmp_path_factory.mktemp("tpu") / "cases.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-m", "tests.tpu_cases", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_sharded_splash_equals_xla_attention(sharded_cases):
    for case in sharded_cases:
        assert case["max_err"] < 1e-4, case
        # the kernel runs per shard: q, k and v are never gathered
        assert case["collectives"]["all-gather"] == 0 or "spatial" in case["mesh"], case
    specs = {c["mesh"] + str(c["shape"]): c["q_spec"] for c in sharded_cases}
    assert specs["data=8[8, 256, 2, 64]"] == "P('data', None, None, None)"
    assert specs["data=8[2, 256, 8, 64]"] == "P(None, None, 'data', None)"
    assert specs["data=2,spatial=4[4, 512, 2, 64]"] == \
        "P('data', 'spatial', None, None)"


@needs_libtpu
def test_demo_pipeline_compiles_for_a_v5e_slice():
    """Deliverable 5: the demo pipeline compiled for a v5e-4 on data=4 at 256 px (the demo
    VAE halves twice: 64x64 = 4,096 latent tokens at the top level, so splash is chosen)."""
    from retom_jax.analysis import tpu

    row = tpu.compile_row("pipeline", "demo", "v5e:2x2", "data=4", "retom", size=256,
                          batch=4, steps=2)
    assert row["compiled"] is True, row["compiled"]
    assert row["chips"] == 4 and row["chip"] == "v5e"
    assert row["splash"]  # 4,096+ tokens at the top level on a TPU target
    assert 0 < row["per_chip_bytes"] < row["hbm_bytes"] and row["fits"]
    assert row["argument_bytes"] > 0 and row["temp_bytes"] > 0 and row["output_bytes"] > 0
    assert row["xla_flops"] > 0 and row["xla_bytes_accessed"] > 0
    assert row["estimate_s"] > 0 and row["estimate_source"] == "roofline"
    assert row["loops"] >= 1 and row["unknown_trip_counts"] == 0  # the sampling loop
    assert row["collectives"]["all-gather"] == 0  # data parallel: no gathers at all


@needs_libtpu
def test_estimate_validates_on_a_known_matmul():
    from retom_jax.analysis import tpu

    v = tpu.validate_estimate("v5e:2x2", n=8192)  # compute-bound: 5.6 ms at the peak
    assert v["matmul"]["roofline_s"] == pytest.approx(v["matmul"]["ideal_s"], rel=0.05)
    assert v["matmul"]["xla_optimal_seconds"] == pytest.approx(v["matmul"]["ideal_s"],
                                                               rel=0.05)
    # XLA counts a loop body once; the roofline applies the trip count
    assert v["matmul_x10_loop"]["roofline_s"] == pytest.approx(
        v["matmul_x10_loop"]["ideal_s"], rel=0.15)


ASYNC_HLO = """HloModule jit_g

ENTRY %main (a: f32[2,4096,32]) -> f32[1,4096,32] {
  %a = f32[2,4096,32]{2,1,0:T(8,128)} parameter(0)
  %s = ((f32[2,4096,32]{2,1,0:T(8,128)}), f32[1,4096,32]{2,1,0:T(8,128)S(1)}, s32[]{:S(2)}) slice-start(%a), slice={[0:1], [0:4096], [0:32]}
  %sd = f32[1,4096,32]{2,1,0:T(8,128)S(1)} slice-done(%s)
  %c = (f32[1,4096,32]{2,1,0:T(8,128)}, f32[1,4096,32]{2,1,0:T(8,128)S(1)}, u32[]{:S(2)}) copy-start(%sd)
  ROOT %cd = f32[1,4096,32]{2,1,0:T(8,128)} copy-done(%c)
}
"""


def test_async_copies_count_what_they_move():
    """A slice into VMEM reads the slice (not the whole source), a copy out of VMEM
    writes its array once; the -done halves move nothing more."""
    r = roofline.roofline(ASYNC_HLO, peak_flops=1e14, hbm_bandwidth=1e12)
    one = 4096 * 128 * 4  # f32[1, 4096, 32] padded to 128 lanes
    assert r.bytes == pytest.approx(2 * one)
    assert sum(r.by_source.values()) == pytest.approx(r.seconds)
    assert set(r.by_source) == {"slice-start", "copy-start"}


SPLASH_HLO = """HloModule jit_h

ENTRY %main (q: bf16[16,2048,128], k: bf16[16,2048,128], v: bf16[16,2048,128]) -> bf16[16,2048,128] {
  %m = s8[1,4,4]{2,1,0:T(4,128)(4,1)} parameter(3)
  %q = bf16[16,2048,128]{2,1,0:T(8,128)(2,1)} parameter(0)
  %k = bf16[16,2048,128]{2,1,0:T(8,128)(2,1)} parameter(1)
  %v = bf16[16,2048,128]{2,1,0:T(8,128)(2,1)} parameter(2)
  %splash_mha_fwd_no_residuals.3 = (f32[512,128]{1,0:T(8,128)}, bf16[16,2048,128]{2,1,0:T(8,128)(2,1)}) custom-call(%m, %m, %q, %k, %v), custom_call_target="tpu_custom_call"
  ROOT %o = bf16[16,2048,128]{2,1,0:T(8,128)(2,1)} get-tuple-element(%splash_mha_fwd_no_residuals.3), index=1
}
"""


def test_splash_kernels_count_their_flops():
    """A splash call is known by its name; its flops come from q and k, not from the int8
    block masks that come first among its operands."""
    r = roofline.roofline(SPLASH_HLO, peak_flops=1e14, hbm_bandwidth=1e12)
    assert r.splash_calls == 1
    assert r.flops == pytest.approx(4 * 16 * 2048 * 2048 * 128)


@needs_libtpu
def test_vae_decoder_keeps_activations_split_by_images(monkeypatch):
    """SD's VAE decoder (`--program decode`) compiled for a v5e-4, four 512 px images, one
    per chip: on fsdp=4 (kernels split) a chip holds no more temporaries than on data=4
    (kernels whole), because the activations stay split by images between layers
    (`VAE._constrain`). Without that, XLA splits them by channels after the split kernels
    and gathers them back, and the temporaries grow (checked too, so the test can fail)."""
    from retom_jax.analysis import tpu
    from retom_jax.models.vae import VAE

    def temps(mesh_text):
        row = tpu.compile_row("decode", "sd15", "v5e:2x2", mesh_text, "none", size=512,
                              batch=4)
        assert row["compiled"] is True, row["compiled"]
        return row["temp_bytes"]

    data, fsdp = temps("data=4"), temps("data=1,fsdp=4")  # 965 / 956 MB with libtpu 0.0.42
    assert fsdp <= 1.05 * data, (fsdp, data)
    monkeypatch.setattr(VAE, "_constrain", lambda self: (lambda x: x))
    assert temps("data=1,fsdp=4") > 2 * data  # 2,729 MB
