"""pairproxy replay: CLI over the real captures, JSON schema, --at, broken files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from capture.pcapfile import read_capture
from capture.replay import add_replay_command

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


def test_corrupt_pcapng_block_after_packets(capsys, tmp_path):
    """An empty interface block in the middle: an error naming its offset, the state before it kept."""
    data = (FIXTURES / "smb-smbclient.pcapng").read_bytes()
    with open(FIXTURES / "smb-smbclient.pcapng", "rb") as f:
        pkts = list(read_capture(f))
    at = pkts[30].offset
    bad = tmp_path / "bad.pcapng"
    bad.write_bytes(data[:at] + b"\x01\x00\x00\x00\x0c\x00\x00\x00\x0c\x00\x00\x00" + data[at:])
    rc, out, err = run(capsys, bad)
    assert rc == 1 and "Traceback" not in err
    assert f"byte offset {at}" in err and "interface description block length 12 is invalid" in err
    assert "showing the state after the 30 packets before it" in err and "digest" in out


# ------------------------------------------------------------------ readable output (issue 7, item 11)
import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from capture.nfs_text import nfs_table_lines  # noqa: E402
from capture.replay import format_tables  # noqa: E402

_EVENT_LINE = re.compile(r"^ +\d+\.\d{6}  \S+>\S+  \S")


def test_rpc_events_are_one_tidy_line_each(capsys):
    rc, out, err = run(capsys, FIXTURES / "nfs3-session.pcap", "--events")
    assert rc == 0, err
    events = [line for line in out.splitlines() if _EVENT_LINE.match(line)]
    assert len(events) > 50
    for line in events:  # no Python reprs, no bytes literals, no dicts
        assert "RpcCall(" not in line and "RpcReply(" not in line and "b'" not in line and "{" not in line, line
        assert len(line) < 250, line
    getattr_call = next(line for line in events if "NFSv3 GETATTR call" in line)
    assert re.search(r"NFSv3 GETATTR call xid=0x[0-9a-f]{8} fh=43000001\.\.[0-9a-f]{8}$", getattr_call)
    xid = re.search(r"xid=(0x[0-9a-f]{8})", getattr_call).group(1)
    reply = next(line for line in events if "reply" in line and xid in line)
    assert re.search(rf"NFSv3 GETATTR reply OK \d+\.\d\d ms xid={xid}$", reply), reply
    assert any(re.search(r"MOUNT MNT reply OK .* fh=43000001\.\.", line) for line in events)
    assert any("PORTMAP GETPORT reply OK" in line and "port=2049" in line for line in events)


def test_nfs4_compound_events_name_their_ops(capsys):
    rc, out, _ = run(capsys, FIXTURES / "nfs4-session.pcap", "--events")
    assert rc == 0
    assert re.search(r"NFSv4\.0 COMPOUND call xid=0x[0-9a-f]{8} PUTFH fh=\S+ \| GETATTR \| ACCESS \| "
                     r"OPEN name=hello\.txt share_access=READ \| GETFH", out)
    assert re.search(r"NFSv4\.0 COMPOUND reply OK [\d.]+ ms xid=\S+ .*OPEN stateid=1:[0-9a-f.]+ ", out)
    assert re.search(r"SETCLIENTID clientid=6b080ebf0000000[0-9]", out)


def test_nfs_tables_are_readable(capsys):
    rc, out, _ = run(capsys, FIXTURES / "nfs4-session.pcap", "--at", "0.0135")
    assert rc == 0
    assert "10.77.0.100:759 -> 10.77.0.10:2049  nfs  NFSv4.0" in out
    assert "rpc client libnfs  uid 0 gid 0  (AUTH_SYS)" in out
    assert "v4 client id 6b080ebf00000002" in out
    assert re.search(r"file handle [0-9a-f]{12}\.\.[0-9a-f]{12} +/export/hello\.txt", out)
    assert re.search(r"open [0-9a-f]{24} +/export/hello\.txt  READ  seqid 2  client 6b080ebf00000002", out)
    assert '"file_handles"' not in out and "nfs {" not in out


def test_nfs_table_lines_with_locks_and_sessions():
    nfs = {"version": 4, "minorversion": 1, "auth": {"flavor": "AUTH_SYS", "machine": "host1", "uid": 1000,
                                                     "gid": 100, "gids": [100, 27]},
           "outstanding": 2, "errors": 1,
           "file_handles": [{"fh": "ab" * 30, "path": "/export/f"}, {"fh": "cd" * 4, "path": None}],
           "v4": {"client_id": "00000000000000ff", "session_id": "11" * 16,
                  "opens": [{"stateid": "22" * 12, "seqid": 1, "path": "/export/f", "fh": "ab" * 30,
                             "client_id": "00000000000000ff", "share_access": 3}],
                  "locks": [{"stateid": "33" * 12, "seqid": 4, "path": "/export/f", "fh": "ab" * 30,
                             "client_id": "00000000000000ff", "open_stateid": "22" * 12,
                             "ranges": [[2, 0, 100], [1, 200, 2 ** 64 - 1]]}]}}
    text = "\n".join(nfs_table_lines(nfs))
    assert "rpc client host1  uid 1000 gid 100 groups 100,27  (AUTH_SYS)" in text
    assert f"v4 client id 00000000000000ff  session {'11' * 16}" in text
    assert "file handle cdcdcdcd" in text and "(path unknown)" in text
    assert f"open {'22' * 12}    /export/f  BOTH  seqid 1" in text
    assert f"lock {'33' * 12}    /export/f  WRITE 0+100, READ 200+EOF  seqid 4  open 22222222..22222222" in text
    assert "2 calls outstanding, 1 errors" in text
    snap = {"connections": [{"client": "1.1.1.1:700", "server": "2.2.2.2:2049", "protocol": "nfs",
                             "sessions": [], "opens": [], "nfs": nfs, "unsynchronised": False,
                             "tcp": {"client_next_seq": 1, "server_next_seq": 2, "client_wscale": None,
                                     "server_wscale": None, "client_mss": None, "server_mss": None,
                                     "handshake_seen": False}}],
            "errors": {"frames": 3}}
    table = format_tables(snap)
    assert "1.1.1.1:700 -> 2.2.2.2:2049  nfs  NFSv4.1" in table and "lock " in table


def test_replay_into_a_closed_pipe_exits_quietly(tmp_path):
    """`pairproxy replay FILE | head`: stdout closes early; no "Broken pipe" message, exit 0."""
    r, w = os.pipe()
    os.close(r)  # a reader that already went away: the first write fails with EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "capture.replay", "--events",
                               str(FIXTURES / "nfs3-session.pcap")], stdout=w, stderr=subprocess.PIPE,
                              cwd=Path(__file__).resolve().parent.parent, timeout=60)
    finally:
        os.close(w)
    assert proc.stderr.decode() == "" and proc.returncode == 0
