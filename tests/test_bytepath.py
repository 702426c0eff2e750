"""The data path against both byte paths (issue 13): the in-kernel relay (proxy.sockmap, needs root or
CAP_BPF) and the splice pump, each test once per path. One :class:`~proxy.dataplane.ServiceProxy` runs
in a thread of its own (its own trio loop) on loopback, in front of small backends written here;
clients are plain blocking sockets. Loopback only: nothing leaves the machine, no namespace is made.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import resource
import socket
import struct
import subprocess
import threading
import time
from contextlib import contextmanager

import pytest
import trio

from proxy import sockmap
from proxy.config import Endpoint, ServiceConfig
from proxy.dataplane import ServiceProxy

LOOPBACK = ipaddress.IPv4Address("127.0.0.1")


def _paths() -> list:
    params = [pytest.param("splice", id="splice")]
    try:
        probe = sockmap.choose("sockmap", capacity=16)
    except sockmap.SockmapUnavailable as exc:
        params.append(pytest.param("sockmap", id="sockmap", marks=pytest.mark.skip(reason=str(exc))))
    else:
        probe.close()
        params.append(pytest.param("sockmap", id="sockmap"))
    return params


@pytest.fixture(params=_paths())
def byte_path(request):
    path = sockmap.choose(request.param, capacity=4096)
    assert path.path == request.param
    yield path
    path.close()


class Backend:
    """A TCP server on loopback running ``handler(conn)`` in a thread per connection."""

    def __init__(self, handler, listen: bool = True):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.handler = handler
        self.errors: list[BaseException] = []
        self.conns: list[socket.socket] = []
        if listen:
            self.sock.listen(2048)
            threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn):
        try:
            self.handler(conn)
        except BaseException as exc:  # noqa: BLE001 (reported by the test)
            self.errors.append(exc)
        finally:
            conn.close()

    def close(self):
        self.sock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass


class ProxyThread:
    """A ServiceProxy for ``backend_port`` on a free loopback port, in its own thread and trio loop."""

    def __init__(self, backend_port: int, path: sockmap.BytePath, connect_timeout: float = 3.0):
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        service = ServiceConfig(name="t", protocol="tcp", port=self.port,
                                backend=Endpoint(LOOPBACK, backend_port), connect_timeout=connect_timeout,
                                secure=False)
        self.proxy = ServiceProxy(service, LOOPBACK, byte_path=path)
        self._token = None
        self._cancel: trio.CancelScope | None = None
        self._ready = threading.Event()
        self.thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self.thread.start()
        assert self._ready.wait(5)

    async def _main(self):
        self._token = trio.lowlevel.current_trio_token()
        self.proxy.open_listeners()
        with trio.CancelScope() as self._cancel:
            async with trio.open_nursery() as connections:
                self._ready.set()
                await self.proxy.accept_loop(connections)

    def call(self, fn):
        return trio.from_thread.run_sync(fn, trio_token=self._token)

    @property
    def stats(self):
        self.call(self.proxy.refresh_counters)
        return self.proxy.stats

    def close(self):
        if self._token is not None and self._cancel is not None:
            try:
                self.call(self._cancel.cancel)
            except trio.RunFinishedError:
                pass
        self.thread.join(10)
        assert not self.thread.is_alive()


@contextmanager
def proxied(handler, path, **kw):
    backend = Backend(handler)
    proxy = ProxyThread(backend.port, path, **kw)
    try:
        yield proxy, backend
    finally:
        proxy.close()
        backend.close()
    assert not backend.errors, backend.errors


def connect(proxy: ProxyThread, timeout: float = 20) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _first_difference(got: bytes, want: bytes) -> str:
    """Where two byte strings part (for a failed comparison of megabytes: pytest's diff says little)."""
    n = next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
    return (f"{len(got)} bytes received, {len(want)} expected, the first difference at offset {n}: "
            f"got {got[n:n + 16].hex()}, expected {want[n:n + 16].hex()}; the expected bytes found at "
            f"offset {want.find(got[n:n + 64]) if n < len(got) else None}")


def recv_all(sock: socket.socket) -> bytes:
    out = []
    while True:
        d = sock.recv(1 << 20)
        if not d:
            return b"".join(out)
        out.append(d)


def wait_for(cond, timeout=10.0, what=""):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def sink_and_source(size: int, gate: threading.Event | None = None):
    """A backend that reads everything (returns its digest) and answers ``size`` bytes of its own
    (``gate``: the last TAIL of them only once it is set)."""
    def handler(conn):
        got = hashlib.sha256()
        n = 0
        data = _pattern(size, b"B")

        def send():
            send_gated(conn, data, gate)
            conn.shutdown(socket.SHUT_WR)
        t = threading.Thread(target=send)
        t.start()
        while True:
            d = conn.recv(1 << 20)
            if not d:
                break
            got.update(d)
            n += len(d)
            handler.progress = n
        t.join()
        handler.results.append((n, got.hexdigest()))
    handler.results = []
    handler.progress = 0
    return handler


def stuck(proxy: ProxyThread, handler, backend_port: int) -> str:
    """What a test that waited in vain for the backend shows: how far the backend read, the proxy's
    counters and switches, and every TCP socket of the proxy's and the backend's ports (``ss``)."""
    st = proxy.stats
    relay = proxy.proxy.byte_path.relay
    governor = getattr(relay, "_governor", None) if relay is not None else None
    ss = subprocess.run(["ss", "-tniem", "state", "all", f"( sport = :{proxy.port} or dport = :{proxy.port} "
                         f"or sport = :{backend_port} or dport = :{backend_port} )"],
                        capture_output=True, text=True).stdout
    return (f"backend read {handler.progress} bytes without EOF; proxy: to_backend {st.bytes_to_backend}, "
            f"to_client {st.bytes_to_client}, active {st.connections_active}, reset {st.connections_reset}, "
            f"switched to splice {governor.switched if governor else '-'}\n{ss}")


#: what :func:`send_gated` holds back
TAIL = 64 << 10


def send_gated(sock: socket.socket, data: bytes, gate: threading.Event | None) -> None:
    """``sock.sendall(data)``, the last TAIL bytes only once ``gate`` is set (at most 30 s): a stream
    that cannot end before the test has done what it must do mid-stream."""
    if gate is not None and len(data) > TAIL:
        sock.sendall(data[:-TAIL])
        gate.wait(30)
        data = data[-TAIL:]
    sock.sendall(data)


@contextmanager
def released(gate: threading.Event):
    """Sets ``gate`` on the way out, also when the test fails (no sender left waiting)."""
    try:
        yield gate
    finally:
        gate.set()


def _pattern(size: int, tag: bytes) -> bytes:
    block = hashlib.sha256(tag + size.to_bytes(8, "big")).digest() * 2048  # 64 KiB, not periodic in 1
    return (block * (size // len(block) + 1))[:size]


@pytest.mark.parametrize("size", [0, 1, 1000, 1 << 20, 64 << 20])
def test_bytes_identical_both_ways(byte_path, size):
    """0 B to 64 MiB each way at once, byte-identical, counted in status; the client sends before
    the proxy has even connected to the backend (bytes queued before the relay starts)."""
    handler = sink_and_source(size)
    with proxied(handler, byte_path) as (proxy, backend):
        s = connect(proxy)
        data = _pattern(size, b"C")
        t = threading.Thread(target=lambda: (s.sendall(data), s.shutdown(socket.SHUT_WR)))
        t.start()
        back = recv_all(s)
        t.join()
        s.close()
        try:
            wait_for(lambda: handler.results, what="the backend's result")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {stuck(proxy, handler, backend.port)}") from None
        assert handler.results == [(size, hashlib.sha256(data).hexdigest())]
        want = _pattern(size, b"B")
        identical = back == want  # (a bool: pytest's own diff of megabytes says little and takes long)
        assert identical, _first_difference(back, want)
        wait_for(lambda: proxy.stats.connections_active == 0, what="the connection to end")
        st = proxy.stats
        assert (st.bytes_to_backend, st.bytes_to_client, st.connections_reset) == (size, size, 0)


def test_small_round_trips_without_pipelining(byte_path):
    """A request sent right after connecting, then one message at a time (the SMB/NFS pattern): each
    answer comes at once (the bytes that arrived before the relay started do not wait for more)."""
    def echo(conn):
        while True:
            d = conn.recv(65536)
            if not d:
                return
            conn.sendall(d)
    with proxied(echo, byte_path) as (proxy, _):
        s = connect(proxy, timeout=2)
        for i in range(200):
            msg = struct.pack("!I", i) * 16
            s.sendall(msg)
            got = b""
            while len(got) < len(msg):
                got += s.recv(len(msg) - len(got))
            assert got == msg
        s.close()


def test_half_close_client_first(byte_path):
    """The client shuts its sending side; the backend sees EOF after every byte and still answers."""
    def handler(conn):
        got = recv_all(conn)
        conn.sendall(b"got " + str(len(got)).encode())
        time.sleep(0.05)
        conn.sendall(b" and more")
    with proxied(handler, byte_path) as (proxy, _):
        s = connect(proxy)
        s.sendall(b"x" * 300000)
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"got 300000 and more"
        s.close()
        wait_for(lambda: proxy.stats.connections_active == 0, what="the connection to end")
        assert proxy.stats.connections_reset == 0


def test_half_close_backend_first(byte_path):
    """The backend shuts its sending side first; the client sees EOF after every byte and can still send."""
    def handler(conn):
        conn.sendall(b"y" * 200000)
        conn.shutdown(socket.SHUT_WR)
        got = recv_all(conn)
        assert got == b"late request"
    with proxied(handler, byte_path) as (proxy, backend):
        s = connect(proxy)
        assert recv_all(s) == b"y" * 200000
        time.sleep(0.05)
        s.sendall(b"late request")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b""
        s.close()
        wait_for(lambda: proxy.stats.connections_active == 0, what="the connection to end")
        assert proxy.stats.connections_reset == 0


def test_half_close_then_bulk_answer(byte_path):
    """The client half-closes, then the backend answers 32 MiB (the relay hands such a connection to
    the splice pump mid-way): every byte arrives, then EOF."""
    answer = _pattern(32 << 20, b"H")

    def handler(conn):
        assert recv_all(conn) == b"request"
        conn.sendall(answer)
    with proxied(handler, byte_path) as (proxy, _):
        s = connect(proxy)
        s.sendall(b"request")
        s.shutdown(socket.SHUT_WR)
        back = recv_all(s)
        assert len(back) == len(answer) and back == answer
        s.close()
        wait_for(lambda: proxy.stats.connections_active == 0, what="the connection to end")
        assert proxy.stats.connections_reset == 0


def _rst(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_reset_by_client_resets_backend(byte_path):
    seen = {}

    def handler(conn):
        conn.sendall(b"hello")
        try:
            while conn.recv(65536):
                pass
            seen["end"] = "eof"
        except ConnectionResetError:
            seen["end"] = "reset"
    with proxied(handler, byte_path) as (proxy, _):
        s = connect(proxy)
        assert s.recv(5) == b"hello"
        s.sendall(b"abc")
        time.sleep(0.05)
        _rst(s)
        wait_for(lambda: "end" in seen, what="the backend to see the end")
        assert seen["end"] == "reset"
        wait_for(lambda: proxy.stats.connections_active == 0, what="the connection to end")
        assert proxy.stats.connections_reset == 1


def test_reset_by_backend_resets_client(byte_path):
    def handler(conn):
        assert conn.recv(3) == b"abc"
        _rst(conn)
    with proxied(handler, byte_path) as (proxy, _):
        s = connect(proxy)
        s.sendall(b"abc")
        with pytest.raises(ConnectionResetError):
            while s.recv(65536):
                pass
        s.close()
        wait_for(lambda: proxy.stats.connections_active == 0, what="the connection to end")
        assert proxy.stats.connections_reset == 1


def test_reset_after_half_close(byte_path):
    """The client half-closes, then resets while the backend still sends: the backend is reset too."""
    seen = {}

    def handler(conn):
        recv_all(conn)
        try:
            for _ in range(400):
                conn.sendall(b"z" * 1000)
                time.sleep(0.005)
            seen["end"] = "all sent"
        except (ConnectionResetError, BrokenPipeError):
            seen["end"] = "reset"
    with proxied(handler, byte_path) as (proxy, _):
        s = connect(proxy)
        s.shutdown(socket.SHUT_WR)
        s.recv(1000)
        _rst(s)
        wait_for(lambda: "end" in seen, timeout=15, what="the backend to see the end")
        assert seen["end"] == "reset"


def test_stalled_reader_bounded_memory(byte_path):
    """A backend that stops reading: the client can push only a bounded amount (the relay does not
    buffer without limit), and all of it arrives, in order, once the backend reads again."""
    go = threading.Event()
    result = {}

    def handler(conn):
        go.wait(30)
        result["data"] = recv_all(conn)
    with proxied(handler, byte_path) as (proxy, _):
        s = connect(proxy)
        s.setblocking(False)
        chunk = b"q" * 65536
        sent = 0
        last_progress = time.monotonic()
        while time.monotonic() - last_progress < 1.0 and sent < 512 << 20:
            try:
                sent += s.send(chunk)
                last_progress = time.monotonic()
            except BlockingIOError:
                time.sleep(0.01)
        # client send buffer + proxy's two legs + backend receive buffer: a few tens of MiB at most
        assert sent < 64 << 20, f"{sent} bytes accepted while the backend did not read"
        if byte_path.path == "sockmap":  # the kernel's queue has no bound: the governor takes it out
            assert byte_path.status()["handed_to_splice"] == 1
        s.setblocking(True)
        go.set()
        s.shutdown(socket.SHUT_WR)
        wait_for(lambda: "data" in result, timeout=30, what="the backend to read it all")
        assert len(result["data"]) == sent, (len(result["data"]), sent)
        assert result["data"] == b"q" * sent
        s.close()


def test_backend_refuses(byte_path):
    refused = Backend(None, listen=False)  # bound, not listening: connect() gets RST
    proxy = ProxyThread(refused.port, byte_path)
    try:
        s = connect(proxy)
        assert recv_all(s) == b""
        s.close()
        wait_for(lambda: proxy.stats.backend_failures == 1, what="the failure to be counted")
        assert "refused" in (proxy.stats.last_backend_error or "").lower()
    finally:
        proxy.close()
        refused.close()


def test_backend_never_answers(byte_path):
    """A backend whose listen backlog is full never completes the handshake: the client is closed
    after connect_timeout and the failure counted."""
    silent = Backend(None, listen=False)
    silent.sock.listen(0)
    fillers = []
    try:
        for _ in range(8):  # fill the backlog of 0 (+1) so that further SYNs are dropped
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(("127.0.0.1", silent.port))
            fillers.append(f)
        time.sleep(0.2)
        proxy = ProxyThread(silent.port, byte_path, connect_timeout=0.5)
        try:
            s = connect(proxy)
            t0 = time.monotonic()
            assert recv_all(s) == b""
            assert 0.4 < time.monotonic() - t0 < 5
            s.close()
            wait_for(lambda: proxy.stats.backend_failures == 1, what="the failure to be counted")
            assert "no answer" in proxy.stats.last_backend_error
        finally:
            proxy.close()
    finally:
        for f in fillers:
            f.close()
        silent.close()


def test_1000_concurrent_connections(byte_path):
    """1,000 connections open at once, each a request and its answer, then all closed cleanly."""
    n = 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 8 * n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 16 * n), hard))

    def handler(conn):
        d = conn.recv(64)
        conn.sendall(d[::-1])
        recv_all(conn)
    with proxied(handler, byte_path) as (proxy, _):
        socks = [connect(proxy) for _ in range(n)]
        for i, s in enumerate(socks):
            s.sendall(b"%08d" % i)
        for i, s in enumerate(socks):
            assert s.recv(64) == (b"%08d" % i)[::-1]
        wait_for(lambda: proxy.stats.connections_active == n, what="all connections")
        if byte_path.path == "sockmap":
            assert proxy.stats.connections_sockmap == n
        for s in socks:
            s.shutdown(socket.SHUT_WR)
        for s in socks:
            assert recv_all(s) == b""
            s.close()
        wait_for(lambda: proxy.stats.connections_active == 0, timeout=30, what="all connections to end")
        st = proxy.stats
        assert (st.connections_total, st.connections_reset, st.bytes_to_backend, st.bytes_to_client) == (n, 0, 8 * n, 8 * n)
        if byte_path.relay is not None:
            assert byte_path.relay.joined == 0


# ------------------------------------------------------------------------------ choosing the path
def test_byte_path_config_key(tmp_path):
    from proxy.config import ConfigError, load_config

    base = ('[node]\nname = "a"\ninterface = "eth0"\naddress = "10.0.0.1/24"\nstate_dir = "/var/lib/p"\n'
            'control = "/run/p.sock"\n')
    svc = '\n[[service]]\nname = "smb"\nprotocol = "smb"\nport = 445\nbackend = "10.0.2.10:445"\n'
    path = tmp_path / "n.toml"
    path.write_text(base + svc)
    assert load_config(path).node.byte_path == "splice"  # the default until sockmap's rare faults are fixed
    path.write_text(base + 'byte_path = "Auto"\n' + svc)
    assert load_config(path).node.byte_path == "auto"
    path.write_text(base + 'byte_path = "kernel"\n' + svc)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == ["node.byte_path: 'kernel' is not one of auto, sockmap, splice"]


def test_splice_when_configured_and_when_not_privileged():
    """``splice`` is taken as configured; without the privilege for bpf() (a process running as
    nobody, real kernel), ``auto`` falls back to splice and says why, ``sockmap`` refuses to start."""
    assert sockmap.choose("splice").path == "splice"
    code = ("from proxy import sockmap\n"
            "p = sockmap.choose('auto'); print(p.path, '|', p.reason)\n"
            "try:\n    sockmap.choose('sockmap')\nexcept sockmap.SockmapUnavailable as e:\n    print('refused |', e)\n")
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                          sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=30,
                         env={"PYTHONPATH": str(root), "PATH": os.environ.get("PATH", "")})
    assert out.returncode == 0, out.stderr
    auto, refused = out.stdout.splitlines()
    assert auto.startswith("splice | sockmap unavailable:") and "CAP_BPF" in auto
    assert refused.startswith('refused | node.byte_path = "sockmap": bpf() is not allowed') and "CAP_BPF" in refused


