"""The typed records that cross a boundary: status, snapshots, takeovers, resume reports, replay.

Why typed records: these shapes cross a process boundary (the observer child, msgpack), the sync link
(snapshots), the control socket (``pairproxy status --json``) and the offline tool (``pairproxy replay
--json``), and they are read by the human status, the Prometheus exposition (:mod:`proxy.metrics`) and
the tests. Spelled as string-keyed dicts in each of those places they drifted apart (a stateless
status had no ``connections``; replay put its digest at the top, status under ``pair.state_sync``).
Here each record is defined once, as a dataclass; JSON is ``to_json(record)`` and
``from_json(Type, data)`` reads it back *strictly* (every key known, every type right), which is also
how the tests check a live status and a replay against the schema.

The shared part of status and replay is :class:`Tables`: the connections (one
:class:`ConnectionRecord` each, decoded from frames or known from the node's own sockets), the
decoders' counters, and a digest per service address.

This package imports nothing of the node (``proxy``) or of the capture tools (``capture``): both use
it, so it sits below them and no package cycle forms. Status *assembly* (reading a running node's
objects) is :mod:`proxy.status`.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = [
    "SchemaError", "to_json", "from_json",
    "TreeRecord", "SessionRecord", "OpenRecord", "TcpRecord", "ProxiedRecord", "ConnectionRecord",
    "Snapshot", "Tables", "ServiceStatus", "RttStatus", "LinkStatus", "AddressStatus", "ProbeStatus",
    "PeerRefusal", "DetectorStatus", "Percentiles", "HeartbeatPath", "HeartbeatStatus", "Behind", "Difference", "SnooperStats", "StateSync", "Takeover", "TakeoverReport", "ResumeBefore",
    "ResumeRecord", "PairStatus", "BytePathStatus", "NodeStatus", "CaptureInfo", "ReplayReport",
    "TakeoverFailure", "OwnAddressStuck", "MoveRecord", "OPTIONAL", "snapshot_from_dict", "tables_with_digests",
]

T = TypeVar("T")


# ------------------------------------------------------------------------------------ JSON helpers
class SchemaError(ValueError):
    """Data that does not fit the schema; the message names the key path (``pair.link.rtt_ms.last``)."""


#: field metadata: leave the key out of the JSON while the value is None (a section a mode does not
#: have, e.g. ``pair`` of a single node: readers test ``"pair" in status``, as they always did)
OPTIONAL = {"omit_if_none": True}


_FIELDS: dict[type, list[tuple[str, bool]]] = {}


def to_json(record: Any) -> Any:
    """A record (or a list or dict of records) as plain JSON-able data."""
    if isinstance(record, (str, int, float, type(None))):
        return record
    if isinstance(record, (list, tuple)):
        return [to_json(r) for r in record]
    if isinstance(record, dict):
        return {k: to_json(v) for k, v in record.items()}
    cls = type(record)
    fields = _FIELDS.get(cls)
    if fields is None:
        if not dataclasses.is_dataclass(cls):
            return record
        fields = _FIELDS[cls] = [(f.name, bool(f.metadata.get("omit_if_none"))) for f in dataclasses.fields(cls)]
    out = {}
    for name, omit_if_none in fields:
        value = getattr(record, name)
        if value is None and omit_if_none:
            continue
        out[name] = to_json(value)
    return out


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def from_json(cls: type[T], data: Any, *, strict: bool = True, path: str = "") -> T:
    """Read ``data`` as ``cls``; SchemaError names the key path of what does not fit. Always: a
    required key missing or a value of the wrong type. Strict (the default) also refuses unknown
    keys; lenient (``strict=False``, for data another module or a newer node produced) drops them.
    Keys with a default may be left out."""
    return _convert(cls, data, strict, path or cls.__name__)


def _convert(tp: Any, value: Any, strict: bool, path: str) -> Any:
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise SchemaError(f"{path}: must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, strict, path)
            except SchemaError as exc:
                errors.append(str(exc))
        raise SchemaError(errors[0] if len(errors) == 1 else f"{path}: none of {tp} fits: {'; '.join(errors)}")
    if origin is list:
        if not isinstance(value, list):
            raise SchemaError(f"{path}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_convert(item, v, strict, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise SchemaError(f"{path}: expected an object, got {type(value).__name__}")
        key_t, val_t = typing.get_args(tp) or (Any, Any)
        return {k: _convert(val_t, v, strict, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise SchemaError(f"{path}: expected an object, got {type(value).__name__}")
        hints = _hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
        unknown = sorted(set(value) - set(fields))
        if unknown and strict:
            raise SchemaError(f"{path}: unknown key(s) {', '.join(map(str, unknown))}")
        kwargs = {}
        for name, f in fields.items():
            if name not in value:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise SchemaError(f"{path}.{name}: missing")
                continue
            kwargs[name] = _convert(hints[name], value[name], strict, f"{path}.{name}")
        return tp(**kwargs)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SchemaError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SchemaError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise SchemaError(f"{path}: expected {tp.__name__}, got {value!r}")
        return value
    raise SchemaError(f"{path}: no rule for type {tp!r}")  # a schema bug, not bad data


# ------------------------------------------------------------------------------ connection tables
@dataclass
class TreeRecord:
    tree_id: int
    share: str


@dataclass
class SessionRecord:
    session_id: int
    user: str | None
    trees: list[TreeRecord]


@dataclass
class OpenRecord:
    session_id: int
    tree_id: int
    file_id: str
    path: str | None
    durable: bool


@dataclass
class TcpRecord:
    """A connection's TCP state as the decoder followed it (``TcpConnection.sequence_state``): what a
    reset or a TCP_REPAIR takeover needs. None where it was not seen."""

    client_next_seq: int | None
    server_next_seq: int | None
    client_last_ack: int | None
    server_last_ack: int | None
    client_window: int | None
    server_window: int | None
    client_wscale: int | None
    server_wscale: int | None
    client_mss: int | None
    server_mss: int | None
    sack_permitted: bool | None
    timestamps: bool | None
    client_tsval: int | None
    server_tsval: int | None
    handshake_seen: bool


@dataclass
class ProxiedRecord:
    """A connection this node proxies itself, as its sockets know it."""

    service: str
    backend: str           # the backend endpoint, "IP:PORT"
    backend_source: str | None  # this node's end of the backend leg ("IP:PORT"); None before it connected
    age_s: float
    bytes_to_backend: int
    bytes_to_client: int


@dataclass
class ConnectionRecord:
    """One client connection to a service address: the same fields whether it was decoded from frames
    (stateful nodes, ``replay``) or is known from the node's own sockets (``proxied``)."""

    client: str            # "IP:PORT"
    server: str            # "IP:PORT" (the service address and port)
    protocol: str          # smb | nfs | tcp
    sessions: list[SessionRecord] = field(default_factory=list)
    opens: list[OpenRecord] = field(default_factory=list)
    nfs: dict[str, Any] | None = None    # protocols.nfs_state's table of this connection, as it gives it
    smb: dict[str, Any] | None = None    # dialect, outstanding requests, opens with lease and access
    tcp: TcpRecord | None = None         # None: not decoded (a stateless node knows only its sockets)
    unsynchronised: bool | None = None   # the decoder lost the message boundaries; None: not decoded
    proxied: ProxiedRecord | None = None


