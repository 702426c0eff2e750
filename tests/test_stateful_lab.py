"""The stateful pair in the lab: the standby snoops, keeps the peer's sessions, resets its clients at
once on takeover, and reports what they resumed (real Samba, real smbprotocol and libnfs clients)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from prometheus_client.parser import text_string_to_metric_families

from deploy.lab.clients import NodeProcess, SmbHolder, established, serving, takeover_settled
from proxy.status import NodeStatus, from_json
from tests.conftest import capturing, replay_json

pytestmark = pytest.mark.lab



METRICS = "127.0.0.1:9477"


@pytest.fixture
def stateful_pair(lab, tmp_path):
    lab.flood(True)
    nodes = []
    for name in ("a", "b"):  # the lab's stateful configs, with GET /metrics on each node's loopback
        config = tmp_path / f"stateful-{name}.toml"
        config.write_text(lab.node_config_path(name, pair=True, mode="stateful").read_text()
                          .replace("[node]\n", f'[node]\nmetrics = "{METRICS}"\n', 1))
        nodes.append(NodeProcess(lab, name, config=config, log=lab.root / f"stateful-{name}.log"))
    a, b = nodes
    try:
        b.start(timeout=60)   # a machine loaded by other work can take 20 s for a Python start
        a.start(timeout=60)
        addr = lab.addresses
        a.wait_for(serving(addr.service_a, "a"), 10, "a serving")
        b.wait_for(lambda s: s["pair"]["link"]["state"] == "connected" and
                   s["pair"]["addresses"][addr.service_b]["held_by"] == "b", 10, "b serving, link up")
        for node in (a, b):  # the observers decode from the start of the clients' connections
            node.wait_for(lambda s: s["pair"]["state_sync"]["observer"] == "running", 10, "observer running")
        yield a, b
    finally:
        a.stop(10)
        b.stop(10)
        lab.run(lab.ns_a, ["ip", "link", "set", "eth0", "up"])
        lab.flood(False)
    assert lab.run(lab.ns_b, ["ip", "link", "show", "pp-a"], capture_output=True).returncode != 0


def connections_to(status: dict, address: str) -> list[dict]:
    return [c for c in status.get("connections", []) if c["server"].startswith(address + ":")]


def wait_gone(lab, address: str, port: int, old: set[str], timeout: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout
    while old & established(lab, address, port) and time.monotonic() < deadline:
        time.sleep(0.01)
    return not (old & established(lab, address, port))


def test_standby_sees_the_peers_session_tree_and_open_and_agrees(lab, stateful_pair):
    a, b = stateful_pair
    host = lab.addresses.service_a
    holder = SmbHolder(lab, host, "stateful-hold.bin")
    try:
        started = time.monotonic()

        def b_sees_the_open(s):
            conns = [c for c in connections_to(s, host) if c["protocol"] == "smb" and c["opens"]]
            return conns and any(o["path"] == "stateful-hold.bin" for o in conns[0]["opens"])

        st = b.wait_for(b_sees_the_open, 5, "b seeing the client's open")
        assert time.monotonic() - started < 1.5
        [conn] = [c for c in connections_to(st, host) if c["opens"]]
        assert conn["client"].startswith(lab.addresses.client + ":")
        [session] = conn["sessions"]
        assert session["user"] == "pp"
        assert [t["share"] for t in session["trees"]] == [f"\\\\{host}\\share"]
        # a (the owner) sees the same, and the digests the nodes exchange agree
        st_a = a.wait_for(lambda s: any(c["opens"] for c in connections_to(s, host)), 5, "a seeing it")
        assert [c["sessions"] for c in connections_to(st_a, host) if c["opens"]] == [conn["sessions"]]
        st = b.wait_for(lambda s: s["pair"]["state_sync"]["in_sync"] and
                        s["digests"][host] == a.status()["digests"][host], 5, "digests agreeing")
        assert st["pair"]["state_sync"]["matches"] > 0
        assert all(s["kernel_drops"] == 0 for s in st["pair"]["state_sync"]["snoopers"])
        # a decodes the connection it proxies and knows its sockets: one record with both sides
        [mine] = [c for c in connections_to(a.status(), host) if c["opens"]]
        assert mine["tcp"]["handshake_seen"] and mine["proxied"]["service"] == "smb"
        assert conn["proxied"] is None  # b only watches it
        from_json(NodeStatus, st)  # strict: exactly the schema
        # the cheap status for frequent polling: the same pair state, without the decoded tables and digests
        cp = lab.run(lab.ns_b, [sys.executable, "-m", "proxy.cli", "status", "-c", str(b.config), "--json",
                                "--no-tables"], capture_output=True, text=True)
        assert cp.returncode == 0, cp.stderr
        light = json.loads(cp.stdout)
        assert connections_to(light, host) == [] and not light["digests"]
        assert light["pair"]["state_sync"]["in_sync"] and light["pair"]["peer_state"] == "alive"
        # the same as metrics: printed by the CLI (from the status without tables) and served by the node
        prom = lab.run(lab.ns_b, [sys.executable, "-m", "proxy.cli", "status", "-c", str(b.config), "--prometheus"],
                       capture_output=True, text=True)
        served = lab.run(lab.ns_b, [sys.executable, "-c", "import urllib.request; print(urllib.request.urlopen("
                                    f"'http://{METRICS}/metrics', timeout=5).read().decode(), end='')"],
                         capture_output=True, text=True)
        for text in (prom.stdout, served.stdout):
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for f in text_string_to_metric_families(text) for s in f.samples}
            assert samples[("pairproxy_state_in_sync", (("peer", "a"),))] == 1
            assert samples[("pairproxy_peer_alive", (("peer", "a"),))] == 1
            assert {dict(k[1])["view"] for k in samples if k[0] == "pairproxy_snooper_kernel_drops_total"} == \
                {"own_address", "peer_address", "peer_backend"}
        human = lab.run(lab.ns_b, [sys.executable, "-m", "proxy.cli", "status", "-c", str(b.config)],
                        capture_output=True, text=True)
        assert human.returncode == 0, human.stderr
        assert "state sync with a: in sync" in human.stdout
        assert "open " in human.stdout and "stateful-hold.bin" in human.stdout and "user pp" in human.stdout
    finally:
        holder.close()


def test_stateful_takeover_resets_idle_clients_at_once_and_reports_the_resume(lab, stateful_pair):
    """A connection b cannot continue is reset at once, and the report says why. Here: the client
    connected while the sync network was down (a's heartbeats on the service network kept it alive for
    b), so a could not tell b which backend leg pairs with it; then a dies."""
    a, b = stateful_pair
    host = lab.addresses.service_a
    holder = None
    try:
        lab.set_links(lab.ns_a, ["sync0"], "down")
        b.wait_for(lambda s: s["pair"]["link"]["state"] != "connected" and s["pair"]["peer_state"] == "link_down", 10,
                   "b: the sync link down, a alive (heartbeats on the service network)")
        holder = SmbHolder(lab, host, "stateful-resume.bin")
        assert holder.do("write")["ok"]
        b.wait_for(lambda s: any(o["path"] == "stateful-resume.bin" for c in connections_to(s, host)
                                 for o in c["opens"]), 5, "b seeing the connection and its open file")
        old = established(lab, host, 445)
        assert old, "the client holds its connection to a"
        died = a.kill_hard(link_down=True)
        st = b.wait_for(takeover_settled(host, "b"), 5, "b holding a's address")
        assert st["pair"]["takeovers"][-1]["clients_reset"] >= 1
        [record] = [c for c in st["pair"]["takeovers"][-1]["connections"] if c["client"] in old]
        assert not record["continued"] and "did not say which backend leg" in record["reason"], record
        # the idle client sent nothing, yet its connection is gone at once: b reset it
        assert wait_gone(lab, host, 445, old), "the client's connection survived the takeover"
        reset_after = time.monotonic() - died
        assert reset_after < 1.0

        answer = holder.do("write")
        assert not answer["ok"], "the old connection cannot work any more"
        reopened = holder.do("reopen")
        assert reopened["ok"], reopened
        assert holder.do("write")["ok"]

        def resumed(s):
            report = {r["client"]: r for r in s["pair"]["resume"]}
            r = report.get(lab.addresses.client)
            return r if r and any(o["path"] == "stateful-resume.bin" for o in r["reopened"]) else None

        st = b.wait_for(resumed, 5, "the resume report")
        report = resumed(st)
        assert report["before"]["connections"] >= 1
        assert [o["path"] for o in report["before"]["opens"]] == ["stateful-resume.bin"]
        assert report["reconnected_after_s"] is not None
        assert report["lost_opens"] == []
        assert report["new_sessions"] >= 1
    finally:
        if holder is not None:
            holder.close()
        lab.set_links(lab.ns_a, ["sync0"], "up")


def test_stateful_nfs4_client_is_seen_and_reset(lab, stateful_pair, tmp_path):
    a, b = stateful_pair
    host = lab.addresses.service_a
    (lab.nfs_export_path / "stateful-v4.bin").write_bytes(b"v" * (32 << 20))
    # nfs-cat into a pipe nobody reads: it blocks with the file open and its connection idle
    reader = lab.popen(lab.ns_client, ["sh", "-c", f"nfs-cat '{lab.nfs_url(host, 'stateful-v4.bin', 4)}' | "
                                                   "sleep 30"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def v4_open(s):
            for c in connections_to(s, host):
                nfs = c.get("nfs") or {}
                opens = (nfs.get("v4") or {}).get("opens", [])
                if any((o.get("path") or "").endswith("stateful-v4.bin") for o in opens):
                    return c
            return None

        st = b.wait_for(v4_open, 5, "b seeing the NFSv4 open")
        conn = v4_open(st)
        assert conn["nfs"]["version"] == 4
        assert conn["nfs"]["v4"]["client_id"]
        old = established(lab, host, 2049)
        assert old
        a.kill_hard(link_down=True)
        st = b.wait_for(takeover_settled(host, "b"), 5, "b holding a's address")
        [record] = [c for c in st["pair"]["takeovers"][-1]["connections"] if c["client"] in old]
        print("NFSv4 connection at the takeover:", record)
        if record["continued"]:  # issue 10: the same connection goes on through b
            time.sleep(0.5)
            assert established(lab, host, 2049) == old
        else:
            assert wait_gone(lab, host, 2049, old), "the NFS client's connection not continued, yet not reset"
        report = {r["client"]: r for r in b.status()["pair"]["resume"]}
        assert any(p.endswith("stateful-v4.bin") for p in report[lab.addresses.client]["before"]["nfs_v4_opens"])
    finally:
        reader.kill()
        reader.wait(10)


def test_replay_of_what_the_standby_saw_gives_its_live_digest(lab, stateful_pair, tmp_path):
    a, b = stateful_pair
    host = lab.addresses.service_a
    capture = tmp_path / "standby.pcap"
    ports = (445, 2049, 111, 20048)
    dst = " or ".join(f"dst port {p}" for p in ports)
    src = " or ".join(f"src port {p}" for p in ports)
    holder = None
    try:
        with capturing(lab, lab.ns_b, capture,
                       f"tcp and ((dst host {host} and ({dst})) or (src host {host} and ({src})))", "-B", "16384"):
            holder = SmbHolder(lab, host, "replay-hold.bin")
            assert holder.do("write")["ok"]
            b.wait_for(lambda s: any(o["path"] == "replay-hold.bin" for c in connections_to(s, host)
                                          for o in c["opens"]), 5, "b seeing the open")
            time.sleep(0.5)  # quiet: nothing in flight
            live = from_json(NodeStatus, b.status())
    finally:
        if holder:
            holder.close()
    replayed = replay_json(capture)  # the one schema, strictly
    assert any(o.path == "replay-hold.bin" for c in replayed.connections for o in c.opens)
    assert replayed.digests[host] == live.digests[host]
    # the same connections, decoded the same way, live and replayed
    def tables(connections):
        return {(c.client, c.server): (c.protocol, c.sessions, c.opens) for c in connections
                if c.server.startswith(host + ":")}
    assert tables(replayed.connections) == tables(live.connections)


HOLD_NFS = r"""
import socket, struct, sys, time
conns = []
for i in range(int(sys.argv[2])):
    s = socket.create_connection((sys.argv[1], 2049), timeout=5)
    call = struct.pack("!IIIIIIIIII", 0x1000 + i, 0, 2, 100003, 3, 0, 0, 0, 0, 0)   # NFSv3 NULL
    s.sendall(struct.pack("!I", 0x80000000 | len(call)) + call)
    s.recv(1024)
    conns.append(s)
