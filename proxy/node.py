"""One pairproxy node: its own service address, and (in a pair) its standby for the peer's.

A node is one trio nursery. Alone, it serves its own address until SIGTERM. In a pair it also runs
the sync link (:class:`sync.link.PeerLink`), the failure detector (:mod:`sync.detector`, fed by the
link and by the UDP probe of :mod:`proxy.probe`) and the role state machine (:mod:`proxy.roles`),
and it executes what the roles decide:

* own address ``serving``   -> :class:`~proxy.serving.AddressService` on the own interface;
* own address ``yielded``   -> ask the peer to hand it back;
* peer address ``holding``  -> macvlan with the peer's MAC, the peer's address as /32 on it, the
  peer's services (from its hello, persisted in ``state_dir``) towards the peer's backends, and
  gratuitous ARPs with this node's own MAC;
* peer address ``releasing`` -> stop those services at once, remove the address and the macvlan,
  tell the peer it may claim.

Every decision runs in one task (``_decide``) that takes events from a memory channel, so role
changes never interleave; the slow parts (starting services) run as tasks it starts and awaits.
One log line per state change, with the reason.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import trio

from proxy import roles
from proxy.arp import announce
from proxy.config import Config, ConfigError, service_to_dict, services_from_dicts
from proxy.control import bind_control_socket, serve_control
from proxy.netplane import PeerMacvlan, interface_mac, remove_leftovers
from proxy.serving import AddressService

log = logging.getLogger("pairproxy.node")

VERSION = 1


@dataclass
class Takeover:
    """The timing of one takeover, for status (trio clock seconds; None: not yet)."""

    address: str
    last_heard_at: float | None
    detected_at: float
    wall_time: float
    address_up_at: float | None = None
    first_client_at: float | None = None
    released_at: float | None = None
    resets: int = 0
    backend_resets: int = 0
    resume: list | None = None  # stateful: the resume report as it stood at the hand-back

    def as_dict(self) -> dict:
        def ms(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else round((b - a) * 1000, 1)

        return {
            "address": self.address,
            "when": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.wall_time)),
            "silence_ms": ms(self.last_heard_at, self.detected_at),
            "address_moved_ms": ms(self.detected_at, self.address_up_at),
            "first_client_ms": ms(self.detected_at, self.first_client_at),
            "held_for_s": None if self.released_at is None else round(self.released_at - self.detected_at, 3),
            "clients_reset": self.resets,
            "backend_connections_reset": self.backend_resets,
        }


def count_tasks() -> int:
    """How many trio tasks this node runs (status shows it, so leaks across takeovers are visible)."""
    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks)

    return walk(trio.lowlevel.current_root_task())


class Node:
    """Runs one node until :meth:`stop` (or SIGTERM/SIGINT when handling signals)."""

    def __init__(self, config: Config, key: bytes | None = None):
        self.config = config
        node = config.node
        self.mac = interface_mac(node.interface)
        self.own = AddressService(node.address, node.interface, config.services,
                                  announce_ifname=node.interface, announce_mac=self.mac)
        self.state = "starting"
        self.started_at: float | None = None
        self._stop = trio.Event()
        self._signals = 0
        # the pair
        self.key = key
        self.roles = roles.PairRoles() if config.peer else None
        self.link = None
        self.detector = None
        self.probe_responder = None
        self.peer_info: dict[str, Any] | None = None
        self.peer_service: AddressService | None = None
        self.macvlan: PeerMacvlan | None = None
        self.takeovers: list[Takeover] = []
        self._dead_at: float | None = None  # trio time of the last death verdict (or "leaving")
        self._events_tx, self._events_rx = trio.open_memory_channel[tuple[str, Any]](1000)
        self._nursery: trio.Nursery | None = None
        self._own_done = trio.Event()
        self._peer_done: trio.Event | None = None
        self.rejected_events = 0
        # stateful mode
        self.observer = None        # proxy.observer.ObserverProcess: snoopers and decoders
        self.stateful_addresses: dict[str, str] = {}   # view name -> address
        self.view_sync = None
        self._prefetched: tuple[float | None, list, list] | None = None  # see _prefetch_peer_state
        self.resets_sent = 0

    # -- life cycle ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop accepting; open connections get the configured grace time."""
        if not self._stop.is_set():
            self._stop.set()
            self._post("stop", None)

    async def run(self, *, handle_signals: bool = True,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        node = self.config.node
        node.state_dir.mkdir(parents=True, exist_ok=True)
        control = bind_control_socket(node.control)
        try:
            self.own.open_listeners()  # a port in use fails here, before any kernel change
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(serve_control, control, node.control, {"status": self._status})
                if handle_signals:
                    nursery.start_soon(self._watch_signals)
                if self.config.peer is None:
                    await nursery.start(self._run_own)
                    self.state = "serving"
                else:
                    await self._start_pair(nursery)
                self.started_at = time.monotonic()
                task_status.started()
                if self.config.peer is None:
                    await self._stop.wait()
                else:
                    await self._decide()
                await self._shutdown()
                nursery.cancel_scope.cancel()
        finally:
            control.close()
            self.own.close_listeners()
            if self.macvlan is not None:
                self.macvlan.close()
            self.state = "stopped"
        log.info("node %s stopped", node.name)

    async def _run_own(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self.own.run(task_status=task_status)
        finally:
            self._own_done.set()

    async def _shutdown(self) -> None:
        self.state = "stopping"
        grace = self.config.node.grace
        waits = []
        if self.own.state in ("serving", "draining"):
            self.own.stop(grace)
            waits.append(self._own_done)
        if self.peer_service is not None and self._peer_done is not None:
            self.peer_service.stop(grace)
            waits.append(self._peer_done)
        for done in waits:
            await done.wait()
        if self.link is not None and self.roles is not None and self.roles.own == roles.SERVING:
            # a planned stop: the peer may take the address now instead of after dead_after
            await self._send({"type": "leaving", "address": str(self.config.node.address.ip)})

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                self._signals += 1
                if self._signals > 1:
                    log.warning("%s again: cutting open connections now", name)
                    self.own.cut_now()
                    if self.peer_service is not None:
                        self.peer_service.cut_now()
                    continue
                log.info("%s: stopping", name)
                self.stop()

    # -- the pair ------------------------------------------------------------------------------

    def hello(self) -> dict[str, Any]:
        """What this node tells its peer (patent element 300), and what the peer persists."""
        node = self.config.node
        holds = []
        if self.roles is not None and self.roles.serves_own:
            holds.append(str(node.address.ip))
        if self.roles is not None and self.roles.holds_peer:
            holds.append(str(self.config.peer.address))
        return {
            "name": node.name, "mode": self.config.pair.mode, "version": VERSION,
            "mac": self.mac, "address": str(node.address), "interface": node.interface,
            "services": [service_to_dict(s) for s in self.config.services],
            "holds": holds, "own_state": self.roles.own if self.roles else None,
        }

    async def _start_pair(self, nursery: trio.Nursery) -> None:
        from proxy.probe import ProbeResponder, probe
        from sync.detector import FailureDetector, watch
        from sync.link import PeerLink, load_peer_hello

        peer, pair, node = self.config.peer, self.config.pair, self.config.node
        for what in remove_leftovers(node.interface, node.address, peer.macvlan):
            log.warning("removed %s left by an earlier run: not serving before the peer is asked", what)
        self.peer_info = load_peer_hello(node.state_dir)
        if self.peer_info:
            log.info("peer %s known from its last hello (MAC %s)", peer.name, self.peer_info.get("mac"))
        self.link = PeerLink(
            node.name, peer.name, listen=(str(peer.listen.host), peer.listen.port),
            dial=(str(peer.link.host), peer.link.port), key=self.key, hello=self.hello(),
            on_message=lambda m: self._post("message", m), on_hello=lambda h: self._post("hello", h),
            heartbeat=pair.heartbeat, dead_after=pair.dead_after, idle_timeout=3 * pair.dead_after,
            state_dir=node.state_dir)
        self.detector = FailureDetector(pair.dead_after, probe_after=pair.dead_after / 2)
        self.probe_responder = ProbeResponder(self.key, str(node.address.ip), peer.probe_port)
        await nursery.start(self.link.run)
        nursery.start_soon(self.probe_responder.serve)
        if pair.mode == "stateful":
            await self._start_stateful(nursery)

        async def probe_peer() -> bool:
            # answered within half of dead_after, so a probe started at probe_after reports in time
            return await probe(self.key, str(node.address.ip), str(peer.address), peer.probe_port,
                               timeout=pair.dead_after / 2 * 0.9)

        async def detect() -> None:
            # A starting node gives its peer claim_wait to show up before silence can mean death:
            # both nodes of a pair often start together.
            with trio.move_on_after(pair.claim_wait):
                await self.link.wait_connected()
            await watch(self.detector, probe_peer, lambda a: self._post("detector", a),
                        heard=lambda: self.link.last_received, tick_every=min(0.005, pair.heartbeat / 4),
                        probe_timeout=pair.dead_after / 2)

        nursery.start_soon(detect)
        nursery.start_soon(self._claim_when_alone)
        self.state = "pair"
        log.info("node %s: pair with %s (%s mode), claiming %s", node.name, peer.name, pair.mode, node.address.ip)

    # -- stateful mode --------------------------------------------------------------------------

    def _peer_ports(self) -> list[int]:
        try:
            services = services_from_dicts((self.peer_info or {}).get("services", []))
        except ConfigError:
            services = ()
        ports = [p for s in services for p in s.ports] or [p for s in self.config.services for p in s.ports]
        return sorted(set(ports))

    def _peer_backends(self) -> list[tuple[str, int]]:
        """(host, port) of every backend endpoint the peer's services connect to."""
        try:
            services = services_from_dicts((self.peer_info or {}).get("services", []))
        except ConfigError:
            services = ()
        services = services or self.config.services
        return sorted({(str(s.backend.host), s.backend_port(p)) for s in services for p in s.ports})

    async def _start_stateful(self, nursery: trio.Nursery) -> None:
        """Snoop both addresses from the start (patent FIG. 3): the own one as the active node sees
        it, the peer's as a silent observer (element 310), and compare notes with the peer. The
        snooping and decoding run in a child process (proxy.observer), off this event loop."""
        from proxy.observer import ObserverProcess
        from proxy.stateful import ViewSync

        node, peer = self.config.node, self.config.peer
        backends = self._peer_backends()
        views = {
            "own": {"address": str(node.address.ip), "ports": [p for s in self.config.services for p in s.ports]},
            "peer": {"address": str(peer.address), "ports": self._peer_ports()},
            # the peer's own connections to its backends: reset at takeover, or the file server
            # keeps their sessions and opens (sharing violations for the reconnecting clients)
            "peer_backend": {"address": str(peer.address), "ports": sorted({port for _, port in backends}),
                             "as_client_of": sorted({host for host, _ in backends})},
        }
        self.stateful_addresses = {name: v["address"] for name, v in views.items()}
        self.view_sync = ViewSync()
        # 128 MiB: with 8 MiB a bulk transfer through the lab lost a fifth of its frames (bench/SNOOPER.md)
        self.observer = ObserverProcess(node.interface, views, rcvbuf=128 << 20)
        # started in the background: the node claims its address meanwhile (the child needs a second
        # or so to import its decoders); until it is ready a takeover is a stateless one
        nursery.start_soon(self._run_observer)
        self._open_standby_macvlan()
        nursery.start_soon(self._send_digests)
        log.info("stateful: snooping %s (own) and %s (peer) on %s", node.address.ip, peer.address, node.interface)

    async def _prefetch_peer_state(self, force: bool = False) -> None:
        """While the peer is silent, fetch what a takeover needs from the observer: its live client and
        backend connections, and a resume watcher armed with who had what.

        Exact for the resets even before the verdict: they carry the *peer's* next sequence numbers,
        and a silent peer sends nothing more. Fetching it here, not after the verdict, keeps the
        observer's round trips out of the takeover's critical path; and it must be before the address
        moves, or new clients' connections would be reset too.
        """
        if self.observer is None or not self.observer.ready.is_set():
            return
        if not force and self.roles.peer != roles.STANDBY:
            return
        silence = self.detector.last_heartbeat  # the same silence as long as no heartbeat came
        if self._prefetched is not None and self._prefetched[0] == silence:
            return
        lost = await self._observe("live", "peer", [])
        lost_backend = await self._observe("live", "peer_backend", [])
        await self._observe("watch", "peer")
        self._prefetched = (silence, lost, lost_backend)

    async def _run_observer(self) -> None:
        from proxy.observer import ObserverError

        try:
            await self.observer.run()
        except (ObserverError, OSError) as exc:
            self.observer.failed = str(exc)
            log.error("stateful: %s; this node keeps no state of its peer's connections", exc)

    async def _observe(self, op: str, view: str | None = None, default: Any = None) -> Any:
        """Ask the observer; ``default`` (and a log line) if it cannot answer."""
        from proxy.observer import ObserverError

        try:
            return await self.observer.request(op, **({"view": view} if view else {}))
        except ObserverError as exc:
            log.warning("stateful: %s", exc)
            return default

    def _open_standby_macvlan(self) -> None:
        """Stateful standby: the macvlan with the peer's MAC exists from the start, without address."""
        if self.macvlan is None and self.peer_info and self.peer_info.get("mac"):
            self.macvlan = PeerMacvlan(self.config.node.interface, self.config.peer.macvlan,
                                       self.peer_info["mac"]).open()

    async def _send_digests(self) -> None:
        await self.observer.ready.wait()
        while True:
            await trio.sleep(0.25)
            ours = await self._observe("digest", "own")
            if ours is not None:
                await self._send({"type": "digest", "address": self.stateful_addresses["own"], **ours})

    async def _on_state_message(self, message: dict) -> None:
        kind = message.get("type")
        if self.observer is None:
            return
        own, peer = self.stateful_addresses["own"], self.stateful_addresses["peer"]
        if kind == "digest" and message.get("address") == peer:
            ours = await self._observe("digest", "peer")
            if ours is not None and self.view_sync.on_peer_digest(message, ours, trio.current_time()):
                await self._send({"type": "snapshot_request", "address": peer})
        elif kind == "snapshot_request" and message.get("address") == own:
            snap = await self._observe("snapshot", "own", {"connections": []})
            for c in snap["connections"]:
                c.pop("tcp", None)
                c.pop("smb", None)
            await self._send({"type": "snapshot", "address": own, "snapshot": {"connections": snap["connections"]}})
        elif kind == "snapshot" and message.get("address") == peer:
            ours = await self._observe("snapshot", "peer", {"connections": []})
            self.view_sync.on_peer_snapshot(message.get("snapshot") or {}, ours)

    def _reset_clients(self, connections: list[dict], toward: str = "client") -> int:
        """Send each of the dead peer's clients (or its backend servers) a valid RST (see
        proxy.stateful.reset_frames)."""
        import socket as socket_module

        from proxy.stateful import reset_frames

        sent = 0
        with socket_module.socket(socket_module.AF_INET, socket_module.SOCK_RAW, socket_module.IPPROTO_RAW) as raw:
            for client_ip, packet in reset_frames(connections, toward):
                try:
                    raw.sendto(packet, (client_ip, 0))
                    sent += 1
                except OSError as exc:
                    log.warning("RST to %s not sent: %s", client_ip, exc)
        return sent

    def _post(self, kind: str, payload: Any) -> None:
        try:
            self._events_tx.send_nowait((kind, payload))
        except trio.WouldBlock:
            self.rejected_events += 1
            log.error("event queue full: %s dropped", kind)

    async def _claim_when_alone(self) -> None:
        """Claim the own address if the peer stays unreachable and nobody answers ARP for it."""
        from proxy.arp import who_has

        node, pair = self.config.node, self.config.pair
        await trio.sleep(pair.claim_wait)
        while self.roles.own == roles.CLAIMING:
            if self.link.state != "connected":
                holders = await who_has(node.interface, self.mac, str(node.address.ip))
                if not holders:
                    self._post("claim", "no word from the peer and no ARP answer for the address")
                    return
                log.warning("%s: no word from the peer, but %s answers ARP for it: not claiming",
                            node.address.ip, ", ".join(sorted(holders)))
            await trio.sleep(pair.claim_wait)

    async def _decide(self) -> None:
        """The one task that changes roles: events in, transitions executed, until stop."""
        from sync.detector import PeerAlive, PeerDead, StartProbe

        peer, node = self.config.peer, self.config.node
        async for kind, payload in self._events_rx:
            if kind == "stop":
                return
            if kind == "hello":
                self.peer_info = payload
                if self.observer is not None:
                    self._open_standby_macvlan()
                holds = set(payload.get("holds") or [])
                log.info("hello from %s: MAC %s, serving %s", peer.name, payload.get("mac"),
                         ", ".join(sorted(holds)) or "nothing")
                if str(node.address.ip) in holds:
                    if self.roles.own == roles.YIELDED:
                        await self._send({"type": "handback_request", "address": str(node.address.ip)})
                    elif self.roles.own == roles.SERVING:
                        log.warning("%s serves %s too (it declared this node dead): it must let go",
                                    peer.name, node.address.ip)
                    await self._apply(roles.PEER_HOLDS_MINE, f"{peer.name} serves {node.address.ip}")
                else:
                    await self._apply(roles.PEER_DOES_NOT_HOLD_MINE, f"{peer.name} does not serve {node.address.ip}")
                if str(peer.address) in holds and payload.get("own_state") == roles.SERVING:
                    await self._apply(roles.OWNER_SERVES, f"{peer.name} serves {peer.address} itself")
            elif kind == "message":
                await self._on_message(payload)
            elif kind == "detector":
                if isinstance(payload, PeerDead):
                    self._dead_at = trio.current_time()
                    await self._apply(roles.PEER_DEAD, f"peer {peer.name} silent {payload.silent_for * 1000:.0f} ms "
                                                       f"and no answer to the probe")
                elif isinstance(payload, StartProbe):
                    await self._prefetch_peer_state()
                elif isinstance(payload, PeerAlive):
                    self._prefetched = None
                    if self.observer is not None and self.roles.peer == roles.STANDBY:
                        await self._observe("unwatch")
                    log.info("peer %s is alive again", peer.name)
                    info = self.peer_info or {}
                    if str(peer.address) in (info.get("holds") or []) and info.get("own_state") == roles.SERVING:
                        # the verdict was wrong (the peer only stalled): it never stopped serving
                        await self._apply(roles.OWNER_SERVES, f"{peer.name} was only late; it serves "
                                                              f"{peer.address} itself")
            elif kind == "claim":
                await self._apply(roles.NOBODY_ANSWERS, payload)

    async def _send(self, message: dict) -> None:
        if not await self.link.send(message):
            log.debug("not sent (no link): %s", message["type"])

    async def _on_message(self, message: dict) -> None:
        peer, node = self.config.peer, self.config.node
        kind, address = message.get("type"), message.get("address")
        if kind == "handback_request":
            if address != str(peer.address):
                log.warning("hand-back request for %r, which is not %s's address: ignored", address, peer.name)
                return
            if self.roles.peer == roles.STANDBY:
                await self._send({"type": "handback_done", "address": address})
                return
            await self._apply(roles.HANDBACK_REQUESTED, f"{peer.name} is back and asks for {address}")
        elif kind == "handback_done":
            if address == str(node.address.ip):
                if self.roles.own == roles.SERVING:
                    # the peer let go after serving this address too: clients may hold its MAC
                    self._nursery.start_soon(announce, node.interface, self.mac, address)
                await self._apply(roles.PEER_RELEASED_MINE, f"{peer.name} let go of {address}")
        elif kind == "leaving":
            if address == str(peer.address):
                self._dead_at = trio.current_time()
                await self._apply(roles.PEER_DEAD, f"{peer.name} is stopping and has let go of {address}")
        elif kind in ("digest", "snapshot_request", "snapshot"):
            await self._on_state_message(message)
        else:
            log.debug("message %r ignored", kind)

    async def _apply(self, event: str, reason: str) -> None:
        for t in self.roles.handle(event):
            log.info("%s address: %s -> %s (%s)", t.machine, t.old, t.new, reason)
            if t.machine == "own" and t.new == roles.SERVING:
                await self._nursery.start(self._run_own)
                self.state = "pair"
            elif t.machine == "own" and t.new == roles.YIELDED:
                await self._send({"type": "handback_request", "address": str(self.config.node.address.ip)})
            elif t.machine == "peer" and t.new == roles.HOLDING:
                if not await self._take_over():
                    self.roles.peer = roles.STANDBY
            elif t.machine == "peer" and t.new == roles.RELEASING:
                await self._release()
                for t2 in self.roles.handle(roles.RELEASED):
                    log.info("%s address: %s -> %s (released)", t2.machine, t2.old, t2.new)
                await self._send({"type": "handback_done", "address": str(self.config.peer.address)})
        await self._update_hello()

    async def _update_hello(self) -> None:
        """Tell the peer what this node serves now; only when it changed (a hello answers no hello)."""
        if self.link is None:
            return
        hello = self.hello()
        if hello == self.link.hello:
            return
        try:
            await self.link.update_hello(hello)
        except Exception as exc:  # the hello is sent again on the next connection anyway
            log.debug("hello not updated: %s", exc)

    async def _take_over(self) -> bool:
        """Serve the dead peer's address (patent elements 304/312/314)."""
        peer, node = self.config.peer, self.config.node
        info = self.peer_info
        if not info or not info.get("mac"):
            log.error("peer %s is dead but was never heard from: its MAC and services are unknown; "
                      "cannot take over %s", peer.name, peer.address)
            return False
        try:
            services = services_from_dicts(info.get("services", []))
        except ConfigError as exc:
            log.error("peer %s's services are unusable, cannot take over: %s", peer.name, "; ".join(exc.problems))
            return False
        takeover = Takeover(str(peer.address), self.link.last_received, self._dead_at or trio.current_time(),
                            time.time())
        self.takeovers.append(takeover)
        del self.takeovers[:-20]
        lost = lost_backend = None
        if self.observer is not None:
            await self._prefetch_peer_state(force=True)  # nothing to do if fetched during this silence
            _, lost, lost_backend = self._prefetched or (None, [], [])
            self._prefetched = None
            self._open_standby_macvlan()
        else:
            self.macvlan = PeerMacvlan(node.interface, peer.macvlan, info["mac"]).open()
        self.peer_service = AddressService(ipaddress.IPv4Interface(f"{peer.address}/32"), peer.macvlan, services,
                                           announce_ifname=node.interface, announce_mac=self.mac)
        self._peer_done = trio.Event()
        done = self._peer_done

        service = self.peer_service

        async def run_peer(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            class Started:
                # the takeover record is complete the moment the service serves: a status request
                # may be answered before this task's caller resumes
                def started(self, value: None = None) -> None:
                    takeover.address_up_at = service.address_up_at
                    task_status.started(value)

            try:
                await service.run(task_status=Started())
            finally:
                done.set()

        await self._nursery.start(run_peer)
        if lost:
            takeover.resets = self._reset_clients(lost)
            self.resets_sent += takeover.resets
            log.info("stateful: reset %d client connection(s) of %s at once: %s", takeover.resets, peer.name,
                     ", ".join(c["client"] for c in lost))
        if lost_backend:
            takeover.backend_resets = self._reset_clients(lost_backend, toward="server")
            log.info("stateful: reset %d backend connection(s) %s had left open: %s", takeover.backend_resets,
                     peer.name, ", ".join(f"{c['client']}->{c['server']}" for c in lost_backend))
        self._nursery.start_soon(self._watch_first_client, takeover, self.peer_service)
        log.info("took over %s from %s in %.1f ms (detected after %.0f ms of silence); replies leave with MAC %s",
                 peer.address, peer.name, (takeover.address_up_at - takeover.detected_at) * 1000,
                 (takeover.detected_at - (takeover.last_heard_at or takeover.detected_at)) * 1000, self.mac)
        return True

    async def _watch_first_client(self, takeover: Takeover, service: AddressService) -> None:
        while takeover.first_client_at is None and service.state in ("idle", "serving"):
            firsts = [p.first_client_at for p in service.proxies if p.first_client_at is not None]
            if firsts:
                takeover.first_client_at = min(firsts)
                log.info("first client served on %s %.1f ms after the peer was declared dead", takeover.address,
                         (takeover.first_client_at - takeover.detected_at) * 1000)
                return
            await trio.sleep(0.001)

    async def _release(self) -> None:
        """Hand the peer's address back: stop at once (the owner waits), remove address and macvlan."""
        if self.peer_service is not None and self._peer_done is not None:
            self.peer_service.stop(0)
            await self._peer_done.wait()
        if self.macvlan is not None and self.observer is None:
            self.macvlan.close()  # stateless: receive the peer's MAC only while serving its address
            self.macvlan = None
        if self.observer is not None:
            if self.takeovers:
                self.takeovers[-1].resume = await self._observe("report", default=[])
            await self._observe("unwatch")
        if self.takeovers:
            self.takeovers[-1].released_at = trio.current_time()
        self.peer_service = None
        self._peer_done = None

    # -- status --------------------------------------------------------------------------------

    async def _status(self, request: dict) -> dict:
        result = self.status()
        if self.observer is not None:
            # the tables in the schema `pairproxy replay --json` prints, for both addresses
            empty = {"connections": [], "errors": {}}
            snaps = [await self._observe("snapshot", "own", empty), await self._observe("snapshot", "peer", empty)]
            result["connections"] = snaps[0]["connections"] + snaps[1]["connections"]
            result["errors"] = {k: snaps[0]["errors"].get(k, 0) + snaps[1]["errors"].get(k, 0)
                                for k in set(snaps[0]["errors"]) | set(snaps[1]["errors"])}
            digests = {}
            for name in ("own", "peer"):
                d = await self._observe("digest", name)
                digests[self.stateful_addresses[name]] = d["digest"] if d else None
            result["pair"]["state_sync"] = {**self.view_sync.status(), "digests": digests,
                                            "observer": self.observer.failed or
                                            ("running" if self.observer.ready.is_set() else "starting"),
                                            "snoopers": await self._observe("stats", default=[])}
            # what the clients of the peer's address re-established: live while holding it, else as it
            # stood when it was handed back
            result["pair"]["resume"] = (await self._observe("report", default=[]) if self.roles.holds_peer
                                        else (self.takeovers[-1].resume or []) if self.takeovers else [])
        return result

    def status(self) -> dict:
        """What this node knows without asking its observer (see ``_status`` for the full answer)."""
        node = self.config.node
        services = self.own.status()
        result: dict[str, Any] = {
            "node": node.name,
            "pid": os.getpid(),
            "state": self.state,
            "interface": node.interface,
            "mac": self.mac,
            "address": str(node.address),
            "uptime": round(time.monotonic() - self.started_at, 3) if self.started_at else 0.0,
            "services": services,
            "tasks": count_tasks(),
        }
        if self.config.peer is not None:
            peer = self.config.peer
            link = self.link.status() if self.link else {}
            link.pop("peer_hello", None)
            rtt = link.get("rtt")
            if rtt:
                link["rtt_ms"] = {k: round(v * 1000, 3) if k != "count" else v for k, v in rtt.items()}
            link.pop("rtt", None)
            peer_holds = set((self.peer_info or {}).get("holds") or []) if self.link and \
                self.link.state == "connected" else set()

            def holder(address: str, mine: bool) -> str:
                if mine:
                    return node.name
                return peer.name if address in peer_holds else "nobody" if self.detector and \
                    self.detector.state == "dead" else f"{peer.name}?"

            result["pair"] = {
                "mode": self.config.pair.mode,
                "peer": peer.name,
                "peer_state": self.detector.state if self.detector else "unknown",
                "addresses": {
                    str(node.address.ip): {"owner": node.name, "role": self.roles.own,
                                           "held_by": holder(str(node.address.ip), self.own.state == "serving")},
                    str(peer.address): {"owner": peer.name, "role": self.roles.peer,
                                        "held_by": holder(str(peer.address), self.peer_service is not None
                                                          and self.peer_service.state == "serving")},
                },
                "link": link,
                "peer_services": self.peer_service.status() if self.peer_service else [],
                "takeovers": [t.as_dict() for t in self.takeovers],
                "probe": {"answered": self.probe_responder.answered if self.probe_responder else 0,
                          "rejected": self.probe_responder.rejected if self.probe_responder else 0},
            }
        return result
