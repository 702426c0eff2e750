"""proxy.takeover and proxy.handback: the sequences' order, undo and errors, with fake kernel objects.

The kernel side is faked here (these are unit tests of the sequences' logic); the lab tests
(test_pair_lab.py) run the same sequences against the real kernel.
"""

from __future__ import annotations

import ipaddress

import pytest
import trio
import trio.testing
from pyroute2.netlink.exceptions import NetlinkError

from proxy import handback, takeover
from proxy.config import NodeConfig, PeerConfig, parse_endpoint, service_to_dict, ServiceConfig
from proxy.dataplane import ServiceProxy
from proxy.netplane import NetworkError
from proxy.takeover import HeldAddress, TakeoverError, TakeoverPlan, take_over

NODE = NodeConfig("b", "eth0", ipaddress.IPv4Interface("10.0.0.2/24"), state_dir="/tmp/x", control="/tmp/x/c")
PEER = PeerConfig("a", ipaddress.IPv4Address("10.0.0.1"), parse_endpoint("10.1.0.1:7400"),
                  parse_endpoint("10.1.0.2:7400"), key_file="/k", macvlan="pp-a")
SERVICE = ServiceConfig(name="t", protocol="tcp", port=9000, backend=parse_endpoint("10.0.2.10:9000"))
HELLO = {"mac": "02:00:00:00:00:01", "services": [service_to_dict(SERVICE)]}


class FakeSlot:
    """A PeerMacvlanSlot whose open may fail like the kernel does."""

    def __init__(self, fail: int = 0, already_open: bool = False, error: Exception | None = None):
        self.fail = fail
        self.error = error or NetworkError("cannot create macvlan pp-a: Address already in use")
        self.is_open = already_open
        self.log: list[str] = []

    def open(self, mac: str) -> bool:
        if self.fail:
            self.fail -= 1
            self.log.append("open failed")
            raise self.error
        if self.is_open:
            return False
        self.is_open = True
        self.log.append("open")
        return True

    def close(self) -> None:
        self.is_open = False
        self.log.append("close")


class FakeService:
    """An AddressService whose address may fail to come up (NetworkError before it serves)."""

    fail_address = 0
    instances: list["FakeService"] = []

    def __init__(self, address, ifname, services, **kw):
        self.address, self.ifname, self.state = address, ifname, "idle"
        self.address_up_at = None
        self.proxies = [ServiceProxy(s, address.ip) for s in services]  # objects only: nothing listens
        self.stopped_with = None
        self._stop = trio.Event()
        FakeService.instances.append(self)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
        if FakeService.fail_address:
            FakeService.fail_address -= 1
            raise NetworkError(f"cannot add {self.address} to {self.ifname}: File exists")
        self.address_up_at = trio.current_time()
        self.state = "serving"
        task_status.started()
        await self._stop.wait()
        self.state = "stopped"

    def stop(self, grace):
        self.stopped_with = grace
        self._stop.set()


class FakeStandby:
    def __init__(self, plan=TakeoverPlan(), stuck=False, syns=(), armed=False):
        self.plan, self.stuck, self.calls = plan, stuck, []
        self.plan_phases = {"plan": 0.0}
        self.syns, self.armed = list(syns), armed
        self.rest = [list(plan.continuations)] if plan.more_continuations else []
        self.gate: trio.Event | None = None  # set: continuations_rest waits for it

    def repair_guard_armed(self):
        return self.armed

    async def takeover_plan(self, *, wait_for_first=True):
        self.calls.append(f"plan wait_for_first={wait_for_first}")
        return self.plan

    async def continuations_rest(self):
        self.calls.append("rest")
        if self.gate is not None:
            await self.gate.wait()
        return self.rest.pop(0) if self.rest else []

    def continuations_done(self):
        self.calls.append("continuations done")

    def note_continued(self, clients):
        pass

    def send_resets(self, plan):
        self.calls.append("resets")
        return len(plan.clients_to_reset), len(plan.backends_to_reset)

    async def end_takeover(self):
        self.calls.append("end")
        return [{"client": "10.0.0.9", "verdict": "resumed"}]

    async def open_repair_guard(self):  # a kernel change: not in a unit test
        return None

    async def outage_syns(self):
        self.calls.append("syns")
        return self.syns


@pytest.fixture(autouse=True)
def fake_service(monkeypatch):
    FakeService.fail_address = 0
    FakeService.instances = []
    monkeypatch.setattr(takeover, "AddressService", FakeService)