@dataclass
class Snapshot:
    """The decoded connections of one address (``AddressView.snapshot``, the observer's answer, what
    a node sends its peer for comparison) and the decoders' counters."""

    connections: list[ConnectionRecord]
    errors: dict[str, int]


def snapshot_from_dict(raw: dict) -> Snapshot:
    """A :class:`protocols.pipeline.Pipeline` snapshot (a dict) as a typed :class:`Snapshot`."""
    return from_json(Snapshot, {"connections": raw.get("connections", []), "errors": raw.get("errors", {})},
                     strict=False)


@dataclass
class Tables:
    """What status and replay share: the connections, the decoders' counters, and per service
    address the digest of what two observers of its traffic must agree on."""

    connections: list[ConnectionRecord]
    errors: dict[str, int]
    digests: dict[str, str | None]


def tables_with_digests(snapshot: dict, digest_of) -> tuple[Snapshot, dict[str, str]]:
    """A pipeline snapshot typed, and a digest per server address (``digest_of(snapshot_dict)``):
    for the connections *to* one address, exactly what an AddressView of it digests."""
    by_address: dict[str, list[dict]] = {}
    for c in snapshot.get("connections", []):
        by_address.setdefault(c["server"].rsplit(":", 1)[0], []).append(c)
    digests = {address: digest_of({"connections": conns, "errors": {}})
               for address, conns in sorted(by_address.items())}
    return snapshot_from_dict(snapshot), digests


