"""The sync link: the one authenticated TCP connection between the two nodes of a pair.

:class:`PeerLink` owns the connection and everything about keeping it: it listens and dials at the
same time (whichever node starts first, or comes back first, gets through), reconnects by itself,
checks the peer's hello, sends heartbeats and measures their round trip. The bytes are
:mod:`sync.wire`'s business; liveness decisions are :mod:`sync.detector`'s (feed it
``link.last_received``). The owner sees a small surface: :meth:`PeerLink.send`, the ``on_message``
callback, and the status attributes.

Why both nodes listen and dial: either node may be down or starting when the other comes up, and
neither should wait for the other to restart its dialler. If both connections come up, each node
keeps the one dialled by the node whose name sorts lower; both nodes apply the same rule to the same
facts, so they agree without talking about it. Two connections from the same dialler (the peer
restarted, its old connection is half-open) resolve to the newest. A connection that receives
nothing for ``idle_timeout`` (default ``dead_after``) is dropped, so a half-open one cannot block a
fresh one for long.

Stray connections (issue 8.4): at most ``MAX_UNAUTHENTICATED`` accepted connections may be waiting
for their hello at a time (plus ``PEER_UNAUTHENTICATED`` from the peer's own address), each may
announce frames of at most ``HELLO_MAX_FRAME`` bytes and has ``handshake_timeout`` to get its hello
accepted. So fifty strangers trickling 1 MiB frames cost at most 8 x (64 KiB + one receive buffer)
and never stop the peer's connection, which is dialled by us (not counted) or comes from the peer's
address (its own budget).

The first message each way is a ``hello`` (the body the owner passed in, plus ``"type"``). A peer
with a different name, mode or protocol version, or one whose first message does not authenticate
(a different ``key_file``), is refused: the connection is closed, :attr:`PeerLink.state` becomes
``"refused"`` with the reason in :attr:`PeerLink.refused_reason`, and it is tried again after the
backoff, because the operator may fix the other node's config meanwhile. Such a refusal on a
connection to or from the peer's address also proves that the peer's *process* lives (issue 9.1):
:meth:`PeerLink.peer_refused` hands it to the failure detector, which then calls the peer
``misconfigured`` instead of dead, and ``status()["peer_refusal"]`` says why. Before closing, the peer
is told why (a ``refuse`` message), so both nodes log the same reason. A refused stray connection
(a port scanner, a forged frame) never changes the state of a working link; it is only counted.

Every accepted peer hello (one per connection, and one per :meth:`PeerLink.update_hello` of the
peer) is also passed to ``on_hello(hello)``, synchronous and non-blocking like ``on_message``: the
hello carries what the peer serves, which the owner needs on every reconnect.

A wrong ``peer.link`` (issue 9.7) leaves a half-working link: this node dials a port nobody listens
on, and the link comes up only when the peer dials. That must not stay a debug line. Every failed
dial is counted (``dial_failures``, ``last_dial_error`` in :meth:`PeerLink.status`); dials failing
for ``dial_warn_after`` (5 s) get a warning naming ``peer.link`` and what was tried, repeated at
most every ``dial_warn_every`` (60 s). And each hello carries the sender's actual listen endpoint
(``"listen"``, taken off again before the owner sees the hello), so a node whose link came up through
the peer's dial still learns that its own ``peer.link`` points elsewhere: ``dial_problem`` says so,
with the value to set, and so does the log (when it changes, else at most every 60 s).

Messages: other than ``hello``, ``refuse``, ``heartbeat`` and ``heartbeat_ack`` (which the link
handles itself), every authenticated message from the active connection is passed, as the full
dict, to ``on_message(message)``. The callback is synchronous and must not block: push into a
memory channel with ``send_nowait`` if the work needs a task. Delivery is at most once: messages
in flight when a connection breaks are lost, and the owner resynchronises after a reconnect (a new
hello arrives on every connection).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import statistics
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import trio

from sync.wire import MAX_FRAME, LocalProtocolError, Message, Ready, Rejected, SyncSession

log = logging.getLogger("pairproxy.link")

LinkState = Literal["connecting", "connected", "refused"]

PROTOCOL_MESSAGES = frozenset({"hello", "refuse", "heartbeat", "heartbeat_ack"})
HELLO_FIELDS = ("name", "mode", "version")
PEER_HELLO_FILE = "peer-hello.json"
BACKOFF_MIN = 0.05
BACKOFF_MAX = 1.0
RTT_WINDOW = 100
RECEIVE_SIZE = 64 * 1024
#: Connections accepted on the sync port that have not yet authenticated (sent an accepted hello),
#: at most this many at a time; more are closed at once and counted as ``stray_refused``. The
#: peer's own address has a separate budget of PEER_UNAUTHENTICATED, so strays elsewhere on the
#: sync network cannot crowd out the real peer's dial.
MAX_UNAUTHENTICATED = 8
PEER_UNAUTHENTICATED = 4
#: Until its hello is accepted a connection may send frames of at most this size (a hello is a few
#: KiB); a longer announced frame is refused before a byte of it is buffered.
HELLO_MAX_FRAME = 64 * 1024
#: dials failing this long get a warning (a peer restarting takes a second or two: no warning)
DIAL_WARN_AFTER = 5.0
#: and the warning is repeated at most this often while they keep failing
DIAL_WARN_EVERY = 60.0
#: the key of the sender's listen endpoint in a hello (added and removed by the link itself)
HELLO_LISTEN = "listen"


@dataclass(eq=False)
class _Connection:
    """One TCP connection's state; lives exactly as long as :meth:`PeerLink._serve_connection`."""

    stream: trio.SocketStream
    session: SyncSession
    dialled_by: str
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    send_lock: trio.Lock = field(default_factory=trio.Lock)
    nursery: trio.Nursery | None = None
    peer: str = "?"  # the remote address, for log lines
    accepted: bool = False  # the peer's hello passed the checks
    was_active: bool = False
    from_peer: bool = False  # dialled by us, or from the peer's address: a refusal there is the peer's
    budget: str | None = None  # which unauthenticated budget the connection uses until its hello is accepted
    closed: bool = False
    close_reason: str = ""
    hello_sent: dict[str, Any] | None = None  # the hello this connection's peer got (update_hello may come later)


