"""One node per config (proxy.instance) and a control path that is not a socket (proxy.control):
pure file and socket logic, no kernel changes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import zlib

import pytest
import trio

from proxy.config import parse_config
from proxy.control import ControlError, bind_control_socket, control_path_problem
from proxy.instance import AlreadyRunning, InstanceLock, running_node


def config_in(tmp_path, control=None):
    # an address of its own per test directory: the abstract-socket lock is per network namespace
    n = zlib.crc32(str(tmp_path).encode())
    address = f"10.{200 + n % 50}.{n >> 8 & 255}.{1 + (n >> 16) % 250}"
    return parse_config({
        "node": {"name": "a", "interface": "lo", "address": f"{address}/24",
                 "state_dir": str(tmp_path / "state"), "control": str(control or tmp_path / "state" / "c.sock")},
        "service": [{"name": "t", "protocol": "tcp", "port": 8080, "backend": "10.99.0.10:80"}],
    })


def test_a_second_instance_is_refused_and_a_released_lock_is_free(tmp_path):
    config = config_in(tmp_path)
    assert running_node(config) is None
    with InstanceLock(config):
        assert (tmp_path / "state" / "lock").read_text().strip() == str(os.getpid())
        with pytest.raises(AlreadyRunning, match=rf"node a is already running \(pid {os.getpid()} holds "):
            InstanceLock(config).acquire()
        assert "node a is running: pid" in running_node(config)
    assert running_node(config) is None
    InstanceLock(config).acquire().release()


def test_a_copy_of_the_config_with_another_state_dir_is_refused_by_the_address(tmp_path):
    config = config_in(tmp_path)
    doc = config_doc(config)
    doc["node"].update(state_dir=str(tmp_path / "other"), control=str(tmp_path / "o.sock"))
    copy = parse_config(doc)
    with InstanceLock(config):
        with pytest.raises(AlreadyRunning, match=f"another node serving {config.node.address.ip}"):
            InstanceLock(copy).acquire()
        assert "a node serving" in running_node(copy)


def test_a_live_control_socket_means_running(tmp_path):
    config = config_in(tmp_path)
    config.node.state_dir.mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(config.node.control))
    listener.listen(1)
    try:
        assert "its control socket" in running_node(config)
        with pytest.raises(AlreadyRunning, match="its control socket .* answers"):
            InstanceLock(config).acquire()
    finally:
        listener.close()


def test_a_killed_holder_leaves_the_lock_free(tmp_path):
    """SIGKILL: the kernel drops the flock, so a killed node never blocks its restart or cleanup."""
    config = config_in(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from proxy.config import parse_config; from proxy.instance import InstanceLock\n"
        f"InstanceLock(parse_config({config_doc(config)!r})).acquire(); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert f"pid {holder.pid}" in running_node(config)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert running_node(config) is None


def config_doc(config) -> dict:
    return {"node": {"name": config.node.name, "interface": config.node.interface,
                     "address": str(config.node.address), "state_dir": str(config.node.state_dir),
                     "control": str(config.node.control)},
            "service": [{"name": "t", "protocol": "tcp", "port": 8080, "backend": "10.99.0.10:80"}]}


def test_an_unmakeable_state_dir_names_the_key(tmp_path):
    (tmp_path / "state").write_text("a file")
    with pytest.raises(OSError, match="node.state_dir: cannot create"):
        InstanceLock(config_in(tmp_path)).acquire()


async def _bind(path):
    bind_control_socket(path).close()


def test_control_at_an_existing_file_keeps_the_file(tmp_path):
    """Pointing ``control`` at the config must not delete the config: only a stale socket goes."""
    precious = tmp_path / "node.toml"
    precious.write_text("keep me")
    with pytest.raises(ControlError, match="exists and is a regular file, not a control socket"):
        trio.run(_bind, precious)
    assert precious.read_text() == "keep me"
    link = tmp_path / "link.sock"
    link.symlink_to(precious)
    assert "is a symlink" in control_path_problem(link)
    with pytest.raises(ControlError):
        trio.run(_bind, link)
    assert link.is_symlink() and precious.read_text() == "keep me"
    assert "is a directory" in control_path_problem(tmp_path)


def test_a_stale_control_socket_is_replaced(tmp_path):
    path = tmp_path / "c.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the socket file stays, nobody listens: a killed node's
    assert control_path_problem(path) is None

    async def bind_and_connect():
        sock = bind_control_socket(path)
        try:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.connect(str(path))
            probe.close()
        finally:
            sock.close()

    trio.run(bind_and_connect)
