"""The stateful standby: everything a node of a stateful pair knows about connections, behind one object.

A node in a stateful pair (patent FIG. 3) snoops both addresses from the start: its own as the active
node sees it, the peer's as a silent observer (element 310), and compares notes with the peer over the
sync link. The snooping and decoding run in a child process (:mod:`proxy.observer`), off the node's
event loop. :class:`StatefulStandby` is the node's only handle on all of it:

* ``run``: the observer, the standby macvlan (the peer's MAC, no address), the digest exchange;
* ``on_peer_hello`` / ``on_message``: what the peer said (its MAC; digests, snapshot requests, snapshots);
* ``prepare_takeover`` / ``drop_preparation`` / ``takeover_plan`` / ``end_takeover``: what a takeover needs;
* ``add_status``: the tables and the state comparison for ``pairproxy status``.

A stateless node has no such object (the node holds None). Every request to the observer has a time
limit (:class:`~proxy.timings.PairTimings`): a stuck observer delays a takeover's address by at most
``observer_timeout`` per step (the plan, the busiest continuations) and then the takeover goes on without
what it would have said; it never blocks the node's decisions, because digests and snapshots are handled
in this object's own task.
"""

from __future__ import annotations

import collections
import functools

import logging
import socket
import struct
import time
from dataclasses import dataclass, replace
from typing import Any, Awaitable, Callable

import trio
from pyroute2.netlink.exceptions import NetlinkError

from proxy import faults
from proxy.config import Config, ConfigError, ServiceConfig, services_from_dicts
from proxy.continuation import LegOptions, Pairing, PairingInbox, PairingOutbox
from proxy.netplane import NetworkError
from proxy.observer import ObserverError, ObserverProcess
from proxy.rstguard import RstGuard, RstGuardError, destroy_leftover_sockets, mark_own_close, remove_leftover
from proxy.stateful import ViewSync, reset_frames
from proxy.status import (Behind, Difference, NodeStatus, ResumeRecord, SnooperStats, StateSync, from_json,
                          merge_connections, snapshot_from_dict)
from proxy.takeover import PeerMacvlanSlot, Takeover, TakeoverPlan
from proxy.timings import PairTimings
from schema.records import ContinuationSummary

log = logging.getLogger("pairproxy.standby")

# the observer's views (see proxy.stateful.AddressView)
OWN_ADDRESS = "own_address"      # this node's address, as the active node sees it
PEER_ADDRESS = "peer_address"    # the peer's address, as a silent observer sees it
PEER_BACKEND = "peer_backend"    # the peer's own connections to its backends (reset at takeover)
PEER_VIEWS = (PEER_ADDRESS, PEER_BACKEND)

#: a connection the standby saw open less than this long before it asked for the owner's snapshot
#: is kept even if the snapshot lacks it (the owner's observer may not have decoded its first frames
#: yet); the next snapshot decides
PRUNE_MARGIN = 1.0
#: how many client ports a log line names (the rest are counted)
LOG_EXAMPLES = 5

#: how often the active node tells its peer about ended connections and changed options (pairings)
PAIRINGS_EVERY = 0.05
#: a new connection's pairing goes out within this of its backend leg's connect (not at the next
#: PAIRINGS_EVERY): a connection the peer has no pairing for when this node dies is reset instead of
#: continued, and short-lived clients (libnfs's nfs-cp: a connection per operation) died young that way
#: in the soak, one of them keeping half a READ reply across its reconnect (bench/SOAK.md)
PAIRINGS_NEW_WITHIN = 0.005
#: every this many seconds, everything again, with ``reset``: the standby's table cannot drift
PAIRINGS_RESYNC_EVERY = 5.0


def _take_all(queue: "collections.deque") -> list:
    """Everything in ``queue``, emptied (new connections the data plane queued for the pairings)."""
    out = list(queue)
    queue.clear()
    return out
TCP_ESTABLISHED = 1
#: how long a takeover waits for the continuation states (both legs of every connection, with their
#: bytes to put back): worth more than the ~100 ms of ``observer_timeout``, since each one continued is a
#: client that does not reconnect. The address does not wait that long: after ``observer_timeout`` it
#: comes up and the late ones follow under the repair guard
CONTINUATIONS_TIMEOUT = 1.0
#: how many of the peer's connections (the busiest) a takeover restores first; the rest follow, their
#: kernel resets held back (issue 10, behaviour 7)
CONTINUE_FIRST = 32
#: ... the rest in chunks of this many (the observer builds the next while this node restores one)
REST_CHUNK = 256
#: the views forget the dead peer's connections once the takeover has fetched all of them (a forget of
#: thousands takes the observer a while; the chunks would wait behind it): at the latest after this
FORGET_WAITS_AT_MOST = 30.0


@dataclass(frozen=True)
class PreparedTakeover:
    """What :meth:`StatefulStandby.prepare_takeover` fetched while the peer was silent."""

    last_heartbeat: float | None  # the detector's last heartbeat when fetched: the silence it belongs to
    fetched_at: float             # trio time
    plan: TakeoverPlan


