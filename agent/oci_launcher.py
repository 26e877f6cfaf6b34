"""OCI runtime bundle launcher: the runc of the guest (see agent/launcher/container.py).

Console script ``oci-launcher`` and ``python -m agent.oci_launcher``.
"""
from __future__ import annotations

import sys


def _add_site_packages() -> None:
    # Run as `python -I -S` (fast start) the venv's site-packages, where pyseccomp lives, is
    # not on sys.path, and without site.py sys.prefix is the base interpreter's: find the
    # venv from the interpreter path (its pyvenv.cfg) by hand instead of importing site.
    import os
    ver = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    for prefix in (os.path.dirname(os.path.dirname(sys.executable)), sys.prefix):
        sp = os.path.join(prefix, "lib", ver, "site-packages")
        if sp not in sys.path and os.path.isdir(sp):
            sys.path.append(sp)


def _cgroup_procs_writer(argv: list[str]) -> bool:
    """Whether this command will move a process by writing cgroup.procs: ``exec``, and
    ``create`` from a writable interpreter (it starts a sealed copy, see launcher/container.py).
    ``run``, and ``create`` from a read-only one, let the container's init join its cgroups
    itself without that write; warming would then only hold the cgroup lock they need."""
    cmd = next((a for a in argv if a in ("run", "create", "exec")), None)
    if cmd == "exec":
        return True
    if cmd == "create":
        from agent.launcher import selfexe
        return not selfexe.exe_is_protected()
    return False


def main() -> None:
    if _cgroup_procs_writer(sys.argv[1:]):
        # first, so that its grace period passes while we import (see launcher/cgwarm.py)
        from agent.launcher import cgwarm
        cgwarm.start()
    _add_site_packages()
    # No self re-exec here: only the processes that enter a container need a protected
    # executable, and container.py starts those from a sealed copy (launcher/selfexe.py).
    from agent.launcher import cli
    sys.stdout.flush()
    code = cli.main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter finalization (module teardown, GC: ~3-5 ms); nothing is left to flush.
    import os
    os._exit(code)


if __name__ == "__main__":
    main()
