"""Stateful mode: what a node knows of every connection to an address, and how the pair checks it.

An :class:`AddressView` is the sans-I/O :class:`protocols.pipeline.Pipeline` fed with the frames a
:class:`capture.snooper.Snooper` sees for one service address. A node in a stateful pair keeps two:
one of its *own* address (its proxied client connections, seen on its own interface), and one of
the *peer's* address (the peer's client connections, seen because the service network floods or
mirrors the peer's frames to it; patent element 310: decode, never reply). Both nodes therefore run
the same decoders over the same frames of one address, and their digests must agree:
:class:`ViewSync` compares the digest the owner sends over the sync link with the standby's own,
asks for a snapshot when they keep differing, and says what differs.

On takeover the standby knows every live connection of the dead peer with its exact sequence numbers
(:func:`reset_frames`: a valid RST to each client at once, instead of clients waiting for their own
timers), and a :class:`ResumeWatcher` reports per client what it re-established (a SESSION_SETUP
naming its old session, durable handle reconnects, NFSv4 reclaims) and what was lost.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from protocols.frames import ACK, RST, ipv4_tcp
from protocols.pipeline import Pipeline

log = logging.getLogger("pairproxy.stateful")

STATUS_SUCCESS = 0
SESSION_SETUP, CREATE = 0x01, 0x05
DURABLE_RECONNECT = {"DHnC", "DH2C"}


class AddressView:
    """The decoded state of the connections to one service address, from the frames seen for it."""

    def __init__(self, address: str, ports: list[int], *, as_client_of: list[str] | None = None):
        """The connections *to* ``address`` on ``ports``; or, with ``as_client_of`` (backend hosts),
        the connections *from* ``address`` to those hosts on ``ports``: the peer's backend side."""
        self.address = address
        self.ports = sorted(set(ports))
        self.as_client_of = sorted(set(as_client_of)) if as_client_of else None
        #: what the snooper must capture: the service address, or the backend hosts
        self.capture_addresses = self.as_client_of or [address]
        self.pipeline = Pipeline(smb_ports=[p for p in self.ports if p == 445],
                                 nfs_ports=[p for p in self.ports if p != 445], zero_copy=True,
                                 decode=self.as_client_of is None)  # backend legs: sequence state only
        self.frames = 0
        self.bytes = 0
        #: frames whose IPv4 destination / source is ``address``: which way this node sees its traffic
        #: (a standby on a switch that floods only unknown destinations sees one way or none; issue 9.9)
        self.frames_to = 0
        self.frames_from = 0
        self._address_bytes = socket.inet_aton(address)
        self.last_frame_at: float | None = None
        self.watcher: ResumeWatcher | None = None

    def on_frame(self, frame: bytes | memoryview, ts: float) -> list:
        """Snooper callback: one frame in; the events it produced (a continuation book takes them too).
        Never raises (the pipeline turns bad input into events)."""
        self.frames += 1
        self.bytes += len(frame)
        self.last_frame_at = ts
        ip = 18 if frame[12:14] == b"\x81\x00" else 14   # one 802.1Q tag at most (as capture.bpf)
        if frame[ip + 16:ip + 20] == self._address_bytes:
            self.frames_to += 1
        elif frame[ip + 12:ip + 16] == self._address_bytes:
            self.frames_from += 1
        events = self.pipeline.feed_frame(frame, ts)
        if self.watcher is not None and events:
            self.watcher.feed(events)
        return events

    def snapshot(self) -> dict:
        """This address's connections in the schema shared with ``pairproxy replay --json``."""
        snap = self.pipeline.snapshot()
        side = "client" if self.as_client_of else "server"
        snap["connections"] = [c for c in snap["connections"] if c[side].rsplit(":", 1)[0] == self.address]
        return snap

    def digest(self, snapshot: dict | None = None) -> str:
        return self.pipeline.digest(snapshot if snapshot is not None else self.snapshot())

    def digest_message(self) -> dict:
        """What the pair compares every 250 ms: the digest, and what this view saw (frames, bytes,
        frames each way, connections), so the other node can tell a blind view from an idle peer."""
        snap = self.snapshot()
        return {"digest": self.digest(snap), "frames": self.frames, "bytes": self.bytes,
                "frames_to": self.frames_to, "frames_from": self.frames_from,
                "connections": len(snap["connections"])}

    def covers(self, key) -> bool:
        """Is this tracked connection one of this view's (to the address, or from it as a client)?"""
        return (key.client_ip if self.as_client_of else key.server_ip) == self.address

    def forget(self, before: float, *, keep: set[tuple[str, str]] | None = None, gone: bool) -> list:
        """Drop this view's connections first seen before ``before`` (capture time), except those in
        ``keep`` ((client, server) pairs); the events that ends them (one ``ConnectionClosed`` each, for
        whatever else keeps per-connection state: a continuation book). Why a view forgets (see
        :class:`ViewSync`): the owner's snapshot no longer has them (``gone=False``), or the process that
        served them died (``gone=True``: their late segments are ignored as after a close)."""
        keys = [k for k, c in self.pipeline.tcp.connections.items()
                if c.opened_at < before and self.covers(k) and (keep is None or (k.client, k.server) not in keep)]
        return self.pipeline.forget(keys, gone=gone) if keys else []

    def live_connections(self) -> list[dict]:
        """Connections with known sequence numbers each way (those a valid RST can end)."""
        return [c for c in self.snapshot()["connections"]
                if c["tcp"].get("server_next_seq") is not None and c["tcp"].get("client_next_seq") is not None]


