"""Platforms (os/architecture/variant) and matching index entries to one."""
from __future__ import annotations

import platform as _platform
from dataclasses import dataclass

from .errors import PullError

_MACHINE_TO_GO = {
    "x86_64": ("amd64", ""), "amd64": ("amd64", ""),
    "aarch64": ("arm64", "v8"), "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"), "armv5tel": ("arm", "v5"),
    "i386": ("386", ""), "i686": ("386", ""),
    "ppc64le": ("ppc64le", ""), "s390x": ("s390x", ""), "riscv64": ("riscv64", ""),
}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> "Platform":
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise PullError(f"platform {text!r} is not os/arch[/variant]")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    @classmethod
    def host(cls) -> "Platform":
        arch, variant = _MACHINE_TO_GO.get(_platform.machine(), (_platform.machine(), ""))
        return cls("linux", arch, variant)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def matches(self, entry: dict | None) -> bool:
        """Does an index entry's `platform` object satisfy this platform?"""
        if not isinstance(entry, dict):
            return False
        if entry.get("os") != self.os or entry.get("architecture") != self.architecture:
            return False
        have = entry.get("variant") or ""
        if not self.variant or have == self.variant:
            return True
        # arm64 images mostly omit the (only) variant v8.
        return self.architecture == "arm64" and {have, self.variant} <= {"", "v8"}
