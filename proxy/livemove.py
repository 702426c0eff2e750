"""A planned move of one service address to the peer with its live connections (issue 11).

Why: on a planned move (``pairproxy handover``, its ``--back``, the hand-back, SIGTERM) the holder is
alive and can hand the peer the exact kernel state of every proxied socket (:mod:`proxy.tcprepair`), so
no client reconnects. The decisions (when to move, which machine state follows) are in :mod:`proxy.roles`;
this module is the two sequences the node runs for :class:`~proxy.roles.MoveOut` and the arrival
(:class:`Receiver`, then :class:`~proxy.roles.MoveIn`).

Giving node (:func:`move_out`), in the order bench/TCPREPAIR.md's findings demand:

0. prepare the lock (:meth:`~proxy.movelock.MoveLock.prepare`: its table and NFLOG listener), before
   the clients' pause begins;
1. stop accepting (the listeners close; the connections go on);
2. stop the pumps of every connection without closing its sockets; bytes a pump still held in its pipe
   are kept (``Connection.spilled_to_*``) and become the end of the frozen send queue;
3. wait briefly (``drain_wait``) until nothing is in flight (:func:`~proxy.tcprepair.unacknowledged` 0 on
   every socket), so the restored sockets need nothing resent;
4. lock (:class:`~proxy.movelock.MoveLock`): from now on no segment reaches the sockets, so nothing more
   is acknowledged; the address stays;
5. freeze both legs of each connection (the backend leg's local address is the service address too);
   the event loop gets a turn every few milliseconds (heartbeats go on during a large move);
6. send ``move_begin``, the states in ``move_connections`` batches under the sync link's frame limit,
   then ``move_commit``;
7. wait (bounded: ``ready_wait``) for the peer's ``move_ready``: every connection restored there, quietly.
   Then close the frozen sockets silently, send ``move_go``, wait (bounded: ``LIVE_WAIT``) for the peer's
   ``move_live`` (address announced, sockets live), remove the address (still locked: a segment that
   finds no socket would be answered with a reset), unlock. The lock keeps a copy of every segment
   it drops (:class:`~proxy.movelock.DropLog`): they go to the peer in ``move_segments`` messages before
   ``move_go`` and after it, and the peer delivers them to its sockets once live, so a client whose
   request arrived during the lock does not wait for its retransmission timer (>= 200 ms).
   No ``move_ready`` in time, or the sync link broke: **thaw** (repair mode off with the same state, the
   held bytes written, the pumps resumed, accepting again, the address never left) and send
   ``move_abort``; each connection is reported as kept here, and the dropped segments are delivered here.

Receiving node (:class:`Receiver`, from ``move_begin`` on): restore each batch as it arrives (repair
mode: it sends nothing), answer the commit with ``move_ready``, and wait (bounded: ``go_wait``) for
``move_go``; on ``move_abort``, a broken link or no word it closes what it restored silently, so no
connection ever lives on both nodes. On ``move_go`` (:func:`move_in`): bring the address up and announce
it (the caller's ``bring_up``), let every leg go live (its timestamp clock moved ahead by the time since
the freeze: PAWS), deliver the segments the giver's lock dropped
and start the pumps.

A connection that cannot be frozen, is too large for one message, or cannot be restored falls back to
what a move without this module does: it is cut. Each such connection is named in the report's
``failures``. Each report has the time of every phase (``phases_ms``: bench/MOVES.md).
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable

import trio

from proxy import movelock, tcprepair
from proxy.continuation import relay_anchor
from proxy.movelock import MoveLock, MoveLockError
from proxy.tcprepair import TcpRepairError, TcpSocketState

log = logging.getLogger("pairproxy.livemove")

#: bytes of connection states per ``move_connections`` message (the sync link's frames are 1 MiB at most)
BATCH_BYTES = 512 * 1024
#: a connection with more state than this sends its queues ahead in ``move_part`` messages of PART_BYTES
INLINE_BYTES = 256 * 1024
PART_BYTES = 512 * 1024
#: a connection with more state than this is not moved: it is cut (4 queues at tcprepair's wire bound)
MAX_CONNECTION_BYTES = 4 * tcprepair.MAX_QUEUE
#: what a receiver buffers of ``move_part`` messages at most (beyond it, the move is given up)
MAX_PART_BUFFER = 256 * 1024 * 1024
#: how long the giver waits for in-flight bytes to be acknowledged before freezing (a client's delayed ACK
#: can take 40 ms; bytes still in flight after this are booked as sent and acknowledged to the new holder)
DRAIN_WAIT = 0.003
#: how long the giver waits for a connection's pumps to stop; how many it stops at a time
STOP_WAIT = 5.0
STOP_GROUP = 32
#: how long the giver waits for ``move_ready`` after its commit before it thaws: a base, and the peer's
#: restore time (measured at load 35 on 2 cores: 0.9 ms per connection, 50 ms per MiB of queues), doubled
READY_WAIT = 1.0
READY_PER_CONNECTION = 0.002
READY_PER_MIB = 0.1
#: how long the receiver keeps what it restored waiting for ``move_go`` (longer than READY_WAIT: a giver
#: that got ``move_ready`` just before its bound still sends ``move_go``)
GO_WAIT = 3.0
#: added to the time since the freeze when the restored sockets' timestamp clocks are moved ahead (the
#: giver's count is carried over the sync link: its transit, and millisecond rounding)
TS_MARGIN_MS = 20
#: how long the giver keeps the address (locked, its drops copied and passed on) after ``move_go`` for the
#: peer's ``move_live``: a client that sends before the peer's announcement reaches it sends to the giver
LIVE_WAIT = 0.5
#: the longest stretch of freezing or restoring without giving the event loop a turn
SLICE = 0.002
MESSAGES = ("move_begin", "move_part", "move_connections", "move_commit", "move_ready", "move_go", "move_abort",
            "move_segments", "move_live")
#: segments the lock dropped that a receiver keeps until its sockets are live (beyond: the clients resend)
MAX_SEGMENTS = 4096
QUEUES = tuple((leg, queue) for leg in ("client", "backend") for queue in ("send_queue", "recv_queue"))


@dataclass
class MoveReport:
    """One move as one node saw it (``status``: :class:`schema.records.MoveRecord`)."""

    address: str
    direction: str                 # out (this node gave it) | in (this node took it)
    move_id: int
    started_at: float              # wall clock
    connections: int = 0
    moved: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    state_bytes: int = 0
    #: out: pumps stopped -> unlocked after the go (or thawed); in: go received -> last leg live
    pause_ms: float | None = None
    #: in: the giver's first freeze -> the last leg live here (wall clocks of both nodes)
    freeze_to_live_ms: float | None = None
    finished: bool = False
    #: moved | thawed (called off: the connections stayed with the giver) | given_up (the receiver's side)
    outcome: str | None = None
    #: out, called off: connections that went on here as if nothing happened
    thawed: int = 0
    #: the time of each phase in order (see the module docstring), milliseconds
    phases_ms: dict[str, float] = field(default_factory=dict)
    #: out: client/backend segments the lock dropped during the move (each one the remote resends)
    lock_drops: int | None = None
    #: out, moved: ARP packets for the address this node dropped after the go (it kept the address
    #: while the peer announced it; answering would have been an ARP conflict); None if not silenced
    arp_drops: int | None = None
    #: the longest the event loop went without a turn during this side of the move (heartbeats wait that
    #: long: a stretch near dead_after makes the peer suspect this node)
    loop_lag_ms: float | None = None
    #: segments the lock dropped, delivered from its copies (out: passed on, or delivered here if thawed;
    #: in: delivered here)
    segments_passed: int | None = None
    #: of those, new clients' SYNs held by the lock from its preparation on (delivered to the listener of
    #: the address's holder after the move instead of being reset here: :meth:`MoveLock.prepare`)
    syns_passed: int | None = None

    def delivered(self, segments: list[bytes]) -> None:
        """Deliver segments the giver's lock dropped to this node's sockets, and count them."""
        self.segments_passed = (self.segments_passed or 0) + movelock.deliver(segments)
        self.syns_passed = (self.syns_passed or 0) + movelock.count_syns(segments)

    def fail(self, what: str, why: str) -> None:
        self.failed += 1
        if len(self.failures) < 20:
            self.failures.append(f"{what}: {why}")
        log.warning("move of %s: %s cut: %s", self.address, what, why)


class _Phases:
    """Times the phases of one move into ``report.phases_ms`` (trio's clock: MockClock in tests)."""

    def __init__(self, report: MoveReport) -> None:
        self.report = report
        self.last = trio.current_time()

    def done(self, name: str) -> None:
        now = trio.current_time()
        self.report.phases_ms[name] = round(self.report.phases_ms.get(name, 0.0) + (now - self.last) * 1000, 3)
        self.last = now


class _LagWatch:
    """Measures the event loop's longest stretch without a turn while a move runs (``loop_lag_ms``)."""

    PERIOD = 0.001

    def __init__(self, report: MoveReport) -> None:
        self.report = report
        self.worst = 0.0

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                before = time.perf_counter()
                await trio.sleep(self.PERIOD)
                self.worst = max(self.worst, time.perf_counter() - before - self.PERIOD)
        finally:
            self.report.loop_lag_ms = round(max(self.worst, (self.report.loop_lag_ms or 0.0) / 1000) * 1000, 3)


async def _watched(report: MoveReport, fn: Callable[[], Awaitable[Any]]) -> Any:
    """``await fn()`` while a :class:`_LagWatch` measures the event loop."""
    async with trio.open_nursery() as nursery:
        await nursery.start(_LagWatch(report).run)
        try:
            return await fn()
        finally:
            nursery.cancel_scope.cancel()


class _Slicer:
    """Gives the event loop a turn once per ``SLICE`` of work (a large move must not stop heartbeats)."""

    def __init__(self) -> None:
        self.since = time.perf_counter()

    async def tick(self) -> None:
        if time.perf_counter() - self.since >= SLICE:
            await trio.sleep(0)
            self.since = time.perf_counter()


def _abort(sock: socket.socket) -> None:
    """Close a leg that could not move (the reset of a move without this module)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _name(conn: Any) -> str:
    return f"{conn.client[0]}:{conn.client[1]}->:{conn.port}"


def _key(entry: dict) -> str:
    """A connection's name on the wire (its client end): what ``move_ready`` names as failed."""
    try:
        return f"{entry['client']['remote_address']}:{entry['client']['remote_port']}"
    except (KeyError, TypeError):
        return "?"


@dataclass
class _Frozen:
    proxy: Any
    conn: Any
    client: socket.socket
    backend: socket.socket
    entry: dict


async def _write_all(sock: socket.socket, data: bytes, within: float = 1.0) -> None:
    """Write bytes a stopped pump held to a live (thawed) socket; OSError if they do not go within."""
    view = memoryview(data)
    with trio.fail_after(within):
        while view:
            try:
                view = view[sock.send(view, socket.MSG_DONTWAIT):]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)


