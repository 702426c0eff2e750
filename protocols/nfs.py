"""Bodies of the RPC programs a file-server proxy sees: portmapper, MOUNT v3, NFSv3, NFSv4 COMPOUND.

Each program is a :class:`protocols.rpc.Program`: a name table plus ``call(proc, xdr)`` and
``reply(proc, args, xdr)`` functions returning plain dicts. :class:`protocols.rpc.RpcDecoder`
puts these dicts into ``RpcCall.args`` / ``RpcReply.result``.

Dict conventions (what :mod:`protocols.nfs_state` relies on):

* file handles, stateids (16 bytes: 4-byte seqid + 12-byte "other"), session ids, verifiers and
  client ids of v4.0 SETCLIENTID are ``bytes``; client ids are ``int`` (uint64).
* statuses are names (``"NFS3_OK"``, ``"NFS4ERR_NOENT"``), or ``"NFS4ERR_<n>"`` for unknown codes.
* NFSv3: args have ``fh`` (the object), or ``dir`` + ``name`` (diropargs3); results have
  ``status`` and, where the procedure returns one, ``fh``. READDIRPLUS results have
  ``entries: [{"name", "fileid", "fh"|None}]``.
* NFSv4: a COMPOUND call is ``{"tag", "minorversion", "ops": [{"op": "PUTFH", "fh": ...}, ...]}``;
  the reply is ``{"status", "tag", "results": [{"op": "PUTFH", "status": "NFS4_OK", ...}]}``.
  The server stops at the first failing op, so ``results`` may be shorter than ``ops``.

Why walk every op: COMPOUND has no per-op lengths. To find the op after a GETATTR one must know
GETATTR's exact layout; an op we cannot lay out stops decoding of that compound (``error`` is set
on the event, the ops before it are kept) -- the RPC stream stays in sync because the record
length is known. All ops of RFC 7530 and the non-pNFS ops of RFC 8881 are laid out here.
"""

from __future__ import annotations

from typing import Any, Callable

from .xdr import Program, Xdr, XdrError

__all__ = ["PROGRAMS", "NFS3_PROCS", "NFS4_OPS", "MOUNT_PROCS", "nfs3_status", "nfs4_status"]

PORTMAP, NFS, MOUNT = 100000, 100003, 100005
FHSIZE3 = 64
FHSIZE4 = 128


def _partial(e: XdrError, value: dict) -> XdrError:
    e.partial = value  # type: ignore[attr-defined]
    return e


# ============================================================================ status codes

_NFS_ERRNO = {
    0: "OK", 1: "PERM", 2: "NOENT", 5: "IO", 6: "NXIO", 13: "ACCES", 17: "EXIST", 18: "XDEV",
    19: "NODEV", 20: "NOTDIR", 21: "ISDIR", 22: "INVAL", 27: "FBIG", 28: "NOSPC", 30: "ROFS",
    31: "MLINK", 63: "NAMETOOLONG", 66: "NOTEMPTY", 69: "DQUOT", 70: "STALE", 71: "REMOTE",
    10001: "BADHANDLE", 10002: "NOT_SYNC", 10003: "BAD_COOKIE", 10004: "NOTSUPP", 10005: "TOOSMALL",
    10006: "SERVERFAULT", 10007: "BADTYPE",
}
_NFS4_ONLY = dict(enumerate(
    "DELAY SAME DENIED EXPIRED LOCKED GRACE FHEXPIRED SHARE_DENIED WRONGSEC CLID_INUSE RESOURCE "
    "MOVED NOFILEHANDLE MINOR_VERS_MISMATCH STALE_CLIENTID STALE_STATEID OLD_STATEID BAD_STATEID "
    "BAD_SEQID NOT_SAME LOCK_RANGE SYMLINK RESTOREFH LEASE_MOVED ATTRNOTSUPP NO_GRACE RECLAIM_BAD "
    "RECLAIM_CONFLICT BADXDR LOCKS_HELD OPENMODE BADOWNER BADCHAR BADNAME BAD_RANGE LOCK_NOTSUPP "
    "OP_ILLEGAL DEADLOCK FILE_OPEN ADMIN_REVOKED CB_PATH_DOWN BADIOMODE BADLAYOUT "
    "BAD_SESSION_DIGEST BADSESSION BADSLOT COMPLETE_ALREADY CONN_NOT_BOUND_TO_SESSION "
    "DELEG_ALREADY_WANTED BACK_CHAN_BUSY LAYOUTTRYLATER LAYOUTUNAVAILABLE NOMATCHING_LAYOUT "
    "RECALLCONFLICT UNKNOWN_LAYOUTTYPE SEQ_MISORDERED SEQUENCE_POS REQ_TOO_BIG REP_TOO_BIG "
    "REP_TOO_BIG_TO_CACHE RETRY_UNCACHED_REP UNSAFE_COMPOUND TOO_MANY_OPS OP_NOT_IN_SESSION "
    "HASH_ALG_UNSUPP _10073 CLIENTID_BUSY PNFS_IO_HOLE SEQ_FALSE_RETRY BAD_HIGH_SLOT DEADSESSION "
    "ENCR_ALG_UNSUPP PNFS_NO_LAYOUT NOT_ONLY_OP WRONG_CRED WRONG_TYPE DIRDELEG_UNAVAIL REJECT_DELEG "
    "RETURNCONFLICT DELEG_REVOKED".split(), start=10008))


