"""``@auto(tol=T)`` (issue 5): the layout chosen when the weight is bound.

The rule (DSL.md, runtime/autolayout.py): every candidate layout is packed and run on
calibration inputs (the caller's, else seeded random ones); its error is the relative Frobenius
distance of the op's output from the dense weight's; a candidate over T is never chosen; of the
rest (dense always qualifies) the fastest wins (on the CPU, an estimate from bytes and FLOPs).
The report of every candidate is kept and shown by ``layer.explain()``.
"""
from __future__ import annotations

import io
import re

import pytest
import torch

from opforge.runtime.reference import run_graph
from opforge.runtime.tolerances import assert_close, tolerance_for

from .kernel_helpers import compiled

F16 = torch.float16
ROW = re.compile(r"^(?P<layout>\S.*?)\s+(?P<err>\d\.\d\de[+-]\d+)\s+(?P<us>\S+)\s+(?P<bytes>\d+)"
                 r"(?P<mark>  <- chosen|  over tol)?$")


def spec(tol: str, bias: bool = False) -> str:
    b = ", b: f16[N]" if bias else ""
    return (f"op f(x: f16[M, K], w: f16[N, K] @auto(tol={tol}){b}) -> f16[M, N] {{\n"
            f"    return x @ w.T{' + b' if bias else ''}\n}}\n")


def rows(layer, name="w"):
    """The candidates' rows of the report: {layout text: (error, mark)}."""
    out = {}
    lines = layer.report[name]
    assert lines[0].split()[:3] == ["layout", "rel", "error"], lines[0]
    for line in lines[1:]:
        if line.startswith("("):
            continue
        m = ROW.match(line)
        assert m, f"unparsed report row {line!r}"
        out[m["layout"]] = (float(m["err"]), (m["mark"] or "").strip())
    return out


def chosen_text(layer, name="w"):
    lay = layer.layouts[name]
    return "dense" if lay is None else str(lay)


def check_report(layer, tol: float):
    """The table agrees with the choice: one row chosen (the bound layout), within tol; every row
    over tol is marked so and not chosen."""
    table = rows(layer)
    assert "dense" in table
    chosen = [k for k, (_, mark) in table.items() if mark == "<- chosen"]
    assert chosen == [chosen_text(layer)], (chosen, chosen_text(layer), table)
    for layout, (err, mark) in table.items():
        assert (err > tol) == (mark == "over tol"), (layout, err, mark)
    assert table[chosen[0]][0] <= tol
    return table


def output_error(mod, layer, x, weights, extra=None):
    """The bound layer's relative Frobenius error against the dense weight's float64 output."""
    values = {"x": x, **weights, **(extra or {})}
    n, k = weights["w"].shape
    dense = run_graph(mod.f.graph, values, {"M": x.shape[0], "K": k, "N": n}, check=True)[0]
    y = layer(x, **(extra or {}))
    return float((y.double() - dense).norm() / dense.norm()), y, dense


def test_a_tiny_tolerance_keeps_the_weight_dense():
    mod = compiled(spec("1e-6"), "auto_tiny")
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(0)).to(F16)
    layer = mod.f.bind(w=w)
    assert layer.layouts["w"] is None
    table = check_report(layer, 1e-6)
    assert len(table) >= 5, table                      # int8, fp8, int4, 2:4 at least were tried
    assert all(mark == "over tol" for k, (_, mark) in table.items() if k != "dense")
    assert torch.equal(layer.w, w), "dense keeps the weight as it is"
    x = torch.randn(7, 64, dtype=F16)
    ref = run_graph(mod.f.graph, {"x": x, "w": w}, {"M": 7, "K": 64, "N": 48}, check=True)[0]
    assert_close(layer(x), ref, tolerance_for(mod.f.graph, layouts=layer.layouts), "dense @auto")


