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


def test_5000_short_nfs_connections_from_privileged_ports(lab, tmp_path):
    """NFS clients that connect, call, and close, 5,000 times within a minute through one node:
    every call answered by ganesha, although the node closes each backend leg first (TIME_WAIT)
    from one of only 359 source ports below 1024."""
    host, server = lab.addresses.service_a, lab.addresses.server
    config = node_config(lab, tmp_path, nfs_services(server))
    with NodeProcess(lab, "a", config=config, log=tmp_path / "node.log") as node:
        result = clients(lab, "--rpc", NFS3, "short", host, "2049", "5000", "16", timeout=120)
        assert result["ok"] == 5000, result
        assert result["seconds"] < 60, result
        nfs = service_status(node, "nfs")
        assert nfs["connections_total"] == 5000
        assert nfs["backend_failures"] == 0 and nfs["source_ports_exhausted"] == 0, nfs
        # the backend legs came from ports below 1024, most of them now in TIME_WAIT on the node
        out = lab.run(lab.ns_a, ["ss", "-tanH", "state", "time-wait", "dst", f"{server}:2049"],
                      capture_output=True, text=True).stdout
        ports = {int(line.split()[2].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}
        assert ports and max(ports) < 1024 and min(ports) >= 665
        assert len(ports) <= 359
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
