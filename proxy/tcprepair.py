"""Moving a live TCP connection between sockets (and machines) with the kernel's TCP_REPAIR.

Why: on a planned move (issue 11) the holder of an address is alive and can hand its peer the exact
state of every proxied socket; on a failover (issue 10) the standby rebuilds the same state from frames
it sniffed. Either way the new socket continues the old connection with the right sequence numbers,
queues, window and options, and the remote end never notices. This module is only the kernel part:
``freeze`` a socket into a :class:`TcpSocketState`, ship it (``to_wire``/``from_wire``: plain msgpack
types, every field validated), ``close_silently`` the old socket, ``restore_quiet`` a new one and let it
``go_live`` (or ``restore``: both at once). It has no I/O loop and no trio: it runs between the pumps, in
whatever network namespace the calling thread is in.

Theory of operation (the sequence space of one socket; as in CRIU's ``soccr``)::

    send side:   snd_una ........ snd_nxt ........ write_seq
                 |<- sent, unacked ->|<-- never sent -->|       send_queue = [snd_una, write_seq)
    receive side:  copied_seq ........ rcv_nxt
                   |<-- unread by us -->|                       recv_queue = [copied_seq, rcv_nxt)

* ``send_seq``/``recv_seq`` are the sequence numbers of the *first* byte of each queue (``snd_una`` and
  ``copied_seq``). Restoring sets them with ``TCP_QUEUE_SEQ`` and refilling the queues advances the kernel's
  counters by the queue lengths, which brings ``write_seq``/``rcv_nxt`` back where they were. From sniffed
  frames (failover) the same two numbers are the remote's ACK and the remote's next sequence number.
* The sent-but-unacknowledged part of the send queue is refilled in repair mode (the kernel books it as
  sent and retransmits it if the remote never got it). The never-sent tail (``send_unsent`` bytes) is
  written once repair mode is off (``go_live``), so it leaves at once instead of waiting for a
  retransmission timer.
* A socket in repair mode that is closed sends nothing (no FIN, no RST): that is how the old holder lets
  go of a connection it handed over.

A move, step by step (what tests/test_tcprepair.py does; the node's sequence is :mod:`proxy.livemove`):

1. old holder: stop writing to the sockets; wait briefly until :func:`unacknowledged` is 0, so that no
   byte is in flight (a byte in flight at the freeze that the remote lost is resent only by the
   retransmission timer, 1 to 3 s later);
2. old holder: keep every segment away from the sockets: the kernel still receives and acknowledges data
   in repair mode, and a byte acknowledged after the snapshot would be lost. The node drops them with an
   nftables rule (:mod:`proxy.movelock`) and keeps the address, so that a move called off can go on here;
   removing the address does the same;
3. old holder: :func:`freeze` each socket, ``to_wire``, send; :func:`close_silently` once the peer has
   restored them (or :func:`thaw` if the move is called off: the connection goes on here);
4. new holder: ``from_wire``, :func:`restore_quiet` each (still in repair mode: it sends nothing);
5. new holder: add the address (only now: a segment that finds the address but no socket is reset),
   announce it (gratuitous ARP), then ``go_live()`` each socket.

:func:`freeze` reads every value twice and retries until they agree, so one snapshot is internally
consistent even if step 2 was skipped.

Known limits: IPv4 only; ESTABLISHED sockets only (half-closed ones are refused with a clear error); the
RTT estimate is not carried over, so the restored socket's first retransmission timeout is long (1 to 4 s
measured here: what the remote really lost waits that long unless ``resend_unacked`` applies) and its
congestion window starts again at 10 segments; a queue larger than ``max_queue`` bytes is refused on the
wire (the caller falls back to cutting the connection). Numbers and findings: bench/TCPREPAIR.md.
"""

from __future__ import annotations

import errno as errno_mod
import fcntl
import functools
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass, fields
from typing import Any

# ------------------------------------------------------------------ kernel constants (include/uapi/linux/tcp.h)
TCP_MAXSEG = 2
TCP_INFO = 11
TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29

TCP_REPAIR_ON = 1
TCP_REPAIR_OFF = 0          # off, and send a window probe (the remote answers with an ACK: state in sync)
TCP_REPAIR_OFF_NO_WP = -1   # off, send nothing

TCP_NO_QUEUE = 0
TCP_RECV_QUEUE = 1
TCP_SEND_QUEUE = 2

