"""Continuing a dead peer's proxied connections: both TCP legs' repair state from sniffed frames.

Why this works for a relay (issue 10). The peer relays bytes unchanged, so each of its proxied
connections is two TCP legs carrying one conversation: the client leg (client <-> peer_address:port)
and the backend leg (peer_address:source_port <-> server). The standby receives the frames *destined
to* the peer's MAC (patent element 310; a switch flooding the nodes' ports, or a hub/mirror): client ->
peer on the client leg, server -> peer on the backend leg. Per leg those frames give the remote's
sequence numbers and bytes, the remote's ACK of the peer's bytes, the peer's ISN (the client's
handshake ACK, the server's SYN-ACK: :attr:`protocols.tcpstream.HalfStream.first_ack`) and the peer's
last TSval (the remote's TSecr). What frames cannot show, the peer sends over the sync link
(:class:`Pairing`): which client leg belongs to which backend leg, and each leg's negotiated options
(``TCP_INFO``: the peer's own window scale above all).

The relay's invariant gives the bytes to put back. What the client sent (its stream offset ``n``) is
what the server must receive at offset ``n``; the server's ACK on the backend leg says how much of it
arrived, so the client's bytes past that offset go into the new backend socket's send queue (the
client already had them acknowledged, or will get the ACK from the new client socket, whose receive
side starts at the client's next sequence number). The other way round for the server's bytes the
client has not acknowledged. No byte is ever read from the peer's sockets: the standby keeps, per leg,
the tail of the remote's bytes that the other leg's remote has not acknowledged yet (bounded by
``cap``), and nothing else.

    client leg socket:  send_seq = client's ACK          send_queue = server bytes the client lacks
                        recv_seq = client's next seq     (nothing queued: the client's bytes go on)
    backend leg socket: send_seq = server's ACK          send_queue = client bytes the server lacks
                        recv_seq = server's next seq

Both send queues are written as new data once live (``send_unsent`` = all), so they leave at once
instead of waiting for a retransmission timer; the windows are set from the remote's last window so
they may leave before the remote answers the window probe. The timestamp clock starts past the peer's
last TSval (the remote's TSecr, plus the time since), so no segment is dropped by PAWS.

A connection is *not continuable* (it gets today's exact-sequence reset) when a leg was picked up
mid-stream (no ISN, no options), its pairing or options did not arrive from the peer, either side
began to close, the capture has a hole or dropped the bytes needed (over the cap), or the numbers
contradict each other (the capture missed frames). :meth:`ContinuationBook.plan` says which and why.

Sans-I/O: events of :class:`protocols.tcpstream.TcpTracker` in, plain data out. The node's
:mod:`proxy.takeover` restores the sockets (:mod:`proxy.tcprepair`).
"""

from __future__ import annotations

import bisect
from collections import ChainMap, OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Iterable

from protocols.events import ConnKey
from protocols.tcpstream import ConnectionClosed, Data, Gap, HalfStream, TcpConnection, seq_diff
from proxy.tcprepair import RepairWindow, TcpSocketState

__all__ = ["LegOptions", "Pairing", "ContinuationBook", "PairingInbox", "PairingOutbox", "DEFAULT_CAP", "relay_anchor"]

U32 = 0xFFFF_FFFF
#: how many backend legs the book remembers as once paired (ContinuationBook._once_paired)
ONCE_PAIRED_KEPT = 1 << 17
#: how many legs the book remembers as ended at the peer (ContinuationBook._ended_at_peer): one per
#: connection a view holds at most (protocols.tcpstream.TcpTracker's max_connections); each goes when
#: its leg does, so the bound is reached only by legs the views dropped unseen
ENDED_AT_PEER_KEPT = 1 << 16
#: default bound of the bytes kept per leg (and of what one connection may need put back each way)
DEFAULT_CAP = 4 << 20
#: the new sockets' receive window until their first own advertisement (bytes)
RECEIVE_WINDOW = 256 * 1024
#: the most servers one service port is remembered to be relayed to (ContinuationBook._servers)
SERVERS_PER_PORT = 64
#: above this many (unpaired client legs x unpaired backend legs that carried bytes), nothing is inferred
#: (ContinuationBook._infer): the scan is quadratic, and so many unpaired legs mean a peer that told nothing
INFER_PAIRS_MAX = 1 << 16
#: a backend leg is taken for a client leg's only if opened within this many seconds after it (the peer
#: connects the backend right after accepting the client; its accept queue may hold it a while under load)
INFER_WITHIN = 2.0
#: how many RPC calls of a client leg are read for their XIDs when a pairing is inferred
INFER_XIDS_MAX = 4096
#: margin added to the peer's last TSval, on top of the time since (ms ticks): PAWS only drops older ones
TSVAL_MARGIN = 1000
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4


@dataclass(frozen=True)
class LegOptions:
    """One leg's negotiated options as the peer's kernel holds them (``TCP_INFO``)."""

    options: int       # tcpi_options: TCPI_OPT_TIMESTAMPS | TCPI_OPT_SACK | TCPI_OPT_WSCALE
    snd_wscale: int    # the remote's window scale
    rcv_wscale: int    # the peer's own window scale
    snd_mss: int       # the segment size the peer sends with (a fallback for the remote's MSS)

    @property
    def timestamps(self) -> bool:
        return bool(self.options & TCPI_OPT_TIMESTAMPS)

    @property
    def sack(self) -> bool:
        return bool(self.options & TCPI_OPT_SACK)

    @property
    def wscale(self) -> bool:
        return bool(self.options & TCPI_OPT_WSCALE)

    def to_wire(self) -> list[int]:
        return [self.options, self.snd_wscale, self.rcv_wscale, self.snd_mss]

    @classmethod
    def from_wire(cls, data: Any) -> "LegOptions":
        if not isinstance(data, (list, tuple)) or len(data) != 4 or not all(type(v) is int for v in data):
            raise ValueError(f"leg options: must be a list of 4 integers, not {data!r}")
        options, snd, rcv, mss = data
        if not (0 <= options <= 0xFF and 0 <= snd <= 14 and 0 <= rcv <= 14 and 0 <= mss <= 0xFFFF):
            raise ValueError(f"leg options: {data!r} out of range")
        return cls(options, snd, rcv, mss)


@dataclass(frozen=True)
class Pairing:
    """One proxied connection of the peer: its two legs and their options (sent over the sync link)."""

    client: tuple[str, int]         # the client's address and port
    service_port: int               # the port on the peer's address the client connected to
    source_port: int                # the peer's port of the backend leg (on the same address)
    server: tuple[str, int]         # the backend
    #: None when the peer could not read them (the connection ended at once, e.g. a MOUNT call): told
    #: anyway, so a standby that sees only frames to the peer decodes its replies (not continuable)
    client_options: LegOptions | None
    backend_options: LegOptions | None
    #: where the two legs' sequence spaces meet, for a connection this node restored rather than
    #: accepted (a takeover's continuation, a live move in): the standby saw no handshake of it, so it
    #: knows neither ISN; see :func:`relay_anchor`. None for a connection accepted here.
    anchor: tuple[int, int, int, int] | None = None

    def client_key(self, address: str) -> ConnKey:
        return ConnKey(self.client[0], self.client[1], address, self.service_port)

    def backend_key(self, address: str) -> ConnKey:
        return ConnKey(address, self.source_port, self.server[0], self.server[1])

    @property
    def name(self) -> str:
        return f"{self.client[0]}:{self.client[1]}->:{self.service_port}"

    def to_wire(self) -> list:
        """Compact: about 60 bytes of msgpack per connection (20 more with an anchor)."""
        out = [self.client[0], self.client[1], self.service_port, self.source_port, self.server[0],
               self.server[1], _options_wire(self.client_options), _options_wire(self.backend_options)]
        if self.anchor is not None:
            out.append(list(self.anchor))
        return out

    @classmethod
    def from_wire(cls, data: Any) -> "Pairing":
        if not isinstance(data, (list, tuple)) or len(data) not in (8, 9):
            raise ValueError(f"pairing: must be a list of 8 or 9 items, not {data!r}")
        cip, cport, sport, src, sip, svport, copts, bopts = data[:8]
        anchor = None
        if len(data) == 9:
            a = data[8]
            if not isinstance(a, (list, tuple)) or len(a) != 4 or not all(type(v) is int and 0 <= v <= U32 for v in a):
                raise ValueError(f"pairing: anchor must be 4 sequence numbers, not {a!r}")
            anchor = (a[0], a[1], a[2], a[3])
        for name, v in (("client port", cport), ("service port", sport), ("source port", src),
                        ("server port", svport)):
            if type(v) is not int or not 0 < v <= 0xFFFF:
                raise ValueError(f"pairing: {name} {v!r} is not a port")
        if type(cip) is not str or type(sip) is not str:
            raise ValueError("pairing: addresses must be strings")
        return cls((cip, cport), sport, src, (sip, svport), None if copts is None else LegOptions.from_wire(copts),
                   None if bopts is None else LegOptions.from_wire(bopts), anchor)


