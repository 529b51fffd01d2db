"""Fine-tuning the UNet with optax: full or LoRA, with token merging on the forward pass.

The pieces, each usable on its own:

- :func:`diffusion_loss`: the denoising loss of one batch for given noise and timesteps
  (epsilon or v-prediction targets from the scheduler's ``add_noise`` table, optional
  min-SNR-gamma weighting), any merge config (``ToMe``/``ReToM``/``ToDo``) on the UNet's
  forward pass.
- :func:`make_optimizer`: AdamW with linear warm-up and cosine decay, gradient clipping.
- :class:`Trainer`: one jitted step ``(state, frozen, batch, key) -> (state, metrics)``
  that draws noise and timesteps from ``key``, with the state's buffers donated. Full
  fine-tuning trains the UNet's parameters (optionally as a float32 master copy of
  bfloat16 weights); LoRA trains rank-r adapters on the attention projections
  (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) with the base weights frozen.
- Data: :func:`load_image_folder` reads a diffusers image folder (images +
  ``metadata.jsonl``), centre-crops and resizes; :func:`encode_dataset` runs the VAE and
  the text encoder once and caches the results.
- Files: :func:`save_lora` writes a diffusers/peft LoRA file (``load_lora_weights``
  reads it), :func:`save_unet` a diffusers UNet folder, :func:`save_checkpoint` /
  :func:`load_checkpoint` resumable training state, :func:`plot_losses` a loss-curve PNG.
- :func:`train` runs it all (``retom-jax train``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import weights
from .progress import Progress  # (demo_train imports it from here too)
from .save import _host, _path_key, is_writer, save_unet, torch_state_dict, write_safetensors

__all__ = ["TrainConfig", "TrainState", "Trainer", "diffusion_loss", "make_optimizer",
           "lora_targets", "init_lora", "fuse_lora", "lora_state_dict", "save_lora",
           "torch_state_dict", "save_unet", "write_safetensors", "save_checkpoint",
           "load_checkpoint", "latest_checkpoint", "load_image_folder", "encode_dataset",
           "encode_dataset_xl",
           "plot_losses", "TrainError", "train", "add_train_parser", "state_shardings"]

_F32 = jnp.float32
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class TrainError(ValueError):
    """Bad training input (data folder, options, checkpoint): the message says what."""


# --------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Static training options (a frozen dataclass: hashable, safe as a jit constant).

    ``prediction_type`` None takes the scheduler's. ``snr_gamma`` enables min-SNR-gamma
    loss weighting (Hang et al. 2023; 5.0 is the usual value). ``lora_rank`` None means
    full fine-tuning; ``lora_alpha`` defaults to the rank (scale 1). ``master_fp32`` keeps
    a float32 copy of low-precision trainable weights for the optimizer. ``end_lr`` is the
    learning rate the cosine decay ends at, as a fraction of ``learning_rate``.
    """
    steps: int = 1000
    batch_size: int = 1
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    end_lr: float = 0.0
    weight_decay: float = 1e-2
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    prediction_type: str | None = None
    snr_gamma: float | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    master_fp32: bool = False
    caption_dropout: float = 0.0
    seed: int = 0

    def __post_init__(self):
        def need(ok, msg):
            if not ok:
                raise TrainError(msg)

        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                 f"{name} must be a positive integer, got {v!r}")
        need(isinstance(self.warmup_steps, int) and 0 <= self.warmup_steps,
             f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        need(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate!r}")
        need(0 <= self.end_lr <= 1, f"end_lr is a fraction of the learning rate in [0, 1], "
                                    f"got {self.end_lr!r}")
        need(self.max_grad_norm is None or self.max_grad_norm > 0,
             f"max_grad_norm must be > 0 (or None: no clipping), got {self.max_grad_norm!r}")
        need(self.prediction_type in (None, "epsilon", "v_prediction"),
             f"prediction_type must be 'epsilon' or 'v_prediction', got {self.prediction_type!r}")
        need(self.snr_gamma is None or self.snr_gamma > 0,
             f"snr_gamma must be > 0 (or None: no min-SNR weighting), got {self.snr_gamma!r}")
        if self.lora_rank is not None:
            need(isinstance(self.lora_rank, int) and not isinstance(self.lora_rank, bool)
                 and self.lora_rank >= 1,
                 f"LoRA rank must be a positive integer (omit it for full fine-tuning), "
                 f"got {self.lora_rank!r}")
        need(self.lora_alpha is None or self.lora_alpha > 0,
             f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        need(self.lora_alpha is None or self.lora_rank is not None,
             "lora_alpha is set but lora_rank is not: LoRA needs a rank")
        need(0 <= self.caption_dropout < 1,
             f"caption_dropout must be in [0, 1), got {self.caption_dropout!r}")

    @property
    def lora_scale(self) -> float:
        return (self.lora_alpha or self.lora_rank) / self.lora_rank

    def schedule(self):
        import optax

        return optax.warmup_cosine_decay_schedule(
            init_value=0.0 if self.warmup_steps else self.learning_rate,
            peak_value=self.learning_rate, warmup_steps=self.warmup_steps,
            decay_steps=max(self.steps, self.warmup_steps + 1),
            end_value=self.learning_rate * self.end_lr)


def make_optimizer(config: TrainConfig):
    """AdamW (decoupled weight decay) on the warm-up + cosine learning-rate schedule,
    after clipping the gradients' global norm to ``max_grad_norm``."""
    import optax

    adamw = optax.adamw(config.schedule(), b1=config.adam_b1, b2=config.adam_b2,
                        eps=config.adam_eps, weight_decay=config.weight_decay)
    if config.max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)


# --------------------------------------------------------------------------- loss

def _gather(table, t, ndim):
    return table[t].reshape((-1,) + (1,) * (ndim - 1))


def diffusion_loss(unet, params, latents, encoder_hidden_states, noise, timesteps,
                   alphas_cumprod, *, prediction_type="epsilon", snr_gamma=None, merge=None,
                   key=None, added_cond_kwargs=None, reduce=True):
    """The denoising loss of one batch (NCHW latents, already scaled by the VAE's factor).

    ``noisy = sqrt(a_t) * latents + sqrt(1 - a_t) * noise`` (what the schedulers'
    ``add_noise`` computes from ``alphas_cumprod``); the target is ``noise`` for
    ``"epsilon"`` and ``sqrt(a_t) * noise - sqrt(1 - a_t) * latents`` for
    ``"v_prediction"``. The per-example mean squared error (float32) is weighted by
    ``min(SNR, gamma) / SNR`` (epsilon) or ``min(SNR, gamma) / (SNR + 1)`` (v) when
    ``snr_gamma`` is set, then averaged. ``reduce=False`` returns the per-example losses.
    """
    from .schedulers import _alpha_add_noise

    ac = jnp.asarray(alphas_cumprod, _F32)
    lat32 = latents.astype(_F32)
    noise32 = noise.astype(_F32)
    noisy = _alpha_add_noise(ac, lat32, noise32, timesteps).astype(unet.dtype)
    pred = unet.apply(params, noisy, timesteps, encoder_hidden_states, added_cond_kwargs,
                      merge=merge, key=key).sample.astype(_F32)
    a = _gather(ac, timesteps, latents.ndim)
    if prediction_type == "epsilon":
        target = noise32
    elif prediction_type == "v_prediction":
        target = jnp.sqrt(a) * noise32 - jnp.sqrt(1 - a) * lat32
    else:
        raise TrainError(f"prediction_type must be 'epsilon' or 'v_prediction', "
                         f"got {prediction_type!r}")
    per_example = jnp.mean((pred - target) ** 2, axis=tuple(range(1, latents.ndim)))
    if snr_gamma is not None:
        snr = ac[timesteps] / (1 - ac[timesteps])
        clipped = jnp.minimum(snr, snr_gamma)
        per_example = per_example * (clipped / snr if prediction_type == "epsilon"
                                     else clipped / (snr + 1))
    return jnp.mean(per_example) if reduce else per_example


# --------------------------------------------------------------------------- LoRA

def init_module(build, seed: int = 0):
    """``(graphdef, params)`` of a freshly initialised NNX module ``build(rngs)`` (flax's
    own initialisers, for training from scratch), ``params`` holding plain arrays as the
    loaders' do."""
    from flax import nnx

    graphdef, state = nnx.split(build(nnx.Rngs(seed)))
    flat = {path: getattr(var, "value", var) for path, var in nnx.to_flat_state(state)}
    return graphdef, nnx.from_flat_state(flat)


def lora_targets(params) -> dict[str, tuple[int, int]]:
    """``{module name: (in_features, out_features)}`` of the attention projections that
    LoRA adapts (``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of every transformer block)."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        key = _path_key(path)
        if not key.endswith(".weight") or ".transformer_blocks." not in key:
            continue
        module = key[: -len(".weight")]
        if module.endswith(tuple("." + t for t in LORA_TARGETS)) and leaf.ndim == 2:
            out[module] = (int(leaf.shape[0]), int(leaf.shape[1]))
    return out


def init_lora(params, rank: int, key, dtype=_F32) -> dict:
    """Fresh adapters: ``down`` (in, rank) drawn as peft's default (Kaiming-uniform with
    a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))), ``up`` (rank, out) zero, so the model is
    unchanged at step 0."""
    targets = lora_targets(params)
    if not targets:
        raise TrainError("this UNet has no attention projections to put LoRA adapters on")
    lora = {}
    for i, (name, (fan_in, fan_out)) in enumerate(sorted(targets.items())):
        bound = 1.0 / math.sqrt(fan_in)
        down = jax.random.uniform(jax.random.fold_in(key, i), (fan_in, rank), _F32, -bound, bound)
        lora[name] = {"down": down.astype(dtype), "up": jnp.zeros((rank, fan_out), dtype)}
    return lora


def fuse_lora(params, lora: dict, scale: float):
    """The UNet parameters with each adapted kernel replaced by ``W + scale * down @ up``
    (the same function of the input as ``W x + scale * B A x``, and the same gradients
    for ``A``, ``B``). Pure; used on the training forward pass and to bake a LoRA in."""
    def fuse(path, leaf):
        key = _path_key(path)
        name = key[: -len(".weight")] if key.endswith(".weight") else None
        if name in lora:
            a = lora[name]
            delta = (a["down"].astype(_F32) @ a["up"].astype(_F32)) * scale
            return (leaf.astype(_F32) + delta).astype(leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(fuse, params)


# --------------------------------------------------------------------------- the step

class TrainState(NamedTuple):
    step: jax.Array          # int32 scalar: optimizer steps taken
    params: Any              # what is trained: UNet params (full) or the LoRA adapters
    opt_state: Any


class Trainer:
    """The jitted training step for one UNet and :class:`TrainConfig`.

    ``state = trainer.init(key)``; then ``state, metrics = trainer.step(state, batch, key)``
    with ``batch = {"latents": [B, C, h, w] posterior means, "latents_std": same shape or
    absent, "encoder_hidden_states": [B, T, D], "added_cond_kwargs": SDXL's, optional}`` (latents not yet scaled by the VAE's
    ``scaling_factor``; ``scaling_factor`` is applied inside). ``key`` draws the latent
    sample, noise, timesteps (uniform over the training timesteps) and the merge's random
    choices; ``metrics`` holds ``loss``, ``grad_norm`` and ``lr``. The state's buffers are
    donated: do not reuse a state after passing it in.
    """

    def __init__(self, unet, alphas_cumprod, config: TrainConfig, *, merge=None,
                 scaling_factor: float = 1.0, prediction_type: str | None = None,
                 empty_hidden_states=None, mesh=None, empty_text_embeds=None,
                 latents_mean=None, latents_std=None):
        self.unet, self.config, self.merge = unet, config, merge
        self.alphas_cumprod = np.asarray(alphas_cumprod, np.float32)
        self.prediction_type = config.prediction_type or prediction_type or "epsilon"
        self.scaling_factor = float(scaling_factor)
        self.optimizer = make_optimizer(config)
        self.lr = config.schedule()
        self.empty = None if empty_hidden_states is None else jnp.asarray(empty_hidden_states)
        self.empty_pooled = None if empty_text_embeds is None else jnp.asarray(empty_text_embeds)
        # SDXL VAEs with latents_mean / latents_std: z -> (z - mean) * factor / std, as the
        # pipeline's decoder undoes it
        self.latent_stats = None if latents_mean is None or latents_std is None else (
            np.asarray(latents_mean, np.float32).reshape(1, -1, 1, 1),
            np.asarray(latents_std, np.float32).reshape(1, -1, 1, 1))
        self.param_dtype = jnp.dtype(jax.tree_util.tree_leaves(unet.params)[0].dtype)
        self.mesh = mesh
        if mesh is None:
            self._step = jax.jit(self._step_fn, donate_argnums=(0,))
        else:
            self._place_on_mesh(mesh)

    @property
    def is_lora(self) -> bool:
        return self.config.lora_rank is not None

    # -- state
    def trainable(self, key=None, base=None):
        """Initial trainable parameters: fresh adapters, or (a float32 copy of) the UNet's
        (``base``: the UNet parameters, default ``unet.params``)."""
        base = self.unet.params if base is None else base
        key = key if key is not None else jax.random.key(self.config.seed)
        if self.is_lora:
            dtype = _F32 if self.config.master_fp32 else self.param_dtype
            return init_lora(base, self.config.lora_rank, key, dtype)
        dtype = _F32 if self.config.master_fp32 else None
        return jax.tree_util.tree_map(lambda a: jnp.array(a, dtype or a.dtype, copy=True), base)

    def init(self, key=None) -> TrainState:
        key = key if key is not None else jax.random.key(self.config.seed)
        if self.mesh is not None:  # built on the mesh, shard by shard
            return self._init_jit(self.unet.params, _replicated(key, self.mesh))
        return self._init_fn(self.unet.params, key)

    def _init_fn(self, base, key) -> TrainState:
        params = self.trainable(key, base)
        return TrainState(jnp.zeros((), jnp.int32), params, self.optimizer.init(params))

    # -- the mesh

    def _place_on_mesh(self, mesh):
        """Put the UNet's parameters on ``mesh`` by the sharding rules, and derive the
        shardings of the training state from the same rules: each trained leaf, and each
        of its optimizer moments (same leaf name and shape), takes its parameter's spec;
        scalars are replicated. The step is jitted with these as its explicit input and
        output shardings, the batch split over ``data`` and ``fsdp``."""
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from . import sharding

        if sharding.mesh_shape(mesh)["spatial"] > 1:
            raise TrainError(f"training splits the batch over data and fsdp; the mesh has "
                             f"spatial={mesh.shape['spatial']} (spatial sharding is for "
                             f"sampling): use a mesh without spatial")
        self.unet.params = sharding.shard_params(self.unet.params, mesh)
        self.unet.mesh = mesh  # the UNet's activations: batch-sharded between blocks
        self.rep = NamedSharding(mesh, P())
        self.batch_sharding = NamedSharding(mesh, sharding.logical_spec(("batch",), mesh))
        shape = jax.eval_shape(self._init_fn, self.unet.params, jax.random.key(0))
        self.state_sharding = state_shardings(shape, mesh)
        frozen = self.frozen()
        frozen_sh = None if frozen is None else jax.tree.map(lambda a: a.sharding, frozen)
        self._init_jit = jax.jit(self._init_fn, in_shardings=(
            jax.tree.map(lambda a: a.sharding, self.unet.params), self.rep),
            out_shardings=self.state_sharding)
        self._step = jax.jit(
            self._step_fn, donate_argnums=(0,),
            in_shardings=(self.state_sharding, frozen_sh, self.batch_sharding, self.rep),
            out_shardings=(self.state_sharding, self.rep))

    def place(self, state: TrainState) -> TrainState:
        """A state (e.g. read from a checkpoint) placed with the step's shardings (as is
        without a mesh)."""
        if self.mesh is None:
            return state
        from .sharding import to_global

        return jax.tree.map(to_global, state, self.state_sharding)

    def place_batch(self, batch: dict) -> dict:
        """The batch split over the mesh's ``data`` and ``fsdp`` axes; a batch that does not
        divide over them is a TrainError (before anything compiles)."""
        if self.mesh is None:
            return batch
        from .sharding import shard_batch

        try:
            return jax.tree.map(lambda x: shard_batch(x, self.mesh), batch)
        except ValueError as e:
            raise TrainError(str(e)) from None

    def frozen(self):
        """The arguments that are not trained (the base UNet for LoRA, nothing otherwise)."""
        return self.unet.params if self.is_lora else None

    def unet_params(self, trainable, frozen=None):
        """The UNet parameters the forward pass uses (pure)."""
        if self.is_lora:
            base = self.unet.params if frozen is None else frozen
            lora = jax.tree_util.tree_map(lambda a: a.astype(_F32), trainable)
            return fuse_lora(base, lora, self.config.lora_scale)
        return jax.tree_util.tree_map(lambda a: a.astype(self.param_dtype), trainable)

    # -- loss and step
    def loss(self, trainable, frozen, latents, encoder_hidden_states, noise, timesteps,
             key=None, added_cond_kwargs=None):
        """The loss for explicit noise and timesteps (the parity tests use this)."""
        params = self.unet_params(trainable, frozen)
        return diffusion_loss(self.unet, params, latents, encoder_hidden_states, noise,
                              timesteps, self.alphas_cumprod,
                              prediction_type=self.prediction_type,
                              snr_gamma=self.config.snr_gamma, merge=self.merge, key=key,
                              added_cond_kwargs=added_cond_kwargs)

    def draw(self, batch, key):
        """Latent sample (scaled), noise, timesteps and conditioning for one step: ``(lat,
        noise, t, encoder_hidden_states, added_cond_kwargs)`` (the last None but for
        SDXL)."""
        k_lat, k_noise, k_t, k_drop = jax.random.split(key, 4)
        mean = jnp.asarray(batch["latents"], _F32)
        std = batch.get("latents_std")
        lat = mean if std is None else mean + jnp.asarray(std, _F32) * jax.random.normal(
            k_lat, mean.shape, _F32)
        if self.latent_stats is not None:
            lat = (lat - self.latent_stats[0]) * self.scaling_factor / self.latent_stats[1]
        else:
            lat = lat * self.scaling_factor
        noise = jax.random.normal(k_noise, lat.shape, _F32)
        t = jax.random.randint(k_t, (lat.shape[0],), 0, len(self.alphas_cumprod))
        ehs = batch["encoder_hidden_states"]
        added = batch.get("added_cond_kwargs")
        if self.config.caption_dropout:
            if self.empty is None or (added is not None and self.empty_pooled is None):
                raise TrainError("caption_dropout needs the empty prompt's hidden states "
                                 "(Trainer(empty_hidden_states=...), and for SDXL "
                                 "empty_text_embeds=...)")
            drop = jax.random.uniform(k_drop, (lat.shape[0],)) < self.config.caption_dropout
            ehs = jnp.where(drop[:, None, None], self.empty.astype(ehs.dtype)[None], ehs)
            if added is not None:
                pooled = added["text_embeds"]
                added = dict(added, text_embeds=jnp.where(
                    drop[:, None], self.empty_pooled.astype(pooled.dtype)[None], pooled))
        return lat, noise, t, ehs, added

    def _step_fn(self, state: TrainState, frozen, batch, key):
        import optax

        key = jax.random.fold_in(key, state.step)
        lat, noise, t, ehs, added = self.draw(batch, key)
        merge_key = jax.random.fold_in(key, 7)
        loss, grads = jax.value_and_grad(self.loss)(state.params, frozen, lat, ehs, noise, t,
                                                    merge_key, added)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
                   "lr": jnp.asarray(self.lr(state.step), _F32)}
        return TrainState(state.step + 1, params, opt_state), metrics

    def step(self, state: TrainState, batch, key, frozen=None):
        if self.mesh is not None:
            batch, key = self.place_batch(batch), _replicated(key, self.mesh)
        return self._step(state, self.frozen() if frozen is None else frozen, batch, key)

    def lower(self, state, batch, key):
        """The step lowered for these shapes (for ``compile().memory_analysis()``)."""
        if self.mesh is not None:
            batch, key = self.place_batch(batch), _replicated(key, self.mesh)
        return self._step.lower(state, self.frozen(), batch, key)

    @property
    def compile_count(self) -> int:
        """How many programs the step has compiled (one per batch shape)."""
        return int(self._step._cache_size())


def state_shardings(tree, mesh, min_size: int | None = None):
    """``NamedSharding``s for a training state (parameters, LoRA adapters, optimizer
    moments, master copies): each leaf by ``sharding.param_spec`` of its leaf name and
    shape, i.e. by the one rule table (large kernels and their Adam moments split over
    ``fsdp``; scalars, step counters and small leaves replicated)."""
    from jax.sharding import NamedSharding

    from . import sharding

    def spec(keypath, leaf):
        return NamedSharding(mesh, sharding.param_spec(sharding._flat_path(keypath),
                                                       tuple(np.shape(leaf)), mesh, min_size))
    return jax.tree_util.tree_map_with_path(spec, tree)


def _replicated(key, mesh):
    """A PRNG key (typed or raw) as a global array replicated over ``mesh``."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from .sharding import to_global

    rep = NamedSharding(mesh, P())
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(to_global(jax.random.key_data(key), rep),
                                        impl=jax.random.key_impl(key))
    return to_global(key, rep)


