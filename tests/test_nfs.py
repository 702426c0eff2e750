"""protocols.nfs + protocols.nfs_state against real libnfs captures (v3, v4.0) and synthetic v4.1."""

from __future__ import annotations

import json

import pytest

from protocols.events import ConnKey
from protocols.nfs_state import NfsStateTable
from protocols.rpc import RpcCall, RpcDecoder, RpcReply
from tests.nfs_pcap import FIXTURES, Pack, record, rpc_call, rpc_reply, tcp_streams

NFS = 100003


def replay(pcap: str, stop=None) -> tuple[NfsStateTable, dict[ConnKey, list]]:
    """Feed every connection of a capture through RpcDecoder into one NfsStateTable.
    ``stop(key, event)`` returning True stops right after applying that event."""
    table = NfsStateTable()
    events: dict[ConnKey, list] = {}
    for key, chunks in tcp_streams(FIXTURES / pcap).items():
        dec = RpcDecoder()
        evs = events[key] = []
        for from_client, data in chunks:
            for ev in dec.feed(from_client, data):
                evs.append(ev)
                table.apply(key, ev)
                if stop is not None and stop(key, ev):
                    return table, events
    return table, events


def calls(evs, name):
    return [e for e in evs if isinstance(e, RpcCall) and e.name == name]


def replies(evs, name):
    return [e for e in evs if isinstance(e, RpcReply) and e.name == name]


# ---------------------------------------------------------------------------- NFSv3 + MOUNT

@pytest.fixture(scope="module")
def v3():
    return replay("nfs3-session.pcap")


def test_v3_mount_path_and_root_fh(v3):
    table, events = v3
    summary = table.summary()
    [mount] = summary["mounts"]
    assert mount["path"].endswith("/srv/export") and mount["server"] == "10.77.0.10"
    mnt = [r for evs in events.values() for r in replies(evs, "MOUNT.MNT")]
    assert len(mnt) == 3 and all(r.result["fh"].hex() == mount["fh"] for r in mnt)
    getport = [r for evs in events.values() for r in replies(evs, "PORTMAP.GETPORT")]
    assert sorted(r.result["port"] for r in getport) == [2049] * 3 + [20048] * 3


def test_v3_paths_of_created_and_looked_up_files(v3):
    table, events = v3
    root = table.summary()["mounts"][0]["path"]
    paths = {}
    for key in events:
        if key.server_port == 2049:
            j = table.to_json(key)
            assert j["version"] == 3 and j["outstanding"] == 0 and j["errors"] == 0
            assert j["auth"] == {"flavor": "AUTH_SYS", "machine": "libnfs", "uid": 0, "gid": 0, "gids": []}
            paths.update({fh["fh"]: fh["path"] for fh in j["file_handles"]})
    assert set(paths.values()) == {root, root + "/small-v3.bin", root + "/hello.txt"}


def test_v3_read_write_counts(v3):
    _, events = v3
    allev = [e for evs in events.values() for e in evs]
    [write] = replies(allev, "NFSv3.WRITE")
    assert write.call.args["count"] == 3000 and write.call.args["stable"] == "UNSTABLE"
    assert write.result["count"] == 3000 and write.result["attrs"]["size"] == 3000
    [read] = replies(allev, "NFSv3.READ")
    assert read.result == {**read.result, "count": 29, "eof": True, "data_len": 29}
    [create] = replies(allev, "NFSv3.CREATE")
    assert create.call.args["name"] == "small-v3.bin" and create.result["fh"]
    [rdp] = replies(allev, "NFSv3.READDIRPLUS")
    names = {e["name"] for e in rdp.result["entries"]}
    assert {"hello.txt", "data-1M.bin", ".", ".."} <= names


# ---------------------------------------------------------------------------- NFSv4.0

@pytest.fixture(scope="module")
def v4():
    return replay("nfs4-session.pcap")


def test_v4_client_ids_confirmed(v4):
    table, events = v4
    clients = table.summary()["clients"]
    assert len(clients) == 3
    assert all(c["confirmed"] and c["minorversion"] == 0 and c["owner_text"].startswith("Libnfs")
               for c in clients)
    for key in events:
        j = table.to_json(key)
        assert j["version"] == 4 and j["v4"]["client_id"] in {c["client_id"] for c in clients}
        assert j["v4"]["session_id"] is None  # libnfs speaks v4.0: SETCLIENTID, no sessions


def test_v4_all_compounds_fully_decoded(v4):
    _, events = v4
    for evs in events.values():
        for e in evs:
            assert isinstance(e, (RpcCall, RpcReply)) and e.error is None
            if isinstance(e, RpcReply) and e.name == "NFSv4.COMPOUND":
                assert len(e.result["results"]) == len(e.call.args["ops"])


def _after_open(key, ev):
    return isinstance(ev, RpcReply) and ev.name == "NFSv4.COMPOUND" and \
        any(r["op"] == "OPEN" for r in ev.result["results"])


