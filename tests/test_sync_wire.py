"""sync.wire: the sans-I/O framing and authentication, fed bytes by hand."""

import os
import stat

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from sync.wire import (KEY_MISMATCH_HINT, MAGIC, LocalProtocolError, Message, Ready, Rejected, SyncSession,
                       key_permission_problem, load_key)

KEY = b"k" * 32


def A(key=KEY, **kw):
    return SyncSession(key, me="a", peer="b", **kw)


def B(key=KEY, **kw):
    return SyncSession(key, me="b", peer="a", **kw)


def pair(key_a=KEY, key_b=KEY):
    """Two sessions with their preambles exchanged."""
    a, b = A(key_a), B(key_b)
    assert a.receive_data(b.initial_bytes()) == [Ready()]
    assert b.receive_data(a.initial_bytes()) == [Ready()]
    return a, b


def messages(events):
    return [e.body for e in events if isinstance(e, Message)]


def rejected(events):
    return [e for e in events if isinstance(e, Rejected)]


def test_round_trip_both_ways():
    a, b = pair()
    m1 = {"type": "hello", "name": "a", "services": [1, 2], "blob": b"\x00\xff"}
    assert b.receive_data(a.seal(m1)) == [Message("hello", m1)]
    m2 = {"type": "heartbeat", "sent": 1.5, "seq": 0}
    assert a.receive_data(b.seal(m2)) == [Message("heartbeat", m2)]
    assert a.counters["messages_out"] == 1 and a.counters["messages_in"] == 1


def test_preamble_and_messages_in_one_chunk():
    a, b = A(), B()
    b.receive_data(a.initial_bytes())  # b knows a's nonce, a does not yet know b's
    first = {"type": "x"}
    wire = b.initial_bytes() + b.seal(first)
    assert a.receive_data(wire) == [Ready(), Message("x", first)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.dictionaries(st.text(max_size=5), st.integers(-2**63, 2**64 - 1) | st.text(max_size=20) | st.binary(max_size=40),
                                max_size=4), min_size=1, max_size=6),
       st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=50))
def test_any_segmentation_gives_the_same_messages(bodies, cuts):
    a, b = A(), B()
    a.receive_data(b.initial_bytes())
    sent = [{**body, "type": f"t{i}"} for i, body in enumerate(bodies)]
    stream = a.initial_bytes() + b"".join(a.seal(m) for m in sent)
    events, pos, i = [], 0, 0
    while pos < len(stream):
        size = cuts[i % len(cuts)]
        events += b.receive_data(stream[pos:pos + size])
        pos, i = pos + size, i + 1
    assert events[0] == Ready()
    assert messages(events) == sent
    assert not rejected(events)


def test_forged_mac_is_rejected_and_counted():
    a, b = pair()
    b.receive_data(a.seal({"type": "first"}))
    # an injected frame claiming the next sequence number, with a MAC made without the key
    payload = msgpack.packb({"type": "takeover"})
    forged = (8 + 32 + len(payload)).to_bytes(4, "big") + (1).to_bytes(8, "big") + os.urandom(32) + payload
    events = b.receive_data(forged)
    assert messages(events) == []
    [r] = rejected(events)
    assert r.kind == "auth" and "forged" in r.reason and not r.broken
    assert b.counters["rejected_auth"] == 1
    # framing was intact and the forgery did not use up a sequence number: the real next message passes
    assert messages(b.receive_data(a.seal({"type": "later"}))) == [{"type": "later"}]


def test_forged_payload_is_rejected():
    a, b = pair()
    frame = bytearray(a.seal({"type": "x", "v": 1}))
    frame[-1] ^= 0x01
    [r] = b.receive_data(bytes(frame))
    assert isinstance(r, Rejected) and r.kind == "auth"


def test_message_from_an_earlier_connection_is_rejected():
    a1, b1 = pair()
    recorded = a1.initial_bytes(), a1.seal({"type": "takeover"})
    assert messages(b1.receive_data(recorded[1]))
    # new connection: b has a fresh nonce; an attacker replays a's old preamble and frame
    b2 = B()
    events = b2.receive_data(recorded[0] + recorded[1])
    assert events[0] == Ready()
    assert messages(events) == []
    assert [r.kind for r in rejected(events)] == ["auth"]
    assert b2.counters["rejected_auth"] == 1


