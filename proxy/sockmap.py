"""An in-kernel byte path: a SOCKHASH and an ``sk_skb`` verdict program that redirects each leg's bytes
to the other leg, loaded with the ``bpf()`` system call through ctypes (no compiler on the node).

Why: the splice pump wakes Python for every message (about 40 us of node CPU and 3+ system calls per
forwarded message); here the kernel forwards every segment itself as it arrives, and Python only sets a
connection up, watches for EOF and reset, and tears it down (``bench/BYTEPATH.md`` has the numbers).

What the kernel does (``net/core/skmsg.c``, measured on 6.18): a socket in the SOCKHASH gets a *psock*;
its data-ready callback hands each received skb to the verdict program (:func:`program`), which finds
the socket's cookie in ``conns`` (the peer's cookie and a slot in ``stats``, an array Python maps into
its memory), adds the skb's length to the slot's counter and redirects it to the peer's egress
(``bpf_sk_redirect_hash``). A kernel worker sends the queued skbs.

What it does not do, and Python must (:func:`proxy.pump.sockmap_relay`):

- FIN is not carried. The program drops the bare FIN segment (redirected, the empty send fails, which
  sets EPIPE on the peer and stops all further sends to it), and Python, woken by the EOF (a socket whose
  bytes are redirected is readable only at EOF or error), waits until every redirected byte is in the
  other leg's send queue (:meth:`Relay.delivered`: ``tcpi_bytes_acked`` + ``SIOCOUTQ`` against the
  counter) before it half-closes that leg. A reset moves the socket to CLOSE, which Python sees the same way.
- Bytes that arrived before a socket joined the map wait in its receive queue until more bytes arrive.
  :meth:`Relay.join` kicks them through the program at once with ``SO_RCVLOWAT`` (``tcp_set_rcvlowat``
  calls the data-ready callback), in order, before any later byte.
- No backpressure: a redirected skb is queued for the peer uncharged to either socket, so the sender's
  window stays open while the receiver does not read (512 MiB accepted in a test before this was known).
  :class:`Governor` hands a connection to the splice pump when a direction moves fast (bulk) or bytes
  pile up in the kernel (a slow reader).
- Leaving the map drops whatever the kernel still queues for the socket. :meth:`Relay.hold` makes the
  program pass new bytes to the socket's own queue instead (counted apart); the caller waits until
  nothing redirected is on its way, reads the held bytes (a read: the kernel counts a held byte as
  consumed only when read, and a mere peek leaves the socket's sequence behind), and parts; the count
  tells whether a byte slipped in between (then the connection is reset, never corrupted).

:func:`choose` returns the byte path for ``[node] byte_path``: sockmap where the kernel and the process
can (root, or CAP_BPF + CAP_NET_ADMIN), else the splice pump with the reason, shown in ``status``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import socket
import struct
from dataclasses import dataclass

from proxy.config import BYTE_PATHS

#: bpf(2) commands, map/program/attach types (linux/bpf.h)
_SYS_BPF = 321  # x86_64
BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM = 0, 1, 2, 3
BPF_PROG_LOAD, BPF_PROG_ATTACH = 5, 8
BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_SOCKHASH = 1, 18
BPF_PROG_TYPE_SK_SKB = 14
BPF_SK_SKB_VERDICT = 38
BPF_F_NO_PREALLOC = 1
BPF_ANY, BPF_NOEXIST = 0, 1
#: helper numbers
_MAP_LOOKUP_ELEM, _GET_SOCKET_COOKIE, _SK_REDIRECT_HASH = 1, 46, 72
SK_DROP, SK_PASS = 0, 1
SO_COOKIE = 57
SIOCOUTQ = 0x5411
SIOCINQ = 0x541B
TCP_INFO_BYTES_ACKED = 120  # offset of tcpi_bytes_acked in struct tcp_info
TCP_INFO_BYTES_RECEIVED = 128

#: a ``conns`` entry (key: a socket's cookie): the peer socket's cookie and this socket's slot in ``stats``
_CONN = struct.Struct("=QI4x")
_KEY = struct.Struct("=Q")
#: a ``stats`` slot (an mmap-able array Python reads and writes without system calls): bytes the program
#: saw arrive on the socket, the hold flag (non-zero: pass bytes to the socket's own queue instead), how
#: many of the bytes were so held (so bytes - held were redirected, exactly), and the limit: past it the
#: program sets hold itself (the Governor moves it on while the connection is quiet)
_STAT = struct.Struct("=QQQQ")
BPF_MAP_TYPE_ARRAY = 2
#: bytes the program may redirect on a leg beyond what Python last allowed (the Governor allows more every
#: INTERVAL while the connection stays below BULK_BYTES): the most the kernel ever queues for one leg
WINDOW = 1 << 20
BPF_F_MMAPABLE = 1 << 10


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _ld_map_fd(dst: int, fd: int) -> bytes:
    # BPF_LD | BPF_DW | BPF_IMM with src = BPF_PSEUDO_MAP_FD: two instruction slots
    return _insn(0x18, dst, 1, 0, fd) + _insn(0, 0, 0, 0, 0)


def _assemble(code: list) -> bytes:
    """Instructions (bytes) and labels (str) to bytes; a jump is ("jmp", opcode, dst, src, label, imm)."""
    at, n = {}, 0
    for item in code:
        if isinstance(item, str):
            at[item] = n
        else:
            n += 2 if isinstance(item, bytes) and len(item) == 16 else 1
    out, n = [], 0
    for item in code:
        if isinstance(item, str):
            continue
        if isinstance(item, tuple):
            _, op, dst, src, label, imm = item
            item = _insn(op, dst, src, at[label] - (n + 1), imm)
        out.append(item)
        n += len(item) // 8
    return b"".join(out)


def program(conns_fd: int, stats_fd: int, sockhash_fd: int) -> bytes:
    """The verdict program, hand-assembled. In C::

        u32 len = skb->len;
        if (len == 0) return SK_DROP;                 // a bare FIN: Python passes EOF on itself
        u64 key = bpf_get_socket_cookie(skb);
        struct conn *c = bpf_map_lookup_elem(&conns, &key);
        if (!c) return SK_PASS;                       // not ours: stays on this socket
        u64 peer = c->peer; u32 slot = c->slot;
        struct stat *s = bpf_map_lookup_elem(&stats, &slot);
        if (!s) return SK_PASS;
        u64 total = __sync_fetch_and_add(&s->bytes, len) + len;
        if (total > s->limit) s->hold = 1;            // a burst past the window: Python takes over
        if (s->hold) { __sync_fetch_and_add(&s->held, len); return SK_PASS; }   // kept on this socket
        if (bpf_sk_redirect_hash(skb, &sockhash, &peer, 0) == SK_PASS) return SK_PASS;  // to the peer's egress
        s->hold = 1; __sync_fetch_and_add(&s->held, len); return SK_PASS;   // no peer in the map yet: kept

    The last line: :meth:`Relay.join` adds the two sockets to the map one after the other, and a segment
    arriving on the first in between found no peer to go to. The helper then says SK_DROP, and the
    bytes, already acknowledged to their sender, were gone (a client's whole request, 1 MiB in a test:
    about 1 run in 50 with a CPU busy beside it). Held instead, they wake Python, which hands the
    connection to the splice pump with them first (as for a burst).

    A held segment goes to the socket's own queue, charged to it: its TCP window closes (the backpressure
    a redirect does not give), and the socket becomes readable, which wakes Python.
    """
    code = [
        _insn(0xBF, 6, 1),                          # r6 = r1 (skb)
        _insn(0x61, 8, 6, 0),                       # r8 = skb->len
        ("jmp", 0x15, 8, 0, "drop", 0),             # if r8 == 0 goto drop
        _insn(0x85, imm=_GET_SOCKET_COOKIE),        # r0 = cookie(skb)
        _insn(0x7B, 10, 0, -8),                     # *(u64 *)(r10 - 8) = r0
        _ld_map_fd(1, conns_fd),                    # r1 = &conns
        _insn(0xBF, 2, 10),                         # r2 = r10
        _insn(0x07, 2, imm=-8),                     # r2 += -8
        _insn(0x85, imm=_MAP_LOOKUP_ELEM),          # r0 = lookup(conns, &key)
        ("jmp", 0x15, 0, 0, "pass", 0),             # if r0 == 0 goto pass
        _insn(0x79, 1, 0, 0),                       # r1 = c->peer
        _insn(0x7B, 10, 1, -16),                    # *(u64 *)(r10 - 16) = r1
        _insn(0x61, 1, 0, 8),                       # r1 = c->slot
        _insn(0x63, 10, 1, -20),                    # *(u32 *)(r10 - 20) = r1
        _ld_map_fd(1, stats_fd),                    # r1 = &stats
        _insn(0xBF, 2, 10),                         # r2 = r10
        _insn(0x07, 2, imm=-20),                    # r2 += -20
        _insn(0x85, imm=_MAP_LOOKUP_ELEM),          # r0 = lookup(stats, &slot)
        ("jmp", 0x15, 0, 0, "pass", 0),             # if r0 == 0 goto pass
        _insn(0xBF, 7, 0),                          # r7 = r0 (s: kept across the redirect call)
        _insn(0xBF, 1, 8),                          # r1 = len
        _insn(0xDB, 0, 1, 0, 0x01),                 # r1 = atomic_fetch_add(*(u64 *)(r0 + 0), r1)
        _insn(0x0F, 1, 8),                          # r1 += len (the new total)
        _insn(0x79, 3, 0, 24),                      # r3 = s->limit
        ("jmp", 0x2D, 1, 3, "sethold", 0),          # if r1 > r3 goto sethold
        _insn(0x79, 1, 0, 8),                       # r1 = s->hold
        ("jmp", 0x55, 1, 0, "held", 0),             # if r1 != 0 goto held
        _insn(0xBF, 1, 6),                          # r1 = skb
        _ld_map_fd(2, sockhash_fd),                 # r2 = &sockhash
        _insn(0xBF, 3, 10),                         # r3 = r10
        _insn(0x07, 3, imm=-16),                    # r3 += -16
        _insn(0xB7, 4, imm=0),                      # r4 = 0 (egress)
        _insn(0x85, imm=_SK_REDIRECT_HASH),         # r0 = redirect(skb, &sockhash, &peer, 0)
        ("jmp", 0x15, 0, 0, "nopeer", SK_DROP),     # if r0 == SK_DROP goto nopeer
        _insn(0x95),                                # exit (SK_PASS: redirected)
        "nopeer",
        _insn(0xBF, 0, 7),                          # r0 = s
        "sethold",
        _insn(0xB7, 1, imm=1),                      # r1 = 1
        _insn(0x7B, 0, 1, 8),                       # s->hold = r1
        "held",
        _insn(0xBF, 1, 8),                          # r1 = len
        _insn(0xDB, 0, 1, 16, 0),                   # lock *(u64 *)(r0 + 16) += r1
        "pass",
        _insn(0xB7, 0, imm=SK_PASS),                # r0 = SK_PASS
        _insn(0x95),                                # exit
        "drop",
        _insn(0xB7, 0, imm=SK_DROP),                # r0 = SK_DROP
        _insn(0x95),                                # exit
    ]
    return _assemble(code)


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    """A bpf() call failed (errno and what was tried)."""


def _bpf(cmd: int, attr: bytes, what: str) -> int:
    buf = ctypes.create_string_buffer(attr, max(len(attr), 128))
    ret = _libc.syscall(_SYS_BPF, cmd, buf, len(buf))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return ret


def _map_create(map_type: int, key_size: int, value_size: int, entries: int, flags: int, name: bytes) -> int:
    attr = struct.pack("=IIIIIII16s", map_type, key_size, value_size, entries, flags, 0, 0, name)
    return _bpf(BPF_MAP_CREATE, attr, f"creating the {name.decode()} map")


def _elem(cmd: int, fd: int, key: ctypes.Array, value: ctypes.Array | None, flags: int, what: str) -> int:
    attr = struct.pack("=IIQQQ", fd, 0, ctypes.addressof(key), ctypes.addressof(value) if value is not None else 0,
                       flags)
    return _bpf(cmd, attr, what)


def _prog_load(insns: bytes) -> int:
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(65536)
    attr = struct.pack("=IIQQIIQII16s", BPF_PROG_TYPE_SK_SKB, len(insns) // 8, ctypes.addressof(code),
                       ctypes.addressof(lic), 1, len(log), ctypes.addressof(log), 0, 0, b"pp_relay")
    try:
        return _bpf(BPF_PROG_LOAD, attr, "loading the verdict program")
    except BpfError as exc:
        text = log.value.decode(errors="replace").strip().splitlines()
        raise BpfError(exc.errno, f"{exc.strerror}; verifier: {' | '.join(text[-4:])}") from None


def cookie(sock: socket.socket) -> int:
    """The kernel's 64-bit identity of a socket (what the program sees as ``bpf_get_socket_cookie``)."""
    return struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]


