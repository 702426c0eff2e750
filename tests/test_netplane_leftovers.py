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


SERVICE_ADDRESS = """
import ipaddress, subprocess
from proxy.netplane import NetworkError, ServiceAddress, RTM_NEWADDR

def shown():
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", "eth0"], capture_output=True, text=True).stdout
    return sorted(line.split()[3] for line in out.splitlines())

first = ServiceAddress("eth0", ipaddress.IPv4Interface("10.99.0.7/32")).open()
own = ServiceAddress("eth0", ipaddress.IPv4Interface("10.99.0.2/24")).open()
print("up", shown())
again = ServiceAddress("eth0", ipaddress.IPv4Interface("10.99.0.7/32")).open()   # already there: taken over
again.close()
first.close()                                                                   # gone already: quiet
own.close()
print("down", shown())
try:
    ServiceAddress("eth9", ipaddress.IPv4Interface("10.99.0.8/32")).open()
except NetworkError as exc:
    print("refused:", exc)
from proxy.netplane import change_address
print("no such index:", change_address(RTM_NEWADDR, 9999, ipaddress.IPv4Interface("10.99.0.9/32")))
"""


def test_a_service_address_is_added_and_removed_with_one_netlink_request_each(namespace):
    """ServiceAddress speaks rtnetlink itself (no pyroute2 on the takeover's path): the addresses appear
    as `ip` shows them, an address already there is taken over, removing one that is gone is quiet,
    and a kernel refusal is a NetworkError naming the address and the kernel's reason."""
    cp = subprocess.run(["ip", "netns", "exec", NS, sys.executable, "-c", SERVICE_ADDRESS], cwd=REPO,
                        capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr
    lines = cp.stdout.splitlines()
    assert lines[0] == "up ['10.99.0.2/24', '10.99.0.7/32']"
    assert lines[1] == "down []"
    assert lines[2] == "refused: no interface 'eth9' in this network namespace"
    assert lines[3] == "no such index: 19"  # ENODEV, the kernel's own answer
    assert "already on eth0 (left by an earlier run?)" in cp.stderr