@pytest.mark.parametrize("tol", ["0.02", "0.3"])
def test_a_loose_tolerance_picks_a_compressed_layout_within_it(tol):
    mod = compiled(spec(tol, bias=True), "auto_loose")
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 64, generator=g).to(F16)
    b = torch.randn(48, generator=g).to(F16)
    x_cal = torch.randn(16, 64, generator=g).to(F16)
    layer = mod.f.bind(w=w, calibration={"x": x_cal, "b": b})
    assert layer.layouts["w"] is not None, layer.report["w"]
    assert layer.free == ["x", "b"]
    table = check_report(layer, float(tol))
    # the chosen layout's actual error on the calibration inputs is the reported one, within tol
    err, _, _ = output_error(mod, layer, x_cal, {"w": w}, {"b": b})
    reported = table[chosen_text(layer)][0]
    assert err <= float(tol)
    assert err == pytest.approx(reported, rel=1e-2, abs=1e-12)
    # the errors reported for the others match binding them explicitly
    for text, (rep, _) in table.items():
        if text == "dense":
            continue
        explicit = compiled(spec(tol, bias=True).replace(f"@auto(tol={tol})", text), "auto_explicit")
        lay = explicit.f.bind(w=w)
        e, _, _ = output_error(explicit, lay, x_cal, {"w": w}, {"b": b})
        assert e == pytest.approx(rep, rel=1e-2)


def test_the_fastest_layout_within_tolerance_is_chosen():
    """On the CPU the times are estimates; the chosen row's is the least of the rows within tol."""
    mod = compiled(spec("0.5"), "auto_fastest")
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(2)).to(F16)
    layer = mod.f.bind(w=w)
    check_report(layer, 0.5)
    times = {}
    for line in layer.report["w"][1:]:
        m = ROW.match(line)
        if m and m["mark"] != "  over tol":
            times[m["layout"]] = float(m["us"])
    assert times[chosen_text(layer)] == min(times.values()), (times, chosen_text(layer))
    assert chosen_text(layer) != "dense" and times["dense"] > min(times.values())


def test_a_lossless_structure_is_found_under_a_tight_tolerance():
    """Three of four 32x32 blocks all zero: block-sparse is exact (only the kernel's rounding),
    while int8/fp8/int4 and 2:4 lose more than 1e-3, so block-sparse is chosen."""
    mod = compiled(spec("1e-3"), "auto_blocks")
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 128, generator=g).to(F16)
    keep = torch.zeros(2, 4, dtype=torch.bool)
    keep[0, 1] = keep[1, 3] = True
    w = w * keep.repeat_interleave(32, 0).repeat_interleave(32, 1)
    layer = mod.f.bind(w=w)
    table = check_report(layer, 1e-3)
    assert "@sparse(block=32)" in table, table
    assert chosen_text(layer) == "@sparse(block=32)", layer.report["w"]
    assert layer.w_blocks.shape == (2, 32, 32)
    x = torch.randn(33, 128, generator=g).to(F16)
    err, y, dense = output_error(mod, layer, x, {"w": w})
    assert err <= 1e-3
    ref = run_graph(mod.f.graph, {"x": x, **layer.unpacked()}, {"M": 33, "K": 128, "N": 64}, check=True)[0]
    assert_close(y, ref, tolerance_for(mod.f.graph, layouts=layer.layouts), "the chosen block-sparse layout")


