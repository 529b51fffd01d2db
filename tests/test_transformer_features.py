"""Image-to-image and LoRA for the diffusion transformer pipelines (Flux, SD3) against
diffusers: ``FluxImg2ImgPipeline`` / ``StableDiffusion3Img2ImgPipeline`` given our noise
draws (diffusers' ``randn_tensor`` replaced, as in test_pipeline_features.py), and LoRA
files loaded with diffusers' ``load_lora_weights`` (peft) or fused by hand. Tiny random
pipelines from tests/flux_helpers.py, float32."""
import jax
import numpy as np
import pytest
import torch

import retom_jax as rj
from retom_jax.pipelines.options import img2img_keys
from tests.flux_helpers import TEXT_TOKENS, save_flux, save_sd3
from tests.test_pipeline_features import init_image, same_noise
from tests.util import assert_close, rel_err

TOL = 1e-4  # float32 images after a few steps and the VAE, as the Flux/SD3 pipeline tests


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux_dev_features")
    return save_flux(folder, guidance=True), rj.load_pipeline(folder), folder


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3_features")
    return save_sd3(folder), rj.load_pipeline(folder), folder


def draws(seed, images, batch, channels, latent_hw):
    """Our image-to-image draws for diffusers: the posterior sample's noise, then the
    noise added at the start step."""
    k_post, k_noise, _ = img2img_keys(jax.random.key(seed))
    return [np.asarray(jax.random.normal(k_post, (images, channels) + latent_hw)),
            np.asarray(jax.random.normal(k_noise, (batch, channels) + latent_hw))]


def test_flux_img2img_equals_diffusers(flux, monkeypatch):
    """Strengths 0.5 and 1.0 against FluxImg2ImgPipeline (4 steps, two prompts, one
    image); 0.45 runs the same 2 steps as 0.5 and reuses its program; bad input fails
    before anything compiles."""
    from diffusers import FluxImg2ImgPipeline
    from diffusers.models.autoencoders import vae as torch_vae
    from diffusers.pipelines.flux import pipeline_flux_img2img as mod

    torch_pipe, pipe, _ = flux
    torch_i2i = FluxImg2ImgPipeline(**torch_pipe.components)
    torch_i2i.set_progress_bar_config(disable=True)
    image, prompts = init_image(16, 24), ["a photo of a red cat", "a blue square"]
    kw = dict(num_inference_steps=4, guidance_scale=4.0, max_sequence_length=TEXT_TOKENS)
    refs = {}
    for strength in (0.5, 1.0):
        out = pipe(prompts, image=image, strength=strength, seed=3, output_type="np", **kw)
        with same_noise(monkeypatch, draws(3, 1, 2, 16, (8, 12)), torch_vae, mod):
            with torch.no_grad():
                ref = torch_i2i(prompts, image=image, strength=strength, height=16, width=24,
                                output_type="np", **kw).images
        assert out.images.shape == (2, 16, 24, 3)
        assert_close(out.images, ref, TOL, f"Flux img2img strength={strength}")
        refs[strength] = ref
    assert rel_err(refs[0.5], refs[1.0]) > 1e-2
    programs = len(pipe._programs)
    again = pipe(prompts, image=np.asarray(init_image(16, 24, seed=1)), strength=0.45, seed=5,
                 output_type="np", **kw)
    assert again.compile_seconds == 0.0 and len(pipe._programs) == programs
    for bad, match in ((dict(strength=0.0), r"strength must lie in \(0, 1\]"),
                       (dict(strength=1.5), r"strength must lie in \(0, 1\]"),
                       (dict(image=np.zeros((30, 24, 3), np.uint8)), "multiples of 4"),
                       (dict(height=32), "differ from the image's"),
                       (dict(latents=np.zeros((1, 48, 64), np.float32)), "exclude each other")):
        args = {"image": image, "strength": 0.5, **bad}
        with pytest.raises(ValueError, match=match):
            pipe("a cat", output_type="np", **args, **kw)
    with pytest.raises(ValueError, match="strength is the image-to-image option"):
        pipe("a cat", strength=0.5, **kw)
    assert len(pipe._programs) == programs


