"""SMB session state per connection, built only from :mod:`protocols.smb2` events.

What a takeover must know about each SMB connection: the dialect, which sessions are authenticated
(and as whom), which trees each session has connected, and which files are open (with durable and
lease flags, because durable opens are what a client can reclaim after a failover).

Rules of this file: state changes only on *successful final responses* (a request alone changes
nothing: the server may refuse it), and a response applies what its matched request asked for.
Removal cascades: LOGOFF drops the session's trees and opens, TREE_DISCONNECT the tree's opens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .events import ConnKey, ProtocolError
from .smb2 import (CLOSE, CREATE, LOGOFF, NEGOTIATE, SESSION_SETUP, TREE_CONNECT, TREE_DISCONNECT,
                   Smb1Negotiate, Smb2Opaque, Smb2Request, Smb2Response)

__all__ = ["SmbSessionTable", "SmbConnectionState", "Open"]

DURABLE_CONTEXTS = {"DHnQ", "DH2Q"}
LEASE_CONTEXT = "RqLs"


@dataclass
class Open:
    path: str
    session_id: int
    tree_id: int
    desired_access: int
    share_access: int
    durable: bool
    lease: bool
    oplock_level: int


@dataclass
class SmbConnectionState:
    dialect: str | None = None
    sessions: dict[int, str | None] = field(default_factory=dict)  # session id -> user (None: unknown)
    domains: dict[int, str] = field(default_factory=dict)
    trees: dict[tuple[int, int], str] = field(default_factory=dict)  # (session, tree) -> share
    opens: dict[str, Open] = field(default_factory=dict)  # file id (hex) -> open
    outstanding: int = 0
    encrypted_messages: int = 0
    errors: int = 0

    def drop_session(self, session_id: int) -> None:
        self.sessions.pop(session_id, None)
        self.domains.pop(session_id, None)
        for key in [k for k in self.trees if k[0] == session_id]:
            del self.trees[key]
        for fid in [f for f, o in self.opens.items() if o.session_id == session_id]:
            del self.opens[fid]

    def drop_tree(self, session_id: int, tree_id: int) -> None:
        self.trees.pop((session_id, tree_id), None)
        for fid in [f for f, o in self.opens.items() if o.session_id == session_id and o.tree_id == tree_id]:
            del self.opens[fid]

    def to_json(self) -> dict:
        sessions = []
        for sid in sorted(self.sessions):
            trees = [{"tree_id": tid, "share": share}
                     for (s, tid), share in sorted(self.trees.items()) if s == sid]
            sessions.append({"session_id": sid, "user": self.sessions[sid], "trees": trees})
        # trees of sessions we never saw set up (picked up mid-stream) still show, under user null
        orphan_sids = sorted({s for s, _ in self.trees} - set(self.sessions))
        for sid in orphan_sids:
            trees = [{"tree_id": tid, "share": share} for (s, tid), share in sorted(self.trees.items()) if s == sid]
            sessions.append({"session_id": sid, "user": None, "trees": trees})
        opens = [{"session_id": o.session_id, "tree_id": o.tree_id, "file_id": fid, "path": o.path,
                  "durable": o.durable, "lease": o.lease, "desired_access": o.desired_access}
                 for fid, o in sorted(self.opens.items())]
        return {"dialect": self.dialect, "sessions": sessions, "opens": opens,
                "outstanding": self.outstanding}


class SmbSessionTable:
    """All SMB connections' state. Implements :class:`protocols.events.StateTable`."""

    def __init__(self) -> None:
        self.connections: dict[ConnKey, SmbConnectionState] = {}

    def get(self, key: ConnKey) -> SmbConnectionState | None:
        return self.connections.get(key)

    def apply(self, conn_key: ConnKey, event: object) -> None:
        st = self.connections.get(conn_key)
        if st is None:
            st = self.connections[conn_key] = SmbConnectionState()
        if isinstance(event, Smb2Request):
            if event.command != 12:  # CANCEL gets no response of its own
                st.outstanding += 1
        elif isinstance(event, Smb2Response):
            if event.request is not None:
                st.outstanding = max(0, st.outstanding - 1)
            self._response(st, event)
        elif isinstance(event, Smb2Opaque):
            st.encrypted_messages += 1
        elif isinstance(event, ProtocolError):
            st.errors += 1
        elif isinstance(event, Smb1Negotiate):
            pass

    def _response(self, st: SmbConnectionState, r: Smb2Response) -> None:
        req = r.request
        rf = req.fields if req is not None else {}
        cmd = r.command
        if cmd == SESSION_SETUP:
            if r.ok and not rf.get("binding"):
                user = rf.get("user") or st.sessions.get(r.session_id)
                st.sessions[r.session_id] = user if user else None
                if rf.get("domain"):
                    st.domains[r.session_id] = rf["domain"]
            return
        if not r.ok:
            return
        if cmd == NEGOTIATE:
            st.dialect = r.fields.get("dialect", st.dialect)
        elif cmd == LOGOFF:
            st.drop_session(r.session_id)
        elif cmd == TREE_CONNECT:
            share = rf.get("share")
            st.trees[(r.session_id, r.tree_id)] = share if share is not None else "?"
            if r.session_id not in st.sessions:
                st.sessions[r.session_id] = None
        elif cmd == TREE_DISCONNECT:
            st.drop_tree(r.session_id, r.tree_id if r.tree_id else (req.tree_id if req else 0))
        elif cmd == CREATE:
            fid = r.fields.get("file_id")
            if fid is None:
                return
            granted = set(r.fields.get("contexts", ()))
            tree_id = req.tree_id if req is not None else r.tree_id
            st.opens[fid] = Open(path=rf.get("name", "?"), session_id=r.session_id, tree_id=tree_id,
                                 desired_access=rf.get("desired_access", 0),
                                 share_access=rf.get("share_access", 0),
                                 durable=bool(granted & DURABLE_CONTEXTS),
                                 lease=LEASE_CONTEXT in granted,
                                 oplock_level=r.fields.get("oplock_level", 0))
        elif cmd == CLOSE:
            fid = rf.get("file_id")
            if fid is not None:
                st.opens.pop(fid, None)

    def forget(self, conn_key: ConnKey) -> None:
        self.connections.pop(conn_key, None)

    def to_json(self) -> dict:
        return {f"{k.client}-{k.server}": st.to_json() for k, st in sorted(self.connections.items())}
