"""A stateful takeover continues the dead peer's connections (issue 10): real Samba and NFS-Ganesha, a
real smbprotocol client with an open file (and an NFSv3 client) writing and reading back every 10 ms
through node a; a dies; b restores both legs of the connection with TCP_REPAIR from the frames destined
to a's MAC; the client sees no error, keeps its session and reads back every block it wrote."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from deploy.lab.clients import SCRIPTS, NodeProcess, established, serving
from proxy.status import NodeStatus, from_json

pytestmark = pytest.mark.lab

SMB_LOOP = SCRIPTS / "smb_loop.py"
NFS_LOOP = SCRIPTS / "nfs_loop.py"


@pytest.fixture(params=["nodes", "hub"])
def continuing_pair(request, lab, tmp_path):
    """A stateful pair on a switch that floods only frames destined to the nodes (or a hub)."""
    lab.flood(request.param)
    nodes = [NodeProcess(lab, name, config=lab.node_config_path(name, pair=True, mode="stateful"),
                         log=lab.root / f"continue-{name}.log") for name in ("a", "b")]
    a, b = nodes
    try:
        b.start()
        a.start()
        addr = lab.addresses
        a.wait_for(serving(addr.service_a, "a"), 10, "a serving")
        b.wait_for(lambda s: s["pair"]["link"]["state"] == "connected" and
                   s["pair"]["addresses"][addr.service_b]["held_by"] == "b", 10, "b serving, link up")
        for node in (a, b):
            node.wait_for(lambda s: s["pair"]["state_sync"]["observer"] == "running", 10, "observer running")
        yield a, b, request.param
    finally:
        for node in nodes:
            if node.log.exists():
                print(f"--- log of {node.node} ---\n" + node.log.read_text(errors="replace")[-5000:])
        a.stop(10)
        b.stop(10)
        lab.run(lab.ns_a, ["ip", "link", "set", "eth0", "up"])
        lab.flood(False)


def client_loop(lab, protocol: str, host: str, name: str, seconds: float) -> subprocess.Popen:
    """The writing and reading client of ``protocol`` through ``host`` (deploy/lab/scripts/*_loop.py)."""
    if protocol == "smb":
        argv = [str(SMB_LOOP), host, lab.smb_share, lab.smb_user, lab.smb_password, name, str(seconds)]
    else:
        argv = [str(NFS_LOOP), host, str(lab.nfs_export_path), name, str(seconds)]
    return lab.popen(lab.ns_client, [sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     text=True)


@pytest.mark.parametrize("protocol,death", [("smb", "sigkill+link"), ("smb", "sigkill"), ("nfs", "sigkill+link"),
                                            ("nfs", "sigkill")])
def test_a_client_with_an_open_file_goes_on_through_b(lab, continuing_pair, protocol, death):
    """SIGKILL and the link down (a dead machine); SIGKILL alone (a's kernel lives: its FIN/RST for the
    dead process's sockets must not reach the client or the server: a's FIN/RST guard drops them).
    SMB: smbprotocol with a session, a tree and an open file; NFS: NFSv3 WRITE FILE_SYNC + READ on one
    TCP connection. Each writes 64 KiB and reads it back every 10 ms across a's death."""
    a, b, switch = continuing_pair
    host = lab.addresses.service_a
    port = 445 if protocol == "smb" else 2049
    proc = client_loop(lab, protocol, host, f"continue-{protocol}-{switch}-{death}.bin", 16.0)
    try:
        ready = json.loads(proc.stdout.readline() or "{}")
        assert ready.get("ready"), proc.stderr.read()[-2000:]
        before = established(lab, host, port)
        assert len(before) == 1

        def continuable(s):
            c = s["pair"]["state_sync"].get("continuation") or {}
            return c.get("continuable", 0) >= 1 and c

        summary = b.wait_for(continuable, 5, "b able to continue the client's connection")
        assert summary["pair"]["state_sync"]["continuation"]["bytes_kept"] < 4 << 20
        # the session tables too, from the frames to a alone: the client leg's replies are the backend
        # leg's server bytes; b's view agrees with a's own
        # 15 s: on the nodes-only switch b never sees a short connection's close (mount's, a NULL probe);
        # it drops it when a's snapshot no longer has it (proxy.standby: a mismatch, a snapshot, a prune)
        if protocol == "nfs" and switch == "nodes":
            # known limit (README): from the frames to a alone, b's NFS tables miss replies (its
            # outstanding calls grow, the digests differ); its TCP state, which continuing needs, is whole
            st = b.status()
        else:
            st = b.wait_for(lambda s: s["pair"]["state_sync"]["in_sync"], 15, "b's view of a's address in sync")
        if protocol == "smb":
            [conn] = [c for c in st["connections"] if c["client"] in before]
            assert [s["session_id"] for s in conn["sessions"]] == [ready["session_id"]]
        time.sleep(1.0)
        a.kill_hard(link_down=death == "sigkill+link")
        st = b.wait_for(serving(host, "b"), 5, "b holding a's address")
        time.sleep(0.5)
        assert established(lab, host, port) == before, "the client's connection is the same one, through b"
        out, err = proc.communicate(timeout=30)
        result = json.loads(out.strip().splitlines()[-1])
        takeover = st["pair"]["takeovers"][-1]
        print("takeover:", json.dumps(takeover)[:2000])
        print("client:", result)
        assert result["error"] is None, (result, takeover, err[-2000:])
        assert result["mismatches"] == 0
        if protocol == "smb":
            assert result["session_id"] == ready["session_id"] == result["first_session_id"]
        assert result["rounds"] > 100
        # (b's tracker may also hold a dead connection of an earlier test's client: reset, as before)
        [mine] = [c for c in takeover["connections"] if c["client"] in before]
        assert mine["continued"] and mine["reason"] is None
        assert takeover["connections_continued"] == 1
        assert result["longest_round_s"] < 2.0  # the stall across the death (a retransmission timer at most)
        resume = b.wait_for(lambda s: {r["client"]: r["verdict"] for r in s["pair"]["resume"]}
                            .get(lab.addresses.client) == "continued (no reconnect)", 5, "the resume report")
        from_json(NodeStatus, resume)
        human = lab.run(lab.ns_b, [sys.executable, "-m", "proxy.cli", "status", "-c", str(b.config)],
                        capture_output=True, text=True)
        assert "1 of " in human.stdout and "connection(s) continued" in human.stdout, human.stdout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("continuing_pair", ["nodes"], indirect=True)
def test_a_continued_connection_goes_back_to_a_when_it_returns(lab, continuing_pair):
    """After b continued the client's connection, a comes back: the hand-back moves the address and the
    connection (issue 11's live move) to a; the client goes on through both, with its session."""
    a, b, _ = continuing_pair
    host = lab.addresses.service_a
    proc = client_loop(lab, "smb", host, "continue-and-back.bin", 40.0)  # a's return is slow under load
    try:
        ready = json.loads(proc.stdout.readline() or "{}")
        assert ready.get("ready"), proc.stderr.read()[-2000:]
        before = established(lab, host, 445)
        b.wait_for(lambda s: (s["pair"]["state_sync"].get("continuation") or {}).get("continuable", 0) >= 1, 5,
                   "b able to continue the client's connection")
        time.sleep(1.0)
        a.kill_hard(link_down=True)
        st = b.wait_for(serving(host, "b"), 5, "b holding a's address")
        assert st["pair"]["takeovers"][-1]["connections_continued"] == 1
        time.sleep(0.5)
        t0 = time.monotonic()
        a.link_up()
        t1 = time.monotonic()
        a.start(timeout=30)
        st = a.wait_for(serving(host, "a"), 15, "a serving its address again")
        print(f"a's cleanup and link up {t1 - t0:.1f} s, start and hand-back {time.monotonic() - t1:.1f} s")
        assert established(lab, host, 445) == before
        assert st["pair"]["last_move"]["moved"] == 1, st["pair"]["last_move"]
        time.sleep(1.0)  # rounds through a again, then the client stops (the longer, the likelier a false
        proc.send_signal(signal.SIGUSR1)  # takeover on this loaded machine)
        out, err = proc.communicate(timeout=40)
        result = json.loads(out.strip().splitlines()[-1])
        print("client:", result)
        assert result["error"] is None, (result, err[-2000:])
        assert result["mismatches"] == 0 and result["session_id"] == ready["session_id"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
