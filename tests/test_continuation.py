"""The continuation book (proxy/continuation.py): both legs' repair state from the frames destined to
the peer alone, checked against a real two-direction capture of a proxied SMB connection (the oracle:
tests/fixtures/smb-proxied.pcap, made by tests/fixtures/make_proxied_capture.py)."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capture.pcapfile import read_capture
from protocols.frames import ACK, FIN, PSH, SYN, TcpOptions, TcpSegment, parse_link
from protocols.tcpstream import Data, TcpTracker
from proxy.continuation import (TCPI_OPT_SACK, TCPI_OPT_TIMESTAMPS, TCPI_OPT_WSCALE, ContinuationBook, LegOptions,
                                Pairing, PairingInbox, PairingOutbox)

CAPTURE = Path(__file__).parent / "fixtures" / "smb-proxied.pcap"
NODE = "10.77.0.1"


def _segments() -> list[tuple[float, TcpSegment]]:
    out = []
    with open(CAPTURE, "rb") as f:
        for p in read_capture(f):
            seg = parse_link(p.data, p.linktype)
            if isinstance(seg, TcpSegment):
                out.append((p.ts, TcpSegment(seg.src, seg.dst, seg.sport, seg.dport, seg.seq, seg.ack, seg.flags,
                                             seg.window, seg.options, bytes(seg.payload))))
    return out


SEGMENTS = _segments()


def _legs(tracker: TcpTracker):
    clients = [k for k in tracker.connections if k.server_ip == NODE]
    backends = [k for k in tracker.connections if k.client_ip == NODE]
    if len(clients) != 1 or len(backends) != 1:
        return None, None
    return tracker.connections[clients[0]], tracker.connections[backends[0]]


def _options(remote, node) -> LegOptions:
    """What TCP_INFO on the node says of a leg (from the two SYNs of the full capture)."""
    bits = (TCPI_OPT_TIMESTAMPS if remote.timestamps and node.timestamps else 0) | \
        (TCPI_OPT_SACK if remote.sack_permitted and node.sack_permitted else 0) | \
        (TCPI_OPT_WSCALE if remote.wscale is not None and node.wscale is not None else 0)
    return LegOptions(bits, remote.wscale or 0, node.wscale or 0, 1448)


class Oracle:
    """The node's true position at a cut of the two-direction capture."""

    def __init__(self, cut: int):
        tracker = TcpTracker([445])
        streams: dict[tuple, bytearray] = {}
        self.times = []
        for ts, seg in SEGMENTS[:cut]:
            for ev in tracker.feed(seg, ts):
                if isinstance(ev, Data):
                    streams.setdefault((ev.key, ev.from_client), bytearray()).extend(ev.data)
        self.c, self.b = c, b = _legs(tracker)
        self.ok = (c is not None and c.handshake and b.handshake and c.client.fin_seq is None and b.server.fin_seq is None
                   and c.client.last_ack is not None and b.server.last_ack is not None)
        if not self.ok:
            return
        client_bytes = bytes(streams.get((c.key, True), b""))
        server_bytes = bytes(streams.get((b.key, False), b""))
        self.client_bytes, self.server_bytes = client_bytes, server_bytes
        # the client leg: A's ISN from its own SYN-ACK (seen here, never by the standby)
        self.client_acked = (c.client.last_ack - (c.server.isn + 1)) & 0xFFFFFFFF
        self.server_acked = (b.server.last_ack - (b.client.isn + 1)) & 0xFFFFFFFF
        self.to_client = server_bytes[self.client_acked:]
        self.to_server = client_bytes[self.server_acked:]
        self.pairing = Pairing((c.key.client_ip, c.key.client_port), c.key.server_port, b.key.client_port,
                               (b.key.server_ip, b.key.server_port), _options(c.client, c.server),
                               _options(b.server, b.client))


def standby_verdict(frames: list[tuple[float, TcpSegment]], pairing: Pairing, now: float):
    tracker = TcpTracker([445])
    book = ContinuationBook(NODE, [tracker], cap=1 << 20)
    book.set_pairings([pairing.to_wire()])
    for ts, seg in frames:
        book.feed([(ev.key, ev) for ev in tracker.feed(seg, ts)])
    verdicts = book.plan(now)
    assert len(verdicts) <= 1
    return (verdicts[0] if verdicts else None), book


def to_node(cut: int) -> list[tuple[float, TcpSegment]]:
    return [(ts, s) for ts, s in SEGMENTS[:cut] if s.dst == NODE]


CUTS = [i for i in range(1, len(SEGMENTS) + 1) if Oracle(i).ok]


def check_exact(v, o: Oracle) -> None:
    assert v.reason is None, v.reason
    cs, bs = v.states
    c, b = o.c, o.b
    assert (cs.local_address, cs.local_port, cs.remote_address, cs.remote_port) == \
        (NODE, 445, c.key.client_ip, c.key.client_port)
    assert (bs.local_address, bs.local_port, bs.remote_address, bs.remote_port) == \
        (NODE, b.key.client_port, b.key.server_ip, b.key.server_port)
    assert cs.recv_seq == c.client.next_seq and bs.recv_seq == b.server.next_seq
    assert cs.send_seq == c.client.last_ack and bs.send_seq == b.server.last_ack
    assert cs.send_queue == o.to_client and bs.send_queue == o.to_server
    assert cs.send_unsent == len(cs.send_queue) and cs.recv_queue == bs.recv_queue == b""
    assert (cs.mss, cs.snd_wscale, cs.rcv_wscale) == (c.client.mss, c.client.wscale, c.server.wscale)
    assert (bs.mss, bs.snd_wscale, bs.rcv_wscale) == (b.server.mss, b.server.wscale, b.client.wscale)
    assert cs.sack_permitted and cs.timestamps and bs.sack_permitted and bs.timestamps
    # the restored clock is never behind what the node sent last (PAWS at the remote)
    assert ((cs.tsval - c.server.last_tsval) & 0xFFFFFFFF) < 1 << 31
    assert ((bs.tsval - b.server.last_tsval if False else bs.tsval - b.client.last_tsval) & 0xFFFFFFFF) < 1 << 31


def check_safe(v, o: Oracle) -> None:
    """Continuable from a lossy capture: the receive sides exact, the send queues end where the remote's
    stream ends and agree with it byte for byte; a queue may start earlier than the oracle's (a lost
    pure ACK: the remote gets bytes it has again, and drops them)."""
    assert v.reason is None
    cs, bs = v.states
    c, b = o.c, o.b
    assert cs.recv_seq == c.client.next_seq and bs.recv_seq == b.server.next_seq
    for state, stream, node_isn, oracle_queue in ((cs, o.server_bytes, c.server.isn, o.to_client),
                                                  (bs, o.client_bytes, b.client.isn, o.to_server)):
        offset = (state.send_seq - (node_isn + 1)) & 0xFFFFFFFF
        assert stream[offset:] == state.send_queue
        assert state.send_queue.endswith(oracle_queue)


def test_the_fixture_has_cuts_with_bytes_in_flight_both_ways():
    flights = [(len(Oracle(i).to_server), len(Oracle(i).to_client)) for i in CUTS]
    assert len(CUTS) > 100
    assert any(s for s, _ in flights) and any(c for _, c in flights)


