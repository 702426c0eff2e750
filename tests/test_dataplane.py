"""The data path's pure parts: where ports go, the ``secure`` key, source-port pools, the
descriptor budget and the pipe pool (unit tests; the lab tests are in test_dataplane_lab.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import ConfigError, load_config, service_to_dict, services_from_dicts

BASE = """
[node]
name = "a"
interface = "eth0"
address = "10.0.0.1/24"
state_dir = "/var/lib/pairproxy/a"
control = "/run/pairproxy/a.sock"

[[service]]
name = "smb"
protocol = "smb"
port = 4450
backend = "10.0.2.10:445"
extra_ports = [4451]
"""


def load(tmp_path: Path, text: str):
    path = tmp_path / "node.toml"
    path.write_text(text)
    return load_config(path)


def test_backend_port_main_and_extra(tmp_path):
    smb, = load(tmp_path, BASE).services
    assert smb.backend_port(4450) == 445      # the main port goes where backend says
    assert smb.backend_port(4451) == 4451     # extra ports keep their numbers


def test_secure_key(tmp_path):
    nfs = BASE + '\n[[service]]\nname = "nfs"\nprotocol = "nfs"\nport = 2049\nbackend = "10.0.2.10:2049"\n'
    assert load(tmp_path, nfs).services[1].privileged_source_port            # nfs: below 1024 by default
    open_nfs = load(tmp_path, nfs + "secure = false\n").services[1]
    assert not open_nfs.privileged_source_port
    assert load(tmp_path, BASE + "secure = true\n").services[0].privileged_source_port
    with pytest.raises(ConfigError) as info:
        load(tmp_path, nfs + 'secure = "no"\n')
    assert info.value.problems == ["service[1].secure: expected true or false, got 'no'"]
    # the peer learns it from the hello; an unset key is not sent (older peers reject unknown keys)
    assert services_from_dicts([service_to_dict(open_nfs)])[0] == open_nfs
    assert "secure" not in service_to_dict(load(tmp_path, nfs).services[1])


def test_source_ports_least_recently_used_first():
    from proxy.dataplane import SourcePorts

    pool = SourcePorts(range(700, 704))
    taken = [pool.take() for _ in range(4)]
    assert sorted(taken) == [700, 701, 702, 703] and pool.take() is None and len(pool) == 0
    pool.give_back(taken[2])
    pool.give_back(taken[0])
    assert pool.take() == taken[2] and pool.take() == taken[0] and pool.take() is None


def test_budget_waits_for_room():
    import trio
    import trio.testing

    from proxy.fds import FdBudget

    async def main():
        budget = FdBudget(reserve=0)
        cap = budget.capacity()
        assert budget.try_acquire(cap - 4)
        assert not budget.fits(4, headroom=1) and budget.fits(4)
        got = []

        async def waiter():
            await budget.acquire(6)
            got.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.sleep(1)
            assert not got                       # 6 do not fit while only 4 are free
            budget.release(2)
        assert got == [1.0] and budget.used == cap

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_pump_lends_pipes_only_while_bytes_are_in_them():
    """Idle connections hold no pipe; pipes come back empty and are reused; the budget counts them."""
    import socket

    import trio

    from proxy.fds import FdBudget
    from proxy.pump import PipePool, splice_pump

    async def main():
        budget = FdBudget(reserve=0)
        pipes = PipePool(budget, keep=1)
        pairs = [trio.socket.from_stdlib_socket(s) for _ in range(2) for s in socket.socketpair()]
        a_out, a_in, b_out, b_in = pairs          # a_in -> pump -> b_out; read at b_in
        moved = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(splice_pump, a_in, b_out, moved.append, pipes)
            await trio.sleep(0.05)
            assert budget.used == 0 and pipes.opened == 0   # idle: no pipe yet
            for i in range(20):
                await a_out.send(b"x" * 1000)
                assert await b_in.recv(2000) == b"x" * 1000
            await trio.sleep(0.05)
            assert pipes.opened == 1 and pipes.idle == 1 and budget.used == 2   # one pipe, reused, back
            a_out.shutdown(socket.SHUT_WR)
        assert await b_in.recv(10) == b""                 # EOF passed on
        assert sum(moved) == 20_000
        pipes.close()
        assert budget.used == 0
        for s in pairs:
            s.close()

    trio.run(main)


def test_raise_nofile_limit_to_hard():
    """pairproxy run starts by raising the soft descriptor limit to the hard one."""
    import subprocess
    import sys

    code = ("import resource; from proxy.fds import raise_nofile_limit; "
            "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)); "
            "old, new = raise_nofile_limit(); "
            "assert (old, new) == (256, hard) == (256, resource.getrlimit(resource.RLIMIT_NOFILE)[0]), (old, new)")
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        cwd=Path(__file__).resolve().parent.parent)
    assert cp.returncode == 0, cp.stderr


def test_adopting_a_connection_reset_before_it_is_served_does_not_end_the_node(tmp_path):
    """A live move restores a client connection that its client resets at once (it gave up during the
    move): ``getpeername`` fails with ENOTCONN; the node must go on (bench/soak.py: a node exited)."""
    import ipaddress
    import socket

    import trio

    from proxy.dataplane import ServiceProxy

    smb, = load(tmp_path, BASE).services
    proxy = ServiceProxy(smb, ipaddress.IPv4Address("127.0.0.1"))

    class Seen(set):
        names: list = []

        def add(self, conn):
            self.names.append(conn.client)
            super().add(conn)

    proxy.connections = Seen()

    async def main():
        client, backend = socket.socket(), socket.socket()   # never connected: getpeername raises
        async with trio.open_nursery() as nursery:
            proxy.adopt(client, backend, 4450, nursery, peer=("10.0.0.9", 40000))
        assert proxy.connections == set()
        # named by the restored state's peer, not getpeername's failure (a pairing with client port 0
        # was told to the peer and refused there: bench/soak.py's hand-backs)
        assert Seen.names == [("10.0.0.9", 40000)]

    trio.run(main)


def test_client_connections_notice_a_client_that_is_gone():
    """A client reset elsewhere (a false takeover) must not hold this node's connection for ever."""
    import socket

    from proxy.dataplane import KEEPALIVE, keep_alive

    with socket.socket() as sock:
        keep_alive(sock)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert (sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)) == KEEPALIVE
    assert KEEPALIVE[0] + KEEPALIVE[1] * KEEPALIVE[2] <= 60
