"""proxy.standby: what a takeover gets from the stateful standby, with a fake observer and MockClock.

Issue 8 items 5 and 6: the connections to reset are never older than one probe (a long sync-link
outage, during which the peer goes on serving new clients, cannot leave them stale), and a stuck
observer costs a takeover at most ``observer_timeout``.
"""

from __future__ import annotations

import collections
from types import SimpleNamespace

import pytest
import trio
import trio.testing

from proxy.config import parse_config
from proxy.standby import CONTINUATIONS_TIMEOUT, PEER_ADDRESS, PEER_BACKEND, StatefulStandby
from proxy.takeover import TakeoverPlan
from proxy.timings import PairTimings

CONFIG = parse_config({
    "node": {"name": "b", "interface": "eth0", "address": "10.0.0.2/24", "state_dir": "/tmp/s",
             "control": "/tmp/s/c.sock"},
    "service": [{"name": "smb", "protocol": "smb", "port": 445, "backend": "10.0.2.10:445"}],
    "peer": {"name": "a", "address": "10.0.0.1", "link": "10.1.0.1:7400", "listen": "10.1.0.2:7400",
             "key_file": "/etc/pairproxy/pair.key"},
    "pair": {"mode": "stateful", "heartbeat": "20ms", "dead_after": "100ms"},
})
TIMINGS = PairTimings.from_config(CONFIG.pair)


class FakeObserver:
    """Answers like proxy.observer's child: ``live`` per view from a table the test changes."""

    def __init__(self, stuck: bool = False):
        self.ready = trio.Event()
        self.ready.set()
        self.failed = None
        self.stuck = stuck
        self.live = {PEER_ADDRESS: [], PEER_BACKEND: []}
        self.requests: list[str] = []
        self.forgets: list[tuple[str, dict]] = []
        self.snapshot = {"connections": []}

    async def run(self):
        await trio.sleep_forever()

    async def request(self, op, view=None, **args):
        self.requests.append(op)
        if self.stuck:
            await trio.sleep_forever()
        await trio.sleep(0.001)  # a round trip
        if op == "forget":
            self.forgets.append((view, args))
            return 0
        if op == "snapshot":
            return self.snapshot
        if op == "digest":
            return {"digest": "mine", "frames": 0, "bytes": 0}
        return list(self.live[view]) if op == "live" else None


class FakeSlot:
    def open(self, mac):
        return False

    def close(self):
        pass


class FakeProxy:
    """The own address's proxy as the pairings task sees it."""

    def __init__(self):
        self.new_legs = collections.deque()
        self.tell_new_legs = None
        self.tell_pairing = None
        self.connections = set()
        self.service = SimpleNamespace(backend=SimpleNamespace(host="10.0.0.10"), backend_port=lambda p: p)


def recording_standby(proxy: FakeProxy) -> tuple[StatefulStandby, list]:
    """A standby whose own address is ``proxy``'s; what it sends the peer: (trio time, message)."""
    sent: list = []
    standby = StatefulStandby(CONFIG, None, FakeSlot(), None, lambda: 0.0, TIMINGS, observer=FakeObserver(),
                              own_proxies=lambda: [proxy])

    async def send(message):
        sent.append((trio.current_time(), message))
    standby._send = send
    return standby, sent


def connection(port: int, seq: int) -> dict:
    return {"client": f"10.0.0.9:{port}", "server": "10.0.0.1:445",
            "tcp": {"server_next_seq": seq, "client_next_seq": seq + 1}}


def make(observer, heard):
    async def send(message):
        pass

    return StatefulStandby(CONFIG, None, FakeSlot(), send, lambda: heard[0], TIMINGS, observer=observer)


