"""Ethernet / 802.1Q / IPv4 / TCP, parsed with ``struct`` on a ``memoryview``.

This is the per-packet path (every frame the snooper sees), so it avoids scapy and allocations:
the payload is a memoryview slice of the caller's buffer. ``parse_frame`` never raises; it returns
a :class:`TcpSegment`, ``None`` for frames that are simply not IPv4/TCP, or a :class:`FrameError`
for frames that claim to be IPv4/TCP but do not hold together (counted by the caller).

IPv4 fragments are not reassembled (SMB and NFS over TCP do not produce them on sane paths); they
come back as ``FrameError(kind="fragment")`` so they show up in the counters instead of silently
corrupting a stream.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

__all__ = ["TcpSegment", "FrameError", "TcpOptions", "parse_frame", "parse_ipv4",
           "internet_checksum", "with_tcp_checksum", "ipv4_tcp",
           "FIN", "SYN", "RST", "PSH", "ACK", "URG"]

FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20

_ETH = struct.Struct("!6s6sH")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBBHHH")
_U16 = struct.Struct("!H")
_TS = struct.Struct("!II")

ETH_P_IP = 0x0800
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8


@dataclass(frozen=True, slots=True)
class TcpOptions:
    """The TCP options a takeover needs to know (only present on the segments that carry them)."""

    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    tsval: int | None = None
    tsecr: int | None = None


_NO_OPTIONS = TcpOptions()


@dataclass(frozen=True, slots=True)
class TcpSegment:
    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    options: TcpOptions
    payload: memoryview | bytes = field(repr=False)

    @property
    def syn(self) -> bool:
        return bool(self.flags & SYN)

    @property
    def fin(self) -> bool:
        return bool(self.flags & FIN)

    @property
    def rst(self) -> bool:
        return bool(self.flags & RST)

    @property
    def has_ack(self) -> bool:
        return bool(self.flags & ACK)


@dataclass(frozen=True, slots=True)
class FrameError:
    """A frame that claimed to be IPv4/TCP but is malformed or unsupported.

    kind: "truncated" | "bad-header" | "fragment"; what: one line for a human.
    """

    kind: str
    what: str


def _parse_options(opts: memoryview) -> TcpOptions:
    """TCP options; a malformed option list ends parsing (what was read so far is kept)."""
    mss = wscale = tsval = tsecr = None
    sack = False
    i, n = 0, len(opts)
    while i < n:
        kind = opts[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= n:
            break
        length = opts[i + 1]
        if length < 2 or i + length > n:
            break
        if kind == 2 and length == 4:
            mss = _U16.unpack_from(opts, i + 2)[0]
        elif kind == 3 and length == 3:
            wscale = opts[i + 2]
        elif kind == 4 and length == 2:
            sack = True
        elif kind == 8 and length == 10:
            tsval, tsecr = _TS.unpack_from(opts, i + 2)
        i += length
    if mss is None and wscale is None and not sack and tsval is None:
        return _NO_OPTIONS
    return TcpOptions(mss, wscale, sack, tsval, tsecr)


def parse_ipv4(buf: memoryview, off: int = 0) -> TcpSegment | FrameError | None:
    """An IPv4 packet starting at ``off`` -> TCP segment / error / None (not TCP)."""
    n = len(buf)
    if n - off < 20:
        return FrameError("truncated", f"IPv4 header needs 20 bytes, frame has {n - off}")
    vihl, _tos, total, _ident, frag, _ttl, proto, _csum, src, dst = _IPV4.unpack_from(buf, off)
    if vihl >> 4 != 4:
        return FrameError("bad-header", f"IP version {vihl >> 4} in an IPv4 frame")
    ihl = (vihl & 0x0F) * 4
    if ihl < 20 or total < ihl:
        return FrameError("bad-header", f"IPv4 header length {ihl}, total length {total}")
    if proto != 6:
        return None
    if frag & 0x3FFF:  # MF set or non-zero offset
        return FrameError("fragment", "IPv4 fragment (not reassembled)")
    if off + total > n:
        return FrameError("truncated", f"IPv4 total length {total} but {n - off} bytes captured")
    t = off + ihl
    end = off + total  # ignore Ethernet padding beyond the IP datagram
    if end - t < 20:
        return FrameError("truncated", "TCP header truncated")
    sport, dport, seq, ack, doff, flags, window, _csum, _urg = _TCP.unpack_from(buf, t)
    thl = (doff >> 4) * 4
    if thl < 20 or t + thl > end:
        return FrameError("bad-header", f"TCP data offset {thl} outside the segment")
    options = _parse_options(buf[t + 20:t + thl]) if thl > 20 else _NO_OPTIONS
    return TcpSegment(socket.inet_ntoa(src), socket.inet_ntoa(dst), sport, dport, seq, ack,
                      flags, window, options, buf[t + thl:end])


def parse_frame(buf: bytes | bytearray | memoryview) -> TcpSegment | FrameError | None:
    """An Ethernet frame (optionally one 802.1Q/802.1ad tag) -> TCP segment / error / None."""
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    try:
        if len(mv) < 14:
            return FrameError("truncated", f"Ethernet header needs 14 bytes, frame has {len(mv)}")
        ethertype = _U16.unpack_from(mv, 12)[0]
        off = 14
        if ethertype in (ETH_P_8021Q, ETH_P_8021AD):
            if len(mv) < 18:
                return FrameError("truncated", "802.1Q tag truncated")
            ethertype = _U16.unpack_from(mv, 16)[0]
            off = 18
        if ethertype != ETH_P_IP:
            return None
        return parse_ipv4(mv, off)
    except (struct.error, ValueError, IndexError) as exc:  # defensive: never raise to the caller
        return FrameError("bad-header", f"unparseable frame: {exc}")


# link types of capture files (pcap LINKTYPE_*), for offline readers
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_LINUX_SLL2 = 276


def parse_link(buf: bytes | bytearray | memoryview, linktype: int) -> TcpSegment | FrameError | None:
    """Like :func:`parse_frame` for the link types captures commonly have (Ethernet, Linux cooked
    v1/v2 from ``tcpdump -i any``, raw IP)."""
    if linktype == LINKTYPE_ETHERNET:
        return parse_frame(buf)
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    try:
        if linktype in (LINKTYPE_RAW, LINKTYPE_IPV4, 12):
            return parse_ipv4(mv, 0) if len(mv) and mv[0] >> 4 == 4 else None
        if linktype == LINKTYPE_LINUX_SLL:
            if len(mv) < 16:
                return FrameError("truncated", "Linux cooked header truncated")
            return parse_ipv4(mv, 16) if _U16.unpack_from(mv, 14)[0] == ETH_P_IP else None
        if linktype == LINKTYPE_LINUX_SLL2:
            if len(mv) < 20:
                return FrameError("truncated", "Linux cooked v2 header truncated")
            return parse_ipv4(mv, 20) if _U16.unpack_from(mv, 0)[0] == ETH_P_IP else None
    except (struct.error, ValueError, IndexError) as exc:
        return FrameError("bad-header", f"unparseable frame: {exc}")
    return None


# ---------------------------------------------------------------------------------- building
# The few IPv4/TCP packets the node makes itself (a takeover's exact-sequence resets, SYNs and dropped
# segments handed back to its own kernel through a raw socket), built with struct: thousands may be
# needed while the event loop waits, and scapy takes ~0.5 ms for each.

def internet_checksum(data: bytes) -> int:
    """RFC 1071: the ones' complement of the ones' complement sum of 16-bit words."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def with_tcp_checksum(packet: bytes) -> bytes | None:
    """``packet`` (IPv4 + TCP) with its TCP checksum computed; None if it is not a whole IPv4 TCP packet.
    Why: a copy captured where the sender's NIC computes checksums (offload; veth never does) carries
    only the pseudo-header's partial sum; the receiving kernel trusted the device, but a packet looped
    back through a raw socket is checked (the lab counted TcpInCsumErrors instead of answers)."""
    if len(packet) < 40 or packet[0] >> 4 != 4 or packet[9] != socket.IPPROTO_TCP:
        return None
    ihl = (packet[0] & 0x0F) * 4
    total = struct.unpack_from("!H", packet, 2)[0]
    if ihl < 20 or total > len(packet) or total < ihl + 20:
        return None
    segment = bytearray(packet[ihl:total])
    segment[16:18] = b"\0\0"
    pseudo = packet[12:20] + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(segment))
    segment[16:18] = struct.pack("!H", internet_checksum(pseudo + bytes(segment)))
    return packet[:ihl] + bytes(segment)


def ipv4_tcp(src: str, dst: str, sport: int, dport: int, seq: int, ack: int, flags: int, payload: bytes = b"", *,
             window: int = 0, ident: int = 0) -> bytes:
    """An IPv4 packet (don't fragment, TTL 64, no options) carrying one TCP segment, both checksums set."""
    saddr, daddr = socket.inet_aton(src), socket.inet_aton(dst)
    tcp = _TCP.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4, flags, window, 0, 0)
    pseudo = saddr + daddr + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp) + len(payload))
    tcp = tcp[:16] + _U16.pack(internet_checksum(pseudo + tcp + payload)) + tcp[18:]
    ip = _IPV4.pack(0x45, 0, 20 + len(tcp) + len(payload), ident, 0x4000, 64, socket.IPPROTO_TCP, 0, saddr, daddr)
    return ip[:10] + _U16.pack(internet_checksum(ip)) + ip[12:] + tcp + payload
