"""The cases of issue #23 (hostile input), one test each: a one-line project error before
the expensive work, or the documented behaviour (docs/robustness.md)."""
import io
import json
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from retom_jax.eval.torch_pickle import TorchFileError, load_torch_file
from retom_jax.images import ImageFileError, read_image, to_rgb
from retom_jax.models.weights import CheckpointError, load_params, weight_files


# ----------------------------------------------------------------------------- pickles

def test_shared_pickle_nesting_is_linear(tmp_path):
    """``a = [a, a]`` 50 deep: 51 lists shared through the pickle memo, not 2**50 nodes."""
    a = [torch.ones(2)]
    for _ in range(50):
        a = [a, a]
    path = tmp_path / "bomb.pth"
    torch.save({"x": a}, path, _use_new_zipfile_serialization=False)
    assert path.stat().st_size < 2000
    start = time.perf_counter()
    got = load_torch_file(path)["x"]
    assert time.perf_counter() - start < 5
    assert got[0] is got[1]  # sharing kept in the copy


def test_pickle_cycle_and_expanded_tensor_refused(tmp_path):
    a = []
    a.append(a)
    torch.save(a, tmp_path / "cycle.pth")
    with pytest.raises(TorchFileError, match="holds itself"):
        load_torch_file(tmp_path / "cycle.pth")
    torch.save({"w": torch.ones(1).expand(10**7)}, tmp_path / "expand.pth")
    with pytest.raises(TorchFileError, match="more elements than its storage"):
        load_torch_file(tmp_path / "expand.pth")


def test_zip_bomb_refused_before_decompressing(tmp_path):
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4 << 20)}, buf)  # 16 MiB of zeros
    out = tmp_path / "bomb.pth"
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zin, \
            zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    assert out.stat().st_size < 100_000
    with pytest.raises(TorchFileError, match="zip bomb"):
        load_torch_file(out)


def test_legacy_storage_larger_than_file_refused(tmp_path):
    path = tmp_path / "big.pth"
    torch.save({"w": torch.ones(1000)}, path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    # the storage's element count in the pickle (BININT2 1000 = M\xe8\x03)
    path.write_bytes(raw.replace(b"M\xe8\x03", b"J\xff\xff\xff\x7f", 1))
    with pytest.raises(TorchFileError, match="more than the file"):
        load_torch_file(path)


# ----------------------------------------------------------------------------- weights

def _safetensors(path, **tensors):
    from safetensors.numpy import save_file

    save_file({k: np.asarray(v) for k, v in tensors.items()}, str(path))


def test_index_shard_outside_the_folder_refused(tmp_path):
    model, elsewhere = tmp_path / "model", tmp_path / "elsewhere"
    model.mkdir(), elsewhere.mkdir()
    _safetensors(elsewhere / "x.safetensors", w=np.ones(2, np.float32))
    for shard in ("../elsewhere/x.safetensors", str(elsewhere / "x.safetensors"),
                  "sub/../../elsewhere/x.safetensors"):
        (model / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"w": shard}}))
        with pytest.raises(CheckpointError, match="not a file in"):
            weight_files(model, "model")
    (model / "sub").mkdir()
    _safetensors(model / "sub" / "a.safetensors", w=np.ones(2, np.float32))
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "sub/a.safetensors"}}))
    assert weight_files(model, "model") == [model / "sub" / "a.safetensors"]


def test_nonfinite_weights_refused_on_load():
    from flax import nnx

    from retom_jax.models.weights import abstract_module

    module = abstract_module(lambda rngs: nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    good = {"weight": np.ones((3, 2), np.float32), "bias": np.zeros(3, np.float32)}
    load_params(module, good, np.float32, where="tiny")
    bad = dict(good, bias=np.array([0, np.nan, 0], np.float32))
    with pytest.raises(CheckpointError, match=r"the weights in tiny hold NaN.*bias"):
        load_params(module, bad, np.float32, where="tiny")
    # finite in float32 but infinite in float16
    big = dict(good, weight=np.full((3, 2), 1e38, np.float32))
    with pytest.raises(CheckpointError, match="weight"):
        load_params(module, big, np.float16, where="tiny")


def test_long_config_error_is_one_short_line(tmp_path):
    from retom_jax.models.unet import UNetConfig
    from retom_jax.models.weights import read_model_config

    (tmp_path / "config.json").write_text(json.dumps(
        {"_class_name": "UNet2DConditionModel", "layers_per_block": list(range(-5, 20000))}))
    with pytest.raises(CheckpointError) as e:
        read_model_config(tmp_path, None, UNetConfig)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) <= 600 and "layers_per_block" in msg


# ----------------------------------------------------------------------------- LoRA

