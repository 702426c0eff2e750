"""The data path of one node against real servers (lab, root): where each port goes, source ports
for NFS, many connections.

Each test starts node a with a config of its own (written here from the lab's addresses), so that
ports, ``secure`` and backends can differ from the lab's a.toml.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.lab.clients import SCRIPTS, NodeProcess

pytestmark = pytest.mark.lab

TCP_CLIENTS = SCRIPTS / "tcp_clients.py"
NFS3 = "100003:3"


def node_config(lab, tmp_path: Path, services: str) -> Path:
    """A node-a config serving ``services`` (TOML [[service]] tables) on the lab's address a."""
    a = lab.addresses
    state = tmp_path / "node-state"
    state.mkdir(exist_ok=True)
    path = tmp_path / "a.toml"
    path.write_text(f"""[node]
name = "a"
interface = "eth0"
address = "{a.service_a}/{a.prefixlen}"
state_dir = "{state}"
control = "{state / 'control.sock'}"
grace = "2s"
{services}""")
    return path


def service_status(node: NodeProcess, name: str) -> dict:
    return next(s for s in node.status()["services"] if s["name"] == name)


def clients(lab, *args: str, timeout: float = 120) -> dict:
    """tcp_clients.py in the client namespace; its JSON result."""
    cp = lab.run(lab.ns_client, [sys.executable, str(TCP_CLIENTS), *args],
                 capture_output=True, text=True, timeout=timeout)
    assert cp.returncode == 0, cp.stderr[-2000:]
    return json.loads(cp.stdout.splitlines()[-1])


def test_backend_port_from_config(lab, tmp_path):
    """The main port goes to the port in ``backend``, extra ports keep their numbers; a backend
    port nothing listens on is a counted backend failure (not silently the client's port)."""
    server = lab.addresses.server
    config = node_config(lab, tmp_path, f"""
[[service]]
name = "smb-alt"
protocol = "tcp"
port = 4450
backend = "{server}:445"
extra_ports = [2049]

[[service]]
name = "nowhere"
protocol = "tcp"
port = 445
backend = "{server}:4999"
""")
    with NodeProcess(lab, "a", config=config, log=tmp_path / "node.log") as node:
        host = lab.addresses.service_a
        cp = lab.run(
            lab.ns_client, ["smbclient", f"//{host}/{lab.smb_share}", "-p", "4450", "-s", str(lab.smb_client_conf),
                            "-U", f"{lab.smb_user}%{lab.smb_password}", "-m", "SMB3", "-c", "get hello.txt -"],
            capture_output=True, text=True, timeout=60)
        assert cp.returncode == 0, cp.stdout + cp.stderr
        assert (lab.smb_share_path / "hello.txt").read_text() in cp.stdout
        # the extra port 2049 reaches ganesha's 2049, not the backend's 445
        assert clients(lab, "--rpc", NFS3, "short", host, "2049", "3", "1")["ok"] == 3

        # port 445 of the "nowhere" service must go to :4999 where nothing listens (the old code
        # went to the server's 445, where smbd answers)
        result = clients(lab, "short", host, "445", "2", "1")
        assert result["ok"] == 0
        nowhere = service_status(node, "nowhere")
        assert nowhere["backend_failures"] == 2
        assert f"{server}:4999" in nowhere["last_backend_error"]
        assert service_status(node, "smb-alt")["backend_failures"] == 0
    assert "Traceback" not in (tmp_path / "node.log").read_text()


def nfs_services(server: str, secure: bool | None = None) -> str:
    return f"""
[[service]]
name = "nfs"
protocol = "nfs"
port = 2049
backend = "{server}:2049"
""" + ("" if secure is None else f"secure = {str(secure).lower()}\n")