def test_v4_open_names_file_and_stateid_then_close_removes():
    table, events = replay("nfs4-session.pcap", stop=_after_open)
    key = list(events)[-1]
    j = table.to_json(key)
    [op] = j["v4"]["opens"]
    assert op["path"] == "/export/hello.txt" and op["seqid"] == 1 and op["share_access"] == 1
    assert op["client_id"] == j["v4"]["client_id"]
    fhs = {f["path"]: f["fh"] for f in j["file_handles"]}
    assert op["fh"] == fhs["/export/hello.txt"]
    open_reply = [e for e in events[key] if _after_open(key, e)][-1]
    stateid = [r for r in open_reply.result["results"] if r["op"] == "OPEN"][0]["stateid"]
    assert op["stateid"] == stateid[4:].hex()
    # the full replay includes OPEN_CONFIRM, READ and CLOSE: nothing stays open
    full, _ = replay("nfs4-session.pcap")
    assert full.summary()["opens"] == [] and full.to_json(key)["v4"]["opens"] == []


def test_v4_written_file_named():
    table, events = replay("nfs4-session.pcap")
    paths = {f["path"] for key in events for f in table.to_json(key)["file_handles"]}
    assert paths == {"/export", "/export/hello.txt", "/export/small-v4.bin"}


def test_state_json_is_deterministic():
    a, ev = replay("nfs4-session.pcap")
    b, _ = replay("nfs4-session.pcap")
    for key in ev:
        assert json.dumps(a.to_json(key), sort_keys=False) == json.dumps(b.to_json(key), sort_keys=False)
    assert json.dumps(a.summary()) == json.dumps(b.summary())
    assert a.to_json() == a.summary()
    a.forget(list(ev)[0])
    assert a.summary()["connections"] == len(ev) - 1 and len(a.summary()["clients"]) == 3


# ---------------------------------------------------------------------------- NFSv4.1 (synthetic)

SID = bytes(range(16))
CID = 0x1122334455667788
FH_ROOT, FH_DIR, FH_FILE = b"R" * 16, b"D" * 16, b"F" * 16
OPEN_ST = (1).to_bytes(4, "big") + b"O" * 12
LOCK_ST = (1).to_bytes(4, "big") + b"L" * 12
KEY = ConnKey("10.0.0.5", 900, "10.0.0.10", 2049)


def compound(xid: int, minor: int, ops: list[bytes]) -> bytes:
    body = Pack().opaque("").u32(minor).u32(len(ops)).raw(b"".join(ops)).bytes()
    return record(rpc_call(xid, NFS, 4, 1, body))


def compound_reply(xid: int, results: list[bytes], status: int = 0) -> bytes:
    body = Pack().u32(status).opaque("").u32(len(results)).raw(b"".join(results)).bytes()
    return record(rpc_reply(xid, body))


def op(num: int, *parts: bytes) -> bytes:
    return Pack().u32(num).raw(b"".join(parts)).bytes()


def ok(num: int, *parts: bytes) -> bytes:
    return op(num, Pack().u32(0).bytes(), *parts)


def P():
    return Pack()


SEQ_ARGS = P().fixed(SID).u32(1).u32(0).u32(0).u32(0).bytes()
SEQ_RES = P().fixed(SID).u32(1).u32(0).u32(0).u32(0).u32(0).bytes()
CHAN = P().u32(0).u32(1 << 20).u32(1 << 20).u32(4096).u32(8).u32(16).u32(0).bytes()


def v41_session() -> list[tuple[bool, bytes]]:
    exchange_args = P().fixed(b"verifier").opaque("linux client 7").u32(0).u32(0).u32(1) \
        .opaque("kernel.org").opaque("Linux 6.1").u64(0).u32(0).bytes()
    exchange_res = P().u64(CID).u32(1).u32(0x10000).u32(0).u64(0).opaque("srv").opaque("scope") \
        .u32(0).bytes()
    create_args = P().u64(CID).u32(1).u32(0).raw(CHAN).raw(CHAN).u32(0x40000000).u32(1).u32(0).bytes()
    create_res = P().fixed(SID).u32(1).u32(0).raw(CHAN).raw(CHAN).bytes()
    open_args = P().u32(0).u32(2).u32(0).u64(0).opaque("owner1").u32(1).u32(0).u32(0).u32(0) \
        .u32(0).opaque("a.txt").bytes()  # OPEN4_CREATE UNCHECKED, empty fattr4, CLAIM_NULL
    open_res = P().fixed(OPEN_ST).fixed(bytes(20)).u32(4).u32(0).u32(3).u32(0).bytes()  # NONE_EXT/NOT_WANTED
    lock_args = P().u32(2).u32(0).u64(0).u64(100).u32(1).u32(0).fixed(OPEN_ST).u32(0).u64(CID) \
        .opaque("lockowner").bytes()
    unlock_args = P().u32(2).u32(1).fixed(LOCK_ST).u64(0).u64(100).bytes()
    lock_st2 = (2).to_bytes(4, "big") + LOCK_ST[4:]
    close_st = (2).to_bytes(4, "big") + OPEN_ST[4:]
    return [
        (True, compound(1, 1, [op(42, exchange_args)])),
        (False, compound_reply(1, [ok(42, exchange_res)])),
        (True, compound(2, 1, [op(43, create_args)])),
        (False, compound_reply(2, [ok(43, create_res)])),
        (True, compound(3, 1, [op(53, SEQ_ARGS), op(24), op(15, P().opaque("export").bytes()), op(10),
                               op(18, open_args), op(10)])),
        (False, compound_reply(3, [ok(53, SEQ_RES), ok(24), ok(15), ok(10, P().opaque(FH_DIR).bytes()),
                                   ok(18, open_res), ok(10, P().opaque(FH_FILE).bytes())])),
        (True, compound(4, 1, [op(53, SEQ_ARGS), op(22, P().opaque(FH_FILE).bytes()), op(12, lock_args)])),
        (False, compound_reply(4, [ok(53, SEQ_RES), ok(22), ok(12, P().fixed(LOCK_ST).bytes())])),
        (True, compound(5, 1, [op(53, SEQ_ARGS), op(22, P().opaque(FH_FILE).bytes()), op(14, unlock_args)])),
        (False, compound_reply(5, [ok(53, SEQ_RES), ok(22), ok(14, P().fixed(lock_st2).bytes())])),
        (True, compound(6, 1, [op(53, SEQ_ARGS), op(22, P().opaque(FH_FILE).bytes()),
                               op(4, P().u32(0).fixed(OPEN_ST).bytes())])),
        (False, compound_reply(6, [ok(53, SEQ_RES), ok(22), ok(4, P().fixed(close_st).bytes())])),
        (True, compound(7, 1, [op(44, P().fixed(SID).bytes())])),
        (False, compound_reply(7, [ok(44)])),
        (True, compound(8, 1, [op(57, P().u64(CID).bytes())])),
        (False, compound_reply(8, [ok(57)])),
    ]


