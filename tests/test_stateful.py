"""proxy.stateful, pure parts: views over real captures, RSTs, digest comparison, the resume report."""

from __future__ import annotations

from pathlib import Path

import pytest

from scapy.layers.inet import IP, TCP

from capture.pcapfile import read_capture
from proxy.stateful import AddressView, ResumeWatcher, ViewSync, reset_frames

FIXTURES = Path(__file__).parent / "fixtures"
SERVER = "10.77.0.10"  # the captures were made straight to the lab's server


def view_of(capture: str, address: str = SERVER, ports=(445, 2049, 111, 20048), **kw) -> AddressView:
    view = AddressView(address, list(ports), **kw)
    with open(FIXTURES / capture, "rb") as f:
        for packet in read_capture(f):
            view.on_frame(packet.data, packet.ts)
    return view


def test_view_of_a_live_smb_session_and_the_rst_that_ends_it():
    view = view_of("smb-open.pcap")
    [conn] = view.live_connections()
    assert conn["server"] == f"{SERVER}:445"
    assert conn["sessions"][0]["user"] == "pp"
    assert [o["path"] for o in conn["opens"]] == ["durable.bin"]
    [(dest, packet)] = reset_frames([conn])
    rst = IP(packet)
    assert dest == conn["client"].rsplit(":", 1)[0] == rst.dst
    assert rst.src == SERVER and rst[TCP].sport == 445 and rst[TCP].dport == int(conn["client"].rsplit(":", 1)[1])
    assert rst[TCP].flags == "RA"
    assert rst[TCP].seq == conn["tcp"]["server_next_seq"]   # exactly what the client expects next
    # checksums right (scapy recomputes them when they are deleted)
    again = IP(packet)
    del again.chksum, again[TCP].chksum
    assert IP(bytes(again)).chksum == rst.chksum and IP(bytes(again))[TCP].chksum == rst[TCP].chksum
    [(dest, packet)] = reset_frames([conn], toward="server")
    rst = IP(packet)
    assert dest == SERVER and rst.dst == SERVER and rst[TCP].dport == 445
    assert rst[TCP].seq == conn["tcp"]["client_next_seq"]


def test_view_keeps_only_its_address_and_the_backend_side_view():
    assert view_of("smb-open.pcap", address="10.77.0.99").snapshot()["connections"] == []
    client_side = view_of("smb-open.pcap", address="10.77.0.100", as_client_of=[SERVER])
    assert client_side.capture_addresses == [SERVER]
    [conn] = client_side.snapshot()["connections"]
    assert conn["client"].startswith("10.77.0.100:")


def test_view_sync_agrees_on_equal_views_and_asks_for_a_snapshot_when_they_keep_differing():
    owner, standby = view_of("smb-open.pcap"), view_of("smb-open.pcap")
    sync = ViewSync()
    message = {"digest": owner.digest(), "frames": owner.frames, "bytes": owner.bytes}
    def ours(view):
        return {"digest": view.digest(), "frames": view.frames, "bytes": view.bytes}

    assert sync.on_peer_digest(message, ours(standby), now=1.0) is False
    assert sync.in_sync and sync.behind == {"frames": 0, "bytes": 0, "ms": 0.0}
    behind = AddressView(SERVER, [445])           # a standby that saw nothing
    asks = [sync.on_peer_digest(message, ours(behind), now=1.25 * i) for i in range(2, 6)]
    assert asks == [False, False, True, False]    # on the third mismatch in a row, once
    assert sync.in_sync is False and sync.behind["frames"] == owner.frames
    diff = sync.on_peer_snapshot(owner.snapshot(), behind.snapshot())
    assert diff["only_at_peer"] == [c["client"] for c in owner.snapshot()["connections"]]
    assert diff["only_here"] == [] and diff["different"] == []


def test_resume_report_from_real_reconnection_traffic():
    before = view_of("smb-open.pcap").snapshot()
    watcher = ResumeWatcher.from_snapshot(before)
    [client] = watcher.report()
    assert client["verdict"] == "not back yet" and client["before"]["sessions"][0]["user"] == "pp"
    # the same client comes back (another session of it, decoded by a fresh view) and opens files
    after = AddressView(SERVER, [445])
    after.watcher = watcher
    with open(FIXTURES / "smb-open.pcap", "rb") as f:
        for packet in read_capture(f):
            after.on_frame(packet.data, packet.ts)
    [client] = watcher.report()
    assert client["reconnected_after_s"] is not None
    assert client["new_sessions"] == 1
    assert any(o["path"] == "durable.bin" for o in client["reopened"])
    assert client["lost_opens"] == [] and client["verdict"] == "reconnected with a new session"


