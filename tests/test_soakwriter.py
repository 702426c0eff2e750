"""The shape check for libnfs's reconnect bug (bench/SOAK.md, "The wrong NFS read-backs"): what a wrong
NFS read-back may look like before the lab test blames the pair instead of the client."""

import os

from bench._soakwriter import READ_REPLY_HEADER, reconnect_splices

WANT = os.urandom(128 << 10)


def header(size: int = len(WANT)) -> bytes:
    """A READ reply's first 132 bytes: the record mark of one fragment, then XID, attributes, count."""
    return (0x80000000 | (size + READ_REPLY_HEADER - 4)).to_bytes(4, "big") + os.urandom(READ_REPLY_HEADER - 4)


def cut(*xs: int) -> bytes:
    """The record as libnfs fills it: each reconnect writes the next reply from where the last stopped."""
    got = b""
    for x in xs:
        got += WANT[:x] + header()
    return (got + WANT)[:len(WANT)]


def test_one_cut_is_the_known_shape():
    assert reconnect_splices(WANT, cut(8556)) == [8556]


def test_two_cuts_in_one_reply_are_the_known_shape():
    assert reconnect_splices(WANT, cut(40_000, 30_000)) == [40_000, 30_000]


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
    assert reconnect_splices(WANT, WANT[:9000] + os.urandom(len(WANT) - 9000)) is None


def test_a_longer_read_back_is_not_the_shape():
    assert reconnect_splices(WANT, cut(8556) + b"x") is None
