"""Deferred imports: modules the daemon's libraries import but the daemon never runs.

``import trio`` alone pulls in ssl (and with it libssl and libcrypto), hmac and hashlib (for
DTLS), tempfile, bz2 and lzma (through ctypes.util and shutil); protobuf imports its pure-Python
backend even when the C one (upb) runs: several MiB of a daemon that serves ttRPC on a unix
socket, vsock or serial port and never touches TLS, hashes or archives. :func:`install` puts
a finder in front of the import system that, for a fixed list of names, creates the module
object and leaves its code unrun until an attribute other than the import system's own
(``__spec__``, ``__name__``, ``__path__`` ...) is read. ``import ssl`` then costs one empty
module object; ``ssl.SSLContext`` (or ``from ssl import SSLContext``) runs the module, once.

Unlike :class:`importlib.util.LazyLoader`, whose module runs on any attribute read, the
import system's own look-up of ``__spec__`` (done on the second ``import ssl`` anywhere)
does not run it: on Python 3.11 LazyLoader would materialise ssl as soon as trio's second
module importing it does so.

A deferred module that is needed after all still works where its file can be read; in the
confined daemon that is true in the guest (the interpreter's trees are readable) but not on
a development host whose interpreter lives under a private home directory. So the list
holds only what the daemon has no use for, and :func:`status` lets a test and GetMetrics
check that none of them ran.
"""

from __future__ import annotations

import os
import sys
from importlib.machinery import ModuleSpec, SourceFileLoader, SourcelessFileLoader
from types import ModuleType

# What the comms daemon defers: trio's TLS (ssl) and DTLS (hmac, hashlib) support and
# hostname encoding (idna: the daemon resolves no names), temporary files (tempfile, from
# ctypes.util), the compressors and pattern matching shutil offers (bz2, lzma, fnmatch),
# pickle, locale (subprocess's text mode), calendar (protobuf's Timestamp helpers),
# and ipaddress (urllib.parse, for pathlib).
# From protobuf, the pure-Python backend that descriptor_pool imports whichever backend runs
# (python_message brings text_format, the wire decoder and encoder, containers ...): with
# upb (the C backend, see api_implementation) messages, their text form and descriptors are C.
# Not here because the daemon uses them after confinement: shutil (rmtree), base64 and
# json_format (network and stats RPCs), datetime & co (confine.PRELOAD); nor inspect, dis,
# ast, subprocess, random, platform: trio and attrs use them while importing anyway.
DAEMON_DEFERRED = ("ssl", "hashlib", "hmac", "idna", "tempfile", "bz2", "lzma", "fnmatch",
                   "pickle", "locale", "calendar", "ipaddress",
                   "google.protobuf.internal.python_message", "google.protobuf.descriptor_database",
                   "google.protobuf.internal.python_edition_defaults", "google.protobuf.text_encoding")

# Deferred only where the code runs from bytecode alone (the guest's tree has no .py files):
# linecache opens a source file with tokenize for each traceback line it formats, and where
# the agent's sources exist (a development host) the confined daemon can read them but maybe
# not the interpreter's tokenize.py.
SOURCELESS_DEFERRED = ("tokenize",)


def daemon_deferred() -> tuple[str, ...]:
    """What the comms daemon defers here: DAEMON_DEFERRED, and SOURCELESS_DEFERRED when this
    module was loaded from bytecode without its source."""
    sourceless = not __file__.endswith(".py") and not os.path.exists(__file__[:-1])
    return DAEMON_DEFERRED + (SOURCELESS_DEFERRED if sourceless else ())


_IMPORT_ATTRS = frozenset({"__name__", "__spec__", "__loader__", "__package__", "__path__",
                           "__file__", "__cached__", "__builtins__"})


class _DeferredModule(ModuleType):
    """A module whose code has not run yet; reading a missing attribute runs it."""

    def __getattr__(self, name: str):
        # Only reached for attributes the module object lacks: the import system's own
        # (set at creation when they apply) are there, everything the module defines is not.
        # A probe for one of the import system's that does not apply (__path__ of a plain
        # module) is answered as the module would answer it, without running it.
        if name in _IMPORT_ATTRS:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        _materialise(self)
        return getattr(self, name)

    def __dir__(self):
        _materialise(self)
        return sorted(self.__dict__)


def _materialise(module: ModuleType) -> None:
    spec = module.__spec__
    loader = spec.loader_state
    # Back to a plain module first: the module's own code reads its globals through the
    # module object (and may import itself), which must not recurse into here.
    module.__class__ = ModuleType
    try:
        loader.exec_module(module)
    except BaseException:
        # It could not run (its file unreadable, its own imports failing): deferred again,
        # so every later use meets the same error instead of an empty module that other
        # modules already hold a reference to.
        module.__class__ = _DeferredModule
        raise
    spec.loader = loader
    spec.loader_state = None
    _FINDER.materialised.append(spec.name)


class _DeferredLoader:
    """Wraps the real loader: creation is immediate, execution waits for first use."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec: ModuleSpec):
        return None  # the default module object; __class__ is switched in exec_module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__.loader_state = self.loader
        module.__class__ = _DeferredModule


class DeferringFinder:
    """A meta path finder deferring the listed modules; records which ran after all."""

    def __init__(self) -> None:
        self.names: frozenset[str] = frozenset()
        self.materialised: list[str] = []

    def find_spec(self, name: str, path=None, target=None) -> ModuleSpec | None:
        if name not in self.names:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        # Only Python code (source or bytecode): extension modules build their module object
        # in create_module, and namespace packages have no code to defer.
        if not isinstance(loader, (SourceFileLoader, SourcelessFileLoader)):
            return spec
        spec.loader = _DeferredLoader(loader)
        return spec


_FINDER = DeferringFinder()


def install(names=None) -> DeferringFinder:
    """Defer ``names`` (default: :func:`daemon_deferred`) from now on, those not imported
    yet. Idempotent; returns the finder."""
    _FINDER.names = _FINDER.names | frozenset(daemon_deferred() if names is None else names)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    return _FINDER


def status() -> dict[str, str]:
    """Each deferred name: "deferred" (imported, never run), "loaded" (ran on first use),
    "eager" (was imported before install(), or is not deferrable) or "absent"."""
    out = {}
    for name in sorted(_FINDER.names):
        mod = sys.modules.get(name)
        if mod is None:
            out[name] = "absent"
        elif isinstance(mod, _DeferredModule):
            out[name] = "deferred"
        elif name in _FINDER.materialised:
            out[name] = "loaded"
        else:
            out[name] = "eager"
    return out
