"""proxy.tcprepair: a live TCP connection frozen in one socket and continued in another, on the real kernel.

* unit: the wire form round-trips through msgpack, and every bad field is refused with its name;
* one namespace: a server socket with bytes in both queues (unread received bytes, sent-but-unacked and
  never-sent bytes) is frozen, closed silently and restored; the client never notices;
* two "nodes" on a bridge: the socket moves from node A to node B with the service address, as a planned
  move will (issue 11); the client never notices;
* the failover shape (issue 10): node A's link goes down and B continues from what frames show (sequence
  numbers, options, a timestamp; no window, empty queues);
* restores that must fail (the 4-tuple still in use; a window the kernel refuses) fail with the step and
  errno and leave no socket behind.

"The client never notices" is measured, not assumed: each direction carries random bytes whose sha256 and
count the receiver checks (every byte exactly once), the client's socket never raises, and the kernels'
own counters show no reset sent (``OutRsts``) and, on the client, no established connection ended
(``EstabResets``; on the old holder a silent close counts there too, although nothing is sent).

Namespaces are ``<lab prefix>tr-<pid>-*`` (the lab prefix is ``PAIRPROXY_TEST_LAB``, default ``ppt``),
deleted by the fixtures' finalizers also when a test fails. Everything runs in this process: sockets are made in a namespace by
switching the thread into it (``in_netns``) and stay there.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import selectors
import shutil
import socket
import struct
import subprocess
import time
from dataclasses import replace

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from proxy import tcprepair
from proxy.tcprepair import RepairWindow, TcpRepairError, TcpSocketState
from tests.test_snooper import in_netns

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, TCP_REPAIR)")

PREFIX = os.environ.get("PAIRPROXY_TEST_LAB", "ppt") + "tr"
SERVICE = "10.98.1.1"
PORT = 5101
CHUNK = 64 * 1024


# ------------------------------------------------------------------------------- unit: the wire form
def _state(**over) -> TcpSocketState:
    base = dict(local_address="10.0.0.1", local_port=445, remote_address="10.0.0.9", remote_port=50000,
                send_seq=100, recv_seq=4_000_000_000, send_queue=b"s" * 10, send_unsent=4, recv_queue=b"r" * 7,
                mss=1460, snd_wscale=7, rcv_wscale=10, sack_permitted=True, timestamps=True, tsval=123456,
                window=RepairWindow(snd_wl1=4_000_000_000, snd_wnd=65536, max_window=65536, rcv_wnd=32768,
                                    rcv_wup=4_000_000_007))
    base.update(over)
    return TcpSocketState(**base)


u32 = st.integers(0, 2**32 - 1)
ipv4 = st.integers(1, 2**32 - 2).map(lambda n: socket.inet_ntoa(n.to_bytes(4, "big"))).filter(
    lambda a: not 224 <= int(a.split(".")[0]) <= 239)


@st.composite
def states(draw) -> TcpSocketState:
    send_queue = draw(st.binary(max_size=300))
    recv_queue = draw(st.binary(max_size=300))
    recv_seq = draw(u32)
    rcv_nxt = (recv_seq + len(recv_queue)) % 2**32
    window = None
    if draw(st.booleans()):
        snd_wnd = draw(u32)
        window = RepairWindow(snd_wl1=draw(u32), snd_wnd=snd_wnd, max_window=draw(st.integers(snd_wnd, 2**32 - 1)),
                              rcv_wnd=draw(u32), rcv_wup=(rcv_nxt - draw(st.integers(0, 2**20))) % 2**32)
    return TcpSocketState(
        local_address=draw(ipv4), local_port=draw(st.integers(1, 65535)), remote_address=draw(ipv4),
        remote_port=draw(st.integers(1, 65535)), send_seq=draw(u32), recv_seq=recv_seq, send_queue=send_queue,
        send_unsent=draw(st.integers(0, len(send_queue))), recv_queue=recv_queue, mss=draw(st.integers(64, 65535)),
        snd_wscale=draw(st.integers(0, 14)), rcv_wscale=draw(st.integers(0, 14)), sack_permitted=draw(st.booleans()),
        timestamps=draw(st.booleans()), tsval=draw(u32), window=window)


@settings(max_examples=300, deadline=None)
@given(states())
def test_wire_round_trip(state):
    packed = msgpack.packb(state.to_wire(), use_bin_type=True)
    assert TcpSocketState.from_wire(msgpack.unpackb(packed, raw=False)) == state


# (field, bad value): every field has at least one wrong type and one out-of-range value
BAD_FIELDS = [
    ("local_address", "10.0.0.256"), ("local_address", 167772161), ("local_address", "0.0.0.0"),
    ("local_address", "::1"), ("remote_address", "224.0.0.1"), ("remote_address", None),
    ("remote_address", "255.255.255.255"),
    ("local_port", 0), ("local_port", 65536), ("local_port", "445"), ("remote_port", -1), ("remote_port", True),
    ("remote_port", 1.5),
    ("send_seq", -1), ("send_seq", 2**32), ("send_seq", "1"), ("recv_seq", 2**32), ("recv_seq", None),
    ("send_queue", "text"), ("send_queue", None), ("send_queue", [1, 2]), ("recv_queue", "x"), ("recv_queue", None),
    ("recv_queue", 5),
    ("send_unsent", 11), ("send_unsent", -1), ("send_unsent", False),
    ("mss", 0), ("mss", 63), ("mss", 65536), ("mss", "1460"),
    ("snd_wscale", 15), ("snd_wscale", -1), ("rcv_wscale", 15), ("rcv_wscale", None),
    ("sack_permitted", 1), ("sack_permitted", "yes"), ("timestamps", 0), ("timestamps", None),
    ("tsval", -1), ("tsval", 2**32), ("tsval", 1.0),
    ("window", [1, 2, 3, 4]), ("window", "big"), ("window", {"snd_wnd": 1}),
    ("window.snd_wl1", [-1, 1, 1, 1, 1]), ("window.snd_wnd", [1, 2**32, 2**32, 1, 1]),
    ("window.max_window", [1, 100, 99, 1, 4_000_000_007]), ("window.rcv_wnd", [1, 1, 1, "x", 4_000_000_007]),
    ("window.rcv_wup", [1, 1, 1, 1, 4_000_000_008]), ("window.rcv_wup", [1, 1, 1, 1, True]),
]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(BAD_FIELDS))
def test_every_bad_field_is_refused_by_name(bad):
    name, value = bad
    wire = _state().to_wire()
    wire[name.split(".")[0]] = value
    with pytest.raises(ValueError) as err:
        TcpSocketState.from_wire(msgpack.unpackb(msgpack.packb(wire, use_bin_type=True), raw=False))
    assert str(err.value).startswith(f"{name}:"), str(err.value)


def test_bad_shapes_and_bounds_are_refused():
    good = _state().to_wire()
    cases = [
        ([1, 2], "tcp state:"),
        ({**good, "v": 2}, "v:"),
        ({k: v for k, v in good.items() if k != "v"}, "v:"),
        ({k: v for k, v in good.items() if k != "mss"}, "mss: missing"),
        ({**good, "colour": 1}, "colour: unknown field"),
        ({**good, 7: 1}, "unknown key 7"),
    ]
    for data, message in cases:
        with pytest.raises(ValueError, match=f"^{message}"):
            TcpSocketState.from_wire(data)
    with pytest.raises(ValueError, match="^recv_queue: 7 bytes is over the bound of 6"):
        TcpSocketState.from_wire({**good, "send_queue": b"s" * 6, "send_unsent": 0}, max_queue=6)
    with pytest.raises(ValueError, match="^send_queue: 10 bytes is over the bound of 9"):
        _state().to_wire(max_queue=9)
    with pytest.raises(ValueError, match="^window.max_window:"):
        _state(window=RepairWindow(1, 10, 9, 1, 1))
    # the receive end wraps around 2**32: rcv_wup just before it is fine, just after is not
    wrapped = _state(recv_seq=2**32 - 3, recv_queue=b"abcdef", window=RepairWindow(0, 1, 1, 1, 3))
    assert wrapped.rcv_nxt == 3
    with pytest.raises(ValueError, match="^window.rcv_wup: 4 is after the receive end 3"):
        replace(wrapped, window=RepairWindow(0, 1, 1, 1, 4))


# ------------------------------------------------------------------------------- namespaces
def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def tcp_counters() -> dict[str, int]:
    """The calling thread's namespace's TCP MIB (``/proc/net/snmp``, ``Tcp:`` lines)."""
    with open("/proc/thread-self/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Tcp:")]
    return dict(zip(rows[0][1:], map(int, rows[1][1:])))


class Namespaces:
    """Namespaces named ``<PREFIX>-<pid>-<role>``; :meth:`down` deletes every one that was made."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}

    def add(self, role: str) -> str:
        name = f"{PREFIX}-{os.getpid()}-{role}"
        subprocess.run(["ip", "netns", "del", name], capture_output=True)  # left by a crashed run
        _ip("netns", "add", name)
        self.names[role] = name
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    def __getitem__(self, role: str) -> str:
        return self.names[role]

    def down(self) -> None:
        for name in self.names.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def namespaces():
    if shutil.which("ip") is None:
        pytest.skip("no ip(8)")
    ns = Namespaces()
    try:
        yield ns
    finally:
        ns.down()


