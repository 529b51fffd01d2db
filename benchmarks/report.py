"""Markdown tables from benchmark JSON files (for the README and the issues).

    python benchmarks/report.py results/unet_sd15_h100.json results/unet_sdxl_h100.json
    python benchmarks/report.py results/merge_overhead_h100.json

Each file's kind is read from its ``meta.benchmark`` (``unet_speed``, ``torch_unet_speed``,
``merge_overhead``, ``pipeline_speed``, ``tpu``); files of one kind are combined, so JAX and torch
rows measured in separate runs can sit side by side (compare only rows from the same
device: the ``device`` column says which).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

METHOD_ORDER = ["none", "free", "free_todo", "tome", "tome_md2", "retom", "retom_global",
                "retom_cached", "retom_cached_traced", "retom_cached_static", "retom_cached_plan",
                "retom_cached_plan_traced", "retom_cached_plan_static", "todo"]


def _ms(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if v < 10 else f"{v:.1f}"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _num(v, fmt="{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _order(method) -> int:
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)





def torch_peer(rows, row):
    """The torch row to put beside a JAX row: same model, size, batch; ``none`` beside
    ``none``, ``tome_md2`` beside ``tome_md2``, and tomesd with its defaults (``tome``) at
    the same ratio beside every other merging method."""
    method = row["method"]
    if method.startswith("free"):
        return None
    want = method if method in ("none", "tome_md2") else "tome"
    for r in rows:
        if (r.get("framework") == "torch" and r.get("model") == row.get("model")
                and r.get("height") == row.get("height") and r.get("width") == row.get("width")
                and r.get("batch") == row.get("batch") and r.get("method") == want
                and (want == "none" or abs((r.get("ratio") or 0) - (row.get("ratio") or 0)) < 1e-9)):
            return r
    return None


def unet_table(rows) -> str:
    """One line per JAX row (torch rows go in the two torch columns)."""
    jax_rows = [r for r in rows if r.get("framework", "jax") == "jax"]
    torch_only = not jax_rows
    if torch_only:
        jax_rows = [r for r in rows if r.get("framework") == "torch"]
    jax_rows.sort(key=lambda r: (str(r.get("model")), r.get("height") or 0, r.get("width") or 0,
                                 r.get("batch") or 0, _order(r.get("method")),
                                 r.get("ratio") or 0))
    head = ("| model | size | batch | method | ratio | median ms | p10-p90 ms | ideal ms | "
            "speed-up | ideal speed-up | compile s | peak GB |")
    sep = "|---|---|---|---|---|---|---|---|---|---|---|---|"
    if not torch_only:
        head += " torch ms | torch speed-up | torch / ours |"
        sep += "---|---|---|"
    lines = [head, sep]
    for r in jax_rows:
        ms = r.get("median_ms")
        spread = (f"{_ms(r.get('p10_ms'))}-{_ms(r.get('p90_ms'))}" if ms is not None
                  else (r.get("error") or r.get("note") or "-")[:60])
        peak = r.get("peak_gb") if r.get("peak_gb") is not None else None
        line = (f"| {r.get('model')} | {r.get('height')}x{r.get('width')} | {r.get('batch')} | "
                f"{r.get('method')} | {_num(r.get('ratio'), '{:.2f}')} | {_ms(ms)} | {spread} | "
                f"{_ms(r.get('ideal_ms'))} | {_x(r.get('speedup'))} | "
                f"{_x(r.get('ideal_speedup'))} | {_num(r.get('compile_s'))} | "
                f"{_num(peak, '{:.2f}')} |")
        if not torch_only:
            t = torch_peer(rows, r)
            tms = t.get("median_ms") if t else None
            tname = "" if t is None else (" (tomesd)" if t["method"].startswith("tome") else "")
            line += (f" {_ms(tms)}{tname} | {_x(t.get('speedup') if t else None)} | "
                     f"{_x(tms / ms if tms and ms else None)} |")
        lines.append(line)
    return "\n".join(lines)


def merge_overhead_table(rows) -> str:
    rows = sorted(rows, key=lambda r: (r.get("tokens") or 0, r.get("ratio") or 0,
                                       _order(r.get("method"))))
    lines = ["| tokens | ratio | method | median ms | saved ms | overhead ms | "
             "overhead % of saving | goal (<= 10%) | speed-up |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pct = r.get("overhead_pct_of_saving")
        goal = r.get("goal_met")
        lines.append(
            f"| {r.get('tokens')} | {_num(r.get('ratio'), '{:.2f}')} | {r.get('method')} | "
            f"{_ms(r.get('median_ms')) if r.get('median_ms') is not None else r.get('error', '-')} | "
            f"{_ms(r.get('saved_ms'))} | {_ms(r.get('overhead_ms'))} | "
            f"{'-' if pct is None else f'{pct:.0f}%'} | "
            f"{'-' if goal is None else ('met' if goal else 'missed')} | {_x(r.get('speedup'))} |")
    return "\n".join(lines)


def pipeline_table(rows) -> str:
    rows = sorted(rows, key=lambda r: (str(r.get("model")), r.get("height") or 0,
                                       _order(r.get("method")), r.get("ratio") or 0))
    lines = ["| model | size | steps | images | method | ratio | s per image | median s | "
             "compile s | speed-up |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r.get('model')} | {r.get('height')}x{r.get('width')} | {r.get('steps')} | "
            f"{r.get('images')} | {r.get('method')} | {_num(r.get('ratio'), '{:.2f}')} | "
            f"{_num(r.get('s_per_image'), '{:.3f}')} | {_num(r.get('median_s'), '{:.3f}')} | "
            f"{_num(r.get('compile_s'))} | {_x(r.get('speedup'))} |"
            + (f" {r['error'][:60]}" if r.get("error") else ""))
    return "\n".join(lines)


TABLES = {"unet_speed": unet_table, "torch_unet_speed": unet_table,
          "merge_overhead": merge_overhead_table, "pipeline_speed": pipeline_table}


def render(paths) -> str:
    groups: dict[str, list] = {}
    devices: dict[str, set] = {}
    for p in paths:
        data = json.loads(Path(p).read_text())
        meta = data.get("meta", {})
        kind = meta.get("benchmark", "unet_speed")
        if kind == "torch_unet_speed":
            kind = "unet_speed"
        dev = (meta.get("device") or {}).get("device_kind")
        groups.setdefault(kind, []).extend(data.get("rows", []))
        devices.setdefault(kind, set()).add(f"{dev} ({Path(p).name}, {meta.get('date')})")
    out = []
    for kind, rows in groups.items():
        if kind == "tpu":  # retom-jax bench tpu: compiled for TPU on a CPU host, not run
            from retom_jax.analysis.tpu import format_table

            out.append("### tpu (XLA-compiled for TPU on a CPU host: times are ESTIMATES, "
                       "not measurements)\n")
            out.append(format_table(rows))
            out.append("")
            continue
        out.append(f"### {kind}\n")
        out.append("Measured on: " + "; ".join(sorted(devices[kind])) + "\n")
        out.append(TABLES[kind](rows))
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="JSON files written by the benchmarks")
    p.add_argument("--out", help="write the Markdown here as well as to stdout")
    args = p.parse_args(argv)
    text = render(args.files)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
