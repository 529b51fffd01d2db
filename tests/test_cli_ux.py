"""What a new user meets first (issue 12, section 2): each point has its test here.

Error tests assert the one-line message and that nothing was compiled (nor, where it is
checked before loading, loaded). The command-line cases that depend on the process (the
transformers notice, the warning format, ``python -m retom_jax``, ``bench --help``) run
in subprocesses; the rest call ``main`` in-process, sharing one demo pipeline.
"""
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import retom_jax
import retom_jax.pipelines.memory
import retom_jax.cli.generate
import retom_jax.pipelines
from retom_jax import ReToM, load_pipeline
from retom_jax.cli import build_parser
from retom_jax.cli import main
from retom_jax.demo import build_demo_pipeline
from retom_jax.pipelines.base import Pipeline
from retom_jax.pipelines.request import seed_key
from retom_jax.models.weights import CheckpointError

ROOT = Path(__file__).resolve().parent.parent
DEMO = ["generate", "--model", "demo", "--prompt", "a photo of a cat"]


def run_cli(*args, env=None, code=None):
    """``python -c CODE`` or ``python -m retom_jax ARGS`` in a subprocess (this checkout
    first on the path); ``(returncode, stdout, stderr)``."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", **(env or {}))
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "retom_jax", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def demo():
    return build_demo_pipeline()


@pytest.fixture
def events(monkeypatch, demo):
    """The CLI loads the shared demo pipeline; every compile, model load and progress-bar
    event is recorded in order."""
    log = []
    real_exec = Pipeline._executable

    def executable(self, name, static, *args):
        before = self.compile_count
        try:
            return real_exec(self, name, static, *args)
        finally:
            if self.compile_count > before:
                log.append(("compile", name))

    class Bar(retom_jax.pipelines.request.StepBar):
        def __init__(self, total, desc):
            log.append(("bar", total))
            super().__init__(total, desc)

        def update(self):
            log.append(("tick",))
            super().update()

    def load(path, *a, **k):
        log.append(("load", path))
        if path == "demo":
            return demo
        return real_load(path, *a, **k)

    real_load = retom_jax.pipelines.load_pipeline
    monkeypatch.setattr(Pipeline, "_executable", executable)
    monkeypatch.setattr(retom_jax.pipelines.base, "StepBar", Bar)
    monkeypatch.setattr(retom_jax.pipelines, "load_pipeline", load)
    return log


def fails(capsys, args, message):
    """``main(args)`` exits 2 with exactly one line on stderr, ``retom-jax: error: ...``
    matching ``message``; returns stdout. (The callers check ``events``: nothing compiled.)"""
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("retom-jax: error: "), err
    assert re.search(message, err), err
    return out


# -- 1. compiling is announced and timed; the bar counts the steps, after compiling ----

def test_compile_message_and_progress_bar(events, capsys, tmp_path):
    """PLMS makes 4 UNet calls for 3 steps: the bar shows 3 and ticks 3 times, and every
    program is compiled before it starts. ReToM's 3x3 windows on the demo's 16x16 grid
    leave an edge unmerged: one note says so."""
    out = tmp_path / "a.png"
    assert main(DEMO + ["--steps", "3", "--progress", "--merge", "retom", "--window", "3x3",
                        "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"compiling \.\.\..*\ncompiled in \d+\.\d\d s\n", text)
    assert text.count("edge tokens stay unmerged") == 1
    assert "16x16 token grid (downsample 1) leaves 1 row(s) and 1 column(s)" in text
    kinds = [e[0] for e in events]
    bar = kinds.index("bar")
    assert events[bar] == ("bar", 3) and kinds.count("tick") == 3
    assert "compile" in kinds[:bar] and "compile" not in kinds[bar:]
    assert out.is_file()


# -- 2. no "PyTorch was not found" from transformers; 6. the warning on one line -------

HIDE_TORCH = "import sys; sys.modules['torch'] = None; "


def test_no_torch_notice_and_one_line_warning(tmp_path):
    code, _, err = run_cli(code=HIDE_TORCH + "import transformers")
    assert "PyTorch was not found" in err  # what the test guards against is really there
    prompt = "a photo of the cat " * 30
    code, out, err = run_cli(code=HIDE_TORCH + "from retom_jax.cli import main; main(" + repr(
        DEMO[:3] + ["--prompt", prompt, "--steps", "2", "--out", str(tmp_path / "x.png")]) + ")")
    assert code == 0, err
    assert "PyTorch was not found" not in err and "saved" in out
    lines = [line for line in err.splitlines() if "warning" in line.lower()]
    assert lines == ["retom-jax: warning: prompt 1 has 152 tokens, the text encoder reads 77: "
                     "cut before 'a photo of the cat a photo of...' (75 tokens dropped)"], err


def test_long_prompt_labels(demo):
    """Prompts are counted from 1 as the user gave them, negatives named as such; the
    unconditional row does not shift the count. One short line each."""
    long = "a photo of the dog " * 20
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        demo.encode_prompt(["cat", long], negative_prompt=["dog", long])
    messages = [str(w.message) for w in got]
    assert [m.split(" has ")[0] for m in messages] == ["negative prompt 2", "prompt 2"]
    assert all(len(m) < 150 and "\n" not in m for m in messages)


# -- 3. seeds use every bit -------------------------------------------------------------

def test_seeds_do_not_alias(demo):
    keys = [tuple(np.asarray(jax.random.key_data(seed_key(s))))
            for s in (0, 1, 2 ** 32, 2 ** 32 + 1, 2 ** 64, 2 ** 70, 2 ** 128 - 1)]
    assert len(set(keys)) == len(keys)
    assert keys[1] == tuple(np.asarray(jax.random.key_data(jax.random.key(1))))  # kept
    kw = dict(num_inference_steps=1, output_type="latent", guidance_scale=1.0)
    a, b = (demo("cat", seed=s, **kw).images for s in (0, 2 ** 32))
    assert np.abs(a - b).mean() > 0.1
    for bad in (-1, 2 ** 128):
        with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*128\)"):
            demo("cat", seed=bad, **kw)


@pytest.mark.parametrize("seed", ["-1", str(2 ** 128), "1.5"])
def test_bad_seed_cli(seed, events, capsys):
    fails(capsys, DEMO + ["--seed", seed], r"--seed: expected an integer in \[0, 2\*\*128\)")
    assert events == []  # refused before loading


# -- 4. options that would be ignored are errors ----------------------------------------

@pytest.mark.parametrize("extra,message", [
    (["--cache-step", "1"], "--cache-step is an option of --merge retom, not of --merge none"),
    (["--merge", "tome", "--window-schedule", "1:2x2"],
     "--window-schedule is an option of --merge retom, not of --merge tome"),
    (["--merge", "todo", "--ratio", "0.3"], "--ratio is an option of --merge tome or retom"),
    (["--merge", "retom", "--todo-factor", "4"], "--todo-factor is an option of --merge todo"),
    (["--max-downsample", "2"], "--max-downsample is an option of --merge tome or retom or todo"),
    (["--merge", "retom", "--merge-map-step", "3"], "--merge-map-step needs --merge-map"),
])
def test_options_of_another_merge(extra, message, events, capsys):
    fails(capsys, DEMO + extra, message)
    assert events == []


@pytest.mark.parametrize("extra,message", [
    (["--steps", "5", "--cache-step", "5"], r"cache_step=5 is never used: 5 steps run 6 UNet "
                                            r"calls, 0-5.*use a cache_step below 5"),
    (["--steps", "5", "--window-schedule", "6:4x4"], "schedule changes at step 6, which never "
                                                     "comes: 5 steps run 6 UNet calls"),
    (["--window-schedule", "2:4x4", "3:4x4"], r"schedule changes nothing at step 3: the window "
                                              r"in force there is already \(4, 4\)"),
])
def test_retom_steps_that_never_come(extra, message, events, capsys):
    fails(capsys, DEMO + ["--merge", "retom"] + extra, message)
    assert [e[0] for e in events] == ["load"]  # nothing compiled
    # the last values that do take effect pass (PLMS: 6 UNet calls for 5 steps)
    for merge in (ReToM(cache_step=4), ReToM(schedule={5: (4, 4)})):
        retom_jax.pipelines.request.check_merge_steps(merge, 6, 5)


def test_unet_cache_step_needs_merge_state(demo, monkeypatch):
    unet = demo.unet
    x, ehs = jnp.zeros((1, 4, 16, 16)), jnp.zeros((1, 77, 32))
    compiled = []
    monkeypatch.setattr(unet, "_jitted", lambda *a, **k: compiled.append(1))
    message = r"ReToM\(cache_step=10\) reuses representatives across calls through merge_state"
    with pytest.raises(ValueError, match=message):
        unet(x, 1.0, ehs, merge=ReToM(cache_step=10))
    with pytest.raises(ValueError, match=message):  # the pure function, traced: no compile
        jax.jit(unet.apply, static_argnames="merge")(unet.params, x, 1.0, ehs,
                                                     merge=ReToM(cache_step=10))
    assert compiled == []


# -- 5. --out is checked before anything loads -------------------------------------------

def test_bad_out(events, capsys, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    cases = [
        (str(tmp_path), "is a folder: name an image file"),
        (str(tmp_path / "file.txt" / "x.png"), "is a file, not a folder"),
        ("x.psd", "PIL reads PSD files but cannot write them"),
        ("x.xbm", "PIL cannot write an RGB image as XBM"),
        ("x.notanimage", "unknown image extension '.notanimage'"),
    ]
    if os.geteuid() == 0:  # root writes anywhere permissions allow; /proc takes no files
        cases.append(("/proc/x.png", "cannot write in '/proc'"))
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append((str(locked / "x.png"), "cannot write in"))
    for out, message in cases:
        fails(capsys, DEMO + ["--out", out], re.escape(message))
    folder = tmp_path / "x-1.png"
    folder.mkdir()
    fails(capsys, DEMO + ["--num-images", "2", "--out", str(tmp_path / "x.png")],
          "x-1.png' is a folder")
    assert events == []


# -- 7. the demo model by name -----------------------------------------------------------

def test_load_pipeline_demo(demo):
    pipe = load_pipeline("demo", "bf16", scheduler="ddim")
    assert type(pipe.scheduler).__name__ == "DDIM" and pipe.dtype == jnp.bfloat16
    same = load_pipeline("demo")
    for a, b in zip(jax.tree.leaves(same.unet.params), jax.tree.leaves(demo.unet.params)):
        np.testing.assert_array_equal(a, b)
    # "demo" is a folder like any other: it has no .fp16 variant files
    with pytest.raises(ValueError, match="expected diffusion_pytorch_model.fp16"):
        load_pipeline("demo", variant="fp16")


def test_default_guidance_comes_from_the_model(demo, tmp_path):
    """guidance_scale=None (the CLI's default) is the model's default: the demo's 3 (its
    model_index.json says so), 7.5 for a folder that says nothing; a bad value there is a
    one-line error at load."""
    import shutil

    from retom_jax.demo import DEMO_ASSETS, DEMO_GUIDANCE

    assert demo.default_guidance_scale == DEMO_GUIDANCE == 3.0
    kw = dict(num_inference_steps=2, seed=1, output_type="np")
    np.testing.assert_array_equal(demo("a red square on a green background", **kw).images,
                                  demo("a red square on a green background",
                                       guidance_scale=3.0, **kw).images)
    folder = tmp_path / "plain"
    shutil.copytree(DEMO_ASSETS, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index.pop("_retom_jax_guidance_scale")
    (folder / "model_index.json").write_text(json.dumps(index))
    assert load_pipeline(folder).default_guidance_scale == 7.5
    index["_retom_jax_guidance_scale"] = "high"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="_retom_jax_guidance_scale must be a positive "
                                              "number, got 'high'"):
        load_pipeline(folder)


# -- 8. dtype aliases; 9. help, version, python -m -----------------------------------------

def test_dtype_aliases(capsys):
    parse = build_parser().parse_args
    for text, name in (("bf16", "bfloat16"), ("fp16", "float16"), ("FP32", "float32"),
                       ("bfloat16", "bfloat16")):
        assert parse(DEMO + ["--dtype", text]).dtype == name
    fails(capsys, DEMO + ["--dtype", "int8"], "--dtype: expected one of float32, bfloat16")


def test_help_and_version(capsys):
    parser = build_parser()
    generate = parser._subparsers._group_actions[0].choices["generate"]
    for action in generate._actions:
        assert action.help, f"{action.option_strings} has no help"
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("denoising steps (default: 50)", "(default: the model's, 7.5; the demo model's 3)", "(default: retom-jax.png)",
                  "(default: none)", "tome, retom: share of tokens merged (default 0.5)",
                  "last rows/columns stay unmerged", "every bit of it counts (default: 0)"):
        assert shown in text, shown

    code, out, err = run_cli("--version")
    assert code == 0 and out.strip() == f"retom-jax {retom_jax.__version__}"
    code, out, err = run_cli("bench", "unet", "--help")
    assert code == 0 and out.startswith("usage: retom-jax bench unet")
    assert not re.search(r"issue \d", out)


# -- 10. one-line errors, checkpoint errors too; 12. config edge cases ---------------------

def fake_pipeline(folder: Path, unet=None, vae=None) -> Path:
    """A pipeline folder whose configs are read (no weights: the errors come first)."""
    index = {"_class_name": "StableDiffusionPipeline"}
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        index[name] = ["diffusers", "X"]
        (folder / name).mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "DDIMScheduler"}))
    base = dict(block_out_channels=[32, 64], norm_num_groups=8, sample_size=16,
                down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32)
    (folder / "unet" / "config.json").write_text(json.dumps(dict(base, **(unet or {}))))
    vae_base = dict(block_out_channels=[8, 16], norm_num_groups=8,
                    down_block_types=["DownEncoderBlock2D"] * 2,
                    up_block_types=["UpDecoderBlock2D"] * 2)
    (folder / "vae" / "config.json").write_text(json.dumps(dict(vae_base, **(vae or {}))))
    return folder


@pytest.mark.parametrize("unet,vae,message", [
    ({"block_out_channels": "abc"}, None,
     r"unet/config.json: block_out_channels must be a non-empty list of positive integers, "
     r"got 'abc'"),
    ({"norm_num_groups": 7}, None,
     r"unet/config.json: norm_num_groups=7 does not divide block_out_channels \[32, 64\]"),
    ({"sample_size": "abc"}, None, r"unet/config.json: sample_size must be a positive integer"),
    ({"sample_size": 0}, None, r"unet/config.json: sample_size must be"),
    ({"down_block_types": ["DownBlock2D"]}, None,
     r"unet/config.json: down_block_types has 1 entries but block_out_channels has 2"),
])
def test_config_edge_cases(unet, vae, message, tmp_path, events, capsys):
    folder = fake_pipeline(tmp_path / "sd", unet, vae)
    fails(capsys, ["generate", "--model", str(folder), "--prompt", "x"],
          f"--model {re.escape(str(folder))}: {re.escape(str(folder))}/{message}")
    assert [e[0] for e in events] == ["load"]  # nothing compiled


def test_vae_config_error_names_the_file(tmp_path):
    folder = fake_pipeline(tmp_path / "sd", vae={"norm_num_groups": 3}) / "vae"
    with pytest.raises(retom_jax.CheckpointError) as e:
        retom_jax.load_vae(folder, subfolder=None)
    assert str(e.value) == (f"{folder}/config.json: unsupported VAE config: block_out_channels "
                            f"[8, 16] are not divisible by norm_num_groups=3")


def test_one_line_errors(capsys, events, tmp_path):
    fails(capsys, ["generate", "--model", str(tmp_path), "--prompt", "x"],
          "has no model_index.json")
    fails(capsys, ["generate", "--prompt", "x"], "required: --model")
    fails(capsys, DEMO + ["--height", "102"], "height=102 is not a multiple of 4")  # demo: VAE x4
    assert [e[0] for e in events] == ["load", "load"]  # and nothing compiled


# -- 11. a program larger than the memory is refused before it runs -----------------------

def test_memory_check(events, capsys, monkeypatch, demo):
    """With 1 MiB of free memory the demo's sampling program (about 15 MB of XLA
    temporaries at 64x64) is refused after compiling, with what fits, and never runs."""
    monkeypatch.setattr(retom_jax.pipelines.memory, "available_bytes", lambda device: 2 ** 20)
    calls = []
    monkeypatch.setattr(type(demo), "__call__", lambda *a, **k: calls.append(a))
    fails(capsys, DEMO + ["--steps", "2", "--num-images", "2"],
          r"2 image\(s\) at 64x64 need \d+\.\d MiB to sample but the CPU has 1\.0 MiB "
          r"of free RAM: (at most \d+x\d+|no size) fits for 2 image\(s\)")
    assert calls == []  # compiled (to know its size), never run
    assert ("compile", "sample") in events


def test_memory_message_sizes(monkeypatch):
    """What the message proposes fits under linear (conservative) scaling; the check can
    be switched off."""
    class Stats:
        temp_size_in_bytes, output_size_in_bytes, alias_size_in_bytes = 8 * 2 ** 30, 0, 0

    class Compiled:
        def memory_analysis(self):
            return Stats()

    class Device:
        platform = "gpu"

        def memory_stats(self):
            return {"bytes_limit": 4 * 2 ** 30, "bytes_in_use": 2 ** 30}

    with pytest.raises(ValueError) as e:
        retom_jax.pipelines.memory.check_fits(Compiled(), Device(), batch=4, height=1024, width=768)
    assert str(e.value).startswith(
        "4 image(s) at 1024x768 need 8.0 GiB to sample but the GPU has 3.0 GiB of free "
        "memory: at most 624x464 fits for 4 image(s), or 1 image(s) at 1024x768")
    monkeypatch.setenv("RETOM_JAX_MEMORY_CHECK", "0")
    retom_jax.pipelines.memory.check_fits(Compiled(), Device(), batch=4, height=1024, width=768)


# -- 7. the demo model saved as a diffusers folder -----------------------------------------

def test_save_demo_pipeline(demo, tmp_path):
    """save_pipeline writes a folder that load_pipeline reads back unchanged and that
    diffusers loads: its UNet and text encoder give what ours give (fp32)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from retom_jax.pipelines.save import save_pipeline

    folder = save_pipeline(demo, tmp_path / "demo-sd")
    back = load_pipeline(folder)
    for a, b in zip(jax.tree.leaves((demo.unet.params, demo.vae.params,
                                     demo.text_encoder.params)),
                    jax.tree.leaves((back.unet.params, back.vae.params,
                                     back.text_encoder.params))):
        np.testing.assert_array_equal(a, b)
    assert back.scheduler == demo.scheduler
    assert back.default_guidance_scale == demo.default_guidance_scale == 3.0  # kept
    ids = retom_jax.tokenize(back.tokenizer, ["a photo of the cat"])
    np.testing.assert_array_equal(ids, retom_jax.tokenize(demo.tokenizer, ["a photo of the cat"]))

    rng = np.random.RandomState(0)
    x, ehs = rng.randn(2, 4, 16, 16).astype(np.float32), rng.randn(2, 77, 32).astype(np.float32)
    with torch.no_grad():
        ref = UNet2DConditionModel.from_pretrained(folder / "unet")(
            torch.from_numpy(x), 500, torch.from_numpy(ehs)).sample.numpy()
        ref_text = CLIPTextModel.from_pretrained(folder / "text_encoder")(
            torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
    ours = np.asarray(demo.unet(x, 500, ehs).sample)
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-5
    ours_text = np.asarray(demo.text_encoder(ids).last_hidden_state)
    assert np.linalg.norm(ours_text - ref_text) / np.linalg.norm(ref_text) < 1e-5
    with pytest.raises(ValueError, match="exists and is not empty"):
        save_pipeline(demo, folder)