def test_calibration_inputs_are_used_when_given():
    """A weight whose two small entries of every group of 4 are far from negligible, so 2:4
    pruning costs a lot on random inputs; calibration inputs that are zero exactly where the
    pruned entries sit make 2:4 (nearly) exact. The 2:4 row's error follows the inputs given."""
    mod = compiled(spec("0.01"), "auto_calibration")
    g = torch.Generator().manual_seed(4)
    n, k = 48, 64
    big = (torch.rand(n, k // 4, 2, generator=g) + 2.0) * torch.sign(torch.randn(n, k // 4, 2, generator=g))
    small = torch.rand(n, k // 4, 2, generator=g) + 0.5
    w = torch.cat([small, big], dim=2).reshape(n, k).to(F16)          # positions 2 and 3 are kept by 2:4
    x_cal = torch.randn(16, k // 4, 4, generator=g)
    x_cal[..., :2] = 0                                                # the pruned positions see zeros
    x_cal = x_cal.reshape(16, k).to(F16)

    random_cal = mod.f.bind(w=w)
    user_cal = mod.f.bind(w=w, calibration={"x": x_cal})
    r_table, u_table = check_report(random_cal, 0.01), check_report(user_cal, 0.01)
    err_random, err_user = r_table["@sparse(2:4)"][0], u_table["@sparse(2:4)"][0]
    assert err_random > 0.1, r_table
    assert err_user < 0.01, u_table
    # the reported number is the layer's error on those very inputs
    explicit = compiled(spec("0.01").replace("@auto(tol=0.01)", "@sparse(2:4)"), "auto_calibration_24")
    e, _, _ = output_error(explicit, explicit.f.bind(w=w), x_cal, {"w": w})
    assert e == pytest.approx(err_user, rel=1e-2, abs=1e-6)
    assert random_cal.layouts["w"] is None or str(random_cal.layouts["w"]) != "@sparse(2:4)"


def test_the_report_is_in_explain():
    mod = compiled(spec("0.05"), "auto_explain")
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(5)).to(F16)
    layer = mod.f.bind(w=w)
    text = layer.explain(file=io.StringIO())
    assert f"w: {chosen_text(layer)}" in text
    for line in layer.report["w"]:
        assert line in text
    assert "<- chosen" in text and "rel error" in text
    assert "== graph ==" in text, "the packed op's stages follow"


def test_a_low_rank_weight_is_stored_low_rank():
    mod = compiled(spec("0.01"), "auto_lowrank")
    g = torch.Generator().manual_seed(6)
    w = (torch.randn(64, 2, generator=g) @ torch.randn(2, 96, generator=g)).to(F16)
    layer = mod.f.bind(w=w)
    check_report(layer, 0.01)
    assert chosen_text(layer) == "@lowrank(rank=2)", layer.report["w"]
    assert layer.w_u.shape == (64, 2) and layer.w_v.shape == (2, 96)
    x = torch.randn(7, 96, generator=g).to(F16)
    err, y, _ = output_error(mod, layer, x, {"w": w})
    assert err <= 0.01
    ref = run_graph(mod.f.graph, {"x": x, **layer.unpacked()}, {"M": 7, "K": 96, "N": 64}, check=True)[0]
    assert_close(y, ref, tolerance_for(mod.f.graph, layouts=layer.layouts), "the chosen low-rank layout")


def test_an_odd_k_leaves_out_the_layouts_that_cannot_hold_it():
    mod = compiled(spec("0.3"), "auto_odd_k")
    w = torch.randn(37, 45, generator=torch.Generator().manual_seed(7)).to(F16)
    layer = mod.f.bind(w=w)
    table = check_report(layer, 0.3)
    assert not any(t.startswith(("@quant(int4", "@sparse(2:4)")) for t in table), table
    assert {"dense", "@quant(int8)", "@quant(fp8)"} <= set(table)
    x = torch.randn(33, 45, dtype=F16)
    ref = run_graph(mod.f.graph, {"x": x, **layer.unpacked()}, {"M": 33, "K": 45, "N": 37}, check=True)[0]
    assert_close(layer(x), ref, tolerance_for(mod.f.graph, layouts=layer.layouts), f"@auto chose {chosen_text(layer)}")


def test_a_bound_layer_that_stayed_dense_does_not_warn():
    import warnings
    mod = compiled(spec("1e-7"), "auto_tiny_warning")     # its own op: the warning comes once per op
    layer = mod.f.bind(w=torch.randn(40, 64, dtype=F16))
    assert layer.layouts["w"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(7, 64, dtype=F16))


def test_w8a8_candidates_are_tried_on_the_callers_activations_only():
    mod = compiled(spec("0.3"), "auto_w8a8")
    g = torch.Generator().manual_seed(9)
    w = torch.randn(48, 64, generator=g).to(F16)
    act = ("@quant(int8, act=int8)", "@quant(fp8, act=fp8)")
    assert not set(act) & set(check_report(mod.f.bind(w=w), 0.3)), "no W8A8 on seeded random inputs"
    x_cal = torch.randn(16, 64, generator=g).to(F16)
    layer = mod.f.bind(w=w, calibration={"x": x_cal})
    table = check_report(layer, 0.3)
    assert set(act) <= set(table), table
    # activation rounding adds to the weight's: each W8A8 row errs more than its weight-only one
    assert table["@quant(int8, act=int8)"][0] > table["@quant(int8)"][0]
    assert table["@quant(fp8, act=fp8)"][0] > table["@quant(fp8)"][0]
    # the errors reported are the layers' own on those inputs
    for text in act:
        explicit = compiled(spec("0.3").replace("@auto(tol=0.3)", text), "auto_w8a8_explicit")
        e, _, _ = output_error(explicit, explicit.f.bind(w=w), x_cal, {"w": w})
        assert e == pytest.approx(table[text][0], rel=1e-2)


def test_a_w8a8_choice_is_checked_with_the_activation_tolerance(monkeypatch):
    """Where @auto picks W8A8 (made the fastest here), comparisons of the bound layer take the
    activation rounding into account: tolerance_for(..., layouts=layer.layouts)."""
    from opforge.runtime import autolayout
    real = autolayout.estimate_ms

    def act_fastest(op, packed, name, bindings, layout=None):
        fast = layout is not None and dict(layout.kwargs).get("act") == "int8"
        return 1e-6 if fast else real(op, packed, name, bindings, layout)

    monkeypatch.setattr(autolayout, "estimate_ms", act_fastest)
    mod = compiled(spec("0.05"), "auto_w8a8_chosen")
    g = torch.Generator().manual_seed(11)
    w = torch.randn(48, 64, generator=g).to(F16)
    x = torch.randn(33, 64, generator=g).to(F16)
    layer = mod.f.bind(w=w, calibration={"x": x})
    assert chosen_text(layer) == "@quant(int8, act=int8)", layer.report["w"]
    ref = run_graph(mod.f.graph, {"x": x, **layer.unpacked()}, {"M": 33, "K": 64, "N": 48}, check=True)[0]
    tol = tolerance_for(mod.f.graph, layouts=layer.layouts)
    assert tol.norm > tolerance_for(mod.f.graph).norm
    assert_close(layer(x), ref, tol, "the chosen W8A8 layer")


def test_other_uses_of_the_weight_leave_out_the_layouts_that_replace_the_contraction():
    """w also feeds a reduction: only the dequantising layouts (which rebuild w) may hold it."""
    src = ("op f(x: f16[M, K], w: f16[N, K] @auto(tol=0.3)) -> f16[M, N] {\n"
           "    return x @ w.T + sum(w, axis=1)\n}\n")
    mod = compiled(src, "auto_other_use")
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(10)).to(F16)
    w[:32, :32] = 0                                # an empty block: block-sparse would apply to x @ w.T
    layer = mod.f.bind(w=w)
    table = check_report(layer, 0.3)
    assert not any("act=" in t or t.startswith(("@sparse(block", "@lowrank")) for t in table), table
    assert {"dense", "@quant(int8)", "@quant(fp8)", "@sparse(2:4)"} <= set(table)
    x = torch.randn(7, 64, dtype=F16)
    ref = run_graph(mod.f.graph, {"x": x, **layer.unpacked()}, {"M": 7, "K": 64, "N": 48}, check=True)[0]
    assert_close(layer(x), ref, tolerance_for(mod.f.graph, layouts=layer.layouts), f"@auto chose {chosen_text(layer)}")
