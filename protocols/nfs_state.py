"""NFS session state built only from :mod:`protocols.rpc` events: what a standby must know to take over.

Why these pieces: after a takeover the clients' TCP connections are gone but their NFS state is
not -- v4 client ids, sessions, open and lock stateids live on the *server* and the clients will
reclaim or reuse them; v3 has no state besides file handles. So the table keeps

* per connection (``to_json(conn_key)``): the RPC identity (AUTH_SYS machine/uid), calls awaiting
  a reply, the file handles the connection used with the paths we could name, and the v4 client
  id and session it works under plus the opens/locks of that client;
* node-wide (``summary()``): v4 client ids with owners, sessions, opens, locks, MOUNT results.

Paths are names, not truth: a handle gets a path when we saw it come back from MNT (the export
path), LOOKUP/CREATE/MKDIR/READDIRPLUS (parent path + "/" + name), or, in v4, from the current
path a COMPOUND built with PUTROOTFH/LOOKUP/OPEN before a GETFH. A handle whose parent we never saw
has path ``null``. File handles are per server (keyed by server address + handle).

The tables are bounded (oldest file handle names, oldest outstanding calls are dropped) so a
long-lived node cannot grow without limit. All JSON output is sorted, so two observers fed the same
events produce byte-identical snapshots.
"""

from __future__ import annotations

import posixpath
from collections import OrderedDict
from dataclasses import dataclass, field


from .events import ConnKey, ProtocolError
from .nfs import MOUNT, NFS
from .rpc import AuthNone, AuthSys, RpcCall, RpcReply

__all__ = ["NfsStateTable"]

MAX_HANDLES = 1 << 16
MAX_OUTSTANDING = 4096
OK4 = "NFS4_OK"


def _hex(b: bytes | None) -> str | None:
    return None if b is None else b.hex()


def _cid(clientid: int | None) -> str | None:
    return None if clientid is None else f"{clientid:016x}"


def _join(parent: str | None, name: str) -> str | None:
    if parent is None:
        return None
    if name == ".":
        return parent
    if name == "..":
        return posixpath.dirname(parent) or "/"
    return parent.rstrip("/") + "/" + name if parent != "/" else "/" + name


def _norm(path: str) -> str:
    return path.rstrip("/") or "/"


@dataclass
class _Conn:
    version: int | None = None
    minorversion: int | None = None
    auth: dict | None = None
    outstanding: OrderedDict = field(default_factory=OrderedDict)
    fhs: set = field(default_factory=set)
    client_id: int | None = None
    session_id: bytes | None = None
    errors: int = 0


@dataclass
class _Client:
    owner: bytes
    minorversion: int
    confirmed: bool = False


@dataclass
class _Open:
    seqid: int
    path: str | None
    fh: bytes | None
    client_id: int | None
    conn: ConnKey
    share_access: int


@dataclass
class _Lock:
    seqid: int
    path: str | None
    fh: bytes | None
    client_id: int | None
    conn: ConnKey
    open_other: bytes | None
    ranges: list = field(default_factory=list)  # [locktype, offset, length]


