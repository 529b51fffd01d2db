"""A per-op roofline over a compiled program's HLO text: an ESTIMATE of its time on a chip.

XLA's own ``cost_analysis()`` counts the body of a loop once (``lax.map``, ``fori_loop``:
a sampling loop of 30 steps counts one step) and its ``optimal_seconds`` on TPU came out
negative for the full SD1.5 UNet. This module reads the optimized HLO
(``compiled.as_text()``) instead: for every instruction that runs (the entry computation,
and the bodies of ``while`` loops times their ``known_trip_count``, of calls and
conditionals), it takes

* bytes: what the instruction reads and writes in HBM (its operands' and result's sizes;
  a fusion's internal values stay on chip),
* flops: ``2 * output elements * contraction size`` for each ``dot`` and ``convolution``
  (inside fusions too), with every dimension rounded up to its layout's tile (8 x 128:
  a head size of 40 costs the MXU what 128 does); array bytes are tile-padded too; a splash kernel (a Mosaic custom call whose name says splash)
  from its q/k/v shapes (``4 * heads * q_tokens * kv_tokens * head_dim``); other custom
  calls and elementwise work count no flops,

and sums ``max(flops / peak_flops, bytes / hbm_bandwidth)`` over the instructions (no
overlap between instructions, no collectives' link time: collectives count their bytes
against HBM only). It is a model, not a measurement: it misses a kernel's inefficiency
(small or badly shaped matmuls never reach the peak) and counts fused reads that a
dynamic slice narrows as whole.
"""
from __future__ import annotations

import dataclasses
import math
import re

# bytes per element of each HLO primitive type
DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
               "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4,
               "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "token": 0}

# instructions that move or compute nothing at run time
FREE_OPS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
            "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain",
            "copy-done", "slice-done", "all-gather-done", "all-reduce-done", "collective-permute-done",
            "async-done", "recv-done", "send-done", "iota"}

_SHAPE = re.compile(r"\b(" + "|".join(sorted(DTYPE_BYTES, key=len, reverse=True))
                    + r")\[([0-9,]*)\](\{[^}]*\})?")
_NAME = re.compile(r"%([\w.\-]+)")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


@dataclasses.dataclass
class Instr:
    name: str
    op: str
    result: str       # the result type text (an array shape or a tuple of them)
    rest: str         # operands and attributes
    operand_types: str = ""  # the operands' result types (from their definitions)


