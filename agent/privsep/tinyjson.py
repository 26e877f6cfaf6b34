"""JSON for PID 1 straight over the C accelerator ``_json``, without the ``json`` package.

``json`` imports ``re`` (and with it ``enum``, ``functools``, ``collections``...): about 1.3 MB
of init's resident memory for number patterns the C scanner does not use. The C scanner and
encoder are the ones ``json`` itself runs, so the accepted syntax and the output are the same
(``dumps`` here equals ``json.dumps(obj, separators=(",", ":"), allow_nan=False)``, with
``ensure_ascii`` and ``default`` as there). Errors raise :class:`ValueError`; the scanner's own
error type (``json.JSONDecodeError``, a ValueError) loads ``json.decoder`` on that rare path.
"""
from __future__ import annotations

import _json

_WS = " \t\n\r"


class _Ctx:
    """The attributes _json.make_scanner reads from a decoder."""
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    memo: dict = {}

    @staticmethod
    def parse_constant(name: str):
        # NaN and Infinity are not JSON; json's decoder accepts them, this one does not.
        raise ValueError(f"{name} is not valid JSON")


_scan = _json.make_scanner(_Ctx())


def loads(s: str | bytes) -> object:
    if isinstance(s, (bytes, bytearray)):
        s = s.decode("utf-8")
    i, n = 0, len(s)
    while i < n and s[i] in _WS:
        i += 1
    try:
        obj, end = _scan(s, i)
    except StopIteration as e:
        raise ValueError(f"not JSON: expecting a value at char {e.value}") from None
    except (RecursionError, SystemError):
        # Nesting deeper than the recursion limit. The scanner's error report (which imports
        # json.decoder) can itself fail that deep and surface as a SystemError.
        raise ValueError("not JSON this side accepts: nested too deeply") from None
    while end < n and s[end] in _WS:
        end += 1
    if end != n:
        raise ValueError(f"not JSON: extra data at char {end}")
    return obj


def _no_default(o):
    raise TypeError(f"object of type {type(o).__name__} is not JSON serializable")


def _encoder(ensure_ascii: bool, default, separators: tuple[str, str], allow_nan: bool):
    return _json.make_encoder(
        None,  # no cycle check: init's messages are trees it built
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