def nfs3_status(code: int) -> str:
    if code == 10008:
        return "NFS3ERR_JUKEBOX"
    name = _NFS_ERRNO.get(code)
    return "NFS3_OK" if code == 0 else f"NFS3ERR_{name or code}"


def nfs4_status(code: int) -> str:
    name = _NFS_ERRNO.get(code) or _NFS4_ONLY.get(code)
    return "NFS4_OK" if code == 0 else f"NFS4ERR_{name or code}"


# ============================================================================ portmapper


def _pmap_call(proc: int, x: Xdr, vers: int) -> dict:
    if proc in (1, 2, 3) and vers == 2:  # SET, UNSET, GETPORT: mapping
        return {"prog": x.u32(), "vers": x.u32(), "prot": x.u32(), "port": x.u32()}
    if proc in (1, 2, 3, 9, 11) and vers in (3, 4):  # rpcb
        return {"prog": x.u32(), "vers": x.u32(), "netid": x.string(), "addr": x.string(),
                "owner": x.string()}
    return {}


def _pmap_reply(proc: int, x: Xdr, vers: int) -> dict:
    if vers == 2 and proc == 3:
        return {"port": x.u32()}
    if vers in (3, 4) and proc in (3, 9):
        return {"addr": x.string()}
    if proc in (1, 2):
        return {"ok": x.boolean()}
    return {}


_PMAP2 = {0: "NULL", 1: "SET", 2: "UNSET", 3: "GETPORT", 4: "DUMP", 5: "CALLIT"}
_RPCB = {0: "NULL", 1: "SET", 2: "UNSET", 3: "GETADDR", 4: "DUMP", 5: "CALLIT", 6: "GETTIME",
         7: "UADDR2TADDR", 8: "TADDR2UADDR", 9: "GETVERSADDR", 10: "INDIRECT", 11: "GETADDRLIST",
         12: "GETSTAT"}


# ============================================================================ MOUNT v3

MOUNT_PROCS = {0: "NULL", 1: "MNT", 2: "DUMP", 3: "UMNT", 4: "UMNTALL", 5: "EXPORT"}


def _mount_call(proc: int, x: Xdr) -> dict:
    if proc in (1, 3):
        return {"path": x.string(1024)}
    return {}


def _mount_reply(proc: int, args: dict | None, x: Xdr) -> dict:
    if proc == 1:
        code = x.u32()
        out: dict[str, Any] = {"status": "MNT3_OK" if code == 0 else f"MNT3ERR_{_NFS_ERRNO.get(code, code)}"}
        if code == 0:
            out["fh"] = x.opaque(FHSIZE3)
            out["auth_flavors"] = x.array(Xdr.u32)
        return out
    if proc == 2:
        return {"mounts": x.linked(lambda x: {"host": x.string(), "path": x.string()})}
    if proc == 5:
        return {"exports": x.linked(lambda x: {"path": x.string(1024),
                                               "groups": x.linked(lambda x: x.string())})}
    return {}


# ============================================================================ NFSv3 (RFC 1813)

NFS3_PROCS = {0: "NULL", 1: "GETATTR", 2: "SETATTR", 3: "LOOKUP", 4: "ACCESS", 5: "READLINK",
              6: "READ", 7: "WRITE", 8: "CREATE", 9: "MKDIR", 10: "SYMLINK", 11: "MKNOD",
              12: "REMOVE", 13: "RMDIR", 14: "RENAME", 15: "LINK", 16: "READDIR",
              17: "READDIRPLUS", 18: "FSSTAT", 19: "FSINFO", 20: "PATHCONF", 21: "COMMIT"}