def bridge_lab(ns: Namespaces, hosts: dict[str, int], service_on: str) -> dict[str, str]:
    """Namespaces (role -> host number: ``eth0`` is 10.98.1.<host>/24), each with ``eth0`` on a bridge in
    namespace ``sw``; SERVICE also on ``service_on``. Returns each one's MAC.

    A bridge, not a plain veth pair, so that a client whose link goes down makes the node's segments
    vanish on the way (sent, never acknowledged); over a veth pair the sender's own transmit would fail
    and the bytes would stay unsent."""
    sw = ns.add("sw")
    _ip("-n", sw, "link", "add", "br0", "type", "bridge")
    _ip("-n", sw, "link", "set", "br0", "up")
    macs = {}
    for role, host in hosts.items():
        name = ns.add(role)
        _ip("-n", sw, "link", "add", f"p{role}", "type", "veth", "peer", "name", "eth0", "netns", name)
        _ip("-n", sw, "link", "set", f"p{role}", "master", "br0", "up")
        _ip("-n", name, "addr", "add", f"10.98.1.{host}/24", "dev", "eth0")
        _ip("-n", name, "link", "set", "eth0", "up")
        out = subprocess.run(["ip", "-n", name, "-j", "link", "show", "eth0"], capture_output=True, text=True,
                             check=True).stdout
        macs[role] = json.loads(out)[0]["address"]
    _ip("-n", ns[service_on], "addr", "add", f"{SERVICE}/24", "dev", "eth0")
    return macs


