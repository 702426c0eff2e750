"""protocols.frames: Ethernet/802.1Q/IPv4/TCP parsing on the per-packet path."""

from hypothesis import given, settings, strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Dot1Q, Ether

from protocols.frames import (ACK, SYN, FrameError, TcpSegment, parse_frame, parse_link,
                              LINKTYPE_LINUX_SLL, LINKTYPE_RAW)


def frame(*layers) -> bytes:
    pkt = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    for layer in layers:
        pkt = pkt / layer
    return bytes(pkt)


def test_tcp_segment_with_options_and_payload():
    raw = frame(IP(src="10.0.0.1", dst="10.0.0.2"),
                TCP(sport=50000, dport=445, seq=1000, ack=2000, flags="SA", window=65535,
                    options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (11, 22)), ("NOP", None),
                             ("WScale", 7)]), b"hello")
    seg = parse_frame(raw)
    assert isinstance(seg, TcpSegment)
    assert (seg.src, seg.dst, seg.sport, seg.dport) == ("10.0.0.1", "10.0.0.2", 50000, 445)
    assert (seg.seq, seg.ack, seg.window) == (1000, 2000, 65535)
    assert seg.flags & SYN and seg.flags & ACK
    o = seg.options
    assert (o.mss, o.wscale, o.sack_permitted, o.tsval, o.tsecr) == (1460, 7, True, 11, 22)
    assert bytes(seg.payload) == b"hello"


def test_vlan_tag_and_ethernet_padding_are_handled():
    raw = frame(Dot1Q(vlan=42), IP(src="1.2.3.4", dst="5.6.7.8"), TCP(sport=1, dport=2, flags="A"))
    raw += b"\x00" * 6  # padding beyond the IP datagram is not payload
    seg = parse_frame(raw)
    assert isinstance(seg, TcpSegment) and bytes(seg.payload) == b""


def test_non_tcp_is_none_and_broken_is_error():
    assert parse_frame(frame(IP(dst="1.1.1.1"), UDP(dport=53))) is None
    assert parse_frame(bytes(Ether(type=0x86DD)) + b"\x60" * 40) is None
    good = frame(IP(src="1.2.3.4", dst="5.6.7.8"), TCP(sport=1, dport=2), b"x" * 20)
    assert isinstance(parse_frame(good[:30]), FrameError)
    assert parse_frame(good[:-5]).kind == "truncated"
    frag = frame(IP(src="1.2.3.4", dst="5.6.7.8", flags="MF"), TCP(sport=1, dport=2))
    assert parse_frame(frag).kind == "fragment"
    assert isinstance(parse_frame(b""), FrameError)


def test_cooked_and_raw_link_types():
    ip = bytes(IP(src="1.2.3.4", dst="5.6.7.8") / TCP(sport=1, dport=445) / b"abc")
    sll = b"\x00\x00\x00\x01\x00\x06" + b"\x00" * 8 + b"\x08\x00" + ip
    assert bytes(parse_link(sll, LINKTYPE_LINUX_SLL).payload) == b"abc"
    assert parse_link(ip, LINKTYPE_RAW).dport == 445


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(data):
    parse_frame(data)
    parse_frame(b"\x02" * 12 + b"\x08\x00" + data)
    parse_frame(b"\x02" * 12 + b"\x08\x00\x45\x00" + data)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 200), st.binary(min_size=1, max_size=4))
def test_corrupted_real_frame_never_raises(pos, junk):
    raw = bytearray(frame(IP(src="1.2.3.4", dst="5.6.7.8"),
                          TCP(sport=1, dport=2, options=[("MSS", 1460), ("WScale", 3)]), b"payload"))
    pos %= len(raw)
    raw[pos:pos + len(junk)] = junk
    parse_frame(bytes(raw))
