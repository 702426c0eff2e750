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
direction *hunts*: it scans for a position that looks like the start of a record -- a mark of sane
length, then either a CALL with ``rpcvers == 2`` and a program we know, or a REPLY to an XID we
are waiting for -- and resumes there. A gap that ends inside the current fragment keeps sync: the
damaged record is dropped, and the next mark is exactly where we expected it.

Why a hand-written XDR reader and not construct: XDR is a run of 4-byte words with unions,
optional lists and variable opaques; a cursor with ``u32()``/``opaque()`` mirrors the RFC's XDR
text line by line, and it is fast on small messages. Any short read raises :class:`XdrError`,
which the decoders turn into an event, never into an exception out of ``feed``.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass, field

from .events import ProtocolError
from .nfs import PROGRAMS
from .xdr import _U32, MAX_RECORD, Program, Xdr, XdrError, XdrShort  # re-exported: protocols.rpc.Xdr etc.

__all__ = [
    "Xdr", "XdrError", "XdrShort", "AuthNone", "AuthSys", "AuthOther", "RpcCall", "RpcReply", "RpcDecoder",
    "MAX_RECORD", "Program",
]

MAX_OUTSTANDING = 4096
"""Calls remembered per connection while waiting for their reply; the oldest are dropped first."""

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
    """Record-marking state of one direction of the connection."""

    __slots__ = ("buf", "frags", "frag_left", "record_len", "last", "damaged", "hunting", "offset")

    def __init__(self) -> None:
        self.buf = bytearray()      # bytes not yet consumed
        self.frags: list[bytes] = []  # fragments of the record being assembled
        self.frag_left = 0          # bytes of the current fragment still to come (0: expect a mark)
        self.record_len = 0
        self.last = False           # the current fragment is the last of its record
        self.damaged = False        # a gap hit the current record: drop it when complete
        self.hunting = False
        self.offset = 0             # stream offset of buf[0]


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
        self.errors = 0

    # -------------------------------------------------------------- public interface
    @property
    def unsynchronised(self) -> bool:
        """True while either direction is hunting for a record boundary."""
        return self._dirs[True].hunting or self._dirs[False].hunting

    def outstanding(self, from_client: bool = True) -> int:
        """How many calls sent in that direction wait for a reply."""
        return len(self._outstanding[from_client])

    def feed(self, from_client: bool, data: bytes) -> list[object]:
        d = self._dirs[from_client]
        d.buf += data
        events: list[object] = []
        try:
            self._run(from_client, d, events)
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
            d.buf.clear()
            return events
        # whatever is buffered comes before the gap: consume it first
        self._run(from_client, d, events)
        if not d.hunting and d.frag_left and len(d.buf) < d.frag_left and len(d.buf) + length <= d.frag_left:
            # the gap ends inside the current fragment: fill the hole, keep the boundary
            filled = len(d.buf) + length
            d.frag_left -= filled
            d.offset += filled
            d.buf.clear()
            d.damaged = True
            d.frags.clear()
            return events
        self._lose_sync(d)
        d.offset += len(d.buf) + length
        d.buf.clear()
        return events

    # -------------------------------------------------------------- record marking
    def _lose_sync(self, d: _Direction) -> None:
        d.hunting = True
        d.frags.clear()
        d.frag_left = 0
        d.record_len = 0
        d.damaged = False

    def _consume(self, d: _Direction, n: int) -> bytes:
        chunk = bytes(d.buf[:n])
        del d.buf[:n]
        d.offset += n
        return chunk

    def _run(self, from_client: bool, d: _Direction, events: list[object]) -> None:
        while True:
            if d.hunting and not self._hunt(from_client, d):
                return
            if d.frag_left == 0:
                if len(d.buf) < 4:
                    return
                mark = _U32.unpack_from(d.buf, 0)[0]
                d.last = bool(mark >> 31)
                n = mark & 0x7FFFFFFF
                if d.record_len + n > self.max_record:
                    events.append(ProtocolError(
                        f"RPC record of {d.record_len + n}+ bytes exceeds {self.max_record}", d.offset))
                    self.errors += 1
                    self._lose_sync(d)
                    self._consume(d, 1)
                    continue
                self._consume(d, 4)
                d.record_len += n
                d.frag_left = n
                if n == 0:
                    if d.last:
                        self._record_done(from_client, d, events)
                    continue
            take = min(d.frag_left, len(d.buf))
            if take == 0:
                return
            chunk = self._consume(d, take)
            if not d.damaged:
                d.frags.append(chunk)
            d.frag_left -= take
            if d.frag_left == 0 and d.last:
                self._record_done(from_client, d, events)

    def _record_done(self, from_client: bool, d: _Direction, events: list[object]) -> None:
        record = b"".join(d.frags)
        damaged = d.damaged
        start = d.offset - len(record) - 4
        d.frags.clear()
        d.record_len = 0
        d.damaged = False
        if damaged:
            return
        if not record:
            return  # an empty record (only zero-length fragments): nothing to decode
        ev = self._message(from_client, record)
        if isinstance(ev, ProtocolError):
            events.append(ProtocolError(ev.what, start))
            self.errors += 1
            self._lose_sync(d)
        else:
            events.append(ev)

    def _hunt(self, from_client: bool, d: _Direction) -> bool:
        """Find a plausible record start in ``d.buf``; drop the bytes before it. True if found."""
        buf = d.buf
        i = 0
        limit = len(buf) - 16
        while i <= limit:
            ok = self._plausible(from_client, buf, i)
            if ok is None:  # need more data to decide
                break
            if ok:
                self._consume(d, i)
                d.hunting = False
                return True
            i += 1
        drop = max(0, min(i, len(buf) - _HUNT_KEEP))
        if drop:
            self._consume(d, drop)
        return False

    def _plausible(self, from_client: bool, buf: bytearray, i: int) -> bool | None:
        mark, xid, mtype = struct.unpack_from(">III", buf, i)
        n = mark & 0x7FFFFFFF
        if n < 12 or n > self.max_record:
            return False
        if mtype == REPLY:
            if xid not in self._outstanding[not from_client]:
                return False
            reply_stat = _U32.unpack_from(buf, i + 12)[0]
            return reply_stat in (0, 1)
        if mtype != CALL:
            return False
        if len(buf) - i < 28:
            return None
        rpcvers, prog, vers = struct.unpack_from(">III", buf, i + 12)
        if rpcvers != 2 or prog not in self._known_progs or (prog, vers) not in self.programs:
            return False
        # the header must parse up to the end of the verifier, within the fragment
        end = min(len(buf), i + 4 + n)
        x = Xdr(memoryview(buf)[i + 4:end])
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
    def _message(self, from_client: bool, record: bytes) -> RpcCall | RpcReply | ProtocolError:
        x = Xdr(record)
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
        pending = self._outstanding[from_client]
        pending[xid] = call
        pending.move_to_end(xid)
        while len(pending) > MAX_OUTSTANDING:
            pending.popitem(last=False)
        return call

    def _reply(self, from_client: bool, xid: int, x: Xdr) -> RpcReply | ProtocolError:
        call = self._outstanding[not from_client].pop(xid, None)
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