_FTYPE3 = {1: "REG", 2: "DIR", 3: "BLK", 4: "CHR", 5: "LNK", 6: "SOCK", 7: "FIFO"}
_STABLE = {0: "UNSTABLE", 1: "DATA_SYNC", 2: "FILE_SYNC"}


def _fh3(x: Xdr) -> bytes:
    return x.opaque(FHSIZE3)


def _fattr3(x: Xdr) -> dict:
    ftype, mode, nlink, uid, gid = x.u32(), x.u32(), x.u32(), x.u32(), x.u32()
    size = x.u64()
    x.fixed(8 + 8 + 8 + 8 + 24)  # used, rdev, fsid, fileid, atime, mtime, ctime -- not needed
    return {"type": _FTYPE3.get(ftype, ftype), "mode": mode, "uid": uid, "gid": gid, "size": size}


def _post_op_attr(x: Xdr) -> dict | None:
    return x.optional(_fattr3)


def _wcc_data(x: Xdr) -> dict | None:
    x.optional(lambda x: x.fixed(24))  # pre_op_attr: size, mtime, ctime
    return _post_op_attr(x)


def _sattr3(x: Xdr) -> dict:
    out: dict[str, Any] = {}
    for key in ("mode", "uid", "gid"):
        if x.boolean():
            out[key] = x.u32()
    if x.boolean():
        out["size"] = x.u64()
    for key in ("atime", "mtime"):
        how = x.u32()
        if how == 2:  # SET_TO_CLIENT_TIME
            out[key] = (x.u32(), x.u32())
        elif how > 2:
            raise XdrError(f"bad time_how {how}")
    return out


def _diropargs(x: Xdr) -> dict:
    return {"dir": _fh3(x), "name": x.string(1024)}


def _nfs3_call(proc: int, x: Xdr) -> dict:
    if proc == 0:
        return {}
    if proc in (1, 5, 18, 19, 20):  # GETATTR READLINK FSSTAT FSINFO PATHCONF
        return {"fh": _fh3(x)}
    if proc == 2:
        out = {"fh": _fh3(x), "attrs": _sattr3(x)}
        x.optional(lambda x: x.fixed(8))  # sattrguard3
        return out
    if proc in (3, 12, 13):  # LOOKUP REMOVE RMDIR
        return _diropargs(x)
    if proc == 4:
        return {"fh": _fh3(x), "access": x.u32()}
    if proc in (6, 21):  # READ COMMIT
        return {"fh": _fh3(x), "offset": x.u64(), "count": x.u32()}
    if proc == 7:
        fh, offset, count, stable = _fh3(x), x.u64(), x.u32(), x.u32()
        return {"fh": fh, "offset": offset, "count": count, "stable": _STABLE.get(stable, stable),
                "data_len": x.skip_opaque()}
    if proc == 8:
        out = _diropargs(x)
        mode = x.u32()
        out["mode"] = {0: "UNCHECKED", 1: "GUARDED", 2: "EXCLUSIVE"}.get(mode, mode)
        if mode in (0, 1):
            out["attrs"] = _sattr3(x)
        elif mode == 2:
            out["verf"] = x.fixed(8)
        else:
            raise XdrError(f"bad createmode3 {mode}")
        return out
    if proc == 9:
        out = _diropargs(x)
        out["attrs"] = _sattr3(x)
        return out
    if proc == 10:
        out = _diropargs(x)
        out["attrs"] = _sattr3(x)
        out["target"] = x.string()
        return out
    if proc == 11:
        out = _diropargs(x)
        ftype = x.u32()
        out["type"] = _FTYPE3.get(ftype, ftype)
        if ftype in (3, 4):
            out["attrs"] = _sattr3(x)
            out["spec"] = (x.u32(), x.u32())
        elif ftype in (6, 7):
            out["attrs"] = _sattr3(x)
        return out
    if proc == 14:
        frm, to = _diropargs(x), _diropargs(x)
        return {"dir": frm["dir"], "name": frm["name"], "to_dir": to["dir"], "to_name": to["name"]}
    if proc == 15:
        fh = _fh3(x)
        link = _diropargs(x)
        return {"fh": fh, "dir": link["dir"], "name": link["name"]}
    if proc == 16:
        return {"fh": _fh3(x), "cookie": x.u64(), "cookieverf": x.fixed(8), "count": x.u32()}
    if proc == 17:
        return {"fh": _fh3(x), "cookie": x.u64(), "cookieverf": x.fixed(8), "dircount": x.u32(),
                "maxcount": x.u32()}
    raise XdrError(f"NFSv3 procedure {proc} unknown")


