"""Digest strings: validation before any use in a path or URL, and hashing.

A digest from a manifest is attacker-controlled input.  It becomes part of
store paths and registry URLs, so it is checked against a strict grammar
(known algorithm, exact hex length, lowercase hex only) first.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from .errors import InvalidDigest

# Algorithm -> expected number of lowercase hex characters.
_ALGORITHMS: dict[str, int] = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True)
class Digest:
    """A validated `algorithm:hex` content digest."""

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @property
    def encoded(self) -> str:
        return str(self)

    def hasher(self) -> "hashlib._Hash":
        return hashlib.new(self.algorithm)

    def matches(self, data: bytes) -> bool:
        return hashlib.new(self.algorithm, data).hexdigest() == self.hex


def parse_digest(value: object, *, what: str = "digest") -> Digest:
    """Parse and validate `value`; `what` names the input in the error."""
    if not isinstance(value, str):
        raise InvalidDigest(f"{what}: expected a digest string, got {type(value).__name__} {value!r:.80}")
    algorithm, sep, hexpart = value.partition(":")
    if not sep:
        raise InvalidDigest(f"{what}: {value!r:.100} has no 'algorithm:' prefix")
    expected = _ALGORITHMS.get(algorithm)
    if expected is None:
        raise InvalidDigest(f"{what}: unsupported digest algorithm {algorithm!r:.40} in {value!r:.100}")
    if len(hexpart) != expected or not _HEX.fullmatch(hexpart):
        raise InvalidDigest(
            f"{what}: {value!r:.160} is not {expected} lowercase hex characters after '{algorithm}:'"
        )
    return Digest(algorithm, hexpart)


def validate_digest(value: object, *, what: str = "digest") -> str:
    """Return the digest string unchanged after validating it."""
    return str(parse_digest(value, what=what))


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chain_ids(diff_ids: list[str]) -> list[str]:
    """ChainIDs as defined by the OCI image spec (config.md, "Layer ChainID")."""
    out: list[str] = []
    for diff_id in diff_ids:
        validate_digest(diff_id, what="rootfs.diff_ids entry")
        if not out:
            out.append(diff_id)
        else:
            out.append(sha256_of(f"{out[-1]} {diff_id}".encode()))
    return out
