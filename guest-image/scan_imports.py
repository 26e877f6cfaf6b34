"""Which stdlib modules the guest needs: run by Debian's python3.11, prints one name a line.

The guest carries only the stdlib modules the agent, the puller and their dependencies import.
Two sources, merged:

* every ``import`` statement in our own packages (``ast``, so imports inside functions, which
  the agent uses to stay small at start-up, count too);
* what importing all of our modules and the third-party packages actually pulls in
  (``sys.modules`` afterwards), which covers the dependencies' own import-time needs.

Names are top-level (``json``, ``email``, ``_ctypes``); packages are copied whole. Lazy imports
inside third-party code are not seen: add them to ``stdlib-extra.txt`` when a guest test finds one.

    /usr/bin/python3.11 -I -S guest-image/scan_imports.py SRC_ROOT SITE_PACKAGES PKG...
"""
from __future__ import annotations

import ast
import importlib
import os
import pkgutil
import sys
import sysconfig


def stdlib_dirs() -> tuple[str, str]:
    return sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib") + "/lib-dynload"


def imported_names(root: str) -> set[str]:
    """Top-level module names named by import statements in every .py file under root."""
    names: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            with open(os.path.join(dirpath, fn), "rb") as f:
                tree = ast.parse(f.read(), fn)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names


def is_stdlib(mod) -> bool:
    f = getattr(mod, "__file__", None)
    if not f:
        return False
    lib, dyn = stdlib_dirs()
    f = os.path.realpath(f)
    return (f.startswith(os.path.realpath(lib) + "/") and "/site-packages/" not in f
            and "/dist-packages/" not in f) or f.startswith(os.path.realpath(dyn) + "/")


def scan(src_root: str, site: str, ours: list[str], deps: list[str]) -> list[str]:
    sys.path[:0] = [src_root]
    sys.path.append(site)
    wanted = set()
    for pkg in ours:
        wanted |= imported_names(os.path.join(src_root, pkg))
    for name in sorted(wanted | set(deps)):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a platform-specific name (winreg, ...) or an optional dep
            pass
    for pkg in ours:
        mod = importlib.import_module(pkg)
        for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
            if info.name.endswith("__main__"):
                continue
            try:
                importlib.import_module(info.name)
            except Exception as e:  # noqa: BLE001
                print(f"scan: cannot import {info.name}: {e}", file=sys.stderr)
    out = set()
    for name, mod in list(sys.modules.items()):
        top = name.split(".")[0]
        if is_stdlib(mod):
            out.add(top)
    return sorted(out)


if __name__ == "__main__":
    src, site, *rest = sys.argv[1:]
    ours = [p for p in rest if not p.startswith("+")]
    deps = [p[1:] for p in rest if p.startswith("+")]
    for n in scan(src, site, ours, deps):
        print(n)