def _options_wire(options: LegOptions | None) -> list[int] | None:
    return None if options is None else options.to_wire()


def relay_anchor(client: TcpSocketState, backend: TcpSocketState) -> tuple[int, int, int, int]:
    """Where a restored connection's two sequence spaces meet, from its two legs' states as restored:
    ``(client_seq, backend_seq, server_seq, client_leg_seq)``: the client's byte at ``client_seq`` is
    (or will be) sent to the server at ``backend_seq`` of the backend leg, and the server's byte at
    ``server_seq`` to the client at ``client_leg_seq``.

    Why: the standby turns "what the client sent" into "what the server has" through the two ISNs it
    saw in the handshakes (offset 0 of both streams). A connection restored here (continued at a
    takeover, moved in live) was never shaken hands with where the standby could see it: it picks it up
    mid-stream and, without this, could only reset it at the next takeover. The relay's invariant gives
    the meeting points at the restore: the client's unread bytes (``recv_queue``, from ``recv_seq`` on)
    go to the server after everything in the backend leg's send queue, and the other way round."""
    return (client.recv_seq, (backend.send_seq + len(backend.send_queue)) & U32,
            backend.recv_seq, (client.send_seq + len(client.send_queue)) & U32)


class PairingOutbox:
    """The active node's side: what to tell the standby about its proxied connections, as deltas.

    ``update(current)`` takes every current pairing and returns the messages' bodies to send:
    additions and removals since the last call, at most ``batch`` entries per body. ``resync()`` (the
    sync link came up again) makes the next update send everything, flagged ``reset``, so the standby
    replaces what it had."""

    def __init__(self, batch: int = 500):
        self.batch = batch
        self.sent: dict[tuple, Pairing] = {}
        self._reset = True

    def resync(self) -> None:
        self.sent = {}
        self._reset = True

    @property
    def resync_due(self) -> bool:
        """A resync was asked for and not sent yet: :meth:`add` sends nothing until :meth:`update` has."""
        return self._reset

    def add(self, new: Iterable[Pairing]) -> list[dict]:
        """Bodies telling only these (new) pairings, those not sent as they are; nothing is removed (the
        next :meth:`update` says what ended)."""
        if self._reset:  # nothing sent since a resync: the next update sends everything, with reset
            return []
        add = []
        for p in new:
            key = (p.client, p.service_port)
            if self.sent.get(key) != p:
                self.sent[key] = p
                add.append(p.to_wire())
        return [{"add": add[i:i + self.batch], "remove": []} for i in range(0, len(add), self.batch)]

    def update(self, current: Iterable[Pairing]) -> list[dict]:
        now = {(p.client, p.service_port): p for p in current}
        add = [p.to_wire() for k, p in now.items() if self.sent.get(k) != p]
        remove = [[k[0][0], k[0][1], k[1]] for k in self.sent if k not in now]
        if not add and not remove and not self._reset:
            return []
        bodies = []
        reset, self._reset = self._reset, False
        while add or remove or reset:
            body: dict = {"add": add[:self.batch], "remove": remove[:self.batch]}
            if reset:
                body["reset"], reset = True, False
            add, remove = add[self.batch:], remove[self.batch:]
            bodies.append(body)
        self.sent = now
        return bodies


class PairingInbox:
    """The standby's side of :class:`PairingOutbox`: the peer's pairings messages, merged until the
    observer takes them.

    Why merged and kept, not queued: the peer sends only changes, so a message lost on the way to the
    observer left its connections unpaired until the peer's next full resync (5 s), and a death
    meanwhile reset them. In the soak (bench/soak.py, load 12) a busy observer made the standby's
    bounded message queue drop 543 pairings messages in 25 cycles, and a libnfs client's connection was
    reset at about one takeover in two. Merged, the messages cost one observer request however many
    came, and their size is bounded by the peer's connections (the last word per connection wins, as
    it would applied one by one; a reset makes everything before it moot)."""

    def __init__(self, limit: int = 1 << 18):
        self.limit = limit
        self.reset = False
        #: (client address, client port, service port) -> the wire pairing to add, or None: remove it
        self.ops: dict[tuple, Any] = {}
        self.dropped = 0

    def __len__(self) -> int:
        return len(self.ops) + self.reset

    def take(self, message: dict) -> None:
        """One ``pairings`` message (``add``, ``remove``, ``reset``), after the ones taken before."""
        if message.get("reset"):
            self.reset = True
            self.ops.clear()
        for item in message.get("remove") or ():
            self._put(item, None)
        for item in message.get("add") or ():
            self._put(item, item)

    def _put(self, item: Any, value: Any) -> None:
        try:
            key = (str(item[0]), int(item[1]), int(item[2]))
        except (TypeError, ValueError, IndexError, KeyError):
            key = ("unreadable", len(self.ops))  # passed on as it is: the book names the problem
        if key not in self.ops and len(self.ops) >= self.limit:
            self.dropped += 1
            return
        self.ops.pop(key, None)
        self.ops[key] = value

    def drain(self) -> dict | None:
        """Everything taken so far as one message body (None: nothing); the inbox is empty afterwards."""
        if not self.ops and not self.reset:
            return None
        body = {"add": [v for v in self.ops.values() if v is not None],
                "remove": [list(k) for k, v in self.ops.items() if v is None], "reset": self.reset}
        self.reset, self.ops = False, {}
        return body

    def put_back(self, body: dict) -> None:
        """A drained body the observer did not take: it goes before what was taken since."""
        later_reset, later = self.reset, self.ops
        if later_reset:
            return  # what came since starts afresh: the body is moot
        self.reset, self.ops = False, {}
        self.take(body)
        for key, value in later.items():
            self.ops.pop(key, None)
            self.ops[key] = value


class _Tail:
    """The last bytes of one remote's stream: positions ``[end - len(data), end)`` of its sender's
    :attr:`HalfStream.pos` space. ``lost`` says why bytes before that are gone (None: never needed)."""

    __slots__ = ("data", "end", "lost")

    def __init__(self) -> None:
        self.data = bytearray()
        self.end = 0
        self.lost: str | None = None


