"""Kernel command line parsing into AgentConfig."""
import pytest

from agent import cmdline
from agent.cmdline import AgentConfig, CmdlineError, parse, split_kernel_words


def test_defaults_when_no_agent_keys():
    cfg = parse("console=ttyS0 quiet root=/dev/vda1")
    assert cfg == AgentConfig()
    assert cfg.server_addr == "vsock://-1:1024"
    assert cfg.ignored == ()


def test_kata_keys():
    cfg = parse(
        "console=hvc0 agent.server_addr=unix:///run/a.sock agent.log=debug "
        "agent.log_vport=1025 agent.container_pipe_size=65536 agent.hotplug_timeout=7 "
        "agent.debug_console agent.debug_console_vport=1026"
    )
    assert cfg.server_addr == "unix:///run/a.sock"
    assert cfg.log_level == "debug"
    assert cfg.log_vport == 1025
    assert cfg.container_pipe_size == 65536
    assert cfg.hotplug_timeout == 7.0
    assert cfg.debug_console is True
    assert cfg.debug_console_vport == 1026


def test_our_keys_and_dash_underscore_equivalence():
    cfg = parse("agent.daemon-uid=1000 agent.daemon_gid=1001 agent.run-dir=/run/x/ "
                "agent.modules=/lib/a.ko,/lib/b.ko agent.seccomp=off agent.oci_runtime=runc")
    assert (cfg.daemon_uid, cfg.daemon_gid) == (1000, 1001)
    assert cfg.run_dir == "/run/x"
    assert cfg.modules == ("/lib/a.ko", "/lib/b.ko")
    assert cfg.seccomp is False
    assert cfg.oci_runtime == "runc"


def test_channel_and_server_addr_precedence():
    assert parse("agent.channel=agent.channel.0").server_addr == \
        "serial:///dev/virtio-ports/agent.channel.0"
    both = "agent.server_addr=unix:///x agent.channel=p"
    assert parse(both).server_addr == "unix:///x"
    assert parse("agent.channel=p agent.server_addr=unix:///x").server_addr == "unix:///x"


def test_quoting_like_the_kernel():
    words = split_kernel_words('a="b c" "d=e f" g h="" -- agent.log=debug')
    assert words == [("a", "b c"), ("d", "e f"), ("g", None), ("h", "")]
    # everything after "--" belongs to init's argv, not to us
    assert parse('agent.log=warn -- agent.log=debug').log_level == "warn"
    assert parse('"agent.server_addr=unix:///a b"').server_addr == "unix:///a b"


def test_last_occurrence_wins():
    assert parse("agent.log=debug agent.log=error").log_level == "error"


def test_unknown_agent_keys_are_ignored_and_reported():
    cfg = parse("agent.log=info agent.frobnicate=3 agent.trace")
    assert cfg.ignored == ("agent.frobnicate=3", "agent.trace")
    assert cfg.log_level == "info"


@pytest.mark.parametrize("text,key", [
    ("agent.log_vport=abc", "log_vport"),
    ("agent.log_vport=-1", "log_vport"),
    ("agent.log=loud", "log"),
    ("agent.hotplug_timeout=soon", "hotplug_timeout"),
    ("agent.debug_console=maybe", "debug_console"),
    ("agent.server_addr=tcp://1.2.3.4:1", "server_addr"),
    ("agent.server_addr", "server_addr"),
    ("agent.run_dir=relative/dir", "run_dir"),
    ("agent.run_dir=/a/../b", "run_dir"),
    ("agent.modules=/a.ko,b.ko", "modules"),
    ("agent.daemon_uid=0", "daemon_uid"),
    ("agent.channel=../x", "channel"),
])
def test_bad_values_name_the_key(text, key):
    with pytest.raises(CmdlineError) as ei:
        parse(text)
    assert ei.value.key == key
    assert f"agent.{key}" in str(ei.value)


def test_read_file(tmp_path, capsys):
    p = tmp_path / "cmdline"
    p.write_text("BOOT_IMAGE=/vmlinuz agent.log=debug agent.what=1\n")
    cfg = cmdline.read(str(p))
    assert cfg.log_level == "debug"
    assert "agent.what=1" in capsys.readouterr().err


def test_read_real_proc_cmdline():
    cfg = cmdline.read()  # this host's kernel line has no agent.* keys of ours, or valid ones
    assert isinstance(cfg, AgentConfig)
