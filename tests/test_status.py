"""proxy.status and proxy.metrics, pure parts: the schema, the Prometheus text, the human status."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from proxy.cli import format_status
from proxy.config import parse_endpoint
from proxy.metrics import render, serve_metrics
from capture.pcapfile import read_capture
from proxy.status import (AddressStatus, Behind, ConnectionRecord, LinkStatus, NodeStatus, PairStatus, ProbeStatus,
                          ProxiedRecord, ReplayReport, RttStatus, SchemaError, ServiceStatus, Snapshot, SnooperStats,
                          StateSync, Takeover, TcpRecord, from_json, merge_connections, tables_with_digests, to_json)
from protocols.pipeline import Pipeline

FIXTURES = Path(__file__).parent / "fixtures"


def service(name="smb", address="10.0.0.1", **kw) -> ServiceStatus:
    values = dict(name=name, protocol="smb", address=address, ports=[445], backend="10.0.2.10:445",
                  connections_active=2, connections_total=7, bytes_to_backend=1234, bytes_to_client=98765,
                  backend_failures=1, connections_reset=0, internal_errors=0,
                  last_backend_error="10.0.2.10:445: Connection refused")
    values.update(kw)
    return ServiceStatus(**values)


def a_status(pair: PairStatus | None = None, **kw) -> NodeStatus:
    values = dict(node="a", pid=123, state="pair" if pair else "serving", interface="eth0", mac="02:00:00:00:00:01",
                  address="10.0.0.1/24", uptime=12.5, tasks=20, services=[service()], pair=pair,
                  connections=[], errors={}, digests={})
    values.update(kw)
    return NodeStatus(**values)


def a_pair(**kw) -> PairStatus:
    takeover = Takeover("10.0.0.2", last_heard_at=10.0, detected_at=10.1, wall_time=0.0, address_up_at=10.103)
    values = dict(mode="stateless", peer="b", peer_state="dead",
                  addresses={"10.0.0.1": AddressStatus("a", "serving", "a"),
                             "10.0.0.2": AddressStatus("b", "holding", "a")},
                  link=LinkStatus(state="connecting", refused_reason=None, peer="b", dialled_by=None, silent_for=1.5,
                                  counters={"messages_in": 10}, rtt_ms=RttStatus(0.2, 0.1, 0.9, 0.25, 40)),
                  peer_services=[service(address="10.0.0.2", bytes_to_backend=5, bytes_to_client=6)],
                  takeovers=[takeover.report()], takeovers_total=takeover.number, probe=ProbeStatus(3, 0))
    values.update(kw)
    return PairStatus(**values)


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict, family: str, sample: str | None = None, **labels) -> float:
    found = [s.value for s in fams[family].samples if s.name == (sample or family)
             and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (family, labels, fams[family].samples)
    return found[0]


# ------------------------------------------------------------------------------------------ schema
def test_takeover_record_keeps_its_json_keys_and_counts_every_takeover():
    first = Takeover("10.0.0.2", 10.0, 10.1, 0.0, address_up_at=10.1035)
    second = Takeover("10.0.0.2", None, 20.0, 0.0)
    assert second.number == first.number + 1
    doc = first.as_dict()
    assert set(doc) == {"number", "address", "when", "silence_ms", "address_moved_ms", "first_client_ms",
                        "held_for_s", "clients_reset", "backend_connections_reset", "connections_continued",
                        "first_continued_ms", "all_continued_ms", "syns_answered", "settled_ms", "connections", "phases_ms"}
    assert doc["silence_ms"] == 100.0 and doc["address_moved_ms"] == 3.5 and doc["first_client_ms"] is None


def test_sections_a_mode_does_not_have_are_left_out():
    """Readers test ``"pair" in status`` (and ``status.get("pair", {})``), as before the schema."""
    single = to_json(a_status())
    assert "pair" not in single and single["connections"] == [] and single["digests"] == {}
    pair = to_json(a_status(a_pair()))["pair"]
    assert "state_sync" not in pair and "resume" not in pair
    assert from_json(NodeStatus, single) == a_status()


def test_status_round_trips_through_json_and_strict_reading_names_the_key():
    status = a_status(a_pair())
    doc = json.loads(json.dumps(to_json(status)))
    assert from_json(NodeStatus, doc) == status
    doc["pair"]["link"]["rtt_ms"]["last"] = "fast"
    with pytest.raises(SchemaError, match=r"NodeStatus\.pair\.link\.rtt_ms\.last: expected a number, got 'fast'"):
        from_json(NodeStatus, doc)
    doc = to_json(status)
    doc["services"][0]["colour"] = "blue"
    with pytest.raises(SchemaError, match=r"services\[0\]: unknown key\(s\) colour"):
        from_json(NodeStatus, doc)
    assert from_json(NodeStatus, doc, strict=False) == status  # a newer node may say more
    del doc["services"][0]["bytes_to_client"]
    with pytest.raises(SchemaError, match=r"services\[0\]\.bytes_to_client: missing"):
        from_json(NodeStatus, doc, strict=False)


@pytest.mark.parametrize("name", ["smb-open.pcap", "smb-smbprotocol.pcap", "nfs3-session.pcap", "nfs4-session.pcap",
                                  "smb-encrypted.pcap"])
def test_the_decoders_snapshot_fits_the_schema_exactly(name):
    """protocols/ produces the per-connection records; a key it adds or renames must show up here."""
    pipe = Pipeline()
    seen = 0
    with open(FIXTURES / name, "rb") as f:
        for packet in read_capture(f):  # every intermediate state: connections come and go
            pipe.feed_frame(packet.data, packet.ts, packet.linktype)
            raw = pipe.snapshot()
            snap = from_json(Snapshot, raw)  # strict: no key of the decoders is unknown to the schema
            assert all(isinstance(c.tcp, TcpRecord) for c in snap.connections)
            seen += len(snap.connections)
            tables, digests = tables_with_digests(raw, pipe.digest)
            assert tables == snap
            if snap.connections:  # one server address: its digest is the whole one
                assert digests == {"10.77.0.10": pipe.digest(raw)}
    assert seen


def test_merge_gives_one_record_per_connection_with_both_sides():
    tcp = TcpRecord(*([1] * 14), handshake_seen=True)
    decoded = [ConnectionRecord("10.0.0.100:40000", "10.0.0.1:445", "smb", tcp=tcp, unsynchronised=False),
               ConnectionRecord("10.0.0.100:40001", "10.0.0.2:445", "smb", tcp=tcp, unsynchronised=False)]
    leg = ProxiedRecord("smb", "10.0.2.10:445", "10.0.0.1:50000", 1.0, 10, 20)
    proxied = [ConnectionRecord("10.0.0.100:40000", "10.0.0.1:445", "smb", proxied=leg),
               ConnectionRecord("10.0.0.100:40002", "10.0.0.1:445", "smb", proxied=leg)]
    merged = merge_connections(decoded, proxied)
    assert [(c.client, c.tcp is not None, c.proxied is not None) for c in merged] == [
        ("10.0.0.100:40000", True, True), ("10.0.0.100:40001", True, False), ("10.0.0.100:40002", False, True)]


# ------------------------------------------------------------------------------------ prometheus
def test_prometheus_text_of_a_pair_parses_with_the_values_of_the_status():
    sync = StateSync(in_sync=True, compared=9, matches=8, mismatches_in_a_row=0, behind=Behind(0, 0, 0.0),
                     snapshots_requested=0, last_difference=None, observer="running",
                     snoopers=[SnooperStats("own_address", kernel_drops=3),
                               SnooperStats("peer_address", kernel_drops=0, out_of_window=12, rst_out_of_window=4)])
    status = a_status(a_pair(mode="stateful", state_sync=sync))
    text = render(status)
    fams = families(text)
    for name in ("pairproxy_up", "pairproxy_connections_active", "pairproxy_connections", "pairproxy_bytes",
                 "pairproxy_backend_failures", "pairproxy_peer_alive", "pairproxy_sync_link_rtt_seconds",
                 "pairproxy_takeovers", "pairproxy_last_takeover_seconds", "pairproxy_snooper_kernel_drops",
                 "pairproxy_state_in_sync"):
        assert fams[name].documentation, name
    assert fams["pairproxy_bytes"].type == "counter" and fams["pairproxy_connections_active"].type == "gauge"
    assert value(fams, "pairproxy_up") == 1
    assert value(fams, "pairproxy_bytes", "pairproxy_bytes_total", service="smb", address="10.0.0.1",
                 direction="to_client") == 98765
    assert value(fams, "pairproxy_bytes", "pairproxy_bytes_total", service="smb", address="10.0.0.2",
                 direction="to_backend") == 5
    assert value(fams, "pairproxy_connections", "pairproxy_connections_total", service="smb",
                 address="10.0.0.1") == 7
    assert value(fams, "pairproxy_backend_failures", "pairproxy_backend_failures_total", service="smb",
                 address="10.0.0.1") == 1
    assert value(fams, "pairproxy_peer_alive") == 0
    assert value(fams, "pairproxy_sync_link_rtt_seconds", stat="median") == pytest.approx(0.00025)
    assert value(fams, "pairproxy_takeovers", "pairproxy_takeovers_total") == status.pair.takeovers_total
    assert value(fams, "pairproxy_last_takeover_seconds", phase="detection") == pytest.approx(0.1)
    assert value(fams, "pairproxy_last_takeover_seconds", phase="address") == pytest.approx(0.003)
    assert not [s for s in fams["pairproxy_last_takeover_seconds"].samples if s.labels["phase"] == "first_client"]
    assert value(fams, "pairproxy_snooper_kernel_drops", "pairproxy_snooper_kernel_drops_total", view="own_address") == 3
    assert value(fams, "pairproxy_state_in_sync") == 1
    refused = "pairproxy_snooper_segments_refused"
    assert value(fams, refused, refused + "_total", view="peer_address", reason="out_of_window") == 12
    assert value(fams, refused, refused + "_total", view="peer_address", reason="rst_out_of_window") == 4
    assert value(fams, refused, refused + "_total", view="own_address", reason="syn_challenged") == 0
    # every family has HELP and TYPE lines, also those without a sample now
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            assert f"# HELP {line.split()[2]} " in text


def test_label_values_are_escaped():
    nasty = 'we"ird\\name\nx'
    fams = families(render(a_status(services=[service(name=nasty)])))
    [sample] = [s for s in fams["pairproxy_connections_active"].samples]
    assert sample.labels["service"] == nasty


def test_a_single_node_and_a_silent_one():
    fams = families(render(a_status()))
    assert value(fams, "pairproxy_up") == 1 and not fams["pairproxy_peer_alive"].samples
    fams = families(render(None))
    assert value(fams, "pairproxy_up") == 0 and not fams["pairproxy_bytes"].samples


# ------------------------------------------------------------------------------------ human status
def test_human_status_says_n_a_instead_of_none_and_shows_the_backend_error():
    text = format_status(a_status(a_pair(link=LinkStatus("connecting", None, "b", None, None, {}, None))))
    assert "None" not in text
    assert "first client n/a after detection" in text and "address moved 3 ms" in text
    assert "heartbeat round trip: n/a" in text
    assert "last backend error: 10.0.2.10:445: Connection refused" in text
    assert "0 proxied connections" in text


def test_replay_json_fits_the_schema(capsys):
    from capture.replay import add_replay_command
    import argparse

    parser = argparse.ArgumentParser()
    add_replay_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["replay", str(FIXTURES / "smb-open.pcap"), "--json"])
    assert args.func(args) == 0
    report = from_json(ReplayReport, json.loads(capsys.readouterr().out))
    [c] = report.connections
    assert c.sessions[0].user == "pp" and c.proxied is None and report.capture.packets > 20


# ------------------------------------------------------------------------------------ HTTP endpoint
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def http(port: int, request: bytes) -> tuple[str, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.decode(), body


async def test_metrics_endpoint_answers_get_metrics_only(nursery):
    endpoint = parse_endpoint(f"127.0.0.1:{free_port()}")

    async def text() -> str:
        return render(a_status())

    await nursery.start(serve_metrics, endpoint, text)
    head, body = await http(endpoint.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.startswith("HTTP/1.0 200") and "text/plain; version=0.0.4" in head
    assert value(families(body.decode()), "pairproxy_up") == 1
    head, _ = await http(endpoint.port, b"GET / HTTP/1.1\r\n\r\n")
    assert head.startswith("HTTP/1.0 404")
    head, _ = await http(endpoint.port, b"POST /metrics HTTP/1.1\r\n\r\n")
    assert head.startswith("HTTP/1.0 405")
    with pytest.raises(OSError, match=f"node.metrics 127.0.0.1:{endpoint.port}: cannot listen"):
        await nursery.start(serve_metrics, endpoint, text)
    nursery.cancel_scope.cancel()


def test_human_status_says_what_is_wrong_with_peer_link():
    """Issue 9.7: dial failures and the last dial error are in the link record and the human status."""
    failing = LinkStatus("connecting", None, "b", None, None, {}, None, dial="10.77.1.2:7499", dial_failures=3,
                         last_dial_error="connection refused")
    text = format_status(a_status(a_pair(link=failing)))
    assert "dialling 10.77.1.2:7499: 3 failed, last: connection refused" in text
    problem = "peer.link 10.77.1.2:7499: connection refused for 5 s: is the peer's peer.listen this address and port?"
    stuck = LinkStatus("connected", None, "b", "b", 0.01, {}, None, dial="10.77.1.2:7499", dial_failures=30,
                       last_dial_error="connection refused", dial_problem=problem)
    assert f"SYNC LINK PROBLEM: {problem}" in format_status(a_status(a_pair(link=stuck)))
    assert from_json(LinkStatus, to_json(stuck)) == stuck


def test_human_status_says_why_the_own_address_is_not_served():
    from proxy.status import OwnAddressStuck

    reason = "a says 10.0.0.1 is its own address, but it is this node's own ([node] address here): ..."
    pair = a_pair(own_address_stuck=OwnAddressStuck("yielded", 12.0, reason), address_mismatch=reason)
    text = format_status(a_status(pair))
    assert f"OWN ADDRESS NOT SERVED (yielded for 12 s): {reason}" in text
    assert "ADDRESSES DO NOT MATCH" not in text   # said once
    assert from_json(PairStatus, to_json(pair)) == pair


def test_human_status_shows_the_frames_per_address_and_direction_and_a_blind_standby():
    detail = ("SEES NOTHING of a's traffic while a has 1 connection(s) (652 frames at a in the last 2.0 s, none "
              "here): the service network does not pass a's frames to this node")
    sync = StateSync(in_sync=False, compared=9, matches=8, mismatches_in_a_row=0, behind=None, snapshots_requested=0,
                     last_difference=None, observer="running",
                     snoopers=[SnooperStats("own_address", frames=30, address="10.0.0.2", frames_to=20, frames_from=10),
                               SnooperStats("peer_address", address="10.0.0.1"),
                               SnooperStats("peer_backend", address="10.0.0.1", frames=5, frames_to=5,
                                            rst_challenged=2, syn_challenged=1)],
                     sight="nothing", sight_detail=detail, peer_connections=1)
    text = format_status(a_status(a_pair(mode="stateful", peer="a", state_sync=sync)))
    assert "10.0.0.2        own address: 30 frames, 20 to it, 10 from it\n" in text
    assert "10.0.0.1        a's address: 0 frames, 0 to a, 0 from a" in text
    assert ("a's backend connections: 5 frames, 5 to a, 0 from a; 3 segments refused (out of window 0, RST in "
            "window 2, RST out of window 0, SYN on a live connection 1)") in text
    assert "\n" + detail in text and "state sync with a: NOT in sync" in text
    assert from_json(StateSync, to_json(sync)) == sync


def test_prometheus_says_what_issue_9_made_loud():
    from proxy.status import OwnAddressStuck

    sync = StateSync(in_sync=False, compared=9, matches=8, mismatches_in_a_row=0, behind=None, snapshots_requested=0,
                     last_difference=None, observer="running",
                     snoopers=[SnooperStats("peer_address", frames=9, address="10.0.0.2", frames_to=9)],
                     sight="nothing", sight_detail="SEES NOTHING", peer_connections=1)
    link = LinkStatus("connected", None, "b", "b", 0.01, {}, None, dial="10.0.1.2:7499", dial_failures=30,
                      dial_problem="peer.link ...")
    pair = a_pair(mode="stateful", state_sync=sync, link=link, own_address_stuck=OwnAddressStuck("yielded", 12.0, "x"))
    fams = families(render(a_status(pair)))
    assert value(fams, "pairproxy_sync_link_dial_failures", "pairproxy_sync_link_dial_failures_total") == 30
    assert value(fams, "pairproxy_sync_link_problem") == 1
    assert value(fams, "pairproxy_own_address_unserved_seconds") == 12.0
    assert value(fams, "pairproxy_snooper_frames", "pairproxy_snooper_frames_total", view="peer_address",
                 direction="to") == 9
    assert value(fams, "pairproxy_state_sees_peer") == 0
    fams = families(render(a_status(a_pair())))
    assert value(fams, "pairproxy_sync_link_problem") == 0 and value(fams, "pairproxy_own_address_unserved_seconds") == 0
