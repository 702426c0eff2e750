"""One pairproxy node: its service address, its services' proxies and its control socket.

A node is one trio nursery. Order of start-up matters and is deliberate:
1. control socket (so a second node with the same config fails before touching the kernel),
2. listening sockets, bound with IP_FREEBIND before the address exists (a port in use fails here),
3. the service address (from now on clients are served),
and shutdown runs the other way: stop accepting, let open connections finish for ``grace``
seconds, cut what is left, remove the address, remove the control socket.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import trio

from proxy.config import Config
from proxy.control import bind_control_socket, serve_control
from proxy.dataplane import ServiceProxy
from proxy.netplane import ServiceAddress

log = logging.getLogger("pairproxy.node")


class Node:
    """Runs one node's services until :meth:`stop` (or SIGTERM/SIGINT when handling signals)."""

    def __init__(self, config: Config):
        self.config = config
        self.proxies = [ServiceProxy(s, config.node.address.ip) for s in config.services]
        self.state = "starting"
        self.started_at: float | None = None
        self._stop = trio.Event()
        self._connections_scope: trio.CancelScope | None = None

    def stop(self) -> None:
        """Stop accepting; open connections get the configured grace time."""
        self._stop.set()

    async def run(self, *, handle_signals: bool = True,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        node = self.config.node
        node.state_dir.mkdir(parents=True, exist_ok=True)
        control = bind_control_socket(node.control)
        try:
            for proxy in self.proxies:
                proxy.open_listeners()
            with ServiceAddress(node.interface, node.address):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(serve_control, control, node.control, {"status": self._status})
                    if handle_signals:
                        nursery.start_soon(self._watch_signals)
                    await self._serve(task_status)
                    nursery.cancel_scope.cancel()
        finally:
            control.close()
            for proxy in self.proxies:
                proxy.close_listeners()
            self.state = "stopped"
        log.info("node %s stopped", node.name)

    async def _serve(self, task_status: trio.TaskStatus[None]) -> None:
        node = self.config.node
        async with trio.open_nursery() as connections:
            self._connections_scope = connections.cancel_scope
            async with trio.open_nursery() as listeners:
                for proxy in self.proxies:
                    listeners.start_soon(proxy.accept_loop, connections)
                self.state = "serving"
                self.started_at = time.monotonic()
                ports = ", ".join(f"{p.service.name}:{'/'.join(map(str, p.service.ports))}" for p in self.proxies)
                log.info("node %s serving %s on %s (%s)", node.name, node.address.ip, node.interface, ports)
                task_status.started()
                await self._stop.wait()
                listeners.cancel_scope.cancel()
            self.state = "draining"
            active = self._active_connections()
            if active:
                log.info("stopped accepting; waiting up to %gs for %d open connection(s)", node.grace, active)
                with trio.move_on_after(node.grace):
                    while self._active_connections():
                        await trio.sleep(0.05)
                left = self._active_connections()
                if left:
                    log.warning("grace time over: %d connection(s) cut", left)
            connections.cancel_scope.cancel()

    def _active_connections(self) -> int:
        return sum(p.stats.connections_active for p in self.proxies)

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if self._stop.is_set() and self._connections_scope is not None:
                    log.warning("%s again: cutting open connections now", signal.Signals(signum).name)
                    self._connections_scope.cancel()
                    continue
                log.info("%s: stopping", signal.Signals(signum).name)
                self.stop()

    async def _status(self, request: dict) -> dict:
        return self.status()

    def status(self) -> dict:
        node = self.config.node
        return {
            "node": node.name,
            "pid": os.getpid(),
            "state": self.state,
            "interface": node.interface,
            "address": str(node.address),
            "uptime": round(time.monotonic() - self.started_at, 3) if self.started_at else 0.0,
            "services": [p.status() for p in self.proxies],
        }
