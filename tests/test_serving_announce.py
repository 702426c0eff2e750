"""proxy.serving: an address is announced before its service reports that it serves.

Why it matters: a live move (issue 11) lets its restored sockets go live the moment ``bring_up`` returns
(the address service has started). If the gratuitous ARP left only later, a client answered by the new
holder could send its next request to the old holder's MAC, where the address is gone: lost until the
client's retransmission timer. And a turn of the event loop before the first frame costs the clients'
pause 10-20 ms under load (measured), so the first frame leaves without one.

Namespace ``n`` on the tcprepair tests' bridge; a packet socket (ETH_P_ALL: it also sees outgoing frames)
on its ``eth0``; no await between ``nursery.start(service.run)`` returning and reading that socket.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time

import pytest
import trio

from proxy.arp import announce_now
from proxy.serving import AddressService
from tests.test_snooper import in_netns
from tests.test_tcprepair import namespaces, pair_lab  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, addresses)")

ADDRESS = "10.98.1.50"
ETH_P_ALL = 0x0003


def _arp_frames(sock: socket.socket) -> list[bytes]:
    frames = []
    while True:
        try:
            frame = sock.recv(2048)
        except BlockingIOError:
            return frames
        if frame[12:14] == b"\x08\x06":
            frames.append(frame)


def test_the_first_gratuitous_arp_has_left_when_the_service_reports_serving(namespaces):
    pair_lab(namespaces)
    mac = "02:00:00:11:22:33"
    seen: dict[str, list[bytes]] = {}

    async def main() -> None:
        service = AddressService(ipaddress.IPv4Interface(f"{ADDRESS}/24"), "eth0", (),
                                 announce_ifname="eth0", announce_mac=mac)
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            seen["at_start"] = _arp_frames(tap)   # no checkpoint since the service said it serves
            service.stop(0)

    with in_netns(namespaces["n"]):
        tap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.htons(ETH_P_ALL))
        try:
            tap.bind(("eth0", ETH_P_ALL))
            trio.run(main)
        finally:
            tap.close()
    frames = seen["at_start"]
    assert frames, "nothing announced yet when the service reported serving"
    frame = frames[0]
    assert frame[:6] == b"\xff" * 6 and frame[6:12] == bytes.fromhex(mac.replace(":", ""))
    assert frame[28:32] == frame[38:42] == socket.inet_aton(ADDRESS)      # sender and target: the address


def test_announcing_does_not_wait_for_the_kernel(namespaces):
    """Binding or closing a packet socket waits for an RCU grace period (synchronize_net: 10-25 ms measured
    under load), blocking the event loop on a live move's critical path: 50 announcements (one socket kept
    per namespace and interface) take well under that many grace periods."""
    pair_lab(namespaces)
    with in_netns(namespaces["n"]):
        announce_now("eth0", "02:00:00:11:22:33", ADDRESS)   # the first one makes the socket
        began = time.perf_counter()
        for _ in range(50):
            announce_now("eth0", "02:00:00:11:22:33", ADDRESS)
        took = time.perf_counter() - began
    assert took < 0.1, f"50 announcements took {took * 1000:.0f} ms"