def test_lora_nan_or_overflow_refused(tmp_path):
    from flax import nnx

    from retom_jax.models.lora import LoraError, fuse_lora, parse_lora_spec, read_lora

    params = nnx.split(nnx.Dict(proj=nnx.Linear(4, 4, rngs=nnx.Rngs(0))))[1]
    for value, match in ((np.nan, "NaN or infinite"), (1e38, "fused in")):
        path = tmp_path / f"l{value}.safetensors"
        _safetensors(path, **{"unet.proj.lora_A.weight": np.full((2, 4), value, np.float32),
                              "unet.proj.lora_B.weight": np.full((4, 2), value, np.float32)})
        with pytest.raises(LoraError, match=match):
            lora = read_lora(path)
            fuse_lora(params, lora.layers["unet"], 1.0, where=str(path))
    for spec in ("x.safetensors:nan", "x.safetensors:inf"):
        with pytest.raises(LoraError, match="must be a finite number, got"):
            parse_lora_spec(spec)
    with pytest.raises(LoraError, match="must be a number, got 'abc'"):
        parse_lora_spec("x.safetensors:abc")


# ----------------------------------------------------------------------------- schedulers

@pytest.mark.parametrize("change, match", [
    ({"beta_start": "x"}, "beta_start must be a number"),
    ({"num_train_timesteps": 0}, "num_train_timesteps"),
    ({"num_train_timesteps": 10**12}, "num_train_timesteps"),
    ({"clip_sample": "yes"}, "clip_sample must be true or false"),
    ({"trained_betas": ["a"]}, "trained_betas must be a list of numbers"),
])
def test_scheduler_config_values_name_the_file(tmp_path, change, match):
    from retom_jax.schedulers import load_scheduler

    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({"_class_name": "DDIMScheduler", **change}))
    with pytest.raises(ValueError, match=match) as e:
        load_scheduler(path)
    assert str(e.value).startswith(str(path))


# ----------------------------------------------------------------------------- images

def test_sixteen_bit_image_scaled_to_eight(tmp_path):
    ramp = np.linspace(0, 65535, 256).astype(np.uint16)[None].repeat(4, 0)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    got = np.asarray(read_image(tmp_path / "g16.png"))
    assert got.shape == (4, 256, 3) and got.dtype == np.uint8
    np.testing.assert_allclose(got[0, :, 0], np.round(ramp[0].astype(float) * 255 / 65535), atol=1)


def test_alpha_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half transparent
    got = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert (got[0, 0] == [255, 0, 0]).all() and (got[3, 0] == [255, 255, 255]).all()
    la = Image.fromarray(np.stack([np.zeros((2, 2), np.uint8)] * 2, -1), "LA")
    assert (np.asarray(to_rgb(la)) == 255).all()


def test_bad_image_files_one_line(tmp_path):
    (tmp_path / "text.png").write_text("not an image")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "ok.png")
    raw = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(raw[: len(raw) // 2])
    for name in ("text.png", "cut.png", "missing.png"):
        with pytest.raises(ImageFileError, match=name) as e:
            read_image(tmp_path / name)
        assert "\n" not in str(e.value)
    with pytest.raises(ImageFileError, match="floating-point"):
        to_rgb(Image.fromarray(np.zeros((2, 2), np.float32)))


def test_lora_folder_reads_its_file(tmp_path):
    from retom_jax.models.lora import LoraError, read_lora

    pair = {"unet.proj.lora_A.weight": np.ones((2, 4), np.float32),
            "unet.proj.lora_B.weight": np.ones((4, 2), np.float32)}
    _safetensors(tmp_path / "pytorch_lora_weights.safetensors", **pair)
    _safetensors(tmp_path / "other.safetensors", **pair)
    assert read_lora(tmp_path).path.endswith("pytorch_lora_weights.safetensors")
    (tmp_path / "pytorch_lora_weights.safetensors").unlink()
    assert read_lora(tmp_path).path.endswith("other.safetensors")  # the only one
    _safetensors(tmp_path / "third.safetensors", **pair)
    with pytest.raises(LoraError, match="2 .safetensors files: name one"):
        read_lora(tmp_path)


# ----------------------------------------------------------------------------- writing

def test_atomic_write_disk_full_keeps_the_old_file(tmp_path, monkeypatch):
    import errno
    import os

    from retom_jax.io import OutputError, save_image, write_text

    path = tmp_path / "image.png"
    write_text(path, "old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match="image.png: the disk is full") as e:
        save_image(Image.new("RGB", (8, 8)), path)
    assert "\n" not in str(e.value)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["image.png"]


def test_no_overwrite_unless_asked(tmp_path):
    from retom_jax.io import OutputError, check_output_file, write_text

    path = tmp_path / "a.txt"
    write_text(path, "one", overwrite=False)
    with pytest.raises(OutputError, match="exists"):
        write_text(path, "two", overwrite=False)
    with pytest.raises(OutputError, match="--overwrite"):
        check_output_file(path)
    check_output_file(path, overwrite=True)
    write_text(path, "three", overwrite=True)
    assert path.read_text() == "three"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output_file(path / "x.png")
