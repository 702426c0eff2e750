"""A planned move of one service address to the peer with its live connections (issue 11).

Why: on a planned move (``pairproxy handover``, its ``--back``) the holder is alive and can hand the
peer the exact kernel state of every proxied socket (:mod:`proxy.tcprepair`), so no client reconnects.
The decisions (when to move, which machine state follows) are in :mod:`proxy.roles`; this module is
the two sequences the node runs for :class:`~proxy.roles.MoveOut` and :class:`~proxy.roles.MoveIn`.

Giving node (:func:`move_out`), in the order bench/TCPREPAIR.md's findings demand:

1. stop accepting (the listeners close; the connections go on);
2. stop the pumps of every connection without closing its sockets; bytes a pump still held in its pipe
   are kept (``Connection.spilled_to_*``) and become the end of the frozen send queue;
3. wait briefly (``drain_wait``) until nothing is in flight (:func:`~proxy.tcprepair.unacknowledged` 0 on
   every socket) while the address is still up, so the restored sockets need nothing resent;
4. remove the address: from now on nothing reaches the sockets, so nothing more is acknowledged;
5. freeze both legs of each connection (the backend leg's local address is the service address too,
   so it moves with it);
6. send ``move_begin``, the states in ``move_connections`` batches under the sync link's frame limit,
   then ``move_commit``; close every frozen socket silently.

Receiving node (:func:`move_in`): restore every leg quietly (repair mode: it sends nothing), bring the
address up and announce it (the caller's ``bring_up``: the takeover sequence, or serving the own
address), then let every leg go live and start its pumps.

A connection that cannot be frozen, is too large for one message, or cannot be restored falls back to
what a move without this module does: it is cut (the peer has no socket for it, so the client's next
segment is answered with a reset). Each such connection is named in the report's ``failures``.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable

import trio

from proxy import tcprepair
from proxy.tcprepair import TcpRepairError, TcpSocketState

log = logging.getLogger("pairproxy.livemove")

#: bytes of connection states per ``move_connections`` message (the sync link's frames are 1 MiB at most)
BATCH_BYTES = 512 * 1024
#: a connection whose two legs' state is larger than this cannot be sent in one message: it is cut
MAX_CONNECTION_BYTES = 900 * 1024
#: how long the giver waits for in-flight bytes to be acknowledged before freezing
DRAIN_WAIT = 0.05
#: how long the giver waits for a connection's pumps to stop
STOP_WAIT = 1.0
MESSAGES = ("move_begin", "move_connections", "move_commit")


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
    #: out: pumps stopped -> commit sent; in: commit received -> last leg live
    pause_ms: float | None = None
    #: in: the giver's first freeze -> the last leg live here (wall clocks of both nodes)
    freeze_to_live_ms: float | None = None
    finished: bool = False

    def fail(self, what: str, why: str) -> None:
        self.failed += 1
        if len(self.failures) < 20:
            self.failures.append(f"{what}: {why}")
        log.warning("move of %s: %s cut: %s", self.address, what, why)


def _abort(sock: socket.socket) -> None:
    """Close a leg that could not move (the reset of a move without this module)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _name(conn: Any) -> str:
    return f"{conn.client[0]}:{conn.client[1]}->:{conn.port}"


async def move_out(*, address: str, move_id: int, service: Any, remove_address: Callable[[], Awaitable[None]],
                   send: Callable[[dict], Awaitable[bool]], drain_wait: float = DRAIN_WAIT) -> MoveReport:
    """The giving node's sequence (module docstring); the report. ``remove_address`` stops the address's
    service (it has no connections left by then) and removes the address."""
    report = MoveReport(address, "out", move_id, time.time())
    t0 = trio.current_time()
    # 1-2
    service.stop_accepting()
    await trio.sleep(0)  # connections accepted just now register themselves
    conns = [(proxy, conn) for proxy in service.proxies for conn in list(proxy.connections)]
    for _, conn in conns:
        conn.moving = True
        conn.pumps.cancel()
    with trio.move_on_after(STOP_WAIT):
        for _, conn in conns:
            await conn.ended.wait()
    report.connections = len(conns)
    handed = [(p, c) for p, c in conns if c.handed is not None]
    for _, conn in conns:
        if conn.handed is None:
            report.fail(_name(conn), "its pumps ended first (closed or reset as usual)")
    # 3. nothing in flight, while the address is still up
    with trio.move_on_after(drain_wait):
        while True:
            try:
                if all(tcprepair.unacknowledged(s) == 0 for _, c in handed for s in c.handed):
                    break
            except OSError:
                break
            await trio.sleep(0.0005)
    # 4. the address goes
    await remove_address()
    # 5. freeze
    frozen_at = time.time()
    entries: list[tuple[int, dict]] = []
    frozen: list[socket.socket] = []
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
        size = sum(len(s.send_queue) + len(s.recv_queue) + 512 for s in (cs, bs))
        if size > MAX_CONNECTION_BYTES:
            report.fail(_name(conn), f"{size} bytes of state do not fit one message")
            _abort(client)
            _abort(backend)
            continue
        entries.append((size, {"service": proxy.service.name, "port": conn.port,
                               "client": cs.to_wire(), "backend": bs.to_wire(),
                               "to_backend": conn.bytes_to_backend, "to_client": conn.bytes_to_client}))
        frozen += [client, backend]
    # 6. send, in bounded batches
    ok = await send({"type": "move_begin", "address": address, "move_id": move_id, "connections": len(entries)})
    batch: list[dict] = []
    batch_size = 0
    for size, entry in entries:
        if batch and batch_size + size > BATCH_BYTES:
            ok = ok and await send({"type": "move_connections", "address": address, "move_id": move_id,
                                    "connections": batch})
            batch, batch_size = [], 0
        batch.append(entry)
        batch_size += size
        report.state_bytes += size
    if batch:
        ok = ok and await send({"type": "move_connections", "address": address, "move_id": move_id,
                                "connections": batch})
    ok = ok and await send({"type": "move_commit", "address": address, "move_id": move_id,
                            "frozen_at": frozen_at, "failures": report.failures[:20]})
    for sock in frozen:
        tcprepair.close_silently(sock)
    if ok:
        report.moved = len(entries)
    else:
        for _, entry in entries:
            report.fail(f"{entry['client']['remote_address']}:{entry['client']['remote_port']}",
                        "the sync link broke during the move")
    report.pause_ms = round((trio.current_time() - t0) * 1000, 3)
    report.finished = True
    log.info("moved %s out: %d of %d connection(s) sent to the peer (%d bytes of state) in %.1f ms; %d cut",
             address, report.moved, report.connections, report.state_bytes, report.pause_ms, report.failed)
    return report


