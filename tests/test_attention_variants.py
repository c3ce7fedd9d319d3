"""Attention as users write it (issue 14): positions, logical masks and score changes in one
flash kernel, and the key tiles a mask of positions skips.

Each variant is compared with ``scaled_dot_product_attention`` (or torch written out, for
soft-capping) given the equivalent explicit mask or bias, through the interpreter, at sizes that
are not multiples of the tiles, in f32 and f16; and each is one kernel of the plan.
"""
from __future__ import annotations

import math

import re

import pytest
import torch
import torch.nn.functional as F

from opforge.passes.lower_flash import Flash
from opforge.passes.mask_range import key_range_of, tile_count
from opforge.runtime.tolerances import TOLERANCES, assert_close
from opforge.ir.types import DType

from .kernel_helpers import compiled

DTYPES = {"f32": (torch.float32, DType.f32), "f16": (torch.float16, DType.f16)}


def positions(s: int, t: int):
    return torch.arange(s)[:, None], torch.arange(t)[None, :]


def flash_group(op):
    """The plan has one kernel, and it is the flash kernel of the general form."""
    assert op.kernel_count == 1, [g.kind for g in op.fused.groups]
    (grp,) = op.fused.groups
    assert grp.kind == "flash"
    assert any(n.op == "flash_attention_mod" for n in grp.nodes)
    return grp


def check(out, ref, dtype: str, what: str):
    assert_close(out.double(), ref.double(), TOLERANCES[DTYPES[dtype][1]], what)


def rand(*shape, dtype="f32", seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(*shape, generator=g).to(DTYPES[dtype][0])


SWA = """
op swa(q: $T[B, H, S, E], k: $T[B, H, T, E], v: $T[B, H, T, E], w: i64) -> $T[B, H, S, E] {
    i = arange(S)[:, None] + (T - S)
    j = arange(T)[None, :]
    s = (q @ k.T) * 0.3
    return softmax(where(j <= i & j > i - w, s, -inf), axis=-1) @ v
}
"""


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("S, T, w", [(37, 37, 5), (19, 45, 11), (1, 70, 16)])
def test_sliding_window_is_one_kernel_and_matches_sdpa(dtype, S, T, w):
    op = compiled(SWA.replace("$T", dtype), "swa").swa
    grp = flash_group(op)
    B, H, E = 2, 3, 12
    q, k, v = rand(B, H, S, E, dtype=dtype), rand(B, H, T, E, dtype=dtype, seed=1), rand(B, H, T, E, dtype=dtype, seed=2)
    i, j = positions(S, T)
    i = i + (T - S)
    mask = (j <= i) & (j > i - w)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=0.3)
    check(op(q, k, v, w), ref, dtype, f"sliding window {w} at S={S}, T={T}")
    assert "keys bounded by" in next(k for k in op.plan.kernels).doc or grp


SOFTCAP_GQA = """
op gemma(q: $T[B, G, R, S, E], k: $T[B, G, 1, S, E], v: $T[B, G, 1, S, E], cap: f32) -> $T[B, G, R, S, E] {
    s = (q @ k.T) * rsqrt(cast(E, f32))
    return softmax(where(causal(S, S), tanh(s / cap) * cap, -inf), axis=-1) @ v
}
"""


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_softcapped_grouped_query_attention(dtype):
    op = compiled(SOFTCAP_GQA.replace("$T", dtype), "gemma").gemma
    flash_group(op)
    B, G, R, S, E, cap = 2, 2, 3, 29, 16, 2.0       # a small cap: the tanh really bends the scores
    q = rand(B, G, R, S, E, dtype=dtype)
    k, v = rand(B, G, 1, S, E, dtype=dtype, seed=1), rand(B, G, 1, S, E, dtype=dtype, seed=2)
    s = q.double() @ k.double().transpose(-2, -1) / math.sqrt(E)
    s = torch.tanh(s / cap) * cap
    i, j = positions(S, S)
    ref = torch.softmax(torch.where(j <= i, s, -math.inf), -1) @ v.double()
    check(op(q, k, v, cap), ref, dtype, "soft-capped GQA")


