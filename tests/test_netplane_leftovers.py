"""remove_leftovers removes only what a node makes: a macvlan on the service interface. Runs in a
network namespace of its own (created and removed here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
NS = f"{os.environ.get('PAIRPROXY_TEST_LAB', 'ppt')}-leftovers"

SCRIPT = """
import ipaddress, sys
from proxy.netplane import NetworkError, remove_leftovers
try:
    print(remove_leftovers("eth0", ipaddress.IPv4Interface("10.99.0.1/24"), sys.argv[1]))
except NetworkError as exc:
    print("refused:", exc)
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", "-n", NS, *args], check=True)


@pytest.fixture
def namespace():
    subprocess.run(["ip", "netns", "add", NS], check=True)
    try:
        ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
        ip("link", "set", "eth0", "up")
        yield
    finally:
        subprocess.run(["ip", "netns", "del", NS], check=True)


def run_in_ns(macvlan: str) -> str:
    return subprocess.run(["ip", "netns", "exec", NS, sys.executable, "-c", SCRIPT, macvlan], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout.strip()


def links() -> str:
    return subprocess.run(["ip", "-n", NS, "-o", "link"], capture_output=True, text=True, check=True).stdout


def test_only_a_macvlan_on_the_service_interface_is_removed(namespace):
    ip("link", "add", "pp-b", "link", "eth0", "type", "macvlan", "mode", "bridge")
    ip("link", "add", "pp-c", "link", "eth1", "type", "macvlan", "mode", "bridge")
    ip("link", "add", "pp-d", "type", "veth", "peer", "name", "pp-e")
    ip("addr", "add", "10.99.0.1/24", "dev", "eth0")
    assert run_in_ns("pp-d").startswith("refused: pp-d is a veth interface, not a macvlan; not removing it")
    assert run_in_ns("pp-c").startswith("refused: pp-c is a macvlan on another interface")
    assert " pp-d@" in links() and " pp-c@" in links()
    assert run_in_ns("pp-b") == "['macvlan pp-b', 'address 10.99.0.1 on eth0']"
    assert " pp-b@" not in links()


def test_check_names_a_macvlan_name_taken_by_another_interface(namespace):
    ip("link", "add", "pp-d", "type", "veth", "peer", "name", "pp-e")
    script = ("from proxy.preflight import environment_problems\n"
              "print([p for p in environment_problems({'node.interface': 'eth0', 'peer.macvlan': 'pp-d'})"
              " if p.startswith('peer.')])")
    out = subprocess.run(["ip", "netns", "exec", NS, sys.executable, "-c", script], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert "peer.macvlan: pp-d exists and is a veth interface, not a macvlan on eth0" in out, out