# ------------------------------------------------------------------------------------------ status
@dataclass
class ServiceStatus:
    name: str
    protocol: str
    address: str
    ports: list[int]
    backend: str
    connections_active: int
    connections_total: int
    bytes_to_backend: int
    bytes_to_client: int
    backend_failures: int
    connections_reset: int
    internal_errors: int
    last_backend_error: str | None
    source_ports_exhausted: int = 0     # refused: every source port below 1024 to the backend in use
    fd_limit_paused: bool = False       # not accepting now: near the descriptor limit (clients wait)
    fd_limit_pauses: int = 0
    fd_errors: int = 0
    connections_sockmap: int = 0        # open connections whose bytes the kernel relays (proxy.sockmap)
    sockmap_switched: int = 0           # handed from the kernel relay to the splice pump (bulk, slow reader)
    sockmap_refused: int = 0            # the relay could not take them (a leg already closing, map full)
    origins_unknown: int = 0            # stateful: new connections whose stream origins were not read (no anchor)
    pairings_late: int = 0              # stateful: relayed before their pairing was on the sync link (not continuable)


@dataclass
class RttStatus:
    """Heartbeat round trips over the sync link (the last 100), in milliseconds."""

    last: float
    min: float
    max: float
    median: float
    count: int


@dataclass
class LinkStatus:
    state: str                   # connecting | connected | refused | starting (no link yet)
    refused_reason: str | None
    peer: str
    dialled_by: str | None
    silent_for: float | None     # seconds since the peer was last heard
    counters: dict[str, int]
    rtt_ms: RttStatus | None
    unauthenticated: int = 0            # connections waiting for their hello now (bounded)
    unauthenticated_peak: int = 0
    unauthenticated_buffered: int = 0   # bytes buffered for them
    #: why the peer's process, alive, is not connected: kind unauthenticated | misconfigured
    peer_refusal: PeerRefusal | None = field(default=None, metadata=OPTIONAL)
    #: this node's dials of peer.link (issue 9.7): what it dials, how many failed, why the last one did
    dial: str | None = field(default=None, metadata=OPTIONAL)
    dial_failures: int = 0
    last_dial_error: str | None = field(default=None, metadata=OPTIONAL)
    #: what is wrong with peer.link, with what to change (dials failing for seconds, or the peer listens
    #: elsewhere and the link works only while it dials)
    dial_problem: str | None = field(default=None, metadata=OPTIONAL)


@dataclass
class PeerRefusal:
    kind: str
    reason: str
    ago: float


@dataclass
class AddressStatus:
    owner: str
    role: str | None
    held_by: str                 # a node name, "nobody", or "<peer>?" (not known: link down)


@dataclass
class ProbeStatus:
    """The UDP liveness probe's responder on this node's service address."""

    answered: int
    rejected: int
    unauthenticated: int = 0            # probes that named this pair but failed authentication
    unauthenticated_answered: int = 0   # ... answered "I am here but cannot authenticate you"
    rate_limited: int = 0


