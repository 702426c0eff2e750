"""proxy.stateful, pure parts: views over real captures, RSTs, digest comparison, the resume report."""

from __future__ import annotations

from pathlib import Path

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
