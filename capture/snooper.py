"""The standby's capture loop: frames of the peer's service traffic, from the kernel to a callback.

One ``AF_PACKET``/``SOCK_RAW`` socket on one interface (the macvlan carrying the peer's MAC), with a
classic BPF filter from :mod:`capture.bpf` so that only TCP to/from the service addresses on the service
ports ever reaches Python. Everything else (ARP, the sync link, other hosts) is dropped in the kernel.

Order of setup, and why: the socket is created with protocol 0, which the kernel does not hook into
any receive path, so nothing queues on it; the filter is attached; only then ``bind`` sets the
interface and ``ETH_P_ALL``. So no unfiltered frame can ever sit in the queue (no drain needed).

Outgoing frames are seen too (``PACKET_IGNORE_OUTGOING`` is left off): when this node serves the
address itself, its own replies are half of every conversation. A frame this host sends is seen once.

The loop (:meth:`Snooper.run`) waits for readability, then reads up to ``batch`` frames with
``recv_into`` into one reusable buffer until ``EAGAIN``, hands each to ``on_frame(view, ts)`` and
yields to trio. ``view`` is a memoryview of that buffer: valid only during the call, copy what you
keep (``protocols.pipeline.Pipeline`` copies what it buffers). ``ts`` is ``time.time()`` right
after the read: one vDSO call, cheaper than parsing an ``SO_TIMESTAMPNS`` control message per frame,
and the decoders only use time for idle expiry (hours), so read time is precise enough.

Frames longer than the buffer (``snaplen``, 256 KiB by default; GRO/TSO frames on veth reach ~64 KiB)
are delivered cut short and counted as ``truncated`` (``MSG_TRUNC`` gives the real length).

Bad input never kills a node: an exception from ``on_frame`` is counted in ``callback_errors``,
logged once per exception type, and the loop goes on.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import time
from typing import Callable

import trio

from . import bpf

__all__ = ["Snooper", "ETH_P_ALL"]

log = logging.getLogger(__name__)

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_IGNORE_OUTGOING = 23
SO_RCVBUFFORCE = 33
_TPACKET_STATS = struct.Struct("=II")  # struct tpacket_stats {tp_packets; tp_drops}

FrameCallback = Callable[[memoryview, float], None]


class Snooper:
    """A filtered packet socket on ``ifname`` and the trio task that feeds ``on_frame``.

    Owns the socket: :meth:`close` (or leaving the ``with`` block) releases it. The socket is opened
    in the constructor, so permission and interface errors surface where the snooper is made.
    """

    def __init__(self, ifname: str, addresses: list[str], ports: list[int], on_frame: FrameCallback,
                 *, rcvbuf: int = 8 << 20, batch: int = 256, snaplen: int = 1 << 18,
                 vlan: bool = True) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self.ifname = ifname
        self.addresses = list(addresses)
        self.ports = list(ports)
        self.on_frame = on_frame
        self.batch = batch
        self.program = bpf.tcp_service_filter(self.addresses, self.ports, vlan=vlan)
        self._buf = bytearray(snaplen)
        self._view = memoryview(self._buf)
        self.counters = {"frames": 0, "bytes": 0, "batches": 0, "truncated": 0,
                         "callback_errors": 0, "kernel_packets": 0, "kernel_drops": 0}
        self._logged_errors: set[type] = set()
        self.sock: socket.socket | None = None
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: nothing queues yet
        try:
            bpf.attach(sock, self.program)
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except PermissionError:  # without CAP_NET_ADMIN: as much as rmem_max allows
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.bind((ifname, ETH_P_ALL))  # Python converts the protocol to network order itself
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    # --------------------------------------------------------------- lifecycle
    def close(self) -> None:
        if self.sock is not None:
            try:
                self._read_kernel_stats()
            except OSError:
                pass
            self.sock.close()
            self.sock = None

    def __enter__(self) -> "Snooper":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------- loop
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Deliver frames until cancelled (or until the socket is closed)."""
        sock = self.sock
        if sock is None:
            raise RuntimeError("snooper is closed")
        task_status.started()
        while True:
            await trio.lowlevel.wait_readable(sock)
            self.read_batch()
            await trio.lowlevel.checkpoint()

    def read_batch(self) -> int:
        """Read and deliver up to ``batch`` queued frames without blocking; how many were read."""
        sock = self.sock
        if sock is None:
            return 0
        recv_into = sock.recv_into
        buf, view, size = self._buf, self._view, len(self._buf)
        on_frame, now = self.on_frame, time.time
        c = self.counters
        got = nbytes = 0
        for _ in range(self.batch):
            try:
                n = recv_into(buf, size, socket.MSG_TRUNC)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # e.g. ENETDOWN when the interface goes away: wait, don't spin
                if exc.errno in (errno.ENETDOWN, errno.ENXIO):
                    log.warning("snooper on %s: %s", self.ifname, exc)
                    break
                raise
            got += 1
            nbytes += n
            if n > size:
                c["truncated"] += 1
                n = size
            try:
                on_frame(view[:n], now())
            except Exception as exc:  # bad input never kills the node: count, log once per kind
                c["callback_errors"] += 1
                if type(exc) not in self._logged_errors:
                    self._logged_errors.add(type(exc))
                    log.exception("snooper on %s: on_frame raised %s (logged once per kind)",
                                  self.ifname, type(exc).__name__)
        if got:
            c["frames"] += got
            c["bytes"] += nbytes
            c["batches"] += 1
        return got

    # ------------------------------------------------------------------ status
    def _read_kernel_stats(self) -> None:
        """Fold ``PACKET_STATISTICS`` into our counters: reading it resets the kernel's."""
        if self.sock is None:
            return
        raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _TPACKET_STATS.size)
        packets, drops = _TPACKET_STATS.unpack(raw)
        self.counters["kernel_packets"] += packets
        self.counters["kernel_drops"] += drops

    def stats(self) -> dict:
        """Counters since the start: frames/bytes/batches delivered, truncated frames, callback
        errors, and the kernel's packets (passed the filter, incl. dropped) and drops (queue full)."""
        self._read_kernel_stats()
        return dict(self.counters, rcvbuf=getattr(self, "rcvbuf", 0))
