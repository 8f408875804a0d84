"""Matmul FLOPs of a compiled program, read from its optimized HLO with every loop counted its trip count.

Why not `compiled.cost_analysis()["flops"]` alone: XLA's cost analysis adds up each computation once, so a
`while` body (scanned layers, the micro-batch accumulation loop) counts one iteration: the 7B stage-2 step
reports one layer's worth. Here each `dot` and `convolution` (the TPU compiler rewrites dots as
convolutions) is counted as 2 x output elements x contracted size, and each computation is weighted by
how often it runs: a `while` body by the loop's trip count, fusions and calls by their caller's count.

Trip counts: the CPU and GPU compilers annotate a loop with `known_trip_count`; the TPU compiler's
output does not, so the count is read from the loop: its condition stops at `counter < N` with N a
constant, the counter starts at the constant in its slot of the loop's initial tuple (else 0) and grows
by the constant its body adds (else 1). jax's loops (scan, fori_loop) count 0, 1, ..., N - 1; the TPU
compiler's windowed matmuls (an FSDP all-gather overlapped with the products, a loop per matmul) count
by 2. A loop whose condition has no such constant is counted once and listed in `unknown_loops`.

What this cannot see: custom calls (Pallas kernels such as splash attention, cuDNN attention) are
opaque here as they are to XLA's cost analysis, so their FLOPs are in neither count (`custom_calls`
lists them); elementwise work (norms, softmax, optimizer update) is left out on purpose: matmuls are
what MFU is about, and the `once` count against the compiler's own `flops` shows how much else it adds.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"^(\w+)\[([\d,]*)\]")
_NAME = re.compile(r"%([\w.\-]+)")
_CALLED = re.compile(r"\b(?:calls|to_apply|body|condition)=%([\w.\-]+)")
_CALLED_LIST = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CONSTANT = re.compile(r"^[su](?:32|64)\[\]\S*\s+constant\((-?\d+)\)")


@dataclasses.dataclass(frozen=True)
class HloFlops:
    """Matmul FLOPs of one program (per device for an SPMD program: the module is one device's)."""

    flops: float  # every loop body times its trip count
    once: float  # every computation once, as XLA's cost analysis counts (compare with its `flops`)
    loops: tuple[int, ...]  # the trip count of each while loop found (in program order)
    unknown_loops: int  # loops whose trip count could not be read (counted once in `flops`)
    custom_calls: tuple[str, ...]  # targets of custom calls (their FLOPs are in neither count)


@dataclasses.dataclass
class _Instr:
    name: str
    type: str
    op: str
    rest: str  # operands and attributes


def _parse(text: str) -> tuple[dict[str, list[_Instr]], str]:
    """{computation: instructions} and the entry computation's name."""
    comps: dict[str, list[_Instr]] = {}
    entry, current = "", None
    for line in text.splitlines():
        m = _COMPUTATION.match(line)
        if m and not line.startswith(" "):
            current = comps.setdefault(m.group(1), [])
            if line.startswith("ENTRY"):
                entry = m.group(1)
            continue
        if line.rstrip() == "}":  # not "}}, metadata=...": a long attribute continued on its own line
            current = None
            continue
        m = _INSTRUCTION.match(line)
        if m and current is not None:
            current.append(_Instr(*m.groups()))
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def _dims(type_str: str) -> list[int] | None:
    m = _ARRAY.match(type_str)
    if m is None:
        return None
    return [int(d) for d in m.group(2).split(",") if d]


def _operands(rest: str) -> list[str]:
    """Operand names: everything before the closing parenthesis of the operand list."""
    depth, end = 1, len(rest)
    for i, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            end = i
            break
    return _NAME.findall(rest[:end])


def _matmul_flops(ins: _Instr, shapes: dict[str, list[int]]) -> float:
    out = _dims(ins.type)
    ops = _operands(ins.rest)
    if out is None or len(ops) < 2:
        return 0.0
    if ins.op == "dot":
        lhs = shapes.get(ops[0])
        m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.rest)
        if lhs is None or m is None:
            return 0.0
        contracted = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d)
        return 2.0 * math.prod(out) * contracted
    # convolution: an output element sums the kernel's input features over the window positions that
    # fall on the input, not on its padding. The TPU compiler writes some projections as convolutions
    # whose window mostly covers padding (a [T, D] x [D, H, K] projection: a window of H heads padded by
    # H - 1 on each side, one position real), so the window size alone would overcount them H times.
    lhs, rhs = shapes.get(ops[0]), shapes.get(ops[1])
    m = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.rest)
    if lhs is None or rhs is None or m is None or (len(m.group(1)), len(m.group(2))) != (len(lhs), len(rhs)):
        return 0.0
    lhs_labels, rhs_labels, out_labels = m.groups()
    window = _window(ins.rest)
    flops = 2.0 * math.prod(size for label, size in zip(out_labels, out) if not label.isdigit())
    flops *= math.prod(size for label, size in zip(rhs_labels, rhs) if label == "i")
    for d in range(sum(label.isdigit() for label in rhs_labels)):
        kernel = rhs[rhs_labels.index(str(d))]
        field = {k: (v[d] if d < len(v) else v[-1]) for k, v in window.items()}
        flops *= _valid_pairs(lhs[lhs_labels.index(str(d))], out[out_labels.index(str(d))], kernel, **field)
    return flops


