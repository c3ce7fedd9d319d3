"""The environment switches a call reads (OPFORGE_POISON, OPFORGE_INDEX64, OPFORGE_CHECK_INDICES).

They are read on every call, so that setting one (a test's monkeypatch, a user's shell) takes
effect at the next call. ``os.environ.get`` of an unset name costs about 0.8 us (it raises and
catches a KeyError), a third of a whole call's budget; reading CPython's mapping behind
``os.environ`` costs about 30 ns. That mapping is what ``os.environ`` itself reads and writes, so
the values are the same; where an interpreter has no such mapping, ``os.environ.get`` is used.
"""
from __future__ import annotations

import os

_DATA = getattr(os.environ, "_data", None)
_ENCODE = getattr(os.environ, "encodekey", None)
_DECODE = getattr(os.environ, "decodevalue", None)
_ENCODE_VALUE = getattr(os.environ, "encodevalue", None)
_FAST = isinstance(_DATA, dict) and callable(_ENCODE) and callable(_DECODE) and callable(_ENCODE_VALUE)
_KEYS: dict[str, object] = {}
_OFF = (_ENCODE_VALUE(""), _ENCODE_VALUE("0")) if _FAST else ("", "0")   # as stored


def _key(name: str):
    key = _KEYS[name] = _ENCODE(name)
    return key


def get(name: str, default: str | None = None) -> str | None:
    if not _FAST:
        return os.environ.get(name, default)
    raw = _DATA.get(_KEYS.get(name) or _key(name))
    return default if raw is None else _DECODE(raw)


def flag(name: str, default: bool = False) -> bool:
    """A switch: unset gives ``default``; "" and "0" are off, anything else on."""
    if not _FAST:
        v = os.environ.get(name)
        return default if v is None else v not in _OFF
    raw = _DATA.get(_KEYS.get(name) or _key(name))
    return default if raw is None else raw not in _OFF


def getter(name: str):
    """A function of no arguments giving the variable's value as stored (None when unset), at
    the least cost: what a call's key holds of a switch."""
    if not _FAST:
        return lambda: os.environ.get(name)
    import functools
    return functools.partial(_DATA.get, _KEYS.get(name) or _key(name))