TCPOPT_MAXSEG = 2
TCPOPT_WINDOW = 3
TCPOPT_SACK_PERM = 4
TCPOPT_TIMESTAMP = 8

TCPI_OPT_TIMESTAMPS = 1
TCPI_OPT_SACK = 2
TCPI_OPT_WSCALE = 4

TCP_ESTABLISHED = 1
TCP_STATE_NAMES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
                   6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING"}
TCP_MAX_WSCALE = 14

# include/uapi/linux/in.h
IP_FREEBIND = 15
IP_TRANSPARENT = 19

# include/uapi/linux/sockios.h and asm-generic/ioctls.h
#: offset of ``tcpi_bytes_received`` (u64) in struct tcp_info (since Linux 4.1)
_TCPI_BYTES_RECEIVED = 128
SIOCINQ = 0x541B      # FIONREAD: rcv_nxt - copied_seq
SIOCOUTQ = 0x5411     # TIOCOUTQ: write_seq - snd_una
SIOCOUTQNSD = 0x894B  # write_seq - snd_nxt (not sent yet)

# include/asm-generic/socket.h
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33

_REPAIR_WINDOW = struct.Struct("=5I")   # struct tcp_repair_window
_REPAIR_OPT = struct.Struct("=2I")      # struct tcp_repair_opt
_INT = struct.Struct("=i")

U32 = 0xFFFF_FFFF
MAX_QUEUE = 16 * 1024 * 1024   # default bound of each queue on the wire (bytes)
WIRE_VERSION = 1
_FREEZE_TRIES = 20
_CHUNK = 256 * 1024            # refill chunk; halved on ENOMEM (the kernel wants linear skbs in repair mode)


class TcpRepairError(OSError):
    """A freeze or restore step failed in the kernel. ``step`` names it; ``errno`` is the kernel's."""

    def __init__(self, step: str, err: int, detail: str = ""):
        text = f"{step} failed: [Errno {err}] {os.strerror(err)}" if err else f"{step} failed"
        if detail:
            text += f" ({detail})"
        super().__init__(err, text)
        self.step = step

    def __str__(self) -> str:
        return self.args[1]


# ------------------------------------------------------------------ the state
@dataclass(frozen=True)
class RepairWindow:
    """``struct tcp_repair_window``: the window bookkeeping that the sequence numbers alone do not give."""

    snd_wl1: int      # sequence of the segment that last updated snd_wnd
    snd_wnd: int      # remote's receive window (bytes, scaled)
    max_window: int   # largest window the remote ever offered
    rcv_wnd: int      # our advertised receive window
    rcv_wup: int      # rcv_nxt when rcv_wnd was last advertised