def _window(rest: str) -> dict[str, list]:
    """A convolution's window attributes per spatial dimension (defaults when absent)."""
    m = re.search(r"window=\{([^}]*)\}", rest)
    fields = dict(part.split("=", 1) for part in (m.group(1).split() if m else []))
    ints = lambda key, default: [int(x) for x in fields[key].split("x")] if key in fields else [default]  # noqa: E731
    pads = [tuple(int(x) for x in p.split("_")) for p in fields["pad"].split("x")] if "pad" in fields else [(0, 0)]
    return {"stride": ints("stride", 1), "pad_low": [p[0] for p in pads], "lhs_dilate": ints("lhs_dilate", 1),
            "rhs_dilate": ints("rhs_dilate", 1)}


def _valid_pairs(size: int, out: int, kernel: int, *, stride: int, pad_low: int, lhs_dilate: int,
                 rhs_dilate: int) -> int:
    """(output position, kernel position) pairs of one spatial dimension that read an input element."""
    dilated = (size - 1) * lhs_dilate + 1
    count = 0
    for k in range(kernel):
        offset = k * rhs_dilate - pad_low
        # positions o with 0 <= o * stride + offset < dilated, on an input element (not a dilation hole)
        for o in range(out):
            x = o * stride + offset
            count += 0 <= x < dilated and x % lhs_dilate == 0
    return count


