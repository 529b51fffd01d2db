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
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..pipelines.save import path_key

_F32 = jnp.float32
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class TrainError(ValueError):
    """Bad training input (data folder, options, checkpoint): the message says what, on
    one line of at most 600 characters."""

    def __init__(self, message="", *args):
        from ..models.weights import one_line

        super().__init__(one_line(message), *args)


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
        need(self.warmup_steps <= self.steps,
             f"warmup_steps {self.warmup_steps} is more than the {self.steps} steps: the "
             f"learning rate would never reach its peak")
        for name in ("learning_rate", "end_lr", "weight_decay", "max_grad_norm", "snr_gamma",
                     "lora_alpha", "caption_dropout"):
            v = getattr(self, name)
            need(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                               and math.isfinite(v)),
                 f"{name} must be a finite number, got {v!r}")
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
    from ..schedulers.core import alpha_add_noise

    ac = jnp.asarray(alphas_cumprod, _F32)
    lat32 = latents.astype(_F32)
    noise32 = noise.astype(_F32)
    noisy = alpha_add_noise(ac, lat32, noise32, timesteps).astype(unet.dtype)
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
        key = path_key(path)
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
        key = path_key(path)
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
            return self._init_jit(self.unet.params, replicated(key, self.mesh))
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

        from .. import sharding

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
        from ..sharding import to_global

        return jax.tree.map(to_global, state, self.state_sharding)

    def place_batch(self, batch: dict) -> dict:
        """The batch split over the mesh's ``data`` and ``fsdp`` axes; a batch that does not
        divide over them is a TrainError (before anything compiles)."""
        if self.mesh is None:
            return batch
        from ..sharding import shard_batch

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
            batch, key = self.place_batch(batch), replicated(key, self.mesh)
        return self._step(state, self.frozen() if frozen is None else frozen, batch, key)

    def lower(self, state, batch, key):
        """The step lowered for these shapes (for ``compile().memory_analysis()``)."""
        if self.mesh is not None:
            batch, key = self.place_batch(batch), replicated(key, self.mesh)
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

    from .. import sharding

    def spec(keypath, leaf):
        return NamedSharding(mesh, sharding.param_spec(sharding.flat_path(keypath),
                                                       tuple(np.shape(leaf)), mesh, min_size))
    return jax.tree_util.tree_map_with_path(spec, tree)


def replicated(key, mesh):
    """A PRNG key (typed or raw) as a global array replicated over ``mesh``."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from ..sharding import to_global

    rep = NamedSharding(mesh, P())
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(to_global(jax.random.key_data(key), rep),
                                        impl=jax.random.key_impl(key))
    return to_global(key, rep)