ALIBI = """
op alibi(q: $T[B, H, S, E], k: $T[B, H, S, E], v: $T[B, H, S, E], slopes: $T[H]) -> $T[B, H, S, E] {
    i = arange(S)[:, None]
    j = arange(S)[None, :]
    s = (q @ k.T) * rsqrt(cast(E, f32)) + slopes[:, None, None] * cast(j - i, $T)
    return softmax(where(j <= i, s, -inf), axis=-1) @ v
}
"""


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_alibi_bias_from_positions_and_a_per_head_vector(dtype):
    op = compiled(ALIBI.replace("$T", dtype), "alibi").alibi
    flash_group(op)
    B, H, S, E = 1, 4, 41, 8
    q, k, v = (rand(B, H, S, E, dtype=dtype, seed=s) for s in range(3))
    slopes = (2.0 ** (-8.0 * torch.arange(1, H + 1) / H)).to(DTYPES[dtype][0])
    i, j = positions(S, S)
    bias = torch.where(j <= i, slopes.double()[:, None, None] * (j - i), -math.inf)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=bias)
    check(op(q, k, v, slopes), ref, dtype, "ALiBi")


BIAS_TENSOR = """
op rel(q: $T[B, H, S, E], k: $T[B, H, S, E], v: $T[B, H, S, E], bias: $T[H, S, S], scale: f32) -> $T[B, H, S, E] {
    return softmax(q @ k.T * scale + bias, axis=-1) @ v
}
"""


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_a_bias_tensor_indexed_by_head_and_positions(dtype):
    op = compiled(BIAS_TENSOR.replace("$T", dtype), "rel").rel
    flash_group(op)
    B, H, S, E = 2, 3, 23, 8
    q, k, v = (rand(B, H, S, E, dtype=dtype, seed=s) for s in range(3))
    bias = rand(H, S, S, dtype=dtype, seed=7)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=bias.double(), scale=0.5)
    check(op(q, k, v, bias, 0.5), ref, dtype, "T5-style bias tensor")


DOCS = """
op docs(q: $T[B, H, S, E], k: $T[B, H, S, E], v: $T[B, H, S, E], doc: i64[B, S]) -> $T[B, H, S, E] {
    i = arange(S)[:, None]
    j = arange(S)[None, :]
    same = doc[:, None, :, None] == doc[:, None, None, :]
    return softmax(where(same & (j <= i), q @ k.T, -inf), axis=-1) @ v
}
"""


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_packed_documents_mask_from_data(dtype):
    op = compiled(DOCS.replace("$T", dtype), "docs").docs
    grp = flash_group(op)
    B, H, S, E = 2, 2, 50, 8
    q, k, v = (rand(B, H, S, E, dtype=dtype, seed=s) for s in range(3))
    doc = torch.sort(torch.randint(0, 5, (B, S), generator=torch.Generator().manual_seed(3)), -1).values
    i, j = positions(S, S)
    mask = (doc[:, None, :, None] == doc[:, None, None, :]) & (j <= i)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=1.0)
    check(op(q, k, v, doc), ref, dtype, "packed documents")
    # the causal half still bounds the keys; the document half is evaluated per tile
    kr = key_range_of(next(n for n in grp.nodes if n.op == "flash_attention_mod").inputs[0],
                      op.fused.graph.producers())
    assert kr is not None and kr.lo is None and kr.hi is not None


DECODE = """
op dec(q: $T[B, H, 1, E], k: $T[B, H, T, E], v: $T[B, H, T, E], lens: i64[B]) -> $T[B, H, 1, E] {
    j = arange(T)[None, :]
    return softmax(where(j < lens[:, None, None, None], q @ k.T * 0.25, -inf), axis=-1) @ v
}
"""


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_decode_over_a_kv_cache_with_lengths_on_the_split_kv_path(dtype):
    op = compiled(DECODE.replace("$T", dtype), "dec").dec
    flash_group(op)
    B, H, T, E = 3, 2, 300, 16
    q = rand(B, H, 1, E, dtype=dtype)
    k, v = rand(B, H, T, E, dtype=dtype, seed=1), rand(B, H, T, E, dtype=dtype, seed=2)
    lens = torch.tensor([1, 137, 300])
    mask = torch.arange(T)[None, :] < lens[:, None, None, None]
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=0.25)
    check(op(q, k, v, lens), ref, dtype, "decode with lengths")
    names = [kn.name for kn in op.plan.kernels]
    assert any("splitkv" in n for n in names), names     # the flash-decoding alternative exists
    # the lengths bound the key loop: tiles past lens[b] are never loaded; the whole tiles below
    # lens[b] run without the mask, only the last one is masked
    src = op.stage_text("triton")
    assert "hi = tl.minimum(lens_tile, " in src
    full = src[src.index("def dec_k0_flash_attention_mod("):]
    assert "kept_hi = tl.maximum(kept_lo, " in full and "// BLOCK_N * BLOCK_N" in full
    assert re.search(r"for start_n_1 in range\(kv_kept, kept_hi, BLOCK_N\):", full), full
    assert "for start_n_2 in range(kv_rest, hi, BLOCK_N):" in full
    unmasked = full[full.index("stage 2:"):full.index("stage 3:")]
    assert "float(\"-inf\"))" not in unmasked.split("online softmax")[0] and "cols_1 < T" not in unmasked
    text = op.explain(sizes={"B": 1, "H": 1, "T": 1000, "E": 16})
    assert "[0, lens)" in text and "depend on the values of lens" in text


