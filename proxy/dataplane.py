"""Listeners and proxied connections for one service.

A :class:`ServiceProxy` owns the listening sockets of one ``[[service]]`` (its port and its extra
ports) on one service address, and turns every accepted client connection into two
:func:`~proxy.pump.splice_pump` tasks towards the backend.

Why the backend connection leaves from the *service* address (not the node's own address): the
backend then sees the same source for a service whichever node serves it, so when the address moves
to the peer, new backend connections look the same to the file server (and to its export rules).
NFS backends get a source port below 1024 because servers with ``secure`` exports refuse others
(see :class:`SourcePorts` for how 359 such ports serve any number of short connections; a service
with ``secure = false`` lets the kernel pick any port instead).
"""

from __future__ import annotations

import collections

import errno
import ipaddress
import logging
import random
import socket
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable

import trio

from proxy.config import ServiceConfig
from proxy.fds import BUDGET, FdBudget
from proxy import faults, sockmap, tcprepair
from proxy.pump import PIPES, ConnectionLost, Switch, send_all, sockmap_relay, splice_pump
from proxy.rstguard import mark_own_close

log = logging.getLogger("pairproxy.data")

LISTEN_BACKLOG = 1024
# Linux socket options that Python 3.11's socket module does not name (linux/in.h).
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
#: Source ports tried for privileged (NFS) backend connections: the range Linux NFS clients use too.
RESERVED_PORTS = range(665, 1024)
#: Descriptors a proxied connection holds for its whole life: the client and the backend socket.
FDS_PER_CONNECTION = 2
#: how long a new connection of a stateful node's own address waits for its pairing to be on the sync
#: link before its first byte is relayed (:attr:`ServiceProxy.tell_pairing`, else
#: :attr:`ServiceProxy.tell_new_legs`): about one turn of the event loop when it is not busy; bounded, so a
#: stalled pairings task costs a new client no more. 10 ms ran out at load 12 (bench/soak.py: connections
#: relayed unpaired, "it had sent the client bytes")
PAIRING_HOLD = 0.05
#: Descriptors kept free when accepting, so that accepted connections still get pipes to move bytes.
PIPE_HEADROOM = 64
#: Errors that mean "out of descriptors" (or the kernel's socket memory), not a bug.
OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


@dataclass
class ServiceStats:
    """Counters of one service, shown by ``pairproxy status`` (as proxy.status.ServiceStatus)."""

    connections_active: int = 0
    connections_total: int = 0
    bytes_to_backend: int = 0
    bytes_to_client: int = 0
    backend_failures: int = 0
    connections_reset: int = 0
    internal_errors: int = 0
    last_backend_error: str | None = None
    #: connections refused because every source port below 1024 towards the backend was in use
    #: (a ``secure`` service; also counted in backend_failures, the text in last_backend_error)
    source_ports_exhausted: int = 0
    #: not accepting now: the process is near its descriptor limit (new clients wait in the backlog)
    fd_limit_paused: bool = False
    #: how often accepting stopped for that reason
    fd_limit_pauses: int = 0
    #: connections closed because a descriptor could not be had after all (should stay 0)
    fd_errors: int = 0
    #: open connections whose bytes the kernel relays (proxy.sockmap); the rest use the splice pump
    connections_sockmap: int = 0
    #: connections the relay did not take (a leg no longer established, the map full): spliced instead
    sockmap_refused: int = 0
    origins_unknown: int = 0
    #: stateful: new connections whose first bytes were relayed before their pairing was on the sync link
    #: (the hold, PAIRING_HOLD, ran out: a busy loop); if this node dies then, the peer cannot continue them
    pairings_late: int = 0
    #: connections the relay handed to the splice pump mid-way (bulk, or a reader slower than the sender)
    sockmap_switched: int = 0


