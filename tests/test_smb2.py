"""protocols.smb2 + smb_state + pipeline against real lab captures (tests/fixtures/make_captures.py)."""

from __future__ import annotations

import struct
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st

from protocols.events import ConnKey, ProtocolError
from protocols.frames import parse_frame
from protocols.pipeline import Pipeline
from protocols.smb2 import (CLOSE, CREATE, Smb1Negotiate, Smb2Decoder, Smb2Interim, Smb2Opaque, Smb2Request,
                            Smb2Response, parse_ntlmssp_user)
from protocols.smb_state import SmbSessionTable
from capture.pcapfile import read_capture

FIXTURES = Path(__file__).parent / "fixtures"


def packets(name: str) -> list[tuple[bytes, float]]:
    with open(FIXTURES / name, "rb") as f:
        return [(p.data, p.ts) for p in read_capture(f)]


def streams(name: str, which: int = 0) -> list[tuple[bool, bytes]]:
    """The in-order SMB byte chunks of one connection of a capture (``which``-th to appear),
    as (from_client, data)."""
    pipe = Pipeline()
    order: list[ConnKey] = []
    out = []
    for data, ts in packets(name):
        for key, ev in pipe.feed_frame(data, ts):
            if type(ev).__name__ == "Data":
                if key not in order:
                    order.append(key)
                if order.index(key) == which:
                    out.append((ev.from_client, ev.data))
    return out


def decode(chunks, decoder=None) -> tuple[list, SmbSessionTable]:
    dec = decoder or Smb2Decoder()
    table = SmbSessionTable()
    key = ConnKey("c", 1, "s", 445)
    events = []
    for from_client, data in chunks:
        for ev in dec.feed(from_client, data):
            events.append(ev)
            table.apply(key, ev)
    return events, table


def table_json(table: SmbSessionTable) -> dict:
    return table.to_json()


# ----------------------------------------------------------------------------------- real clients
def test_live_durable_open_from_smbprotocol():
    pipe = Pipeline()
    for data, ts in packets("smb-open.pcap"):
        pipe.feed_frame(data, ts)
    snap = pipe.snapshot()
    [conn] = snap["connections"]
    assert conn["protocol"] == "smb" and conn["server"] == "10.77.0.10:445" and not conn["unsynchronised"]
    [session] = conn["sessions"]
    assert session["user"] == "pp"
    assert [t["share"] for t in session["trees"]] == ["\\\\10.77.0.10\\share"]
    [op] = conn["opens"]
    assert op["path"] == "durable.bin" and op["durable"] is True
    assert op["session_id"] == session["session_id"] and op["tree_id"] == session["trees"][0]["tree_id"]
    assert len(op["file_id"]) == 32 and int(op["file_id"], 16)
    assert conn["smb"]["dialect"] == "3.1.1" and conn["smb"]["opens"][0]["lease"] is True
    tcp = conn["tcp"]
    assert tcp["handshake_seen"] and tcp["client_wscale"] is not None and tcp["client_mss"] == 1460
    assert isinstance(tcp["client_next_seq"], int) and isinstance(tcp["server_next_seq"], int)


def test_smbclient_session_what_the_client_did():
    events, table = decode(streams("smb-smbclient.pcap"))
    assert not [e for e in events if isinstance(e, ProtocolError)]
    reqs = [e for e in events if isinstance(e, Smb2Request)]
    resps = [e for e in events if isinstance(e, Smb2Response)]
    assert all(r.request is not None for r in resps)
    setup = [r for r in reqs if r.name == "SESSION_SETUP" and "user" in r.fields]
    assert setup and setup[0].fields["user"] == "pp"
    shares = [r.fields["share"] for r in reqs if r.name == "TREE_CONNECT"]
    assert "\\\\10.77.0.10\\share" in shares
    names = {r.fields["name"] for r in reqs if r.command == CREATE}
    assert {"docs", "docs\\report.txt", "docs\\final.txt"} <= names
    writes = [r for r in reqs if r.name == "WRITE"]
    assert sum(w.fields["length"] for w in writes) == 20460
    reads = [r for r in resps if r.name == "READ" and r.ok]
    assert sum(r.fields["length"] for r in reads) == 20460
    assert any(r.fields.get("rename_to") == "docs\\final.txt" for r in reqs if r.name == "SET_INFO")
    # smbclient disconnects its trees and closes its files but never sends LOGOFF
    [state] = table_json(table).values()
    assert [(s["user"], s["trees"]) for s in state["sessions"]] == [("pp", [])]
    assert state["opens"] == [] and state["dialect"] == "3.1.1"


