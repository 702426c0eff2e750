"""A hostile host next to a real pair (issue 8 tests, 8.1-8.4, and issue 9.1).

A namespace of its own ("<prefix>-x", made and removed here) is plugged into both lab bridges, the
sync network and the service network, like a compromised or curious host that has no key. From
there it sends what issue 8 lists: the one-segment killer, garbage, forged preambles and frames,
impossible lengths, 50 parallel connections trickling 1 MiB frames, and random and forged
datagrams at both probe ports and at the heartbeat port on both networks. The pair must not notice beyond its counters: no node exits, nobody
takes over, both keep serving (smbclient through each address), and status counts the rejects.

Then the operator's mistake of issue 9.1: the two nodes with different key files. The peer's
process answers but cannot be authenticated: nobody takes over, both say why.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from deploy.lab.clients import NodeProcess, serving

pytestmark = pytest.mark.lab

ATTACK_SECONDS = 4.0

# Runs in the attacker's namespace (no key). argv: seconds sync_a sync_b svc_a svc_b probe_port
ATTACK = r'''
import os, random, socket, struct, sys, threading, time
import msgpack

seconds = float(sys.argv[1])
syncs = [(sys.argv[2], 7400), (sys.argv[3], 7400)]
probes = [(sys.argv[4], int(sys.argv[6])), (sys.argv[5], int(sys.argv[6]))]
# issue 12: the heartbeat port on both networks too (forged heartbeats, garbage)
probes += [(host, 7402) for host in sys.argv[2:6]]
end = time.monotonic() + seconds
MAGIC = b"PPS\x02"
sent = {"killer": 0, "garbage": 0, "forged": 0, "impossible": 0, "trickle": 0, "datagrams": 0}
lock = threading.Lock()

def count(kind):
    with lock:
        sent[kind] += 1

def connect(target):
    s = socket.create_connection(target, timeout=2)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s

def one_shot(kind, target, payload):
    try:
        s = connect(target)
        s.sendall(payload)
        s.settimeout(1.5)
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass
        s.close()
        count(kind)
    except OSError:
        pass

def forged_frame():
    payload = msgpack.packb({"type": random.choice(["hello", "takeover", "handback_request", "leaving"]),
                             "name": "a", "mode": "stateless", "version": 1, "address": "10.77.0.2"})
    frame = struct.pack("!Q", 0) + os.urandom(32) + payload
    return struct.pack("!I", len(frame)) + frame

def shots():
    while time.monotonic() < end:
        for target in syncs:
            for magic in (MAGIC, b"PPS\x01"):  # this wire version, and the one before (8.1 was found there)
                one_shot("killer", target, magic + os.urandom(16) + b"\xff\xff\xff\xff")  # one segment
            one_shot("garbage", target, os.urandom(random.randint(1, 3000)))
            one_shot("forged", target, MAGIC + os.urandom(16) + forged_frame())
            one_shot("forged", target, b"PPS\x01" + os.urandom(16) + forged_frame())  # an old version
            for length in (0, 1, 39, (1 << 20) + 1, 0xFFFFFFFF):
                one_shot("impossible", target, MAGIC + os.urandom(16) + struct.pack("!I", length) + os.urandom(64))
        time.sleep(0.02)

def trickler(target, size):
    while time.monotonic() < end:
        try:
            s = connect(target)
            s.sendall(MAGIC + os.urandom(16) + struct.pack("!I", size))
            count("trickle")
            while time.monotonic() < end:
                s.sendall(os.urandom(1024))
                time.sleep(0.02)
        except OSError:
            time.sleep(0.05)

def datagrams():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.setblocking(False)
    while time.monotonic() < end:
        for target in probes:
            for _ in range(20):
                kind = random.random()
                if kind < 0.4:
                    data = os.urandom(random.randint(0, 200))
                elif kind < 0.8:
                    data = b"PPPROBE2Q" + os.urandom(32)  # well-formed, forged
                elif target[1] == 7402:
                    data = b"PPHB1" + random.choice([b"S", b"V"]) + os.urandom(56)  # forged heartbeats
                else:
                    data = b"PPPROBE2" + random.choice([b"A", b"U"]) + os.urandom(32)  # forged answers
                try:
                    u.sendto(data, target)
                    count("datagrams")
                except OSError:
                    pass
        time.sleep(0.004)  # ~10k datagrams/s: a flood for the responder, not a CPU DoS of the lab

threads = [threading.Thread(target=shots), threading.Thread(target=datagrams)]
threads += [threading.Thread(target=trickler, args=(syncs[i % 2], 1 << 20)) for i in range(50)]
for t in threads:
    t.daemon = True
    t.start()
for t in threads:
    t.join(seconds + 5)
print(" ".join(f"{k}={v}" for k, v in sent.items()))
'''


@pytest.fixture
def attacker(lab):
    """A namespace with eth0 on the service bridge and sync0 on the sync bridge, no key anywhere."""
    ns = f"{lab.prefix}-x"
    sw = lab.ns_switch

    def ip(*args, netns=None, check=True):
        argv = ["ip"] + (["-n", netns] if netns else []) + list(args)
        cp = subprocess.run(argv, capture_output=True, text=True)
        if check and cp.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {cp.stderr}")

    ip("netns", "del", ns, check=False)  # a leftover of an interrupted run
    ip("netns", "add", ns)
    try:
        ip("link", "set", "lo", "up", netns=ns)
        for ifname, port, bridge, address in (("eth0", "x-svc", "br-svc", "10.77.0.66/24"),
                                               ("sync0", "x-sync", "br-sync", "10.77.1.66/24")):
            ip("link", "add", ifname, "type", "veth", "peer", "name", port, "netns", sw, netns=ns)
            ip("link", "set", port, "master", bridge, netns=sw)
            ip("link", "set", port, "up", netns=sw)
            ip("addr", "add", address, "dev", ifname, netns=ns)
            ip("link", "set", ifname, "up", netns=ns)
        yield ns
    finally:
        ip("netns", "del", ns, check=False)  # removes both veth pairs with it
        for port in ("x-svc", "x-sync"):
            ip("link", "del", port, netns=sw, check=False)


@pytest.fixture
def pair(lab):
    a = NodeProcess(lab, "a", pair=True, log=lab.root / "hostile-a.log")
    b = NodeProcess(lab, "b", pair=True, log=lab.root / "hostile-b.log")
    try:
        b.start()
        a.start()
        wait_pair_up(lab, a, b)
        yield a, b
    finally:
        a.stop(10)
        b.stop(10)


def wait_pair_up(lab, a, b):
    addr = lab.addresses
    a.wait_for(serving(addr.service_a, "a"), 10, "a serving its address")
    b.wait_for(serving(addr.service_b, "b"), 10, "b serving its address")
    for node in (a, b):
        node.wait_for(lambda s: s["pair"]["link"]["state"] == "connected" and s["pair"]["peer_state"] == "alive",
                      10, "link up, peer alive")


def smb_ls(lab, host):
    cp = lab.smbclient(host, "ls")
    assert cp.returncode == 0 and "hello.txt" in cp.stdout, f"smbclient ls via {host}: {cp.stdout}{cp.stderr}"


def rejected(status):
    counters = status["pair"]["link"]["counters"]
    return {k: v for k, v in counters.items() if k.startswith("rejected") or k in ("stray_refused", "connection_errors")}


def test_hostile_host_on_both_networks_changes_nothing(lab, pair, attacker):
    a, b = pair
    addr = lab.addresses
    attack = subprocess.Popen(["ip", "netns", "exec", attacker, "nice", "-n", "19", sys.executable, "-c", ATTACK,
                               str(ATTACK_SECONDS), addr.sync_a, addr.sync_b, addr.service_a, addr.service_b,
                               "7401"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(ATTACK_SECONDS / 2)
        for host in (addr.service_a, addr.service_b):  # both keep serving during the attack
            smb_ls(lab, host)
        out, err = attack.communicate(timeout=ATTACK_SECONDS + 30)
    finally:
        if attack.poll() is None:
            attack.kill()
            attack.wait()
    assert attack.returncode == 0, err
    sent = dict(kv.split("=") for kv in out.split())
    assert int(sent["killer"]) > 10 and int(sent["trickle"]) >= 50 and int(sent["datagrams"]) > 1000, sent

    for node, own, other in ((a, addr.service_a, addr.service_b), (b, addr.service_b, addr.service_a)):
        assert node.proc.poll() is None, f"node {node.node} exited: {node.log.read_text()[-2000:]}"
        st = node.status()
        pair = st["pair"]
        assert pair["takeovers"] == [], pair["takeovers"]
        assert pair["addresses"][own]["held_by"] == node.node and pair["addresses"][own]["role"] == "serving"
        assert pair["addresses"][other]["role"] == "standby"
        assert pair["link"]["state"] == "connected" and pair["peer_state"] == "alive"
        counts = rejected(st)
        assert counts["rejected_too_large"] > 10 and counts["rejected_parse"] > 10, counts
        assert counts["rejected_auth"] > 0 and counts["connection_errors"] == 0, counts
        assert pair["probe"]["rejected"] > 100, pair["probe"]
        assert pair["link"]["unauthenticated_peak"] <= 8 + 4, pair["link"]
    for host in (addr.service_a, addr.service_b):
        smb_ls(lab, host)


def other_key_config(lab, node: str, tmp_path, claim_wait: str | None = None):
    """The lab's pair config of ``node``, but with a key file of its own (a rotation gone wrong)."""
    key = tmp_path / f"other-{node}.key"
    key.write_bytes(os.urandom(32).hex().encode() + b"\n")
    key.chmod(0o600)
    return edited_config(lab, node, tmp_path, "other-key", {str(lab.pair_key_path): str(key)}, claim_wait)