def tcp_reset(src: str, dst: str, sport: int, dport: int, seq: int, ack: int) -> bytes:
    """An IPv4 packet carrying a TCP RST+ACK (a takeover may need thousands: built with struct)."""
    return ipv4_tcp(src, dst, sport, dport, seq, ack, RST | ACK)


def reset_frames(connections: list[dict], toward: str = "client") -> list[tuple[str, bytes]]:
    """One RST per connection, as the server would send it to the client (``toward="client"``) or
    the client to the server (``"server"``): (destination IP, IPv4 packet).

    The sequence number is exactly the next one the receiver expects (RFC 5961 accepts only an exact
    match), so its kernel takes the reset and its application learns at once that the connection is
    gone, even if it had nothing to send and would otherwise wait for its own timers (an NFS client
    waiting for a reply the dead node had already acknowledged the call for).

    Toward the server is for the dead peer's *backend* connections: the file server would otherwise
    keep their sessions and opens (and refuse the reconnecting client with a sharing violation)
    until its own keepalive gives up on them.
    """
    out = []
    for c in connections:
        client_ip, client_port = c["client"].rsplit(":", 1)
        server_ip, server_port = c["server"].rsplit(":", 1)
        server_next, client_next = c["tcp"]["server_next_seq"], c["tcp"]["client_next_seq"]
        if toward == "client":
            out.append((client_ip, tcp_reset(server_ip, client_ip, int(server_port), int(client_port),
                                             server_next, client_next)))
        else:
            out.append((server_ip, tcp_reset(client_ip, server_ip, int(client_port), int(server_port),
                                             client_next, server_next)))
    return out


def _by_client(snapshot: dict) -> dict[str, dict]:
    clients: dict[str, dict] = {}
    for c in snapshot["connections"]:
        ip = c["client"].rsplit(":", 1)[0]
        entry = clients.setdefault(ip, {"client": ip, "protocols": set(), "connections": 0, "sessions": {},
                                        "opens": [], "nfs_v4_opens": []})
        entry["protocols"].add(c["protocol"])
        entry["connections"] += 1
        for s in c["sessions"]:
            entry["sessions"][s["session_id"]] = s["user"]
        entry["opens"] += [{"path": o["path"], "durable": o["durable"]} for o in c["opens"]]
        nfs = c.get("nfs") or {}
        entry["nfs_v4_opens"] += [o.get("path") for o in (nfs.get("v4") or {}).get("opens", [])]
    return clients