def _padded(dims: tuple, layout: str | None) -> tuple:
    """``dims`` rounded up to the layout's first tile (``{1,0:T(8,128)...}``: the two
    minor-most dimensions, in the layout's minor-to-major order, to 8 and 128): the
    memory a TPU array takes and the width the MXU works on."""
    if not layout or ":" not in layout or not dims:
        return dims
    order, _, rest = layout.strip("{}").partition(":")
    tile = re.match(r"T\(([0-9,]+)\)", rest)
    try:
        minor_to_major = [int(x) for x in order.split(",") if x]
    except ValueError:
        return dims
    if not tile or sorted(minor_to_major) != list(range(len(dims))):
        return dims
    sizes = [int(x) for x in tile.group(1).split(",")]
    out = list(dims)
    for axis, t in zip(minor_to_major, reversed(sizes)):
        out[axis] = -(-out[axis] // t) * t
    return tuple(out)


def shapes_in(text: str, padded: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """Every ``dtype[dims]`` array type in ``text``, in order (``padded``: rounded up to
    their layout's tile, see `_padded`)."""
    out = []
    for m in _SHAPE.finditer(text):
        dims = tuple(int(d) for d in m.group(2).split(",") if d)
        out.append((m.group(1), _padded(dims, m.group(3)) if padded else dims))
    return out


def nbytes(text: str, hbm_only: bool = True) -> float:
    """Bytes of every array type written in ``text`` (a shape or a tuple of shapes), tiles
    padded; ``hbm_only``: leave out arrays whose layout puts them in memory space 1 (a TPU
    core's VMEM, ``S(1)``), which no HBM traffic moves."""
    total = 0.0
    for m in _SHAPE.finditer(text):
        if hbm_only and m.group(3) and "S(1)" in m.group(3):
            continue
        dims = _padded(tuple(int(d) for d in m.group(2).split(",") if d), m.group(3))
        total += DTYPE_BYTES[m.group(1)] * math.prod(dims)
    return total


def parse_computations(hlo_text: str) -> tuple[dict[str, list[Instr]], str | None]:
    """``({computation name: instructions}, entry name)`` from HLO module text."""
    comps: dict[str, list[Instr]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if current is None:
            m = _COMP.match(line)
            if m and "=" not in line.split("{")[0].split("(")[0]:
                current = m.group(1)
                comps[current] = []
                if line.lstrip().startswith("ENTRY"):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            comps[current].append(Instr(m.group(1), m.group(3), m.group(2), m.group(4)))
    for instrs in comps.values():
        table = {i.name: i.result for i in instrs}
        for i in instrs:
            i.operand_types = " ".join(table.get(n, "") for n in _NAME.findall(_operands(i.rest)))
    return comps, entry


def _operands(rest: str) -> str:
    """The operand list of an instruction (the text up to its closing parenthesis)."""
    depth = 1
    for i, ch in enumerate(rest):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                return rest[:i]
    return rest


def _attr(rest: str, key: str) -> str | None:
    m = re.search(r"\b" + key + r"=([^\s,]+(?:\{[^}]*\})?)", rest)
    return m.group(1) if m else None


def async_copy_bytes(ins: Instr) -> float | None:
    """HBM bytes of an asynchronous copy or slice (None for other instructions). A
    ``copy-start``'s result is ``(destination, source, context)``: the members outside VMEM
    are what it reads and writes in HBM (its operand is the source again). A
    ``slice-start``'s is ``((source), destination, context)``: it reads the slice, not the
    whole source, and writes it to HBM only when the destination is not in VMEM."""
    if ins.op == "copy-start":
        return nbytes(ins.result)
    if ins.op == "slice-start":
        arrays = list(_SHAPE.finditer(ins.result))
        if len(arrays) < 2:
            return None
        dest = arrays[1]
        size = nbytes(dest.group(0), hbm_only=False)
        return size * (1 if dest.group(3) and "S(1)" in dest.group(3) else 2)
    return None


def dot_flops(ins: Instr) -> float:
    out = shapes_in(ins.result, padded=True)
    ops = shapes_in(ins.operand_types, padded=True)
    if not out or not ops:
        return 0.0
    if ins.op == "dot":
        dims = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.rest)
        lhs = ops[0][1]
        k = math.prod(lhs[int(d)] for d in dims.group(1).split(",") if d) if dims else 1
        return 2.0 * math.prod(out[0][1]) * k
    # convolution: 2 * out elements * (kernel elements / output features)
    labels = re.search(r"dim_labels=\w+_(\w+)->", ins.rest)
    rhs = ops[1][1] if len(ops) > 1 else ()
    if not labels or not rhs:
        return 0.0
    o = labels.group(1).index("o")
    return 2.0 * math.prod(out[0][1]) * math.prod(rhs) / max(rhs[o], 1)


_FLOATS = ("bf16", "f16", "f32")


def splash_flops(ins: Instr) -> float:
    """4 * heads * q_tokens * kv_tokens * head_dim of a splash kernel, from its first two
    floating-point 3-d operands, q [h, tq, d] and k [h, tk, d] (the kernel's block masks
    before them are int8 and its segment ids int32); 0 when the shapes do not say."""
    ops = [dims for dtype, dims in shapes_in(ins.operand_types)
           if len(dims) == 3 and dtype in _FLOATS]
    if len(ops) < 2:
        return 0.0
    (h, tq, d), (_, tk, _) = ops[0], ops[1]
    return 4.0 * h * tq * tk * d


def is_splash(ins: Instr) -> bool:
    """A splash kernel: a Mosaic custom call whose instruction name or kernel metadata
    says splash (``%splash_mha_fwd_no_residuals.3 = ... custom-call(...)``)."""
    return ins.op == "custom-call" and ("splash" in ins.name.lower()
                                        or "splash" in ins.rest.lower())


_OP_NAME = re.compile(r'op_name="([^"]*)"')


def source_of(ins: Instr) -> str:
    """Where an instruction comes from, for the breakdown: the last two parts of its
    ``op_name`` metadata (the JAX function and primitive, e.g. ``"argsort/sort"``) after
    the HLO opcode, or the opcode alone."""
    m = _OP_NAME.search(ins.rest)
    if not m:
        return ins.op
    parts = [p for p in re.sub(r"\[[^\]]*\]", "", m.group(1)).split("/") if p]
    return f"{ins.op}: {'/'.join(parts[-2:])}"


def top_sources(roof: "Roofline", n: int = 12) -> list:
    """The ``n`` largest ``(source, seconds)`` entries of a roofline's breakdown."""
    return sorted(roof.by_source.items(), key=lambda kv: -kv[1])[:n]


@dataclasses.dataclass
class Roofline:
    flops: float = 0.0
    bytes: float = 0.0
    seconds: float = 0.0
    compute_seconds: float = 0.0  # the instructions bound by flops
    memory_seconds: float = 0.0   # ... and those bound by bytes
    loops: int = 0                # while loops seen (with their trip counts applied)
    unknown_trip_counts: int = 0  # loops without a known_trip_count (counted once)
    splash_calls: int = 0         # splash kernel runs (loop trip counts applied)
    splash_sites: int = 0         # ... and their call sites in the program
    by_source: dict = dataclasses.field(default_factory=dict)  # seconds per `source_of`

    def add(self, flops, nbytes_, peak, bw, times=1.0, source=None):
        t_c, t_m = flops / peak, nbytes_ / bw
        if source is not None:
            self.by_source[source] = self.by_source.get(source, 0.0) + max(t_c, t_m) * times
        self.flops += flops * times
        self.bytes += nbytes_ * times
        self.seconds += max(t_c, t_m) * times
        if t_c >= t_m:
            self.compute_seconds += t_c * times
        else:
            self.memory_seconds += t_m * times


def _trip_count(ins: Instr, comps) -> int | None:
    """A while loop's trip count: its ``known_trip_count`` when XLA wrote one, else read
    from its condition (``counter < constant``, the counter starting at 0: how
    ``fori_loop`` and ``lax.map`` lower); None when neither says."""
    m = re.search(r'known_trip_count[^0-9]*([0-9]+)', ins.rest)
    if m:
        return int(m.group(1))
    for cond in _called(ins, "condition"):
        body = comps.get(cond, [])
        consts = {i.name: i.rest for i in body if i.op == "constant"}
        for i in body:
            if i.op != "compare":
                continue
            direction = _attr(i.rest, "direction")
            names = _NAME.findall(_operands(i.rest))
            values = [consts[n] for n in names if n in consts]
            if len(values) == 1 and direction in ("LT", "LE", "GT", "GE"):
                try:
                    n = int(values[0].split(")")[0])
                except ValueError:
                    return None
                return n + (1 if direction in ("LE", "GE") else 0)
    return None


def _called(ins: Instr, key: str) -> list[str]:
    m = re.search(r"\b" + key + r"=\{?([^}\s]+(?:,\s*%?[\w.\-]+)*)\}?", ins.rest)
    if not m:
        return []
    return [c.strip().lstrip("%") for c in m.group(1).split(",") if c.strip()]


def roofline(hlo_text: str, peak_flops: float, hbm_bandwidth: float) -> Roofline:
    """The roofline estimate of a compiled program (``compiled.as_text()``) on a chip with
    ``peak_flops`` (per second) and ``hbm_bandwidth`` (bytes per second)."""
    comps, entry = parse_computations(hlo_text)
    out = Roofline()
    if entry is None:
        return out

    def fused_flops(name, seen=()):
        total = 0.0
        for ins in comps.get(name, []):
            if ins.op in ("dot", "convolution"):
                total += dot_flops(ins)
            elif ins.op == "fusion" or ins.op == "call":
                for c in _called(ins, "calls") + _called(ins, "to_apply"):
                    if c not in seen:
                        total += fused_flops(c, seen + (name,))
        return total

    def walk(name, times, depth=0):
        if depth > 32:
            return
        for ins in comps.get(name, []):
            op = ins.op
            if op in FREE_OPS:
                continue
            if op == "while":
                trips = _trip_count(ins, comps)
                out.loops += 1
                if trips is None:
                    out.unknown_trip_counts += 1
                for body in _called(ins, "body"):
                    walk(body, times * (trips or 1), depth + 1)
                for cond in _called(ins, "condition"):
                    walk(cond, times * ((trips or 0) + 1), depth + 1)
                continue
            if op in ("call", "async-start"):
                for c in _called(ins, "to_apply") + _called(ins, "calls"):
                    walk(c, times, depth + 1)
                continue
            if op == "conditional":  # the most expensive branch
                branches = _called(ins, "branch_computations") or (
                    _called(ins, "true_computation") + _called(ins, "false_computation"))
                best = None
                for b in branches:
                    sub = Roofline()
                    _walk_into(b, sub, times)
                    if best is None or sub.seconds > best.seconds:
                        best = sub
                if best is not None:
                    for f in dataclasses.fields(Roofline):
                        if f.name == "by_source":
                            for k, v in best.by_source.items():
                                out.by_source[k] = out.by_source.get(k, 0.0) + v
                        else:
                            setattr(out, f.name, getattr(out, f.name) + getattr(best, f.name))
                continue
            moved = async_copy_bytes(ins)
            if moved is None:
                moved = nbytes(ins.result) + nbytes(ins.operand_types)
            if op in ("dot", "convolution"):
                flops = dot_flops(ins)
            elif op == "fusion":
                flops = sum(fused_flops(c) for c in _called(ins, "calls"))
            elif is_splash(ins):
                flops = splash_flops(ins)
                out.splash_calls += int(times)
                out.splash_sites += 1
            else:
                flops = 0.0
            out.add(flops, moved, peak_flops, hbm_bandwidth, times, source_of(ins))

    def _walk_into(name, target, times):
        nonlocal out
        saved, out = out, target
        try:
            walk(name, times)
        finally:
            out = saved

    walk(entry, 1.0)
    return out