class _Snapshot:
    """The peer's legs at a takeover's first request (see :meth:`ContinuationBook.plan`).

    Which connections are the peer's is decided from the views as they stood (``conns``: after the
    takeover they also hold this node's own new connections on the address, and forget the peer's).
    Looking up one of those connections' legs, kept bytes and pairing falls back to ``live`` for what
    was born since: the observer catches up with the capture after the first request, and a young
    connection's first server bytes (its tail) or backend leg may come only then. Without the
    fallback its sequence numbers (objects kept by reference) moved on while its bytes were missing:
    bench/failover.py run 19 at 3edf7f3 reset 12 connections, "258 bytes from the server not yet
    delivered, 0 kept"."""

    def __init__(self, address: str, conns: list[dict], pairings: dict, tails: dict, live: "ContinuationBook"):
        self.address, self.conns = address, conns
        self.pairings = ChainMap(pairings, live.pairings)
        self.tails = ChainMap(tails, live.tails)
        self.live = live
        self.given: set[ConnKey] = set()
        self.order: list[ConnKey] | None = None
        self.inference: _Inference | None = None  # what the frames said of its unpaired legs, once asked

    def conn(self, key: ConnKey) -> TcpConnection | None:
        for c in self.conns:
            found = c.get(key)
            if found is not None:
                return found
        return self.live._conn(key)

    def legs(self, key: ConnKey, inference: "_Inference | None" = None) -> "_Legs":
        return _legs_of(key, self.pairings, self.conn, self.tails, self.address, inference)


def _legs_of(key: ConnKey, pairings: dict, conn: Any, tails: dict, address: str,
             inference: "_Inference | None") -> "_Legs":
    """One client leg's :class:`_Legs`: the peer's pairing, else (``inference``) the frames' one."""
    pairing = pairings.get(key)
    if pairing is None and inference is not None:
        pairing = inference.pairings.get(key)
    if pairing is None:
        return _Legs(key, None, conn(key), None, None, None, inference)
    bkey = pairing.backend_key(address)
    return _Legs(key, pairing, conn(key), conn(bkey), tails.get(key), tails.get(bkey),
                 inference if key not in pairings else None)


@dataclass(frozen=True)
class _Legs:
    """One client leg as a takeover found it: its pairing, both legs' connections and tails (references)."""

    key: ConnKey
    pairing: Pairing | None
    client_conn: TcpConnection | None
    backend_conn: TcpConnection | None
    client_tail: _Tail | None
    backend_tail: _Tail | None
    #: what the frames alone said about the peer's unpaired legs (None: not asked; a paired leg)
    inference: "_Inference | None" = None

    @property
    def inferred(self) -> bool:
        """The pairing is the frames' (:meth:`ContinuationBook._infer`), not the peer's."""
        return self.inference is not None and self.pairing is not None


@dataclass(frozen=True)
class _Inference:
    """What the frames alone say of the peer's legs it did not pair, at one moment (:meth:`ContinuationBook._infer`)."""

    #: client leg -> the backend leg that can only be its own, with options guessed from the peer's
    #: other pairings (the peer's window scales, the same for every connection)
    pairings: dict[ConnKey, Pairing]
    #: per server, the latest unpaired backend leg to it that carried bytes and is nobody's for sure
    #: (``opened_at``, the leg): it may carry the request of any client leg opened before it on a port
    #: the peer relays to that server (:meth:`ContinuationBook._rival`)
    rivals: dict[tuple[str, int], tuple[float, ConnKey]] = field(default_factory=dict)
    #: per client leg, how many backend legs could be its own: said in the reason a leg is reset
    candidates: dict[ConnKey, int] = field(default_factory=dict)


def _busiest_first(legs: _Legs) -> tuple[float, int]:
    """Sort key: the latest activity on *both* legs (a connection the relay was moving bytes on when the
    peer died; an idle client whose request arrived during the outage is recent on its client leg only),
    then the most bytes either side still lacks. Cheap: no socket state is built."""
    c, b = legs.client_conn, legs.backend_conn
    if c is None or b is None:
        return 0.0, 0
    pending = 0
    if legs.pairing is not None:
        anchored = _anchored(legs.pairing, c, b)
        if not _leg_problem(c.client, "client", anchored) and not _leg_problem(b.server, "server", anchored):
            pending = sum(max(n, 0) for n in _unacked_both(legs.pairing, c, b, anchored))
    return -min(c.last_seen, b.last_seen), -pending


@dataclass
class Verdict:
    """One connection at a takeover: ``states`` (client leg, backend leg) when continuable, else why not."""

    pairing: Pairing | None
    client: str                     # "ip:port" of the client
    reason: str | None = None       # None: continuable
    #: ``(client leg, backend leg)``; a *fresh* one has no backend leg (None): see :meth:`ContinuationBook._fresh`
    states: tuple[TcpSocketState, TcpSocketState | None] | None = None
    pending_to_server: int = 0
    pending_to_client: int = 0
    #: the peer had not relayed anything of it yet: the client leg is restored with the client's bytes
    #: unread, and the standby connects the backend anew (as for a client it accepted itself)
    fresh: bool = False
    #: the peer's pairing of it never arrived: the frames named its backend leg (:meth:`ContinuationBook._infer`)
    inferred: bool = False

    def to_wire(self) -> dict:
        out: dict = {"client": self.client, "reason": self.reason,
                     "pending": [self.pending_to_server, self.pending_to_client]}
        if self.fresh:
            out["fresh"] = True
        if self.inferred:
            out["inferred"] = True
        if self.pairing is not None:
            out["service_port"] = self.pairing.service_port
            out["backend"] = f"{self.pairing.server[0]}:{self.pairing.server[1]}"
            out["source_port"] = self.pairing.source_port
        if self.states is not None:
            out["client_state"] = self.states[0].to_wire(max_queue=1 << 30)
            if self.states[1] is not None:
                out["backend_state"] = self.states[1].to_wire(max_queue=1 << 30)
        return out


