"""The level-2 verifier rejects malformed kernels, and accepts every kernel the compiler makes."""
from __future__ import annotations

import pytest

import opforge
from opforge.ir.tile import GridDim, Tunable
from opforge.ir.tile_builder import TileBuilder
from opforge.ir.tile_verifier import TileVerifyError, verify_kernel
from opforge.ir.types import DType
from opforge.runtime.runner import example_files


def _base():
    b = TileBuilder("k")
    b.tunable(Tunable("BLOCK_X", (16,), cpu=16))
    return b


def test_a_well_formed_kernel_passes():
    b = _base()
    i = b.let(b.arange("BLOCK_X"), "i")
    x = b.let(b.load(b.ptr("x", DType.f32), b.lt(i, b.size(7))), "x_tile")
    acc = b.declare(b.full(("BLOCK_X",), 0.0, DType.f32), "acc")
    with b.loop("k", 0, 4, 1):
        b.assign(acc, b.add(acc, x))
    b.store(b.ptr("out", DType.f32), acc, b.lt(i, b.size(7)))
    verify_kernel(b.kernel([GridDim.of(7, "BLOCK_X")]))


def test_read_before_assign():
    b = _base()
    from opforge.ir.tile import var
    ghost = var("ghost", DType.f32, ())
    b.let(b.add(ghost, 1.0), "y")
    with pytest.raises(TileVerifyError, match="ghost is read before it is assigned"):
        verify_kernel(b.kernel([GridDim.of(1)]))


def test_a_value_made_inside_a_loop_is_not_visible_after_it():
    b = _base()
    with b.loop("k", 0, 4, 1) as k:
        inner = b.let(b.mul(k, 2), "inner")
    b.let(b.add(inner, 1), "after")
    with pytest.raises(TileVerifyError, match="inner is read before it is assigned"):
        verify_kernel(b.kernel([GridDim.of(1)]))


def test_reassignment_keeps_dtype_and_shape():
    b = _base()
    acc = b.declare(b.full(("BLOCK_X",), 0.0, DType.f32), "acc")
    from opforge.ir.tile import Let, var
    b.blocks[-1].append(Let(var("acc", DType.f32, ("BLOCK_X", "BLOCK_X")), b.full(("BLOCK_X", "BLOCK_X"), 0.0, DType.f32)))
    with pytest.raises(TileVerifyError, match="acc re-assigned"):
        verify_kernel(b.kernel([GridDim.of(1)]))
    assert acc.shape == ("BLOCK_X",)


def test_dot_shapes_must_chain():
    b = _base()
    b.tunable(Tunable("BLOCK_K", (16,), cpu=16))
    a = b.full(("BLOCK_X", "BLOCK_K"), 1.0, DType.f16)
    w = b.full(("BLOCK_X", "BLOCK_X"), 1.0, DType.f16)
    from opforge.ir.tile import TExpr
    acc = b.full(("BLOCK_X", "BLOCK_X"), 0.0, DType.f32)
    b.let(TExpr("dot", (a, w, acc, None), DType.f32, ("BLOCK_X", "BLOCK_X")), "bad")
    with pytest.raises(TileVerifyError, match="dot of"):
        verify_kernel(b.kernel([GridDim.of(1)]))


def test_unknown_block_name_in_a_shape_or_grid():
    b = _base()
    b.let(b.full(("NOPE",), 0.0, DType.f32), "z")
    with pytest.raises(TileVerifyError, match="'NOPE'"):
        verify_kernel(b.kernel([GridDim.of(1)]))
    b = _base()
    with pytest.raises(TileVerifyError, match="grid divides by 'BLOCK_Y'"):
        verify_kernel(b.kernel([GridDim.of(8, "BLOCK_Y")]))


def test_masks_are_bool_and_stores_go_through_pointers():
    b = _base()
    i = b.let(b.arange("BLOCK_X"), "i")
    from opforge.ir.tile import TExpr
    b.let(TExpr("load", (b.ptr("x", DType.f32), i, 0.0), DType.f32, ("BLOCK_X",)), "x_tile")
    with pytest.raises(TileVerifyError, match="load mask of dtype i32"):
        verify_kernel(b.kernel([GridDim.of(1)]))


@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.stem)
def test_every_example_kernel_verifies(path):
    mod = opforge.compile(path, namespace=f"tv_{path.stem}")
    from opforge.runtime.scan import compiled_parts
    kernels = [k for op in mod.ops.values() for part in compiled_parts(op) for k in part.plan.kernels]
    assert kernels
    for k in kernels:
        verify_kernel(k)
