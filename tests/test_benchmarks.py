"""Smoke tests of the benchmark scripts (their CPU/tiny presets, cut down further).

They check that each script runs, writes JSON with the documented fields and has a row
for every requested method. No timing is asserted: CPU timings here mean nothing.
"""
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import attention_memory  # noqa: E402
import common  # noqa: E402
import device_check  # noqa: E402
import merge_cost  # noqa: E402
import merge_overhead  # noqa: E402
import pipeline_speed  # noqa: E402
import plot  # noqa: E402
import report  # noqa: E402
import torch_unet_speed  # noqa: E402
import unet_speed  # noqa: E402

META_KEYS = {"benchmark", "date", "command", "versions", "settings", "complete"}
UNET_ROW_KEYS = {"framework", "model", "height", "width", "batch", "method", "ratio",
                 "median_ms", "p10_ms", "p90_ms", "iters", "compile_s", "peak_gb"}


def read(path):
    data = json.loads(Path(path).read_text())
    assert META_KEYS <= set(data["meta"]), data["meta"].keys()
    assert data["meta"]["complete"] is True
    return data


def test_free_merge_probe_shapes():
    x = jnp.arange(2 * 16 * 3, dtype=jnp.float32).reshape(2, 16, 3)
    for ratio, kept in ((0.3, 12), (0.5, 8), (0.75, 4)):
        merge, unmerge = common.FreeMerge(ratio=ratio).plan(x, (4, 4))
        m = merge(x)
        assert m.shape == (2, kept, 3)
        np.testing.assert_array_equal(m, x[:, :kept])
        assert unmerge(m).shape == x.shape
    assert common.FreeToDo(factor=2).downsample(x, (4, 4)).shape == (2, 4, 3)


def test_merge_cost_tiny(tmp_path):
    """merge_cost.py compiles one tiny UNet call per method (never run) and rates its XLA
    cost against the FreeMerge probe."""
    out = tmp_path / "cost.json"
    assert merge_cost.main(["--model", "sd15-tiny", "--size", "64", "--methods", "retom",
                            "--out", str(out)]) == 0
    rows = {r["method"]: r for r in read(out)["rows"]}
    assert list(rows) == ["free", "retom"]
    assert rows["free"]["flops_vs_free"] == 1.0
    assert rows["retom"]["flops"] > 0 and rows["retom"]["bytes_vs_free"] > 0


def test_device_check_tiny(tmp_path):
    """bf16 against the float32 reference on the same (rounded) weights: close, not equal."""
    out = tmp_path / "dc.json"
    assert device_check.main(["--preset", "tiny", "--out", str(out)]) == 0
    data = read(out)
    assert data["meta"]["benchmark"] == "device_check"
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"none", "retom", "tome"}
    for r in rows.values():  # merged rows may also pick a few other tokens in bf16
        assert r.get("error") is None and r["finite"], r
        assert 1e-4 < r["rel_err"] < (3e-2 if r["method"] == "none" else 0.1), r
    assert 0.9 <= rows["retom"]["same_plan"] <= 1.0


def test_pipeline_speed_tiny(tmp_path):
    """Seconds per image on the demo pipeline, then the compile-only mode: one row per
    method each, and the timed run's programs are not compiled again by its repeats."""
    out, only = tmp_path / "p.json", tmp_path / "c.json"
    common_args = ["--preset", "tiny", "--steps", "2", "--methods", "none", "retom"]
    assert pipeline_speed.main(common_args + ["--repeats", "2", "--warmup", "0",
                                              "--out", str(out)]) == 0
    rows = read(out)["rows"]
    assert [r["method"] for r in rows] == ["none", "retom"]
    for r in rows:
        assert r.get("error") is None, r
        assert r["compile_s"] > 0 and r["median_s"] > 0 and r["repeats"] == 2
        assert r["first_call_s"] >= r["compile_s"]
    assert pipeline_speed.main(common_args + ["--compile-only", "--out", str(only)]) == 0
    rows = read(only)["rows"]
    assert [r["method"] for r in rows] == ["none", "retom"]
    assert all(r["compile_s"] > 0 and "median_s" not in r for r in rows), rows


def test_merge_overhead_cpu_through_the_cli(tmp_path):
    from retom_jax import cli

    out = tmp_path / "mo.json"
    assert cli.main(["bench", "merge", "--preset", "cpu", "--tokens", "64", "--ratios", "0.5",
                     "--iters", "2", "--warmup", "0", "--rotate", "1", "--out", str(out)]) == 0
    data = read(out)
    assert data["meta"]["benchmark"] == "merge_overhead"
    assert data["meta"]["device"]["backend"] == "cpu"
    rows = data["rows"]
    assert {r["method"] for r in rows} == set(merge_overhead.METHODS)
    for r in rows:
        assert r.get("error") is None, r
        assert r["median_ms"] > 0 and r["tokens"] == 64 and r["compile_s"] >= 0
        if r["method"] not in ("none", "free", "free_todo"):
            assert {"saved_ms", "overhead_ms", "overhead_pct_of_saving", "free_ms"} <= set(r)
        if r["method"].startswith("retom") and r["overhead_pct_of_saving"] is not None:
            assert isinstance(r["goal_met"], bool)
    assert "| tokens |" in report.merge_overhead_table(rows)