class ContinuationBook:
    """The standby's record of the peer's legs (sans-I/O): feed it the trackers' events, the peer's
    pairings; ask it for :meth:`plan` at a takeover, or :meth:`summary` for status."""

    def __init__(self, address: str, trackers: list, *, cap: int = DEFAULT_CAP):
        """``address``: the peer's service address; ``trackers``: the :class:`TcpTracker` s whose
        connections are the peer's client legs and backend legs (looked up in that order)."""
        if cap < 0:
            raise ValueError(f"cap: {cap} is negative")
        self.address = address
        self.trackers = trackers
        self.cap = cap
        self.tails: dict[ConnKey, _Tail] = {}
        self.pairings: dict[ConnKey, Pairing] = {}   # by client leg key
        self.by_backend: dict[ConnKey, Pairing] = {}  # by backend leg key
        self.trim_above = 16 * 1024
        #: backend leg -> stream position up to which its server's bytes were handed on (-1: never)
        self.relayed: dict[ConnKey, int] = {}
        self._relay_due: set[ConnKey] = set()  # backend legs with bytes (or a pairing) since the last relay
        #: client leg -> its backend leg, whose server bytes wait for the client leg to be seen at all
        #: (it is captured in another ring, and may come a batch later than the pairing and the reply)
        self._relay_waiting: dict[ConnKey, ConnKey] = {}
        #: client legs whose server sent bytes on the backend leg, least recent first (the relay was
        #: moving bytes on them): the busiest are the last, found in O(first) at a takeover
        self._active: OrderedDict[ConnKey, None] = OrderedDict()
        #: what plan(first=...) left for plan_rest(): the peer's legs as they stood (copies of the
        #: dictionaries, which keep their keys' hashes: cheap), the keys given, the order once computed
        self._snapshot: _Snapshot | None = None
        self._summary: tuple[float, dict] | None = None
        self._answered_here: set[ConnKey] = set()
        #: backend legs the peer ever paired (bounded, oldest out): such a leg carries its own client's
        #: bytes, never those of a client leg the peer did not pair, also once its pairing was removed
        #: (the connection ended at the peer, while its leg lingers in the views: on a switch the
        #: peer's own FIN is not seen)
        #: the value: which instance of that leg the pairing was about (the server's first sequence
        #: number, from the pairing's anchor; None: not told, any): a secure service's backend reuses its
        #: few source ports at once, so a later leg on the same 4-tuple is another connection, which may
        #: well be an unpaired client's (:func:`_pairing_names`)
        self._once_paired: OrderedDict[ConnKey, int | None] = OrderedDict()
        #: service port -> the servers the peer relays it to (from its pairings, also removed ones; bounded
        #: by its configuration): where an unpaired client leg's backend leg can be (:meth:`_infer`)
        self._servers: dict[int, dict[tuple[str, int], None]] = {}
        #: what the frames say of the unpaired legs (:meth:`_infer`), with the trackers' segment count it
        #: was made at: until a segment (also one that makes no event: an ACK) or a pairing changes them
        self._inference: tuple[int, _Inference] | None = None
        #: legs the peer said ended there (a client leg whose pairing it removed, also one never added
        #: here, and that pairing's backend leg), while the views may still hold them (bounded; gone with
        #: the leg, or a new pairing): see :meth:`ended_at_peer`
        self._ended_at_peer: OrderedDict[ConnKey, None] = OrderedDict()

    # --------------------------------------------------------------------------------- input
    def _remote_is_client(self, key: ConnKey) -> bool:
        return key.server_ip == self.address

    def feed(self, events: Iterable[tuple[ConnKey, object]]) -> None:
        """The events a frame produced (``Pipeline.feed_frame``'s list); only the remote's bytes count."""
        touched = set()
        address = self.address
        self._inference = None  # the legs change (forgotten ones too): what the frames said is said again
        for key, ev in events:
            if key.server_ip != address and key.client_ip != address:
                continue  # not the peer's (e.g. this node's own backend connections)
            if self._relay_waiting and key in self._relay_waiting:  # its client leg is here now
                self._relay_due.add(self._relay_waiting.pop(key))
            if isinstance(ev, Data):
                if ev.from_client != self._remote_is_client(key):
                    continue  # the peer's own bytes (seen on a hub): the other leg's remote has them
                tail = self.tails.get(key)
                if tail is None:
                    tail = self.tails[key] = _Tail()
                tail.data += ev.data
                tail.end += len(ev.data)
                touched.add(key)
                if key.client_ip == address:
                    self._relay_due.add(key)
                    pairing = self.by_backend.get(key)
                    if pairing is not None:
                        ckey = pairing.client_key(address)
                        self._active[ckey] = None
                        self._active.move_to_end(ckey)
            elif isinstance(ev, Gap):
                if ev.from_client != self._remote_is_client(key):
                    continue
                tail = self.tails.setdefault(key, _Tail())
                tail.data.clear()
                tail.end += ev.length
                tail.lost = f"a gap of {ev.length} bytes in the capture"
            elif isinstance(ev, ConnectionClosed):
                self._ended_at_peer.pop(key, None)
                self.tails.pop(key, None)
                self.relayed.pop(key, None)
                self._active.pop(key, None)
        for key in touched:
            tail = self.tails[key]
            if len(tail.data) > self.trim_above:
                self._trim(key, tail)

    def _trim(self, key: ConnKey, tail: _Tail) -> None:
        """Keep only what the other leg's remote has not acknowledged; at most ``cap`` bytes."""
        need = self._pending(key)
        relayed = self.relayed.get(key, -1)
        if need is not None and relayed >= 0:
            need = max(need, tail.end - relayed)  # not before it was handed on to the decoders
        if need is not None and 0 <= need < len(tail.data):
            del tail.data[:len(tail.data) - need]
        if len(tail.data) > 2 * self.cap:
            # unpaired (or far behind): down to the cap, but only every cap bytes, so the cost of
            # moving the kept bytes is spread over as many new ones (amortised O(1) per byte)
            del tail.data[:len(tail.data) - self.cap]
            tail.lost = f"over the cap of {self.cap} bytes"

    def _pending(self, key: ConnKey) -> int | None:
        """How many of this leg's remote's last bytes the other leg's remote has not acknowledged."""
        if self._remote_is_client(key):
            pairing = self.pairings.get(key)
            if pairing is None:
                return None
            c, b = self._conn(key), self._conn(pairing.backend_key(self.address))
        else:
            pairing = self.by_backend.get(key)
            if pairing is None:
                return None
            c, b = self._conn(pairing.client_key(self.address)), self._conn(key)
        if c is None or b is None:
            return None
        anchored = _anchored(pairing, c, b)
        if _leg_problem(c.client, "client", anchored) or _leg_problem(b.server, "server", anchored):
            return None
        to_server, to_client = _unacked_both(pairing, c, b, anchored)
        return to_server if self._remote_is_client(key) else to_client

    def relay_server_bytes(self) -> list[tuple[ConnKey, bytes]]:
        """The server's bytes of each paired connection not yet handed on as the client leg's server
        direction (client leg key, bytes), for a standby that never sees the peer's own frames: the
        relay sent the client exactly these. Only for client legs whose server side was never seen (on a
        hub the peer's frames carry them already); from the start of the stream, else never (a decoder
        must not start in the middle)."""
        out = []
        due, self._relay_due = self._relay_due, set()
        for bkey in due:
            pairing = self.by_backend.get(bkey)
            tail = self.tails.get(bkey)
            if pairing is None:
                continue
            ckey = pairing.client_key(self.address)
            c = self._conn(ckey)
            if c is None and tail is not None:
                # not seen yet: relayed when it is (a MOUNT call's one reply, else never decoded: the
                # export's root handle unknown, every path of the NFS view with it; bounded by the pairings)
                self._relay_waiting[ckey] = bkey
                continue
            if tail is None or c is None or c.server.next_seq is not None:
                continue
            done = self.relayed.get(bkey)
            if done is None:
                if tail.lost is not None or tail.end - len(tail.data) > 0:
                    self.relayed[bkey] = -1  # the start is gone: never relay this one
                    continue
                done = 0
            if done < 0 or tail.end <= done:
                continue
            start = len(tail.data) - (tail.end - done)
            if start < 0:
                self.relayed[bkey] = -1  # trimmed before it was handed on (over the cap)
                continue
            out.append((ckey, bytes(tail.data[start:])))
            self.relayed[bkey] = tail.end
        return out

    def set_pairings(self, add: Iterable[Any] = (), remove: Iterable[Any] = (), reset: bool = False) -> list[str]:
        """The peer's pairings message (:class:`PairingOutbox`); the problems with bad entries (skipped)."""
        problems = []
        self._inference = None
        if reset:
            self.pairings.clear()
            self.by_backend.clear()
            self._relay_waiting.clear()
        for item in remove:
            try:
                key = ConnKey(str(item[0]), int(item[1]), self.address, int(item[2]))
            except (TypeError, ValueError, IndexError):
                problems.append(f"removal {item!r} unreadable")
                continue
            old = self.pairings.pop(key, None)
            self._relay_waiting.pop(key, None)
            ended = [key]
            if old is not None:
                self.by_backend.pop(old.backend_key(self.address), None)
                ended.append(old.backend_key(self.address))
            # the client leg also without a pairing here: a connection of a few milliseconds (the NFS
            # client's MOUNT call) has its add and its removal merged in the inbox (PairingInbox: the last
            # word wins), and the book never had it; without the mark its leg, closed by the client, was
            # the peer's and reset at a death (7 NFS takeovers in 20 of bench/continuation.py, 2026-11-30)
            for leg in ended:
                self._ended_at_peer[leg] = None
                self._ended_at_peer.move_to_end(leg)
            while len(self._ended_at_peer) > ENDED_AT_PEER_KEPT:
                self._ended_at_peer.popitem(last=False)
        for item in add:
            try:
                p = Pairing.from_wire(item)
            except ValueError as exc:
                problems.append(str(exc))
                continue
            key = p.client_key(self.address)
            self._ended_at_peer.pop(key, None)  # a new connection on the 4-tuples of ended ones
            self._ended_at_peer.pop(p.backend_key(self.address), None)
            old = self.pairings.get(key)
            if old is not None:
                self.by_backend.pop(old.backend_key(self.address), None)
            self.pairings[key] = p
            self.by_backend[p.backend_key(self.address)] = p
            self._relay_due.add(p.backend_key(self.address))
            self._once_paired[p.backend_key(self.address)] = None if p.anchor is None else p.anchor[2]
            self._once_paired.move_to_end(p.backend_key(self.address))
            while len(self._once_paired) > ONCE_PAIRED_KEPT:
                self._once_paired.popitem(last=False)
            servers = self._servers.setdefault(p.service_port, {})
            if p.server not in servers and len(servers) < SERVERS_PER_PORT:
                servers[p.server] = None
        return problems

    def _conn(self, key: ConnKey) -> TcpConnection | None:
        for tracker in self.trackers:
            conn = tracker.connections.get(key)
            if conn is not None:
                return conn
        return None

    # -------------------------------------------------------------------------------- output
    def client_legs(self) -> list[ConnKey]:
        """The peer's client legs the trackers know (whether or not paired; :meth:`_peers`)."""
        return sorted({k for t in self.trackers for k, c in t.connections.items() if self._peers(k, c)})

    def _peers(self, key: ConnKey, conn: TcpConnection) -> bool:
        """Is this client leg a connection of the peer's? Past its handshake (the client acknowledged
        something) or picked up mid-stream; not one whose SYN this node's own kernel answered at a
        takeover (:meth:`answered_here`), nor one the client closed and the peer ended.

        Why: a SYN alone is nobody's connection yet (the peer died before answering it, or this node
        answered it); such legs were each listed at a takeover as "reset: the peer did not say which
        backend leg it pairs with", about 18 per takeover in the soak (bench/SOAK.md, 2026-11-30),
        while no RST was sent and none was owed."""
        if key.server_ip != self.address or key in self._answered_here or self.ended_at_peer(key, conn):
            return False
        return conn.mid_stream or conn.client.first_ack is not None

    def ended_at_peer(self, key: ConnKey, conn: TcpConnection) -> bool:
        """Is this leg over at both ends: its remote closed it (the client's FIN seen, or on a backend leg
        the server's) and the peer said the connection ended (its pairing removed)? Then it is nobody's
        connection, to continue or to reset.

        Why: on a switch the standby never sees the peer's FIN, so the leg lingers in the views until
        their sync prunes it (a second or more), and every NFS takeover of bench/continuation.py listed
        the client's MOUNT connection as reset. (The views do not forget it on the peer's word: the
        client's last frames, the call among them, may still be on their way through the capture.)"""
        if key not in self._ended_at_peer:
            return False
        remote = conn.client if self._remote_is_client(key) else conn.server  # a backend leg: the server's FIN
        return remote.fin_seq is not None

    def plan(self, now: float, *, keys: Iterable[ConnKey] | None = None, first: int | None = None) -> list[Verdict]:
        """A verdict for every client leg of the peer (or for ``keys``), busiest first (:func:`_busiest_first`;
        issue 10, behaviour 7: a takeover restores them in this order).

        ``first``: only the verdicts of the ``first`` busiest (the client legs whose server sent bytes
        last); the others wait for :meth:`plan_rest`, as the legs stand now. Why: a takeover restores the
        busiest before its address comes up and the rest after, and thousands of idle connections must not
        delay the busy one (this costs O(first) verdicts plus copying four dictionaries). The legs are kept
        by reference: the views forget the dead peer's connections soon after; the objects stay as they were."""
        if first is None:
            self._snapshot = None
            inference = self._own_inference()
            legs = [self._legs(k, inference) for k in (self.client_legs() if keys is None else keys)]
            legs.sort(key=_busiest_first)
            return [self._verdict(leg, now) for leg in legs]
        snap = _Snapshot(self.address, [dict(t.connections) for t in self.trackers], dict(self.pairings),
                         dict(self.tails), self)
        chosen: list[ConnKey] = []
        for key in reversed(self._active):
            if len(chosen) >= max(first, 0):
                break
            conn = snap.conn(key)
            # (a leg stays in _active until its close is seen, which a one-way view may never see: the
            # client's MOUNT connection, closed and ended at the peer, was reset at every NFS takeover)
            if conn is not None and self._peers(key, conn):
                chosen.append(key)
        snap.given = set(chosen)
        self._snapshot = snap
        return [self._snap_verdict(snap, k, now) for k in chosen]

    def _snap_verdict(self, snap: _Snapshot, key: ConnKey, now: float) -> Verdict:
        legs = snap.legs(key)
        if legs.pairing is None:
            if snap.inference is None:  # once: the legs as the takeover found them
                snap.inference = self._infer(snap.conns, snap.pairings)
            legs = snap.legs(key, snap.inference)
        return self._verdict(legs, now)

    def answered_here(self, clients: Iterable[tuple[str, int, int]]) -> None:
        """These clients' SYNs (address, port, service port) went to this node's own kernel at the takeover
        (proxy.synlog): their handshakes end here, with this node's sequence numbers, and the legs the
        book sees go on changing (kept by reference), so without this such a leg looked like one the
        peer left in its accept queue and was restored a second time (EADDRNOTAVAIL, then a reset, in
        bench/soak.py). Never continued fresh. Bounded: forgotten with the next takeover's."""
        self._answered_here = {ConnKey(ip, port, self.address, service_port) for ip, port, service_port in clients}

    @property
    def rest_waiting(self) -> int:
        """How many verdicts :meth:`plan_rest` would still give."""
        snap = self._snapshot
        if snap is None:
            return 0
        if snap.order is None:
            return sum(1 for c in snap.conns for k, conn in c.items() if self._peers(k, conn)) - len(snap.given)
        return len(snap.order)

    def plan_rest(self, now: float, limit: int | None = None) -> list[Verdict]:
        """The next ``limit`` (default: all) of the verdicts :meth:`plan` with ``first`` left out, the
        most recently busy first; each is given once."""
        snap = self._snapshot
        if snap is None:
            return []
        if snap.order is None:  # now, not on the way to the address coming up
            mine = {k for c in snap.conns for k, conn in c.items() if self._peers(k, conn)} - snap.given
            recent = [k for k in reversed(self._active) if k in mine]
            seen = set(recent)
            snap.order = recent + [k for k in mine if k not in seen]
        take = len(snap.order) if limit is None else max(limit, 1)
        keys, snap.order = snap.order[:take], snap.order[take:]
        return [self._snap_verdict(snap, k, now) for k in keys]

    def verdict(self, key: ConnKey, now: float) -> Verdict:
        inference = None if key in self.pairings else \
            self._own_inference()
        return self._verdict(self._legs(key, inference), now)

    def _legs(self, key: ConnKey, inference: _Inference | None = None) -> "_Legs":
        return _legs_of(key, self.pairings, self._conn, self.tails, self.address, inference)

    def _verdict(self, legs: "_Legs", now: float, *, states: bool = True) -> Verdict:
        """``states=False``: only whether (and why not) continuable, without building the sockets' states
        and copying their bytes (status asks for that often, for every connection)."""
        if legs.pairing is None:
            return self._fresh(legs.key, legs.client_conn, now, states, legs.inference)
        v = self._paired_verdict(legs, now, states)
        v.inferred = legs.inferred
        return v

    def _paired_verdict(self, legs: "_Legs", now: float, states: bool) -> Verdict:
        key, pairing, c, b = legs.key, legs.pairing, legs.client_conn, legs.backend_conn
        name = key.client
        assert pairing is not None
        if pairing.client_options is None or pairing.backend_options is None:
            return Verdict(pairing, name, "the peer could not read its options (it ended at once)")
        if c is None:
            return Verdict(pairing, name, "its client leg was not seen")
        if b is None:
            return Verdict(pairing, name, "its backend leg was not seen")
        anchored = _anchored(pairing, c, b)
        problem = _leg_problem(c.client, "client", anchored) or _leg_problem(b.server, "server", anchored)
        if problem:
            return Verdict(pairing, name, problem)
        to_server, to_client = _unacked_both(pairing, c, b, anchored)
        v = Verdict(pairing, name, pending_to_server=max(to_server, 0), pending_to_client=max(to_client, 0))
        if to_server < 0 or to_client < 0:
            v.reason = (f"the capture missed frames: the {'server' if to_server < 0 else 'client'} acknowledged "
                        f"{-min(to_server, to_client)} bytes more than were seen sent to it")
            return v
        bkey = pairing.backend_key(self.address)
        for pending, leg, tail, who in ((to_server, key, legs.client_tail, "client"),
                                        (to_client, bkey, legs.backend_tail, "server")):
            if tail is not None and len(tail.data) > self.cap:
                self._trim(leg, tail)  # (kept up to twice the cap between trims)
            if pending > self.cap:
                v.reason = f"{pending} bytes from the {who} not yet delivered: over the cap of {self.cap}"
                return v
            have = len(tail.data) if tail is not None else 0
            if pending > have:
                lost = tail.lost if tail is not None and tail.lost else "not kept"
                v.reason = f"{pending} bytes from the {who} not yet delivered, {have} kept: {lost}"
                return v
        if not states:
            return v
        to_server_bytes = bytes(legs.client_tail.data[-to_server:]) if to_server else b""
        to_client_bytes = bytes(legs.backend_tail.data[-to_client:]) if to_client else b""
        try:
            v.states = (_leg_state(self.address, key.server_port, pairing.client, c.client, pairing.client_options,
                                   to_client_bytes, now - c.last_seen),
                        _leg_state(self.address, pairing.source_port, pairing.server, b.server,
                                   pairing.backend_options, to_server_bytes, now - b.last_seen))
        except ValueError as exc:
            v.reason = f"inconsistent state: {exc}"
        return v

    def _fresh(self, key: ConnKey, c: TcpConnection | None, now: float, states: bool,
               inference: _Inference | None = None) -> Verdict:
        """A client leg the peer never paired: continuable *fresh* if the peer cannot have relayed any of it.

        Why: a connection is paired a few milliseconds after the peer's process accepted it and
        connected its backend; one in the peer kernel's accept queue at the death (handshake done, the
        request perhaps sent, the process busy or already cut off) was reset, and a client that connects
        per operation failed (bench/soak.py at load 12: a libnfs mount at about one takeover in two).
        The frames show all it needs when the peer sent the client nothing (the client's ACK is still
        the handshake's) and no backend leg the peer opened since may carry its bytes: the client leg
        with every byte the client sent unread, and a new backend connection, as if this node had
        accepted it. Otherwise it stays the exact-sequence reset."""
        unpaired = "the peer did not say which backend leg it pairs with (nor its options)"
        if c is None or c.mid_stream:
            return Verdict(None, key.client, unpaired)
        client = c.client
        if client.isn is None or client.first_ack is None or client.last_ack is None or client.next_seq is None:
            return Verdict(None, key.client, unpaired)
        if inference is None:
            inference = self._own_inference()
        if client.last_ack != client.first_ack:
            return Verdict(None, key.client, unpaired + "; it had sent the client bytes; "
                           f"{inference.candidates.get(key, 0)} backend legs could be its own")
        problem = _leg_problem(client, "client")
        if problem:
            return Verdict(None, key.client, problem)
        tail = self.tails.get(key)
        have = tail.data if tail is not None else b""
        sent = seq_diff(client.next_seq, (client.isn + 1) & U32)
        if (tail is not None and (tail.lost or tail.end != len(have))) or sent != len(have):
            return Verdict(None, key.client, unpaired + f"; {sent} bytes from the client, {len(have)} kept")
        if len(have) > self.cap:
            return Verdict(None, key.client, unpaired + f"; {len(have)} bytes from the client: over the cap")
        if key in self._answered_here:
            return Verdict(None, key.client, unpaired + "; its SYN was answered by this node at the takeover")
        found = self._rival(inference, key.server_port)
        if found is not None and found[0] >= c.opened_at:
            at, rival = found
            n = inference.candidates.get(key, 0)
            return Verdict(None, key.client, unpaired + "; a backend leg it did not pair carried bytes since"
                           f": the latest, {rival.client_ip} port {rival.client_port} to {rival.server_ip} port "
                           f"{rival.server_port}, {(at - c.opened_at) * 1000:.0f} ms younger; {n} could be its own")
        opts = self._client_options(client, key.server_port)
        if opts is None:
            return Verdict(None, key.client, unpaired + "; no pairing to learn the peer's options from")
        v = Verdict(None, key.client, pending_to_server=len(have), fresh=True)
        if not states:
            return v
        try:
            state = _leg_state(self.address, key.server_port, (key.client_ip, key.client_port), client, opts, b"",
                               now - c.last_seen)
            v.states = (replace(state, recv_seq=(client.isn + 1) & U32, recv_queue=bytes(have)), None)
        except ValueError as exc:
            v.reason, v.fresh = f"inconsistent state: {exc}", False
        return v

    def _own_inference(self) -> _Inference:
        """:meth:`_infer` of the views as they are now (one scan until a frame or a pairing changes them)."""
        seen = sum(t.counters["segments"] for t in self.trackers)
        if self._inference is None or self._inference[0] != seen:
            self._inference = (seen, self._infer([t.connections for t in self.trackers], self.pairings))
        return self._inference[1]

    def _infer(self, conns: list[dict], pairings: dict[ConnKey, Pairing]) -> _Inference:
        """Which unpaired backend leg is which unpaired client leg's, from the frames alone.

        Why: the peer tells its pairing before it relays a connection's first byte, but a pairing can
        still miss a death (the hold ran out on a busy node, the message died with the link); the server
        has then seen the client's request (its ACK on a backend leg the standby cannot place), so neither
        a continuation nor a fresh start was safe, and the client was reset (bench/soak.py: the NFS
        writer's only failures at takeovers, 13 in 200). The relay's invariant names the leg: the
        bytes the server acknowledged on the backend leg are a prefix of what the client sent, what the
        client acknowledged is a prefix of what the server sent, the backend leg was opened after the
        client leg, to a server the peer relays that port to, and an RPC server's replies carry the XIDs
        of the client's calls. A pairing is inferred only when it is the one both ways: the client leg
        has exactly one such backend leg and that leg exactly one such client leg. Anything less stays
        the reset. Options come from the SYNs seen and the peer's own scales in its other pairings.

        The backend leg must also be opened within ``INFER_WITHIN`` of the client leg (the peer connects
        it right after the accept), and a client leg picked up mid-stream in that time counts as one
        more that could own it (its bytes cannot be compared): a backend leg whose own client leg is
        not among the candidates (forgotten, never seen whole) must not be given to another one, whose
        bytes would then be written to that server.

        ``conns``: the views' connection dictionaries (the book's trackers', or a takeover's snapshot)."""
        address = self.address
        claimed = {p.backend_key(address): None if p.anchor is None else p.anchor[2] for p in pairings.values()}
        clients: dict[ConnKey, TcpConnection] = {}
        vague: list[float] = []  # when unpaired client legs picked up mid-stream were first seen
        backends: dict[ConnKey, TcpConnection] = {}
        maybe: dict[ConnKey, TcpConnection] = {}  # legs of an ended pairing that did not say which instance
        for view in conns:
            for key, conn in view.items():
                if key.server_ip == address:
                    if key not in pairings and key not in clients:
                        if conn.mid_stream:
                            vague.append(conn.opened_at)
                        else:
                            clients[key] = conn
                elif key.client_ip == address and key not in backends and key not in maybe:
                    if _pairing_names(claimed, key, conn):
                        continue  # a live pairing's leg (its 4-tuple cannot be reused while it lives)
                    server = conn.server
                    if server.fin_seq is not None:
                        continue  # the server closed it: over (the peer's own FIN is not seen on a switch)
                    if server.first_ack is None or server.last_ack is None or server.last_ack == server.first_ack:
                        continue  # the server acknowledged nothing of the peer's: no client's bytes on it
                    named = _pairing_names(self._once_paired, key, conn)
                    if named and self._once_paired[key] is not None:
                        continue  # the very leg an ended pairing named: its own client's bytes
                    if named:  # that leg, or a new one on its port: given to nobody, but may be anybody's
                        maybe[key] = conn
                        continue
                    backends[key] = conn
        found: dict[ConnKey, list[TcpConnection]] = {}
        claims: dict[ConnKey, int] = {}
        if backends:  # only client legs opened in the INFER_WITHIN before a backend leg can own one
            first, last = min(b.opened_at for b in backends.values()), max(b.opened_at for b in backends.values())
            clients = {k: c for k, c in clients.items() if first - INFER_WITHIN <= c.opened_at <= last}
        if clients and backends and len(clients) * len(backends) <= INFER_PAIRS_MAX:
            for ckey, c in clients.items():
                servers = self._servers.get(ckey.server_port)
                if not servers:
                    continue
                mine = [b for bkey, b in backends.items() if (bkey.server_ip, bkey.server_port) in servers
                        and 0 <= b.opened_at - c.opened_at <= INFER_WITHIN and self._could_carry(c, b)]
                found[ckey] = mine
                for b in mine:
                    claims[b.key] = claims.get(b.key, 0) + 1
            vague.sort()
            for b in backends.values():  # a mid-stream leg seen in the INFER_WITHIN before it: one claim more
                i = bisect.bisect_left(vague, b.opened_at - INFER_WITHIN)
                if i < len(vague) and vague[i] <= b.opened_at:
                    claims[b.key] = claims.get(b.key, 0) + 1
        inferred: dict[ConnKey, Pairing] = {}
        for ckey, mine in found.items():
            if len(mine) != 1 or claims[mine[0].key] != 1:
                continue
            c, b = clients[ckey], mine[0]
            copts, bopts = self._client_options(c.client, ckey.server_port), self._backend_options(b)
            if copts is None or bopts is None:
                continue
            inferred[ckey] = Pairing((ckey.client_ip, ckey.client_port), ckey.server_port, b.key.client_port,
                                     (b.key.server_ip, b.key.server_port), copts, bopts)
        matched = {p.backend_key(address) for p in inferred.values()}
        rivals: dict[tuple[str, int], tuple[float, ConnKey]] = {}
        for k, b in [*backends.items(), *maybe.items()]:
            server = (k.server_ip, k.server_port)
            if k not in matched and (server not in rivals or rivals[server][0] < b.opened_at):
                rivals[server] = (b.opened_at, k)
        return _Inference(inferred, rivals, {k: len(v) for k, v in found.items()})

    def _rival(self, inference: _Inference, service_port: int) -> tuple[float, ConnKey] | None:
        """The latest unpaired backend leg that may carry the bytes of a client leg on ``service_port``:
        one to a server the peer relays that port to, or to a server none of its pairings ever named
        (its configuration may have changed); a leg to another port's server cannot (the peer relays a
        port to that port's backend only)."""
        mine = self._servers.get(service_port, {})
        known = set().union(*self._servers.values()) if self._servers else set()
        pool = [r for server, r in inference.rivals.items() if server in mine or server not in known]
        return max(pool, key=lambda r: r[0]) if pool else None

    def _could_carry(self, c: TcpConnection, b: TcpConnection) -> bool:
        """Whether backend leg ``b`` can be the one the peer relays client leg ``c`` on (:meth:`_infer`)."""
        client, server = c.client, b.server
        if None in (client.isn, client.first_ack, client.last_ack, client.next_seq, server.isn, server.next_seq):
            return False
        relayed = seq_diff(server.last_ack, server.first_ack)
        if not 0 < relayed <= seq_diff(client.next_seq, (client.isn + 1) & U32):
            return False
        answered = seq_diff(client.last_ack, client.first_ack)
        if not 0 <= answered <= seq_diff(server.next_seq, (server.isn + 1) & U32):
            return False
        calls = _rpc_xids(self.tails.get(c.key), records=INFER_XIDS_MAX)
        replies = _rpc_xids(self.tails.get(b.key), records=1)
        return calls is None or replies is None or replies <= calls

    def _client_options(self, client: HalfStream, service_port: int) -> LegOptions | None:
        """A client leg's options as the peer's kernel negotiated them, for a leg it did not pair: the
        client's SYN says what it offered, the peer's latest pairing on the port its own window scale
        (:meth:`_peer_options`); None without such a pairing."""
        sample = self._peer_options(service_port)
        if sample is None:
            return None
        options = 0
        if client.timestamps and client.last_tsecr is not None:
            options |= TCPI_OPT_TIMESTAMPS
        if client.sack_permitted and sample.sack:
            options |= TCPI_OPT_SACK
        if client.wscale is not None and sample.wscale:
            options |= TCPI_OPT_WSCALE
        return LegOptions(options, client.wscale or 0, sample.rcv_wscale, _send_mss(client.mss, options, sample))

    def _backend_options(self, b: TcpConnection) -> LegOptions | None:
        """A backend leg's options, for one the peer did not pair: the server's SYN-ACK says what was
        negotiated (a server answers only the options offered), the peer's latest pairing with the same
        server (else any) its own window scale; None without such a pairing."""
        server = b.server
        sample = self._latest_options(lambda p: p.backend_options, lambda p: p.server == (b.key.server_ip,
                                                                                         b.key.server_port))
        if sample is None:
            return None
        options = (TCPI_OPT_TIMESTAMPS if server.timestamps else 0) | (TCPI_OPT_SACK if server.sack_permitted else 0) \
            | (TCPI_OPT_WSCALE if server.wscale is not None else 0)
        return LegOptions(options, server.wscale or 0, sample.rcv_wscale if server.wscale is not None else 0,
                          _send_mss(server.mss, options, sample))

    def _peer_options(self, service_port: int) -> LegOptions | None:
        """The options of the peer's latest paired client leg on ``service_port`` (else any port): its
        own window scale, which no frame to it shows, is the same for every connection its listeners
        accept."""
        return self._latest_options(lambda p: p.client_options, lambda p: p.service_port == service_port)

    def _latest_options(self, options: Any, preferred: Any) -> LegOptions | None:
        """``options(p)`` of the latest pairing ``p`` that has them and is ``preferred``, else of the latest
        that has them: a sample of the peer's own side, which is the same for all its connections."""
        fallback = None
        for p in reversed(self.pairings.values()):
            found = options(p)
            if found is not None:
                if preferred(p):
                    return found
                fallback = fallback or found
        return fallback

    def summary(self, now: float, *, max_age: float = 0.0) -> dict:
        """For status while standing by: how many of the peer's connections are continuable now, why the
        others are not (reason -> count), and the bytes kept. ``max_age``: the last answer if it is at most
        this old (seconds of ``now``): status is asked often, and with thousands of connections this costs
        tens of milliseconds of the observer, which a takeover's requests would wait behind."""
        if self._summary is not None and 0 <= now - self._summary[0] <= max_age:
            return self._summary[1]
        reasons: dict[str, int] = {}
        continuable = 0
        inference = self._own_inference()
        inferred = 0
        for v in (self._verdict(self._legs(k, inference), now, states=False) for k in self.client_legs()):
            if v.reason is None:
                continuable += 1
                inferred += v.inferred
            else:
                short = v.reason.split(":")[0]
                reasons[short] = reasons.get(short, 0) + 1
        out = {"connections": continuable + sum(reasons.values()), "continuable": continuable,
               "not_continuable": reasons, "bytes_kept": self.memory(), "pairings": len(self.pairings),
               "inferred": inferred}
        self._summary = (now, out)
        return out

    def sweep(self) -> int:
        """Trim every tail to what the other leg's remote has not acknowledged (behaviour 6). ``feed``
        trims a tail only once it holds ``trim_above`` bytes (amortised), so an idle connection would
        keep up to that much each way for good; a sweep now and then (the observer: every few seconds)
        brings each down to its need. Returns the bytes kept afterwards."""
        for key, tail in list(self.tails.items()):
            if tail.data:
                self._trim(key, tail)
        return self.memory()

    def memory(self) -> int:
        return sum(len(t.data) for t in self.tails.values())


