"""TCP connection tracking for a passive observer: segments in (any order, any loss), per-direction
in-order byte streams out.

Theory of operation. A connection is keyed by its oriented 4-tuple (:class:`ConnKey`, client first).
Each direction is a :class:`HalfStream` that remembers the next sequence number it expects
(``next_seq``); a segment is placed relative to it with 32-bit wrap-around arithmetic:

* at or before ``next_seq``: a retransmission or an overlap; the already delivered prefix is trimmed;
* after ``next_seq``: out of order; buffered (at most ``ooo_limit`` bytes per direction);
* when the buffer bound is hit, or the connection ends (RST, idle expiry, :meth:`TcpTracker.close_all`)
  with a hole still open, the hole is given up: a :class:`Gap` event says how many bytes were lost and
  delivery resumes at the next buffered segment. The application decoder then resynchronises.

Who is the client: the sender of a bare SYN; the receiver of a SYN-ACK; for connections picked up
mid-stream (no handshake seen), the side *not* using a known server port (else the higher port).
A mid-stream direction starts at the first sequence number seen from it.

What a takeover needs (``TcpConnection.sequence_state``): next sequence each way, each side's last ACK
and window, the handshake options (MSS, both window scales, SACK, timestamps) and the last TSval each
way. Memory is bounded: per-direction buffers, a maximum number of connections (the least recently
active is evicted), and idle expiry driven by *capture* time (the caller's clock, never ours).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from .events import ConnKey
from .frames import TcpSegment

__all__ = ["TcpTracker", "TcpConnection", "HalfStream", "ConnectionOpened", "Data", "Gap",
           "ConnectionClosed"]

_MASK = 0xFFFFFFFF


def seq_diff(a: int, b: int) -> int:
    """a - b in sequence space (signed, wrap-around aware)."""
    d = (a - b) & _MASK
    return d - 0x100000000 if d & 0x80000000 else d


@dataclass(frozen=True, slots=True)
class ConnectionOpened:
    key: ConnKey
    mid_stream: bool  # True: picked up without seeing the handshake


@dataclass(frozen=True, slots=True)
class Data:
    key: ConnKey
    from_client: bool
    data: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"Data({self.key}, from_client={self.from_client}, {len(self.data)} bytes)"


@dataclass(frozen=True, slots=True)
class Gap:
    key: ConnKey
    from_client: bool
    length: int


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    key: ConnKey
    reset: bool
    reason: str  # "fin" | "rst" | "idle" | "evicted" | "end"


@dataclass(slots=True)
class HalfStream:
    """One direction: what its sender sent (as far as we saw) and what it last acknowledged."""

    next_seq: int | None = None  # next byte we expect from this sender
    isn: int | None = None
    last_ack: int | None = None  # last ACK number this sender sent
    window: int = 0  # raw window field from this sender's last segment
    wscale: int | None = None  # from this sender's SYN
    mss: int | None = None
    sack_permitted: bool = False
    timestamps: bool = False
    last_tsval: int | None = None
    fin_seq: int | None = None  # sequence number of this sender's FIN, once seen
    fin_done: bool = False  # FIN reached in order
    ooo: dict[int, bytes] = field(default_factory=dict)
    ooo_bytes: int = 0
    delivered: int = 0
    retransmitted: int = 0


class TcpConnection:
    """One tracked connection; ``client``/``server`` are the two :class:`HalfStream` s by sender."""

    __slots__ = ("key", "client", "server", "handshake", "mid_stream", "last_seen", "closed")

    def __init__(self, key: ConnKey, mid_stream: bool, now: float) -> None:
        self.key = key
        self.client = HalfStream()
        self.server = HalfStream()
        self.handshake = not mid_stream
        self.mid_stream = mid_stream
        self.last_seen = now
        self.closed = False

    def half(self, from_client: bool) -> HalfStream:
        return self.client if from_client else self.server

    def window_scaling(self) -> bool:
        """RFC 7323: scaling applies only when both SYNs carried the option."""
        return self.client.wscale is not None and self.server.wscale is not None

    def sequence_state(self) -> dict:
        """What a TCP_REPAIR takeover of this connection needs, as plain JSON-able values."""
        c, s = self.client, self.server
        scaling = self.window_scaling()
        return {
            "client_next_seq": c.next_seq,
            "server_next_seq": s.next_seq,
            "client_last_ack": c.last_ack,
            "server_last_ack": s.last_ack,
            "client_window": c.window << (c.wscale or 0) if scaling else c.window,
            "server_window": s.window << (s.wscale or 0) if scaling else s.window,
            "client_wscale": c.wscale if scaling else None,
            "server_wscale": s.wscale if scaling else None,
            "client_mss": c.mss,
            "server_mss": s.mss,
            "sack_permitted": c.sack_permitted and s.sack_permitted,
            "timestamps": c.timestamps and s.timestamps,
            "client_tsval": c.last_tsval,
            "server_tsval": s.last_tsval,
            "handshake_seen": self.handshake,
        }


class TcpTracker:
    """All connections seen on the wire. ``feed(segment, ts)`` -> events; never raises on input."""

    def __init__(self, server_ports: Iterable[int] = (), ooo_limit: int = 1 << 20,
                 idle_timeout: float = 7200.0, closing_timeout: float = 120.0,
                 max_connections: int = 65536) -> None:
        self.server_ports = frozenset(server_ports)
        self.ooo_limit = ooo_limit
        self.idle_timeout = idle_timeout
        self.closing_timeout = closing_timeout
        self.max_connections = max_connections
        self.connections: dict[ConnKey, TcpConnection] = {}
        # per-packet lookup by the raw (src, sport, dst, dport) tuple: hashing a tuple of the parsed
        # fields is several times cheaper than building and hashing a ConnKey dataclass
        self._index: dict[tuple, tuple[TcpConnection, bool]] = {}
        # TIME_WAIT of a passive observer: the last ACK (or a late retransmission) after a close
        # must not resurrect the connection as a new mid-stream one
        self.recently_closed: dict[ConnKey, float] = {}
        self.time_wait = 240.0
        self.max_recently_closed = 16384
        self.counters = {"segments": 0, "retransmitted_bytes": 0, "gaps": 0, "gap_bytes": 0,
                         "ooo_segments": 0, "evicted": 0, "late_segments": 0}

    # ----------------------------------------------------------------- lookup
    def _orient(self, seg: TcpSegment) -> tuple[ConnKey, bool]:
        """(key, from_client) for a segment of an unknown connection."""
        if seg.syn and not seg.has_ack:
            from_client = True
        elif seg.syn:
            from_client = False
        elif seg.dport in self.server_ports and seg.sport not in self.server_ports:
            from_client = True
        elif seg.sport in self.server_ports and seg.dport not in self.server_ports:
            from_client = False
        else:
            from_client = seg.dport < seg.sport
        if from_client:
            return ConnKey(seg.src, seg.sport, seg.dst, seg.dport), True
        return ConnKey(seg.dst, seg.dport, seg.src, seg.sport), False

    def lookup(self, seg: TcpSegment) -> tuple[TcpConnection | None, bool]:
        return self._index.get((seg.src, seg.sport, seg.dst, seg.dport), (None, True))

    def _add(self, conn: TcpConnection) -> None:
        k = conn.key
        self.connections[k] = conn
        self._index[(k.client_ip, k.client_port, k.server_ip, k.server_port)] = (conn, True)
        self._index[(k.server_ip, k.server_port, k.client_ip, k.client_port)] = (conn, False)

    def _remove(self, conn: TcpConnection) -> None:
        k = conn.key
        self.connections.pop(k, None)
        self._index.pop((k.client_ip, k.client_port, k.server_ip, k.server_port), None)
        self._index.pop((k.server_ip, k.server_port, k.client_ip, k.client_port), None)

    # ------------------------------------------------------------------- feed
    def feed(self, seg: TcpSegment, now: float) -> list[object]:
        self.counters["segments"] += 1
        events: list[object] = []
        conn, from_client = self.lookup(seg)
        if conn is not None and seg.syn and not seg.has_ack and from_client:
            c = conn.client
            if c.isn is None or c.isn != seg.seq:  # port reuse: a new connection on the same tuple
                events += self._close(conn, reset=False, reason="fin")
                conn = None
        if conn is None:
            if seg.rst:
                return events  # a reset for something we never tracked: nothing to say
            key, from_client = self._orient(seg)
            closed_at = self.recently_closed.get(key)
            if closed_at is not None:
                if not seg.syn and now - closed_at < self.time_wait:
                    self.counters["late_segments"] += 1
                    return events
                del self.recently_closed[key]
            mid = not seg.syn
            conn = TcpConnection(key, mid, now)
            if len(self.connections) >= self.max_connections:
                oldest = min(self.connections.values(), key=lambda c: c.last_seen)
                self.counters["evicted"] += 1
                events += self._close(oldest, reset=False, reason="evicted")
            self._add(conn)
            events.append(ConnectionOpened(key, mid))
        conn.last_seen = now
        self._segment(conn, from_client, seg, events)
        return events

    def _segment(self, conn: TcpConnection, from_client: bool, seg: TcpSegment, events: list) -> None:
        half = conn.half(from_client)
        opts = seg.options
        if seg.has_ack:
            half.last_ack = seg.ack
        half.window = seg.window
        if opts.tsval is not None:
            half.last_tsval = opts.tsval
        if seg.syn:
            half.isn = seg.seq
            half.mss, half.wscale, half.sack_permitted = opts.mss, opts.wscale, opts.sack_permitted
            half.timestamps = opts.tsval is not None
            if half.next_seq is None or seq_diff(seg.seq + 1, half.next_seq) > 0:
                half.next_seq = (seg.seq + 1) & _MASK
            if not from_client:
                conn.handshake = True
            return
        if seg.rst:
            events += self._close(conn, reset=True, reason="rst")
            return
        seq = seg.seq
        if half.next_seq is None:
            half.next_seq = seq  # picked up mid-stream: start where we came in
        payload = seg.payload
        if seg.fin:
            half.fin_seq = (seq + len(payload)) & _MASK
        if payload:
            self._place(conn, from_client, half, seq, payload, events)
        self._check_fin(conn, half, events)

    def _place(self, conn: TcpConnection, from_client: bool, half: HalfStream, seq: int,
               payload, events: list) -> None:
        d = seq_diff(seq, half.next_seq)
        n = len(payload)
        if d <= 0:
            if -d >= n:
                half.retransmitted += n
                self.counters["retransmitted_bytes"] += n
                return
            if d < 0:
                self.counters["retransmitted_bytes"] += -d
            data = bytes(payload[-d:])
            half.next_seq = (half.next_seq + len(data)) & _MASK
            half.delivered += len(data)
            events.append(Data(conn.key, from_client, data))
            if half.ooo:
                self._drain(conn, from_client, half, events)
            return
        # out of order: keep it (the longest copy per starting sequence number)
        self.counters["ooo_segments"] += 1
        old = half.ooo.get(seq)
        if old is None or len(old) < n:
            half.ooo[seq] = bytes(payload)
            half.ooo_bytes += n - (len(old) if old else 0)
        while half.ooo_bytes > self.ooo_limit and half.ooo:
            self._give_up_hole(conn, from_client, half, events)

    def _drain(self, conn: TcpConnection, from_client: bool, half: HalfStream, events: list) -> None:
        """Deliver buffered segments that became in-order."""
        while half.ooo:
            best = min(half.ooo, key=lambda s: seq_diff(s, half.next_seq))
            d = seq_diff(best, half.next_seq)
            if d > 0:
                return
            data = half.ooo.pop(best)
            half.ooo_bytes -= len(data)
            if -d >= len(data):
                continue
            data = data[-d:] if d else data
            half.next_seq = (half.next_seq + len(data)) & _MASK
            half.delivered += len(data)
            events.append(Data(conn.key, from_client, data))

    def _give_up_hole(self, conn: TcpConnection, from_client: bool, half: HalfStream,
                      events: list) -> None:
        """The bytes before the first buffered segment are not coming: report them lost, go on."""
        first = min(half.ooo, key=lambda s: seq_diff(s, half.next_seq))
        length = seq_diff(first, half.next_seq)
        if length > 0:
            self.counters["gaps"] += 1
            self.counters["gap_bytes"] += length
            events.append(Gap(conn.key, from_client, length))
            half.next_seq = first
        self._drain(conn, from_client, half, events)

    def _check_fin(self, conn: TcpConnection, half: HalfStream, events: list) -> None:
        if half.fin_seq is not None and not half.fin_done and half.next_seq == half.fin_seq:
            half.fin_done = True
            half.next_seq = (half.next_seq + 1) & _MASK
        c, s = conn.client, conn.server
        if conn.closed:
            return
        if c.fin_done and s.fin_done:
            events += self._close(conn, reset=False, reason="fin")
        elif (c.fin_seq is not None and s.fin_seq is not None and s.last_ack is not None
              and c.last_ack is not None and seq_diff(s.last_ack, c.fin_seq) > 0
              and seq_diff(c.last_ack, s.fin_seq) > 0):
            # both FINs sent and acknowledged, yet a hole remains: those bytes passed us by for good
            events += self._close(conn, reset=False, reason="fin")

    def _flush(self, conn: TcpConnection, events: list) -> None:
        for from_client in (True, False):
            half = conn.half(from_client)
            while half.ooo:
                self._give_up_hole(conn, from_client, half, events)

    def _close(self, conn: TcpConnection, reset: bool, reason: str) -> list[object]:
        events: list[object] = []
        if conn.closed:
            return events
        self._flush(conn, events)
        conn.closed = True
        self._remove(conn)
        self.recently_closed.pop(conn.key, None)
        self.recently_closed[conn.key] = conn.last_seen
        if len(self.recently_closed) > self.max_recently_closed:
            self.recently_closed.pop(next(iter(self.recently_closed)))
        events.append(ConnectionClosed(conn.key, reset, reason))
        return events

    # ------------------------------------------------------------ housekeeping
    def expire(self, now: float) -> list[object]:
        """Close connections idle for longer than their timeout (by capture time ``now``)."""
        events: list[object] = []
        for conn in list(self.connections.values()):
            closing = conn.client.fin_seq is not None or conn.server.fin_seq is not None
            limit = self.closing_timeout if closing else self.idle_timeout
            if now - conn.last_seen > limit:
                events += self._close(conn, reset=False, reason="idle")
        return events

    def close_all(self) -> list[object]:
        """End of input: give up every hole, close every connection."""
        events: list[object] = []
        for conn in list(self.connections.values()):
            events += self._close(conn, reset=False, reason="end")
        return events