# ------------------------------------------------------------ what the standby sees (issue 9.9)
def test_view_counts_frames_of_its_address_by_direction():
    view = view_of("smb-open.pcap")
    assert view.frames_to > 0 and view.frames_from > 0
    assert view.frames_to + view.frames_from == view.frames
    message = view.digest_message()
    assert message["frames_to"] == view.frames_to and message["connections"] == 1
    assert message["digest"] == view.digest()


def digest_msg(frames, connections, digest="d"):
    return {"digest": digest, "frames": frames, "bytes": frames * 100, "connections": connections}


def ours(to, from_, connections, digest="d"):
    return {"digest": digest, "frames": to + from_, "bytes": 0, "frames_to": to, "frames_from": from_,
            "connections": connections}


def test_a_standby_that_sees_nothing_of_a_busy_peer_says_so_and_is_not_in_sync():
    sync = ViewSync(peer_name="a")
    sync.on_peer_digest(digest_msg(0, 0, "empty"), ours(0, 0, 0, "empty"), now=0.0)
    assert sync.sight == "unknown" and sync.status()["in_sync"] is True   # nothing to judge yet
    # a's client works: a's frames move and it has a connection; this node's view of a stays empty
    for i in range(1, 9):
        sync.on_peer_digest(digest_msg(100 * i, 1, "one"), ours(0, 0, 0, "empty"), now=0.25 * i)
    assert sync.sight == "nothing" and sync.peer_connections == 1
    assert sync.sight_detail.startswith("SEES NOTHING of a's traffic while a has 1 connection(s)")
    assert "flood or mirror a's port" in sync.sight_detail
    # a's client leaves: both tables are empty, the digests agree; still not "in sync": blind
    for i in range(9, 20):
        sync.on_peer_digest(digest_msg(900, 0, "empty"), ours(0, 0, 0, "empty"), now=0.25 * i)
    assert sync.in_sync is True and sync.sight == "nothing"
    assert sync.status()["in_sync"] is False


def test_sight_says_which_way_frames_come_and_keeps_its_verdict_while_the_peer_is_idle():
    sync = ViewSync(peer_name="a")
    sync.on_peer_digest(digest_msg(0, 0), ours(0, 0, 0), now=0.0)
    sync.on_peer_digest(digest_msg(50, 1), ours(25, 0, 1), now=0.25)    # a switch flooding unknown unicast
    assert sync.sight == "to_peer" and sync.sight_detail == "sees only frames to a (25 to a, 0 from it)"
    for i in range(2, 20):                                                # both ways: a hub or a mirror port
        sync.on_peer_digest(digest_msg(50 * i, 1), ours(25 * i, 25 * (i - 1), 1), now=0.25 * i)
    assert sync.sight == "both" and sync.status()["in_sync"] is True
    for i in range(20, 40):                                               # a idle: nothing new to judge
        sync.on_peer_digest(digest_msg(950, 1), ours(475, 450, 1), now=0.25 * i)
    assert sync.sight == "both"


def test_a_peer_with_idle_clients_this_node_never_saw_is_named_too():
    sync = ViewSync(peer_name="a")
    for i in range(3):   # a's clients are idle (no frame moves), but a has them and this node knows none
        sync.on_peer_digest(digest_msg(500, 2, "two"), ours(0, 0, 0, "empty"), now=0.25 * i)
    assert sync.sight == "nothing"
    assert sync.sight_detail.startswith("SEES NOTHING of a's traffic while a has 2 connection(s) (this node knows "
                                        "none of them")


# ------------------------------------------------------------ a view that stays as big as the peer's (issue 8, soak)
def frame(src: str, dst: str, sport: int, dport: int, seq: int, flags: str, ack: int = 0, payload: bytes = b"") -> bytes:
    from scapy.layers.l2 import Ether
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") /
                 IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, seq=seq, ack=ack, flags=flags) / payload)


