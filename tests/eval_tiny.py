"""Tiny reference models for the evaluation tests: a random transformers CLIPModel saved
with ``save_pretrained`` (with a tokenizer), and a torch.nn InceptionV3 laid out as
pytorch-fid's FID network (same module names as its weight file), at a reduced width."""
import json

import torch
import torch.nn as nn
import torch.nn.functional as F

from retom_jax.demo import PROMPT_WORDS, bpe_vocab
from retom_jax.demo import build_demo_pipeline as _build_demo  # before any patching

CLIP_IMAGE = 30


def save_tiny_clip(folder, seed=0, vision_only=False):
    """A random CLIPModel (or CLIPVisionModelWithProjection) in ``folder``; returns it."""
    from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTokenizer,
                              CLIPVisionConfig, CLIPVisionModelWithProjection)

    vocab, merges = bpe_vocab(PROMPT_WORDS)
    eos, bos = vocab["<|endoftext|>"], vocab["<|startoftext|>"]
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                              num_attention_heads=4, image_size=CLIP_IMAGE, patch_size=6,
                              projection_dim=16, hidden_act="quick_gelu")
    torch.manual_seed(seed)
    if vision_only:
        model = CLIPVisionModelWithProjection(vision).eval()
    else:
        text = CLIPTextConfig(vocab_size=len(vocab), hidden_size=24, intermediate_size=40,
                              num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=77, eos_token_id=eos, bos_token_id=bos,
                              pad_token_id=eos, hidden_act="gelu")
        config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                            projection_dim=16)
        model = CLIPModel(config).eval()
    with torch.no_grad():  # every parameter matters (LayerNorm scales and biases too)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    if not vision_only:
        (folder / "vocab.json").write_text(json.dumps(vocab))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tok = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                            model_max_length=77)
        tok.save_pretrained(folder)
    return model


# ----------------------------------------------------------------------------- Inception

class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin, pool, w):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, w(64), kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, w(48), kernel_size=1)
        self.branch5x5_2 = BasicConv2d(w(48), w(64), kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, w(64), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(w(64), w(96), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(w(96), w(96), kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin, w):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, w(384), kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, w(64), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(w(64), w(96), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(w(96), w(96), kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin, c7, w):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, w(192), kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, w(192), kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, w(192), kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, w(192), kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin, w):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, w(192), kernel_size=1)
        self.branch3x3_2 = BasicConv2d(w(192), w(320), kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, w(192), kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(w(192), w(192), kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(w(192), w(192), kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(w(192), w(192), kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin, w, max_pool):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, w(320), kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, w(384), kernel_size=1)
        self.branch3x3_2a = BasicConv2d(w(384), w(384), kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(w(384), w(384), kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, w(448), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(w(448), w(384), kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(w(384), w(384), kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(w(384), w(384), kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, w(192), kernel_size=1)
        self.max_pool = max_pool

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's FID InceptionV3 (2048-d pool features), every width divided by
    ``div`` (1: the real network). Module names match its weight file's keys."""

    def __init__(self, div=1, num_classes=1008):
        super().__init__()
        w = lambda c: max(c // div, 1)  # noqa: E731
        self.Conv2d_1a_3x3 = BasicConv2d(3, w(32), kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(w(32), w(32), kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(w(32), w(64), kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(w(64), w(80), kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(w(80), w(192), kernel_size=3)
        a_out = lambda pool: w(64) + w(64) + w(96) + pool  # noqa: E731
        self.Mixed_5b = InceptionA(w(192), w(32), w)
        self.Mixed_5c = InceptionA(a_out(w(32)), w(64), w)
        self.Mixed_5d = InceptionA(a_out(w(64)), w(64), w)
        c5 = a_out(w(64))
        self.Mixed_6a = InceptionB(c5, w)
        c6 = w(384) + w(96) + c5
        self.Mixed_6b = InceptionC(c6, w(128), w)
        c6 = 4 * w(192)
        self.Mixed_6c = InceptionC(c6, w(160), w)
        self.Mixed_6d = InceptionC(c6, w(160), w)
        self.Mixed_6e = InceptionC(c6, w(192), w)
        self.Mixed_7a = InceptionD(c6, w)
        c7 = w(320) + w(192) + c6
        self.Mixed_7b = InceptionE(c7, w, max_pool=False)
        c7 = w(320) + 4 * w(384) + w(192)
        self.Mixed_7c = InceptionE(c7, w, max_pool=True)
        self.fc = nn.Linear(c7, num_classes)
        self.features = c7

    def forward(self, x, resize=True):
        """Pool features ``[B, C]`` of images in [0, 1], as pytorch-fid's InceptionV3."""
        if resize:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = F.max_pool2d(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))), 3, 2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, 1)[:, :, 0, 0]


def random_inception(div=8, seed=0):
    """A reduced-width FID InceptionV3 with random weights and BatchNorm statistics."""
    torch.manual_seed(seed)
    net = FIDInceptionV3(div).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return net


# ----------------------------------------------------------------------------- demo

_DEMO = {}


def shared_demo_pipeline(dtype=None, seed=0, scheduler=None, attention="auto"):
    """``build_demo_pipeline`` with one instance per set of arguments, so that the CLI
    runs of these tests share its compiled programs (patched in by the test modules)."""
    import jax.numpy as jnp

    dtype = jnp.dtype(dtype or jnp.float32)
    key = (dtype.name, seed, scheduler, attention)
    if key not in _DEMO:
        _DEMO[key] = _build_demo(dtype, seed, scheduler, attention)
    return _DEMO[key]