class PeerLink:
    """The sync link to the peer; run it with ``await nursery.start(link.run)``.

    ``listen`` and ``dial`` are (host, port). ``hello`` must hold at least ``name`` (= ``my_name``),
    ``mode`` and ``version``; the peer's hello must match ``peer_name`` and the same mode and
    version. ``state_dir``, if given, receives ``peer-hello.json`` whenever a new peer hello is
    accepted (see :func:`load_peer_hello`).
    """

    def __init__(self, my_name: str, peer_name: str, *,
                 listen: tuple[str, int], dial: tuple[str, int], key: bytes, hello: dict[str, Any],
                 on_message: Callable[[dict[str, Any]], None] | None = None,
                 on_hello: Callable[[dict[str, Any]], None] | None = None,
                 heartbeat: float = 0.02, dead_after: float = 0.1, idle_timeout: float | None = None,
                 connect_timeout: float = 1.0, handshake_timeout: float = 1.0,
                 state_dir: str | os.PathLike[str] | None = None,
                 dial_warn_after: float = DIAL_WARN_AFTER, dial_warn_every: float = DIAL_WARN_EVERY):
        if my_name == peer_name:
            raise ValueError(f"peer name {peer_name!r} is this node's own name")
        missing = [f for f in HELLO_FIELDS if f not in hello]
        if missing:
            raise ValueError(f"hello lacks {', '.join(missing)}")
        if hello["name"] != my_name:
            raise ValueError(f"hello names {hello['name']!r}, but this node is {my_name!r}")
        SyncSession(key, me=my_name, peer=peer_name)  # fail now, not on the first connection, if the key is unusable
        self.my_name = my_name
        self.peer_name = peer_name
        self.listen = listen
        self.dial = dial
        self.hello = {k: v for k, v in hello.items() if k != "type"}
        self.on_message = on_message
        self.on_hello = on_hello
        self.heartbeat = heartbeat
        self.idle_timeout = idle_timeout if idle_timeout is not None else dead_after
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.dial_warn_after = dial_warn_after
        self.dial_warn_every = dial_warn_every
        self._key = key

        self.state: LinkState = "connecting"
        self.refused_reason: str | None = None
        self.peer_hello: dict[str, Any] | None = None
        self.last_received: float | None = None
        self.listen_address: tuple[str, int] | None = None
        self.counters: dict[str, int] = {
            "messages_in": 0, "messages_out": 0,
            "rejected_auth": 0, "rejected_parse": 0, "rejected_out_of_sequence": 0, "rejected_too_large": 0,
            "connections": 0, "duplicates": 0, "reconnects": 0, "refused": 0, "owner_errors": 0,
            "connection_errors": 0, "stray_refused": 0, "peer_refusals": 0, "dial_failures": 0,
        }
        #: why the last dial of ``dial`` failed ("connection refused", "no answer within 1000 ms"); None
        #: before the first failure and after a dial of this node got through
        self.last_dial_error: str | None = None
        self._listen_problem: str | None = None  # peer.link is not where the peer says it listens
        self._failing_problem: str | None = None  # dials have failed for dial_warn_after
        self._listen_warned_at = 0.0
        #: the peer's actual listen endpoint, from its last hello (None: an older peer did not say)
        self.peer_listen: str | None = None
        self._dial_failing_since: float | None = None
        self._dial_warned_at: float | None = None
        #: accepted connections not yet authenticated, per budget ("peer", "other")
        self.unauthenticated: dict[str, int] = {"peer": 0, "other": 0}
        self.unauthenticated_peak = 0
        self._pending: set[_Connection] = set()  # the connections counted in ``unauthenticated``
        #: The last time the peer's *process* answered on a connection from/to its address but the link
        #: could not be set up (authentication failed, or mode/version/name refused either way):
        #: ``(trio time, kind, reason)``. Evidence that the peer lives although it is not connected
        #: (issue 9.1); see :meth:`peer_refused`.
        self.peer_refusal: tuple[float, str, str] | None = None
        self._rtts: deque[float] = deque(maxlen=RTT_WINDOW)
        self._active: _Connection | None = None
        self._ever_connected = False
        self._changed = trio.Event()
        self._persisted: dict[str, Any] | None = None

    # -- public ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, dial and keep the link up until cancelled. Started once the listener is bound."""
        try:
            listeners = await trio.open_tcp_listeners(self.listen[1], host=self.listen[0])
        except OSError as exc:
            raise OSError(exc.errno, f"sync link cannot listen on {self.listen[0]}:{self.listen[1]}: "
                                     f"{exc.strerror or exc}") from None
        self.listen_address = listeners[0].socket.getsockname()[:2]
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._dial_loop)
                await nursery.start(trio.serve_listeners, self._serve_accepted, listeners)
                task_status.started()
        finally:
            for listener in listeners:  # free the port now, so a restarted link can bind it at once
                await trio.aclose_forcefully(listener)

    async def send(self, message: dict[str, Any]) -> bool:
        """Send one message to the peer. False if there is no connection (nothing is queued).

        True means the bytes were handed to the kernel, not that the peer processed them. A message
        the link cannot encode (no ``"type"``, not msgpack-able, over 1 MiB) raises
        :class:`sync.wire.LocalProtocolError`: that is the caller's bug, as is using one of the
        link's own types (``PROTOCOL_MESSAGES``).
        """
        if message.get("type") in PROTOCOL_MESSAGES:
            raise LocalProtocolError(f"message type {message['type']!r} is reserved for the link itself")
        conn = self._active
        if conn is None:
            return False
        return await self._send_on(conn, message)

    async def update_hello(self, hello: dict[str, Any]) -> None:
        """Replace this node's hello (e.g. its services changed) and send it if connected."""
        if hello.get("name") != self.my_name or any(hello.get(f) != self.hello.get(f) for f in ("mode", "version")):
            raise ValueError("update_hello may not change name, mode or version")
        self.hello = {k: v for k, v in hello.items() if k != "type"}
        if self._active is not None:
            self._active.hello_sent = self.hello
            await self._send_on(self._active, self._hello_message())

    def drop(self, reason: str = "dropped on request") -> None:
        """Close the current connection, if any; the link reconnects by itself."""
        if self._active is not None:
            self._drop(self._active, reason)

    async def wait_connected(self) -> None:
        """Return once a connection with an accepted hello is up."""
        while self._active is None:
            await self._changed.wait()

    def rtt(self) -> dict[str, float] | None:
        """Heartbeat round trip in seconds over the last 100: last, min, max, median; None if none yet."""
        if not self._rtts:
            return None
        return {"last": self._rtts[-1], "min": min(self._rtts), "max": max(self._rtts),
                "median": statistics.median(self._rtts), "count": len(self._rtts)}

    def peer_refused(self) -> tuple[float, str] | None:
        """``(when, reason)`` of the last refusal that proves the peer's process alive, or None.

        For :func:`sync.detector.watch` (``refused=link.peer_refused``): a peer whose process answers
        but cannot be authenticated or is configured differently is alive, and must not be taken over.
        """
        return None if self.peer_refusal is None else (self.peer_refusal[0], self.peer_refusal[2])

    def _peer_refused(self, conn: _Connection, kind: str, reason: str) -> None:
        if not conn.from_peer:
            return  # a stranger elsewhere on the sync network proves nothing about the peer
        self.counters["peer_refusals"] += 1
        self.peer_refusal = (trio.current_time(), kind, reason)

    def unauthenticated_buffered(self) -> int:
        """Bytes buffered for connections that have not authenticated yet (bounded, issue 8.4)."""
        return sum(conn.session.buffered for conn in self._pending)

    def status(self) -> dict[str, Any]:
        """The link as ``pairproxy status`` shows it (JSON-able)."""
        now = trio.current_time()
        return {
            "state": self.state,
            "refused_reason": self.refused_reason,
            "peer": self.peer_name,
            "peer_hello": self.peer_hello,
            "dialled_by": self._active.dialled_by if self._active else None,
            "silent_for": None if self.last_received is None else now - self.last_received,
            "rtt": self.rtt(),
            "counters": dict(self.counters),
            "dial": f"{self.dial[0]}:{self.dial[1]}",
            "dial_failures": self.counters["dial_failures"],
            "last_dial_error": self.last_dial_error,
            "dial_failing_for": None if self._dial_failing_since is None else now - self._dial_failing_since,
            "dial_problem": self.dial_problem,
            "unauthenticated": sum(self.unauthenticated.values()),
            "unauthenticated_peak": self.unauthenticated_peak,
            "unauthenticated_buffered": self.unauthenticated_buffered(),
            # why the peer, alive, is not connected (None once it connects): kind "unauthenticated"
            # (different key_file or names) or "misconfigured" (mode/version/name refused)
            "peer_refusal": None if self.peer_refusal is None or self.state == "connected" else {
                "kind": self.peer_refusal[1], "reason": self.peer_refusal[2],
                "ago": now - self.peer_refusal[0]},
        }

    # -- connections -------------------------------------------------------------------------

    async def _dial_loop(self) -> None:
        backoff = BACKOFF_MIN
        while True:
            while self._active is not None:
                await self._changed.wait()
            stream = error = None
            with trio.move_on_after(self.connect_timeout):
                try:
                    stream = await trio.open_tcp_stream(*self.dial, local_address=self._local_address())
                except OSError as exc:
                    error = _dial_error(exc)
            if stream is None:
                self._dial_failed(error or f"no answer within {self.connect_timeout * 1000:.0f} ms")
            else:
                self._dial_worked()
            if stream is not None and await self._serve_connection(stream, dialled=True):
                backoff = BACKOFF_MIN
            await trio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _dial_failed(self, error: str) -> None:
        """Count a failed dial; warn (rate-limited) once dials have failed for ``dial_warn_after``."""
        now = trio.current_time()
        self.counters["dial_failures"] += 1
        self.last_dial_error = error
        if self._dial_failing_since is None:
            self._dial_failing_since = now
        failing_for = now - self._dial_failing_since
        log.debug("dial %s:%s: %s", *self.dial, error)
        if failing_for < self.dial_warn_after:
            return
        problem = (f"peer.link {self.dial[0]}:{self.dial[1]}: {error} for {failing_for:.0f} s: is the peer's "
                   f"peer.listen this address and port? (or is {self.peer_name} down?)")
        self._failing_problem = problem
        if self._dial_warned_at is None or now - self._dial_warned_at >= self.dial_warn_every:
            self._dial_warned_at = now
            log.warning("%s (%d failed dials)", problem, self.counters["dial_failures"])

    def _dial_worked(self, *, connected: bool = False) -> None:
        """A dial got through, or the link came up (through the peer's dial: its hello then says
        whether peer.link is right, see :meth:`_check_peer_listen`): failures so far were a start-up."""
        if self._dial_warned_at is not None and not connected:
            log.info("peer.link %s:%s answers again after %d failed dials", *self.dial, self.counters["dial_failures"])
        self._dial_failing_since = self._dial_warned_at = None
        if not connected:  # through the peer's dial, this node's last dial error still stands
            self.last_dial_error = None
        self._failing_problem = None

    def _check_peer_listen(self, listen: Any) -> None:
        """The peer says where it listens: does this node's peer.link point there? (issue 9.7)"""
        if not isinstance(listen, str) or ":" not in listen:
            return
        self.peer_listen = listen
        host, _, port = listen.rpartition(":")
        dial_host, dial_port = self.dial[0], self.dial[1]
        if str(port) == str(dial_port) and host in (dial_host, "0.0.0.0", "::", ""):
            self._listen_problem = None
            return
        problem = (f"peer.link {dial_host}:{dial_port} is not where {self.peer_name} listens ({self.peer_name}'s "
                   f"peer.listen is {listen}): this node's dials never reach it and the link works only while "
                   f"{self.peer_name} dials; set peer.link = \"{listen}\" on {self.my_name}")
        now = trio.current_time()
        if problem != self._listen_problem or now - self._listen_warned_at >= self.dial_warn_every:
            self._listen_warned_at = now
            log.warning("%s", problem)
        self._listen_problem = problem

    @property
    def dial_problem(self) -> str | None:
        """What is wrong with this node's peer.link, with what to change; None: nothing known."""
        return self._listen_problem or self._failing_problem

    def _local_address(self) -> str | None:
        """Dial from the listen address, so the link leaves over the sync network and firewalls
        see one address per node; a wildcard listen address leaves the choice to routing."""
        host = self.listen[0]
        return None if host in ("", "0.0.0.0", "::") else host

    async def _serve_accepted(self, stream: trio.SocketStream) -> None:
        try:
            remote = stream.socket.getpeername()[0]
        except OSError:
            remote = None
        budget = "peer" if remote == self.dial[0] else "other"
        limit = PEER_UNAUTHENTICATED if budget == "peer" else MAX_UNAUTHENTICATED
        if self.unauthenticated[budget] >= limit:
            self.counters["stray_refused"] += 1
            log.debug("sync link: %d connections waiting for their hello already; closing one from %s",
                      limit, remote)
            await trio.aclose_forcefully(stream)
            return
        await self._serve_connection(stream, dialled=False, budget=budget)

    async def _serve_connection(self, stream: trio.SocketStream, *, dialled: bool, budget: str | None = None) -> bool:
        """Run one connection to its end; True if it was ever the active one.

        Whatever goes wrong on one connection ends that connection, never the link: an exception
        escaping here would end ``serve_listeners`` or the dial loop, then :meth:`run`, then the node,
        and the peer would take over (issue 8.1: one crafted segment did exactly that). So anything
        but cancellation is logged with its traceback, counted in ``connection_errors`` and the
        connection is closed.
        """
        try:
            return await self._run_connection(stream, dialled=dialled, budget=budget)
        except Exception:
            self.counters["connection_errors"] += 1
            log.exception("sync link: connection %s failed (dropped; the link goes on)",
                          "dialled" if dialled else "accepted")
            await trio.aclose_forcefully(stream)
            return False

    async def _run_connection(self, stream: trio.SocketStream, *, dialled: bool, budget: str | None) -> bool:
        try:
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # heartbeats are tiny
        except OSError:
            pass
        session = SyncSession(self._key, me=self.my_name, peer=self.peer_name, max_frame=HELLO_MAX_FRAME)
        conn = _Connection(stream, session, dialled_by=self.my_name if dialled else self.peer_name, budget=budget)
        conn.from_peer = dialled
        if budget is not None:
            conn.from_peer = budget == "peer"
            self.unauthenticated[budget] += 1
            self._pending.add(conn)
            self.unauthenticated_peak = max(self.unauthenticated_peak, sum(self.unauthenticated.values()))
        try:
            conn.peer = "%s:%s" % stream.socket.getpeername()[:2]
        except OSError:
            pass
        try:
            with conn.scope:
                async with trio.open_nursery() as nursery:
                    conn.nursery = nursery
                    async with conn.send_lock:
                        sent = await self._write(conn, conn.session.initial_bytes())
                    if sent:
                        await self._receive_loop(conn)
                    nursery.cancel_scope.cancel()
        finally:
            conn.closed = True
            self._release_budget(conn)
            if self._active is conn:
                self._active = None
                self.state = "connecting"
                log.info("sync link to %s down: %s", self.peer_name, conn.close_reason or "closed")
                self._notify()
            await trio.aclose_forcefully(stream)
        return conn.was_active

    async def _receive_loop(self, conn: _Connection) -> None:
        handshake_deadline = trio.current_time() + self.handshake_timeout
        while not conn.closed:
            deadline = (trio.current_time() + self.idle_timeout) if conn.accepted else handshake_deadline
            data = None
            with trio.move_on_at(deadline):
                try:
                    data = await conn.stream.receive_some(RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self._drop(conn, f"receive failed: {exc}")
                    return
            if data is None:
                what = "hello" if not conn.accepted else "anything"
                timeout = self.handshake_timeout if not conn.accepted else self.idle_timeout
                self._drop(conn, f"no {what} from the peer within {timeout * 1000:.0f} ms")
                return
            if not data:
                self._drop(conn, "peer closed the connection")
                return
            for event in conn.session.receive_data(data):
                if conn.closed:
                    return
                await self._handle(conn, event)

    async def _handle(self, conn: _Connection, event: Ready | Message | Rejected) -> None:
        if isinstance(event, Ready):
            conn.hello_sent = self.hello
            await self._send_on(conn, self._hello_message())
        elif isinstance(event, Rejected):
            self.counters[f"rejected_{event.kind}"] += 1
            log.warning("sync link: rejected %s message from %s: %s", event.kind, conn.peer, event.reason)
            if not conn.accepted:
                if event.kind == "auth":  # the peer's first frame: a pairproxy, but not with our key
                    self._peer_refused(conn, "unauthenticated", event.reason)
                await self._refuse(conn, event.reason, tell_peer=False)
            elif event.broken:
                self._drop(conn, event.reason)
        elif event.type == "hello":
            await self._on_hello(conn, event.body)
        elif event.type == "refuse":
            self._peer_refused(conn, "misconfigured", f"{self.peer_name} refused the link: {event.body.get('reason')}")
            await self._refuse(conn, f"{self.peer_name} refused the link: {event.body.get('reason')}",
                               tell_peer=False)
        elif not conn.accepted:
            await self._refuse(conn, f"peer sent {event.type!r} before its hello")
        elif conn is self._active:
            self._on_message(conn, event)

    def _on_message(self, conn: _Connection, event: Message) -> None:
        now = trio.current_time()
        self.last_received = now
        self.counters["messages_in"] += 1
        body = event.body
        if event.type == "heartbeat":
            conn.nursery.start_soon(self._send_on, conn, {"type": "heartbeat_ack", "sent": body.get("sent")})
        elif event.type == "heartbeat_ack":
            sent = body.get("sent")
            if isinstance(sent, (int, float)) and 0 <= now - sent < 60:
                self._rtts.append(now - sent)
        elif self.on_message is not None:
            try:
                self.on_message(body)
            except Exception:  # the owner's bug must not take the link down; it is logged and counted
                self.counters["owner_errors"] += 1
                log.exception("on_message failed for a %r message", event.type)

    def _hello_message(self) -> dict[str, Any]:
        message = {"type": "hello", **self.hello}
        if self.listen_address is not None:
            message[HELLO_LISTEN] = "%s:%s" % tuple(self.listen_address[:2])
        return message

    async def _on_hello(self, conn: _Connection, hello: dict[str, Any]) -> None:
        listen = hello.get(HELLO_LISTEN)
        hello = {k: v for k, v in hello.items() if k not in ("type", HELLO_LISTEN)}
        problem = self._check_hello(hello)
        if problem:
            self._peer_refused(conn, "misconfigured", problem)
            await self._refuse(conn, problem)
            return
        if not conn.accepted:
            conn.accepted = True
            conn.session.max_frame = MAX_FRAME  # authenticated: full-size messages from now on
            self._release_budget(conn)
            self._activate(conn)
        if conn is self._active:
            self._check_peer_listen(listen)
            self.last_received = trio.current_time()
            self.counters["messages_in"] += 1
            self.peer_hello = hello
            self._persist(hello)
            if self.on_hello is not None:
                try:
                    self.on_hello(dict(hello))
                except Exception:
                    self.counters["owner_errors"] += 1
                    log.exception("on_hello callback failed")

    def _check_hello(self, hello: dict[str, Any]) -> str | None:
        mine = self.hello
        if hello.get("name") != self.peer_name:
            return (f"peer calls itself {hello.get('name')!r}, expected {self.peer_name!r} "
                    "(check [peer] name on this node and the other node's own name)")
        if hello.get("mode") != mine["mode"]:
            return (f"mode mismatch: this node {self.my_name} is {mine['mode']!r}, "
                    f"peer {self.peer_name} is {hello.get('mode')!r} (set [pair] mode the same on both nodes)")
        if hello.get("version") != mine["version"]:
            return (f"protocol version mismatch: this node {self.my_name} speaks {mine['version']!r}, "
                    f"peer {self.peer_name} speaks {hello.get('version')!r} (upgrade both nodes)")
        return None

    def _activate(self, conn: _Connection) -> None:
        old = self._active
        if old is not None:
            self.counters["duplicates"] += 1
            lower = min(self.my_name, self.peer_name)
            keep_new = conn.dialled_by == old.dialled_by or conn.dialled_by == lower
            loser, winner = (old, conn) if keep_new else (conn, old)
            self._drop(loser, f"a second connection is up; keeping the one dialled by {winner.dialled_by}")
            if not keep_new:
                return
        self._active = conn
        conn.was_active = True
        self.counters["connections"] += 1
        if self.state != "connected":
            # a replacement of a live connection by the preferred one is not a reconnect
            if self._ever_connected:
                self.counters["reconnects"] += 1
            log.info("sync link to %s up (dialled by %s)", self.peer_name, conn.dialled_by)
        self._ever_connected = True
        self._dial_worked(connected=True)
        self.state = "connected"
        self.refused_reason = None
        conn.nursery.start_soon(self._send_heartbeats, conn)
        if conn.hello_sent is not self.hello:
            # update_hello ran between this connection's hello and the peer's: the peer has an old one
            conn.hello_sent = self.hello
            conn.nursery.start_soon(self._send_on, conn, self._hello_message())
        self._notify()

    async def _refuse(self, conn: _Connection, reason: str, *, tell_peer: bool = True) -> None:
        # State first, then the (awaiting) courtesy message: observers never see a half-done refusal.
        self.counters["refused"] += 1
        if self._active is None or self._active is conn:
            if self.state != "refused" or self.refused_reason != reason:
                log.warning("sync link to %s refused: %s", self.peer_name, reason)
            self.state = "refused"
            self.refused_reason = reason
            if self._active is conn:
                self._active = None
                self._notify()
        else:
            log.warning("sync link: refused a stray connection from %s (the link stays up): %s", conn.peer, reason)
        if tell_peer:
            await self._send_on(conn, {"type": "refuse", "reason": reason})
        self._drop(conn, reason)

    def _release_budget(self, conn: _Connection) -> None:
        if conn.budget is not None:
            self.unauthenticated[conn.budget] -= 1
            conn.budget = None
            self._pending.discard(conn)

    def _drop(self, conn: _Connection, reason: str) -> None:
        if not conn.closed:
            conn.close_reason = reason
            conn.closed = True
        conn.scope.cancel()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- sending -----------------------------------------------------------------------------

    async def _send_heartbeats(self, conn: _Connection) -> None:
        n = 0
        while not conn.closed:
            await self._send_on(conn, {"type": "heartbeat", "sent": trio.current_time(), "seq": n})
            n += 1
            await trio.sleep(self.heartbeat)

    async def _send_on(self, conn: _Connection, message: dict[str, Any]) -> bool:
        # Seal and write under one lock: frames must reach the socket in sequence-number order.
        async with conn.send_lock:
            if conn.closed or conn.session.broken:  # a broken session cannot seal: the connection is over
                return False
            if not await self._write(conn, conn.session.seal(message)):
                return False
        self.counters["messages_out"] += 1
        return True

    async def _write(self, conn: _Connection, data: bytes) -> bool:
        """Write with the send lock held; a stalled or failed write drops the connection."""
        with trio.move_on_after(self.idle_timeout) as stalled:
            try:
                await conn.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._drop(conn, f"send failed: {exc}")
                return False
        if stalled.cancelled_caught:
            self._drop(conn, f"send stalled for {self.idle_timeout * 1000:.0f} ms")
            return False
        return True

    # -- persistence -------------------------------------------------------------------------

    def _persist(self, hello: dict[str, Any]) -> None:
        if self.state_dir is None or hello == self._persisted:
            return
        # which addresses the peer holds and its own address's state change with every live move, and the
        # hello arrives just as the moved connections go live here: an fsync on the event loop then cost
        # ~100 ms under load, stopping every pump (bench/MOVES.md). Those fields are written without one;
        # a change of anything else (MAC, services, address: what a takeover after a restart needs) is synced
        old = self._persisted or {}
        durable = self._persisted is None or any(hello.get(k) != old.get(k) for k in set(hello) | set(old)
                                                 if k not in MOVE_FIELDS)
        try:
            save_peer_hello(self.state_dir, hello, sync=durable)
            self._persisted = hello
        except (OSError, TypeError, ValueError) as exc:
            log.warning("cannot save the peer's hello in %s: %s", self.state_dir, exc)


def _dial_error(exc: OSError) -> str:
    """A dial's OSError as the log says it: "connection refused", not "[Errno 111] Connect call failed"."""
    # trio raises "all attempts to connect ... failed" from a group of the errors of each address tried
    cause = exc.__cause__ if getattr(exc, "errno", None) is None and exc.__cause__ is not None else exc
    errors = getattr(cause, "exceptions", None)
    if errors and isinstance(errors[0], OSError):
        exc = errors[0]
    elif isinstance(cause, OSError):
        exc = cause
    if getattr(exc, "errno", None):
        return (os.strerror(exc.errno) or str(exc)).lower()
    return str(exc) or type(exc).__name__


#: hello fields that change with every live move (no fsync when only these changed: see PeerLink._persist)
MOVE_FIELDS = frozenset({"holds", "own_state"})


def save_peer_hello(state_dir: str | os.PathLike[str], hello: dict[str, Any], *, sync: bool = True) -> Path:
    """Write ``state_dir/peer-hello.json`` atomically (temp file, fsync unless ``sync`` is False, rename).

    Why: a node restarted after its peer died must still know the peer's MAC and services to take
    them over, and a crash mid-write must leave the old file, not half a new one.
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / PEER_HELLO_FILE
    tmp = path.with_name(f".{PEER_HELLO_FILE}.{os.getpid()}.tmp")
    data = json.dumps(hello, sort_keys=True, indent=1).encode()
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_peer_hello(state_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The last accepted peer hello saved in ``state_dir``, or None if there is none (or it is unreadable)."""
    path = Path(state_dir) / PEER_HELLO_FILE
    try:
        hello = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return None
    return hello if isinstance(hello, dict) else None