class NfsStateTable:
    """The NFS ``StateTable``: feed it every event of every RPC connection with ``apply``."""

    def __init__(self, max_handles: int = MAX_HANDLES) -> None:
        self.max_handles = max_handles
        self._conns: dict[ConnKey, _Conn] = {}
        self._handles: OrderedDict[tuple[str, bytes], str | None] = OrderedDict()
        self._mounts: dict[tuple[str, str], bytes] = {}
        self._clients: dict[tuple[str, int], _Client] = {}
        self._sessions: dict[tuple[str, bytes], int] = {}
        self._opens: dict[tuple[str, bytes], _Open] = {}
        self._locks: dict[tuple[str, bytes], _Lock] = {}

    # ------------------------------------------------------------------ StateTable
    def apply(self, conn_key: ConnKey, event: object) -> None:
        conn = self._conns.get(conn_key)
        if conn is None:
            conn = self._conns[conn_key] = _Conn()
        try:
            self._apply(conn_key, conn, event)
        except (KeyError, TypeError, AttributeError, ValueError):
            # a shape of decoded message we did not foresee: count it, never stop the node
            conn.errors += 1

    def _apply(self, conn_key: ConnKey, conn: _Conn, event: object) -> None:
        if isinstance(event, RpcCall):
            self._call(conn_key, conn, event)
        elif isinstance(event, RpcReply):
            if not event.from_client:
                conn.outstanding.pop(event.xid, None)
            call = event.call
            if call is not None and event.result is not None and call.args is not None:
                if call.prog == MOUNT:
                    self._mount_reply(conn_key, conn, call, event.result)
                elif call.prog == NFS and call.vers == 3:
                    self._v3_reply(conn_key, conn, call, event.result)
                elif call.prog == NFS and call.vers == 4 and call.proc == 1:
                    self._v4_reply(conn_key, conn, call.args, event.result)
        elif isinstance(event, ProtocolError):
            conn.errors += 1

    def forget(self, conn_key: ConnKey) -> None:
        """Drop what lived only on the connection; v4 client ids, sessions, opens and locks belong
        to the client, not the connection, and stay."""
        self._conns.pop(conn_key, None)

    def to_json(self, conn_key: ConnKey | None = None) -> dict:
        """The per-connection ``"nfs"`` object for ``conn_key``; without one, :meth:`summary`."""
        if conn_key is None:
            return self.summary()
        server = conn_key.server_ip
        conn = self._conns.get(conn_key) or _Conn()
        mine = lambda st: st.conn == conn_key or (st.client_id is not None and st.client_id == conn.client_id)  # noqa: E731
        return {
            "version": conn.version,
            "minorversion": conn.minorversion,
            "auth": conn.auth,
            "outstanding": len(conn.outstanding),
            "errors": conn.errors,
            "file_handles": [{"fh": fh.hex(), "path": self._handles.get((server, fh))}
                             for fh in sorted(conn.fhs)],
            "v4": {
                "client_id": _cid(conn.client_id),
                "session_id": _hex(conn.session_id),
                "opens": [self._open_json(k, o) for k, o in sorted(self._opens.items())
                          if k[0] == server and mine(o)],
                "locks": [self._lock_json(k, lk) for k, lk in sorted(self._locks.items())
                          if k[0] == server and mine(lk)],
            },
        }

    def summary(self) -> dict:
        """Node-wide NFS state: RPC clients, MOUNTs, v4 client ids, sessions, opens and locks."""
        machines = sorted({(k.client_ip, c.auth.get("machine"), c.auth.get("uid"))
                           for k, c in self._conns.items() if c.auth and c.auth.get("flavor") == "AUTH_SYS"},
                          key=repr)
        return {
            "connections": len(self._conns),
            "rpc_clients": [{"ip": ip, "machine": m, "uid": uid} for ip, m, uid in machines],
            "mounts": [{"server": s, "path": p, "fh": fh.hex()} for (s, p), fh in sorted(self._mounts.items())],
            "file_handles": len(self._handles),
            "clients": [{"server": s, "client_id": _cid(cid), "owner": c.owner.hex(),
                         "owner_text": c.owner.decode("utf-8", "backslashreplace"),
                         "minorversion": c.minorversion, "confirmed": c.confirmed,
                         "sessions": sorted(sid.hex() for (s2, sid), c2 in self._sessions.items()
                                            if s2 == s and c2 == cid)}
                        for (s, cid), c in sorted(self._clients.items())],
            "sessions": [{"server": s, "session_id": sid.hex(), "client_id": _cid(cid)}
                         for (s, sid), cid in sorted(self._sessions.items())],
            "opens": [dict(self._open_json(k, o), server=k[0]) for k, o in sorted(self._opens.items())],
            "locks": [dict(self._lock_json(k, lk), server=k[0]) for k, lk in sorted(self._locks.items())],
        }

    # ------------------------------------------------------------------ json pieces
    @staticmethod
    def _open_json(key: tuple[str, bytes], o: _Open) -> dict:
        return {"stateid": key[1].hex(), "seqid": o.seqid, "path": o.path, "fh": _hex(o.fh),
                "client_id": _cid(o.client_id), "share_access": o.share_access}

    @staticmethod
    def _lock_json(key: tuple[str, bytes], lk: _Lock) -> dict:
        return {"stateid": key[1].hex(), "seqid": lk.seqid, "path": lk.path, "fh": _hex(lk.fh),
                "client_id": _cid(lk.client_id), "open_stateid": _hex(lk.open_other),
                "ranges": sorted(lk.ranges)}

    # ------------------------------------------------------------------ handles
    def _name(self, server: str, fh: bytes, path: str | None) -> None:
        key = (server, fh)
        if path is None:
            if key in self._handles:
                return
        self._handles[key] = path
        self._handles.move_to_end(key)
        while len(self._handles) > self.max_handles:
            self._handles.popitem(last=False)

    def _path(self, server: str, fh: bytes | None) -> str | None:
        return None if fh is None else self._handles.get((server, fh))

    def _removed(self, server: str, path: str | None) -> None:
        if path is None:
            return
        for key in [k for k, p in self._handles.items() if k[0] == server and p == path]:
            del self._handles[key]

    def _renamed(self, server: str, old: str | None, new: str | None) -> None:
        if old is None:
            return
        for key, p in list(self._handles.items()):
            if key[0] != server or p is None:
                continue
            if p == old:
                self._handles[key] = new
            elif p.startswith(old + "/"):
                self._handles[key] = None if new is None else new + p[len(old):]

    # ------------------------------------------------------------------ calls
    def _call(self, conn_key: ConnKey, conn: _Conn, call: RpcCall) -> None:
        if not call.from_client:
            return  # a v4.1 backchannel call from the server: not the client's identity
        conn.outstanding[call.xid] = None
        conn.outstanding.move_to_end(call.xid)
        while len(conn.outstanding) > MAX_OUTSTANDING:
            conn.outstanding.popitem(last=False)
        if isinstance(call.cred, AuthSys):
            c = call.cred
            conn.auth = {"flavor": "AUTH_SYS", "machine": c.machine, "uid": c.uid, "gid": c.gid,
                         "gids": list(c.gids)}
        elif isinstance(call.cred, AuthNone):
            conn.auth = conn.auth or {"flavor": "AUTH_NONE"}
        else:
            conn.auth = {"flavor": call.cred.flavor}
        if call.prog != NFS:
            return
        conn.version = call.vers
        args = call.args or {}
        if call.vers == 3:
            for k in ("fh", "dir", "to_dir"):
                if isinstance(args.get(k), bytes):
                    conn.fhs.add(args[k])
        elif call.vers == 4 and call.proc == 1 and args:
            conn.minorversion = args.get("minorversion")
            for op in args.get("ops", ()):
                if op["op"] == "PUTFH":
                    conn.fhs.add(op["fh"])
                elif op["op"] == "SEQUENCE":
                    conn.session_id = op["sessionid"]
                    conn.client_id = self._sessions.get((conn_key.server_ip, op["sessionid"]), conn.client_id)

    # ------------------------------------------------------------------ MOUNT / v3 replies
    def _mount_reply(self, conn_key: ConnKey, conn: _Conn, call: RpcCall, res: dict) -> None:
        server = conn_key.server_ip
        if call.proc == 1 and res.get("status") == "MNT3_OK":
            path = _norm(call.args["path"])
            self._name(server, res["fh"], path)
            self._mounts[(server, path)] = res["fh"]
            conn.fhs.add(res["fh"])
        elif call.proc == 3:
            self._mounts.pop((server, _norm(call.args.get("path", ""))), None)
        elif call.proc == 4:
            for key in [k for k in self._mounts if k[0] == server]:
                del self._mounts[key]

    def _v3_reply(self, conn_key: ConnKey, conn: _Conn, call: RpcCall, res: dict) -> None:
        if res.get("status") != "NFS3_OK":
            return
        server, args, proc = conn_key.server_ip, call.args, call.proc
        if proc in (3, 8, 9, 10, 11) and res.get("fh"):  # LOOKUP CREATE MKDIR SYMLINK MKNOD
            self._name(server, res["fh"], _join(self._path(server, args["dir"]), args["name"]))
            conn.fhs.add(res["fh"])
        elif proc in (12, 13):  # REMOVE RMDIR
            self._removed(server, _join(self._path(server, args["dir"]), args["name"]))
        elif proc == 14:  # RENAME
            self._renamed(server, _join(self._path(server, args["dir"]), args["name"]),
                          _join(self._path(server, args["to_dir"]), args["to_name"]))
        elif proc == 17:  # READDIRPLUS
            parent = self._path(server, args["fh"])
            for e in res.get("entries", ()):
                if e.get("fh") and e["name"] not in (".", ".."):
                    self._name(server, e["fh"], _join(parent, e["name"]))

    # ------------------------------------------------------------------ v4 COMPOUND replies
    def _v4_reply(self, conn_key: ConnKey, conn: _Conn, args: dict, res: dict) -> None:
        """Walk the ops next to their results, keeping the current (and saved) file handle and path
        the way the server does, so a GETFH after PUTROOTFH/LOOKUP/OPEN can be named."""
        server = conn_key.server_ip
        minor = args.get("minorversion", 0)
        cur_fh: bytes | None = None
        cur_path: str | None = None
        saved: tuple[bytes | None, str | None] = (None, None)
        new_open: _Open | None = None
        for op, r in zip(args.get("ops", ()), res.get("results", ())):
            name = op["op"]
            if r.get("op") != name or r.get("status") != OK4:
                break
            if name == "PUTFH":
                cur_fh, cur_path, new_open = op["fh"], self._path(server, op["fh"]), None
            elif name in ("PUTROOTFH", "PUTPUBFH"):
                cur_fh, cur_path, new_open = None, "/", None
            elif name == "LOOKUP":
                cur_fh, cur_path, new_open = None, _join(cur_path, op["name"]), None
            elif name == "LOOKUPP":
                cur_fh, cur_path, new_open = None, _join(cur_path, ".."), None
            elif name == "GETFH":
                cur_fh = r["fh"]
                conn.fhs.add(cur_fh)
                if cur_path is not None:
                    self._name(server, cur_fh, cur_path)
                if new_open is not None and new_open.fh is None:
                    new_open.fh = cur_fh
            elif name == "SAVEFH":
                saved = (cur_fh, cur_path)
            elif name == "RESTOREFH":
                cur_fh, cur_path = saved
            elif name == "CREATE":
                cur_fh, cur_path = None, _join(cur_path, op["name"])
            elif name == "REMOVE":
                self._removed(server, _join(cur_path, op["name"]))
            elif name == "RENAME":
                self._renamed(server, _join(saved[1], op["name"]), _join(cur_path, op["to_name"]))
            elif name == "OPEN":
                if "name" in op:
                    cur_fh, cur_path = None, _join(cur_path, op["name"])
                client = op["owner"]["clientid"] if minor == 0 else conn.client_id
                seqid, other = _split(r["stateid"])
                new_open = _Open(seqid, cur_path, cur_fh, client, conn_key, op["share_access"])
                self._opens[(server, other)] = new_open
            elif name in ("OPEN_CONFIRM", "OPEN_DOWNGRADE"):
                seqid, other = _split(r["stateid"])
                o = self._opens.get((server, other))
                if o is not None:
                    o.seqid = seqid
                    if name == "OPEN_DOWNGRADE":
                        o.share_access = op["share_access"]
            elif name == "CLOSE":
                other = _split(op["stateid"])[1]
                self._opens.pop((server, other), None)
                for key in [k for k, lk in self._locks.items() if k[0] == server and lk.open_other == other]:
                    del self._locks[key]
            elif name == "LOCK":
                self._lock(server, conn_key, conn, op, r, cur_fh, cur_path, minor)
            elif name == "LOCKU":
                seqid, other = _split(r["stateid"])
                lk = self._locks.get((server, other))
                if lk is not None:
                    lk.seqid = seqid
                    rng = [op["locktype"], op["offset"], op["length"]]
                    lk.ranges = [x for x in lk.ranges if x[1:] != rng[1:]]
                    if not lk.ranges:
                        del self._locks[(server, other)]
            elif name == "FREE_STATEID":
                other = _split(op["stateid"])[1]
                self._locks.pop((server, other), None)
                self._opens.pop((server, other), None)
            elif name == "SETCLIENTID":
                cid = r["clientid"]
                self._clients[(server, cid)] = _Client(op["owner"], 0)
                conn.client_id = cid
            elif name == "SETCLIENTID_CONFIRM":
                c = self._clients.get((server, op["clientid"]))
                if c is not None:
                    c.confirmed = True
                conn.client_id = op["clientid"]
            elif name == "EXCHANGE_ID":
                cid = r["clientid"]
                old = self._clients.get((server, cid))
                self._clients[(server, cid)] = _Client(op["owner"], max(minor, 1),
                                                       old.confirmed if old is not None else False)
                conn.client_id = cid
            elif name == "CREATE_SESSION":
                cid = op["clientid"]
                self._sessions[(server, r["sessionid"])] = cid
                c = self._clients.get((server, cid))
                if c is not None:
                    c.confirmed = True
                conn.client_id, conn.session_id = cid, r["sessionid"]
            elif name == "DESTROY_SESSION":
                self._sessions.pop((server, op["sessionid"]), None)
                if conn.session_id == op["sessionid"]:
                    conn.session_id = None
            elif name == "DESTROY_CLIENTID":
                self._drop_client(server, op["clientid"])
                if conn.client_id == op["clientid"]:
                    conn.client_id = conn.session_id = None
            elif name == "SEQUENCE":
                conn.session_id = r["sessionid"]
                conn.client_id = self._sessions.get((server, r["sessionid"]), conn.client_id)
            elif name == "RENEW":
                conn.client_id = op["clientid"]

    def _lock(self, server: str, conn_key: ConnKey, conn: _Conn, op: dict, r: dict,
              cur_fh: bytes | None, cur_path: str | None, minor: int) -> None:
        seqid, other = _split(r["stateid"])
        locker = op["locker"]
        rng = [op["locktype"], op["offset"], op["length"]]
        lk = self._locks.get((server, other))
        if lk is None:
            open_other = None
            client = conn.client_id
            if locker["new_lock_owner"]:
                open_other = _split(locker["open_stateid"])[1]
                if minor == 0:
                    client = locker["lock_owner"]["clientid"]
            o = self._opens.get((server, open_other)) if open_other else None
            path = cur_path if cur_path is not None else (o.path if o else None)
            fh = cur_fh if cur_fh is not None else (o.fh if o else None)
            if o is not None and client is None:
                client = o.client_id
            lk = self._locks[(server, other)] = _Lock(seqid, path, fh, client, conn_key, open_other)
        lk.seqid = seqid
        if rng not in lk.ranges:
            lk.ranges.append(rng)

    def _drop_client(self, server: str, cid: int) -> None:
        self._clients.pop((server, cid), None)
        for table in (self._sessions,):
            for key in [k for k, v in table.items() if k[0] == server and v == cid]:
                del table[key]
        for table in (self._opens, self._locks):  # type: ignore[assignment]
            for key in [k for k, v in table.items() if k[0] == server and v.client_id == cid]:
                del table[key]


def _split(stateid: bytes) -> tuple[int, bytes]:
    """stateid4 -> (seqid, other): ``other`` names the state; ``seqid`` counts its changes."""
    return int.from_bytes(stateid[:4], "big"), stateid[4:]


