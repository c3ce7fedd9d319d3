"""Packing weights into the layouts of DSL.md ("Layouts of weight parameters"), issue 5.

Each layout is packed (runtime/packing.pack) and unpacked again, and the result must equal,
exactly, the quantized / pruned / truncated weight computed here independently from the
definition of the layout: symmetric int8 per row, asymmetric int4 per group of G along K (two
nibbles a byte, the even k in the low nibble), float8 e4m3 per row, 2:4 magnitude pruning (the
two largest |w| of each group of 4, ties to the lower position), lossless block-CSR, and the
truncated SVD (by rank, or the smallest rank meeting a relative Frobenius tolerance).
Packed tensors are plain dense tensors, and their sizes are what the layout promises.

No kernel runs here (packing is host work); the bound-module checks compile but only unpack.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from opforge.ir.graph import Attrs, Layout
from opforge.ir.types import DType
from opforge.runtime.packing import pack, packed_bytes, unpack
from opforge.runtime.tolerances import TOLERANCES, assert_close

from .kernel_helpers import compiled

F16, F32 = torch.float16, torch.float32
TORCH_TO_DTYPE = {F16: DType.f16, F32: DType.f32}


def INT8():
    return Layout("quant", ("int8",))


def W8A8():
    return Layout("quant", ("int8",), Attrs({"act": "int8"}))


def INT4(g):
    return Layout("quant", ("int4",), Attrs({"group": g}))


def FP8():
    return Layout("quant", ("fp8",))


def S24():
    return Layout("sparse", ((2, 4),))


def BSR(b):
    return Layout("sparse", (), Attrs({"block": b}))


def LOWRANK(rank=None, tol=None):
    return Layout("lowrank", (), Attrs({"rank": rank} if rank is not None else {"tol": tol}))


def weight(n, k, dtype=F16, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * scale).to(dtype)


def round_trip(layout, w):
    p = pack(layout, w, "w")
    return p, unpack(layout, p, tuple(w.shape), w.dtype)


def assert_same(got, want, what=""):
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} vs {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    bad = got != want
    if bad.any():
        i = tuple(int(j) for j in bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {got.numel()} elements differ, first at {i}: "
                             f"{float(got[i])} vs {float(want[i])}")


# -- the layouts, written out independently -----------------------------------------------------
def expect_int8(w):
    """Symmetric per output row: scale = max|w| / 127 (1 for an all-zero row), q = round(w / s)."""
    scale = w.float().abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127)
    return q.to(torch.int8), scale, (q * scale[:, None]).to(w.dtype)


def expect_int4(w, group):
    """Asymmetric per group of G along K, the range widened to contain 0 so that the zero point
    is an integer in [0, 15]: scale = (hi - lo) / 15 (as stored, in the weight's dtype),
    zero = round(-lo / scale), q = clamp(round(w / scale) + zero, 0, 15), w' = (q - zero) * scale."""
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.uint8)
    out = torch.empty(n, k, dtype=w.dtype)
    scales = torch.empty(n, k // group, dtype=w.dtype)
    zeros = torch.empty(n, k // group, dtype=torch.uint8)
    wf = w.float()
    for r in range(n):
        for gi in range(k // group):
            vals = wf[r, gi * group:(gi + 1) * group]
            lo, hi = vals.min().clamp(max=0.0), vals.max().clamp(min=0.0)     # f32, as the packer computes
            s = (hi - lo) / 15.0
            s = float((s if s > 0 else torch.ones_like(s)).to(w.dtype))      # as stored
            z = int(torch.round(-lo / s).clamp(0, 15))
            qq = (torch.round(vals / s) + z).clamp(0, 15)
            q[r, gi * group:(gi + 1) * group] = qq.to(torch.uint8)
            out[r, gi * group:(gi + 1) * group] = ((qq - z) * s).to(w.dtype)
            scales[r, gi], zeros[r, gi] = s, z
    return q, scales, zeros, out


def expect_fp8(w):
    scale = w.float().abs().amax(dim=1) / 448.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    f8 = (w.float() / scale[:, None]).to(torch.float8_e4m3fn)
    return f8.view(torch.uint8), scale, (f8.float() * scale[:, None]).to(w.dtype)


def expect_24(w):
    """Keep the two largest |w| of each group of 4 along K; on equal magnitudes the lower
    position wins. Returns (pruned dense weight, kept positions [N, K/4, 2])."""
    n, k = w.shape
    out = torch.zeros_like(w)
    keep = torch.empty(n, k // 4, 2, dtype=torch.long)
    for r in range(n):
        for g in range(k // 4):
            mags = [abs(float(w[r, 4 * g + j])) for j in range(4)]
            order = sorted(range(4), key=lambda j: (-mags[j], j))
            kept = sorted(order[:2])
            keep[r, g] = torch.tensor(kept)
            for j in kept:
                out[r, 4 * g + j] = w[r, 4 * g + j]
    return out, keep


def svd_error(w, r):
    """The relative Frobenius error of the best rank-r approximation (Eckart-Young)."""
    s = torch.linalg.svdvals(w.double())
    return float((s[r:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())


def truncated_svd(w, r):
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def decaying(n, k, dtype, seed=0, decay=0.8):
    """A weight with a geometrically decaying spectrum, so every tolerance picks a distinct rank."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    r = min(n, k)
    s = torch.tensor([decay ** i for i in range(r)], dtype=torch.float64) * 4.0
    return ((u[:, :r] * s) @ v[:, :r].T).to(dtype)


# -- int8 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize("layout", [INT8, W8A8])
def test_int8_round_trip_is_symmetric_per_row(dtype, layout):
    w = weight(37, 45, dtype, seed=1, scale=3.0)
    w[5] = 0                                    # an all-zero row keeps a scale of 1 and unpacks to 0
    w[6, 3] = -float(w[6].abs().max()) * 2      # a row whose largest magnitude is negative
    p, back = round_trip(layout(), w)
    q, scale, want = expect_int8(w)
    assert set(p) == {"q", "scale"}
    assert p["q"].dtype == torch.int8 and p["scale"].dtype == F32
    assert_same(p["q"], q, "q")
    assert int(p["q"][6, 3]) == -127 and int(p["q"].abs().max()) == 127
    assert torch.equal(p["scale"], scale)
    assert_same(back, want, "unpacked int8")
    assert not back[5].any()
    # every element within half a step of its row
    err = (back.double() - w.double()).abs()
    step = scale.double()[:, None]
    assert bool((err <= step / 2 * (1 + 1e-6) + w.double().abs() * 2 ** -10).all())


# -- int4 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize("group,k", [(32, 96), (64, 192), (128, 256), (8, 24)])
def test_int4_round_trip_is_asymmetric_per_group(group, k, dtype):
    w = weight(9, k, dtype, seed=group, scale=2.0)
    p, back = round_trip(INT4(group), w)
    q, scale, zero, want = expect_int4(w, group)
    assert set(p) == {"packed", "scale", "zero"}
    assert p["packed"].dtype == torch.uint8 and p["packed"].shape == (9, k // 2)
    assert p["scale"].dtype == dtype and p["scale"].shape == (9, k // group)
    assert p["zero"].dtype == torch.uint8 and p["zero"].shape == (9, k // group)
    # two nibbles a byte: the even k in the low nibble, the odd k in the high one
    assert_same(p["packed"] & 0xF, q[:, 0::2], "low nibbles")
    assert_same(p["packed"] >> 4, q[:, 1::2], "high nibbles")
    assert_same(p["scale"], scale, "scales")
    assert_same(p["zero"], zero, "zero points")
    assert_same(back, want, "unpacked int4")


@pytest.mark.parametrize("dtype", [F16, F32])
def test_int4_groups_that_do_not_straddle_zero(dtype):
    """Groups whose values are all positive, all negative, or constant: every element must stay
    within one quantization step of its group (the zero point must not clip the range)."""
    g = 8
    rows = [
        [0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 0.55, 0.65],            # all positive
        [-2.0, -1.5, -1.25, -1.0, -3.0, -2.5, -1.75, -1.1],     # all negative
        [5.0] * g,                                             # constant, away from 0
        [100.0] * g,                                           # constant, large
        [-20.0] * g,                                           # constant, negative and large
        [0.0] * g,                                             # zeros
        [1e-3, 2e-3, 3e-3, 4e-3, 5e-3, 6e-3, 7e-3, 8e-3],       # tiny, positive
    ]
    w = torch.tensor(rows, dtype=dtype).repeat(1, 2)           # two groups a row
    p, back = round_trip(INT4(g), w)
    *_, want = expect_int4(w, g)
    step = p["scale"].float().repeat_interleave(g, dim=1).double()
    err = (back.double() - w.double()).abs()
    worst = int(torch.argmax(err - step))
    assert bool((err <= step).all()), (
        f"element {divmod(worst, w.shape[1])}: {float(w.reshape(-1)[worst])} unpacks to "
        f"{float(back.reshape(-1)[worst])}, more than a step ({float(step.reshape(-1)[worst]):.3g}) away")
    assert_same(back, want, "unpacked int4")
    assert back[2].eq(5.0).all() and not back[5].any()


def test_int4_bytes_are_a_quarter_of_f16_plus_scales():
    n, k, g = 48, 256, 64
    w = weight(n, k, F16)
    p = pack(INT4(g), w)
    dense = w.numel() * w.element_size()
    assert p["packed"].numel() * p["packed"].element_size() * 4 == dense
    per_group = p["scale"].element_size() + p["zero"].element_size()   # an f16 scale and a u8 zero point
    assert packed_bytes(p) == dense // 4 + n * (k // g) * per_group
    assert packed_bytes(p) < 0.3 * dense


# -- fp8 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F16, F32])
def test_fp8_round_trip_is_e4m3_per_row(dtype):
    w = weight(37, 45, dtype, seed=3, scale=5.0)
    w[2] = 0
    w[4, :5] = torch.tensor([1e-4, -1e-5, 3.0, -7.5, 0.0], dtype=dtype)   # subnormal-range values
    p, back = round_trip(FP8(), w)
    bits, scale, want = expect_fp8(w)
    assert set(p) == {"bits", "scale"}
    assert p["bits"].dtype == torch.uint8 and p["scale"].dtype == F32
    assert torch.equal(p["scale"], scale)
    assert_same(p["bits"], bits, "e4m3 bit patterns")
    assert_same(back, want, "unpacked fp8")
    # the largest magnitude of each row maps to +-448, the largest e4m3 value
    top = p["bits"].view(torch.float8_e4m3fn).float().abs().amax(dim=1)
    assert bool((top[torch.arange(37) != 2] == 448.0).all())
    assert packed_bytes(p) == 37 * 45 + 37 * 4


# -- 2:4 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize("k", [4, 8, 52, 64])
def test_24_keeps_the_two_largest_of_every_four(k, dtype):
    w = weight(7, k, dtype, seed=k)
    if k >= 8:
        w[0, :8] = torch.tensor([1.0, -1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])    # ties: positions 0 and 1
        w[1, :8] = torch.tensor([0.5, 2.0, -2.0, 0.5, 3.0, 0.0, 0.0, -3.0])   # a tie for first; one for second
        w[2, :4] = torch.tensor([0.0, 0.0, 0.0, -1.0])                        # zeros tie for second: position 0
    p, back = round_trip(S24(), w)
    want, keep = expect_24(w)
    assert set(p) == {"values", "meta"}
    assert p["values"].dtype == dtype and p["values"].shape == (7, k // 2)
    assert p["meta"].dtype == torch.uint8 and p["meta"].shape == (7, math.ceil(k / 8))
    # the kept values in position order, and their 2-bit positions: the lower first in a nibble,
    # the even group in the low nibble of a byte
    assert_same(p["values"], torch.gather(w.reshape(7, k // 4, 4), 2, keep).reshape(7, k // 2), "values")
    nib = keep[..., 0] | (keep[..., 1] << 2)
    meta = torch.stack([p["meta"] & 0xF, p["meta"] >> 4], dim=-1).reshape(7, -1)[:, :k // 4]
    assert_same(meta.long(), nib, "meta nibbles")
    if k % 8:
        assert not (p["meta"][:, -1] >> 4).any(), "the padding nibble of an odd group count is 0"
    assert_same(back, want, "unpacked 2:4")
    if k >= 8:
        assert back[0, :8].tolist() == [1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        assert back[1, :8].tolist() == [0.0, 2.0, -2.0, 0.0, 3.0, 0.0, 0.0, -3.0]
        assert back[2, :4].tolist() == [0.0, 0.0, 0.0, -1.0]


@pytest.mark.parametrize("dtype", [F16, F32])
def test_24_of_a_24_weight_is_lossless(dtype):
    n, k = 11, 40
    g = torch.Generator().manual_seed(5)
    dense = torch.randn(n, k, generator=g).to(dtype)
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool)
    for r, gi in itertools.product(range(n), range(k // 4)):
        mask[r, gi, torch.randperm(4, generator=g)[:2]] = True
    w = torch.where(mask.reshape(n, k), dense, torch.zeros_like(dense))
    w[0, :4] = torch.tensor([0.0, 0.0, 0.0, 2.5])         # fewer than two non-zeros in a group
    w[1, :4] = 0
    p, back = round_trip(S24(), w)
    assert_same(back, w, "2:4 weight through 2:4 packing")
    p2, back2 = round_trip(S24(), back)
    assert_same(p2["values"], p["values"], "repacked values")
    assert_same(p2["meta"], p["meta"], "repacked meta")


def test_24_values_are_half_the_weight():
    w = weight(48, 128, F16)
    p = pack(S24(), w)
    assert p["values"].numel() * 2 == w.numel() and p["values"].dtype == w.dtype
    assert packed_bytes(p) == w.numel() * w.element_size() // 2 + 48 * 128 // 8


# -- block-CSR -----------------------------------------------------------------------------------
@pytest.mark.parametrize("block,n,k", [(16, 37, 40), (32, 45, 70), (16, 32, 64), (64, 5, 3)])
def test_block_csr_is_lossless_and_skips_zero_blocks(block, n, k):
    w = weight(n, k, F16, seed=block)
    nb, kb = -(-n // block), -(-k // block)
    zero = torch.zeros(nb, kb, dtype=torch.bool)
    for i, j in itertools.product(range(nb), range(kb)):
        if (i + 2 * j) % 3 == 1:
            zero[i, j] = True
            w[i * block:(i + 1) * block, j * block:(j + 1) * block] = 0
    if nb > 1:
        w[block:2 * block] = 0                    # a whole block row of zeros
        zero[1] = True
    p, back = round_trip(BSR(block), w)
    assert set(p) == {"blocks", "col_idx", "row_ptr"}
    assert_same(back, w, "block-CSR")
    nnz = int((~zero).sum())
    assert p["blocks"].shape == (nnz, block, block) and p["blocks"].dtype == w.dtype
    assert p["col_idx"].dtype == torch.int32 and p["col_idx"].shape == (nnz,)
    assert p["row_ptr"].dtype == torch.int32 and p["row_ptr"].shape == (nb + 1,)
    assert p["row_ptr"].tolist() == [0] + torch.cumsum((~zero).sum(dim=1), 0).tolist()
    # row by row, the non-zero blocks in column order, each holding its part of w (zero-padded)
    padded = torch.zeros(nb * block, kb * block, dtype=w.dtype)
    padded[:n, :k] = w
    rp, ci = p["row_ptr"].tolist(), p["col_idx"].tolist()
    for i in range(nb):
        cols = ci[rp[i]:rp[i + 1]]
        assert cols == [j for j in range(kb) if not zero[i, j]]
        for q, j in zip(range(rp[i], rp[i + 1]), cols):
            assert torch.equal(p["blocks"][q], padded[i * block:(i + 1) * block, j * block:(j + 1) * block])
            assert p["blocks"][q].any()


def test_block_csr_of_an_all_zero_weight_and_a_lone_element_in_the_padding():
    p, back = round_trip(BSR(16), torch.zeros(20, 30, dtype=F16))
    assert p["blocks"].shape == (0, 16, 16) and p["row_ptr"].tolist() == [0, 0, 0]
    assert not back.any() and back.shape == (20, 30)
    w = torch.zeros(20, 30, dtype=F16)
    w[19, 29] = 1.5                                # in the last, partial block
    p, back = round_trip(BSR(16), w)
    assert p["row_ptr"].tolist() == [0, 0, 1] and p["col_idx"].tolist() == [1]
    assert_same(back, w, "one element")


# -- low rank ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize("n,k,rank", [(37, 45, 1), (37, 45, 5), (24, 16, 16), (45, 37, 37)])
def test_lowrank_by_rank_is_the_truncated_svd(n, k, rank, dtype):
    w = weight(n, k, dtype, seed=rank)
    p, back = round_trip(LOWRANK(rank=rank), w)
    assert set(p) == {"u", "v"}
    assert p["u"].shape == (n, rank) and p["v"].shape == (rank, k)
    assert p["u"].dtype == dtype and p["v"].dtype == dtype
    want = truncated_svd(w, rank)
    # equal to the truncated SVD up to the rounding of the factors to the weight's dtype
    assert_close(back, want, TOLERANCES[TORCH_TO_DTYPE[dtype]], f"rank-{rank} unpacked weight")
    err = float((back.double() - w.double()).norm() / w.double().norm())
    best = svd_error(w, rank)
    assert abs(err - best) <= TOLERANCES[TORCH_TO_DTYPE[dtype]].norm    # Eckart-Young: the best rank-r error
    if rank == min(n, k):
        assert_close(back, w.double(), TOLERANCES[TORCH_TO_DTYPE[dtype]], "full rank")


@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize("tol", [0.5, 0.2, 0.05, 0.01])
def test_lowrank_by_tolerance_takes_the_smallest_rank_that_meets_it(tol, dtype):
    w = decaying(40, 56, dtype, seed=1)
    p, back = round_trip(LOWRANK(tol=tol), w)
    r = p["u"].shape[1]
    assert p["v"].shape == (r, 56)
    err = float((back.double() - w.double()).norm() / w.double().norm())
    assert err <= tol, f"tol={tol}: rank {r} gives a relative error of {err:.4g}"
    assert r == 1 or svd_error(w, r - 1) > tol, f"tol={tol}: rank {r - 1} would already do"
    assert_close(back, truncated_svd(w, r), TOLERANCES[TORCH_TO_DTYPE[dtype]], f"tol={tol} rank {r}")


def test_lowrank_tolerances_give_increasing_ranks():
    w = decaying(40, 56, F32, seed=2)
    ranks = [pack(LOWRANK(tol=t), w)["u"].shape[1] for t in (0.5, 0.2, 0.05, 0.01, 0.001)]
    assert ranks == sorted(ranks) and len(set(ranks)) == len(ranks), ranks


@pytest.mark.parametrize("dtype", [F16, F32])
def test_lowrank_tolerance_is_met_by_the_stored_factors_at_the_boundary(dtype):
    """T just above a rank's exact truncation error: the rank qualifies in exact arithmetic, and
    the packed factors must still meet T (by taking a larger rank when rounding spoils it)."""
    misses = []
    for seed in range(20):
        w = weight(24, 40, dtype, seed=100 + seed)
        tol = svd_error(w, 5) * (1 + 1e-9)
        p, back = round_trip(LOWRANK(tol=tol), w)
        err = float((back.double() - w.double()).norm() / w.double().norm())
        if err > tol:
            misses.append((seed, p["u"].shape[1], err, tol))
    assert not misses, f"{len(misses)} of 20 weights miss the tolerance, e.g. {misses[0]}"


# -- plain tensors, through bind ----------------------------------------------------------------
LAYOUT_SPECS = [
    ("@quant(int8)", 45, lambda w: expect_int8(w)[2]),
    ("@quant(int8, act=int8)", 45, lambda w: expect_int8(w)[2]),
    ("@quant(int4, group=32)", 64, lambda w: expect_int4(w, 32)[3]),
    ("@quant(fp8)", 45, lambda w: expect_fp8(w)[2]),
    ("@sparse(2:4)", 52, lambda w: expect_24(w)[0]),
    ("@sparse(block=16)", 45, lambda w: w),
    ("@lowrank(rank=3)", 45, None),
    ("@lowrank(tol=0.3)", 45, None),
]


@pytest.mark.parametrize("annotation,k,expect", LAYOUT_SPECS, ids=[a for a, *_ in LAYOUT_SPECS])
def test_bound_weights_are_plain_dense_tensors_and_unpack_to_the_reference(annotation, k, expect):
    mod = compiled(f"op f(x: f16[M, K], w: f16[N, K] {annotation}) -> f16[M, N] {{ return x @ w.T }}",
                   "layout_pack")
    w = weight(37, k, F16, seed=7)
    w[:16, :16] = 0
    layer = mod.f.bind(w=w)
    bufs = dict(layer.named_buffers())
    assert bufs and all(name.startswith("w_") for name in bufs), list(bufs)
    assert "w" not in bufs, "the dense weight is not kept"
    for name, t in list(bufs.items()) + list(layer.state_dict().items()):
        assert t.layout == torch.strided and not t.is_sparse, f"{name} is {t.layout}"
        assert t.is_contiguous(), name
        assert t.device.type == "cpu"
    assert str(layer.layouts["w"]) == annotation
    dense = layer.unpacked()["w"]
    assert dense.shape == w.shape and dense.dtype == w.dtype and dense.layout == torch.strided
    if expect is not None:
        assert_same(dense, expect(w), f"{annotation} unpacked through bind")
    else:
        r = bufs["w_u"].shape[1]
        assert_close(dense, truncated_svd(w, r), TOLERANCES[DType.f16], f"{annotation} unpacked through bind")
    if annotation.startswith(("@quant", "@sparse(2:4)")):
        assert packed_bytes(bufs) < w.numel() * w.element_size()
