"""LoRA reading and fusing (lora.py) on text encoders, without compiling a pipeline:
the key layouts, alphas from keys and from diffusers' metadata, SDXL's two encoders in
the kohya layout, and the errors. The pipeline parity (peft + save_lora_weights, kohya)
is in test_pipeline_features.py."""
import json
import types

import numpy as np
import pytest
from safetensors.numpy import save_file

from retom_jax.models.clip import load_text_encoder
from retom_jax.models.lora import LoraError, diffusers_keys, kohya_name, load_lora_into, parse_lora_key, parse_lora_spec, read_lora
from tests.pipeline_helpers import text_encoder


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """A stand-in pipeline with SDXL's two text encoders (12 and 20 wide), and their
    torch originals."""
    folder = tmp_path_factory.mktemp("te")
    t1, t2 = text_encoder(12, 5), text_encoder(20, 6, projection_dim=16)
    t1.save_pretrained(folder / "te1")
    t2.save_pretrained(folder / "te2")
    pipe = types.SimpleNamespace(text_encoder=load_text_encoder(folder / "te1", subfolder=None),
                                 text_encoder_2=load_text_encoder(folder / "te2", subfolder=None))
    return pipe, t1, t2


def kernel(model, name):
    """Our kernel of the layer ``name`` (``text_model.encoder...``), in PyTorch layout."""
    from flax import nnx

    for path, value in nnx.to_flat_state(model.params):
        if ".".join(str(p) for p in path) == f"{name}.kernel":
            return np.asarray(value).T
    raise KeyError(name)


def torch_weight(model, name):
    state = model.state_dict()  # transformers 5 drops text_model. in CLIPTextModel only
    bare = name.removeprefix("text_model.")
    key = next(k for k in (f"text_model.{bare}.weight", f"{bare}.weight") if k in state)
    return state[key].numpy()


def rand(*shape, seed=0):
    return np.random.RandomState(seed).randn(*shape).astype(np.float32) * 0.1