def pair_lab(ns: Namespaces) -> None:
    """Server namespace ``n`` (SERVICE) and client namespace ``c``."""
    bridge_lab(ns, {"n": 11, "c": 100}, "n")


def nodes_lab(ns: Namespaces) -> dict[str, str]:
    """Node namespaces ``a`` (SERVICE) and ``b``, client namespace ``c``. Returns each one's MAC."""
    return bridge_lab(ns, {"a": 11, "b": 12, "c": 100}, "a")


# ------------------------------------------------------------------------------- a checked byte stream
class End:
    """One end of a connection in the test: sends ``out`` (random bytes), hashes what it receives."""

    def __init__(self, sock: socket.socket, out: bytes) -> None:
        self.sock = sock
        self.out = out
        self.sent = 0
        self.got = 0
        self.digest = hashlib.sha256()
        self.reading = True
        self.writing = True
        sock.setblocking(False)

    def swap(self, sock: socket.socket) -> None:
        """Go on with a restored socket: what was written to the old one moved with it."""
        self.sock = sock
        sock.setblocking(False)


def connect(server_ns: str, client_ns: str, size: int, port: int = PORT) -> tuple[End, End]:
    """A client in ``client_ns`` connected to SERVICE:port in ``server_ns``: (client end, server end)."""
    with in_netns(server_ns):
        lsock = socket.socket()
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((SERVICE, port))
        lsock.listen(8)
    with in_netns(client_ns):
        client = socket.socket()
        # a small receive window: the server can then have bytes it may not send yet (see load_queues)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        client.settimeout(5)
        client.connect((SERVICE, port))
    server, _ = lsock.accept()
    lsock.close()
    return End(client, os.urandom(size)), End(server, os.urandom(size))


