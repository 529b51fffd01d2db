"""A tiny random diffusers FluxPipeline (CLIP + T5 + 16-channel VAE + Flux transformer)
saved to a folder, for the Flux pipeline tests."""
from pathlib import Path

import torch

from tests.pipeline_helpers import make_tokenizer, perturb, text_encoder

T5_WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "square", "circle", "the"]
CLIP_HIDDEN, T5_DIM, TEXT_TOKENS = 12, 24, 16


def t5_tokenizer(folder: Path):
    """A T5 tokenizer (unigram over T5_WORDS and letters, "</s>" appended) saved in
    ``folder`` with transformers' T5TokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0 - 0.1 * i) for i, w in enumerate(T5_WORDS)]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"] + [("\u2581", -3.0)]
    tk = Tokenizer(models.Unigram(vocab, unk_id=2))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tk.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                      special_tokens=[("</s>", 1)])
    tok = T5TokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="<unk>",
                          pad_token="<pad>", extra_ids=0, model_max_length=512)
    return tok, len(vocab)


def save_flux(folder: Path, guidance=True):
    """A tiny FluxPipeline (dev-like with the guidance embedder, else schnell-like) saved in
    ``folder``; returns the torch pipeline. Images: multiples of 4 pixels (VAE factor 2)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                           FluxTransformer2DModel)
    from transformers import T5Config, T5EncoderModel

    tok2, vocab = t5_tokenizer(folder)
    torch.manual_seed(11)
    t5 = perturb(T5EncoderModel(T5Config(
        vocab_size=vocab, d_model=T5_DIM, d_kv=8, d_ff=40, num_layers=2, num_heads=3,
        relative_attention_num_buckets=8, relative_attention_max_distance=20,
        feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval())
    torch.manual_seed(12)
    vae = perturb(AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=32, use_quant_conv=False,
        use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159).eval())
    torch.manual_seed(13)
    transformer = perturb(FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_DIM, pooled_projection_dim=CLIP_HIDDEN,
        guidance_embeds=guidance, axes_dims_rope=(4, 6, 6)).eval())
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder(CLIP_HIDDEN, 14),
                        tokenizer=make_tokenizer(), text_encoder_2=t5, tokenizer_2=tok2,
                        transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    return pipe


def save_sd3(folder: Path):
    """A tiny StableDiffusion3Pipeline (SD3.5-style transformer: qk-norm, one dual-attention
    layer; two projected CLIPs, T5, 16-channel VAE, FlowMatchEuler shift 3) saved in
    ``folder``; returns the torch pipeline. Images: multiples of 4 pixels (default 32)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)
    from transformers import T5Config, T5EncoderModel

    tok3, vocab = t5_tokenizer(folder)
    torch.manual_seed(21)
    t5 = perturb(T5EncoderModel(T5Config(
        vocab_size=vocab, d_model=40, d_kv=8, d_ff=40, num_layers=2, num_heads=3,
        relative_attention_num_buckets=8, relative_attention_max_distance=20,
        feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval())
    torch.manual_seed(22)
    vae = perturb(AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=32, use_quant_conv=False,
        use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609).eval())
    torch.manual_seed(23)
    transformer = perturb(SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=40, caption_projection_dim=16,
        pooled_projection_dim=16, out_channels=16, pos_embed_max_size=16,
        dual_attention_layers=(0,), qk_norm="rms_norm").eval())
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder(12, 24, projection_dim=8), tokenizer=make_tokenizer(),
        text_encoder_2=text_encoder(20, 25, projection_dim=8),
        tokenizer_2=make_tokenizer(pad_token="!"), text_encoder_3=t5, tokenizer_3=tok3)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    return pipe