def test_finite_fill_is_a_score_change_not_a_mask():
    src = """
op ff(q: f32[S, E], k: f32[T, E], v: f32[T, E]) -> f32[S, E] {
    return softmax(where(causal(S, T), q @ k.T, -1e4), axis=-1) @ v
}"""
    op = compiled(src, "ff").ff
    grp = flash_group(op)
    S, T, E = 7, 9, 16
    q, k, v = rand(S, E), rand(T, E, seed=1), rand(T, E, seed=2)
    i, j = positions(S, T)
    s = torch.where(j <= i + T - S, q.double() @ k.double().T, -1e4)
    check(op(q, k, v), torch.softmax(s, -1) @ v.double(), "f32", "finite fill")
    node = next(n for n in grp.nodes if n.op == "flash_attention_mod")
    assert key_range_of(node.inputs[0], op.fused.graph.producers()) is None   # -1e4 skips nothing


# -- tile skipping ------------------------------------------------------------------------------
WINDOW = """
op win(q: f32[S, E], k: f32[S, E], v: f32[S, E]) -> f32[S, E] {
    i = arange(S)[:, None]
    j = arange(S)[None, :]
    return softmax(where(j <= i & j > i - 64, q @ k.T, -inf), axis=-1) @ v
}
"""


def analytic_window_tiles(S: int, W: int, BM: int, BN: int) -> int:
    """Key tiles that hold at least one key some row of the block sees (aligned to BN)."""
    n = 0
    for i0 in range(0, S, BM):
        i1 = min(i0 + BM, S) - 1
        lo, hi = max(i0 - W + 1, 0), i1 + 1
        n += len(range(lo // BN, math.ceil(hi / BN)))
    return n


@pytest.mark.parametrize("BM, BN", [(128, 64), (64, 64), (16, 16)])
def test_a_sliding_window_of_64_over_1024_computes_the_analytic_tile_count(BM, BN):
    op = compiled(WINDOW, "win").win
    grp = flash_group(op)
    node = next(n for n in grp.nodes if n.op == "flash_attention_mod")
    kr = key_range_of(node.inputs[0], op.fused.graph.producers())
    done, total = tile_count(kr, 1024, 1024, BM, BN, {"S": 1024})
    assert total == math.ceil(1024 / BM) * math.ceil(1024 / BN)
    assert done == analytic_window_tiles(1024, 64, BM, BN)
    assert done < total / 4          # e.g. 23 of 128 at 128 x 64, not S x S / tile^2
    text = op.explain(sizes={"S": 1024, "E": 16})
    assert "== attention ==" in text and "tiles computed at S=1024, T=1024, BLOCK_M=128, BLOCK_N=64: 23 of 128" in text


def test_the_kernel_loops_over_the_bounded_range_and_stays_right_at_long_sizes():
    """The generated loop starts and stops at the bounds (tiles outside are never loaded), and
    the result at S = 400 (several windows) through the interpreter is SDPA's."""
    op = compiled(WINDOW, "win").win
    src = op.stage_text("triton")
    full = src[src.index("def win_k0_flash_attention_mod("):]
    # [lo, kept_lo) and [kept_hi, hi) masked, [kept_lo, kept_hi) (every row keeps it) unmasked
    assert "for start_n in range(lo, kept_lo, BLOCK_N):" in full
    assert "for start_n_2 in range(kv_rest, hi, BLOCK_N):" in full
    assert "lo = " in src and "hi = " in src
    S, E = 400, 16
    q, k, v = rand(S, E), rand(S, E, seed=1), rand(S, E, seed=2)
    i, j = positions(S, S)
    ref = F.scaled_dot_product_attention(q.double()[None], k.double()[None], v.double()[None],
                                         attn_mask=(j <= i) & (j > i - 64), scale=1.0)[0]
    check(op(q, k, v), ref, "f32", "window 64 at S=400")


@pytest.mark.parametrize("mask, torch_mask, expect", [
    ("j <= i", "j <= i", (None, "i_last + 1")),
    ("j < i + 1 & j >= i - 7", "(j < i + 1) & (j >= i - 7)", ("i_first - 7", "i_last + 1")),
    ("j < 5 | j <= i", "(j < 5) | (j <= i)", (None, "max(5, i_last + 1)")),     # a prefix of 5 keys, then causal
    ("i // 8 == j // 8", "i // 8 == j // 8", ("i_first // 8 * 8", "(i_last // 8 + 1) * 8")),   # chunks of 8
    ("i - 3 < j & j <= i", "(i - 3 < j) & (j <= i)", ("i_first - 3 + 1", "i_last + 1")),   # j on the right
    ("~(j > i)", "~(j > i)", None),                                # ~ bounds nothing
    ("j != i", "j != i", None),
])
def test_key_ranges_read_from_masks(mask, torch_mask, expect):
    src = f"""
op m(q: f32[S, E], k: f32[S, E], v: f32[S, E]) -> f32[S, E] {{
    i = arange(S)[:, None]
    j = arange(S)[None, :]
    return softmax(where({mask}, q @ k.T, -inf), axis=-1) @ v
}}"""
    op = compiled(src, "kr").m
    grp = flash_group(op)
    node = next(n for n in grp.nodes if n.op == "flash_attention_mod")
    kr = key_range_of(node.inputs[0], op.fused.graph.producers())
    if expect is None:
        assert kr is None
    else:
        lo, hi = expect
        assert kr.text == f"[{lo or '0'}, {hi})", kr.text
    # and whatever the range, the kernel is right (a range is a superset of the kept keys)
    S, E = 45, 8
    q, k, v = rand(S, E), rand(S, E, seed=1), rand(S, E, seed=2)
    i, j = positions(S, S)
    m = eval(torch_mask, {"i": i, "j": j})
    ref = F.scaled_dot_product_attention(q.double()[None], k.double()[None], v.double()[None],
                                         attn_mask=m, scale=1.0)[0]
    check(op(q, k, v), ref, "f32", mask)


def swa_key_range():
    """The key range of the sliding-window example's scores."""
    op = compiled(SWA.replace("$T", "f32"), "swa").swa
    node = next(n for n in flash_group(op).nodes if n.op == "flash_attention_mod")
    return key_range_of(node.inputs[0], op.fused.graph.producers())


def test_tile_counts_are_supersets_of_the_kept_keys_for_random_windows():
    """For every row block, the range holds every key the mask keeps (checked against the mask
    itself), for windows and offsets that are not multiples of anything."""
    kr = swa_key_range()
    from opforge.passes.mask_range import IntOps
    for S, T, w, BM in [(37, 37, 5, 16), (19, 45, 11, 8), (100, 130, 33, 32), (5, 5, 100, 4)]:
        i, j = positions(S, T)
        keep = (j <= i + (T - S)) & (j > i + (T - S) - w)
        ops = IntOps({"S": S, "T": T}, {"w": w})
        for i0 in range(0, S, BM):
            lo, hi = kr.bounds(ops, i0, min(i0 + BM, S) - 1, T)
            cols = keep[i0:i0 + BM].any(0).nonzero().flatten()
            if len(cols):
                assert lo <= int(cols.min()) and int(cols.max()) < hi, (S, T, w, i0, lo, hi)


def test_keys_kept_by_every_row_are_exactly_those_of_the_mask():
    """Where every condition is read exactly, the keys every row of a block keeps (the tiles
    that run without the mask) are a subset of what each row keeps, and equal to their
    intersection, for windows and offsets that are not multiples of anything."""
    kr = swa_key_range()
    assert kr.inner is not None
    from opforge.passes.mask_range import IntOps
    for S, T, w, BM in [(37, 37, 5, 16), (19, 45, 11, 8), (100, 130, 33, 32), (5, 5, 100, 4), (64, 64, 1, 16)]:
        i, j = positions(S, T)
        keep = (j <= i + (T - S)) & (j > i + (T - S) - w)
        ops = IntOps({"S": S, "T": T}, {"w": w})
        for i0 in range(0, S, BM):
            lo, hi = kr.kept_by_all(ops, i0, min(i0 + BM, S) - 1, T)
            cols = keep[i0:i0 + BM].all(0).nonzero().flatten()
            got = set(range(lo, hi)) if hi > lo else set()
            assert got == set(cols.tolist()), (S, T, w, i0, lo, hi)


@pytest.mark.parametrize("mask, torch_mask, exact", [
    ("j <= i", "j <= i", True),
    ("j < i + 1 & j >= i - 7", "(j < i + 1) & (j >= i - 7)", True),
    ("i // 8 == j // 8", "i // 8 == j // 8", True),
    ("j < 5 | j <= i", "(j < 5) | (j <= i)", False),
    ("j <= i & doc[:, None] == doc[None, :]", "(j <= i) & (doc[:, None] == doc[None, :])", False),
])
def test_only_exactly_read_masks_get_unmasked_tiles(mask, torch_mask, exact):
    """A mask with | or a condition on data keeps the mask on every tile it computes."""
    src = f"""
op m(q: f32[S, E], k: f32[S, E], v: f32[S, E], doc: i64[S]) -> f32[S, E] {{
    i = arange(S)[:, None]
    j = arange(S)[None, :]
    return softmax(where({mask}, q @ k.T, -inf), axis=-1) @ v
}}"""
    op = compiled(src, "exact").m
    node = next(n for n in flash_group(op).nodes if n.op == "flash_attention_mod")
    kr = key_range_of(node.inputs[0], op.fused.graph.producers())
    assert (kr is not None and kr.inner is not None) == exact
    assert ("stage 2: the blocks every row keeps, unmasked" in op.stage_text("triton")) == exact
    S, E = 45, 8
    q, k, v = rand(S, E), rand(S, E, seed=1), rand(S, E, seed=2)
    doc = torch.tensor([0] * 10 + [1] * 20 + [2] * 15)
    i, j = positions(S, S)
    m = eval(torch_mask, {"i": i, "j": j, "doc": doc})
    ref = F.scaled_dot_product_attention(q.double()[None], k.double()[None], v.double()[None],
                                         attn_mask=m, scale=1.0)[0]
    check(op(q, k, v, doc), ref, "f32", mask)


def test_explain_names_the_scores_and_the_unbounded_case():
    op = compiled(DOCS.replace("$T", "f32"), "docs").docs
    text = op.explain(sizes={"B": 1, "H": 1, "S": 256, "E": 8})
    assert "scores from the spec, evaluated per tile" in text
    assert "tiles computed at S=256, T=256" in text
    op = compiled(BIAS_TENSOR.replace("$T", "f32"), "rel").rel
    assert "keys: all (no mask made of positions bounds them)" in op.explain()


# -- gradients ----------------------------------------------------------------------------------
def test_gradients_of_a_score_changed_attention_match_torch():
    """The general form's backward (unfused for now) gives torch's gradients."""
    op = compiled(SOFTCAP_GQA.replace("$T", "f32"), "gemma").gemma
    B, G, R, S, E, cap = 1, 2, 2, 13, 8, 1.5
    q = rand(B, G, R, S, E).requires_grad_()
    k = rand(B, G, 1, S, E, seed=1).requires_grad_()
    v = rand(B, G, 1, S, E, seed=2).requires_grad_()
    do = rand(B, G, R, S, E, seed=3)
    (op(q, k, v, cap) * do).sum().backward()
    q2, k2, v2 = (x.detach().double().requires_grad_() for x in (q, k, v))
    s = torch.tanh(q2 @ k2.transpose(-2, -1) / math.sqrt(E) / cap) * cap
    i, j = positions(S, S)
    o = torch.softmax(torch.where(j <= i, s, -math.inf), -1) @ v2
    (o * do.double()).sum().backward()
    for a, b, name in ((q, q2, "q"), (k, k2, "k"), (v, v2, "v")):
        check(a.grad, b.grad, "f32", f"d{name}")


def test_float64_gradcheck_of_a_windowed_biased_attention():
    import opforge
    from .kernel_helpers import unique_namespace
    src = """
op g(q: f32[S, E], k: f32[S, E], v: f32[S, E], bias: f32[S, S]) -> f32[S, E] {
    i = arange(S)[:, None]
    j = arange(S)[None, :]
    return softmax(where(j <= i & j > i - 3, q @ k.T + bias, -inf), axis=-1) @ v
}"""
    op = opforge.compile(src, namespace=unique_namespace("gc"), dtype=DType.f64).g
    S, E = 6, 3
    args = [rand(S, E, seed=s).double().requires_grad_() for s in range(3)] + [rand(S, S, seed=4).double().requires_grad_()]
    assert torch.autograd.gradcheck(lambda *a: op(*a), args, eps=1e-6, atol=1e-5)


def test_flash_class_reads_the_general_form():
    op = compiled(WINDOW, "win").win
    fl = Flash(op.fused, op.fused.groups[0])
    assert fl.mod and fl.range is not None and fl.mm.op == "matmul"


# -- the language: positions and logical operators ----------------------------------------------
def _graph_text(body: str) -> str:
    from opforge.frontend import load_program
    from opforge.ir.printer import print_graph
    src = f"op f(x: f32[S, T], w: i64) -> bool[S, T] {{\n    i = arange(S)[:, None]\n    j = arange(T)[None, :]\n    return {body}\n}}\n"
    return print_graph(load_program(src).graphs["f"])


@pytest.mark.parametrize("loose, grouped", [
    ("j <= i & j > i - w", "(j <= i) & (j > (i - w))"),
    ("j < 2 | j <= i & j > i - w", "(j < 2) | ((j <= i) & (j > i - w))"),
    ("~(j > i) & j < w | x > 0.0", "((~(j > i)) & (j < w)) | (x > 0.0)"),
    ("i // 4 == j // 4", "(i // 4) == (j // 4)"),
])
def test_logical_operators_bind_more_loosely_than_comparisons(loose, grouped):
    assert _graph_text(loose) == _graph_text(grouped)


def test_positions_and_logic_evaluate_like_torch():
    src = """
op f(x: f32[S, T], w: i64) -> f32[S, T] {
    i = arange(S)[:, None]
    j = arange(T)[None, :]
    keep = j <= i & j > i - w | ~(i // 3 != (j - 7) // 3)
    return where(keep, x, 0.0)
}"""
    op = compiled(src, "logic").f
    S, T, w = 11, 17, 4
    x = rand(S, T)
    i, j = positions(S, T)
    keep = ((j <= i) & (j > i - w)) | ~(torch.div(i, 3, rounding_mode="floor") != torch.div(j - 7, 3, rounding_mode="floor"))
    assert torch.equal(op(x, w), torch.where(keep, x, 0.0))


# -- grouped-query attention ---------------------------------------------------------------------
GQA_DECODE = """
op gqa_dec(q: $T[B, G, R, 1, E], k: $T[B, G, 1, T, E], v: $T[B, G, 1, T, E], lens: i64[B]) -> $T[B, G, R, 1, E] {
    j = arange(T)[None, :]
    return softmax(where(j < lens[:, None, None, None, None], q @ k.T * 0.25, -inf), axis=-1) @ v
}
"""
GQA_PLAIN = """
op gqa(q: $T[B, G, R, S, E], k: $T[B, G, 1, S, E], v: $T[B, G, 1, S, E]) -> $T[B, G, R, S, E] {
    return softmax(where(causal(S, S), q @ k.T * 0.3, -inf), axis=-1) @ v
}
"""


def _k_loads_ignore_the_head(op):
    """Every kernel that loads k addresses it without the query head: one read per group."""
    src = op.stage_text("triton")
    loads = [l for l in src.splitlines() if "tl.load(k_ptr" in l]
    assert loads and all("head" not in l for l in loads), loads
    assert "row = position * R + head" in src


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_gqa_decode_folds_the_query_heads_of_a_group_into_one_tile(dtype):
    op = compiled(GQA_DECODE.replace("$T", dtype), "gqa_dec").gqa_dec
    flash_group(op)
    _k_loads_ignore_the_head(op)
    B, G, R, T, E = 2, 2, 8, 200, 16
    q = rand(B, G, R, 1, E, dtype=dtype)
    k, v = rand(B, G, 1, T, E, dtype=dtype, seed=1), rand(B, G, 1, T, E, dtype=dtype, seed=2)
    lens = torch.tensor([77, 200])
    mask = torch.arange(T) < lens[:, None, None, None, None]
    ref = F.scaled_dot_product_attention(q.double(), k.double().expand(B, G, R, T, E),
                                         v.double().expand(B, G, R, T, E), attn_mask=mask, scale=0.25)
    check(op(q, k, v, lens), ref, dtype, "GQA decode")


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_gqa_in_the_plain_form_folds_too_and_its_gradients_hold(dtype):
    op = compiled(GQA_PLAIN.replace("$T", dtype), "gqa").gqa
    (grp,) = op.fused.groups
    assert grp.kind == "flash"
    _k_loads_ignore_the_head(op)
    B, G, R, S, E = 1, 2, 3, 21, 8
    q = rand(B, G, R, S, E, dtype=dtype).requires_grad_()
    k, v = (rand(B, G, 1, S, E, dtype=dtype, seed=s).requires_grad_() for s in (1, 2))
    i, j = positions(S, S)
    q2, k2, v2 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = F.scaled_dot_product_attention(q2, k2.expand(B, G, R, S, E), v2.expand(B, G, R, S, E),
                                         attn_mask=j <= i, scale=0.3)
    out = op(q, k, v)
    check(out, ref, dtype, "GQA plain")
    do = rand(B, G, R, S, E, seed=9)
    (out.double() * do.double()).sum().backward()
    (ref * do.double()).sum().backward()
    for a, b, name in ((q, q2, "q"), (k, k2, "k"), (v, v2, "v")):
        check(a.grad, b.grad, dtype, f"GQA d{name}")


def test_a_prefix_lm_with_a_prefix_length_per_batch_row():
    """j < plen[b] | j <= i: the hull of a data bound and a position bound, per program."""
    src = """
op plm(q: f32[B, S, E], k: f32[B, S, E], v: f32[B, S, E], plen: i64[B]) -> f32[B, S, E] {
    i = arange(S)[:, None]
    j = arange(S)[None, :]
    return softmax(where(j < plen[:, None, None] | j <= i, q @ k.T, -inf), axis=-1) @ v
}"""
    op = compiled(src, "plm").plm
    grp = flash_group(op)
    node = next(n for n in grp.nodes if n.op == "flash_attention_mod")
    kr = key_range_of(node.inputs[0], op.fused.graph.producers())
    assert kr.text == "[0, max(plen, i_last + 1))", kr.text
    B, S, E = 3, 70, 8
    q, k, v = rand(B, S, E), rand(B, S, E, seed=1), rand(B, S, E, seed=2)
    plen = torch.tensor([1, 33, 70])
    i, j = positions(S, S)
    mask = (j < plen[:, None, None]) | (j <= i)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=1.0)
    check(op(q, k, v, plen), ref, "f32", "prefix LM")


# -- the benchmark baselines compute what the specs compute ----------------------------------------
def test_the_attention_benchmark_baselines_agree_with_eager_on_the_cpu():
    """FlexAttention (uncompiled here: on the GPU the harness compiles it) and SDPA as the
    benchmarks call them give the eager result, so a GPU run compares like with like."""
    import warnings
    from torch.nn.attention.flex_attention import flex_attention
    from opforge.benchmarks import workloads as W
    saved = W._FLEX.copy()
    W._FLEX.clear()
    W._FLEX["fn"] = flex_attention
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q, k, v = (rand(1, 4, 64, 16, seed=s) for s in range(3))
            for fn in (W._window_sdpa, W._window_flex):
                check(fn(q, k, v, 8), W._window_eager(q, k, v, 8), "f32", fn.__name__)
            for fn in (W._alibi_sdpa, W._alibi_flex):
                check(fn(q, k, v), W._alibi_eager(q, k, v), "f32", fn.__name__)
            qg = rand(1, 2, 2, 64, 16)
            kg, vg = rand(1, 2, 1, 64, 16, seed=1), rand(1, 2, 1, 64, 16, seed=2)
            check(W._softcap_flex(qg, kg, vg, 5.0), W._softcap_eager(qg, kg, vg, 5.0), "f32", "softcap flex")
            qd = rand(2, 2, 4, 1, 16)
            kd, vd = rand(2, 2, 1, 100, 16, seed=1), rand(2, 2, 1, 100, 16, seed=2)
            lens = torch.tensor([30, 100])
            check(W._gqa_decode_sdpa(qd, kd, vd, lens), W._gqa_decode_eager(qd, kd, vd, lens), "f32", "gqa sdpa")
    finally:
        W._FLEX.clear()
        W._FLEX.update(saved)
