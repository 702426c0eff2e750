"""proxy.roles' live-move decisions (issue 11), pure: the sequences of a handover and its way back.

(Every move event in every state is covered by tests/test_roles.py's table tests; here: what the two
nodes of a pair do in order, and what a move never does.)"""

from proxy import roles
from proxy.roles import (HANDED_OVER, HOLDING, MOVING_BACK, MOVING_OUT, SERVING, STANDBY, HandoverBackRequested,
                         HandoverRequested, HandbackDone, HelloReceived, MoveArrived, MoveBackRequested, MoveIn,
                         MoveInFailed, MoveOut, MovedOut, PairCore, PeerDeclaredDead, SendMessage, ServeOwnAddress,
                         TakeoverDone)

A, B = "10.0.0.1", "10.0.0.2"


def pair() -> tuple[PairCore, PairCore]:
    a = PairCore("a", "b", A, B, own_role=SERVING, peer_role=STANDBY)
    b = PairCore("b", "a", B, A, own_role=SERVING, peer_role=STANDBY)
    return a, b


def test_handover_and_back_moves_the_address_between_the_two_cores():
    a, b = pair()
    assert a.handle(HandoverRequested()) == [MoveOut(A)]
    assert a.own_role == MOVING_OUT
    assert a.handle(MovedOut(A)) == []
    assert (a.own_role, a.holds()) == (HANDED_OVER, [])
    assert b.handle(MoveArrived(A)) == [MoveIn(A)]
    assert b.peer_role == HOLDING and b.handle(TakeoverDone()) == []
    # a hears that b holds its address: no hand-back request (it waits for the move back)
    assert a.handle(HelloReceived(frozenset({A, B}), SERVING)) == []
    # handover --back
    assert a.handle(HandoverBackRequested()) == [SendMessage("move_request", A)]
    assert b.handle(MoveBackRequested(A)) == [MoveOut(A)]
    assert b.peer_role == MOVING_BACK
    assert b.handle(MovedOut(A)) == [] and b.peer_role == STANDBY
    assert a.handle(MoveArrived(A)) == [MoveIn(A)]
    assert a.own_role == SERVING
    assert not a.unexpected and not b.unexpected


def test_a_move_that_could_not_start_leaves_everything_as_it_was():
    a, b = pair()
    a.handle(HandoverRequested())
    assert a.handle(MovedOut(A, started=False)) == [] and a.own_role == SERVING
    b.handle(MoveArrived(A))
    b.handle(MoveBackRequested(A))
    # no link to move over: the old hand-back (cut), and the owner is told
    assert b.handle(MovedOut(A, started=False)) == [roles.ReleasePeerAddress()] and b.peer_role == roles.RELEASING
    assert b.handle(roles.Released()) == [SendMessage("handback_done", A)]


def test_a_move_called_off_after_the_freeze_leaves_the_holder_holding():
    """No move_ready in time (or the link broke): the giver thawed, its connections went on, the address
    never left; the core must not release or hand back anything."""
    a, b = pair()
    a.handle(HandoverRequested())
    assert a.handle(MovedOut(A, thawed=True)) == [] and a.own_role == SERVING
    b.handle(MoveArrived(A))
    b.handle(TakeoverDone())
    b.handle(MoveBackRequested(A))
    assert b.handle(MovedOut(A, thawed=True)) == [] and b.peer_role == HOLDING
    # SIGTERM whose move was called off: the drain, as before
    a, _ = pair()
    a.handle(roles.Stopping(link_connected=True))
    assert a.handle(MovedOut(A, stopping=True, thawed=True)) == [roles.LeaveOwnAddress()]
    assert not a.unexpected and not b.unexpected


def test_a_failed_move_in_gives_the_address_back_to_its_owner():
    a, b = pair()
    a.handle(HandoverRequested())
    a.handle(MovedOut(A))
    b.handle(MoveArrived(A))
    assert b.handle(MoveInFailed("File exists")) == [SendMessage("handback_done", A)]
    assert b.peer_role == STANDBY
    assert a.handle(HandbackDone(A)) == [ServeOwnAddress()] and a.own_role == SERVING


