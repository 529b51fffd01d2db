"""The diffusion transformers' TPU programs (retom_jax.analysis.tpu_transformers): their
parameters sharded over fsdp by the rules, and a tiny Flux compiled for a v5e-4 with
fsdp=4 (compile only; needs the ``libtpu`` package, skipped without it)."""
import importlib.util

import pytest

from tests.util import run_on_host_devices

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def test_flux_and_sd3_kernels_split_over_fsdp(tmp_path):
    """And the tiny Flux pipeline program (2 steps + decode) compiles on that mesh."""
    rows = run_on_host_devices("tests.transformer_placement_cases", tmp_path / "out.json",
                               devices=4, timeout=600)
    pipeline = rows.pop()
    assert pipeline["rows"] == 4 and pipeline["output"] == [[4, 64, 64, 3]], pipeline
    assert pipeline["collectives"]["all-gather"] > 0
    for row in rows[1:]:
        kernels = row["big_kernels"]
        assert kernels, row["model"]
        unsplit = {k: v for k, v in kernels.items() if "fsdp" not in v}
        assert not unsplit, f"{row['model']}: kernels left whole on fsdp=4: {unsplit}"
        # everything that weighs is split: a device holds about a quarter
        assert row["param_bytes_per_device"] < 0.3 * row["param_bytes"], row
    names = " ".join(rows[1]["big_kernels"])
    for leaf in ("attn", "ff", "proj_mlp", "proj_out", "single_transformer_blocks",
                 "norm1"):
        assert leaf in names, (leaf, names)


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install 'jax[tpu]')")
def test_tiny_flux_compiles_for_a_v5e4_with_fsdp():
    from retom_jax.analysis import tpu

    row = tpu.compile_row("transformer", "flux-tiny", "v5e:2x2", "fsdp=4", "none",
                          size=1024, batch=1)
    assert row["compiled"] is True, row["compiled"]
    assert row["chips"] == 4 and row["rows"] == 4 and row["fits"]
    assert row["image_tokens"] == 4096 and row["text_tokens"] == 512
    # the 4,608-token joint attention takes splash (the model traces for its TPU mesh)
    assert row["splash"] and row["splash_calls"] >= 2
    # the weights are sharded: a chip holds about a quarter and gathers them per layer
    assert row["param_bytes_per_chip"] < 0.3 * row["param_bytes"]
    assert row["argument_bytes"] < 0.5 * row["param_bytes"]
    assert row["collectives"]["all-gather"] > 0
    assert row["estimate_s"] > 0 and row["estimate_source"] == "roofline"
