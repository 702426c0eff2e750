"""Decoders after capture gaps and on bulk transfers (issue 13).

* Real captured streams with random frames removed: every SMB2/RPC message decoded after a gap is a
  message of the clean decode of the same capture (a resync never invents or garbles one), and
  messages are decoded after gaps (the decoders do find the boundaries again).
* Bulk READ/WRITE payload is skipped by length: the message's event comes from its head, the decoder
  never holds more than the head, and a gap inside the skipped payload loses nothing.
* The boundary hunt is a byte search: megabytes of payload after a gap cost milliseconds.
"""

from __future__ import annotations

import random
import struct
import time
from pathlib import Path

import pytest

from capture.pcapfile import read_capture
from protocols.events import ProtocolError
from protocols.pipeline import Pipeline
from protocols.rpc import PEEK, RpcCall, RpcDecoder, RpcReply
from protocols.smb2 import BULK_PEEK, WRITE, Smb2Decoder, Smb2Request, Smb2Response
from protocols.tcpstream import Gap
from tests.nfs_pcap import Pack, record, rpc_call, rpc_reply

FIXTURES = Path(__file__).parent / "fixtures"
CAPTURES = ["smb-smbclient.pcap", "smb-open.pcap", "smb-smbprotocol.pcap", "nfs3-session.pcap",
            "nfs4-session.pcap"]
NFS = 100003
MESSAGES = (Smb2Request, Smb2Response, RpcCall, RpcReply)


def _frames(name: str) -> list:
    with open(FIXTURES / name, "rb") as f:
        return [(p.data, p.ts, p.linktype) for p in read_capture(f)]


def _payload(frame: bytes) -> int:
    if len(frame) < 54 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
        return 0
    ihl = (frame[14] & 0xF) * 4
    return struct.unpack_from("!H", frame, 16)[0] - ihl - (frame[14 + ihl + 12] >> 4) * 4


def _decode(frames: list) -> list:
    pipe = Pipeline(zero_copy=True)
    events = []
    for data, ts, linktype in frames:
        events += pipe.feed_frame(data, ts, linktype)
    return events + pipe.close()


def _unmatched(clean: list, after: list) -> list:
    """Messages of ``after`` that ``clean`` does not have. A response whose request was lost in a gap
    cannot carry it (an RPC reply without its call cannot decode its body): compared on the rest."""
    def weak(key, ev):
        if isinstance(ev, Smb2Response):
            return (key, ev.command, ev.message_id, ev.session_id, ev.status)
        return (key, ev.xid, ev.accepted, ev.status)

    full = {(k, repr(e)) for k, e in clean if isinstance(e, MESSAGES)}
    partial = {weak(k, e) for k, e in clean if isinstance(e, (Smb2Response, RpcReply))}
    out = []
    for k, e in after:
        if not isinstance(e, MESSAGES) or (k, repr(e)) in full:
            continue
        lost_request = (isinstance(e, Smb2Response) and e.request is None) or \
            (isinstance(e, RpcReply) and e.call is None)
        if lost_request and weak(k, e) in partial:
            continue
        out.append((k, e))
    return out


@pytest.mark.parametrize("name", CAPTURES)
def test_messages_after_gaps_are_the_clean_decode(name):
    frames = _frames(name)
    clean = _decode(frames)
    assert sum(isinstance(e, MESSAGES) for _k, e in clean) > 10
    after_gap = gaps = 0
    for seed in range(12):
        rng = random.Random(seed)
        lossy = [f for f in frames if not (_payload(f[0]) > 0 and rng.random() < 0.08)]
        events = _decode(lossy)
        assert _unmatched(clean, events) == []
        gapped: set = set()
        for key, ev in events:
            if isinstance(ev, Gap):
                gaps += 1
                gapped.add((key, ev.from_client))
            elif isinstance(ev, MESSAGES):
                from_client = isinstance(ev, Smb2Request) or getattr(ev, "from_client", False) is True
                after_gap += (key, from_client) in gapped
    assert gaps > 0, "no gap was made: the test proves nothing"
    assert after_gap > 0, "nothing decoded after a gap: the decoders never found a boundary again"


# ------------------------------------------------------------------------------------- bulk RPC
def _write3(xid: int, data_len: int) -> bytes:
    body = Pack().opaque(b"\x07" * 32).u64(4096).u32(data_len).u32(2).opaque(bytes(data_len)).bytes()
    return record(rpc_call(xid, NFS, 3, 7, body))


def _feed(dec, from_client: bool, stream: bytes, size: int = 65536, watch=None) -> list:
    out = []
    for i in range(0, len(stream), size):
        out += dec.feed(from_client, memoryview(stream)[i:i + size])
        if watch:
            watch()
    return out


def test_bulk_write_decoded_from_its_head_payload_never_buffered():
    dec = RpcDecoder()
    held = []
    d = dec._dirs[True]
    stream = _write3(1, 1 << 20) + _write3(2, 300_000)
    events = []
    for i in range(0, len(stream), 65536):
        got = dec.feed(True, memoryview(stream)[i:i + 65536])
        held.append(len(d.rec) + len(d.buf))
        if got and not events:
            assert i + 65536 < len(_write3(1, 1 << 20)), "the call came out only at the record's end"
        events += got
    assert [(e.xid, e.args["data_len"], e.args["count"]) for e in events] == [(1, 1 << 20, 1 << 20),
                                                                           (2, 300_000, 300_000)]
    assert max(held) <= PEEK, f"held {max(held)} bytes of a bulk record"
    assert dec.counters["bulk_records"] == 2 and dec.counters["skipped_bytes"] > 1_300_000
    # the reply still finds its call
    reply = rpc_reply(1, Pack().u32(0).u32(0).u32(0).u32(1 << 20).u32(1).fixed(bytes(8)).bytes())
    [r] = dec.feed(False, record(reply))
    assert r.call is events[0] and r.result["count"] == 1 << 20