def bytes_written(sock: socket.socket) -> int:
    """Bytes ever put into ``sock``'s send queue (acknowledged + still queued), FIN not counted."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    acked = struct.unpack_from("=Q", info, TCP_INFO_BYTES_ACKED)[0]
    queued = struct.unpack("=i", fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0" * 4))[0]
    if sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] in _FIN_SENT_STATES:
        queued -= 1 if queued > 0 else 0  # SIOCOUTQ counts our FIN while it is unacknowledged
    return acked + queued


def bytes_received(sock: socket.socket) -> int:
    """Bytes ``sock`` received from its peer (``tcpi_bytes_received``; FIN not counted)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return struct.unpack_from("=Q", info, TCP_INFO_BYTES_RECEIVED)[0]


#: TCP states after our FIN was queued (linux/tcp_states.h): FIN_WAIT1, FIN_WAIT2, CLOSING, LAST_ACK
_FIN_SENT_STATES = {4, 5, 11, 9}


class BytesLost(Exception):
    """Bytes arrived in the instant between the last read and the removal from the map and were
    dropped with the socket's kernel queue; the connection must be reset, not continued."""


@dataclass
class Leg:
    """One socket of a relayed connection as the relay knows it."""

    sock: socket.socket
    cookie: int
    slot: int
    #: bytes_written() of this socket when it joined: what Python (or a restore) had put there before
    written_base: int
    #: bytes_received() of this socket when it joined, less those still unread (the program sees those)
    received_base: int
    parted: bool = False


