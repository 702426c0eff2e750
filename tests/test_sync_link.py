"""sync.link: two PeerLinks talking over loopback (real sockets, real clock, fast timings)."""

import json
import os
import socket
import sys

import pytest
import trio

from sync.link import PeerLink, load_peer_hello, save_peer_hello
from sync.wire import KEY_MISMATCH_HINT, MAGIC, LocalProtocolError

KEY = b"a shared secret of enough bytes"


# A bound socket that never listens: dialling it is refused at once, and no one else gets its port.
_NOWHERE = socket.socket()
_NOWHERE.bind(("127.0.0.1", 0))
NOWHERE = _NOWHERE.getsockname()


def hello(name, mode="stateless", version=1):
    return {"name": name, "mac": f"02:00:00:00:00:0{ord(name) % 10}", "address": f"10.0.0.{ord(name) - 96}",
            "services": [{"name": "nfs", "port": 2049}], "mode": mode, "version": version}


class Pair:
    """Links a and b (names sort a < b) with their inboxes. They listen on port 0 (no port races);
    :meth:`start` points each link's dial at the other's actual listen address."""

    def __init__(self, tmp_path, *, hello_a=None, hello_b=None, key_a=KEY, key_b=KEY):
        self.inbox = {"a": [], "b": []}
        self.tmp_path = tmp_path
        self.a = self.make("a", "b", hello_a or hello("a"), key_a)
        self.b = self.make("b", "a", hello_b or hello("b"), key_b)

    def make(self, me, peer, my_hello, key, port=0):
        return PeerLink(me, peer, listen=("127.0.0.1", port), dial=NOWHERE,
                        key=key, hello=my_hello, on_message=self.inbox[me].append, heartbeat=0.02,
                        dead_after=0.5, connect_timeout=0.5, handshake_timeout=0.5,
                        state_dir=self.tmp_path / me)

    async def start(self, nursery, *links):
        for link in links or (self.a, self.b):
            await nursery.start(link.run)
        self.wire()

    def wire(self):
        if self.b.listen_address:
            self.a.dial = self.b.listen_address
        if self.a.listen_address:
            self.b.dial = self.a.listen_address


async def eventually(predicate, timeout=3.0):
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


def both_on_one_connection(pair):
    sa, sb = pair.a.status(), pair.b.status()
    return sa["state"] == sb["state"] == "connected" and sa["dialled_by"] == sb["dialled_by"]


async def test_connect_hello_heartbeats_and_messages(nursery, tmp_path):
    pair = Pair(tmp_path)
    await pair.start(nursery)
    await eventually(lambda: both_on_one_connection(pair))

    assert pair.a.peer_hello == hello("b") and pair.b.peer_hello == hello("a")
    assert load_peer_hello(tmp_path / "a") == hello("b")
    assert load_peer_hello(tmp_path / "b") == hello("a")
    assert not list((tmp_path / "a").glob(".*tmp"))

    await eventually(lambda: (pair.a.rtt() or {}).get("count", 0) >= 5 and (pair.b.rtt() or {}).get("count", 0) >= 5)
    rtt = pair.a.rtt()
    assert 0 <= rtt["min"] <= rtt["median"] <= rtt["max"] < 0.5 and rtt["min"] <= rtt["last"] <= rtt["max"]
    assert trio.current_time() - pair.a.last_received < 0.5

    assert await pair.a.send({"type": "digest", "conns": 3, "blob": b"\x01\x02"})
    assert await pair.b.send({"type": "snapshot", "sessions": []})
    await eventually(lambda: pair.inbox["b"] and pair.inbox["a"])
    assert pair.inbox["b"] == [{"type": "digest", "conns": 3, "blob": b"\x01\x02"}]
    assert pair.inbox["a"] == [{"type": "snapshot", "sessions": []}]  # heartbeats are not delivered

    await pair.a.update_hello(hello("a") | {"services": []})
    await eventually(lambda: pair.b.peer_hello["services"] == [])
    assert load_peer_hello(tmp_path / "b")["services"] == []
    with pytest.raises(ValueError):
        await pair.a.update_hello(hello("a", mode="stateful"))

    # still on one agreed connection a moment later (no flapping between the two candidates)
    before = pair.a.counters["connections"], pair.b.counters["connections"]
    await trio.sleep(0.2)
    assert both_on_one_connection(pair)
    assert (pair.a.counters["connections"], pair.b.counters["connections"]) == before
    for link in (pair.a, pair.b):
        assert all(link.counters[f"rejected_{k}"] == 0 for k in ("auth", "parse", "out_of_sequence", "too_large"))


