"""Plant the bugs of issue #17 one at a time in a copy of the repository and run the tests
that must catch them; prints one line per bug (CAUGHT / MISSED) and exits 1 on a miss.

    python tools/mutation/planted.py            # every bug
    python tools/mutation/planted.py eps bf16   # some of them (names below)

The working tree is never edited: each bug goes into a fresh copy under a temporary
folder (the tracked and untracked, not ignored, files), and pytest runs there.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# name: (file, old text, new text, tests that must fail). Every occurrence is replaced.
BUGS = {
    "step-key": (
        "retom_jax/pipelines/options.py",
        "return jax.random.split(jax.random.fold_in(key, step))",
        "return jax.random.split(key)",
        ["tests/test_pipeline.py::test_sd_euler_ancestral_matches_diffusers",
         "tests/test_pipeline.py::test_tome_random_matches_tomesd_in_the_pipeline"]),
    "tome-last-cell": (
        "retom_jax/merge/algorithms.py",
        "jax.random.randint(key, (hc, wc), 0, sy * sx)",
        "jax.random.randint(key, (hc, wc), 0, sy * sx - 1)",
        ["tests/test_merge.py::test_tome_random_destinations_cover_every_cell_position",
         "tests/test_merge.py::test_tome_random_plan_equals_tomesd"]),
    "block-key": (
        "retom_jax/models/unet.py",
        "jax.random.fold_in(self.key, index)",
        "self.key",
        ["tests/test_unet_merge.py::test_tome_random_equals_tomesd",
         "tests/test_unet_merge.py::test_tome_blocks_draw_distinct_destinations"]),
    "ddim-sample": (
        "retom_jax/schedulers/core.py",
        "return out, (x - alpha * out) / sigma  # \"sample\"",
        "return out, (x - alpha * alpha * out) / sigma  # \"sample\"",
        ["tests/test_schedulers.py::test_trajectory_matches_diffusers[ddim-sample]"]),
    "dpm-15": (
        "retom_jax/schedulers/sigma.py",
        "self.lower_order_final and n < 15",
        "self.lower_order_final and n <= 15",
        ["tests/test_schedulers.py::test_trajectory_matches_diffusers[dpm-sigmamin-15]"]),
    "bf16-merge": (
        "retom_jax/merge/algorithms.py",
        "        acc_dtype = jnp.promote_types(x.dtype, jnp.float32)\n        acc = _take(",
        "        acc_dtype = x.dtype\n        acc = _take(",
        ["tests/test_merge.py::test_bf16_merge_sums_in_float32"]),
    "eps": (
        "retom_jax/models/unet.py",
        "layer_norm(dim, 1e-5, **kw)",
        "layer_norm(dim, 1e-6, **kw)",
        ["tests/test_unet.py::test_norm_eps_match_diffusers",
         "tests/test_unet.py::test_transformer_block_small_activations"]),
}


def copy_tree(dst: Path):
    """The working tree's files that git tracks or would track, copied to ``dst``."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True, text=True).stdout.split()
    for f in files:
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


def plant(tree: Path, file, old, new):
    path = tree / file
    text = path.read_text()
    if old not in text:
        raise SystemExit(f"{file}: the text to replace is gone ({old!r}); update BUGS")
    path.write_text(text.replace(old, new))


def main(names):
    names = names or list(BUGS)
    missed = []
    for name in names:
        file, old, new, tests = BUGS[name]
        with tempfile.TemporaryDirectory(prefix=f"planted-{name}-") as tmp:
            tree = Path(tmp)
            copy_tree(tree)
            plant(tree, file, old, new)
            env = dict(os.environ, PYTHONPATH=str(tree), JAX_PLATFORMS="cpu")
            t0 = time.perf_counter()
            rows = []
            for test in tests:  # each test on its own: every one must catch the bug
                rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x",
                                     "-p", "no:cacheprovider", test], cwd=tree, env=env,
                                    capture_output=True, text=True).returncode
                rows.append((test, rc))
            caught = all(rc == 1 for _, rc in rows)
            if not caught:
                missed.append(name)
            detail = ", ".join(f"{t.split('::')[-1]}: {'failed' if rc == 1 else f'rc={rc}'}"
                               for t, rc in rows)
            print(f"{'CAUGHT' if caught else 'MISSED'} {name:15s} "
                  f"({time.perf_counter() - t0:.0f} s) {detail}", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
