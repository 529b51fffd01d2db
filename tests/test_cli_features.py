"""``retom-jax generate`` with the pipeline features: --init-image/--strength, --lora,
--guidance-rescale, --clip-skip, --eta (and their errors)."""
import re

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

import retom_jax.cli.generate
import retom_jax.pipelines
from retom_jax.cli import main
from tests.pipeline_helpers import save_sd


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd")
    save_sd(path)
    rng = np.random.RandomState(0)
    image = path / "init.png"
    Image.fromarray(rng.randint(0, 256, (32, 24, 3)).astype(np.uint8)).save(image)
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    lora = path / "style.safetensors"
    save_file({f"{stem}.lora_down.weight": rng.randn(2, 32).astype(np.float32),
               f"{stem}.lora_up.weight": rng.randn(32, 2).astype(np.float32),
               f"{stem}.alpha": np.asarray(2.0, np.float32)}, lora)
    return path, image, lora


def test_img2img_lora_options(files, tmp_path, capsys, monkeypatch):
    """The CLI's image equals the Python API's with the same options (and reuses its
    program)."""
    folder, image, lora = files
    loaded = []
    real = retom_jax.pipelines.load_pipeline
    monkeypatch.setattr(retom_jax.pipelines, "load_pipeline",
                        lambda *a, **k: loaded.append(real(*a, **k)) or loaded[-1])
    out = tmp_path / "i2i.png"
    assert main(["generate", "--model", str(folder), "--prompt", "the cat", "--steps", "4",
                 "--seed", "2", "--init-image", str(image), "--strength", "0.5",
                 "--lora", f"{lora}:0.5", "--guidance-rescale", "0.5", "--clip-skip", "1",
                 "--eta", "0.3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "with 1 LoRA file(s)" in text and f"saved {out} (24x32)" in text
    (pipe,) = loaded
    assert pipe.loras == [(str(lora), 0.5)]
    expected = pipe("the cat", num_inference_steps=4, seed=2, image=Image.open(image),
                    strength=0.5, guidance_rescale=0.5, clip_skip=1, eta=0.3)
    assert expected.compile_seconds == 0.0
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(expected.images[0]))


@pytest.mark.parametrize("extra,message", [
    (["--init-image", "{image}", "--strength", "1.5"], r"strength must lie in \(0, 1\]"),
    (["--strength", "0.5"], "strength is the image-to-image option"),
    (["--init-image", "{folder}/missing.png"], "image file not found"),
    (["--lora", "{lora}:strong"], "the scale after ':' must be a number"),
    (["--lora", "{folder}/none.safetensors"], "--lora .*none.safetensors: LoRA file not found"),
    (["--original-size", "64x64"], "original_size is an SDXL option"),
    (["--original-size", "64"], "expected two integers like 1024x1024"),
    (["--eta", "0.5", "--scheduler", "euler"], "eta=0.5 is DDIM's option"),
])
def test_bad_feature_arguments(files, extra, message, capsys):
    folder, image, lora = files
    extra = [a.format(image=image, folder=folder, lora=lora) for a in extra]
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(folder), "--prompt", "x", "--steps", "2", *extra])
    assert e.value.code == 2
    assert re.search(message, capsys.readouterr().err)
