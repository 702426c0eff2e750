"""A node's life in the lab: backends that are down, SIGTERM while clients transfer, check/run errors.

These run node b's namespace with configs written per test, so each test owns its node.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy.lab.clients import NodeProcess, random_file, sha256_of

from .test_node_lab import has_address, slow_get, wait_for

pytestmark = pytest.mark.lab

CLIENT_CONNECT = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
start = time.monotonic()
data = s.recv(100)
print(repr(data), round(time.monotonic() - start, 3))
"""


def node_config(lab, tmp_path: Path, services: str, grace: str = "5s") -> Path:
    state = tmp_path / "node-b"
    path = tmp_path / "b.toml"
    path.write_text(f"""
[node]
name = "b"
interface = "eth0"
address = "{lab.addresses.service_b}/24"
state_dir = "{state}"
control = "{state}/control.sock"
grace = "{grace}"
{services}
""")
    return path


def lab_services(lab) -> str:
    return f"""
[[service]]
name = "smb"
protocol = "smb"
port = 445
backend = "{lab.addresses.server}:445"

[[service]]
name = "nfs"
protocol = "nfs"
port = 2049
backend = "{lab.addresses.server}:2049"
extra_ports = [111, 20048]
"""


def sockets_on(lab, ns: str, address: str) -> list[str]:
    out = lab.run(ns, ["ss", "-tanH"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if f"{address}:" in line and "TIME-WAIT" not in line]


def test_backend_down_closes_the_client_cleanly_and_is_counted(lab, tmp_path):
    config = node_config(lab, tmp_path, f"""
[[service]]
name = "refused"
protocol = "tcp"
port = 7001
backend = "{lab.addresses.server}:7"

[[service]]
name = "silent"
protocol = "tcp"
port = 7002
backend = "10.77.0.99:7"
connect_timeout = "500ms"
""")
    with NodeProcess(lab, "b", config, log=tmp_path / "node.log") as node:
        for port, most in ((7001, 1.0), (7002, 3.5)):
            cp = lab.run(lab.ns_client, [sys.executable, "-c", CLIENT_CONNECT, lab.addresses.service_b, str(port)],
                         capture_output=True, text=True, timeout=30)
            assert cp.returncode == 0, cp.stderr
            data, seconds = cp.stdout.split()
            assert data == "b''", "the client must see a clean EOF"
            assert float(seconds) < most
        services = {s["name"]: s for s in node.status()["services"]}
        assert services["refused"]["backend_failures"] == 1
        assert "refused" in services["refused"]["last_backend_error"].lower()
        assert services["silent"]["backend_failures"] == 1
        assert services["silent"]["connections_active"] == 0
        assert node.status()["state"] == "serving"
    assert node.proc.returncode == 0


def test_sigterm_lets_running_transfers_finish(lab, tmp_path):
    config = node_config(lab, tmp_path, lab_services(lab), grace="10s")
    src = random_file(tmp_path / "src.bin", 16 << 20)
    (lab.smb_share_path / "sigterm-finish.bin").write_bytes(src.read_bytes())
    node = NodeProcess(lab, "b", config, log=tmp_path / "node.log").start()
    try:
        out = tmp_path / "out.bin"
        client = slow_get(lab, lab.addresses.service_b, "sigterm-finish.bin", out, 8 << 20)
        assert wait_for(lambda: out.exists() and out.stat().st_size > (1 << 20), timeout=30)
        stopped_at = time.monotonic()
        node.signal(signal.SIGTERM)
        # new connections are refused at once, while the running transfer goes on
        assert wait_for(lambda: lab.run(lab.ns_client, [sys.executable, "-c", CLIENT_CONNECT,
                                                         lab.addresses.service_b, "445"],
                                        capture_output=True).returncode != 0, timeout=5)
        stdout, stderr = client.communicate(timeout=60)
        assert client.returncode == 0, stderr[-1000:]
        assert sha256_of(out) == sha256_of(src)
        assert node.proc.wait(15) == 0
        assert time.monotonic() - stopped_at < 10
    finally:
        node.kill()
    assert not has_address(lab, lab.ns_b, lab.addresses.service_b)
    assert sockets_on(lab, lab.ns_b, lab.addresses.service_b) == []
    log = (tmp_path / "node.log").read_text()
    assert "SIGTERM: stopping" in log and "waiting up to 10s for 1 open connection" in log


def test_sigterm_cuts_transfers_after_the_grace_time(lab, tmp_path):
    config = node_config(lab, tmp_path, lab_services(lab), grace="1s")
    src = random_file(tmp_path / "src.bin", 64 << 20)
    (lab.smb_share_path / "sigterm-cut.bin").write_bytes(src.read_bytes())
    node = NodeProcess(lab, "b", config, log=tmp_path / "node.log").start()
    try:
        out = tmp_path / "out.bin"
        client = slow_get(lab, lab.addresses.service_b, "sigterm-cut.bin", out, 4 << 20)
        assert wait_for(lambda: out.exists() and out.stat().st_size > (1 << 20), timeout=30)
        stopped_at = time.monotonic()
        node.signal(signal.SIGTERM)
        assert node.proc.wait(10) == 0
        assert 0.9 < time.monotonic() - stopped_at < 5
        _, stderr = client.communicate(timeout=60)
        assert client.returncode != 0, "a transfer longer than the grace time cannot have finished"
        assert out.stat().st_size < src.stat().st_size
    finally:
        node.kill()
    assert not has_address(lab, lab.ns_b, lab.addresses.service_b)
    assert sockets_on(lab, lab.ns_b, lab.addresses.service_b) == []
    assert "grace time over: 1 connection(s) cut" in (tmp_path / "node.log").read_text()


def test_second_signal_cuts_at_once(lab, tmp_path):
    config = node_config(lab, tmp_path, lab_services(lab), grace="30s")
    (lab.smb_share_path / "second-signal.bin").write_bytes(b"x" * (16 << 20))
    node = NodeProcess(lab, "b", config, log=tmp_path / "node.log").start()
    try:
        out = tmp_path / "out.bin"
        client = slow_get(lab, lab.addresses.service_b, "second-signal.bin", out, 1 << 20)
        assert wait_for(lambda: out.exists() and out.stat().st_size > (256 << 10), timeout=30)
        node.signal(signal.SIGTERM)
        time.sleep(0.3)
        assert node.proc.poll() is None, "the node must still be draining"
        node.signal(signal.SIGINT)
        assert node.proc.wait(5) == 0
        client.communicate(timeout=60)
    finally:
        node.kill()
    assert not has_address(lab, lab.ns_b, lab.addresses.service_b)


def run_cli(lab, ns: str, *args: str) -> subprocess.CompletedProcess:
    return lab.run(ns, [sys.executable, "-m", "proxy.cli", *args], capture_output=True, text=True, timeout=30)


def test_check_and_run_report_problems_with_key_paths(lab, tmp_path):
    good = node_config(lab, tmp_path, lab_services(lab))
    cp = run_cli(lab, lab.ns_b, "check", "-c", str(good))
    assert cp.returncode == 0 and "ok" in cp.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace('interface = "eth0"', 'interface = "eth9"')
                   .replace("port = 445", "port = 0"))
    for command in ("check", "run"):
        cp = run_cli(lab, lab.ns_b, command, "-c", str(bad))
        assert cp.returncode == 1
        lines = cp.stderr.strip().splitlines()
        # all at once: the config's problem does not hide the machine's
        assert lines[0] == "pairproxy: service[0].port: port 0 is outside 1-65535", lines
        assert lines[1].startswith("pairproxy: node.interface: no interface 'eth9'") and len(lines) == 2, lines
    bad.write_text(good.read_text().replace('interface = "eth0"', 'interface = "eth9"'))
    for command in ("check", "run"):
        cp = run_cli(lab, lab.ns_b, command, "-c", str(bad))
        assert cp.returncode == 1
        assert cp.stderr.startswith("pairproxy: node.interface: no interface 'eth9' in this network namespace")
        assert "Traceback" not in cp.stderr
    assert not has_address(lab, lab.ns_b, lab.addresses.service_b)