class Inbound:
    """What the peer sent for one move, collected from its messages until ``move_commit``."""

    def __init__(self) -> None:
        self.moves: dict[tuple[str, int], dict] = {}

    def on_message(self, message: dict) -> dict | None:
        """Take one ``move_*`` message; the complete move on ``move_commit`` (else None)."""
        kind, key = message.get("type"), (message.get("address"), message.get("move_id"))
        if kind == "move_begin":
            self.moves = {key: {"address": key[0], "move_id": key[1], "connections": [],
                                "received_at": time.time()}}
            return None
        move = self.moves.get(key)
        if move is None:
            log.warning("%s for a move that did not begin (%s): ignored", kind, key)
            return None
        if kind == "move_connections":
            found = message.get("connections")
            if isinstance(found, list):
                move["connections"] += found
            return None
        if kind == "move_commit":
            del self.moves[key]
            move["frozen_at"] = message.get("frozen_at")
            move["giver_failures"] = message.get("failures") or []
            move["committed_at"] = time.time()
            return move
        return None


async def move_in(*, move: dict, bring_up: Callable[[], Awaitable[Any]]) -> MoveReport:
    """The receiving node's sequence: restore quietly, ``bring_up()`` (the address up and announced; it
    returns the :class:`~proxy.serving.AddressService` now serving it), go live, pump."""
    address = str(move["address"])
    report = MoveReport(address, "in", int(move.get("move_id") or 0), time.time())
    t0 = trio.current_time()
    restored = []
    entries = move.get("connections") or []
    report.connections = len(entries)
    for entry in entries:
        what = "connection"
        try:
            what = f"{entry['client']['remote_address']}:{entry['client']['remote_port']}->:{entry['port']}"
            cs, bs = TcpSocketState.from_wire(entry["client"]), TcpSocketState.from_wire(entry["backend"])
        except (KeyError, TypeError, ValueError) as exc:
            report.fail(what, f"unreadable state: {exc}")
            continue
        try:
            rc = tcprepair.restore_quiet(cs)
        except TcpRepairError as exc:
            report.fail(what, str(exc))
            continue
        try:
            rb = tcprepair.restore_quiet(bs)
        except TcpRepairError as exc:
            rc.close_silently()
            report.fail(what, str(exc))
            continue
        report.state_bytes += len(cs.send_queue) + len(cs.recv_queue) + len(bs.send_queue) + len(bs.recv_queue)
        restored.append((entry, what, rc, rb))
    await trio.sleep(0)  # heartbeats out between the restores and the address (one shorter stretch each)
    try:
        service = await bring_up()
    except BaseException:
        for _, _, rc, rb in restored:
            rc.close_silently()
            rb.close_silently()
        raise
    by_name = {p.service.name: p for p in service.proxies}
    for entry, what, rc, rb in restored:
        proxy = by_name.get(entry.get("service"))
        try:
            client = rc.go_live()
            backend = rb.go_live()
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
        service.adopt(proxy, client, backend, int(entry["port"]),
                      bytes_to_backend=int(entry.get("to_backend") or 0), bytes_to_client=int(entry.get("to_client") or 0))
        report.moved += 1
    now = time.time()
    report.pause_ms = round((trio.current_time() - t0) * 1000, 3)
    if isinstance(move.get("frozen_at"), (int, float)):
        report.freeze_to_live_ms = round((now - move["frozen_at"]) * 1000, 3)
    for failure in move.get("giver_failures") or []:
        if len(report.failures) < 20:
            report.failures.append(f"at the peer: {failure}")
    report.finished = True
    log.info("moved %s in: %d of %d connection(s) live %.1f ms after the peer froze them; %d cut",
             address, report.moved, report.connections, report.freeze_to_live_ms or -1, report.failed)
    return report