async def _thaw(service: Any, frozen: _Frozen, report: MoveReport, *, was_frozen: bool = True) -> None:
    """Go on serving a (frozen) connection here: the move was called off."""
    conn = frozen.conn
    try:
        if was_frozen:
            tcprepair.thaw(frozen.client)
            tcprepair.thaw(frozen.backend)
        await _write_all(frozen.client, conn.spilled_to_client)
        await _write_all(frozen.backend, conn.spilled_to_backend)
    except (OSError, trio.TooSlowError) as exc:
        report.fail(_name(conn), f"thaw: {exc or 'held bytes not written'}")
        _abort(frozen.client)
        _abort(frozen.backend)
        return
    try:
        service.adopt(frozen.proxy, frozen.client, frozen.backend, conn.port, peer=conn.client,
                      bytes_to_backend=conn.bytes_to_backend, bytes_to_client=conn.bytes_to_client, anchor=conn.anchor)
    except OSError as exc:  # the remote reset it meanwhile
        report.fail(_name(conn), f"thaw: ended before its pumps started: {exc}")
        _abort(frozen.client)
        _abort(frozen.backend)
        return
    report.thawed += 1


async def move_out(*, address: str, move_id: int, service: Any, remove_address: Callable[[], Awaitable[None]],
                   send: Callable[[dict], Awaitable[bool]], wait_ready: Callable[[float], Awaitable[dict | None]],
                   wait_live: Callable[[float], Awaitable[dict | None]] | None = None,
                   drain_wait: float = DRAIN_WAIT, lock: Callable[[str], Any] = MoveLock) -> MoveReport:
    """The giving node's sequence (module docstring); the report (``outcome`` moved or thawed).
    ``remove_address`` stops the address's service (it has no connections left by then) and removes the
    address; ``wait_ready(bound)`` returns the peer's ``move_ready`` message, or None (no answer within
    ``bound`` seconds, or the sync link broke); ``wait_live(bound)`` the same for ``move_live`` (None: the
    address goes right after the go)."""
    report = MoveReport(address, "out", move_id, time.time())
    return await _watched(report, lambda: _move_out(report, address, move_id, service, remove_address, send,
                                                    wait_ready, wait_live, drain_wait, lock))


