"""A small mutation-testing driver for retom-jax (not part of CI: it is slow).

    nice -n 10 python tools/mutation/run.py --per-target 8 block=6 pipeline=6 \
        --out tools/mutation/after.json
    nice -n 10 python tools/mutation/run.py --per-target 8 block=6 pipeline=6 \
        --tests-rev dac1ba0 --out tools/mutation/before.json

Each mutant is one small change of the source (an operator, a comparison, a constant, a
boolean), made on the syntax tree of one target module; the module is written back with
``ast.unparse`` into a copy of the repository, and the target's fast test selection runs
there with ``pytest -x``. A mutant is *killed* when the tests fail (or run past the
timeout), *survived* when they pass. The control (the module unparsed without a change)
must pass first, or the run stops.

Why not mutmut 3.8.1 (installed): it forks its test workers from a process that has
imported JAX and usually initialised its CPU backend (conftest asks for it), which XLA's
thread pools do not survive reliably; its per-function trampolines also change what
``jax.jit`` traces. A fresh process per mutant is slower but dependable here.

Targets, the code mutated and the tests that drive them (``TARGETS`` below): merge.py
(whole module) with tests/test_merge.py; schedulers.py with tests/test_schedulers.py;
the UNet's transformer block (``MergeContext``, ``BasicTransformerBlock``,
``Transformer2DModel`` in unet.py) with the UNet parity tests; pipeline.py's sampling
code (the functions in ``PIPELINE_FUNCTIONS``) with the SD parity tests of
tests/test_pipeline.py. Mutants are sampled per target with a fixed seed
(``random.Random(seed).sample``), so two runs with the same ``--per-target`` and
``--seed`` try the same mutants: ``--tests-rev`` takes the tests/ folder from another
commit (the score before new tests were written).
"""
from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from planted import copy_tree  # noqa: E402  (one tree copier for both tools)

PIPELINE_FUNCTIONS = ("_body", "_sample", "_start", "_noise", "_decode", "_finish",
                      "_fit_cache", "_init_merge_state", "_interactive", "_encode", "_added_cond", "_tokenize", "_zero_negative")
UNET_PARITY = ["tests/test_unet_merge.py", "tests/test_unet.py", "-k",
               "tomesd or random or distinct or gradient or ratio_zero or (parity_fp32 and "
               "sd1) or eps or small_activations"]
PIPELINE_TESTS = ["tests/test_pipeline.py", "-k",
                  "ddim_batch or dpm_solver or pndm or euler_ancestral or tome or retom_cache"]

# name: (module file, which definitions to mutate (None: the whole module), pytest args)
TARGETS = {
    "merge": ("retom_jax/merge/algorithms.py", None, ["tests/test_merge.py"]),
    "schedulers": ("retom_jax/schedulers/sigma.py", None, ["tests/test_schedulers.py"]),
    "block": ("retom_jax/models/unet.py",
              ("MergeContext", "BasicTransformerBlock", "Transformer2DModel"), UNET_PARITY),
    "pipeline": ("retom_jax/pipelines/base.py", PIPELINE_FUNCTIONS, PIPELINE_TESTS),
}

SWAPS = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
    ast.In: ast.NotIn, ast.NotIn: ast.In,
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
    ast.FloorDiv: ast.Div, ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult,
    ast.And: ast.Or, ast.Or: ast.And,
}


def _docstrings(tree):
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def _scopes(tree, names):
    """The nodes to mutate: everything (names None) or inside the named defs."""
    if names is None:
        return [tree]
    found = [n for n in ast.walk(tree)
             if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in names]
    return found


def candidates(tree, names):
    """Every (index, description, line) of a possible mutation, in a fixed order."""
    docs, out, seen = _docstrings(tree), [], set()
    for scope in _scopes(tree, names):
        for node in ast.walk(scope):
            if id(node) in seen:
                continue
            seen.add(id(node))
            for desc in _mutations(node, docs):
                out.append((len(out), desc, getattr(node, "lineno", 0), id(node)))
    return out


def _mutations(node, docs):
    """Descriptions of the mutations of one node (applied by `_apply` in this order)."""
    if isinstance(node, ast.Compare):
        return [f"{type(op).__name__} -> {SWAPS[type(op)].__name__}"
                for op in node.ops if type(op) in SWAPS]
    if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in SWAPS:
        return [f"{type(node.op).__name__} -> {SWAPS[type(node.op)].__name__}"]
    if isinstance(node, ast.BoolOp):
        return [f"{type(node.op).__name__} -> {SWAPS[type(node.op)].__name__}"]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        return [f"drop {type(node.op).__name__}"]
    if isinstance(node, ast.Constant) and id(node) not in docs:
        v = node.value
        if isinstance(v, bool):
            return [f"{v} -> {not v}"]
        if isinstance(v, int):
            return [f"{v} -> {v + 1}"]
        if isinstance(v, float):
            return [f"{v!r} -> {v * 2 if v else 1.0!r}"]
    return []