def _nfs3_reply(proc: int, args: dict | None, x: Xdr) -> dict:
    if proc == 0:
        return {}
    code = x.u32()
    ok = code == 0
    out: dict[str, Any] = {"status": nfs3_status(code)}
    if proc == 1:
        if ok:
            out["attrs"] = _fattr3(x)
    elif proc == 2:
        out["attrs"] = _wcc_data(x)
    elif proc == 3:
        if ok:
            out["fh"] = _fh3(x)
            out["attrs"] = _post_op_attr(x)
        _post_op_attr(x)
    elif proc == 4:
        out["attrs"] = _post_op_attr(x)
        if ok:
            out["access"] = x.u32()
    elif proc == 5:
        _post_op_attr(x)
        if ok:
            out["target"] = x.string()
    elif proc == 6:
        out["attrs"] = _post_op_attr(x)
        if ok:
            out["count"] = x.u32()
            out["eof"] = x.boolean()
            out["data_len"] = x.skip_opaque()
    elif proc == 7:
        out["attrs"] = _wcc_data(x)
        if ok:
            out["count"] = x.u32()
            committed = x.u32()
            out["committed"] = _STABLE.get(committed, committed)
            out["verf"] = x.fixed(8)
    elif proc in (8, 9, 10, 11):
        if ok:
            out["fh"] = x.optional(_fh3)
            out["attrs"] = _post_op_attr(x)
        _wcc_data(x)
    elif proc in (12, 13):
        _wcc_data(x)
    elif proc == 14:
        _wcc_data(x)
        _wcc_data(x)
    elif proc == 15:
        _post_op_attr(x)
        _wcc_data(x)
    elif proc in (16, 17):
        _post_op_attr(x)
        if ok:
            out["cookieverf"] = x.fixed(8)
            plus = proc == 17

            def entry(x: Xdr) -> dict:
                e = {"fileid": x.u64(), "name": x.string(1024), "cookie": x.u64()}
                if plus:
                    e["attrs"] = _post_op_attr(x)
                    e["fh"] = x.optional(_fh3)
                return e

            out["entries"] = x.linked(entry)
            out["eof"] = x.boolean()
    elif proc == 18:
        _post_op_attr(x)
        if ok:
            names = ("tbytes", "fbytes", "abytes", "tfiles", "ffiles", "afiles")
            out.update({n: x.u64() for n in names})
            out["invarsec"] = x.u32()
    elif proc == 19:
        _post_op_attr(x)
        if ok:
            names = ("rtmax", "rtpref", "rtmult", "wtmax", "wtpref", "wtmult", "dtpref")
            out.update({n: x.u32() for n in names})
            out["maxfilesize"] = x.u64()
            x.fixed(8)  # time_delta
            out["properties"] = x.u32()
    elif proc == 20:
        _post_op_attr(x)
        if ok:
            out["linkmax"], out["name_max"] = x.u32(), x.u32()
            for n in ("no_trunc", "chown_restricted", "case_insensitive", "case_preserving"):
                out[n] = x.boolean()
    elif proc == 21:
        _wcc_data(x)
        if ok:
            out["verf"] = x.fixed(8)
    else:
        raise XdrError(f"NFSv3 procedure {proc} unknown")
    return out


# ============================================================================ NFSv4 (RFC 7530, 8881)


def _stateid(x: Xdr) -> bytes:
    return x.fixed(16)


def _bitmap(x: Xdr) -> list[int]:
    return x.array(Xdr.u32, 64)


def _fattr4(x: Xdr) -> dict:
    """fattr4: the bitmap and the length of the packed values (values are not interpreted)."""
    return {"mask": _bitmap(x), "len": x.skip_opaque()}


def _cinfo(x: Xdr) -> None:
    x.fixed(20)  # change_info4: atomic, before, after


def _lock_owner(x: Xdr) -> dict:
    return {"clientid": x.u64(), "owner": x.opaque(1024)}


def _nfsace(x: Xdr) -> None:
    x.fixed(12)
    x.string()


def _netaddr(x: Xdr) -> dict:
    return {"netid": x.string(), "addr": x.string()}


def _impl_id(x: Xdr) -> dict:
    domain, name = x.string(), x.string()
    x.fixed(12)  # nfstime4
    return {"domain": domain, "name": name}


def _state_protect_ops(x: Xdr) -> None:
    _bitmap(x)
    _bitmap(x)