def test_sd3_img2img_equals_diffusers(sd3, monkeypatch):
    """StableDiffusion3Img2ImgPipeline with classifier-free guidance and a negative
    prompt, one image per prompt, strength 0.7 (3 of 4 steps)."""
    from diffusers import StableDiffusion3Img2ImgPipeline
    from diffusers.models.autoencoders import vae as torch_vae
    from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3_img2img as mod

    torch_pipe, pipe, _ = sd3
    torch_i2i = StableDiffusion3Img2ImgPipeline(**torch_pipe.components)
    torch_i2i.set_progress_bar_config(disable=True)
    images = [init_image(24, 32, seed=2), init_image(24, 32, seed=3)]
    prompts = ["a photo of a red cat", "a blue square"]
    kw = dict(num_inference_steps=4, guidance_scale=5.0, negative_prompt=["blurry", "a dog"],
              max_sequence_length=16, strength=0.7)
    out = pipe(prompts, image=images, seed=6, output_type="np", **kw)
    with same_noise(monkeypatch, draws(6, 2, 2, 16, (12, 16)), torch_vae, mod):
        with torch.no_grad():
            ref = torch_i2i(prompts, image=images, height=24, width=32, output_type="np",
                            **kw).images
    assert out.images.shape == (2, 24, 32, 3)
    assert_close(out.images, ref, TOL, "SD3 img2img strength=0.7")
    with pytest.raises(ValueError, match="3 images for 2 prompts"):
        pipe(prompts, image=images + images[:1], **kw)


def test_cli_img2img_lora_true_cfg_flux(flux, tmp_path, capsys):
    """generate --init-image --strength --lora --negative-prompt --true-cfg-scale on Flux;
    SD-only options are refused."""
    from retom_jax.cli import main
    _, _, folder = flux
    init = tmp_path / "init.png"
    init_image(16, 24).save(init)
    out = tmp_path / "out.png"
    lora = save(lora_tensors({"lora_unet_double_blocks_0_img_attn_qkv": ((2, 32), (96, 2))},
                             seed=0, kohya=True), tmp_path / "k.safetensors")
    assert main(["generate", "--model", str(folder), "--prompt", "a red cat", "--steps", "2",
                 "--init-image", str(init), "--strength", "0.5", "--out", str(out),
                 "--lora", f"{lora}:0.5", "--negative-prompt", "blurry",
                 "--true-cfg-scale", "2"]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "(24x16)" in text and "with 1 LoRA file(s)" in text
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(folder), "--prompt", "a red cat", "--steps", "2",
              "--init-image", str(init), "--eta", "0.5", "--out", str(tmp_path / "b.png")])
    assert "--eta: not supported" in capsys.readouterr().err


# ----------------------------------------------------------------------------- LoRA

def lora_tensors(shapes, seed, kohya=False, alphas=None):
    """Random LoRA pairs ``{stem: (down shape, up shape)}`` as file tensors (peft
    ``.lora_A/.lora_B`` or kohya ``.lora_down/.lora_up`` + ``.alpha``)."""
    rng = np.random.RandomState(seed)
    out = {}
    for stem, (down, up) in shapes.items():
        a, b = (rng.randn(*down).astype(np.float32) * 0.3, rng.randn(*up).astype(np.float32) * 0.3)
        if kohya:
            out[f"{stem}.lora_down.weight"], out[f"{stem}.lora_up.weight"] = a, b
            if alphas and stem in alphas:
                out[f"{stem}.alpha"] = np.asarray(alphas[stem], np.float32)
        else:
            out[f"{stem}.lora_A.weight"], out[f"{stem}.lora_B.weight"] = a, b
    return out


def save(tensors, path):
    from safetensors.numpy import save_file
    save_file(tensors, str(path))
    return path