def test_a_long_link_outage_does_not_leave_the_resets_stale():
    async def main():
        observer, heard = FakeObserver(), [0.0]
        standby = make(observer, heard)
        async with trio.open_nursery() as nursery:
            await nursery.start(standby.run)
            # the link goes silent at 0; the peer answers probes (link_down) and keeps serving
            observer.live[PEER_ADDRESS] = [connection(5000, 100)]
            standby.prepare_takeover()          # the first probe
            await trio.sleep((TIMINGS.dead_after / 2))
            for second in range(1, 40):         # a long link_down, a prefetch every dead_after / 2
                observer.live[PEER_ADDRESS] = [connection(5000, 100 + second), connection(6000 + second, 7)]
                standby.prepare_takeover()
                await trio.sleep((TIMINGS.dead_after / 2))
            # now the peer dies: the verdict, and the takeover asks for its plan
            plan = await standby.takeover_plan()
            assert plan.clients_to_reset == [connection(5000, 139), connection(6039, 7)]
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_prepared_plan_older_than_its_bound_or_from_another_silence_is_fetched_again():
    async def main():
        observer, heard = FakeObserver(), [0.0]
        standby = make(observer, heard)
        async with trio.open_nursery() as nursery:
            await nursery.start(standby.run)
            observer.live[PEER_ADDRESS] = [connection(5000, 1)]
            standby.prepare_takeover()
            await trio.sleep(0.01)
            observer.live[PEER_ADDRESS] = [connection(5000, 2)]
            # fresh and the same silence: used as prepared (no observer round trip at takeover but the
            # continuation states, which are never prepared: the last ACKs arrive after the death)
            before = len(observer.requests)
            assert (await standby.takeover_plan()).clients_to_reset == [connection(5000, 1)]
            assert observer.requests[before:] == ["continuations"]
            # prepared, then too old (no probe for a while): fetched again
            standby.prepare_takeover()
            await trio.sleep(TIMINGS.prepared_takeover_max_age * 2)
            observer.live[PEER_ADDRESS] = [connection(5000, 3)]
            assert (await standby.takeover_plan()).clients_to_reset == [connection(5000, 3)]
            # the same last heartbeat, as the next fact of the heartbeat process converts it to trio's
            # clock (microseconds later): still the same silence, used as prepared
            heard[0] = -5.0
            standby.prepare_takeover()
            await trio.sleep(0.01)
            heard[0] = -5.0 + 3e-6
            observer.live[PEER_ADDRESS] = [connection(5000, 5)]
            before = len(observer.requests)
            assert (await standby.takeover_plan()).clients_to_reset == [connection(5000, 3)]
            assert observer.requests[before:] == ["continuations"]
            # prepared during an earlier silence (a heartbeat came since): fetched again
            standby.prepare_takeover()
            await trio.sleep(0.01)
            heard[0] = trio.current_time()
            observer.live[PEER_ADDRESS] = [connection(5000, 4)]
            assert (await standby.takeover_plan()).clients_to_reset == [connection(5000, 4)]
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_stuck_observer_costs_a_takeover_at_most_observer_timeout():
    async def main():
        observer, heard = FakeObserver(stuck=True), [0.0]
        standby = make(observer, heard)
        async with trio.open_nursery() as nursery:
            await nursery.start(standby.run)
            standby.prepare_takeover()         # hangs in the background: nobody waits for it
            start = trio.current_time()
            plan = await standby.takeover_plan()
            assert plan == TakeoverPlan()      # a stateless takeover
            assert trio.current_time() - start <= TIMINGS.observer_timeout + 1e-6
            assert standby.observer_timeouts >= 1
            # digests from the peer never block the caller (the node's decision task)
            for _ in range(500):
                standby.on_message({"type": "digest", "address": "10.0.0.1", "digest": "x"})
            assert standby.messages_dropped > 0
            # the end of a takeover is bounded too
            start = trio.current_time()
            assert await standby.end_takeover() == []
            assert trio.current_time() - start <= 2 * TIMINGS.observer_timeout + 1e-6
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_the_dead_peers_connections_are_forgotten_at_the_takeover_and_at_its_restart():
    """bench/SOAK.md: the standby's view of its peer grew by 20-40 connections per failover until the
    takeover plan missed its bound. A takeover and a new process of the peer (its hello's epoch) make
    both peer views forget what was open before; snapshots from the owner prune what it lacks."""
    async def main():
        import time

        observer, heard = FakeObserver(), [0.0]
        sent = []
        standby = make(observer, heard)

        async def send(message):
            sent.append(message)
        standby._send = send
        async with trio.open_nursery() as nursery:
            await nursery.start(standby.run)
            standby.on_peer_hello({"name": "a", "epoch": "one"})
            await trio.sleep(0.1)
            assert observer.forgets == []                      # the first hello: nothing to forget
            wall = time.time()
            await standby.takeover_plan()
            await trio.sleep(0.1)
            assert [v for v, _ in observer.forgets] == [PEER_ADDRESS, PEER_BACKEND]
            assert all(wall <= a["before"] <= time.time() for _, a in observer.forgets)
            # the peer comes back as a new process: what was open before its old one was last heard goes
            observer.forgets.clear()
            standby.on_message({"type": "digest", "address": "10.0.0.1", "digest": "x"})
            heard_wall = time.time()
            standby.on_peer_hello({"name": "a", "epoch": "one"})   # the same process again (a reconnect)
            await trio.sleep(0.1)
            assert observer.forgets == []
            standby.on_peer_hello({"name": "a", "epoch": "two"})
            await trio.sleep(0.1)
            assert [v for v, _ in observer.forgets] == [PEER_ADDRESS, PEER_BACKEND]
            assert all(a["before"] <= heard_wall for _, a in observer.forgets)
            # the owner's snapshot lacks connections this node has: they are pruned, with a margin
            observer.forgets.clear()
            for _ in range(3):
                standby.on_message({"type": "digest", "address": "10.0.0.1", "digest": "x"})
                await trio.sleep(0.1)
            assert sent[-1] == {"type": "snapshot_request", "address": "10.0.0.1"}
            asked = standby._snapshot_asked_wall
            observer.snapshot = {"connections": [{"client": "10.0.0.9:5000", "server": "10.0.0.1:445",
                                                  "protocol": "smb", "sessions": [], "opens": []},
                                                 {"client": "10.0.0.9:6000", "server": "10.0.0.1:445",
                                                  "protocol": "smb", "sessions": [], "opens": []}]}
            standby.on_message({"type": "snapshot", "address": "10.0.0.1", "snapshot": {"connections": [
                {"client": "10.0.0.9:5000", "server": "10.0.0.1:445", "protocol": "smb", "sessions": [], "opens": []}]}})
            await trio.sleep(0.1)
            [(view, args)] = observer.forgets
            assert view == PEER_ADDRESS and not args["gone"] and args["keep"] == [["10.0.0.9:5000", "10.0.0.1:445"]]
            assert args["before"] == asked - 1.0
            assert standby.view_sync.last_difference["counts"]["only_here"] == 1
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


