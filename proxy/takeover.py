"""The takeover sequence: serve the dead peer's address (patent elements 304/312/314).

One function, :func:`take_over`, with its side effects in a fixed order, each undone in reverse if a
later one fails (and by :func:`proxy.handback.release` when the address is handed back), as
keepalived's ``become_master``/``restore_interface`` and :mod:`proxy.serving` do:

1. check what the peer's hello told us (its MAC and services): without them there is nothing to serve;
2. stateful: ask the standby what the takeover needs (the peer's live connections), before the address
   moves (afterwards new clients' connections would be in the list too), bounded in time; none when
   the peer is leaving (it drains them itself);
3. the macvlan with the peer's MAC (already there in stateful mode: then it is not ours to undo);
   a leaving peer's connections passed on to it (:mod:`proxy.drain`), before its clients come here;
4. stateful: the peer's continuable connections (:mod:`proxy.continuation`) are restored with
   TCP_REPAIR, both legs. A segment that found the address without its socket would be answered with a
   reset, so with the repair guard (:mod:`proxy.rstguard`, armed while standing by) holding this node's
   kernel's resets back they are all restored once the address is up, busiest first, and the address
   does not wait for the observer's answer; without a guard the busiest are restored here, still quiet
   (repair mode sends nothing), *before* the address exists;
5. the peer's services on its address, as a /32 on the macvlan, announced with this node's own MAC
   (:class:`~proxy.serving.AddressService`: listeners, address, gratuitous ARP); then the restored
   legs go live (their queued bytes leave at once) and get their pumps; then the others, and the SYNs
   new clients sent during the outage;
6. stateful: exact-sequence resets to the peer's other clients and to the backends it left connected;
7. a watcher that records when the first client is served.

A kernel error (:class:`~proxy.netplane.NetworkError`, e.g. the macvlan's name taken by another
interface) undoes steps 3-4 and raises :class:`TakeoverError` with ``retry=True``: the decision core
retries with a backoff while the node goes on serving its own address.
"""

from __future__ import annotations

import gc
import ipaddress
import logging
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import trio
from pyroute2.netlink.exceptions import NetlinkError

from proxy import synlog, tcprepair
from proxy.config import ConfigError, NodeConfig, PeerConfig, parse_endpoint, services_from_dicts
from proxy.continuation import relay_anchor
from proxy.dataplane import SourcePorts
from proxy.drain import DrainRedirect
from proxy.netplane import NetworkError, PeerMacvlan
from proxy.rstguard import RstGuard
from proxy.serving import AddressService
from proxy.status import Takeover  # the record is part of the status schema; defined once there

if TYPE_CHECKING:  # only for annotations: proxy.standby imports this module
    from proxy.standby import StatefulStandby

log = logging.getLogger("pairproxy.takeover")


@dataclass(frozen=True)
class TakeoverPlan:
    """What the stateful standby knows a takeover must do: the connections to end with a reset."""

    clients_to_reset: list[dict] = field(default_factory=list)   # the peer's client connections
    backends_to_reset: list[dict] = field(default_factory=list)  # the peer's own backend connections
    #: per client leg of the peer: both legs' repair states, or why not continuable
    #: (:meth:`proxy.continuation.Verdict.to_wire`); the continued ones are not reset
    continuations: list[dict] = field(default_factory=list)
    #: how many more (the least busy) the standby has for after the address is up (continuations_rest)
    more_continuations: int = 0


class TakeoverError(Exception):
    """The takeover could not serve the peer's address; everything it did is undone."""

    def __init__(self, reason: str, *, retry: bool):
        super().__init__(reason)
        self.retry = retry


class PeerMacvlanSlot:
    """The one macvlan with the peer's MAC this node may have: opened by the stateful standby at start
    (it snoops the peer's frames all the time) or by a takeover (stateless: only while serving)."""

    def __init__(self, ifname: str, name: str):
        self.ifname, self.name = ifname, name
        self.macvlan: PeerMacvlan | None = None

    def open(self, mac: str) -> bool:
        """Make sure it exists; True if this call created it (the caller then owns closing it)."""
        if self.macvlan is not None:
            return False
        self.macvlan = PeerMacvlan(self.ifname, self.name, mac).open()
        return True

    def close(self) -> None:
        if self.macvlan is not None:
            self.macvlan.close()
            self.macvlan = None


@dataclass
class HeldAddress:
    """The peer's address while this node serves it: what :func:`proxy.handback.release` undoes."""

    service: AddressService
    done: trio.Event
    takeover: Takeover
    opened_macvlan: bool
    drain: DrainRedirect | None = None


