"""Classic BPF for the snooper: a tiny assembler and the one filter the standby needs.

Why our own and not ``tcpdump -dd``: the node must not depend on tcpdump/libpcap being installed,
and the filter is small and fixed in shape (a handful of addresses and ports), so a generator that
emits exactly the program tcpdump would emit for the same expression is shorter than a binding.

The filter accepts a frame when it is

    Ethernet [one 802.1Q tag] / IPv4 / TCP, not a non-first fragment, and
    (dst host in X and dst port in P) or (src host in X and src port in P)

which is what ``tcpdump -dd`` compiles from
``tcp and ((dst host X1 or ...) and (dst port P1 or ...) or (src host X1 ...) and (src port P1 ...))``
(tests check both programs agree, frame by frame, with a small interpreter).

On the VLAN branch: Linux usually strips the 802.1Q tag before packet sockets see the frame (the tag
goes to skb metadata, readable only through ``PACKET_AUXDATA``), so the tagged branch matters only
for tags left in the frame (no VLAN offload, stacked tags). It costs a duplicate of the body with
offsets shifted by 4, and nothing on untagged frames.

The TCP header offset comes from the IP header length (``ldxb 4*([off]&0xf)``, BPF_LDX|BPF_B|BPF_MSH),
so IP options are handled.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Iterable, Sequence

__all__ = ["Insn", "Assembler", "tcp_service_filter", "pack", "unpack", "sock_fprog", "attach", "detach",
           "disassemble", "interpret",
           "SO_ATTACH_FILTER", "SO_DETACH_FILTER", "ACCEPT_LEN"]

SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27

# opcode fields (linux/bpf_common.h)
BPF_LD, BPF_LDX, BPF_ST, BPF_STX, BPF_ALU, BPF_JMP, BPF_RET, BPF_MISC = range(8)
BPF_W, BPF_H, BPF_B = 0x00, 0x08, 0x10
BPF_IMM, BPF_ABS, BPF_IND, BPF_MEM, BPF_LEN, BPF_MSH = 0x00, 0x20, 0x40, 0x60, 0x80, 0xA0
BPF_JA, BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET = 0x00, 0x10, 0x20, 0x30, 0x40
BPF_K, BPF_X, BPF_A = 0x00, 0x08, 0x10

ETH_P_IP = 0x0800
ETH_P_8021Q = 0x8100
IPPROTO_TCP = 6
ACCEPT_LEN = 0x40000  # what tcpdump returns: "keep up to 256 KiB", i.e. the whole frame

_SOCK_FILTER = struct.Struct("=HBBI")  # struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}
MAX_INSNS = 4096  # BPF_MAXINSNS


@dataclass(frozen=True)
class Insn:
    code: int
    jt: int
    jf: int
    k: int


class Assembler:
    """Instructions with symbolic jump targets, resolved to relative offsets by :meth:`assemble`.

    Conditional jumps name labels (``"accept"``, ``"reject"``, ...); ``None`` means the next
    instruction. Classic BPF only jumps forward, at most 255 instructions for jt/jf; both are checked.
    """

    def __init__(self) -> None:
        self._code: list[tuple[int, str | None, str | None, int]] = []
        self._labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        if name in self._labels:
            raise ValueError(f"label {name!r} defined twice")
        self._labels[name] = len(self._code)

    def emit(self, code: int, k: int = 0, jt: str | None = None, jf: str | None = None) -> None:
        self._code.append((code, jt, jf, k & 0xFFFFFFFF))

    # readable helpers for the handful of instructions we use
    def ld_w(self, off: int) -> None:
        self.emit(BPF_LD | BPF_W | BPF_ABS, off)

    def ld_h(self, off: int) -> None:
        self.emit(BPF_LD | BPF_H | BPF_ABS, off)

    def ld_b(self, off: int) -> None:
        self.emit(BPF_LD | BPF_B | BPF_ABS, off)

    def ld_h_ind(self, off: int) -> None:
        self.emit(BPF_LD | BPF_H | BPF_IND, off)

    def ldx_msh(self, off: int) -> None:
        self.emit(BPF_LDX | BPF_B | BPF_MSH, off)

    def jeq(self, k: int, jt: str | None = None, jf: str | None = None) -> None:
        self.emit(BPF_JMP | BPF_JEQ | BPF_K, k, jt, jf)

    def jset(self, k: int, jt: str | None = None, jf: str | None = None) -> None:
        self.emit(BPF_JMP | BPF_JSET | BPF_K, k, jt, jf)

    def ret(self, k: int) -> None:
        self.emit(BPF_RET | BPF_K, k)

    def assemble(self) -> list[Insn]:
        out = []
        for pc, (code, jt, jf, k) in enumerate(self._code):
            out.append(Insn(code, self._rel(pc, jt), self._rel(pc, jf), k))
        if not out or len(out) > MAX_INSNS:
            raise ValueError(f"BPF program of {len(out)} instructions")
        if out[-1].code & 0x07 != BPF_RET:
            raise ValueError("BPF program must end with ret")
        return out

    def _rel(self, pc: int, target: str | None) -> int:
        if target is None:
            return 0
        try:
            to = self._labels[target]
        except KeyError:
            raise ValueError(f"undefined label {target!r}") from None
        off = to - pc - 1
        if not 0 <= off <= 255:
            raise ValueError(f"jump from {pc} to {target!r} ({off}) out of range")
        return off


def _body(asm: Assembler, l3: int, addrs: Sequence[int], ports: Sequence[int], tag: str,
          peers: Sequence[int] = ()) -> None:
    """IPv4/TCP/non-fragment + host/port test, IP header at offset ``l3``; labels suffixed ``tag``.
    With ``peers``, the other end of the segment must also be one of them."""
    dst, src, dport, sport = (f"{n}{tag}" for n in ("dst", "src", "dport", "sport"))
    dpeer, speer = (f"{n}{tag}" if peers else "accept" for n in ("dpeer", "speer"))
    asm.ld_b(l3 + 9)                       # ip proto
    asm.jeq(IPPROTO_TCP, jf="reject")
    asm.ld_h(l3 + 6)                       # flags + fragment offset
    asm.jset(0x1FFF, jt="reject")          # a non-first fragment has no TCP header
    asm.ldx_msh(l3)                        # X = IP header length
    asm.label(dst)
    asm.ld_w(l3 + 16)                      # ip dst
    for a in addrs[:-1]:
        asm.jeq(a, jt=dport)
    asm.jeq(addrs[-1], jt=dport, jf=src)
    asm.label(dport)
    asm.ld_h_ind(l3 + 2)                   # tcp dst port
    for p in ports[:-1]:
        asm.jeq(p, jt=dpeer)
    asm.jeq(ports[-1], jt=dpeer, jf=src)
    if peers:
        asm.label(dpeer)
        asm.ld_w(l3 + 12)                  # ip src: the other end
        for a in peers[:-1]:
            asm.jeq(a, jt="accept")
        asm.jeq(peers[-1], jt="accept")
    asm.label(src)
    asm.ld_w(l3 + 12)                      # ip src
    for a in addrs[:-1]:
        asm.jeq(a, jt=sport)
    asm.jeq(addrs[-1], jt=sport, jf="reject")
    asm.label(sport)
    asm.ld_h_ind(l3)                       # tcp src port
    for p in ports[:-1]:
        asm.jeq(p, jt=speer)
    asm.jeq(ports[-1], jt=speer, jf="reject")
    if peers:
        asm.label(speer)
        asm.ld_w(l3 + 16)                  # ip dst: the other end
        for a in peers[:-1]:
            asm.jeq(a, jt="accept")
        asm.jeq(peers[-1], jt="accept", jf="reject")


def tcp_service_filter(addresses: Iterable[str], ports: Iterable[int], *, vlan: bool = True,
                       peers: Iterable[str] | None = None) -> list[Insn]:
    """The snooper's program: TCP to/from ``addresses`` on ``ports`` (1-4 IPv4 addresses, 1-8 ports);
    with ``peers`` (1-4 addresses) only segments whose other end is one of them: the standby's view of
    its peer's backend connections (backend hosts as ``addresses``, the peer's address as ``peers``)
    then skips the node's own backend connections in the kernel."""
    addrs = sorted({int(ipaddress.IPv4Address(a)) for a in addresses})
    plist = sorted({int(p) for p in ports})
    others = sorted({int(ipaddress.IPv4Address(a)) for a in peers}) if peers is not None else []
    if not 1 <= len(addrs) <= 4:
        raise ValueError(f"1-4 IPv4 addresses, not {len(addrs)}")
    if not 1 <= len(plist) <= 8 or not all(0 < p < 65536 for p in plist):
        raise ValueError(f"1-8 TCP ports in 1..65535, not {plist}")
    if peers is not None and not 1 <= len(others) <= 4:
        raise ValueError(f"1-4 IPv4 peer addresses, not {len(others)}")
    asm = Assembler()
    asm.ld_h(12)                           # ethertype
    if vlan:
        asm.jeq(ETH_P_IP, jt="ip14")
        asm.jeq(ETH_P_8021Q, jf="reject")
        asm.ld_h(16)                       # ethertype inside the tag
        asm.jeq(ETH_P_IP, jt="ip18", jf="reject")
        asm.label("ip14")
    else:
        asm.jeq(ETH_P_IP, jf="reject")
    _body(asm, 14, addrs, plist, "14", others)
    if vlan:
        asm.label("ip18")
        _body(asm, 18, addrs, plist, "18", others)
    asm.label("accept")
    asm.ret(ACCEPT_LEN)
    asm.label("reject")
    asm.ret(0)
    return asm.assemble()