class SlowPairingsObserver(FakeObserver):
    """Takes a pairings message only after ``delay`` (a busy observer); records what it took, in order."""

    def __init__(self):
        super().__init__()
        self.delay = 0.0
        self.taken: list[list] = []

    async def request(self, op, view=None, **args):
        if op == "pairings":
            self.requests.append(op)
            await trio.sleep(self.delay + 0.001)
            self.taken.append([a[1] for a in args["add"]] + (["reset"] if args["reset"] else []))
            return []
        if op == "continuations":
            self.requests.append(op)
            return {"first": [], "rest": 0}
        return await super().request(op, view, **args)


def test_pairings_the_observer_is_too_slow_for_are_kept_merged_and_given_before_a_takeover():
    """The peer sends only changes. Its pairings went through the standby's bounded message queue, and in
    bench/soak.py (load 12) a busy observer made it drop 543 of them in 25 cycles: those connections
    stayed unpaired until the peer's resync 5 s later and a death meanwhile reset them. Now none is
    dropped: what comes while the observer is busy is merged and given in one request."""
    def message(*ports, reset=False, remove=()):
        body = {"type": "pairings", "address": "10.0.0.1", "add": [["10.0.0.9", p, 445] for p in ports],
                "remove": [["10.0.0.9", p, 445] for p in remove]}
        return {**body, "reset": True} if reset else body

    async def main():
        observer, heard = SlowPairingsObserver(), [0.0]
        standby = make(observer, heard)
        async with trio.open_nursery() as nursery:
            await nursery.start(standby.run)
            observer.delay = 5.0                     # slower than the bound (status_observer_timeout, 2 s)
            for port in range(1000, 1500):           # more than the message queue holds (100)
                standby.on_message(message(port))
            standby.on_message(message(remove=[1000]))
            await trio.sleep(2.5)
            assert observer.taken == [] and standby.pairings_late >= 1
            observer.delay = 0.0
            await trio.sleep(2.5)                    # the retry under way times out; the next one is taken
            assert sorted(p for t in observer.taken for p in t) == list(range(1001, 1500))  # nothing lost
            assert standby.messages_dropped == 0
            # a reset makes what is still pending moot
            observer.delay = 5.0
            standby.on_message(message(2001))
            await trio.sleep(2.5)
            observer.delay = 0.0
            standby.on_message(message(2002, reset=True))
            await trio.sleep(2.5)
            assert observer.taken[-1] == [2002, "reset"]
            # pending at the takeover: given to the observer before it judges the connections
            observer.delay = 5.0
            standby.on_message(message(2003))
            await trio.sleep(2.5)
            assert observer.taken[-1] == [2002, "reset"]
            observer.delay = 0.0
            await trio.sleep(1.0)                    # a retry under way: the continuations wait for it,
            observer.requests.clear()                # the address perhaps not (then they follow it)
            if (await standby.takeover_plan()).more_continuations:
                await standby.continuations_rest()
            assert observer.taken[-1] == [2003], (observer.requests, len(standby.inbox), standby.plan_phases)
            assert observer.requests.index("pairings") < observer.requests.index("continuations")
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_new_connection_is_released_as_soon_as_its_pairing_is_on_the_link():
    """The own address's proxies get a waker (``tell_new_legs``): a new connection wakes the pairings task
    at once (not at its next 5 ms tick), and is released (``told``) once its pairing was sent."""
    from proxy.dataplane import Connection

    async def main():
        proxy = FakeProxy()
        standby, sent = recording_standby(proxy)
        async with trio.open_nursery() as nursery:
            await nursery.start(standby.run)
            await trio.sleep(0.1)
            assert proxy.tell_new_legs is not None
            conn = Connection(client=("10.0.0.9", 40000), port=445)
            conn.told = trio.Event()
            proxy.new_legs.append(conn)
            t0 = trio.current_time()
            proxy.tell_new_legs()
            await conn.told.wait()
            assert trio.current_time() - t0 < 0.001       # at once, not at the next tick (5 ms)
            nursery.cancel_scope.cancel()
        assert proxy.tell_new_legs is None                  # the task gone: nobody waits for it any more

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


