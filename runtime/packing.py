"""Packing dense weights into the layouts of DSL.md (done once, by ``bind``), and unpacking
them back (for tests and the reference). Every packed form is plain tensors.

| layout | tensors (suffix: dtype[shape]) |
| @quant(int8) and @quant(int8, act=int8) | q: i8[N, K], scale: f32[N]; w ~ q * scale (per output row, symmetric) |
| @quant(int4, group=G) | packed: u8[N, K/2] (two per byte), scale: spec dtype[N, K/G], zero: u8[N, K/G]; w ~ (q - zero) * scale |
| @quant(fp8) and @quant(fp8, act=fp8) | bits: u8[N, K] (e4m3 bit patterns), scale: f32[N]; w ~ fp8(bits) * scale |
| @sparse(2:4) | values: spec dtype[N, K/2], meta: u8[N, ceil(K/8)] (2-bit positions) |
| @sparse(block=B) | blocks: spec dtype[nnz, B, B], col_idx: i32[nnz], row_ptr: i32[ceil(N/B) + 1] |
| @lowrank(rank=R or tol=T) | u: spec dtype[N, R] (singular values folded in), v: spec dtype[R, K] |
"""
from __future__ import annotations

import torch

from ..ir.graph import Attrs, Layout
from .binding import CallError

LOWRANK_MAX = 256


def describe(layout: Layout) -> str:
    return str(layout)


def check(layout: Layout, name: str, n: int, k: int) -> None:
    """Impossible requests are errors naming the weight, its size and the layout."""
    where = f"'{name}' [{n}, {k}] with {layout}"
    kind, args, kw = layout.kind, layout.args, dict(layout.kwargs)
    if kind == "quant" and args[0] == "int4":
        if k % 2:
            raise CallError(f"{where}: int4 packs two values per byte along K, but K = {k} is odd "
                            f"(pad the weight to an even K)")
        if k % kw["group"]:
            raise CallError(f"{where}: the group {kw['group']} does not divide K = {k}; choose a group that "
                            f"divides K (groups are not padded)")
    if kind == "sparse" and not kw and k % 4:
        raise CallError(f"{where}: 2:4 sparsity groups K by 4, but K = {k} is not a multiple of 4")
    if kind == "lowrank" and "rank" in kw:
        if kw["rank"] > min(n, k):
            raise CallError(f"{where}: rank {kw['rank']} is above min(N, K) = {min(n, k)}")
        if kw["rank"] > LOWRANK_MAX:
            raise CallError(f"{where}: rank {kw['rank']} is above {LOWRANK_MAX}, the most the fused kernel keeps on chip")


def alignment(layout: Layout, axis: int) -> tuple[int, str]:
    """What a shard of a weight with this layout must be a multiple of along ``axis`` (0: N,
    the rows; 1: K), and why, so that a shard's groups are those of the whole weight: int4
    groups along K, 2:4's groups of four along K, block sparsity's blocks along both. Row scales
    (int8, fp8) and low rank need nothing: each shard gets its own scales or factors (a row
    split's scales then differ from the whole weight's)."""
    kind, args, kw = layout.kind, layout.args, dict(layout.kwargs)
    if kind == "quant" and args[0] == "int4" and axis == 1:
        return kw["group"], f"its groups of {kw['group']} along K"
    if kind == "sparse" and "block" in kw:
        return kw["block"], f"its {kw['block']} x {kw['block']} blocks"
    if kind == "sparse" and axis == 1:
        return 4, "its groups of four along K"
    return 1, ""