@dataclass
class DetectorStatus:
    """The failure detector: its state, why, and how many facts of each kind the heartbeat process sent."""

    state: str
    reason: str | None
    misconfigured: str | None           # the peer answers but cannot be authenticated: what to change
    facts: dict[str, int]               # path_up | path_silent | quiet | silent | heard | unauthenticated


@dataclass
class Percentiles:
    """p50/p99/max of a series in milliseconds (the last minute), and how many values."""

    p50: float
    p99: float
    max: float
    count: int


@dataclass
class HeartbeatPath:
    """One heartbeat path (sync or service network) as the heartbeat process sees it."""

    up: bool                            # fresh heartbeats from the peer within dead_after
    silent_for_ms: float | None         # since the last fresh one (None: never)
    received: int                       # fresh and authenticated
    sent: int
    send_errors: int                    # e.g. the own service address not up (claiming, handed over)
    rejected: int                       # malformed, reflected, another path, not authenticated
    stale: int                          # authenticated, echoing no fresh nonce of ours (start, replay)
    old_seq: int                        # authenticated duplicates or replays while the path is up
    unauthenticated: int                # the peer's process with another key or mode
    gap_ms: Percentiles | None          # time between fresh heartbeats
    jitter_ms: Percentiles | None       # |gap - heartbeat|
    max_gap_ever_ms: float              # since the process started
    last_send_error: str | None = field(default=None, metadata=OPTIONAL)


@dataclass
class HeartbeatStatus:
    """The heartbeat process (proxy.heartbeat): its scheduling, and per path what it sees."""

    pid: int | None
    realtime: bool                      # SCHED_FIFO
    memory_locked: bool                 # mlockall
    paused: bool                        # not sending: the node stopped, or its loop stopped writing to it
    pauses: int
    paths: dict[str, HeartbeatPath]
    send_late_ms: Percentiles | None    # how late each send was against its schedule
    max_send_late_ever_ms: float | None
    own_stalls: int = 0                 # times the process woke a heartbeat or more late (not the peer's silence)
    max_own_stall_ms: float = 0.0
    realtime_problem: str | None = field(default=None, metadata=OPTIONAL)  # why not SCHED_FIFO
    memory_problem: str | None = field(default=None, metadata=OPTIONAL)    # why not mlockall
    failed: str | None = field(default=None, metadata=OPTIONAL)


@dataclass
class Behind:
    frames: int
    bytes: int
    ms: float | None


@dataclass
class Difference:
    """The standby's view of the peer's address against the peer's snapshot: the first few client
    endpoints of each kind (``counts`` says how many there were: status stays small)."""

    only_at_peer: list[str]
    only_here: list[str]
    different: list[str]
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class SnooperStats:
    view: str                    # own_address | peer_address | peer_backend
    frames: int = 0
    address: str | None = field(default=None, metadata=OPTIONAL)  # the service address the view covers
    frames_to: int = 0           # frames whose IPv4 destination is that address
    frames_from: int = 0         # ... whose source is it
    bytes: int = 0
    batches: int = 0
    truncated: int = 0
    callback_errors: int = 0
    kernel_packets: int = 0
    kernel_drops: int = 0
    rcvbuf: int = 0
    path: str = "recv"           # how frames are read: "ring" (TPACKET_V3, mmap) or "recv" (the fallback)
    ring_bytes: int = 0          # the ring's size (0 on recv)
    # what the view's TCP tracker refused (issue 8: a spoofer's segments change nothing and are counted):
    # segments outside the receiver's window, RSTs in the window but not exact (a real receiver would
    # send a challenge ACK) or outside it, SYNs on a live connection
    out_of_window: int = 0
    rst_challenged: int = 0
    rst_out_of_window: int = 0
    syn_challenged: int = 0

    @property
    def segments_refused(self) -> dict[str, int]:
        """The counters above by name (``SEGMENT_REFUSALS``): what status and metrics show."""
        return {reason: getattr(self, reason) for reason in SEGMENT_REFUSALS}


#: the TCP tracker's counters of segments it refused, as SnooperStats carries them
SEGMENT_REFUSALS = ("out_of_window", "rst_challenged", "rst_out_of_window", "syn_challenged")