def _anchored(pairing: Pairing, c: TcpConnection, b: TcpConnection) -> bool:
    """Whether the pairing's anchor, not the handshakes, relates the two legs: a leg was picked up
    mid-stream (a connection the peer restored; the anchor is exact, the ISNs unknown)."""
    return pairing.anchor is not None and (c.mid_stream or b.mid_stream)


def _unacked_both(pairing: Pairing, c: TcpConnection, b: TcpConnection, anchored: bool) -> tuple[int, int]:
    """(client bytes the server lacks, server bytes the client lacks)."""
    if anchored:
        client_seq, backend_seq, server_seq, client_leg_seq = pairing.anchor
        return (_unacked(c.client, b.server, client_seq, backend_seq),
                _unacked(b.server, c.client, server_seq, client_leg_seq))
    return (_unacked(c.client, b.server, c.client.isn + 1, b.server.first_ack),
            _unacked(b.server, c.client, b.server.isn + 1, c.client.first_ack))


def _unacked(sender: HalfStream, receiver: HalfStream, sent_at: int, acked_at: int) -> int:
    """Bytes ``sender`` sent on its leg that ``receiver`` (the remote of the other leg) has not
    acknowledged on its leg. ``sender``'s byte at ``sent_at`` is the one ``receiver`` gets at
    ``acked_at`` (the ISNs + 1, or a restored connection's anchor). Wrap-safe: only the (small)
    difference is computed in sequence space."""
    sent_end = sender.next_seq
    acked = (sent_at + (receiver.last_ack - acked_at)) & U32
    return seq_diff(sent_end, acked)