def edited_config(lab, node, tmp_path, name, replace, claim_wait=None, mode="stateless"):
    text = lab.node_config_path(node, pair=True, mode=mode).read_text()
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    if claim_wait:
        text = text.replace('[pair]\n', f'[pair]\nclaim_wait = "{claim_wait}"\n')
    config = tmp_path / f"pair-{node}-{name}.toml"
    config.write_text(text)
    return config


def start_together(*nodes):
    """Start the nodes at once, as a pair usually starts (each gives the other claim_wait to appear)."""
    errors = []

    def start(node):
        try:
            node.start()
        except Exception as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(node,)) for node in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def misconfigured(status):
    return status["pair"]["peer_state"] == "misconfigured"


@pytest.mark.parametrize("mistake", ["key", "mode"])
def test_different_key_files_or_modes_no_takeover_both_serve_their_own(lab, tmp_path, mistake):
    addr = lab.addresses
    # claim_wait 3 s: a loaded 2-core machine may start one node a second later than the other
    a = NodeProcess(lab, "a", config=edited_config(lab, "a", tmp_path, "wait", {}, "3s"),
                    log=lab.root / f"other{mistake}-a.log")
    b_config = other_key_config(lab, "b", tmp_path, "3s") if mistake == "key" else \
        edited_config(lab, "b", tmp_path, "stateful", {}, "3s", mode="stateful")
    b = NodeProcess(lab, "b", config=b_config, log=lab.root / f"other{mistake}-b.log")
    try:
        start_together(a, b)
        for node in (a, b):
            node.wait_for(misconfigured, 15, "peer misconfigured")
        # the heartbeats show the mistake within dead_after; each node claims its own address after claim_wait
        for node, own in ((a, addr.service_a), (b, addr.service_b)):
            node.wait_for(lambda s: s["pair"]["addresses"][own]["role"] == "serving", 15, "serving its own address")
        time.sleep(2)  # well past dead_after (100 ms) and claim_wait: a split brain would be there by now
        for node, own, other in ((a, addr.service_a, addr.service_b), (b, addr.service_b, addr.service_a)):
            assert node.proc.poll() is None
            st = node.status()
            pair = st["pair"]
            assert pair["peer_state"] == "misconfigured" and pair["takeovers"] == [], pair
            assert pair["addresses"][own]["held_by"] == node.node
            assert pair["addresses"][other]["role"] == "standby", pair["addresses"]
            why = "key_file" if mistake == "key" else "mode"
            assert pair["link"]["state"] == "refused" and why in pair["link"]["refused_reason"]
            assert pair["link"]["peer_refusal"]["kind"] == ("unauthenticated" if mistake == "key" else "misconfigured")
            if mistake == "key":
                assert pair["probe"]["answered"] == 0  # the peer's probes did not authenticate here
        for host in (addr.service_a, addr.service_b):
            smb_ls(lab, host)
        for node in (a, b):
            log = node.log.read_text()
            assert "peer cannot be paired with but is alive" in log and why in log
    finally:
        a.stop(10)
        b.stop(10)