def test_mid_session_state_of_smbclient():
    """Stopping at the WRITE, the session, share tree and the file being written are all open."""
    chunks = streams("smb-smbclient.pcap")
    events, table = [], SmbSessionTable()
    dec = Smb2Decoder()
    key = ConnKey("c", 1, "s", 445)
    for from_client, data in chunks:
        for ev in dec.feed(from_client, data):
            table.apply(key, ev)
            events.append(ev)
        if any(isinstance(e, Smb2Response) and e.name == "WRITE" for e in events):
            break
    st = table.get(key).to_json()
    [sess] = st["sessions"]
    assert sess["user"] == "pp" and sess["trees"][0]["share"] == "\\\\10.77.0.10\\share"
    assert [o["path"] for o in st["opens"]] == ["docs\\report.txt"]


def test_compound_related_file_id_is_resolved():
    events, table = decode(streams("smb-smbprotocol.pcap", which=1))
    closes = [e for e in events if isinstance(e, Smb2Response) and e.command == CLOSE]
    chained = [c for c in closes if c.request.fields.get("file_id_from_chain")]
    assert chained, "smbprotocol's stat() sends CREATE+QUERY_INFO+CLOSE as one compound"
    creates = {e.fields["file_id"] for e in events if isinstance(e, Smb2Response) and e.command == CREATE}
    assert all(c.request.fields["file_id"] in creates for c in chained)
    assert any(isinstance(e, Smb2Interim) for e in decode(streams("smb-open.pcap"))[0])


def test_encrypted_session_is_opaque_but_counted():
    pipe = Pipeline()
    events = []
    for data, ts in packets("smb-encrypted.pcap"):
        events += [ev for _k, ev in pipe.feed_frame(data, ts)]
    opaque = [e for e in events if isinstance(e, Smb2Opaque)]
    assert opaque and all(e.kind == "encrypted" for e in opaque)
    assert pipe.counters["smb_encrypted"] == len(opaque) and pipe.counters["smb_errors"] == 0


def test_ntlmssp_authenticate_user():
    user, dom = "pp".encode("utf-16-le"), "LAB".encode("utf-16-le")
    head = struct.pack("<8sI", b"NTLMSSP\x00", 3)
    fields = b""
    base = 64 + 8
    layout = [(b"", 0), (b"", 0), (dom, 0), (user, 0), (b"", 0), (b"", 0)]
    payload = b""
    for data, _ in layout:
        fields += struct.pack("<HHI", len(data), len(data), base + len(payload))
        payload += data
    blob = b"\x30\x82junk" + head + fields + struct.pack("<I", 1) + b"\x00" * (base - 12 - 48 - 4) + payload
    assert parse_ntlmssp_user(blob) == {"user": "pp", "domain": "LAB", "workstation": ""}
    assert parse_ntlmssp_user(b"nothing here") is None


def test_smb1_negotiate_is_recognised():
    body = b"\x02NT LM 0.12\x00\x02SMB 2.002\x00\x02SMB 2.???\x00"
    smb1 = b"\xffSMB\x72" + b"\x00" * 27 + b"\x00" + struct.pack("<H", len(body)) + body
    frame = struct.pack(">I", len(smb1)) + smb1
    events = Smb2Decoder().feed(True, frame)
    assert events == [Smb1Negotiate(("NT LM 0.12", "SMB 2.002", "SMB 2.???"))]


# --------------------------------------------------------------------------------- bad input
def test_garbage_then_resync_at_next_frame():
    chunks = streams("smb-open.pcap")
    dec = Smb2Decoder()
    first_from_client, first = chunks[0]
    events = dec.feed(True, b"\x00\x00\x00\x10" + b"\x13" * 16)  # a frame that is no SMB
    assert isinstance(events[0], ProtocolError) and dec.unsynchronised
    events, _ = decode(chunks, dec)
    assert any(isinstance(e, Smb2Response) and e.name == "CREATE" for e in events)


def test_gap_inside_bulk_payload_keeps_sync_and_other_gaps_resync():
    chunks = streams("smb-open.pcap")
    # find the client chunk carrying the 20000-byte WRITE and lose 1000 bytes of its tail
    idx = next(i for i, (c, d) in enumerate(chunks) if c and len(d) > 5000)
    head = chunks[:idx]
    dec = Smb2Decoder()
    decode(head, dec)
    frm, data = chunks[idx]
    # everything after the first 4096+4 bytes of a >64 KiB frame would be skipped; this frame is
    # small (20 KB), so a gap here forces a hunt, which must find the next request again
    dec.feed(True, data[:100])
    dec.gap(True, len(data) - 100)
    events, table = decode(chunks[idx + 1:], dec)
    assert dec.unsynchronised
    assert any(isinstance(e, Smb2Response) and e.name == "READ" for e in events)


