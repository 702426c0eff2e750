"""ONC RPC over TCP (RFC 5531): record marking, call/reply headers, AUTH_SYS, XID matching.

Sans-I/O, like h11: :class:`RpcDecoder` takes the in-order bytes of each direction of one TCP
connection and returns events (:class:`RpcCall`, :class:`RpcReply`, :class:`ProtocolError`). It
never raises on input from the wire.

Theory of operation
-------------------
Each direction is a sequence of *records*; a record is one or more *fragments*, each preceded by
a 4-byte big-endian mark (high bit: last fragment of the record; low 31 bits: fragment length).
A complete record is one RPC message. Calls are remembered by XID (bounded), because a reply
carries only the XID: its body can only be decoded if we know which program, version and
procedure it answers. Program bodies (portmapper, MOUNT, NFS) are decoded by
:mod:`protocols.nfs`; this module only knows the RPC envelope.

Losing sync
-----------
A direction loses record sync when a fragment is absurd (larger than :data:`MAX_RECORD`), when a
record's RPC header does not parse, or when a capture gap swallows a fragment boundary. Then the
direction *hunts*: it searches (``bytearray.find``, not a trial decode at every byte) for the bytes a
record header has after its mark and XID -- ``msg_type 0, rpcvers 2`` for a CALL, ``msg_type 1,
reply_stat 0|1`` for a REPLY -- and checks each candidate cheaply: a mark of sane length, then a CALL
to a program we know whose credentials parse within the fragment, or a REPLY to an XID we are waiting
for. It resumes there; the candidate's record is decoded once, by the normal path. A gap that ends
inside the current fragment keeps sync: the damaged record is dropped (unless the lost bytes were
bulk payload it skips anyway), and the next mark is exactly where we expected it.

Bulk records
------------
READ replies and WRITE calls carry up to a megabyte of file data that nobody here needs. A record of
one fragment longer than :data:`BULK_THRESHOLD` is decoded from its first :data:`PEEK` bytes with a
:class:`SparseXdr`, which crosses an opaque by its length without the bytes: if the message needs
nothing after the data (NFSv3 WRITE/READ, NFSv4 READ) its event is out at once and the rest of the
record is skipped as it streams by; if it needs bytes after the data (an NFSv4 COMPOUND with a GETATTR
after its WRITE) only those are kept. File data is never copied, and memory per direction stays at
the head plus that tail.

Why a hand-written XDR reader and not construct: XDR is a run of 4-byte words with unions,
optional lists and variable opaques; a cursor with ``u32()``/``opaque()`` mirrors the RFC's XDR
text line by line, and it is fast on small messages. Any short read raises :class:`XdrError`,
which the decoders turn into an event, never into an exception out of ``feed``.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass, field, replace

from .events import ProtocolError
from .nfs import PROGRAMS
from .xdr import _U32, MAX_RECORD, Program, Xdr, XdrError, XdrShort  # re-exported: protocols.rpc.Xdr etc.

__all__ = [
    "Xdr", "XdrError", "XdrShort", "AuthNone", "AuthSys", "AuthOther", "RpcCall", "RpcReply", "RpcDecoder",
    "MAX_RECORD", "Program",
]

MAX_OUTSTANDING = 4096
"""Calls remembered per connection while waiting for their reply; the oldest are dropped first."""

MAX_EARLY = 256
"""Replies remembered per connection whose call was not seen (yet); the oldest are dropped first."""

MAX_EARLY_BYTES = 1 << 20
"""Bound of the bytes of those replies kept to decode them once their call comes."""

CALL, REPLY = 0, 1
AUTH_NONE, AUTH_SYS = 0, 1
_MAX_AUTH_BODY = 400
_HUNT_KEEP = 64  # bytes kept at the end of a hunting buffer: enough for a record mark + RPC header


# ---------------------------------------------------------------------------- credentials


@dataclass(frozen=True)
class AuthNone:
    """AUTH_NONE (flavor 0): no identity (NULL pings, portmapper)."""

    flavor: int = AUTH_NONE


@dataclass(frozen=True)
class AuthSys:
    """AUTH_SYS (flavor 1, RFC 5531 appendix A): what the client claims to be."""

    stamp: int
    machine: str
    uid: int
    gid: int
    gids: tuple[int, ...] = ()
    flavor: int = AUTH_SYS


@dataclass(frozen=True)
class AuthOther:
    """Any other flavor (RPCSEC_GSS = 6, ...): kept opaque."""

    flavor: int
    body: bytes = b""


Auth = AuthNone | AuthSys | AuthOther


def _auth(x: Xdr) -> Auth:
    flavor = x.u32()
    body = x.opaque(_MAX_AUTH_BODY)
    if flavor == AUTH_NONE:
        return AuthNone()
    if flavor == AUTH_SYS:
        b = Xdr(body)
        stamp = b.u32()
        machine = b.string(255)
        uid, gid = b.u32(), b.u32()
        gids = tuple(b.array(Xdr.u32, 16))
        return AuthSys(stamp, machine, uid, gid, gids)
    return AuthOther(flavor, body)


# ---------------------------------------------------------------------------- events


@dataclass(frozen=True)
class RpcCall:
    """One RPC CALL message.

    ``name`` is ``"PROGRAM.PROC"`` (``"NFSv3.LOOKUP"``, ``"MOUNT.MNT"``, ``"NFSv4.COMPOUND"``) or
    ``"prog/vers/proc"`` numbers for programs we do not know. ``args`` is the decoded body (a dict,
    see :mod:`protocols.nfs`), or None for unknown programs; ``error`` says why decoding the body
    stopped early (the RPC stream itself stays in sync: the record boundary is known).
    """

    from_client: bool
    xid: int
    prog: int
    vers: int
    proc: int
    name: str
    cred: Auth
    args: dict | None = field(default=None, compare=True)
    error: str | None = None


@dataclass(frozen=True)
class RpcReply:
    """One RPC REPLY message.

    ``call`` is the call it answers, if we saw it (after a gap we may not have). ``status`` is
    ``"SUCCESS"`` or the RPC-level failure (``"PROG_UNAVAIL"``, ``"AUTH_ERROR:1"``, ...);
    ``accepted`` is False for MSG_DENIED. ``result`` is the decoded body (a dict) for a successful
    reply to a known call and program.
    """

    from_client: bool
    xid: int
    call: RpcCall | None
    accepted: bool
    status: str
    result: dict | None = None
    error: str | None = None

    @property
    def name(self) -> str | None:
        return self.call.name if self.call is not None else None


# ---------------------------------------------------------------------------- programs


_ACCEPT_STAT = {0: "SUCCESS", 1: "PROG_UNAVAIL", 2: "PROG_MISMATCH", 3: "PROC_UNAVAIL",
                4: "GARBAGE_ARGS", 5: "SYSTEM_ERR"}


class _Direction:
    """Record-marking state of one direction of the connection.

    Positions: ``offset`` is the stream offset of the next byte not yet consumed; ``got`` counts the
    payload bytes of the current record seen so far (marks excluded). ``rec`` holds the record's bytes,
    except those a bulk record skips (see :meth:`RpcDecoder._probe`): with ``hole_at`` set, ``rec`` is
    the head (``rec[:hole_at]``) then the bytes from record position ``keep_from`` on.
    """

    __slots__ = ("buf", "rec", "frag_left", "record_len", "last", "damaged", "hunting", "offset", "got",
                 "rec_start", "total", "candidate", "probed", "emitted", "keep_from", "hole_at")

    def __init__(self) -> None:
        self.buf = bytearray()      # only a split record mark, or the bytes searched while hunting
        self.frag_left = 0          # bytes of the current fragment still to come (0: expect a mark)
        self.hunting = False
        self.offset = 0             # stream offset of the next byte to consume
        self.new_record()

    def new_record(self) -> None:
        self.rec = bytearray()
        self.record_len = 0
        self.last = False           # the current fragment is the last of its record
        self.damaged = False        # a gap hit the kept part of the current record: drop it when complete
        self.got = 0
        self.rec_start = self.offset
        self.total = 0              # the record's length when it is one fragment
        self.candidate = False      # one fragment over BULK_THRESHOLD: probe its head once PEEK bytes are in
        self.probed = False
        self.emitted = False        # decoded from its head; the rest is skipped
        self.keep_from = 0          # record bytes before this position (after the head) are not kept
        self.hole_at = None         # len(head) when a hole was skipped, else None


BULK_THRESHOLD = 64 * 1024
"""Records longer than this (one fragment) are decoded from their head; bulk payload is skipped."""
PEEK = 4096
"""Bytes of a bulk record's head decoded before deciding what to skip (RPC header, AUTH_SYS
credentials, an NFSv4 SEQUENCE/PUTFH/WRITE prefix fit easily)."""

# Resync patterns (RFC 5531): after mark(4) and xid(4), a CALL is msg_type 0 then rpcvers 2; a REPLY is
# msg_type 1 then reply_stat 0 (MSG_ACCEPTED) or 1 (MSG_DENIED), i.e. seven zero-or-one-ending bytes.
_CALL_PATTERN = b"\0\0\0\0\0\0\0\x02"
_REPLY_PATTERN = b"\0\0\0\x01\0\0\0"


class _Missing(Exception):
    """A read of record bytes that were skipped (or not yet seen); not an XdrError, so that the
    program decoders do not turn it into a partial result."""

    def __init__(self, pos: int) -> None:
        super().__init__(pos)
        self.pos = pos


class SparseXdr(Xdr):
    """An XDR cursor over a record of ``total`` bytes of which only a head and, from ``tail_at`` on,
    a tail are held. :meth:`skip_opaque` crosses the gap between them by length (bulk READ/WRITE
    data is never copied); any other read there raises :class:`_Missing` with its position."""

    __slots__ = ("total", "head_len", "tail", "tail_at")

    def __init__(self, head: bytes | memoryview, total: int, tail: bytes | memoryview = b"",
                 tail_at: int | None = None) -> None:
        super().__init__(head)
        self.total = total
        self.head_len = len(self.buf)
        self.tail = memoryview(tail)
        self.tail_at = total if tail_at is None else tail_at

    @property
    def remaining(self) -> int:
        return self.total - self.pos

    def _take(self, n: int) -> memoryview:
        pos = self.pos
        end = pos + n
        if n < 0 or end > self.total:
            raise XdrShort(f"short data: need {n} bytes at {pos}, have {self.total - pos}")
        if end <= self.head_len:
            v = self.buf[pos:end]
        elif pos >= self.tail_at and end - self.tail_at <= len(self.tail):
            v = self.tail[pos - self.tail_at:end - self.tail_at]
        else:
            raise _Missing(pos)
        self.pos = end
        return v

    def skip_opaque(self, limit: int = MAX_RECORD) -> int:
        n = self.u32()
        if n > limit:
            raise XdrError(f"opaque of {n} bytes exceeds {limit}")
        end = self.pos + n + (-n) % 4
        if end > self.total:
            raise XdrShort(f"short data: opaque of {n} bytes at {self.pos}, have {self.total - self.pos}")
        self.pos = end
        return n


class RpcDecoder:
    """ONC RPC decoder for one TCP connection (an ``AppDecoder``). See the module docstring.

    ``programs`` maps ``(prog, vers)`` to a :class:`Program`; by default portmapper, MOUNT v3,
    NFSv3 and NFSv4 from :mod:`protocols.nfs`. ``midstream=True`` is for a connection picked up
    after its start: both directions begin by hunting for a record boundary instead of trusting
    that the first byte is a record mark.
    """

    def __init__(self, programs: dict[tuple[int, int], Program] | None = None,
                 max_record: int = MAX_RECORD, midstream: bool = False) -> None:
        if programs is None:
            programs = PROGRAMS
        self.programs = programs
        self._known_progs = {p for p, _ in programs}
        self.max_record = max_record
        self._dirs = {True: _Direction(), False: _Direction()}
        if midstream:
            for d in self._dirs.values():
                d.hunting = True
        # XIDs of calls still waiting for a reply, per direction of the call
        self._outstanding: dict[bool, OrderedDict[int, RpcCall]] = {True: OrderedDict(), False: OrderedDict()}
        #: replies whose call was not seen, by (direction of the reply, xid): the reply as decoded without
        #: it, and its record (None for a bulk one, whose payload was skipped) to decode it again with the
        #: call. Why: a standby that sees only frames to its peer gets the replies from the backend leg, in
        #: other capture batches than the calls on the client leg, so a reply may be decoded first; when
        #: its call comes, the reply follows it at once (``late_replies``) instead of the call waiting forever.
        self._early: OrderedDict[tuple[bool, int], tuple[RpcReply, bytes | None]] = OrderedDict()
        self._early_bytes = 0
        self._late: list[RpcReply] = []
        self.errors = 0
        self.counters = {"resyncs": 0, "bulk_records": 0, "skipped_bytes": 0, "late_replies": 0}

    # -------------------------------------------------------------- public interface
    @property
    def unsynchronised(self) -> bool:
        """True while either direction is hunting for a record boundary."""
        return self._dirs[True].hunting or self._dirs[False].hunting

    def outstanding(self, from_client: bool = True) -> int:
        """How many calls sent in that direction wait for a reply."""
        return len(self._outstanding[from_client])

    def feed(self, from_client: bool, data: bytes | memoryview) -> list[object]:
        """``data`` may be a view of the caller's buffer: only what a record needs is copied."""
        d = self._dirs[from_client]
        events: list[object] = []
        try:
            if d.hunting:
                d.buf += data
                rest = self._hunt(from_client, d)
                if rest is None:
                    return events
                data = rest
            elif d.buf:  # a record mark split between two segments
                d.buf += data
                data, d.buf = bytes(d.buf), bytearray()
            self._scan(from_client, d, memoryview(data), events)
        except Exception as e:  # a bug of ours must not kill the node: report, resync
            events.append(ProtocolError(f"internal decoder error: {type(e).__name__}: {e}", d.offset))
            self._lose_sync(d)
        return events

    def gap(self, from_client: bool, length: int) -> list[object]:
        d = self._dirs[from_client]
        events: list[object] = []
        if length <= 0:
            return events
        if d.hunting:
            d.offset += len(d.buf) + length
            d.buf = bytearray()
            return events
        if not d.buf and d.frag_left and length <= d.frag_left:
            # the gap ends inside the current fragment: the next mark is where we expected it; the
            # record survives if the lost bytes were bulk payload it skips anyway
            if not self._skipped(d, length):
                d.damaged = True
                d.rec = bytearray()
            d.got += length
            d.frag_left -= length
            d.offset += length
            if d.frag_left == 0 and d.last:
                self._record_done(from_client, d, events)
            return events
        self._lose_sync(d)
        d.offset += len(d.buf) + length
        d.buf = bytearray()
        return events

    # -------------------------------------------------------------- record marking
    @staticmethod
    def _skipped(d: _Direction, length: int) -> bool:
        """Would the next ``length`` bytes of the current record be skipped anyway?"""
        return d.probed and (d.emitted or (d.hole_at is not None and d.got + length <= d.keep_from))

    def _lose_sync(self, d: _Direction) -> None:
        d.hunting = True
        d.frag_left = 0
        d.new_record()

    def _scan(self, from_client: bool, d: _Direction, mv: memoryview, events: list[object]) -> None:
        """Consume ``mv`` (not hunting): record marks, and fragment bytes kept or skipped."""
        i, n = 0, len(mv)
        while i < n:
            if d.hunting:
                d.buf += mv[i:]
                rest = self._hunt(from_client, d)
                if rest is None:
                    return
                mv, i, n = memoryview(rest), 0, len(rest)
                continue
            if d.frag_left == 0:
                if n - i < 4:
                    d.buf += mv[i:]
                    return
                mark = _U32.unpack_from(mv, i)[0]
                size = mark & 0x7FFFFFFF
                if d.record_len + size > self.max_record:
                    events.append(ProtocolError(
                        f"RPC record of {d.record_len + size}+ bytes exceeds {self.max_record}", d.offset))
                    self.errors += 1
                    self._lose_sync(d)
                    continue
                if d.record_len == 0:
                    d.rec_start = d.offset
                    d.total = size
                    d.candidate = bool(mark >> 31) and size > BULK_THRESHOLD
                i += 4
                d.offset += 4
                d.last = bool(mark >> 31)
                d.record_len += size
                d.frag_left = size
                if size == 0 and d.last:
                    self._record_done(from_client, d, events)
                continue
            take = min(d.frag_left, n - i)
            chunk = mv[i:i + take]
            i += take
            if d.candidate and not d.probed and not d.damaged:
                want = PEEK - d.got
                if take >= want:
                    self._keep(d, chunk[:want])
                    self._probe(from_client, d, events)
                    chunk = chunk[want:]
            self._keep(d, chunk)
            if d.frag_left == 0 and d.last:
                self._record_done(from_client, d, events)

    @staticmethod
    def _keep(d: _Direction, chunk: memoryview) -> None:
        """Fragment bytes: into the record, unless they are bulk payload it skips."""
        n = len(chunk)
        pos = d.got
        if not d.damaged and pos + n > d.keep_from:
            a = d.keep_from - pos
            d.rec += chunk[a:] if a > 0 else chunk
        d.got = pos + n
        d.frag_left -= n
        d.offset += n

    def _probe(self, from_client: bool, d: _Direction, events: list[object]) -> None:
        """A bulk record's first PEEK bytes are in: decode them as if the record were complete, with
        opaque data skipped by length. If that needs nothing else, the message is done now and the rest
        of the record is skipped; if it needs bytes after a skipped opaque (an NFSv4 COMPOUND with ops
        after its WRITE), only the bytes from there on are kept; otherwise the record is kept whole."""
        d.probed = True
        head = bytes(d.rec)
        try:
            ev = self._message(from_client, SparseXdr(head, d.total))
        except _Missing as m:
            if m.pos >= len(head):
                d.keep_from, d.hole_at = m.pos, len(head)
                self.counters["bulk_records"] += 1
                self.counters["skipped_bytes"] += m.pos - len(head)
            return
        if isinstance(ev, ProtocolError):
            return  # decoded whole at its end, where the error gets its offset
        events.append(ev)
        self._flush_late(events)
        d.emitted = True
        d.keep_from = d.total + 1
        d.rec = bytearray()
        self.counters["bulk_records"] += 1
        self.counters["skipped_bytes"] += d.total - len(head)

    def _record_done(self, from_client: bool, d: _Direction, events: list[object]) -> None:
        rec, start, total, hole_at, keep_from = d.rec, d.rec_start, d.total, d.hole_at, d.keep_from
        skip = d.damaged or d.emitted
        d.new_record()
        if skip:
            return
        if hole_at is not None:
            mv = memoryview(rec)
            x: Xdr = SparseXdr(mv[:hole_at], total, mv[hole_at:], keep_from)
        elif rec:
            x = Xdr(rec)
        else:
            return  # an empty record (only zero-length fragments): nothing to decode
        try:
            ev = self._message(from_client, x)
        except _Missing as m:  # cannot happen: the probe decoded the same head the same way
            ev = ProtocolError(f"RPC message needs skipped bytes at {m.pos}")
        if isinstance(ev, ProtocolError):
            events.append(ProtocolError(ev.what, start))
            self.errors += 1
            self._lose_sync(d)
        else:
            events.append(ev)
            self._flush_late(events)

    def _flush_late(self, events: list[object]) -> None:
        """A call just decoded whose reply came first: the reply follows it."""
        if self._late:
            events.extend(self._late)
            self._late.clear()

    def _hunt(self, from_client: bool, d: _Direction) -> bytes | None:
        """Find a plausible record start in ``d.buf`` by searching for the byte patterns of a CALL and
        a REPLY header (a find, not a trial decode per byte) and checking each candidate cheaply.
        Found: the bytes from there (``d.buf`` emptied); else None, keeping only a short tail."""
        buf = d.buf
        c = buf.find(_CALL_PATTERN, 8)
        r = buf.find(_REPLY_PATTERN, 8)
        while c >= 0 or r >= 0:
            hit = c if r < 0 or 0 <= c < r else r
            i = hit - 8
            ok = self._plausible(from_client, buf, i)
            if ok is None:  # need more data to decide
                del buf[:i]
                d.offset += i
                return None
            if ok:
                rest = bytes(buf[i:])
                d.offset += i
                d.buf = bytearray()
                d.hunting = False
                d.new_record()
                self.counters["resyncs"] += 1
                return rest
            if hit == c:
                c = buf.find(_CALL_PATTERN, hit + 1)
            else:
                r = buf.find(_REPLY_PATTERN, hit + 1)
        drop = max(0, len(buf) - _HUNT_KEEP)
        if drop:
            del buf[:drop]
            d.offset += drop
        return None

    def _plausible(self, from_client: bool, buf: bytearray, i: int) -> bool | None:
        if len(buf) - i < 16:
            return None
        mark, xid, mtype, word = struct.unpack_from(">IIII", buf, i)
        n = mark & 0x7FFFFFFF
        if n < 12 or n > self.max_record:
            return False
        if mtype == REPLY:
            if xid not in self._outstanding[not from_client]:
                return False
            return word in (0, 1)  # reply_stat
        if mtype != CALL or word != 2:
            return False
        if len(buf) - i < 28:
            return None
        prog, vers = struct.unpack_from(">II", buf, i + 16)
        if prog not in self._known_progs or (prog, vers) not in self.programs:
            return False
        # the header must parse up to the end of the verifier, within the fragment
        end = min(len(buf), i + 4 + n)
        x = Xdr(bytes(buf[i + 4:end]))
        try:
            x.pos = 24
            _auth(x)
            _auth(x)
        except XdrShort:
            return None if end - i - 4 < n else False
        except XdrError:
            return False
        return True

    # -------------------------------------------------------------- messages
    def _message(self, from_client: bool, x: Xdr) -> RpcCall | RpcReply | ProtocolError:
        """One record's message. Raises :class:`_Missing` only for a :class:`SparseXdr`."""
        try:
            xid, mtype = x.u32(), x.u32()
            if mtype == CALL:
                return self._call(from_client, xid, x)
            if mtype == REPLY:
                return self._reply(from_client, xid, x)
            return ProtocolError(f"RPC message type {mtype} (xid {xid:#x})")
        except XdrError as e:
            return ProtocolError(f"malformed RPC header: {e}")

    def _call(self, from_client: bool, xid: int, x: Xdr) -> RpcCall | ProtocolError:
        rpcvers = x.u32()
        if rpcvers != 2:
            return ProtocolError(f"RPC version {rpcvers} (xid {xid:#x})")
        prog, vers, proc = x.u32(), x.u32(), x.u32()
        cred = _auth(x)
        _auth(x)  # verifier
        program = self.programs.get((prog, vers))
        args = error = None
        if program is None:
            name = f"{prog}/{vers}/{proc}"
        else:
            name = f"{program.name}.{program.procs.get(proc, str(proc))}"
            try:
                args = program.call(proc, x)
            except XdrError as e:
                args = getattr(e, "partial", None)
                error = str(e)
        call = RpcCall(from_client, xid, prog, vers, proc, name, cred, args, error)
        early = self._early.pop((not from_client, xid), None)
        if early is not None:  # its reply came first: it follows the call now
            self._late.append(self._late_reply(call, *early))
            return call
        pending = self._outstanding[from_client]
        pending[xid] = call
        pending.move_to_end(xid)
        while len(pending) > MAX_OUTSTANDING:
            pending.popitem(last=False)
        return call

    def _late_reply(self, call: RpcCall, reply: RpcReply, record: bytes | None) -> RpcReply:
        self.counters["late_replies"] += 1
        if record is not None:
            self._early_bytes -= len(record)
            x = Xdr(record, 8)  # past xid and message type
            try:
                return self._reply_body(reply.from_client, reply.xid, x, call)
            except XdrError:
                pass  # the call does not fit the reply's body: the reply stays as decoded without it
        return replace(reply, call=call)

    def _remember_early(self, reply: RpcReply, x: Xdr) -> None:
        record = bytes(x.buf) if type(x) is Xdr and len(x.buf) <= MAX_EARLY_BYTES else None
        key = (reply.from_client, reply.xid)
        old = self._early.pop(key, None)
        if old is not None and old[1] is not None:
            self._early_bytes -= len(old[1])
        self._early[key] = (reply, record)
        if record is not None:
            self._early_bytes += len(record)
        while len(self._early) > MAX_EARLY or self._early_bytes > MAX_EARLY_BYTES:
            _, (_, dropped) = self._early.popitem(last=False)
            if dropped is not None:
                self._early_bytes -= len(dropped)

    def _reply(self, from_client: bool, xid: int, x: Xdr) -> RpcReply | ProtocolError:
        pending = self._outstanding[not from_client]
        # the call is forgotten only once the reply is decoded: a bulk record's probe may stop short
        # (_Missing) and decode the reply again when its tail is in
        call = pending.get(xid)
        try:
            reply = self._reply_body(from_client, xid, x, call)
        except _Missing:
            raise
        except XdrError:
            pending.pop(xid, None)
            raise
        pending.pop(xid, None)
        if call is None and isinstance(reply, RpcReply):
            self._remember_early(reply, x)
        return reply

    def _reply_body(self, from_client: bool, xid: int, x: Xdr, call: RpcCall | None) -> RpcReply | ProtocolError:
        reply_stat = x.u32()
        if reply_stat == 1:  # MSG_DENIED
            reject = x.u32()
            if reject == 0:
                lo, hi = x.u32(), x.u32()
                return RpcReply(from_client, xid, call, False, f"RPC_MISMATCH:{lo}-{hi}")
            if reject == 1:
                return RpcReply(from_client, xid, call, False, f"AUTH_ERROR:{x.u32()}")
            return ProtocolError(f"RPC reject_stat {reject} (xid {xid:#x})")
        if reply_stat != 0:
            return ProtocolError(f"RPC reply_stat {reply_stat} (xid {xid:#x})")
        _auth(x)  # verifier
        accept = x.u32()
        status = _ACCEPT_STAT.get(accept)
        if status is None:
            return ProtocolError(f"RPC accept_stat {accept} (xid {xid:#x})")
        if accept == 2:
            lo, hi = x.u32(), x.u32()
            status = f"PROG_MISMATCH:{lo}-{hi}"
        result = error = None
        if accept == 0 and call is not None:
            program = self.programs.get((call.prog, call.vers))
            if program is not None:
                try:
                    result = program.reply(call.proc, call.args, x)
                except XdrError as e:
                    result = getattr(e, "partial", None)
                    error = str(e)
        return RpcReply(from_client, xid, call, True, status, result, error)
