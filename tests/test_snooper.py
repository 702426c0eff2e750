"""capture.bpf and capture.snooper: the filter program, and a live snooper on a veth pair.

Two layers of checks:

* the BPF program run by a Python interpreter (``capture.bpf.interpret``) on scapy-built frames gives
  the same verdict as ``tcpdump -dd`` for the equivalent expression (property test);
* the program attached in the kernel: a Snooper in namespace A on one end of a veth pair, real TCP,
  UDP and ARP traffic from namespace B, and a 50 MB bulk transfer.

The namespaces are ``ppsn-<pid>-a``/``-b`` and are deleted by the fixture's finalizer, also when a
test fails; the traffic helpers are subprocesses owned (and killed) by PID.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import socket
import struct
import subprocess
import sys
import time

import pytest
import trio

from capture import bpf
from capture.snooper import Snooper

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, packet sockets)")

A_ADDR, A_OTHER, B_ADDR = "10.99.0.1", "10.99.0.3", "10.99.0.2"
PORTS = [5445, 5446]
OTHER_PORT = 5447
CLONE_NEWNET = 0x40000000


# ------------------------------------------------------------------------------- pure BPF tests
def _tcpdump_program(expr: str) -> list[bpf.Insn]:
    out = subprocess.run(["tcpdump", "-y", "EN10MB", "-dd", expr], capture_output=True, text=True,
                         check=True).stdout
    prog = []
    for line in out.splitlines():
        nums = line.strip().strip("{},").split(",")
        if len(nums) == 4:
            prog.append(bpf.Insn(*(int(n.strip(), 0) for n in nums)))
    return prog


def _expr(addrs: list[str], ports: list[int]) -> str:
    dh = " or ".join(f"dst host {a}" for a in addrs)
    sh = " or ".join(f"src host {a}" for a in addrs)
    dp = " or ".join(f"dst port {p}" for p in ports)
    sp = " or ".join(f"src port {p}" for p in ports)
    return f"tcp and ((({dh}) and ({dp})) or (({sh}) and ({sp})))"


def test_program_shape_and_pack():
    prog = bpf.tcp_service_filter(["10.0.0.1"], [445, 2049], vlan=False)
    blob = bpf.pack(prog)
    assert len(blob) == 8 * len(prog)
    assert bpf.unpack(blob) == prog
    # same instructions as tcpdump's for this expression (order differs; verdicts are checked below)
    ref = _tcpdump_program(_expr(["10.0.0.1"], [445, 2049]))
    assert {(i.code, i.k) for i in prog} == {(i.code, i.k) for i in ref}
    assert "ldxb     4*([14]&0xf)" in bpf.disassemble(prog)
    with pytest.raises(ValueError):
        bpf.tcp_service_filter([], [445])
    with pytest.raises(ValueError):
        bpf.tcp_service_filter(["10.0.0.1"] * 1 + ["10.0.0.%d" % i for i in range(2, 7)], [445])
    with pytest.raises(ValueError):
        bpf.tcp_service_filter(["10.0.0.1"], list(range(1, 10)))


def test_interpreter_agrees_with_tcpdump():
    """Random frames (hosts in/out of the set, TCP/UDP, ports, fragments, IP options, VLAN tag,
    truncation): our program and tcpdump's give the same verdict on every one."""
    from hypothesis import given, settings, strategies as st
    from scapy.layers.inet import IP, TCP, UDP, IPOption_NOP
    from scapy.layers.l2 import ARP, Dot1Q, Ether

    addrs = ["10.0.0.1", "10.0.0.9", "192.168.5.5"]
    ports = [445, 2049, 111, 20048]
    ours = bpf.tcp_service_filter(addrs, ports)
    plain = _tcpdump_program(_expr(addrs, ports))
    tagged = _tcpdump_program("vlan and " + _expr(addrs, ports))
    hosts = st.sampled_from(addrs + ["10.0.0.2", "10.0.0.100", "192.168.5.6"])
    port = st.sampled_from(ports + [1, 80, 444, 446, 2048, 65535])

    @settings(max_examples=600, deadline=None)
    @given(src=hosts, dst=hosts, sport=port, dport=port, proto=st.sampled_from(["tcp", "udp", "arp"]),
           frag=st.sampled_from([0, 0, 0, 1, 185]), mf=st.booleans(), opts=st.integers(0, 3),
           vlan=st.booleans(), cut=st.sampled_from([None, None, 20, 34, 40, 50]))
    def check(src, dst, sport, dport, proto, frag, mf, opts, vlan, cut):
        l2 = Ether(dst="02:00:00:00:00:01", src="02:00:00:00:00:02")
        if vlan:
            l2 = l2 / Dot1Q(vlan=7)
        if proto == "arp":
            pkt = l2 / ARP(psrc=src, pdst=dst)
        else:
            l4 = TCP(sport=sport, dport=dport) if proto == "tcp" else UDP(sport=sport, dport=dport)
            ip = IP(src=src, dst=dst, frag=frag, flags="MF" if mf else 0,
                    options=[IPOption_NOP()] * (4 * opts) if opts else [])
            pkt = l2 / ip / l4 / (b"x" * 10)
        frame = bytes(pkt)
        if cut is not None:
            frame = frame[:cut]
        want = bpf.interpret(tagged if vlan else plain, frame)
        assert bool(bpf.interpret(ours, frame)) == bool(want), (pkt.summary(), cut)

    check()


