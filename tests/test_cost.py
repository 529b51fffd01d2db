"""retom_jax.analysis.cost and ``retom-jax bench cost``: XLA's counts of a whole call, each
step program counted as often as the loop runs it (compile-only, the demo architecture)."""
import json

import jax
import jax.numpy as jnp
import pytest

import retom_jax as rj
from retom_jax.analysis import cost


@pytest.fixture(scope="module")
def demo():
    return cost.abstract_pipeline("demo"), None  # the process-wide memo: the CLI test reuses it


def _program(rows, name):
    return next(r for r in rows if r.program == name)


def test_steps_scale_and_the_fused_loop_counts_its_body_once(demo):
    """Twice the steps add exactly the step program's count per extra step (PLMS: one
    UNet call more than steps); the fused program, compiled whole, counts its loop body
    once whatever the step count, which is why the pieces are counted apart."""
    from retom_jax.pipelines.request import SampleConfig

    pipe, memo = demo
    two = cost.pipeline_cost(pipe, height=64, width=64, steps=2, memo=memo)
    four = cost.pipeline_cost(pipe, height=64, width=64, steps=4, memo=memo)
    step = _program(two, "UNet step")
    assert step.runs == 3 and _program(four, "UNet step").runs == 5
    assert cost.per_image(four, 1)[0] - cost.per_image(two, 1)[0] == pytest.approx(
        2 * step.gflop)
    assert [r.program for r in two] == ["text encoding", "UNet step", "VAE decode"]

    static = SampleConfig(pipe.scheduler, 4, 1, (16, 16), True)
    state = pipe.scheduler.set_timesteps(4, (1, 4, 16, 16), jnp.float32)
    spec = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), a.dtype), t)  # noqa: E731
    cond = {"encoder_hidden_states": jax.ShapeDtypeStruct((2, 77, 32), jnp.float32)}
    g = {k: jax.ShapeDtypeStruct((), jnp.float32) for k in ("guidance_scale",
                                                           "guidance_rescale", "eta")}
    fused = jax.jit(pipe._sample, static_argnums=0).lower(
        static, spec({"unet": pipe.unet.params, "vae": pipe.vae.params}), cond,
        jax.ShapeDtypeStruct((1, 4, 16, 16), jnp.float32), state,
        jax.eval_shape(lambda: jax.random.key(0)), g).compile().cost_analysis()
    fused = (fused[0] if isinstance(fused, (list, tuple)) else fused)["flops"] / 1e9
    once = step.gflop + _program(two, "VAE decode").gflop
    assert fused == pytest.approx(once, rel=0.05)  # 5 UNet calls, counted as one


def test_step_cache_and_merging_counts(demo):
    pipe, memo = demo
    plain = cost.pipeline_cost(pipe, height=64, width=64, steps=4, memo=memo)
    cached = cost.pipeline_cost(pipe, height=64, width=64, steps=4, memo=memo,
                                step_cache=rj.StepCache(interval=2))
    full, shallow = _program(cached, "UNet step (full)"), _program(cached, "UNet step (shallow)")
    assert (full.runs, shallow.runs) == (3, 2)  # 5 PLMS calls: 0, 2, 4 full
    assert full.gflop == pytest.approx(_program(plain, "UNet step").gflop, rel=1e-3)
    assert shallow.gflop < 0.8 * full.gflop
    merged = cost.pipeline_cost(pipe, height=64, width=64, steps=4, memo=memo,
                                merge=rj.ToMe(ratio=0.5), step_cache=rj.StepCache(2))
    assert cost.per_image(merged, 1)[0] < cost.per_image(cached, 1)[0] < \
        cost.per_image(plain, 1)[0]


def test_bench_cost_cli(tmp_path, capsys):
    from retom_jax.cli import main

    out = tmp_path / "cost.json"
    assert main(["bench", "cost", "--model", "demo", "--steps", "2", "--step-cache", "1", "2",
                 "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert "bench cost --model demo" in data["meta"]["command"]
    rows = data["rows"]
    assert [(r["method"], r["step_cache"]) for r in rows] == [("none", None),
                                                              ("none", [2, 1])]
    assert rows[0]["flop_vs_base"] == 1.0 and rows[1]["flop_vs_base"] < 1.0
    assert all(r["gflop_per_image"] > 0 and r["gbytes_per_image"] > 0 for r in rows)
    assert "GFLOP/img" in capsys.readouterr().out
