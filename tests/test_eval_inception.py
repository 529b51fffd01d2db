"""FID Inception against a torch.nn reference with the same random weights (pytorch-fid's
module names, reduced width), and the restricted reader of torch.save files."""
import collections
import pickle
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retom_jax.eval.inception import FID_WEIGHTS, InceptionError, load_inception, resize_bilinear
from retom_jax.eval.torch_pickle import TorchFileError, load_torch_file
from tests.eval_tiny import random_inception
from tests.util import rel_err, to_numpy


@pytest.fixture(scope="module")
def tiny_inception(tmp_path_factory):
    net = random_inception(div=8)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-tiny.pth"
    torch.save(net.state_dict(), path)
    return net, path, load_inception(path)


def test_features_match_torch_reference(tiny_inception):
    net, path, inception = tiny_inception
    # pytorch-fid's whole path: resize to 299x299, [-1, 1], network, pool features
    # 2 images of 128x128: the demo's size, so the e2e eval test reuses this compile
    images = np.random.default_rng(0).random((2, 128, 128, 3), dtype=np.float32)
    with torch.no_grad():
        want = to_numpy(net(torch.tensor(images).permute(0, 3, 1, 2)))
    got = inception(images)
    assert got.shape == want.shape == (2, net.features) and inception.features == net.features
    err = rel_err(got, want)
    assert err < 1e-6, err  # measured 8e-8; avg pool in 7c or padding counted: 3e-3..5e-3


@pytest.mark.parametrize("hw", [(512, 384), (64, 48), (299, 299), (300, 17)])
def test_resize_matches_torch_interpolate(hw):
    x = np.random.default_rng(1).random((1, *hw, 3), dtype=np.float32)
    want = F.interpolate(torch.tensor(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear",
                         align_corners=False).permute(0, 2, 3, 1).numpy()
    assert np.abs(np.asarray(resize_bilinear(x)) - want).max() < 1e-6


def test_legacy_format_and_fid_file_name(tiny_inception, tmp_path):
    net, path, _ = tiny_inception
    state = net.state_dict()
    legacy = tmp_path / "legacy.pth"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    for file in (path, legacy):
        loaded = load_torch_file(file)
        assert isinstance(loaded, collections.OrderedDict) and list(loaded) == list(state)
        for k, v in state.items():
            assert loaded[k].dtype == to_numpy(v).dtype and np.array_equal(loaded[k], to_numpy(v)), k


def test_reader_tensors_views_and_dtypes(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    obj = {"t": base.t(), "col": base[:, 2], "half": torch.randn(3).half(),
           "bf16": torch.randn(2, 2).bfloat16(), "long": torch.arange(5),
           "bool": torch.tensor([True, False]), "nested": [base[1:3, 1:5], (3, "x", None)],
           "empty": torch.zeros(0, 3)}
    for legacy in (False, True):
        f = tmp_path / f"obj{legacy}.pth"
        torch.save(obj, f, _use_new_zipfile_serialization=not legacy)
        got = load_torch_file(f)
        for key in ("t", "col", "half", "long", "bool", "empty"):
            assert np.array_equal(got[key], obj[key].numpy()), key
        assert np.array_equal(np.asarray(got["bf16"], np.float32), obj["bf16"].float().numpy())
        assert np.array_equal(got["nested"][0], obj["nested"][0].numpy())
        assert got["nested"][1] == (3, "x", None)


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned > /dev/null",))


def test_reader_refuses_code(tmp_path):
    # A malicious zip archive: a data.pkl that calls os.system.
    f = tmp_path / "evil.pth"
    with zipfile.ZipFile(f, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"w": _Evil()}, protocol=2))
    with pytest.raises(TorchFileError, match=r"asks for (posix|os)\.system.*refusing"):
        load_torch_file(f)
    # The same as a legacy stream, and a whole model object saved with torch.save.
    g = tmp_path / "evil_legacy.pth"
    g.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, 2) + pickle.dumps(1001, 2)
                  + pickle.dumps({}, 2) + pickle.dumps([_Evil()], 2))
    with pytest.raises(TorchFileError, match="refusing"):
        load_torch_file(g)
    h = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), h)
    with pytest.raises(TorchFileError, match="refusing"):
        load_torch_file(h)
    (tmp_path / "junk.pth").write_bytes(b"not a pickle at all")
    with pytest.raises(TorchFileError, match="malformed"):
        load_torch_file(tmp_path / "junk.pth")


def test_inception_errors(tiny_inception, tmp_path):
    net, _, _ = tiny_inception
    with pytest.raises(InceptionError, match=FID_WEIGHTS) as e:
        load_inception(tmp_path / FID_WEIGHTS)
    assert "\n" not in str(e.value)
    state = net.state_dict()
    del state["Mixed_6b.branch7x7_2.bn.running_var"]
    state["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(InceptionError, match=r"missing key\(s\): Mixed_6b.branch7x7_2.bn.running_var.*unexpected key\(s\): extra.weight"):
        load_inception(bad)
    torch.save([torch.zeros(2)], bad)
    with pytest.raises(InceptionError, match="not a state dict"):
        load_inception(bad)