async def _move_out(report: MoveReport, address: str, move_id: int, service: Any,
                    remove_address: Callable[[], Awaitable[None]], send: Callable[[dict], Awaitable[bool]],
                    wait_ready: Callable[[float], Awaitable[dict | None]],
                    wait_live: Callable[[float], Awaitable[dict | None]] | None, drain_wait: float,
                    lock: Callable[[str], Any]) -> MoveReport:
    phases = _Phases(report)
    # 0. the lock's table and its NFLOG listener, in a thread, BEFORE the pumps stop: netlink and an
    # nftables transaction from a thread that waits for the GIL behind a busy event loop took 2-61 ms
    # (measured at load 8), all of it in the clients' pause while it ran alongside the stop
    try:
        prepared = await trio.to_thread.run_sync(lock(address).prepare)
    except MoveLockError as exc:  # nothing was touched: the connections simply go on here
        log.error("move of %s not started: %s", address, exc)
        report.outcome, report.finished = "thawed", True
        return report
    phases.done("prepare_lock")
    t0 = trio.current_time()
    try:
        # 1-2
        service.stop_accepting()
        await trio.sleep(0)  # connections accepted just now register themselves
        conns = [(proxy, conn) for proxy in service.proxies for conn in list(proxy.connections)]
        with trio.move_on_after(STOP_WAIT):
            # in groups: a thousand pumps cancelled at once all run in one turn of the event loop (683 ms
            # measured at load 50, longer than dead_after); a group at a time lets heartbeats through
            for at in range(0, len(conns), STOP_GROUP):
                group = conns[at:at + STOP_GROUP]
                for _, conn in group:
                    conn.moving = True
                    conn.pumps.cancel()
                for _, conn in group:
                    await conn.ended.wait()
        report.connections = len(conns)
        handed = [(p, c) for p, c in conns if c.handed is not None]
        for _, conn in conns:
            if conn.handed is None:
                report.fail(_name(conn), "its pumps ended first (closed or reset as usual)")
        phases.done("stop")
        # 3. nothing in flight (the lock is not engaged yet: the remotes' ACKs still come in)
        with trio.move_on_after(drain_wait):
            while True:
                try:
                    if all(tcprepair.unacknowledged(s) == 0 for _, c in handed for s in c.handed):
                        break
                except OSError:
                    break
                await trio.sleep(0.0005)
        phases.done("drain")
    except BaseException:
        prepared.close()
        raise
    # 4. the lock
    try:
        held = prepared.engage()
    except MoveLockError as exc:  # nothing is frozen yet: the connections simply go on here
        log.error("move of %s not started: %s", address, exc)
        for proxy, conn in handed:
            await _thaw(service, _Frozen(proxy, conn, *conn.handed, {}), report, was_frozen=False)
        service.resume_accepting()
        report.outcome, report.finished = "thawed", True
        return report
    phases.done("lock")
    try:
        return await _freeze_and_send(report, t0, phases, address, move_id, service, handed, held, remove_address,
                                      send, wait_ready, wait_live)
    finally:
        if report.lock_drops is None:
            report.lock_drops = held.dropped()
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(held.close)  # 1-80 ms under load (measured): off the event loop