def _apply(node, k):
    """Apply the k-th mutation of ``node`` in place."""
    if isinstance(node, ast.Compare):
        idx = [i for i, op in enumerate(node.ops) if type(op) in SWAPS][k]
        node.ops[idx] = SWAPS[type(node.ops[idx])]()
    elif isinstance(node, (ast.BinOp, ast.AugAssign, ast.BoolOp)):
        node.op = SWAPS[type(node.op)]()
    elif isinstance(node, ast.UnaryOp):
        return node.operand  # replaces the node in its parent
    elif isinstance(node, ast.Constant):
        v = node.value
        node.value = (not v) if isinstance(v, bool) else (
            v + 1 if isinstance(v, int) else (v * 2 if v else 1.0))
    return None


def mutate(source, names, index):
    """The module source with mutation ``index`` applied (None: unchanged, re-printed)."""
    tree = ast.parse(source)
    if index is None:
        return ast.unparse(tree) + "\n"
    cands = candidates(tree, names)
    _, _, _, node_id = cands[index]
    k = sum(1 for c in cands[:index] if c[3] == node_id)
    for parent in ast.walk(tree):
        for field, value in ast.iter_fields(parent):
            items = value if isinstance(value, list) else [value]
            for j, child in enumerate(items):
                if isinstance(child, ast.AST) and id(child) == node_id:
                    replacement = _apply(child, k)
                    if replacement is not None:
                        if isinstance(value, list):
                            value[j] = replacement
                        else:
                            setattr(parent, field, replacement)
                    return ast.unparse(ast.fix_missing_locations(tree)) + "\n"
    raise RuntimeError(f"mutation {index} not found")


def copy_repo(dst: Path, tests_rev: str | None):
    copy_tree(dst)
    if tests_rev:
        shutil.rmtree(dst / "tests")
        archive = subprocess.run(["git", "archive", tests_rev, "tests"], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dst)], input=archive, check=True)


def run_tests(tree: Path, args, timeout):
    env = dict(os.environ, PYTHONPATH=str(tree), JAX_PLATFORMS="cpu")
    t0 = time.perf_counter()
    try:
        rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p",
                             "no:cacheprovider", *args], cwd=tree, env=env,
                            capture_output=True, text=True, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    return rc, time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--per-target", nargs="+", default=["8"],
                   help="mutants sampled per target: N for every target, or target=N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tests-rev", help="take tests/ from this commit (e.g. the one before "
                                       "new tests were added)")
    p.add_argument("--out", required=True, help="JSON file of the results (rewritten as "
                                                "the run goes)")
    p.add_argument("--list", action="store_true", help="list the sampled mutants and stop")
    args = p.parse_args(argv)

    counts = {}
    for item in args.per_target:
        name, _, n = item.rpartition("=")
        for t in ([name] if name else TARGETS):
            counts[t] = int(n)
    results = {"meta": {"per_target": counts, "seed": args.seed,
                        "tests_rev": args.tests_rev, "command": " ".join(sys.argv)},
               "targets": {}, "mutants": []}
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        tree = Path(tmp)
        copy_repo(tree, args.tests_rev)
        for name in args.targets:
            file, names, tests = TARGETS[name]
            source = (ROOT / file).read_text()
            cands = candidates(ast.parse(source), names)
            rng = random.Random(f"{args.seed}:{name}")
            sample = sorted(rng.sample(range(len(cands)), min(counts[name], len(cands))))
            results["targets"][name] = {"file": file, "mutants": len(cands),
                                        "sampled": sample, "tests": tests}
            if args.list:
                for i in sample:
                    print(f"{name}#{i} {file}:{cands[i][2]} {cands[i][1]}")
                continue
            target = tree / file
            target.write_text(mutate(source, names, None))
            rc, secs = run_tests(tree, tests, None)
            print(f"{name}: control rc={rc} in {secs:.0f} s; {len(cands)} mutants, "
                  f"{len(sample)} sampled", flush=True)
            if rc != 0:
                raise SystemExit(f"{name}: the tests fail on the unmutated module (rc={rc})")
            timeout = max(120.0, 3 * secs)
            for i in sample:
                target.write_text(mutate(source, names, i))
                rc, secs = run_tests(tree, tests, timeout)
                status = "survived" if rc == 0 else ("killed" if rc in (1, "timeout") else
                                                     f"error rc={rc}")
                row = {"target": name, "id": f"{name}#{i}", "file": file,
                       "line": cands[i][2], "mutation": cands[i][1], "status": status,
                       "seconds": round(secs, 1)}
                results["mutants"].append(row)
                print(f"  {row['id']:16s} {file}:{row['line']:<4d} {row['mutation']:24s} "
                      f"{status} ({secs:.0f} s)", flush=True)
                Path(args.out).write_text(json.dumps(results, indent=1))
            target.write_text(source)
    if args.list:
        return 0
    rows = results["mutants"]
    killed = sum(r["status"] == "killed" for r in rows)
    results["score"] = {"killed": killed, "total": len(rows)}
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"score: {killed}/{len(rows)} killed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