def test_peer_restricted_filter_agrees_with_tcpdump():
    """With ``peers`` (the standby's view of its peer's backend connections): only segments between
    the addresses and the peers, as tcpdump compiles it, frame by frame."""
    from hypothesis import given, settings, strategies as st
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Dot1Q, Ether

    backends, peers, ports = ["10.0.2.10", "10.0.2.11"], ["10.0.0.2"], [445, 2049]
    ours = bpf.tcp_service_filter(backends, ports, peers=peers)
    core = (f"((dst host {backends[0]} or dst host {backends[1]}) and (dst port 445 or dst port 2049) and "
            f"src host {peers[0]}) or ((src host {backends[0]} or src host {backends[1]}) and "
            f"(src port 445 or src port 2049) and dst host {peers[0]})")
    plain, tagged = _tcpdump_program(f"tcp and ({core})"), _tcpdump_program(f"vlan and tcp and ({core})")
    hosts = st.sampled_from(backends + peers + ["10.0.0.1", "10.0.2.12"])
    port = st.sampled_from(ports + [80, 800, 50000])

    @settings(max_examples=400, deadline=None)
    @given(src=hosts, dst=hosts, sport=port, dport=port, vlan=st.booleans())
    def check(src, dst, sport, dport, vlan):
        l2 = Ether() / Dot1Q(vlan=3) if vlan else Ether()
        frame = bytes(l2 / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport))
        want = bpf.interpret(tagged if vlan else plain, frame)
        assert bool(bpf.interpret(ours, frame)) == bool(want), (src, dst, sport, dport, vlan)

    check()
    with pytest.raises(ValueError):
        bpf.tcp_service_filter(backends, ports, peers=[])


# ------------------------------------------------------------------------------- namespaces
_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def in_netns(name: str):
    """Run the block with this thread in network namespace ``name``; sockets made there stay there."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(own)
        os.close(target)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Net:
    """Two namespaces joined by a veth pair: ``a`` (va: 10.99.0.1 and .3) and ``b`` (vb: 10.99.0.2)."""

    def __init__(self) -> None:
        self.a = f"ppsn-{os.getpid()}-a"
        self.b = f"ppsn-{os.getpid()}-b"
        self.procs: list[subprocess.Popen] = []

    def up(self) -> None:
        _ip("netns", "add", self.a)
        _ip("netns", "add", self.b)
        _ip("-n", self.a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", self.b)
        _ip("-n", self.a, "addr", "add", f"{A_ADDR}/24", "dev", "va")
        _ip("-n", self.a, "addr", "add", f"{A_OTHER}/24", "dev", "va")
        _ip("-n", self.b, "addr", "add", f"{B_ADDR}/24", "dev", "vb")
        for ns, dev in ((self.a, "va"), (self.b, "vb")):
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def down(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for ns in (self.a, self.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def spawn(self, ns: str, *args: str) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", TRAFFIC, *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        return p

    def tcp(self, addr: str, port: int, nbytes: int = 1000, client_sends: int = 100) -> None:
        """A listener in a sends ``nbytes`` to one client from b, which first sends ``client_sends``."""
        srv = self.spawn(self.a, "serve", addr, str(port), str(nbytes))
        assert srv.stdout.readline().strip() == "ready", srv.stderr.read()
        cli = self.spawn(self.b, "connect", addr, str(port), str(client_sends))
        out, err = cli.communicate(timeout=30)
        assert cli.returncode == 0, err
        assert int(out) == nbytes
        srv.communicate(timeout=30)
        assert srv.returncode == 0

    def oneshot(self, ns: str, *args: str) -> None:
        p = self.spawn(ns, *args)
        _out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err


TRAFFIC = r"""
import socket, sys
mode, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "serve":
    n = int(sys.argv[4])
    ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((addr, port)); ls.listen(1); print("ready", flush=True)
    c, _ = ls.accept()
    chunk = b"\xab" * (1 << 20)
    while n:
        n -= c.send(chunk[:min(n, len(chunk))])
    c.shutdown(socket.SHUT_WR)
    while c.recv(1 << 16):
        pass
