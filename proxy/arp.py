"""ARP on the service network: gratuitous announcements and "who holds this address?" probes.

Why ARP at all: when an address moves between nodes, clients still hold the old node's MAC in their
neighbour caches. A gratuitous ARP with the new holder's MAC updates the entries clients already
have (Linux accepts that with the default ``arp_accept=0``), so they reach the new holder at once
instead of after their caches expire. Before a node claims its own address it asks, with an ARP
probe (RFC 5227: sender address 0.0.0.0, so nobody learns from it), whether anyone else answers for
it: never two nodes serving one address.

Frames are built once with scapy (rare, crafted frames; its dissection is far too slow for any
per-packet path) and sent through an AF_PACKET socket bound to the interface.
"""

from __future__ import annotations

import functools
import os
import socket
import struct

import trio

ETH_P_ARP = 0x0806
BROADCAST = "ff:ff:ff:ff:ff:ff"


def _mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def _mac_str(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


#: an Ethernet header and an ARP request for IPv4 over Ethernet (RFC 826): built with struct, not scapy,
#: whose import alone took 0.6-2 s of every node start (the node imports nothing of scapy now)
_ARP_REQUEST = struct.Struct("!6s6sH HHBBH 6s4s6s4s")


def _arp_request(mac: str, sender_ip: str, target_ip: str) -> bytes:
    own = _mac_bytes(mac)
    return _ARP_REQUEST.pack(_mac_bytes(BROADCAST), own, ETH_P_ARP, 1, 0x0800, 6, 4, 1,
                             own, socket.inet_aton(sender_ip), bytes(6), socket.inet_aton(target_ip))


@functools.lru_cache(maxsize=16)
def gratuitous_arp(mac: str, ip: str) -> bytes:
    """A broadcast ARP request announcing ``ip`` is at ``mac`` (sender and target address both ``ip``)."""
    return _arp_request(mac, ip, ip)


def arp_probe_frame(mac: str, ip: str) -> bytes:
    """An RFC 5227 probe: who has ``ip``? Sender address 0.0.0.0, so no cache learns from it."""
    return _arp_request(mac, "0.0.0.0", ip)


def _packet_socket(ifname: str) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    try:
        sock._sock.bind((ifname, ETH_P_ARP))
    except OSError:
        sock.close()
        raise
    return sock


_SENDERS: dict[tuple[int, str], socket.socket] = {}


def _sender(ifname: str) -> socket.socket:
    """A packet socket that only sends (protocol 0: it receives nothing), one per network namespace and
    interface, kept open for the process's life. Why kept: binding or closing a packet socket waits for
    an RCU grace period in the kernel (``synchronize_net``: 10-25 ms measured under load, blocking the
    event loop), and a live move announces its address on the clients' critical path."""
    key = (os.stat("/proc/thread-self/ns/net").st_ino, ifname)
    sock = _SENDERS.get(key)
    if sock is None:
        sock = _SENDERS[key] = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_NONBLOCK, 0)
    return sock


def announce_now(ifname: str, mac: str, ip: str) -> None:
    """Send one gratuitous ARP for ``ip`` at ``mac`` before returning, without a turn of the event loop.

    Why synchronous: a live move lets its sockets go live right after the address is announced; a turn
    of a loaded event loop between the two cost 10-20 ms of every client's pause (measured), and going
    live first would let a client answered by the new holder send its next request to the old one."""
    _sender(ifname).sendto(gratuitous_arp(mac, ip), (ifname, ETH_P_ARP))


async def announce(ifname: str, mac: str, ip: str, count: int = 3, interval: float = 0.05, *,
                   already: int = 0) -> None:
    """Send ``count`` gratuitous ARPs for ``ip`` at ``mac``: the first at once, the rest spaced out
    (one frame may be lost; clients that were mid-retransmission pick up a later one). ``already``: how
    many were sent before (:func:`announce_now`); the rest follow ``interval`` apart."""
    frame = gratuitous_arp(mac, ip)
    sock = _sender(ifname)
    for i in range(already, count):
        if i:
            await trio.sleep(interval)
        while True:
            try:
                sock.sendto(frame, (ifname, ETH_P_ARP))
                break
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)


def parse_arp_reply(frame: bytes) -> tuple[str, str] | None:
    """(sender IP, sender MAC) of an ARP reply frame, else None."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x06":
        return None
    htype, ptype, hlen, plen, op = struct.unpack_from("!HHBBH", frame, 14)
    if (htype, ptype, hlen, plen, op) != (1, 0x0800, 6, 4, 2):
        return None
    return socket.inet_ntoa(frame[28:32]), _mac_str(frame[22:28])


async def who_has(ifname: str, mac: str, ip: str, timeout: float = 0.2, tries: int = 2) -> set[str]:
    """MACs that answer an ARP probe for ``ip`` on ``ifname`` within ``timeout`` (empty: nobody)."""
    frame = arp_probe_frame(mac, ip)
    answers: set[str] = set()
    with _packet_socket(ifname) as sock:
        for _ in range(tries):
            await sock.send(frame)
            with trio.move_on_after(timeout / tries):
                while True:
                    data = await sock.recv(2048)
                    reply = parse_arp_reply(data)
                    if reply and reply[0] == ip and reply[1] != mac:
                        answers.add(reply[1])
            if answers:
                break
    return answers