async def test_simultaneous_dials_agree_on_the_lower_names_connection(nursery, tmp_path):
    pair = Pair(tmp_path)
    await nursery.start(pair.a.run)  # both dial NOWHERE and back off
    await nursery.start(pair.b.run)
    await trio.sleep(0.01)
    pair.wire()  # both redial after the same backoff, with both listeners up
    await eventually(lambda: both_on_one_connection(pair))
    await trio.sleep(0.1)
    assert both_on_one_connection(pair)
    if pair.a.counters["duplicates"] or pair.b.counters["duplicates"]:
        assert pair.a.status()["dialled_by"] == "a"
    assert pair.a.counters["reconnects"] == pair.b.counters["reconnects"] == 0


async def test_send_when_not_connected_returns_false(tmp_path):
    pair = Pair(tmp_path)
    assert pair.a.state == "connecting"
    assert await pair.a.send({"type": "x"}) is False
    with pytest.raises(LocalProtocolError):
        await pair.a.send({"type": "heartbeat"})


async def test_reconnect_after_the_connection_is_dropped(nursery, tmp_path):
    pair = Pair(tmp_path)
    await pair.start(nursery)
    await eventually(lambda: both_on_one_connection(pair))
    reconnects = pair.a.counters["reconnects"], pair.b.counters["reconnects"]

    pair.b.drop("test drops it")
    await eventually(lambda: pair.b.counters["reconnects"] > reconnects[1]
                     and pair.a.counters["reconnects"] > reconnects[0] and both_on_one_connection(pair))
    assert await pair.b.send({"type": "after", "n": 1})
    await eventually(lambda: pair.inbox["a"] == [{"type": "after", "n": 1}])


async def test_peer_restart_reconnects(nursery, tmp_path):
    pair = Pair(tmp_path)
    await pair.start(nursery, pair.a)
    with trio.CancelScope() as b_scope:
        async with trio.open_nursery() as b_nursery:
            await pair.start(b_nursery, pair.b)
            await eventually(lambda: both_on_one_connection(pair))
            b_scope.cancel()
    await eventually(lambda: pair.a.state == "connecting")
    assert await pair.a.send({"type": "x"}) is False

    b2 = pair.make("b", "a", hello("b") | {"services": []}, KEY, port=pair.b.listen_address[1])  # restarted
    b2.dial = pair.a.listen_address
    await nursery.start(b2.run)
    await eventually(lambda: pair.a.state == b2.state == "connected" and pair.a.peer_hello["services"] == [])
    assert load_peer_hello(tmp_path / "a")["services"] == []


async def test_mode_mismatch_is_refused_with_a_reason(nursery, tmp_path):
    pair = Pair(tmp_path, hello_b=hello("b", mode="stateful"))
    await pair.start(nursery)
    await eventually(lambda: pair.a.counters["refused"] >= 2 and pair.b.counters["refused"] >= 2)
    for link in (pair.a, pair.b):
        assert link.state == "refused"
        assert "mode mismatch" in link.refused_reason and "[pair] mode" in link.refused_reason
        assert link.counters["connections"] == 0 and link.peer_hello is None
    assert "'stateless'" in pair.a.refused_reason and "'stateful'" in pair.a.refused_reason
    assert load_peer_hello(tmp_path / "a") is None
    for link in (pair.a, pair.b):  # the peer's process lives: evidence for the detector (issue 9.1)
        st = link.status()["peer_refusal"]
        assert st["kind"] == "misconfigured" and "mode" in st["reason"]


