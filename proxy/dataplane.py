"""Listeners and proxied connections for one service.

A :class:`ServiceProxy` owns the listening sockets of one ``[[service]]`` (its port and its extra
ports) on one service address, and turns every accepted client connection into two
:func:`~proxy.pump.splice_pump` tasks towards the backend.

Why the backend connection leaves from the *service* address (not the node's own address): the
backend then sees the same source for a service whichever node serves it, so when the address moves
to the peer, new backend connections look the same to the file server (and to its export rules).
NFS backends get a source port below 1024 because servers with ``secure`` exports refuse others.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import random
import socket
import struct
import time
from dataclasses import dataclass, field

import trio

from proxy.config import ServiceConfig
from proxy.pump import ConnectionLost, splice_pump

log = logging.getLogger("pairproxy.data")

LISTEN_BACKLOG = 1024
# Linux socket options that Python 3.11's socket module does not name (linux/in.h).
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
#: Source ports tried for privileged (NFS) backend connections: the range Linux NFS clients use too.
RESERVED_PORTS = range(665, 1024)


@dataclass
class ServiceStats:
    """Counters of one service, shown by ``pairproxy status``."""

    connections_active: int = 0
    connections_total: int = 0
    bytes_to_backend: int = 0
    bytes_to_client: int = 0
    backend_failures: int = 0
    connections_reset: int = 0
    internal_errors: int = 0
    last_backend_error: str | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(eq=False)
class Connection:
    client: tuple[str, int]
    port: int
    started: float = field(default_factory=time.monotonic)


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


async def connect_backend(service: ServiceConfig, source: ipaddress.IPv4Address,
                          port: int) -> trio.socket.SocketType:
    """Connect to where the client's ``port`` goes on the backend (see ``ServiceConfig.backend_port``)
    from ``source``; raise BackendUnavailable on failure."""
    port = service.backend_port(port)
    target = (str(service.backend.host), port)
    sources = ([(str(source), p) for p in random.sample(RESERVED_PORTS, len(RESERVED_PORTS))]
               if service.privileged_source_port else [(str(source), 0)])
    for bind_to in sources:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if bind_to[1] == 0:
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            try:
                sock._sock.bind(bind_to)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    sock.close()
                    continue
                raise BackendUnavailable(f"cannot bind to {bind_to[0]}:{bind_to[1]}: {exc.strerror}") from None
            with trio.move_on_after(service.connect_timeout) as timeout:
                try:
                    await sock.connect(target)
                except OSError as exc:
                    if exc.errno == errno.EADDRNOTAVAIL and bind_to[1]:
                        sock.close()
                        continue
                    raise BackendUnavailable(f"{target[0]}:{port}: {exc.strerror}") from None
            if timeout.cancelled_caught:
                raise BackendUnavailable(f"{target[0]}:{port}: no answer within {service.connect_timeout:g}s")
            return sock
        except BaseException:
            sock.close()
            raise
    raise BackendUnavailable(f"no free source port below 1024 on {source}")


class ServiceProxy:
    """Proxies one service: accepts on its ports, pumps each connection to the backend."""

    def __init__(self, service: ServiceConfig, address: ipaddress.IPv4Address):
        self.service = service
        self.address = address
        self.stats = ServiceStats()
        self.connections: set[Connection] = set()
        self._listeners: list[tuple[int, trio.socket.SocketType]] = []
        #: trio time of the first accepted client connection (takeover timing: first client served)
        self.first_client_at: float | None = None

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

    async def _accept_one_port(self, port: int, listener: trio.socket.SocketType,
                               connections: trio.Nursery) -> None:
        while True:
            try:
                client, peer = await listener.accept()
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("%s: accept on port %d: %s; pausing 100 ms", self.service.name, port, exc)
                    await trio.sleep(0.1)
                    continue
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            if self.first_client_at is None:
                self.first_client_at = trio.current_time()
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connections.start_soon(self._proxy, client, peer, port)

    async def _proxy(self, client: trio.socket.SocketType, peer: tuple[str, int], port: int) -> None:
        conn = Connection(client=peer, port=port)
        stats = self.stats
        stats.connections_total += 1
        stats.connections_active += 1
        self.connections.add(conn)
        backend = None
        finished = False
        try:
            try:
                backend = await connect_backend(self.service, self.address, port)
            except BackendUnavailable as exc:
                stats.backend_failures += 1
                stats.last_backend_error = str(exc)
                log.warning("%s: client %s:%d: backend unavailable: %s; closing the client",
                            self.service.name, *peer, exc)
                finished = True  # nothing was sent either way: a plain FIN tells the client cleanly
                return

            def to_backend(n: int) -> None:
                stats.bytes_to_backend += n

            def to_client(n: int) -> None:
                stats.bytes_to_client += n

            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(splice_pump, client, backend, to_backend)
                    nursery.start_soon(splice_pump, backend, client, to_client)
                finished = True
            except* ConnectionLost as group:
                stats.connections_reset += 1
                log.debug("%s: client %s:%d: %s", self.service.name, *peer, group.exceptions[0])
        except Exception:
            # A bug in handling one connection must not take the node and every other client down.
            stats.internal_errors += 1
            log.exception("%s: client %s:%d: internal error; connection closed", self.service.name, *peer)
        finally:
            self.connections.discard(conn)
            stats.connections_active -= 1
            for sock in (client, backend):
                if sock is None:
                    continue
                if not finished:
                    abort_on_close(sock)
                sock.close()

    def status(self) -> dict:
        return {
            "name": self.service.name,
            "protocol": self.service.protocol,
            "address": str(self.address),
            "ports": list(self.service.ports),
            "backend": str(self.service.backend),
            **self.stats.as_dict(),
        }


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