async def run_takeover(nursery, slot, standby=None, hello=HELLO):
    return await take_over(node=NODE, peer=PEER, peer_hello=hello, mac="02:00:00:00:00:02", nursery=nursery,
                           macvlan=slot, standby=standby, last_heard_at=0.5, detected_at=1.0)


def test_takeover_and_release_in_order_and_undone_in_reverse():
    async def main():
        async with trio.open_nursery() as nursery:
            slot = FakeSlot()
            held = await run_takeover(nursery, slot)
            assert slot.log == ["open"] and held.opened_macvlan
            assert held.service.state == "serving" and held.service.ifname == "pp-a"
            assert str(held.service.address) == "10.0.0.1/32"
            assert held.takeover.address_up_at is not None
            await handback.release(held, macvlan=slot, standby=None)
            assert held.service.stopped_with == 0      # the owner is waiting: no grace
            assert slot.log == ["open", "close"]       # the macvlan after the address (reverse order)
            assert held.takeover.released_at is not None
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_stateful_standby_keeps_its_macvlan_and_gives_the_resets_and_the_resume():
    async def main():
        async with trio.open_nursery() as nursery:
            slot = FakeSlot(already_open=True)
            standby = FakeStandby(TakeoverPlan([{"client": "10.0.0.9:5000"}], [{"client": "x", "server": "y"}]))
            held = await run_takeover(nursery, slot, standby)
            assert not held.opened_macvlan
            assert (held.takeover.resets, held.takeover.backend_resets) == (1, 1)
            await handback.release(held, macvlan=slot, standby=standby)
            assert slot.is_open and slot.log == []
            assert standby.calls == ["plan wait_for_first=True", "resets", "syns", "end"] and held.takeover.resume[0]["verdict"] == "resumed"
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


@pytest.mark.parametrize("kernel_error", [NetworkError("cannot create macvlan pp-a: Address already in use"),
                                          NetlinkError(98, "Address already in use")])  # "link set up"
def test_kernel_error_on_the_macvlan_is_a_retryable_takeover_error(kernel_error):
    async def main():
        async with trio.open_nursery() as nursery:
            slot = FakeSlot(fail=1, error=kernel_error)
            with pytest.raises(TakeoverError) as error:
                await run_takeover(nursery, slot)
            assert error.value.retry and "Address already in use" in str(error.value)
            assert not slot.is_open and FakeService.instances == []
            held = await run_takeover(nursery, slot)  # the retry works once the kernel lets it
            assert held.service.state == "serving"
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_kernel_error_on_the_address_undoes_the_macvlan():
    async def main():
        async with trio.open_nursery() as nursery:
            slot = FakeSlot()
            FakeService.fail_address = 1
            with pytest.raises(TakeoverError) as error:
                await run_takeover(nursery, slot)
            assert error.value.retry and "File exists" in str(error.value)
            assert slot.log == ["open", "close"] and not slot.is_open
            # the surviving nursery (the node) goes on: nothing crashed
            assert nursery.child_tasks == frozenset()
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


@pytest.mark.parametrize("hello, words", [
    (None, "never heard from"),
    ({"services": []}, "never heard from"),
    ({"mac": "02:00:00:00:00:01", "services": [{"name": "x", "port": 0}]}, "services are unusable"),
])
def test_without_the_peers_hello_there_is_nothing_to_retry(hello, words):
    async def main():
        async with trio.open_nursery() as nursery:
            slot = FakeSlot()
            with pytest.raises(TakeoverError) as error:
                await run_takeover(nursery, slot, hello=hello)
            assert not error.value.retry and words in str(error.value)
            assert slot.log == []

    trio.run(main)


def test_held_address_is_what_release_needs():
    assert set(HeldAddress.__dataclass_fields__) == {"service", "done", "takeover", "opened_macvlan", "drain"}


def syn(client_port: int, port: int) -> bytes:
    """A client's SYN to PEER's address, as the SYN log keeps it (an IPv4 packet)."""
    import struct
    tcp = struct.pack("!HHIIBBHHH", client_port, port, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0, bytes([10, 0, 0, 9]), PEER.address.packed)
    return ip + tcp


