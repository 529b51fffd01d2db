"""T5 encoder parity with transformers' T5EncoderModel (T5 v1.1 gated-GELU and the original
ReLU feed-forward), padding masks, loading."""
import numpy as np
import pytest
import torch
from transformers import T5Config as HFT5Config, T5EncoderModel

from retom_jax.models.t5 import load_t5_encoder, relative_position_buckets
from tests.util import assert_close

TOL = 1e-5


def tiny(ff="gated-gelu"):
    return HFT5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=20,
                      feed_forward_proj=ff, dropout_rate=0.0)


@pytest.fixture(scope="module", params=["gated-gelu", "relu"])
def model(request, tmp_path_factory):
    torch.manual_seed(0)
    m = T5EncoderModel(tiny(request.param)).eval()
    folder = tmp_path_factory.mktemp("t5")
    m.save_pretrained(folder)
    return m, folder


def test_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention
    rel = torch.arange(40)[None, :] - torch.arange(40)[:, None]
    for nb, md in ((8, 20), (32, 128)):
        ref = T5Attention._relative_position_bucket(rel, True, nb, md).numpy()
        np.testing.assert_array_equal(relative_position_buckets(40, 40, nb, md), ref)


def test_parity_fp32(model):
    m, folder = model
    enc = load_t5_encoder(folder)
    rng = np.random.RandomState(0)
    ids = rng.randint(0, 50, (2, 30))
    with torch.no_grad():
        ref = m(torch.from_numpy(ids)).last_hidden_state.numpy()
    assert_close(enc(ids), ref, TOL)
    mask = np.ones((2, 30), np.int64)
    mask[1, 20:] = 0
    with torch.no_grad():
        ref = m(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    assert_close(enc(ids, mask), ref, TOL)
    with pytest.raises(ValueError, match=r"must lie in \[0, 50\)"):
        enc(ids + 50)