def _channel_attrs(x: Xdr) -> dict:
    names = ("headerpadsize", "maxrequestsize", "maxresponsesize", "maxresponsesize_cached",
             "maxoperations", "maxrequests")
    out = {n: x.u32() for n in names}
    x.array(Xdr.u32, 1)  # rdma_ird
    return out


def _cb_sec_parms(x: Xdr) -> None:
    flavor = x.u32()
    if flavor == 1:  # AUTH_SYS
        x.u32()
        x.string(255)
        x.u32()
        x.u32()
        x.array(Xdr.u32, 16)
    elif flavor == 6:  # RPCSEC_GSS
        x.u32()
        x.opaque()
        x.opaque()
    elif flavor != 0:
        raise XdrError(f"callback_sec_parms4 flavor {flavor}")


def _secinfo(x: Xdr) -> dict:
    flavor = x.u32()
    if flavor == 6:
        x.opaque()
        x.u32()
        x.u32()
    return {"flavor": flavor}


def _createhow4(x: Xdr, out: dict) -> None:
    mode = x.u32()
    out["createmode"] = {0: "UNCHECKED", 1: "GUARDED", 2: "EXCLUSIVE", 3: "EXCLUSIVE4_1"}.get(mode, mode)
    if mode in (0, 1):
        out["attrs"] = _fattr4(x)
    elif mode == 2:
        x.fixed(8)
    elif mode == 3:
        x.fixed(8)
        out["attrs"] = _fattr4(x)
    else:
        raise XdrError(f"bad createmode4 {mode}")


_CLAIMS = {0: "NULL", 1: "PREVIOUS", 2: "DELEGATE_CUR", 3: "DELEGATE_PREV", 4: "FH",
           5: "DELEG_CUR_FH", 6: "DELEG_PREV_FH"}


def _open_args(x: Xdr) -> dict:
    out: dict[str, Any] = {"seqid": x.u32(), "share_access": x.u32(), "share_deny": x.u32(),
                           "owner": _lock_owner(x)}
    opentype = x.u32()
    out["create"] = opentype == 1
    if opentype == 1:
        _createhow4(x, out)
    elif opentype != 0:
        raise XdrError(f"bad opentype4 {opentype}")
    claim = x.u32()
    if claim not in _CLAIMS:
        raise XdrError(f"bad open_claim_type4 {claim}")
    out["claim"] = _CLAIMS[claim]
    if claim in (0, 3):
        out["name"] = x.string(1024)
    elif claim == 1:
        out["delegate_type"] = x.u32()
    elif claim == 2:
        out["delegate_stateid"] = _stateid(x)
        out["name"] = x.string(1024)
    elif claim == 5:
        out["delegate_stateid"] = _stateid(x)
    return out


def _open_res(x: Xdr, out: dict) -> None:
    out["stateid"] = _stateid(x)
    _cinfo(x)
    out["rflags"] = x.u32()
    _bitmap(x)
    dtype = x.u32()
    out["delegation"] = {0: "NONE", 1: "READ", 2: "WRITE", 3: "NONE_EXT"}.get(dtype, dtype)
    if dtype in (1, 2):
        out["delegation_stateid"] = _stateid(x)
        x.boolean()  # recall
        if dtype == 2:
            limitby = x.u32()
            if limitby == 1:
                x.u64()
            elif limitby == 2:
                x.u32()
                x.u32()
            else:
                raise XdrError(f"bad limit_by4 {limitby}")
        _nfsace(x)
    elif dtype == 3:
        why = x.u32()
        if why in (1, 2):
            x.boolean()
    elif dtype != 0:
        raise XdrError(f"bad open_delegation_type4 {dtype}")


def _locker(x: Xdr) -> dict:
    if x.boolean():  # new lock owner: open_to_lock_owner4
        return {"new_lock_owner": True, "open_seqid": x.u32(), "open_stateid": _stateid(x),
                "lock_seqid": x.u32(), "lock_owner": _lock_owner(x)}
    return {"new_lock_owner": False, "lock_stateid": _stateid(x), "lock_seqid": x.u32()}


def _lock_denied(x: Xdr, out: dict) -> None:
    out["denied"] = {"offset": x.u64(), "length": x.u64(), "locktype": x.u32(),
                     "owner": _lock_owner(x)}