@dataclass
class ResumeWatcher:
    """After a takeover: what each client of the dead peer re-established, from the decoded events."""

    before: dict[str, dict]
    started: float = field(default_factory=time.time)
    reconnected: dict[str, float] = field(default_factory=dict)
    resumed_sessions: dict[str, list[dict]] = field(default_factory=dict)
    new_sessions: dict[str, int] = field(default_factory=dict)
    reopened: dict[str, list[dict]] = field(default_factory=dict)
    nfs_reclaims: dict[str, list[str]] = field(default_factory=dict)
    #: client IP -> how many of its connections the takeover continued (issue 10): nothing to re-establish
    continued: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_snapshot(cls, snapshot: dict) -> "ResumeWatcher":
        return cls(before=_by_client(snapshot))

    def feed(self, events: list[tuple[Any, object]]) -> None:
        from protocols.smb2 import Smb2Response

        for key, ev in events:
            ip = key.client_ip
            if ip not in self.before:
                continue
            # a reconnection starts with a SYN; a connection picked up mid-stream is an old one seen
            # again (a continued connection after the view forgot the dead peer's, issue 10)
            if type(ev).__name__ == "ConnectionOpened" and not getattr(ev, "mid_stream", False) \
                    and ip not in self.reconnected:
                self.reconnected[ip] = time.time() - self.started
            if isinstance(ev, Smb2Response) and ev.status == STATUS_SUCCESS and ev.request is not None:
                fields = ev.request.fields or {}
                if ev.command == SESSION_SETUP:
                    previous = fields.get("previous_session_id") or 0
                    if previous and previous in self.before[ip]["sessions"]:
                        self.resumed_sessions.setdefault(ip, []).append(
                            {"old_session_id": previous, "new_session_id": ev.session_id})
                    else:
                        self.new_sessions[ip] = self.new_sessions.get(ip, 0) + 1
                elif ev.command == CREATE:
                    contexts = set(fields.get("contexts") or [])
                    self.reopened.setdefault(ip, []).append(
                        {"path": fields.get("name"), "durable_reconnect": bool(contexts & DURABLE_RECONNECT)})
            elif type(ev).__name__ == "RpcCall" and getattr(ev, "name", "") == "NFSv4.COMPOUND":
                for op in (getattr(ev, "args", None) or {}).get("ops", []):
                    if (op.get("op") == "OPEN" and op.get("claim") == "PREVIOUS") or op.get("op") == "RECLAIM_COMPLETE":
                        self.nfs_reclaims.setdefault(ip, []).append(op.get("op"))

    def _verdict(self, ip: str, before: dict, resumed: list, lost_opens: list) -> str:
        if ip not in self.reconnected and self.continued.get(ip):
            return "continued (no reconnect)"  # (its other connections, if any, were ending anyway)
        if ip not in self.reconnected:
            return "not back yet"
        durable = all(r["durable_reconnect"] for r in self.reopened.get(ip, [])) and self.reopened.get(ip)
        if len(resumed) >= len(before["sessions"]) and not lost_opens and (durable or not before["opens"]):
            return "resumed"
        words = ["reconnected with a new session" if before["sessions"] and not resumed else "reconnected"]
        if lost_opens:
            words.append(f"{len(lost_opens)} open(s) not reopened")
        return ", ".join(words)

    def report(self) -> list[dict]:
        """Per client: what it had, whether it came back, what it resumed, what it lost
        (:class:`proxy.status.ResumeRecord` s, as plain data: they cross the observer's pipe)."""
        from proxy.status import ResumeRecord, from_json, to_json

        out = []
        for ip, b in sorted(self.before.items()):
            reopened_paths = {r["path"] for r in self.reopened.get(ip, [])}
            lost_opens = [o for o in b["opens"] if o["path"] not in reopened_paths]
            resumed = self.resumed_sessions.get(ip, [])
            out.append(from_json(ResumeRecord, {
                "client": ip,
                "protocols": sorted(b["protocols"]),
                "before": {"connections": b["connections"],
                           "sessions": [{"session_id": k, "user": v} for k, v in sorted(b["sessions"].items())],
                           "opens": b["opens"], "nfs_v4_opens": b["nfs_v4_opens"]},
                "reconnected_after_s": None if ip not in self.reconnected else round(self.reconnected[ip], 3),
                "resumed_sessions": resumed,
                "new_sessions": self.new_sessions.get(ip, 0),
                "reopened": self.reopened.get(ip, []),
                "nfs_reclaims": self.nfs_reclaims.get(ip, []),
                "lost_opens": lost_opens,
                "verdict": self._verdict(ip, b, resumed, lost_opens),
            }))
        return to_json(out)