def pump(ends: list[End], *, until=None, seconds: float = 20.0) -> None:
    """Move bytes for the ends that read/write until ``until()`` (or, without it, for ``seconds``)."""
    deadline = time.monotonic() + seconds
    sel = selectors.DefaultSelector()
    try:
        while time.monotonic() < deadline:
            if until is not None and until():
                return
            sel_map = {}
            for e in ends:
                mask = (selectors.EVENT_READ if e.reading else 0) | (
                    selectors.EVENT_WRITE if e.writing and e.sent < len(e.out) else 0)
                if mask:
                    sel.register(e.sock, mask, e)
                    sel_map[e.sock] = e
            if not sel_map:
                return
            for key, mask in sel.select(timeout=min(0.05, max(0.0, deadline - time.monotonic()))):
                e = key.data
                if mask & selectors.EVENT_READ:
                    data = e.sock.recv(CHUNK)  # an error here is the client noticing: the test fails
                    assert data, "peer closed the connection"
                    e.got += len(data)
                    e.digest.update(data)
                if mask & selectors.EVENT_WRITE:
                    try:
                        e.sent += e.sock.send(e.out[e.sent:e.sent + CHUNK])
                    except BlockingIOError:
                        pass
            for s in sel_map:
                sel.unregister(s)
        if until is not None:
            raise AssertionError(f"timed out: {[(e.sent, e.got) for e in ends]}")
    finally:
        sel.close()


def finish(client: End, server: End) -> None:
    """Both ways to the end; then every byte arrived exactly once, in order."""
    for e in (client, server):
        e.reading = e.writing = True
    pump([client, server], until=lambda: client.got == len(server.out) and server.got == len(client.out))
    assert client.digest.hexdigest() == hashlib.sha256(server.out).hexdigest()
    assert server.digest.hexdigest() == hashlib.sha256(client.out).hexdigest()
    assert client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    assert client.sock.getsockopt(socket.IPPROTO_TCP, tcprepair.TCP_INFO, 1)[0] == tcprepair.TCP_ESTABLISHED


def load_queues(client: End, server: End, link: tuple[str, str]) -> None:
    """Leave bytes in every part of the server socket's queues, as a live connection has them:
    unread received bytes (the server stops reading), sent-but-unacknowledged bytes (the client's link goes
    down while the server sends) and never-sent bytes (beyond the client's small receive window).
    Returns with the client's link down: nothing reaches the server socket until the caller brings it up."""
    server.reading = server.writing = False
    pump([client, server], seconds=0.3)
    client.writing = False
    client.reading = False
    _ip("-n", link[0], "link", "set", link[1], "down")
    server.writing = True
    pump([server], seconds=0.3)


def assert_queues_loaded(state: TcpSocketState) -> None:
    assert len(state.recv_queue) > 0, "no unread bytes in the receive queue"
    assert state.send_unsent > 0, "no never-sent bytes in the send queue"
    assert len(state.send_queue) - state.send_unsent > 0, "no sent-but-unacknowledged bytes"


# ------------------------------------------------------------------------------- kernel tests
@needs_root
@pytest.mark.parametrize("resend_unacked", [False, True], ids=["booked", "resent"])
def test_freeze_close_restore_in_one_namespace(namespaces, resend_unacked):
    """Both ways of putting back the bytes in flight deliver every byte once. Here the remote lost them all
    (its link was down), which is the one case where ``resend_unacked`` is safe; booked, they wait for the
    retransmission timer."""
    pair_lab(namespaces)
    n, c = namespaces["n"], namespaces["c"]
    client, server = connect(n, c, 3_000_000)
    pump([client, server], until=lambda: client.got > 200_000 and server.got > 200_000)
    with in_netns(n):
        n_before = tcp_counters()
    with in_netns(c):
        c_before = tcp_counters()

    load_queues(client, server, (c, "eth0"))
    _ip("-n", n, "addr", "del", f"{SERVICE}/24", "dev", "eth0")  # nothing reaches the socket until restored
    _ip("-n", c, "link", "set", "eth0", "up")
    state = tcprepair.freeze(server.sock)
    assert_queues_loaded(state)
    assert (state.local_address, state.local_port) == (SERVICE, PORT)
    assert state.mss == 1460 and state.timestamps and state.sack_permitted
    tcprepair.close_silently(server.sock)
    with in_netns(n):
        restored = tcprepair.restore_quiet(state, resend_unacked=resend_unacked)
    _ip("-n", n, "addr", "add", f"{SERVICE}/24", "dev", "eth0")
    server.swap(restored.go_live())
    # a listener can take the port while the restored connection lives (a node restarted after a crash
    # while the kernel still holds the connections it had moved in)
    assert server.sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
    with in_netns(n):
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((SERVICE, PORT))
        listener.listen()
        listener.close()
    # full-size segments (the clamp less the timestamp option), not the 536-byte default
    assert server.sock.getsockopt(socket.IPPROTO_TCP, tcprepair.TCP_MAXSEG) == state.mss - 12

    started = time.monotonic()
    finish(client, server)
    print(f"resend_unacked={resend_unacked}: rest of the transfer {time.monotonic() - started:.3f} s")
    with in_netns(n):
        assert tcp_counters()["OutRsts"] == n_before["OutRsts"]
    with in_netns(c):
        after = tcp_counters()
        assert after["EstabResets"] == c_before["EstabResets"]
        assert after["OutRsts"] == c_before["OutRsts"]
    client.sock.close()
    server.sock.close()


