"""Stable Diffusion 1.x/2.x and SDXL: the text conditioning of each (the sampling is
:class:`~retom_jax.pipelines.base.Pipeline`'s).
"""
from __future__ import annotations


import jax.numpy as jnp
import numpy as np

from . import options as features
from ..models.clip import tokenize
from ..models.weights import CheckpointError
from .base import Pipeline
from .request import EncodeConfig, check_tokenizer, per_prompt, row_labels

_F32 = jnp.float32


class StableDiffusionPipeline(Pipeline):
    """Stable Diffusion 1.x / 2.x: one CLIP text encoder, ``last_hidden_state``."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler):
        super().__init__(unet, vae, scheduler)
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        dim = text_encoder.config.hidden_size
        if unet.config.addition_embed_type is not None:
            raise CheckpointError("this UNet expects SDXL's added conditioning: use "
                                  "StableDiffusionXLPipeline")
        if unet.config.cross_attention_dim[0] != dim:
            raise CheckpointError(
                f"the text encoder's hidden size is {dim} but the UNet's "
                f"cross_attention_dim is {unet.config.cross_attention_dim[0]}")
        check_tokenizer(tokenizer, text_encoder, "tokenizer")

    def _encode_params(self):
        return {"text_encoder": self.text_encoder.params}

    def _tokenize(self, prompts, negatives, guidance, zero_negative, options=None):
        rows = prompts if not guidance else negatives + prompts
        return {"ids": tokenize(self.tokenizer, rows,
                                labels=row_labels(prompts, negatives, guidance, False))}

    def _clip_skip_limit(self) -> int:
        return self.text_encoder.config.num_hidden_layers

    def _encode(self, static: EncodeConfig, params, ids):
        out = self.text_encoder.apply(params["text_encoder"], ids["ids"])
        h = out.last_hidden_state
        if static.clip_skip is not None:  # the positive prompts only, as in diffusers
            skipped = self.text_encoder.apply_final_layer_norm(
                params["text_encoder"], out.hidden_states[-(static.clip_skip + 1)])
            half = h.shape[0] // 2 if static.guidance else 0
            h = jnp.concatenate([h[:half], skipped[half:]], axis=0)
        h = jnp.repeat(h, static.num_images_per_prompt, axis=0)
        return {"encoder_hidden_states": h.astype(self.unet.dtype)}


class StableDiffusionXLPipeline(Pipeline):
    """SDXL: two CLIP text encoders (the second with projection), added conditioning."""

    _uses_latent_stats = True
    _default_strength = 0.3  # diffusers' StableDiffusionXLImg2ImgPipeline default

    def __init__(self, unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2,
                 scheduler, force_zeros_for_empty_prompt: bool = True):
        super().__init__(unet, vae, scheduler)
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        cfg = unet.config
        if cfg.addition_embed_type != "text_time":
            raise CheckpointError("an SDXL pipeline needs a UNet with addition_embed_type "
                                  "'text_time'")
        if not text_encoder_2.config.with_projection:
            raise CheckpointError("SDXL's text_encoder_2 must be a CLIPTextModelWithProjection")
        dim = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
        if cfg.cross_attention_dim[0] != dim:
            raise CheckpointError(
                f"the two text encoders give {dim} features per token but the UNet's "
                f"cross_attention_dim is {cfg.cross_attention_dim[0]}")
        added = cfg.addition_time_embed_dim * 6 + text_encoder_2.config.projection_dim
        if added != cfg.projection_class_embeddings_input_dim:
            raise CheckpointError(
                f"the UNet's added embedding takes {cfg.projection_class_embeddings_input_dim} "
                f"features, but text_encoder_2's projection_dim "
                f"({text_encoder_2.config.projection_dim}) and 6 time ids of "
                f"{cfg.addition_time_embed_dim} give {added}")
        check_tokenizer(tokenizer, text_encoder, "tokenizer")
        check_tokenizer(tokenizer_2, text_encoder_2, "tokenizer_2")
        if tokenizer.model_max_length != tokenizer_2.model_max_length:
            raise CheckpointError("tokenizer and tokenizer_2 have different model_max_length")

    def _zero_negative(self, negative_prompt) -> bool:
        return negative_prompt is None and self.force_zeros_for_empty_prompt

    def _encode_params(self):
        return {"text_encoder": self.text_encoder.params,
                "text_encoder_2": self.text_encoder_2.params}

    def _option_names(self):
        return features.COMMON_OPTIONS + features.SDXL_OPTIONS

    def _clip_skip_limit(self) -> int:
        return min(self.text_encoder.config.num_hidden_layers,
                   self.text_encoder_2.config.num_hidden_layers) - 1

    def _check_options(self, options, prompts, negative_prompt, guidance) -> dict:
        out = super()._check_options(options, prompts, negative_prompt, guidance)
        if out["prompt_2"] is not None:
            out["prompt_2"] = per_prompt(out["prompt_2"], "prompt_2", len(prompts))
        if out["negative_prompt_2"] is not None:
            if not guidance:
                raise ValueError("negative_prompt_2 has no effect without classifier-free "
                                 "guidance (guidance_scale <= 1)")
            if self._zero_negative(negative_prompt):
                raise ValueError(
                    "negative_prompt_2 has no effect without negative_prompt: this model "
                    "uses zero unconditional embeddings then (force_zeros_for_empty_prompt); "
                    "give negative_prompt too")
            out["negative_prompt_2"] = per_prompt(out["negative_prompt_2"],
                                                   "negative_prompt_2", len(prompts))
        for name in features.SDXL_OPTIONS[2:]:
            if out[name] is not None:
                out[name] = features.check_size_pair(name, out[name],
                                                     positive="crops" not in name)
                if name.startswith("negative_") and not guidance:
                    raise ValueError(f"{name} has no effect without classifier-free guidance "
                                     f"(guidance_scale <= 1)")
        return out

    def _tokenize(self, prompts, negatives, guidance, zero_negative, options=None):
        options = options or {}
        prompts_2 = options.get("prompt_2") or prompts
        negatives_2 = options.get("negative_prompt_2") or negatives
        both = not guidance or zero_negative
        rows = prompts if both else negatives + prompts
        rows_2 = prompts_2 if both else negatives_2 + prompts_2
        labels = row_labels(prompts, negatives, guidance, zero_negative)
        # With the same rows both tokenizers cut alike (same length, checked): one warning.
        labels_2 = [label.replace("prompt", "prompt_2", 1) for label in labels]
        return {"ids": tokenize(self.tokenizer, rows, labels=labels),
                "ids_2": tokenize(self.tokenizer_2, rows_2, labels=labels_2,
                                  warn=rows_2 != rows)}

    def _encode(self, static: EncodeConfig, params, ids):
        o1 = self.text_encoder.apply(params["text_encoder"], ids["ids"])
        o2 = self.text_encoder_2.apply(params["text_encoder_2"], ids["ids_2"])
        h = jnp.concatenate([o1.hidden_states[-2], o2.hidden_states[-2]], axis=-1)
        if static.clip_skip is not None:  # the positive prompts only, as in diffusers
            k = -(static.clip_skip + 2)
            skipped = jnp.concatenate([o1.hidden_states[k], o2.hidden_states[k]], axis=-1)
            half = h.shape[0] // 2 if static.guidance and not static.zero_negative else 0
            h = jnp.concatenate([h[:half], skipped[half:]], axis=0)
        pooled = o2.text_embeds
        if static.zero_negative:
            h = jnp.concatenate([jnp.zeros_like(h), h], axis=0)
            pooled = jnp.concatenate([jnp.zeros_like(pooled), pooled], axis=0)
        n = static.num_images_per_prompt
        return {"encoder_hidden_states": jnp.repeat(h, n, axis=0).astype(self.unet.dtype),
                "text_embeds": jnp.repeat(pooled, n, axis=0).astype(_F32)}

    def _added_cond(self, height, width, rows, options=None, guidance=False):
        positive, negative = features.add_time_ids(options or {}, height, width)
        ids = np.array([negative] * (rows // 2) + [positive] * (rows // 2) if guidance
                       else [positive] * rows, np.float32)
        return {"time_ids": jnp.asarray(ids)}