async def test_wrong_peer_name_and_version_are_refused(nursery, tmp_path):
    pair = Pair(tmp_path, hello_b=hello("b", version=2))
    await pair.start(nursery)
    await eventually(lambda: pair.a.state == pair.b.state == "refused")
    assert "version mismatch" in pair.a.refused_reason

    pair2 = Pair(tmp_path / "2")
    pair2.b.peer_name = "c"  # b expects a peer called c
    await pair2.start(nursery)
    await eventually(lambda: pair2.b.state == "refused" and pair2.a.state == "refused")
    # the names are part of the direction keys (issue 8.3): a wrong name cannot even authenticate
    assert pair2.b.refused_reason == pair2.a.refused_reason == KEY_MISMATCH_HINT
    assert "[peer] name" in KEY_MISMATCH_HINT
    assert pair2.a.counters["connections"] == pair2.b.counters["connections"] == 0


async def test_wrong_key_is_never_connected(nursery, tmp_path):
    pair = Pair(tmp_path, key_b=b"another secret of enough bytes")
    await pair.start(nursery)
    await eventually(lambda: pair.a.counters["rejected_auth"] >= 2 and pair.b.counters["rejected_auth"] >= 2)
    for link in (pair.a, pair.b):
        assert link.state == "refused" and link.refused_reason == KEY_MISMATCH_HINT
        assert link.counters["connections"] == 0 and link.counters["messages_in"] == 0
        assert link.peer_hello is None
        # issue 9.1: the peer's process answered: evidence that it lives, for the detector and status
        when, reason = link.peer_refused()
        assert reason == KEY_MISMATCH_HINT and link.counters["peer_refusals"] >= 2
        st = link.status()["peer_refusal"]
        assert st["kind"] == "unauthenticated" and st["reason"] == KEY_MISMATCH_HINT and st["ago"] >= 0


