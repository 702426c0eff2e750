"""The pair in the lab (stateless mode): failure detection, takeover with the own MAC, hand-back.

Nodes a and b run ``pairproxy run`` with the lab's pair configs; real clients (smbclient, smbprotocol,
libnfs) in the client namespace use a's service address 10.77.0.1 only.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from deploy.lab.clients import IoLoop, NodeProcess, hears_peer_on_both_paths, serving, nfs_put, random_file, sha256_of, smb_put

pytestmark = pytest.mark.lab


def standing_by(status: dict) -> bool:
    pair = status.get("pair", {})
    return all(a["role"] in ("serving", "standby") for a in pair.get("addresses", {}).values()) and \
        pair.get("link", {}).get("state") == "connected"


@pytest.fixture
def pair(lab):
    a = NodeProcess(lab, "a", pair=True, log=lab.root / "pair-a.log")
    b = NodeProcess(lab, "b", pair=True, log=lab.root / "pair-b.log")
    lab.run(lab.ns_a, ["ip", "link", "set", "eth0", "up"])
    try:
        b.start()
        a.start()
        addr = lab.addresses
        a.wait_for(serving(addr.service_a, "a"), 10, "a serving its address")
        b.wait_for(serving(addr.service_b, "b"), 10, "b serving its address")
        b.wait_for(standing_by, 10, "b standing by, link up")
        b.wait_for(hears_peer_on_both_paths, 10, "b hears a on both paths")
        yield a, b
    finally:
        a.stop(10)
        b.stop(10)
        lab.run(lab.ns_a, ["ip", "link", "set", "eth0", "up"])
        lab.run(lab.ns_a, ["ip", "link", "set", "sync0", "up"])
    assert lab.run(lab.ns_b, ["ip", "link", "show", "pp-a"], capture_output=True).returncode != 0, \
        "b left its macvlan behind"


def test_pair_comes_up_with_link_and_heartbeats(lab, pair):
    a, b = pair
    st = b.wait_for(lambda s: (s["pair"]["link"].get("rtt_ms") or {}).get("count", 0) > 5, 5, "heartbeats")
    assert st["pair"]["peer_state"] == "alive"
    assert st["pair"]["addresses"][lab.addresses.service_a]["held_by"] == "a"
    assert st["pair"]["link"]["rtt_ms"]["median"] < 20
    # the persisted hello lets a restarted node take over without hearing the peer again
    assert (Path(str(b.control_socket)).parent / "peer-hello.json").exists()
    human = lab.run(lab.ns_b, [sys.executable, "-m", "proxy.cli", "status", "-c", str(b.config)],
                    capture_output=True, text=True)
    assert "pair with a (stateless): peer is alive; sync link connected" in human.stdout, human.stdout


def test_node_death_during_io_takeover_and_handback(lab, pair, tmp_path):
    a, b = pair
    host = lab.addresses.service_a
    loops = [IoLoop(lab, host, kind, tmp_path).start() for kind in ("smb", "nfs", "smbprotocol")]
    try:
        for loop in loops:
            loop.wait_ops(2)
        died = a.kill_hard(link_down=True)
        st = b.wait_for(serving(host, "b"), 5, "b holding a's address")
        taken = time.monotonic() - died
        takeover = st["pair"]["takeovers"][-1]
        assert takeover["address"] == host
        assert taken < 2.0
        assert takeover["address_moved_ms"] < 100
        for loop in loops:
            loop.wait_ops(2)          # the clients go on through b
        st = b.status()
        assert st["pair"]["peer_state"] == "dead"
        assert sum(s["connections_total"] for s in st["pair"]["peer_services"]) > 0
        assert st["pair"]["takeovers"][-1]["first_client_ms"] is not None

        # a comes back: b hands the address back, a claims it; never both
        a.link_up()
        a.start()
        a.wait_for(serving(host, "a"), 15, "a serving again after hand-back")
        st = b.wait_for(lambda s: s["pair"]["addresses"][host]["role"] == "standby", 5, "b standby")
        assert st["pair"]["takeovers"][-1]["held_for_s"] > 0
        assert lab.run(lab.ns_b, ["ip", "link", "show", "pp-a"], capture_output=True).returncode != 0
        for loop in loops:
            loop.wait_ops(2)
        outages = {loop.kind: loop.outage_around(died) for loop in loops}
    finally:
        for loop in loops:
            loop.finish()
    for loop in loops:
        assert not loop.corrupt, loop.corrupt
        assert loop.verify_stored() == [], "files changed on the server"
        assert outages[loop.kind] is not None and outages[loop.kind] < 10, outages
        loop.remove_stored()


def test_process_death_only_is_taken_over_too(lab, pair, tmp_path):
    a, b = pair
    host = lab.addresses.service_a
    a.kill_hard(link_down=False)          # the kernel of a lives on and still holds 10.77.0.1
    b.wait_for(serving(host, "b"), 5, "b holding a's address")
    src = random_file(tmp_path / "src.bin", 1 << 20)
    deadline = time.monotonic() + 15
    while True:
        t = smb_put(lab, host, src, "process-death.bin", timeout=10)
        if t.ok or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    t.check()
    assert sha256_of(lab.smb_share_path / "process-death.bin") == sha256_of(src)
    # the restarted a removes the address its dead process left, and gets it back from b
    a.start()
    a.wait_for(serving(host, "a"), 15, "a serving again")
    b.wait_for(lambda s: s["pair"]["addresses"][host]["role"] == "standby", 5, "b standby")
    nfs_put(lab, host, src, "after-process-death.bin").check()


def test_sync_link_cut_is_no_takeover(lab, pair, tmp_path):
    a, b = pair
    addr = lab.addresses
    lab.run(lab.ns_a, ["ip", "link", "set", "sync0", "down"], check=True)
    st = b.wait_for(lambda s: s["pair"]["peer_state"] == "link_down", 5, "b sees the link down")
    time.sleep(1.0)
    st = b.status()
    assert st["pair"]["peer_state"] == "link_down"
    assert st["pair"]["addresses"][addr.service_a]["role"] == "standby"
    assert st["pair"]["takeovers"] == []
    assert a.status()["pair"]["addresses"][addr.service_b]["role"] == "standby"
    (tmp_path / "x").write_bytes(b"both still served\n")
    for host in (addr.service_a, addr.service_b):
        smb_put(lab, host, tmp_path / "x", f"linkcut-{host}.txt", timeout=10).check()
    lab.run(lab.ns_a, ["ip", "link", "set", "sync0", "up"], check=True)
    b.wait_for(lambda s: s["pair"]["peer_state"] == "alive" and s["pair"]["link"]["state"] == "connected",
               10, "link back")


def test_sync_link_cut_before_any_heartbeat_is_no_takeover(lab):
    """b knows a only from the sync link (no heartbeat of a has reached b's heartbeat process yet) when
    the sync network is cut; a's heartbeats arrive on the service path 0.6 s later. The link's silence alone must not pass for a's death in between (with dead_after as the bound
    it did: a false takeover; the lab saw this after a start, a's service-path heartbeats taking 540 ms)."""
    a = NodeProcess(lab, "a", pair=True, log=lab.root / "pair-early-a.log")
    b = NodeProcess(lab, "b", pair=True, log=lab.root / "pair-early-b.log")
    # a's heartbeats dropped as they leave on both networks, everything else passes (this kernel has
    # no gact "drop" action: they are redirected to a veth that is down)
    lab.run(lab.ns_a, ["ip", "link", "add", "pphb0", "type", "veth", "peer", "name", "pphb1"], check=True)
    for dev in ("sync0", "eth0"):
        lab.run(lab.ns_a, ["tc", "qdisc", "add", "dev", dev, "clsact"], check=True)
        lab.run(lab.ns_a, ["tc", "filter", "add", "dev", dev, "egress", "protocol", "ip", "u32",
                           "match", "ip", "protocol", "17", "0xff", "match", "ip", "dport", "7402", "0xffff",
                           "action", "mirred", "egress", "redirect", "dev", "pphb0"], check=True)
    try:
        b.start()
        a.start()
        b.wait_for(lambda s: s["pair"]["link"]["state"] == "connected", 10, "b: link up")
        time.sleep(0.3)
        # both paths reported by b's heartbeat process (its first report may come after the link: on a
        # fast machine the link was up and the status had no paths yet), and neither has heard a
        paths = b.wait_for(lambda s: {"sync", "service"} <= set(s["pair"]["heartbeat"]["paths"]), 5,
                           "b's heartbeat process reporting both paths")["pair"]["heartbeat"]["paths"]
        assert not paths["sync"]["up"] and not paths["service"]["up"], paths
        lab.run(lab.ns_a, ["ip", "link", "set", "sync0", "down"], check=True)
        time.sleep(0.6)
        lab.run(lab.ns_a, ["tc", "qdisc", "del", "dev", "eth0", "clsact"], check=True)  # heartbeats flow there
        b.wait_for(lambda s: s["pair"]["heartbeat"]["paths"]["service"]["up"], 5, "b hears a on the service path")
        time.sleep(2.0)  # past link_only_dead_after (2 claim_waits) since the cut
        st = b.status()["pair"]
        assert st["takeovers"] == [], st["takeovers"]
        assert st["addresses"][lab.addresses.service_a]["held_by"] != "b", st["addresses"]
        assert st["peer_state"] == "alive" or st["peer_state"] == "link_down", st["peer_state"]
    finally:
        a.stop(10)
        b.stop(10)
        for dev in ("eth0", "sync0"):
            lab.run(lab.ns_a, ["tc", "qdisc", "del", "dev", dev, "clsact"], capture_output=True)
            lab.run(lab.ns_a, ["ip", "link", "set", dev, "up"])
        lab.run(lab.ns_a, ["ip", "link", "del", "pphb0"])


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def steady_usage(node) -> tuple[int, int]:
    """(file descriptors, trio tasks) of a node, the least of a few samples: short-lived tasks (a
    status request being answered, a probe, an ARP burst) come and go and are not leaks."""
    samples = []
    for _ in range(6):
        samples.append((fd_count(node.pid), node.status()["tasks"]))
        time.sleep(0.05)
    return min(s[0] for s in samples), min(s[1] for s in samples)


def test_repeated_failover_and_handback_without_leaks(lab, pair, tmp_path):
    a, b = pair
    host = lab.addresses.service_a
    (tmp_path / "x").write_bytes(b"cycle\n")
    baseline = None
    for cycle in range(10):
        a.kill_hard(link_down=True)
        b.wait_for(serving(host, "b"), 5, f"cycle {cycle}: b holding")
        smb_put(lab, host, tmp_path / "x", f"cycle-{cycle}.txt", timeout=15).check()
        a.link_up()
        a.start()
        a.wait_for(serving(host, "a"), 15, f"cycle {cycle}: a serving again")
        st = b.wait_for(lambda s: s["pair"]["addresses"][host]["role"] == "standby" and
                        s["pair"]["link"]["state"] == "connected", 5, f"cycle {cycle}: b standby")
        nfs_put(lab, host, tmp_path / "x", f"cycle-{cycle}.txt", timeout=15).check()
        links = lab.run(lab.ns_b, ["ip", "-o", "link"], capture_output=True, text=True).stdout
        assert "pp-a" not in links
        addrs = lab.run(lab.ns_b, ["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
        assert f"inet {host}/" not in addrs
        usage = steady_usage(b)
        if cycle == 1:
            baseline = usage
        elif cycle > 1:
            assert usage[0] <= baseline[0] + 2, f"file descriptors grow: {baseline} -> {usage}"
            assert usage[1] <= baseline[1] + 2, f"tasks grow: {baseline} -> {usage}"
    takeovers = len(b.status()["pair"]["takeovers"])
    assert takeovers >= 10
    # a wrong verdict (the restarted a stalling past dead_after on a loaded machine) may add one, but
    # only one that b undid at once because a turned out alive and serving
    assert takeovers - 10 <= (lab.root / "pair-b.log").read_text().count("was only late"), takeovers


def test_forged_sync_messages_change_nothing(lab, pair):
    a, b = pair
    before = b.status()["pair"]
    # a well-formed preamble and frame, but a MAC made without the pair's key: a forgery
    script = f"""
import os, socket, struct, hmac, hashlib, msgpack
s = socket.create_connection(("{lab.addresses.sync_b}", 7400), timeout=5)
payload = msgpack.packb({{"type": "handback_request", "address": "{lab.addresses.service_b}"}})
mac = hmac.new(os.urandom(32), struct.pack("!Q", 0) + payload, hashlib.sha256).digest()
frame = struct.pack("!Q", 0) + mac + payload
try:
    s.sendall(b"PPS\\x01" + os.urandom(16) + struct.pack("!I", len(frame)) + frame)
    s.recv(100)
except OSError:
    pass
"""
    cp = lab.run(lab.ns_a, [sys.executable, "-c", script], capture_output=True, text=True, timeout=20)
    assert cp.returncode == 0, cp.stderr
    st = b.wait_for(lambda s: sum(v for k, v in s["pair"]["link"]["counters"].items() if k.startswith("rejected")) >
                    sum(v for k, v in before["link"]["counters"].items() if k.startswith("rejected")), 5,
                    "the forgery counted")
    assert st["pair"]["addresses"] == before["addresses"]
    assert st["pair"]["link"]["state"] == "connected"
    assert a.status()["pair"]["addresses"][lab.addresses.service_a]["role"] == "serving"


def test_planned_stop_hands_over_without_waiting_for_the_detector(lab, pair):
    a, b = pair
    host = lab.addresses.service_a
    assert a.stop(15) == 0
    st = b.wait_for(serving(host, "b"), 5, "b holding a's address")
    assert "moved 10.77.0.1 here" in (lab.root / "pair-b.log").read_text()   # a live move (issue 11)
    takeover = st["pair"]["takeovers"][-1]
    assert takeover["silence_ms"] < 50, takeover   # told, not detected: no dead_after of silence
    a.start()
    a.wait_for(serving(host, "a"), 15, "a serving again")


def test_cleanup_removes_what_a_killed_node_left(lab, pair):
    a, b = pair
    host = lab.addresses.service_a
    a.kill_hard(link_down=False)
    out = lab.run(lab.ns_a, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"], capture_output=True, text=True).stdout
    assert f"inet {host}/" in out, "SIGKILL leaves the address in the kernel"
    cp = lab.run(lab.ns_a, [sys.executable, "-m", "proxy.cli", "cleanup", "-c", str(a.config)],
                 capture_output=True, text=True)
    assert cp.returncode == 0 and f"address {host} on eth0" in cp.stdout, cp.stdout + cp.stderr
    out = lab.run(lab.ns_a, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"], capture_output=True, text=True).stdout
    assert f"inet {host}/" not in out
    cp = lab.run(lab.ns_a, [sys.executable, "-m", "proxy.cli", "cleanup", "-c", str(a.config)],
                 capture_output=True, text=True)
    assert cp.returncode == 0 and "nothing left behind" in cp.stdout
    b.wait_for(serving(host, "b"), 5, "b holding a's address")
    a.start()
    a.wait_for(serving(host, "a"), 15, "a serving again")


def test_a_stalled_node_keeps_its_address_and_the_peer_lets_go(lab, pair, tmp_path):
    """A wrong verdict (a's process stalled past dead_after) must not leave two nodes serving."""
    import signal as signals

    a, b = pair
    host = lab.addresses.service_a
    a.signal(signals.SIGSTOP)
    try:
        b.wait_for(serving(host, "b"), 5, "b taking over the stalled node's address")
    finally:
        a.signal(signals.SIGCONT)
    st = b.wait_for(lambda s: s["pair"]["addresses"][host]["role"] == "standby", 5, "b letting go")
    assert st["pair"]["peer_state"] == "alive"
    assert a.status()["pair"]["addresses"][host]["role"] == "serving"
    assert lab.run(lab.ns_b, ["ip", "link", "show", "pp-a"], capture_output=True).returncode != 0
    assert "was only late" in (lab.root / "pair-b.log").read_text()
    (tmp_path / "x").write_bytes(b"after the stall\n")
    smb_put(lab, host, tmp_path / "x", "after-stall.txt", timeout=15).check()