async def take_over(*, node: NodeConfig, peer: PeerConfig, peer_hello: dict[str, Any] | None, mac: str,
                    nursery: trio.Nursery, macvlan: PeerMacvlanSlot, standby: StatefulStandby | None,
                    last_heard_at: float | None, detected_at: float,
                    drain: DrainRedirect | None = None) -> HeldAddress:
    """Run the sequence in the module docstring; the held address, or TakeoverError."""
    # 1. what the peer told us
    if not peer_hello or not peer_hello.get("mac"):
        raise TakeoverError(f"peer {peer.name} was never heard from: its MAC and services are unknown; "
                            f"cannot take over {peer.address}", retry=False)
    try:
        services = services_from_dicts(peer_hello.get("services", []))
    except ConfigError as exc:
        raise TakeoverError(f"peer {peer.name}'s services are unusable: {'; '.join(exc.problems)}",
                            retry=False) from None
    takeover = Takeover(str(peer.address), last_heard_at, detected_at, time.time())
    # 2. what the standby knows (bounded: a stuck observer costs a stateless takeover, no more)
    phases = takeover.phases_ms  # in the record: status shows where a slow takeover's time went
    mark = trio.current_time()
    phases["verdict"] = round((mark - detected_at) * 1000, 1)  # the heartbeat process's verdict -> here

    def phase(name: str) -> None:
        nonlocal mark
        now = trio.current_time()
        phases[name] = round((now - mark) * 1000, 1)
        mark = now

    # meanwhile, in a thread, the guard that keeps this node's kernel from resetting the connections not
    # yet restored once the address is up (step 4; an nftables transaction: milliseconds under load)
    guard: RstGuard | None = None
    if standby is not None and drain is None:
        async def open_guard() -> None:
            nonlocal guard
            t = trio.current_time()
            guard = await standby.open_repair_guard()
            phases["plan.guard"] = round((trio.current_time() - t) * 1000, 1)

        # with a guard ready the address need not wait for the busiest continuations (step 4)
        wait_for_first = not standby.repair_guard_armed()
        try:
            async with trio.open_nursery() as both:
                both.start_soon(open_guard)
                plan = await standby.takeover_plan(wait_for_first=wait_for_first)
                phases["plan.fetch"] = round((trio.current_time() - mark) * 1000, 1)
                phases.update({f"plan.{k}": v for k, v in standby.plan_phases.items()})
        except BaseException:  # cancelled (the node stops): not left behind
            if guard is not None:
                guard.close()
            raise
    else:
        plan = TakeoverPlan()
    phase("plan")

    def close_guard() -> None:
        nonlocal guard
        if guard is not None:
            guard.close()
            guard = None

    # 3. the macvlan
    try:
        opened = macvlan.open(peer_hello["mac"])
    except (NetworkError, NetlinkError, OSError) as exc:
        close_guard()
        raise TakeoverError(f"macvlan {peer.macvlan}: {_describe(exc)}", retry=True) from None
    if drain is not None:
        try:
            await drain.open()
        except OSError as exc:  # the takeover goes on; the leaving peer's clients reconnect
            log.error("drain: cannot pass the leaving peer's connections on: %s", exc)
            drain = None
    # 4. the busiest continuable connections, restored quietly; the rest follow once the address is up,
    # and until they are restored this node's kernel must not reset them (their segments find no socket)
    restored = _restore_quiet(plan.continuations, takeover) if standby is not None else []
    phase("restore_first")
    # 5. the peer's services on its address
    service = AddressService(ipaddress.IPv4Interface(f"{peer.address}/32"), peer.macvlan, services,
                             announce_ifname=node.interface, announce_mac=mac)
    for pool, port in _peer_source_ports(service, plan.backends_to_reset):  # before a new client can take one
        pool.hold(port)
    done = trio.Event()

    async def serve_peer_address(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        class Started:
            # the takeover record is complete the moment the service serves: a status request
            # may be answered before this task's caller resumes
            def started(self, value: None = None) -> None:
                takeover.address_up_at = service.address_up_at
                if standby is None:  # stateless: nothing to continue or reset
                    takeover.settled_at = service.address_up_at
                task_status.started(value)

        try:
            await service.run(task_status=Started())
        finally:
            done.set()

    try:
        await nursery.start(serve_peer_address)
    except (NetworkError, NetlinkError, OSError) as exc:
        for _, rc, rb in restored:
            rc.close_silently()
            rb.close_silently()
        close_guard()
        if drain is not None:
            with trio.CancelScope(shield=True):
                await drain.close()
        if opened:
            macvlan.close()
        raise TakeoverError(f"serving {peer.address}: {_describe(exc)}", retry=True) from None
    phase("address")
    _go_live(restored, service, takeover)
    phase("live_first")
    # 6. the rest of the continuable connections (in the background); then resets, for every connection
    # not continued
    if standby is not None:
        if plan.more_continuations:
            nursery.start_soon(_continue_rest, standby, plan, service, takeover, guard, nursery)
        else:
            if guard is not None:  # nothing left to repair: the kernel may reset what finds no socket
                nursery.start_soon(trio.to_thread.run_sync, guard.close)
            _finish_continuing(standby, plan, takeover, service)
            nursery.start_soon(_answer_syns, standby, takeover, service, nursery)
    # 7. the first client, and the end of a drain
    nursery.start_soon(_watch_first_client, takeover, service)
    if drain is not None:
        nursery.start_soon(drain.close_after, drain.seconds + 1.0)
    log.info("took over %s from %s in %.1f ms (detected after %.0f ms of silence); replies leave with MAC %s; "
             "phases (ms) %s", peer.address, peer.name, (takeover.address_up_at - takeover.detected_at) * 1000,
             (takeover.detected_at - (takeover.last_heard_at or takeover.detected_at)) * 1000, mac, phases)
    return HeldAddress(service, done, takeover, opened, drain)


def _restore_quiet(continuations: list[dict], takeover: Takeover) -> list[tuple[dict, Any, Any]]:
    """Both legs of each continuable connection in repair mode (they send nothing yet); the others, and
    any that fail here, are recorded in ``takeover.connections`` with the reason (they get resets)."""
    restored = []
    for entry in continuations:
        record = {"client": entry.get("client"), "continued": False, "reason": entry.get("reason"),
                  "pending": entry.get("pending")}
        if entry.get("inferred") is True:  # its pairing never came from the peer: the frames named it
            record["inferred"] = True
        takeover.connections.append(record)
        if entry.get("reason") is not None:
            continue
        fresh = entry.get("fresh") is True  # no backend leg: connected anew (ContinuationBook._fresh)
        try:
            cs = tcprepair.TcpSocketState.from_wire(entry["client_state"], max_queue=1 << 30)
            bs = None if fresh else tcprepair.TcpSocketState.from_wire(entry["backend_state"], max_queue=1 << 30)
            rc = tcprepair.restore_quiet(cs)
        except (KeyError, ValueError, tcprepair.TcpRepairError) as exc:
            record["reason"] = f"restore: {exc}"
            continue
        try:
            rb = None if bs is None else tcprepair.restore_quiet(bs)
        except tcprepair.TcpRepairError as exc:
            rc.close_silently()
            record["reason"] = f"restore: {exc}"
            continue
        if fresh:
            record["fresh"] = True
        restored.append((record, rc, rb))
    return restored


#: the rest of the continued connections are restored in batches of this many (a restore and go-live
#: is about 0.3 ms of CPU)...
REST_BATCH = 8
#: ...batches follow each other for up to this long before the event loop takes a turn (the pumps of
#: those already continued run then): a turn per batch of 8 cost ~0.2 ms each of the 1,000 rest
REST_SLICE = 0.005


#: the SYNs of the outage are handed to this node's kernel oldest first, per service port one every this
#: long: all at once, each an SMB client's new session (an smbd fork) on the backend in the same
#: instant, they delayed every new client's first answer by 5-9 ms here, the first of them too
#: (bench/FAILOVER.md, 2026-11-30 later); paced, the first answers came as without them. The last of 10
#: waits 45 ms, not the 1 s of its own SYN retransmission
OUTAGE_SYN_SPACING = 0.005


async def _answer_syns(standby: StatefulStandby, takeover: Takeover, service: AddressService,
                       nursery: trio.Nursery) -> None:
    """New clients' SYNs to the peer's address that arrived during the outage, handed to this node's own
    kernel now that it holds the address: answered at once (one port's paced, :data:`OUTAGE_SYN_SPACING`),
    instead of after the clients' 1 s SYN retransmission (issue 10, behaviour 3; :mod:`proxy.synlog`).
    Returns once they are fetched; the handing runs on in ``nursery`` while ``service`` holds the address
    (afterwards a SYN sent to it would leave this node instead)."""
    packets = await standby.outage_syns()
    if not packets:
        return
    by_port: dict[int, list[bytes]] = {}
    for packet in packets:  # oldest first, as the log gives them
        by_port.setdefault(synlog.destination_port(packet), []).append(packet)

    async def hand(port: int, queue: list[bytes]) -> None:
        for i, packet in enumerate(queue):
            if i:
                await trio.sleep(OUTAGE_SYN_SPACING)
            if service.state not in ("idle", "serving"):  # handed back (or stopped) meanwhile
                return
            takeover.syns_answered += synlog.inject([packet], takeover.address)
        log.info("stateful: %d SYN(s) new clients sent to %s:%d during the outage handed to this node's kernel",
                 len(queue), takeover.address, port)

    for port, queue in by_port.items():
        nursery.start_soon(hand, port, queue)


async def _continue_rest(standby: StatefulStandby, plan: TakeoverPlan, service: AddressService,
                         takeover: Takeover, guard: RstGuard | None, nursery: trio.Nursery) -> None:
    """With the address up: the connections not restored before it, busiest first, restored and live a
    batch at a time (the next chunk is fetched from the observer meanwhile), and after the first chunk
    the outage's SYNs (:func:`_answer_syns`, in ``nursery``); then the guard goes and the connections not
    continued get their resets."""
    rest: list[dict] = []
    chunks_tx, chunks_rx = trio.open_memory_channel[list](1)
    # where the rest's time goes (status: the takeover's phases): restoring and going live here, waiting
    # for the observer's next chunk, and the event loop's turns between batches (the pumps already live)
    spent = {"rest.restore": 0.0, "rest.wait": 0.0, "rest.turns": 0.0}

    async def fetch() -> None:
        async with chunks_tx:
            chunk = await standby.continuations_rest()  # the busiest: before the new clients' SYNs
            if chunk:
                await chunks_tx.send(chunk)
            await _answer_syns(standby, takeover, service, nursery)
            while chunk and (chunk := await standby.continuations_rest()):
                await chunks_tx.send(chunk)

    # no garbage collection while thousands of connections are made: the collections found nothing to
    # free in the rest of 1,000 connections and cost 50-130 ms of it (bench/CONTINUATION.md); the
    # collector runs again as soon as the rest is done
    collecting = gc.isenabled()
    gc.disable()
    try:
        async with trio.open_nursery() as fetching:
            fetching.start_soon(fetch)
            async with chunks_rx:
                t = trio.current_time()
                async for chunk in chunks_rx:
                    now = trio.current_time()
                    spent["rest.wait"] += now - t
                    rest += chunk
                    sliced = now
                    for i in range(0, len(chunk), REST_BATCH):
                        if service.state not in ("idle", "serving"):  # handed back (or stopped) meanwhile
                            for entry in chunk[i:]:
                                takeover.connections.append({"client": entry.get("client"), "continued": False,
                                                             "reason": "the address was released during the repair",
                                                             "pending": entry.get("pending")})
                            break
                        t = trio.current_time()
                        _go_live(_restore_quiet(chunk[i:i + REST_BATCH], takeover), service, takeover)
                        now = trio.current_time()
                        spent["rest.restore"] += now - t
                        if now - sliced >= REST_SLICE:
                            await trio.sleep(0)
                            t = sliced = trio.current_time()
                            spent["rest.turns"] += t - now
                    now = trio.current_time()
                    await trio.sleep(0)  # the chunk's last slice gets its turn too
                    t = trio.current_time()
                    spent["rest.turns"] += t - now
    finally:
        if collecting:
            gc.enable()
        if rest:
            takeover.phases_ms.update({k: round(v * 1000, 1) for k, v in spent.items()})
        standby.continuations_done()
        with trio.CancelScope(shield=True):
            if guard is not None:
                await trio.to_thread.run_sync(guard.close)
            _finish_continuing(standby, replace(plan, continuations=plan.continuations + rest), takeover, service)


def _peer_source_ports(service: AddressService, backends: list[dict]) -> list[tuple[SourcePorts, int]]:
    """The dead peer's backend legs' source ports in ``service``'s pools (``secure`` services only), as
    ``(pool, port)``. A takeover holds them from before its address is up until each leg is continued
    (its connection gives the port back when it ends) or reset (given back then): a new backend
    connection from one of them met the peer's leg still established at the server, and that leg's
    restore failed ("Cannot assign requested address", bench/FAILOVER.md)."""
    found = []
    for leg in backends:
        try:
            server, source = parse_endpoint(leg.get("server")), parse_endpoint(leg.get("client"))
        except ValueError:
            continue
        pools = (proxy.source_pool_towards((str(server.host), server.port)) for proxy in service.proxies)
        pool = next((p for p in pools if p is not None), None)
        if pool is not None:
            found.append((pool, source.port))
    return found


def _finish_continuing(standby: StatefulStandby, plan: TakeoverPlan, takeover: Takeover,
                       service: AddressService) -> None:
    """Every connection is continued or not: resets to the others (their backend legs' source ports
    free again), the resume report told, a log line."""
    ended = _not_continued(plan, takeover)
    takeover.resets, takeover.backend_resets = standby.send_resets(ended)
    for pool, port in _peer_source_ports(service, ended.backends_to_reset):
        pool.give_back(port)
    takeover.settled_at = trio.current_time()
    continued = [r["client"] for r in takeover.connections if r["continued"]]
    if continued:
        standby.note_continued(continued)
    if takeover.connections:
        rest = {k: v for k, v in takeover.phases_ms.items() if k.startswith("rest.")}
        inferred = sum(1 for r in takeover.connections if r["continued"] and r.get("inferred"))
        log.info("stateful: continued %d of the peer's %d connection(s)%s in %.1f ms%s%s", len(continued),
                 len(takeover.connections),
                 f" ({inferred} paired from the frames: the peer's pairing had not arrived)" if inferred else "",
                 ((takeover.all_continued_at or takeover.detected_at) - takeover.detected_at) * 1000,
                 f" (after the address: {rest})" if rest else "",
                 "".join(f"; {r['client']} reset: {r['reason']}" for r in takeover.connections
                         if not r["continued"])[:2000])


def _go_live(restored: list[tuple[dict, Any, Any]], service: AddressService, takeover: Takeover) -> None:
    """The address is up: each restored connection's legs go live and get their pumps."""
    by_port = {p: proxy for proxy in service.proxies for p in proxy.service.ports}
    for record, rc, rb in restored:
        port = rc.state.local_port
        proxy = by_port.get(port)
        if proxy is None:
            record["reason"] = f"no service on port {port} here"
            rc.close_silently()
            if rb is not None:
                rb.close_silently()
            continue
        try:
            client = rc.go_live()
            backend = rb.go_live() if rb is not None else None
        except tcprepair.TcpRepairError as exc:
            record["reason"] = f"go live: {exc}"
            for s in (rc.sock, rb.sock if rb is not None else None):
                if s is not None:
                    s.close()
            continue
        peer = (rc.state.remote_address, rc.state.remote_port)
        if backend is None:  # fresh: the client's bytes wait unread; its backend is connected as for a new client
            service.serve_restored_client(proxy, client, port, peer=peer,
                                          client_origins=(rc.state.recv_seq, rc.state.send_seq))
        else:
            service.adopt(proxy, client, backend, port, peer=peer, anchor=relay_anchor(rc.state, rb.state))
        record["continued"] = True
        takeover.all_continued_at = trio.current_time()
        if takeover.first_continued_at is None:
            takeover.first_continued_at = takeover.all_continued_at


def _not_continued(plan: TakeoverPlan, takeover: Takeover) -> TakeoverPlan:
    """The plan's resets without the connections that were continued (client legs by client, backend
    legs by the peer's source port and server)."""
    done = {r["client"] for r in takeover.connections if r["continued"]}
    if not done:
        return plan
    legs = {(str(e.get("source_port")), e.get("backend")) for e in plan.continuations if e.get("client") in done}
    clients = [c for c in plan.clients_to_reset if c["client"] not in done]
    backends = [c for c in plan.backends_to_reset if (c["client"].rsplit(":", 1)[-1], c["server"]) not in legs]
    return replace(plan, clients_to_reset=clients, backends_to_reset=backends)


def _describe(exc: Exception) -> str:
    """A kernel error for a person: pyroute2's NetlinkError prints as a tuple."""
    if isinstance(exc, NetlinkError):
        return f"{exc.args[-1]} (errno {exc.code})"
    return str(exc)


async def _watch_first_client(takeover: Takeover, service: AddressService) -> None:
    while takeover.first_client_at is None and service.state in ("idle", "serving"):
        firsts = [p.first_client_at for p in service.proxies if p.first_client_at is not None]
        if firsts:
            takeover.first_client_at = min(firsts)
            log.info("first client served on %s %.1f ms after the peer was declared dead", takeover.address,
                     (takeover.first_client_at - takeover.detected_at) * 1000)
            return
        await trio.sleep(0.001)