class StatefulStandby:
    """See the module docstring. ``send`` sends a message to the peer; ``last_heartbeat`` returns the
    failure detector's last heartbeat (trio time) or None."""

    def __init__(self, config: Config, peer_hello: dict[str, Any] | None, macvlan: PeerMacvlanSlot,
                 send: Callable[[dict], Awaitable[None]], last_heartbeat: Callable[[], float | None],
                 timings: PairTimings, *, observer: ObserverProcess | None = None,
                 own_proxies: Callable[[], list] | None = None, guard: bool = False,
                 holds_peer_address: Callable[[], bool] | None = None):
        node, peer = config.node, config.peer
        self.peer_hello = peer_hello
        self.macvlan = macvlan
        self.timings = timings
        self._send = send
        self._last_heartbeat = last_heartbeat
        peer_services = _services_of(peer_hello) or config.services
        backends = sorted({(str(s.backend.host), s.backend_port(p)) for s in peer_services for p in s.ports})
        views = {
            OWN_ADDRESS: {"address": str(node.address.ip), "ports": _ports(config.services)},
            PEER_ADDRESS: {"address": str(peer.address), "ports": _ports(peer_services)},
            # the peer's own connections to its backends: reset at takeover, or the file server
            # keeps their sessions and opens (sharing violations for the reconnecting clients)
            PEER_BACKEND: {"address": str(peer.address), "ports": sorted({port for _, port in backends}),
                           "as_client_of": sorted({host for host, _ in backends})},
        }
        #: view name -> the address it covers
        self.addresses = {name: v["address"] for name, v in views.items()}
        self.view_sync = ViewSync(peer_name=peer.name)
        # 128 MiB: with 8 MiB a bulk transfer through the lab lost a fifth of its frames (bench/SNOOPER.md)
        self.observer = observer or ObserverProcess(node.interface, views, rcvbuf=128 << 20,
                                                    continuation_cap=config.pair.continue_buffer)
        self.prepared: PreparedTakeover | None = None
        self.observer_timeouts = 0
        self.plan_phases: dict[str, float] = {}  # the last takeover plan's steps (ms), for its takeover record
        self.messages_dropped = 0
        self._messages_tx, self._messages_rx = trio.open_memory_channel[dict](100)
        self._fetch_lock = trio.Lock()
        self._rest_fetched = trio.Event()
        self._rest_fetched.set()
        #: the busiest continuations when the takeover went on without them (see _takeover_plan)
        self._late_first: trio.MemoryReceiveChannel | None = None
        self._nursery: trio.Nursery | None = None
        self._preparing = False
        #: this node's proxied connections (its own address's :class:`~proxy.dataplane.ServiceProxy` s):
        #: their pairings and options go to the peer, so it can continue them if this node dies
        self._own_proxies = own_proxies or (lambda: [])
        self.outbox = PairingOutbox()
        self._withheld = faults.client_ports(faults.WITHHOLD_PAIRINGS)
        self._new_legs = trio.Event()  # set by a new connection of this node's own address
        self.pairings_sent = 0
        #: the peer's pairings not yet taken by the observer, merged (never dropped: :class:`PairingInbox`)
        self.inbox = PairingInbox()
        self._pairings_arrived = trio.Event()
        self._pairings_lock = trio.Lock()
        #: times the observer did not take them within the bound (they were kept and given again later)
        self.pairings_late = 0
        #: drop this node's kernel's FIN/RST from its own address unless the node marked the close as its
        #: own: if only this process dies (SIGKILL, a crash) its kernel would end every client's connection
        #: before the peer can continue it (issue 10). Meant to outlive a killed process; replaced at start.
        self._guard = RstGuard(node.address.ip) if guard else None
        #: the guard a takeover's repair needs on the *peer's* address (:meth:`open_repair_guard`), set up
        #: ahead while this node stands by: an nftables transaction took 6-21 ms of every stateful
        #: takeover here (bench/FAILOVER.md, 2026-11-29). Harmless meanwhile: no segment leaves this
        #: node from the peer's address while it does not hold it. Closed while it does (a live move
        #: in, a takeover with a drain: there the node's kernel must reset what finds no socket).
        self._armed_repair_guard: RstGuard | None = None
        self._repair_guard_out: RstGuard | None = None  # handed to a takeover: its table, until it closes it
        self._repair_guard_lock = trio.Lock()
        self._holds_peer_address = holds_peer_address or (lambda: False)
        self._repair_guard_check = trio.Event()
        #: the peer's process (its hello's ``epoch``): a new one means the old one died with its connections
        self.peer_epoch = (peer_hello or {}).get("epoch")
        #: wall-clock time of the peer's last digest (the snooper's timestamps are wall-clock too)
        self._peer_heard_wall: float | None = None
        self._snapshot_asked_wall: float | None = None

    # -- life cycle --------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The observer, the digest exchange and the peer's state messages, until cancelled."""
        if self._guard is not None:
            try:
                self._guard.open()
                destroy_leftover_sockets(self._guard.address)
            except (RstGuardError, OSError) as exc:
                log.error("stateful: %s: if only this process dies, its kernel resets the clients", exc)
                self._guard = None
            try:  # a takeover's guard of the peer's address while it repairs (proxy.takeover), if this
                # process was killed in the middle of one
                remove_leftover(self.addresses[PEER_ADDRESS])
            except (NetlinkError, OSError) as exc:
                log.warning("stateful: cannot check for a leftover guard of %s: %s", self.addresses[PEER_ADDRESS], exc)
        try:
            await self._run(task_status)
        finally:
            if self._guard is not None:
                self._guard.close()
            if self._armed_repair_guard is not None:
                self._armed_repair_guard.close()
                self._armed_repair_guard = None

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            # started in the background: the node claims its address meanwhile (the child needs a
            # second or so to import its decoders); until it is ready a takeover is a stateless one
            nursery.start_soon(self._run_observer)
            self._open_macvlan()
            nursery.start_soon(self._send_digests)
            nursery.start_soon(self._send_pairings)
            nursery.start_soon(self._give_pairings)
            nursery.start_soon(self._handle_messages)
            if self._guard is not None:  # a node with its kernel objects (unit tests run without)
                nursery.start_soon(self._keep_repair_guard_armed)
            log.info("stateful: snooping %s (own) and %s (peer)", self.addresses[OWN_ADDRESS],
                     self.addresses[PEER_ADDRESS])
            task_status.started()

    async def _run_observer(self) -> None:
        try:
            await self.observer.run()
        except (ObserverError, OSError) as exc:
            self.observer.failed = str(exc)
            log.error("stateful: %s; this node keeps no state of its peer's connections", exc)

    def _open_macvlan(self) -> None:
        """The standby receives the peer's MAC from the start, without an address."""
        if self.peer_hello and self.peer_hello.get("mac"):
            try:
                self.macvlan.open(self.peer_hello["mac"])
            except (NetworkError, NetlinkError, OSError) as exc:  # a takeover tries again (and reports it)
                log.error("stateful: standby macvlan not opened: %s", exc)

    # -- what the peer says ------------------------------------------------------------------------
    def on_peer_hello(self, hello: dict[str, Any]) -> None:
        self.peer_hello = hello
        self._open_macvlan()
        self.outbox.resync()  # a (re)connected peer may have missed deltas: send everything again
        epoch = hello.get("epoch")
        if epoch and epoch != self.peer_epoch:
            if self.peer_epoch is not None:
                # the peer restarted: every connection its old process served is gone (whether or not
                # this node took over meanwhile); what it opened since its start is newer than its
                # old process's last digest
                before = self._peer_heard_wall if self._peer_heard_wall is not None else time.time()
                self._forget_soon(before, f"{self.peer_hello.get('name', 'the peer')} restarted")
            self.peer_epoch = epoch

    def on_message(self, message: dict) -> None:
        """A digest, snapshot request or snapshot from the peer: handled in this object's own task (dropped
        when it is too far behind: the next one says the same). Pairings: merged into :attr:`inbox`,
        never dropped."""
        kind, address = message.get("type"), message.get("address")
        if kind == "digest" and address == self.addresses[PEER_ADDRESS]:
            self._peer_heard_wall = time.time()
        elif kind == "pairings":
            if address == self.addresses[PEER_ADDRESS]:
                self.inbox.take(message)
                self._pairings_arrived.set()
            else:
                log.debug("stateful: pairings for %r ignored", address)
            return
        try:
            self._messages_tx.send_nowait(message)
        except trio.WouldBlock:
            self.messages_dropped += 1
            log.warning("stateful: %s from the peer dropped (observer too slow)", message.get("type"))

    async def _handle_messages(self) -> None:
        own, peer = self.addresses[OWN_ADDRESS], self.addresses[PEER_ADDRESS]
        timeout = self.timings.status_observer_timeout
        async for message in self._messages_rx:
            kind, address = message.get("type"), message.get("address")
            if kind == "digest" and address == peer:
                ours = await self._ask("digest", PEER_ADDRESS, None, timeout)
                if ours is not None and self.view_sync.on_peer_digest(message, ours, trio.current_time()):
                    self._snapshot_asked_wall = time.time()
                    await self._send({"type": "snapshot_request", "address": peer})
            elif kind == "snapshot_request" and address == own:
                snap = await self._ask("snapshot", OWN_ADDRESS, {"connections": []}, timeout)
                for c in snap["connections"]:
                    c.pop("tcp", None)
                    c.pop("smb", None)
                await self._send({"type": "snapshot", "address": own,
                                  "snapshot": {"connections": snap["connections"]}})
            elif kind == "snapshot" and address == peer:
                theirs = message.get("snapshot") or {}
                ours = await self._ask("snapshot", PEER_ADDRESS, {"connections": []}, timeout)
                diff = self.view_sync.on_peer_snapshot(theirs, ours)
                if diff["counts"]["only_here"] and self._snapshot_asked_wall is not None:
                    # adopt the owner's word: what it no longer has (and this node saw open well
                    # before it asked) is gone; its close passed this node by
                    keep = [[c.get("client"), c.get("server")] for c in theirs.get("connections", [])]
                    dropped = await self._ask("forget", PEER_ADDRESS, 0, timeout, gone=False, keep=keep,
                                              before=self._snapshot_asked_wall - PRUNE_MARGIN)
                    self.view_sync.on_forgotten(dropped or 0, "gone at the owner")
            else:
                log.debug("stateful: %s for %r ignored", kind, address)

    async def _give_pairings(self) -> None:
        """Give the observer the peer's pairings as they come (all that came meanwhile in one request),
        from when it is ready."""
        await self.observer.ready.wait()
        while True:
            await self._pairings_arrived.wait()
            self._pairings_arrived = trio.Event()
            await self._flush_pairings(self.timings.status_observer_timeout)

    async def _flush_pairings(self, timeout: float) -> bool:
        """Give the observer what the inbox holds, for at most ``timeout``; whether it took it. What it
        did not take goes back to the inbox, before what came since. Given twice (taken, but the
        answer came too late) is harmless: the same pairings again leave the book as it was."""
        with trio.move_on_after(timeout):
            async with self._pairings_lock:
                body = self.inbox.drain()
                if body is None:
                    return True
                try:
                    problems = await self.observer.request("pairings", **body)
                except ObserverError as exc:  # gone: the peer's next resync restores them for the next one
                    log.warning("stateful: pairings not kept: %s", exc)
                    return True
                except BaseException:
                    self.inbox.put_back(body)
                    raise
                for problem in (problems or [])[:3]:
                    log.warning("stateful: a pairing from the peer skipped: %s", problem)
                return True
        self.pairings_late += 1
        log.info("stateful: the observer did not take the peer's pairings within %.0f ms: kept for its next turn "
                 "(%d times so far)", timeout * 1000, self.pairings_late)
        self._pairings_arrived.set()
        return False

    async def _send_pairings(self) -> None:
        """Tell the peer which client leg pairs with which backend leg, and each leg's options (only the
        changes; new connections' options from TCP_INFO): a new connection's within
        ``PAIRINGS_NEW_WITHIN`` of its backend connect (only the new ones are read), and every
        ``PAIRINGS_EVERY`` a full pass (ended connections, changes, any new one left out)."""
        last_full = resynced = trio.current_time()
        proxies: list = []
        try:
            while True:
                # new connections wake this at once (ServiceProxy.tell_new_legs): each waits for its pairing
                # to be on the link before its first byte is relayed
                proxies = self._own_proxies()
                for proxy in proxies:
                    proxy.tell_new_legs = self._wake_pairings
                    if proxy.tell_pairing is None:
                        proxy.tell_pairing = functools.partial(self._tell_pairing, proxy)
                with trio.move_on_after(PAIRINGS_NEW_WITHIN):
                    await self._new_legs.wait()
                self._new_legs = trio.Event()
                now = trio.current_time()
                fresh = [(proxy, conn) for proxy in proxies for conn in _take_all(proxy.new_legs)]
                try:
                    await self._tell_pairings_now(fresh, now - last_full >= PAIRINGS_EVERY or bool(
                                                  fresh and self.outbox.resync_due), now - resynced)
                finally:
                    for _, conn in fresh:
                        if conn.told is not None:
                            conn.told.set()
                if now - last_full >= PAIRINGS_EVERY:
                    last_full = now
                    if now - resynced >= PAIRINGS_RESYNC_EVERY:
                        resynced = now
        finally:
            for proxy in proxies:
                proxy.tell_new_legs = None
                proxy.tell_pairing = None

    def _wake_pairings(self) -> None:
        self._new_legs.set()

    async def _tell_pairing(self, proxy: Any, conn: Any) -> bool:
        """Tell the peer one new connection's pairing now, from the connection's own task
        (:attr:`proxy.dataplane.ServiceProxy.tell_pairing`); True once it is on the link (or there is
        nothing to tell), False if it cannot go this way: a resync of all pairings is due (the pairings
        task sends that first) or its options could not be read. The send is shielded: a message cut
        off half written would break the link for everyone."""
        if self.outbox.resync_due:
            return False
        with trio.CancelScope(shield=True):
            try:
                bodies = self.outbox.add(self._pairings_of([(proxy, conn)]))
            except OSError:
                return False
            for body in bodies:
                await self._send({"type": "pairings", "address": self.addresses[OWN_ADDRESS], **body})
                self.pairings_sent += 1
        return True

    async def _tell_pairings_now(self, fresh: list[tuple[Any, Any]], full: bool, since_resync: float) -> None:
        """Send the new connections' pairings (``fresh``), or everything that changed (``full``)."""
        if not fresh and not full:
            return
        if full and since_resync >= PAIRINGS_RESYNC_EVERY:
            self.outbox.resync()  # a message the peer could not take (observer starting) is not lost for long
        try:
            bodies = self.outbox.update(self._current_pairings()) if full else \
                self.outbox.add(self._pairings_of(fresh))
        except OSError as exc:  # sock_diag refused: the peer cannot continue; say so once a while
            log.warning("stateful: TCP_INFO of own connections not read: %s", exc)
            await trio.sleep(5)
            return
        for body in bodies:
            await self._send({"type": "pairings", "address": self.addresses[OWN_ADDRESS], **body})
            self.pairings_sent += 1

    def _current_pairings(self) -> list[Pairing]:
        return self._pairings_of([(proxy, conn) for proxy in self._own_proxies() for conn in list(proxy.connections)])

    def _pairings_of(self, conns: list[tuple[Any, Any]]) -> list[Pairing]:
        """The pairings of these (proxy, connection)s that have both legs and are not being moved; one
        already sent is reused (its options are not read again)."""
        found = []
        low, high = self._withheld
        for proxy, conn in conns:
            if conn.backend_source is None or conn.moving or low <= conn.client[1] <= high:
                continue
            server = (str(proxy.service.backend.host), proxy.service.backend_port(conn.port))
            found.append((conn, server))
        known = {(p.client, p.service_port): p for p in self.outbox.sent.values()}
        out = []
        for conn, server in found:
            old = known.get((tuple(conn.client), conn.port))
            if old is not None and old.source_port == conn.backend_source[1] and old.server == server \
                    and old.anchor == conn.anchor and old.client_options is not None and old.backend_options is not None:
                out.append(old)
                continue
            if conn.legs is None:
                continue
            # options None: it ended already (a MOUNT or portmapper call lasts a millisecond); told anyway,
            # so a peer seeing only frames to this node decodes its replies (the export's file handle)
            copts, bopts = leg_options(conn.legs[0]), leg_options(conn.legs[1])
            out.append(Pairing((conn.client[0], conn.client[1]), conn.port, conn.backend_source[1], server,
                               copts, bopts, conn.anchor))
        return out

    async def _send_digests(self) -> None:
        await self.observer.ready.wait()
        while True:
            await trio.sleep(self.timings.digest_every)
            ours = await self._ask("digest", OWN_ADDRESS, None, self.timings.status_observer_timeout)
            if ours is not None:
                await self._send({"type": "digest", "address": self.addresses[OWN_ADDRESS], **ours})

    # -- what a takeover needs ---------------------------------------------------------------------
    def prepare_takeover(self) -> None:
        """The peer is silent and being probed: fetch the takeover's plan now, in the background, so
        the observer's round trips are out of the takeover's critical path. Called again on every
        probe, so during a long link outage (the peer alive and serving) it stays fresh and includes
        new connections."""
        if self._nursery is None or self._preparing or not self.observer.ready.is_set():
            return
        self._preparing = True
        self._nursery.start_soon(self._prepare)

    async def _prepare(self) -> None:
        try:
            heard = self._last_heartbeat()
            async with self._fetch_lock:
                plan = await self._fetch_plan(self.timings.observer_timeout)
            if plan is not None:
                self.prepared = PreparedTakeover(heard, trio.current_time(), plan)
        finally:
            self._preparing = False

    def drop_preparation(self) -> None:
        """The peer lives: the prepared plan is stale, and nobody is taking over to watch for."""
        self.prepared = None
        if self._nursery is not None and self.observer.ready.is_set():
            self._nursery.start_soon(self._ask, "unwatch", None, None, self.timings.status_observer_timeout)

    def repair_guard_armed(self) -> bool:
        """A repair guard is ready for a takeover to take at once (:meth:`open_repair_guard`)."""
        return self._armed_repair_guard is not None

    async def takeover_plan(self, *, wait_for_first: bool = True) -> TakeoverPlan:
        """The connections to reset: prepared during this silence if recent enough, else fetched now;
        at most ``observer_timeout`` (then none: a stateless takeover). The continuations are asked
        for at once; with ``wait_for_first`` the busiest come in the plan (waited for at most
        ``observer_timeout``), else they all follow with :meth:`continuations_rest`."""
        if not self.observer.ready.is_set():
            return TakeoverPlan()
        # the peer's process is dead, and every connection this node saw it serve with it: once the
        # plan is fetched (and the resume watcher armed) the views forget them, whether or not the
        # observer answers in time (the resets go to the clients it knew; the rest reconnect anyway)
        dead_since = time.time()
        try:
            return await self._takeover_plan(wait_for_first)
        finally:
            self._forget_soon(dead_since, "taken over")

    async def _takeover_plan(self, wait_for_first: bool) -> TakeoverPlan:
        plan = None
        self._late_first = None  # a takeover that failed before its rest leaves nothing to the next one
        t0 = trio.current_time()
        self.plan_phases = phases = {}  # ms: where a takeover's plan phase went (the takeover record shows it)
        with trio.move_on_after(self.timings.observer_timeout):
            async with self._fetch_lock:  # a preparation under way finishes first
                prepared, self.prepared = self.prepared, None
                phases["lock"] = round((trio.current_time() - t0) * 1000, 1)
                if prepared is not None and self._same_heartbeat(prepared.last_heartbeat) and \
                        trio.current_time() - prepared.fetched_at <= self.timings.prepared_takeover_max_age:
                    plan = prepared.plan
                    phases["prepared"] = 1
                else:
                    log.info("stateful: no prepared takeover plan%s: fetching it now",
                             "" if prepared is None else " for this silence")
                    plan = await self._fetch_plan(self.timings.observer_timeout)
        if plan is None:
            self.observer_timeouts += 1
            log.warning("stateful: no answer from the observer within %.0f ms: taking over without resets",
                        self.timings.observer_timeout * 1000)
            return TakeoverPlan()
        # the legs' state as late as possible (never a prepared one: the last ACKs arrive after the death);
        # the busiest first, the rest in chunks (continuations_rest). Asked in the background. With a
        # repair guard armed the takeover does not wait for them at all: its address comes up at once
        # (1.4-3.9 ms sooner, bench/FAILOVER.md), the guard keeps this node's kernel from resetting
        # them meanwhile, and they are the rest's first chunk. Without one they are waited for at most
        # observer_timeout (issue 8: a takeover never waits on the observer beyond a small bound)
        phases["plan"] = round((trio.current_time() - t0) * 1000, 1)
        answers_tx, answers_rx = trio.open_memory_channel[dict | None](1)
        assert self._nursery is not None  # the observer is ready: run() is under way
        self._rest_fetched = trio.Event()  # set once continuations_rest has given everything
        self._nursery.start_soon(self._fetch_first_continuations, answers_tx, trio.current_time(), phases)
        if not wait_for_first:
            self._late_first = answers_rx
            return replace(plan, more_continuations=1)  # how many is unknown yet: at least the first ones
        with trio.move_on_after(self.timings.observer_timeout):
            first = await answers_rx.receive()
            if first is None:  # the observer failed or timed out (counted and logged)
                self._rest_fetched.set()
                return plan
            if not first.get("rest"):
                self._rest_fetched.set()
            return replace(plan, continuations=first.get("first") or [], more_continuations=first.get("rest") or 0)
        log.warning("stateful: the observer did not say within %.0f ms which connections to continue first: "
                    "the address comes up without them, they follow", self.timings.observer_timeout * 1000)
        self._late_first = answers_rx
        phases["continuations_late"] = 1
        return replace(plan, more_continuations=1)  # how many is unknown yet: at least the late first ones

    async def _fetch_first_continuations(self, answers: trio.MemorySendChannel, t1: float,
                                         phases: dict[str, float]) -> None:
        """The busiest continuations (and how many more) to ``answers``; None if the observer failed or
        did not answer within ``CONTINUATIONS_TIMEOUT`` (then every connection is reset)."""
        first: dict | None = None
        async with answers:
            with trio.move_on_after(CONTINUATIONS_TIMEOUT) as bound:
                try:
                    if len(self.inbox) or self._pairings_lock.locked():
                        # what the peer said last about its connections (some perhaps on their way to the
                        # observer already), before they are judged
                        await self._flush_pairings(CONTINUATIONS_TIMEOUT)
                        phases["pairings"] = round((trio.current_time() - t1) * 1000, 1)
                    first = await self.observer.request("continuations", first=CONTINUE_FIRST) or {}
                    phases["continuations"] = round((trio.current_time() - t1) * 1000, 1)
                except ObserverError as exc:
                    log.warning("stateful: no continuations: %s", exc)
            if bound.cancelled_caught:
                self.observer_timeouts += 1
                log.warning("stateful: the observer did not say within %.0f ms which connections to continue: "
                            "resetting them all", CONTINUATIONS_TIMEOUT * 1000)
            answers.send_nowait(first)  # room for one: never waits

    def _same_heartbeat(self, then: float | None) -> bool:
        """No heartbeat arrived since ``then`` (the last one when a plan was prepared). Not ``==``: each
        fact of the heartbeat process converts the same last heartbeat to trio's clock anew, microseconds
        apart, and a plan prepared at the quiet fact was never used at the silent one (every stateful
        takeover fetched it again: 1.6-6 ms). A new heartbeat is a heartbeat interval later."""
        now = self._last_heartbeat()
        if then is None or now is None:
            return then is now
        return abs(now - then) < self.timings.heartbeat / 2

    async def continuations_rest(self, limit: int = REST_CHUNK) -> list[dict]:
        """The next ``limit`` continuations :meth:`takeover_plan` left for after the address is up (the
        least busy), as the legs stood at the death verdict; [] when none are left, or if the observer
        does not answer in time (then the rest are given up: they get resets)."""
        rest: list[dict] = []
        if self._late_first is not None:  # the takeover did not wait for the busiest: they come first
            late, self._late_first = self._late_first, None
            first: dict | None = None
            with trio.move_on_after(CONTINUATIONS_TIMEOUT):  # the fetch has this bound itself: a backstop
                first = await late.receive()
            if first and first.get("first"):
                return first["first"]
            if not (first and first.get("rest")):
                self._rest_fetched.set()  # none to give: the fetch failed, or the peer had no connection
                return []
            # none of them busy (idle clients only): straight on to the rest
        with trio.move_on_after(CONTINUATIONS_TIMEOUT):
            try:
                rest = await self.observer.request("continuations_rest", limit=limit) or []
            except ObserverError as exc:
                log.warning("stateful: no continuations for the rest: %s", exc)
            if not rest:
                self._rest_fetched.set()
            return rest
        self.observer_timeouts += 1
        self._rest_fetched.set()
        log.warning("stateful: the observer did not say within %.0f ms how to continue the rest: resetting them",
                    CONTINUATIONS_TIMEOUT * 1000)
        return []

    async def open_repair_guard(self) -> RstGuard | None:
        """A FIN/RST guard on the peer's address for a takeover's repair (:mod:`proxy.takeover`): once the
        address is up, a segment of a connection not yet restored finds no socket, and this node's kernel
        would reset it. The one armed while standing by if there is one (at once), else set up now in a
        thread (netlink and an nftables transaction: milliseconds under load). The caller owns it. None
        if it cannot be set (logged): the takeover goes on."""
        async with self._repair_guard_lock:  # an arming under way finishes first, then it is taken
            guard, self._armed_repair_guard = self._armed_repair_guard, None
            if guard is None:
                try:
                    guard = await trio.to_thread.run_sync(RstGuard(self.addresses[PEER_ADDRESS]).open)
                except (RstGuardError, NetlinkError, OSError) as exc:
                    log.error("stateful: %s: connections not yet repaired may be reset by this node's kernel", exc)
                    return None
            self._repair_guard_out = guard
            return guard

    def holding_changed(self) -> None:
        """The node took or gave up the peer's address: arm or close the standing-by guard now."""
        self._repair_guard_check.set()

    async def _keep_repair_guard_armed(self) -> None:
        """Armed while the peer's address is not here, closed while it is (checked on
        :meth:`holding_changed` and every second)."""
        while True:
            holds = self._holds_peer_address()
            async with self._repair_guard_lock:
                try:
                    if holds and self._armed_repair_guard is not None:
                        guard, self._armed_repair_guard = self._armed_repair_guard, None
                        await trio.to_thread.run_sync(guard.close)
                    elif not holds and self._armed_repair_guard is None and \
                            (self._repair_guard_out is None or not self._repair_guard_out.is_open):
                        self._repair_guard_out = None
                        guard = RstGuard(self.addresses[PEER_ADDRESS])
                        self._armed_repair_guard = await trio.to_thread.run_sync(guard.open)
                except (RstGuardError, NetlinkError, OSError) as exc:
                    log.warning("stateful: the takeover's guard of %s not set up ahead: %s (a takeover sets it "
                                "up itself)", self.addresses[PEER_ADDRESS], exc)
            self._repair_guard_check = trio.Event()
            with trio.move_on_after(1.0):
                await self._repair_guard_check.wait()

    async def outage_syns(self) -> list[bytes]:
        """The SYNs new clients sent to the peer's address lately that nobody answered (IPv4 packets,
        :mod:`proxy.synlog`); none if the observer does not answer within ``observer_timeout``."""
        with trio.move_on_after(self.timings.observer_timeout):
            try:
                return [bytes(p) for p in await self.observer.request("syns") or []]
            except ObserverError as exc:
                log.warning("stateful: the SYNs of the outage not fetched: %s", exc)
                return []
        self.observer_timeouts += 1
        return []

    def continuations_done(self) -> None:
        """The takeover asks for no more continuations (all fetched, or it stopped): the views may forget."""
        self._late_first = None
        self._rest_fetched.set()

    def _forget_soon(self, before: float, why: str) -> None:
        """In the background: the peer views forget the connections first seen before ``before``."""
        if self._nursery is not None and self.observer.ready.is_set():
            self._nursery.start_soon(self._forget_dead_peer, before, why)

    async def _forget_dead_peer(self, before: float, why: str) -> None:
        # not remembered as closed (gone=False): a connection this node goes on with (a continued
        # one, issue 10) is picked up again by its next segment, and a dead one's late segment is
        # picked up and then ended by the holder's kernel's RST (tcpstream: an RST at the other side's
        # last ACK); what neither happens to is pruned by the owner's next snapshot
        # after the takeover has fetched the rest of its continuations: they come from the same observer,
        # one request at a time, and a view forgetting thousands of connections takes a while
        with trio.move_on_after(FORGET_WAITS_AT_MOST):
            await self._rest_fetched.wait()
        for view in PEER_VIEWS:
            # in the background, off the takeover's path: as patient as status (a loaded observer
            # missed observer_timeout here in the soak at load 27)
            dropped = await self._ask("forget", view, 0, self.timings.status_observer_timeout, before=before,
                                      gone=False)
            self.view_sync.on_forgotten(dropped or 0, f"{why} ({view})")

    async def _fetch_plan(self, timeout: float) -> TakeoverPlan | None:
        """The peer's live connections (and a resume watcher armed with who had what); None if the
        observer did not answer in time or at all."""
        with trio.move_on_after(timeout):
            try:
                clients = await self.observer.request("live", view=PEER_ADDRESS)
                backends = await self.observer.request("live", view=PEER_BACKEND)
                await self.observer.request("watch", view=PEER_ADDRESS)
            except ObserverError as exc:
                log.warning("stateful: %s", exc)
                return None
            return TakeoverPlan(clients or [], backends or [])
        self.observer_timeouts += 1
        return None

    async def end_takeover(self) -> list:
        """The peer's address was handed back: the resume report as it stands; stop watching."""
        report = await self._ask("report", None, [], self.timings.observer_timeout)
        await self._ask("unwatch", None, None, self.timings.observer_timeout)
        return report

    def note_continued(self, clients: list[str]) -> None:
        """The takeover continued these clients' connections ("ip:port"): the resume report says so."""
        if clients and self._nursery is not None:
            self._nursery.start_soon(self._tell_continued, clients)

    async def _tell_continued(self, clients: list[str]) -> None:
        with trio.move_on_after(self.timings.observer_timeout * 10):
            try:
                await self.observer.request("continued", clients=clients)
            except ObserverError as exc:
                log.warning("stateful: %s", exc)

    def send_resets(self, plan: TakeoverPlan) -> tuple[int, int]:
        """End the dead peer's connections at once: a valid RST to each client, and to each backend it
        left connected (see :func:`proxy.stateful.reset_frames`); how many of each were sent."""
        clients = _send_resets(plan.clients_to_reset)
        if clients:
            log.info("stateful: reset %d client connection(s) of the peer at once: %s", clients,
                     examples([c["client"] for c in plan.clients_to_reset]))
        backends = _send_resets(plan.backends_to_reset, toward="server")
        if backends:
            log.info("stateful: reset %d backend connection(s) the peer had left open: %s", backends,
                     examples([f"{c['client']}->{c['server']}" for c in plan.backends_to_reset]))
        return clients, backends

    # -- the own address back from a dead holder -----------------------------------------------------
    async def holder_connections(self) -> tuple[list[dict], float]:
        """The client connections the dead peer served on this node's *own* address while it held it (a
        ``handover``, or a takeover while this node was away), as the own view saw them, and when they
        were read (wall clock): :meth:`end_holder_connections` resets them once the address is back.

        Why: this node's FIN/RST guard drops its kernel's resets from the own address (they are meant
        for the sockets of a killed process, issue 10), so a client of the dead holder got no answer but
        silence: its segments unanswered, it waited for its own timeouts (minutes). The holder's
        connections are not continued here: this node has neither their pairings nor a view of their
        backend legs (bench/MOVES.md). None known, or no answer within ``observer_timeout``: []."""
        read_at = time.time()
        if not self.observer.ready.is_set():
            return [], read_at
        conns = await self._ask("live", OWN_ADDRESS, [], self.timings.observer_timeout) or []
        return conns, read_at

    def end_holder_connections(self, connections: list[dict], read_at: float) -> int:
        """Reset each of the dead holder's clients (:meth:`holder_connections`) with an RST it accepts,
        now that the own address is served here again; the own view forgets them (as gone: a late
        segment of theirs is not a new connection). How many were sent."""
        sent = _send_resets(connections)
        if sent:
            log.info("stateful: reset %d client connection(s) the dead holder of %s served there: %s (its "
                     "connections to the file servers from that address are not known here)", sent,
                     self.addresses[OWN_ADDRESS], examples([c["client"] for c in connections]))
        if connections and self._nursery is not None:
            self._nursery.start_soon(functools.partial(
                self._ask, "forget", OWN_ADDRESS, 0, self.timings.status_observer_timeout, before=read_at,
                gone=True))
        return sent

    # -- status ------------------------------------------------------------------------------------
    async def add_status(self, status: NodeStatus, *, holds_peer: bool, takeovers: list[Takeover],
                         tables: bool = True) -> None:
        """Add the stateful parts to a node's status: the decoded connections of both addresses
        (merged with the node's own sockets: the schema ``pairproxy replay --json`` prints), decoder
        errors, digests, the comparison with the peer, the snoopers and the resume report.
        ``tables=False`` leaves out tables and digests (metrics need neither; a snapshot of many
        connections is the costly part)."""
        timeout = self.timings.status_observer_timeout
        views = (OWN_ADDRESS, PEER_ADDRESS)
        if tables:
            empty = {"connections": [], "errors": {}}
            snaps = [snapshot_from_dict(await self._ask("snapshot", name, empty, timeout)) for name in views]
            status.connections = merge_connections(snaps[0].connections + snaps[1].connections,
                                                   status.connections)
            status.errors = {k: snaps[0].errors.get(k, 0) + snaps[1].errors.get(k, 0)
                             for k in sorted(set(snaps[0].errors) | set(snaps[1].errors))}
            for name in views:
                d = await self._ask("digest", name, None, timeout)
                status.digests[self.addresses[name]] = d["digest"] if d else None
        sync = self.view_sync.status()
        stats = await self._ask("stats", None, [], timeout)
        continuation = await self._ask("continuation_summary", None, None, timeout)
        status.pair.state_sync = StateSync(
            in_sync=sync["in_sync"], compared=sync["compared"], matches=sync["matches"],
            mismatches_in_a_row=sync["mismatches_in_a_row"],
            behind=from_json(Behind, sync["behind"], strict=False) if sync["behind"] else None,
            snapshots_requested=sync["snapshots_requested"],
            last_difference=from_json(Difference, sync["last_difference"], strict=False)
            if sync["last_difference"] else None,
            observer=self.observer.failed or ("running" if self.observer.ready.is_set() else "starting"),
            observer_timeouts=self.observer_timeouts, forgotten=sync["forgotten"],
            sight=sync["sight"], sight_detail=sync["sight_detail"], peer_connections=sync["peer_connections"],
            continuation=from_json(ContinuationSummary, continuation, strict=False) if continuation else None,
            # the observer answers in the order of its views, which is the order of self.addresses
            snoopers=[from_json(SnooperStats, {**s, "view": name}, strict=False)
                      for name, s in zip(self.addresses, stats)])
        # what the clients of the peer's address re-established: live while holding it, else as it
        # stood when it was handed back
        resume = (await self._ask("report", None, [], timeout) if holds_peer
                  else (takeovers[-1].resume or []) if takeovers else [])
        status.pair.resume = from_json(list[ResumeRecord], resume, strict=False, path="resume")

    # -- the observer ------------------------------------------------------------------------------
    async def _ask(self, op: str, view: str | None, default: Any, timeout: float, **args: Any) -> Any:
        """Ask the observer; ``default`` (and a log line) if it cannot answer within ``timeout``."""
        with trio.move_on_after(timeout):
            try:
                return await self.observer.request(op, **({"view": view} if view else {}), **args)
            except ObserverError as exc:
                if self.observer.ready.is_set():  # not while it starts: the peer's digests would repeat it
                    log.warning("stateful: %s", exc)
                return default
        self.observer_timeouts += 1
        log.warning("stateful: observer did not answer %s within %.0f ms", op, timeout * 1000)
        return default


