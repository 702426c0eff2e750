"""Frames in, protocol events and session tables out: the whole passive decoder in one object.

    bytes of a frame ─► frames.parse_frame ─► tcpstream.TcpTracker ─► AppDecoder (by server port)
                                                                        └─► StateTable.apply

The same ``Pipeline`` runs live on the standby (snooper) and offline (``pairproxy replay``), so a
replay of what the standby saw ends in the same :meth:`Pipeline.digest` as the standby had live.
Time is whatever the caller says (capture timestamps), never a clock of ours.

NFS decoding (``protocols.rpc``/``protocols.nfs_state``) is optional: without those modules, NFS
connections are still tracked, as plain TCP.
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable

from .events import AppDecoder, ConnKey, ProtocolError, StateTable
from .frames import LINKTYPE_ETHERNET, FrameError, TcpSegment, parse_link
from .smb2 import Smb2Decoder
from .smb_state import SmbSessionTable
from .tcpstream import ConnectionClosed, ConnectionOpened, Data, Gap, TcpTracker

try:  # the NFS side is written separately; until it exists NFS streams are plain TCP
    from .nfs_state import NfsStateTable
    from .rpc import RpcDecoder
except ImportError:  # pragma: no cover - depends on the tree
    RpcDecoder = None  # type: ignore[assignment,misc]
    NfsStateTable = None  # type: ignore[assignment,misc]

__all__ = ["Pipeline", "SMB_PORTS", "NFS_PORTS"]

SMB_PORTS = frozenset({445})
NFS_PORTS = frozenset({2049, 111, 20048})
EXPIRE_EVERY = 10.0  # seconds of capture time between idle sweeps


class Pipeline:
    """Passive decoder for every TCP connection in a stream of Ethernet frames.

    ``feed_frame(buf, ts)`` returns the events the frame produced (TCP, SMB2, RPC/NFS, errors), each
    as ``(conn_key, event)``; ``snapshot()``/``digest()`` give the tables in the shared schema.
    """

    def __init__(self, smb_ports=SMB_PORTS, nfs_ports=NFS_PORTS, ooo_limit: int = 1 << 20,
                 idle_timeout: float = 7200.0, max_connections: int = 65536, zero_copy: bool = False,
                 decode: bool = True) -> None:
        """``zero_copy``: Data events carry views of the frame (valid during ``feed_frame`` only), so
        bulk payload is never copied; for callers that do not keep Data events (the snooper's views,
        replay). Default off: every event stays valid. ``decode=False``: TCP only (sequence state for
        resets), no SMB/RPC decoding: the standby's view of its peer's backend connections."""
        self.decode = decode
        self.smb_ports = frozenset(smb_ports)
        self.nfs_ports = frozenset(nfs_ports) if RpcDecoder is not None else frozenset()
        self.tcp = TcpTracker(self.smb_ports | frozenset(nfs_ports), ooo_limit=ooo_limit,
                              idle_timeout=idle_timeout, max_connections=max_connections,
                              zero_copy=zero_copy)
        self.smb = SmbSessionTable()
        self.nfs: StateTable | None = NfsStateTable() if NfsStateTable is not None and RpcDecoder else None
        self.decoders: dict[ConnKey, tuple[str, AppDecoder | None]] = {}
        self.counters = {"frames": 0, "tcp_segments": 0, "non_tcp": 0, "malformed_frames": 0,
                         "fragments": 0, "smb_errors": 0, "nfs_errors": 0, "smb_encrypted": 0,
                         "gaps": 0, "gap_bytes": 0, "decoder_exceptions": 0}
        self._last_sweep: float | None = None
        self.last_ts: float | None = None

    # ----------------------------------------------------------------------- input
    def feed_frame(self, buf: bytes | memoryview, ts: float = 0.0,
                   linktype: int = LINKTYPE_ETHERNET) -> list[tuple[ConnKey, object]]:
        self.counters["frames"] += 1
        self.last_ts = ts
        seg = parse_link(buf, linktype)
        if seg is None:
            self.counters["non_tcp"] += 1
            return []
        if isinstance(seg, FrameError):
            self.counters["fragments" if seg.kind == "fragment" else "malformed_frames"] += 1
            return []
        return self.feed_segment(seg, ts)

    def feed_segment(self, seg: TcpSegment, ts: float) -> list[tuple[ConnKey, object]]:
        self.counters["tcp_segments"] += 1
        out: list[tuple[ConnKey, object]] = []
        self._tcp_events(self.tcp.feed(seg, ts), out)
        if self._last_sweep is None:
            self._last_sweep = ts
        elif ts - self._last_sweep >= EXPIRE_EVERY:
            self._last_sweep = ts
            self._tcp_events(self.tcp.expire(ts), out)
        return out

    def feed_relayed(self, key: ConnKey, from_client: bool, data: bytes) -> list[tuple[ConnKey, object]]:
        """In-order bytes of one direction of a tracked connection that were not seen on it but are known
        from elsewhere: what a relay forwarded unchanged from its other leg (a standby that receives only
        the frames destined to its peer sees a client's requests on the client leg and the server's
        replies on the backend leg). Decoded as if seen; the TCP state is not touched."""
        out: list[tuple[ConnKey, object]] = []
        if key in self.tcp.connections and data:
            self._tcp_events([Data(key, from_client, data)], out)
        return out

    def close(self) -> list[tuple[ConnKey, object]]:
        """End of input: close every connection (gaps reported, tables forgotten)."""
        out: list[tuple[ConnKey, object]] = []
        self._tcp_events(self.tcp.close_all(), out)
        return out

    def forget(self, keys, *, gone: bool) -> list[tuple[ConnKey, object]]:
        """Drop these connections and what was decoded on them, on someone else's word (see
        :meth:`TcpTracker.forget`); ``gone``: their owner died, ignore their late segments."""
        out: list[tuple[ConnKey, object]] = []
        self._tcp_events(self.tcp.forget(keys, gone=gone, now=self.last_ts), out)
        return out

    # -------------------------------------------------------------------- routing
    def protocol_of(self, key: ConnKey) -> str:
        if key.server_port in self.smb_ports:
            return "smb"
        if key.server_port in self.nfs_ports:
            return "nfs"
        return "tcp"

    def _tcp_events(self, events: list, out: list) -> None:
        for ev in events:
            key = ev.key
            out.append((key, ev))
            if isinstance(ev, ConnectionOpened):
                proto = self.protocol_of(key)
                dec: AppDecoder | None = None
                if not self.decode:
                    pass
                elif proto == "smb":
                    dec = Smb2Decoder(midstream=ev.mid_stream)
                elif proto == "nfs":
                    try:
                        dec = RpcDecoder(midstream=ev.mid_stream)
                    except TypeError:  # an RpcDecoder without mid-stream support
                        dec = RpcDecoder()
                self.decoders[key] = (proto, dec)
            elif isinstance(ev, Data):
                self._app(key, lambda d: d.feed(ev.from_client, ev.data), out)
            elif isinstance(ev, Gap):
                self.counters["gaps"] += 1
                self.counters["gap_bytes"] += ev.length
                self._app(key, lambda d: d.gap(ev.from_client, ev.length), out)
            elif isinstance(ev, ConnectionClosed):
                proto, _dec = self.decoders.pop(key, ("tcp", None))
                table = self._table(proto)
                if table is not None:
                    table.forget(key)

    def _table(self, proto: str) -> StateTable | None:
        return self.smb if proto == "smb" else self.nfs if proto == "nfs" else None

    def _app(self, key: ConnKey, call: Callable[[AppDecoder], list], out: list) -> None:
        proto, dec = self.decoders.get(key, ("tcp", None))
        if dec is None:
            return
        try:
            events = call(dec)
        except Exception as exc:  # a decoder bug must not stop the node: count it, drop the stream
            self.counters["decoder_exceptions"] += 1
            self.decoders[key] = (proto, None)
            events = [ProtocolError(f"decoder exception {type(exc).__name__}: {exc}", None)]
        table = self._table(proto)
        for ev in events:
            out.append((key, ev))
            if isinstance(ev, ProtocolError):
                self.counters[f"{proto}_errors"] += 1
            elif proto == "smb" and type(ev).__name__ == "Smb2Opaque":
                self.counters["smb_encrypted"] += 1
            if table is not None:
                try:
                    table.apply(key, ev)
                except Exception as exc:  # same reasoning as above, for the tables
                    self.counters["decoder_exceptions"] += 1
                    out.append((key, ProtocolError(f"state table exception {type(exc).__name__}: {exc}", None)))

    # ---------------------------------------------------------------------- output
    def snapshot(self) -> dict:
        """Every live connection and its session state, in the schema shared with ``status --json``."""
        conns = []
        for key, conn in sorted(self.tcp.connections.items()):
            proto, dec = self.decoders.get(key, (self.protocol_of(key), None))
            entry: dict = {"client": key.client, "server": key.server, "protocol": proto,
                           "sessions": [], "opens": [], "nfs": None}
            if proto == "smb":
                st = self.smb.get(key)
                if st is not None:
                    j = st.to_json()
                    entry["sessions"] = j["sessions"]
                    entry["opens"] = [{k: o[k] for k in ("session_id", "tree_id", "file_id", "path", "durable")}
                                      for o in j["opens"]]
                    entry["smb"] = {"dialect": j["dialect"], "outstanding": j["outstanding"],
                                    "opens": j["opens"]}
            elif proto == "nfs" and self.nfs is not None:
                try:
                    entry["nfs"] = self.nfs.to_json(key)  # type: ignore[call-arg]
                except Exception as exc:  # the NFS table is not ours; never let it break a snapshot
                    entry["nfs"] = {"error": f"{type(exc).__name__}: {exc}"}
            entry["tcp"] = conn.sequence_state()
            entry["unsynchronised"] = bool(dec is not None and dec.unsynchronised) or \
                (dec is None and proto != "tcp" and self.decode)
            conns.append(entry)
        errors = dict(self.counters)
        errors.update({f"tcp_{k}": v for k, v in self.tcp.counters.items()})
        errors["unsynchronised_streams"] = sum(1 for c in conns if c["unsynchronised"])
        return {"connections": conns, "errors": errors}

    def digest(self, snapshot: dict | None = None) -> str:
        """sha256 of what two observers of the same traffic must agree on.

        Left out: counters (each observer drops and sees different frames), TCP sequence state (it
        moves with every segment, so two observers sampled a moment apart would always differ), and the
        transient ``outstanding`` counts. Kept: connections, protocol, sessions, trees, opens, NFS state.
        """
        snap = snapshot if snapshot is not None else self.snapshot()
        canon = []
        for c in snap["connections"]:
            nfs = c.get("nfs")
            if isinstance(nfs, dict):
                nfs = {k: v for k, v in nfs.items() if k not in ("outstanding", "errors")}
            canon.append({"client": c["client"], "server": c["server"], "protocol": c["protocol"],
                          "sessions": c["sessions"], "opens": c["opens"], "nfs": nfs})
        blob = json.dumps(canon, sort_keys=True, separators=(",", ":"), default=str).encode()
        return hashlib.sha256(blob).hexdigest()
