"""JSON straight over the C accelerator ``_json``, without the ``json`` package.

``json`` imports ``re`` (and with it ``enum``, ``functools``, ``collections``...): ~8 ms of the
launcher's start and ~1.3 MB of PID 1's resident memory, for number patterns the C scanner
does not use. The scanner and encoder here are the ones ``json`` itself runs, so accepted syntax
and output are the same (``dumps`` equals ``json.dumps(obj, separators=(",", ":"),
allow_nan=False)``, with ``ensure_ascii``, ``default`` and ``separators`` as there), except that
NaN and Infinity are refused both ways unless asked for: they are not JSON, and Go's decoder
(runc, containerd) refuses them too. Every decoding error is a :class:`JSONError` (a
ValueError) saying where the text went wrong. Used by the launcher, init and its helpers.
"""
from __future__ import annotations

import _json

_WS = " \t\n\r"


class JSONError(ValueError):
    """The text is not one JSON document; says where it stopped."""


class _Ctx:
    """The attributes _json.make_scanner reads from a json.JSONDecoder."""
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    memo: dict = {}

    @staticmethod
    def parse_constant(name: str):
        raise JSONError(f"{name} is not valid JSON")


_scan = _json.make_scanner(_Ctx())


def loads(text: str | bytes) -> object:
    if isinstance(text, (bytes, bytearray)):
        text = text.decode("utf-8")
    if text.startswith("\ufeff"):
        raise JSONError("unexpected UTF-8 BOM")
    i, n = 0, len(text)
    while i < n and text[i] in _WS:
        i += 1
    try:
        obj, end = _scan(text, i)
    except StopIteration as e:
        raise JSONError(f"expecting a value at char {e.value}") from None
    except (RecursionError, SystemError):
        # Nesting deeper than the recursion limit. The scanner's error report (which imports
        # json.decoder) can itself fail that deep and surface as a SystemError.
        raise JSONError("nested too deeply") from None
    except ValueError as e:
        raise JSONError(str(e)) from None
    finally:
        _Ctx.memo.clear()
    while end < n and text[end] in _WS:
        end += 1
    if end != n:
        raise JSONError(f"extra data at char {end}")
    return obj


def _no_default(o):
    raise TypeError(f"object of type {type(o).__name__} is not JSON serializable: {o!r}")


def _encoder(ensure_ascii: bool, default, separators: tuple[str, str], allow_nan: bool):
    return _json.make_encoder(
        None,  # no cycle check: what we encode are trees we built
        default or _no_default,
        _json.encode_basestring_ascii if ensure_ascii else _json.encode_basestring,
        None, separators[1], separators[0], False, False, allow_nan)


_COMPACT = (",", ":")
_plain = _encoder(True, None, _COMPACT, False)


def dumps(obj, *, ensure_ascii: bool = True, default=None,
          separators: tuple[str, str] = _COMPACT, allow_nan: bool = False) -> str:
    """JSON text of ``obj`` (dict, list, tuple, str, int, float, bool, None); compact and
    without NaN/Infinity unless asked."""
    if ensure_ascii and default is None and separators == _COMPACT and not allow_nan:
        enc = _plain
    else:
        enc = _encoder(ensure_ascii, default, separators, allow_nan)
    return "".join(enc(obj, 0))