@dataclass(frozen=True)
class TcpSocketState:
    """Everything needed to continue one established IPv4 TCP connection in a new socket.

    Validated on construction (ValueError naming the field), so a state that exists is one that
    :func:`restore` can try. The queue-size bound is a wire policy and is checked in ``to_wire``/``from_wire``.
    """

    local_address: str
    local_port: int
    remote_address: str
    remote_port: int
    send_seq: int           # sequence number of send_queue[0] (snd_una)
    recv_seq: int           # sequence number of recv_queue[0] (copied_seq)
    send_queue: bytes       # sent-but-unacknowledged bytes, then the never-sent ones
    send_unsent: int        # how many bytes at the end of send_queue never left (0 from a capture)
    recv_queue: bytes       # bytes the kernel acknowledged that the application has not read
    mss: int                # the remote's MSS (the clamp, options not deducted)
    snd_wscale: int         # the remote's window scale (applies to windows it sends)
    rcv_wscale: int         # ours (applies to windows we send)
    sack_permitted: bool
    timestamps: bool
    tsval: int              # TCP_TIMESTAMP: our timestamp clock at the freeze (low bit: usec clock)
    window: RepairWindow | None  # None: let the kernel start from its defaults (e.g. from a capture)

    def __post_init__(self) -> None:
        for name in ("local_address", "remote_address"):
            _check_ipv4(name, getattr(self, name))
        for name in ("local_port", "remote_port"):
            _check_int(name, getattr(self, name), 1, 0xFFFF)
        for name in ("send_seq", "recv_seq", "tsval"):
            _check_int(name, getattr(self, name), 0, U32)
        for name in ("send_queue", "recv_queue"):
            if type(getattr(self, name)) is not bytes:
                raise ValueError(f"{name}: must be bytes, not {type(getattr(self, name)).__name__}")
        _check_int("send_unsent", self.send_unsent, 0, len(self.send_queue))
        _check_int("mss", self.mss, 64, 0xFFFF)
        _check_int("snd_wscale", self.snd_wscale, 0, TCP_MAX_WSCALE)
        _check_int("rcv_wscale", self.rcv_wscale, 0, TCP_MAX_WSCALE)
        for name in ("sack_permitted", "timestamps"):
            if type(getattr(self, name)) is not bool:
                raise ValueError(f"{name}: must be true or false, not {getattr(self, name)!r}")
        if self.window is not None:
            if not isinstance(self.window, RepairWindow):
                raise ValueError(f"window: must be a RepairWindow or None, not {type(self.window).__name__}")
            for name in _field_names(RepairWindow):
                _check_int(f"window.{name}", getattr(self.window, name), 0, U32)
            w = self.window
            if w.max_window < w.snd_wnd:  # the kernel refuses this with EINVAL
                raise ValueError(f"window.max_window: {w.max_window} is below window.snd_wnd {w.snd_wnd}")
            if _seq_after(w.rcv_wup, self.rcv_nxt):  # the kernel refuses this with EINVAL
                raise ValueError(f"window.rcv_wup: {w.rcv_wup} is after the receive end {self.rcv_nxt}")

    @property
    def rcv_nxt(self) -> int:
        """The next sequence number we expect from the remote."""
        return (self.recv_seq + len(self.recv_queue)) & U32

    @property
    def write_seq(self) -> int:
        """The sequence number our next new byte will have."""
        return (self.send_seq + len(self.send_queue)) & U32

    @property
    def endpoints(self) -> str:
        """``local:port <-> remote:port``, for logs and errors."""
        return f"{self.local_address}:{self.local_port} <-> {self.remote_address}:{self.remote_port}"

    # -------------------------------------------------------------- wire form
    def to_wire(self, *, max_queue: int = MAX_QUEUE) -> dict[str, Any]:
        """This state as a dict of msgpack-native values (str, int, bool, bytes, list, None)."""
        _check_queues(self.send_queue, self.recv_queue, max_queue)
        out: dict[str, Any] = {"v": WIRE_VERSION}
        for f in fields(self):
            out[f.name] = getattr(self, f.name)
        if self.window is not None:
            out["window"] = [getattr(self.window, f.name) for f in fields(RepairWindow)]
        return out

    @classmethod
    def from_wire(cls, data: Any, *, max_queue: int = MAX_QUEUE) -> "TcpSocketState":
        """The state from :meth:`to_wire`'s form (e.g. just unpacked from the peer): ValueError naming the
        first bad field. Unknown and missing keys are errors: both sides must run the same wire version."""
        if not isinstance(data, dict):
            raise ValueError(f"tcp state: must be a map, not {type(data).__name__}")
        if data.get("v") != WIRE_VERSION:
            raise ValueError(f"v: wire version {data.get('v')!r} is not {WIRE_VERSION}")
        names = _field_names(cls)
        for key in data:
            if key != "v" and key not in names:
                raise ValueError(f"{key}: unknown field" if isinstance(key, str) else f"unknown key {key!r}")
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"{missing[0]}: missing")
        values = {n: data[n] for n in names}
        for name in ("send_queue", "recv_queue"):
            if type(values[name]) is not bytes:
                raise ValueError(f"{name}: must be bytes, not {type(values[name]).__name__}")
        _check_queues(values["send_queue"], values["recv_queue"], max_queue)
        window = values["window"]
        if window is not None:
            if not isinstance(window, (list, tuple)) or len(window) != len(_field_names(RepairWindow)):
                raise ValueError(f"window: must be a list of {len(_field_names(RepairWindow))} integers or nil")
            values["window"] = RepairWindow(*window)  # its fields are checked with the state's
        return cls(**values)


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    """A dataclass's field names, computed once: a takeover validates thousands of states at once, and
    ``fields()`` is slow."""
    return tuple(f.name for f in fields(cls))


def _check_ipv4(name: str, value: Any) -> None:
    if type(value) is not str:
        raise ValueError(f"{name}: must be an IPv4 address string, not {type(value).__name__}")
    problem = _ipv4_problem(value)
    if problem is not None:
        raise ValueError(f"{name}: {problem}")


