"""capture.pcapfile on corrupt and hostile files (issue 8, item 9).

Every corrupt capture gives a CaptureError naming the byte offset and what was wrong, after the
packets before it were handed out; memory stays bounded whatever the lengths in the file say.
"""

from __future__ import annotations

import io
import struct
import tracemalloc
from pathlib import Path

import pytest

from capture.pcapfile import MAX_BLOCK, CaptureError, read_capture

FIXTURES = Path(__file__).parent / "fixtures"


# ------------------------------------------------------------------------------------ builders
def block(btype: int, body: bytes, length: int | None = None, trailer: int | None = None) -> bytes:
    body += bytes(-len(body) % 4)
    n = 12 + len(body)
    return struct.pack("<II", btype, n if length is None else length) + body + \
        struct.pack("<I", n if trailer is None else trailer)


def shb(length: int | None = None, options: bytes = b"") -> bytes:
    return block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1) + options, length)


def option(code: int, value: bytes, claim: int | None = None) -> bytes:
    return struct.pack("<HH", code, len(value) if claim is None else claim) + value + bytes(-len(value) % 4)


def idb(linktype: int = 1, options: bytes = b"") -> bytes:
    return block(1, struct.pack("<HHI", linktype, 0, 65535) + options)


def epb(data: bytes, ifid: int = 0, caplen: int | None = None, ts: int = 1_000_000) -> bytes:
    return block(6, struct.pack("<IIIII", ifid, ts >> 32, ts & 0xFFFFFFFF,
                                len(data) if caplen is None else caplen, len(data)) + data)


def pcap_header() -> bytes:
    return struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)


def pcap_record(data: bytes, incl: int | None = None) -> bytes:
    return struct.pack("<IIII", 1, 0, len(data) if incl is None else incl, len(data)) + data


GOOD = shb() + idb() + epb(b"A" * 60) + epb(b"B" * 61)
GOOD_END = len(GOOD)


def read_all(data: bytes, stream: bool = False) -> tuple[list, CaptureError | None]:
    """All packets and the error (or None). ``stream``: a file whose size is unknown (a pipe)."""
    f = _Pipe(data) if stream else io.BytesIO(data)
    pkts = []
    try:
        for p in read_capture(f):
            pkts.append(p)
    except CaptureError as exc:
        return pkts, exc
    return pkts, None


class _Pipe:
    """A readable without size or fileno, like stdin from a pipe."""

    def __init__(self, data: bytes) -> None:
        self.f = io.BytesIO(data)

    def read(self, n: int) -> bytes:
        return self.f.read(n)


def assert_error(data: bytes, offset: int, *words: str, packets: int = 2, stream: bool = False) -> CaptureError:
    pkts, err = read_all(data, stream)
    assert err is not None, "no error raised"
    assert len(pkts) == packets, (pkts, err)
    assert err.offset == offset and f"byte offset {offset}" in str(err), str(err)
    for w in words:
        assert w in str(err), (w, str(err))
    return err


# ------------------------------------------------------------------------------------ pcapng cases
def test_good_file_reads():
    pkts, err = read_all(GOOD)
    assert err is None and [p.data for p in pkts] == [b"A" * 60, b"B" * 61] and pkts[0].ts == pytest.approx(1.0)


def test_interface_block_with_an_empty_body():
    assert_error(GOOD + block(1, b""), GOOD_END, "interface description block length 12 is invalid")


def test_simple_packet_block_with_an_empty_body():
    assert_error(GOOD + block(3, b""), GOOD_END, "simple packet block length 12 is invalid")


def test_simple_packet_block_is_cut_to_its_block():
    pkts, err = read_all(GOOD + block(3, struct.pack("<I", 1000) + b"C" * 8))
    assert err is None and pkts[-1].data == b"C" * 8


def test_option_longer_than_its_block():
    bad = idb(options=option(9, b"", claim=200))
    err = assert_error(GOOD + bad, GOOD_END, "interface description block", "option 9", "claims 200 bytes")
    assert "left in the block" in err.what


def test_option_longer_than_the_section_header():
    data = shb(options=option(2, b"x" * 4, claim=64)) + idb() + epb(b"A")
    assert_error(data, 0, "section header block", "option 2", packets=0)


def test_enhanced_packet_option_overrunning_its_block():
    data = GOOD + block(6, struct.pack("<IIIII", 0, 0, 1, 4, 4) + b"DDDD" + option(1, b"", claim=9))
    assert_error(data, GOOD_END, "enhanced packet block", "option 1", packets=2)


def test_bad_if_tsresol():
    assert_error(GOOD + idb(options=option(9, b"\x06\x06")), GOOD_END, "if_tsresol")