async def _freeze_and_send(report: MoveReport, t0: float, phases: _Phases, address: str, move_id: int, service: Any,
                           handed: list, held: Any, remove_address: Callable[[], Awaitable[None]],
                           send: Callable[[dict], Awaitable[bool]],
                           wait_ready: Callable[[float], Awaitable[dict | None]],
                           wait_live: Callable[[float], Awaitable[dict | None]] | None) -> MoveReport:
    # 5. freeze
    frozen_at, frozen_t = time.time(), trio.current_time()
    frozen: list[_Frozen] = []
    slicer = _Slicer()
    for proxy, conn in handed:
        client, backend = conn.handed
        try:
            cs = tcprepair.freeze(client)
            bs = tcprepair.freeze(backend)
        except TcpRepairError as exc:
            report.fail(_name(conn), f"freeze: {exc}")
            _abort(client)
            _abort(backend)
            continue
        if conn.spilled_to_client:  # bytes a stopped pump held: never sent, so the end of the send queue
            cs = replace(cs, send_queue=cs.send_queue + conn.spilled_to_client,
                         send_unsent=cs.send_unsent + len(conn.spilled_to_client))
        if conn.spilled_to_backend:
            bs = replace(bs, send_queue=bs.send_queue + conn.spilled_to_backend,
                         send_unsent=bs.send_unsent + len(conn.spilled_to_backend))
        try:
            entry = {"service": proxy.service.name, "port": conn.port, "client": cs.to_wire(), "backend": bs.to_wire(),
                     "to_backend": conn.bytes_to_backend, "to_client": conn.bytes_to_client}
        except ValueError as exc:  # a queue over the wire bound
            report.fail(_name(conn), str(exc))
            _abort(client)
            _abort(backend)
            continue
        frozen.append(_Frozen(proxy, conn, client, backend, entry))
        await slicer.tick()
    phases.done("freeze")
    # 6. send, in bounded batches
    sendable: list[_Frozen] = []
    for f in frozen:
        size = sum(len(f.entry[leg]["send_queue"]) + len(f.entry[leg]["recv_queue"]) + 512
                   for leg in ("client", "backend"))
        if size > MAX_CONNECTION_BYTES:  # cannot go: it stays here (thawed with the rest if the move fails)
            report.fail(_name(f.conn), f"{size} bytes of state: over the bound of {MAX_CONNECTION_BYTES}")
            _abort(f.client)
            _abort(f.backend)
            continue
        f.entry["size"] = size
        sendable.append(f)
    ok = await send({"type": "move_begin", "address": address, "move_id": move_id, "connections": len(sendable)})
    batch: list[dict] = []
    batch_size = 0
    for number, f in enumerate(sendable):
        size = f.entry.pop("size")
        report.state_bytes += size
        if size > INLINE_BYTES:  # its queues go ahead in parts (the sync link's frames are 1 MiB at most)
            for leg, queue in QUEUES:
                data = f.entry[leg][queue]
                for at in range(0, len(data), PART_BYTES):
                    ok = ok and await send({"type": "move_part", "address": address, "move_id": move_id,
                                            "part": number, "leg": leg, "queue": queue,
                                            "data": data[at:at + PART_BYTES]})
                f.entry[leg] = {**f.entry[leg], queue: b""}
            f.entry["part"] = number
            size = 4096
        if batch and batch_size + size > BATCH_BYTES:
            ok = ok and await send({"type": "move_connections", "address": address, "move_id": move_id,
                                    "connections": batch})
            batch, batch_size = [], 0
        batch.append(f.entry)
        batch_size += size
    if batch:
        ok = ok and await send({"type": "move_connections", "address": address, "move_id": move_id,
                                "connections": batch})
    ok = ok and await send({"type": "move_commit", "address": address, "move_id": move_id,
                            "frozen_at": frozen_at, "failures": report.failures[:20]})
    phases.done("send")
    # 7. the peer's word
    bound = READY_WAIT + READY_PER_CONNECTION * len(sendable) + READY_PER_MIB * report.state_bytes / (1 << 20)
    ready = await wait_ready(bound) if ok else None
    phases.done("ready")
    if ready is None:
        why = "the sync link broke during the move" if not ok else "the peer did not confirm in time"
        log.error("move of %s called off (%s): %d connection(s) stay here", address, why, len(sendable))
        slicer = _Slicer()
        for f in sendable:
            await _thaw(service, f, report)
            await slicer.tick()
        service.resume_accepting()
        await send({"type": "move_abort", "address": address, "move_id": move_id})
        # what the lock dropped goes to the thawed sockets here (the lock is released first: delivered
        # while it holds, the copies would be dropped again)
        report.lock_drops = held.dropped()
        copies = held.take_dropped() + await trio.to_thread.run_sync(held.release)
        report.delivered(copies)
        phases.done("thaw")
        report.outcome = "thawed"
        if report.thawed and len(report.failures) < 20:
            report.failures.append(f"move called off ({why}): {report.thawed} connection(s) kept here")
    else:
        failed_there = set(ready.get("failed") or []) if isinstance(ready.get("failed"), list) else set()
        for f in sendable:
            tcprepair.close_silently(f.client)
            tcprepair.close_silently(f.backend)
            if _key(f.entry) in failed_there:
                report.fail(_name(f.conn), "the peer could not restore it")
            else:
                report.moved += 1
        phases.done("close")
        # the go before the address goes: the lock drops every segment to it here meanwhile (no reset), and
        # the peer's bring-up takes longer than the removal (measured: 34 vs 9 ms median at load 25)
        # what the lock dropped so far goes ahead of the go (the peer keeps it until its sockets are live)
        passed = await _pass_on(send, address, move_id, held.take_dropped())
        # from the go on the peer announces the address: this node, which keeps it a while yet (below),
        # must no longer answer ARP for it, or clients see two owners (an ARP conflict)
        silenced = held.silence_arp()
        # how long the sockets have been frozen: the peer's restored timestamp clocks go at least that
        # far ahead (tcprepair.RestoredSocket.go_live: a frozen socket may still have sent a later TSval)
        await send({"type": "move_go", "address": address, "move_id": move_id, "frozen_at": frozen_at,
                    "frozen_for": trio.current_time() - frozen_t})
        phases.done("go")
        if wait_live is not None:
            # the address stays (locked: what arrives is copied and passed on) until the peer has announced
            # it and its sockets are live: a client that sent to this node's MAC meanwhile loses nothing
            with trio.move_on_after(LIVE_WAIT):
                while True:
                    passed += await _pass_on(send, address, move_id, held.take_dropped())
                    if await wait_live(0.002) is not None:
                        break
            phases.done("wait_live")
        await remove_address()
        phases.done("remove_address")
        report.lock_drops = held.dropped()
        report.arp_drops = held.arp_dropped() if silenced else None
        passed += await _pass_on(send, address, move_id, held.take_dropped())  # the peer is live by now, or nearly
        # after the go: 1-80 ms under load, none of it the clients'
        passed += await _pass_on(send, address, move_id, await trio.to_thread.run_sync(held.release))
        report.segments_passed = passed
        phases.done("unlock")
        report.outcome = "moved"
    report.pause_ms = round((trio.current_time() - t0) * 1000, 3)
    report.finished = True
    log.info("moved %s out: %s; %d of %d connection(s) sent to the peer (%d bytes of state) in %.1f ms; %d kept "
             "here, %d cut; phases %s", address, report.outcome, report.moved, report.connections,
             report.state_bytes, report.pause_ms, report.thawed, report.failed, report.phases_ms)
    return report


