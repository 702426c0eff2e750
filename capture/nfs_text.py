"""ONC RPC / NFS for a person to read: one line per event, and the NFS part of the tables.

Why: ``replay --events`` printed RPC events as Python reprs (each reply repeating its whole call,
file handles as bytes literals) and an NFS connection's state as one line of raw JSON. tshark's
summary line is the model: program and procedure, call or reply, xid, the one or two arguments that
say what it is about, the status, and the reply's latency::

    NFSv3 GETATTR call xid=0x3c3b7a2b fh=43000001..94330c59
    NFSv3 GETATTR reply OK 0.03 ms xid=0x3c3b7a2b
    NFSv4.0 COMPOUND call xid=0x3c85efdb PUTFH fh=43000001..94330c59 | OPEN name=hello.txt share_access=READ | GETFH
"""

from __future__ import annotations

from typing import Any

__all__ = ["describe_rpc", "nfs_table_lines", "short_hex"]

_FH_CHARS = 16  # hex digits of a file handle shown in event lines and tables (tshark shows a hash)
_LOCK_TYPES = {1: "READ", 2: "WRITE", 3: "READW", 4: "WRITEW"}
_SHARE_ACCESS = {1: "READ", 2: "WRITE", 3: "BOTH"}


def short_hex(value: Any, chars: int = _FH_CHARS) -> str:
    """bytes or a hex string in at most ``chars`` hex digits: its head and tail around ``..``.

    Both ends, because handles from one server share a long prefix and differ at the end."""
    text = value.hex() if isinstance(value, (bytes, bytearray, memoryview)) else str(value)
    return text if len(text) <= chars + 2 else f"{text[:chars // 2]}..{text[-(chars // 2):]}"


def _stateid(value: bytes) -> str:
    """A v4 stateid (4-byte seqid + 12-byte other) as ``seqid:other``."""
    return f"{int.from_bytes(value[:4], 'big')}:{short_hex(value[4:])}"


def _label(call) -> tuple[str, str]:
    """("NFSv3", "GETATTR") from the call's name ("NFSv3.GETATTR"); NFSv4 gets its minor version."""
    if call is None:
        return "RPC", "?"
    if call.name is None:
        return f"RPC prog={call.prog} vers={call.vers}", f"proc={call.proc}"
    prog, _, proc = call.name.partition(".")
    if prog == "NFSv4" and isinstance(call.args, dict) and "minorversion" in call.args:
        prog = f"NFSv4.{call.args['minorversion']}"
    return prog, proc or "?"


def _status(code: Any) -> str:
    """'OK' for every protocol's success (NFS3_OK, NFS4_OK, MNT3_OK), else the status name."""
    text = str(code)
    return "OK" if text.endswith("_OK") or text == "OK" else text


def _value(key: str, v: Any) -> str:
    if isinstance(v, (bytes, bytearray)):
        return _stateid(v) if key.endswith("stateid") and len(v) == 16 else short_hex(v)
    if key == "clientid" and isinstance(v, int):
        return f"{v:016x}"
    if key in ("locktype",) and isinstance(v, int):
        return _LOCK_TYPES.get(v, str(v))
    if key == "share_access" and isinstance(v, int):
        return _SHARE_ACCESS.get(v & 3, str(v))
    if isinstance(v, dict):  # e.g. an open's claim {"name": ...}: its first simple value
        for k2, v2 in v.items():
            if isinstance(v2, (str, int, bytes)):
                return _value(k2, v2)
        return "{..}"
    if isinstance(v, str) and " " in v:
        return repr(v)
    return str(v)


# what each argument dict shows, in order (the first ones found); the rest stays in --json
_CALL_KEYS = ("fh", "dir", "name", "from_name", "to_name", "path", "offset", "count", "stable", "prog", "vers",
              "port", "access", "cookie", "clientid", "locktype", "length", "share_access", "claim")
_REPLY_KEYS = ("fh", "count", "eof", "committed", "port", "clientid", "stateid", "access")
_V4_OP_KEYS = ("fh", "name", "stateid", "offset", "count", "locktype", "length", "share_access", "claim",
               "clientid", "sessionid", "attr_request", "newname", "oldname")


def _fields(d: Any, keys: tuple[str, ...], limit: int = 4) -> list[str]:
    if not isinstance(d, dict):
        return []
    out = []
    for k in keys:
        if k in d and d[k] not in (None, "", b"", [], {}):
            out.append(f"{k}={_value(k, d[k])}")
            if len(out) >= limit:
                break
    return out


def _ops(ops: Any, keys: tuple[str, ...], show_status: bool) -> str:
    parts = []
    for op in ops if isinstance(ops, list) else []:
        if not isinstance(op, dict):
            continue
        text = str(op.get("op", "?"))
        if show_status and op.get("status") not in (None, "NFS4_OK"):
            text += f" {op['status']}"
        fields = [f for f in _fields(op, keys, limit=2) if not f.startswith("attr_request")]
        parts.append(" ".join([text, *fields]))
    return " | ".join(parts)