def test_a_spoofed_syn_keeps_the_connection_and_its_smb_session_in_the_view():
    """RFC 5961 section 4 in the standby's view: a SYN with the right 4-tuple and a new ISN, alone or
    followed by the rest of a fake handshake, neither replaces the connection nor loses its session."""
    view = view_of("smb-open.pcap")
    before = view.snapshot()["connections"]
    [conn] = before
    client_ip, client_port = conn["client"].rsplit(":", 1)
    last_ts = view.last_frame_at
    spoof = [frame(client_ip, SERVER, int(client_port), 445, 123456, "S"),
             frame(SERVER, client_ip, 445, int(client_port), 654321, "SA", ack=123457),
             frame(client_ip, SERVER, int(client_port), 445, 123457, "A", ack=654322),
             frame(client_ip, SERVER, int(client_port), 445, 123457, "PA", ack=654322, payload=b"\0" * 64)]
    for i, f in enumerate(spoof):
        view.on_frame(f, last_ts + 0.01 * (i + 1))
    after = view.snapshot()
    assert after["connections"] == before
    assert after["errors"]["tcp_syn_challenged"] == 2
    assert view.live_connections()[0]["sessions"][0]["user"] == "pp"


def test_view_forgets_what_the_owner_no_longer_has_but_not_what_it_saw_open_since_asking():
    view = view_of("smb-open.pcap")
    [conn] = view.snapshot()["connections"]
    opened = view.pipeline.tcp.connections[next(iter(view.pipeline.tcp.connections))].opened_at
    # asked before it opened: kept (the owner may not have decoded it yet); the owner has it: kept
    assert view.forget(opened - 1, keep=set(), gone=False) == []
    assert view.forget(opened + 1, keep={(conn["client"], conn["server"])}, gone=False) == []
    # the owner's snapshot lacks it and it was open before the standby asked: gone, with its session; the
    # events say so (a continuation book drops what it kept of it)
    assert closed(view.forget(opened + 1, keep=set(), gone=False)) == 1
    assert view.snapshot()["connections"] == [] and view.pipeline.smb.connections == {}
    # a view only forgets its own address's connections
    other = view_of("smb-open.pcap", address="10.77.0.100", as_client_of=[SERVER])
    assert closed(other.forget(float("inf"), gone=True)) == 1
    assert closed(view_of("smb-open.pcap").forget(float("inf"), gone=True)) == 1


def closed(events) -> int:
    from protocols.tcpstream import ConnectionClosed

    return sum(isinstance(ev, ConnectionClosed) for _, ev in events)


def test_a_difference_is_counted_and_names_only_a_few_connections():
    ours = {"connections": [{"client": f"10.0.0.9:{p}", "protocol": "nfs", "sessions": [], "opens": []}
                            for p in range(1000, 1500)]}
    theirs = {"connections": ours["connections"][:3] + [{"client": "10.0.0.8:1", "protocol": "nfs",
                                                         "sessions": [], "opens": []}]}
    sync = ViewSync()
    diff = sync.on_peer_snapshot(theirs, ours)
    assert diff["counts"] == {"only_at_peer": 1, "only_here": 497, "different": 0}
    assert len(diff["only_here"]) == 10 and diff["only_at_peer"] == ["10.0.0.8:1"]
    sync.on_forgotten(497, "gone at the owner")
    assert sync.status()["forgotten"] == 497 and len(str(sync.status())) < 2000


def _peer_observer():
    """An observer's views of a peer at SERVER (backend 10.77.2.10) and its continuation book."""
    from proxy.observer import _Observer

    ports = [445, 2049, 111, 20048]
    return _Observer({"views": {
        "own_address": {"address": "10.77.0.2", "ports": ports},
        "peer_address": {"address": SERVER, "ports": ports},
        "peer_backend": {"address": SERVER, "ports": ports, "as_client_of": ["10.77.2.10"]}}})


def test_what_the_views_forget_the_continuation_book_forgets_too():
    """bench/SOAK.md: the observer's memory grew over failover cycles. A view forgets connections whose
    close it did not see (the peer died; the owner's snapshot lacks them), but the continuation book
    kept its bytes and bookkeeping of each one for good: the events of the forget never reached it."""
    observer = _peer_observer()
    view = observer.views["peer_address"]
    on_frame = observer._callback("peer_address", view)
    with open(FIXTURES / "smb-open.pcap", "rb") as f:
        for packet in read_capture(f):
            on_frame(packet.data, packet.ts)
    [key] = view.pipeline.tcp.connections
    assert key in observer.book.tails and observer.book.memory() > 0
    assert observer.answer({"op": "forget", "view": "peer_address", "before": float("inf"), "gone": True}) == 1
    assert key not in observer.book.tails and observer.book.memory() == 0


