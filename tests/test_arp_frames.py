"""The ARP frames the node builds with struct are the ones scapy (the reference the node used to build
them with) makes, byte for byte; and the node's process does not import scapy (its import alone took
0.6-2 s of every start)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from scapy.layers.l2 import ARP, Ether

from proxy.arp import arp_probe_frame, gratuitous_arp, parse_arp_reply

CASES = [("02:77:00:00:00:0a", "10.77.0.1"), ("aa:bb:cc:dd:ee:ff", "192.168.255.254"), ("00:00:00:00:00:01", "1.0.0.0")]


@pytest.mark.parametrize("mac, ip", CASES)
def test_gratuitous_arp_is_scapys(mac, ip):
    want = bytes(Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=mac, psrc=ip, hwdst="00:00:00:00:00:00",
                                                                 pdst=ip))
    assert gratuitous_arp(mac, ip) == want


@pytest.mark.parametrize("mac, ip", CASES)
def test_arp_probe_is_scapys(mac, ip):
    want = bytes(Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=mac, psrc="0.0.0.0", pdst=ip))
    assert arp_probe_frame(mac, ip) == want


def test_a_reply_built_by_scapy_is_parsed():
    frame = bytes(Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01") /
                  ARP(op=2, hwsrc="02:00:00:00:00:02", psrc="10.0.0.2", hwdst="02:00:00:00:00:01", pdst="10.0.0.1"))
    assert parse_arp_reply(frame) == ("10.0.0.2", "02:00:00:00:00:02")
    assert parse_arp_reply(gratuitous_arp("02:00:00:00:00:02", "10.0.0.2")) is None  # a request, not a reply


def test_the_node_does_not_import_scapy():
    code = "import sys, proxy.node, proxy.cli; print(sorted(m for m in sys.modules if m.startswith('scapy')))"
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.strip() == "[]"