def test_a_handed_over_node_serves_again_when_the_holder_dies():
    a, _ = pair()
    a.handle(HandoverRequested())
    a.handle(MovedOut(A))
    actions = a.handle(PeerDeclaredDead(1.0, 0.1))
    # the connections the holder served on it are this node's to end (a stateful node resets them)
    assert ServeOwnAddress(holder_died=True) in actions and a.own_role == SERVING and a.peer_role == HOLDING


def test_a_node_that_yielded_its_address_ends_the_holders_connections_when_the_holder_dies():
    # a returned, found its address held by b and asked for it back; b dies before moving it
    a = PairCore("a", "b", A, B, own_role=roles.CLAIMING, peer_role=STANDBY)
    a.handle(HelloReceived(frozenset({A, B}), SERVING))
    assert a.own_role == roles.YIELDED
    assert ServeOwnAddress(holder_died=True) in a.handle(PeerDeclaredDead(2.0, 0.1))
    # the peer says it does not hold it (its move-in failed): nothing of its to end there
    a, _ = pair()
    a.handle(HandoverRequested())
    a.handle(MovedOut(A))
    assert a.handle(HandbackDone(A)) == [ServeOwnAddress()] and a.own_role == SERVING


def test_the_hand_back_after_a_return_is_a_live_move():
    a, b = pair()
    b.handle(PeerDeclaredDead(1.0, 0.1))
    b.handle(TakeoverDone())
    a = PairCore("a", "b", A, B)                       # a restarted: claiming
    assert a.handle(HelloReceived(frozenset({A, B}), SERVING)) == [SendMessage("handback_request", A)]
    assert b.handle(roles.HandbackRequested(A)) == [MoveOut(A)]
    assert b.handle(MovedOut(A)) == [] and b.peer_role == STANDBY
    assert a.handle(MoveArrived(A)) == [MoveIn(A)] and a.own_role == SERVING
    assert not a.unexpected and not b.unexpected


def test_sigterm_in_a_pair_moves_the_address_and_falls_back_to_the_drain():
    a, b = pair()
    assert a.handle(roles.Stopping(link_connected=True)) == [MoveOut(A, stopping=True)]
    assert a.handle(MovedOut(A, stopping=True)) == [] and a.own_role == HANDED_OVER
    assert b.handle(MoveArrived(A)) == [MoveIn(A)]
    a, _ = pair()
    a.handle(roles.Stopping(link_connected=True))
    assert a.handle(MovedOut(A, started=False, stopping=True)) == [roles.LeaveOwnAddress()]
    a, _ = pair()
    assert a.handle(roles.Stopping()) == [roles.LeaveOwnAddress()]   # no link: the drain, as before


def test_nothing_to_move_back_says_so():
    _, b = pair()
    assert b.handle(MoveBackRequested(A)) == [SendMessage("handback_done", A)]


def test_move_messages_for_other_addresses_change_nothing():
    a, _ = pair()
    assert a.handle(MoveArrived("10.9.9.9")) == [] and a.handle(MoveBackRequested(A)) == []
    assert (a.own_role, a.peer_role) == (SERVING, STANDBY)
    assert a.unexpected[("message", "move_commit")] == 1 and a.unexpected[("message", "move_request")] == 1


def test_a_handover_is_refused_unless_serving():
    a, _ = pair()
    a.handle(HandoverRequested())
    a.handle(MovedOut(A))
    assert a.handle(HandoverRequested()) == [] and a.own_role == HANDED_OVER
    assert a.ignored[(HANDED_OVER, roles.MOVE_REQUESTED)] == 1


# -- the pump stops for a move without losing a byte (proxy.pump's spill) -----------------------------
import os  # noqa: E402
import socket  # noqa: E402

import trio  # noqa: E402
import trio.testing  # noqa: E402

from proxy.pump import PipePool, splice_pump  # noqa: E402


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    return a, b


