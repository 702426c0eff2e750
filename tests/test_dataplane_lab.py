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