@dataclass(eq=False)
class Connection:
    client: tuple[str, int]
    port: int
    started: float = field(default_factory=time.monotonic)
    #: for status (proxy.status.proxied_connections): this node's end of the backend leg, bytes each way
    backend_source: tuple[str, int] | None = None
    #: (client, backend) sockets once both legs exist: a stateful node reads their TCP_INFO (proxy.standby)
    legs: tuple | None = None
    #: where the legs' sequence spaces meet, for a connection restored here (proxy.continuation.relay_anchor):
    #: told to the standby with the pairing, which saw no handshake of it
    anchor: tuple[int, int, int, int] | None = None
    bytes_to_backend: int = 0
    bytes_to_client: int = 0
    #: a live move (proxy.livemove): set ``moving`` and cancel ``pumps``; the pumps stop without closing
    #: the sockets, which end up in ``handed`` (client, backend) with the bytes a cancelled pump still
    #: held in ``spilled_to_*``; ``ended`` is set once the connection's task has let go of them
    moving: bool = False
    #: set once the connection's pairing was handed to the sync link (a stateful node's own address:
    #: :attr:`ServiceProxy.tell_new_legs`); None when nobody tells the peer
    told: trio.Event | None = None
    pumps: trio.CancelScope = field(default_factory=trio.CancelScope)
    ended: trio.Event = field(default_factory=trio.Event)
    handed: tuple[socket.socket, socket.socket] | None = None
    spilled_to_backend: bytes = b""
    spilled_to_client: bytes = b""

    #: "sockmap" or "splice": how this connection's bytes move
    byte_path: str = "splice"
    #: while relayed in the kernel: brings bytes_to_* (and the service's) up to date (status calls it)
    refresh: Callable[[], None] | None = None

    def expose_refresh(self, refresh: Callable[[], None] | None) -> None:
        self.refresh = refresh

    def spill_to_backend(self, data: bytes) -> None:
        self.spilled_to_backend += data

    def spill_to_client(self, data: bytes) -> None:
        self.spilled_to_client += data


class BackendUnavailable(Exception):
    """The backend refused, timed out or was unreachable."""


def listen_socket(address: ipaddress.IPv4Address, port: int) -> trio.socket.SocketType:
    """A listening TCP socket on ``address:port``.

    IP_FREEBIND lets the socket exist before the address is on an interface, so a node taking over
    its peer's address can have its listeners ready before the first client segment arrives.
    """
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # bind() on a trio socket is async only for name resolution; a literal address is immediate.
        sock._sock.bind((str(address), port))
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


class SourcePortsExhausted(BackendUnavailable):
    """Every privileged source port towards this backend endpoint is taken by an open connection."""


class SourcePorts:
    """The privileged source ports towards one backend endpoint, least recently used first.

    Why a pool instead of trying random ports: a port held by one of our open connections to the
    same endpoint cannot be used again (the 4-tuple would repeat), so it is simply not offered until
    that connection ends; the next connection gets the port free the longest. Ports that fail for
    reasons outside the pool (another program, a TIME_WAIT without timestamps) go to the back.

    TIME_WAIT: the node usually closes the backend leg first (the client's FIN is passed on), so the
    port sits in TIME_WAIT for 60 s. With SO_REUSEADDR on every backend socket, ``bind()`` to such a
    port succeeds, and ``connect()`` of a socket bound to an explicit port reuses a TIME_WAIT 4-tuple
    at once when the old connection used TCP timestamps (``tcp_twsk_unique`` with no ``twp``: PAWS
    keeps old segments apart), which Linux servers do by default. So short connections cost no ports;
    what limits a ``secure`` service is only how many connections are *open* at once per endpoint.
    (Resetting the backend leg instead would not help: once both FINs are exchanged the kernel has
    already turned our socket into a TIME_WAIT entry, and a reset before that could drop a reply.)
    """

    def __init__(self, ports: Iterable[int]):
        order = list(ports)
        random.shuffle(order)  # two nodes (or restarts) do not start on the same port
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(order)
        self.size = len(order)

    def __len__(self) -> int:
        return len(self._free)

    def take(self) -> int | None:
        """The port free the longest (now in use), or None if every port is in use."""
        return self._free.popitem(last=False)[0] if self._free else None

    def give_back(self, port: int) -> None:
        """``port`` is free again (its connection ended, or it could not be used now)."""
        self._free[port] = None

    def hold(self, port: int) -> None:
        """``port`` is in use by a connection that did not take it from here (a restored one)."""
        self._free.pop(port, None)