@dataclass
class StateSync:
    """Stateful pairs: does this node's view of the peer's address agree with the peer's own?"""

    in_sync: bool | None         # None: not compared yet
    compared: int
    matches: int
    mismatches_in_a_row: int
    behind: Behind | None
    snapshots_requested: int
    last_difference: Difference | None
    observer: str                # starting | running | why it failed
    snoopers: list[SnooperStats]
    observer_timeouts: int = 0   # observer requests that got no answer within their bound
    #: what this node sees of the peer's traffic (judged while the peer has traffic): unknown | both |
    #: to_peer | from_peer | nothing; ``sight_detail`` says it in a sentence (issue 9.9)
    sight: str = "unknown"
    sight_detail: str | None = field(default=None, metadata=OPTIONAL)
    peer_connections: int | None = field(default=None, metadata=OPTIONAL)  # the peer's last digest says
    continuation: ContinuationSummary | None = field(default=None, metadata=OPTIONAL)  # issue 10
    #: connections dropped from the view of the peer's address: gone at the owner (its snapshot), or
    #: the dead peer's (at a takeover, at its restart)
    forgotten: int = 0


_takeover_numbers = itertools.count(1)


@dataclass
class Takeover:
    """The timing of one takeover as it happens (trio clock seconds; None: not yet). The node keeps
    the last few; ``number`` counts every takeover of this process (a Prometheus counter must not
    shrink when old records are dropped)."""

    address: str
    last_heard_at: float | None
    detected_at: float
    wall_time: float
    address_up_at: float | None = None
    first_client_at: float | None = None
    released_at: float | None = None
    resets: int = 0
    backend_resets: int = 0
    resume: list | None = None  # stateful: the resume report (ResumeRecord dicts) as it stood at the hand-back
    number: int = field(default_factory=lambda: next(_takeover_numbers))
    #: stateful: per connection of the peer, continued or reset and why (ContinuationRecord dicts)
    connections: list = field(default_factory=list)
    #: stateful: when the first (the busiest) and the last continued connection went live
    first_continued_at: float | None = None
    all_continued_at: float | None = None
    #: stateful: new clients' SYNs of the outage handed to this node's kernel (proxy.synlog)
    syns_answered: int = 0
    #: every connection of the peer continued or reset (stateless: the address up; nothing to decide)
    settled_at: float | None = None
    #: how long each step of the takeover sequence took up to the address (proxy.takeover: plan,
    #: restore_first, address, live_first), ms
    phases_ms: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return to_json(self.report())

    def report(self) -> "TakeoverReport":
        def ms(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else round((b - a) * 1000, 1)

        return TakeoverReport(
            number=self.number,
            address=self.address,
            when=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.wall_time)),
            silence_ms=ms(self.last_heard_at, self.detected_at),
            address_moved_ms=ms(self.detected_at, self.address_up_at),
            first_client_ms=ms(self.detected_at, self.first_client_at),
            held_for_s=None if self.released_at is None else round(self.released_at - self.detected_at, 3),
            clients_reset=self.resets,
            backend_connections_reset=self.backend_resets,
            connections_continued=sum(1 for c in self.connections if c.get("continued")),
            first_continued_ms=ms(self.detected_at, self.first_continued_at),
            all_continued_ms=ms(self.detected_at, self.all_continued_at),
            syns_answered=self.syns_answered,
            settled_ms=ms(self.detected_at, self.settled_at),
            phases_ms=dict(self.phases_ms),
            connections=[from_json(ContinuationRecord, c, strict=False) for c in self.connections[:200]],
        )