def examples(items: list[str], limit: int = LOG_EXAMPLES) -> str:
    """A few of ``items`` for a log line, and how many more (a log line must not grow with a table)."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _send_resets(connections: list[dict], toward: str = "client") -> int:
    """Send each of the dead peer's clients (or its backend servers) a valid RST (see
    proxy.stateful.reset_frames); how many were sent."""
    sent = 0
    if not connections:
        return sent
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        # deliberate RSTs: they must pass the takeover's FIN/RST guard, which may still be up (proxy.rstguard)
        mark_own_close(raw)
        for client_ip, packet in reset_frames(connections, toward):
            try:
                raw.sendto(packet, (client_ip, 0))
                sent += 1
            except OSError as exc:
                log.warning("RST to %s not sent: %s", client_ip, exc)
    return sent


def leg_options(sock: Any) -> LegOptions | None:
    """One established socket's negotiated options from ``TCP_INFO`` (a getsockopt: microseconds; None
    if it is not established or gone). Why not one sock_diag dump of the address: pyroute2 parses every
    socket of the namespace in Python (170 ms for 2,000 sockets, on the event loop, on every tick with a
    new connection: the peer declared this node dead while 1,000 clients connected), and its decoder
    reads the node's own window scale from the wrong half of the byte (it gave the remote's)."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except OSError:
        return None
    if len(raw) < 20 or raw[0] != TCP_ESTABLISHED:
        return None
    # struct tcp_info: u8 state, ca_state, retransmits, probes, backoff, options; u8 snd_wscale:4,
    # rcv_wscale:4 (low nibble first); u8 flags; u32 rto, ato, snd_mss
    return LegOptions(raw[5], raw[6] & 0x0F, raw[6] >> 4, struct.unpack_from("=I", raw, 16)[0])


def _services_of(hello: dict[str, Any] | None) -> tuple[ServiceConfig, ...]:
    try:
        return services_from_dicts((hello or {}).get("services", []))
    except ConfigError:
        return ()


def _ports(services: tuple[ServiceConfig, ...]) -> list[int]:
    return sorted({p for s in services for p in s.ports})
