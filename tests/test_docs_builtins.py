"""docs/language.md's built-ins reference cannot drift from the compiler.

- Every built-in a spec may call (the registry's spec_builtins) has exactly one entry in the
  "## Built-ins" section, and every entry names a built-in of the registry. An entry is a list
  item or a table row that starts with a backticked call: ``- `sum(x, ...)`...`` or
  ``| `exp(x)` | ...``.
- Each entry's signature shows every non-operand argument of the registry: a required one by its
  name, one with a default as ``name=DEFAULT`` (spelled as a spec writes it: ``false``, ``-1``,
  ``"none"``; ``None`` for "every axis").
- Every operator of the grammar (frontend/opf.lark) appears, written as a form such as
  ``a ** b``, ``-a`` or ``x.T``, in the operator table of "### Operators".
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from opforge.ir import registry

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "language.md"
GRAMMAR = ROOT / "frontend" / "opf.lark"

ENTRY = re.compile(r"^\s*(?:[-*+]|\|)\s*`([A-Za-z_]\w*)\(([^`]*)\)`")
CODE = re.compile(r"`([^`]+)`")
# The grammar's postfix forms, as the operator table writes them (keyed by their first literal).
POSTFIX_FORMS = {"(": "f(...)", ".": "x.T", "[": "x[...]"}


def section(text: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.splitlines()
    try:
        start = next(i for i, l in enumerate(lines) if l.strip() == heading)
    except StopIteration:
        pytest.fail(f"docs/language.md has no '{heading}' heading")
    out = []
    for line in lines[start + 1:]:
        m = re.match(r"(#+)\s", line)
        if m and len(m.group(1)) <= level:
            break
        out.append(line)
    return "\n".join(out)


def doc_entries(text: str) -> list[tuple[str, str]]:
    """(name, argument text) of every entry of the built-ins reference, in order."""
    return [(m.group(1), m.group(2)) for line in section(text, "## Built-ins").splitlines()
            if (m := ENTRY.match(line))]


def spelled(default) -> str:
    """A default as a spec writes it."""
    if default is None:
        return "None"
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, str):
        return f'"{default}"'
    return str(default)


def signature_problems(name: str, args_text: str, prim) -> list[str]:
    params = [p.strip() for p in args_text.split(",")]
    problems = []
    for a in prim.args:
        if a.is_operand:
            continue
        want = a.name if a.required else f"{a.name}={spelled(a.default)}"
        if want not in params:
            problems.append(f"`{name}(...)` should show `{want}` (registry: {a.kind} argument "
                            f"{'required' if a.required else 'with a default'}); the doc has ({args_text})")
    return problems


def grammar_forms(grammar: str) -> set[str]:
    """The operator forms of the expression rules, from ``?expr`` up to ``?atom``: binary
    ``a OP b``, prefix ``OPa``, each comparison of COMPARE, and the postfix forms."""
    start = grammar.index("?expr:")
    rules = grammar[start:grammar.index("?atom:")]
    compare = re.search(r"^COMPARE:(.*)$", grammar, re.M)
    assert compare, "opf.lark has no COMPARE terminal"
    comparisons = re.findall(r'"([^"]+)"', compare.group(1))
    forms: set[str] = set()
    for alt in re.split(r"\n\s*\||:\s*\n?", rules):
        alt = alt.split("->")[0].strip()
        if '"' not in alt and "COMPARE" not in alt:
            continue
        tokens = re.findall(r'"[^"]+"|[A-Za-z_?]\w*|\[|\]|\(|\)|\*', alt)
        literals = [t.strip('"') for t in tokens if t.startswith('"')]
        if "COMPARE" in tokens:
            forms |= {f"a {c} b" for c in comparisons}
        elif len(tokens) == 3 and tokens[1].startswith('"') and tokens[0].islower() and tokens[2].islower():
            forms.add(f"a {literals[0]} b")
        elif len(tokens) == 2 and tokens[0].startswith('"'):
            forms.add(f"{literals[0]}a")
        elif literals and literals[0] in POSTFIX_FORMS:
            forms.add(POSTFIX_FORMS[literals[0]])
        else:
            pytest.fail(f"opf.lark has an expression form this test does not know: {alt!r}; "
                        f"document it in the operator table and teach grammar_forms its spelling")
    return forms


def operator_table(text: str) -> set[str]:
    """Every backticked form in the first two columns of the first table under "### Operators"."""
    forms: set[str] = set()
    started = False
    for line in section(text, "### Operators").splitlines():
        if not line.startswith("|"):
            if started:
                break
            continue
        started = True
        for cell in re.split(r"(?<!\\)\|", line)[1:3]:      # a pipe in a cell is written \|
            forms |= {m.strip().replace("\\|", "|") for m in CODE.findall(cell)}
    return forms


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def test_every_spec_builtin_has_one_entry_and_every_entry_is_a_builtin(doc):
    builtins = registry.spec_builtins()
    names = [n for n, _ in doc_entries(doc)]
    missing = sorted(set(builtins) - set(names))
    unknown = sorted(set(names) - set(builtins))
    twice = sorted({n for n in names if names.count(n) > 1})
    assert not missing, f"built-ins of the registry missing from docs/language.md's reference: {missing}"
    assert not unknown, f"docs/language.md's reference names built-ins the registry does not have: {unknown}"
    assert not twice, f"built-ins with more than one entry in docs/language.md: {twice}"


def test_signatures_show_the_registry_arguments(doc):
    builtins = registry.spec_builtins()
    problems = []
    for name, args in doc_entries(doc):
        if name in builtins:
            problems += signature_problems(name, args, builtins[name])
    assert not problems, "\n".join(problems)


def test_every_grammar_operator_is_in_the_operator_table(doc):
    forms = grammar_forms(GRAMMAR.read_text(encoding="utf-8"))
    # the grammar's operators as this test reads them; a sanity floor, not a list to maintain
    assert {"a + b", "-a", "a ** b", "a @ b", "a < b", "x.T"} <= forms, forms
    table = operator_table(doc)
    missing = sorted(forms - table)
    assert not missing, f"operators of frontend/opf.lark missing from the operator table of docs/language.md: {missing}"


# -- the checks themselves can fail -------------------------------------------------------------
def test_the_checks_catch_a_missing_or_unknown_entry_and_a_missing_operator(doc):
    dropped = "\n".join(l for l in doc.splitlines() if not l.lstrip("-| ").startswith("`topk("))
    assert "topk" not in [n for n, _ in doc_entries(dropped)]
    added = doc.replace("#### Sources\n", "#### Sources\n- `linspace(N)`: not a built-in.\n")
    assert "linspace" in [n for n, _ in doc_entries(added)]
    no_pow = doc.replace("`a ** b`", "a ** b")
    assert "a ** b" not in operator_table(no_pow)
    prim = registry.spec_builtins()["sum"]
    assert signature_problems("sum", "x, axis=None", prim)          # keepdim=false left out
    assert not signature_problems("sum", "x, axis=None, keepdim=false", prim)