def _backend_socket() -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # bind over our own TIME_WAIT entries (see SourcePorts); harmless for kernel-chosen ports
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    except BaseException:
        sock.close()
        raise
    return sock


async def _connect(sock: trio.socket.SocketType, target: tuple[str, int], timeout: float) -> None:
    with trio.move_on_after(timeout) as scope:
        await sock.connect(target)
    if scope.cancelled_caught:
        raise BackendUnavailable(f"{target[0]}:{target[1]}: no answer within {timeout:g}s")


async def connect_backend(service: ServiceConfig, source: ipaddress.IPv4Address, port: int,
                          source_ports: SourcePorts | None = None) -> trio.socket.SocketType:
    """Connect to where the client's ``port`` goes on the backend (see ``ServiceConfig.backend_port``)
    from ``source``; raise BackendUnavailable on failure.

    With ``source_ports`` (a ``secure`` service) the socket is bound to a port taken from that pool;
    the caller gives it back when the connection ends. Without, the kernel picks the port at
    connect time (IP_BIND_ADDRESS_NO_PORT), so one ephemeral port serves many destinations.
    """
    target = (str(service.backend.host), service.backend_port(port))
    where = f"{target[0]}:{target[1]}"
    if source_ports is None:
        sock = _backend_socket()
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            try:
                sock._sock.bind((str(source), 0))
                await _connect(sock, target, service.connect_timeout)
            except OSError as exc:
                raise BackendUnavailable(f"{where}: {exc.strerror}") from None
            return sock
        except BaseException:
            sock.close()
            raise
    busy = 0
    for _ in range(len(source_ports)):
        sock = _backend_socket()
        bound = source_ports.take()
        assert bound is not None
        try:
            try:
                sock._sock.bind((str(source), bound))
                await _connect(sock, target, service.connect_timeout)
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                    # in use by someone else, or a TIME_WAIT we may not reuse: try it again later
                    source_ports.give_back(bound)
                    sock.close()
                    busy += 1
                    continue
                raise BackendUnavailable(f"{where}: {exc.strerror}") from None
            return sock
        except BaseException:
            source_ports.give_back(bound)
            sock.close()
            raise
    held = source_ports.size - len(source_ports)
    raise SourcePortsExhausted(
        f"no free source port below 1024 on {source} towards {where}: of {source_ports.size} ports "
        f"({RESERVED_PORTS.start}-{RESERVED_PORTS.stop - 1}) {held} are held by open connections"
        + (f" and {busy} are busy elsewhere (other sockets, or TIME_WAIT without TCP timestamps)" if busy else "")
        + " (secure = false lifts this limit if the export allows any source port)")