# --------------------------------------------------------------------------- files

def lora_state_dict(lora: dict, prefix: str = "unet", dtype=np.float32) -> dict:
    """Adapters in diffusers' peft layout: ``{prefix}.{module}.lora_A.weight`` (rank, in)
    and ``.lora_B.weight`` (out, rank)."""
    out = {}
    for name, a in lora.items():
        out[f"{prefix}.{name}.lora_A.weight"] = np.asarray(a["down"], np.float32).T.astype(dtype)
        out[f"{prefix}.{name}.lora_B.weight"] = np.asarray(a["up"], np.float32).T.astype(dtype)
    return out


def save_lora(path, lora: dict, rank: int, alpha: float | None = None,
              dtype=np.float32) -> Path:
    """Write the adapters as a diffusers LoRA file (``pytorch_lora_weights.safetensors``
    when ``path`` is not a ``.safetensors`` file name), as diffusers' ``save_lora_weights``
    does: peft keys under ``unet.`` and the adapter config (``r``, ``lora_alpha``,
    ``target_modules``) in the ``lora_adapter_metadata`` header entry, from which
    ``load_lora_weights`` (and ``retom_jax.lora.read_lora`` / ``pipe.load_lora``) take the
    scale ``alpha / r``."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / "pytorch_lora_weights.safetensors"
    config = {"unet.r": int(rank), "unet.lora_alpha": float(alpha or rank),
              "unet.target_modules": sorted({t for n in lora for t in LORA_TARGETS
                                             if n.endswith("." + t)})}
    return write_safetensors(path, lora_state_dict(lora, dtype=dtype),
                             {"format": "pt", "lora_adapter_metadata": json.dumps(
                                 config, indent=2, sort_keys=True)})


# --------------------------------------------------------------------------- checkpoints

def fingerprint(*parts) -> str:
    """A short hash naming what a checkpoint belongs to (model structure, training kind)."""
    return hashlib.sha256(json.dumps([repr(p) for p in parts]).encode()).hexdigest()[:16]


def tree_shapes(tree) -> list:
    return [(jax.tree_util.keystr(p), tuple(np.shape(a)), str(np.asarray(a).dtype)
             if not hasattr(a, "dtype") else str(a.dtype))
            for p, a in jax.tree_util.tree_leaves_with_path(tree)]


def save_checkpoint(folder, state, tag: str, extra: dict | None = None, keep: int = 2) -> Path:
    """Save a training state (any pytree holding ``step``) as
    ``folder/step_{step:06d}.safetensors``; ``tag`` (see :func:`fingerprint`) is checked
    when resuming. Only the newest ``keep`` checkpoints are kept."""
    folder = Path(folder)
    leaves = jax.tree_util.tree_leaves_with_path(state)
    tensors = {f"{i:05d}{jax.tree_util.keystr(p)}": _host(a)
               for i, (p, a) in enumerate(leaves)}
    step = int(_host(state.step))
    meta = {"retom_jax_checkpoint": "1", "tag": tag, "step": str(step),
            "extra": json.dumps(extra or {})}
    path = write_safetensors(folder / f"step_{step:06d}.safetensors", tensors, meta)
    for old in sorted(folder.glob("step_*.safetensors"))[:-keep] if is_writer() else ():
        old.unlink()
    return path


def latest_checkpoint(folder) -> Path | None:
    found = sorted(Path(folder).glob("step_*.safetensors")) if Path(folder).is_dir() else []
    return found[-1] if found else None


def load_checkpoint(path, template, tag: str):
    """``(state, extra)`` from a checkpoint written by :func:`save_checkpoint` for a state
    shaped like ``template``; TrainError (one line) if it was made for another model or
    training setup, or is not a checkpoint."""
    path = Path(path)
    try:
        meta = weights.read_safetensors_metadata(path)
    except weights.CheckpointError as e:
        raise TrainError(str(e)) from None
    if meta.get("retom_jax_checkpoint") != "1":
        raise TrainError(f"{path} is not a retom-jax training checkpoint")
    if meta.get("tag") != tag:
        raise TrainError(f"checkpoint {path} was made for another model or training setup "
                         f"(its tag {meta.get('tag')} != {tag}): use another --out folder "
                         f"or delete the checkpoint")
    stored = weights.read_safetensors(path)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = [f"{i:05d}{jax.tree_util.keystr(p)}" for i, (p, _) in enumerate(leaves)]
    if sorted(names) != sorted(stored):
        raise TrainError(f"checkpoint {path} does not match this training state "
                         f"({len(stored)} arrays stored, {len(names)} expected)")
    values = []
    for name, (_, ref) in zip(names, leaves):
        a = stored[name]
        if tuple(a.shape) != tuple(np.shape(ref)):
            raise TrainError(f"checkpoint {path}: {name} has shape {list(a.shape)}, "
                             f"expected {list(np.shape(ref))}")
        values.append(jnp.asarray(np.array(a), dtype=getattr(ref, "dtype", None)))
    return jax.tree_util.tree_unflatten(treedef, values), json.loads(meta.get("extra", "{}"))


# --------------------------------------------------------------------------- plots

def smooth(values, window: int = 25) -> np.ndarray:
    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return v
    w = max(1, min(window, len(v) // 5 or 1))
    c = np.cumsum(np.insert(v, 0, 0.0))
    out = (c[w:] - c[:-w]) / w
    return np.concatenate([v[: w - 1].cumsum() / np.arange(1, w), out])


def plot_losses(path, curves: dict, title: str = "training loss", size=(640, 400)) -> Path:
    """A loss-curve PNG drawn with Pillow (no plotting library needed): each curve
    ``{name: [loss per step]}`` raw (light) and smoothed (dark), log-scale y axis."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 60, 20, 30, 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    series = {k: np.asarray(v, np.float64) for k, v in curves.items() if len(v)}
    allv = np.concatenate([v[v > 0] for v in series.values()]) if series else np.ones(1)
    lo, hi = np.log10(allv.min()), np.log10(allv.max())
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5
    n = max(len(v) for v in series.values()) if series else 1

    def xy(i, v):
        x = left + (w - left - right) * i / max(n - 1, 1)
        y = top + (h - top - bottom) * (hi - np.log10(max(v, 10 ** lo))) / (hi - lo)
        return x, y

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for e in range(int(np.floor(lo)), int(np.ceil(hi)) + 1):
        for m in (1, 2, 5):
            v = m * 10.0 ** e
            if 10 ** lo <= v <= 10 ** hi:
                y = xy(0, v)[1]
                d.line([left, y, w - right, y], fill=(225, 225, 225))
                d.text((4, y - 6), f"{v:g}", fill="black")
    for k in range(5):
        i = (n - 1) * k / 4
        d.text((xy(i, 1)[0] - 10, h - bottom + 6), f"{int(i)}", fill="black")
    d.text((w // 2 - 15, h - 18), "step", fill="black")
    d.text((left, 8), title, fill="black")
    palette = [((150, 180, 230), (20, 60, 160)), ((240, 170, 150), (180, 40, 20)),
               ((160, 220, 160), (20, 120, 40))]
    for c, (name, v) in enumerate(series.items()):
        light, dark = palette[c % len(palette)]
        if len(v) > 1:
            d.line([xy(i, x) for i, x in enumerate(v)], fill=light)
            d.line([xy(i, x) for i, x in enumerate(smooth(v))], fill=dark, width=2)
        d.text((w - right - 150, top + 6 + 14 * c), f"{name}: {smooth(v)[-1]:.4g}", fill=dark)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


# --------------------------------------------------------------------------- data

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _center_crop_resize(image, resolution: int, with_coords: bool = False):
    """As diffusers' training scripts: resize the shorter side to ``resolution``
    (bilinear), then crop the centre square. uint8 [resolution, resolution, 3]; with
    ``with_coords`` also ``(height, width, top, left)``: the original size and the crop's
    top-left corner (SDXL's size conditioning)."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    # torchvision's Resize(resolution): the longer side truncated; CenterCrop's rounding
    nw, nh = ((resolution, int(resolution * h / w)) if w <= h
              else (int(resolution * w / h), resolution))
    image = image.resize((nw, nh), Image.BILINEAR)
    left, top = int(round((nw - resolution) / 2.0)), int(round((nh - resolution) / 2.0))
    out = np.asarray(image.crop((left, top, left + resolution, top + resolution)), np.uint8)
    return (out, (h, w, top, left)) if with_coords else out


def read_metadata(folder, caption_column: str = "text") -> list[tuple[Path, str]]:
    """``[(image path, caption)]`` from a diffusers image folder's ``metadata.jsonl``
    (one JSON object per line with ``file_name`` and the caption column). TrainError (one
    line) for a missing or empty folder, bad lines, missing files or captions, and image
    files the metadata does not caption."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TrainError(f"data folder {folder} does not exist")
    meta = folder / "metadata.jsonl"
    images = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not meta.is_file():
        what = f"{len(images)} images but " if images else "no images and "
        raise TrainError(f"data folder {folder} has {what}no metadata.jsonl (the diffusers "
                         f"image-folder layout: one line per image, "
                         f'{{"file_name": "0001.png", "{caption_column}": "a caption"}})')
    rows = []
    try:
        text = meta.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise TrainError(f"{meta} cannot be read: {e}") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise TrainError(f"{meta} line {n} is not valid JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise TrainError(f"{meta} line {n} has no \"file_name\"")
        caption = row.get(caption_column)
        if not isinstance(caption, str):
            raise TrainError(f"{meta} line {n} ({row['file_name']}) has no "
                             f"\"{caption_column}\" caption")
        path = folder / row["file_name"]
        if not path.is_file():
            raise TrainError(f"{meta} line {n}: the image {path} does not exist")
        rows.append((path, caption))
    if not rows:
        raise TrainError(f"data folder {folder} is empty: {meta.name} lists no images")
    listed = {p.name for p, _ in rows if p.parent == folder}
    orphans = [name for name in images if name not in listed]
    if orphans:
        raise TrainError(f"{len(orphans)} image(s) in {folder} have no caption in "
                         f"{meta.name}: {', '.join(orphans[:5])}" + (" ..." if len(orphans) > 5
                                                                     else ""))
    return rows


def load_image_folder(folder, resolution: int, caption_column: str = "text",
                      with_sizes: bool = False):
    """``(images uint8 [N, resolution, resolution, 3], captions)`` of a diffusers image
    folder, centre-cropped and resized (see :func:`read_metadata` for the errors); with
    ``with_sizes`` also ``[N, 4]`` int32 ``(height, width, crop top, crop left)``."""
    from PIL import Image, UnidentifiedImageError

    rows = read_metadata(folder, caption_column)
    images, sizes = [], []
    for path, _ in rows:
        try:
            with Image.open(path) as im:
                image, size = _center_crop_resize(im, resolution, with_coords=True)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise TrainError(f"{path} cannot be read as an image ({type(e).__name__})") from None
        images.append(image)
        sizes.append(size)
    captions = [c for _, c in rows]
    if with_sizes:
        return np.stack(images), captions, np.asarray(sizes, np.int32)
    return np.stack(images), captions


def data_fingerprint(folder, resolution: int, caption_column: str, model_tag: str) -> str:
    rows = read_metadata(folder, caption_column)
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns, c) for p, c in rows]
    return fingerprint(stats, resolution, model_tag)


