"""pairproxy replay: CLI over the real captures, JSON schema, --at, broken files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from proxy.replay import add_replay_command, read_capture

FIXTURES = Path(__file__).parent / "fixtures"


def run(capsys, *argv) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="pairproxy")
    add_replay_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["replay", *map(str, argv)])
    rc = args.func(args)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("name", ["smb-open.pcap", "smb-smbclient.pcapng"])
def test_tables_are_printed(capsys, name):
    rc, out, err = run(capsys, FIXTURES / name, "--events")
    assert rc == 0, err
    assert "SMB2 SESSION_SETUP request" in out and "user=pp" in out and "digest " in out
    if name == "smb-open.pcap":
        assert "user pp" in out and "\\\\10.77.0.10\\share" in out and "durable.bin" in out and "durable lease" in out


def test_pcap_and_pcapng_read_the_same_packets():
    with open(FIXTURES / "smb-smbclient.pcap", "rb") as a, open(FIXTURES / "smb-smbclient.pcapng", "rb") as b:
        pa, pb = list(read_capture(a)), list(read_capture(b))
    assert [p.data for p in pa] == [p.data for p in pb]
    assert all(abs(x.ts - y.ts) < 1e-5 for x, y in zip(pa, pb))


def test_json_schema(capsys):
    rc, out, _ = run(capsys, FIXTURES / "smb-open.pcap", "--json")
    doc = json.loads(out)
    assert rc == 0 and set(doc) == {"connections", "errors", "digests", "capture"}
    [c] = doc["connections"]
    assert set(c) >= {"client", "server", "protocol", "sessions", "opens", "nfs", "tcp", "unsynchronised"}
    assert c["protocol"] == "smb" and c["client"].startswith("10.77.0.100:") and c["server"] == "10.77.0.10:445"
    [s] = c["sessions"]
    assert set(s) == {"session_id", "user", "trees"} and s["user"] == "pp"
    assert set(s["trees"][0]) == {"tree_id", "share"}
    [o] = c["opens"]
    assert set(o) == {"session_id", "tree_id", "file_id", "path", "durable"}
    assert isinstance(o["file_id"], str) and int(o["file_id"], 16)
    assert {"client_next_seq", "server_next_seq"} <= set(c["tcp"])
    assert isinstance(doc["errors"], dict) and len(doc["digests"]["10.77.0.10"]) == 64


def test_at_stops_early(capsys):
    rc, out, _ = run(capsys, FIXTURES / "smb-open.pcap", "--json", "--at", "0.0200")
    doc = json.loads(out)
    [c] = doc["connections"]
    assert c["sessions"][0]["user"] == "pp" and c["opens"] == []  # logged on, the CREATE not yet sent
    assert doc["capture"]["packets"] < 27
    rc, out, _ = run(capsys, FIXTURES / "smb-open.pcap", "--at", "0")
    assert rc == 0 and "stopped at --at" in out
    rc, _, err = run(capsys, FIXTURES / "smb-open.pcap", "--at", "yesterday-ish")
    assert rc == 2 and "--at" in err


def test_truncated_capture_reports_where_and_keeps_state(capsys, tmp_path):
    data = (FIXTURES / "smb-open.pcap").read_bytes()
    # cut inside the record of the packet holding the CREATE response (packet 17 or so): find it
    with open(FIXTURES / "smb-open.pcap", "rb") as f:
        pkts = list(read_capture(f))
    victim = pkts[20]
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[:victim.offset + 16 + len(victim.data) // 2])
    rc, out, err = run(capsys, cut)
    assert rc == 1
    assert "packet 21" in err and f"byte offset {victim.offset}" in err and "truncated" in err
    assert "Traceback" not in err
    assert "user pp" in out and "\\\\10.77.0.10\\share" in out  # what was decoded before it


def test_truncated_pcapng(capsys, tmp_path):
    data = (FIXTURES / "smb-smbclient.pcapng").read_bytes()
    cut = tmp_path / "cut.pcapng"
    cut.write_bytes(data[:len(data) // 2])
    rc, out, err = run(capsys, cut)
    assert rc == 1 and "truncated" in err and "packet " in err and "connection" in out


def test_garbage_and_missing_files(capsys, tmp_path):
    junk = tmp_path / "junk.pcap"
    junk.write_bytes(b"this is not a capture at all" * 10)
    rc, _, err = run(capsys, junk)
    assert rc == 1 and "not a pcap or pcapng file" in err and "Traceback" not in err
    rc, _, err = run(capsys, tmp_path / "missing.pcap")
    assert rc == 1 and "cannot read" in err
    empty = tmp_path / "empty.pcap"
    empty.write_bytes(b"")
    rc, _, err = run(capsys, empty)
    assert rc == 1 and "not a pcap" in err


def test_help_mentions_the_options(capsys):
    with pytest.raises(SystemExit):
        run(capsys, "--help")
    out = capsys.readouterr().out
    assert "--json" in out and "--events" in out and "--at" in out and "pcapng" in out