@dataclass
class TakeoverReport:
    """A takeover as status shows it: milliseconds from the death verdict (None: not (yet) happened)."""

    number: int
    address: str
    when: str
    silence_ms: float | None         # peer last heard -> declared dead
    address_moved_ms: float | None   # declared dead -> address served here
    first_client_ms: float | None    # declared dead -> first client accepted
    held_for_s: float | None         # declared dead -> handed back
    clients_reset: int
    backend_connections_reset: int
    connections_continued: int = 0   # stateful: continued with TCP_REPAIR (issue 10)
    first_continued_ms: float | None = None  # declared dead -> the first (busiest) continued connection live
    all_continued_ms: float | None = None    # declared dead -> the last continued connection live
    syns_answered: int = 0  # stateful: new clients' SYNs seen during the outage, answered at the takeover
    #: declared dead -> every connection of the peer continued or reset, the counts above final
    #: (None: still deciding; stateless: the address up)
    settled_ms: float | None = None
    connections: list[ContinuationRecord] = field(default_factory=list)  # per connection (the first 200)
    #: declared dead -> address up, step by step (ms): the verdict's way to the takeover (verdict), what
    #: the standby knew (plan), the busiest
    #: connections restored (restore_first), the address and its listeners (address), those live (live_first)
    phases_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class ContinuationRecord:
    """One connection of the dead peer at a stateful takeover: continued, or reset and why."""

    client: str | None
    continued: bool
    reason: str | None          # why not continued (None when continued)
    pending: list[int] | None   # bytes put back: [to the server, to the client]
    #: the peer had relayed nothing of it: its backend was connected anew (ContinuationBook._fresh)
    fresh: bool = False
    #: the peer's pairing of it never arrived: the frames named its backend leg (ContinuationBook._infer)
    inferred: bool = False


@dataclass
class ContinuationSummary:
    """Stateful, while standing by: how many of the peer's connections a takeover would continue now."""

    connections: int
    continuable: int
    not_continuable: dict[str, int]   # reason -> how many
    bytes_kept: int                   # the standby's buffers of bytes not yet acknowledged
    pairings: int                     # connections the peer told about (legs paired, options)
    observer_rss: int | None = None   # bytes: the observer's resident memory (all it keeps of both addresses)
    #: of the continuable, those the peer never told about, paired from the frames alone (their pairing is late)
    inferred: int = 0


@dataclass
class SessionRef:
    session_id: int
    user: str | None


@dataclass
class OpenRef:
    path: str | None
    durable: bool


@dataclass
class ResumeBefore:
    connections: int
    sessions: list[SessionRef]
    opens: list[OpenRef]
    nfs_v4_opens: list[str | None]


@dataclass
class SessionResumed:
    old_session_id: int
    new_session_id: int


@dataclass
class Reopened:
    path: str | None
    durable_reconnect: bool


@dataclass
class ResumeRecord:
    """After a stateful takeover, per client of the dead peer: what it had, what it re-established."""

    client: str
    protocols: list[str]
    before: ResumeBefore
    reconnected_after_s: float | None
    resumed_sessions: list[SessionResumed]
    new_sessions: int
    reopened: list[Reopened]
    nfs_reclaims: list[str]
    lost_opens: list[OpenRef]
    verdict: str


@dataclass
class TakeoverFailure:
    """The peer is dead but its address could not be served yet (a kernel error); retried with backoff."""

    error: str
    attempts: int


@dataclass
class OwnAddressStuck:
    """The own address has not been served (claiming or yielded) for longer than a start-up or a
    hand-back takes: for how long, and why, with what to change (issue 9.7)."""

    role: str
    for_s: float
    reason: str