def test_key_rotation_gone_wrong_is_no_split_brain(lab, pair, tmp_path):
    """Issue 9.1's report: pair up, b stopped (a takes b's address), b started with a new key file.
    b must not take a's address; each address has exactly one holder; both say why."""
    a, b = pair
    addr = lab.addresses
    b.stop(10)
    a.wait_for(serving(addr.service_b, "a"), 5, "a holding b's address")
    b2 = NodeProcess(lab, "b", config=other_key_config(lab, "b", tmp_path), log=lab.root / "rotated-b.log")
    try:
        b2.start()
        b2.wait_for(misconfigured, 10, "b: peer misconfigured")
        a.wait_for(misconfigured, 10, "a: peer misconfigured")
        time.sleep(3)
        sa, sb = a.status()["pair"], b2.status()["pair"]
        assert b2.proc.poll() is None and a.proc.poll() is None
        assert sa["addresses"][addr.service_a]["held_by"] == "a"
        assert sa["addresses"][addr.service_b]["held_by"] == "a"  # taken over while b was down
        assert sb["addresses"][addr.service_a]["role"] == "standby"  # b never took a's address
        assert sb["addresses"][addr.service_b]["role"] != "serving"  # a holds it: b must not serve it too
        assert sb["takeovers"] == [] and sb["peer_state"] == "misconfigured"
        assert sa["link"]["peer_refusal"]["kind"] == "unauthenticated"
        for host in (addr.service_a, addr.service_b):
            smb_ls(lab, host)
    finally:
        b2.stop(10)