def _exchange_id_args(x: Xdr) -> dict:
    out: dict[str, Any] = {"verifier": x.fixed(8), "owner": x.opaque(1024), "flags": x.u32()}
    how = x.u32()
    if how == 1:
        _state_protect_ops(x)
    elif how == 2:
        _state_protect_ops(x)
        x.array(lambda x: x.opaque())
        x.array(lambda x: x.opaque())
        x.u32()
        x.u32()
    elif how != 0:
        raise XdrError(f"bad state_protect_how4 {how}")
    impl = x.array(_impl_id, 1)
    out["impl"] = impl[0] if impl else None
    return out


def _exchange_id_res(x: Xdr, out: dict) -> None:
    out["clientid"] = x.u64()
    out["sequenceid"] = x.u32()
    out["flags"] = x.u32()
    how = x.u32()
    if how == 1:
        _state_protect_ops(x)
    elif how == 2:
        _state_protect_ops(x)
        x.fixed(16)  # hash_alg, encr_alg, ssv_len, window
        x.array(lambda x: x.opaque())
    elif how != 0:
        raise XdrError(f"bad state_protect_how4 {how}")
    out["server_minor_id"] = x.u64()
    out["server_major_id"] = x.opaque(1024)
    out["server_scope"] = x.opaque(1024)
    impl = x.array(_impl_id, 1)
    out["server_impl"] = impl[0] if impl else None


def _create_args(x: Xdr) -> dict:
    ftype = x.u32()
    out: dict[str, Any] = {"type": ftype}
    if ftype == 5:
        out["target"] = x.string()
    elif ftype in (3, 4):
        x.fixed(8)
    out["name"] = x.string(1024)
    out["attrs"] = _fattr4(x)
    return out


def _readdir_res(x: Xdr, out: dict) -> None:
    out["cookieverf"] = x.fixed(8)
    out["entries"] = x.linked(lambda x: {"cookie": x.u64(), "name": x.string(1024), "attrs": _fattr4(x)})
    out["eof"] = x.boolean()


Void = Callable[[Xdr], dict]


def _none(x: Xdr) -> dict:
    return {}