def test_replay_within_a_connection_is_rejected():
    a, b = pair()
    f0, f1 = a.seal({"type": "m0"}), a.seal({"type": "m1"})
    assert messages(b.receive_data(f0)) == [{"type": "m0"}]
    [r] = b.receive_data(f0)
    assert r.kind == "out_of_sequence" and "replayed" in r.reason
    assert messages(b.receive_data(f1)) == [{"type": "m1"}]
    assert b.counters["rejected_out_of_sequence"] == 1


def test_reordered_messages_are_rejected():
    a, b = pair()
    f0, f1 = a.seal({"type": "m0"}), a.seal({"type": "m1"})
    [r] = b.receive_data(f1)
    assert r.kind == "out_of_sequence" and "out of order" in r.reason
    assert messages(b.receive_data(f0)) == [{"type": "m0"}]


def test_reflected_message_is_rejected():
    """A message sent back to its own sender does not verify: each direction has its own key."""
    a, b = pair()
    [r] = a.receive_data(a.seal({"type": "x"}))
    assert r.kind == "auth"


def test_echoed_nonce_is_refused():
    a = A()
    [r] = a.receive_data(a.initial_bytes())
    assert r.kind == "auth" and r.broken and a.broken


def test_different_keys_reject_the_first_message_with_a_hint():
    a, b = pair(KEY, b"other key, 16 bytes or more")
    [r] = b.receive_data(a.seal({"type": "hello"}))
    assert r.kind == "auth" and r.reason == KEY_MISMATCH_HINT
    assert b.counters["rejected_auth"] == 1 and b.counters["messages_in"] == 0


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\n\r\n", b"\x00" * 40, b"P"  + b"\xff" * 30])
def test_garbage_breaks_the_session(garbage):
    b = B()
    events = b.receive_data(garbage)
    [r] = rejected(events)
    assert r.kind == "parse" and r.broken and b.broken
    assert b.counters["rejected_parse"] == 1
    assert b.receive_data(b"more") == []  # ignored once broken


def test_short_frame_breaks_the_session():
    a, b = pair()
    [r] = b.receive_data(b"\x00\x00\x00\x05hello")
    assert r.kind == "parse" and r.broken


def test_oversize_frame_is_refused_before_it_arrives():
    a, b = pair()
    [r] = b.receive_data((2 * 1024 * 1024).to_bytes(4, "big") + b"x" * 10)
    assert r.kind == "too_large" and r.broken and b.broken
    assert b.counters["rejected_too_large"] == 1


def test_sealing_an_oversize_message_is_our_bug():
    a, b = pair()
    with pytest.raises(LocalProtocolError):
        a.seal({"type": "big", "data": b"x" * (1024 * 1024)})


def _seal_raw(session, payload: bytes) -> bytes:
    """Authenticate arbitrary payload bytes as ``session`` would (to test the parse checks)."""
    import hashlib, hmac, struct
    seq = session._send_seq
    session._send_seq += 1
    mac = hmac.new(session._send_key, struct.pack("!Q", seq) + payload, hashlib.sha256).digest()
    frame = struct.pack("!Q", seq) + mac + payload
    return struct.pack("!I", len(frame)) + frame


@pytest.mark.parametrize("payload", [
    msgpack.packb({"name": "a"}),           # no "type"
    msgpack.packb({"type": 7}),             # "type" not a string
    msgpack.packb([1, 2, 3]),               # not a dict
    b"\xc1",                                # never-used msgpack byte
    msgpack.packb({"type": "x"}) + b"\x01",  # trailing bytes
])
def test_authenticated_but_malformed_message_is_a_parse_rejection(payload):
    a, b = pair()
    [r] = b.receive_data(_seal_raw(a, payload))
    assert r.kind == "parse" and not r.broken
    assert b.counters["rejected_parse"] == 1
    # the sequence number was used up: the next good message is in order
    assert messages(b.receive_data(a.seal({"type": "ok"}))) == [{"type": "ok"}]


def test_sealing_without_type_or_before_ready_is_our_bug():
    a = A()
    with pytest.raises(LocalProtocolError):
        a.seal({"type": "x"})
    a, b = pair()
    with pytest.raises(LocalProtocolError):
        a.seal({"name": "a"})


def test_initial_bytes_shape():
    s = B()
    assert s.initial_bytes().startswith(MAGIC) and len(s.initial_bytes()) == len(MAGIC) + 16
    assert B().initial_bytes() != s.initial_bytes()


def test_short_key_is_refused():
    with pytest.raises(ValueError):
        SyncSession(b"short", me="a", peer="b")


