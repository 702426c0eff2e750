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


# ---------------------------------------------------------------------------- synthetic messages
import struct as _struct


class Pack:
    """A tiny XDR writer for synthetic messages (the decoders' tests build what no lab client sends)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def u32(self, v: int) -> "Pack":
        self.parts.append(_struct.pack(">I", v))
        return self

    def u64(self, v: int) -> "Pack":
        self.parts.append(_struct.pack(">Q", v))
        return self

    def fixed(self, b: bytes) -> "Pack":
        self.parts.append(b + bytes(-len(b) % 4))
        return self

    def opaque(self, b: bytes | str) -> "Pack":
        if isinstance(b, str):
            b = b.encode()
        return self.u32(len(b)).fixed(b)

    def raw(self, b: bytes) -> "Pack":
        self.parts.append(b)
        return self

    def bytes(self) -> bytes:
        return b"".join(self.parts)


def auth_sys(machine: str = "client1", uid: int = 1000, gid: int = 100) -> bytes:
    body = Pack().u32(0).opaque(machine).u32(uid).u32(gid).u32(0).bytes()
    return Pack().u32(1).opaque(body).bytes()


AUTH_NULL = Pack().u32(0).u32(0).bytes()


def rpc_call(xid: int, prog: int, vers: int, proc: int, body: bytes = b"", cred: bytes | None = None) -> bytes:
    cred = auth_sys() if cred is None else cred
    return Pack().u32(xid).u32(0).u32(2).u32(prog).u32(vers).u32(proc).raw(cred).raw(AUTH_NULL).raw(body).bytes()


def rpc_reply(xid: int, body: bytes = b"") -> bytes:
    return Pack().u32(xid).u32(1).u32(0).raw(AUTH_NULL).u32(0).raw(body).bytes()


def record(msg: bytes, *cuts: int) -> bytes:
    """Record-mark ``msg``, split into fragments at the offsets ``cuts``."""
    bounds = [0, *cuts, len(msg)]
    out = []
    for i in range(len(bounds) - 1):
        frag = msg[bounds[i]:bounds[i + 1]]
        last = 0x80000000 if i == len(bounds) - 2 else 0
        out.append(_struct.pack(">I", last | len(frag)) + frag)
    return b"".join(out)
