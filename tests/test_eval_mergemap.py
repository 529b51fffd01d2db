"""Merge maps on the demo model: the probe leaves the image unchanged, the map is the plan
the config makes (groups, destinations, counts), ReToM's cached representatives show up
at later steps, and the CLI writes the picture."""
import numpy as np
import pytest
from PIL import Image

from retom_jax.cli import main
from retom_jax.eval.mergemap import merge_map, render_merge_map
from retom_jax.merge.methods import ReToM, ToDo
from tests.eval_tiny import shared_demo_pipeline

STEPS = 3


@pytest.fixture(autouse=True)
def shared_demo(monkeypatch):  # CLI runs share one demo pipeline and its compiled programs
    monkeypatch.setattr("retom_jax.demo.build_demo_pipeline", shared_demo_pipeline)


@pytest.fixture
def pipe():
    return shared_demo_pipeline()


def _check_retom_groups(m, window=(2, 2)):
    """Local matching: every merged group lies in one window and holds its representative;
    one representative per window; int(N * ratio) tokens merged."""
    h, w = m.slot_of.shape
    wh, ww = window
    assert m.merged == int(h * w * 0.5)
    for i in range(0, h, wh):
        for j in range(0, w, ww):
            assert m.dst[i:i + wh, j:j + ww].sum() == 1
    slots, counts = np.unique(m.slot_of, return_counts=True)
    for s in slots[counts > 1]:
        ys, xs = np.nonzero(m.slot_of == s)
        assert len({y // wh for y in ys}) == 1 and len({x // ww for x in xs}) == 1
        assert m.dst[ys, xs].sum() == 1


def test_retom_map_and_cached_representatives(pipe):
    cfg = ReToM(ratio=0.5, cache_step=0)
    kw = dict(merge=cfg, num_inference_steps=STEPS, seed=3)
    first = merge_map(pipe, "a photo of a cat", step=0, **kw)
    compiles = pipe.compile_count
    later = merge_map(pipe, "a photo of a cat", step=2, block=2, **kw)
    assert pipe.compile_count == compiles  # another step or block: nothing recompiled
    assert first.slot_of.shape == (16, 16) and (first.step, first.level) == (0, 1)
    for m in (first, later):
        _check_retom_groups(m)
    # block 2 at step 2 reuses block 2's representatives of step 0 (cache_step 0)
    again = merge_map(pipe, "a photo of a cat", step=0, block=2, **kw)
    assert np.array_equal(again.dst, later.dst)
    assert first.picture.width > 2 * first.image.width - 10
    with pytest.raises(ValueError, match="level 1 has 3 merged transformer block"):
        merge_map(pipe, "a cat", block=3, **kw)
    with pytest.raises(ValueError, match="needs ToMe or ReToM"):
        merge_map(pipe, "a cat", merge=ToDo(), num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="does not merge at UNet level"):
        merge_map(pipe, "a cat", level=2, **kw)
    with pytest.raises(ValueError, match="step must be in"):
        merge_map(pipe, "a cat", step=STEPS, **kw)


def test_render_colours_groups_and_marks_destinations():
    slot_of = np.array([[0, 0, 1], [2, 3, 3]])
    dst = np.array([[False, True, False], [False, False, True]])
    pic = np.asarray(render_merge_map(Image.new("RGB", (30, 20), "black"), slot_of, dst))
    cell = 20 // 2
    x0 = 30 + 6
    grid = pic[:20, x0:x0 + 3 * cell]
    corner = lambda y, x: tuple(grid[y * cell + 1, x * cell + 1])  # noqa: E731
    centre = lambda y, x: tuple(grid[y * cell + cell // 2, x * cell + cell // 2])  # noqa: E731
    assert corner(0, 0) == corner(0, 1) != corner(1, 1)  # one colour per group
    assert corner(0, 2) == corner(1, 0) == (225, 225, 225)  # not merged: grey
    assert centre(0, 1) == centre(1, 2) == (20, 20, 20)  # destinations marked
    assert centre(0, 0) != (20, 20, 20)


def test_cli_merge_map(tmp_path, capsys):
    out, mm = tmp_path / "img.png", tmp_path / "map.png"
    assert main(["generate", "--model", "demo", "--prompt", "a dog", "--steps", "2",
                 "--merge", "retom", "--out", str(out), "--merge-map", str(mm)]) == 0
    assert "saved merge map" in capsys.readouterr().out
    image, picture = np.asarray(Image.open(out)), np.asarray(Image.open(mm))
    # the left part of the map is the image the command saved (the probe changes nothing)
    assert np.array_equal(picture[:image.shape[0], :image.shape[1]], image)
    # image-to-image: the probe runs with the same options (its image is the saved one), and
    # its steps are those that run (strength 0.5 of 2 steps: one step, step 0)
    edited = tmp_path / "edited.png"
    assert main(["generate", "--model", "demo", "--prompt", "a dog", "--steps", "2",
                 "--merge", "retom", "--init-image", str(out), "--strength", "0.5",
                 "--out", str(edited), "--merge-map", str(mm), "--overwrite"]) == 0
    assert "saved merge map" in capsys.readouterr().out
    image2, picture = np.asarray(Image.open(edited)), np.asarray(Image.open(mm))
    assert not np.array_equal(image2, image)
    assert np.array_equal(picture[:image2.shape[0], :image2.shape[1]], image2)
    for argv, message in ((["--merge", "todo"], "needs --merge tome or retom"),
                          (["--merge", "retom", "--merge-map-step", "9"], "outside the 2 steps")):
        with pytest.raises(SystemExit):
            main(["generate", "--model", "demo", "--prompt", "a", "--steps", "2",
                  "--merge-map", str(mm), *argv])
        assert message in capsys.readouterr().err
