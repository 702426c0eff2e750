"""The shape check for libnfs's reconnect bug (bench/SOAK.md, "The wrong NFS read-backs"): what a wrong
NFS read-back may look like before the lab test blames the pair instead of the client."""

import random

from bench._soakwriter import READ_REPLY_HEADER, reconnect_splices

RANDOM = random.Random(20261129)  # fixed: the cases below are the same bytes in every run
WANT = RANDOM.randbytes(128 << 10)
MARK = (0x80000000 | (len(WANT) + READ_REPLY_HEADER - 4)).to_bytes(4, "big")


def header(size: int = len(WANT)) -> bytes:
    """A READ reply's first 132 bytes: the record mark of one fragment, then XID, attributes, count."""
    return (0x80000000 | (size + READ_REPLY_HEADER - 4)).to_bytes(4, "big") + RANDOM.randbytes(READ_REPLY_HEADER - 4)


HEADER = header()  # the same READ's replies: one header


def cut(x: int, *ys: int) -> bytes:
    """The record as libnfs fills it: X bytes of the first reply's data, then each reconnect's reply
    (header and data) from where the last stopped, the ``ys`` bytes of each cut one, then a whole one."""
    got = WANT[:x]
    for y in ys:
        got += (HEADER + WANT)[:y]
    return (got + HEADER + WANT)[:len(WANT)]


def test_one_cut_is_the_known_shape():
    assert reconnect_splices(WANT, cut(8556)) == [8556, len(WANT) - 8556]


def test_a_cut_where_the_file_has_the_record_marks_first_bytes_is_the_known_shape():
    """The bytes a reply's record mark replaced may equal its first bytes (0x80 one time in 256): the
    first difference is then after the cut, and the cut is still found where the mark starts."""
    for same in range(1, 4):
        want = bytearray(WANT)
        want[8556:8556 + same] = MARK[:same]
        want[40_000 + 30_000:40_000 + 30_000 + same] = MARK[:same]
        want = bytes(want)
        header = MARK + HEADER[4:]
        got = (want[:8556] + header + want)[:len(want)]
        assert reconnect_splices(want, got) == [8556, len(want) - 8556], same
        got = (want[:40_000] + (header + want)[:30_000] + header + want)[:len(want)]
        assert reconnect_splices(want, got) == [40_000, 30_000, len(want) - 70_000], same


def test_a_reply_cut_again_is_the_known_shape():
    assert reconnect_splices(WANT, cut(40_000, 30_000)) == [40_000, 30_000, len(WANT) - 70_000]


def test_a_reply_cut_inside_its_header_is_the_known_shape():
    assert reconnect_splices(WANT, cut(40_000, 60)) == [40_000, 60, len(WANT) - 40_060]
    for y in (3, 129, 130, 131):  # the next mark sticking out past the header's end, or starting in its mark
        assert reconnect_splices(WANT, cut(40_000, y)) == [40_000, y, len(WANT) - 40_000 - y], y
    assert reconnect_splices(WANT, cut(40_000, 2)) is None  # a record mark cut after 2 bytes: not told apart


def test_cut_in_the_last_header_is_the_known_shape():
    got = (WANT[:len(WANT) - 50] + HEADER)[:len(WANT)]
    assert reconnect_splices(WANT, got) == [len(WANT) - 50, 50]


def test_the_right_bytes_are_no_splice():
    assert reconnect_splices(WANT, WANT) is None


def test_the_file_resumed_elsewhere_than_its_start_is_not_the_shape():
    got = (WANT[:5000] + header() + WANT[4096:])[:len(WANT)]
    assert reconnect_splices(WANT, got) is None


def test_a_header_of_another_size_is_not_the_shape():
    got = (WANT[:5000] + header(64 << 10) + WANT)[:len(WANT)]
    assert reconnect_splices(WANT, got) is None


def test_a_hole_or_foreign_bytes_are_not_the_shape():
    assert reconnect_splices(WANT, WANT[:9000] + bytes(len(WANT) - 9000)) is None
    assert reconnect_splices(WANT, WANT[:9000] + RANDOM.randbytes(len(WANT) - 9000)) is None


def test_a_longer_read_back_is_not_the_shape():
    assert reconnect_splices(WANT, cut(8556) + b"x") is None
