"""Agent addresses and the transports behind them."""

from __future__ import annotations

import errno
import os
import socket
import sys

import pytest
import trio

sys.path.insert(0, os.path.dirname(__file__))
from echo_service import SERVICE, make_server  # noqa: E402

from agent.ttrpc import AddressError, listen_socket, open_client, parse_address, serve_serial  # noqa: E402
from agent.ttrpc.transport import VMADDR_CID_ANY  # noqa: E402
from agent.ttrpc.ttrpc_pb2 import KeyValue  # noqa: E402


@pytest.mark.parametrize("addr,scheme,cid,port,path", [
    ("vsock://-1:1024", "vsock", VMADDR_CID_ANY, 1024, ""),
    ("vsock://3:5000", "vsock", 3, 5000, ""),
    ("vsock://2", "vsock", 2, 1024, ""),
    ("vsock://4294967295:1", "vsock", VMADDR_CID_ANY, 1, ""),
    ("unix:///run/agent.sock", "unix", 0, 0, "/run/agent.sock"),
    ("unix://@kata-agent", "unix", 0, 0, "\0kata-agent"),
    ("serial:///dev/virtio-ports/agent.channel.0", "serial", 0, 0, "/dev/virtio-ports/agent.channel.0"),
    ("hvsock:///run/vm/kata.hvsock:1024", "hvsock", 0, 1024, "/run/vm/kata.hvsock"),
    ("hvsock:///run/vm/kata.hvsock", "hvsock", 0, 1024, "/run/vm/kata.hvsock"),
])
def test_parse_good(addr, scheme, cid, port, path):
    a = parse_address(addr)
    assert (a.scheme, a.cid, a.port, a.path) == (scheme, cid, port, path)
    assert parse_address(str(a)) == a


@pytest.mark.parametrize("addr,why", [
    ("", "SCHEME"), ("/tmp/x.sock", "SCHEME"), ("tcp://1.2.3.4:5", "unknown scheme"),
    ("vsock://", "missing CID"), ("vsock://x:1", "not a decimal"), ("vsock://3:", "empty port"),
    ("vsock://3:99999999999", "out of range"), ("vsock://-2:1", "out of range"),
    ("unix://relative/path", "absolute"), ("unix://@", "empty abstract"),
    ("unix:///" + "a" * 200, "longer than"), ("serial://dev/ttyS0", "absolute"),
    ("unix:///tmp/a\0b", "NUL"),
])
def test_parse_bad_says_why(addr, why):
    with pytest.raises(AddressError) as ei:
        parse_address(addr)
    assert why in str(ei.value)
    assert repr(addr)[:20].strip("'") in str(ei.value) or addr == ""


def test_listen_refuses_to_remove_a_non_socket(tmp_path):
    victim = tmp_path / "important"
    victim.write_text("data")
    with pytest.raises(AddressError):
        listen_socket(f"unix://{victim}")
    assert victim.read_text() == "data"


def test_listen_replaces_a_stale_socket(tmp_path):
    path = str(tmp_path / "s.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()  # leaves the file behind, as a crashed agent would
    l2 = listen_socket(f"unix://{path}")
    l2.close()


def test_vsock_socket_setup():
    """AF_VSOCK listening: bound to (CID, port) as parsed. The test host has no vhost-vsock
    and no vsock loopback, so only socket creation and bind are checked here; the VM
    end-to-end tests cover traffic."""
    try:
        s = listen_socket("vsock://-1:0")  # port 0: let the kernel pick (VMADDR_PORT_ANY is -1)
    except OSError as exc:
        if exc.errno in (errno.EAFNOSUPPORT, errno.ENODEV, errno.EADDRNOTAVAIL, errno.ESOCKTNOSUPPORT):
            pytest.skip(f"this kernel offers no AF_VSOCK transport to bind: {exc}")
        raise
    try:
        assert s.family == socket.AF_VSOCK
        cid, port = s.getsockname()
        assert cid == VMADDR_CID_ANY
    finally:
        s.close()


def _pty():
    master, slave = os.openpty()
    return master, os.ttyname(slave), slave


def _host_call(master: int, key: str) -> str:
    """The host side of a serial port: a raw ttRPC call written to the pty master."""
    import struct

    from agent.ttrpc.ttrpc_pb2 import Request, Response

    payload = Request(service=SERVICE, method="Echo", payload=KeyValue(key=key).SerializeToString()).SerializeToString()
    os.write(master, struct.pack(">IIBB", len(payload), 1, 1, 0) + payload)
    buf = b""
    while len(buf) < 10:
        buf += os.read(master, 65536)
    n = struct.unpack(">I", buf[:4])[0]
    while len(buf) < 10 + n:
        buf += os.read(master, 65536)
    return KeyValue.FromString(Response.FromString(buf[10:10 + n]).payload).key


def test_serial_port_survives_host_reconnecting(tmp_path):
    """A pty stands in for /dev/virtio-ports/NAME: the agent opens the path, serves one
    connection, and when the host side goes away and comes back (a new pty behind the same
    path) it serves again."""
    import tty

    link = tmp_path / "agent.channel.0"
    m1, name1, s1 = _pty()
    tty.setraw(m1)
    os.symlink(name1, link)
    server = make_server()

    async def main():
        with trio.fail_after(20):
            async with trio.open_nursery() as n:
                await n.start(serve_serial, server, str(link))
                assert await trio.to_thread.run_sync(_host_call, m1, "first") == "first"
                assert await trio.to_thread.run_sync(_host_call, m1, "again") == "again"
                # host goes away: the old pty dies, a new one appears at the same path
                os.close(s1)
                os.close(m1)
                m2, name2, s2 = _pty()
                tty.setraw(m2)
                os.unlink(link)
                os.symlink(name2, link)
                assert await trio.to_thread.run_sync(_host_call, m2, "reconnected") == "reconnected"
                n.cancel_scope.cancel()
                os.close(m2)
                os.close(s2)

    trio.run(main)
    assert server.stats.connections >= 2
