"""The ``retom-jax generate`` command line."""
import re

import numpy as np
import pytest
from PIL import Image

import retom_jax.cli.generate
import retom_jax.pipelines
from retom_jax import ReToM
from retom_jax.cli import main
from tests.pipeline_helpers import save_sd


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd")
    save_sd(path)
    return path


@pytest.fixture
def spy(monkeypatch):
    """Records the arguments of the CLI's load_pipeline calls and the pipelines really
    loaded (a call with the same arguments as an earlier one gets the same pipeline)."""
    calls = []
    real = retom_jax.pipelines.load_pipeline

    def load(*args, **kwargs):
        done = [p for a, k, p in calls if (a, k) == (args, kwargs)]
        calls.append((args, kwargs, done[0] if done else real(*args, **kwargs)))
        return calls[-1][2]

    monkeypatch.setattr(retom_jax.pipelines, "load_pipeline", load)
    return calls


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["generate", "--model", "demo", "--prompt", "a red circle on a blue background",
                 "--steps", "3", "--merge", "retom", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "demo model: a tiny pipeline trained by retom-jax" in text
    assert re.search(r"compiling \.\.\..*\ncompiled in \d+\.\d+ s", text)
    assert float(re.search(r"time per image: (\d+\.\d+) s", text).group(1)) > 0
    assert f"saved {out}" in text
    image = Image.open(out)
    assert image.format == "PNG" and image.mode == "RGB" and image.size == (64, 64)
    assert np.asarray(image).std() > 1  # not a blank image


def test_pipeline_folder(folder, tmp_path, capsys, spy):
    """A saved pipeline folder; the files equal what the Python API gives for the same
    options (prompt, negative prompt, seed, size, scheduler, merge, image count); a size
    the model cannot make is a clear error."""
    out = tmp_path / "sub" / "img.png"
    assert main(["generate", "--model", str(folder), "--prompt", "the cat",
                 "--negative-prompt", "blurry", "--steps", "3", "--height", "32", "--width",
                 "24", "--seed", "3", "--scheduler", "euler", "--merge", "retom",
                 "--cache-step", "1", "--window-schedule", "1:1x2", "--num-images", "2",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "noise" not in text and "time per image:" in text
    files = [tmp_path / "sub" / "img-0.png", tmp_path / "sub" / "img-1.png"]
    images = [np.asarray(Image.open(f)) for f in files]
    assert all(im.shape == (32, 24, 3) for im in images)

    ((args, kwargs, pipe),) = spy
    scheduled = ReToM(ratio=0.5, cache_step=1, schedule={1: (1, 2)})
    assert args[0] == str(folder) and kwargs["scheduler"] == "euler"
    assert type(pipe.scheduler).__name__ == "Euler"
    expected = pipe("the cat", negative_prompt="blurry", num_inference_steps=3, height=32,
                    width=24, seed=3, merge=scheduled,
                    num_images_per_prompt=2, output_type="pil")
    assert expected.compile_seconds == 0.0  # the CLI's own program: the same options
    for got, want in zip(images, expected.images):
        np.testing.assert_array_equal(got, np.asarray(want))
    other = pipe("the cat", num_inference_steps=3, height=32, width=24, seed=4,
                 merge=scheduled, num_images_per_prompt=2,
                 output_type="pil", negative_prompt="blurry")
    assert np.abs(np.asarray(other.images[0], float) - images[0]).mean() > 1  # seed matters

    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(folder), "--prompt", "x", "--height", "33",
              "--scheduler", "euler"])
    assert e.value.code == 2
    assert "height=33 is not a multiple of 2" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["generate", "--model", "demo", "--prompt", "x", "--steps", "0"],
     "--steps: expected a positive integer"),
    (["generate", "--model", "demo", "--prompt", "x", "--merge", "fast"],
     "--merge: invalid choice: 'fast'"),
    (["generate", "--model", "demo"], "the following arguments are required: --prompt"),
    (["generate", "--model", "demo", "--prompt", "x", "--merge", "retom", "--ratio", "0.9"],
     r"ratio must be in \[0, 0.75\]"),
    (["generate", "--model", "demo", "--prompt", "x", "--out", "x.notanimage"],
     "unknown image extension '.notanimage'"),
    (["generate", "--model", "demo", "--prompt", "x", "--window", "2by2"],
     "expected a window like 2x2"),
    (["generate", "--model", "demo", "--prompt", "x", "--window-schedule", "4x4"],
     "expected STEP:WINDOW like 10:4x4"),
    (["generate", "--model", "demo", "--prompt", "x", "--merge", "retom", "--window-schedule",
      "0:4x4"], "schedule steps must be ints >= 1"),
    (["generate", "--model", "demo", "--prompt", "x", "--merge", "retom", "--cache-step", "3",
      "--window-schedule", "2:4x4", "5:2x2"], "changes at step 5, after cache_step 3"),
    (["generate", "--model", "/no/such/folder", "--prompt", "x"],
     "neither a local pipeline folder nor a Hugging Face repo id"),
    ([], "required: COMMAND"),
])
def test_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err)
    assert err.startswith("retom-jax: error: ") and err.count("\n") == 1  # no usage block
