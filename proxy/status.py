"""Status assembly: what a running node says about itself, read from its objects into the typed
records of :mod:`schema.records` (which this module re-exports, so ``proxy.status`` names the whole
status vocabulary for the node's code)."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from schema.records import *  # noqa: F401,F403 (the record types, re-exported)
from proxy import sockmap
from schema.records import (AddressStatus, BytePathStatus, ConnectionRecord, DetectorStatus, HeartbeatStatus, LinkStatus, PeerRefusal, NodeStatus,
                            OwnAddressStuck, PairStatus, ProbeStatus,
                            ProxiedRecord, RttStatus, MoveRecord, ServiceStatus, TakeoverFailure, from_json)
from schema.records import __all__ as _records

__all__ = [*_records, "service_status", "proxied_connections", "merge_connections", "node_status",
           "collect_status"]


def service_status(proxy: Any) -> ServiceStatus:
    """One :class:`~proxy.dataplane.ServiceProxy`'s counters."""
    s, stats = proxy.service, proxy.stats
    if hasattr(proxy, "refresh_counters"):
        proxy.refresh_counters()  # kernel-relayed connections' bytes, from shared memory
    return ServiceStatus(
        name=s.name, protocol=s.protocol, address=str(proxy.address), ports=list(s.ports), backend=str(s.backend),
        connections_active=stats.connections_active, connections_total=stats.connections_total,
        bytes_to_backend=stats.bytes_to_backend, bytes_to_client=stats.bytes_to_client,
        backend_failures=stats.backend_failures, connections_reset=stats.connections_reset,
        internal_errors=stats.internal_errors, last_backend_error=stats.last_backend_error,
        source_ports_exhausted=stats.source_ports_exhausted, fd_limit_paused=stats.fd_limit_paused,
        fd_limit_pauses=stats.fd_limit_pauses, fd_errors=stats.fd_errors,
        connections_sockmap=getattr(stats, "connections_sockmap", 0),
        sockmap_switched=getattr(stats, "sockmap_switched", 0), sockmap_refused=getattr(stats, "sockmap_refused", 0),
        origins_unknown=getattr(stats, "origins_unknown", 0), pairings_late=getattr(stats, "pairings_late", 0))


def proxied_connections(services: list[Any], now: float | None = None) -> list[ConnectionRecord]:
    """The connections the node's :class:`~proxy.dataplane.ServiceProxy` s hold now, from their sockets."""
    now = time.monotonic() if now is None else now
    out = []
    for proxy in services:
        if hasattr(proxy, "refresh_counters"):
            proxy.refresh_counters()
        for conn in sorted(proxy.connections, key=lambda c: (c.client, c.port)):
            source = getattr(conn, "backend_source", None)
            out.append(ConnectionRecord(
                client=f"{conn.client[0]}:{conn.client[1]}", server=f"{proxy.address}:{conn.port}",
                protocol=proxy.service.protocol,
                proxied=ProxiedRecord(
                    service=proxy.service.name, backend=f"{proxy.service.backend.host}:{conn.port}",
                    backend_source=None if source is None else f"{source[0]}:{source[1]}",
                    age_s=round(now - conn.started, 3), bytes_to_backend=getattr(conn, "bytes_to_backend", 0),
                    bytes_to_client=getattr(conn, "bytes_to_client", 0))))
    return out


def merge_connections(decoded: list[ConnectionRecord], proxied: list[ConnectionRecord]) -> list[ConnectionRecord]:
    """The decoded records, each with its socket side where this node proxies it; then the proxied
    connections no decoder has seen (yet). One record per (client, server)."""
    by_key = {(c.client, c.server): c for c in proxied}
    out = []
    for c in decoded:
        mine = by_key.pop((c.client, c.server), None)
        out.append(dataclasses.replace(c, proxied=mine.proxied) if mine is not None else c)
    return out + list(by_key.values())


def _count_tasks() -> int:
    """How many trio tasks this node runs (status shows it, so leaks across takeovers are visible)."""
    import trio

    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks)

    return walk(trio.lowlevel.current_root_task())