print("ready", flush=True)
time.sleep(60)
"""

# clients that give up on a node that does not answer: SYNs into the void, then close (nothing more
# is sent, so no observer ever sees these connections end)
SYN_INTO_THE_VOID = r"""
import socket, sys, time
socks = []
for port in (445, 2049) * 4:
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex((sys.argv[1], port))
    socks.append(s)
time.sleep(0.2)
for s in socks:
    s.close()
"""


def test_standby_view_of_the_peer_stays_bounded_over_failover_cycles(lab, stateful_pair):
    """bench/SOAK.md: b's view of a's address kept every connection a had when it died, 20-40 per
    cycle, until the takeover plan missed its bound and takeovers lost their resets. Three cycles with
    idle and in-flight connections at each death: the view ends as small as it began."""
    a, b = stateful_pair
    host = lab.addresses.service_a
    sizes, holders = [], []
    try:
        for cycle in range(3):
            holder = lab.popen(lab.ns_client, [sys.executable, "-c", HOLD_NFS, host, "6"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            holders.append(holder)
            assert holder.stdout.readline().strip() == "ready"
            # connections being opened and closed while a dies
            churn = lab.popen(lab.ns_client, ["sh", "-c", f"while :; do nfs-ls '{lab.nfs_url(host, '', 3)}' "
                                                          ">/dev/null 2>&1; done"])
            holders.append(churn)
            b.wait_for(lambda s: len(connections_to(s, host)) >= 6, 5, "b seeing the held connections")
            time.sleep(0.3)
            lab.run(lab.ns_a, ["ip", "link", "set", "eth0", "down"], check=True)   # a's machine falls silent
            lab.run(lab.ns_client, [sys.executable, "-c", SYN_INTO_THE_VOID, host], check=True, timeout=10)
            a.kill_hard(link_down=False)
            b.wait_for(serving(host, "b"), 5, f"cycle {cycle}: b holding a's address")
            time.sleep(0.3)
            churn.kill()
            churn.wait(5)
            a.link_up()
            a.start(timeout=40)   # a loaded machine: a Python start can take 10-20 s
            a.wait_for(serving(host, "a"), 15, f"cycle {cycle}: a serving again")
            b.wait_for(lambda s: s["pair"]["addresses"][host]["role"] == "standby", 10, f"cycle {cycle}: b standby")
            holder.kill()
            holder.wait(5)
            # what is left: only connections that still exist (none of the held ones: their process is gone)
            st = b.wait_for(lambda s: len(connections_to(s, host)) <= 2, 5,
                            f"cycle {cycle}: b's view of {host} back to what lives")
            sizes.append(len(connections_to(st, host)))
        st = b.status()
        assert st["pair"]["state_sync"]["forgotten"] > 0
        # 3 deaths; one more takeover is possible: a's restarted process can stall its event loop past
        # dead_after while it starts (CI saw one 0.7 s after a hand-back; heartbeats on the event loop
        # are issue 12's subject, README's known limits), and the view must stay bounded through it too
        # (that one has nothing to reset or continue: it is not necessarily the earliest of the last four)
        assert 3 <= st["pair"]["takeovers_total"] <= 4
        assert sum(t["clients_reset"] + t["connections_continued"] >= 1 for t in st["pair"]["takeovers"][-4:]) >= 3
        print(f"b's view of {host} after each cycle: {sizes}; forgotten {st['pair']['state_sync']['forgotten']}")
    except BaseException:
        for name in ("a", "b"):
            print(f"--- stateful-{name}.log:\n" + "\n".join(
                (lab.root / f"stateful-{name}.log").read_text(errors="replace").splitlines()[-40:]))
        raise
    finally:
        for p in holders:
            if p.poll() is None:
                p.kill()
                p.wait(5)


READ_LOOP = r"""
import hashlib, json, os, subprocess, sys, time
url, want, until = sys.argv[1], json.loads(sys.argv[2]), time.monotonic() + float(sys.argv[3])
out = f"/dev/shm/pp-readloop-{os.getpid()}"
while time.monotonic() < until:
    for name, sha in want.items():
        if os.path.exists(out):
            os.unlink(out)
        try:
            cp = subprocess.run(["nfs-cp", f"{url}/{name}?version=3", out], capture_output=True, timeout=10)
        except subprocess.TimeoutExpired:
            print(json.dumps({"name": name, "result": "error"}), flush=True)
            continue
        if cp.returncode:
            print(json.dumps({"name": name, "result": "error"}), flush=True)
            continue
        data = open(out, "rb").read()
        got = hashlib.sha256(data).hexdigest()
        whose = [n for n, s in want.items() if s == got]
        line = {"name": name, "result": "ok" if got == sha else "wrong", "got_is": whose}
        if got != sha:
            line["got"] = data.hex()  # the test checks what the wrong bytes are
        print(json.dumps(line), flush=True)
