"""protocols.rpc: record marking edge cases, XID matching, resync after junk and gaps, never raising."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.events import ProtocolError
from protocols.rpc import AuthSys, RpcCall, RpcDecoder, RpcReply
from tests.nfs_pcap import FIXTURES, Pack, auth_sys, record, rpc_call, rpc_reply, tcp_streams

NFS, MOUNT = 100003, 100005
GETATTR = Pack().opaque(b"\x01" * 8).bytes()
GETATTR_OK = Pack().u32(0).u32(1).u32(0o644).u32(1).u32(0).u32(0).u64(29).fixed(bytes(56)).bytes()


def feed_all(dec: RpcDecoder, chunks) -> list:
    out = []
    for from_client, data in chunks:
        out += dec.feed(from_client, data)
    return out


def test_call_and_reply_matched_by_xid():
    dec = RpcDecoder()
    [call] = dec.feed(True, record(rpc_call(7, NFS, 3, 1, GETATTR, auth_sys("box", 1000, 100))))
    assert isinstance(call, RpcCall) and call.name == "NFSv3.GETATTR"
    assert call.cred == AuthSys(0, "box", 1000, 100, ())
    assert call.args == {"fh": b"\x01" * 8}
    assert dec.outstanding() == 1
    [reply] = dec.feed(False, record(rpc_reply(7, GETATTR_OK)))
    assert isinstance(reply, RpcReply) and reply.call is call and reply.status == "SUCCESS"
    assert reply.result["status"] == "NFS3_OK" and reply.result["attrs"]["size"] == 29
    assert dec.outstanding() == 0 and not dec.unsynchronised


def test_multi_fragment_and_zero_length_fragments():
    msg = rpc_call(1, NFS, 3, 1, GETATTR)
    dec = RpcDecoder()
    data = record(msg, 3, 3, 10, 10, 41)  # includes two zero-length middle fragments
    events = dec.feed(True, data)
    assert [e.xid for e in events] == [1]
    # a record made only of a zero-length last fragment carries no message: skipped, still in sync
    assert dec.feed(True, struct.pack(">I", 0x80000000)) == []
    assert [e.xid for e in dec.feed(True, record(rpc_call(2, NFS, 3, 0)))] == [2]
    assert not dec.unsynchronised


def test_byte_at_a_time_gives_same_events():
    stream = record(rpc_call(1, NFS, 3, 1, GETATTR), 5) + record(rpc_call(2, MOUNT, 3, 1, Pack().opaque("/x").bytes()))
    whole = RpcDecoder().feed(True, stream)
    dec = RpcDecoder()
    split = [e for i in range(len(stream)) for e in dec.feed(True, stream[i:i + 1])]
    assert split == whole and len(whole) == 2


def test_oversize_record_is_an_error_then_resync():
    dec = RpcDecoder(max_record=1 << 16)
    events = dec.feed(True, struct.pack(">I", 0x80000000 | (1 << 20)) + b"\xee" * 100)
    assert any(isinstance(e, ProtocolError) and "exceeds" in e.what for e in events)
    assert dec.unsynchronised
    events = dec.feed(True, record(rpc_call(9, NFS, 3, 1, GETATTR)))
    assert [e.xid for e in events if isinstance(e, RpcCall)] == [9]
    assert not dec.unsynchronised


def test_oversize_across_fragments():
    dec = RpcDecoder(max_record=100)
    frag = struct.pack(">I", 60) + bytes(60)
    events = dec.feed(True, frag + frag)
    assert isinstance(events[-1], ProtocolError)


def test_garbage_record_then_resync():
    dec = RpcDecoder()
    events = dec.feed(True, record(b"\x00\x00\x00\x01\x00\x00\x00\x07" + bytes(8)))
    assert isinstance(events[0], ProtocolError) and dec.unsynchronised
    assert [e.xid for e in dec.feed(True, record(rpc_call(3, NFS, 3, 0)))] == [3]


def test_reply_to_unknown_xid_and_denied_reply():
    dec = RpcDecoder()
    [r] = dec.feed(False, record(rpc_reply(42, GETATTR_OK)))
    assert r.call is None and r.result is None and r.status == "SUCCESS"
    dec.feed(True, record(rpc_call(43, NFS, 3, 1, GETATTR)))
    denied = Pack().u32(43).u32(1).u32(1).u32(1).u32(5).bytes()  # MSG_DENIED AUTH_ERROR TOOWEAK
    [r] = dec.feed(False, record(denied))
    assert not r.accepted and r.status == "AUTH_ERROR:5" and r.call.xid == 43


def test_unknown_program_and_prog_unavail():
    dec = RpcDecoder()
    [c] = dec.feed(True, record(rpc_call(5, 200000, 1, 4, b"abcd")))
    assert c.name == "200000/1/4" and c.args is None
    [r] = dec.feed(False, record(Pack().u32(5).u32(1).u32(0).raw(b"\0" * 8).u32(1).bytes()))
    assert r.status == "PROG_UNAVAIL" and r.call is c


def test_malformed_body_keeps_sync():
    dec = RpcDecoder()
    [c] = dec.feed(True, record(rpc_call(5, NFS, 3, 1, Pack().u32(1000).bytes())))  # fh longer than data
    assert c.args is None and c.error and not dec.unsynchronised
    assert [e.xid for e in dec.feed(True, record(rpc_call(6, NFS, 3, 0)))] == [6]


def test_gap_inside_a_fragment_keeps_boundary():
    dec = RpcDecoder()
    big = record(rpc_call(1, NFS, 3, 7, Pack().opaque(b"f").u64(0).u32(400).u32(0).opaque(bytes(400)).bytes()))
    nxt = record(rpc_call(2, NFS, 3, 0))
    assert dec.feed(True, big[:100]) == []
    assert dec.gap(True, 200) == []  # lost bytes 100..300 of a 460-byte record
    events = dec.feed(True, big[300:] + nxt)
    assert [e.xid for e in events] == [2]  # the damaged call is dropped, the next one decoded
    assert not dec.unsynchronised


def test_gap_across_boundary_hunts_for_next_call_and_reply():
    dec = RpcDecoder()
    dec.feed(True, record(rpc_call(1, NFS, 3, 1, GETATTR)))
    dec.feed(True, record(rpc_call(2, NFS, 3, 1, GETATTR)))
    r1 = record(rpc_reply(1, GETATTR_OK))
    dec.gap(False, len(r1) + 10)  # the first reply and part of the second are lost
    assert dec.unsynchronised
    r2 = record(rpc_reply(2, GETATTR_OK))
    events = dec.feed(False, r2[10:] + r2)
    assert [e.xid for e in events if isinstance(e, RpcReply)] == [2]
    assert events[-1].result["status"] == "NFS3_OK"
    assert not dec.unsynchronised


# ---------------------------------------------------------------------------- against a real capture

def _nfs_stream():
    """The libnfs v3 write connection of the fixture: (from_client, bytes) chunks."""
    streams = tcp_streams(FIXTURES / "nfs3-session.pcap")
    key = [k for k, chunks in streams.items() if k.server_port == 2049 and
           any(b"small-v3.bin" in d for _, d in chunks)][0]
    return streams[key]


NFS_STREAM = _nfs_stream()
REFERENCE = feed_all(RpcDecoder(), NFS_STREAM)


def test_reference_stream_decodes_cleanly():
    names = [e.name for e in REFERENCE if isinstance(e, RpcCall)]
    assert names == ["NFSv3.NULL", "NFSv3.FSINFO", "NFSv3.GETATTR", "NFSv3.GETATTR", "NFSv3.CREATE",
                     "NFSv3.LOOKUP", "NFSv3.SETATTR", "NFSv3.WRITE", "NFSv3.COMMIT"]
    assert all(e.error is None for e in REFERENCE if isinstance(e, (RpcCall, RpcReply)))
    assert not any(isinstance(e, ProtocolError) for e in REFERENCE)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(min_value=1, max_value=700), min_size=1, max_size=40))
def test_any_resegmentation_gives_same_events(sizes):
    # re-cut each direction's bytes at arbitrary points, keeping the order of directions
    dec = RpcDecoder()
    events = []
    k = 0
    for from_client, data in NFS_STREAM:
        i = 0
        while i < len(data):
            n = sizes[k % len(sizes)]
            k += 1
            events += dec.feed(from_client, data[i:i + n])
            i += n
    assert events == REFERENCE


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=200)), max_size=20),
       st.lists(st.integers(min_value=0, max_value=5000), max_size=3), st.booleans())
def test_arbitrary_bytes_never_raise(chunks, gaps, midstream):
    dec = RpcDecoder(midstream=midstream)
    for i, (from_client, data) in enumerate(chunks):
        for e in dec.feed(from_client, data):
            assert isinstance(e, (RpcCall, RpcReply, ProtocolError))
            assert not (isinstance(e, ProtocolError) and e.what.startswith("internal"))
        if i < len(gaps):
            dec.gap(from_client, gaps[i])


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_gap_then_resync_on_real_stream(data):
    # lose a stretch of one direction somewhere; everything from two messages later must decode
    direction = data.draw(st.booleans(), label="from_client")
    idx = [i for i, (fc, _) in enumerate(NFS_STREAM) if fc == direction][:-3]
    victim = data.draw(st.sampled_from(idx), label="chunk")
    fc, payload = NFS_STREAM[victim]
    start = data.draw(st.integers(0, len(payload) - 1))
    length = data.draw(st.integers(1, len(payload) - start))
    dec = RpcDecoder()
    events = feed_all(dec, NFS_STREAM[:victim])
    if start:
        events += dec.feed(fc, payload[:start])
    events += dec.gap(fc, length)
    events += dec.feed(fc, payload[start + length:])
    events += feed_all(dec, NFS_STREAM[victim + 1:])
    # the last two exchanges (SETATTR/WRITE/COMMIT...) come well after the gap: they must decode
    got = [e for e in events if isinstance(e, (RpcCall, RpcReply))]
    assert got[-4:] == REFERENCE[-4:], (victim, start, length)
    assert not dec.unsynchronised


def test_midstream_start_hunts_for_first_call():
    dec = RpcDecoder(midstream=True)
    assert dec.unsynchronised
    tail_of_write = bytes(range(256)) * 3
    events = dec.feed(True, tail_of_write + record(rpc_call(11, NFS, 3, 1, GETATTR)))
    assert [e.xid for e in events] == [11] and dec.unsynchronised  # replies not found yet
    events = dec.feed(False, b"\x00" * 37 + record(rpc_reply(11, GETATTR_OK)))
    assert [e.xid for e in events] == [11] and not dec.unsynchronised


def test_a_reply_decoded_before_its_call_follows_the_call():
    """A standby that sees only frames to its peer gets the replies from the backend leg, in other capture
    batches than the calls: a reply may come first. It is told as soon as it comes (its call unknown), and
    again right after its call, decoded with it; nothing stays outstanding."""
    dec = RpcDecoder()
    [early] = dec.feed(False, record(rpc_reply(7, GETATTR_OK)))
    assert early.call is None and early.result is None
    call, late = dec.feed(True, record(rpc_call(7, NFS, 3, 1, GETATTR)))
    assert isinstance(call, RpcCall) and isinstance(late, RpcReply)
    assert late.call is call and late.result["attrs"]["size"] == 29
    assert dec.outstanding() == 0 and dec.counters["late_replies"] == 1
    # once matched it is gone: the same xid again is an ordinary call
    [again] = dec.feed(True, record(rpc_call(7, NFS, 3, 1, GETATTR)))
    assert dec.outstanding() == 1 and isinstance(again, RpcCall)


def test_early_replies_are_bounded():
    from protocols.rpc import MAX_EARLY

    dec = RpcDecoder()
    for xid in range(MAX_EARLY + 10):
        dec.feed(False, record(rpc_reply(xid, GETATTR_OK)))
    assert dec.feed(True, record(rpc_call(3, NFS, 3, 1, GETATTR)))[-1].xid == 3  # dropped: the call waits
    assert dec.outstanding() == 1
    assert len(dec.feed(True, record(rpc_call(MAX_EARLY + 5, NFS, 3, 1, GETATTR)))) == 2  # kept


def test_the_reference_stream_with_every_reply_ahead_of_its_call_gives_the_same_replies():
    """The fixture's NFSv3 connection with the server's bytes delivered a batch ahead of the client's:
    every reply decoded with its call, as in order."""
    chunks = list(NFS_STREAM)
    reordered = []
    for i in range(0, len(chunks), 2):
        pair = chunks[i:i + 2]
        reordered += sorted(pair, key=lambda c: c[0])  # the server's chunk (False) first
    dec = RpcDecoder()
    events = feed_all(dec, reordered)
    assert dec.counters["late_replies"] >= 3
    want = [(e.xid, e.call.name, e.result is not None) for e in REFERENCE if isinstance(e, RpcReply)]
    got = [(e.xid, e.call.name, e.result is not None) for e in events if isinstance(e, RpcReply) and e.call]
    assert got == want