def describe_rpc(ev: Any, latency_ms: float | None = None) -> str:
    """One line for an ``RpcCall`` or ``RpcReply`` (see the module docstring)."""
    if type(ev).__name__ == "RpcCall":
        prog, proc = _label(ev)
        parts = [f"{prog} {proc} call xid=0x{ev.xid:08x}"]
        if isinstance(ev.args, dict) and "ops" in ev.args:
            parts.append(_ops(ev.args["ops"], _V4_OP_KEYS, show_status=False))
        else:
            parts += _fields(ev.args, _CALL_KEYS)
        if ev.error:
            parts.append(f"(not decoded: {ev.error})")
        return " ".join(p for p in parts if p)
    prog, proc = _label(ev.call)
    if not ev.accepted:
        status = f"DENIED {ev.status}"
    elif ev.status != "SUCCESS":
        status = ev.status
    elif isinstance(ev.result, dict) and "status" in ev.result:
        status = _status(ev.result["status"])
    else:
        status = "OK"
    parts = [f"{prog} {proc} reply {status}"]
    if latency_ms is not None:
        parts.append(f"{latency_ms:.2f} ms")
    parts.append(f"xid=0x{ev.xid:08x}")
    if isinstance(ev.result, dict) and "results" in ev.result:
        parts.append(_ops(ev.result["results"], _REPLY_KEYS, show_status=True))
    else:
        parts += _fields(ev.result, _REPLY_KEYS)
    if ev.call is None:
        parts.append("(call not seen)")
    if ev.error:
        parts.append(f"(not decoded: {ev.error})")
    return " ".join(p for p in parts if p)


def nfs_table_lines(nfs: dict, indent: str = "    ") -> list[str]:
    """The ``nfs`` object of one connection (``NfsStateTable.to_json``) as indented lines."""
    if "error" in nfs and len(nfs) == 1:
        return [f"{indent}nfs state unavailable: {nfs['error']}"]
    lines = []
    auth = nfs.get("auth") or {}
    if auth:
        if auth.get("flavor") == "AUTH_SYS":
            gids = auth.get("gids") or []
            lines.append(f"{indent}rpc client {auth.get('machine') or '?'}  uid {auth.get('uid')} gid {auth.get('gid')}"
                         + (f" groups {','.join(map(str, gids))}" if gids else "") + "  (AUTH_SYS)")
        else:
            lines.append(f"{indent}rpc client ({auth.get('flavor', '?')})")
    v4 = nfs.get("v4") or {}
    if v4.get("client_id") or v4.get("session_id"):
        lines.append(f"{indent}v4 client id {v4.get('client_id') or '-'}"
                     + (f"  session {v4['session_id']}" if v4.get("session_id") else ""))
    for fh in nfs.get("file_handles") or []:
        lines.append(f"{indent}file handle {short_hex(fh.get('fh'), 24):26}  {fh.get('path') or '(path unknown)'}")
    for o in v4.get("opens") or []:
        access = _SHARE_ACCESS.get((o.get("share_access") or 0) & 3, str(o.get("share_access")))
        lines.append(f"{indent}open {short_hex(o.get('stateid'), 24):26}  {o.get('path') or '(path unknown)'}  "
                     f"{access}  seqid {o.get('seqid')}  client {o.get('client_id') or '-'}")
    for lk in v4.get("locks") or []:
        ranges = ", ".join(f"{_LOCK_TYPES.get(r[0], r[0])} {r[1]}+{'EOF' if r[2] == 2 ** 64 - 1 else r[2]}"
                           for r in lk.get("ranges") or [] if isinstance(r, (list, tuple)) and len(r) == 3)
        lines.append(f"{indent}lock {short_hex(lk.get('stateid'), 24):26}  {lk.get('path') or '(path unknown)'}  "
                     f"{ranges or 'no ranges'}  seqid {lk.get('seqid')}  open {short_hex(lk.get('open_stateid') or '-')}")
    busy = [f"{nfs['outstanding']} call{'s' if nfs['outstanding'] != 1 else ''} outstanding"
            if nfs.get("outstanding") else "", f"{nfs['errors']} errors" if nfs.get("errors") else ""]
    if any(busy):
        lines.append(indent + ", ".join(b for b in busy if b))
    return lines


def nfs_version(nfs: dict) -> str:
    """``NFSv3`` / ``NFSv4.1`` for the connection line, or '' when not known yet."""
    v = nfs.get("version")
    if v is None:
        return ""
    return f"NFSv{v}" + (f".{nfs['minorversion']}" if v == 4 and nfs.get("minorversion") is not None else "")