@functools.lru_cache(maxsize=4096)
def _ipv4_problem(value: str) -> str | None:
    """What is wrong with ``value`` as a TCP endpoint's address, or None. Cached: a takeover checks the
    same few client and server addresses thousands of times, and ``IPv4Address`` costs microseconds."""
    try:
        addr = ipaddress.IPv4Address(value)
    except ValueError:
        return f"{value!r} is not an IPv4 address"
    if addr.is_unspecified or addr.is_multicast or str(addr) == "255.255.255.255":
        return f"{value} cannot be a TCP endpoint"
    return None


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if type(value) is not int:  # bool is an int subclass: refused on purpose
        raise ValueError(f"{name}: must be an integer, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name}: {value} is outside {low}..{high}")


def _check_queues(send_queue: bytes, recv_queue: bytes, max_queue: int) -> None:
    for name, q in (("send_queue", send_queue), ("recv_queue", recv_queue)):
        if len(q) > max_queue:
            raise ValueError(f"{name}: {len(q)} bytes is over the bound of {max_queue}")


def _seq_after(a: int, b: int) -> bool:
    """``after(a, b)`` in 32-bit sequence space, as the kernel computes it."""
    return ((b - a) & U32) > 0x7FFF_FFFF


# ------------------------------------------------------------------ kernel calls with named steps
def _call(step: str, fn, *args):
    try:
        return fn(*args)
    except OSError as exc:
        raise TcpRepairError(step, exc.errno or errno_mod.EIO) from None


def _ioctl_int(sock: socket.socket, request: int, step: str) -> int:
    buf = _call(step, fcntl.ioctl, sock.fileno(), request, b"\0" * _INT.size)
    return _INT.unpack(buf)[0]


def _set(sock: socket.socket, level: int, opt: int, value: int | bytes, step: str) -> None:
    _call(step, sock.setsockopt, level, opt, value)


def _queue_seq(sock: socket.socket, queue: int, name: str) -> int:
    _set(sock, socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, queue, f"select {name} queue")
    return _call(f"read {name} queue sequence", sock.getsockopt, socket.IPPROTO_TCP, TCP_QUEUE_SEQ) & U32


def _peek(sock: socket.socket, size: int, name: str) -> bytes:
    if size <= 0:
        return b""
    try:
        return sock.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""
    except OSError as exc:
        raise TcpRepairError(f"read {name} queue", exc.errno or errno_mod.EIO) from None


# ------------------------------------------------------------------ freeze / close / thaw
def freeze(sock: socket.socket) -> TcpSocketState:
    """Put ``sock`` (an established IPv4 TCP socket) into repair mode and return its state.

    The socket stays in repair mode (frozen): hand it to :func:`close_silently` once the state is safe
    with the peer, or to :func:`thaw` to go on serving it here. Every value is read twice and the snapshot
    is retried until the two reads agree, so segments arriving meanwhile cannot tear it (see the module
    docstring for why the caller should still keep segments away until the close).
    """
    if sock.family != socket.AF_INET or sock.type != socket.SOCK_STREAM:
        raise TcpRepairError("check socket", errno_mod.EAFNOSUPPORT, "only IPv4 TCP sockets")
    was_repair = bool(_call("read TCP_REPAIR", sock.getsockopt, socket.IPPROTO_TCP, TCP_REPAIR))
    _set(sock, socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_ON, "TCP_REPAIR on")
    try:
        return _snapshot(sock)
    except BaseException:
        if not was_repair:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
                sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
            except OSError:
                pass
        raise


