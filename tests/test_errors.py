"""The catalogue of spec mistakes and how each is reported (DSL.md, "Errors").

Every case names the message (a stable substring), the 1-based line and column of the caret,
the text the caret underlines (so a caret at the start of the line or on the wrong operand
fails), and the hint where one helps. The report itself must read
``FILE:LINE:COL: error: MESSAGE``, then the source line, then the caret line.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

import opforge
from opforge.frontend import load_program
from opforge.frontend.diagnostics import SpecError


@dataclass(frozen=True)
class Case:
    id: str
    src: str
    message: str              # a substring of err.message
    line: int
    col: int
    under: str | None         # the text under the caret (^~~~); None: the caret is past the end
    hint: str | None = None   # a substring of err.hint; None: no hint is checked


OP = "op f(x: f16[M, K], w: f16[N, K], b: f16[N], y: f32[M, K], i: i32[M, K]) -> f16[M, N] {\n"

CASES = [
    # -- syntax ---------------------------------------------------------------------------------
    Case("missing-arrow", "op f(x: f16[M]) f16[M] {\n    return x\n}\n",
         "unexpected 'f16'; expected '->'", 1, 17, "f16", "op NAME(...) -> f16[M, N]"),
    Case("missing-closing-brace", "op f(x: f16[M]) -> f16[M] {\n    return x\n",
         "the '{' of the op's body at line 1, column 27 is never closed", 2, 13, None, "add '}'"),
    Case("missing-brace-before-next-op",
         "op f(x: f16[M]) -> f16[M] {\n    return x\n\nop g(x: f16[M]) -> f16[M] {\n    return x\n}\n",
         "the '{' at line 1, column 27 is never closed", 4, 1, "op", "add '}' before this op"),
    Case("unexpected-character", "op f(x: f16[M]) -> f16[M] {\n    return x $ x\n}\n",
         "unexpected character '$'", 2, 14, "$"),
    Case("logical-and-doubled", "op f(x: f16[M]) -> bool[M] {\n    return (x > 0.0) && (x < 1.0)\n}\n",
         "unexpected '&'", 2, 23, "&", "single characters: a & b"),
    Case("c-style-not", "op f(x: f16[M]) -> bool[M] {\n    return !(x > 0.0)\n}\n",
         "unexpected character '!'", 2, 12, "!", "'not' is written ~"),
    Case("single-quoted-string", "op f(x: f16[M]) -> f16[M] {\n    return gelu(x, approximate='tanh')\n}\n",
         "unexpected character '''", 2, 32, "'", 'double quotes: "tanh"'),
    Case("assign-used-as-comparison", "op f(x: f16[M], y: f16[M]) -> bool[M] {\n    return x = y\n}\n",
         "unexpected '='", 2, 14, "=", "compare with '=='"),
    Case("statement-without-separator", "op f(x: f16[M]) -> f16[M] {\n    y = x z = y\n    return z\n}\n",
         "unexpected 'z'; expected an operator, the end of the statement", 2, 11, "z",
         "statements end at a newline or ';'"),
    Case("return-without-separator", "op f(x: f16[M]) -> f16[M] {\n    y = exp(x) return y\n}\n",
         "unexpected 'return'", 2, 16, "return", "statements end at a newline or ';'"),
    Case("unclosed-parenthesis", "op f(x: f16[M]) -> f16[M] {\n    y = exp(x\n    return y\n}\n",
         "unexpected 'return'", 3, 5, "return", "the '(' at line 2, column 12 is not closed"),
    Case("missing-comma", "op f(x: f16[M]) -> f16[M] {\n    return maximum(x x)\n}\n",
         "unexpected 'x'; expected an operator, ')', ','", 2, 22, "x", "is a ',' missing?"),
    Case("missing-op-keyword", "f(x: f16[M]) -> f16[M] {\n    return x\n}\n",
         "expected 'op'", 1, 1, "f", "each definition starts with 'op'"),
    Case("missing-open-brace", "op f(x: f16[M]) -> f16[M]\n    return x\n}\n",
         "unexpected end of line", 1, 26, None, "body starts with '{'"),
    Case("return-without-value", "op f(x: f16[M]) -> f16[M] {\n    y = x\n    return\n}\n",
         "unexpected end of line; expected an expression", 3, 11, None),
    Case("extra-closing-parenthesis", "op f(x: f16[M]) -> f16[M] {\n    return exp(x))\n}\n",
         "unexpected ')'", 2, 18, ")"),
    Case("integer-literal-too-long", "op f(x: f32[M]) -> f32[M] {\n    return x * " + "7" * 120 + "\n}\n",
         "the integer literal has 120 digits", 2, 16, "7" * 120, "at most 100 digits"),

    # -- names ----------------------------------------------------------------------------------
    Case("unknown-value", "op f(x: f16[M], wight: f16[M]) -> f16[M] {\n    return x * weight\n}\n",
         "unknown name 'weight'", 2, 16, "weight", "did you mean 'wight'?"),
    Case("unknown-function", "op f(x: f16[M, N]) -> f16[M, N] {\n    return sofmax(x, axis=-1)\n}\n",
         "unknown function 'sofmax'", 2, 12, "sofmax", "did you mean 'softmax'?"),
    Case("unknown-dtype-typo", "op f(x: f61[M]) -> f16[M] {\n    return x\n}\n",
         "unknown dtype 'f61'", 1, 9, "f61", "did you mean 'f16'?"),
    Case("unknown-dtype-torch-name", "op f(x: f16[M], y: float16[M]) -> f16[M] {\n    return x + y\n}\n",
         "unknown dtype 'float16'", 1, 20, "float16", "did you mean 'f16'?"),
    Case("unknown-dtype-in-cast", "op f(x: f16[M]) -> f32[M] {\n    return cast(x, float32)\n}\n",
         "unknown dtype 'float32'", 2, 20, "float32", "did you mean 'f32'?"),
    Case("unknown-dtype-in-result", "op f(x: f16[M]) -> half[M] {\n    return x\n}\n",
         "unknown dtype 'half'", 1, 20, "half", "did you mean 'f16'?"),
    Case("unknown-size-in-reshape", "op f(x: f16[M, K]) -> f16[K, M] {\n    return reshape(x, [Kk, M])\n}\n",
         "'Kk' is not a size of this op", 2, 24, "Kk", "did you mean 'K'?"),
    Case("function-used-as-value", "op f(x: f16[M]) -> f16[M] {\n    return x * exp\n}\n",
         "'exp' is a function; call it", 2, 16, "exp", "exp(...)"),

    # -- dtypes ---------------------------------------------------------------------------------
    Case("dtype-mismatch", "op f(x: f16[M], y: f32[M]) -> f16[M] {\n    return x + y\n}\n",
         "operands of '+' have different dtypes f16 and f32", 2, 16, "y", "cast(y, f16)"),
    Case("dtype-mismatch-hint-uses-operand-text", OP + "    return x @ w.T * (y[:, 0:N] + 1.0)\n}\n",
         "operands of '*' have different dtypes f16 and f32", 2, 23, "y[:, 0:N] + 1.0",
         "cast(y[:, 0:N] + 1.0, f16)"),
    Case("dtype-mismatch-of-a-cast", OP + "    return x @ w.T + cast(b, f32)\n}\n",
         "operands of '+' have different dtypes f16 and f32", 2, 22, "cast(b, f32)", "cast(b, f16)"),
    Case("dtype-mismatch-in-matmul", OP + "    return x @ y.T\n}\n",
         "operands of '@' have different dtypes f16 and f32", 2, 16, "y.T", "cast(y.T, f16)"),
    Case("float-scalar-adopting-integer-tensor", "op f(x: i32[M]) -> i32[M] {\n    return x * 0.5\n}\n",
         "f32 scalar cannot adopt the tensor dtype i32", 2, 16, "0.5", "cast(x, f32)"),
    Case("float-scalar-in-where", "op f(c: bool[M], x: i32[M]) -> i32[M] {\n    return where(c, x, 0.5)\n}\n",
         "f32 scalar cannot adopt the tensor dtype i32 in 'where'", 2, 24, "0.5", "cast(x, f32)"),
    Case("where-branches-differ", "op f(c: bool[M], x: f16[M], y: f32[M]) -> f16[M] {\n    return where(c, x, y)\n}\n",
         "operands of 'where' have different dtypes f16 and f32", 2, 24, "y", "cast(y, f16)"),
    Case("literal-overflows-u8", "op f(x: u8[M]) -> u8[M] {\n    return x + 300\n}\n",
         "the literal 300 does not fit in u8", 2, 16, "300", "u8 holds 0 to 255"),
    Case("literal-overflows-i64", "op f(x: i64[M]) -> i64[M] {\n    return x * (99999999999999999999 + 1)\n}\n",
         "the integer 99999999999999999999 does not fit in i64", 2, 17, "99999999999999999999",
         "i64 holds -2**63 to 2**63 - 1"),
    Case("where-condition-not-bool", "op f(x: f16[M], y: f16[M]) -> f16[M] {\n    return where(x, x, y)\n}\n",
         "the condition of 'where' must be bool, got f16[M]", 2, 18, "x", "x != 0"),
    Case("mean-of-integer-tensor", "op f(x: i32[M, N]) -> i32[M] {\n    return mean(x, axis=1)\n}\n",
         "'mean' needs a floating-point tensor, got i32[M, N]", 2, 17, "x", "mean(cast(x, f32), ...)"),
    Case("exp-of-integer-tensor", OP + "    return exp(i + 1)\n}\n",
         "'exp' needs a floating-point operand, got i32[M, K]", 2, 16, "i + 1", "exp(cast(i + 1, f32))"),
    Case("floordiv-on-floats", "op f(x: f16[M]) -> f16[M] {\n    return x // x\n}\n",
         "'//' on values needs integer operands, got f16[M]", 2, 12, "x", "for floats write"),
    Case("and-of-a-float", "op f(x: f16[M]) -> bool[M] {\n    return (x > 0.0) & x\n}\n",
         "'&' needs bool operands, got f16[M]", 2, 24, "x", "(x > 0.0) & (x < 1.0)"),
    Case("or-of-positions", "op f(x: f16[S, T]) -> bool[S, T] {\n    return arange(S)[:, None] | arange(T)[None, :] > 0\n}\n",
         "'|' needs bool operands, got i64[S, 1]", 2, 12, "arange(S)[:, None]", "(j <= i) | (j > i - W)"),
    Case("not-of-a-float", "op f(x: f16[M]) -> bool[M] {\n    return ~x\n}\n",
         "'~' needs bool operands, got f16[M]", 2, 13, "x", "~(x > 0.0)"),
    Case("arithmetic-on-bool", "op f(x: f16[M]) -> f16[M] {\n    return x * (x > 0.0)\n}\n",
         "'*' needs a numeric operand, got bool[M]", 2, 17, "x > 0.0", "cast(x > 0.0, f32)"),

    # -- shapes ---------------------------------------------------------------------------------
    Case("broadcast-symbols", "op f(x: f16[M, K], y: f16[N, K]) -> f16[M, K] {\n    return x + y\n}\n",
         "shapes [M, K] and [N, K] do not broadcast: M against N in axis -2", 2, 16, "y",
         "M and N are sized independently"),
    Case("broadcast-static", "op f(x: f16[4, 3], y: f16[5]) -> f16[4, 3] {\n    return x * 2.0 - y\n}\n",
         "shapes [4, 3] and [5] do not broadcast: 3 against 5 in axis -1", 2, 22, "y", "equal or 1"),
    Case("matmul-contraction", OP + "    return x @ w\n}\n",
         "'@' contracts [M, K] with [N, K]: K against N", 2, 16, "w", "did you mean .T on the right?"),
    Case("axis-out-of-range", "op f(x: f16[M, N]) -> f16[M] {\n    return sum(x, axis=2)\n}\n",
         "axis 2 is out of range for a tensor of rank 2 in 'sum'", 2, 24, "2", "axes run from -2 to 1"),
    Case("negative-axis-out-of-range", "op f(x: f16[M, N]) -> f16[M, N] {\n    return softmax(x, axis=-3)\n}\n",
         "axis -3 is out of range", 2, 28, "-3", "axes run from -2 to 1"),
    Case("not-a-permutation", "op f(x: f16[A, B, C]) -> f16[A, B, C] {\n    return permute(x, [0, 1, 1])\n}\n",
         "[0, 1, 1] is not a permutation of the 3 axes", 2, 23, "[0, 1, 1]", "name each of 0..2 once"),
    Case("reshape-element-count", "op f(x: f16[4, 6]) -> f16[5, 5] {\n    return reshape(x, [5, 5])\n}\n",
         "cannot reshape [4, 6] (24 elements) into [5, 5] (25 elements)", 2, 23, "[5, 5]"),
    Case("reshape-two-holes", "op f(x: f16[4, 6]) -> f16[24] {\n    return reshape(x, [-1, -1])\n}\n",
         "may infer one size with -1, but [-1, -1] has 2", 2, 28, "-1", "every size but one"),
    Case("attribute-foo", "op f(x: f16[M, N]) -> f16[M, N] {\n    return x.foo\n}\n",
         "unknown attribute '.foo'", 2, 14, "foo", "the only attribute is .T"),
    Case("transpose-of-1d", "op f(x: f16[M]) -> f16[M] {\n    return exp(x.T)\n}\n",
         ".T needs a tensor of rank 2 or more, got f16[M]", 2, 16, "x.T", "transpose(x, a, b)"),
    Case("too-many-indices", "op f(x: f16[M, N]) -> f16[M] {\n    return x[0, 1, 2]\n}\n",
         "too many indices (3) for a tensor of rank 2", 2, 20, "2", "the tensor is f16[M, N]"),
    Case("index-tensor-not-first", "op f(x: f16[M, N], ids: i32[K]) -> f16[M, K] {\n    return x[:, ids]\n}\n",
         "an index tensor is only allowed in the first position", 2, 17, "ids", "emb[ids] gathers rows"),
    Case("index-out-of-range", "op f(x: f16[4, N]) -> f16[N] {\n    return x[4]\n}\n",
         "index 4 is out of range for size 4", 2, 14, "4"),
    Case("slice-step-zero", "op f(x: f16[M]) -> f16[M] {\n    return x[::0]\n}\n",
         "slice step 0 must be positive", 2, 16, "0"),

    # -- statements -----------------------------------------------------------------------------
    Case("reassigned-name", "op f(x: f16[M]) -> f16[M] {\n    y = x\n    y = exp(x)\n    return y\n}\n",
         "'y' is already defined (line 2)", 3, 5, "y", "values are immutable"),
    Case("assign-to-parameter", "op f(x: f16[M]) -> f16[M] {\n    x = exp(x)\n    return x\n}\n",
         "cannot assign to the parameter 'x' of op 'f'", 2, 5, "x", "give the new value another name"),
    Case("assign-to-size-symbol", "op f(x: f16[M]) -> f16[M] {\n    y = exp(x)\n    M = y\n    return M\n}\n",
         "cannot assign to 'M', a size symbol of op 'f'", 3, 5, "M", "give the value another name"),
    Case("same-target-twice", "op f(x: f32[M, N]) -> f32[M, 2] {\n    a, a = topk(x, k=2)\n    return a\n}\n",
         "'a' appears twice on the left of '='", 2, 8, "a"),
    Case("keyword-as-value-name", "op f(x: f16[M]) -> f16[M] {\n    true = x > 0.0\n    return x\n}\n",
         "'true' is a keyword and cannot name a value", 2, 5, "true", "choose another name"),
    Case("keyword-as-parameter-name", "op f(x: f16[M], inf: f32 = 1.0) -> f16[M] {\n    return x\n}\n",
         "'inf' is a keyword and cannot name a parameter", 1, 17, "inf"),
    Case("statement-after-return", "op f(x: f16[M]) -> f16[M] {\n    return x\n    y = x\n}\n",
         "statement after return", 3, 5, "y = x", "return must be the last statement"),
    Case("missing-return", "op f(x: f16[M]) -> f16[M] {\n    y = x\n}\n",
         "op 'f' has no return statement", 3, 1, "}", "end the body with: return EXPR"),

    # -- results --------------------------------------------------------------------------------
    Case("result-dtype", "op f(x: f16[M]) -> f32[M] {\n    return exp(x)\n}\n",
         "the result is f16[M], but the op declares f32[M]", 2, 12, "exp(x)", "cast(exp(x), f32)"),
    Case("result-dtype-of-a-cast", "op f(x: f32[M]) -> f32[M] {\n    return cast(x, f16)\n}\n",
         "the result is f16[M], but the op declares f32[M]", 2, 12, "cast(x, f16)", "cast(x, f32)"),
    Case("result-shape", "op f(x: f16[M, N]) -> f16[M, N] {\n    return sum(x, axis=1)\n}\n",
         "the result has shape [M], but the op declares [M, N]", 2, 12, "sum(x, axis=1)"),
    Case("too-many-results", "op f(x: f16[M]) -> f16[M] {\n    return x, exp(x)\n}\n",
         "op 'f' declares 1 result but returns 2 values", 2, 15, "exp(x)", "declare more results"),
    Case("too-few-results", "op f(x: f16[M]) -> (f16[M], f16[M]) {\n    return x\n}\n",
         "op 'f' declares 2 results but returns 1 value", 2, 5, "return x", "(f16[M], f16[M])"),
    Case("tuple-return-in-parentheses", "op f(x: f16[M]) -> (f16[M], f16[M]) {\n    return (x, exp(x))\n}\n",
         "several results are returned without parentheses", 2, 12, "(x, exp(x))", "return x, exp(x)"),
    Case("result-size-unbound", "op f(x: f16[M]) -> f16[Q] {\n    return x\n}\n",
         "result size 'Q' is not bound by any parameter", 1, 24, "Q", "bound by the parameters' shapes"),
    Case("scalar-result", "op f(x: f16[M], s: f32) -> f32 {\n    return s\n}\n",
         "declare a shape, e.g. f32[] for a 0-d result", 1, 28, "f32"),

    # -- calls of built-ins ---------------------------------------------------------------------
    Case("too-many-arguments", "op f(x: f16[M]) -> f16[M] {\n    return exp(x, x)\n}\n",
         "'exp' takes 1 argument, got 2", 2, 19, "x", "exp(x)"),
    Case("too-few-arguments", "op f(x: f16[M]) -> f16[M] {\n    return maximum(x)\n}\n",
         "'maximum' takes 2 arguments (a, b), got 1", 2, 12, "maximum(x)", "maximum(a, b)"),
    Case("unknown-keyword", "op f(x: f16[M, N]) -> f16[M] {\n    return sum(x, axsi=1)\n}\n",
         "'sum' has no argument 'axsi'", 2, 19, "axsi", "did you mean 'axis'?"),
    Case("keyword-used-as-comparison", "op f(x: f16[M]) -> f16[M] {\n    return where(x = 0.0, x, -x)\n}\n",
         "'where' has no argument 'x'", 2, 18, "x", "to compare, write x == 0.0"),
    Case("missing-required-argument", "op f(x: f16[M, N]) -> f16[M, N] {\n    return cumsum(x)\n}\n",
         "'cumsum' needs the argument 'axis'", 2, 12, "cumsum(x)", "cumsum(x, axis, reverse)"),
    Case("keyword-given-twice", "op f(x: f16[M, N]) -> f16[M] {\n    return sum(x, axis=1, axis=1)\n}\n",
         "'sum' gets 'axis' twice", 2, 27, "axis", "sum(x, axis, keepdim)"),
    Case("keyword-after-positional", "op f(x: f16[M, N]) -> f16[M] {\n    return sum(x, 1, axis=1)\n}\n",
         "'sum' gets 'axis' twice", 2, 22, "axis"),
    Case("bad-string-choice", "op f(x: f16[M]) -> f16[M] {\n    return gelu(x, approximate=\"fast\")\n}\n",
         "\"fast\" is not a choice of 'approximate' in 'gelu'", 2, 32, "\"fast\"", "\"none\" or \"tanh\""),
    Case("tuple-result-in-expression", "op f(x: f16[M, N]) -> f16[M, 2] {\n    return topk(x, k=2) * 2.0\n}\n",
         "'topk' gives 2 values; unpack them first", 2, 12, "topk(x, k=2)", "a, b = topk(x, k=2)"),
    Case("returned-tuple-result-too-many", "op f(x: f16[M, N]) -> f16[M, 2] {\n    return topk(x, k=2)\n}\n",
         "op 'f' declares 1 result but returns 2 values", 2, 12, "topk(x, k=2)",
         "'topk' gives 2 values and returning it returns all of them: declare each, or write a, b = topk(x, k=2)"),
    Case("returned-tuple-result-dtype", "op f(x: f16[M, N]) -> (f16[M, N], f16[M, 2], f16[M, 2]) {\n"
         "    return x, topk(x, k=2)\n}\n",
         "result 2 is i32[M, 2], but the op declares f16[M, 2]", 2, 15, "topk(x, k=2)",
         "'topk' gives 2 values: assign them (a, b = ...) and return cast(b, f16)"),
    Case("unpack-wrong-count", "op f(x: f16[M, N]) -> f16[M, 2] {\n    a, b, c = topk(x, k=2)\n    return a\n}\n",
         "'topk' gives 2 values, but 3 names are assigned", 2, 15, "topk(x, k=2)"),
    Case("unpack-single-value", "op f(x: f16[M]) -> f16[M] {\n    a, b = exp(x)\n    return a\n}\n",
         "'exp' gives 1 value, but 2 names are assigned", 2, 12, "exp(x)"),

    # -- layouts --------------------------------------------------------------------------------
    Case("layout-on-scalar", "op f(x: f16[M, K], s: f32 @quant(int8)) -> f16[M, K] {\n    return x\n}\n",
         "a layout annotation on the scalar parameter 's'", 1, 27, "@quant(int8)", "scalars have none"),
    Case("unknown-layout", "op f(x: f16[M, K], w: f16[N, K] @qant(int8)) -> f16[M, N] {\n    return x @ w.T\n}\n",
         "unknown layout '@qant'", 1, 34, "qant", "did you mean 'quant'?"),
    Case("quant-int3", "op f(x: f16[M, K], w: f16[N, K] @quant(int3)) -> f16[M, N] {\n    return x @ w.T\n}\n",
         "@quant cannot store int3", 1, 40, "int3", "did you mean"),
    Case("group-on-int8",
         "op f(x: f16[M, K], w: f16[N, K] @quant(int8, group=64)) -> f16[M, N] {\n    return x @ w.T\n}\n",
         "group= applies to @quant(int4), not int8", 1, 46, "group=64", "one scale per output row"),
    Case("sparse-3-4", "op f(x: f16[M, K], w: f16[N, K] @sparse(3:4)) -> f16[M, N] {\n    return x @ w.T\n}\n",
         "@sparse(3:4) is not supported; only 2:4", 1, 41, "3:4", "2:4"),
    Case("lowrank-rank-and-tol",
         "op f(x: f16[M, K], w: f16[N, K] @lowrank(rank=4, tol=0.1)) -> f16[M, N] {\n    return x @ w.T\n}\n",
         "@lowrank takes rank=R or tol=T, not both", 1, 50, "tol=0.1", "@lowrank(rank=64)"),
    Case("int4-odd-k",
         "op f(x: f16[M, 127], w: f16[N, 127] @quant(int4)) -> f16[M, N] {\n    return x @ w.T\n}\n",
         "K = 127 is odd", 1, 37, "@quant(int4)", "pad the weight to an even K"),
    Case("lowrank-rank-too-big",
         "op f(x: f16[M, 64], w: f16[32, 64] @lowrank(rank=48)) -> f16[M, 32] {\n    return x @ w.T\n}\n",
         "@lowrank(rank=48) is above min(N, K) = 32", 1, 45, "rank=48"),
    Case("sparse-block-not-power-of-two",
         "op f(x: f16[M, K], w: f16[N, K] @sparse(block=24)) -> f16[M, N] {\n    return x @ w.T\n}\n",
         "the block must be a power of two of at least 16", 1, 41, "block=24"),

    # -- ops and parameters ---------------------------------------------------------------------
    Case("call-cycle",
         "op f(x: f16[M]) -> f16[M] {\n    return g(x)\n}\nop g(x: f16[M]) -> f16[M] {\n    return f(x) * 2.0\n}\n",
         "ops call each other in a cycle: f -> g -> f", 5, 12, "f", "recursion cannot be"),
    Case("self-recursion", "op f(x: f16[M]) -> f16[M] {\n    return exp(f(x))\n}\n",
         "ops call each other in a cycle: f -> f", 2, 16, "f", "recursion cannot be"),
    Case("op-named-like-builtin", "op exp(x: f16[M]) -> f16[M] {\n    return x\n}\n",
         "op 'exp' has the name of a built-in", 1, 4, "exp", "choose another name"),
    Case("op-defined-twice",
         "op f(x: f16[M]) -> f16[M] {\n    return x\n}\n\nop f(x: f16[M]) -> f16[M] {\n    return x\n}\n",
         "op 'f' is defined twice", 5, 4, "f", "the first definition is at line 1"),
    Case("duplicate-parameter", "op f(x: f16[M], w: f16[M], x: f16[M]) -> f16[M] {\n    return x\n}\n",
         "parameter 'x' is declared twice", 1, 28, "x"),
    Case("tensor-parameter-default", "op f(x: f16[M] = 1.0) -> f16[M] {\n    return x\n}\n",
         "the tensor parameter 'x' cannot have a default", 1, 18, "1.0", "only scalar parameters"),
    Case("default-before-tensor", "op f(s: f32 = 1.0, x: f32[M]) -> f32[M] {\n    return x * s\n}\n",
         "the tensor parameter 'x' has no default but follows 's', which has one", 1, 20, "x",
         "parameters with defaults come last (as in Python): move 'x' before 's'"),
    Case("default-before-scalar", "op f(x: f32[M], s: f32 = 1.0, t: i64) -> f32[M] {\n    return x * s\n}\n",
         "the parameter 't' has no default but follows 's', which has one", 1, 31, "t", "move 't' before 's'"),
    Case("default-does-not-fit", "op f(x: i32[M], n: i32 = 3000000000) -> i32[M] {\n    return x * n\n}\n",
         "default 3000000000 does not fit in i32", 1, 26, "3000000000", "i32 holds -2**31 to 2**31 - 1"),
    Case("bool-default-not-bool", "op f(x: f32[4], b: bool = 1) -> f32[4] {\n    return x\n}\n",
         "a bool parameter needs true or false, got 1", 1, 27, "1"),
    Case("size-named-like-parameter", "op f(x: f16[x]) -> f16[x] {\n    return x\n}\n",
         "'x' is both a parameter and a size symbol", 1, 13, "x", "give the size another name"),
    Case("call-size-bindings",
         "op g(a: f16[M, K], b: f16[K]) -> f16[M, K] {\n    return a * b\n}\n"
         "op f(x: f16[M, K], y: f16[N]) -> f16[M, K] {\n    return g(x, y)\n}\n",
         "'g' binds its size K to K from a = x: f16[M, K] and to N from b = y: f16[N]", 5, 17, "y",
         "g(a: f16[M, K], b: f16[K]) needs a and b to agree in K"),
    Case("call-dtype",
         "op g(a: f16[M]) -> f16[M] {\n    return a\n}\n"
         "op f(x: f32[M]) -> f16[M] {\n    return g(x * 2.0)\n}\n",
         "'g' expects f16 for 'a', got f32[M]", 5, 14, "x * 2.0", "cast(x * 2.0, f16)"),
    Case("call-unknown-keyword",
         "op g(a: f16[M], eps: f32 = 0.1) -> f16[M] {\n    return a * eps\n}\n"
         "op f(x: f16[M]) -> f16[M] {\n    return g(x, esp=0.5)\n}\n",
         "'g' has no argument 'esp'", 5, 17, "esp", "did you mean 'eps'?"),
    Case("call-divides-by-zero-size",
         "op g(x: f16[D], y: f16[E]) -> f16[D / E, E] {\n    return reshape(x, [-1, E])\n}\n"
         "op f(a: f16[8], b: f16[0]) -> f16[8, 0] {\n    return g(a, b)\n}\n",
         "calling 'g' with D = 8, E = 0 makes its size D/E a division by zero", 5, 12, "g(a, b)"),
]


def _ids():
    seen = set()
    for c in CASES:
        assert c.id not in seen, f"duplicate case id {c.id}"
        seen.add(c.id)
    return [c.id for c in CASES]


def _caret(report_lines: list[str]) -> tuple[int, int]:
    """(column, width) of the caret line ``   ^~~~``."""
    m = re.fullmatch(r"( *)(\^~*)", report_lines[2])
    assert m, f"no caret line in {report_lines!r}"
    return len(m.group(1)) + 1, len(m.group(2))


def check_report(err: SpecError, case: Case, file: str, source_lines: list[str]) -> None:
    assert case.message in err.message, err.message
    assert (err.line, err.col) == (case.line, case.col), f"{err.line}:{err.col}\n{err}"
    if case.hint is not None:
        assert err.hint is not None and case.hint in err.hint, err.hint
    text = str(err)
    assert text.startswith(f"{file}:{case.line}:{case.col}: error: {err.message}\n"), text
    lines = text.split("\n")
    assert lines[1] == source_lines[case.line - 1], text
    col, width = _caret(lines)
    assert col == case.col, text
    if case.under is None:
        assert case.col == len(source_lines[case.line - 1]) + 1, text  # just past the end of the line
    else:
        assert source_lines[case.line - 1][col - 1:col - 1 + width] == case.under, text
    if err.hint:
        assert lines[3] == f"hint: {err.hint}"
        assert len(lines) == 4
    else:
        assert len(lines) == 3


@pytest.mark.parametrize("case", CASES, ids=_ids())
def test_error_catalogue(case: Case):
    with pytest.raises(SpecError) as info:
        load_program(case.src)
    check_report(info.value, case, "<string>", case.src.split("\n"))


def test_catalogue_is_large_and_distinct():
    assert len(CASES) >= 40
    assert len({c.src for c in CASES}) == len(CASES)
    assert len({c.message for c in CASES}) >= 40


def test_spec_error_is_a_value_error_exported_by_the_package():
    assert opforge.SpecError is SpecError
    with pytest.raises(ValueError):
        load_program(CASES[0].src)


# -- reports from files ---------------------------------------------------------------------------
FILE_CASES = [c for c in CASES if c.id in ("missing-arrow", "unknown-value", "dtype-mismatch",
                                           "missing-closing-brace", "int4-odd-k")]


@pytest.mark.parametrize("case", FILE_CASES, ids=[c.id for c in FILE_CASES])
def test_error_from_file_names_the_file(case: Case, tmp_path: Path):
    path = tmp_path / "model.opf"
    path.write_text(case.src)
    with pytest.raises(SpecError) as info:
        load_program(str(path))
    check_report(info.value, case, str(path), case.src.split("\n"))
    assert info.value.file == str(path)


def test_error_from_path_object(tmp_path: Path):
    path = tmp_path / "m.opf"
    path.write_text("# a comment\n\nop f(x: f16[M]) -> f16[M] {\n    return x * weight\n}\n")
    with pytest.raises(SpecError) as info:
        load_program(path)
    assert str(info.value).startswith(f"{path}:4:16: error: unknown name 'weight'\n")


def test_missing_file_has_no_span(tmp_path: Path):
    with pytest.raises(SpecError) as info:
        load_program(str(tmp_path / "nope.opf"))
    err = info.value
    assert err.span is None and err.line is None
    assert str(err).startswith(f"error: no such spec file: {tmp_path / 'nope.opf'}")


@pytest.mark.parametrize("bad", ["a" * 5000, "spec\x00.opf"])
def test_unusable_path_is_a_spec_error(bad: str):
    with pytest.raises(SpecError, match="no such spec file"):
        load_program(bad)


def test_file_that_is_not_utf8(tmp_path: Path):
    """FILE:LINE:COL of the first bad byte, the line (bad bytes shown as U+FFFD), a caret."""
    path = tmp_path / "bin.opf"
    path.write_bytes(b"op f(x: f16[M]) -> f16[M] {\n    return x\xff\n}\n")
    with pytest.raises(SpecError, match="is not UTF-8 text") as info:
        load_program(path)
    assert str(info.value).split("\n") == [
        f"{path}:2:13: error: the file is not UTF-8 text: byte ff cannot be decoded",
        "    return x\ufffd",
        "            ^",
        "hint: save the spec as UTF-8"]


def test_file_that_is_not_utf8_after_multibyte_characters(tmp_path: Path):
    """Columns count characters, as every other error does: the caret lines up after an 'é'
    (two bytes) and a Latin-1 byte further on is the one reported, on its own line."""
    path = tmp_path / "latin.opf"
    path.write_bytes("# caf\u00e9 ok\nop f(x: f16[M]) -> f16[M] {\n    # na\u00efve, then \u00e9 in Latin-1: ".encode()
                     + b"\xe9t\xe9\n    return x\n}\n")
    with pytest.raises(SpecError) as info:
        load_program(path)
    e = info.value
    assert (e.line, e.col) == (3, 33)
    lines = str(e).split("\n")
    assert lines[1] == "    # na\u00efve, then \u00e9 in Latin-1: \ufffdt\ufffd"
    assert lines[2] == " " * 32 + "^"


# -- where the caret lands on awkward lines --------------------------------------------------------
def test_caret_under_tabs_lines_up():
    src = "op f(x: f16[M]) -> f16[M] {\n\treturn\tx * weight\n}\n"
    with pytest.raises(SpecError) as info:
        load_program(src)
    err = info.value
    assert (err.line, err.col) == (2, 13)
    lines = str(err).split("\n")
    assert lines[1] == " return x * weight"     # a tab is shown as one column
    assert lines[2] == " " * 12 + "^~~~~~"


@pytest.mark.parametrize("newline", ["\r\n", "\n"])
def test_line_endings(newline: str):
    src = newline.join(["op f(x: f16[M]) -> f16[M] {", "    y = exp(x)", "    return y * weight", "}", ""])
    with pytest.raises(SpecError) as info:
        load_program(src)
    assert (info.value.line, info.value.col) == (3, 16)
    assert str(info.value).split("\n")[1] == "    return y * weight"


def test_form_feed_does_not_shift_the_shown_line():
    src = "# page one\x0c\nop f(x: f16[M]) -> f16[M] {\n    return x * weight\n}\n"
    with pytest.raises(SpecError) as info:
        load_program(src)
    assert (info.value.line, info.value.col) == (3, 16)
    assert str(info.value).split("\n")[1] == "    return x * weight"


def test_multiline_call_points_at_the_operand():
    src = ("op f(x: f16[M, K], y: f32[M, K]) -> f16[M, K] {\n"
           "    return maximum(\n"
           "        x,\n"
           "        y * 2.0,\n"
           "    )\n"
           "}\n")
    with pytest.raises(SpecError) as info:
        load_program(src)
    err = info.value
    assert (err.line, err.col) == (4, 9)
    assert err.hint.endswith("cast(y * 2.0, f16)")


def test_multiline_operand_hint_is_joined_on_one_line():
    src = ("op f(x: f16[M, K], y: f32[M, K]) -> f16[M, K] {\n"
           "    return x + cast(\n"
           "        y,  # the f32 copy\n"
           "        f32)\n"
           "}\n")
    with pytest.raises(SpecError) as info:
        load_program(src)
    assert info.value.hint == "make them equal with a cast, e.g. cast(y, f16)"
    assert (info.value.line, info.value.col) == (2, 16)


def test_non_printable_character_is_named():
    with pytest.raises(SpecError) as info:
        load_program("op f(x: f16[M]) -> f16[M] {\n    return x\x07\n}\n")
    assert info.value.message == "unexpected character 'U+0007'"
    assert (info.value.line, info.value.col) == (2, 13)


def test_empty_spec():
    with pytest.raises(SpecError) as info:
        load_program("# nothing here\n")
    assert info.value.message == "the spec defines no op"
    assert (info.value.line, info.value.col) == (1, 1)


# -- very deep expressions ------------------------------------------------------------------------
def test_long_chain_of_additions_checks():
    program = load_program("op f(x: f32[M]) -> f32[M] {\n    return x" + " + x" * 3000 + "\n}\n")
    assert len(program["f"].nodes) == 3000


def test_too_deep_nesting_is_a_spec_error_at_its_statement():
    n = 12000
    src = "op f(x: f32[M]) -> f32[M] {\n    y = x\n    return " + "exp(" * n + "y" + ")" * n + "\n}\n"
    with pytest.raises(SpecError) as info:
        load_program(src)
    assert "nests expressions too deeply" in info.value.message
    assert (info.value.line, info.value.col) == (3, 5)


def test_check_and_compile_agree_on_a_default_before_a_parameter_without_one():
    """The front end refuses it (a torch schema, like a Python signature, cannot have a
    positional parameter after a defaulted one), so compile gives the same SpecError instead of
    Python's 'non-default argument follows default argument' from the op's registration."""
    src = "op f(s: f32 = 1.0, x: f32[M]) -> f32[M] {\n    return x * s\n}\n"
    with pytest.raises(SpecError) as checked:
        load_program(src)
    with pytest.raises(SpecError) as compiled:
        opforge.compile(src, namespace="errors_default_order")
    assert str(compiled.value) == str(checked.value)
    assert str(checked.value).startswith("<string>:1:20: error: the tensor parameter 'x' has no default")