class Relay:
    """The maps and the program of one process; :meth:`join` pairs two sockets, :meth:`leave` and
    :meth:`part` part them.

    One relay serves every connection of the node (the maps hold ``capacity`` sockets). Its four
    descriptors are closed by :meth:`close`; the kernel then frees the program and the maps, and any
    socket still in the map leaves it.
    """

    def __init__(self, capacity: int = 1 << 16):
        self.capacity = capacity
        self.conns_fd = self.stats_fd = self.sockhash_fd = self.prog_fd = -1
        self._stats: mmap.mmap | None = None
        self._words: memoryview | None = None
        self._free = list(range(capacity - 1, -1, -1))
        try:
            self.conns_fd = _map_create(BPF_MAP_TYPE_HASH, 8, _CONN.size, capacity, BPF_F_NO_PREALLOC, b"pp_conns")
            self.stats_fd = _map_create(BPF_MAP_TYPE_ARRAY, 4, _STAT.size, capacity, BPF_F_MMAPABLE, b"pp_stats")
            size = -(-capacity * _STAT.size // mmap.PAGESIZE) * mmap.PAGESIZE
            self._stats = mmap.mmap(self.stats_fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self._words = memoryview(self._stats).cast("Q")  # slot i: [4i] bytes, hold, held, limit
            self.sockhash_fd = _map_create(BPF_MAP_TYPE_SOCKHASH, 8, 8, capacity, 0, b"pp_socks")
            self.prog_fd = _prog_load(program(self.conns_fd, self.stats_fd, self.sockhash_fd))
            attr = struct.pack("=IIII", self.sockhash_fd, self.prog_fd, BPF_SK_SKB_VERDICT, 0)
            _bpf(BPF_PROG_ATTACH, attr, "attaching the verdict program to the socket map")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if getattr(self, "_words", None) is not None:
            self._words.release()
            self._words = None
        if self._stats is not None:
            self._stats.close()
            self._stats = None
        for name in ("prog_fd", "sockhash_fd", "stats_fd", "conns_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    @property
    def joined(self) -> int:
        """Sockets in the map now."""
        return self.capacity - len(self._free)

    # --- counters (shared memory with the program) -----------------------------------------------------
    def seen(self, leg: Leg) -> int:
        """Bytes the program saw arrive on ``leg`` since it joined (redirected or held)."""
        return self._words[4 * leg.slot]

    def held(self, leg: Leg) -> int:
        """Of :meth:`seen`, the bytes the program passed to ``leg``'s own queue (hold set) instead."""
        return self._words[4 * leg.slot + 2]

    def lag(self, src: Leg, dst: Leg) -> int:
        """Bytes redirected from ``src`` that are not yet in ``dst``'s send queue (queued in the kernel)."""
        return self.seen(src) - self.held(src) - (bytes_written(dst.sock) - dst.written_base)

    def _hold(self, leg: Leg, on: bool) -> None:
        self._words[4 * leg.slot + 1] = 1 if on else 0

    def holding(self, leg: Leg) -> bool:
        """The hold flag is set (by :meth:`hold`, or by the program past the limit)."""
        return self._words[4 * leg.slot + 1] != 0

    def allow(self, leg: Leg, more: int) -> None:
        """Let the program redirect up to ``more`` bytes beyond what it has seen on ``leg``."""
        self._words[4 * leg.slot + 3] = self._words[4 * leg.slot] + more

    def _reset(self, slot: int) -> None:
        self._words[4 * slot:4 * slot + 4] = memoryview(struct.pack("=QQQQ", 0, 0, 0, WINDOW)).cast("Q")

    # --- maps -----------------------------------------------------------------------------------------
    def _delete(self, fd: int, key: int) -> None:
        k = ctypes.create_string_buffer(_KEY.pack(key), 8)
        try:
            _elem(BPF_MAP_DELETE_ELEM, fd, k, None, 0, "removing a socket")
        except BpfError as exc:
            if exc.errno != errno.ENOENT:
                raise

    # --- connections ----------------------------------------------------------------------------------
    def join(self, a: socket.socket, b: socket.socket) -> tuple[Leg, Leg]:
        """Relay ``a`` and ``b`` to each other in the kernel from now on.

        Bytes already waiting in either receive queue go first (kicked through the program here);
        bytes Python wrote before are remembered so :meth:`delivered` counts only redirected ones.
        Raises BpfError (ENOSPC: the map is full) with nothing left behind.
        """
        if len(self._free) < 2:
            raise BpfError(errno.ENOSPC, f"the socket map is full ({self.capacity} sockets)")
        la = Leg(a, cookie(a), self._free.pop(), bytes_written(a), _received_unread(a))
        lb = Leg(b, cookie(b), self._free.pop(), bytes_written(b), _received_unread(b))
        added: list[tuple[int, int]] = []
        try:
            for leg, peer in ((la, lb), (lb, la)):
                self._reset(leg.slot)
                k = ctypes.create_string_buffer(_KEY.pack(leg.cookie), 8)
                v = ctypes.create_string_buffer(_CONN.pack(peer.cookie, leg.slot), _CONN.size)
                _elem(BPF_MAP_UPDATE_ELEM, self.conns_fd, k, v, BPF_NOEXIST, "adding a connection")
                added.append((self.conns_fd, leg.cookie))
            for leg in (la, lb):
                k = ctypes.create_string_buffer(_KEY.pack(leg.cookie), 8)
                v = ctypes.create_string_buffer(struct.pack("=Q", leg.sock.fileno()), 8)
                added.append((self.sockhash_fd, leg.cookie))
                _elem(BPF_MAP_UPDATE_ELEM, self.sockhash_fd, k, v, BPF_NOEXIST, "adding a socket to the map")
        except BaseException:
            for fd, key in reversed(added):
                self._delete(fd, key)
            self._free += [lb.slot, la.slot]
            raise
        for leg in (la, lb):
            kick(leg.sock)
        return la, lb

    def delivered(self, src: Leg, dst: Leg) -> bool:
        """Every byte redirected from ``src`` so far is in ``dst``'s send queue: none is still queued
        in the kernel between them."""
        return self.lag(src, dst) <= 0

    def caught_up(self, leg: Leg, eof: bool = False) -> bool:
        """The program has seen every byte ``leg`` received since it joined (none waits for it).
        ``eof``: the peer's FIN arrived (``tcpi_bytes_received`` counts it as one byte)."""
        return bytes_received(leg.sock) - leg.received_base - (1 if eof else 0) <= self.seen(leg)

    def part(self, a: Leg, b: Leg) -> None:
        """Remove both sockets from the maps. Whatever the kernel still queued for them is dropped:
        the caller made sure nothing is (both directions :meth:`delivered`), or it does not matter.
        A second call does nothing."""
        if a.parted:
            return
        a.parted = b.parted = True
        for leg in (a, b):
            self._delete(self.sockhash_fd, leg.cookie)
        for leg in (a, b):
            self._delete(self.conns_fd, leg.cookie)
        self._free += [b.slot, a.slot]

    def governor(self) -> "Governor":
        """The task watching this relay's queues (one per relay, started on first use)."""
        if getattr(self, "_governor", None) is None:
            self._governor = Governor(self)
        return self._governor

    def hold(self, *legs: Leg) -> None:
        """From now on, bytes arriving on ``legs`` stay on their own socket (``recv`` reads them)."""
        for leg in legs:
            self._hold(leg, True)


class Governor:
    """Takes connections out of the kernel relay when it is the wrong tool for them.

    Why: a redirected segment is queued for the other leg without any limit (the kernel's psock queue is
    not charged to either socket, so the sender's TCP window stays open while the receiver does not
    read), and bulk moves at about half the speed of splice here (``bench/BYTEPATH.md``). The program
    redirects a leg's bytes only up to a limit (``WINDOW`` past what Python last allowed) and holds the
    rest on the socket, which wakes :func:`proxy.pump.sockmap_relay` (:meth:`request`). Every
    ``INTERVAL`` seconds one task reads the counters of every relayed connection from shared memory (no
    system call for an idle one); a direction that moved more than ``BULK_BYTES`` since the last look,
    or (two system calls, only for legs that moved) has more than ``QUEUE_LIMIT`` bytes waiting in the
    kernel for a slow reader, is handed to the splice pump, whose memory is bounded by its pipe; the
    others get their limit moved on.
    """

    INTERVAL = 0.01
    BULK_BYTES = 256 << 10
    QUEUE_LIMIT = 1 << 20

    def __init__(self, relay: Relay):
        self.relay = relay
        self._watched: dict[int, list] = {}
        self._why: dict[int, str] = {}
        self._running = False
        self.switched = 0

    def watch(self, a: Leg, b: Leg, event) -> None:
        self._watched[a.slot] = [a, b, event, self.relay.seen(a), self.relay.seen(b)]
        if not self._running:
            import trio  # noqa: PLC0415
            self._running = True
            trio.lowlevel.spawn_system_task(self._run, name="pairproxy.sockmap.governor")

    def forget(self, a: Leg) -> None:
        self._watched.pop(a.slot, None)
        self._why.pop(a.slot, None)

    def why(self, a: Leg) -> str:
        return self._why.get(a.slot, "")

    async def _run(self) -> None:
        import trio  # noqa: PLC0415
        try:
            while self._watched:
                await trio.sleep(self.INTERVAL)
                for slot, w in list(self._watched.items()):
                    a, b, event, last_a, last_b = w
                    if event.is_set():
                        continue
                    try:
                        why = self._check(w)
                    except OSError:
                        continue  # a leg closed under us: its relay task sees it
                    if why:
                        self._why[slot] = why
                        self.switched += 1
                        event.set()
        finally:
            self._running = False

    def request(self, a: Leg, why: str) -> None:
        """Take the connection of ``a`` out now (its program held a burst past the window)."""
        w = self._watched.get(a.slot)
        if w is not None and not w[2].is_set():
            self._why[a.slot] = why
            self.switched += 1
            w[2].set()

    def _check(self, w: list) -> str | None:
        a, b, _, last_a, last_b = w
        seen_a, seen_b = self.relay.seen(a), self.relay.seen(b)
        w[3], w[4] = seen_a, seen_b
        # the program held a burst past the window (its socket's wake-up is not always delivered)
        for leg, name in ((a, "to the backend"), (b, "to the client")):
            if self.relay.holding(leg):
                return f"a burst {name}: more than {WINDOW} bytes at once"
        for moved, src, dst, name in ((seen_a - last_a, a, b, "to the backend"), (seen_b - last_b, b, a, "to the client")):
            if moved <= 0:
                continue  # idle: its limit is still ahead of it, nothing to do (no system call)
            if moved > self.BULK_BYTES:
                return f"bulk {name}: {moved} bytes in {self.INTERVAL:g} s"
            lag = self.relay.lag(src, dst)
            if lag > self.QUEUE_LIMIT:
                return f"slow reader {name}: {lag} bytes queued in the kernel"
            self.relay.allow(src, WINDOW)
        return None


def _received_unread(sock: socket.socket) -> int:
    """bytes_received() less the bytes still unread, read consistently (nothing arrived in between)."""
    while True:
        before = _inq(sock)
        received = bytes_received(sock)
        if _inq(sock) == before:
            return received - before


def _inq(sock: socket.socket) -> int:
    return struct.unpack("=i", fcntl.ioctl(sock.fileno(), SIOCINQ, b"\0" * 4))[0]


def read_held(sock: socket.socket, peek: bool = False, limit: int = 1 << 62) -> bytes:
    """The bytes the program passed to ``sock``'s own queue (after :meth:`Relay.hold`), without waiting;
    ``peek``: leave them there (all of them: one call)."""
    if peek:
        n = max(1, sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) * 2)
        try:
            return sock.recv(n, socket.MSG_DONTWAIT | socket.MSG_PEEK)
        except BlockingIOError:
            return b""
    out = []
    while limit > 0:
        try:
            chunk = sock.recv(min(1 << 20, limit), socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
        if not chunk:
            break
        out.append(chunk)
        limit -= len(chunk)
    return b"".join(out)


def kick(sock: socket.socket) -> None:
    """Run the data-ready callback of ``sock`` now (``tcp_set_rcvlowat`` does), so bytes that arrived
    before it joined the map go through the program instead of waiting for the next segment."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


# --------------------------------------------------------------------------------------- the choice
class SockmapUnavailable(OSError):
    """``byte_path = "sockmap"`` was asked for, and this kernel or process cannot do it."""


@dataclass
class BytePath:
    """Which byte path new connections of this process take, and why (shown in ``status``)."""

    configured: str = "splice"
    path: str = "splice"
    reason: str | None = None
    relay: Relay | None = None

    def close(self) -> None:
        if self.relay is not None:
            self.relay.close()
            self.relay = None
            if self.path == "sockmap":
                self.path, self.reason = "splice", "closed"

    def status(self) -> dict:
        """What ``status`` shows of it (schema.records.BytePathStatus)."""
        gov = getattr(self.relay, "_governor", None) if self.relay is not None else None
        return {"configured": self.configured, "path": self.path, "reason": self.reason,
                "relayed_sockets": self.relay.joined if self.relay is not None else 0,
                "handed_to_splice": gov.switched if gov is not None else 0}


#: the byte path of this process; the node sets it at start (:func:`activate`); splice until then
ACTIVE = BytePath(reason="not chosen (no node started)")


def choose(configured: str, capacity: int = 1 << 16) -> BytePath:
    """The byte path for ``[node] byte_path``: "splice" as asked; "sockmap" or an error saying why not;
    "auto": sockmap where the kernel and the process's privileges allow it, else splice with the reason."""
    if configured not in BYTE_PATHS:
        raise ValueError(f"byte_path {configured!r} is not one of {', '.join(BYTE_PATHS)}")
    if configured == "splice":
        return BytePath(configured, "splice", "configured")
    try:
        relay = Relay(capacity)
    except OSError as exc:
        why = str(exc)
        if exc.errno == errno.EPERM:
            # said without strerror's words: a node short of privilege for this is not in trouble
            why = "bpf() is not allowed to this process (the in-kernel relay needs CAP_BPF and CAP_NET_ADMIN, or root)"
        elif exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            why += " (this kernel lacks sockmap support: CONFIG_BPF_SYSCALL, CONFIG_NET_SOCK_MSG, 5.13 or newer)"
        if configured == "sockmap":
            raise SockmapUnavailable(f"node.byte_path = \"sockmap\": {why}") from None
        return BytePath(configured, "splice", f"sockmap unavailable: {why}")
    return BytePath(configured, "sockmap", None, relay)


def activate(configured: str) -> BytePath:
    """Choose the byte path for this process (closing the previous relay) and make it :data:`ACTIVE`."""
    global ACTIVE
    new = choose(configured)
    old, ACTIVE = ACTIVE, new
    old.close()
    return new