if os.path.exists(out):
    os.unlink(out)
"""


def test_nfs_reads_through_a_flapping_pair_are_right_or_fail(lab, stateful_pair):
    """bench/SOAK.md: twice in 227 stateful cycles an NFS read through a's address returned 128 KiB of
    wrong bytes (exit 0) while the server's copy was right; the runs had thousands of moments in which
    both nodes answered for one address (false takeovers under load). This makes such moments on
    purpose: a's process stops for longer than dead_after (b takes its address over while a's kernel
    keeps a's connections and a, resumed, serves it too) while a client reads files of the same size
    through a's address. Every read must return its own file's bytes or fail; never another's, and wrong
    bytes only in the shape of the known libnfs client bug."""
    a, b = stateful_pair
    host = lab.addresses.service_a
    files = {f"flap-{i}.bin": os.urandom(128 << 10) for i in range(6)}
    for name, data in files.items():
        (lab.nfs_export_path / name).write_bytes(data)
    want = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    reader = lab.popen(lab.ns_client, [sys.executable, "-c", READ_LOOP, lab.nfs_url(host, "", 3).split("?")[0],
                                       json.dumps(want), "40"], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(2)
        for flap in range(3):
            a.signal(signal.SIGSTOP)
            time.sleep(0.4)          # > dead_after: b takes a's address over
            a.signal(signal.SIGCONT)
            b.wait_for(lambda s: s["pair"]["addresses"][host]["role"] == "standby" and
                       s["pair"]["addresses"][host]["held_by"] == "a", 60, f"flap {flap}: the pair settled")
            time.sleep(1)
        out, _ = reader.communicate(timeout=90)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait(10)
        for name in files:
            (lab.nfs_export_path / name).unlink(missing_ok=True)
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    wrong = [r for r in results if r["result"] == "wrong"]
    print(f"reads: {len(results)}, right {sum(r['result'] == 'ok' for r in results)}, "
          f"failed {sum(r['result'] == 'error' for r in results)}, wrong {len(wrong)}; "
          f"b took over {b.status()['pair']['takeovers_total']} time(s)")
    # A wrong read is allowed only in the shape of libnfs's reconnect bug (README, bench/SOAK.md: a reset
    # in the middle of a READ reply, the re-sent READ's reply written into the half-read buffer): the
    # file's first X bytes, a whole READ reply header, the file again from its start (cut again so, if the
    # client was reset twice inside one reply). Anything else
    # (another file's bytes, a hole, bytes shifted otherwise) is the pair's fault and fails here.
    from bench._soakwriter import _evidence, reconnect_splices

    for r in wrong:
        got = bytes.fromhex(r.pop("got"))
        assert not r["got_is"], r  # never another file's bytes
        evidence = _evidence(files[r["name"]], got, hashlib.sha256(got).hexdigest(), [])
        print(f"wrong read of {r['name']}: {evidence}")
        assert reconnect_splices(files[r["name"]], got) is not None, (r, evidence)
    assert sum(r["result"] == "ok" for r in results) >= 10
    assert b.status()["pair"]["takeovers_total"] >= 1   # the flaps happened