def packed_like(layout: Layout, w: torch.Tensor, name: str = "w") -> dict[str, torch.Tensor]:
    """What ``pack`` would store for a weight of ``w``'s shape and dtype, as meta tensors (no
    values): the buffers of an empty bound module that a checkpoint fills. Layouts whose stored
    sizes depend on the values (block sparsity's blocks, low rank by ``tol``, ``@auto``) cannot."""
    n, k = w.shape
    kind, kw = layout.kind, dict(layout.kwargs)
    if kind == "sparse" and "block" in kw:
        raise CallError(f"'{name}' [{n}, {k}] with {layout}: how many blocks it stores depends on the weight's "
                        f"values, so it cannot be bound empty; bind the weight itself")
    if kind == "lowrank":
        if "rank" not in kw:
            raise CallError(f"'{name}' [{n}, {k}] with {layout}: the rank depends on the weight's values, so it "
                            f"cannot be bound empty; give the rank (@lowrank(rank=R)) or bind the weight itself")
        check(layout, name, n, k)
        r = kw["rank"]
        return {"u": torch.empty(n, r, dtype=w.dtype, device="meta"), "v": torch.empty(r, k, dtype=w.dtype, device="meta")}
    return pack(layout, w.to("meta"), name)      # the packing arithmetic on meta tensors: shapes only


def pack(layout: Layout, w: torch.Tensor, name: str = "w") -> dict[str, torch.Tensor]:
    if w.dim() != 2:
        raise CallError(f"'{name}': layouts pack 2-D weights, got shape {list(w.shape)}")
    n, k = w.shape
    check(layout, name, n, k)
    kind, args, kw = layout.kind, layout.args, dict(layout.kwargs)
    if kind == "quant":
        return {"int8": _pack_int8, "int4": _pack_int4, "fp8": _pack_fp8}[args[0]](w, **kw)
    if kind == "sparse":
        return _pack_block(w, kw["block"]) if "block" in kw else _pack_24(w)
    if kind == "lowrank":
        return _pack_lowrank(w, name, **kw)
    raise CallError(f"'{name}': layout {layout} cannot be packed")