def _trip_count(ins: _Instr, comps: dict[str, list[_Instr]], defs: dict[str, _Instr]) -> int | None:
    m = _TRIP.search(ins.rest)
    if m:
        return int(m.group(1))
    cond = re.search(r"\bcondition=%([\w.\-]+)", ins.rest)
    if cond is None:
        return None
    # `counter < N`, N an integer constant of the condition (or of a fusion it calls): jax's loops count
    # from 0 by 1; the compiler's own (a windowed matmul's) may start elsewhere and step by more.
    seen, todo, constants, less_than = set(), [cond.group(1)], [], False
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        for i in comps[name]:
            c = _CONSTANT.match(f"{i.type} {i.op}({i.rest}")
            if c:
                constants.append(int(c.group(1)))
            less_than |= i.op == "compare" and "direction=LT" in i.rest
            todo += _CALLED.findall(i.rest)
    if not less_than or len(set(constants)) != 1:
        return None
    init, step = _counter(ins, comps[cond.group(1)], comps, defs)
    return max(0, -(-(constants[0] - init) // step))


def _as_op(ins: _Instr, op: str, comps: dict[str, list[_Instr]]) -> list[str] | None:
    """The operands of `ins` if it is an `op`, or a fusion that only wraps one (the CPU compiler wraps a
    loop's compare and increment so); None otherwise."""
    if ins.op == op:
        return _operands(ins.rest)
    callee = re.search(r"\bcalls=%([\w.\-]+)", ins.rest) if ins.op == "fusion" else None
    body = comps.get(callee.group(1), []) if callee else []
    if body and body[-1].op == op and all(i.op == "parameter" for i in body[:-1]):
        return _operands(ins.rest)
    return None


def _counter(loop: _Instr, cond: list[_Instr], comps: dict[str, list[_Instr]], defs: dict[str, _Instr]
             ) -> tuple[int, int]:
    """(initial value, increment) of the loop counter the condition compares, when the HLO states them as
    constants (the counter's slot of the loop's initial tuple; `slot + constant` in the body's result);
    otherwise (0, 1), jax's."""
    compare = next((ops for i in cond if (ops := _as_op(i, "compare", comps)) is not None), None)
    if compare is None:
        return 0, 1
    slots = [int(m.group(1)) for name in compare
             if (g := defs.get(name)) is not None and g.op == "get-tuple-element"
             and (m := re.search(r"\bindex=(\d+)", g.rest))]
    if len(slots) != 1:
        return 0, 1
    slot = slots[0]

    def constant(name: str) -> int | None:
        i = defs.get(name)
        while i is not None and i.op in ("copy", "convert", "bitcast"):
            i = defs.get(next(iter(_operands(i.rest)), ""))
        c = _CONSTANT.match(f"{i.type} {i.op}({i.rest}") if i is not None else None
        return int(c.group(1)) if c else None

    init, step = 0, 1
    start = defs.get(next(iter(_operands(loop.rest)), ""))
    if start is not None and start.op == "tuple" and slot < len(_operands(start.rest)):
        init = constant(_operands(start.rest)[slot]) or 0
    body = re.search(r"\bbody=%([\w.\-]+)", loop.rest).group(1)
    root = next((i for i in reversed(comps.get(body, [])) if i.op == "tuple"), None)
    if root is not None and slot < len(_operands(root.rest)):
        nxt = defs.get(_operands(root.rest)[slot])
        added = _as_op(nxt, "add", comps) if nxt is not None else None
        if added is not None:
            increments = [c for c in map(constant, added) if c is not None]
            step = increments[0] if len(increments) == 1 and increments[0] > 0 else 1
    return init, step


def count(hlo_text: str) -> HloFlops:
    """The matmul FLOPs of an optimized HLO module (`compiled.as_text()`), loops counted (see the module doc)."""
    comps, entry = _parse(hlo_text)
    shapes = {i.name: d for instrs in comps.values() for i in instrs if (d := _dims(i.type)) is not None}
    defs = {i.name: i for instrs in comps.values() for i in instrs}
    loops: list[int] = []
    unknown = 0
    custom: list[str] = []
    # (callee, times per call of the caller) for each computation, and its own matmul FLOPs.
    calls: dict[str, list[tuple[str, int]]] = {}
    own: dict[str, float] = {}
    for name, instrs in comps.items():
        own[name] = sum(_matmul_flops(i, shapes) for i in instrs if i.op in ("dot", "convolution"))
        edges = []
        for i in instrs:
            if i.op == "while":
                trip = _trip_count(i, comps, defs)
                if trip is None:
                    unknown += 1
                else:
                    loops.append(trip)
                body = re.search(r"\bbody=%([\w.\-]+)", i.rest).group(1)
                edges.append((body, 1 if trip is None else trip))
                continue
            if i.op == "custom-call":
                target = re.search(r'custom_call_target="([^"]+)"', i.rest)
                custom.append(target.group(1) if target else "?")
            callees = _CALLED.findall(i.rest)
            for group in _CALLED_LIST.findall(i.rest):
                callees += _NAME.findall(group)
            edges += [(c, 1) for c in callees]
        calls[name] = edges

    @functools.lru_cache(maxsize=None)
    def total(name: str, with_trips: bool) -> float:
        return own.get(name, 0.0) + sum((times if with_trips else 1) * total(callee, with_trips)
                                        for callee, times in calls.get(name, ()))

    return HloFlops(flops=total(entry, True), once=total(entry, False), loops=tuple(loops), unknown_loops=unknown,
                    custom_calls=tuple(custom))