def encode_dataset(vae, text_encoder, tokenizer, images: np.ndarray, captions: list[str],
                   chunk: int = 8) -> dict:
    """Run the VAE encoder and the text encoder once over the data set: posterior means and
    standard deviations (NCHW float32), the hidden states of each distinct caption and of
    the empty prompt, and each image's caption index."""
    from .clip import tokenize

    means, stds = _encode_latents(vae, images, chunk)
    unique = sorted(set(captions))
    ids = tokenize(tokenizer, unique + [""])
    states = np.asarray(text_encoder(ids).last_hidden_state, np.float32)
    lookup = {c: i for i, c in enumerate(unique)}
    return {"means": means, "stds": stds, "states": states[:-1], "empty": states[-1],
            "index": np.asarray([lookup[c] for c in captions], np.int32)}


def _encode_latents(vae, images, chunk: int = 8):
    """Posterior means and standard deviations (NCHW float32) of uint8 NHWC images."""
    enc = jax.jit(lambda p, x: vae.apply_encode(p, x))
    means, stds = [], []
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].astype(np.float32) / 127.5 - 1.0
        post = enc(vae.params, jnp.asarray(x.transpose(0, 3, 1, 2)))
        means.append(np.asarray(post.mean, np.float32))
        stds.append(np.asarray(post.std, np.float32))
    return np.concatenate(means), np.concatenate(stds)