def test_port_in_use_and_second_node_fail_cleanly(lab, tmp_path):
    config = node_config(lab, tmp_path, lab_services(lab))
    with NodeProcess(lab, "b", config, log=tmp_path / "node.log"):
        cp = run_cli(lab, lab.ns_b, "run", "-c", str(config))
        assert cp.returncode == 1
        assert "node b is already running (its control socket" in cp.stderr
        other = tmp_path / "other.toml"
        other.write_text(config.read_text().replace("node-b", "node-b2"))
        cp = run_cli(lab, lab.ns_b, "run", "-c", str(other))
        assert cp.returncode == 1
        assert "another node serving" in cp.stderr and "Traceback" not in cp.stderr
        # the first node still serves
        assert lab.run(lab.ns_client, [sys.executable, "-c", CLIENT_CONNECT.replace("s.recv(100)", "b''"),
                                       lab.addresses.service_b, "445"]).returncode == 0
    assert not has_address(lab, lab.ns_b, lab.addresses.service_b)


def test_status_without_a_node(lab, tmp_path):
    config = node_config(lab, tmp_path, lab_services(lab))
    cp = run_cli(lab, lab.ns_b, "status", "-c", str(config), "--json")
    assert cp.returncode == 1
    assert "no such socket; is the node running?" in cp.stderr