def _leg_problem(remote: HalfStream, who: str, anchored: bool = False) -> str | None:
    if remote.next_seq is None or (remote.isn is None and not anchored):
        return f"picked up mid-stream: the {who}'s handshake was not seen"
    if remote.last_ack is None or (remote.first_ack is None and not anchored):
        return f"the {who} acknowledged nothing yet (handshake not complete)"
    if remote.fin_seq is not None:
        return f"the {who} began to close the connection"
    if remote.ooo or (remote.highest_seq is not None and seq_diff(remote.highest_seq, remote.next_seq) > 0):
        return f"a hole in the capture of the {who}'s bytes"
    return None


def _mss_clamp(opts: LegOptions) -> int:
    """The remote's MSS as its SYN said, for a leg whose SYN was not seen (restored by the peer): the
    peer's send MSS (``tcpi_snd_mss``) has the timestamp option (12 bytes) taken off; the repair
    state wants the clamp, options not deducted."""
    if not opts.snd_mss:
        return 536
    return opts.snd_mss + (12 if opts.timestamps else 0)


def _leg_state(address: str, port: int, remote_addr: tuple[str, int], remote: HalfStream, opts: LegOptions,
               to_send: bytes, since: float) -> TcpSocketState:
    """The new socket of one leg: local ``address:port``, talking to ``remote_addr``."""
    snd_wscale = opts.snd_wscale if opts.wscale else 0
    rcv_wscale = opts.rcv_wscale if opts.wscale else 0
    if opts.wscale and remote.wscale is not None and remote.wscale != snd_wscale:
        raise ValueError(f"the remote's window scale is {remote.wscale} in its SYN but {snd_wscale} at the peer")
    window = remote.window if remote.window_in_syn else remote.window << snd_wscale
    tsval = 0
    if opts.timestamps:
        if remote.last_tsecr is None:
            raise ValueError("timestamps negotiated but the remote echoed none")
        tsval = (remote.last_tsecr + int(max(since, 0.0) * 1000) + TSVAL_MARGIN) & U32 & ~1
    rcv_nxt = remote.next_seq
    return TcpSocketState(
        local_address=address, local_port=port, remote_address=remote_addr[0], remote_port=remote_addr[1],
        send_seq=remote.last_ack, recv_seq=rcv_nxt, send_queue=to_send, send_unsent=len(to_send), recv_queue=b"",
        mss=remote.mss or _mss_clamp(opts), snd_wscale=snd_wscale, rcv_wscale=rcv_wscale,
        sack_permitted=opts.sack, timestamps=opts.timestamps, tsval=tsval,
        window=RepairWindow(snd_wl1=rcv_nxt, snd_wnd=window, max_window=window,
                            rcv_wnd=min(0xFFFF << rcv_wscale, RECEIVE_WINDOW), rcv_wup=rcv_nxt))


