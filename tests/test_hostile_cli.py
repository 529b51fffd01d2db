"""Issue #23 on the command line: each refusal comes before a model is read (so these
tests load none), and the behaviours documented in docs/robustness.md."""
import json

import numpy as np
import pytest
from PIL import Image

from retom_jax.cli import main


def _fails(argv, capsys, match):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and match in err, err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "a.png")
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a cat"}\n')
    return folder


def test_generate_never_replaces_a_file_unasked(tmp_path, capsys):
    out = tmp_path / "existing.png"
    out.write_bytes(b"precious")
    _fails(["generate", "--model", "demo", "--prompt", "x", "--out", str(out)], capsys,
           "exists: pass --overwrite")
    assert out.read_bytes() == b"precious"


def test_huge_sizes_refused_before_loading(capsys):
    _fails(["generate", "--model", "demo", "--prompt", "x", "--height", "100000", "--width",
            "100000"], capsys, "more than 16384")


def test_huge_size_refused_by_the_pipeline_before_noise():
    from retom_jax.pipelines.request import MAX_SIDE, check_result

    assert MAX_SIDE == 16384
    with pytest.raises(ValueError, match="diverged"):
        check_result(np.full((1, 8, 8, 3), np.nan, np.float32), True, 1e30)
    with pytest.raises(ValueError, match="diverged"):
        check_result(np.full((1, 4, 8, 8), 1e29, np.float32), False, 1e30)
    check_result(np.zeros((1, 4, 8, 8), np.float32), False, 7.5)


@pytest.mark.parametrize("extra, match", [
    (["--ratio", "0.7"], "--ratio is an option of --merge"),
    (["--warmup-steps", "20", "--steps", "10"], "warmup_steps 20 is more than the 10 steps"),
    (["--lr", "inf"], "learning_rate must be a finite number"),
])
def test_train_option_errors(tmp_path, data, capsys, extra, match):
    _fails(["train", "--model", str(tmp_path), "--data", str(data), "--out",
            str(tmp_path / "out")] + extra, capsys, match)


def test_train_out_refused_where_it_would_do_harm(tmp_path, data, capsys):
    base = ["train", "--model", str(tmp_path), "--data", str(data), "--out"]
    (tmp_path / "file").write_text("x")
    _fails(base + [str(tmp_path / "file")], capsys, "is a file; name a folder")
    _fails(base + [str(tmp_path / "file" / "sub")], capsys, "is a file; name a folder")
    _fails(base + [str(data)], capsys, "is inside --data")
    _fails(base + [str(data / "run")], capsys, "is inside --data")
    done = tmp_path / "done"
    done.mkdir()
    (done / "train_log.json").write_text("{}")
    _fails(base + [str(done)], capsys, "holds a finished run")
    assert sorted(p.name for p in data.iterdir()) == ["a.png", "metadata.jsonl"]


def _checkpoint(out, step, settings):
    import jax.numpy as jnp

    from retom_jax.train import TrainState, save_checkpoint

    state = TrainState(jnp.asarray(step, jnp.int32), {"w": jnp.ones(2)}, ())
    save_checkpoint(out / "checkpoints", state, "tag", {"losses": [1.0] * step,
                                                        "settings": settings})