def test_the_observer_delay_for_tests_is_parsed_or_refused_by_name(monkeypatch):
    from proxy.observer import DELAY_ENV, delays_from_environment

    monkeypatch.delenv(DELAY_ENV, raising=False)
    assert delays_from_environment() == {}
    monkeypatch.setenv(DELAY_ENV, "continuations=0.4, syns=0.1")
    assert delays_from_environment() == {"continuations": 0.4, "syns": 0.1}
    monkeypatch.setenv(DELAY_ENV, "continuations")
    with pytest.raises(ValueError, match="PAIRPROXY_OBSERVER_DELAY: 'continuations' is not op=seconds"):
        delays_from_environment()


def test_a_connection_the_client_closed_and_the_peer_ended_leaves_the_views():
    """On a switch the standby sees the client's FIN but never the peer's: a connection the client
    closed lingered in the views as open and unpaired once the peer removed its pairing, and a death
    within the next second or so reported it as one of the peer's connections, reset (every NFS
    takeover of bench/continuation.py, the client's MOUNT connection). A leg whose pairing the peer
    removed and whose client sent its FIN is no longer the peer's, in whichever order the two arrive;
    without that FIN the leg stays. The views keep it (their sync decides): the client's last frames
    may still be on their way through the capture when the peer's word arrives (the MOUNT call among
    them: forgotten, its reply was never decoded)."""
    from proxy.continuation import Pairing
    observer = _peer_observer()
    view = observer.views["peer_address"]
    on_frame = observer._callback("peer_address", view)
    client = "10.77.1.100"

    def to_peer(port: int) -> list[bytes]:
        """The frames a client sends the peer for one call (what a nodes-only switch floods to b)."""
        return [frame(client, SERVER, port, 20048, 1000, "S"),
                frame(client, SERVER, port, 20048, 1001, "A", ack=5001),
                frame(client, SERVER, port, 20048, 1001, "PA", ack=5001, payload=b"c" * 40),
                frame(client, SERVER, port, 20048, 1041, "A", ack=5101)]

    def pairing(port: int) -> list:
        return Pairing((client, port), 20048, 900 + port % 100, ("10.77.2.10", 20048), None, None).to_wire()

    ts = 100.0
    for port in (40001, 40002):
        for f in to_peer(port):
            ts += 0.001
            on_frame(f, ts)
    assert observer.answer({"op": "pairings", "add": [pairing(40001), pairing(40002)]}) == []
    assert len(observer.answer({"op": "continuations"})) == 2
    assert observer.answer({"op": "pairings", "remove": [[client, p, 20048] for p in (40001, 40002)]}) == []
    # the peer's word came before the client's FIN (the capture lags): still the peer's, for now
    assert len(observer.answer({"op": "continuations"})) == 2
    # then its FIN, and its ACK of the peer's FIN (which b never sees)
    for f in (frame(client, SERVER, 40001, 20048, 1041, "FA", ack=5101),
              frame(client, SERVER, 40001, 20048, 1042, "A", ack=5102)):
        ts += 0.001
        on_frame(f, ts)
    plan = observer.answer({"op": "continuations"})
    assert [v["client"] for v in plan] == [f"{client}:40002"], plan  # the one still open at its client
    assert "did not say which backend leg" in plan[0]["reason"]
    assert observer.answer({"op": "continuation_summary"})["connections"] == 1
    assert len(view.pipeline.tcp.connections) == 2  # the views keep both