elif mode == "connect":
    c = socket.create_connection((addr, port), timeout=20)
    c.sendall(b"q" * int(sys.argv[4]))
    got = 0
    while d := c.recv(1 << 20):
        got += len(d)
    c.close(); print(got)
elif mode == "refused":
    try:
        socket.create_connection((addr, port), timeout=5)
    except ConnectionRefusedError:
        pass
elif mode == "udp":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(5):
        s.sendto(b"u" * 100, (addr, port))
"""


@pytest.fixture(params=["ring", "recv"])
def path(request) -> str:
    """Every live test runs on both read paths: the TPACKET_V3 ring and the recv fallback."""
    return request.param


@pytest.fixture
def net():
    if shutil.which("ip") is None:
        pytest.skip("no ip(8)")
    n = Net()
    try:
        n.up()
        yield n
    finally:
        n.down()


def _decode(frame) -> tuple:
    """(ethertype, proto, src, sport, dst, dport, tcp payload length) of an Ethernet frame."""
    b = bytes(frame[:64])
    etype = struct.unpack_from("!H", b, 12)[0]
    if etype != 0x0800:
        return (etype, None, None, None, None, None, 0)
    ihl = (b[14] & 0xF) * 4
    total = struct.unpack_from("!H", b, 16)[0]
    proto = b[23]
    src, dst = socket.inet_ntoa(b[26:30]), socket.inet_ntoa(b[30:34])
    sport = dport = None
    plen = 0
    if proto in (6, 17):
        sport, dport = struct.unpack_from("!HH", b, 14 + ihl)
    if proto == 6:
        plen = total - ihl - (b[14 + ihl + 12] >> 4) * 4
    return (etype, proto, src, sport, dst, dport, plen)


class Recorder:
    def __init__(self, raise_first: int = 0) -> None:
        self.seen: list[tuple] = []
        self.raise_first = raise_first
        self.calls = 0

    def __call__(self, frame, ts: float) -> None:
        self.calls += 1
        assert isinstance(ts, float)
        if self.calls <= self.raise_first:
            raise ValueError("bad frame (test)")
        self.seen.append(_decode(frame))


async def _settle(sn: Snooper, quiet: float = 0.15) -> None:
    """Wait until no frame arrived for ``quiet`` seconds."""
    last = -1
    while sn.counters["frames"] != last:
        last = sn.counters["frames"]
        await trio.sleep(quiet)


def _control_socket() -> socket.socket:
    """An unfiltered packet socket: proves that the traffic the snooper must not see was there."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.bind(("va", 0x0003))
    s.setblocking(False)
    return s


def _drain(s: socket.socket) -> list[tuple]:
    out = []
    while True:
        try:
            out.append(_decode(s.recv(1 << 17)))
        except BlockingIOError:
            return out