def _snapshot(sock: socket.socket) -> TcpSocketState:
    local = _call("getsockname", sock.getsockname)
    remote = _call("getpeername", sock.getpeername)
    for _ in range(_FREEZE_TRIES):
        info = _call("read TCP_INFO", sock.getsockopt, socket.IPPROTO_TCP, TCP_INFO, 8)
        state, options, wscales = info[0], info[5], info[6]
        if state != TCP_ESTABLISHED:
            raise TcpRepairError("check state", errno_mod.ENOTCONN,
                                 f"socket is {TCP_STATE_NAMES.get(state, state)}, only ESTABLISHED can move")
        timestamps = bool(options & TCPI_OPT_TIMESTAMPS)
        # in repair mode TCP_MAXSEG reads the clamp (the remote's MSS), not the current segment size
        mss = _call("read TCP_MAXSEG", sock.getsockopt, socket.IPPROTO_TCP, TCP_MAXSEG)
        tsval = 0
        if timestamps:
            tsval = _call("read TCP_TIMESTAMP", sock.getsockopt, socket.IPPROTO_TCP, TCP_TIMESTAMP) & U32
        window = _read_window(sock)

        rcv_nxt = _queue_seq(sock, TCP_RECV_QUEUE, "receive")
        inq = _ioctl_int(sock, SIOCINQ, "read receive queue length")
        recv_queue = _peek(sock, inq + 1, "receive")
        write_seq = _queue_seq(sock, TCP_SEND_QUEUE, "send")
        outq = _ioctl_int(sock, SIOCOUTQ, "read send queue length")
        unsent = _ioctl_int(sock, SIOCOUTQNSD, "read unsent length")
        # the first retransmit-queue skb may still hold an acknowledged head: take the queue's tail
        peeked = _peek(sock, outq + 65536, "send")
        send_queue = peeked[len(peeked) - outq:] if outq else b""
        _set(sock, socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE, "deselect queue")

        again = (_queue_seq(sock, TCP_RECV_QUEUE, "receive"), _ioctl_int(sock, SIOCINQ, "read receive queue length"),
                 _ioctl_int(sock, SIOCOUTQ, "read send queue length"),
                 _ioctl_int(sock, SIOCOUTQNSD, "read unsent length"), _read_window(sock))
        _set(sock, socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE, "deselect queue")
        if again == (rcv_nxt, inq, outq, unsent, window) and len(recv_queue) == inq and len(peeked) >= outq:
            return TcpSocketState(
                local_address=local[0], local_port=local[1], remote_address=remote[0], remote_port=remote[1],
                send_seq=(write_seq - outq) & U32, recv_seq=(rcv_nxt - inq) & U32,
                send_queue=send_queue, send_unsent=unsent, recv_queue=recv_queue, mss=mss,
                snd_wscale=(wscales & 0x0F) if options & TCPI_OPT_WSCALE else 0,
                rcv_wscale=(wscales >> 4) if options & TCPI_OPT_WSCALE else 0,
                sack_permitted=bool(options & TCPI_OPT_SACK), timestamps=timestamps, tsval=tsval, window=window)
    raise TcpRepairError("snapshot", errno_mod.EAGAIN,
                         f"state kept changing over {_FREEZE_TRIES} reads: segments still reach the socket")


def stream_origins(sock: Any, written: int = 0) -> tuple[int, int]:
    """``(remote's ISN + 1, own ISN + 1)`` of an established socket: the sequence numbers of the first
    byte each way (stream offset 0), which a stateful standby that missed the handshake cannot know.

    The kernel says neither, but in repair mode it says ``rcv_nxt`` and ``write_seq``; ``tcpi_bytes_received``
    is exactly how far ``rcv_nxt`` moved since the handshake, and ``written`` is how many bytes the
    application wrote (0 right after accept or connect, when a relay asks). Repair mode is on for a few
    system calls and left without a window probe; the application must not write meanwhile (a write in
    repair mode fails), segments arriving meanwhile are processed as usual (the reads are repeated until
    ``bytes_received`` stands still around them). ``bytes_acked`` is not used: it counts an active
    opener's SYN (measured on this kernel), a passive opener's not."""
    if getattr(sock, "family", None) != socket.AF_INET:
        raise TcpRepairError("check socket", errno_mod.EAFNOSUPPORT, "only IPv4 TCP sockets")
    _set(sock, socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_ON, "TCP_REPAIR on")
    try:
        for _ in range(_FREEZE_TRIES):
            before = _bytes_received(sock)
            rcv_nxt = _queue_seq(sock, TCP_RECV_QUEUE, "receive")
            write_seq = _queue_seq(sock, TCP_SEND_QUEUE, "send")
            _set(sock, socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE, "deselect queue")
            if _bytes_received(sock) == before:
                return (rcv_nxt - before) & U32, (write_seq - written) & U32
        raise TcpRepairError("read stream origins", errno_mod.EAGAIN,
                             f"bytes kept arriving over {_FREEZE_TRIES} reads")
    finally:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
        except OSError:
            pass
        _repair_off(sock, TCP_REPAIR_OFF_NO_WP, "TCP_REPAIR off")