def test_receive_window_reopens_after_the_leave_shrink():
    """A relay's leave shrinks a leg's receive buffer around its last read (proxy.pump._leave). A
    segment arriving meanwhile that changes the socket's len/truesize ratio makes the kernel clamp the
    window to the tiny buffer (tcp_measure_rcv_mss: about 2 KB); restoring the buffer must reopen it,
    or the leg crawls at some 20 KB/s for good (the stall of the move test below, 1 run in ~40).
    Plain loopback TCP: the first segment of a young connection always re-measures that ratio."""
    from proxy.pump import _restore_rcvbuf, _shrink_rcvbuf

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    sender = socket.create_connection(lsock.getsockname())
    leg, _ = lsock.accept()
    try:
        sender.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        leg.settimeout(10)
        size = _shrink_rcvbuf(leg)
        sender.sendall(b"s" * 40000)  # arrives while the buffer is shrunk
        got = 0
        while got < 40000:
            got += len(leg.recv(1 << 16))
        clamped = leg.getsockopt(socket.IPPROTO_TCP, socket.TCP_WINDOW_CLAMP)
        _restore_rcvbuf(leg, size)
        total = 4 << 20

        def send():
            try:
                sender.sendall(b"b" * total)
            except OSError:
                pass  # closed by the failing test below
        t = threading.Thread(target=send, daemon=True)
        t0 = time.monotonic()
        t.start()
        got = 0
        leg.settimeout(0.5)
        while got < total and time.monotonic() - t0 < 10:
            try:
                got += len(leg.recv(1 << 20))
            except socket.timeout:
                pass
        took = time.monotonic() - t0
        assert got == total, (f"{got} of {total} bytes in {took:.1f} s; window clamp {clamped} while shrunk, "
                              f"{leg.getsockopt(socket.IPPROTO_TCP, socket.TCP_WINDOW_CLAMP)} after the restore")
    finally:
        sender.close()
        leg.close()
        lsock.close()