def test_a_pump_stopped_while_its_destination_is_full_hands_over_every_byte():
    src_far, src = tcp_pair()
    dst, dst_far = tcp_pair()
    dst.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    dst_far.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    payload = os.urandom(3 << 20)
    spilled = bytearray()
    counted = []

    async def main() -> None:
        async def feed() -> None:
            s = trio.socket.from_stdlib_socket(src_far)
            view = memoryview(payload)
            while view:
                n = await s.send(view[:65536])
                view = view[n:]

        tsrc, tdst = trio.socket.from_stdlib_socket(src), trio.socket.from_stdlib_socket(dst)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed)
            with trio.move_on_after(0.5) as pumping:  # dst_far never reads: the pump blocks on a full dst
                await splice_pump(tsrc, tdst, counted.append, PipePool(keep=0), spilled.extend)
            assert pumping.cancelled_caught
            nursery.cancel_scope.cancel()

    trio.run(main)
    src.setblocking(False)
    rest = b""
    while True:
        try:
            chunk = src.recv(1 << 20)
        except BlockingIOError:
            break
        if not chunk:
            break
        rest += chunk
    dst.close()
    got = b""
    dst_far.settimeout(2)
    while True:
        chunk = dst_far.recv(1 << 20)
        if not chunk:
            break
        got += chunk
    assert spilled, "the pump was not caught with bytes in its pipe"
    assert sum(counted) == len(got)
    # every byte the pump took from src is either at the destination or spilled, in order
    assert got + bytes(spilled) == payload[:len(got) + len(spilled)]
    assert payload.startswith(got + bytes(spilled) + rest)
    for s in (src_far, src, dst_far):
        s.close()


# ------------------------------------------------------------------ the giver's order: the lock before the pause
from proxy import livemove  # noqa: E402


class _Steps:
    """A fake lock and address service that write what happens, in order."""

    def __init__(self) -> None:
        self.steps: list[str] = []
        self.proxies: list = []

    # the address service
    def stop_accepting(self) -> None:
        self.steps.append("stop accepting")

    def resume_accepting(self) -> None:
        self.steps.append("resume accepting")

    # the lock (livemove calls lock(address).prepare() and then works with what it returns)
    def __call__(self, address: str) -> "_Steps":
        return self

    def prepare(self) -> "_Steps":
        self.steps.append("lock prepared")
        return self

    def engage(self) -> "_Steps":
        self.steps.append("lock engaged")
        return self

    def silence_arp(self) -> bool:
        self.steps.append("arp silenced")
        return True

    def dropped(self) -> int:
        return 0

    def arp_dropped(self) -> int:
        return 0

    def take_dropped(self) -> list[bytes]:
        return []

    def release(self) -> list[bytes]:  # idempotent, as MoveLock's
        if "lock released" not in self.steps:
            self.steps.append("lock released")
        return []

    close = release


def test_the_lock_is_prepared_before_the_clients_pause_begins():
    """Its table and NFLOG listener cost netlink round trips from a thread (2-61 ms measured under load):
    done while the pumps still run, the clients never wait for them."""
    fake = _Steps()
    sent: list[str] = []

    async def send(message: dict) -> bool:
        sent.append(message["type"])
        return True

    async def wait_ready(bound: float) -> dict:
        return {"type": "move_ready", "failed": []}

    async def remove_address() -> None:
        fake.steps.append("address removed")

    async def main() -> livemove.MoveReport:
        return await livemove.move_out(address="10.0.0.1", move_id=1, service=fake, remove_address=remove_address,
                                       send=send, wait_ready=wait_ready, lock=fake)

    report = trio.run(main)
    assert report.outcome == "moved"
    assert fake.steps[:3] == ["lock prepared", "stop accepting", "lock engaged"], fake.steps
    assert fake.steps[-2:] == ["address removed", "lock released"], fake.steps
    assert fake.steps[-3] == "arp silenced", fake.steps  # from the go on, while the address is still here
    assert list(report.phases_ms)[:2] == ["prepare_lock", "stop"]
    assert sent == ["move_begin", "move_commit", "move_go"]