def test_gap_inside_skipped_payload_loses_nothing():
    dec = RpcDecoder()
    stream = _write3(1, 1 << 20)
    [call] = dec.feed(True, stream[:200_000])
    assert dec.gap(True, 300_000) == []
    assert dec.feed(True, stream[500_000:]) == []
    [nxt] = dec.feed(True, _write3(2, 100))
    assert (call.xid, nxt.xid) == (1, 2) and not dec.unsynchronised
    # a gap in a record's head still drops that record only, and keeps the boundary
    dec.feed(True, stream[:100])
    dec.gap(True, 1000)
    assert dec.feed(True, stream[1100:]) == []
    [again] = dec.feed(True, _write3(3, 100))
    assert again.xid == 3 and not dec.unsynchronised


def test_bulk_read_reply_and_v4_write_with_ops_after_the_data():
    dec = RpcDecoder()
    [read] = dec.feed(True, record(rpc_call(5, NFS, 3, 6, Pack().opaque(b"\x01" * 8).u64(0).u32(1 << 20).bytes())))
    data = bytes(range(256)) * 4096
    reply = rpc_reply(5, Pack().u32(0).u32(0).u32(1 << 20).u32(1).opaque(data).bytes())
    [r] = _feed(dec, False, record(reply))
    assert r.call is read and r.result["data_len"] == 1 << 20 and r.result["eof"] is True
    # NFSv4 COMPOUND: PUTFH, WRITE of 512 KiB, GETATTR after the data (kept as the record's tail)
    ops = [Pack().u32(22).opaque(b"\x02" * 16).bytes(),
           Pack().u32(38).u32(1).fixed(b"S" * 12).u64(0).u32(2).opaque(bytes(512 << 10)).bytes(),
           Pack().u32(9).u32(2).u32(0x1A).u32(0x300000).bytes()]
    body = Pack().opaque("").u32(1).u32(3).raw(b"".join(ops)).bytes()
    before = dec.counters["skipped_bytes"]
    [call] = _feed(dec, True, record(rpc_call(6, NFS, 4, 1, body)))
    assert [o["op"] for o in call.args["ops"]] == ["PUTFH", "WRITE", "GETATTR"]
    assert call.args["ops"][1]["count"] == 512 << 10 and call.args["ops"][2]["mask"]
    assert dec.counters["skipped_bytes"] - before > 500_000
    # the same record whole, byte for byte the same event
    [whole] = RpcDecoder().feed(True, record(rpc_call(6, NFS, 4, 1, body)))
    assert whole == call


def test_rpc_hunt_is_a_byte_search():
    rng = random.Random(7)
    junk = rng.randbytes(8 << 20)
    dec = RpcDecoder(midstream=True)
    t0 = time.perf_counter()
    assert _feed(dec, True, junk) == []
    [call] = dec.feed(True, _write3(9, 100))
    elapsed = time.perf_counter() - t0
    assert call.xid == 9 and not dec._dirs[True].hunting and dec.counters["resyncs"] == 1
    # byte-by-byte trial decoding took ~0.5 us per byte (4 s here); a find takes milliseconds
    assert elapsed < 0.5, f"hunting 8 MiB took {elapsed:.2f} s"


# ------------------------------------------------------------------------------------- bulk SMB2
def _smb2_write(message_id: int, length: int) -> bytes:
    header = struct.pack("<4sHHIHHIIQQQ16s", b"\xfeSMB", 64, 1, 0, WRITE, 1, 0, 0, message_id, 7 << 32, 0x55,
                         bytes(16))
    body = struct.pack("<HHIQ16sIIHHI", 49, 64 + 48, length, 0, b"\x0f" * 16, 0, 0, 0, 0, 0)
    msg = header + body + bytes(length)
    return struct.pack(">I", len(msg)) + msg


def test_smb2_bulk_write_buffers_only_its_head_and_the_hunt_is_fast():
    dec = Smb2Decoder()
    d = dec._dirs[True]
    stream = _smb2_write(1, 1 << 20) + _smb2_write(2, 4096)
    held, events = [], []
    for i in range(0, len(stream), 65536):
        events += dec.feed(True, memoryview(stream)[i:i + 65536])
        held.append(len(d.buf))
    assert [(e.message_id, e.fields["length"]) for e in events] == [(1, 1 << 20), (2, 4096)]
    assert max(held) <= 4 + BULK_PEEK
    # after a gap that swallows a boundary: 8 MiB of junk, then the next message, found quickly
    dec.gap(True, 10)
    junk = random.Random(3).randbytes(8 << 20)
    t0 = time.perf_counter()
    assert not [e for e in _feed(dec, True, junk + _smb2_write(3, 100)) if not isinstance(e, Smb2Request)
                and not isinstance(e, ProtocolError)]
    assert time.perf_counter() - t0 < 0.5
    assert dec.counters["resyncs"] >= 1 and not d.hunting