def test_key_names():
    assert parse_lora_key("unet.down_blocks.0.attentions.0.proj_in.lora_A.weight") == (
        "unet", "down_blocks.0.attentions.0.proj_in", "down")
    assert parse_lora_key("text_encoder_2.encoder.layers.1.mlp.fc1.lora_B.weight") == (
        "text_encoder_2", "encoder.layers.1.mlp.fc1", "up")
    assert parse_lora_key("lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha") == (
        "text_encoder_2", "text_model_encoder_layers_0_mlp_fc1", "alpha")
    assert parse_lora_key("lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight") == (
        "text_encoder", "text_model_encoder_layers_0_mlp_fc1", "up")
    # diffusers' older attention-processor layout
    assert parse_lora_key("unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor."
                          "to_out_lora.down.weight") == (
        "unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0", "down")
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert kohya_name("unet", module) == (
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q")
    assert [parse_lora_key(k)[:2] for k in diffusers_keys("unet", module)] == [("unet", module)] * 2
    assert parse_lora_spec("a.safetensors:0.7") == ("a.safetensors", 0.7)
    assert parse_lora_spec(("b.safetensors", 2)) == ("b.safetensors", 2.0)
    assert parse_lora_spec("c.safetensors") == ("c.safetensors", 1.0)


def test_kohya_sdxl_two_encoders(encoders, tmp_path):
    """lora_te1_ / lora_te2_ with alphas: W + scale * alpha / r * up @ down."""
    pipe, t1, t2 = encoders
    r = 2
    layers = {("lora_te1_", t1, "text_model.encoder.layers.0.self_attn.q_proj", 12, 12, 1.0),
              ("lora_te2_", t2, "text_model.encoder.layers.2.mlp.fc1", 45, 20, 4.0)}
    tensors, expected = {}, {}
    for i, (prefix, model, name, out, inp, alpha) in enumerate(sorted(layers)):
        stem = prefix + name.replace(".", "_")
        down, up = rand(r, inp, seed=i), rand(out, r, seed=10 + i)
        tensors.update({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                        f"{stem}.alpha": np.asarray(alpha, np.float32)})
        expected[prefix, name] = torch_weight(model, name) + 0.5 * alpha / r * up @ down
    file = tmp_path / "kohya.safetensors"
    save_file(tensors, file)
    assert read_lora(file).kohya
    fused = types.SimpleNamespace(**vars(pipe))
    load_lora_into(fused, file, 0.5)
    for (prefix, name), want in expected.items():
        model = fused.text_encoder if prefix == "lora_te1_" else fused.text_encoder_2
        np.testing.assert_allclose(kernel(model, name), want, rtol=1e-6, atol=1e-6)
    # the originals are untouched (new model objects), and another layer too
    assert fused.text_encoder is not pipe.text_encoder
    name = "text_model.encoder.layers.0.self_attn.q_proj"
    np.testing.assert_array_equal(kernel(pipe.text_encoder, name), torch_weight(t1, name))
    name = "text_model.encoder.layers.1.mlp.fc1"
    np.testing.assert_array_equal(kernel(fused.text_encoder_2, name), torch_weight(t2, name))


def test_diffusers_layout_metadata_alpha(encoders, tmp_path):
    """peft keys without text_model. (transformers 5 names), alpha from diffusers'
    lora_adapter_metadata, an alpha_pattern override and rsLoRA."""
    pipe, t1, t2 = encoders
    q = "encoder.layers.1.self_attn.q_proj"
    v = "encoder.layers.1.self_attn.v_proj"
    tensors = {}
    for i, (comp, name) in enumerate((("text_encoder", q), ("text_encoder", v),
                                      ("text_encoder_2", q))):
        a_key, b_key = diffusers_keys(comp, name)
        width = 12 if comp == "text_encoder" else 20
        tensors[a_key], tensors[b_key] = rand(4, width, seed=i), rand(width, 4, seed=5 + i)
    meta = {"text_encoder.r": 4, "text_encoder.lora_alpha": 8,
            "text_encoder.alpha_pattern": {"self_attn.v_proj": 2},
            "text_encoder_2.r": 4, "text_encoder_2.lora_alpha": 4,
            "text_encoder_2.use_rslora": True}
    file = tmp_path / "peft.safetensors"
    save_file(tensors, file, metadata={"format": "pt",
                                       "lora_adapter_metadata": json.dumps(meta)})
    fused = types.SimpleNamespace(**vars(pipe))
    load_lora_into(fused, file, 1.0)
    for comp, name, model, factor in (("text_encoder", q, t1, 8 / 4),
                                      ("text_encoder", v, t1, 2 / 4),
                                      ("text_encoder_2", q, t2, 4 / np.sqrt(4))):
        a_key, b_key = diffusers_keys(comp, name)
        want = torch_weight(model, name) + factor * tensors[b_key] @ tensors[a_key]
        np.testing.assert_allclose(kernel(getattr(fused, comp), "text_model." + name), want,
                                   rtol=1e-6, atol=1e-6)


def test_bad_lora_files(encoders, tmp_path):
    pipe, _, _ = encoders
    q = "encoder.layers.0.self_attn.q_proj"
    a_key, b_key = diffusers_keys("text_encoder", q)
    good = {a_key: rand(2, 12), b_key: rand(12, 2)}

    def write(tensors, name=None):
        path = tmp_path / (name or f"bad{len(list(tmp_path.iterdir()))}.safetensors")
        save_file(tensors, path)
        return path

    bad = [
        (tmp_path / "missing.safetensors", "LoRA file not found"),
        (write(good, "x.bin"), "only .safetensors LoRA files are read"),
        (write({"text_encoder.encoder.layers.0.self_attn.q_prj.lora_A.weight": rand(2, 12),
                "text_encoder.encoder.layers.0.self_attn.q_prj.lora_B.weight": rand(12, 2)}),
         "'text_encoder.encoder.layers.0.self_attn.q_prj' matches no layer of the "
         "text_encoder"),
        (write({a_key: rand(2, 10), b_key: rand(12, 2)}),
         r"the update for text_encoder layer 'text_model.encoder.layers.0.self_attn.q_proj' "
         r"has shape \[12, 10\] but the layer's weight is \[12, 12\]"),
        (write({a_key: rand(2, 12)}), r"layer 'encoder.layers.0.self_attn.q_proj' has no up "
                                      r"\(lora_B\) weight"),
        (write({a_key: rand(2, 12), b_key: rand(12, 3)}), "down has rank 2 but up has 3"),
        (write({**good, "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": rand(1)}),
         "mixes kohya"),
        (write({**good, "text_encoder.encoder.layers.0.self_attn.q_proj.lora_magnitude_vector":
                rand(12)}), "not supported"),
        (write({"vae.encoder.conv_in.lora_A.weight": rand(2, 3)}), "names no model"),
        (write({"text_encoder.encoder.layers.0.self_attn.q_proj.weight": rand(12, 12)}),
         "is not a LoRA weight"),
        (write({"lora_te_text_model_encoder_layers_9_mlp_fc1.lora_down.weight": rand(2, 12),
                "lora_te_text_model_encoder_layers_9_mlp_fc1.lora_up.weight": rand(45, 2)}),
         "'lora_te_text_model_encoder_layers_9_mlp_fc1' matches no layer"),
    ]
    for path, message in bad:
        with pytest.raises(LoraError, match=message):
            load_lora_into(types.SimpleNamespace(**vars(pipe)), path, 1.0)
    no_te2 = types.SimpleNamespace(text_encoder=pipe.text_encoder)
    a2, b2 = diffusers_keys("text_encoder_2", q)
    with pytest.raises(LoraError, match="has text_encoder_2 layers but a SimpleNamespace has "
                                        "no text_encoder_2"):
        load_lora_into(no_te2, write({a2: rand(2, 20), b2: rand(20, 2)}, "te2.safetensors"))
    with pytest.raises(LoraError, match="LoRA scale must be a finite number"):
        load_lora_into(types.SimpleNamespace(**vars(pipe)), write(good), float("nan"))
    with pytest.raises(LoraError, match="the scale after ':' must be a number"):
        parse_lora_spec("a.safetensors:high")
    # nothing changed when a file fails half-way: every layer is checked first
    keep = types.SimpleNamespace(**vars(pipe))
    with pytest.raises(LoraError):
        load_lora_into(keep, write({**good, "text_encoder_2.encoder.x.lora_A.weight": rand(2, 20),
                                    "text_encoder_2.encoder.x.lora_B.weight": rand(20, 2)}))
    assert keep.text_encoder is pipe.text_encoder


SGM_STEMS = [  # kohya's SDXL layout on the tiny SDXL UNet (layers_per_block=1)
    "input_blocks_1_0_in_layers_2", "input_blocks_2_0_op",
    "input_blocks_3_1_transformer_blocks_0_attn1_to_q",
    "input_blocks_5_1_transformer_blocks_1_ff_net_2", "middle_block_1_proj_out",
    "middle_block_2_emb_layers_1", "output_blocks_1_1_transformer_blocks_0_attn2_to_k",
    "output_blocks_3_0_skip_connection", "output_blocks_1_2_conv", "time_embed_2",
    "label_emb_0_0",
]


def test_kohya_sgm_block_names(tmp_path):
    """SGM block names map to the layers diffusers' own converter maps them to, and a
    file in that layout fuses exactly as the same file with diffusers names."""
    from types import SimpleNamespace

    import jax
    import torch
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers, _maybe_map_sgm_blocks_to_diffusers)

    from flax import nnx

    from retom_jax.models.lora import fuse_lora, module_table, sgm_to_diffusers
    from retom_jax.models.unet import load_unet
    from tests.tiny import FAMILIES, torch_unet

    torch_unet(FAMILIES["sdxl"], seed=1).save_pretrained(tmp_path / "unet")
    unet = load_unet(tmp_path / "unet", subfolder=None)
    table = module_table(unet.params)
    flat = dict(nnx.to_flat_state(unet.params))
    tensors, plain, torch_sd = {}, {}, {}
    for i, stem in enumerate(SGM_STEMS):
        ours = sgm_to_diffusers(stem, 1)
        name = next(n for n in table if n.replace(".", "_") == ours)
        shape = np.shape(flat[table[name]])
        out, inp = (shape[1], shape[0]) if len(shape) == 2 else (shape[3], shape[2])
        k = () if len(shape) == 2 else shape[:2]
        down, up = rand(2, inp, *k, seed=i), rand(out, 2, *((1, 1) if k else ()), seed=50 + i)
        for d, prefix in ((tensors, f"lora_unet_{stem}"), (plain, f"lora_unet_{ours}")):
            d[f"{prefix}.lora_down.weight"], d[f"{prefix}.lora_up.weight"] = down, up
            d[f"{prefix}.alpha"] = np.asarray(1.0 + i, np.float32)
        torch_sd[f"lora_unet_{stem}.lora_down.weight"] = torch.from_numpy(down)
        torch_sd[f"lora_unet_{stem}.lora_up.weight"] = torch.from_numpy(up)
    # diffusers' converter names the same layers
    converted, _ = _convert_non_diffusers_lora_to_diffusers(
        _maybe_map_sgm_blocks_to_diffusers(torch_sd, SimpleNamespace(layers_per_block=1)))
    theirs = {parse_lora_key(key)[1] for key in converted}
    ours = {n for n in table if n.replace(".", "_") in
            {sgm_to_diffusers(s, 1) for s in SGM_STEMS}}
    assert theirs == ours and len(ours) == len(SGM_STEMS)
    fused = {}
    for name, tensor_dict in (("sgm", tensors), ("plain", plain)):
        save_file(tensor_dict, tmp_path / f"{name}.safetensors")
        lora = read_lora(tmp_path / f"{name}.safetensors")
        fused[name] = fuse_lora(unet.params, lora.layers["unet"], 0.7, kohya=True)

    for a, b, c in zip(*(jax.tree.leaves(p) for p in (fused["sgm"], fused["plain"],
                                                      unet.params))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    changed = sum(not np.array_equal(np.asarray(a), np.asarray(c))
                  for a, c in zip(jax.tree.leaves(fused["sgm"]), jax.tree.leaves(unet.params)))
    assert changed == len(SGM_STEMS)