class SlowContinuationsObserver(FakeObserver):
    """Answers ``live`` at once but ``continuations`` only after ``delay`` (forever if None): an observer
    stuck behind a backlog of frames just when the takeover asks which connections to continue."""

    def __init__(self, delay: float | None):
        super().__init__()
        self.delay = delay
        self.rest = [[{"client": "10.0.0.9:6000"}], []]

    async def request(self, op, view=None, **args):
        if op == "continuations":
            self.requests.append(op)
            if self.delay is None:
                await trio.sleep_forever()
            await trio.sleep(self.delay)
            return {"first": [{"client": "10.0.0.9:5000"}], "rest": 1}
        if op == "continuations_rest":
            self.requests.append(op)
            await trio.sleep(0.001)
            return self.rest.pop(0) if self.rest else []
        return await super().request(op, view, **args)


async def assert_rest_then_done(standby, *chunks) -> None:
    """``continuations_rest`` gives ``chunks`` in order, then [] with everything fetched, no timeout."""
    for chunk in chunks:
        assert await standby.continuations_rest() == chunk
    assert await standby.continuations_rest() == []
    assert standby._rest_fetched.is_set() and standby.observer_timeouts == 0


def test_a_slow_observer_at_the_continuations_delays_the_address_at_most_observer_timeout():
    """Issue 8, finding 6: the takeover waited up to 1 s (CONTINUATIONS_TIMEOUT) for the busiest
    continuations before its address came up. Now at most ``observer_timeout``: later ones are the first
    chunk of the rest (restored with the address up, under the repair guard), nothing is lost."""
    async def main():
        observer, heard = SlowContinuationsObserver(delay=0.5), [0.0]
        standby = make(observer, heard)
        async with trio.open_nursery() as nursery:
            await nursery.start(standby.run)
            observer.live[PEER_ADDRESS] = [connection(5000, 1), connection(6000, 1)]
            start = trio.current_time()
            plan = await standby.takeover_plan()
            assert trio.current_time() - start <= 2 * TIMINGS.observer_timeout + 0.01
            assert plan.continuations == [] and plan.more_continuations and len(plan.clients_to_reset) == 2
            assert standby.plan_phases.get("continuations_late") == 1
            # the late busiest first, then the observer's rest, then the end
            assert await standby.continuations_rest() == [{"client": "10.0.0.9:5000"}]
            assert 0.5 <= trio.current_time() - start < 0.6
            await assert_rest_then_done(standby, [{"client": "10.0.0.9:6000"}])
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_with_a_repair_guard_the_address_does_not_wait_for_the_continuations_at_all():
    """``wait_for_first=False`` (the takeover has a repair guard armed): the plan comes without the
    continuations, however slow the observer, and the busiest are the rest's first chunk."""
    async def main():
        observer, heard = SlowContinuationsObserver(delay=0.05), [0.0]
        standby = make(observer, heard)
        async with trio.open_nursery() as nursery:
            await nursery.start(standby.run)
            observer.live[PEER_ADDRESS] = [connection(5000, 1), connection(6000, 1)]
            start = trio.current_time()
            plan = await standby.takeover_plan(wait_for_first=False)
            assert trio.current_time() - start < 0.05          # not the observer's 50 ms
            assert plan.continuations == [] and plan.more_continuations == 1 and len(plan.clients_to_reset) == 2
            assert "continuations_late" not in standby.plan_phases
            await assert_rest_then_done(standby, [{"client": "10.0.0.9:5000"}], [{"client": "10.0.0.9:6000"}])
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


