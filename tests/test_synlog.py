"""New clients' SYNs to the peer's address seen during the outage (proxy/synlog.py, sans-I/O part)."""

from __future__ import annotations

import socket
import struct

from proxy.synlog import SynLog

PEER = "10.77.0.1"


def frame(src: str, sport: int, flags: int, dst: str = PEER, dport: int = 445, payload: bytes = b"") -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, flags, 64240, 0, 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, socket.IPPROTO_TCP, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + tcp + b"\0" * 6  # (Ethernet padding)


def test_unanswered_syns_are_kept_as_ip_packets_and_given_once():
    log = SynLog(PEER, [445, 2049])
    log.on_frame(frame("10.77.0.100", 40000, 0x02), 10.0)
    log.on_frame(frame("10.77.0.101", 40001, 0x02, dport=2049), 10.1)
    log.on_frame(frame("10.77.0.100", 40002, 0x02, dport=22), 10.1)      # not a service port
    log.on_frame(frame("10.77.0.100", 40003, 0x02, dst="10.77.0.2"), 10.1)  # not the peer's address
    [first, second] = log.recent(10.5)
    assert first == frame("10.77.0.100", 40000, 0x02)[14:-6]  # the IPv4 packet, without padding
    assert second[20:24] == struct.pack("!HH", 40001, 2049)
    # named for the continuation book: these handshakes end with this node, not the peer
    assert log.handed == [("10.77.0.100", 40000, 445), ("10.77.0.101", 40001, 2049)]
    assert log.recent(10.5) == [] and log.handed == []


def test_a_syn_the_peer_answered_or_an_old_one_is_not_replayed():
    log = SynLog(PEER, [445], keep=3.0)
    log.on_frame(frame("10.77.0.100", 40000, 0x02), 10.0)
    log.on_frame(frame("10.77.0.100", 40000, 0x10), 10.01)  # the client's ACK: the handshake went on
    log.on_frame(frame("10.77.0.100", 40001, 0x02), 5.0)    # long ago
    log.on_frame(frame("10.77.0.100", 40002, 0x02), 9.0)
    log.on_frame(frame("10.77.0.100", 40002, 0x02), 9.5)    # retransmitted: kept once, the latest
    assert [p[20:22] for p in log.recent(10.5)] == [struct.pack("!H", 40002)]


def test_the_table_is_bounded_and_bad_frames_are_ignored():
    log = SynLog(PEER, [445], limit=10)
    for i in range(100):
        log.on_frame(frame("10.77.0.100", 30000 + i, 0x02), 10.0)
    for junk in (b"", b"\x00" * 20, frame("10.77.0.100", 1, 0x02)[:40], b"\xff" * 14 + b"\x45" + b"\x00" * 60):
        log.on_frame(junk, 10.0)
    kept = log.recent(10.0)
    assert len(kept) == 10 and kept[-1][20:22] == struct.pack("!H", 30099)


def test_a_replayed_syn_gets_a_checksum_the_receiving_kernel_accepts():
    """Captured where the sender offloads checksums, a SYN carries only the pseudo-header's partial sum;
    looped back through a raw socket, the kernel checks it (the lab counted TcpInCsumErrors, no SYN-ACK)."""
    from protocols.frames import internet_checksum, with_tcp_checksum

    packet = frame("10.77.0.100", 40000, 0x02, payload=b"x")[14:-6]
    fixed = with_tcp_checksum(packet)
    assert fixed[:36] == packet[:36] and fixed[38:] == packet[38:]
    pseudo = fixed[12:20] + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(fixed) - 20)
    assert internet_checksum(pseudo + fixed[20:]) == 0  # a valid TCP checksum sums to zero
    assert with_tcp_checksum(fixed) == fixed
    assert with_tcp_checksum(packet[:30]) is None and with_tcp_checksum(b"\x60" + packet[1:]) is None