def test_train_resume_checks(tmp_path, data, capsys):
    from retom_jax.train.loop import data_stats

    out = tmp_path / "out"
    settings = {"data": data_stats(data, "text"), "learning_rate": 1e-4, "batch_size": 1,
                "merge": "None"}
    _checkpoint(out, 20, settings)
    base = ["train", "--model", str(tmp_path), "--data", str(data), "--out", str(out)]
    _fails(base + ["--steps", "5"], capsys, "at step 20: --steps 5 would train nothing")
    _fails(base + ["--steps", "30", "--lr", "1e-3"], capsys,
           "learning_rate 0.0001 -> 0.001")
    (data / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a dog"}\n')
    _fails(base + ["--steps", "30"], capsys, "data (its images or captions changed)")
    # allowed explicitly: the checks pass and the model is read (here: no model there)
    _fails(base + ["--steps", "30", "--allow-changes"], capsys, "model_index.json")


def test_train_interrupt_says_where_the_checkpoint_is(tmp_path, data, capsys, monkeypatch):
    import importlib

    train_module = importlib.import_module("retom_jax.cli.train")

    out = tmp_path / "out"
    _checkpoint(out, 4, {})

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", interrupted)
    code = main(["train", "--model", str(tmp_path), "--data", str(data), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 130 and err.splitlines() == [
        f"retom-jax: interrupted; the last checkpoint is {out}/checkpoints/"
        f"step_000004.safetensors (step 4): run the same command to resume from it"]


def test_resume_refuses_nonfinite_checkpoint_and_lora(tmp_path):
    import jax.numpy as jnp

    from retom_jax.train import (TrainError, TrainState, load_checkpoint, save_checkpoint,
                                 save_lora)

    state = TrainState(jnp.asarray(3, jnp.int32), {"w": jnp.asarray([1.0, jnp.nan])}, ())
    path = save_checkpoint(tmp_path, state, "tag")
    with pytest.raises(TrainError, match="hold NaN or infinite"):
        load_checkpoint(path, state, "tag")
    lora = {"a.to_q": {"down": np.full((4, 2), np.nan, np.float32),
                       "up": np.ones((2, 4), np.float32)}}
    with pytest.raises(TrainError, match="the trained LoRA"):
        save_lora(tmp_path, lora, 2)
    assert not (tmp_path / "pytorch_lora_weights.safetensors").exists()


def test_damaged_latent_cache_is_encoded_again(tmp_path, capsys):
    from retom_jax.train.data import cached_encoding

    data = {k: np.ones(2, np.float32) for k in ("means", "stds", "states", "empty", "index")}
    cache = tmp_path / "cache.npz"
    cached_encoding(cache, lambda: data)
    cache.write_bytes(cache.read_bytes()[:100])
    got = cached_encoding(cache, lambda: data)
    assert "damaged" in capsys.readouterr().out and set(got) == set(data)
    assert set(np.load(cache).files) == set(data)  # written again, whole


def test_training_images_16bit_and_rgba(tmp_path):
    from retom_jax.train import load_image_folder

    ramp = np.linspace(0, 65535, 32).astype(np.uint16)[None].repeat(32, 0)
    Image.fromarray(ramp).save(tmp_path / "g.png")
    rgba = np.zeros((32, 32, 4), np.uint8)  # fully transparent black: white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    (tmp_path / "metadata.jsonl").write_text(
        '{"file_name": "g.png", "text": "a"}\n{"file_name": "t.png", "text": "b"}\n')
    images, _ = load_image_folder(tmp_path, 32)
    assert images[0, 0, 0, 0] < 10 and images[0, 0, -1, 0] > 245  # still a gradient
    assert (images[1] == 255).all()


def test_eval_reference_needs_a_metric_and_readable_images(tmp_path, capsys):
    ref = tmp_path / "ref"
    ref.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(ref / name)
    base = ["eval", "--model", "demo", "--out", str(tmp_path / "e"), "--num-prompts", "2",
            "--reference", str(ref)]
    _fails(base, capsys, "--reference is compared through CMMD (--clip) or FID")
    (ref / "b.png").write_text("not a png")
    _fails(base + ["--inception", str(tmp_path / "x.pth")], capsys,
           "b.png cannot be read as an image")


def test_eval_resume_with_fewer_prompts_refused(tmp_path):
    import argparse

    from retom_jax.eval.run import _GENERATION_KEYS, check_generation

    args = argparse.Namespace(**{k: None for k in _GENERATION_KEYS})
    (tmp_path / "generation.json").write_text(json.dumps(
        {**{k: None for k in _GENERATION_KEYS}, "prompts": ["a", "b", "c"]}))
    with pytest.raises(ValueError, match="images of 3 prompts and this run names 2"):
        check_generation(args, ["a", "b"], tmp_path)
    assert check_generation(args, ["a", "b", "c", "d"], tmp_path)["prompts"][-1] == "d"