def test_stopped_for_a_move_mid_stream_nothing_lost(byte_path):
    """What a live move does (proxy.livemove): set ``moving``, cancel the pumps while bytes flow both
    ways. The sockets come out of the relay (the map is empty again) with the bytes still on their way
    in ``spilled_to_*``; a plain relay continuing from there delivers every byte exactly once."""
    size = 8 << 20
    # both ends hold their last bytes back until the stop: 8 MiB each way can pass in less than the 10 ms
    # the test polls (both paths), and a connection that ended has nothing to stop (it failed so, 1 run in ~50)
    handler = sink_and_source(size, stopped := threading.Event())
    with proxied(handler, byte_path) as (proxy, _), released(stopped):
        s = connect(proxy)
        data = _pattern(size, b"M")
        sender = threading.Thread(target=lambda: (send_gated(s, data, stopped), s.shutdown(socket.SHUT_WR)))
        back = bytearray()

        def read():
            while d := s.recv(1 << 20):
                back.extend(d)
        reader = threading.Thread(target=read)
        sender.start()
        reader.start()
        wait_for(lambda: proxy.proxy.connections and len(back) > 0, what="bytes flowing")
        conn = next(iter(proxy.proxy.connections))

        def stop():
            conn.moving = True
            conn.pumps.cancel()
        proxy.call(stop)
        wait_for(lambda: conn.ended.is_set(), what="the pumps to stop")
        stopped.set()
        assert conn.handed is not None, "the connection ended instead of stopping"
        if byte_path.relay is not None:
            assert byte_path.relay.joined == 0
        client, backend = conn.handed
        where = (conn.byte_path, len(conn.spilled_to_backend), len(conn.spilled_to_client), conn.bytes_to_backend)
        # a stand-in for the frozen and restored legs: spilled bytes first, then a plain relay
        for sock in (client, backend):
            sock.setblocking(True)
        for sock, spilled in ((backend, conn.spilled_to_backend), (client, conn.spilled_to_client)):
            if spilled:
                sock.sendall(spilled)

        def relay(src, dst):
            while True:
                d = src.recv(1 << 20)
                if not d:
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass  # the stopped relay had passed this FIN on already
                    return
                dst.sendall(d)
        ts = [threading.Thread(target=relay, args=(client, backend)), threading.Thread(target=relay, args=(backend, client))]
        for t in ts:
            t.start()
        for t in (sender, reader, *ts):
            t.join(60)
        client.close()
        backend.close()
        s.close()
        wait_for(lambda: handler.results, what="the backend's result")
        assert handler.results == [(size, hashlib.sha256(data).hexdigest())], where
        assert len(back) == size and bytes(back) == _pattern(size, b"B"), where