@pytest.mark.parametrize("wait_for_first", [True, False])
def test_idle_connections_only_none_busy_are_still_all_given(wait_for_first):
    """None of the peer's connections busy (the observer's busiest-first list empty, one more waiting):
    the rest still comes, whether the takeover waited for the busiest or not (CI, 2026-11-30: without a
    wait the empty first list ended the rest, and an idle client was neither continued nor reported)."""
    class IdleOnly(SlowContinuationsObserver):
        async def request(self, op, view=None, **args):
            if op == "continuations":
                self.requests.append(op)
                return {"first": [], "rest": 1}
            return await super().request(op, view, **args)

    async def main():
        observer, heard = IdleOnly(delay=0.0), [0.0]
        standby = make(observer, heard)
        async with trio.open_nursery() as nursery:
            await nursery.start(standby.run)
            observer.live[PEER_ADDRESS] = [connection(6000, 1)]
            plan = await standby.takeover_plan(wait_for_first=wait_for_first)
            assert plan.continuations == [] and plan.more_continuations == 1
            await assert_rest_then_done(standby, [{"client": "10.0.0.9:6000"}])
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_an_observer_that_never_says_which_to_continue_costs_resets_not_a_hang():
    async def main():
        observer, heard = SlowContinuationsObserver(delay=None), [0.0]
        standby = make(observer, heard)
        async with trio.open_nursery() as nursery:
            await nursery.start(standby.run)
            observer.live[PEER_ADDRESS] = [connection(5000, 1)]
            start = trio.current_time()
            plan = await standby.takeover_plan()
            assert trio.current_time() - start <= 2 * TIMINGS.observer_timeout + 0.01
            assert plan.continuations == [] and plan.more_continuations
            assert await standby.continuations_rest() == []   # given up after CONTINUATIONS_TIMEOUT: reset
            assert trio.current_time() - start <= CONTINUATIONS_TIMEOUT + 0.01
            assert standby._rest_fetched.is_set() and standby.observer_timeouts == 1
            # the next takeover starts afresh: nothing of this one is given to it
            observer.delay = 0.0
            plan = await standby.takeover_plan()
            assert plan.continuations == [{"client": "10.0.0.9:5000"}] and plan.more_continuations == 1
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


