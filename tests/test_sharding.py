"""Meshes, the sharding rules, and sharded pipelines (8 host CPU devices, one subprocess).

The multi-device cases run in ONE subprocess (tests/sharding_cases.py) that writes a JSON
report; the tests here read it. Rules and argument errors are checked in process.
"""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import pytest
from jax.sharding import PartitionSpec as P

import retom_jax as rj
from retom_jax import sharding
from tests.tiny import SD1, SDXL
from tests.util import run_on_host_devices

ROOT = Path(__file__).resolve().parent.parent


def fake_mesh(**sizes):
    return types.SimpleNamespace(shape={"data": 1, "fsdp": 1, "spatial": 1, **sizes})


# ----------------------------------------------------------------------------- in process

def test_parse_mesh_and_errors():
    assert sharding.parse_mesh("data=4,fsdp=2") == {"data": 4, "fsdp": 2}
    assert sharding.parse_mesh(" spatial=8 ") == {"spatial": 8}
    with pytest.raises(ValueError, match="unknown mesh axis 'tensor'.*data, fsdp, spatial"):
        sharding.parse_mesh("data=2,tensor=4")
    with pytest.raises(ValueError, match="not name=size"):
        sharding.parse_mesh("data4")
    with pytest.raises(ValueError, match="must be an int"):
        sharding.parse_mesh("data=x")
    with pytest.raises(ValueError, match="given twice"):
        sharding.parse_mesh("data=2,data=2")


def test_make_mesh_one_device():
    mesh = rj.make_mesh()
    assert mesh.axis_names == ("data", "fsdp", "spatial")
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "spatial": 1}
    n = jax.device_count()
    with pytest.raises(ValueError, match=rf"needs {3 * n} devices, but there are {n}"):
        rj.make_mesh(data=3 * n)
    with pytest.raises(ValueError, match="unknown mesh axis 'tensor'"):
        rj.make_mesh(tensor=2)
    with pytest.raises(ValueError, match="only one mesh axis may be -1"):
        rj.make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="positive int or -1"):
        rj.make_mesh(data=0)


def test_param_specs_follow_the_rule_table():
    mesh = fake_mesh(fsdp=2)
    big = 1 << 20
    # Linear (in, out): output features first; odd output -> input features
    assert sharding.param_spec(("attn1", "to_q", "kernel"), (1024, 1024), mesh, 1) == P(None, "fsdp")
    assert sharding.param_spec(("proj", "kernel"), (1024, 1023), mesh, 1) == P("fsdp", None)
    # Conv HWIO: output channels
    assert sharding.param_spec(("conv1", "kernel"), (3, 3, 320, 640), mesh, 1) == P(None, None, None, "fsdp")
    # embedding (vocab, embed): rows first
    assert sharding.param_spec(("token_embedding", "embedding"), (49408, 768), mesh, 1) == P("fsdp", None)
    # 1-D leaves, small leaves and leaves no dimension of which divides: replicated
    assert sharding.param_spec(("norm", "scale"), (big,), mesh, 1) == P(None)
    assert sharding.param_spec(("to_q", "kernel"), (64, 64), mesh, 1 << 16) == P(None, None)
    assert sharding.param_spec(("to_q", "kernel"), (1023, 1021), mesh, 1) == P(None, None)
    # without fsdp nothing is split (data replicates parameters)
    assert sharding.param_spec(("to_q", "kernel"), (1024, 1024), fake_mesh(data=8), 1) == P(None, None)
    # every rule target is a mesh axis
    for _, target in sharding.LOGICAL_AXIS_RULES:
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        assert set(targets) <= set(sharding.AXES)
    assert sharding.logical_spec(("batch", None, "rows", None), fake_mesh(data=2, fsdp=2, spatial=2)) \
        == P(("data", "fsdp"), None, "spatial", None)
    assert sharding.logical_spec(("batch", "rows"), fake_mesh(data=8)) == P("data", None)


def test_padded_batch():
    assert sharding.padded_batch(3, fake_mesh(data=8)) == 8
    assert sharding.padded_batch(8, fake_mesh(data=4, fsdp=2)) == 8
    assert sharding.padded_batch(5, fake_mesh(data=2, fsdp=1, spatial=4)) == 6
    x = jax.numpy.arange(6).reshape(6, 1)  # two groups of 3 rows (guidance: [neg, pos])
    padded = sharding.pad_rows(jax.numpy.asarray(x), 4, groups=2)
    assert padded[:, 0].tolist() == [0, 1, 2, 2, 3, 4, 5, 5]


