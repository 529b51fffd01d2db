"""The loader pieces of weights.py: the config classes' one source of defaults (each equal
to its reference library's), the one from_dict style, and the safetensors reader
(lazy tensors, partial reads, bfloat16) against what torch wrote."""
import inspect

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from retom_jax.models.clip import TextEncoderConfig
from retom_jax.eval.clip_vision import VisionConfig
from retom_jax.models.unet import UNetConfig
from retom_jax.models.vae import VAEConfig
from retom_jax.models.weights import CheckpointError, StoredTensor, open_safetensors, read_safetensors, read_safetensors_metadata


def _signature_defaults(cls) -> dict:
    return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_unet_defaults_are_diffusers():
    """A config.json that leaves every key out reads as diffusers' defaults; the dataclass
    is the only place they are written (cross_attention_dim 1280, 8 heads ...)."""
    from diffusers import UNet2DConditionModel

    reference = UNetConfig.from_dict(_signature_defaults(UNet2DConditionModel))
    assert UNetConfig.from_dict({}) == UNetConfig() == reference
    assert reference.cross_attention_dim == (1280,) * 4
    assert reference.num_attention_heads == (8,) * 4


def test_vae_defaults_are_diffusers():
    from diffusers import AutoencoderKL

    assert VAEConfig.from_dict({}) == VAEConfig() == VAEConfig.from_dict(
        _signature_defaults(AutoencoderKL))


@pytest.mark.parametrize("arch", ["CLIPTextModel", "CLIPTextModelWithProjection"])
def test_text_encoder_defaults_are_transformers(arch):
    from transformers import CLIPTextConfig

    reference = TextEncoderConfig.from_dict({**CLIPTextConfig().to_dict(), "architectures": [arch]})
    assert TextEncoderConfig.from_dict({"architectures": [arch]}) == reference
    if arch == "CLIPTextModel":
        assert TextEncoderConfig() == reference


def test_vision_defaults_are_transformers():
    from transformers import CLIPVisionConfig

    reference = VisionConfig.from_dict(CLIPVisionConfig().to_dict())
    assert VisionConfig.from_dict({}) == VisionConfig() == reference


@pytest.mark.parametrize("cls, raw", [
    (UNetConfig, {"norm_num_groups": 7}),
    (VAEConfig, {"latent_channels": 0}),
    (TextEncoderConfig, {"architectures": ["CLIPTextModel"], "hidden_act": "swish"}),
    (VisionConfig, {"patch_size": 5}),
    (UNetConfig, ["not", "a", "dict"]),
    (VAEConfig, "nope"),
])
def test_from_dict_errors_name_the_file(cls, raw):
    with pytest.raises(CheckpointError, match=r"^some/config\.json: ") as e:
        cls.from_dict(raw, where="some/config.json")
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    path = tmp_path_factory.mktemp("st") / "w.safetensors"
    gen = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(6, 5, 4, 3, generator=gen),
               "bf16": torch.randn(7, 9, generator=gen).to(torch.bfloat16),
               "i64": torch.arange(10)}
    save_file(tensors, str(path), metadata={"who": "test"})
    return path, {k: v.float().numpy() if k == "bf16" else v.numpy() for k, v in tensors.items()}


def test_stored_tensors_read_lazily_and_in_parts(stored):
    path, ref = stored
    lazy = open_safetensors(path)
    assert set(lazy) == set(ref) and all(isinstance(t, StoredTensor) for t in lazy.values())
    assert lazy["bf16"].dtype == ml_dtypes.bfloat16 and lazy["bf16"].shape == (7, 9)
    assert lazy["f32"].ndim == 4 and lazy["i64"].dtype == np.int64
    for name, want in ref.items():
        np.testing.assert_array_equal(np.asarray(lazy[name]).astype(want.dtype), want)
    part = (slice(2, 5), slice(None), slice(1, 3), slice(0, 3))
    np.testing.assert_array_equal(lazy["f32"][part], ref["f32"][part])
    np.testing.assert_array_equal(lazy["bf16"][3:7, ::1].astype(np.float32), ref["bf16"][3:7])
    eager = read_safetensors(path)
    np.testing.assert_array_equal(eager["f32"], ref["f32"])
    assert read_safetensors_metadata(path) == {"who": "test"}


def test_bad_files_are_one_line_errors(stored, tmp_path):
    path, _ = stored
    data = path.read_bytes()
    cases = {"truncated": (data[:-7], "corrupt or truncated"),
             "json": (b"\x10" + b"\x00" * 7 + b"not json at all!", "not valid JSON"),
             "tiny": (b"\x01", "not a safetensors file: only 1 bytes")}
    for name, (content, message) in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(content)
        for read in (open_safetensors, read_safetensors, read_safetensors_metadata):
            with pytest.raises(CheckpointError, match=message) as e:
                read(bad)
            assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="weight file not found"):
        open_safetensors(tmp_path / "missing.safetensors")