def move(sock: socket.socket, node_from: str, node_to: str,
         timings: dict[str, list[float]]) -> tuple[tcprepair.RestoredSocket, TcpSocketState]:
    """Freeze on one node, ship as msgpack, close silently, restore (quiet) on the other; the address
    and ``go_live`` are the caller's."""
    t0 = time.perf_counter()
    with in_netns(node_from):
        state = tcprepair.freeze(sock)
    t1 = time.perf_counter()
    wire = msgpack.packb(state.to_wire(), use_bin_type=True)
    received = TcpSocketState.from_wire(msgpack.unpackb(wire, raw=False))
    t2 = time.perf_counter()
    tcprepair.close_silently(sock)
    with in_netns(node_to):
        new = tcprepair.restore_quiet(received)
    t3 = time.perf_counter()
    timings["freeze"].append(t1 - t0)
    timings["serialise"].append(t2 - t1)
    timings["restore"].append(t3 - t2)
    timings["bytes"].append(len(wire))
    return new, received


def move_address(ns: Namespaces, macs: dict[str, str], frm: str, to: str) -> None:
    """The service address's half of a move: it goes after the sockets have been restored (see tcprepair)."""
    import trio

    from proxy.arp import announce

    _ip("-n", ns[to], "addr", "add", f"{SERVICE}/24", "dev", "eth0")
    with in_netns(ns[to]):
        trio.run(announce, "eth0", macs[to], SERVICE, 1)


def client_neighbour(ns: Namespaces) -> str:
    out = subprocess.run(["ip", "-n", ns["c"], "neigh", "show", SERVICE, "dev", "eth0"],
                         capture_output=True, text=True, check=True).stdout.split()
    return out[out.index("lladdr") + 1] if "lladdr" in out else ""


