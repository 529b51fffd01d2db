"""CLIP text encoders and tokenizer against transformers, with the same random weights."""
import dataclasses
import json
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from transformers import CLIPTextConfig
from transformers import CLIPTextModel as TorchCLIPTextModel
from transformers import CLIPTextModelWithProjection as TorchCLIPTextModelWithProjection
from transformers import CLIPTokenizer

from retom_jax.models.clip import TextEncoder, TextEncoderConfig, TextEncoderOutput, load_text_encoder, load_tokenizer, tokenize
from retom_jax.demo import bpe_vocab
from retom_jax.models.weights import CheckpointError
from tests.util import check_bound, rel_err, to_numpy

TOL = 3e-6  # float32: measured ~2.5e-7

VOCAB, T = 1000, 77
LAYERS = 3


def torch_model(with_projection, hidden_act, eos_token_id, seed=0):
    config = CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=37,
                            num_hidden_layers=LAYERS, num_attention_heads=4,
                            max_position_embeddings=T, hidden_act=hidden_act,
                            projection_dim=16, layer_norm_eps=1e-5, bos_token_id=998,
                            eos_token_id=eos_token_id, pad_token_id=0)
    torch.manual_seed(seed)
    cls = TorchCLIPTextModelWithProjection if with_projection else TorchCLIPTextModel
    model = cls(config).eval()
    with torch.no_grad():  # perturb everything, so that LayerNorm scales/biases matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def make_ids(eos, pads, content_high, with_token=None, seed=0):
    """3 prompts of different lengths: BOS (998), content, EOS, then padding."""
    rng = np.random.RandomState(seed)
    ids = np.zeros((3, T), np.int64)
    for row, (n, pad) in enumerate(zip((2, 7, 30), pads)):
        content = rng.randint(10, content_high, n)
        if with_token is not None and row == 1:
            content[2] = with_token
        seq = [998, *content, eos]
        ids[row, :len(seq)] = seq
        ids[row, len(seq):] = pad
    return ids


def reference(model, ids):
    with torch.no_grad():
        tid = torch.tensor(ids)
        out = model(tid, output_hidden_states=True)
        text_model = getattr(model, "text_model", model)
        pooled = text_model(tid).pooler_output
    return out, pooled


def compare(ours, ref, pooled, with_projection, tol):
    assert isinstance(ours, TextEncoderOutput)
    assert len(ours.hidden_states) == LAYERS + 1 == len(ref.hidden_states)
    errs = {"last": rel_err(ours.last_hidden_state, to_numpy(ref.last_hidden_state)),
            "pooled": rel_err(ours.pooler_output, to_numpy(pooled))}
    for i, (a, b) in enumerate(zip(ours.hidden_states, ref.hidden_states)):
        errs[f"hidden{i}"] = rel_err(a, to_numpy(b))
    if with_projection:
        errs["text_embeds"] = rel_err(ours.text_embeds, to_numpy(ref.text_embeds))
    else:
        assert ours.text_embeds is None
    worst = max(errs, key=errs.get)
    check_bound(errs[worst], tol, worst)
    return errs


# (with_projection, hidden_act, eos_token_id in config)
CASES = [(False, "quick_gelu", 2), (True, "gelu", 5), (False, "gelu", 5), (True, "quick_gelu", 2)]


def case_ids(eos_token_id):
    if eos_token_id == 2:
        # Legacy: the real EOS is the largest id (999); config says 2. Token 2 inside
        # a prompt makes "first id == 2" differ from argmax; pads: EOS (SD 1.x) or 0.
        ids = make_ids(999, pads=(999, 0, 999), content_high=990, with_token=2)
        first_two = np.argmax(ids == 2, axis=-1)
        assert (first_two != ids.argmax(-1)).any()
    else:
        # EOS 5; large content ids and a large pad make argmax differ from the EOS.
        ids = make_ids(5, pads=(0, 5, 999), content_high=1000, with_token=999)
        assert (np.argmax(ids == 5, axis=-1) != ids.argmax(-1)).any()
    return ids