def flux_latents(seed=0, h=16, w=16):
    from retom_jax.pipelines.flux import pack
    return np.asarray(pack(np.random.RandomState(seed).randn(1, 16, h // 2, w // 2)
                           .astype(np.float32)))


def flux_images(pipe_or_torch, latents, torch_kw=None):
    kw = dict(num_inference_steps=2, guidance_scale=3.0, height=16, width=16,
              max_sequence_length=TEXT_TOKENS, output_type="np")
    if torch_kw is None:
        return pipe_or_torch("a red cat", latents=latents, **kw).images
    with torch.no_grad():
        return pipe_or_torch("a red cat", latents=torch.from_numpy(latents), **kw,
                             **torch_kw).images


def test_flux_lora_peft_and_kohya_equal_diffusers(flux, tmp_path):
    """A diffusers/peft-layout file (attention, MLP, modulation, embedder layers) at scale
    0.7 and a kohya-layout file (fused img/txt qkv, alphas) at scale 1, each against the
    torch pipeline after ``load_lora_weights`` (diffusers converts the kohya keys). The
    LoRA pipelines reuse the plain pipeline's compiled program."""
    import copy

    torch_pipe, pipe, _ = flux
    lat = flux_latents()
    plain = flux_images(pipe, lat)
    peft = save(lora_tensors({
        "transformer.transformer_blocks.0.attn.to_q": ((2, 32), (32, 2)),
        "transformer.transformer_blocks.1.attn.add_k_proj": ((2, 32), (32, 2)),
        "transformer.transformer_blocks.0.ff.net.0.proj": ((3, 32), (128, 3)),
        "transformer.transformer_blocks.1.norm1.linear": ((2, 32), (192, 2)),
        "transformer.single_transformer_blocks.1.proj_mlp": ((2, 32), (128, 2)),
        "transformer.single_transformer_blocks.0.proj_out": ((2, 160), (32, 2)),
        "transformer.x_embedder": ((2, 64), (32, 2))}, seed=1), tmp_path / "peft.safetensors")
    kohya = save(lora_tensors({
        "lora_unet_double_blocks_0_img_attn_qkv": ((2, 32), (96, 2)),
        "lora_unet_double_blocks_1_txt_attn_qkv": ((4, 32), (96, 4)),
        "lora_unet_double_blocks_0_txt_mlp_2": ((2, 128), (32, 2)),
        "lora_unet_double_blocks_1_img_mod_lin": ((2, 32), (192, 2)),
        "lora_unet_single_blocks_0_linear2": ((2, 160), (32, 2))}, seed=2, kohya=True,
        alphas={"lora_unet_double_blocks_0_img_attn_qkv": 1.0,
                "lora_unet_double_blocks_1_txt_attn_qkv": 8.0}), tmp_path / "kohya.safetensors")
    for file, scale in ((peft, 0.7), (kohya, 1.0)):
        lp = copy.copy(pipe).load_lora(file, scale)
        result = lp("a red cat", latents=lat, num_inference_steps=2, guidance_scale=3.0,
                    height=16, width=16, max_sequence_length=TEXT_TOKENS, output_type="np")
        assert result.compile_seconds == 0.0  # the weights are arguments
        torch_pipe.load_lora_weights(str(file))
        try:
            ref = flux_images(torch_pipe, lat, {"joint_attention_kwargs": {"scale": scale}})
        finally:
            torch_pipe.unload_lora_weights()
        assert_close(result.images, ref, TOL, f"Flux LoRA {file.stem} scale={scale}")
        assert rel_err(ref, plain) > 1e-2  # the LoRA changes the image


def test_flux_lora_kohya_single_linear1_by_hand(flux, tmp_path):
    """``single_blocks_<i>_linear1`` (q, k, v and the MLP input fused) and
    ``final_layer_adaLN_modulation_1`` (shift/scale swapped), which diffusers' converter
    handles only at Flux.1's full size (3072 / 12288 rows hard-coded): against the torch
    transformer with ``W + scale * alpha / r * up @ down`` split by hand."""
    import copy

    torch_pipe, pipe, _ = flux
    stems = {"lora_unet_single_blocks_1_linear1": ((2, 32), (224, 2)),
             "lora_unet_final_layer_adaLN_modulation_1": ((2, 32), (64, 2))}
    alphas = {"lora_unet_single_blocks_1_linear1": 3.0}
    tensors = lora_tensors(stems, seed=3, kohya=True, alphas=alphas)
    file = save(tensors, tmp_path / "linear1.safetensors")
    scale = 0.8
    transformer = copy.deepcopy(torch_pipe.transformer)
    state = transformer.state_dict()
    with torch.no_grad():
        for stem, targets, swap in (
                ("lora_unet_single_blocks_1_linear1",
                 [f"single_transformer_blocks.1.{n}" for n in
                  ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")], False),
                ("lora_unet_final_layer_adaLN_modulation_1", ["norm_out.linear"], True)):
            down, up = tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"]
            delta = scale * alphas.get(stem, 2.0) / 2 * (up @ down)
            if swap:
                delta = np.concatenate(np.split(delta, 2)[::-1])
            rows = np.cumsum([state[f"{t}.weight"].shape[0] for t in targets])[:-1]
            for t, piece in zip(targets, np.split(delta, rows)):
                state[f"{t}.weight"] += torch.from_numpy(piece)
    ref_pipe = type(torch_pipe)(**{**torch_pipe.components, "transformer": transformer})
    ref_pipe.set_progress_bar_config(disable=True)
    lat = flux_latents(seed=4)
    out = flux_images(copy.copy(pipe).load_lora(file, scale), lat)
    assert_close(out, flux_images(ref_pipe, lat, {}), TOL, "Flux kohya linear1 + final layer")


def test_sd3_lora_equals_diffusers(sd3, tmp_path):
    """A diffusers/peft-layout SD3.5 file (joint attention, the dual-attention attn2,
    feed-forward, modulation) at scale 0.6 against load_lora_weights, with guidance;
    load_pipeline(lora=) fuses the same weights."""
    import copy

    torch_pipe, pipe, folder = sd3
    file = save(lora_tensors({
        "transformer.transformer_blocks.0.attn.to_q": ((2, 16), (16, 2)),
        "transformer.transformer_blocks.0.attn.add_k_proj": ((2, 16), (16, 2)),
        "transformer.transformer_blocks.0.attn2.to_v": ((2, 16), (16, 2)),
        "transformer.transformer_blocks.1.ff.net.2": ((2, 64), (16, 2)),
        "transformer.transformer_blocks.1.norm1.linear": ((2, 16), (96, 2))}, seed=5),
        tmp_path / "sd3.safetensors")
    lat = np.random.RandomState(1).randn(1, 16, 8, 8).astype(np.float32)
    kw = dict(num_inference_steps=2, guidance_scale=5.0, negative_prompt="blurry",
              height=16, width=16, max_sequence_length=16, output_type="np")
    out = copy.copy(pipe).load_lora(file, 0.6)("a red cat", latents=lat, **kw).images
    torch_pipe.load_lora_weights(str(file))
    try:
        with torch.no_grad():
            ref = torch_pipe("a red cat", latents=torch.from_numpy(lat),
                             joint_attention_kwargs={"scale": 0.6}, **kw).images
    finally:
        torch_pipe.unload_lora_weights()
    assert_close(out, ref, TOL, "SD3 LoRA (peft) scale=0.6")
    assert rel_err(ref, pipe("a red cat", latents=lat, **kw).images) > 1e-2
    loaded = rj.load_pipeline(folder, lora=[(file, 0.6)])
    by_hand = copy.copy(pipe).load_lora(file, 0.6)
    for a, b in zip(jax.tree.leaves(loaded.transformer.params),
                    jax.tree.leaves(by_hand.transformer.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_lora_unmatched_keys_one_line_errors(flux, tmp_path):
    import copy

    from retom_jax.models.lora import LoraError

    _, pipe, _ = flux
    cases = (
        ({"transformer.transformer_blocks.0.attn.to_q": ((2, 32), (32, 2)),
          "transformer.transformer_blocks.7.attn.to_q": ((2, 32), (32, 2))},
         False, "'transformer.transformer_blocks.7.attn.to_q' matches no layer"),
        ({"lora_unet_double_blocks_5_img_attn_qkv": ((2, 32), (96, 2))}, True,
         "'lora_unet_double_blocks_5_img_attn_qkv' matches no layer"),
        ({"lora_unet_single_blocks_0_linear1": ((2, 32), (200, 2))}, True,
         "has 200 output rows but"),
        ({"unet.down_blocks.0.attentions.0.proj_in": ((2, 32), (32, 2))}, False,
         "has unet layers but a FluxPipeline has no unet"))
    for i, (shapes, kohya, match) in enumerate(cases):
        file = save(lora_tensors(shapes, seed=i, kohya=kohya), tmp_path / f"bad{i}.safetensors")
        with pytest.raises(LoraError, match=match) as e:
            copy.copy(pipe).load_lora(file)
        assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- true CFG

def test_flux_true_cfg_equals_diffusers(flux):
    """diffusers' true CFG (true_cfg_scale > 1 with negative prompts: a second transformer
    pass, ``neg + s * (pos - neg)``) on the dev pipeline; another scale reuses the
    program; either option without the other is a one-line error."""
    torch_pipe, pipe, _ = flux
    lat = np.concatenate([flux_latents(5), flux_latents(6)])
    prompts, negatives = ["a photo of a red cat", "a blue square"], ["blurry", "a dog"]
    kw = dict(num_inference_steps=2, guidance_scale=3.0, height=16, width=16,
              max_sequence_length=TEXT_TOKENS, output_type="np", negative_prompt=negatives)
    out = pipe(prompts, latents=lat, true_cfg_scale=4.0, **kw)
    with torch.no_grad():
        ref = torch_pipe(prompts, latents=torch.from_numpy(lat), true_cfg_scale=4.0,
                         **kw).images
    assert_close(out.images, ref, TOL, "Flux true CFG 4.0")
    plain = pipe(prompts, latents=lat, **{**kw, "negative_prompt": None}).images
    assert rel_err(ref, plain) > 1e-2
    again = pipe(prompts, latents=lat, true_cfg_scale=2.0, **kw)
    assert again.compile_seconds == 0.0 and rel_err(again.images, out.images) > 1e-3
    for bad, match in ((dict(true_cfg_scale=None), "negative_prompt needs true_cfg_scale"),
                       (dict(negative_prompt=None, true_cfg_scale=3.0), "needs negative_prompt"),
                       (dict(negative_prompt=["x"], true_cfg_scale=3.0), "2 strings")):
        with pytest.raises(ValueError, match=match):
            pipe(prompts, latents=lat, **{**kw, **bad})