@pytest.mark.parametrize("variable", ["PAIRPROXY_WITHHOLD_PAIRINGS", "PAIRPROXY_UNREAD_ORIGINS"])
def test_a_fault_injection_reads_a_port_range_and_names_a_bad_value(monkeypatch, variable):
    """Test-only fault injection (proxy.faults): unset injects nothing; a bad value stops the node with
    the variable named, never silently injects nothing (a test would pass for the wrong reason)."""
    from proxy import faults

    assert variable in (faults.WITHHOLD_PAIRINGS, faults.UNREAD_ORIGINS)
    monkeypatch.delenv(variable, raising=False)
    low, high = faults.client_ports(variable)
    assert not any(low <= port <= high for port in (1, 1000, 65535))
    monkeypatch.setenv(variable, "30101-30103")
    assert faults.client_ports(variable) == (30101, 30103)
    monkeypatch.setenv(variable, "30101")
    assert faults.client_ports(variable) == (30101, 30101)
    for bad in ("many", "5-x", "0-10", "10-5", "1-70000"):
        monkeypatch.setenv(variable, bad)
        with pytest.raises(ValueError, match=variable):
            faults.client_ports(variable)


def test_a_new_connection_tells_its_pairing_from_its_own_task_once_the_resync_is_out():
    """``tell_pairing``: the connection's own task sends its pairing (no hop to the pairings task, which
    cost two turns of a busy event loop: the hold ran out for most new connections right after a
    restart). Not before the pairings task has sent the resync of everything (the peer would take a
    lone addition, then the reset would drop it): then False, and the old path."""
    import socket

    from proxy.dataplane import Connection

    async def main():
        proxy = FakeProxy()
        standby, sent = recording_standby(proxy)
        a, b = socket.socketpair()
        try:
            conn = Connection(client=("10.0.0.9", 40000), port=445)
            conn.backend_source, conn.legs = ("10.0.0.1", 50001), (a, b)
            assert await standby._tell_pairing(proxy, conn) is False and sent == []  # the resync comes first
            async with trio.open_nursery() as nursery:
                await nursery.start(standby.run)
                await trio.sleep(0.1)
                assert proxy.tell_pairing is not None and not standby.outbox.resync_due
                resync = [m for _, m in sent if m["type"] == "pairings"]
                assert resync and resync[0].get("reset") is True
                t0, before = trio.current_time(), len(sent)
                assert await proxy.tell_pairing(conn) is True
                told = [m for t, m in sent[before:] if t == t0 and m["type"] == "pairings"]
                assert len(told) == 1 and told[0]["add"][0][:4] == ["10.0.0.9", 40000, 445, 50001], told
                assert await proxy.tell_pairing(conn) is True and len(sent) == before + 1  # told once
                nursery.cancel_scope.cancel()
            assert proxy.tell_pairing is None
        finally:
            a.close()
            b.close()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