@settings(max_examples=80, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_arbitrary_bytes_never_raise(data, from_client):
    dec = Smb2Decoder()
    dec.feed(from_client, data)
    dec.gap(from_client, 7)
    dec.feed(from_client, data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_corrupted_real_stream_never_raises(data):
    chunks = streams("smb-open.pcap")
    i = data.draw(st.integers(0, len(chunks) - 1))
    frm, chunk = chunks[i]
    pos = data.draw(st.integers(0, len(chunk) - 1))
    junk = data.draw(st.binary(min_size=1, max_size=16))
    chunks[i] = (frm, chunk[:pos] + junk + chunk[pos + len(junk):])
    decode(chunks)


# ------------------------------------------------------------------------------ properties
def _pipeline_final(frames) -> tuple[dict, str]:
    pipe = Pipeline()
    for data, ts in frames:
        pipe.feed_frame(data, ts)
    snap = pipe.snapshot()
    return [{k: c[k] for k in ("client", "server", "sessions", "opens", "unsynchronised")}
            for c in snap["connections"]], pipe.digest()


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_any_segmentation_gives_the_same_tables(data):
    chunks = streams("smb-open.pcap")
    whole_events, whole = decode(chunks)
    pieces = []
    for frm, chunk in chunks:
        cuts = sorted(data.draw(st.lists(st.integers(1, max(1, len(chunk) - 1)), max_size=4)))
        prev = 0
        for c in cuts + [len(chunk)]:
            if c > prev:
                pieces.append((frm, chunk[prev:c]))
                prev = c
    # and merge some neighbouring pieces of the same direction
    merged = []
    for frm, piece in pieces:
        if merged and merged[-1][0] == frm and data.draw(st.booleans()):
            merged[-1] = (frm, merged[-1][1] + piece)
        else:
            merged.append((frm, piece))
    events, table = decode(merged)
    assert table.to_json() == whole.to_json()
    assert [repr(e) for e in events] == [repr(e) for e in whole_events]


@settings(max_examples=30, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(2, 6), st.floats(0, 0.3))
def test_reordered_and_duplicated_segments_give_the_same_tables(rnd, window, dup_rate):
    frames = packets("smb-open.pcap")
    expected = _pipeline_final(frames)
    # keep the handshake first (it names the client); after it, reorder each direction's segments
    # within small windows (TCP reordering is per direction; the slots each direction occupies in
    # the capture stay as they were) and duplicate some
    head, rest = frames[:3], frames[3:]
    from_client = [parse_frame(d).sport != 445 for d, _ in rest]
    shuffled = list(rest)
    for direction in (True, False):
        slots = [i for i, c in enumerate(from_client) if c == direction]
        for i in range(0, len(slots), window):
            block = slots[i:i + window]
            items = [rest[j] for j in block]
            rnd.shuffle(items)
            for j, item in zip(block, items):
                shuffled[j] = item
    out = []
    for f in shuffled:
        out.append(f)
        if rnd.random() < dup_rate:
            out.append(f)
    assert _pipeline_final(head + out) == expected


def test_pipeline_digest_is_stable_and_meaningful():
    a = _pipeline_final(packets("smb-open.pcap"))
    b = _pipeline_final(packets("smb-open.pcap"))
    c = _pipeline_final(packets("smb-smbclient.pcap"))
    assert a == b and a[1] != c[1]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=120), max_size=8))
def test_pipeline_never_raises_on_arbitrary_frames(frames):
    pipe = Pipeline()
    for i, f in enumerate(frames):
        pipe.feed_frame(f, float(i))
        # also as TCP to port 445 with arbitrary payload
        eth = b"\x02" * 12 + b"\x08\x00"
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + len(f), 0, 0, 64, 6, 0, b"\x0a\0\0\x01", b"\x0a\0\0\x02")
        tcp = struct.pack("!HHIIBBHHH", 40000, 445, i * 1000, 0, 0x50, 0x18, 100, 0, 0)
        pipe.feed_frame(eth + ip + tcp + f, float(i))
    pipe.snapshot()
    pipe.digest()


def test_connection_picked_up_mid_stream_resynchronises():
    frames = packets("smb-open.pcap")
    pipe = Pipeline()
    events = []
    for data, ts in frames[12:]:  # after the handshake and session setup, somewhere mid-frame
        events += [ev for _k, ev in pipe.feed_frame(data, ts)]
    [conn] = pipe.snapshot()["connections"]
    assert conn["unsynchronised"] and not conn["tcp"]["handshake_seen"]
    assert any(isinstance(e, Smb2Response) and e.name == "READ" for e in events)
