"""The SYNs new clients sent to the peer's address while it was dying: answered at the takeover.

Why (issue 10, behaviour 3): a client that connects during the outage (the peer dead, this node not yet
holding its address) sends a SYN nobody answers; its kernel retransmits it only after 1 s (RFC 6298's
initial RTO), then 3 s, so a new client waits a second or more although the takeover took 150 ms. The
standby receives the frames destined to the peer (patent element 310), those SYNs included: it keeps the
recent ones (sans-I/O, here) and, once it holds the address, hands each to its own kernel as if it had
just arrived (:func:`inject`, a raw IP socket: a packet sent to a local address is looped back into the
input path with its source kept), so the listener answers at once with a SYN-ACK and the client's
connection completes without waiting for its timer.

A SYN is forgotten when a later segment of the same client port shows the handshake went on (the peer
answered it before dying), and after ``keep`` seconds; at most ``limit`` are kept (a SYN flood costs a
bounded table). A replayed SYN that is stale after all is harmless: the client answers an unexpected
SYN-ACK with a reset.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections import OrderedDict

from protocols.frames import with_tcp_checksum

log = logging.getLogger("pairproxy.synlog")

_SYN, _ACK, _RST, _FIN = 0x02, 0x10, 0x04, 0x01


class SynLog:
    """Recent unanswered SYNs to ``address`` on ``ports``: fed Ethernet frames, asked for IPv4 packets."""

    def __init__(self, address: str, ports: list[int], *, keep: float = 3.0, limit: int = 1024):
        self.address = socket.inet_aton(address)
        self.ports = frozenset(ports)
        self.keep = keep
        self.limit = limit
        self._syns: OrderedDict[tuple[bytes, int, int], tuple[float, bytes]] = OrderedDict()
        self.seen = 0
        self.handed: list[tuple[str, int, int]] = []

    def on_frame(self, frame: bytes | memoryview, ts: float) -> None:
        """One captured Ethernet frame (anything that is not a TCP segment to ``address`` is ignored)."""
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            return
        ihl = (frame[14] & 0x0F) * 4
        if frame[23] != socket.IPPROTO_TCP or frame[30:34] != self.address or len(frame) < 14 + ihl + 20:
            return
        tcp = 14 + ihl
        sport, dport = struct.unpack_from("!HH", frame, tcp)
        if dport not in self.ports:
            return
        key = (bytes(frame[26:30]), sport, dport)
        flags = frame[tcp + 13]
        if flags & (_SYN | _ACK | _RST | _FIN) == _SYN:
            total = struct.unpack_from("!H", frame, 16)[0]
            self._syns.pop(key, None)
            self._syns[key] = (ts, bytes(frame[14:14 + total]))
            self.seen += 1
            while len(self._syns) > self.limit:
                self._syns.popitem(last=False)
        elif self._syns:
            self._syns.pop(key, None)  # the handshake went on (or the client gave up): nothing to answer

    def recent(self, now: float) -> list[bytes]:
        """The SYNs of the last ``keep`` seconds still unanswered, oldest first (each given once)."""
        while self._syns:
            key, (ts, _) = next(iter(self._syns.items()))
            if now - ts <= self.keep:
                break
            del self._syns[key]
        out = [packet for _, packet in self._syns.values()]
        #: the clients whose SYN went to this node's kernel: their connections are this node's own from
        #: here on, never the peer's to continue (proxy.continuation.ContinuationBook.answered_here)
        self.handed = [(socket.inet_ntoa(key[0]), key[1], key[2]) for key in self._syns]
        self._syns.clear()
        return out


def destination_port(packet: bytes) -> int:
    """The TCP destination port of an IPv4 packet the log gave (:meth:`SynLog.recent`)."""
    return struct.unpack_from("!H", packet, (packet[0] & 0x0F) * 4 + 2)[0]


def inject(packets: list[bytes], address: str) -> int:
    """Hand each IPv4 packet (a client's SYN to ``address``, now a local address) to this network
    namespace's own input path; how many went in. Needs CAP_NET_RAW."""
    sent = 0
    if not packets:
        return sent
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        for packet in packets:
            fixed = with_tcp_checksum(packet)
            if fixed is None:  # the log keeps whole IPv4 TCP packets only: never
                continue
            try:
                raw.sendto(fixed, (address, 0))
                sent += 1
            except OSError as exc:
                log.warning("a SYN seen during the outage not answered: %s", exc)
    return sent