async def raw_client(port):
    """A plain TCP client that completes the preamble exchange (it has no key)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(MAGIC + os.urandom(16))
    got = b""
    while len(got) < len(MAGIC) + 16:
        got += await stream.receive_some(64)
    return stream


async def test_forged_frame_from_a_stranger_is_rejected_and_counted(nursery, tmp_path):
    pair = Pair(tmp_path)
    await pair.start(nursery)
    await eventually(lambda: both_on_one_connection(pair))
    connections = pair.a.counters["connections"]

    import msgpack
    payload = msgpack.packb({"type": "takeover", "address": "10.0.0.2"})
    frame = (8 + 32 + len(payload)).to_bytes(4, "big") + (0).to_bytes(8, "big") + os.urandom(32) + payload
    stream = await raw_client(pair.a.listen_address[1])
    await stream.send_all(frame)
    await eventually(lambda: pair.a.counters["rejected_auth"] == 1)
    with trio.fail_after(2):  # a closes the stranger's connection
        while await stream.receive_some(4096):
            pass

    garbage = await trio.open_tcp_stream("127.0.0.1", pair.a.listen_address[1])
    await garbage.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await eventually(lambda: pair.a.counters["rejected_parse"] == 1)

    assert pair.a.state == "connected" and pair.a.refused_reason is None
    assert pair.a.counters["connections"] == connections
    assert pair.inbox["a"] == []
    assert await pair.b.send({"type": "still", "ok": True})
    await eventually(lambda: pair.inbox["a"] == [{"type": "still", "ok": True}])
    await stream.aclose()
    await garbage.aclose()


async def test_silent_stranger_is_cut_off_after_the_handshake_timeout(nursery, tmp_path):
    pair = Pair(tmp_path)
    await pair.start(nursery, pair.a)
    stream = await trio.open_tcp_stream("127.0.0.1", pair.a.listen_address[1])
    with trio.fail_after(2):
        while await stream.receive_some(4096):  # a's preamble, then EOF when a gives up
            pass
    assert pair.a.state == "connecting"


def test_hello_persistence(tmp_path):
    assert load_peer_hello(tmp_path) is None
    path = save_peer_hello(tmp_path / "state", hello("b"))
    assert json.loads(path.read_text()) == hello("b")
    assert load_peer_hello(tmp_path / "state") == hello("b")
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["peer-hello.json"]
    path.write_text("{not json")
    assert load_peer_hello(tmp_path / "state") is None


def test_constructor_checks():
    kw = dict(listen=("127.0.0.1", 0), dial=("127.0.0.1", 1), key=KEY)
    with pytest.raises(ValueError, match="own name"):
        PeerLink("a", "a", hello=hello("a"), **kw)
    with pytest.raises(ValueError, match="lacks mode"):
        PeerLink("a", "b", hello={"name": "a", "version": 1}, **kw)
    with pytest.raises(ValueError, match="this node is 'a'"):
        PeerLink("a", "b", hello=hello("c"), **kw)
    with pytest.raises(ValueError):
        PeerLink("a", "b", hello=hello("a"), **(kw | {"key": b"short"}))


# -- issue 8.1: nothing a connection does may end the link --------------------------------------

KILLER = MAGIC + os.urandom(16) + b"\xff\xff\xff\xff"


async def send_and_wait_close(port, *chunks):
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for chunk in chunks:
        await stream.send_all(chunk)
        await trio.sleep(0.01)
    with trio.fail_after(2):  # the link closes the connection, and only the connection
        try:
            while await stream.receive_some(4096):
                pass
        except trio.BrokenResourceError:
            pass
    await stream.aclose()


async def test_one_segment_killer_and_its_pieces_leave_the_link_running(nursery, tmp_path):
    pair = Pair(tmp_path)
    await pair.start(nursery, pair.a)
    port = pair.a.listen_address[1]
    await send_and_wait_close(port, KILLER)  # preamble + impossible length in one segment
    for cut in (4, 19, 20, 22):
        await send_and_wait_close(port, KILLER[:cut], KILLER[cut:])
    assert pair.a.counters["rejected_too_large"] == 5
    assert pair.a.counters["connection_errors"] == 0
    # the link is alive: the real peer still comes up, on either side's dial
    await pair.start(nursery, pair.b)
    await eventually(lambda: both_on_one_connection(pair))
    await send_and_wait_close(port, KILLER)  # and a stray killer does not disturb a working link
    assert pair.a.state == "connected" and pair.a.refused_reason is None


async def test_a_bug_on_one_connection_is_counted_and_the_link_goes_on(nursery, tmp_path, monkeypatch):
    pair = Pair(tmp_path)
    await pair.start(nursery, pair.a)
    real_handle = PeerLink._handle
    calls = {"n": 0}

    async def flaky_handle(self, conn, event):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug in the handler")
        await real_handle(self, conn, event)

    monkeypatch.setattr(PeerLink, "_handle", flaky_handle)
    await send_and_wait_close(pair.a.listen_address[1], MAGIC + os.urandom(16))
    assert pair.a.counters["connection_errors"] == 1
    await pair.start(nursery, pair.b)
    await eventually(lambda: both_on_one_connection(pair))


# -- issue 8.4: strays on the sync port are bounded ----------------------------------------------

TRICKLERS = r"""
import os, socket, struct, sys, threading, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
end = time.monotonic() + seconds
opened = [0]

def trickle(announce):
    while time.monotonic() < end:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=2, source_address=("127.0.0.2", 0))
            opened[0] += 1
            s.sendall(MAGIC + os.urandom(16) + struct.pack("!I", announce))
            while time.monotonic() < end:
                s.sendall(os.urandom(1024))
                time.sleep(0.01)
        except OSError:
            time.sleep(0.01)

