"""Image reference parsing with Docker's normalisation rules.

`busybox` -> docker.io/library/busybox:latest (API host registry-1.docker.io),
`localhost:5000/x/y@sha256:...`, `[::1]:5000/img:tag`, ...
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .digest import validate_digest
from .errors import InvalidDigest, InvalidReference

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DOMAIN_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(
    rf"(?:{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*|\[[0-9a-fA-F:.]+\])(?::[0-9]{{1,5}})?"
)
_MAX_NAME = 255


@dataclass(frozen=True)
class Reference:
    """A parsed reference.  `registry` is the canonical name (docker.io)."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def api_host(self) -> str:
        """Host[:port] to talk HTTP to."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def selector(self) -> str:
        """What to put after /manifests/: the digest wins over the tag."""
        return self.digest or self.tag or "latest"

    def with_digest(self, digest: str) -> "Reference":
        return Reference(self.registry, self.repository, self.tag, validate_digest(digest))

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def _split_domain(name: str) -> tuple[str, str]:
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.lower() != first):
        return first, rest
    return DOCKER_HUB, name


def parse_reference(text: str) -> Reference:
    """Parse `text`; raise InvalidReference naming the offending part."""
    if not isinstance(text, str) or not text:
        raise InvalidReference(f"empty image reference {text!r}")
    if len(text) > 1024 or any(c.isspace() for c in text):
        raise InvalidReference(f"image reference {text[:120]!r} has whitespace or is too long")

    remainder, at, digest = text.partition("@")
    if at:
        try:
            digest = validate_digest(digest, what=f"digest of reference {text!r}")
        except InvalidDigest as exc:
            raise InvalidReference(str(exc)) from None
    else:
        digest = None

    # A tag is a ':' after the last '/', so a registry port is never taken for one.
    tag: str | None = None
    slash = remainder.rfind("/")
    colon = remainder.rfind(":")
    if colon > slash:
        remainder, tag = remainder[:colon], remainder[colon + 1:]
        if not _TAG.fullmatch(tag):
            raise InvalidReference(f"invalid tag {tag!r} in reference {text!r}")

    domain, path = _split_domain(remainder)
    if not _DOMAIN.fullmatch(domain):
        raise InvalidReference(f"invalid registry host {domain!r} in reference {text!r}")
    if domain in _HUB_ALIASES:
        domain = DOCKER_HUB
        if "/" not in path:
            path = f"library/{path}"
    if not path:
        raise InvalidReference(f"reference {text!r} has no repository name")
    for component in path.split("/"):
        if not _COMPONENT.fullmatch(component):
            raise InvalidReference(
                f"invalid repository component {component!r} in reference {text!r} "
                "(lowercase letters, digits and single separators only)"
            )
    if len(path) > _MAX_NAME:
        raise InvalidReference(f"repository name in {text[:80]!r}... is longer than {_MAX_NAME}")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(domain, path, tag, digest)