def _bytes_received(sock: Any) -> int:
    """``tcpi_bytes_received`` (RFC 4898's HCThruOctetsReceived: how far ``rcv_nxt`` moved)."""
    raw = _call("read TCP_INFO", sock.getsockopt, socket.IPPROTO_TCP, TCP_INFO, _TCPI_BYTES_RECEIVED + 8)
    if len(raw) < _TCPI_BYTES_RECEIVED + 8:
        raise TcpRepairError("read TCP_INFO", errno_mod.EOPNOTSUPP, "no tcpi_bytes_received on this kernel")
    return struct.unpack_from("=Q", raw, _TCPI_BYTES_RECEIVED)[0]


def unacknowledged(sock: socket.socket) -> int:
    """Bytes ``sock`` has sent that the remote has not acknowledged yet (in flight).

    Before a planned move the holder stops writing and waits (about one round trip) for this to reach 0
    while the address is still up: then the state carries no bytes in flight, and nothing needs resending
    after the restore (see :func:`restore`'s ``resend_unacked``)."""
    return _ioctl_int(sock, SIOCOUTQ, "read send queue length") - _ioctl_int(sock, SIOCOUTQNSD, "read unsent length")


def _read_window(sock: socket.socket) -> RepairWindow | None:
    """TCP_REPAIR_WINDOW, or None on a kernel without it (before 4.8; the restore then skips it)."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, _REPAIR_WINDOW.size)
    except OSError as exc:
        if exc.errno == errno_mod.ENOPROTOOPT:
            return None
        raise TcpRepairError("read TCP_REPAIR_WINDOW", exc.errno or errno_mod.EIO) from None
    return RepairWindow(*_REPAIR_WINDOW.unpack(raw))


def close_silently(sock: socket.socket) -> None:
    """Close ``sock`` without a FIN or RST reaching the remote (repair mode is turned on if it is off)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_ON)
    finally:
        sock.close()


def thaw(sock: socket.socket) -> None:
    """Leave repair mode after :func:`freeze` and go on serving here (a move that was refused)."""
    _set(sock, socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE, "deselect queue")
    _repair_off(sock, TCP_REPAIR_OFF, "TCP_REPAIR off")


def _repair_off(sock: socket.socket, how: int, step: str) -> None:
    """Leave repair mode. The kernel then clears the socket's SO_REUSEADDR (repair mode forces reuse and
    leaving it sets "no reuse"), after which a listener on the same address and port can no longer be
    bound (measured: EADDRINUSE): set it again."""
    _set(sock, socket.IPPROTO_TCP, TCP_REPAIR, how, step)
    _set(sock, socket.SOL_SOCKET, socket.SO_REUSEADDR, 1, f"{step}: SO_REUSEADDR")