# op number -> (name, decode args, decode the result body after a NFS4_OK status).
# Results that carry data on a *failing* status are handled in _op_result.
_OPS: dict[int, tuple[str, Callable[[Xdr], dict], Callable[[Xdr, dict], None] | None]] = {
    3: ("ACCESS", lambda x: {"access": x.u32()},
        lambda x, o: o.update(supported=x.u32(), access=x.u32())),
    4: ("CLOSE", lambda x: {"seqid": x.u32(), "stateid": _stateid(x)},
        lambda x, o: o.update(stateid=_stateid(x))),
    5: ("COMMIT", lambda x: {"offset": x.u64(), "count": x.u32()},
        lambda x, o: o.update(verf=x.fixed(8))),
    6: ("CREATE", _create_args, lambda x, o: (_cinfo(x), _bitmap(x)) and None),
    7: ("DELEGPURGE", lambda x: {"clientid": x.u64()}, None),
    8: ("DELEGRETURN", lambda x: {"stateid": _stateid(x)}, None),
    9: ("GETATTR", lambda x: {"mask": _bitmap(x)}, lambda x, o: o.update(attrs=_fattr4(x))),
    10: ("GETFH", _none, lambda x, o: o.update(fh=x.opaque(FHSIZE4))),
    11: ("LINK", lambda x: {"name": x.string(1024)}, lambda x, o: _cinfo(x)),
    12: ("LOCK", lambda x: {"locktype": x.u32(), "reclaim": x.boolean(), "offset": x.u64(),
                            "length": x.u64(), "locker": _locker(x)},
         lambda x, o: o.update(stateid=_stateid(x))),
    13: ("LOCKT", lambda x: {"locktype": x.u32(), "offset": x.u64(), "length": x.u64(),
                             "owner": _lock_owner(x)}, None),
    14: ("LOCKU", lambda x: {"locktype": x.u32(), "seqid": x.u32(), "stateid": _stateid(x),
                             "offset": x.u64(), "length": x.u64()},
         lambda x, o: o.update(stateid=_stateid(x))),
    15: ("LOOKUP", lambda x: {"name": x.string(1024)}, None),
    16: ("LOOKUPP", _none, None),
    17: ("NVERIFY", lambda x: {"attrs": _fattr4(x)}, None),
    18: ("OPEN", _open_args, _open_res),
    19: ("OPENATTR", lambda x: {"createdir": x.boolean()}, None),
    20: ("OPEN_CONFIRM", lambda x: {"stateid": _stateid(x), "seqid": x.u32()},
         lambda x, o: o.update(stateid=_stateid(x))),
    21: ("OPEN_DOWNGRADE", lambda x: {"stateid": _stateid(x), "seqid": x.u32(),
                                      "share_access": x.u32(), "share_deny": x.u32()},
         lambda x, o: o.update(stateid=_stateid(x))),
    22: ("PUTFH", lambda x: {"fh": x.opaque(FHSIZE4)}, None),
    23: ("PUTPUBFH", _none, None),
    24: ("PUTROOTFH", _none, None),
    25: ("READ", lambda x: {"stateid": _stateid(x), "offset": x.u64(), "count": x.u32()},
         lambda x, o: o.update(eof=x.boolean(), count=x.skip_opaque())),
    26: ("READDIR", lambda x: {"cookie": x.u64(), "cookieverf": x.fixed(8), "dircount": x.u32(),
                               "maxcount": x.u32(), "mask": _bitmap(x)}, _readdir_res),
    27: ("READLINK", _none, lambda x, o: o.update(target=x.string())),
    28: ("REMOVE", lambda x: {"name": x.string(1024)}, lambda x, o: _cinfo(x)),
    29: ("RENAME", lambda x: {"name": x.string(1024), "to_name": x.string(1024)},
         lambda x, o: (_cinfo(x), _cinfo(x)) and None),
    30: ("RENEW", lambda x: {"clientid": x.u64()}, None),
    31: ("RESTOREFH", _none, None),
    32: ("SAVEFH", _none, None),
    33: ("SECINFO", lambda x: {"name": x.string(1024)},
         lambda x, o: o.update(flavors=x.array(_secinfo))),
    34: ("SETATTR", lambda x: {"stateid": _stateid(x), "attrs": _fattr4(x)}, None),
    35: ("SETCLIENTID", lambda x: {"verifier": x.fixed(8), "owner": x.opaque(1024),
                                   "callback": {"program": x.u32(), "addr": _netaddr(x)},
                                   "callback_ident": x.u32()},
         lambda x, o: o.update(clientid=x.u64(), confirm=x.fixed(8))),
    36: ("SETCLIENTID_CONFIRM", lambda x: {"clientid": x.u64(), "confirm": x.fixed(8)}, None),
    37: ("VERIFY", lambda x: {"attrs": _fattr4(x)}, None),
    38: ("WRITE", lambda x: {"stateid": _stateid(x), "offset": x.u64(), "stable": x.u32(),
                             "count": x.skip_opaque()},
         lambda x, o: o.update(count=x.u32(), committed=x.u32(), verf=x.fixed(8))),
    39: ("RELEASE_LOCKOWNER", lambda x: {"owner": _lock_owner(x)}, None),
    40: ("BACKCHANNEL_CTL", lambda x: {"cb_program": x.u32(), "sec_parms": len(x.array(_cb_sec_parms))},
         None),
    41: ("BIND_CONN_TO_SESSION", lambda x: {"sessionid": x.fixed(16), "dir": x.u32(),
                                            "rdma": x.boolean()},
         lambda x, o: o.update(sessionid=x.fixed(16), dir=x.u32(), rdma=x.boolean())),
    42: ("EXCHANGE_ID", _exchange_id_args, _exchange_id_res),
    43: ("CREATE_SESSION", lambda x: {"clientid": x.u64(), "sequence": x.u32(), "flags": x.u32(),
                                      "fore": _channel_attrs(x), "back": _channel_attrs(x),
                                      "cb_program": x.u32(),
                                      "sec_parms": len(x.array(_cb_sec_parms))},
         lambda x, o: o.update(sessionid=x.fixed(16), sequence=x.u32(), flags=x.u32(),
                               fore=_channel_attrs(x), back=_channel_attrs(x))),
    44: ("DESTROY_SESSION", lambda x: {"sessionid": x.fixed(16)}, None),
    45: ("FREE_STATEID", lambda x: {"stateid": _stateid(x)}, None),
    52: ("SECINFO_NO_NAME", lambda x: {"style": x.u32()},
         lambda x, o: o.update(flavors=x.array(_secinfo))),
    53: ("SEQUENCE", lambda x: {"sessionid": x.fixed(16), "sequenceid": x.u32(), "slotid": x.u32(),
                                "highest_slotid": x.u32(), "cachethis": x.boolean()},
         lambda x, o: o.update(sessionid=x.fixed(16), sequenceid=x.u32(), slotid=x.u32(),
                               highest_slotid=x.u32(), target_highest_slotid=x.u32(),
                               status_flags=x.u32())),
    55: ("TEST_STATEID", lambda x: {"stateids": x.array(_stateid)},
         lambda x, o: o.update(codes=x.array(Xdr.u32))),
    57: ("DESTROY_CLIENTID", lambda x: {"clientid": x.u64()}, None),
    58: ("RECLAIM_COMPLETE", lambda x: {"one_fs": x.boolean()}, None),
    10044: ("ILLEGAL", _none, None),
}
NFS4_OPS = {num: name for num, (name, _, _) in _OPS.items()}
_PNFS_OPS = {46: "GET_DIR_DELEGATION", 47: "GETDEVICEINFO", 48: "GETDEVICELIST", 49: "LAYOUTCOMMIT",
             50: "LAYOUTGET", 51: "LAYOUTRETURN", 54: "SET_SSV", 56: "WANT_DELEGATION"}