def test_split_errors():
    unet = rj.UNetConfig.from_dict(SDXL)  # 3 levels: rows must divide by spatial * 4
    sharding.check_split(fake_mesh(spatial=2), unet, (16, 16))
    with pytest.raises(ValueError, match="spatial=8 does not divide the latent rows at every "
                                         "UNet level.*multiple of 32"):
        sharding.check_split(fake_mesh(spatial=8), unet, (16, 16))
    sd = rj.UNetConfig.from_dict(SD1)
    sharding.check_split(fake_mesh(spatial=8), sd, (16, 16), rj.ReToM(window=(2, 2)))
    with pytest.raises(ValueError, match="ReToM: windows 4 rows high straddle the spatial "
                                         "shards at downsample 1"):
        sharding.check_split(fake_mesh(spatial=8), sd, (16, 16), rj.ReToM(window=(4, 4)))
    with pytest.raises(ValueError, match=r"windows 4 rows high.*\(from|straddle"):
        sharding.check_split(fake_mesh(spatial=8), sd, (16, 16),
                             rj.ReToM(window=(2, 2), schedule={1: (4, 4)}))
    with pytest.raises(ValueError, match="ToDo: windows 4 rows high"):
        sharding.check_split(fake_mesh(spatial=8), sd, (16, 16), rj.ToDo(factor=4))
    with pytest.raises(ValueError, match="odd batch of 3 without guidance"):
        sharding.check_split(fake_mesh(data=2), sd, (16, 16), rj.ToMe(), batch=3, guidance=False)
    sharding.check_split(fake_mesh(data=2), sd, (16, 16), rj.ToMe(), batch=3, guidance=True)