# ------------------------------------------------------------------ restore
class RestoredSocket:
    """A restored socket that is still in repair mode: it sends nothing (no probe, no data) until
    :meth:`go_live`. Why two steps: on a move the address comes up only after the sockets exist, and
    anything a socket sends before that is answered towards an address nobody holds yet. Worse, the remote
    answers at most one segment outside its window per 500 ms (``tcp_invalid_ratelimit``), so a window
    probe spent too early is not answered again soon, and bytes booked as sent that the remote already has
    then wait for the retransmission timer (1 s or more) and fill the congestion window meanwhile."""

    def __init__(self, sock: socket.socket, state: TcpSocketState, pending: bytes) -> None:
        self.sock = sock
        self.state = state
        self.pending = pending  # to write once live: never sent (or, with resend_unacked, to resend)

    def go_live(self, *, ts_advance_ms: int = 0) -> socket.socket:
        """Leave repair mode (the kernel sends a window probe: the remote's answer acknowledges whatever it
        has and opens the window) and write the pending bytes. After this the connection is live: a
        failure here raises TcpRepairError and the caller must reset the connection (close normally).

        ``ts_advance_ms``: move the timestamp clock this far past the frozen ``tsval`` first (the time
        since the freeze, and a margin). Why: the restored clock starts where the old socket's stood at
        the freeze, but the old socket may still have sent a segment after it (a delayed ACK fires in
        repair mode too), with a later TSval; the remote then drops everything this socket sends as too
        old (PAWS) until its clock catches up, and the first loss of a restored socket waits for its
        3 s initial retransmission timeout (measured: a client stalled 5.9 s, bench/MOVES.md). A clock
        that runs ahead is harmless: only the remote's PAWS check and our own RTT samples read it."""
        sock = self.sock
        step = f"go live {self.state.endpoints}"
        if ts_advance_ms > 0 and self.state.timestamps:
            tsval = self.state.tsval
            units = ts_advance_ms * 1000 if tsval & 1 else ts_advance_ms  # low bit set: a usec clock
            _set(sock, socket.IPPROTO_TCP, TCP_TIMESTAMP,
                 _INT.pack(_signed(((tsval + units) & U32 & ~1) | (tsval & 1))), f"{step}: TCP_TIMESTAMP")
        _repair_off(sock, TCP_REPAIR_OFF, f"{step}: TCP_REPAIR off")
        done, pending = 0, self.pending
        while done < len(pending):  # the buffer was sized for it: this does not wait
            try:
                done += sock.send(pending[done:], socket.MSG_DONTWAIT)
            except BlockingIOError:
                raise TcpRepairError(f"{step}: write pending bytes", errno_mod.ENOBUFS,
                                     f"{len(pending) - done} of {len(pending)} did not fit") from None
            except OSError as exc:
                raise TcpRepairError(f"{step}: write pending bytes", exc.errno or errno_mod.EIO) from None
        self.pending = b""
        return sock

    def close_silently(self) -> None:
        """Give up on it without the remote seeing anything (e.g. the move was called off)."""
        close_silently(self.sock)


def restore(state: TcpSocketState, *, resend_unacked: bool = False) -> socket.socket:
    """A new, live socket that continues ``state``'s connection: :func:`restore_quiet` then ``go_live``.

    For when the local address is already up here and reachable; on a move, use :func:`restore_quiet`,
    bring the address up, announce it, then ``go_live()`` each socket."""
    restored = restore_quiet(state, resend_unacked=resend_unacked)
    try:
        return restored.go_live()
    except BaseException:
        restored.close_silently()
        raise