#: how many connections of each kind a difference names (status and log lines); the rest are counted
DIFFERENCE_EXAMPLES = 10


@dataclass
class ViewSync:
    """Is the standby's view of the peer's address the same as the peer's own? (digest comparison)

    The owner's view is the reference: when the digests keep differing the standby asks for the
    owner's snapshot, and the connections it has that the owner no longer has (and that it saw open
    well before it asked) are dropped from its view (:meth:`StatefulStandby` asks the observer to
    forget them): their close passed the standby by (it missed frames, or the owner's kernel ended
    them while nobody saw). A dead peer's connections are forgotten at the takeover and again when
    the peer's new process says hello, so the standby's view of the peer stays as big as the peer's
    own, however many times it fails over (bench/SOAK.md: without this it grew by 20-40 entries per
    failover until the takeover plan missed its time bound).
    """

    mismatch_limit: int = 3
    compared: int = 0
    matches: int = 0
    mismatches_in_a_row: int = 0
    in_sync: bool | None = None
    last_match_at: float | None = None
    behind: dict = field(default_factory=dict)
    last_difference: dict | None = None
    snapshots_requested: int = 0
    #: for the sentences of :attr:`sight`
    peer_name: str = "the peer"
    #: what this node sees of the peer's traffic, judged over the last ``sight_window`` seconds of
    #: digests whenever the peer has traffic (kept while it is idle: an idle peer shows nothing):
    #: unknown (no peer traffic yet) | both | to_peer | from_peer | nothing
    sight: str = "unknown"
    sight_detail: str | None = None
    sight_judged_at: float | None = None
    sight_window: float = 2.0
    peer_connections: int | None = None   # what the peer's last digest says it has
    #: connections dropped from the view of the peer (gone at the owner, or the dead peer's)
    forgotten: int = 0
    _samples: deque = field(default_factory=deque)  # (now, peer frames, our frames to, our frames from)

    def on_peer_digest(self, message: dict, ours: dict, now: float) -> bool:
        """Compare the peer's digest message with ours (``{"digest", "frames", "bytes"}`` of our view
        of its address); True when a snapshot should be requested (the views keep differing)."""
        self.compared += 1
        self._judge_sight(message, ours, now)
        mine = ours["digest"]
        self.behind = {
            "frames": max(0, int(message.get("frames", 0)) - ours["frames"]),
            "bytes": max(0, int(message.get("bytes", 0)) - ours["bytes"]),
            "ms": None if self.last_match_at is None else round((now - self.last_match_at) * 1000, 1),
        }
        if mine == message.get("digest"):
            self.matches += 1
            self.mismatches_in_a_row = 0
            self.in_sync = True
            self.last_match_at = now
            self.behind["ms"] = 0.0
            return False
        self.mismatches_in_a_row += 1
        if self.mismatches_in_a_row >= self.mismatch_limit:
            self.in_sync = False
            if self.mismatches_in_a_row == self.mismatch_limit or self.mismatches_in_a_row % 20 == 0:
                self.snapshots_requested += 1
                return True
        return False

    def _judge_sight(self, message: dict, ours: dict, now: float) -> None:
        """Does this node see the peer's traffic, which way? (issue 9.9: a standby on a learning switch
        saw none of it, and status added its own clients' frames up and said ``in sync``.)"""
        peer_frames, to, from_ = int(message.get("frames", 0)), ours.get("frames_to", 0), ours.get("frames_from", 0)
        peer_conns, our_conns = message.get("connections"), ours.get("connections")
        self.peer_connections = peer_conns if isinstance(peer_conns, int) else None
        self._samples.append((now, peer_frames, to, from_))
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.sight_window:
            self._samples.popleft()
        first = self._samples[0]
        moved, d_to, d_from = peer_frames - first[1], to - first[2], from_ - first[3]
        unseen = bool(self.peer_connections) and not our_conns  # it has clients, this node knows none
        if moved <= 0 and not unseen:
            return  # the peer is idle: nothing to judge by, the last verdict stands
        peer, conns = self.peer_name, self.peer_connections
        has = f"{peer} has {conns} connection(s)" if conns else f"{peer} has traffic"
        if d_to > 0 and d_from > 0:
            sight, detail = "both", f"sees {peer}'s traffic both ways ({d_to} frames to {peer}, {d_from} from it)"
        elif d_to > 0 or d_from > 0:
            way = "to" if d_to > 0 else "from"
            sight = "to_peer" if d_to > 0 else "from_peer"
            detail = f"sees only frames {way} {peer} ({d_to} to {peer}, {d_from} from it)"
        else:
            sight = "nothing"
            evidence = (f"{moved} frames at {peer} in the last {now - first[0]:.1f} s, none here" if moved > 0
                        else "this node knows none of them, and saw no frame of them")
            detail = (f"SEES NOTHING of {peer}'s traffic while {has} ({evidence}): the service network does not pass {peer}'s frames "
                      f"to this node (a learning switch or bridge); flood or mirror {peer}'s port to it, or a "
                      f"takeover will not know {peer}'s connections")
        if sight != self.sight:
            (log.warning if sight == "nothing" else log.info)("stateful: this node %s", detail)
        self.sight, self.sight_detail, self.sight_judged_at = sight, detail, now

    def on_peer_snapshot(self, theirs: dict, ours: dict) -> dict:
        """What differs between the peer's snapshot and ours (per kind: how many, and the first
        :data:`DIFFERENCE_EXAMPLES` client endpoints); logged as counts and kept for status."""
        def index(snap: dict) -> dict[str, dict]:
            return {c.get("client"): {"protocol": c.get("protocol"), "sessions": c.get("sessions"),
                                      "opens": c.get("opens")}
                    for c in snap.get("connections", []) if isinstance(c, dict)}

        ours, peer = index(ours), index(theirs)
        kinds = {
            "only_at_peer": sorted(set(peer) - set(ours), key=str),
            "only_here": sorted(set(ours) - set(peer), key=str),
            "different": sorted((k for k in set(ours) & set(peer) if ours[k] != peer[k]), key=str),
        }
        diff: dict = {k: v[:DIFFERENCE_EXAMPLES] for k, v in kinds.items()}
        diff["counts"] = {k: len(v) for k, v in kinds.items()}
        self.last_difference = diff
        log.warning("the view of %s's address differs from its own: %d connection(s) only there, %d only "
                    "here, %d decoded differently (e.g. %s)", self.peer_name, diff["counts"]["only_at_peer"],
                    diff["counts"]["only_here"], diff["counts"]["different"],
                    ", ".join(str(c) for k in kinds.values() for c in k[:2]) or "-")
        return diff

    def on_forgotten(self, count: int, why: str) -> None:
        """The observer dropped ``count`` connections from the view of the peer (see the class docstring)."""
        if count:
            self.forgotten += count
            log.info("stateful: forgot %d connection(s) of %s's address: %s", count, self.peer_name, why)

    def status(self) -> dict:
        # two empty tables agree, but a node that sees none of the peer's frames is not in sync with it
        in_sync = False if self.sight == "nothing" else self.in_sync
        return {"in_sync": in_sync, "compared": self.compared, "matches": self.matches,
                "mismatches_in_a_row": self.mismatches_in_a_row, "behind": self.behind,
                "snapshots_requested": self.snapshots_requested, "last_difference": self.last_difference,
                "sight": self.sight, "sight_detail": self.sight_detail, "sight_judged_at": self.sight_judged_at,
                "peer_connections": self.peer_connections, "forgotten": self.forgotten}