# Runs in the attacker's namespace: segments spoofed from the client's 4-tuple towards the service
# address, none of which a blind attacker could place (argv: client_ip client_port server_ip server_port
# client_next_seq server_next_seq count). Far out-of-window data, ACKs and RSTs; RSTs inside the window
# but not exact (RFC 5961: a challenge ACK, no reset); SYNs on the live connection; and SYNs of fake
# handshakes from other ports of the client's address.
ATTACK_TCP = r'''
import os, random, socket, sys, time

from protocols.frames import ACK, PSH, RST, SYN, ipv4_tcp

cip, cport, sip, sport, cseq, sseq, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), \
    int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)  # IP_HDRINCL implied

def send(seq, ack, flags, payload=b"", src_port=cport):
    packet = ipv4_tcp(cip, sip, src_port, sport, seq, ack, flags, payload, window=65535, ident=random.randrange(65536))
    raw.sendto(packet, (sip, 0))

far = lambda base: base + (1 << 31) + random.randrange(1 << 30)  # > 2**30 away either way: in no window
sent = {"data_far": 0, "ack_far": 0, "rst_far": 0, "rst_in_window": 0, "syn_live": 0, "syn_fake": 0}
for i in range(count):
    kind = i % 6
    if kind == 0:
        send(far(cseq), sseq, PSH | ACK, os.urandom(random.randint(1, 200))); sent["data_far"] += 1
    elif kind == 1:
        send(far(cseq), far(sseq), ACK); sent["ack_far"] += 1
    elif kind == 2:
        send(far(cseq), 0, RST); sent["rst_far"] += 1
    elif kind == 3:
        send(cseq + random.randint(1000, 20000), 0, RST); sent["rst_in_window"] += 1
    elif kind == 4:
        send(random.randrange(1 << 32), 0, SYN); sent["syn_live"] += 1
    else:
        send(random.randrange(1 << 32), 0, SYN, src_port=random.randint(20000, 30000)); sent["syn_fake"] += 1
    if i % 50 == 49:
        time.sleep(0.005)
print(" ".join(f"{k}={v}" for k, v in sent.items()))
'''

REFUSALS = ("out_of_window", "rst_challenged", "rst_out_of_window", "syn_challenged")