def test_split_checks_go_through_the_merge_protocol():
    """A method outside the library declares its cells and padding rule through
    `MergeMethod` hooks; check_split asks them, knowing no class."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Cells(rj.MergeMethod):
        max_downsample: int = 1
        rows: int = 4

        def windows(self, downsample):
            return [(0, (self.rows, 1))]

        def check_padding(self, batch, padded, guidance):
            if padded != batch:
                raise ValueError(f"Cells cannot pad {batch} to {padded}")

        def for_block(self, tokens, grid, downsample, key=None, cache=None, use_cache=False):
            return rj.BlockMerge(), None

    sd = rj.UNetConfig.from_dict(SD1)
    sharding.check_split(fake_mesh(spatial=8), sd, (16, 16), Cells(rows=2))
    with pytest.raises(ValueError, match="Cells: windows 4 rows high straddle"):
        sharding.check_split(fake_mesh(spatial=8), sd, (16, 16), Cells())
    with pytest.raises(ValueError, match="Cells cannot pad 3 to 4"):
        sharding.check_split(fake_mesh(data=2), sd, (16, 16), Cells(), batch=3)


def test_initialize_distributed_argument_errors(monkeypatch):
    for var in ("RETOM_COORDINATOR", "RETOM_NUM_PROCESSES", "RETOM_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="together"):
        rj.initialize_distributed("127.0.0.1:1234")
    with pytest.raises(ValueError, match=r"process_id 2 is not in \[0, 2\)"):
        rj.initialize_distributed("127.0.0.1:1234", 2, 2)


def test_count_collectives():
    text = ("  %a = f32[2] all-reduce(f32[2] %x), replica_groups={}\n"
            "  %b = (f32[2], f32[2]) all-gather-start(f32[1] %y)\n"
            "  %c = f32[2] all-gather-done(%b)\n"
            "  %d = f32[2] collective-permute(f32[2] %z)\n")
    assert sharding.count_collectives(text) == {
        "all-gather": 1, "all-reduce": 1, "collective-permute": 1, "all-to-all": 0,
        "reduce-scatter": 0}


# ----------------------------------------------------------------------------- 8 devices

@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding") / "cases.json"
    return run_on_host_devices("tests.sharding_cases", out)


def _parity_rows(report):
    return [r for r in report if "rel" in r]


def test_sharded_images_equal_unsharded(report):
    rows = _parity_rows(report)
    seen = {(r["family"], r["mesh"], r["merge"]) for r in rows}
    assert {m for _, m, _ in seen} == {"data=8", "data=4,fsdp=2", "data=2,fsdp=2,spatial=2",
                                       "spatial=8"}
    assert {n for _, _, n in seen} == {"none", "tome", "retom", "retom_cached", "todo",
                                       "tome+cache"}
    assert {f for f, _, _ in seen} == {"sd", "sdxl"}
    for r in rows:
        assert r["shape"][0] == 3, r  # padding dropped
        assert r["rel"] <= 1e-5, r


def test_no_recompiles_and_padding(report):
    row = next(r for r in report if r.get("family") == "sd" and r.get("mesh") == "data=8")
    assert row["recompiles"] == 0
    assert row["sample_programs"] == 1  # 3 and 4 images both run as 8
    assert row["euler_a_rel"] <= 1e-5   # per-step noise of the padded batch
    assert row["per_prompt_rel"] <= 1e-5


def test_fsdp_splits_large_kernels(report):
    row = next(r for r in report if "fsdp" in r)
    for name, rep in row["fsdp"].items():
        assert rep["large_kernels"] > 0
        assert rep["large_kernel_shard_ratios"] == [0.5], (name, rep)
        assert rep["fraction_held"] < 0.75, (name, rep)  # no device holds the whole model


def test_per_device_memory_falls_with_fsdp_and_spatial(report):
    mem = {r["mesh"]: r for r in report if r.get("unet") and r["merge"] == "none"}
    # one image per device in each of these rows
    assert mem["data=4,fsdp=2"]["argument_bytes"] < 0.75 * mem["data=8"]["argument_bytes"]
    assert mem["spatial=8"]["temp_bytes"] < 0.5 * mem["data=8"]["temp_bytes"]


def test_collectives_reported(report):
    rows = {r["merge"]: r["collectives"] for r in report
            if r.get("unet") and r["mesh"] == "spatial=8"}
    assert set(rows) == {"none", "retom"}
    assert sum(rows["none"].values()) > 0  # spatial sharding does communicate (conv halos)


def test_clear_errors_before_compiling(report):
    err = next(r["errors"] for r in report if "errors" in r)
    assert "needs 3 devices, but there are 8" in err["mesh_size"]
    assert "unknown mesh axis 'tensor'" in err["unknown_axis"]
    assert "spatial=8 does not divide the latent rows" in err["spatial_levels"]
    assert "straddle" in err["window"]
    assert err["compiled"] == 0


def test_cli_mesh_on_eight_devices(report):
    cli = next(r["cli"] for r in report if "cli" in r)
    assert cli["code"] == 0
    assert cli["files"] == [f"img-{i}.png" for i in range(8)]
    assert "mesh {'data': 4, 'fsdp': 2, 'spatial': 1} over 8 devices" in cli["stdout"]


def test_scaling_benchmark_smoke(report):
    data = next(r["scaling"] for r in report if "scaling" in r)
    assert data["meta"]["complete"] and data["meta"]["benchmark"] == "scaling"
    (row,) = data["rows"]
    assert row.get("error") is None, row
    assert row["mesh"] == "data=4,fsdp=2" and row["devices"] == 8 and row["images"] == 8
    assert row["images_per_s"] > 0 and row["compile_s"] > 0 and row["recompiles"] == 0
    assert row["pipeline_memory"]["total_mb"] > 0 and row["unet"]["median_ms"] > 0


def test_cli_mesh_errors(capsys):
    from retom_jax import cli

    n = jax.device_count()
    for mesh, message in (("tensor=2", "unknown mesh axis 'tensor'"),
                          (f"data={3 * n}", f"needs {3 * n} devices, but there are {n}")):
        with pytest.raises(SystemExit):
            cli.main(["generate", "--model", "demo", "--prompt", "x", "--mesh", mesh])
        assert message in capsys.readouterr().err


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(report, tmp_path):
    """jax.distributed on this machine: two processes of 4 CPU devices each (gloo
    collectives) form one data=4,fsdp=2 mesh; the images equal the one-process run's."""
    folder = Path(report[-1]["folder"])
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "tests.distributed_cases", str(folder / "sd"),
                               str(port), str(i), str(tmp_path)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    infos = [json.loads((tmp_path / f"info{i}.json").read_text()) for i in range(2)]
    for i, info in enumerate(infos):
        host_fraction = info.pop("host_fraction")
        assert info == {"process": i, "processes": 2, "devices": 8, "local_devices": 4,
                        "fully_addressable_params": 0}
        assert 0.5 <= host_fraction <= 1.0
    import numpy as np

    two = np.load(tmp_path / "two_processes.npy")
    one = np.load(folder / "sd_fsdp_retom.npy")
    assert two.shape == one.shape == (3, 32, 32, 3)
    assert np.linalg.norm(two - one) / np.linalg.norm(one) <= 1e-5