def _op_name(num: int) -> str:
    return NFS4_OPS.get(num) or _PNFS_OPS.get(num) or f"OP_{num}"


def _nfs4_call(proc: int, x: Xdr) -> dict:
    if proc == 0:
        return {}
    if proc != 1:
        raise XdrError(f"NFSv4 procedure {proc} unknown")
    out: dict[str, Any] = {"tag": x.string(1024), "minorversion": x.u32(), "ops": []}
    n = x.u32()
    if n > x.remaining // 4:
        raise _partial(XdrError(f"COMPOUND of {n} ops in {x.remaining} bytes"), out)
    for _ in range(n):
        try:
            num = x.u32()
            spec = _OPS.get(num)
            if spec is None:
                raise XdrError(f"cannot lay out op {_op_name(num)}")
            op = {"op": spec[0]}
            op.update(spec[1](x))
        except XdrError as e:
            raise _partial(e, out)
        out["ops"].append(op)
    return out


def _op_result(x: Xdr) -> dict:
    num = x.u32()
    spec = _OPS.get(num)
    if spec is None:
        raise XdrError(f"cannot lay out result of op {_op_name(num)}")
    name, _, ok_body = spec
    code = x.u32()
    out: dict[str, Any] = {"op": name, "status": nfs4_status(code)}
    if code == 0:
        if ok_body is not None:
            ok_body(x, out)
    elif num == 34:  # SETATTR: attrsset follows any status
        pass
    elif num in (12, 13) and code == 10010:  # LOCK/LOCKT NFS4ERR_DENIED
        _lock_denied(x, out)
    elif num == 35 and code == 10017:  # SETCLIENTID NFS4ERR_CLID_INUSE
        out["in_use_by"] = _netaddr(x)
    if num == 34:
        _bitmap(x)
    return out


def _nfs4_reply(proc: int, args: dict | None, x: Xdr) -> dict:
    if proc == 0:
        return {}
    if proc != 1:
        raise XdrError(f"NFSv4 procedure {proc} unknown")
    out: dict[str, Any] = {"status": nfs4_status(x.u32()), "tag": x.string(1024), "results": []}
    n = x.u32()
    if n > x.remaining // 8:
        raise _partial(XdrError(f"COMPOUND reply of {n} results in {x.remaining} bytes"), out)
    for _ in range(n):
        try:
            res = _op_result(x)
        except XdrError as e:
            raise _partial(e, out)
        out["results"].append(res)
        if res["status"] != "NFS4_OK":
            break  # the server stops at the first failure; nothing follows
    return out


# ============================================================================ registry

_NFS4_PROCS = {0: "NULL", 1: "COMPOUND"}

PROGRAMS: dict[tuple[int, int], Program] = {
    (PORTMAP, 2): Program("PORTMAP", _PMAP2, lambda p, x: _pmap_call(p, x, 2),
                          lambda p, a, x: _pmap_reply(p, x, 2)),
    (PORTMAP, 3): Program("RPCBIND", _RPCB, lambda p, x: _pmap_call(p, x, 3),
                          lambda p, a, x: _pmap_reply(p, x, 3)),
    (PORTMAP, 4): Program("RPCBIND", _RPCB, lambda p, x: _pmap_call(p, x, 4),
                          lambda p, a, x: _pmap_reply(p, x, 4)),
    (MOUNT, 3): Program("MOUNT", MOUNT_PROCS, _mount_call, _mount_reply),
    (NFS, 3): Program("NFSv3", NFS3_PROCS, _nfs3_call, _nfs3_reply),
    (NFS, 4): Program("NFSv4", _NFS4_PROCS, _nfs4_call, _nfs4_reply),
}
"""The programs :class:`protocols.rpc.RpcDecoder` decodes by default."""
