"""The level-2 verifier: a kernel is well formed before codegen prints it.

Checks: every variable is assigned before it is read (a loop's variable only inside the loop;
variables assigned inside a loop and read after it must exist before it, as loop-carried
values); a re-assigned variable keeps its dtype and tile shape; every argument is a declared
parameter or tunable; tile shapes broadcast; loads and stores go through pointers and their
masks are bool; dot operands are [M, K] x [K, N] into an [M, N] accumulator; every block name
in a shape or grid is a tunable. Runs after lowering when checks are on (OPFORGE_CHECKS=1,
always in tests).
"""
from __future__ import annotations

from .tile import Comment, For, Let, PtrType, Store, TExpr, TileKernel
from .tile_builder import broadcast



class TileVerifyError(AssertionError):
    pass


def verify_kernel(k: TileKernel) -> TileKernel:
    names = {p.name for p in k.params} | {t.name for t in k.tunables}
    blocks = {t.name for t in k.tunables}

    def fail(msg: str):
        raise TileVerifyError(f"{k.name}: {msg}")

    def shape_ok(shape):
        for d in shape:
            if isinstance(d, str) and d not in blocks:
                fail(f"tile shape {shape} names {d!r}, which is not a tunable")

    def expr(e: TExpr, env: dict) -> None:
        if e.op == "var":
            if e.name not in env:
                fail(f"{e.name} is read before it is assigned")
            return
        if e.op == "arg":
            if e.name not in names:
                fail(f"argument {e.name} is not a parameter or tunable")
            return
        shape_ok(e.shape)
        for a in e.args:
            if isinstance(a, TExpr):
                expr(a, env)
        if e.op == "arange" and e.args[0] not in blocks:
            fail(f"arange over {e.args[0]!r}, which is not a tunable")
        if e.op == "load":
            ptr, mask, _ = e.args
            if not isinstance(ptr.dtype, PtrType):
                fail(f"load through a {ptr.dtype}, not a pointer")
            if mask is not None and not mask.dtype.is_bool:
                fail(f"load mask of dtype {mask.dtype}")
        if e.op == "dot":
            a, b, acc = e.args[:3]
            if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[1] != b.shape[0] \
                    or tuple(acc.shape) != (a.shape[0], b.shape[1]):
                fail(f"dot of {list(a.shape)} and {list(b.shape)} into {list(acc.shape)}")
        if e.op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "and", "or", "lt", "le", "gt",
                    "ge", "eq", "ne", "maximum", "minimum", "shr", "shl"):
            try:
                broadcast(e.args[0].shape, e.args[1].shape)
            except ValueError as err:
                fail(str(err))

    def block(stmts, env: dict) -> None:
        for s in stmts:
            if isinstance(s, Comment):
                continue
            if isinstance(s, Let):
                expr(s.value, env)
                old = env.get(s.var.name)
                if old is not None and (old.dtype != s.var.dtype or tuple(old.shape) != tuple(s.var.shape)):
                    fail(f"{s.var.name} re-assigned from {old.dtype}{list(old.shape)} "
                         f"to {s.var.dtype}{list(s.var.shape)}")
                if s.value.op != "broadcast_to" and s.value.shape != () and s.var.shape != s.value.shape:
                    fail(f"{s.var.name} declared {list(s.var.shape)}, assigned {list(s.value.shape)}")
                env[s.var.name] = s.var
            elif isinstance(s, Store):
                expr(s.ptr, env)
                expr(s.value, env)
                if not isinstance(s.ptr.dtype, PtrType):
                    fail(f"store through a {s.ptr.dtype}, not a pointer")
                if s.mask is not None:
                    expr(s.mask, env)
                    if not s.mask.dtype.is_bool:
                        fail(f"store mask of dtype {s.mask.dtype}")
            elif isinstance(s, For):
                for e in (s.start, s.stop, s.step):
                    expr(e, env)
                inner = dict(env)
                inner[s.var.name] = s.var
                block(s.body, inner)
                # what the loop assigns exists after it only if it existed before (loop-carried)
                for name, v in inner.items():
                    if name in env:
                        env[name] = v
            else:
                fail(f"unknown statement {type(s).__name__}")

    block(k.body, {})
    for g in k.grid:
        for _, blk in g.parts:
            if blk is not None and blk not in blocks:
                fail(f"grid divides by {blk!r}, which is not a tunable")
    return k
