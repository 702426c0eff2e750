"""TCP connection tracking for a passive observer: segments in (any order, any loss), per-direction
in-order byte streams out.

Theory of operation. A connection is keyed by its oriented 4-tuple (:class:`ConnKey`, client first).
Each direction is a :class:`HalfStream` that remembers the next sequence number it expects
(``next_seq``); a segment is placed relative to it with 32-bit wrap-around arithmetic:

* at or before ``next_seq``: a retransmission or an overlap; the already delivered prefix is trimmed;
* after ``next_seq`` but inside the receiver's window: out of order; buffered (at most ``ooo_limit``
  bytes and ``ooo_max_segments`` segments per direction) in a heap keyed by absolute stream position,
  so placing a segment and filling a hole cost O(log n) each, whatever order the segments come in;
* beyond the receiver's window (its last ACK plus its last advertised window, scaled per RFC 7323;
  the protocol maximum of 2**30 while the receiver is not yet heard from), or more than that maximum
  behind: dropped and counted (``out_of_window``), changing nothing -- a blind spoofer cannot fill the
  buffer or open holes with random sequence numbers;
* when the buffer bound is hit, or the connection ends (RST, idle expiry, :meth:`TcpTracker.close_all`)
  with a hole still open, the hole is given up: a :class:`Gap` event says how many bytes were lost and
  delivery resumes at the next buffered segment. The application decoder then resynchronises.

Resets (RFC 5961 section 3): an RST ends the connection only if its sequence number is exactly the one
the receiver expects next (our ``next_seq`` for its sender, or the receiver's last ACK). An RST inside
the window but not exact is what a blind attacker sends: a real receiver would answer with a challenge
ACK and keep the connection, so we ignore it and count it (``rst_challenged``); outside the window it
is dropped (``rst_out_of_window``). An RST from a side whose sequence numbers we never saw (a refused
SYN) counts only if it acknowledges exactly what the other side sent (``rst_unverified`` otherwise).

SYNs (RFC 5961 section 4): a SYN on a connection that is already synchronised (its handshake
finished, or picked up mid-stream) never resets or replaces it: a real receiver answers it with a
challenge ACK and keeps the connection, so we ignore it and count it (``syn_challenged``), and the
same for a SYN-ACK that does not belong to the handshake in progress. A client's SYN with a new
initial sequence number starts a new connection on the same 4-tuple only when the old one was seen
closing (a FIN accepted in its window; FIN both ways or an exact RST has removed it already) or has
been silent for ``reuse_after`` seconds (a close we missed: TIME_WAIT is over by then), or when the
old one never got past its own SYN.

Who is the client: the sender of a bare SYN; the receiver of a SYN-ACK; for connections picked up
mid-stream (no handshake seen), the side *not* using a known server port (else the higher port).
A mid-stream direction starts at the first sequence number seen from it.

What a takeover needs (``TcpConnection.sequence_state``): next sequence each way, each side's last ACK
and window, the handshake options (MSS, both window scales, SACK, timestamps) and the last TSval each
way. Memory is bounded: per-direction buffers, a maximum number of connections (the least recently
active is evicted in O(1): connections are kept in least-recently-active order), and idle expiry
driven by *capture* time (the caller's clock, never ours).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable

from .events import ConnKey
from .frames import TcpSegment

__all__ = ["TcpTracker", "TcpConnection", "HalfStream", "ConnectionOpened", "Data", "Gap",
           "ConnectionClosed"]

_MASK = 0xFFFFFFFF
MAX_WINDOW = 0xFFFF << 14
"""The largest receive window TCP can advertise (65535 scaled by 14, RFC 7323 section 2.3)."""


def seq_diff(a: int, b: int) -> int:
    """a - b in sequence space (signed, wrap-around aware)."""
    d = (a - b) & _MASK
    return d - 0x100000000 if d & 0x80000000 else d


def _later(a: int | None, b: int | None) -> int | None:
    """The later of two sequence numbers (either may be unknown: None)."""
    if a is None or b is None:
        return b if a is None else a
    return a if seq_diff(a, b) >= 0 else b


@dataclass(frozen=True, slots=True)
class ConnectionOpened:
    key: ConnKey
    mid_stream: bool  # True: picked up without seeing the handshake


@dataclass(frozen=True, slots=True)
class Data:
    """In-order bytes of one direction. With ``TcpTracker(zero_copy=True)`` ``data`` may be a view of
    the caller's frame buffer (a live snooper reuses it, or hands out its ring): valid only while the
    ``feed`` call that returned it runs. The decoders copy only message heads, never bulk payload."""

    key: ConnKey
    from_client: bool
    data: bytes | memoryview = field(repr=False)

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
    reason: str  # "fin" | "rst" | "idle" | "evicted" | "end" | "reused" | "forgotten"


@dataclass(slots=True)
class HalfStream:
    """One direction: what its sender sent (as far as we saw) and what it last acknowledged."""

    next_seq: int | None = None  # next byte we expect from this sender
    isn: int | None = None
    last_ack: int | None = None  # last ACK number this sender sent
    window: int = 0  # raw window field from this sender's last segment
    window_in_syn: bool = False  # that segment was a SYN: its window is never scaled (RFC 7323)
    wscale: int | None = None  # from this sender's SYN
    mss: int | None = None
    sack_permitted: bool = False
    timestamps: bool = False
    last_tsval: int | None = None
    #: this sender's echo of the other side's clock: the other side's last TSval as this sender saw it
    last_tsecr: int | None = None
    #: the smallest ACK number this sender sent: the other side's ISN + 1 when the handshake was seen (a
    #: client's handshake ACK, a server's SYN-ACK), so the other side's stream offsets are known even
    #: when none of its frames are seen (a standby that receives only frames destined to its peer)
    first_ack: int | None = None
    #: the end of the furthest segment seen from this sender (pure ACKs included): past ``next_seq``, bytes
    #: of it passed us by (a hole a takeover must not paper over, even if no later data is buffered)
    highest_seq: int | None = None
    fin_seq: int | None = None  # sequence number of this sender's FIN, once seen
    fin_done: bool = False  # FIN reached in order
    pos: int = 0  # absolute stream position of next_seq (bytes, gaps and FIN since we came in)
    ooo: dict[int, bytes] = field(default_factory=dict)  # absolute position -> longest copy there
    ooo_heap: list[int] = field(default_factory=list)  # the keys of ``ooo``, as a min-heap
    ooo_bytes: int = 0
    delivered: int = 0
    retransmitted: int = 0


class TcpConnection:
    """One tracked connection; ``client``/``server`` are the two :class:`HalfStream` s by sender."""

    __slots__ = ("key", "client", "server", "handshake", "mid_stream", "opened_at", "last_seen", "closed")

    def __init__(self, key: ConnKey, mid_stream: bool, now: float) -> None:
        self.key = key
        self.client = HalfStream()
        self.server = HalfStream()
        self.handshake = not mid_stream
        self.mid_stream = mid_stream
        self.opened_at = now  # when its first segment was seen (capture time)
        self.last_seen = now
        self.closed = False

    def synchronised(self) -> bool:
        """Past the handshake: picked up mid-stream, or the client acknowledged something."""
        return self.mid_stream or self.client.last_ack is not None

    def half(self, from_client: bool) -> HalfStream:
        return self.client if from_client else self.server

    def window_scaling(self) -> bool:
        """RFC 7323: scaling applies only when both SYNs carried the option."""
        return self.client.wscale is not None and self.server.wscale is not None

    def window_bytes(self, half: HalfStream) -> int | None:
        """``half``'s last advertised window in bytes; None if picked up mid-stream with scaling unknown.

        RFC 7323: the window of a SYN is never scaled; after it, only when both SYNs offered scaling.
        """
        if half.window_in_syn or (self.handshake and not self.window_scaling()):
            return half.window
        if self.window_scaling():
            return half.window << min(half.wscale or 0, 14)
        return None

    def sequence_state(self) -> dict:
        """What a TCP_REPAIR takeover of this connection needs, as plain JSON-able values.

        Seen one way only (a standby that receives only the frames destined to its peer), a side whose
        frames are never seen is known from the other side's: its next sequence number is what the other
        side acknowledged last, its last TSval what the other side echoed. A side seen, but not lately,
        is known the same way when the other side acknowledged more than it was seen to send: it went on
        from a MAC the switch does not flood here (the holder of this node's own address after a
        ``handover``), and a reset must carry what the receiver expects exactly (RFC 5961)."""
        c, s = self.client, self.server
        scaling = self.window_scaling()
        return {
            "client_next_seq": _later(c.next_seq, s.last_ack),
            "server_next_seq": _later(s.next_seq, c.last_ack),
            "client_last_ack": c.last_ack,
            "server_last_ack": s.last_ack,
            "client_window": self.window_bytes(c) if scaling else c.window,
            "server_window": self.window_bytes(s) if scaling else s.window,
            "client_wscale": c.wscale if scaling else None,
            "server_wscale": s.wscale if scaling else None,
            "client_mss": c.mss,
            "server_mss": s.mss,
            "sack_permitted": c.sack_permitted and s.sack_permitted,
            "timestamps": c.timestamps and s.timestamps,
            "client_tsval": c.last_tsval if c.last_tsval is not None else s.last_tsecr,
            "server_tsval": s.last_tsval if s.last_tsval is not None else c.last_tsecr,
            "handshake_seen": self.handshake,
        }


class TcpTracker:
    """All connections seen on the wire. ``feed(segment, ts)`` -> events; never raises on input."""

    def __init__(self, server_ports: Iterable[int] = (), ooo_limit: int = 1 << 20,
                 idle_timeout: float = 7200.0, closing_timeout: float = 120.0,
                 max_connections: int = 65536, ooo_max_segments: int = 16384, zero_copy: bool = False,
                 reuse_after: float = 60.0) -> None:
        """``zero_copy``: in-order payload is delivered as a view of the segment's buffer (see
        :class:`Data`), for callers that consume each event before the next frame; else as bytes."""
        self.server_ports = frozenset(server_ports)
        self.zero_copy = zero_copy
        #: a synchronised connection silent this long may be replaced by a new SYN on its 4-tuple
        #: (its close passed us by; the sender's TIME_WAIT, 60 s on Linux, is over)
        self.reuse_after = reuse_after
        self.ooo_limit = ooo_limit
        self.idle_timeout = idle_timeout
        self.closing_timeout = closing_timeout
        self.max_connections = max_connections
        self.ooo_max_segments = ooo_max_segments
        # least recently active first: evicting the oldest is popping the first entry, O(1)
        self.connections: OrderedDict[ConnKey, TcpConnection] = OrderedDict()
        # per-packet lookup by the raw (src, sport, dst, dport) tuple: hashing a tuple of the parsed
        # fields is several times cheaper than building and hashing a ConnKey dataclass
        self._index: dict[tuple, tuple[TcpConnection, bool]] = {}
        # TIME_WAIT of a passive observer: the last ACK (or a late retransmission) after a close
        # must not resurrect the connection as a new mid-stream one
        self.recently_closed: dict[ConnKey, float] = {}
        self.time_wait = 240.0
        self.max_recently_closed = 16384
        self.counters = {"segments": 0, "retransmitted_bytes": 0, "gaps": 0, "gap_bytes": 0,
                         "ooo_segments": 0, "evicted": 0, "late_segments": 0, "out_of_window": 0,
                         "rst_challenged": 0, "rst_out_of_window": 0, "rst_unverified": 0,
                         "syn_challenged": 0, "forgotten": 0}

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
        if conn is not None and seg.syn:
            verdict = self._syn_on(conn, from_client, seg, now)
            if verdict == "replace":  # port reuse: a new connection on the same tuple
                events += self._close(conn, reset=False, reason="reused")
                self.recently_closed.pop(conn.key, None)
                conn = None
            elif verdict == "challenge":
                self.counters["syn_challenged"] += 1
                return events
            elif verdict == "duplicate":
                return events
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
            while len(self.connections) >= self.max_connections:
                oldest = next(iter(self.connections.values()))
                self.counters["evicted"] += 1
                events += self._close(oldest, reset=False, reason="evicted")
            self._add(conn)
            events.append(ConnectionOpened(key, mid))
        if self._segment(conn, from_client, seg, events) and not conn.closed:
            conn.last_seen = now
            self.connections.move_to_end(conn.key)
        return events

    def _syn_on(self, conn: TcpConnection, from_client: bool, seg: TcpSegment, now: float) -> str:
        """What a SYN (or SYN-ACK) on a tracked connection means (RFC 5961 section 4, see the module
        docstring): ``accept`` (part of its handshake), ``duplicate`` (a late copy of it), ``replace``
        (a new connection on the 4-tuple), or ``challenge`` (ignored: the old connection stays)."""
        c, s = conn.client, conn.server
        synced = conn.synchronised()
        if self._late_handshake(conn, from_client, seg):
            return "accept"
        if from_client and not seg.has_ack:
            if c.isn == seg.seq or (c.isn is None and not synced):
                return "duplicate" if synced else "accept"
            if not synced:
                return "replace"  # the old one never got past its SYN: nothing to lose
            closing = c.fin_seq is not None or s.fin_seq is not None
            if closing or now - conn.last_seen >= self.reuse_after:
                return "replace"
            return "challenge"
        if not from_client and seg.has_ack:  # SYN-ACK
            if s.isn == seg.seq and synced:
                return "duplicate"
            if not synced and (s.isn is None or s.isn == seg.seq) and \
                    (c.isn is None or seg.ack == (c.isn + 1) & _MASK):
                return "accept"
            if c.isn is None and c.next_seq is None and c.last_ack is None:
                # nothing of the client's side was ever seen (a standby that receives only the frames
                # destined to its peer sees a backend leg from the server alone): a SYN-ACK is the only
                # sign that the 4-tuple carries a new connection (the peer's source ports are reused
                # and its old backend legs end with an RST this node never sees)
                return "replace"
        return "challenge"  # a SYN-ACK of another handshake, a SYN from the server's side

    @staticmethod
    def _late_handshake(conn: TcpConnection, from_client: bool, seg: TcpSegment) -> bool:
        """A SYN or SYN-ACK that arrives after later segments of its own connection (reordered, or the
        only direction this node sees): its sender's ISN was never seen, and ISN + 1 sits at or just
        before everything seen of that sender (its next byte, the other side's smallest ACK). A spoofer
        needs in-window sequence numbers for this, the bar RFC 5961 sets for data."""
        half, other = conn.half(from_client), conn.half(not from_client)
        if half.isn is not None or (from_client and seg.has_ack) or (not from_client and not seg.has_ack):
            return False
        refs = [r for r in (half.next_seq, other.first_ack) if r is not None]
        if not refs:
            return False
        first = (seg.seq + 1) & _MASK
        if not all(0 <= seq_diff(r, first) < MAX_WINDOW for r in refs):
            return False
        # a SYN-ACK must acknowledge the client's SYN where that is known
        return from_client or other.isn is None or seg.ack == (other.isn + 1) & _MASK

    def _segment(self, conn: TcpConnection, from_client: bool, seg: TcpSegment, events: list) -> bool:
        """Apply one segment; False if it was dropped (out of window, unacceptable RST)."""
        half = conn.half(from_client)
        opts = seg.options
        if not seg.syn:
            if seg.rst:
                return self._reset(conn, from_client, half, seg, events)
            if half.next_seq is not None:
                d = seq_diff(seg.seq, half.next_seq)
                if d > 0 and d >= self._window_ahead(conn, from_client, half) or d < -MAX_WINDOW:
                    self.counters["out_of_window"] += 1
                    return False
            elif conn.half(not from_client).last_ack is not None:
                # first segment seen from this side (picked up mid-stream): the other side's ACK says
                # where its data must be
                d = seq_diff(seg.seq, conn.half(not from_client).last_ack)
                if not -MAX_WINDOW <= d < MAX_WINDOW:
                    self.counters["out_of_window"] += 1
                    return False
        if seg.has_ack:
            # ACKs only move forward: a reordered or duplicated older one says nothing new
            if half.last_ack is None or seq_diff(seg.ack, half.last_ack) > 0:
                half.last_ack = seg.ack
            # the smallest ACK: the other side's ISN + 1, even if the handshake ACK itself passed us by
            # (the client's first request carries the same ACK when the client speaks first)
            if half.first_ack is None or seq_diff(seg.ack, half.first_ack) < 0:
                half.first_ack = seg.ack
        half.window = seg.window
        half.window_in_syn = seg.syn
        if opts.tsval is not None:
            half.last_tsval = opts.tsval
            half.last_tsecr = opts.tsecr
        if seg.syn:
            half.isn = seg.seq
            half.mss, half.wscale, half.sack_permitted = opts.mss, opts.wscale, opts.sack_permitted
            half.timestamps = opts.tsval is not None
            if half.next_seq is None or seq_diff(seg.seq + 1, half.next_seq) > 0:
                half.next_seq = (seg.seq + 1) & _MASK
            if not from_client:
                conn.handshake = True
            return True
        seq = seg.seq
        if half.next_seq is None:
            half.next_seq = seq  # picked up mid-stream: start where we came in
        payload = seg.payload
        end = (seq + len(payload)) & _MASK
        if half.highest_seq is None or seq_diff(end, half.highest_seq) > 0:
            half.highest_seq = end
        if seg.fin:
            half.fin_seq = (seq + len(payload)) & _MASK
        if payload:
            self._place(conn, from_client, half, seq, payload, events)
        self._check_fin(conn, half, events)
        return True

    def _window_ahead(self, conn: TcpConnection, from_client: bool, half: HalfStream) -> int:
        """How far past ``half.next_seq`` a segment from this sender may start (its right window edge)."""
        peer = conn.half(not from_client)
        if peer.last_ack is None:  # the receiver has not spoken yet: only the protocol's maximum
            return MAX_WINDOW
        wnd = conn.window_bytes(peer)
        if wnd is None:
            wnd = peer.window << 14  # picked up mid-stream: the scale factor is unknown, assume the largest
        # the receiver's last ACK plus its window; our own next_seq plus the window if that is further
        # (its ACKs may have passed us by while its data did not)
        return max(seq_diff((peer.last_ack + wnd) & _MASK, half.next_seq), wnd)

    def _reset(self, conn: TcpConnection, from_client: bool, half: HalfStream, seg: TcpSegment,
               events: list) -> bool:
        """RFC 5961 section 3: only an RST at exactly the expected sequence number ends the connection."""
        peer = conn.half(not from_client)
        if half.next_seq is None:
            # we never saw this sender's sequence numbers (a refused SYN is answered with an RST
            # carrying seq 0): it must acknowledge exactly what the other side sent, or sit exactly at
            # the other side's last ACK (a kernel's answer to a segment of a connection it does not
            # have: RST with the segment's ACK as its sequence number)
            if (seg.has_ack and peer.next_seq is not None and seg.ack == peer.next_seq) or \
                    (peer.last_ack is not None and seg.seq == peer.last_ack):
                events += self._close(conn, reset=True, reason="rst")
                return True
            self.counters["rst_unverified"] += 1
            return False
        if seg.seq == half.next_seq or seg.seq == peer.last_ack:
            events += self._close(conn, reset=True, reason="rst")
            return True
        d = seq_diff(seg.seq, half.next_seq)
        if peer.last_ack is not None:
            d = min(d, seq_diff(seg.seq, peer.last_ack), key=abs)
        if -MAX_WINDOW <= d < self._window_ahead(conn, from_client, half):
            self.counters["rst_challenged"] += 1  # a real receiver sends a challenge ACK, keeps the connection
        else:
            self.counters["rst_out_of_window"] += 1
        return False

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
            chunk = payload[-d:] if d else payload
            chunks = [chunk if self.zero_copy else bytes(chunk)]
            self._advance(half, len(chunks[0]))
            if half.ooo:
                self._drain(half, chunks)
            self._deliver(conn, from_client, half, chunks, events)
            return
        # out of order (and in window): keep it, the longest copy per starting position
        self.counters["ooo_segments"] += 1
        start = half.pos + d
        old = half.ooo.get(start)
        if old is None:
            heapq.heappush(half.ooo_heap, start)
            half.ooo[start] = bytes(payload)
            half.ooo_bytes += n
        elif len(old) < n:
            half.ooo[start] = bytes(payload)
            half.ooo_bytes += n - len(old)
        while half.ooo and (half.ooo_bytes > self.ooo_limit or len(half.ooo) > self.ooo_max_segments):
            self._give_up_hole(conn, from_client, half, events)

    @staticmethod
    def _advance(half: HalfStream, n: int) -> None:
        half.next_seq = (half.next_seq + n) & _MASK
        half.pos += n

    def _drain(self, half: HalfStream, chunks: list[bytes]) -> None:
        """Move buffered segments that became in-order to ``chunks`` (O(log n) each)."""
        heap, ooo = half.ooo_heap, half.ooo
        while heap and heap[0] <= half.pos:
            start = heapq.heappop(heap)
            data = ooo.pop(start)
            half.ooo_bytes -= len(data)
            skip = half.pos - start
            if skip >= len(data):
                continue
            data = data[skip:] if skip else data
            self._advance(half, len(data))
            chunks.append(data)

    def _deliver(self, conn: TcpConnection, from_client: bool, half: HalfStream, chunks: list[bytes],
                 events: list) -> None:
        """One Data event for bytes that became in-order together (a filled hole is one event)."""
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if data:
            half.delivered += len(data)
            events.append(Data(conn.key, from_client, data))

    def _give_up_hole(self, conn: TcpConnection, from_client: bool, half: HalfStream,
                      events: list) -> None:
        """The bytes before the first buffered segment are not coming: report them lost, go on."""
        length = half.ooo_heap[0] - half.pos
        if length > 0:
            self.counters["gaps"] += 1
            self.counters["gap_bytes"] += length
            events.append(Gap(conn.key, from_client, length))
            self._advance(half, length)
        chunks: list[bytes] = []
        self._drain(half, chunks)
        if chunks:
            self._deliver(conn, from_client, half, chunks, events)

    def _check_fin(self, conn: TcpConnection, half: HalfStream, events: list) -> None:
        if half.fin_seq is not None and not half.fin_done and half.next_seq == half.fin_seq:
            half.fin_done = True
            self._advance(half, 1)
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
    def forget(self, keys: Iterable[ConnKey], *, gone: bool, now: float | None = None) -> list[object]:
        """Drop connections whose close this observer did not see, on someone else's word: the
        owner of the address no longer has them, or their owner's process died. ``gone=True`` (the
        process died) remembers them as closed, so that their clients' late segments do not bring
        them back as mid-stream connections; ``gone=False`` does not: if one lives after all, its next
        segment picks it up again. ``now`` (capture time) starts their TIME_WAIT; default: when each
        was last active. No gap is reported for bytes still buffered."""
        events: list[object] = []
        for key in keys:
            conn = self.connections.get(key)
            if conn is None:
                continue
            conn.closed = True
            self._remove(conn)
            self.counters["forgotten"] += 1
            if gone:
                self.recently_closed.pop(key, None)
                self.recently_closed[key] = conn.last_seen if now is None else max(now, conn.last_seen)
                if len(self.recently_closed) > self.max_recently_closed:
                    self.recently_closed.pop(next(iter(self.recently_closed)))
            events.append(ConnectionClosed(key, False, "forgotten"))
        return events

    def expire(self, now: float) -> list[object]:
        """Close connections idle for longer than their timeout (by capture time ``now``)."""
        events: list[object] = []
        for conn in list(self.connections.values()):
            # closing, or never past its handshake (a SYN nobody answered, a client that gave up)
            closing = conn.client.fin_seq is not None or conn.server.fin_seq is not None or not conn.synchronised()
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