def test_spoofed_segments_on_the_service_network_neither_steer_nor_stall_the_stateful_standby(lab, attacker,
                                                                                              tmp_path):
    """Issue 8, findings 6 and 7 on a real stateful pair, on a switch that floods only frames to the nodes:
    a host without the key spoofs the client's 4-tuple of a's SMB session with segments no blind attacker
    could place (far outside any window, RSTs in the window but not exact, SYNs on the live connection)
    and fake handshakes. Nobody takes over, b's observer answers throughout, b counts what it refused
    and keeps the connection; then a dies and b continues that same session."""
    from deploy.lab.clients import SmbHolder, established, takeover_settled

    addr = lab.addresses
    lab.flood("nodes")
    a = NodeProcess(lab, "a", pair=True, mode="stateful", log=tmp_path / "a.log")
    b = NodeProcess(lab, "b", pair=True, mode="stateful", log=tmp_path / "b.log")
    holder = None
    try:
        b.start(timeout=60)
        a.start(timeout=60)
        wait_pair_up(lab, a, b)
        b.wait_for(lambda s: s["pair"]["state_sync"]["observer"] == "running", 10, "b's observer running")
        holder = SmbHolder(lab, addr.service_a, "hostile-hold.bin")
        assert holder.do("write")["ok"]
        [client] = established(lab, addr.service_a, 445)

        def seen(s):
            conns = [c for c in s.get("connections", []) if c["client"] == client and c.get("tcp")]
            return conns[0] if conns and conns[0]["tcp"]["client_next_seq"] is not None else None

        before = b.wait_for(seen, 10, "b tracking a's SMB client")
        tcp = seen(before)["tcp"]
        sync = before["pair"]["state_sync"]
        timeouts = sync["observer_timeouts"]
        refused = {s["view"]: sum(s[k] for k in REFUSALS) for s in sync["snoopers"]}
        cip, cport = client.rsplit(":", 1)
        attack = subprocess.run(["ip", "netns", "exec", attacker, sys.executable, "-c", ATTACK_TCP, cip, cport,
                                 addr.service_a, "445", str(tcp["client_next_seq"]),
                                 str(tcp["server_next_seq"] or 0), "3000"],
                                capture_output=True, text=True, timeout=60)
        assert attack.returncode == 0, attack.stderr
        sent = dict(kv.split("=") for kv in attack.stdout.split())
        assert holder.do("write")["ok"]  # a's own kernel ignored them too
        after = b.wait_for(lambda s: seen(s) and sum(
            v[k] for v in s["pair"]["state_sync"]["snoopers"] if v["view"] == "peer_address" for k in REFUSALS)
            >= refused["peer_address"] + 2000, 10, "b counting the refused segments")
        peer_view = next(v for v in after["pair"]["state_sync"]["snoopers"] if v["view"] == "peer_address")
        print("sent:", sent, "b refused:", {k: peer_view[k] for k in REFUSALS})
        assert peer_view["rst_out_of_window"] >= int(sent["rst_far"]), peer_view
        assert peer_view["rst_challenged"] >= int(sent["rst_in_window"]), peer_view
        assert peer_view["syn_challenged"] >= int(sent["syn_live"]), peer_view
        assert peer_view["out_of_window"] >= int(sent["data_far"]) + int(sent["ack_far"]), peer_view
        for node in (a, b):
            st = node.status()
            assert node.proc.poll() is None and st["pair"]["takeovers"] == [], st["pair"]["takeovers"]
            assert st["pair"]["peer_state"] == "alive"
        assert after["pair"]["state_sync"]["observer_timeouts"] == timeouts
        # b's view of the connection went on with the real client, not the spoofer
        assert seen(after)["tcp"]["client_next_seq"] - tcp["client_next_seq"] < 1 << 24

        a.kill_hard(link_down=True)
        st = b.wait_for(takeover_settled(addr.service_a, "b"), 5, "b holding a's address")
        [record] = [c for c in st["pair"]["takeovers"][-1]["connections"] if c["client"] == client]
        assert record["continued"], record
        assert holder.do("write")["ok"]  # the same session, through b
        assert established(lab, addr.service_a, 445) == {client}
    finally:
        if holder is not None:
            holder.close()
        a.stop(10)
        b.stop(10)
        a.link_up()
        lab.flood(False)