def encode_dataset_xl(pipe, images: np.ndarray, captions: list[str], sizes: np.ndarray,
                      resolution: int, chunk: int = 8) -> dict:
    """:func:`encode_dataset` for SDXL (as diffusers' ``train_text_to_image_sdxl``): each
    caption's hidden states from both text encoders (their penultimate layers, joined) and
    its pooled ``text_embeds`` from the second, through the pipeline's own
    ``encode_prompt``, and per image the ``time_ids`` (original height, width, crop top,
    crop left, target height, width) from ``sizes`` (:func:`load_image_folder`)."""
    means, stds = _encode_latents(pipe.vae, images, chunk)
    unique = sorted(set(captions))
    cond = pipe.encode_prompt(unique + [""], guidance_scale=1.0, height=resolution,
                              width=resolution)
    states = np.asarray(cond["encoder_hidden_states"], np.float32)
    pooled = np.asarray(cond["text_embeds"], np.float32)
    lookup = {c: i for i, c in enumerate(unique)}
    sizes = np.asarray(sizes, np.float32).reshape(-1, 4)
    target = np.full((len(sizes), 2), resolution, np.float32)
    return {"means": means, "stds": stds, "states": states[:-1], "empty": states[-1],
            "pooled": pooled[:-1], "empty_pooled": pooled[-1],
            "time_ids": np.concatenate([sizes, target], axis=1),
            "index": np.asarray([lookup[c] for c in captions], np.int32)}


