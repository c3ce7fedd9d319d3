"""Plain ``opforge check FILE``: the front end, then the whole pipeline up to kernels at one size
(fusion, lowering, codegen, loading the generated modules; nothing runs), so a spec that parses
but cannot be compiled fails here rather than at its first call.

Sizes: ``--shape``, else the file's ``# shapes:`` line, else DEFAULT_SIZE for every symbol left.
Layout weights are compiled packed at those sizes (runtime/sweep.variant), as ``bind`` would.
"""
from __future__ import annotations

from ..frontend import load_program
from ..frontend.diagnostics import SpecError
from ..passes.pipeline import canonical_graph
from .binding import CallError
from .config import heuristic_config, interpreter_config
from .sizes import file_shapes, parse_shapes

DEFAULT_SIZE = 64


def check_pipeline(file, shape, console, errors) -> bool:
    program = load_program(file)
    for name in program.graphs:
        canonical_graph(program, name)
    for name, g in program.graphs.items():
        params = ", ".join(f"{p.name}: {p.value.type}" + (f" {p.layout}" if p.layout else "") for p in g.params)
        results = ", ".join(str(t) for t in g.result_types)
        console.print(f"  [bold]{name}[/]({params}) -> {results}", markup=True)
    sizes = {**file_shapes(file), **parse_shapes(shape)}
    from .module import compile_module
    from .sweep import launched_kernels, variant
    ok, kernels = True, 0
    for name, g in program.graphs.items():
        from .sizes import size_bindings
        bindings = size_bindings(g, {s: sizes.get(s, DEFAULT_SIZE) for s in g.symbols})
        at = ", ".join(f"{k}={v}" for k, v in bindings.items())
        try:
            from .scan import compiled_parts
            for part in compiled_parts(compile_module(file, ops=[name]).ops[name]):
                v = variant(part, size_bindings(part.graph, bindings))
                vb = size_bindings(v.graph, bindings)
                ks = launched_kernels(v.plan, vb)
                for k in ks:
                    heuristic_config(k, vb)
                    interpreter_config(k, vb)
                kernels += len(ks)
        except (SpecError, CallError) as e:
            errors.print(f"{file}: {name} at {at}: {e}", markup=False)
            ok = False
        except Exception as e:       # an internal error a call would have hit: report it, as a failure
            errors.print(f"{file}: {name} at {at}: does not compile to kernels: {type(e).__name__}: {e}",
                         markup=False)
            ok = False
    if ok:
        ops = f"{len(program.op_names)} op(s)" + (f" ({len(program.graphs)} graphs, one per binding of a dtype-generic op)"
                                                  if program.generics else "")
        console.print(f"{file}: {ops}, no errors ({kernels} kernel(s) at the sizes of "
                      f"{'--shape' if shape else 'its # shapes: line' if file_shapes(file) else 'the default'})")
    return ok