def test_the_outages_syns_are_handed_over_oldest_first_paced_per_port_and_not_after_a_release(monkeypatch):
    """All at once they were an smbd fork each on the backend in one instant, delaying every new client's
    first answer (bench/FAILOVER.md): per port one every OUTAGE_SYN_SPACING, the ports side by side; a SYN
    still waiting when the address is released is not sent (it would leave this node)."""
    handed: list[tuple[float, int, int]] = []

    def inject(packets, address):
        assert address == str(PEER.address)
        for p in packets:
            handed.append((trio.current_time(), synlog.destination_port(p), int.from_bytes(p[20:22], "big")))
        return len(packets)

    from proxy import synlog
    monkeypatch.setattr(synlog, "inject", inject)
    spacing = takeover.OUTAGE_SYN_SPACING
    syns = [syn(5000, 445), syn(5001, 2049), syn(5002, 445), syn(5003, 445), syn(5004, 2049)]

    async def main():
        async with trio.open_nursery() as nursery:
            standby = FakeStandby(syns=syns)
            held = await run_takeover(nursery, FakeSlot(), standby)
            up = held.takeover.address_up_at
            await trio.sleep(1.0)
            by_port = {port: [(round((t - up) / spacing, 3), c) for t, p, c in handed if p == port]
                       for port in (445, 2049)}
            assert by_port == {445: [(0, 5000), (1, 5002), (2, 5003)], 2049: [(0, 5001), (1, 5004)]}
            assert held.takeover.syns_answered == 5
            # released with SYNs still waiting: the rest are not sent
            handed.clear()
            standby = FakeStandby(syns=[syn(6000 + i, 445) for i in range(10)])
            held = await run_takeover(nursery, FakeSlot(already_open=True), standby)
            await trio.sleep(spacing * 2.5)
            held.service.stop(0)
            await trio.sleep(1.0)
            assert [c for _, _, c in handed] == [6000, 6001, 6002] and held.takeover.syns_answered == 3
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


@pytest.mark.parametrize("armed", [True, False])
def test_the_address_waits_for_the_busiest_continuations_only_without_a_repair_guard(armed):
    """With the repair guard armed the address comes up at once and every continuation follows it (the
    busiest first, before the outage's SYNs); without one the busiest are asked for before it."""
    async def main():
        async with trio.open_nursery() as nursery:
            plan = TakeoverPlan(more_continuations=1)
            standby = FakeStandby(plan=plan, armed=armed)
            standby.rest = [[{"client": "10.0.0.9:5000", "reason": "not continuable"}]]  # then none
            await run_takeover(nursery, FakeSlot(), standby)
            await trio.sleep(0.1)
            assert standby.calls[0] == f"plan wait_for_first={not armed}"
            assert standby.calls[1:] == ["rest", "syns", "rest", "continuations done", "resets"], standby.calls
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_the_dead_peers_backend_ports_are_kept_from_new_clients_until_continued_or_reset():
    """A secure (NFS) service's new backend connection from a port of a dead peer's leg met that leg, still
    established at the server, and the leg's restore failed with EADDRNOTAVAIL (bench/FAILOVER.md): the
    ports are out of the pool from before the address is up until the leg is reset (then back) or
    continued (its connection gives it back when it ends)."""
    nfs = ServiceConfig(name="nfs", protocol="nfs", port=2049, backend=parse_endpoint("10.0.2.10:2049"))
    hello = {"mac": "02:00:00:00:00:01", "services": [service_to_dict(SERVICE), service_to_dict(nfs)]}
    legs = [{"client": "10.0.0.1:920", "server": "10.0.2.10:2049"}, {"client": "10.0.0.1:921", "server": "10.0.2.10:2049"},
            {"client": "10.0.0.1:40000", "server": "10.0.2.10:9000"}]  # not a secure service's: no pool

    async def main():
        async with trio.open_nursery() as nursery:
            standby = FakeStandby(TakeoverPlan(backends_to_reset=legs, more_continuations=1), armed=True)
            standby.rest = [[{"client": "10.0.0.9:5000", "reason": "not continuable"}]]
            standby.gate = trio.Event()
            held = await run_takeover(nursery, FakeSlot(), standby, hello=hello)
            [proxy] = [p for p in held.service.proxies if p.service.name == "nfs"]
            pool = proxy.source_ports(2049)
            assert held.service.state == "serving" and 920 not in pool._free and 921 not in pool._free
            assert len(pool) == pool.size - 2
            assert [p.source_pool_towards(("10.0.2.10", 9000)) for p in held.service.proxies] == [None, None]
            standby.gate.set()  # the rest: none continued, all reset, the ports free again
            await trio.sleep(0.1)
            assert "resets" in standby.calls and 920 in pool._free and 921 in pool._free and len(pool) == pool.size
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