@dataclass
class MoveRecord:
    """One live move of an address with its connections (issue 11: ``handover``), as this node saw it."""

    address: str
    direction: str                  # out: this node gave it to the peer | in: this node took it
    move_id: int
    started_at: float               # wall clock (time.time())
    connections: int                # the address's connections when the move began (out) / sent (in)
    moved: int                      # moved live
    failed: int                     # cut (fell back to a reset), each named in failures
    failures: list[str]
    state_bytes: int                # socket state sent (queues included)
    pause_ms: float | None          # out: pumps stopped -> commit sent; in: commit received -> all live
    freeze_to_live_ms: float | None  # in: the giver's freeze -> live here (the two nodes' wall clocks)
    finished: bool
    #: moved | thawed (called off after the freeze: the connections stayed with the giver) | given_up
    outcome: str | None = field(default=None, metadata=OPTIONAL)
    thawed: int = field(default=0, metadata=OPTIONAL)        # out, called off: connections kept here
    phases_ms: dict[str, float] | None = field(default=None, metadata=OPTIONAL)  # each phase's time, in order
    lock_drops: int | None = field(default=None, metadata=OPTIONAL)  # out: segments the move lock dropped
    #: out, moved: ARP packets for the address dropped after the go (the giver kept the address while the
    #: peer announced it); None if the silence could not be set
    arp_drops: int | None = field(default=None, metadata=OPTIONAL)
    loop_lag_ms: float | None = field(default=None, metadata=OPTIONAL)  # the event loop's longest stretch
    #: segments the move lock dropped that were delivered from its copies (out: passed on or, thawed,
    #: delivered here; in: delivered here), so no client waited for its retransmission timer
    segments_passed: int | None = field(default=None, metadata=OPTIONAL)
    #: of those, new clients' SYNs the lock held from its preparation on (answered by the address's holder
    #: after the move instead of reset by the giver, which had no listener any more)
    syns_passed: int | None = field(default=None, metadata=OPTIONAL)


@dataclass
class PairStatus:
    mode: str
    peer: str
    peer_state: str               # the failure detector: unknown | alive | suspect | link_down | dead
    addresses: dict[str, AddressStatus]
    link: LinkStatus
    peer_services: list[ServiceStatus]   # the peer's services while this node holds its address
    takeovers: list[TakeoverReport]      # the last few
    takeovers_total: int                 # every takeover since this node started
    probe: ProbeStatus
    state_sync: StateSync | None = field(default=None, metadata=OPTIONAL)  # stateful pairs only
    #: stateful: live while holding the peer's address, else as it stood at the last hand-back
    resume: list[ResumeRecord] | None = field(default=None, metadata=OPTIONAL)
    takeover_error: TakeoverFailure | None = field(default=None, metadata=OPTIONAL)
    detector: DetectorStatus | None = field(default=None, metadata=OPTIONAL)
    heartbeat: HeartbeatStatus | None = field(default=None, metadata=OPTIONAL)
    own_address_stuck: OwnAddressStuck | None = field(default=None, metadata=OPTIONAL)
    #: the peer's hello names an own address that is not [peer] address here: what to change
    address_mismatch: str | None = field(default=None, metadata=OPTIONAL)
    #: live moves (issue 11): the address being moved now, and the last move
    move_in_progress: str | None = field(default=None, metadata=OPTIONAL)
    last_move: MoveRecord | None = field(default=None, metadata=OPTIONAL)


@dataclass
class BytePathStatus:
    """How this node moves connections' bytes (``[node] byte_path``, proxy.sockmap)."""

    configured: str          # auto | sockmap | splice
    path: str                # what new connections use: sockmap | splice
    reason: str | None       # why splice where sockmap was possible to ask for (e.g. no CAP_BPF)
    relayed_sockets: int     # sockets in the kernel relay's map now (two per connection)
    handed_to_splice: int    # connections the relay handed to the splice pump so far


@dataclass
class NodeStatus(Tables):
    """``pairproxy status --json``."""

    node: str
    pid: int
    state: str
    interface: str
    mac: str
    address: str
    uptime: float
    tasks: int
    services: list[ServiceStatus]
    pair: PairStatus | None = field(default=None, metadata=OPTIONAL)  # only in a pair
    byte_path: BytePathStatus | None = field(default=None, metadata=OPTIONAL)


@dataclass
class CaptureInfo:
    file: str
    packets: int
    first_ts: float | None
    last_ts: float | None
    stopped_at: float | None
    error: str | None


@dataclass
class ReplayReport(Tables):
    """``pairproxy replay --json``: the tables of :class:`Tables`, and what was read."""

    capture: CaptureInfo


# ------------------------------------------------------------------------------------ assembly