async def _pass_on(send: Callable[[dict], Awaitable[bool]], address: str, move_id: int, copies: list[bytes]) -> int:
    """Send copies of segments the lock dropped to the peer, in ``move_segments`` messages under the sync
    link's frame bound; how many were sent."""
    passed = 0
    while copies:
        size, count = 0, 0
        while count < len(copies) and (not count or size + len(copies[count]) <= BATCH_BYTES):
            size += len(copies[count])
            count += 1
        if not await send({"type": "move_segments", "address": address, "move_id": move_id,
                           "segments": copies[:count]}):
            break
        passed += count
        copies = copies[count:]
    return passed


class Receiver:
    """The receiving side of one move until ``move_go``: restores each batch as it arrives (quietly),
    answers the commit with ``move_ready``, then waits (module docstring). Fed by :meth:`feed` (the sync
    link's messages for this move); :meth:`run` is its task."""

    def __init__(self, address: str, move_id: int, *, send: Callable[[dict], Awaitable[bool]],
                 connected: Callable[[], bool], go_wait: float = GO_WAIT) -> None:
        self.address, self.move_id = address, move_id
        self.report = MoveReport(address, "in", move_id, time.time())
        self._send, self._connected, self.go_wait = send, connected, go_wait
        self._tx, self._rx = trio.open_memory_channel[dict](1000)
        self.restored: list[tuple[dict, str, tcprepair.RestoredSocket, tcprepair.RestoredSocket]] = []
        self.frozen_at: float | None = None
        self.decision: str | None = None     # go | abort
        self._decided = trio.Event()
        self.state = "receiving"             # receiving | ready | taken | given_up
        self._failed: list[dict] = []
        self._parts: dict[tuple[int, str, str], bytearray] = {}
        self._part_bytes = 0
        #: from move_go: how long the giver's sockets had been frozen, and when the go arrived (trio time)
        self.frozen_for: float | None = None
        self.go_at: float | None = None
        #: segments the giver's lock dropped: kept until the sockets are live, then delivered at once
        self.segments: list[bytes] = []
        self.live = False

    def feed(self, message: dict) -> None:
        kind = message.get("type")
        if kind == "move_segments":
            self._take_segments(message.get("segments"))
            return
        if kind == "move_go":
            frozen_for = message.get("frozen_for")
            self.frozen_for = frozen_for if isinstance(frozen_for, (int, float)) and 0 <= frozen_for < 3600 else None
            self.go_at = trio.current_time()
            self.decide("go")
        elif kind == "move_abort":
            self.decide("abort")
        else:
            try:
                self._tx.send_nowait(message)
            except trio.WouldBlock:
                log.error("move of %s: too many messages queued; the move is given up", self.address)
                self.decide("abort")

    def _take_segments(self, segments: Any) -> None:
        if not isinstance(segments, list):
            return
        segments = [s for s in segments if isinstance(s, bytes)]
        if self.live:
            self.report.delivered(segments)
        elif self.state != "given_up":
            self.segments.extend(segments[:MAX_SEGMENTS - len(self.segments)])

    def ts_advance_ms(self) -> int:
        """How far the restored sockets' timestamp clocks go past the frozen values: the time since the
        giver froze them (its own count, carried by move_go, plus the time since the go arrived; else the
        two nodes' wall clocks) and TS_MARGIN_MS."""
        if self.frozen_for is not None and self.go_at is not None:
            since = self.frozen_for + trio.current_time() - self.go_at
        elif self.frozen_at is not None:
            since = max(time.time() - self.frozen_at, 0.0)
        else:
            since = 0.0
        return int(since * 1000) + TS_MARGIN_MS

    async def send_live(self) -> None:
        """Tell the giver that the address is announced and every socket live (it may remove the address)."""
        await self._send({"type": "move_live", "address": self.address, "move_id": self.move_id})

    def deliver_segments(self) -> None:
        """The sockets are live: deliver what the giver's lock dropped, and from now on as it comes."""
        self.live = True
        segments, self.segments = self.segments, []
        self.report.delivered(segments)

    def decide(self, decision: str) -> None:
        if self.decision is None:
            self.decision = decision
            self._decided.set()

    async def run(self) -> None:
        await _watched(self.report, self._run)

    async def _run(self) -> None:
        phases = _Phases(self.report)
        slicer = _Slicer()
        committed = False
        with trio.CancelScope(deadline=trio.current_time() + self.go_wait) as receiving:
            async def watch() -> None:  # called off, or the sync link broke: stop waiting for the rest
                while self.decision is None and self._connected():
                    with trio.move_on_after(0.01):
                        await self._decided.wait()
                receiving.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                async for message in self._rx:
                    receiving.deadline = trio.current_time() + self.go_wait  # the giver is still sending
                    if message.get("type") == "move_part":
                        if not self._take_part(message):
                            self.decide("abort")
                            break
                    elif message.get("type") == "move_connections" and isinstance(message.get("connections"), list):
                        for entry in message["connections"]:
                            self._restore(entry)
                            await slicer.tick()
                    elif message.get("type") == "move_commit":
                        committed = True
                        frozen_at = message.get("frozen_at")
                        self.frozen_at = frozen_at if isinstance(frozen_at, (int, float)) else None
                        for failure in message.get("failures") or []:
                            if len(self.report.failures) < 20:
                                self.report.failures.append(f"at the peer: {failure}")
                        break
                nursery.cancel_scope.cancel()
        phases.done("restore")
        if committed and self.decision is None:
            failed = [_key(e) for e in self._failed]
            self.state = "ready"
            sent = await self._send({"type": "move_ready", "address": self.address, "move_id": self.move_id,
                                     "restored": len(self.restored), "failed": failed[:1000]})
            if sent:
                with trio.move_on_after(self.go_wait):
                    while self.decision is None and self._connected():
                        with trio.move_on_after(0.01):
                            await self._decided.wait()
            phases.done("wait_go")
        if self.decision != "go":
            self.give_up("the move was called off" if self.decision == "abort" else
                         "no word from the peer" if committed else "the peer's states did not all arrive")

    def _take_part(self, message: dict) -> bool:
        """Buffer one ``move_part``; False if it is malformed or over the buffer bound (the move is given up)."""
        key = (message.get("part"), message.get("leg"), message.get("queue"))
        data = message.get("data")
        if not isinstance(key[0], int) or (key[1], key[2]) not in QUEUES or not isinstance(data, bytes):
            log.error("move of %s: malformed move_part %r; giving the move up", self.address, key)
            return False
        self._part_bytes += len(data)
        if self._part_bytes > MAX_PART_BUFFER:
            log.error("move of %s: over %d bytes of parts; giving the move up", self.address, MAX_PART_BUFFER)
            return False
        self._parts.setdefault(key, bytearray()).extend(data)
        return True

    def _join_parts(self, entry: dict) -> dict:
        """An entry whose queues went ahead in parts, with them put back."""
        number = entry["part"]
        entry = dict(entry)
        for leg, queue in QUEUES:
            entry[leg] = {**entry[leg], queue: bytes(self._parts.pop((number, leg, queue), b""))}
        return entry

    def _restore(self, entry: Any) -> None:
        report = self.report
        report.connections += 1
        what = "connection"
        try:
            if isinstance(entry, dict) and isinstance(entry.get("part"), int):
                entry = self._join_parts(entry)
            what = f"{entry['client']['remote_address']}:{entry['client']['remote_port']}->:{entry['port']}"
            cs, bs = TcpSocketState.from_wire(entry["client"]), TcpSocketState.from_wire(entry["backend"])
        except (KeyError, TypeError, ValueError) as exc:
            report.fail(what, f"unreadable state: {exc}")
            self._failed.append(entry if isinstance(entry, dict) else {})
            return
        try:
            rc = tcprepair.restore_quiet(cs)
        except TcpRepairError as exc:
            report.fail(what, str(exc))
            self._failed.append(entry)
            return
        try:
            rb = tcprepair.restore_quiet(bs)
        except TcpRepairError as exc:
            rc.close_silently()
            report.fail(what, str(exc))
            self._failed.append(entry)
            return
        report.state_bytes += len(cs.send_queue) + len(cs.recv_queue) + len(bs.send_queue) + len(bs.recv_queue)
        self.restored.append((entry, what, rc, rb))

    def give_up(self, why: str) -> None:
        """Close everything restored, silently: the connections stay with (or are lost at) the giver,
        never on both nodes."""
        if self.state in ("taken", "given_up"):
            return
        for _, _, rc, rb in self.restored:
            rc.close_silently()
            rb.close_silently()
        if self.restored:
            log.warning("move of %s in: %s; %d restored connection(s) dropped here", self.address, why,
                        len(self.restored))
        if len(self.report.failures) < 20:
            self.report.failures.append(f"given up: {why} ({len(self.restored)} restored, none kept)")
        self.restored = []
        self.segments = []
        self.state = "given_up"
        self.report.outcome = "given_up"
        self.report.finished = True

    def take(self) -> list[tuple[dict, str, tcprepair.RestoredSocket, tcprepair.RestoredSocket]]:
        """The restored connections, for :func:`move_in` (empty if given up meanwhile)."""
        restored = self.restored if self.state != "given_up" else []
        self.restored = []
        if self.state != "given_up":
            self.state = "taken"
        return restored