def restore_quiet(state: TcpSocketState, *, resend_unacked: bool = False) -> RestoredSocket:
    """A new socket, in the calling thread's network namespace, holding ``state``'s connection in repair
    mode (it sends nothing until :meth:`RestoredSocket.go_live`).

    The local address need not exist yet (IP_TRANSPARENT): add it after this returns, before ``go_live``.
    On failure: TcpRepairError naming the step (and the kernel's errno); the half-made socket is closed
    silently, so nothing is left behind and the remote sees nothing.

    ``resend_unacked``: write the bytes the remote has not acknowledged as new data when going live, so
    they leave at once, instead of booking them as sent (then they go out again only at the retransmission
    timeout, 1 to 3 s on a socket without an RTT estimate, if the remote really lost them). ONLY when the
    remote is known to lack them, i.e. its last ACK equals ``send_seq``: a remote that already has some
    answers with ACKs above what this socket has sent, the kernel ignores those (RFC 793: ACK of unsent
    data), the congestion window fills and the connection stalls for good (measured: no progress in 30 s).
    For a planned move: wait until :func:`unacknowledged` is 0 before freezing and restore as booked.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        pending = _restore_into(sock, state, resend_unacked)
    except TcpRepairError as exc:
        close_silently(sock)
        raise TcpRepairError(f"restore {state.endpoints}: {exc.step}", exc.errno) from None
    except BaseException:
        close_silently(sock)
        raise
    return RestoredSocket(sock, state, pending)


def _restore_into(sock: socket.socket, state: TcpSocketState, resend_unacked: bool) -> bytes:
    """The repair-mode part of a restore, in the order that works on Linux 6.x; returns the bytes to
    write once live."""
    tcp = socket.IPPROTO_TCP
    _set(sock, tcp, TCP_REPAIR, TCP_REPAIR_ON, "TCP_REPAIR on")
    _set(sock, socket.IPPROTO_IP, IP_TRANSPARENT, 1, "IP_TRANSPARENT")
    _set(sock, socket.IPPROTO_IP, IP_FREEBIND, 1, "IP_FREEBIND")
    _make_room(sock, state)
    # the segment size is computed at connect() from the clamp known then; TCP_REPAIR_OPTIONS sets the clamp
    # later but does not recompute it (the socket would go on with the 536-byte default), so give it now
    _set(sock, tcp, TCP_MAXSEG, state.mss, "TCP_MAXSEG")
    _call("bind", sock.bind, (state.local_address, state.local_port))
    _set(sock, tcp, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE, "select receive queue")
    _set(sock, tcp, TCP_QUEUE_SEQ, _INT.pack(_signed(state.recv_seq)), "set receive queue sequence")
    _set(sock, tcp, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE, "select send queue")
    _set(sock, tcp, TCP_QUEUE_SEQ, _INT.pack(_signed(state.send_seq)), "set send queue sequence")
    _set(sock, tcp, TCP_REPAIR_QUEUE, TCP_NO_QUEUE, "deselect queue")
    _call("connect", sock.connect, (state.remote_address, state.remote_port))  # repair mode: no SYN

    opts = [(TCPOPT_MAXSEG, state.mss)]
    if state.sack_permitted:
        opts.append((TCPOPT_SACK_PERM, 0))
    if state.snd_wscale or state.rcv_wscale:
        opts.append((TCPOPT_WINDOW, state.snd_wscale | (state.rcv_wscale << 16)))
    if state.timestamps:
        opts.append((TCPOPT_TIMESTAMP, 0))
    _set(sock, tcp, TCP_REPAIR_OPTIONS, b"".join(_REPAIR_OPT.pack(*o) for o in opts), "TCP_REPAIR_OPTIONS")
    if state.timestamps:
        _set(sock, tcp, TCP_TIMESTAMP, _INT.pack(_signed(state.tsval)), "TCP_TIMESTAMP")

    sent = 0 if resend_unacked else len(state.send_queue) - state.send_unsent
    _refill(sock, TCP_SEND_QUEUE, state.send_queue[:sent], "send")
    _refill(sock, TCP_RECV_QUEUE, state.recv_queue, "receive")
    if state.window is not None:
        w = state.window
        _set(sock, tcp, TCP_REPAIR_WINDOW,
             _REPAIR_WINDOW.pack(w.snd_wl1, w.snd_wnd, w.max_window, w.rcv_wnd, w.rcv_wup), "TCP_REPAIR_WINDOW")
    _set(sock, tcp, TCP_REPAIR_QUEUE, TCP_NO_QUEUE, "deselect queue")
    return state.send_queue[sent:]


def _make_room(sock: socket.socket, state: TcpSocketState) -> None:
    """Grow the buffers when a queue would not fit the defaults: refilling in repair mode cannot wait
    for space (nothing drains a repair-mode queue), it fails. The kernel doubles the value for overhead;
    ``*FORCE`` passes the ``wmem_max``/``rmem_max`` caps (repair needs CAP_NET_ADMIN anyway)."""
    for queue, get_opt, force_opt, name in ((state.send_queue, socket.SO_SNDBUF, SO_SNDBUFFORCE, "SO_SNDBUFFORCE"),
                                            (state.recv_queue, socket.SO_RCVBUF, SO_RCVBUFFORCE, "SO_RCVBUFFORCE")):
        need = 2 * len(queue) + 65536
        if queue and sock.getsockopt(socket.SOL_SOCKET, get_opt) < need:
            _set(sock, socket.SOL_SOCKET, force_opt, need, name)


def _refill(sock: socket.socket, queue: int, data: bytes, name: str) -> None:
    if not data:
        return
    _set(sock, socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, queue, f"select {name} queue")
    view = memoryview(data)
    chunk = _CHUNK
    while view:
        try:
            n = sock.send(view[:chunk], socket.MSG_DONTWAIT)
        except OSError as exc:
            if exc.errno in (errno_mod.ENOMEM, errno_mod.EAGAIN) and chunk > 1024:
                chunk //= 2
                continue
            raise TcpRepairError(f"refill {name} queue", exc.errno or errno_mod.EIO,
                                 f"{len(data) - len(view)} of {len(data)} bytes in") from None
        if n <= 0:
            raise TcpRepairError(f"refill {name} queue", errno_mod.EIO, "the kernel took no bytes")
        view = view[n:]


def _signed(value: int) -> int:
    """A u32 as the C int that setsockopt takes."""
    return value - (1 << 32) if value > 0x7FFF_FFFF else value
