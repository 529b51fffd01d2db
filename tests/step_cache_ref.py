"""A torch reference for step caching, built from diffusers' UNet2DConditionModel blocks.

``cached_forward`` runs the blocks of a diffusers UNet the way a step-cached call does: a
full call runs every block and keeps what enters the outermost ``depth`` up blocks; a
shallow call runs ``conv_in``, the first ``depth`` down blocks and the last ``depth`` up
blocks on that kept feature. ``patch_step_cache`` makes a diffusers pipeline's UNet do it
on a static schedule (a full call every ``interval`` calls), so that a whole torch pipeline
serves as the reference for ours.
"""
import types

import torch


def _embedding(model, sample, timestep, ehs, added_cond_kwargs):
    t_emb = model.get_time_embed(sample=sample, timestep=timestep)
    emb = model.time_embedding(t_emb, None)
    aug = model.get_aug_embed(emb=emb, encoder_hidden_states=ehs,
                              added_cond_kwargs=added_cond_kwargs or {})
    return emb + aug if aug is not None else emb


def _run(block, x, emb, ehs, **kw):
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=x, temb=emb, encoder_hidden_states=ehs, **kw)
    return block(hidden_states=x, temb=emb, **kw)


def cached_forward(model, sample, timestep, ehs, added_cond_kwargs=None, *, depth,
                   feature=None):
    """``(out, feature)`` (NCHW torch tensors) of a full (``feature=None``) or shallow call."""
    levels = len(model.down_blocks)
    up_factor = 2 ** model.num_upsamplers
    odd = any(d % up_factor for d in sample.shape[-2:])
    timestep = timestep.expand(sample.shape[0]) if torch.is_tensor(timestep) and timestep.ndim \
        else torch.full((sample.shape[0],), float(timestep))
    emb = _embedding(model, sample, timestep, ehs, added_cond_kwargs)
    x = model.conv_in(sample)
    skips = (x,)
    shallow = feature is not None
    for i, block in enumerate(model.down_blocks):
        if shallow and i == depth:
            break
        x, res = _run(block, x, emb, ehs)
        skips += res
    first_up = levels - depth
    if shallow:
        if first_up < levels and model.down_blocks[depth - 1].downsamplers is not None:
            skips = skips[:-1]  # the downsampler's output: only the deeper levels read it
        x = feature
    elif model.mid_block is not None:
        x = model.mid_block(x, emb, encoder_hidden_states=ehs)
    for k, block in enumerate(model.up_blocks):
        if k < first_up and shallow:
            continue
        if k == first_up:
            feature = x
        n = len(block.resnets)
        res, skips = skips[-n:], skips[:-n]
        size = skips[-1].shape[2:] if (odd and k < levels - 1) else None
        x = _run(block, x, emb, ehs, res_hidden_states_tuple=res, upsample_size=size)
    x = model.conv_out(model.conv_act(model.conv_norm_out(x)))
    return x, feature


def patch_step_cache(model, interval: int, depth: int):
    """Make ``model`` (a diffusers UNet2DConditionModel) step-cached: call ``i`` (counted
    from 0 since the patch) is full when ``i % interval == 0``, shallow otherwise. Returns
    a function that removes the patch."""
    original = model.forward
    state = {"calls": 0, "feature": None}

    def forward(self, sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=None,
                return_dict=True, **kwargs):
        full = state["calls"] % interval == 0
        state["calls"] += 1
        out, state["feature"] = cached_forward(
            self, sample, timestep, encoder_hidden_states, added_cond_kwargs, depth=depth,
            feature=None if full else state["feature"])
        return types.SimpleNamespace(sample=out) if return_dict else (out,)

    model.forward = types.MethodType(forward, model)

    def remove():
        model.forward = original
    return remove


def track_cached_blocks(monkeypatch, model, interval: int, depth: int):
    """tests.util.track_tomesd_blocks for a step-cached torch UNet (``patch_step_cache``
    with the same ``interval`` and ``depth``): ``call`` counts UNet calls, ``block`` numbers
    each transformer block as a full call does, although a shallow call skips the deep
    ones."""
    import math

    import tomesd.patch

    def blocks(part):
        return sum(any(c.__name__ == "BasicTransformerBlock" for c in type(m).__mro__)
                   for m in part.modules()) if part is not None else 0

    parts = list(model.down_blocks) + [model.mid_block] + list(model.up_blocks)
    starts, total = [], 0
    for part in parts:
        starts.append(range(total, total + blocks(part)))
        total += blocks(part)
    levels = len(model.down_blocks)
    shallow = [i for r in starts[:depth] for i in r] + [
        i for r in starts[levels + 1 + levels - depth:] for i in r]
    where = {"call": -1, "pos": 0}
    handle = model.register_forward_pre_hook(
        lambda module, args: where.update(call=where["call"] + 1, pos=0))
    original = tomesd.patch.compute_merge

    def compute_merge(x, tome_info):
        h, w = tome_info["size"]
        order = range(total) if where["call"] % interval == 0 else shallow
        where.update(block=order[where["pos"]], pos=where["pos"] + 1,
                     downsample=int(math.ceil(math.sqrt(h * w // x.shape[1]))))
        return original(x, tome_info)

    monkeypatch.setattr(tomesd.patch, "compute_merge", compute_merge)
    return where, handle