def _pairing_names(named: dict, key: ConnKey, leg: TcpConnection) -> bool:
    """Whether a pairing in ``named`` (backend leg key -> the server's first sequence number it was
    about, None: unknown) is about this instance of the leg: same 4-tuple, and the same server ISN
    where the pairing says it (a source port reused at once is another connection)."""
    if key not in named:
        return False
    first = named[key]
    return first is None or leg.server.isn is None or first == (leg.server.isn + 1) & U32


def _send_mss(remote_mss: int | None, options: int, sample: LegOptions) -> int:
    """``tcpi_snd_mss`` of a leg the peer did not describe: the remote's MSS (its SYN) less the
    timestamp option, at most the peer's own (its sample's, from the same path); the inverse of
    :func:`_mss_clamp`."""
    if not remote_mss:
        return sample.snd_mss
    mss = remote_mss - (12 if options & TCPI_OPT_TIMESTAMPS else 0)
    return min(mss, sample.snd_mss) if sample.snd_mss else mss


def _rpc_xids(tail: _Tail | None, records: int) -> frozenset[bytes] | None:
    """The XIDs of the first ``records`` ONC RPC records of a stream (RFC 5531 record marking: a 4-byte
    mark, the last-fragment bit and the length; the XID first in a record), if the tail holds the
    stream from its start and it looks like RPC (the first mark's last-fragment bit set: an SMB
    stream's first byte is 0); else None (nothing to compare)."""
    if tail is None or tail.lost is not None or tail.end != len(tail.data) or len(tail.data) < 8:
        return None
    data = tail.data
    if not data[0] & 0x80:
        return None
    xids = set()
    off, starts_record = 0, True
    while off + 8 <= len(data) and len(xids) < records:
        mark = int.from_bytes(data[off:off + 4], "big")
        if starts_record:
            xids.add(bytes(data[off + 4:off + 8]))
        starts_record = bool(mark & 0x8000_0000)
        off += 4 + (mark & 0x7FFF_FFFF)
    return frozenset(xids)