threads = [threading.Thread(target=trickle, args=(1 << 20 if i % 2 else 60_000,), daemon=True) for i in range(50)]
for t in threads:
    t.start()
time.sleep(seconds)
print(opened[0])
"""


async def test_fifty_strangers_trickling_big_frames_neither_block_the_peer_nor_grow_memory(nursery, tmp_path):
    from sync.link import HELLO_MAX_FRAME, MAX_UNAUTHENTICATED, RECEIVE_SIZE
    pair = Pair(tmp_path)
    await pair.start(nursery, pair.a)
    peak_buffered = peak_pending = 0
    done = trio.Event()
    opened = []

    async def attack():  # 50 strangers in another process: they do not share our event loop
        script = TRICKLERS.replace("MAGIC", repr(MAGIC))
        result = await trio.run_process([sys.executable, "-c", script, str(pair.a.listen_address[1]), "2.5"],
                                        capture_stdout=True)
        opened.append(int(result.stdout))
        done.set()

    async def sample():
        nonlocal peak_buffered, peak_pending
        while not done.is_set():
            peak_buffered = max(peak_buffered, pair.a.unauthenticated_buffered())
            peak_pending = max(peak_pending, pair.a.unauthenticated["other"])
            await trio.sleep(0.005)

    async with trio.open_nursery() as attackers:
        attackers.start_soon(attack)
        attackers.start_soon(sample)
        await trio.sleep(0.5)
        await pair.start(nursery, pair.b)  # the real peer comes up in the middle of it
        await eventually(lambda: both_on_one_connection(pair), timeout=5)
        connections = pair.a.counters["connections"]
        await done.wait()  # ... and stays up
        assert pair.a.state == "connected" and pair.a.counters["connections"] == connections
    counts = {"opened": opened[0]}
    assert counts["opened"] > 50
    assert peak_pending <= MAX_UNAUTHENTICATED and pair.a.unauthenticated_peak <= MAX_UNAUTHENTICATED + 4
    assert peak_buffered <= MAX_UNAUTHENTICATED * (HELLO_MAX_FRAME + 4 + RECEIVE_SIZE)
    assert pair.a.counters["stray_refused"] > 0 and pair.a.counters["rejected_too_large"] > 0
    st = pair.a.status()
    assert st["counters"]["stray_refused"] == pair.a.counters["stray_refused"]
    assert "unauthenticated_peak" in st


# -- issue 9.1: a pair with different keys or modes: alive, refused, nobody takes over -----------

async def test_a_wrong_link_port_is_loud_although_the_peers_dial_carries_the_link(nursery, tmp_path, caplog):
    """Issue 9.7: a's peer.link names a port nobody listens on; b's dial brings the link up. a must
    still say (status and a warning) that its peer.link is wrong, and what to set."""
    pair = Pair(tmp_path)
    await pair.start(nursery)
    pair.a.dial = NOWHERE  # a dials nowhere, b dials a
    with caplog.at_level("WARNING", logger="pairproxy.link"):
        await eventually(lambda: both_on_one_connection(pair))
        status = pair.a.status()
        assert status["dialled_by"] == "b"
        b_listens = "%s:%s" % pair.b.listen_address[:2]
        nowhere = "%s:%s" % NOWHERE
        problem = status["dial_problem"]
        assert problem and f"peer.link {nowhere} is not where b listens" in problem
        assert f'set peer.link = "{b_listens}" on a' in problem
        assert problem in caplog.text
        # b's own peer.link is right: nothing to say there; and the owner never sees the link's key
        assert pair.b.status()["dial_problem"] is None
        assert "listen" not in pair.a.peer_hello and pair.a.peer_hello == hello("b")
    # fixed (the operator corrected a's peer.link): the problem goes away with the next hello
    pair.a.dial = pair.b.listen_address
    pair.b.drop("reconnect with a's fixed peer.link")
    await eventually(lambda: both_on_one_connection(pair) and pair.a.status()["dial_problem"] is None)


async def test_dials_failing_for_seconds_are_counted_and_warned_about_at_a_low_rate(nursery, tmp_path, caplog):
    link = PeerLink("a", "b", listen=("127.0.0.1", 0), dial=NOWHERE, key=KEY, hello=hello("a"),
                    heartbeat=0.02, dead_after=0.5, connect_timeout=0.5, dial_warn_after=0.3, dial_warn_every=60)
    with caplog.at_level("WARNING", logger="pairproxy.link"):
        await nursery.start(link.run)
        await trio.sleep(0.1)
        early = link.status()
        assert early["dial_failures"] >= 1 and early["last_dial_error"] == "connection refused"
        assert early["dial_problem"] is None and "peer.link" not in caplog.text  # not yet: a peer may be restarting
        await eventually(lambda: link.status()["dial_problem"] is not None, timeout=3)
        await trio.sleep(1.5)  # more failed dials (backoff 1 s), but no second warning within dial_warn_every
    status = link.status()
    nowhere = "%s:%s" % NOWHERE
    assert status["dial"] == nowhere and status["dial_failures"] >= 4
    assert status["dial_problem"].startswith(f"peer.link {nowhere}: connection refused for ")
    assert "is the peer's peer.listen this address and port?" in status["dial_problem"]
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "peer.link" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


async def test_a_hello_that_changes_only_with_a_move_is_saved_without_an_fsync(nursery, tmp_path, monkeypatch):
    """The peer's hello changes with every live move (which addresses it holds) and arrives just as the
    moved connections go live: an fsync on the event loop then stopped every pump for ~100 ms under load.
    Such a hello is written without one; the first hello and a change of MAC, services or address are
    synced."""
    import sync.link

    synced = []
    real_fsync = sync.link.os.fsync
    monkeypatch.setattr(sync.link.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    pair = Pair(tmp_path)
    await pair.start(nursery)
    # Both nodes save their peer's first hello (synced, and counted by the one patched os.fsync): wait for
    # both, or a's late save of b's hello is miscounted as the move's.
    await eventually(lambda: load_peer_hello(tmp_path / "b") == hello("a")
                     and load_peer_hello(tmp_path / "a") == hello("b"))
    first = len(synced)
    assert first >= 2
    await pair.a.update_hello(hello("a") | {"holds": ["10.0.0.1", "10.0.0.2"], "own_state": "serving"})
    await eventually(lambda: (load_peer_hello(tmp_path / "b") or {}).get("holds") == ["10.0.0.1", "10.0.0.2"])
    assert len(synced) == first                 # a move's change: no fsync
    await pair.a.update_hello(hello("a") | {"services": []})
    await eventually(lambda: (load_peer_hello(tmp_path / "b") or {}).get("services") == [])
    assert len(synced) == first + 1             # the services changed: synced


async def test_a_hello_updated_during_the_handshake_reaches_the_peer(nursery, tmp_path):
    """update_hello between this node's hello and the peer's (no active connection yet, so nothing is
    sent then): the peer had the old hello, and kept it until the next reconnect. Once the connection is
    up, the current hello follows."""
    pair = Pair(tmp_path)
    a_on_hello = pair.a._on_hello

    async def late_hello(conn, body):
        await trio.sleep(0.3)  # a's hello reaches b at once; b's is taken in late at a
        await a_on_hello(conn, body)
    pair.a._on_hello = late_hello
    await pair.start(nursery)
    await eventually(lambda: load_peer_hello(tmp_path / "b") == hello("a"))
    assert pair.a.status()["state"] != "connected"  # the window: b has a's hello, a not yet b's
    await pair.a.update_hello(hello("a") | {"holds": ["10.0.0.1"]})
    await eventually(lambda: (load_peer_hello(tmp_path / "b") or {}).get("holds") == ["10.0.0.1"])