@pytest.fixture(scope="module")
def unet_results(tmp_path_factory):
    """Tiny UNet runs: SD-shaped with ToMe, ReToM and ToDo; SDXL-shaped with ToMe (which
    merges nothing there) and cached ReToM (at its first attention level); the torch peer
    (if installed). Nine compiled programs in all: about 45 s of this CPU."""
    tmp = tmp_path_factory.mktemp("unet")
    sd, xl, th = tmp / "sd.json", tmp / "xl.json", tmp / "torch.json"
    common_args = ["--preset", "tiny", "--sizes", "64", "--iters", "2", "--warmup", "0"]
    assert unet_speed.main([*common_args, "--models", "sd15-tiny", "--methods", "tome",
                            "retom", "todo", "--out", str(sd)]) == 0
    assert unet_speed.main([*common_args, "--models", "sdxl-tiny", "--methods", "tome",
                            "retom_cached", "--out", str(xl)]) == 0
    assert torch_unet_speed.main([*common_args, "--models", "sd15-tiny", "--out", str(th)]) == 0
    return sd, xl, th


def test_unet_speed_tiny(unet_results):
    sd, xl, _ = unet_results
    data = read(sd)
    rows = data["rows"]
    assert data["meta"]["benchmark"] == "unet_speed"
    assert {r["method"] for r in rows} == {"none", "tome", "retom", "todo", "free",
                                           "free_todo"}
    for r in rows:
        assert UNET_ROW_KEYS <= set(r), set(UNET_ROW_KEYS) - set(r)
        assert r.get("error") is None, r
        assert (r["framework"], r["model"], r["height"], r["batch"]) == ("jax", "sd15-tiny", 64, 2)
        assert r["median_ms"] > 0 and r["compile_s"] > 0
        assert r["peak_gb"] is None  # the CPU backend reports no memory statistics
        if r["method"] not in ("none", "free", "free_todo"):
            assert r["ideal_ms"] > 0 and r["speedup"] > 0 and r["merges"] is True

    xl_rows = read(xl)["rows"]
    by = {r["method"]: r for r in xl_rows}
    assert set(by) == {"none", "free", "tome", "retom_cached"}
    assert by["tome"]["merges"] is False  # tomesd's defaults reach no SDXL attention level
    assert by["tome"]["median_ms"] == by["none"]["median_ms"]  # same program: reused
    assert by["retom_cached"]["merges"] is True and by["retom_cached"]["max_downsample"] == 2
    assert by["free"]["max_downsample"] == 2


def test_torch_side_tiny(unet_results):
    data = read(unet_results[2])
    if data["meta"].get("skipped"):
        pytest.skip(data["meta"]["skipped"])
    rows = data["rows"]
    assert {r["method"] for r in rows} == {"none", "tome"}
    for r in rows:
        assert UNET_ROW_KEYS <= set(r)
        assert r["framework"] == "torch" and r.get("error") is None and r["median_ms"] > 0


def test_report_and_plot(unet_results, tmp_path, capsys, monkeypatch):
    files = [str(p) for p in unet_results]
    assert report.main(files) == 0
    text = capsys.readouterr().out
    assert "| model | size |" in text and "sd15-tiny" in text and "sdxl-tiny" in text
    out_dir = tmp_path / "plots"
    assert plot.main([*files, "--out-dir", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    # matplotlib is in the test extra: the plots are always drawn here
    from PIL import Image

    pngs = sorted(p.name for p in out_dir.glob("*.png"))
    assert "speedup_sd15-tiny.png" in pngs and "ratio_sd15-tiny.png" in pngs
    assert all(f"wrote {out_dir / name}" in printed for name in pngs)
    for name in pngs:
        with Image.open(out_dir / name) as im:
            pixels = np.asarray(im.convert("RGB"))
        assert pixels.shape[0] > 200 and pixels.shape[1] > 200
        colours = np.unique(pixels.reshape(-1, 3), axis=0)
        assert len(colours) > 20, name  # axes, text and coloured lines, not a blank canvas

    monkeypatch.setattr(plot, "_pyplot", lambda: None)  # without matplotlib: one line, no files
    assert plot.main([*files, "--out-dir", str(tmp_path / "none")]) == 0
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "none").exists()


def test_attention_memory_tiny(tmp_path):
    """Compiled only: the chunked rows report less XLA scratch, and their FLOPs counted per
    loop trip equal the plain program's (the raw cost analysis counts one chunk)."""
    out = tmp_path / "am.json"
    rows = attention_memory.main(["--model", "sd15-tiny", "--size", "64", "--methods", "none",
                                  "--chunk-bytes", "inf", "4096", "--out", str(out)])
    data = read(out)
    assert data["meta"]["benchmark"] == "attention_memory" and len(data["rows"]) == 2
    plain, chunked = rows
    assert plain["chunked_calls"] == 0 and chunked["chunked_calls"] > 0
    assert chunked["xla_temp_gb"] < plain["xla_temp_gb"]
    assert chunked["gflops"] < plain["gflops"] == plain["gflops_per_trip"]
    assert chunked["gflops_per_trip"] == pytest.approx(plain["gflops"], rel=1e-3)


def test_profile_call_tiny(tmp_path):
    """The trace is read back: per-call device time, kinds that add up, a sort kernel
    (ReToM's ranking) counted as merge work; cuDNN convolutions are not attention."""
    import profile_call

    assert profile_call.kind_of("cudnn-conv-bias-activation.3 sm90_xmma_fprop") == "convolution"
    assert profile_call.kind_of("command_buffer_1 cudnn_generated_native_sdpa_flash") == "attention"
    assert profile_call.kind_of("wrapped_sort") == "sort"
    out = tmp_path / "profile.json"
    profile_call.main(["--model", "sd15-tiny", "--size", "64", "--dtype", "fp32",
                       "--method", "retom", "--iters", "2", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["device_ms_per_call"] > 0
    assert abs(sum(k["share"] for k in data["kinds"].values()) - 1) < 1e-6
    assert data["kinds"].get("sort", {}).get("ms_per_call", 0) > 0, data["kinds"]
    assert 0 < data["merge_share"] < 1
    assert sum(data["all_ops"].values()) == pytest.approx(data["device_ms_per_call"], rel=1e-3)