async def test_filter_live(net: Net, path: str):
    rec = Recorder()
    with in_netns(net.a):
        sn = Snooper("va", [A_ADDR], PORTS, rec, ring=path == "ring")
        ctl = _control_socket()
    assert sn.path == path
    with sn, ctl:
        async with trio.open_nursery() as nursery:
            await nursery.start(sn.run)
            _ip("-n", net.b, "neigh", "flush", "all")  # so ARP happens while we watch
            await trio.to_thread.run_sync(net.tcp, A_ADDR, PORTS[0], 5000, 300)   # match (both ways)
            await trio.to_thread.run_sync(net.tcp, A_ADDR, PORTS[1], 10, 0)       # match, 2nd port
            await trio.to_thread.run_sync(net.tcp, A_OTHER, PORTS[0], 1000, 10)   # other address
            await trio.to_thread.run_sync(net.tcp, A_ADDR, OTHER_PORT, 1000, 10)  # other port
            await trio.to_thread.run_sync(net.oneshot, net.b, "udp", A_ADDR, str(PORTS[0]))
            await trio.to_thread.run_sync(net.oneshot, net.b, "refused", A_ADDR, "5999")
            # a connects out from A_ADDR to b's port 5445: neither direction matches
            # (dst host is b going out; src host is b coming back)
            srv = net.spawn(net.b, "serve", B_ADDR, str(PORTS[0]), "100")
            assert srv.stdout.readline().strip() == "ready"
            await trio.to_thread.run_sync(net.oneshot, net.a, "connect", B_ADDR, str(PORTS[0]), "5")
            await trio.to_thread.run_sync(srv.wait)
            await _settle(sn)
            nursery.cancel_scope.cancel()
        control = _drain(ctl)
        st = sn.stats()

    assert rec.seen, "nothing delivered"
    assert all(f[0] == 0x0800 and f[1] == 6 for f in rec.seen), "non-TCP frame delivered"
    for _et, _p, src, sport, dst, dport, _l in rec.seen:
        assert (dst == A_ADDR and dport in PORTS) or (src == A_ADDR and sport in PORTS)
    inbound = [f for f in rec.seen if f[4] == A_ADDR]
    outbound = [f for f in rec.seen if f[2] == A_ADDR]
    assert {f[5] for f in inbound} == set(PORTS) and {f[3] for f in outbound} == set(PORTS)
    # outgoing frames of the snooping namespace itself, with their payload
    assert sum(f[6] for f in outbound if f[3] == PORTS[0]) == 5000
    assert sum(f[6] for f in inbound if f[5] == PORTS[0]) == 300
    # what the filter dropped was really on the wire
    assert any(f[0] == 0x0806 for f in control), "no ARP seen by the control socket"
    assert any(f[1] == 17 for f in control)
    assert any(f[4] == A_OTHER for f in control)
    assert any(f[5] == OTHER_PORT for f in control)
    assert any(f[2] == A_ADDR and f[5] == PORTS[0] and f[4] == B_ADDR for f in control)
    matching = [f for f in control if f[1] == 6 and
                ((f[4] == A_ADDR and f[5] in PORTS) or (f[2] == A_ADDR and f[3] in PORTS))]
    assert len(matching) == len(rec.seen)
    assert st["frames"] == len(rec.seen) and st["kernel_drops"] == 0 and st["truncated"] == 0
    assert st["callback_errors"] == 0 and st["batches"] >= 1
    assert st["kernel_packets"] >= st["frames"]
    assert st["rcvbuf"] >= 8 << 20


async def test_bulk_transfer(net: Net, path: str):
    size = 50_000_000
    payload = {"out": 0, "retransmitted": 0}
    frames = {"n": 0}
    highest: dict = {}  # per outgoing stream: the highest sequence number seen (relative to the first)

    def on_frame(frame, ts):
        frames["n"] += 1
        f = _decode(frame)
        if f[2] == A_ADDR and f[6]:
            # count each byte once: a retransmitted segment is a real frame on the wire, but not new data
            b = bytes(frame[:64])
            ihl = (b[14] & 0xF) * 4
            seq = struct.unpack_from("!I", b, 14 + ihl + 4)[0]
            key = (f[3], f[5])
            base, top = highest.setdefault(key, (seq, seq))
            end = (seq - base + f[6]) % (1 << 32)
            new = max(0, end - ((top - base) % (1 << 32)))
            payload["out"] += new
            payload["retransmitted"] += f[6] - new
            if new:
                highest[key] = (base, (base + end) % (1 << 32))

    with in_netns(net.a):
        sn = Snooper("va", [A_ADDR], PORTS, on_frame, ring=path == "ring")
    assert sn.path == path
    with sn:
        async with trio.open_nursery() as nursery:
            await nursery.start(sn.run)
            t0 = time.monotonic()
            await trio.to_thread.run_sync(net.tcp, A_ADDR, PORTS[0], size, 0)
            elapsed = time.monotonic() - t0
            await _settle(sn)
            nursery.cancel_scope.cancel()
        st = sn.stats()
    print(f"bulk: {size / elapsed / 1e6:.0f} MB/s, {st}, retransmitted {payload['retransmitted']} B")
    assert st["truncated"] == 0
    assert st["bytes"] >= size
    assert st["kernel_packets"] == st["frames"] + st["kernel_drops"]
    if st["kernel_drops"] == 0:
        assert payload["out"] == size
        assert st["frames"] == frames["n"]
    else:  # reported, and everything else accounted for
        assert payload["out"] < size


