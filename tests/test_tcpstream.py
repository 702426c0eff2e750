"""protocols.tcpstream: ordering, retransmission, gaps, close, mid-stream pickup."""

from protocols.frames import ACK, FIN, PSH, RST, SYN, TcpOptions, TcpSegment
from protocols.tcpstream import ConnectionClosed, ConnectionOpened, Data, Gap, TcpTracker

C, S = ("10.0.0.100", 40000), ("10.0.0.10", 445)


def seg(frm, seq, payload=b"", flags=ACK | PSH, ack=0, window=100, options=TcpOptions()):
    src, dst = (C, S) if frm == "c" else (S, C)
    return TcpSegment(src[0], dst[0], src[1], dst[1], seq & 0xFFFFFFFF, ack, flags, window, options, payload)


def handshake(t, cisn=1000, sisn=5000):
    ev = t.feed(seg("c", cisn, flags=SYN, options=TcpOptions(mss=1460, wscale=7, sack_permitted=True,
                                                              tsval=1, tsecr=0)), 0)
    ev += t.feed(seg("s", sisn, flags=SYN | ACK, ack=cisn + 1,
                     options=TcpOptions(mss=1400, wscale=5, sack_permitted=True, tsval=9, tsecr=1)), 0)
    ev += t.feed(seg("c", cisn + 1, flags=ACK, ack=sisn + 1), 0)
    return ev


def data(events, from_client=True):
    return b"".join(e.data for e in events if isinstance(e, Data) and e.from_client == from_client)


def test_handshake_data_and_sequence_state():
    t = TcpTracker([445])
    ev = handshake(t)
    assert isinstance(ev[0], ConnectionOpened) and not ev[0].mid_stream
    ev = t.feed(seg("c", 1001, b"hello", ack=5001, window=200), 1)
    ev += t.feed(seg("s", 5001, b"world", ack=1006, window=300), 1)
    assert data(ev) == b"hello" and data(ev, False) == b"world"
    state = next(iter(t.connections.values())).sequence_state()
    assert state["client_next_seq"] == 1006 and state["server_next_seq"] == 5006
    assert state["client_last_ack"] == 5001 and state["server_last_ack"] == 1006
    assert state["client_wscale"] == 7 and state["server_wscale"] == 5
    assert state["client_window"] == 200 << 7 and state["server_window"] == 300 << 5
    assert state["sack_permitted"] and state["timestamps"] and state["handshake_seen"]


def test_retransmission_overlap_and_out_of_order():
    t = TcpTracker([445])
    handshake(t)
    ev = t.feed(seg("c", 1001, b"abc"), 1)
    ev += t.feed(seg("c", 1001, b"abc"), 1)  # duplicate
    ev += t.feed(seg("c", 1007, b"ghi"), 1)  # ahead: buffered
    ev += t.feed(seg("c", 1002, b"bcdef"), 1)  # overlaps delivered prefix, fills the hole
    assert data(ev) == b"abcdefghi"
    assert t.counters["retransmitted_bytes"] == 3 + 2


def test_gap_when_buffer_bound_is_hit_and_on_reset():
    t = TcpTracker([445], ooo_limit=10)
    handshake(t)
    ev = t.feed(seg("c", 1011, b"x" * 6), 1)
    ev += t.feed(seg("c", 1017, b"y" * 6), 1)  # 12 buffered > 10: the hole is given up
    gaps = [e for e in ev if isinstance(e, Gap)]
    assert gaps == [Gap(gaps[0].key, True, 10)] and data(ev) == b"x" * 6 + b"y" * 6
    ev = t.feed(seg("c", 1030, b"zz"), 2)
    ev += t.feed(seg("c", 1023, b"", flags=RST), 2)
    assert [type(e) for e in ev] == [Gap, Data, ConnectionClosed] and ev[-1].reset


def test_fin_both_ways_closes_and_late_ack_is_ignored():
    t = TcpTracker([445])
    handshake(t)
    ev = t.feed(seg("c", 1001, b"bye", flags=FIN | ACK), 1)
    ev += t.feed(seg("s", 5001, b"", flags=FIN | ACK, ack=1005), 1)
    assert isinstance(ev[-1], ConnectionClosed) and not ev[-1].reset
    assert t.feed(seg("c", 1005, b"", flags=ACK, ack=5002), 1) == []
    assert not t.connections


def test_mid_stream_pickup_orients_by_server_port():
    t = TcpTracker([445])
    ev = t.feed(seg("s", 77777, b"resp"), 0)  # first seen segment goes server -> client
    assert isinstance(ev[0], ConnectionOpened) and ev[0].mid_stream
    assert ev[0].key.server_port == 445 and ev[0].key.client_ip == C[0]
    assert data(ev, False) == b"resp"


def test_sequence_wraparound():
    t = TcpTracker([445])
    handshake(t, cisn=0xFFFFFFFD)
    ev = t.feed(seg("c", 0xFFFFFFFE, b"abcd"), 1)
    ev += t.feed(seg("c", 2, b"ef"), 1)
    assert data(ev) == b"abcdef"


def test_idle_expiry_and_connection_bound():
    t = TcpTracker([445], idle_timeout=10, max_connections=2)
    handshake(t)
    assert t.expire(5) == [] and t.expire(20)[-1].reason == "idle"
    for port in (1, 2, 3):
        t.feed(TcpSegment("1.1.1.1", "2.2.2.2", port, 445, 0, 0, ACK, 0, TcpOptions(), b""), 30)
    assert len(t.connections) == 2 and t.counters["evicted"] == 1