@pytest.mark.parametrize("cut", CUTS[::7])
def test_frames_to_the_node_alone_give_the_oracles_state(cut):
    o = Oracle(cut)
    frames = to_node(cut)
    v, book = standby_verdict(frames, o.pairing, frames[-1][0] + 0.1)
    check_exact(v, o)
    assert book.memory() <= len(o.to_server) + len(o.to_client) + 2 * book.trim_above


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(CUTS), st.randoms(use_true_random=False))
def test_reordered_and_duplicated_frames_give_the_same_state(cut, rnd):
    o = Oracle(cut)
    frames = to_node(cut)
    # reordering within small windows of segments in flight together, after the handshakes (a handshake
    # ACK cannot overtake its SYN: it answers the SYN-ACK)
    first_data = next((i for i, (_, s) in enumerate(frames) if s.payload), len(frames))
    shuffled = frames[:first_data]
    for i in range(first_data, len(frames), 4):
        window = frames[i:i + 4]
        rnd.shuffle(window)
        shuffled += window
    dups = [f for f in shuffled for _ in range(2 if rnd.random() < 0.2 else 1)]
    v, _ = standby_verdict(dups, o.pairing, frames[-1][0] + 0.1)
    check_exact(v, o)


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(CUTS), st.randoms(use_true_random=False), st.floats(0.02, 0.5))
def test_lost_frames_never_give_a_wrong_state(cut, rnd, loss):
    """Frames lost at the standby; after the death the remotes retransmit what the node had not
    acknowledged (here: those frames again). Continuable or not, never a wrong state.

    Except one case, kept out here and named in the README's known limits: when the standby lost a
    remote's bytes that the node had acknowledged and *no later frame* of that remote arrived (every
    later frame carries a sequence number that reveals the hole), nothing in the capture shows the loss.
    So each remote's last frame before the death is never lost here."""
    o = Oracle(cut)
    frames = to_node(cut)
    last = {}
    for i, (_, s) in enumerate(frames):
        last[(s.src, s.sport)] = i
    kept = [f for i, f in enumerate(frames) if i in last.values() or rnd.random() >= loss]
    c, b = o.c, o.b
    node_acks = {True: c.server.last_ack, False: b.client.last_ack}  # what the node acknowledged per leg
    resent = []
    for ts, s in frames:
        if s.payload:
            client_leg = s.dst == NODE and s.dport == 445
            end = (s.seq + len(s.payload)) & 0xFFFFFFFF
            ack = node_acks[client_leg]
            if ack is None or ((end - ack) & 0xFFFFFFFF) < 1 << 31 and end != ack:
                resent.append((frames[-1][0] + 0.05, s))
    v, _ = standby_verdict(kept + resent, o.pairing, frames[-1][0] + 0.1)
    if v is not None and v.reason is None:
        check_safe(v, o)


