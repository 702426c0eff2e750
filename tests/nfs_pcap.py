"""Test helper: the TCP payload streams of a capture, per connection, as (from_client, bytes) chunks.

Assumes what holds for the lab's veth captures: every segment is captured once and in order, so
no reassembly beyond "append the payload" is needed. The live path uses protocols.frames and
protocols.tcpstream instead; this helper exists so the RPC/NFS tests need only scapy.
"""

from __future__ import annotations

from pathlib import Path

from protocols.events import ConnKey

FIXTURES = Path(__file__).parent / "fixtures"
SERVER_PORTS = {111, 2049, 20048}


def tcp_streams(pcap: str | Path) -> dict[ConnKey, list[tuple[bool, bytes]]]:
    """ConnKey -> payload chunks in capture order (consecutive same-direction chunks kept separate)."""
    from scapy.layers.inet import IP, TCP
    from scapy.utils import PcapReader

    streams: dict[ConnKey, list[tuple[bool, bytes]]] = {}
    with PcapReader(str(Path(pcap))) as reader:
        for pkt in reader:
            if IP not in pkt or TCP not in pkt:
                continue
            ip, tcp = pkt[IP], pkt[TCP]
            payload = bytes(tcp.payload)
            if tcp.dport in SERVER_PORTS:
                key, from_client = ConnKey(ip.src, tcp.sport, ip.dst, tcp.dport), True
            else:
                key, from_client = ConnKey(ip.dst, tcp.dport, ip.src, tcp.sport), False
            chunks = streams.setdefault(key, [])
            if payload:
                chunks.append((from_client, payload))
    return dict(sorted(streams.items()))