def test_a_new_connection_waits_for_its_pairing_before_its_first_byte_is_relayed(byte_path, monkeypatch):
    """A stateful node's own address tells the peer each new connection's pairing before relaying its
    first byte (ServiceProxy.tell_new_legs): a connection whose bytes reached the server but whose
    pairing the standby lacks is reset at a takeover (bench/SOAK.md). The first byte waits for the
    pairing (``told``), at most PAIRING_HOLD (2 s here, so the two cases differ whatever the load)."""
    from proxy import dataplane

    monkeypatch.setattr(dataplane, "PAIRING_HOLD", 2.0)
    arrived: list[float] = []

    def echo_first(conn):
        data = conn.recv(100)
        arrived.append(time.monotonic())
        conn.sendall(data)

    with proxied(echo_first, byte_path) as (proxy, backend):
        woken: list[float] = []
        proxy.call(lambda: setattr(proxy.proxy, "tell_new_legs", lambda: woken.append(time.monotonic())))
        with connect(proxy) as client:           # nobody tells: the first byte goes after the hold
            client.sendall(b"first")
            assert client.recv(100) == b"first"
        assert len(woken) == 1 and arrived[-1] - woken[0] >= 1.8
        assert proxy.call(lambda: proxy.proxy.stats.pairings_late) == 1  # counted: status says so

        def tell_at_once():
            woken.append(time.monotonic())
            for conn in list(proxy.proxy.new_legs):
                if conn.told is not None:
                    conn.told.set()

        proxy.call(lambda: setattr(proxy.proxy, "tell_new_legs", tell_at_once))
        with connect(proxy) as client:           # told at once: no wait
            client.sendall(b"second")
            assert client.recv(100) == b"second"
        assert len(woken) == 2 and arrived[-1] - woken[1] < 1.0
        assert proxy.call(lambda: proxy.proxy.stats.pairings_late) == 1
        # told from the connection's own task (tell_pairing): no wake-up of the pairings task at all;
        # when it cannot (False: a resync is due), the wake-up and the wait as before
        answers: list[bool] = []

        async def tell_pairing(conn):
            answers.append(len(answers) == 0)
            return answers[-1]

        proxy.call(lambda: setattr(proxy.proxy, "tell_pairing", tell_pairing))
        for n, word in enumerate((b"third", b"fourth")):
            with connect(proxy) as client:
                client.sendall(word)
                assert client.recv(100) == word
            assert len(answers) == n + 1 and len(woken) == 2 + n, (answers, woken)
        assert proxy.call(lambda: proxy.proxy.stats.pairings_late) == 1