async def test_callback_errors_counted(net: Net, caplog, path: str):
    rec = Recorder(raise_first=3)
    with in_netns(net.a):
        sn = Snooper("va", [A_ADDR], PORTS, rec, batch=2, ring=path == "ring")
    assert sn.path == path
    with sn:
        async with trio.open_nursery() as nursery:
            await nursery.start(sn.run)
            await trio.to_thread.run_sync(net.tcp, A_ADDR, PORTS[0], 20000, 50)
            await _settle(sn)
            nursery.cancel_scope.cancel()
        st = sn.stats()
    assert st["callback_errors"] == 3
    assert len(rec.seen) == st["frames"] - 3 > 3
    assert sum(1 for r in caplog.records if "on_frame raised ValueError" in r.getMessage()) == 1



async def test_a_link_down_costs_no_cpu_and_the_frames_come_again_when_it_is_up(net: Net, caplog, path: str):
    """The interface goes down under a running snooper: the kernel sets ENETDOWN on the socket, which
    then polls ready until the error is read. The ring path never read it and spun: a full core while
    the link was down (a stateful node's observer, 0.98 s of CPU per second). Now the error is read and
    said, the loop waits, and once the link is up again the frames come as before."""
    rec = Recorder()
    with in_netns(net.a):
        sn = Snooper("va", [A_ADDR], PORTS, rec, ring=path == "ring")
    with sn:
        async with trio.open_nursery() as nursery:
            await nursery.start(sn.run)
            await trio.to_thread.run_sync(net.tcp, A_ADDR, PORTS[0], 100, 10)
            await _settle(sn)
            before = sn.counters["frames"]
            assert before > 0
            _ip("-n", net.a, "link", "set", "va", "down")
            await trio.sleep(0.05)  # the error arrives
            cpu = time.process_time()
            await trio.sleep(0.5)
            spent = time.process_time() - cpu
            _ip("-n", net.a, "link", "set", "va", "up")
            await trio.sleep(0.2)  # the veth pair's carrier is back
            await trio.to_thread.run_sync(net.tcp, A_ADDR, PORTS[0], 100, 10)
            await _settle(sn)
            nursery.cancel_scope.cancel()
    assert spent < 0.05, f"{spent:.3f} s of CPU in 0.5 s with the link down"
    assert sn.counters["frames"] > before
    if path == "ring":
        assert any("Network is down" in r.getMessage() for r in caplog.records)

def test_close_is_idempotent_and_bad_interface(net: Net, path: str):
    with in_netns(net.a):
        sn = Snooper("va", [A_ADDR], PORTS, lambda f, t: None, ring=path == "ring")
        with pytest.raises(OSError):
            Snooper("nonexistent0", [A_ADDR], PORTS, lambda f, t: None, ring=path == "ring")
    assert sn.path == path and (sn.ring_bytes > 0) == (path == "ring")
    sn.close()
    sn.close()
    assert sn.sock is None


async def test_ring_refused_falls_back_to_recv(net: Net):
    """A ring the kernel refuses (a block size it rejects) leaves the snooper on recv, which works,
    and says why; the ring's timestamps are the kernel's receive times."""
    seen: list[float] = []
    with in_netns(net.a):
        sn = Snooper("va", [A_ADDR], PORTS, lambda f, ts: seen.append(ts), block_size=1 << 31)
        ok = Snooper("va", [A_ADDR], PORTS, lambda f, ts: seen.append(ts))
    assert sn.path == "recv" and sn.ring_error and "blocks of 2147483648 bytes" in sn.ring_error
    assert ok.path == "ring" and ok.ring_error is None
    with sn, ok:
        async with trio.open_nursery() as nursery:
            await nursery.start(sn.run)
            await nursery.start(ok.run)
            t0 = time.time()
            await trio.to_thread.run_sync(net.tcp, A_ADDR, PORTS[0], 3000, 10)
            await _settle(sn)
            await _settle(ok)
            nursery.cancel_scope.cancel()
        a, b = sn.stats(), ok.stats()
    assert a["frames"] == b["frames"] > 5 and a["bytes"] == b["bytes"]
    assert (a["path"], b["path"]) == ("recv", "ring") and b["ring_bytes"] >= 8 << 20
    assert all(t0 - 1 < t < time.time() + 1 for t in seen)