@needs_root
def test_move_between_nodes(namespaces):
    """The planned move: A removes the address, freezes and closes; B restores, adds the address, and
    announces it; the client (its neighbour entry moved to B) goes on as if nothing happened."""
    macs = nodes_lab(namespaces)
    a, b, c = namespaces["a"], namespaces["b"], namespaces["c"]
    pairs = [connect(a, c, 2_000_000, PORT + i) for i in range(3)]
    ends = [e for p in pairs for e in p]
    pump(ends, until=lambda: all(e.got > 100_000 for e in ends))
    assert client_neighbour(namespaces) == macs["a"]
    counters = {}
    for role in "abc":
        with in_netns(namespaces[role]):
            counters[role] = tcp_counters()

    # the first connection carries bytes in all its queues, as in the one-namespace test
    load_queues(*pairs[0], (c, "eth0"))
    _ip("-n", a, "addr", "del", f"{SERVICE}/24", "dev", "eth0")  # from now on nothing reaches A's sockets
    timings: dict[str, list] = {"freeze": [], "serialise": [], "restore": [], "bytes": []}
    moved = [move(server.sock, a, b, timings) for _client, server in pairs]
    assert_queues_loaded(moved[0][1])
    _ip("-n", c, "link", "set", "eth0", "up")
    move_address(namespaces, macs, "a", "b")
    for (_client, server), (restored, _state) in zip(pairs, moved):
        server.swap(restored.go_live())  # now the remote's answers reach b
    deadline = time.monotonic() + 5
    while client_neighbour(namespaces) != macs["b"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client_neighbour(namespaces) == macs["b"]

    for client, server in pairs:
        finish(client, server)
    for role in "abc":
        with in_netns(namespaces[role]):
            now = tcp_counters()
        assert now["OutRsts"] == counters[role]["OutRsts"], role
    # (a silent close counts as EstabResets on A too: the kernel counts ESTABLISHED -> CLOSE, sent or not)
    assert now["EstabResets"] == counters["c"]["EstabResets"]  # `now` is c's
    # nothing of the connections is left on A
    out = subprocess.run(["ip", "netns", "exec", a, "ss", "-tanH", "state", "established"],
                         capture_output=True, text=True, check=True).stdout
    assert SERVICE not in out, out
    print("timings (ms):", {k: [round(v * 1e3, 3) for v in vs] for k, vs in timings.items() if k != "bytes"},
          "wire bytes:", timings["bytes"])
    for client, server in pairs:
        client.sock.close()
        server.sock.close()


def _late_ack(state: TcpSocketState, tsval: int) -> bytes:
    """The segment a frozen socket can still send after the freeze (its delayed ACK fires in repair mode):
    a pure ACK from ``state``'s local end, carrying a TSval later than the frozen one."""
    from protocols.frames import with_tcp_checksum

    tcp = struct.pack("!HHIIBBHHH", state.local_port, state.remote_port, state.write_seq, state.rcv_nxt,
                      8 << 4, 0x10, 512, 0, 0) + struct.pack("!BBBBII", 1, 1, 8, 10, tsval, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, socket.IPPROTO_TCP, 0,
                     socket.inet_aton(state.local_address), socket.inet_aton(state.remote_address))
    return with_tcp_checksum(ip + tcp)


@needs_root
@pytest.mark.parametrize("advance", [True, False], ids=["advanced", "not-advanced"])
def test_a_later_timestamp_sent_after_the_freeze_does_not_silence_the_restored_socket(namespaces, advance):
    """The old socket sends a delayed ACK after the freeze with a later TSval; the client takes it as its
    newest timestamp. go_live(ts_advance_ms=time since the freeze + margin) lets the restored socket's
    next bytes through at once; without the advance the client drops them (PAWS) and they come only with
    the restored socket's first retransmission timeout (3 s: no RTT estimate)."""
    pair_lab(namespaces)
    n, c = namespaces["n"], namespaces["c"]
    client, server = connect(n, c, 0, PORT + 20)
    client.sock.sendall(b"hello")
    assert server.sock.recv(5) == b"hello"
    server.sock.sendall(b"world")
    assert client.sock.recv(5) == b"world"
    with in_netns(n):
        # the address goes: nothing reaches the server socket (as the move's lock does)
        _ip("-n", n, "addr", "del", f"{SERVICE}/24", "dev", "eth0")
    state = tcprepair.freeze(server.sock)
    frozen = time.monotonic()
    assert state.timestamps and state.tsval & 1 == 0
    time.sleep(0.1)
    with in_netns(n):
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
            raw.sendto(_late_ack(state, (state.tsval + 80) & tcprepair.U32), (state.remote_address, 0))
    time.sleep(0.05)
    tcprepair.close_silently(server.sock)
    with in_netns(n):
        restored = tcprepair.restore_quiet(state)
        _ip("-n", n, "addr", "add", f"{SERVICE}/24", "dev", "eth0")
        elapsed_ms = int((time.monotonic() - frozen) * 1000) + 20
        live = restored.go_live(ts_advance_ms=elapsed_ms if advance else 0)
    try:
        live.sendall(b"after the move")
        client.sock.settimeout(1.0)
        if advance:
            assert client.sock.recv(100) == b"after the move"
        else:
            with pytest.raises((TimeoutError, socket.timeout)):
                client.sock.recv(100)     # dropped as too old until the retransmission timeout
    finally:
        live.close()
        client.sock.close()


@needs_root
def test_restore_from_what_frames_show(namespaces):
    """The failover shape (issue 10): node a dies (its link goes down, so its kernel can say nothing more)
    and b continues from what a standby learns from frames alone: both sequence numbers, the handshake's
    options and a timestamp past a's last one; no window (``window=None``), nothing unacknowledged.
    (a's own socket stands in for the frames here; the values are the ones frames carry.)"""
    macs = nodes_lab(namespaces)
    a, b, c = namespaces["a"], namespaces["b"], namespaces["c"]
    client, server = connect(a, c, 600_000)
    pump([client, server], until=lambda: client.got > 200_000 and server.got > 200_000)
    client.writing = server.writing = False
    pump([client, server], until=lambda: client.got == server.sent and server.got == client.sent)
    time.sleep(0.05)  # the last ACKs

    frozen = tcprepair.freeze(server.sock)
    assert frozen.send_queue == b"" and frozen.recv_queue == b""
    _ip("-n", a, "link", "set", "eth0", "down")  # a is gone
    tcprepair.close_silently(server.sock)
    sniffed = TcpSocketState(
        local_address=SERVICE, local_port=PORT, remote_address=frozen.remote_address,
        remote_port=frozen.remote_port,
        send_seq=frozen.send_seq,   # the client's last ACK
        recv_seq=frozen.recv_seq,   # the client's next sequence number
        send_queue=b"", send_unsent=0, recv_queue=b"",
        mss=frozen.mss, snd_wscale=frozen.snd_wscale, rcv_wscale=frozen.rcv_wscale,
        sack_permitted=frozen.sack_permitted, timestamps=frozen.timestamps,
        tsval=(frozen.tsval + 2000) % 2**32,  # past a's last TSval (the client's TSecr); the low bit kept
        window=None)
    with in_netns(b):
        restored = tcprepair.restore_quiet(TcpSocketState.from_wire(sniffed.to_wire()))
    move_address(namespaces, macs, "a", "b")
    server.swap(restored.go_live())
    finish(client, server)
    client.sock.close()
    server.sock.close()


def _sockets_with(ns_name: str, port: int) -> list[str]:
    out = subprocess.run(["ip", "netns", "exec", ns_name, "ss", "-tanH"], capture_output=True, text=True,
                         check=True).stdout
    return [line for line in out.splitlines() if f"{SERVICE}:{port} " in line]


@needs_root
def test_restore_that_must_fail_leaves_nothing_behind(namespaces):
    pair_lab(namespaces)
    n, c = namespaces["n"], namespaces["c"]
    client, server = connect(n, c, 300_000)
    pump([client, server], until=lambda: client.got > 50_000 and server.got > 50_000)
    fds = len(os.listdir("/proc/self/fd"))
    with in_netns(c):
        c_before = tcp_counters()

    # 1. the 4-tuple is still in use by the original socket: connect refuses it
    state = tcprepair.freeze(server.sock)
    with in_netns(n), pytest.raises(TcpRepairError) as err:
        tcprepair.restore(state)
    assert err.value.errno == errno.EADDRNOTAVAIL
    assert err.value.step == f"restore {state.endpoints}: connect"
    assert "connect failed: [Errno 99]" in str(err.value)
    assert len(os.listdir("/proc/self/fd")) == fds
    assert len(_sockets_with(n, PORT)) == 1
    tcprepair.thaw(server.sock)  # the refused move: the original goes on serving
    pump([client, server], until=lambda: client.got > 100_000 and server.got > 100_000)

    # 2. a state the kernel refuses (the remote's window update from the future); meanwhile the address is
    #    away, so that no segment of the client's finds the 4-tuple without a socket (it would be reset)
    _ip("-n", n, "addr", "del", f"{SERVICE}/24", "dev", "eth0")
    state = tcprepair.freeze(server.sock)
    bad = replace(state, window=replace(state.window, snd_wl1=(state.rcv_nxt + state.window.rcv_wnd + 10_000) % 2**32))
    tcprepair.close_silently(server.sock)
    with in_netns(n), pytest.raises(TcpRepairError) as err:
        tcprepair.restore_quiet(bad)
    assert err.value.errno == errno.EINVAL and err.value.step.endswith(": TCP_REPAIR_WINDOW")
    assert len(os.listdir("/proc/self/fd")) == fds - 1  # the closed original, and no half-restored socket
    assert _sockets_with(n, PORT) == []

    # 3. the good state still restores into the freed 4-tuple, and the client noticed nothing
    with in_netns(n):
        restored = tcprepair.restore_quiet(state)
    _ip("-n", n, "addr", "add", f"{SERVICE}/24", "dev", "eth0")
    server.swap(restored.go_live())
    finish(client, server)
    with in_netns(c):
        assert tcp_counters()["EstabResets"] == c_before["EstabResets"]
    client.sock.close()
    server.sock.close()


@needs_root
def test_freeze_refuses_what_it_cannot_move(namespaces):
    pair_lab(namespaces)
    n, c = namespaces["n"], namespaces["c"]
    client, server = connect(n, c, 1000)
    client.sock.shutdown(socket.SHUT_WR)  # the server's side is now CLOSE_WAIT
    time.sleep(0.05)
    with pytest.raises(TcpRepairError, match="socket is CLOSE_WAIT, only ESTABLISHED can move"):
        tcprepair.freeze(server.sock)
    assert not server.sock.getsockopt(socket.IPPROTO_TCP, tcprepair.TCP_REPAIR)  # left as it was
    with pytest.raises(TcpRepairError, match="only IPv4 TCP sockets"):
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s6:
            tcprepair.freeze(s6)
    client.sock.close()
    server.sock.close()


def test_a_thawed_socket_does_not_keep_its_listener_from_binding_again():
    """Leaving repair mode clears SO_REUSEADDR in the kernel; a move that is called off thaws its sockets
    and then reopens its listeners on the same port: that bind must work (it failed with EADDRINUSE)."""
    def listener() -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0) if not ports else ("127.0.0.1", ports[0]))
        s.listen()
        return s

    ports: list[int] = []
    lis = listener()
    ports.append(lis.getsockname()[1])
    client = socket.create_connection(lis.getsockname())
    served, _ = lis.accept()
    lis.close()
    try:
        tcprepair.freeze(served)
        tcprepair.thaw(served)
        again = listener()  # EADDRINUSE before _repair_off set SO_REUSEADDR again
        again.close()
        served.sendall(b"still here")
        client.settimeout(2)
        assert client.recv(100) == b"still here"
    finally:
        served.close()
        client.close()


