"""``retom-jax eval`` end to end on the demo model, with a tiny random CLIP saved by
transformers and a tiny random Inception file: the mechanics, resumption and the files
(the demo's numbers mean nothing)."""
import json

import numpy as np
import pytest
import torch

from retom_jax.cli import build_parser
from retom_jax.cli import main
from retom_jax.eval.prompts import builtin_prompts, read_prompts
from retom_jax.eval.run import generate_images, markdown_table, measure, run_list
from tests.eval_tiny import random_inception, save_tiny_clip, shared_demo_pipeline


@pytest.fixture(autouse=True)
def shared_demo(monkeypatch):  # CLI runs share one demo pipeline and its compiled programs
    monkeypatch.setattr("retom_jax.demo.build_demo_pipeline", shared_demo_pipeline)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-models")
    save_tiny_clip(root / "clip")
    path = root / "pt_inception-tiny.pth"
    torch.save(random_inception(div=8).state_dict(), path)
    prompts = root / "prompts.txt"
    prompts.write_text("# two prompts\na photo of a cat\n\na painting of the dog\n")
    return root / "clip", path, prompts


def test_eval_end_to_end_and_resume(models, tmp_path, capsys):
    clip, inception, prompts = models
    out = tmp_path / "eval"
    argv = ["eval", "--model", "demo", "--prompts", str(prompts), "--methods", "none,retom",
            "--ratios", "0.5", "--steps", "2", "--seeds", "2", "--clip", str(clip),
            "--inception", str(inception), "--batch-size", "2", "--out", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "0 of 8 images already" in captured.out and "ETA" in captured.err
    images = sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png"))
    assert images == [f"images/{run}/p{p:04d}-s{s}.png" for run in ("none", "retom-0.5")
                      for p in range(2) for s in range(2)]
    # same seeds: the merged images differ from the unmerged ones, but not completely
    none0 = (out / "images/none/p0000-s0.png").read_bytes()
    assert none0 != (out / "images/retom-0.5/p0000-s0.png").read_bytes()
    assert none0 != (out / "images/none/p0000-s1.png").read_bytes()
    results = json.loads((out / "results.json").read_text())
    rows = {r["run"]: r for r in results["rows"]}
    assert set(rows) == {"none", "retom-0.5"}
    assert set(rows["none"]) >= {"clip_score", "seconds_per_image"}
    assert "fid" not in rows["none"] and "psnr" not in rows["none"]  # no reference: itself
    merged = rows["retom-0.5"]
    assert merged["method"] == "retom" and merged["ratio"] == 0.5 and merged["images"] == 4
    for key in ("clip_score", "cmmd", "fid", "psnr", "ssim", "seconds_per_image"):
        assert np.isfinite(merged[key]), key
    assert 0 <= merged["ssim"] <= 1 and merged["psnr"] > 0 and merged["fid"] > -1e-6
    table = (out / "results.md").read_text()
    assert table == markdown_table(results["rows"]) and "| retom | 0.5 |" in table
    assert (out / "results.png").stat().st_size > 1000
    stamp = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}

    # resumed: nothing is made again (no sampling program is compiled), the same rows
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "8 of 8 images already" in captured.out and "ETA" not in captured.err
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == stamp
    again = {r["run"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    for key in ("clip_score", "cmmd", "fid", "psnr", "ssim", "seconds_per_image"):
        assert again["retom-0.5"][key] == pytest.approx(merged[key], rel=1e-5), key

    # without metric models, only the model-free fields
    args = build_parser().parse_args(argv[:-4] + ["--out", str(out)])
    args.clip = args.inception = None
    bare = measure(args, read_prompts(str(prompts)), run_list(("none", "retom"), (0.5,)), out,
                   {}, log=lambda *_: None)
    assert set(bare[0]) == {"method", "ratio", "run", "images"}
    assert set(bare[1]) == {"method", "ratio", "run", "images", "psnr", "ssim"}
    assert bare[1]["ssim"] == pytest.approx(merged["ssim"], rel=1e-6)

    # real reference images of other sizes are fitted to the generated size; the
    # unmerged run is then measured against them too
    from PIL import Image

    from retom_jax.eval.clip_vision import load_clip
    from retom_jax.eval.inception import load_inception
    ref = tmp_path / "reference"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(100, 150), (200, 90), (128, 128)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(ref / f"{i}.jpg")
    args.reference = str(ref)
    rows = measure(args, read_prompts(str(prompts)), run_list(("none", "retom"), (0.5,)), out,
                   {}, clip=load_clip(clip), inception=load_inception(inception),
                   log=lambda *_: None)
    for row in rows:
        assert np.isfinite(row["fid"]) and np.isfinite(row["cmmd"]), row
    assert rows[1]["clip_score"] == pytest.approx(merged["clip_score"], rel=1e-5)  # as above


class FakePipe:
    """Stands in for a pipeline: records the calls, returns a tiny image at once."""

    def __init__(self):
        self.calls = []
        self.unet = type("U", (), {"config": type("C", (), {
            "attention_downsamples": staticmethod(lambda: (1, 2))})()})()

    def __call__(self, prompt, seed, merge, **kw):
        from PIL import Image

        from retom_jax.pipelines.request import PipelineOutput
        self.calls.append((prompt, seed, merge))
        return PipelineOutput([Image.new("RGB", (8, 8), (seed, 0, 0))], 1.0, 0.25)


def test_generation_resumes_where_it_stopped(tmp_path):
    from retom_jax.merge.methods import ReToM, ToMe

    args = build_parser().parse_args(["eval", "--model", "demo", "--prompts", "builtin",
                                      "--num-prompts", "2", "--methods", "tome,retom",
                                      "--ratios", "0.3", "--seeds", "2", "--out", str(tmp_path)])
    prompts, runs = builtin_prompts()[:2], run_list(args.methods, args.ratios)
    pipe = FakePipe()
    timings = generate_images(pipe, args, prompts, runs, tmp_path, log=lambda *_: None)
    assert len(pipe.calls) == 12 and sum(len(v) for v in timings.values()) == 12
    assert {type(m).__name__ for _, _, m in pipe.calls} == {"NoneType", "ToMe", "ReToM"}
    assert [(p, s) for p, s, m in pipe.calls if isinstance(m, ToMe)] == [
        (prompts[0], 0), (prompts[0], 1), (prompts[1], 0), (prompts[1], 1)]
    assert all(m.ratio == 0.3 for _, _, m in pipe.calls if isinstance(m, (ToMe, ReToM)))
    (tmp_path / "images/tome-0.3/p0001-s0.png").unlink()
    (tmp_path / "images/none/p0000-s1.png").unlink()
    pipe.calls.clear()
    timings = generate_images(pipe, args, prompts, runs, tmp_path, log=lambda *_: None)
    assert [(p, s, type(m).__name__) for p, s, m in pipe.calls] == [
        (prompts[0], 1, "NoneType"), (prompts[1], 0, "ToMe")]
    assert json.loads((tmp_path / "timings.json").read_text()) == timings
    assert not list(tmp_path.rglob("*.tmp*"))
    # more prompts or seeds extend the run; other settings are refused, nothing is made
    more = builtin_prompts()[:3]
    generate_images(pipe, args, more, runs[:1], tmp_path, log=lambda *_: None)
    assert json.loads((tmp_path / "generation.json").read_text())["prompts"] == more
    pipe.calls.clear()
    args.steps = 20
    with pytest.raises(ValueError, match="other settings \\(steps 50 -> 20\\)"):
        generate_images(pipe, args, prompts, runs, tmp_path, log=lambda *_: None)
    args.steps = 50
    with pytest.raises(ValueError, match="a different prompt list"):
        generate_images(pipe, args, ["another prompt"], runs, tmp_path, log=lambda *_: None)
    assert pipe.calls == []


@pytest.mark.parametrize("argv,message", [
    (["--methods", "none,bogus"], "comma-separated list of none, tome, retom, todo"),
    (["--ratios", "0.5,1.5"], "ratios in \\(0, 1\\)"),
    (["--prompts", "/nonexistent/prompts.txt"], "no such file"),
    (["--inception", "/nonexistent/pt_inception-2015-12-05-6726825d.pth"],
     "Put pytorch-fid's pt_inception-2015-12-05-6726825d.pth there"),
    (["--clip", "openai/clip-vit-large-patch14"], "put openai/clip-vit-large-patch14 there"),
    (["--clip", "x/y", "--num-prompts", "1"], "at least 2 images per run"),
])
def test_eval_errors_are_one_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", "demo", "--steps", "1", "--out", str(tmp_path / "o"), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    import re
    assert re.search(message, err), err
    assert not (tmp_path / "o" / "images").exists()


def test_prompt_sets(tmp_path):
    prompts = builtin_prompts()
    assert len(prompts) == 100 and len(set(prompts)) == 100
    assert prompts[0] == "A high quality photograph of a goldfish."
    assert read_prompts("builtin") == prompts
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="holds no prompt"):
        read_prompts(str(tmp_path / "empty.txt"))
    assert run_list(("retom", "todo", "tome"), (0.3, 0.5)) == [
        ("none", None), ("retom", 0.3), ("retom", 0.5), ("todo", None), ("tome", 0.3),
        ("tome", 0.5)]


def test_plot_without_matplotlib(tmp_path, monkeypatch, capsys):
    import sys

    from retom_jax.eval.run import plot
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    row = {"run": "tome-0.5", "method": "tome", "ratio": 0.5, "psnr": 30.0,
           "seconds_per_image": 1.0}
    assert plot([row], tmp_path / "results.png") is False
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "results.png").exists()
