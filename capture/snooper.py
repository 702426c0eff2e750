"""The standby's capture loop: frames of the peer's service traffic, from the kernel to a callback.

One ``AF_PACKET``/``SOCK_RAW`` socket on one interface (the macvlan carrying the peer's MAC), with a
classic BPF filter from :mod:`capture.bpf` so that only TCP to/from the service addresses on the service
ports ever reaches Python. Everything else (ARP, the sync link, other hosts) is dropped in the kernel.

Order of setup, and why: the socket is created with protocol 0, which the kernel does not hook into
any receive path, so nothing queues on it; the filter is attached; only then ``bind`` sets the
interface and ``ETH_P_ALL``. So no unfiltered frame can ever sit in the queue (no drain needed).

Outgoing frames are seen too (``PACKET_IGNORE_OUTGOING`` is left off): when this node serves the
address itself, its own replies are half of every conversation. A frame this host sends is seen once.

Two ways to read, chosen at construction (``status`` shows which: ``path``):

* ``ring`` (the default): a ``TPACKET_V3`` receive ring shared with the kernel (``PACKET_RX_RING`` +
  ``mmap``). The kernel writes frames into blocks of ``block_size`` bytes and hands a block over when
  it is full or ``retire_ms`` after its first frame; the loop waits (one ``poll`` through trio) until
  a block is ready, hands each frame to ``on_frame`` as a view *into the ring* (no system call and no
  copy per frame), and gives the block back by writing its status word. The ring's size
  (``ring_bytes``, default twice ``rcvbuf``, as the kernel doubles ``SO_RCVBUF``) is what the kernel
  can queue while Python is busy, as the receive buffer is for ``recv``. ``ts`` is the kernel's receive time of the frame.
* ``recv`` (fallback, when the ring cannot be set up, e.g. no memory for it, or ``ring=False``):
  ``recv_into`` into one reusable buffer until ``EAGAIN``, ``ts`` = ``time.time()`` after the read
  (one vDSO call, cheaper than an ``SO_TIMESTAMPNS`` control message per frame).

Either way ``view`` is valid only during the call: copy what you keep (``protocols.pipeline.Pipeline``
copies only the message heads it buffers). The decoders use time only for idle expiry (hours).
Each wakeup reads up to ``batch`` frames (whole blocks on the ring), then yields to trio.

Frames longer than ``snaplen`` (256 KiB by default; GRO/TSO frames on veth reach ~64 KiB; on the ring
a frame must also fit in a block) are delivered cut short and counted as ``truncated``.

Bad input never kills a node: an exception from ``on_frame`` is counted in ``callback_errors``,
logged once per exception type, and the loop goes on.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
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
PACKET_RX_RING = 5
PACKET_VERSION = 10
TPACKET_V1, TPACKET_V3 = 0, 2
TP_STATUS_KERNEL, TP_STATUS_USER = 0, 1
_TPACKET_STATS = struct.Struct("=II")  # struct tpacket_stats {tp_packets; tp_drops}
_TPACKET_STATS_V3 = struct.Struct("=III")  # ... and tp_freeze_q_cnt
# struct tpacket_req3 {block_size, block_nr, frame_size, frame_nr, retire_blk_tov, sizeof_priv, feature_req_word}
_REQ3 = struct.Struct("=7I")
# struct tpacket_block_desc {version; offset_to_priv; tpacket_hdr_v1 {block_status; num_pkts; offset_to_first_pkt; ...}}
_BLOCK_STATUS = 8
_BLOCK = struct.Struct("=III")  # at _BLOCK_STATUS: block_status, num_pkts, offset_to_first_pkt
_STATUS = struct.Struct("=I")
# struct tpacket3_hdr {tp_next_offset, tp_sec, tp_nsec, tp_snaplen, tp_len, tp_status, tp_mac, tp_net, ...}
_PKT = struct.Struct("=IIIIIIH")
_FRAME_SIZE = 2048  # TPACKET_V3 packs frames of any size into a block; the kernel only checks this divides it

FrameCallback = Callable[[memoryview, float], None]


class Snooper:
    """A filtered packet socket on ``ifname`` and the trio task that feeds ``on_frame``.

    Owns the socket: :meth:`close` (or leaving the ``with`` block) releases it. The socket is opened
    in the constructor, so permission and interface errors surface where the snooper is made.
    """

    def __init__(self, ifname: str, addresses: list[str], ports: list[int], on_frame: FrameCallback,
                 *, rcvbuf: int = 8 << 20, batch: int = 256, snaplen: int = 1 << 18,
                 vlan: bool = True, peers: list[str] | None = None, ring: bool = True, ring_bytes: int | None = None,
                 block_size: int = 1 << 18, retire_ms: int = 4) -> None:
        """``ring``: try the TPACKET_V3 ring first (``ring_bytes``, default twice ``rcvbuf``, in blocks of
        ``block_size``; a block not full is handed over ``retire_ms`` after its first frame), falling
        back to ``recv`` if the kernel refuses it; False: ``recv`` only. ``peers``: only segments whose
        other end is one of these (see :func:`capture.bpf.tcp_service_filter`)."""
        if batch < 1:
            raise ValueError("batch must be at least 1")
        if block_size < mmap.PAGESIZE or block_size % mmap.PAGESIZE:
            raise ValueError(f"block_size {block_size} is not a multiple of the page size {mmap.PAGESIZE}")
        self.ifname = ifname
        self.addresses = list(addresses)
        self.ports = list(ports)
        self.on_frame = on_frame
        self.batch = batch
        self.program = bpf.tcp_service_filter(self.addresses, self.ports, vlan=vlan, peers=peers)
        self.snaplen = snaplen
        self._buf = bytearray()
        self._view = memoryview(self._buf)
        self.counters = {"frames": 0, "bytes": 0, "batches": 0, "truncated": 0,
                         "callback_errors": 0, "kernel_packets": 0, "kernel_drops": 0}
        self._logged_errors: set[type] = set()
        self.sock: socket.socket | None = None
        self.path = "recv"
        self.ring_error: str | None = None
        self.ring_bytes = 0
        self._map: mmap.mmap | None = None
        self._ring: memoryview | None = None
        self._block = 0
        self._block_nr = 0
        self._block_size = block_size
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: nothing queues yet
        try:
            bpf.attach(sock, self.program)
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except PermissionError:  # without CAP_NET_ADMIN: as much as rmem_max allows
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            if ring:  # the same room the kernel gives recv (it doubles SO_RCVBUF for its bookkeeping)
                self._open_ring(sock, ring_bytes or 2 * rcvbuf, block_size, retire_ms)
            if self.path == "recv":
                self._buf = bytearray(snaplen)
                self._view = memoryview(self._buf)
            sock.bind((ifname, ETH_P_ALL))  # Python converts the protocol to network order itself
            sock.setblocking(False)
        except BaseException:
            self._close_ring()
            sock.close()
            raise
        self.sock = sock
        self.rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    def _open_ring(self, sock: socket.socket, size: int, block_size: int, retire_ms: int) -> None:
        """Set up the TPACKET_V3 ring and map it; on a kernel refusal stay on ``recv`` (logged)."""
        block_nr = max(2, size // block_size)
        try:
            sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
            frames = block_size // _FRAME_SIZE * block_nr
            sock.setsockopt(SOL_PACKET, PACKET_RX_RING,
                            _REQ3.pack(block_size, block_nr, _FRAME_SIZE, frames, retire_ms, 0, 0))
            try:
                self._map = mmap.mmap(sock.fileno(), block_size * block_nr, mmap.MAP_SHARED,
                                      mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError:
                sock.setsockopt(SOL_PACKET, PACKET_RX_RING, _REQ3.pack(0, 0, 0, 0, 0, 0, 0))  # free it
                raise
        except OSError as exc:
            self.ring_error = f"{exc.strerror or exc} ({block_nr} blocks of {block_size} bytes)"
            log.warning("snooper on %s: no TPACKET_V3 ring: %s; reading with recv", self.ifname, self.ring_error)
            try:
                sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V1)
            except OSError:
                pass
            return
        self._ring = memoryview(self._map)
        self._block_nr = block_nr
        self.ring_bytes = block_size * block_nr
        self.path = "ring"

    def _close_ring(self) -> None:
        if self._ring is not None:
            self._ring.release()  # a view handed to on_frame and kept would raise here: a caller bug
            self._ring = None
        if self._map is not None:
            self._map.close()
            self._map = None

    # --------------------------------------------------------------- lifecycle
    def close(self) -> None:
        if self.sock is not None:
            try:
                self._read_kernel_stats()
            except OSError:
                pass
            try:
                self._close_ring()
            except BufferError:  # someone kept a view of a frame: the map goes with the last reference
                log.warning("snooper on %s: a frame view outlived the ring", self.ifname)
                self._ring = self._map = None
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
            if not self.read_batch():
                self._take_error()
            await trio.lowlevel.checkpoint()

    def _take_error(self) -> None:
        """A wake-up without a frame: read (and so clear) a pending socket error, and say it.

        Why: the kernel sets ENETDOWN on a packet socket whose interface goes down, and the socket
        polls ready until the error is read. The recv path reads it with the next recv; the ring path
        never reads the socket, so its loop spun: a stateful node's observer burned a whole core while
        the node's link was down (0.98 s of CPU per second, measured), and a dead node's observer in the
        lab took 14-25 ms of the survivor's CPUs during its takeover (bench/FAILOVER.md)."""
        sock = self.sock
        if sock is None:
            return
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            log.warning("snooper on %s: %s (frames come again when it is back)", self.ifname, os.strerror(err))

    def read_batch(self) -> int:
        """Read and deliver up to ``batch`` queued frames without blocking; how many were read."""
        sock = self.sock
        if sock is None:
            return 0
        if self._ring is not None:
            return self._read_ring()
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
                self._callback_error(exc)
        if got:
            c["frames"] += got
            c["bytes"] += nbytes
            c["batches"] += 1
        return got

    def _read_ring(self) -> int:
        """Deliver the frames of every block the kernel has handed over (stopping after ``batch``
        frames, at a block's end), giving each block back; how many frames."""
        ring, size, nr = self._ring, self._block_size, self._block_nr
        on_frame, unpack_block, unpack_pkt = self.on_frame, _BLOCK.unpack_from, _PKT.unpack_from
        c = self.counters
        got = nbytes = blocks = truncated = 0
        while got < self.batch:
            base = self._block * size
            status, count, off = unpack_block(ring, base + _BLOCK_STATUS)
            if not status & TP_STATUS_USER:
                break
            off += base
            for _ in range(count):
                step, sec, nsec, snap, length, _st, mac = unpack_pkt(ring, off)
                if length > snap:
                    truncated += 1
                start = off + mac
                try:
                    on_frame(ring[start:start + snap], sec + nsec * 1e-9)
                except Exception as exc:  # bad input never kills the node: count, log once per kind
                    self._callback_error(exc)
                nbytes += length
                off += step
            got += count
            blocks += 1
            _STATUS.pack_into(ring, base + _BLOCK_STATUS, TP_STATUS_KERNEL)  # the block is the kernel's again
            self._block = (self._block + 1) % nr
        if got:
            c["frames"] += got
            c["bytes"] += nbytes
            c["batches"] += blocks
            c["truncated"] += truncated
        return got

    def _callback_error(self, exc: Exception) -> None:
        self.counters["callback_errors"] += 1
        if type(exc) not in self._logged_errors:
            self._logged_errors.add(type(exc))
            log.error("snooper on %s: on_frame raised %s (logged once per kind)", self.ifname,
                      type(exc).__name__, exc_info=exc)

    # ------------------------------------------------------------------ status
    def _read_kernel_stats(self) -> None:
        """Fold ``PACKET_STATISTICS`` into our counters: reading it resets the kernel's."""
        if self.sock is None:
            return
        st = _TPACKET_STATS_V3 if self.path == "ring" else _TPACKET_STATS
        raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, st.size)
        packets, drops = st.unpack(raw)[:2]
        self.counters["kernel_packets"] += packets
        self.counters["kernel_drops"] += drops

    def stats(self) -> dict:
        """Counters since the start: frames/bytes/batches (ring: blocks) delivered, truncated frames,
        callback errors, the kernel's packets (passed the filter, incl. dropped) and drops (queue or
        ring full); which path reads (``ring``/``recv``) and the ring's size."""
        self._read_kernel_stats()
        return dict(self.counters, rcvbuf=getattr(self, "rcvbuf", 0), path=self.path, ring_bytes=self.ring_bytes)