def test_load_key(tmp_path):
    path = tmp_path / "pair.key"
    with pytest.raises(ValueError, match="does not exist"):
        load_key(path)
    path.write_bytes(b"  short \n")
    with pytest.raises(ValueError, match="at least 16"):
        load_key(path)
    path.write_bytes(b"0123456789abcdef0123\n")
    assert load_key(path) == b"0123456789abcdef0123"
    os.chmod(path, 0o600)
    assert key_permission_problem(path) is None
    os.chmod(path, 0o644)
    assert "chmod 600" in key_permission_problem(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


# -- issue 8.1: one TCP segment must not make the caller seal on a broken session ----------------

KILLER = MAGIC + os.urandom(16) + b"\xff\xff\xff\xff"  # preamble + an impossible length


def act_like_the_link(session, chunks):
    """Feed ``chunks``; answer every Ready with a sealed hello, as sync.link does. Returns all events."""
    seen = []
    for chunk in chunks:
        for event in session.receive_data(chunk):
            seen.append(event)
            if isinstance(event, Ready):
                session.seal({"type": "hello", "name": "a"})  # raised LocalProtocolError before the fix
    return seen


def test_killer_in_one_segment_gives_only_the_broken_rejection():
    s = B()
    events = act_like_the_link(s, [KILLER])
    assert [type(e) for e in events] == [Rejected]
    assert events[0].broken and events[0].kind == "too_large"
    assert s.broken and s.counters["rejected_too_large"] == 1


@pytest.mark.parametrize("cut", range(1, len(KILLER)))
def test_killer_split_anywhere_never_invites_a_seal_on_a_broken_session(cut):
    s = B()
    events = act_like_the_link(s, [KILLER[:cut], KILLER[cut:]])
    assert s.broken and isinstance(events[-1], Rejected) and events[-1].broken
    # Ready is handed out only from a call that left the session intact
    assert [type(e) for e in events] in ([Rejected], [Ready, Rejected])


def test_killer_byte_by_byte():
    s = B()
    events = act_like_the_link(s, [bytes([b]) for b in KILLER])
    assert [type(e) for e in events] == [Ready, Rejected] and s.broken


def test_good_message_then_impossible_frame_in_one_segment_gives_only_the_rejection():
    a, b = pair()
    wire = a.seal({"type": "heartbeat"}) + b"\x00\x00\x00\x01"  # shorter than a frame header
    events = b.receive_data(wire)
    assert [type(e) for e in events] == [Rejected] and events[0].broken and b.broken
    assert b.receive_data(a.seal({"type": "x"})) == []  # a broken session ignores what follows


# -- issue 8.3: direction keys are bound to the node names ----------------------------------------

X, Y = b"x" * 16, b"y" * 16


def connected(a, b):
    assert a.receive_data(b.initial_bytes()) == [Ready()]
    assert b.receive_data(a.initial_bytes()) == [Ready()]
    return a, b


def test_a_frame_never_verifies_on_a_second_connection_with_the_nonces_swapped():
    a1, b1 = connected(A(nonce=X), B(nonce=Y))
    a2, b2 = connected(A(nonce=Y), B(nonce=X))  # the attacker arranged the same nonces, swapped
    for frame in (a1.seal({"type": "takeover"}), b1.seal({"type": "takeover"})):
        for victim in (a2, b2):
            events = victim.receive_data(frame)
            assert messages(events) == [] and [r.kind for r in rejected(events)] == ["auth"]
    # with the nonces the same way round it is the same connection, and the frames are good
    a3, b3 = connected(A(nonce=X), B(nonce=Y))
    assert messages(b3.receive_data(a1.seal({"type": "m"}))) == []  # seq 1 where 0 is due: replay
    assert messages(b3.receive_data(a3.seal({"type": "m"}))) == [{"type": "m"}]


def test_wrong_names_do_not_authenticate():
    a = SyncSession(KEY, me="a", peer="b")
    c = SyncSession(KEY, me="c", peer="a")  # a third node with the pair's key, posing as the peer
    connected(a, c)
    [r] = a.receive_data(c.seal({"type": "hello", "name": "b"}))
    assert r.kind == "auth"
    with pytest.raises(ValueError):
        SyncSession(KEY, me="a", peer="a")


def test_names_are_length_prefixed_in_the_key():
    a = SyncSession(KEY, me="ab", peer="c", nonce=X)
    b = SyncSession(KEY, me="c", peer="ab", nonce=Y)
    odd = SyncSession(KEY, me="a", peer="bc", nonce=X)
    connected(a, b)
    odd.receive_data(b.initial_bytes())
    [r] = b.receive_data(odd.seal({"type": "m"}))
    assert r.kind == "auth"
