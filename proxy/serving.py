"""Serving one service address: its listeners, the address itself, the announcement, the drain.

The same object serves a node's own address and, after a takeover, the peer's. The order is what
makes a move fast and clean:

1. listeners are bound first (IP_FREEBIND), so no client segment ever finds the address without a
   socket (which the kernel would answer with a reset);
2. the address is added (on the own interface, or as a /32 on the macvlan with the peer's MAC);
3. gratuitous ARPs tell the clients which MAC to use now (always this node's own MAC);
4. on stop: listeners close, open connections get ``grace`` seconds (0 on hand-back: the owner is
   waiting), the rest are reset, and the address is removed last.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from functools import partial
from typing import Any

import trio

from proxy.arp import announce, announce_now
from proxy.config import ServiceConfig
from proxy.dataplane import ServiceProxy
from proxy.netplane import ServiceAddress

log = logging.getLogger("pairproxy.serving")


class AddressService:
    """Serves ``services`` on ``address`` (placed on ``ifname``) until :meth:`stop`."""

    def __init__(self, address: ipaddress.IPv4Interface, ifname: str, services: tuple[ServiceConfig, ...], *,
                 announce_ifname: str | None = None, announce_mac: str | None = None):
        self.address = address
        self.ifname = ifname
        self.proxies = [ServiceProxy(s, address.ip) for s in services]
        self.announce_ifname = announce_ifname
        self.announce_mac = announce_mac
        self.state = "idle"
        self.started_at: float | None = None
        #: trio time when the address was up and announced (for takeover timing)
        self.address_up_at: float | None = None
        self._stop = trio.Event()
        self._grace = 0.0
        self._connections_scope: trio.CancelScope | None = None
        self._connections: trio.Nursery | None = None
        self._listeners_scope: trio.CancelScope | None = None
        self._listeners: trio.Nursery | None = None

    def stop(self, grace: float) -> None:
        """Stop accepting; open connections get ``grace`` seconds, then are reset."""
        self._grace = grace
        self._stop.set()

    def cut_now(self) -> None:
        """Reset open connections at once (a second signal during the drain)."""
        if self._connections_scope is not None:
            self._connections_scope.cancel()

    def stop_accepting(self) -> None:
        """Close the listeners and go on serving the open connections (a live move's first step)."""
        if self._listeners_scope is not None:
            self._listeners_scope.cancel()

    def resume_accepting(self) -> None:
        """Accept again after :meth:`stop_accepting` (a live move that was called off)."""
        if self._listeners is None or self._connections is None or self.state != "serving":
            return
        if self._listeners_scope is not None and not self._listeners_scope.cancel_called:
            return
        self.open_listeners()
        self._start_accepting()

    def adopt(self, proxy: ServiceProxy, client, backend, port: int, **kwargs: Any) -> None:
        """Pump a connection restored here by a live move or a takeover (while serving); ``kwargs``:
        :meth:`ServiceProxy.adopt`'s counters and anchor."""
        assert self._connections is not None, "adopt needs a serving address"
        proxy.adopt(client, backend, port, self._connections, **kwargs)

    def serve_restored_client(self, proxy: ServiceProxy, client, port: int, **kwargs: Any) -> None:
        """Serve a client leg a takeover restored without a backend leg (the peer had relayed nothing of
        it) as if it had been accepted here; ``kwargs``: :meth:`ServiceProxy.serve_restored_client`'s."""
        assert self._connections is not None, "serve_restored_client needs a serving address"
        proxy.serve_restored_client(client, port, self._connections, **kwargs)

    def active_connections(self) -> int:
        return sum(p.stats.connections_active for p in self.proxies)

    def total_connections(self) -> int:
        return sum(p.stats.connections_total for p in self.proxies)

    def open_listeners(self) -> None:
        """Bind every port now (also before :meth:`run`, so a port in use fails early)."""
        if any(p._listeners for p in self.proxies):
            return
        try:
            for proxy in self.proxies:
                proxy.open_listeners()
        except BaseException:
            self.close_listeners()
            raise

    def close_listeners(self) -> None:
        for proxy in self.proxies:
            proxy.close_listeners()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.state == "stopped":  # served again (a live move brought the address back)
            self._stop = trio.Event()
            self.state = "idle"
        self.open_listeners()
        try:
            with ServiceAddress(self.ifname, self.address):
                if self.announce_ifname and self.announce_mac:
                    # the first frame goes out before we report started, at once (a live move's sockets
                    # go live only then: a client answered before it could send its next request to the
                    # old holder's MAC, where nothing answers); the rest follow in the background
                    announce_now(self.announce_ifname, self.announce_mac, str(self.address.ip))
                    async with trio.open_nursery() as announcing:
                        announcing.start_soon(partial(announce, already=1), self.announce_ifname,
                                              self.announce_mac, str(self.address.ip))
                        self.address_up_at = trio.current_time()
                        await self._serve(task_status)
                        announcing.cancel_scope.cancel()
                else:
                    self.address_up_at = trio.current_time()
                    await self._serve(task_status)
        finally:
            self.close_listeners()
            self.state = "stopped"

    def _start_accepting(self) -> None:
        accepting = self._listeners_scope = trio.CancelScope()
        connections = self._connections

        async def accept_all() -> None:
            with accepting:  # stop_accepting() ends only this, not the wait for stop in _serve
                async with trio.open_nursery() as loops:
                    for proxy in self.proxies:
                        loops.start_soon(proxy.accept_loop, connections)

        self._listeners.start_soon(accept_all)

    async def _serve(self, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as connections:
            self._connections_scope = connections.cancel_scope
            self._connections = connections
            async with trio.open_nursery() as listeners:
                self._listeners = listeners
                self._start_accepting()
                self.state = "serving"
                self.started_at = time.monotonic()
                ports = ", ".join(f"{p.service.name}:{'/'.join(map(str, p.service.ports))}" for p in self.proxies)
                log.info("serving %s on %s (%s)", self.address.ip, self.ifname, ports)
                task_status.started()
                await self._stop.wait()
                listeners.cancel_scope.cancel()
            self._listeners_scope = self._listeners = None
            self.state = "draining"
            active = self.active_connections()
            if active and self._grace > 0:
                log.info("%s: stopped accepting; waiting up to %gs for %d open connection(s)",
                         self.address.ip, self._grace, active)
                with trio.move_on_after(self._grace):
                    while self.active_connections():
                        await trio.sleep(0.05)
            left = self.active_connections()
            if left:
                log.warning("%s: %s %d connection(s) cut", self.address.ip,
                            "grace time over:" if self._grace > 0 else "handing over:", left)
            connections.cancel_scope.cancel()
            self._connections = None