def test_section_header_with_a_bogus_length_reads_nothing_big():
    data = shb() + idb() + epb(b"A") + shb(length=0x7FFFFFF0) + b"\0" * (8 << 20)
    offset = len(shb() + idb() + epb(b"A"))
    tracemalloc.start()
    try:
        err = assert_error(data, offset, "section header block", "truncated", packets=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < (1 << 20), f"peak {peak} bytes for a {len(data)} byte file"
    assert "2147483632" in err.what


def test_bogus_lengths_from_a_pipe_stay_bounded():
    """Without a file size the cap is MAX_BLOCK: a 2 GiB claim is refused before any read."""
    err = assert_error(GOOD + epb(b"x")[:4] + struct.pack("<I", 0x7FFFFFF0) + bytes(64), GOOD_END,
                       "enhanced packet block", f"more than the {MAX_BLOCK}", stream=True)
    assert err.packet == 3
    # an unknown block type too: skipped in chunks, but not on a claim beyond the cap
    assert_error(GOOD + struct.pack("<II", 0x0BAD, 0x7FFFFFF0) + bytes(64), GOOD_END, "more than", stream=True)


@pytest.mark.parametrize("blen", [0, 8, 13, 30])
def test_block_lengths_that_cannot_be(blen):
    assert_error(GOOD + struct.pack("<II", 6, blen) + bytes(40), GOOD_END, f"length {blen} is invalid")


def test_trailing_length_that_differs():
    bad = block(6, struct.pack("<IIIII", 0, 0, 1, 4, 4) + b"DDDD", trailer=999)
    assert_error(GOOD + bad, GOOD_END, "trailing length 999 differs from the leading 36")


def test_captured_length_beyond_its_block():
    assert_error(GOOD + epb(b"E" * 8, caplen=5000), GOOD_END, "captured length 5000 exceeds its block", packets=2)


def test_packet_on_an_undeclared_interface():
    assert_error(GOOD + epb(b"E", ifid=3), GOOD_END, "undeclared interface 3")


def test_bad_byte_order_magic():
    assert_error(GOOD + block(0x0A0D0D0A, b"\x01\x02\x03\x04" + bytes(12)), GOOD_END, "byte-order magic 01020304")


def test_unknown_blocks_are_skipped():
    pkts, err = read_all(shb() + idb() + block(5, bytes(100)) + block(0x40000BAD, bytes(70000)) + epb(b"Z"))
    assert err is None and [p.data for p in pkts] == [b"Z"]


def test_every_truncation_of_a_real_pcapng_keeps_the_packets_before_it():
    data = (FIXTURES / "smb-smbclient.pcapng").read_bytes()
    full, err = read_all(data)
    assert err is None and len(full) > 10
    for cut in range(0, len(data), 97):
        pkts, err = read_all(data[:cut])
        assert [p.data for p in pkts] == [p.data for p in full[:len(pkts)]]
        if cut < 8:
            assert err is not None and "not a pcap" in str(err)
        elif cut not in {p.offset for p in full}:
            assert err is not None and "truncated" in err.what and err.offset <= cut, (cut, err)


# ------------------------------------------------------------------------------------ pcap cases
def test_every_truncation_of_a_real_pcap_keeps_the_packets_before_it():
    data = (FIXTURES / "smb-open.pcap").read_bytes()
    full, err = read_all(data)
    assert err is None
    ends = {p.offset for p in full} | {24}
    for cut in range(0, len(data), 53):
        pkts, err = read_all(data[:cut])
        assert [p.data for p in pkts] == [p.data for p in full[:len(pkts)]]
        assert (err is None) == (cut in ends), (cut, err)


def test_pcap_record_with_a_huge_length():
    good = pcap_header() + pcap_record(b"A" * 40)
    assert_error(good + pcap_record(b"", incl=0xFFFFFFF0), len(good), "more than", "corrupt", packets=1)
    # 10 MiB claimed by a record in a small file: refused from the file size, nothing read
    tracemalloc.start()
    try:
        assert_error(good + pcap_record(b"B" * 10, incl=10 << 20), len(good), "truncated", "the file ends", packets=1)
        assert tracemalloc.get_traced_memory()[1] < (1 << 20)
    finally:
        tracemalloc.stop()


def test_pcap_header_truncated_and_wrong_magic():
    assert_error(pcap_header()[:10], 0, "pcap file header truncated", packets=0)
    err = assert_error(b"GIF89a\0\0" + bytes(40), 0, "not a pcap or pcapng file", "4749463839610000", packets=0)
    assert err.packet == 0
    assert_error(b"", 0, "the file is empty", packets=0)