def cached_encoding(cache_file, compute) -> dict:
    """The arrays in ``cache_file`` (an ``.npz`` read without pickle) or ``compute()``'s,
    then saved there."""
    cache_file = Path(cache_file)
    if cache_file.is_file():
        with np.load(cache_file, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    data = compute()
    if is_writer():
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(cache_file.stem + ".tmp.npz")
        np.savez(tmp, **data)
        os.replace(tmp, cache_file)
    return data


def batches(data: dict, batch_size: int, seed: int, step: int) -> dict:
    """The batch of one step (a pure function of the seed and the step, so a resumed run
    sees the same batches): examples drawn from a per-epoch permutation."""
    n = len(data["means"])
    per_epoch = max(n // batch_size, 1) if n >= batch_size else 1
    epoch, pos = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    if n >= batch_size:
        idx = perm[pos * batch_size:(pos + 1) * batch_size]
    else:
        idx = np.resize(perm, batch_size)
    batch = {"latents": data["means"][idx], "latents_std": data["stds"][idx],
             "encoder_hidden_states": data["states"][data["index"][idx]]}
    if "pooled" in data:  # SDXL
        batch["added_cond_kwargs"] = {"text_embeds": data["pooled"][data["index"][idx]],
                                      "time_ids": data["time_ids"][idx]}
    return batch


# --------------------------------------------------------------------------- the run

def run_steps(trainer: Trainer, state: TrainState, steps: int, batch_at, key, losses: list,
              *, progress: str | None = None, every: int | None = None, save=None):
    """Run ``trainer.step`` from the state's step up to ``steps`` (the batch of step ``s``
    is ``batch_at(s)``), appending each step's loss to ``losses``; ``progress``: the
    label of a progress line (None: none). The host does not wait
    for a step before dispatching the next: the step counter lives in Python and a step's
    loss is read once the following step is queued. ``save(state)`` runs every ``every``
    steps and after the last (its losses are in ``losses`` by then). Returns ``(state,
    {"compile_seconds", "steps_per_second"})`` (the first call's time, tracing and
    compiling included; the rate of the steps after it)."""
    frozen = trainer.frozen()
    first, pending = int(state.step), None
    bar = Progress(steps, first, progress) if progress is not None else None
    compile_seconds, t_loop = None, time.perf_counter()

    def record(loss):
        losses.append(float(loss))
        if bar is not None:
            bar.update(losses[-1])

    for s in range(first, steps):
        t0 = time.perf_counter()
        state, metrics = trainer.step(state, batch_at(s), key, frozen)
        if compile_seconds is None:
            compile_seconds, t_loop = time.perf_counter() - t0, time.perf_counter()
        if pending is not None:
            record(pending)
        pending = metrics["loss"]
        if every and ((s + 1) % every == 0 or s + 1 == steps):
            record(pending)
            pending = None
            if save is not None:
                save(state)
    if pending is not None:
        record(pending)
    jax.block_until_ready(state)
    if bar is not None:
        bar.close()
    done = steps - first
    rate = (done - 1) / max(time.perf_counter() - t_loop, 1e-9) if done > 1 else None
    return state, {"compile_seconds": compile_seconds, "steps_per_second": rate}


def train(model, data, out, *, resolution: int = 512, lora_rank: int | None = None,
          lora_alpha: float | None = None, steps: int = 1000, batch_size: int = 1,
          learning_rate: float = 1e-4, warmup_steps: int = 0, snr_gamma: float | None = None,
          prediction_type: str | None = None, merge=None, dtype="float32",
          master_fp32: bool = False, max_grad_norm: float | None = 1.0,
          weight_decay: float = 1e-2, caption_dropout: float = 0.0,
          checkpoint_every: int = 500, caption_column: str = "text", seed: int = 0,
          save_dtype="float32", progress: bool = True, log=print, mesh=None) -> dict:
    """Fine-tune the UNet of the SD 1.x/2.x or SDXL pipeline ``model`` on the image folder
    ``data`` and write the result to ``out``: ``pytorch_lora_weights.safetensors`` (LoRA) or a
    diffusers ``unet/`` folder (full), ``loss.png``, ``train_log.json``; checkpoints in
    ``out/checkpoints`` every ``checkpoint_every`` steps, from which a rerun with the same
    ``out`` resumes. ``merge``: a merge config, or a function of the UNet's first attention
    level (downsample factor) returning one. ``mesh`` (``make_mesh(data=, fsdp=)``): the
    batch is split over ``data`` and ``fsdp`` (``batch_size`` a multiple of their
    product), the model, the trained parameters and the optimizer state over ``fsdp`` by
    the sharding rules. Every input is checked before anything is compiled."""
    from .pipeline import StableDiffusionXLPipeline, load_pipeline, pipeline_folder
    from .weights import parse_dtype

    config = TrainConfig(steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                         warmup_steps=warmup_steps, snr_gamma=snr_gamma,
                         prediction_type=prediction_type, lora_rank=lora_rank,
                         lora_alpha=lora_alpha, master_fp32=master_fp32,
                         max_grad_norm=max_grad_norm, weight_decay=weight_decay,
                         caption_dropout=caption_dropout, seed=seed)
    if not isinstance(resolution, int) or resolution < 8:
        raise TrainError(f"resolution must be an integer >= 8, got {resolution!r}")
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise TrainError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}")
    dtype = parse_dtype(dtype)
    save_dtype = np.dtype(parse_dtype(save_dtype))
    if mesh is not None:
        from .sharding import batch_shards, mesh_shape

        if mesh_shape(mesh)["spatial"] > 1:
            raise TrainError(f"training splits the batch over data and fsdp; the mesh has "
                             f"spatial={mesh.shape['spatial']} (spatial sharding is for "
                             f"sampling): use a mesh without spatial")
        if batch_size % batch_shards(mesh):
            raise TrainError(f"batch size {batch_size} does not divide over the mesh's data x "
                             f"fsdp = {batch_shards(mesh)} devices: use a multiple of "
                             f"{batch_shards(mesh)}")
    read_metadata(data, caption_column)  # the data's errors come before the model is read
    out = Path(out)
    t_start = time.perf_counter()
    pipe = load_pipeline(model, dtype, mesh=mesh)
    xl = isinstance(pipe, StableDiffusionXLPipeline)
    unet, vae = pipe.unet, pipe.vae
    factor = vae.config.vae_scale_factor
    multiple = factor * 2 ** unet.config.num_upsamplers
    if resolution % multiple:
        raise TrainError(f"resolution {resolution} is not a multiple of {multiple} (the VAE's "
                         f"factor {factor} times the UNet's {2 ** unet.config.num_upsamplers})")
    latent = resolution // factor
    if merge is not None and not hasattr(merge, "applies"):  # a function of the first level
        merge = merge(min(unet.config.attention_downsamples(), default=1))
    if merge is not None:
        unet.check_merge(merge, (latent, latent), key=jax.random.key(0))
    tag = fingerprint("unet", unet.config, tree_shapes(unet.params), lora_rank, master_fp32)
    trainer = Trainer(unet, pipe.scheduler.alphas_cumprod(), config, merge=merge,
                      scaling_factor=vae.config.scaling_factor,
                      prediction_type=pipe.scheduler.prediction_type, mesh=mesh,
                      **(dict(latents_mean=vae.config.latents_mean,
                              latents_std=vae.config.latents_std) if xl else {}))
    state = trainer.init(jax.random.key(seed))
    losses: list[float] = []
    ckpts = out / "checkpoints"
    last = latest_checkpoint(ckpts)
    if last is not None:
        state, extra = load_checkpoint(last, state, tag)
        state = trainer.place(state)
        losses = list(extra.get("losses", []))
        log(f"resumed from {last} (step {int(state.step)})")

    def compute():
        images, captions, sizes = load_image_folder(data, resolution, caption_column, True)
        log(f"encoding {len(images)} images ({resolution} px) and {len(set(captions))} "
            f"captions once")
        if xl:  # both text encoders, pooled text_embeds, per-image size time_ids
            return encode_dataset_xl(pipe, images, captions, sizes, resolution)
        return encode_dataset(vae, pipe.text_encoder, pipe.tokenizer, images, captions)

    cache = out / "cache" / (data_fingerprint(data, resolution, caption_column, tag) + ".npz")
    encoded = cached_encoding(cache, compute)
    trainer.empty = jnp.asarray(encoded["empty"])
    if xl:
        trainer.empty_pooled = jnp.asarray(encoded["empty_pooled"])
    kind = f"LoRA rank {lora_rank}" if lora_rank else "full fine-tuning"
    log(f"training the UNet ({kind}, {merge!r} on the forward pass) on "
        f"{len(encoded['means'])} images for {steps} steps")
    state, timing = run_steps(
        trainer, state, steps, lambda s: batches(encoded, batch_size, seed, s),
        jax.random.key(seed), losses, progress="train" if progress else None,
        every=checkpoint_every,
        save=lambda st: save_checkpoint(ckpts, st, tag, {"losses": losses}))
    compile_seconds, rate = timing["compile_seconds"], timing["steps_per_second"]

    if lora_rank:
        result = save_lora(out, jax.tree.map(_host, state.params), lora_rank, lora_alpha,
                           save_dtype)
    else:
        raw = weights.read_config(pipeline_folder(model) / "unet")
        result = save_unet(out / "unet", raw, trainer.unet_params(state.params), save_dtype)
    summary = {"model": str(model), "data": str(data), "resolution": resolution,
               "steps": steps, "batch_size": batch_size, "lora_rank": lora_rank,
               "lora_alpha": lora_alpha, "merge": repr(merge), "dtype": str(dtype.name),
               "learning_rate": learning_rate,
               "mesh": None if mesh is None else {k: int(v) for k, v in mesh.shape.items()},
               "first_loss": losses[0] if losses else None,
               "final_loss": float(np.mean(losses[-max(1, len(losses) // 10):])) if losses
               else None, "steps_per_second": rate, "compile_seconds": compile_seconds,
               "seconds": round(time.perf_counter() - t_start, 2), "output": str(result),
               "losses": losses}
    if is_writer():  # process 0 of a multi-host run (the files go to a shared folder)
        plot_losses(out / "loss.png", {"loss": losses}, title=f"retom-jax train: {kind}")
        (out / "train_log.json").write_text(json.dumps(summary) + "\n")
        log(f"saved {result}; loss curve {out / 'loss.png'}")
    return summary


# --------------------------------------------------------------------------- command line

def add_train_parser(sub):
    """Register ``retom-jax train`` on the CLI's subparsers."""
    from .cli import MERGES, _mesh, _positive_int, _window

    t = sub.add_parser(
        "train", help="fine-tune a Stable Diffusion UNet (LoRA or full), or train the demo model",
        description="Fine-tune the UNet of a diffusers Stable Diffusion pipeline folder on an "
                    "image folder (images + metadata.jsonl with 'file_name' and 'text'), with "
                    "token merging on the training forward pass. With --lora-rank: LoRA "
                    "adapters on the attention projections, saved as a diffusers LoRA file; "
                    "without: full fine-tuning, saved as a diffusers unet/ folder. "
                    "'retom-jax train --demo' retrains the built-in demo model.")
    t.add_argument("--demo", action="store_true",
                   help="train the demo model from scratch (its own recipe; only --out applies)")
    t.add_argument("--model", help="diffusers pipeline folder or cached repo id")
    t.add_argument("--data", help="image folder with metadata.jsonl")
    t.add_argument("--out", help="output folder (checkpoints there are resumed)")
    t.add_argument("--resolution", type=_positive_int, default=512)
    t.add_argument("--lora-rank", type=int, default=None,
                   help="LoRA rank (omit for full fine-tuning)")
    t.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (the rank)")
    t.add_argument("--steps", type=_positive_int, default=1000)
    t.add_argument("--batch-size", type=_positive_int, default=1)
    t.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (1e-4)")
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--snr-gamma", type=float, default=None, help="min-SNR weighting (e.g. 5)")
    t.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                   help="default: the model's scheduler's")
    t.add_argument("--max-grad-norm", type=float, default=1.0)
    t.add_argument("--weight-decay", type=float, default=1e-2)
    t.add_argument("--caption-dropout", type=float, default=0.0,
                   help="share of captions replaced by the empty prompt")
    t.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    t.add_argument("--master-fp32", action="store_true",
                   help="keep a float32 master copy of low-precision trainable weights")
    t.add_argument("--save-dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    t.add_argument("--checkpoint-every", type=_positive_int, default=500)
    t.add_argument("--caption-column", default="text")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--merge", choices=MERGES, default="none",
                   help="token merging on the training forward pass (none)")
    t.add_argument("--ratio", type=float, default=0.5)
    t.add_argument("--window", type=_window, default=(2, 2))
    t.add_argument("--matching", choices=("local", "global"), default="local")
    t.add_argument("--max-downsample", type=_positive_int, default=None)
    t.add_argument("--todo-factor", type=_positive_int, default=2)
    t.add_argument("--mesh", type=_mesh, default=None, metavar="AXIS=N,...",
                   help="train on a device mesh, e.g. data=4,fsdp=2: the batch over data and "
                        "fsdp (--batch-size a multiple of both), the model and the optimizer "
                        "state over fsdp; an axis left out is 1, except data, which takes the "
                        "devices left")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(handler=run_train, subparser=t)
    return t


def run_train(args, parser) -> int:
    from .cli import make_merge
    from .weights import CheckpointError

    if args.demo:
        given = [f"--{k.replace('_', '-')}" for k in ("model", "data", "lora_rank", "mesh")
                 if getattr(args, k) is not None]
        if given:
            parser.error(f"--demo trains the demo model with its own recipe: {', '.join(given)} "
                         f"do not apply")
        from .demo_train import train_demo

        train_demo(args.out or "demo-model")
        return 0
    missing = [f"--{k}" for k in ("model", "data", "out") if not getattr(args, k)]
    if missing:
        parser.error(f"{', '.join(missing)} required (or --demo)")
    args.cache_step, args.window_schedule = None, ()
    try:
        make_merge(args, 1)  # bad merge options fail here, before any model is read
        mesh = None
        if args.mesh is not None:
            from .sharding import make_mesh

            mesh = make_mesh(**{"data": -1, **args.mesh})
        train(args.model, args.data, args.out, resolution=args.resolution,
              lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, steps=args.steps,
              batch_size=args.batch_size, learning_rate=args.lr,
              warmup_steps=args.warmup_steps, snr_gamma=args.snr_gamma,
              prediction_type=args.prediction_type,
              merge=(lambda level: make_merge(args, level)) if args.merge != "none" else None,
              dtype=args.dtype, master_fp32=args.master_fp32,
              max_grad_norm=args.max_grad_norm, weight_decay=args.weight_decay,
              caption_dropout=args.caption_dropout, checkpoint_every=args.checkpoint_every,
              caption_column=args.caption_column, seed=args.seed, save_dtype=args.save_dtype,
              progress=not args.no_progress, mesh=mesh)
    except (TrainError, CheckpointError, ValueError) as e:
        parser.error(str(e))
    return 0
