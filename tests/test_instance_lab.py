"""A second ``run`` and a ``cleanup`` of a running node leave it serving (issue 9 items 3 and 4).

Both used to remove the live node's address ("left by an earlier run") while it said ``serving``.
Node b of the lab's pair runs alone (its peer is down, so it claims its address after claim_wait).
"""

from __future__ import annotations

import sys

import pytest

from deploy.lab.clients import NodeProcess, serving

from .test_node_lab import has_address
from .test_node_lifecycle import CLIENT_CONNECT, run_cli

pytestmark = pytest.mark.lab


def client_connects(lab) -> bool:
    return lab.run(lab.ns_client, [sys.executable, "-c", CLIENT_CONNECT.replace("s.recv(100)", "b''"),
                                   lab.addresses.service_b, "445"], capture_output=True).returncode == 0


@pytest.fixture
def lone_b(lab, tmp_path):
    node = NodeProcess(lab, "b", pair=True, log=tmp_path / "b.log")
    with node:
        node.wait_for(serving(lab.addresses.service_b, "b"), timeout=15, what="b serving its address")
        assert has_address(lab, lab.ns_b, lab.addresses.service_b) and client_connects(lab)
        yield node


def test_a_second_run_leaves_the_running_node_serving(lab, lone_b, tmp_path):
    cp = run_cli(lab, lab.ns_b, "run", "-c", str(lone_b.config))
    assert cp.returncode == 1, cp.stderr
    assert "node b is already running" in cp.stderr and "not touching its address" in cp.stderr, cp.stderr
    assert "removed" not in cp.stderr and "Traceback" not in cp.stderr
    # a copy of the config with its own state_dir and control socket is caught by the address
    copy = tmp_path / "copy.toml"
    copy.write_text(lone_b.config.read_text().replace("pair-node-b", "copy-node-b"))
    cp = run_cli(lab, lab.ns_b, "run", "-c", str(copy))
    assert cp.returncode == 1 and f"another node serving {lab.addresses.service_b}" in cp.stderr, cp.stderr
    assert has_address(lab, lab.ns_b, lab.addresses.service_b)
    assert client_connects(lab)
    assert lone_b.proc.poll() is None and serving(lab.addresses.service_b, "b")(lone_b.status())


def test_cleanup_refuses_while_the_node_runs(lab, lone_b):
    cp = run_cli(lab, lab.ns_b, "cleanup", "-c", str(lone_b.config))
    assert cp.returncode == 1, cp.stdout
    assert "node b is running" in cp.stderr and "--force" in cp.stderr, cp.stderr
    assert has_address(lab, lab.ns_b, lab.addresses.service_b) and client_connects(lab)
    assert serving(lab.addresses.service_b, "b")(lone_b.status())


def test_cleanup_after_a_kill_and_force(lab, tmp_path):
    node = NodeProcess(lab, "b", pair=True, log=tmp_path / "b.log").start()
    try:
        node.wait_for(serving(lab.addresses.service_b, "b"), timeout=15, what="b serving its address")
    finally:
        node.kill()  # SIGKILL: the address stays in the kernel, the lock goes with the process
    assert has_address(lab, lab.ns_b, lab.addresses.service_b)
    cp = run_cli(lab, lab.ns_b, "cleanup", "-c", str(node.config))
    assert cp.returncode == 0 and f"address {lab.addresses.service_b} on eth0" in cp.stdout, cp.stderr
    assert not has_address(lab, lab.ns_b, lab.addresses.service_b)
    cp = run_cli(lab, lab.ns_b, "cleanup", "--force", "-c", str(node.config))
    assert cp.returncode == 0 and "nothing left behind" in cp.stdout