def run_until(steps, n):
    dec, table = RpcDecoder(), NfsStateTable()
    events = []
    for from_client, data in steps[:n]:
        for ev in dec.feed(from_client, data):
            assert not getattr(ev, "error", None), ev
            events.append(ev)
            table.apply(KEY, ev)
    return table, events


def test_v41_exchange_id_and_session():
    table, events = run_until(v41_session(), 4)
    s = table.summary()
    [client] = s["clients"]
    assert client["client_id"] == f"{CID:016x}" and client["owner_text"] == "linux client 7"
    assert client["confirmed"] and client["minorversion"] == 1 and client["sessions"] == [SID.hex()]
    j = table.to_json(KEY)
    assert j["v4"]["client_id"] == f"{CID:016x}" and j["v4"]["session_id"] == SID.hex()
    assert events[0].args["ops"][0]["impl"] == {"domain": "kernel.org", "name": "Linux 6.1"}


def test_v41_open_lock_unlock_close_destroy():
    steps = v41_session()
    table, events = run_until(steps, 6)
    [o] = table.to_json(KEY)["v4"]["opens"]
    assert o["path"] == "/export/a.txt" and o["fh"] == FH_FILE.hex() and o["client_id"] == f"{CID:016x}"
    assert {f["path"] for f in table.to_json(KEY)["file_handles"]} == {"/export", "/export/a.txt"}
    seq = events[-1].result["results"][0]
    assert seq["sessionid"] == SID and seq["slotid"] == 0

    table, _ = run_until(steps, 8)
    [lk] = table.to_json(KEY)["v4"]["locks"]
    assert lk["stateid"] == LOCK_ST[4:].hex() and lk["path"] == "/export/a.txt"
    assert lk["open_stateid"] == OPEN_ST[4:].hex() and lk["ranges"] == [[2, 0, 100]]

    table, _ = run_until(steps, 10)
    assert table.to_json(KEY)["v4"]["locks"] == []
    table, _ = run_until(steps, 12)
    assert table.to_json(KEY)["v4"]["opens"] == []
    table, _ = run_until(steps, 14)
    assert table.summary()["sessions"] == [] and table.to_json(KEY)["v4"]["session_id"] is None
    table, _ = run_until(steps, 16)
    assert table.summary()["clients"] == [] and table.to_json(KEY)["v4"]["client_id"] is None


def test_v4_reply_stops_at_first_failing_op():
    dec = RpcDecoder()
    dec.feed(True, compound(1, 0, [op(22, P().opaque(FH_DIR).bytes()), op(15, P().opaque("nope").bytes()),
                                   op(10)]))
    noent = op(15, P().u32(2).bytes())
    [r] = dec.feed(False, compound_reply(1, [ok(22), noent], status=2))
    assert r.error is None and r.result["status"] == "NFS4ERR_NOENT"
    assert [(x["op"], x["status"]) for x in r.result["results"]] == [("PUTFH", "NFS4_OK"),
                                                                     ("LOOKUP", "NFS4ERR_NOENT")]


def test_v4_undecodable_op_keeps_ops_before_it():
    dec = RpcDecoder()
    [c] = dec.feed(True, compound(1, 1, [op(24), op(50, bytes(40))]))  # LAYOUTGET: not laid out
    assert c.args["ops"] == [{"op": "PUTROOTFH"}] and "LAYOUTGET" in c.error
    assert not dec.unsynchronised
