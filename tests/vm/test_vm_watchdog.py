"""agentctl vm's watchdog: a boot whose agent never answers is killed, retried once, and
reported with the reason and where to look."""
from __future__ import annotations

import pytest

from agentctl import vm


def test_a_guest_that_never_answers_is_retried_then_reported(guest_dir, tmp_path, monkeypatch):
    # The agent waits for a port name QEMU never offers, cannot open its channel and powers
    # the guest off: QEMU exits, each of the two attempts fails fast.
    cmdline = (vm.default_cmdline(guest_dir / "initrd.img")
               + " agent.server_addr=serial:///dev/virtio-ports/elsewhere")
    spec = vm.VMSpec(kernel=guest_dir / "vmlinux", initrd=guest_dir / "initrd.img",
                     cmdline=cmdline, accel="tcg", boot_timeout=60)
    # channel_cmdline would replace our server_addr: keep the command line as given
    monkeypatch.setattr(vm, "channel_cmdline", lambda c, ch: c)
    with pytest.raises(vm.VMError) as e:
        vm.up(spec, tmp_path)
    msg = str(e.value)
    assert "boot attempt 1 (tcg, virtio-serial) failed" in msg
    assert "boot attempt 2 (tcg, virtio-serial) failed" in msg
    assert "QEMU exited" in msg and "console.log" in msg
    assert vm.status(tmp_path)[0] == "absent"
    log = (tmp_path / "console.log").read_text(errors="replace")
    assert "cannot open the server endpoint" in log


def test_a_guest_that_hangs_is_killed_at_the_deadline(guest_dir, tmp_path, monkeypatch):
    # The agent serves on a unix socket inside the guest: from the host's side the guest runs
    # and never answers on its channel.
    cmdline = (vm.default_cmdline(guest_dir / "initrd.img")
               + " agent.server_addr=unix:///run/a.sock")
    spec = vm.VMSpec(kernel=guest_dir / "vmlinux", initrd=guest_dir / "initrd.img",
                     cmdline=cmdline, accel="tcg", boot_timeout=6)
    monkeypatch.setattr(vm, "channel_cmdline", lambda c, ch: c)
    with pytest.raises(vm.VMError, match="did not answer Check within 6s") as e:
        vm.up(spec, tmp_path, retries=0)
    assert "boot attempt 2" not in str(e.value)
    st = vm.load_state(tmp_path)
    assert st is None