def pack(program: Sequence[Insn]) -> bytes:
    """The ``struct sock_filter`` array, native byte order, as the kernel reads it."""
    return b"".join(_SOCK_FILTER.pack(i.code, i.jt, i.jf, i.k) for i in program)


def unpack(blob: bytes) -> list[Insn]:
    return [Insn(*t) for t in _SOCK_FILTER.iter_unpack(blob)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def sock_fprog(blob: bytes) -> tuple[bytes, ctypes.Array]:
    """``struct sock_fprog`` bytes for ``setsockopt``, and the buffer it points into.

    The caller keeps the second element alive until ``setsockopt`` returns (the kernel copies the
    program during the call, so after that it may go).
    """
    if len(blob) % _SOCK_FILTER.size:
        raise ValueError("filter blob is not a whole number of sock_filter")
    buf = ctypes.create_string_buffer(blob, len(blob))
    prog = _SockFprog(len(blob) // _SOCK_FILTER.size, ctypes.addressof(buf))
    return bytes(prog), buf


def attach(sock: socket.socket, program: Sequence[Insn] | bytes) -> None:
    """``SO_ATTACH_FILTER`` the program to ``sock`` (replacing any earlier one)."""
    blob = program if isinstance(program, (bytes, bytearray)) else pack(program)
    fprog, keep = sock_fprog(bytes(blob))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    del keep  # alive until here, i.e. past the kernel's copy


def detach(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)


def disassemble(program: Sequence[Insn]) -> str:
    """tcpdump -d style listing, for logs and debugging."""
    lines = []
    for pc, i in enumerate(program):
        cls = i.code & 0x07
        if cls == BPF_RET:
            text = f"ret      #{i.k}"
        elif cls == BPF_JMP:
            op = {BPF_JEQ: "jeq", BPF_JGT: "jgt", BPF_JGE: "jge", BPF_JSET: "jset", BPF_JA: "ja"}[i.code & 0xF0]
            text = f"{op:<8} #{i.k:#x}  jt {pc + 1 + i.jt}  jf {pc + 1 + i.jf}"
        elif i.code == BPF_LDX | BPF_B | BPF_MSH:
            text = f"ldxb     4*([{i.k}]&0xf)"
        elif cls == BPF_LD:
            size = {BPF_W: "", BPF_H: "h", BPF_B: "b"}[i.code & 0x18]
            where = f"[x + {i.k}]" if i.code & 0xE0 == BPF_IND else f"[{i.k}]"
            text = f"ld{size:<6} {where}"
        else:
            text = f"code={i.code:#x} k={i.k:#x}"
        lines.append(f"({pc:03d}) {text}")
    return "\n".join(lines)


def interpret(program: Sequence[Insn], frame: bytes) -> int:
    """Run a classic BPF program on ``frame`` as the kernel would; the accepted length (0 = drop).

    For tests and for checking a program offline (e.g. against ``tcpdump -dd``). Covers the loads,
    ALU and jumps that tcpdump emits for host/port/proto expressions; a load past the end of the
    frame drops it, as in the kernel.
    """
    a = x = 0
    mem = [0] * 16
    pc = 0
    n = len(frame)

    def load(off: int, size: int) -> int | None:
        if off < 0 or off + size > n:
            return None
        return int.from_bytes(frame[off:off + size], "big")

    while pc < len(program):
        i = program[pc]
        cls, k = i.code & 0x07, i.k
        pc += 1
        if cls == BPF_RET:
            return a if i.code & 0x18 == BPF_A else k
        if cls in (BPF_LD, BPF_LDX):
            mode, size = i.code & 0xE0, {BPF_W: 4, BPF_H: 2, BPF_B: 1}[i.code & 0x18]
            if mode == BPF_IMM:
                v: int | None = k
            elif mode == BPF_ABS:
                v = load(k, size)
            elif mode == BPF_IND:
                v = load(x + k, size)
            elif mode == BPF_MEM:
                v = mem[k]
            elif mode == BPF_LEN:
                v = n
            elif mode == BPF_MSH:
                b = load(k, 1)
                v = None if b is None else 4 * (b & 0xF)
            else:
                raise ValueError(f"bad load {i}")
            if v is None:
                return 0
            if cls == BPF_LD:
                a = v
            else:
                x = v
        elif cls == BPF_ST:
            mem[k] = a
        elif cls == BPF_STX:
            mem[k] = x
        elif cls == BPF_ALU:
            op, src = i.code & 0xF0, (x if i.code & BPF_X else k)
            ops = {0x00: lambda: a + src, 0x10: lambda: a - src, 0x20: lambda: a * src,
                   0x30: lambda: a // src if src else None, 0x40: lambda: a | src, 0x50: lambda: a & src,
                   0x60: lambda: a << src, 0x70: lambda: a >> src, 0x80: lambda: -a,
                   0x90: lambda: a % src if src else None, 0xA0: lambda: a ^ src}
            r = ops[op]()
            if r is None:
                return 0
            a = r & 0xFFFFFFFF
        elif cls == BPF_JMP:
            op, src = i.code & 0xF0, (x if i.code & BPF_X else k)
            if op == BPF_JA:
                pc += k
                continue
            cond = {BPF_JEQ: a == src, BPF_JGT: a > src, BPF_JGE: a >= src, BPF_JSET: bool(a & src)}[op]
            pc += i.jt if cond else i.jf
        elif cls == BPF_MISC:
            if i.code & 0xF8 == 0x00:  # tax
                x = a
            else:  # txa
                a = x
    return 0