def _link_status(node: Any) -> LinkStatus:
    link = node.link
    if link is None:
        return LinkStatus(state="starting", refused_reason=None, peer=node.config.peer.name, dialled_by=None,
                          silent_for=None, counters={}, rtt_ms=None)
    raw = link.status()
    rtt = raw.get("rtt")
    return LinkStatus(
        state=raw["state"], refused_reason=raw.get("refused_reason"), peer=raw.get("peer") or node.config.peer.name,
        dialled_by=raw.get("dialled_by"), silent_for=raw.get("silent_for"), counters=dict(raw.get("counters") or {}),
        rtt_ms=None if not rtt else RttStatus(
            last=round(rtt["last"] * 1000, 3), min=round(rtt["min"] * 1000, 3), max=round(rtt["max"] * 1000, 3),
            median=round(rtt["median"] * 1000, 3), count=rtt["count"]),
        unauthenticated=raw.get("unauthenticated", 0), unauthenticated_peak=raw.get("unauthenticated_peak", 0),
        unauthenticated_buffered=raw.get("unauthenticated_buffered", 0),
        peer_refusal=from_json(PeerRefusal, raw["peer_refusal"]) if raw.get("peer_refusal") else None,
        dial=raw.get("dial"), dial_failures=raw.get("dial_failures", 0), last_dial_error=raw.get("last_dial_error"),
        dial_problem=raw.get("dial_problem"))


def _pair_status(node: Any) -> PairStatus:
    config, core = node.config, node.core
    own, peer = config.node, config.peer
    connected = node.link is not None and node.link.state == "connected"
    peer_holds = set((node.peer_info or {}).get("holds") or []) if connected else set()
    peer_dead = node.detector is not None and node.detector.state == "dead"

    def holder(address: str, mine: bool) -> str:
        if mine:
            return own.name
        return peer.name if address in peer_holds else "nobody" if peer_dead else f"{peer.name}?"

    peer_serving = node.peer_service is not None and node.peer_service.state == "serving"
    return PairStatus(
        mode=config.pair.mode, peer=peer.name,
        peer_state=node.detector.state if node.detector else "unknown",
        addresses={
            str(own.address.ip): AddressStatus(owner=own.name, role=core.own_role,
                                               held_by=holder(str(own.address.ip), node.own_service.state == "serving")),
            str(peer.address): AddressStatus(owner=peer.name, role=core.peer_role,
                                             held_by=holder(str(peer.address), peer_serving)),
        },
        link=_link_status(node),
        peer_services=[service_status(p) for p in node.peer_service.proxies] if node.peer_service else [],
        takeovers=[t.report() for t in node.takeovers],
        takeovers_total=node.takeovers[-1].number if node.takeovers else 0,
        probe=from_json(ProbeStatus, node.probe_responder.stats()) if node.probe_responder
        else ProbeStatus(answered=0, rejected=0),
        detector=from_json(DetectorStatus, node.detector.stats()) if node.detector else None,
        heartbeat=from_json(HeartbeatStatus, node.heartbeats.status())
        if getattr(node, "heartbeats", None) is not None else None,
        takeover_error=None if core.last_takeover_error is None else TakeoverFailure(
            error=core.last_takeover_error, attempts=core.takeover_attempts),
        own_address_stuck=_own_address_stuck(core), address_mismatch=core.address_mismatch,
        move_in_progress=getattr(node, "move_in_progress", None),
        last_move=from_json(MoveRecord, dataclasses.asdict(node.moves[-1])) if getattr(node, "moves", None) else None)



def _own_address_stuck(core: Any) -> OwnAddressStuck | None:
    if core.stuck is None or core.not_serving_since is None:
        return None
    import trio

    return OwnAddressStuck(role=core.own_role, for_s=round(trio.current_time() - core.not_serving_since, 1),
                           reason=core.stuck)


def _proxies(node: Any) -> list[Any]:
    return list(node.own_service.proxies) + (list(node.peer_service.proxies) if node.peer_service is not None else [])


def node_status(node: Any) -> NodeStatus:
    """What a :class:`proxy.node.Node` knows without asking its observer (see :func:`collect_status`)."""
    cfg = node.config.node
    return NodeStatus(
        node=cfg.name, pid=os.getpid(), state=node.state, interface=cfg.interface, mac=node.mac,
        address=str(cfg.address),
        uptime=round(time.monotonic() - node.started_at, 3) if node.started_at else 0.0,
        tasks=_count_tasks(), services=[service_status(p) for p in node.own_service.proxies],
        pair=_pair_status(node) if node.config.peer is not None else None,
        connections=proxied_connections(_proxies(node)), errors={}, digests={},
        byte_path=BytePathStatus(**sockmap.ACTIVE.status()))


async def collect_status(node: Any, *, tables: bool = True) -> NodeStatus:
    """The full status: :func:`node_status`, and in stateful mode the observer's decoded tables of
    both addresses (merged with the node's own sockets), their digests, the comparison with the peer,
    the snoopers' counters and the resume report. ``tables=False`` leaves out the observer's tables
    and digests (the metrics need neither, and a snapshot of many connections is the costly part)."""
    status = node_status(node)
    if node.standby is not None:
        await node.standby.add_status(status, holds_peer=node.core.holds_peer, takeovers=node.takeovers,
                                      tables=tables)
    return status
