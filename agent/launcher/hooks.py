"""OCI hooks: each runs with the container state JSON on stdin and its own timeout.

A failing prestart/createRuntime/createContainer/startContainer hook fails the operation;
poststart and poststop failures are only reported (the spec says they MUST be logged and the
operation continues).
"""
from __future__ import annotations

import os
import select

from .spec import Hook


class HookError(RuntimeError):
    pass


def run_hook(kind: str, hook: Hook, state_json: str) -> None:
    """Run one hook to completion; raise HookError on a non-zero exit, a signal or a timeout."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(r, 0)
            os.close(w)
            args = hook.args or [hook.path]
            os.execve(hook.path, args, dict(e.split("=", 1) for e in (hook.env or [])))
        except BaseException as e:  # noqa: BLE001 - report and leave the child
            os.write(2, f"hook {hook.path}: {e}\n".encode())
        os._exit(127)
    os.close(r)
    try:
        try:
            os.write(w, state_json.encode())
        except BrokenPipeError:
            pass  # the hook does not read its stdin; that is allowed
    finally:
        os.close(w)
    if hook.timeout:
        pfd = os.pidfd_open(pid)
        try:
            p = select.poll()
            p.register(pfd, select.POLLIN)
            if not p.poll(hook.timeout * 1000):
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                raise HookError(f"{kind} hook {hook.path}: timed out after {hook.timeout}s")
        finally:
            os.close(pfd)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise HookError(f"{kind} hook {hook.path} {hook.args or []}: "
                        + (f"exit status {code}" if code > 0 else f"killed by signal {-code}"))


def run_hooks(kind: str, hooks: list[Hook], state_json: str, fatal: bool = True) -> list[str]:
    """Run a hook list in order. Non-fatal kinds collect their errors instead of raising."""
    errors = []
    for h in hooks:
        try:
            run_hook(kind, h, state_json)
        except (HookError, OSError) as e:
            if fatal:
                raise HookError(str(e)) from None
            errors.append(str(e))
    return errors