@pytest.mark.parametrize("with_projection,hidden_act,eos", CASES)
def test_matches_transformers_fp32(tmp_path, with_projection, hidden_act, eos):
    model = torch_model(with_projection, hidden_act, eos)
    model.save_pretrained(tmp_path)
    enc = load_text_encoder(tmp_path)
    assert isinstance(enc, TextEncoder)
    arch = "CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"
    assert enc.config.architecture == arch and enc.config.hidden_act == hidden_act
    assert enc.config.eos_token_id == eos
    ids = case_ids(eos)
    ref, pooled = reference(model, ids)
    ours = enc(ids)
    assert ours.last_hidden_state.dtype == jnp.float32
    assert ours.last_hidden_state.shape == (3, T, 32) and ours.pooler_output.shape == (3, 32)
    if with_projection:
        assert ours.text_embeds.shape == (3, 16)
    compare(ours, ref, pooled, with_projection, TOL)


def test_bf16_stays_close(tmp_path):
    model = torch_model(True, "gelu", 5)
    model.save_pretrained(tmp_path)
    ids = case_ids(5)
    ref, pooled = reference(model, ids)
    enc = load_text_encoder(tmp_path, dtype="bf16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(enc.params))
    ours = enc(ids)
    assert ours.last_hidden_state.dtype == jnp.bfloat16
    assert ours.text_embeds.dtype == jnp.bfloat16
    errs = compare(ours, ref, pooled, True, 2e-2)
    assert errs["last"] > 1e-6  # it really ran in bf16
    mixed = load_text_encoder(tmp_path, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(mixed.params))
    compare(mixed(ids), ref, pooled, True, 2e-2)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A CLIPTextModel saved by transformers (keys without the text_model. prefix)."""
    folder = tmp_path_factory.mktemp("plain")
    model = torch_model(False, "quick_gelu", 2, seed=1)
    model.save_pretrained(folder)
    ids = case_ids(2)
    return model, folder, ids, reference(model, ids), load_text_encoder(folder)


def test_checkpoint_layouts(plain, tmp_path, monkeypatch):
    model, folder, ids, (ref, pooled), _ = plain
    # Older transformers: text_model. prefix and a saved position_ids buffer.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(folder / "config.json", legacy)
    state = {f"text_model.{k}": v.numpy() for k, v in model.state_dict().items()}
    state["text_model.embeddings.position_ids"] = np.arange(T, dtype=np.int64)[None]
    save_file(state, str(legacy / "model.safetensors"))
    compare(load_text_encoder(legacy)(ids), ref, pooled, False, TOL)

    # Sharded.
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="60KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    compare(load_text_encoder(sharded)(ids), ref, pooled, False, TOL)

    # Pipeline folder with an fp16 variant in a subfolder.
    pipe = tmp_path / "pipe"
    model16 = torch_model(False, "quick_gelu", 2, seed=1).half()
    model16.save_pretrained(pipe / "text_encoder_2", variant="fp16")
    assert (pipe / "text_encoder_2" / "model.fp16.safetensors").is_file()
    enc = load_text_encoder(pipe, subfolder="text_encoder_2")
    rounded = model16.float()
    compare(enc(ids), *reference(rounded, ids), False, TOL)
    # The fp16 weights really are the rounded ones, not the fp32 ones.
    assert rel_err(enc(ids).last_hidden_state, to_numpy(ref.last_hidden_state)) > 1e-5

    # A repo id in the local Hugging Face cache.
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snap = cache / "models--someone--tiny-sd" / "snapshots" / ("a" * 40)
    shutil.copytree(folder, snap / "text_encoder")
    (cache / "models--someone--tiny-sd" / "refs").mkdir(parents=True)
    (cache / "models--someone--tiny-sd" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    compare(load_text_encoder("someone/tiny-sd")(ids), ref, pooled, False, TOL)
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        load_text_encoder("someone/not-there")


def test_apply_is_pure_and_jittable(plain):
    _, _, ids, _, enc = plain
    direct = enc(ids)
    apply = jax.jit(enc.apply)
    jitted = apply(enc.params, jnp.asarray(ids, jnp.int32))
    for a, b in zip(jax.tree_util.tree_leaves(direct), jax.tree_util.tree_leaves(jitted)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    # A pytree: last, LAYERS + 1 hidden states, pooled; text_embeds None is no leaf.
    assert len(jax.tree_util.tree_leaves(direct)) == LAYERS + 3
    # Params are a plain pytree of arrays: a transformed copy is used as given.
    zeros = jax.tree_util.tree_map(jnp.zeros_like, enc.params)
    out = apply(zeros, jnp.asarray(ids, jnp.int32))
    assert float(jnp.abs(out.last_hidden_state).max()) == 0.0
    # The wrapper shows the module as an NNX module with the same params.
    assert len(enc.module.text_model.encoder.layers) == LAYERS


def test_bad_input_ids(plain):
    _, _, ids, _, enc = plain
    with pytest.raises(ValueError, match="2-D"):
        enc(ids[0])
    with pytest.raises(ValueError, match="78 tokens.*max_position_embeddings \\(77\\)"):
        enc(np.zeros((1, 78), np.int32))
    with pytest.raises(ValueError, match="integer token ids"):
        enc(np.zeros((1, 5), np.float32))
    with pytest.raises(ValueError, match=r"\[0, 1000\).*from 1000 to 1000"):
        enc(np.full((1, 5), 1000))
    with pytest.raises(ValueError, match="from -1"):
        enc(np.full((1, 5), -1))
    with pytest.raises(ValueError, match="2-D"):  # also when traced inside jit
        jax.jit(enc.apply)(enc.params, jnp.zeros((2, 3, 4), jnp.int32))
    with pytest.raises(ValueError, match="empty"):
        enc(np.zeros((1, 0), np.int32))
    # Shorter sequences than max_position_embeddings are fine.
    assert enc(ids[:, :20]).last_hidden_state.shape == (3, 20, 32)


def test_checkpoint_errors(plain, tmp_path):
    folder = plain[1]
    with pytest.raises(CheckpointError, match="neither a local folder"):
        load_text_encoder(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json nor in its text_encoder/"):
        load_text_encoder(empty)

    def copy(name, config_edit=None, weights=True):
        dst = tmp_path / name
        dst.mkdir()
        config = json.loads((folder / "config.json").read_text())
        if config_edit:
            config_edit(config)
        (dst / "config.json").write_text(json.dumps(config))
        if weights:
            shutil.copy(folder / "model.safetensors", dst)
        return dst

    with pytest.raises(CheckpointError, match="no weights in .*model.safetensors"):
        load_text_encoder(copy("noweights", weights=False))

    corrupt = copy("corrupt")
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_text_encoder(corrupt)

    bad_json = copy("badjson")
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_text_encoder(bad_json)

    unknown = copy("unknown", lambda c: c.update(architectures=["CLIPVisionModel"]))
    with pytest.raises(CheckpointError,
                       match="'CLIPVisionModel'.*supported: CLIPTextModel, CLIPTextModelWith"):
        load_text_encoder(unknown)
    with pytest.raises(CheckpointError, match="no 'architectures'"):
        load_text_encoder(copy("noarch", lambda c: c.pop("architectures")))
    with pytest.raises(CheckpointError, match="unsupported hidden_act 'swish'"):
        load_text_encoder(copy("act", lambda c: c.update(hidden_act="swish")))
    with pytest.raises(CheckpointError, match="eos_token_id must be one integer"):
        load_text_encoder(copy("eos", lambda c: c.update(eos_token_id=[5, 6])))
    with pytest.raises(CheckpointError, match="not divisible"):
        load_text_encoder(copy("heads", lambda c: c.update(num_attention_heads=5)))

    # Weights that do not fit the config: a layer too many, a wrong width.
    with pytest.raises(CheckpointError, match="missing key.*encoder.layers.3"):
        load_text_encoder(copy("layers", lambda c: c.update(num_hidden_layers=4)))
    with pytest.raises(CheckpointError, match="has shape \\[37, 32\\].*implies \\[40, 32\\]"):
        load_text_encoder(copy("width", lambda c: c.update(intermediate_size=40)))
    # A projection model's config over plain-model weights.
    with pytest.raises(CheckpointError, match="missing key.*text_projection.weight"):
        load_text_encoder(copy("proj", lambda c: c.update(
            architectures=["CLIPTextModelWithProjection"])))

    with pytest.raises(ValueError, match="unsupported dtype"):
        load_text_encoder(folder, dtype="int8")
    with pytest.raises(ValueError, match="unknown attention implementation"):
        load_text_encoder(folder, attention="flash")


def test_config_validation():
    cfg = TextEncoderConfig()
    assert cfg.head_dim == 64 and not cfg.with_projection
    with pytest.raises(ValueError, match="needs a positive integer projection_dim"):
        TextEncoderConfig(architecture="CLIPTextModelWithProjection")
    with pytest.raises(ValueError, match="unknown CLIP text architecture"):
        TextEncoderConfig(architecture="CLIPModel")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 3


# ----------------------------------------------------------------------------- tokenizer

WORDS = ["the", "cat", "dog", "a", "photo", "of"]


@pytest.fixture(scope="module")
def pipeline_tokenizers(tmp_path_factory):
    """A pipeline folder with an SD-style tokenizer/ (vocab.json, merges.txt) and a
    tokenizer_2/ written by save_pretrained (tokenizer.json), max length 12."""
    root = tmp_path_factory.mktemp("pipe")
    vocab, merges = bpe_vocab(WORDS, "abcdefghijklmnopqrstuvwxyz")
    src = root / "tokenizer"
    src.mkdir()
    (src / "vocab.json").write_text(json.dumps(vocab))
    (src / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 12}))
    tok = CLIPTokenizer(vocab=str(src / "vocab.json"), merges=str(src / "merges.txt"),
                        model_max_length=12)
    tok.save_pretrained(root / "tokenizer_2")
    return root, vocab


def test_tokenize_pads_like_sd(pipeline_tokenizers):
    root, vocab = pipeline_tokenizers
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    for sub in ("tokenizer", "tokenizer_2"):
        tok = load_tokenizer(root, subfolder=sub)
        assert tok.model_max_length == 12
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ids = tokenize(tok, ["the cat", "a photo of a dog"])
        assert ids.shape == (2, 12) and ids.dtype == np.int32
        w = lambda s: vocab[s + "</w>"]  # noqa: E731
        assert ids[0].tolist() == [bos, w("the"), w("cat")] + [eos] * 9
        assert ids[1].tolist() == [bos, w("a"), w("photo"), w("of"), w("a"), w("dog")] + [eos] * 6
        expected = tok(["the cat", "a photo of a dog"], padding="max_length", max_length=12,
                       truncation=True).input_ids
        np.testing.assert_array_equal(ids, expected)
        # A single string; an explicit max_length.
        assert tokenize(tok, "the dog", max_length=5).tolist() == [
            [bos, w("the"), w("dog"), eos, eos]]
    # The tokenizer folder itself also works.
    assert load_tokenizer(root / "tokenizer").model_max_length == 12


def test_tokenize_truncates_with_warning(pipeline_tokenizers):
    root, vocab = pipeline_tokenizers
    tok = load_tokenizer(root)
    eos = vocab["<|endoftext|>"]
    exact = "the cat " * 5  # 10 words + BOS + EOS = 12: fits, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fits = tokenize(tok, [exact])
    assert fits[0, -1] == eos and fits[0, -2] == vocab["cat</w>"]
    long = exact + "a photo of dog"
    with pytest.warns(UserWarning, match=r"^prompt 2 has 16 tokens, the text encoder reads 12: "
                                         r"cut before 'a photo of dog' \(4 tokens dropped\)$"):
        ids = tokenize(tok, ["the cat", long])
    np.testing.assert_array_equal(ids[1], fits[0])
    with pytest.warns(UserWarning, match=r"^prompt 1 has 6 tokens.*reads 4: cut before 'of cat'"):
        short = tokenize(tok, "a photo of cat", max_length=4)
    assert short.tolist() == [[vocab["<|startoftext|>"], vocab["a</w>"], vocab["photo</w>"],
                               eos]]


def test_tokenizer_errors(pipeline_tokenizers, tmp_path):
    root, _ = pipeline_tokenizers
    with pytest.raises(CheckpointError, match="no tokenizer files.*nor in its tokenizer/"):
        load_tokenizer(tmp_path)
    with pytest.raises(CheckpointError, match="no tokenizer files.*tokenizer_3/"):
        load_tokenizer(root, subfolder="tokenizer_3")
    with pytest.raises(CheckpointError, match="neither a local folder"):
        load_tokenizer(tmp_path / "missing")
    tok = load_tokenizer(root)
    with pytest.raises(ValueError, match="non-empty list of strings"):
        tokenize(tok, [])
    with pytest.raises(ValueError, match="non-empty list of strings"):
        tokenize(tok, ["ok", 3])
    with pytest.raises(ValueError, match="max_length must be an integer >= 2"):
        tokenize(tok, "the cat", max_length=1)


def test_tokenize_then_encode(pipeline_tokenizers, plain):
    root, _ = pipeline_tokenizers
    model, _, _, _, enc = plain
    ids = tokenize(load_tokenizer(root), ["the cat", "a photo of a dog"], max_length=T)
    ref, pooled = reference(model, ids.astype(np.int64))
    compare(enc(ids), ref, pooled, False, TOL)