def test_a_handover_answers_when_its_move_is_recorded_also_after_twenty_moves():
    """``handover`` waits for the node's move record; the node keeps only the last 20 records, so counting
    them (as before) never saw the 21st move end: every later handover waited its full timeout (20 s in
    bench/moves.py) although the move itself took milliseconds."""
    from types import SimpleNamespace

    from proxy.node import Node

    fake = SimpleNamespace(moves=[], moves_recorded=0, link=SimpleNamespace(state="connected"),
                           core=SimpleNamespace(own_role=SERVING))
    fake._record_move = lambda report: Node._record_move(fake, report)

    made = []

    def enqueue(event) -> None:  # the move runs at once: the role changes and the record is kept
        fake.core.own_role = HANDED_OVER if isinstance(event, HandoverRequested) else SERVING
        made.append(livemove.MoveReport("10.0.0.1", "out", len(made) + 1, 0.0, outcome="moved"))
        fake._record_move(made[-1])

    fake._enqueue = enqueue

    async def main() -> list[float]:
        took = []
        for i in range(25):
            began = trio.current_time()
            answer = await Node._handover(fake, {"back": i % 2 == 1, "timeout_s": 5})
            assert answer["changed"] and (answer["move"] or {}).get("move_id") == i + 1, (i, answer)
            took.append(trio.current_time() - began)
        return took

    took = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert len(fake.moves) == 20 and len(made) == 25
    assert max(took) < 1, took


def test_the_restored_clocks_go_ahead_by_the_time_since_the_freeze():
    """move_go carries how long the giver's sockets have been frozen; the receiver moves the restored
    timestamp clocks at least that far ahead, plus what passed since the go (PAWS: see
    tests/test_tcprepair.py's later-timestamp test)."""

    async def main() -> tuple[int, int]:
        async def send(message: dict) -> bool:
            return True

        receiver = livemove.Receiver("10.0.0.1", 7, send=send, connected=lambda: True)
        receiver.feed({"type": "move_go", "address": "10.0.0.1", "move_id": 7, "frozen_at": 0.0,
                       "frozen_for": 0.25})
        at_go = receiver.ts_advance_ms()
        await trio.sleep(0.1)
        return at_go, receiver.ts_advance_ms()

    at_go, later = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert at_go == 250 + livemove.TS_MARGIN_MS
    assert later == 350 + livemove.TS_MARGIN_MS


def test_the_giver_keeps_its_address_until_the_peer_is_live_and_passes_on_what_arrives_meanwhile():
    """After the go a client may still send to the giver's MAC until the peer's gratuitous ARP reaches it
    (captured at load 11: a request 1 ms before the announcement, to an address already removed, cost the
    client its 200 ms retransmission timeout). The giver keeps the address, locked, until move_live, and
    passes on what its lock drops meanwhile; only then the address goes."""
    fake = _Steps()
    sent: list[str] = []
    late = [[], [b"late segment"], []]   # what the lock drops: one segment while the peer brings it up

    def take_dropped() -> list[bytes]:
        return late.pop(0) if late else []

    fake.take_dropped = take_dropped

    async def send(message: dict) -> bool:
        sent.append(message["type"])
        if message["type"] == "move_segments":
            fake.steps.append(f"passed on {len(message['segments'])}")
        return True

    async def wait_ready(bound: float) -> dict:
        return {"type": "move_ready", "failed": []}

    polls = []

    async def wait_live(bound: float) -> dict | None:
        polls.append(bound)
        await trio.sleep(bound)
        if len(polls) < 3:
            return None
        fake.steps.append("peer live")
        return {"type": "move_live"}

    async def remove_address() -> None:
        fake.steps.append("address removed")

    async def main() -> livemove.MoveReport:
        return await livemove.move_out(address="10.0.0.1", move_id=1, service=fake, remove_address=remove_address,
                                       send=send, wait_ready=wait_ready, wait_live=wait_live, lock=fake)

    report = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert report.outcome == "moved" and report.segments_passed == 1
    assert fake.steps.index("passed on 1") < fake.steps.index("peer live") < fake.steps.index("address removed")
    assert sent.index("move_go") < sent.index("move_segments")
    assert "wait_live" in report.phases_ms