async def move_in(*, address: str, receiver: Receiver | None,
                  bring_up: Callable[[], Awaitable[Any]]) -> MoveReport:
    """The receiving node's sequence after ``move_go``: ``bring_up()`` (the address up and announced; it
    returns the :class:`~proxy.serving.AddressService` now serving it), go live, pump."""
    report = receiver.report if receiver is not None else MoveReport(address, "in", 0, time.time())
    return await _watched(report, lambda: _move_in(report, address, receiver, bring_up))


async def _move_in(report: MoveReport, address: str, receiver: Receiver | None,
                   bring_up: Callable[[], Awaitable[Any]]) -> MoveReport:
    restored = receiver.take() if receiver is not None else []
    t0 = trio.current_time()
    phases = _Phases(report)
    try:
        service = await bring_up()
    except BaseException:
        for _, _, rc, rb in restored:
            rc.close_silently()
            rb.close_silently()
        raise
    phases.done("bring_up")
    by_name = {p.service.name: p for p in service.proxies}
    slicer = _Slicer()
    for entry, what, rc, rb in restored:
        proxy = by_name.get(entry.get("service"))
        advance = receiver.ts_advance_ms() if receiver is not None else TS_MARGIN_MS
        try:
            client = rc.go_live(ts_advance_ms=advance)
            backend = rb.go_live(ts_advance_ms=advance)
        except TcpRepairError as exc:
            report.fail(what, f"go live: {exc}")
            _abort(rc.sock)
            _abort(rb.sock)
            continue
        if proxy is None:
            report.fail(what, f"no service {entry.get('service')!r} here")
            _abort(client)
            _abort(backend)
            continue
        try:
            service.adopt(proxy, client, backend, int(entry["port"]),
                          peer=(rc.state.remote_address, rc.state.remote_port), bytes_to_backend=int(entry.get("to_backend") or 0),
                          bytes_to_client=int(entry.get("to_client") or 0), anchor=relay_anchor(rc.state, rb.state))
        except OSError as exc:  # reset by the remote since it went live (e.g. the giver served it meanwhile)
            report.fail(what, f"ended before its pumps started: {exc}")
            _abort(client)
            _abort(backend)
            continue
        report.moved += 1
        await slicer.tick()
    if receiver is not None:
        receiver.deliver_segments()
        await receiver.send_live()
    phases.done("live")
    now = time.time()
    report.pause_ms = round((trio.current_time() - t0) * 1000, 3)
    if receiver is not None and receiver.frozen_at is not None:
        report.freeze_to_live_ms = round((now - receiver.frozen_at) * 1000, 3)
    report.outcome = report.outcome or "moved"   # given_up: the address came, its connections were lost
    report.finished = True
    log.info("moved %s in: %d of %d connection(s) live %.1f ms after the peer froze them; %d cut; phases %s",
             address, report.moved, report.connections, report.freeze_to_live_ms or -1, report.failed,
             report.phases_ms)
    return report