def unpack(layout: Layout, t: dict[str, torch.Tensor], shape, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight the kernels compute with (in the spec's dtype)."""
    from ..ir.prims_layout import bsr_dense, unpack_24_ref, unpack_int4_ref
    n, k = shape
    kind, args, kw = layout.kind, layout.args, dict(layout.kwargs)
    if kind == "quant" and args[0] == "int8":
        return (t["q"].float() * t["scale"][:, None]).to(dtype)
    if kind == "quant" and args[0] == "int4":
        g = kw["group"]
        q = unpack_int4_ref(t["packed"]).float()
        scale = t["scale"].float().repeat_interleave(g, dim=1)
        zero = t["zero"].float().repeat_interleave(g, dim=1)
        return ((q - zero) * scale).to(dtype)
    if kind == "quant" and args[0] == "fp8":
        return (t["bits"].view(torch.float8_e4m3fn).float() * t["scale"][:, None]).to(dtype)
    if kind == "sparse" and "block" in kw:
        return bsr_dense(t["blocks"], t["col_idx"], t["row_ptr"], n, k).to(dtype)
    if kind == "sparse":
        return unpack_24_ref(t["values"], t["meta"]).to(dtype)
    if kind == "lowrank":
        return (t["u"].float() @ t["v"].float()).to(dtype)
    raise ValueError(layout)


def packed_bytes(t: dict[str, torch.Tensor]) -> int:
    return sum(x.numel() * x.element_size() for x in t.values())


# -- the layouts --------------------------------------------------------------------------------
def _row_scale(w: torch.Tensor, qmax: float) -> torch.Tensor:
    s = w.float().abs().amax(dim=1) / qmax
    return torch.where(s > 0, s, torch.ones_like(s))


def _pack_int8(w, act=None):
    scale = _row_scale(w, 127.0)
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return {"q": q.contiguous(), "scale": scale.contiguous()}


def _pack_int4(w, group):
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(dim=2).clamp(max=0.0), g.amax(dim=2).clamp(min=0.0)   # the range holds 0: zero in [0, 15]
    scale = (hi - lo) / 15.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(w.dtype).float()  # as stored
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = (torch.round(g / scale[..., None]) + zero[..., None]).clamp(0, 15).to(torch.uint8).reshape(n, k)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
    return {"packed": packed.contiguous(), "scale": scale.to(w.dtype).contiguous(),
            "zero": zero.to(torch.uint8).contiguous()}


FP8_MAX = 448.0


def _pack_fp8(w, act=None):
    scale = _row_scale(w, FP8_MAX)
    bits = (w.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    return {"bits": bits.contiguous(), "scale": scale.contiguous()}


def _pack_24(w):
    """Magnitude pruning: in each group of 4 along K keep the two largest |w| (ties: the lower
    position), in position order; a weight that is already 2:4 packs losslessly."""
    n, k = w.shape
    groups = k // 4
    g = w.reshape(n, groups, 4)
    order = torch.sort(-g.float().abs(), dim=2, stable=True).indices[..., :2]
    keep, _ = torch.sort(order, dim=2)
    values = torch.gather(g, 2, keep).reshape(n, groups * 2)
    nib = (keep[..., 0] | (keep[..., 1] << 2)).to(torch.uint8)       # [n, groups]
    if groups % 2:
        nib = torch.cat([nib, torch.zeros(n, 1, dtype=torch.uint8, device=w.device)], dim=1)
    meta = (nib[:, 0::2] | (nib[:, 1::2] << 4)).to(torch.uint8)
    return {"values": values.contiguous(), "meta": meta.contiguous()}


def _pack_block(w, block):
    """Block-CSR of the non-zero blocks (lossless); N and K are padded to whole blocks."""
    n, k = w.shape
    nb, kb = -(-n // block), -(-k // block)
    padded = torch.zeros(nb * block, kb * block, dtype=w.dtype, device=w.device)
    padded[:n, :k] = w
    tiles = padded.reshape(nb, block, kb, block).permute(0, 2, 1, 3)     # [nb, kb, B, B]
    nonzero = (tiles != 0).flatten(2).any(dim=2)                          # [nb, kb]
    row_ptr = torch.zeros(nb + 1, dtype=torch.int32, device=w.device)
    row_ptr[1:] = torch.cumsum(nonzero.sum(dim=1), 0).to(torch.int32)
    rows, cols = torch.nonzero(nonzero, as_tuple=True)
    return {"blocks": tiles[rows, cols].contiguous(), "col_idx": cols.to(torch.int32).contiguous(),
            "row_ptr": row_ptr}


def lowrank_rank(w: torch.Tensor, tol: float) -> int:
    s = torch.linalg.svdvals(w.double())
    total = float((s * s).sum())
    if total == 0:
        return 1
    tail = torch.flip(torch.cumsum(torch.flip(s * s, [0]), 0), [0])     # tail[r] = sum_{i >= r} s_i^2
    for r in range(1, s.numel() + 1):
        rest = float(tail[r]) if r < s.numel() else 0.0
        if (rest / total) ** 0.5 <= tol:
            return r
    return s.numel()


def _pack_lowrank(w, name, rank=None, tol=None):
    n, k = w.shape
    r = rank if rank is not None else lowrank_rank(w, tol)
    if r > LOWRANK_MAX:
        raise CallError(f"'{name}' [{n}, {k}] with @lowrank(tol={tol}): meeting the tolerance needs rank {r}, "
                        f"above {LOWRANK_MAX}, the most the fused kernel keeps on chip; loosen tol or keep it dense")
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    norm = float(w.double().norm()) or 1.0
    while True:
        packed = {"u": (u[:, :r] * s[:r]).to(w.dtype).contiguous(), "v": vh[:r].to(w.dtype).contiguous()}
        if tol is None:
            return packed
        # check what unpacking gives (factors and product in the weight's dtype), not the SVD
        err = float((unpack(Layout("lowrank", (), Attrs({"tol": tol})), packed, (n, k), w.dtype).double()
                     - w.double()).norm()) / norm
        if err <= tol:
            return packed
        if r >= min(n, k) or r >= LOWRANK_MAX:
            raise CallError(f"'{name}' [{n}, {k}] with @lowrank(tol={tol}): the stored factors miss the "
                            f"tolerance even at rank {r} (error {err:.2e}; {w.dtype} rounding); loosen tol")
        r += 1