# ------------------------------------------------------------------------------- stream origins
@needs_root
def test_stream_origins_of_both_ends_agree_and_a_freeze_confirms_them(namespaces):
    """stream_origins gives each end's (remote ISN + 1, own ISN + 1) without stopping the connection: one
    end's remote origin is the other end's own, whoever spoke first and however much moved since; a
    freeze (the state a live move sends) puts the unread byte at origin + bytes read; the connection goes
    on unharmed (repair mode left without a probe: no byte lost, nothing reset)."""
    ns = namespaces.add("o")
    with in_netns(ns):
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        client = socket.create_connection(lsock.getsockname())
        client.sendall(b"first words")          # the client speaks before the accept
        server, _ = lsock.accept()
        lsock.close()
        time.sleep(0.05)
        server_origins = tcprepair.stream_origins(server)
        client_origins = tcprepair.stream_origins(client, written=11)
        assert server_origins == (client_origins[1], client_origins[0])
        assert server.recv(100) == b"first words"
        server.sendall(b"x" * 70000)
        got = 0
        while got < 70000:
            got += len(client.recv(1 << 20))
        client.sendall(b"y" * 5)
        time.sleep(0.05)
        assert tcprepair.stream_origins(server, written=70000) == server_origins
        assert tcprepair.stream_origins(client, written=16) == client_origins
        for sock, origins, read in ((server, server_origins, 11), (client, client_origins, 70000)):
            state = tcprepair.freeze(sock)
            assert state.recv_seq == (origins[0] + read) & 0xFFFF_FFFF
            tcprepair.thaw(sock)
        assert server.recv(100) == b"y" * 5
        client.sendall(b"z" * 3)
        assert server.recv(100) == b"z" * 3
        before = tcp_counters()
        server.sendall(b"w" * 2)
        assert client.recv(100) == b"w" * 2
        assert tcp_counters()["OutRsts"] == before["OutRsts"]
        client.close()
        server.close()
    with socket.socket(socket.AF_INET6) as v6, pytest.raises(TcpRepairError):
        tcprepair.stream_origins(v6)