def time_wait_ports(lab, dst: str) -> set[int]:
    """Local ports of node a's TIME_WAIT connections to ``dst``."""
    out = lab.run(lab.ns_a, ["ss", "-tanH", "state", "time-wait", "dst", dst], capture_output=True, text=True).stdout
    return {int(line.split()[2].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}


def test_5000_short_nfs_connections_from_privileged_ports(lab, tmp_path):
    """NFS clients that connect, call, and close, 5,000 times within a minute through one node:
    every call answered by ganesha, although the node closes each backend leg first (TIME_WAIT)
    from one of only 359 source ports below 1024."""
    host, server = lab.addresses.service_a, lab.addresses.server
    config = node_config(lab, tmp_path, nfs_services(server))
    with NodeProcess(lab, "a", config=config, log=tmp_path / "node.log") as node:
        before = time_wait_ports(lab, f"{server}:2049")   # earlier tests' (other services) may linger
        result = clients(lab, "--rpc", NFS3, "short", host, "2049", "5000", "16", timeout=120)
        assert result["ok"] == 5000, result
        assert result["seconds"] < 60, result
        nfs = service_status(node, "nfs")
        assert nfs["connections_total"] == 5000
        assert nfs["backend_failures"] == 0 and nfs["source_ports_exhausted"] == 0, nfs
        # the backend legs came from ports below 1024, many of them now in TIME_WAIT on the node
        ports = time_wait_ports(lab, f"{server}:2049")
        assert all(665 <= p < 1024 for p in ports - before), sorted(ports - before)
        assert 100 < len({p for p in ports if p < 1024}) <= 359
    assert "Traceback" not in (tmp_path / "node.log").read_text()


def hold(lab, host: str, port: int, count: int, *rpc: str) -> subprocess.Popen:
    return lab.popen(lab.ns_client, [sys.executable, str(TCP_CLIENTS), *rpc, "hold", host, str(port), str(count)],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def release(proc: subprocess.Popen) -> dict:
    """Tell a ``hold`` client to make one more call on each connection and close them cleanly."""
    out, err = proc.communicate("\n", timeout=120)
    assert proc.returncode == 0, err[-2000:]
    return json.loads(out.splitlines()[-1])


def test_concurrent_nfs_connections(lab, tmp_path):
    """2,000 NFS connections open at once through one node with ``secure = false``; a ``secure``
    service serves as many as there are ports below 1024 and refuses the rest cleanly, counted,
    with the reason in status."""
    host, server = lab.addresses.service_a, lab.addresses.server
    config = node_config(lab, tmp_path, nfs_services(server, secure=False) + f"""
[[service]]
name = "nfs-secure"
protocol = "nfs"
port = 12049
backend = "{server}:2049"
extra_ports = []
""")
    with NodeProcess(lab, "a", config=config, log=tmp_path / "node.log") as node:
        many = hold(lab, host, 2049, 2000, "--rpc", NFS3)
        try:
            opened = json.loads(many.stdout.readline())
            assert opened["open"] == 2000, opened
            assert service_status(node, "nfs")["connections_active"] == 2000
            assert release(many)["closed_cleanly"] == 2000
        finally:
            many.kill()
            many.wait()

        secure = hold(lab, host, 12049, 400, "--rpc", NFS3)
        try:
            opened = json.loads(secure.stdout.readline())
            assert opened["open"] == 359 and opened["failed"] == 41, opened
            status = service_status(node, "nfs-secure")
            assert status["source_ports_exhausted"] == 41 and status["backend_failures"] == 41
            assert "no free source port below 1024" in status["last_backend_error"]
            assert release(secure)["closed_cleanly"] == 359
        finally:
            secure.kill()
            secure.wait()
        # the ports are free again once those connections ended
        node.wait_for(lambda s: all(x["connections_active"] == 0 for x in s["services"]), 10, "all closed")
        assert clients(lab, "--rpc", NFS3, "short", host, "12049", "50", "50")["ok"] == 50
    assert "Traceback" not in (tmp_path / "node.log").read_text()


@pytest.fixture
def echo_server(lab):
    """An echo server on the lab server's port 7777 (tcp_clients.py echo-server), stopped after."""
    proc = lab.popen(lab.ns_server, [sys.executable, str(TCP_CLIENTS), "echo-server", lab.addresses.server, "7777"],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-1000:]
        yield f"{lab.addresses.server}:7777"
    finally:
        proc.kill()
        proc.wait(10)


def echo_service(backend: str) -> str:
    return f'\n[[service]]\nname = "echo"\nprotocol = "tcp"\nport = 7777\nbackend = "{backend}"\n'


def fds_of(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def rss_kib(pid: int) -> int:
    line = next(l for l in Path(f"/proc/{pid}/status").read_text().splitlines() if l.startswith("VmRSS:"))
    return int(line.split()[1])


def test_9000_idle_connections(lab, tmp_path, echo_server):
    """9,000 connections open at once through one node (hard limit 20,000 descriptors): all served,
    two descriptors each while idle, all closed cleanly, nothing left behind."""
    config = node_config(lab, tmp_path, echo_service(echo_server))
    host = lab.addresses.service_a
    with NodeProcess(lab, "a", config=config, log=tmp_path / "node.log") as node:
        fds_before, rss_before = fds_of(node.pid), rss_kib(node.pid)
        many = hold(lab, host, 7777, 9000)
        try:
            opened = json.loads(many.stdout.readline())
            assert opened["open"] == 9000, opened
            echo = service_status(node, "echo")
            assert echo["connections_active"] == 9000 and not echo["fd_limit_paused"], echo
            per_connection = (fds_of(node.pid) - fds_before) / 9000
            assert per_connection <= 2.02, per_connection
            print(f"\n9000 idle: {opened['seconds']} s to open, {per_connection:.3f} fds and "
                  f"{(rss_kib(node.pid) - rss_before) / 9000:.1f} KiB RSS per connection")
            closed = release(many)
            assert closed["closed_cleanly"] == 9000, closed
        finally:
            many.kill()
            many.wait()
        node.wait_for(lambda s: service_status_in(s, "echo")["connections_active"] == 0, 30, "all closed")
        echo = service_status(node, "echo")
        assert echo["connections_reset"] == 0 and echo["backend_failures"] == 0 and echo["fd_errors"] == 0
        # what the connections held is closed again (a few idle pipes may stay for the next reads)
        assert fds_of(node.pid) <= fds_before + 64
    log = (tmp_path / "node.log").read_text()
    assert "Traceback" not in log and "Too many open files" not in log


def service_status_in(status: dict, name: str) -> dict:
    return next(s for s in status["services"] if s["name"] == name)


def test_near_the_descriptor_limit_clients_wait_instead_of_reset(lab, tmp_path, echo_server):
    """With a low descriptor limit the node stops accepting (status says so) and the clients beyond
    it wait in the listen backlog; when earlier connections end, they are served. None is reset."""
    config = node_config(lab, tmp_path, echo_service(echo_server))
    host = lab.addresses.service_a
    with NodeProcess(lab, "a", config=config, log=tmp_path / "node.log") as node:
        subprocess.run(["prlimit", f"--pid={node.pid}", "--nofile=600:600"], check=True)
        first = hold(lab, host, 7777, 150)
        second = None
        try:
            assert json.loads(first.stdout.readline())["open"] == 150
            second = hold(lab, host, 7777, 200)
            status = node.wait_for(lambda s: service_status_in(s, "echo")["fd_limit_paused"], 20, "paused")
            echo = service_status_in(status, "echo")
            waiting = 350 - echo["connections_active"]
            assert echo["fd_limit_pauses"] == 1 and 20 <= waiting < 200, echo
            assert release(first)["closed_cleanly"] == 150
            opened = json.loads(second.stdout.readline())      # the waiting ones are served now
            assert opened["open"] == 200, opened
            assert not service_status(node, "echo")["fd_limit_paused"]
            assert release(second)["closed_cleanly"] == 200
        finally:
            for proc in (first, second):
                if proc is not None:
                    proc.kill()
                    proc.wait()
        echo = service_status(node, "echo")
        assert echo["connections_reset"] == 0 and echo["fd_errors"] == 0 and echo["backend_failures"] == 0
    log = (tmp_path / "node.log").read_text()
    assert "not accepting until connections end" in log
    assert "Traceback" not in log and "Too many open files" not in log