class ServiceProxy:
    """Proxies one service: accepts on its ports, pumps each connection to the backend."""

    def __init__(self, service: ServiceConfig, address: ipaddress.IPv4Address, budget: FdBudget = BUDGET,
                 byte_path: "sockmap.BytePath | None" = None):
        self.service = service
        self.byte_path = byte_path
        self.address = address
        self.budget = budget
        self.stats = ServiceStats()
        self._paused_ports = 0
        self.connections: set[Connection] = set()
        self._listeners: list[tuple[int, trio.socket.SocketType]] = []
        #: trio time of the first accepted client connection (takeover timing: first client served)
        self.first_client_at: float | None = None
        #: connections that just got both legs (client and backend), for the stateful node to tell its
        #: peer their pairing at once (:meth:`proxy.standby.StatefulStandby._send_pairings` takes them);
        #: bounded, as nobody takes them on a stateless node (the periodic full pass finds any left out)
        self.new_legs: collections.deque[Connection] = collections.deque(maxlen=1024)
        #: a stateful node's own address: wakes the task that tells the peer new pairings; each new
        #: connection then waits (at most PAIRING_HOLD) until its pairing is on the sync link before the
        #: first byte is relayed. Why: a connection the server has seen bytes of but the standby has no
        #: pairing for is reset at a takeover (bench/SOAK.md: libnfs mounts failed in the pairing delay);
        #: told first, the standby knows every connection whose bytes may have reached a server
        self.tell_new_legs: Callable[[], None] | None = None
        #: a stateful node's own address: tells the peer one new connection's pairing from that
        #: connection's own task, True once it is on the link (False: it cannot now, e.g. a resync of all
        #: pairings is due: then ``tell_new_legs`` and the wait as before). Why: the hop to the pairings task
        #: cost two turns of the event loop, and in the seconds after a restart (a busy loop) the hold ran
        #: out for most new connections (bench/SOAK.md, 2026-11-29 night: ~60 per protocol per cycle)
        self.tell_pairing: Callable[[Connection], Awaitable[bool]] | None = None
        #: a stateful node's own address: read each new connection's stream origins before its pumps start
        #: (proxy.tcprepair.stream_origins), its anchor for a standby that misses the handshakes (one
        #: restarted after them); a few system calls per connection, off the byte path
        self.learn_origins = False
        #: client ports whose origins are not read (test-only fault injection, :data:`proxy.faults.UNREAD_ORIGINS`)
        self.unread_origins = faults.NO_PORTS
        #: per backend port, for ``secure`` services: the source ports below 1024 free towards it
        self._source_ports: dict[int, SourcePorts] = {}
        self._warned_at = -1e9
        self._unwarned = 0

    def relay(self) -> "sockmap.Relay | None":
        """The in-kernel relay new connections use, or None for the splice pump (the process's choice,
        :data:`proxy.sockmap.ACTIVE`, unless this proxy was given its own ``byte_path``)."""
        path = self.byte_path if self.byte_path is not None else sockmap.ACTIVE
        return path.relay

    def refresh_counters(self) -> None:
        """Bring the byte counters of kernel-relayed connections up to date (read from shared memory)."""
        for conn in self.connections:
            if conn.refresh is not None:
                conn.refresh()

    def source_ports(self, port: int) -> SourcePorts | None:
        """The pool of source ports for connections arriving on ``port`` (None: kernel-chosen)."""
        if not self.service.privileged_source_port:
            return None
        return self._pool(self.service.backend_port(port))

    def _pool(self, target: int) -> SourcePorts:
        pool = self._source_ports.get(target)
        if pool is None:
            # never one of our own listening ports (binding it would fail anyway)
            pool = self._source_ports[target] = SourcePorts(p for p in RESERVED_PORTS if p not in self.service.ports)
        return pool

    def source_pool_towards(self, server: tuple[str, int]) -> SourcePorts | None:
        """The pool of source ports towards ``server`` (host, port) if this proxy connects there from
        chosen ports (a ``secure`` service), else None. A takeover holds the dead peer's backend legs'
        ports in it until each is continued here or reset (:mod:`proxy.takeover`): a new connection from
        one of them would meet the peer's leg still established at the server, and that leg's restore
        would fail (EADDRNOTAVAIL)."""
        if not self.service.privileged_source_port or str(self.service.backend.host) != server[0]:
            return None
        if server[1] not in {self.service.backend_port(p) for p in self.service.ports}:
            return None
        return self._pool(server[1])

    def _warn(self, message: str, *args) -> None:
        """A warning at most once a second per service (a flood of failing clients must not flood
        the log); how many were left out is said in the next one."""
        now = time.monotonic()
        if now - self._warned_at < 1.0:
            self._unwarned += 1
            log.debug(message, *args)
            return
        if self._unwarned:
            message += f" ({self._unwarned} more like it in the last seconds)"
        self._warned_at, self._unwarned = now, 0
        log.warning(message, *args)

    def open_listeners(self) -> None:
        """Bind every port now, so a port in use is reported before the node starts serving."""
        try:
            for port in self.service.ports:
                self._listeners.append((port, listen_socket(self.address, port)))
        except BaseException:
            self.close_listeners()
            raise

    def close_listeners(self) -> None:
        for _, sock in self._listeners:
            sock.close()
        self._listeners.clear()

    async def accept_loop(self, connections: trio.Nursery) -> None:
        """Accept on every port until cancelled; each connection runs in ``connections``.

        Connections live in a nursery of their own so that stopping the listeners (on SIGTERM or
        hand-back) leaves open connections running for the grace time.
        """
        try:
            async with trio.open_nursery() as nursery:
                for port, sock in self._listeners:
                    nursery.start_soon(self._accept_one_port, port, sock, connections)
        finally:
            self.close_listeners()

    async def _room_to_accept(self) -> None:
        """Wait until a new connection's descriptors fit; while they do not, this port does not
        accept (the kernel keeps completing handshakes into the listen backlog) and status says so."""
        if self.budget.try_acquire(FDS_PER_CONNECTION, PIPE_HEADROOM):
            return
        self._paused_ports += 1
        if self._paused_ports == 1:
            self.stats.fd_limit_paused = True
            self.stats.fd_limit_pauses += 1
            self._warn("%s: near the descriptor limit (%d of %d held by %d connections): not accepting "
                       "until connections end; new clients wait in the listen backlog",
                       self.service.name, self.budget.used, self.budget.capacity(), self.stats.connections_active)
        try:
            await self.budget.acquire(FDS_PER_CONNECTION, PIPE_HEADROOM)
        finally:
            self._paused_ports -= 1
            if self._paused_ports == 0:
                self.stats.fd_limit_paused = False
                log.debug("%s: accepting again", self.service.name)  # status shows it; no log flood at the limit

    async def _accept_one_port(self, port: int, listener: trio.socket.SocketType,
                               connections: trio.Nursery) -> None:
        while True:
            await self._room_to_accept()
            try:
                client, peer = await listener.accept()
            except BaseException as exc:
                self.budget.release(FDS_PER_CONNECTION)
                if not isinstance(exc, OSError):
                    raise
                if exc.errno in OUT_OF_FDS:
                    # outside the budget's view (the rest of the process took more than its reserve)
                    self.stats.fd_errors += 1
                    self._warn("%s: accept on port %d: %s; pausing 100 ms", self.service.name, port, exc.strerror)
                    await trio.sleep(0.1)
                    continue
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            if self.first_client_at is None:
                self.first_client_at = trio.current_time()
            connections.start_soon(self._proxy, client, peer, port)

    async def _proxy(self, client: trio.socket.SocketType, peer: tuple[str, int], port: int) -> None:
        """One client connection, holding FDS_PER_CONNECTION of the budget until it ends."""
        try:
            await self._proxy_held(client, peer, port)
        finally:
            self.budget.release(FDS_PER_CONNECTION)

    def _origins_anchor(self, client: Any, backend: Any, peer: tuple[str, int],
                        client_origins: tuple[int, int] | None = None) -> tuple[int, int, int, int] | None:
        """A new connection's anchor (see :attr:`Connection.anchor`) from both legs' stream origins, read
        before anything was written to either: where each direction's byte 0 is on both legs
        (``client_origins``: the client leg's, when known otherwise)."""
        try:
            low, high = self.unread_origins
            if low <= peer[1] <= high:
                raise tcprepair.TcpRepairError("read stream origins", errno.EPERM, f"{faults.UNREAD_ORIGINS} says so")
            client_remote, client_own = client_origins or tcprepair.stream_origins(client)
            backend_remote, backend_own = tcprepair.stream_origins(backend)
        except tcprepair.TcpRepairError as exc:  # (a reset meanwhile, no CAP_NET_ADMIN): continued only if seen
            self.stats.origins_unknown += 1
            self._warn("%s: client %s:%d: stream origins not read (%s); a standby that missed its handshake "
                       "cannot continue it", self.service.name, *peer, exc)
            return None
        return client_remote, backend_own, backend_remote, client_own

    def adopt(self, client: socket.socket, backend: socket.socket, port: int, nursery: trio.Nursery, *,
              peer: tuple[str, int], bytes_to_backend: int = 0, bytes_to_client: int = 0,
              anchor: tuple[int, int, int, int] | None = None) -> None:
        """Serve a connection that a live move (:mod:`proxy.livemove`) or a takeover restored here: both
        legs exist and are live, so only the pumps start (in ``nursery``, the address's connection
        nursery). ``peer``: the client's address and port, from the restored state (not
        ``getpeername``: a client that reset it between going live and here leaves none, and the
        connection must still be named, also in the pairings told to the peer). ``anchor``: see
        :attr:`Connection.anchor`."""
        self.budget.used += FDS_PER_CONNECTION  # the descriptors exist already: book them (released at the end)
        tclient, tbackend = trio.socket.from_stdlib_socket(client), trio.socket.from_stdlib_socket(backend)
        conn = Connection(client=(str(peer[0]), int(peer[1])), port=port, bytes_to_backend=bytes_to_backend,
                          bytes_to_client=bytes_to_client, anchor=anchor)
        source_ports = self.source_ports(port)
        if source_ports is not None:
            source_ports.hold(backend.getsockname()[1])  # in use by the moved connection
        nursery.start_soon(self._proxy_adopted, tclient, tbackend, conn)

    def serve_restored_client(self, client: socket.socket, port: int, nursery: trio.Nursery, *,
                              peer: tuple[str, int], client_origins: tuple[int, int]) -> None:
        """Serve a client leg that a takeover restored with the client's bytes unread and no backend leg
        (the dead peer had relayed nothing of it: :meth:`proxy.continuation.ContinuationBook._fresh`): a
        backend is connected as for a client accepted here. ``client_origins``: the client leg's
        ``(remote ISN + 1, own ISN + 1)`` from the restored state (a restored socket's byte counters
        start at the restore, so :func:`~proxy.tcprepair.stream_origins` cannot tell them)."""
        self.budget.used += FDS_PER_CONNECTION  # as for an accepted client: its descriptor and the backend's to come

        async def serve() -> None:
            try:
                await self._proxy_held(trio.socket.from_stdlib_socket(client), (str(peer[0]), int(peer[1])), port,
                                       client_origins=client_origins)
            finally:
                self.budget.release(FDS_PER_CONNECTION)

        nursery.start_soon(serve)

    async def _proxy_adopted(self, client: trio.socket.SocketType, backend: trio.socket.SocketType,
                             conn: Connection) -> None:
        try:
            await self._proxy_held(client, conn.client, conn.port, backend=backend, conn=conn)
        finally:
            self.budget.release(FDS_PER_CONNECTION)

    async def _proxy_held(self, client: trio.socket.SocketType, peer: tuple[str, int], port: int,
                          backend: trio.socket.SocketType | None = None, conn: Connection | None = None,
                          client_origins: tuple[int, int] | None = None) -> None:
        conn = conn if conn is not None else Connection(client=peer, port=port)
        stats = self.stats
        stats.connections_total += 1
        stats.connections_active += 1
        self.connections.add(conn)
        finished = False
        source_ports = self.source_ports(port)
        held_port: int | None = None
        try:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            keep_alive(client)
            try:
                if backend is None:
                    backend = await connect_backend(self.service, self.address, port, source_ports)
                if source_ports is not None:
                    held_port = backend.getsockname()[1]
            except BackendUnavailable as exc:
                stats.backend_failures += 1
                stats.last_backend_error = str(exc)
                if isinstance(exc, SourcePortsExhausted):
                    stats.source_ports_exhausted += 1
                self._warn("%s: client %s:%d: backend unavailable: %s; closing the client",
                           self.service.name, *peer, exc)
                finished = True  # nothing was sent either way: a plain FIN tells the client cleanly
                return
            conn.backend_source = backend.getsockname()
            conn.legs = (client, backend)
            if self.learn_origins and conn.anchor is None:
                conn.anchor = self._origins_anchor(client, backend, peer, client_origins)
            self.new_legs.append(conn)
            tell_now, tell = self.tell_pairing, self.tell_new_legs
            if tell_now is not None or tell is not None:
                conn.told = trio.Event()
                with trio.move_on_after(PAIRING_HOLD):
                    if tell_now is not None and await tell_now(conn):
                        conn.told.set()  # (the send itself is never cut short: it returned, so it is out)
                    elif tell is not None:
                        tell()
                        await conn.told.wait()
                if not conn.told.is_set():
                    stats.pairings_late += 1
                    self._warn("%s: client %s:%d relayed before its pairing was on the sync link (waited %.0f ms; "
                               "%d so far): if this node dies now, the peer can continue it only if the frames "
                               "name its backend leg", self.service.name, *peer, PAIRING_HOLD * 1000,
                               stats.pairings_late)

            def to_backend(n: int) -> None:
                stats.bytes_to_backend += n
                conn.bytes_to_backend += n

            def to_client(n: int) -> None:
                stats.bytes_to_client += n
                conn.bytes_to_client += n

            def counts(b: int, c: int) -> None:
                to_backend(b)
                to_client(c)

            try:
                with conn.pumps:
                    relay = self.relay()
                    relayed = False
                    if relay is not None:
                        try:
                            conn.byte_path = "sockmap"
                            stats.connections_sockmap += 1
                            relayed = await sockmap_relay(relay, client, backend, counts,
                                                          (conn.spill_to_backend, conn.spill_to_client),
                                                          conn.expose_refresh, careful=lambda: conn.moving)
                        finally:
                            stats.connections_sockmap -= 1
                        if isinstance(relayed, Switch):
                            # the relay handed it over (bulk, or a slow reader): what it held goes first
                            conn.byte_path = "splice"
                            stats.sockmap_switched += 1
                            try:
                                await send_all(backend, relayed.to_backend, conn.spill_to_backend)
                                to_backend(len(relayed.to_backend))
                            except trio.Cancelled:
                                conn.spill_to_client(relayed.to_client)  # not begun: all of it
                                raise
                            await send_all(client, relayed.to_client, conn.spill_to_client)
                            to_client(len(relayed.to_client))
                            relayed = False
                        elif not relayed:
                            stats.sockmap_refused += 1
                            conn.byte_path = "splice"
                    if not relayed:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(splice_pump, client, backend, to_backend, PIPES, conn.spill_to_backend)
                            nursery.start_soon(splice_pump, backend, client, to_client, PIPES, conn.spill_to_client)
                    finished = True
                if conn.moving and not finished:  # stopped for a live move: the sockets go to the mover
                    conn.handed = (socket.socket(fileno=client.detach()), socket.socket(fileno=backend.detach()))
                    client = backend = None
            except* ConnectionLost as group:
                stats.connections_reset += 1
                log.debug("%s: client %s:%d: %s", self.service.name, *peer, group.exceptions[0])
        except OSError as exc:
            if exc.errno not in OUT_OF_FDS:
                stats.internal_errors += 1
                log.exception("%s: client %s:%d: internal error; connection closed", self.service.name, *peer)
            else:
                # the budget should prevent this; if the rest of the process used more, say so briefly
                stats.fd_errors += 1
                self._warn("%s: client %s:%d: %s; connection closed", self.service.name, *peer, exc.strerror)
        except Exception:
            # A bug in handling one connection must not take the node and every other client down.
            stats.internal_errors += 1
            log.exception("%s: client %s:%d: internal error; connection closed", self.service.name, *peer)
        finally:
            self.connections.discard(conn)
            stats.connections_active -= 1
            conn.ended.set()
            for sock in (client, backend):
                if sock is None:
                    continue
                mark_own_close(sock)  # a deliberate close: its FIN/RST passes the FIN/RST guard (proxy.rstguard)
                if not finished:
                    abort_on_close(sock)
                sock.close()
            if held_port is not None:
                source_ports.give_back(held_port)


#: TCP keepalive on client connections: idle seconds, probe interval, probes (about 50 s in all)
KEEPALIVE = (30, 5, 4)


def keep_alive(sock) -> None:
    """Notice a client that is gone without a word. Another node may have answered for this address
    for a while (a false takeover) and reset the client there; this node's connection then waits for
    a request that never comes, holding its descriptors and tasks (bench/SOAK.md: hundreds after a
    few dozen such flaps)."""
    idle, interval, count = KEEPALIVE
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)


def abort_on_close(sock: trio.socket.SocketType) -> None:
    """Make ``close()`` send RST and free the socket at once.

    For connections that end abnormally (the other side reset, the grace time ran out, a bug): a
    plain close would leave unsent data and a FIN-WAIT socket retrying for minutes, possibly from
    an address the node no longer holds; the RST also tells the other side at once.
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
