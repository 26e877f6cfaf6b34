"""JSON read/write for the launcher without importing :mod:`json`.

``import json`` pulls in :mod:`re` and costs about 8 ms on the project machines, which is a
quarter of what ``runc run`` takes end to end. The C accelerator ``_json`` that :mod:`json`
itself uses has a scanner and a string encoder that need no regular expressions, so this
module drives them directly. Output and accepted input match :mod:`json` (tests compare them).
"""
from __future__ import annotations

import _json


class _Ctx:
    # The attribute set is what _json.make_scanner reads from a json.JSONDecoder.
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    memo: dict = {}

    @staticmethod
    def parse_constant(name: str) -> float:
        return {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}[name]


_scan = _json.make_scanner(_Ctx())
_WS = " \t\n\r"


class JSONError(ValueError):
    """The text is not one JSON document; says where it stopped."""


def loads(text: str | bytes) -> object:
    if isinstance(text, (bytes, bytearray)):
        text = text.decode("utf-8")
    if text.startswith("\ufeff"):
        raise JSONError("unexpected UTF-8 BOM")
    i = 0
    n = len(text)
    while i < n and text[i] in _WS:
        i += 1
    try:
        obj, end = _scan(text, i)
    except StopIteration as e:
        raise JSONError(f"expecting a value at char {e.value}") from None
    except ValueError as e:
        raise JSONError(str(e)) from None
    finally:
        _Ctx.memo.clear()
    while end < n and text[end] in _WS:
        end += 1
    if end != n:
        raise JSONError(f"extra data at char {end}")
    return obj


def _enc(o: object, out: list[str]) -> None:
    if isinstance(o, str):
        out.append(_json.encode_basestring_ascii(o))
    elif o is None:
        out.append("null")
    elif o is True:
        out.append("true")
    elif o is False:
        out.append("false")
    elif isinstance(o, int):
        out.append(int.__repr__(o))
    elif isinstance(o, float):
        if o != o or o in (float("inf"), float("-inf")):
            raise ValueError(f"cannot encode {o!r} as JSON")
        out.append(float.__repr__(o))
    elif isinstance(o, dict):
        out.append("{")
        first = True
        for k, v in o.items():
            if not isinstance(k, str):
                raise TypeError(f"JSON object keys must be str, not {type(k).__name__}: {k!r}")
            if not first:
                out.append(",")
            first = False
            out.append(_json.encode_basestring_ascii(k))
            out.append(":")
            _enc(v, out)
        out.append("}")
    elif isinstance(o, (list, tuple)):
        out.append("[")
        for i, v in enumerate(o):
            if i:
                out.append(",")
            _enc(v, out)
        out.append("]")
    else:
        raise TypeError(f"object of type {type(o).__name__} is not JSON serializable: {o!r}")


def dumps(o: object) -> str:
    """Compact JSON (``separators=(",", ":")``), ASCII-only like json.dumps's default."""
    out: list[str] = []
    _enc(o, out)
    return "".join(out)