def test_a_closed_connection_the_peer_relayed_is_neither_continued_nor_reset_at_the_takeover():
    """The bench's MOUNT call, as a takeover sees it: the peer relayed the reply (so the leg counts as
    recently busy, and a takeover's first pick goes by that), then the client closed and the peer ended
    it. The busiest-first pick passed the check the full plan makes and reported it as reset (every NFS
    takeover of bench/continuation.py, 2026-11-30), and the takeover sent its client an RST, and its
    server one once the server's FIN was in: none is owed. The connection still open at its client
    stays the peer's, in all three."""
    from proxy.continuation import Pairing
    observer = _peer_observer()
    client_side = observer._callback("peer_address", observer.views["peer_address"])
    backend_side = observer._callback("peer_backend", observer.views["peer_backend"])
    client, backend = "10.77.1.100", "10.77.2.10"
    ts = 100.0
    pairings = []
    for port in (40001, 40002):
        source = 900 + port % 100
        for on_frame, f in ((client_side, frame(client, SERVER, port, 20048, 1000, "S")),
                            (client_side, frame(client, SERVER, port, 20048, 1001, "A", ack=5001)),
                            (client_side, frame(client, SERVER, port, 20048, 1001, "PA", ack=5001, payload=b"c" * 40)),
                            (backend_side, frame(backend, SERVER, 20048, source, 7000, "SA", ack=3001)),
                            (backend_side, frame(backend, SERVER, 20048, source, 7001, "PA", ack=3041, payload=b"r" * 100)),
                            (client_side, frame(client, SERVER, port, 20048, 1041, "A", ack=5101))):
            ts += 0.001
            on_frame(f, ts)
        pairings.append(Pairing((client, port), 20048, source, (backend, 20048), None, None).to_wire())
    assert observer.answer({"op": "pairings", "add": pairings}) == []
    assert observer.answer({"op": "pairings", "remove": [[client, 40001, 20048]]}) == []
    ts += 0.001
    client_side(frame(client, SERVER, 40001, 20048, 1041, "FA", ack=5101), ts)
    takeover = observer.answer({"op": "continuations", "first": 8})
    rest = observer.answer({"op": "continuations_rest"})
    assert [v["client"] for v in takeover["first"] + rest] == [f"{client}:40002"], (takeover, rest)
    live = observer.answer({"op": "live", "view": "peer_address"})
    assert [c["client"] for c in live] == [f"{client}:40002"]
    # its backend leg: the server's FIN too; the one still open is reset toward the server, as before
    ts += 0.001
    backend_side(frame(backend, SERVER, 20048, 901, 7101, "FA", ack=3041), ts)
    live = observer.answer({"op": "live", "view": "peer_backend"})
    assert [c["client"] for c in live] == [f"{SERVER}:902"], live

def test_a_connection_whose_pairing_came_and_went_in_one_message_is_not_the_peers_once_closed():
    """A connection of a few milliseconds (the NFS client's MOUNT call): its pairing and the pairing's
    removal are merged in the standby's inbox before the observer takes them (the last word wins), so
    the book gets a removal of a pairing it never had. That is still the peer's word that the
    connection ended: closed by its client, the leg is not the peer's (it was reset at 7 NFS takeovers
    in 20 of bench/continuation.py). A new pairing on the same 4-tuple makes it the peer's again."""
    from proxy.continuation import Pairing, PairingInbox
    observer = _peer_observer()
    on_frame = observer._callback("peer_address", observer.views["peer_address"])
    client, port = "10.77.1.100", 40003
    ts = 100.0
    for f in (frame(client, SERVER, port, 20048, 1000, "S"),
              frame(client, SERVER, port, 20048, 1001, "A", ack=5001),
              frame(client, SERVER, port, 20048, 1001, "PA", ack=5001, payload=b"c" * 40),
              frame(client, SERVER, port, 20048, 1041, "A", ack=5101)):
        ts += 0.001
        on_frame(f, ts)
    wire = Pairing((client, port), 20048, 903, ("10.77.2.10", 20048), None, None).to_wire()
    inbox = PairingInbox()
    inbox.take({"add": [wire]})
    inbox.take({"remove": [[client, port, 20048]]})
    body = inbox.drain()
    assert body["add"] == [] and body["remove"] == [[client, port, 20048]]
    assert observer.answer({"op": "pairings", **body}) == []
    [verdict] = observer.answer({"op": "continuations"})  # open at its client: still the peer's
    assert "did not say which backend leg" in verdict["reason"]
    ts += 0.001
    on_frame(frame(client, SERVER, port, 20048, 1041, "FA", ack=5101), ts)
    assert observer.answer({"op": "continuations"}) == []
    assert observer.answer({"op": "pairings", "add": [wire]}) == []
    assert [v["client"] for v in observer.answer({"op": "continuations"})] == [f"{client}:{port}"]
