"""Prometheus metrics from the typed status (:mod:`proxy.status`), and a tiny ``GET /metrics`` server.

Why rendered from :class:`~proxy.status.NodeStatus` and not kept in a metrics registry: the status
already holds every number, and one source means ``pairproxy status``, ``status --json`` and the
metrics can never disagree. :func:`render` is pure (status in, text out), so it is tested without a
node; ``pairproxy status --prometheus`` prints it (a textfile collector can run that), and a node
with ``[node] metrics = "IP:PORT"`` serves it over HTTP itself.

Conventions (https://prometheus.io/docs/practices/naming/): base units (seconds, bytes), counters end
in ``_total``, a ``# HELP`` and ``# TYPE`` line for every family even when it has no sample now (a
single node has no peer), label values escaped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from proxy.status import NodeStatus

log = logging.getLogger("pairproxy.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float | int) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


@dataclass
class _Family:
    name: str
    kind: str  # counter | gauge
    help: str
    samples: list[tuple[dict[str, str], float | int]] = field(default_factory=list)

    def add(self, value: float | int, **labels: Any) -> None:
        self.samples.append(({k: str(v) for k, v in labels.items()}, value))

    def text(self) -> list[str]:
        lines = [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        for labels, value in self.samples:
            label_text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
            lines.append(f"{self.name}{{{label_text}}} {_number(value)}" if labels else f"{self.name} {_number(value)}")
        return lines


def render(status: NodeStatus | None) -> str:
    """The text exposition format of a node's status; ``None`` (the node does not answer): only
    ``pairproxy_up 0``."""
    fam = {f.name: f for f in [
        _Family("pairproxy_up", "gauge", "1 if the node answered its status request, 0 if it did not."),
        _Family("pairproxy_connections_active", "gauge", "Client connections proxied now."),
        _Family("pairproxy_connections_total", "counter", "Client connections accepted."),
        _Family("pairproxy_bytes_total", "counter",
                "Bytes proxied, by direction (to_backend: from clients; to_client: from the backend)."),
        _Family("pairproxy_backend_failures_total", "counter",
                "Client connections closed because the backend refused or did not answer."),
        _Family("pairproxy_source_ports_exhausted_total", "counter",
                "Client connections refused because every source port below 1024 to the backend was in use."),
        _Family("pairproxy_accept_paused", "gauge",
                "1 while the service does not accept: the node is near its file descriptor limit."),
        _Family("pairproxy_peer_misconfigured", "gauge",
                "1 if the peer answers but cannot be authenticated (key, mode or names differ): no takeover."),
        _Family("pairproxy_peer_alive", "gauge", "1 if the failure detector holds the peer alive, else 0."),
        _Family("pairproxy_sync_link_up", "gauge", "1 if the sync link to the peer is connected, else 0."),
        _Family("pairproxy_sync_link_rtt_seconds", "gauge",
                "Heartbeat round trip over the sync link, over the last heartbeats (stat: last, min, median, max)."),
        _Family("pairproxy_heartbeat_path_up", "gauge",
                "1 while the peer's heartbeats arrive on the path (sync, service), else 0."),
        _Family("pairproxy_heartbeat_gap_seconds", "gauge",
                "Time between the peer's heartbeats on a path over the last minute (stat: p50, p99, max)."),
        _Family("pairproxy_heartbeat_jitter_seconds", "gauge",
                "|gap - heartbeat| of the peer's heartbeats on a path over the last minute (stat: p50, p99, max)."),
        _Family("pairproxy_heartbeat_rejected_total", "counter",
                "Heartbeat datagrams rejected per path (malformed, reflected, replayed, not authenticated)."),
        _Family("pairproxy_heartbeat_realtime", "gauge",
                "1 if the heartbeat process runs at SCHED_FIFO priority, else 0."),
        _Family("pairproxy_address_held", "gauge", "1 if this node serves the address now, else 0."),
        _Family("pairproxy_takeovers_total", "counter", "Takeovers of the peer's address since this node started."),
        _Family("pairproxy_last_takeover_seconds", "gauge",
                "The last takeover, by phase: detection (peer last heard until declared dead), address "
                "(declared dead until its address was served here), first_client (declared dead until the "
                "first client was accepted)."),
        _Family("pairproxy_snooper_kernel_drops_total", "counter",
                "Frames the kernel dropped before the snooper read them (stateful; view: own_address, peer_address, peer_backend)."),
        _Family("pairproxy_snooper_segments_refused_total", "counter",
                "Segments the stateful view's TCP tracker refused and ignored (view; reason: out_of_window, "
                "rst_challenged, rst_out_of_window, syn_challenged): a spoofer's, or a capture gap's."),
        _Family("pairproxy_state_in_sync", "gauge",
                "Stateful: 1 if this node's view of the peer's address matches the peer's own digest, 0 if not."),
        _Family("pairproxy_sync_link_dial_failures_total", "counter",
                "Dials of peer.link that failed (refused, unreachable, no answer)."),
        _Family("pairproxy_sync_link_problem", "gauge",
                "1 while peer.link is known wrong (dials failing for seconds, or the peer listens elsewhere)."),
        _Family("pairproxy_own_address_unserved_seconds", "gauge",
                "How long the own address has stayed claiming/yielded past a start-up or hand-back (0: served)."),
        _Family("pairproxy_snooper_frames_total", "counter",
                "Stateful: frames seen per view and direction (to or from the view's address)."),
        _Family("pairproxy_state_sees_peer", "gauge",
                "Stateful: 0 while this node sees nothing of the peer's traffic although the peer has some, 1 if it sees it."),
        _Family("pairproxy_byte_path", "gauge",
                "1 for the byte path new connections take (path: sockmap = relayed in the kernel, splice = the splice pump)."),
        _Family("pairproxy_connections_sockmap", "gauge", "Client connections whose bytes the kernel relays now."),
        _Family("pairproxy_sockmap_switched_total", "counter",
                "Connections the kernel relay handed to the splice pump (a bulk phase, or a slow reader)."),
    ]}
    if status is None:
        fam["pairproxy_up"].add(0)
        return "\n".join(line for f in fam.values() for line in f.text()) + "\n"
    fam["pairproxy_up"].add(1)
    if status.byte_path is not None:
        fam["pairproxy_byte_path"].add(1, path=status.byte_path.path, configured=status.byte_path.configured)
    services = list(status.services) + (list(status.pair.peer_services) if status.pair else [])
    for s in services:
        fam["pairproxy_connections_sockmap"].add(s.connections_sockmap, service=s.name, address=s.address)
        fam["pairproxy_sockmap_switched_total"].add(s.sockmap_switched, service=s.name, address=s.address)
        fam["pairproxy_connections_active"].add(s.connections_active, service=s.name, address=s.address)
        fam["pairproxy_connections_total"].add(s.connections_total, service=s.name, address=s.address)
        fam["pairproxy_bytes_total"].add(s.bytes_to_backend, service=s.name, address=s.address, direction="to_backend")
        fam["pairproxy_bytes_total"].add(s.bytes_to_client, service=s.name, address=s.address, direction="to_client")
        fam["pairproxy_backend_failures_total"].add(s.backend_failures, service=s.name, address=s.address)
        fam["pairproxy_source_ports_exhausted_total"].add(s.source_ports_exhausted, service=s.name, address=s.address)
        fam["pairproxy_accept_paused"].add(int(s.fd_limit_paused), service=s.name, address=s.address)
    pair = status.pair
    if pair is not None:
        fam["pairproxy_peer_alive"].add(int(pair.peer_state == "alive"), peer=pair.peer)
        fam["pairproxy_peer_misconfigured"].add(int(pair.peer_state == "misconfigured"), peer=pair.peer)
        fam["pairproxy_sync_link_up"].add(int(pair.link.state == "connected"), peer=pair.peer)
        fam["pairproxy_sync_link_dial_failures_total"].add(pair.link.dial_failures, peer=pair.peer)
        fam["pairproxy_sync_link_problem"].add(int(pair.link.dial_problem is not None), peer=pair.peer)
        stuck = pair.own_address_stuck
        fam["pairproxy_own_address_unserved_seconds"].add(stuck.for_s if stuck else 0, peer=pair.peer)
        rtt = pair.link.rtt_ms
        if rtt is not None:
            for stat in ("last", "min", "median", "max"):
                fam["pairproxy_sync_link_rtt_seconds"].add(getattr(rtt, stat) / 1000, peer=pair.peer, stat=stat)
        hb = pair.heartbeat
        if hb is not None:
            fam["pairproxy_heartbeat_realtime"].add(int(hb.realtime), peer=pair.peer)
            for name, p in hb.paths.items():
                fam["pairproxy_heartbeat_path_up"].add(int(p.up), peer=pair.peer, path=name)
                fam["pairproxy_heartbeat_rejected_total"].add(p.rejected, peer=pair.peer, path=name)
                for family, series in (("pairproxy_heartbeat_gap_seconds", p.gap_ms),
                                       ("pairproxy_heartbeat_jitter_seconds", p.jitter_ms)):
                    if series is not None:
                        for stat in ("p50", "p99", "max"):
                            fam[family].add(getattr(series, stat) / 1000, peer=pair.peer, path=name, stat=stat)
        for address, a in pair.addresses.items():
            fam["pairproxy_address_held"].add(int(a.held_by == status.node), address=address, owner=a.owner)
        fam["pairproxy_takeovers_total"].add(pair.takeovers_total)
        if pair.takeovers:
            t = pair.takeovers[-1]
            for phase, ms in (("detection", t.silence_ms), ("address", t.address_moved_ms),
                              ("first_client", t.first_client_ms)):
                if ms is not None:
                    fam["pairproxy_last_takeover_seconds"].add(ms / 1000, phase=phase, address=t.address)
        sync = pair.state_sync
        if sync is not None:
            for snooper in sync.snoopers:
                fam["pairproxy_snooper_kernel_drops_total"].add(snooper.kernel_drops, view=snooper.view)
                for reason, n in snooper.segments_refused.items():
                    fam["pairproxy_snooper_segments_refused_total"].add(n, view=snooper.view, reason=reason)
                fam["pairproxy_snooper_frames_total"].add(snooper.frames_to, view=snooper.view, direction="to")
                fam["pairproxy_snooper_frames_total"].add(snooper.frames_from, view=snooper.view, direction="from")
            if sync.sight != "unknown":
                fam["pairproxy_state_sees_peer"].add(int(sync.sight != "nothing"), peer=pair.peer)
            if sync.in_sync is not None:
                fam["pairproxy_state_in_sync"].add(int(sync.in_sync), peer=pair.peer)
    return "\n".join(line for f in fam.values() for line in f.text()) + "\n"


# --------------------------------------------------------------------------------- HTTP endpoint
MAX_REQUEST_HEAD = 8192


async def serve_metrics(endpoint: Any, get_text, *, task_status: Any = None) -> None:
    """Answer ``GET /metrics`` on ``endpoint`` (``host``, ``port``) with ``await get_text()`` until
    cancelled. HTTP/1.0 style: one request per connection, then close; enough for a Prometheus scrape
    and curl, and nothing for a client to keep open."""
    import socket

    import trio

    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock._sock.bind((str(endpoint.host), endpoint.port))  # a literal address: no resolution to await
        sock.listen(16)
    except OSError as exc:
        sock.close()
        raise OSError(f"node.metrics {endpoint}: cannot listen: {exc.strerror or exc}") from None
    listener = trio.SocketListener(sock)
    log.info("metrics at http://%s/metrics", endpoint)
    if task_status is not None:
        task_status.started()
    async with listener, trio.open_nursery() as nursery:
        while True:
            stream = await listener.accept()
            nursery.start_soon(_answer, stream, get_text)


async def _answer(stream: Any, get_text) -> None:
    import trio

    async with stream:
        head = b""
        with trio.move_on_after(5):
            try:
                while b"\r\n\r\n" not in head and b"\n\n" not in head and len(head) < MAX_REQUEST_HEAD:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break
                    head += chunk
            except trio.BrokenResourceError:
                return
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) < 2:
            status, body, ctype = "400 Bad Request", b"bad request\n", "text/plain"
        elif parts[0] not in (b"GET", b"HEAD"):
            status, body, ctype = "405 Method Not Allowed", b"only GET\n", "text/plain"
        elif parts[1].split(b"?", 1)[0] != b"/metrics":
            status, body, ctype = "404 Not Found", b"try /metrics\n", "text/plain"
        else:
            try:
                status, body, ctype = "200 OK", (await get_text()).encode(), CONTENT_TYPE
            except Exception as exc:  # a bug behind the metrics must not stop the node serving clients
                log.exception("metrics failed")
                status, body, ctype = "500 Internal Server Error", f"{type(exc).__name__}: {exc}\n".encode(), \
                    "text/plain"
        response = (f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n").encode() + (body if parts[:1] != [b"HEAD"] else b"")
        try:
            await stream.send_all(response)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def serve_node_metrics(endpoint: Any, node: Any, *, task_status: Any = None) -> None:
    """A node's ``[node] metrics``: its full status (:func:`proxy.status.collect_status`), rendered."""
    from proxy.status import collect_status

    async def text() -> str:
        return render(await collect_status(node, tables=False))

    await serve_metrics(endpoint, text, task_status=task_status)