def test_mid_stream_pickup_is_not_continuable_and_says_why():
    cut = CUTS[len(CUTS) // 2]
    o = Oracle(cut)
    frames = to_node(cut)
    late = [f for f in frames if not f[1].syn and f[1].flags & 0x10][20:]  # came in after the handshakes
    v, _ = standby_verdict(late, o.pairing, frames[-1][0] + 0.1)
    assert v.reason is not None and "mid-stream" in v.reason


def test_without_the_peers_pairing_nothing_is_continuable():
    cut = CUTS[-1]
    frames = to_node(cut)
    tracker = TcpTracker([445])
    book = ContinuationBook(NODE, [tracker])
    for ts, seg in frames:
        book.feed([(ev.key, ev) for ev in tracker.feed(seg, ts)])
    [v] = book.plan(frames[-1][0])
    assert v.states is None and "did not say" in v.reason
    summary = book.summary(frames[-1][0])
    assert summary["continuable"] == 0 and summary["connections"] == 1


def test_over_the_cap_is_not_continuable():
    cut = max(CUTS, key=lambda i: len(Oracle(i).to_server) + len(Oracle(i).to_client))
    o = Oracle(cut)
    frames = to_node(cut)
    tracker = TcpTracker([445])
    need = max(len(o.to_server), len(o.to_client))
    book = ContinuationBook(NODE, [tracker], cap=need - 1)
    book.set_pairings([o.pairing.to_wire()])
    for ts, seg in frames:
        book.feed([(ev.key, ev) for ev in tracker.feed(seg, ts)])
    [v] = book.plan(frames[-1][0])
    assert v.states is None and "over the cap" in v.reason


def anchored(o: Oracle, n: int, m: int, shift: int = 0) -> Pairing:
    """The oracle's pairing with an anchor at client byte ``n`` and server byte ``m`` (any offsets
    meet the same way: the relay sends byte ``n`` of one leg as byte ``n`` of the other); ``shift``
    makes it wrong."""
    c, b = o.c, o.b
    anchor = ((c.client.isn + 1 + n) & 0xFFFFFFFF, (b.client.isn + 1 + n + shift) & 0xFFFFFFFF,
              (b.server.isn + 1 + m) & 0xFFFFFFFF, (c.server.isn + 1 + m) & 0xFFFFFFFF)
    return replace(o.pairing, anchor=anchor)


def test_mid_stream_pickup_with_the_peers_anchor_is_exact_or_says_what_it_lacks():
    """A connection the peer restored (a takeover's continuation, a live move in) has no handshake the
    standby could see: with the anchor the peer sends along (proxy.continuation.relay_anchor) the legs
    meet anyway. Exact wherever the bytes still owed were sent after the pickup; otherwise not
    continuable, saying the bytes were not kept. Never a wrong state."""
    exact = 0
    for cut in CUTS[::5]:
        o = Oracle(cut)
        frames = to_node(cut)
        late = [f for f in frames if not f[1].syn and f[1].flags & 0x10][20:]  # came in after the handshakes
        if not late:
            continue
        pairing = anchored(o, min(len(o.client_bytes), 300), min(len(o.server_bytes), 200))
        v, _ = standby_verdict(late, pairing, frames[-1][0] + 0.1)
        if v is None:
            continue
        if v.reason is None:
            check_exact(v, o)
            exact += 1
        else:
            assert "not kept" in v.reason or "acknowledged nothing" in v.reason, v.reason
    assert exact >= 3


def test_a_pairing_without_options_relays_the_replies_but_continues_nothing():
    """A connection that ended before the peer read its options (a MOUNT call lasts a millisecond) is
    still paired, so the standby decodes its replies from the backend leg; it cannot be continued."""
    cut = CUTS[-1]
    o = Oracle(cut)
    frames = to_node(cut)
    pairing = replace(o.pairing, client_options=None, backend_options=None)
    assert Pairing.from_wire(pairing.to_wire()) == pairing
    tracker = TcpTracker([445])
    book = ContinuationBook(NODE, [tracker], cap=1 << 20)
    book.set_pairings([pairing.to_wire()])
    relayed = bytearray()
    for ts, seg in frames:  # as the observer does: the relay after every frame
        book.feed([(ev.key, ev) for ev in tracker.feed(seg, ts)])
        for key, data in book.relay_server_bytes():
            assert key == o.c.key
            relayed += data
    assert relayed == o.server_bytes
    [v] = book.plan(frames[-1][0] + 0.1)
    assert v.states is None and "could not read its options" in v.reason


def test_server_bytes_wait_for_a_client_leg_captured_after_them():
    """The client leg and the backend leg are captured in different rings: the pairing and the server's
    whole reply (a MOUNT call's connection is over in a millisecond) may be in before the client leg is
    seen at all. The reply is handed on once it is, not dropped (it was: the export's root handle never
    decoded, every path of b's NFS view unknown, the views never in sync: 2 of 8 runs of the lab test
    on a fast machine)."""
    cut = CUTS[-1]
    o = Oracle(cut)
    frames = to_node(cut)
    client_tracker, backend_tracker = TcpTracker([445]), TcpTracker([445])
    book = ContinuationBook(NODE, [client_tracker, backend_tracker], cap=1 << 20)
    book.set_pairings([o.pairing.to_wire()])
    relayed = bytearray()

    def feed(tracker: TcpTracker, ts: float, seg: TcpSegment) -> None:
        book.feed([(ev.key, ev) for ev in tracker.feed(seg, ts)])
        for key, data in book.relay_server_bytes():
            assert key == o.c.key
            relayed.extend(data)

    for ts, seg in frames:
        if seg.dport != 445:  # the server's frames to the node's backend leg, all of them first
            feed(backend_tracker, ts, seg)
    assert relayed == b""
    for ts, seg in frames:
        if seg.dport == 445:
            feed(client_tracker, ts, seg)
    assert bytes(relayed) == o.server_bytes and o.server_bytes


def test_the_handshakes_seen_win_over_an_anchor():
    """Both handshakes seen: the ISNs relate the legs, a (here wrong) anchor is not used."""
    cut = CUTS[len(CUTS) // 2]
    o = Oracle(cut)
    frames = to_node(cut)
    v, _ = standby_verdict(frames, anchored(o, 0, 0, shift=7), frames[-1][0] + 0.1)
    check_exact(v, o)


def test_relay_anchor_meets_the_legs_past_their_queues():
    """The client's unread bytes go to the server after the backend leg's whole send queue (spilled
    bytes included), and the other way round; sequence numbers wrap."""
    from proxy.continuation import relay_anchor
    from proxy.tcprepair import TcpSocketState

    def leg(send_seq, send_queue, recv_seq, recv_queue, port):
        return TcpSocketState("10.0.0.1", port, "10.0.0.9", 4000, send_seq, recv_seq, send_queue, 0, recv_queue,
                              1448, 7, 7, True, True, 1, None)
    client = leg(0xFFFF_FFF0, b"s" * 40, 1000, b"c" * 5, 445)
    backend = leg(7000, b"x" * 30, 0xFFFF_FFFE, b"", 50000)
    assert relay_anchor(client, backend) == (1000, 7030, 0xFFFF_FFFE, (0xFFFF_FFF0 + 40) & 0xFFFF_FFFF)


# ---------------------------------------------------------------------------------- wire forms
def test_pairing_wire_round_trip_and_bad_input():
    p = Pairing(("10.0.0.100", 40000), 445, 50000, ("10.0.2.10", 445), LegOptions(7, 7, 9, 1448),
                LegOptions(7, 10, 7, 1448))
    assert Pairing.from_wire(p.to_wire()) == p
    with_anchor = replace(p, anchor=(1, 2, 3, 0xFFFF_FFFF))
    assert len(with_anchor.to_wire()) == 9 and Pairing.from_wire(with_anchor.to_wire()) == with_anchor
    for bad_anchor in ([1, 2, 3], [1, 2, 3, -1], [1, 2, 3, 1 << 32], "1234", [1, 2, 3, 4.0]):
        with pytest.raises(ValueError, match="anchor"):
            Pairing.from_wire(p.to_wire() + [bad_anchor])
    for bad in (None, [1] * 8, p.to_wire()[:7], p.to_wire()[:6] + [[1, 2, 3], [7, 1, 1, 1]],
                p.to_wire()[:1] + [70000] + p.to_wire()[2:], p.to_wire()[:6] + [[7, 15, 7, 1], [7, 7, 7, 1]]):
        with pytest.raises(ValueError):
            Pairing.from_wire(bad)
    book = ContinuationBook("10.0.0.1", [])
    assert book.set_pairings([[1, 2]], [["x"]]) and book.pairings == {}


def test_outbox_sends_deltas_in_bounded_batches_and_everything_after_a_resync():
    def pairing(port: int) -> Pairing:
        return Pairing(("10.0.0.100", port), 445, port, ("10.0.2.10", 445), LegOptions(7, 7, 7, 1448),
                       LegOptions(7, 7, 7, 1448))

    box = PairingOutbox(batch=3)
    first = box.update([pairing(p) for p in range(1000, 1007)])
    assert [len(b["add"]) for b in first] == [3, 3, 1] and first[0].get("reset") and not first[1].get("reset")
    assert box.update([pairing(p) for p in range(1000, 1007)]) == []
    delta = box.update([pairing(p) for p in range(1001, 1008)])
    assert delta == [{"add": [pairing(1007).to_wire()], "remove": [["10.0.0.100", 1000, 445]]}]
    box.resync()
    again = box.update([pairing(p) for p in range(1001, 1008)])
    assert again[0]["reset"] and sum(len(b["add"]) for b in again) == 7
    book = ContinuationBook("10.0.0.1", [])
    for body in first + delta:
        book.set_pairings(body["add"], body["remove"], bool(body.get("reset")))
    assert sorted(k.client_port for k in book.pairings) == list(range(1001, 1008))


def _apply(book: dict, body: dict) -> None:
    """What ContinuationBook.set_pairings does with a message, on a dict: reset, removals, additions."""
    if body.get("reset"):
        book.clear()
    for item in body.get("remove") or ():
        book.pop((item[0], item[1], item[2]), None)
    for item in body.get("add") or ():
        book[(item[0], item[1], item[2])] = item


def test_the_inbox_merged_leaves_the_book_as_the_messages_one_by_one():
    import random

    rng = random.Random(7)
    for _ in range(300):
        one_by_one, merged, box = {}, {}, PairingInbox()
        for _ in range(rng.randint(1, 12)):
            ports = [rng.randint(1, 8) for _ in range(rng.randint(0, 5))]
            body = {"add": [["10.0.0.9", p, 445, rng.randint(1, 9)] for p in ports[: len(ports) // 2]],
                    "remove": [["10.0.0.9", p, 445] for p in ports[len(ports) // 2:]]}
            if rng.random() < 0.1:
                body["reset"] = True
            _apply(one_by_one, body)
            box.take(body)
            if rng.random() < 0.3:               # given to the observer now and then
                drained = box.drain()
                if drained is not None and rng.random() < 0.5:
                    box.put_back(drained)        # ... which did not take it
                elif drained is not None:
                    _apply(merged, drained)
        _apply(merged, box.drain() or {})
        assert merged == one_by_one
        assert len(box) == 0 and box.drain() is None


def test_the_inbox_is_bounded_by_the_peers_connections_not_by_its_messages():
    box = PairingInbox(limit=100)
    for i in range(10_000):                      # the same 50 connections told again and again
        box.take({"add": [["10.0.0.9", 1000 + i % 50, 445, i]], "remove": []})
    assert len(box) == 50 and box.dropped == 0
    for i in range(200):
        box.take({"add": [], "remove": [["10.0.0.9", 5000 + i, 445]]})
    assert len(box) == 100 and box.dropped == 150   # past the bound: dropped and counted (a resync restores)
    body = box.drain()
    assert [a[3] for a in body["add"]][:3] == [9950, 9951, 9952]   # the last word per connection


def test_outbox_tells_new_pairings_at_once_and_the_next_full_pass_sends_them_no_more():
    def pairing(port: int) -> Pairing:
        return Pairing(("10.0.0.100", port), 445, port, ("10.0.2.10", 445), LegOptions(7, 7, 7, 1448),
                       LegOptions(7, 7, 7, 1448))

    box = PairingOutbox(batch=2)
    assert box.add([pairing(999)]) == []  # before the first full pass (reset): that pass tells everything
    first = box.update([pairing(999), pairing(1000)])
    assert first[0]["reset"] and sum(len(b["add"]) for b in first) == 2
    fresh = box.add([pairing(p) for p in (1000, 1001, 1002, 1003)])  # 1000 was sent already
    assert fresh == [{"add": [pairing(1001).to_wire(), pairing(1002).to_wire()], "remove": []},
                     {"add": [pairing(1003).to_wire()], "remove": []}]
    # the full pass: 999 ended, 1004 new; nothing added at once is sent twice
    delta = box.update([pairing(p) for p in (1000, 1001, 1002, 1003, 1004)])
    assert delta == [{"add": [pairing(1004).to_wire()], "remove": [["10.0.0.100", 999, 445]]}]
    book = ContinuationBook("10.0.0.1", [])
    for body in first + fresh + delta:
        book.set_pairings(body["add"], body["remove"], bool(body.get("reset")))
    assert sorted(k.client_port for k in book.pairings) == [1000, 1001, 1002, 1003, 1004]


# ------------------------------------------------------------------------------ the takeover's use
def test_continued_connections_are_not_reset_and_the_others_are():
    from proxy.status import Takeover
    from proxy.takeover import TakeoverPlan, _not_continued, _restore_quiet

    plan = TakeoverPlan(
        clients_to_reset=[{"client": "10.0.0.100:1000"}, {"client": "10.0.0.100:1001"}],
        backends_to_reset=[{"client": "10.0.0.1:700", "server": "10.0.2.10:445"},
                           {"client": "10.0.0.1:701", "server": "10.0.2.10:445"}],
        continuations=[{"client": "10.0.0.100:1000", "reason": None, "source_port": 700, "backend": "10.0.2.10:445"},
                       {"client": "10.0.0.100:1001", "reason": "picked up mid-stream", "source_port": 701,
                        "backend": "10.0.2.10:445"}])
    takeover = Takeover("10.0.0.1", None, 0.0, 0.0)
    # a continuable entry whose states do not parse is reported, not continued (and nothing is restored)
    assert _restore_quiet(plan.continuations, takeover) == []
    assert [(r["client"], r["continued"]) for r in takeover.connections] == \
        [("10.0.0.100:1000", False), ("10.0.0.100:1001", False)]
    assert "restore" in takeover.connections[0]["reason"] and takeover.connections[1]["reason"] == "picked up mid-stream"
    assert _not_continued(plan, takeover) == plan  # none continued: every reset goes out
    takeover.connections[0]["continued"] = True
    rest = _not_continued(plan, takeover)
    assert rest.clients_to_reset == [{"client": "10.0.0.100:1001"}]
    assert rest.backends_to_reset == [{"client": "10.0.0.1:701", "server": "10.0.2.10:445"}]


def test_frames_to_the_node_alone_decode_the_same_sessions_as_both_directions():
    """The client leg's replies are the backend leg's server bytes (relayed unchanged): decoded as the
    client leg's server side, the standby's tables equal those of a two-direction capture."""
    from protocols.pipeline import Pipeline

    def tables(pipeline):
        return [(c["client"], c["sessions"], c["opens"]) for c in pipeline.snapshot()["connections"]
                if c["server"].startswith(NODE + ":")]

    cut = CUTS[len(CUTS) // 2]  # the file open (the loop logs off before the end)
    o = Oracle(cut)
    full = Pipeline(smb_ports=[445], nfs_ports=[])
    for ts, seg in SEGMENTS[:cut]:
        full.feed_segment(seg, ts)
    assert tables(full)[0][1], "the capture has a session"
    one_way = Pipeline(smb_ports=[445], nfs_ports=[])
    book = ContinuationBook(NODE, [one_way.tcp])
    for i, (ts, seg) in enumerate(to_node(cut)):
        book.feed(one_way.feed_segment(seg, ts))
        if i == 10:  # the pairing arrives a little after the connection started
            book.set_pairings([o.pairing.to_wire()])
        for key, data in book.relay_server_bytes():
            one_way.feed_relayed(key, False, data)
    assert tables(one_way) == tables(full)


def test_the_buffer_bound_is_configurable_and_bad_values_name_the_key():
    from proxy.config import ConfigError, parse_config

    doc = {"node": {"name": "b", "interface": "eth0", "address": "10.0.0.2/24", "state_dir": "/tmp/s",
                    "control": "/tmp/s/c.sock"},
           "service": [{"name": "smb", "protocol": "smb", "port": 445, "backend": "10.0.2.10:445"}],
           "peer": {"name": "a", "address": "10.0.0.1", "link": "10.1.0.1:7400", "listen": "10.1.0.2:7400",
                    "key_file": "/etc/pairproxy/pair.key"},
           "pair": {"mode": "stateful"}}
    assert parse_config(doc).pair.continue_buffer == 4 << 20
    doc["pair"]["continue_buffer"] = "256KiB"
    assert parse_config(doc).pair.continue_buffer == 256 << 10
    for bad in ("4MB", -1, True, 2 << 30):
        doc["pair"]["continue_buffer"] = bad
        with pytest.raises(ConfigError) as err:
            parse_config(doc)
        assert err.value.problems[0].startswith("pair.continue_buffer: ")


def _copy(seg: TcpSegment, shift: int) -> TcpSegment:
    """``seg`` of another proxied connection: the client's port and the node's backend port moved by ``shift``."""
    sport = seg.sport + shift if seg.sport in (50768, 51806) else seg.sport
    dport = seg.dport + shift if seg.dport in (50768, 51806) else seg.dport
    return TcpSegment(seg.src, seg.dst, sport, dport, seg.seq, seg.ack, seg.flags, seg.window, seg.options, seg.payload)


def test_busiest_first_and_the_rest_as_the_legs_stood_at_the_first_request():
    """Behaviour 7: a takeover asks for the busiest few first (restored before its address comes up) and
    for the rest afterwards; the rest are the legs as they stood at the first request, even when the views
    forget the dead peer's connections in between (as they do right after a takeover's first request)."""
    cut = CUTS[-1]
    oracle = Oracle(cut)
    frames = to_node(cut)
    tracker = TcpTracker([445])
    book = ContinuationBook(NODE, [tracker], cap=1 << 20)
    n, busy = 40, 17
    for i in [*range(busy), *range(busy + 1, n), busy]:  # the busy one's server sent bytes last
        p = oracle.pairing
        book.set_pairings([Pairing((p.client[0], p.client[1] + 2 * i), p.service_port, p.source_port + 2 * i,
                                   p.server, p.client_options, p.backend_options).to_wire()])
        late = 5.0 if i == busy else 0.0  # this one was active last
        for ts, seg in frames:
            book.feed([(ev.key, ev) for ev in tracker.feed(_copy(seg, 2 * i), ts + late)])
    now = frames[-1][0] + 6.0
    everything = {v.client: v for v in book.plan(now)}
    first = book.plan(now, first=3)
    assert len(first) == 3 and book.rest_waiting == n - 3
    assert first[0].client == f"{oracle.pairing.client[0]}:{oracle.pairing.client[1] + 2 * busy}"
    # the views forget the dead peer's connections (even were the book told, its tails would go)
    book.feed([(ev.key, ev) for ev in tracker.forget(list(tracker.connections), gone=False)])
    assert book.client_legs() == []
    rest = book.plan_rest(now)
    assert len(rest) == n - 3 and book.rest_waiting == 0 and book.plan_rest(now) == []
    assert {v.client for v in first + rest} == set(everything)
    for v in first + rest:
        assert v.reason is None, v.reason
        assert v.states == everything[v.client].states
        shift = v.states[0].remote_port - oracle.pairing.client[1]
        assert v.states[1].local_port == oracle.pairing.source_port + shift  # the two legs of one connection


def test_status_summary_of_many_connections_builds_no_socket_state():
    """Status asks for the summary often: with thousands of the peer's connections it must stay cheap
    (no repair state built, no bytes copied) and still count them right."""
    cut = CUTS[-1]
    oracle = Oracle(cut)
    frames = to_node(cut)
    tracker = TcpTracker([445])
    book = ContinuationBook(NODE, [tracker], cap=1 << 20)
    for i in range(20):
        p = oracle.pairing
        if i % 4:
            book.set_pairings([Pairing((p.client[0], p.client[1] + 2 * i), p.service_port, p.source_port + 2 * i,
                                       p.server, p.client_options, p.backend_options).to_wire()])
        for ts, seg in frames:
            book.feed([(ev.key, ev) for ev in tracker.feed(_copy(seg, 2 * i), ts)])
    import proxy.continuation as continuation

    built = []
    real = continuation._leg_state
    continuation._leg_state = lambda *a, **k: built.append(1) or real(*a, **k)
    try:
        summary = book.summary(frames[-1][0])
    finally:
        continuation._leg_state = real
    assert summary["connections"] == 20 and summary["continuable"] == 15 and built == []
    assert sum(summary["not_continuable"].values()) == 5


def test_leg_options_read_each_sides_window_scale_from_tcp_info():
    """The options the active node sends for each leg (TCP_INFO of its own sockets): the remote's window
    scale and its own are different numbers. A client with a tiny receive buffer announces scale 0; the
    accepting side keeps its own (pyroute2's sock_diag decoder gave the remote's scale for both)."""
    import socket

    from proxy.standby import leg_options

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: its SYN says scale 0
        client.connect(listener.getsockname())
        server, _ = listener.accept()
        with client, server:
            theirs, ours = leg_options(server), leg_options(client)
            assert theirs.wscale and theirs.timestamps and theirs.sack
            assert theirs.snd_wscale == 0 and theirs.rcv_wscale > 0
            assert ours.snd_wscale == theirs.rcv_wscale and ours.rcv_wscale == 0
            assert theirs.snd_mss > 0
        assert leg_options(client) is None  # closed: nothing to say


def test_a_sweep_keeps_only_the_bytes_not_yet_acknowledged():
    """Behaviour 6: per connection only what the other side has not acknowledged. ``feed`` trims a tail
    once it holds 16 KiB; below that an idle connection kept everything it had exchanged (the sessions'
    setup: kilobytes per connection, for good); the observer's sweep brings every tail to its need."""
    for cut in (CUTS[len(CUTS) // 3], CUTS[-1]):
        o = Oracle(cut)
        v, book = standby_verdict(to_node(cut), o.pairing, SEGMENTS[cut - 1][0])
        need = len(o.to_server) + len(o.to_client)
        assert book.memory() > need  # what a connection's first exchanges left
        assert book.sweep() == need == book.memory()
        assert v.reason is None and book.verdict(o.pairing.client_key(NODE), SEGMENTS[cut - 1][0]).states == v.states


def _fresh_book(frames, *, sample: bool = True):
    tracker = TcpTracker([445])
    book = ContinuationBook(NODE, [tracker], cap=1 << 20)
    if sample:  # another connection's pairing: the peer's own options (its window scale) come from it
        other = Pairing(("10.77.0.200", 40000), 445, 50000, ("10.77.0.10", 445),
                        LegOptions(TCPI_OPT_TIMESTAMPS | TCPI_OPT_SACK | TCPI_OPT_WSCALE, 7, 9, 1448), None)
        book.set_pairings([other.to_wire()])
    for ts, seg in frames:
        book.feed([(ev.key, ev) for ev in tracker.feed(seg, ts)])
    client_key = next(k for k in tracker.connections if k.server_ip == NODE)
    return book, tracker, client_key


def test_a_client_leg_the_peer_never_paired_nor_relayed_is_continued_fresh():
    """A connection in the peer's accept queue at its death (handshake done, request sent, the process
    never got to it): the client leg comes back with every byte the client sent unread, no backend leg
    (the standby connects one anew). bench/soak.py: such libnfs connections were reset."""
    frames = to_node(len(SEGMENTS))
    client_frames = [(ts, s) for ts, s in frames if s.dport == 445]
    backend_at = next(i for i, (ts, s) in enumerate(frames) if s.sport == 445)  # the server's SYN-ACK
    # the client's frames up to the first that acknowledges a byte of the node (only the handshake's ACK so far)
    isn = client_frames[0][1].seq
    first_ack = next(s.ack for _, s in client_frames if s.flags & 0x10)
    quiet = [f for f in client_frames if f[1].ack in (0, first_ack)]
    assert any(s.payload for _, s in quiet), "the fixture's client sends its request before any answer"
    book, tracker, key = _fresh_book(quiet)
    v, = book.plan(quiet[-1][0] + 0.01)
    sent = b"".join(s.payload for _, s in quiet)
    assert v.reason is None and v.fresh and v.pairing is None and v.pending_to_server == len(sent)
    cs, bs = v.states
    assert bs is None
    assert (cs.local_address, cs.local_port, cs.remote_address, cs.remote_port) == \
        (NODE, 445, key.client_ip, key.client_port)
    assert cs.recv_seq == (isn + 1) & 0xFFFFFFFF and cs.recv_queue == sent and cs.send_seq == first_ack
    assert cs.send_queue == b"" and cs.rcv_wscale == 9      # the peer's own scale, from its other pairing
    wire = v.to_wire()
    assert wire["fresh"] is True and "backend_state" not in wire and "client_state" in wire
    # without any pairing to learn the peer's options from: the reset, as before
    book, _, _ = _fresh_book(quiet, sample=False)
    v, = book.plan(quiet[-1][0] + 0.01)
    assert not v.fresh and "no pairing to learn" in v.reason
    # the peer had answered the client: it relayed, so no fresh start
    answered = client_frames[:len(quiet) + 1]
    assert answered[-1][1].ack != first_ack
    book, _, _ = _fresh_book(answered)
    v, = book.plan(answered[-1][0] + 0.01)
    assert not v.fresh and "sent the client bytes" in v.reason


def test_a_client_leg_whose_bytes_an_unpaired_backend_leg_may_carry_is_not_continued_fresh():
    """The peer opened a backend leg after the client leg and its server acknowledged bytes on it (the
    request went on, perhaps executed): replaying it on a new backend connection could run it twice."""
    frames = to_node(len(SEGMENTS))
    first_ack = next(s.ack for _, s in frames if s.dport == 445 and s.flags & 0x10)
    upto = []
    for ts, s in frames:
        if s.dport == 445 and s.ack not in (0, first_ack):
            break                                           # the client's view: nothing from the node yet
        upto.append((ts, s))
    book, tracker, key = _fresh_book(upto)
    backend = next(c for k, c in tracker.connections.items() if k.client_ip == NODE)
    carried = backend.server.last_ack != backend.server.first_ack
    assert carried, "the premise: the server acknowledged the node's bytes before the node answered the client"
    v, = book.plan(upto[-1][0] + 0.01)
    assert not v.fresh and "carried bytes since" in v.reason, v.reason
    # a backend leg the peer paired with another client, also after that pairing was removed (the
    # connection ended at the peer, its leg lingering in the views), carries that client's bytes
    backend_key = next(k for k in tracker.connections if k.client_ip == NODE)
    # (its anchor names the instance: the server's ISN + 1; without one, see the reused-port test)
    other = Pairing(("10.77.0.201", 40001), 445, backend_key.client_port, (backend_key.server_ip, backend_key.server_port),
                    None, None, (0, 0, (backend.server.isn + 1) & 0xFFFFFFFF, 0))
    tracker2 = TcpTracker([445])
    book = ContinuationBook(NODE, [tracker2], cap=1 << 20)
    sample = Pairing(("10.77.0.200", 40000), 445, 50000, ("10.77.0.10", 445),
                     LegOptions(TCPI_OPT_TIMESTAMPS | TCPI_OPT_SACK | TCPI_OPT_WSCALE, 7, 9, 1448), None)
    book.set_pairings([sample.to_wire(), other.to_wire()])
    book.set_pairings(remove=[["10.77.0.201", 40001, 445]])
    for ts, seg in upto:
        book.feed([(ev.key, ev) for ev in tracker2.feed(seg, ts)])
    v, = book.plan(upto[-1][0] + 0.01)
    assert v.fresh, v.reason
    # a backend leg its server closed is over (the peer's own FIN is never seen on a switch): it lingers
    # in the views, and once blocked every younger client leg
    last = [s for _, s in upto if s.sport == 445][-1]
    fin = TcpSegment(last.src, last.dst, last.sport, last.dport, last.seq + len(last.payload), last.ack,
                     0x11, last.window, last.options, b"")
    book, _, _ = _fresh_book(upto + [(upto[-1][0] + 0.001, fin)])
    v, = book.plan(upto[-1][0] + 0.01)
    assert v.fresh, v.reason
    # the same frames without the backend leg's: nothing says the peer relayed it
    book, _, _ = _fresh_book([(ts, s) for ts, s in upto if s.dport == 445])
    v, = book.plan(upto[-1][0] + 0.01)
    assert v.fresh, v.reason


def test_a_client_leg_whose_syn_this_node_answered_at_the_takeover_is_not_continued_fresh():
    """At a takeover the rest of the legs is judged after the address is up, from the legs as they go on
    changing. A client whose SYN came during the outage completes its handshake with the new holder's
    own kernel (proxy.synlog): restoring it too failed (EADDRNOTAVAIL) and reset it. A leg whose
    handshake with the peer is only processed after the takeover began (the observer lags under load)
    is the peer's, and is continued."""
    frames = to_node(len(SEGMENTS))
    client_frames = [(ts, s) for ts, s in frames if s.dport == 445]
    first_ack = next(s.ack for _, s in client_frames if s.flags & 0x10)
    quiet = [f for f in client_frames if f[1].ack in (0, first_ack)]
    for answered in (True, False):
        book, tracker, key = _fresh_book(quiet[:1])           # the SYN only, when the takeover begins
        assert book.plan(quiet[0][0] + 0.01, first=0) == []
        if answered:
            book.answered_here([(key.client_ip, key.client_port, key.server_port)])
        for ts, seg in quiet[1:]:                             # the handshake is seen after it
            book.feed([(ev.key, ev) for ev in tracker.feed(seg, ts)])
        rest = book.plan_rest(quiet[-1][0] + 0.01)
        if answered:  # this node's own connection: not the peer's, neither continued nor reset
            assert rest == [] and key not in book.client_legs()
            v = book.verdict(key, quiet[-1][0] + 0.01)  # (asked for by name, it still says why not)
            assert not v.fresh and v.states is None and "answered by this node" in v.reason
        else:
            v, = rest
            assert v.fresh and v.reason is None and v.states[1] is None


def test_a_syn_alone_is_no_connection_of_the_peers():
    """A client whose SYN the peer never answered (it died first) has no connection of the peer's to
    continue or reset: the takeover and status do not list it (the soak listed about 18 per takeover as
    "reset: the peer did not say which backend leg it pairs with"); once its handshake completes (with
    whoever answered), it is judged as any other."""
    frames = [(ts, s) for ts, s in to_node(len(SEGMENTS)) if s.dport == 445]
    book, tracker, key = _fresh_book(frames[:1])
    now = frames[0][0] + 0.01
    assert book.plan(now) == [] and book.client_legs() == []
    assert book.summary(now)["connections"] == 0
    for ts, seg in frames[1:2]:
        book.feed([(ev.key, ev) for ev in tracker.feed(seg, ts)])
    assert book.client_legs() == [key] and len(book.plan(frames[1][0] + 0.01)) == 1


def _sample_for(o: "Oracle") -> Pairing:
    """Another connection's pairing with the oracle's options: the peer's own window scales come from it."""
    return replace(o.pairing, client=("10.77.0.200", 40000), source_port=50000)


def test_a_pairing_that_never_arrived_is_inferred_from_the_frames_and_gives_the_oracles_state():
    """The peer's pairing of a connection did not reach the standby (the hold ran out on a busy node,
    the message died with the link) after it relayed the client's request: bench/soak.py reset such a
    libnfs connection at 13 of 200 takeovers. The frames to the peer name its backend leg (the only
    unpaired one whose server acknowledged bytes, opened after the client leg, to the port's server),
    and the state is the one the peer's own pairing gives, at every cut of the capture where the server
    had acknowledged bytes of the relay."""
    inferred = 0
    for cut in CUTS:
        o = Oracle(cut)
        if o.server_acked == 0:
            continue
        tracker = TcpTracker([445])
        book = ContinuationBook(NODE, [tracker], cap=1 << 20)
        book.set_pairings([_sample_for(o).to_wire()])
        for ts, seg in to_node(cut):
            book.feed([(ev.key, ev) for ev in tracker.feed(seg, ts)])
        v, = book.plan(SEGMENTS[cut - 1][0])
        assert v.inferred and not v.fresh and v.pairing == o.pairing, (cut, v.reason, v.pairing)
        check_exact(v, o)
        assert v.to_wire()["inferred"] is True and v.to_wire()["source_port"] == o.pairing.source_port
        summary = book.summary(SEGMENTS[cut - 1][0])
        assert summary["continuable"] == summary["inferred"] == 1 and summary["pairings"] == 1
        inferred += 1
    assert inferred > 10
    # the peer's own pairing is not an inferred one
    o = Oracle(CUTS[-1])
    v, _ = standby_verdict(to_node(CUTS[-1]), o.pairing, SEGMENTS[CUTS[-1] - 1][0])
    assert v.reason is None and not v.inferred and "inferred" not in v.to_wire()


def test_a_pairing_is_not_inferred_when_another_client_leg_could_own_the_backend_leg():
    """Two unpaired client legs (the fixture's, and a copy on another port without a backend leg of its
    own), one unpaired backend leg that carried bytes: either may be the one relayed on it (an SMB
    stream names no connection), so neither is paired from the frames: both stay the reset, as before."""
    cut = CUTS[-1]
    o = Oracle(cut)
    frames = to_node(cut)
    twin = [(ts, _copy(s, 7)) for ts, s in frames if s.dport == 445]  # the client leg only
    tracker = TcpTracker([445])
    book = ContinuationBook(NODE, [tracker], cap=1 << 20)
    book.set_pairings([_sample_for(o).to_wire()])
    for ts, seg in sorted(frames + twin, key=lambda f: f[0]):
        book.feed([(ev.key, ev) for ev in tracker.feed(seg, ts)])
    verdicts = book.plan(SEGMENTS[cut - 1][0])
    assert len(verdicts) == 2
    for v in verdicts:
        assert not v.inferred and v.states is None and "did not say which backend leg" in v.reason, v.reason
    # without a pairing that shows the peer's window scale on its backend legs, nothing is inferred either
    tracker = TcpTracker([445])
    book = ContinuationBook(NODE, [tracker], cap=1 << 20)
    book.set_pairings([replace(_sample_for(o), backend_options=None).to_wire()])
    for ts, seg in frames:
        book.feed([(ev.key, ev) for ev in tracker.feed(seg, ts)])
    v, = book.plan(SEGMENTS[cut - 1][0])
    assert not v.inferred and v.states is None and "did not say which backend leg" in v.reason, v.reason


RPC_NODE_SERVER = ("10.77.0.10", 2049)
RPC_OPTIONS = TcpOptions(mss=1460, wscale=7, sack_permitted=True, tsval=100, tsecr=0)


def _rpc_record(xid: int, body: int) -> bytes:
    return (0x8000_0000 | (4 + body)).to_bytes(4, "big") + xid.to_bytes(4, "big") + bytes(body)


def _rpc_relay(t: float, client_port: int, source_port: int, call_xid: int, reply_xid: int | None,
               *, backend_after: float = 0.003, acked: int | None = None,
               isn_shift: int = 0) -> list[tuple[float, TcpSegment]]:
    """The frames to the node of one relayed RPC connection: the client's handshake and call, the
    server's SYN-ACK, its ACK of ``acked`` bytes of the call (all by default) and its reply (if any)."""
    client, server = "10.77.0.100", RPC_NODE_SERVER[0]
    cisn, nisn_c = 1000 + client_port, 7000 + client_port
    nisn_b, sisn = 9000 + source_port + isn_shift, 3000 + source_port + isn_shift
    call = _rpc_record(call_xid, 92)
    acked = len(call) if acked is None else acked
    out = [(t, TcpSegment(client, NODE, client_port, 2049, cisn, 0, SYN, 64240, RPC_OPTIONS, b"")),
           (t + 0.001, TcpSegment(client, NODE, client_port, 2049, cisn + 1, nisn_c + 1, ACK, 502,
                                  TcpOptions(tsval=101, tsecr=500), b"")),
           (t + 0.002, TcpSegment(client, NODE, client_port, 2049, cisn + 1, nisn_c + 1, ACK | PSH, 502,
                                  TcpOptions(tsval=102, tsecr=500), call)),
           (t + backend_after, TcpSegment(server, NODE, 2049, source_port, sisn, nisn_b + 1, SYN | ACK, 65160,
                                          TcpOptions(mss=1460, wscale=6, sack_permitted=True, tsval=800, tsecr=600),
                                          b"")),
           (t + backend_after + 0.001, TcpSegment(server, NODE, 2049, source_port, sisn + 1, nisn_b + 1 + acked, ACK,
                                                  509, TcpOptions(tsval=801, tsecr=601), b""))]
    if reply_xid is not None:
        out.append((t + backend_after + 0.002, TcpSegment(server, NODE, 2049, source_port, sisn + 1,
                                                          nisn_b + 1 + acked, ACK | PSH, 509,
                                                          TcpOptions(tsval=802, tsecr=601),
                                                          _rpc_record(reply_xid, 24))))
    return out


def _rpc_book(*connections: list[tuple[float, TcpSegment]], rest: bool = False):
    """Each connection's verdict by client; ``rest``: as a takeover's rest (after ``plan(first=0)``)."""
    tracker = TcpTracker([2049])
    book = ContinuationBook(NODE, [tracker], cap=1 << 20)
    every = TCPI_OPT_TIMESTAMPS | TCPI_OPT_SACK | TCPI_OPT_WSCALE
    book.set_pairings([Pairing(("10.77.0.200", 40000), 2049, 50000, RPC_NODE_SERVER, LegOptions(every, 7, 9, 1448),
                               LegOptions(every, 6, 8, 1448)).to_wire()])
    for ts, seg in sorted((f for c in connections for f in c), key=lambda f: f[0]):
        book.feed([(ev.key, ev) for ev in tracker.feed(seg, ts)])
    if rest:
        assert book.plan(10.0, first=0) == []
        return {v.client: v for v in book.plan_rest(10.0)}
    return {v.client: v for v in book.plan(10.0)}



def test_server_bytes_captured_after_a_takeovers_first_request_are_put_back():
    """Run 19 of bench/failover.py at 3edf7f3 (bench/FAILOVER.md): 12 young connections were reset at a
    takeover, each "258 bytes from the server not yet delivered, 0 kept: not kept". The server's reply
    (an SMB NEGOTIATE response) was captured after the takeover's first request, under load: the rest
    are judged from the legs as they stood then, and a leg's kept bytes that did not exist yet were
    missing there, while its sequence numbers (kept by reference) had moved on. What was captured
    since is used: the connection is continued with the reply put back."""
    every = TCPI_OPT_TIMESTAMPS | TCPI_OPT_SACK | TCPI_OPT_WSCALE
    tracker = TcpTracker([2049])
    book = ContinuationBook(NODE, [tracker], cap=1 << 20)
    book.set_pairings([Pairing(("10.77.0.100", 801), 2049, 41001, RPC_NODE_SERVER, LegOptions(every, 7, 9, 1448),
                               LegOptions(every, 6, 8, 1448)).to_wire()])
    *before, (ts, reply) = _rpc_relay(1.0, 801, 41001, 0x1111, 0x1111)
    for t, seg in before:
        book.feed([(ev.key, ev) for ev in tracker.feed(seg, t)])
    assert book.plan(10.0, first=0) == [] and book.rest_waiting == 1
    book.feed([(ev.key, ev) for ev in tracker.feed(reply, ts)])  # the capture catching up
    [v] = book.plan_rest(10.0)
    assert v.reason is None, v.reason
    assert v.pending_to_client == len(_rpc_record(0x1111, 24))
    assert v.states[0].send_queue == _rpc_record(0x1111, 24)

def test_rpc_replies_name_the_client_leg_of_each_unpaired_backend_leg():
    """Two libnfs connections relayed unpaired at the same moment, their calls the same size: the bytes
    fit either way round, the XIDs of the replies say which is which."""
    one = _rpc_relay(1.0, 801, 41001, 0x1111, 0x1111)
    two = _rpc_relay(1.0005, 802, 41002, 0x2222, 0x2222)
    verdicts = _rpc_book(one, two)
    assert _rpc_book(one, two, rest=True) == verdicts  # a takeover judges them so, after its address is up
    for client, source_port, xid in (("10.77.0.100:801", 41001, 0x1111), ("10.77.0.100:802", 41002, 0x2222)):
        v = verdicts[client]
        assert v.reason is None and v.inferred and v.pairing.source_port == source_port, (client, v.reason)
        cs, bs = v.states
        assert cs.send_queue == _rpc_record(xid, 24) and bs.send_queue == b""  # the reply the client lacks
        assert (cs.rcv_wscale, cs.snd_wscale, bs.rcv_wscale, bs.snd_wscale) == (9, 7, 8, 6)
        assert cs.timestamps and cs.sack_permitted and bs.timestamps and bs.mss == 1460
    # before any reply: nothing tells the two apart, both are reset
    verdicts = _rpc_book(_rpc_relay(1.0, 801, 41001, 0x1111, None), _rpc_relay(1.0005, 802, 41002, 0x2222, None))
    assert all(not v.inferred and "carried bytes since" in v.reason and "2 could be its own" in v.reason
               for v in verdicts.values()), [v.reason for v in verdicts.values()]
    # one of them alone needs no reply: its backend leg can only be its own
    v, = _rpc_book(_rpc_relay(1.0, 801, 41001, 0x1111, None)).values()
    assert v.reason is None and v.inferred and v.states[1].send_queue == b""
    # a reply to a call neither made pairs nothing with it; the other still pairs
    verdicts = _rpc_book(one, _rpc_relay(1.0005, 802, 41002, 0x2222, 0x3333))
    assert verdicts["10.77.0.100:801"].inferred and verdicts["10.77.0.100:801"].reason is None
    assert not verdicts["10.77.0.100:802"].inferred and verdicts["10.77.0.100:802"].reason is not None


def test_a_backend_leg_that_cannot_be_the_client_legs_is_not_paired_with_it():
    """The relay's invariant: opened after the client leg, to the port's server, the server acknowledging
    no more than the client sent. Any of these broken: no pairing from the frames."""
    ok = _rpc_relay(1.0, 801, 41001, 0x1111, 0x1111)
    assert _rpc_book(ok)["10.77.0.100:801"].inferred
    before = _rpc_relay(1.0, 801, 41001, 0x1111, 0x1111, backend_after=-0.5)
    more = _rpc_relay(1.0, 801, 41001, 0x1111, 0x1111, acked=200)
    other_server = [(ts, replace(s, src="10.77.0.11") if s.src == RPC_NODE_SERVER[0] else s) for ts, s in ok]
    late = _rpc_relay(1.0, 801, 41001, 0x1111, 0x1111, backend_after=2.5)
    for frames in (before, more, other_server, late):
        v, = _rpc_book(frames).values()
        assert not v.inferred and v.pairing is None, v.reason
        # a leg opened before the client's cannot carry its bytes (a fresh start); the others may: a reset
        assert (v.fresh and v.reason is None) if frames is before else ("carried bytes since" in v.reason), v.reason
    # an unpaired client leg picked up mid-stream shortly before (its bytes cannot be compared) may be the
    # backend leg's own: no pairing from the frames, however well the other fits
    vague = (1.0 - 0.3, TcpSegment("10.77.0.100", NODE, 990, 2049, 123456, 654321, ACK | PSH, 502,
                                   TcpOptions(tsval=50, tsecr=40), _rpc_record(0x4444, 92)))
    verdicts = _rpc_book(ok, [vague])
    assert not verdicts["10.77.0.100:801"].inferred and "1 could be its own" in verdicts["10.77.0.100:801"].reason
    vague = (1.0 - 2.5, vague[1])  # long before: not a candidate
    assert _rpc_book(ok, [vague])["10.77.0.100:801"].inferred


def test_client_legs_long_over_do_not_crowd_out_the_inference(monkeypatch):
    """On a switch the standby never sees the peer's own FIN, so connections that ended at the peer linger
    in its views for minutes (a client that connects per operation leaves thousands). Only client legs
    opened shortly before a backend leg can own it: the old ones are not compared at all, and do not
    count against the bound on the comparisons (here lowered to 10)."""
    import proxy.continuation as continuation

    monkeypatch.setattr(continuation, "INFER_PAIRS_MAX", 10)
    old = [f for i in range(20) for f in _rpc_relay(1.0 + i * 0.01, 700 + i, 40700 + i, 0x100 + i, None)[:3]]
    verdicts = _rpc_book(old, _rpc_relay(30.0, 801, 41001, 0x1111, 0x1111))
    assert len(verdicts) == 21
    assert verdicts["10.77.0.100:801"].inferred and verdicts["10.77.0.100:801"].reason is None


def test_a_backend_leg_on_a_reused_source_port_is_another_connection():
    """A secure service's backend legs come from a few privileged source ports, reused at once (TCP
    timestamps allow it): the leg of a connection the peer paired long ago and the leg of a young
    unpaired one can share the 4-tuple. Only the instance the pairing was about carries its own
    client's bytes; the young one is the unpaired client's (the soak's last NFS resets at takeovers,
    "it had sent the client bytes", were such libnfs connections)."""
    first = _rpc_relay(1.0, 801, 900, 0x1111, 0x1111)
    last = first[-1][1]
    server_fin = (1.1, replace(last, seq=last.seq + len(last.payload), flags=ACK | FIN, payload=b""))
    young = _rpc_relay(5.0, 802, 900, 0x2222, 0x2222, isn_shift=100000)
    tracker = TcpTracker([2049])
    book = ContinuationBook(NODE, [tracker], cap=1 << 20)
    every = TCPI_OPT_TIMESTAMPS | TCPI_OPT_SACK | TCPI_OPT_WSCALE
    options = (LegOptions(every, 7, 9, 1448), LegOptions(every, 6, 8, 1448))
    # the peer's anchor (stream origins read at the accept) names the instance: the server's ISN + 1
    anchor = (1802, 9901, 3901, 7802)
    paired = Pairing(("10.77.0.100", 801), 2049, 900, RPC_NODE_SERVER, *options, anchor)
    book.set_pairings([paired.to_wire(),
                       Pairing(("10.77.0.200", 40000), 2049, 50000, RPC_NODE_SERVER, *options).to_wire()])
    for ts, seg in first + [server_fin]:
        book.feed([(ev.key, ev) for ev in tracker.feed(seg, ts)])
    book.set_pairings(remove=[["10.77.0.100", 801, 2049]])  # it ended at the peer
    for ts, seg in young:
        book.feed([(ev.key, ev) for ev in tracker.feed(seg, ts)])
    v = {v.client: v for v in book.plan(10.0)}["10.77.0.100:802"]
    assert v.reason is None and v.inferred and v.pairing.source_port == 900, v.reason
    # the very leg the pairing was about, lingering (its server's FIN not seen), is never another's
    tracker = TcpTracker([2049])
    book = ContinuationBook(NODE, [tracker], cap=1 << 20)
    book.set_pairings([paired.to_wire(),
                       Pairing(("10.77.0.200", 40000), 2049, 50000, RPC_NODE_SERVER, *options).to_wire()])
    for ts, seg in first:
        book.feed([(ev.key, ev) for ev in tracker.feed(seg, ts)])
    book.set_pairings(remove=[["10.77.0.100", 801, 2049]])
    twin = [(ts + 0.0005, replace(seg, sport=803)) for ts, seg in first[:3]]  # a client leg it could fit
    for ts, seg in twin:
        book.feed([(ev.key, ev) for ev in tracker.feed(seg, ts)])
    v = {v.client: v for v in book.plan(10.0)}["10.77.0.100:803"]
    assert not v.inferred and v.fresh, v.reason
    # a pairing that does not say which instance (no anchor): a leg on its 4-tuple is given to nobody, and
    # stands in the way of a fresh start (it may be the one that carried the client's request)
    tracker = TcpTracker([2049])
    book = ContinuationBook(NODE, [tracker], cap=1 << 20)
    book.set_pairings([replace(paired, anchor=None).to_wire(),
                       Pairing(("10.77.0.200", 40000), 2049, 50000, RPC_NODE_SERVER, *options).to_wire()])
    for ts, seg in first + [server_fin]:
        book.feed([(ev.key, ev) for ev in tracker.feed(seg, ts)])
    book.set_pairings(remove=[["10.77.0.100", 801, 2049]])
    for ts, seg in young:
        book.feed([(ev.key, ev) for ev in tracker.feed(seg, ts)])
    v = {v.client: v for v in book.plan(10.0)}["10.77.0.100:802"]
    assert not v.inferred and not v.fresh and "carried bytes since" in v.reason, v.reason


def test_a_backend_leg_to_another_ports_server_does_not_stand_in_the_way_of_a_fresh_start():
    """An unpaired client leg the peer relayed nothing of is started afresh unless a backend leg that may
    carry its bytes opened since. The peer relays port 2049 to the server's 2049 only: an SMB leg to the
    server's 445 (the probe's connections, relayed unpaired in the same burst) cannot carry an NFS
    client's bytes, and reset every young NFS client at the soak's takeovers. A leg to a server no
    pairing ever named still may (the peer's configuration may have changed)."""
    every = TCPI_OPT_TIMESTAMPS | TCPI_OPT_SACK | TCPI_OPT_WSCALE
    options = (LegOptions(every, 7, 9, 1448), LegOptions(every, 6, 8, 1448))
    nfs_client = _rpc_relay(1.0, 801, 41001, 0x1111, None)[:3]            # in the accept queue: no backend leg

    def smb_leg(server: str) -> list:
        frames = _rpc_relay(1.01, 802, 41002, 0x2222, None)[3:]          # the server's SYN-ACK and ACK
        return [(ts, replace(seg, src=server, sport=445)) for ts, seg in frames]

    for server, blocks in (("10.77.0.10", False), ("10.77.0.99", True)):
        tracker = TcpTracker([2049, 445])
        book = ContinuationBook(NODE, [tracker], cap=1 << 20)
        book.set_pairings([Pairing(("10.77.0.200", 40000), 2049, 50000, RPC_NODE_SERVER, *options).to_wire(),
                           Pairing(("10.77.0.200", 40001), 445, 50001, ("10.77.0.10", 445), *options).to_wire()])
        for ts, seg in sorted(nfs_client + smb_leg(server), key=lambda f: f[0]):
            book.feed([(ev.key, ev) for ev in tracker.feed(seg, ts)])
        v = {v.client: v for v in book.plan(10.0)}["10.77.0.100:801"]
        if blocks:
            assert not v.fresh and f"to {server} port 445" in v.reason, v.reason
        else:
            assert v.fresh and v.reason is None, v.reason
