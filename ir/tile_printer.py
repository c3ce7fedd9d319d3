"""The text form of level 2 (``opforge show --stage tile``): each kernel's parameters,
tunables with their candidates, grid, and body with every variable's dtype and tile shape."""
from __future__ import annotations

from .dims import format_dim
from .tile import Comment, For, Let, Plan, Store, TExpr, TileKernel


def fmt_type(e: TExpr) -> str:
    shape = f"[{', '.join(str(s) for s in e.shape)}]" if e.shape else ""
    return f"{e.dtype}{shape}"


def fmt(e: TExpr) -> str:
    op, a = e.op, e.args
    if op in ("var", "arg"):
        return a[0]
    if op == "const":
        return repr(a[0])
    args = []
    for x in a:
        if isinstance(x, TExpr):
            args.append(fmt(x))
        elif x is None:
            args.append("_")
        else:
            args.append(str(x))
    return f"{op}({', '.join(args)})"


def fmt_stmts(stmts, indent: int) -> list[str]:
    pad = "  " * indent
    out = []
    for s in stmts:
        if isinstance(s, Comment):
            out.append(f"{pad}// {s.text}")
        elif isinstance(s, Let):
            out.append(f"{pad}{s.var.name}: {fmt_type(s.var)} = {fmt(s.value)}")
        elif isinstance(s, Store):
            op = "atomic_add" if s.atomic_add else "store"
            out.append(f"{pad}{op}({fmt(s.ptr)}, {fmt(s.value)}, mask={fmt(s.mask) if s.mask is not None else '_'})")
        elif isinstance(s, For):
            out.append(f"{pad}for {s.var.name} in range({fmt(s.start)}, {fmt(s.stop)}, {fmt(s.step)}):")
            out.extend(fmt_stmts(s.body, indent + 1))
    return out


def fmt_tunable(t) -> str:
    if t.rule is not None:
        return f"{t.name} = {t.rule[0]}({', '.join(format_dim(d) for d in t.rule[1:])})"
    if t.covers is not None:
        return f"{t.name} = next_pow2({format_dim(t.covers)}) in [{t.lo}, {t.hi}]"
    return f"{t.name} in {{{', '.join(map(str, t.candidates))}}} (interpreter: {t.cpu})"


def print_kernel(k: TileKernel) -> str:
    lines = [f"kernel {k.name}" + (f"  // {k.doc}" if k.doc else "")]
    lines.append("  params: " + ", ".join(f"{p.name}: {p.kind} {p.dtype}" for p in k.params))
    if k.tunables:
        lines.append("  tunables: " + "; ".join(fmt_tunable(t) for t in k.tunables)
                     + f"; num_warps in {{{', '.join(map(str, k.warps))}}}")
    grid = ", ".join(" * ".join(f"cdiv({format_dim(e)}, {blk})" if blk else e if isinstance(e, str) else format_dim(e) for e, blk in g.parts)
                     for g in k.grid)
    lines.append(f"  grid: ({grid},)" if len(k.grid) == 1 else f"  grid: ({grid})")
    if k.extents:
        lines.append("  tiles: " + ", ".join(f"{blk} over {format_dim(d)}" for blk, d in k.extents))
    lines.extend(fmt_stmts(k.body, 1))
    return "\n".join(lines)


def print_plan(plan: Plan) -> str:
    lines = [f"plan {plan.op}: {len(plan.steps)} launch step(s)"]
    for name, buf in plan.buffers.items():
        lines.append(f"  buffer {name}: {buf.dtype}[{', '.join(format_dim(d) for d in buf.shape)}] ({buf.kind}"
                     f"{', zeroed' if buf.zeroed else ''})")
    if plan.scalars:
        lines.append("  host scalars: " + ", ".join(plan.scalars))
    for i, step in enumerate(plan.steps):
        for j, lnch in enumerate(step):
            guard = ""
            if lnch.guard is not None:
                guard = f" when {lnch.guard}"
            elif len(step) > 1:
                guard = " otherwise"
            names = " then ".join(k.name for k in lnch.kernels)
            lines.append(f"  step {i}{'' if len(step) == 1 else chr(97 + j)}: launch {names}{guard}"
                         f"  reads {', '.join(lnch.reads) or '-'}  writes {', '.join(lnch.writes)}")
    lines.append(f"  returns {', '.join(plan.outputs)}")
    out = ["\n".join(lines)]
    seen = set()
    for step in plan.steps:
        for lnch in step:
            for k in lnch.kernels:
                if k.name not in seen:
                    seen.add(k.name)
                    out.append(print_kernel(k))
    return "\n\n".join(out)
