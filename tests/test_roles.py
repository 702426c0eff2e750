"""proxy.roles: the pair's decision core, pure (no I/O, no time): every event in every state."""

import itertools

import pytest

from proxy import roles
from proxy.roles import (CLAIMING, HOLDING, MOVING_BACK, IGNORED, KINDS, OWN_STATES, OWN_TRANSITIONS, PEER_STATES,
                         PEER_TRANSITIONS, RELEASING, RETRYING, SERVING, STANDBY, YIELDED, AnnounceOwnAddress,
                         DropTakeoverPreparation, HandbackDone, HandbackRequested, HelloReceived, LeaveOwnAddress,
                         ClaimWaitOver,
                         PairCore, PeerAlive, PeerDeclaredDead, PeerLeaving, PeerProbing, PrepareTakeover, Released,
                         ReleasePeerAddress, RetryTakeover, RetryTakeoverLater, SendMessage, ServeOwnAddress, Stopping,
                         TakeOverPeerAddress, TakeoverDone, TakeoverFailed)

MINE, THEIRS = "10.0.0.1", "10.0.0.2"
ALONE = ClaimWaitOver(link_connected=False, arp_holders=frozenset())  # claim_wait over: nobody answers


def core(own=CLAIMING, peer=STANDBY) -> PairCore:
    return PairCore("a", "b", MINE, THEIRS, own_role=own, peer_role=peer)


def hello(*holds, own=SERVING):
    return HelloReceived(frozenset(holds), own)


def run(events, c=None):
    c = c or core()
    actions = []
    for e in events:
        actions += c.handle(e)
    return c, actions


@pytest.mark.parametrize("events, own, peer", [
    ([], CLAIMING, STANDBY),
    ([hello()], SERVING, STANDBY),
    ([ALONE], SERVING, STANDBY),
    ([hello(MINE)], YIELDED, STANDBY),
    ([hello(MINE), HandbackDone(MINE)], SERVING, STANDBY),
    ([hello(MINE), PeerDeclaredDead(1.0, 0.1)], SERVING, HOLDING),       # the holder died: serve both
    ([PeerDeclaredDead(1.0, 0.1)], SERVING, HOLDING),                    # started while the peer is dead
    ([ALONE, PeerDeclaredDead(1.0, 0.1), HandbackRequested(THEIRS)], SERVING, MOVING_BACK),   # a live move
    ([ALONE, PeerDeclaredDead(1.0, 0.1), HandbackRequested(THEIRS), roles.MovedOut(THEIRS)], SERVING, STANDBY),
    ([ALONE, PeerDeclaredDead(1.0, 0.1), HandbackRequested(THEIRS), roles.MovedOut(THEIRS, started=False)],
     SERVING, RELEASING),                                      # no link to move over: released the old way
    ([ALONE, PeerDeclaredDead(1.0, 0.1), HandbackRequested(THEIRS), roles.MovedOut(THEIRS, started=False),
      Released()], SERVING, STANDBY),
    ([ALONE, PeerDeclaredDead(1.0, 0.1), hello(THEIRS)], SERVING, RELEASING),   # wrong verdict
    ([ALONE, PeerDeclaredDead(1.0, 0.1), PeerDeclaredDead(2.0, 0.1)], SERVING, HOLDING),  # repeated
    ([ALONE, HandbackRequested(THEIRS)], SERVING, STANDBY),   # nothing to hand back
    ([ALONE, hello(MINE)], SERVING, STANDBY),                 # the owner keeps serving
    ([ALONE, PeerLeaving(THEIRS, 3.0)], SERVING, HOLDING),    # planned stop
    ([ALONE, PeerLeaving("10.9.9.9", 3.0)], SERVING, STANDBY),   # not the peer's address
    ([ALONE, PeerDeclaredDead(1.0, 0.1), TakeoverFailed("no MAC", retry=False)], SERVING, STANDBY),
    ([ALONE, PeerDeclaredDead(1.0, 0.1), TakeoverFailed("EEXIST", retry=True)], SERVING, RETRYING),
    ([ALONE, PeerDeclaredDead(1.0, 0.1), TakeoverFailed("EEXIST", retry=True), RetryTakeover()],
     SERVING, HOLDING),
    ([ALONE, PeerDeclaredDead(1.0, 0.1), TakeoverFailed("EEXIST", retry=True), PeerAlive()],
     SERVING, STANDBY),
])
def test_transitions(events, own, peer):
    c, _ = run(events)
    assert (c.own_role, c.peer_role) == (own, peer)


def test_every_kind_in_every_state_is_handled_or_explicitly_ignored():
    for states, table in ((OWN_STATES, OWN_TRANSITIONS), (PEER_STATES, PEER_TRANSITIONS)):
        for state, kind in itertools.product(states, KINDS):
            handled, ignored = (state, kind) in table, (state, kind) in IGNORED
            assert handled != ignored, (state, kind, "handled" if handled else "missing")
    # and nothing in the tables that is not a known state and kind
    for (state, kind) in [*OWN_TRANSITIONS, *PEER_TRANSITIONS, *IGNORED]:
        assert state in OWN_STATES + PEER_STATES and kind in KINDS


# one real event per kind (the core's memory decides whether a hello/alive also means OWNER_SERVES)
EVENT_OF_KIND = {
    roles.PEER_HOLDS_MINE: hello(MINE, own=CLAIMING),
    roles.PEER_DOES_NOT_HOLD_MINE: hello(own=CLAIMING),
    roles.NOBODY_ANSWERS: ALONE,
    roles.PEER_RELEASED_MINE: HandbackDone(MINE),
    roles.PEER_DEAD: PeerDeclaredDead(5.0, 0.1),
    roles.PEER_PROBING: PeerProbing(),
    roles.PEER_ALIVE: PeerAlive(),
    roles.HANDBACK_REQUESTED: HandbackRequested(THEIRS),
    roles.TAKEOVER_DONE: TakeoverDone(),
    roles.TAKEOVER_FAILED: TakeoverFailed("peer never heard from", retry=False),
    roles.TAKEOVER_FAILED_RETRY: TakeoverFailed("File exists", retry=True),
    roles.RETRY_TAKEOVER: RetryTakeover(),
    roles.RELEASED: Released(),
    roles.STOPPING: Stopping(),
    # live moves (issue 11): tests/test_livemove.py has their sequences
    roles.MOVE_REQUESTED: roles.HandoverRequested(),
    roles.MOVE_BACK_WANTED: roles.HandoverBackRequested(),
    roles.PEER_ASKS_MOVE: roles.MoveBackRequested(THEIRS),
    roles.MINE_ARRIVES: roles.MoveArrived(MINE),
    roles.THEIRS_ARRIVES: roles.MoveArrived(THEIRS),
    roles.MOVED_OUT: roles.MovedOut(MINE),
    roles.MOVE_OUT_FAILED: roles.MovedOut(MINE, started=False),
    roles.MOVE_IN_FAILED: roles.MoveInFailed("File exists"),
    roles.STOPPING_LINKED: Stopping(link_connected=True),
    roles.STOP_MOVE_FAILED: roles.MovedOut(MINE, started=False, stopping=True),
    roles.MOVE_THAWED: roles.MovedOut(MINE, thawed=True),
}


@pytest.mark.parametrize("own, peer, kind", [
    (own, peer, kind) for own in OWN_STATES for peer in PEER_STATES for kind in KINDS if kind != roles.OWNER_SERVES])
def test_every_event_in_every_state(own, peer, kind):
    """Each event moves each machine as its table says, or is counted as ignored; nothing unexpected."""
    c = core(own, peer)
    actions = c.handle(EVENT_OF_KIND[kind])
    assert not c.unexpected
    for machine, state, table in (("own", own, OWN_TRANSITIONS), ("peer", peer, PEER_TRANSITIONS)):
        now = c.own_role if machine == "own" else c.peer_role
        if (state, kind) in table:
            assert now == table[(state, kind)][0]
        else:
            assert now == state and c.ignored[(state, kind)] == 1
    assert sum(c.ignored.values()) == sum((s, kind) in IGNORED for s in (own, peer))
    for action in actions:  # only the actions the tables' steps name
        assert type(action).__name__ in {
            "ServeOwnAddress", "AnnounceOwnAddress", "SendMessage", "PrepareTakeover", "DropTakeoverPreparation",
            "TakeOverPeerAddress", "RetryTakeoverLater", "ReleasePeerAddress", "LeaveOwnAddress", "MoveOut", "MoveIn"}


@pytest.mark.parametrize("own, peer", list(itertools.product(OWN_STATES, PEER_STATES)))
def test_owner_serves_in_every_state(own, peer):
    c = core(own, peer)
    c.handle(HelloReceived(frozenset({THEIRS}), SERVING))
    assert not c.unexpected
    assert c.peer_role == {HOLDING: RELEASING, RETRYING: STANDBY}.get(peer, peer)


def test_the_hand_back_request_is_asked_on_yielding_and_on_every_hello_that_still_shows_it_held():
    c, actions = run([hello(MINE, own=CLAIMING)])
    assert actions == [SendMessage("handback_request", MINE)]
    assert c.handle(hello(MINE, own=CLAIMING)) == [SendMessage("handback_request", MINE)]
    assert c.handle(HandbackDone(MINE)) == [ServeOwnAddress()]
    assert c.handle(hello(MINE)) == []  # serving: the peer must let go (it sees our hello), no request


def test_the_holders_side_of_the_hand_back():
    c, actions = run([ALONE, PeerDeclaredDead(7.5, 0.12)])
    assert actions == [ServeOwnAddress(), TakeOverPeerAddress(7.5, (), 0.0)]
    assert c.handle(TakeoverDone()) == []
    assert c.holds() == [MINE, THEIRS]
    # moved back live (issue 11); the owner serves it when the move arrives, no handback_done needed
    assert c.handle(HandbackRequested(THEIRS)) == [roles.MoveOut(THEIRS)]
    assert c.handle(roles.MovedOut(THEIRS)) == []
    assert c.holds() == [MINE] and c.peer_role == STANDBY
    # a request while on standby is answered at once: nothing to let go of
    assert c.handle(HandbackRequested(THEIRS)) == [SendMessage("handback_done", THEIRS)]


def test_serving_owner_announces_when_the_peer_lets_go_of_its_address():
    c, _ = run([ALONE])
    assert c.handle(HandbackDone(MINE)) == [AnnounceOwnAddress()]


def test_stateful_preparation_only_on_standby():
    c, _ = run([ALONE])
    assert c.handle(PeerProbing()) == [PrepareTakeover()]
    assert c.handle(PeerAlive()) == [DropTakeoverPreparation()]
    c.handle(PeerDeclaredDead(1.0, 0.1))
    assert c.handle(PeerProbing()) == []


def test_stall_the_verdict_was_wrong_the_holder_lets_go_when_heartbeats_return():
    c, _ = run([hello(THEIRS), PeerDeclaredDead(1.0, 0.1)])  # the last hello: the peer served its own
    assert c.peer_role == HOLDING
    assert c.handle(PeerAlive()) == [ReleasePeerAddress()]
    assert "was only late" in c.history[-1].reason


def test_a_restarted_peers_heartbeats_before_its_hello_do_not_release():
    """The restarted peer's heartbeats arrive before its hello (its link is still connecting): its old
    process's hello said it served its address, but a new process serves nothing, so this is no stall:
    keep holding until it asks for the address back (the live move), instead of cutting every client."""
    c, _ = run([hello(THEIRS), PeerDeclaredDead(1.0, 0.1)])
    assert c.peer_role == HOLDING
    assert c.handle(roles.PeerRestarted()) == []
    assert ReleasePeerAddress() not in c.handle(PeerAlive())
    assert c.peer_role == HOLDING and THEIRS in c.holds()


def test_a_restarted_peer_asks_back_and_its_hello_alone_does_not_release():
    c, _ = run([hello(THEIRS), PeerDeclaredDead(1.0, 0.1)])
    c.handle(HelloReceived(frozenset(), CLAIMING))      # the restarted peer: claiming, serves nothing
    assert c.handle(PeerAlive()) == []
    assert c.peer_role == HOLDING


def test_takeover_retry_backs_off_and_resets_after_success():
    c, _ = run([ALONE, PeerDeclaredDead(1.0, 0.1)])
    delays = []
    for _ in range(8):
        actions = c.handle(TakeoverFailed("RTNETLINK answers: File exists", retry=True))
        delays.append(actions[0].delay)
        assert c.handle(RetryTakeover()) == [TakeOverPeerAddress(1.0, (), 0.0)]  # the verdict's time is kept
    assert delays == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert c.last_takeover_error == "RTNETLINK answers: File exists"
    c.handle(TakeoverDone())
    assert c.takeover_attempts == 0 and c.last_takeover_error is None
    assert isinstance(RetryTakeoverLater(0.05), RetryTakeoverLater)


def test_a_retry_after_the_peer_came_back_is_ignored_and_counted():
    c, _ = run([ALONE, PeerDeclaredDead(1.0, 0.1), TakeoverFailed("x", retry=True), PeerAlive()])
    assert c.last_takeover_error is None and c.takeover_attempts == 0
    assert c.handle(RetryTakeover()) == []
    assert c.ignored[(STANDBY, roles.RETRY_TAKEOVER)] == 1
    assert c.peer_role == STANDBY


def test_messages_for_the_wrong_address_are_counted_as_unexpected():
    c, _ = run([ALONE, PeerDeclaredDead(1.0, 0.1)])
    assert c.handle(HandbackRequested(MINE)) == []
    assert c.handle(HandbackDone(THEIRS)) == []
    assert c.handle(PeerLeaving(MINE, 2.0)) == []
    assert c.peer_role == HOLDING
    assert c.unexpected == {("message", "handback_request"): 1, ("message", "handback_done"): 1,
                            ("message", "leaving"): 1}


def test_the_claim_needs_a_silent_link_and_no_arp_answer():
    c = core()
    assert c.handle(ClaimWaitOver(link_connected=True)) == []              # the hello will decide
    assert c.handle(ClaimWaitOver(False, frozenset({"02:00:00:00:00:09"}))) == []   # someone holds it
    assert c.own_role == CLAIMING and c.unexpected == {("claim", "arp_answered"): 1}
    assert c.handle(ALONE) == [ServeOwnAddress()]
    assert c.handle(ALONE) == [] and c.ignored[(SERVING, roles.NOBODY_ANSWERS)] == 1


def test_stopping_tells_the_peer_only_when_serving_the_own_address():
    assert core(CLAIMING).handle(Stopping()) == []
    assert core(SERVING).handle(Stopping()) == [LeaveOwnAddress()]


def test_a_leaving_peers_connections_go_with_the_takeover_and_a_verdict_clears_them():
    c, _ = run([ALONE])
    assert c.handle(PeerLeaving(THEIRS, 4.0, drain=(("10.0.0.9", 5000, 445),), grace=5.0)) == [
        TakeOverPeerAddress(4.0, (("10.0.0.9", 5000, 445),), 5.0)]
    c.handle(TakeoverFailed("EEXIST", retry=True))
    assert c.handle(RetryTakeover()) == [TakeOverPeerAddress(4.0, (("10.0.0.9", 5000, 445),), 5.0)]
    c2, actions = run([ALONE, PeerDeclaredDead(1.0, 0.1)])
    assert actions[-1] == TakeOverPeerAddress(1.0, (), 0.0)


def test_never_serving_the_peers_address_without_a_death_or_a_departure():
    """Only PEER_DEAD (a verdict or a planned stop) moves the peer's address to this node from standby;
    RETRY_TAKEOVER only from retrying, which only a failed takeover enters."""
    into_holding = sorted((state, kind) for (state, kind), (new, _) in PEER_TRANSITIONS.items()
                          if new == HOLDING and state != HOLDING)
    # and a live move: the peer froze and sent the address's connections (it let go first); a move back
    # to the peer that was called off after the freeze leaves this node holding what it held
    assert into_holding == [(MOVING_BACK, roles.MOVE_THAWED), (RETRYING, roles.RETRY_TAKEOVER),
                            (STANDBY, roles.PEER_DEAD), (STANDBY, roles.THEIRS_ARRIVES)]


def test_own_address_is_served_only_when_the_peer_cannot_be_serving_it():
    reasons = {kind for (state, kind), (new, _) in OWN_TRANSITIONS.items() if new == SERVING and state != SERVING}
    # live moves: the peer moved it back (it let go first), or a handover that could not start or was called
    # off before the peer took anything (nothing changed)
    assert reasons == {roles.PEER_DOES_NOT_HOLD_MINE, roles.NOBODY_ANSWERS, roles.PEER_RELEASED_MINE, roles.PEER_DEAD,
                       roles.MINE_ARRIVES, roles.MOVE_OUT_FAILED, roles.STOP_MOVE_FAILED, roles.MOVE_THAWED}


def test_history_keeps_transitions_in_order():
    c, _ = run([PeerDeclaredDead(1.0, 0.1)])
    assert [(t.machine, t.old, t.new) for t in c.history] == [("own", CLAIMING, SERVING), ("peer", STANDBY, HOLDING)]
    assert c.serves_own and c.holds_peer


# ------------------------------------------------------------------ an own address stuck (issue 9.7)
def tick(at):
    return roles.OwnAddressTick(at)


def test_swapped_addresses_are_named_at_once_and_a_stuck_yield_is_loud_at_a_low_rate(caplog):
    """b's config names a's address as its own: a holds it, b yields and asks in vain (a ignores a
    hand-back request for an address that is not its peer's). b must say why, and keep saying it."""
    c = PairCore("b", "a", MINE, THEIRS, stuck_after=5.0, stuck_warn_every=30.0)
    with caplog.at_level("WARNING", logger="pairproxy.roles"):
        assert c.handle(tick(0.0)) == []
        assert c.handle(HelloReceived(frozenset({MINE}), SERVING, MINE)) == [SendMessage("handback_request", MINE)]
        assert c.own_role == YIELDED
        # the hello itself shows the mistake: warned at once, once
        assert c.address_mismatch and f"a says {MINE} is its own address" in c.address_mismatch
        assert caplog.text.count("is its own address") == 1
        for t in (1.0, 2.0, 3.0, 4.0):
            assert c.handle(tick(t)) == []
        assert c.stuck is None, "a hand-back takes about a claim_wait: no alarm before stuck_after"
        c.handle(HelloReceived(frozenset({MINE}), SERVING, MINE))  # asks again, no new mismatch warning
        for t in range(5, 66):
            assert c.handle(tick(float(t))) == []
    assert c.own_role == YIELDED and c.not_serving_since == 0.0
    assert c.stuck == c.address_mismatch and "[node] address" in c.stuck
    stuck_lines = [r.getMessage() for r in caplog.records if "not served" in r.getMessage()]
    assert len(stuck_lines) == 3, stuck_lines   # at 5, 35 and 65 s: repeated, at a low rate
    assert stuck_lines[0].startswith(f"own address {MINE} yielded for 5 s, not served: a says")
    assert caplog.text.count("is its own address") == 1 + 3


def test_a_peer_that_keeps_holding_the_address_is_named_and_the_alarm_ends_when_served():
    c = PairCore("a", "b", MINE, THEIRS, stuck_after=2.0)
    c.handle(tick(10.0))
    c.handle(HelloReceived(frozenset({MINE}), SERVING, THEIRS))   # b's own address is right; it holds mine
    assert c.address_mismatch is None
    c.handle(tick(13.0))
    assert c.stuck == (f"b serves {MINE} and has not handed it back after 1 request(s): b's [peer] address must "
                       f"be {MINE}; see b's log and status")
    assert c.handle(HandbackDone(MINE)) == [ServeOwnAddress()]
    assert c.stuck is None and c.not_serving_since is None
    c.handle(tick(20.0))
    assert c.stuck is None


def test_claiming_while_another_host_answers_arp_says_so():
    c = PairCore("a", "b", MINE, THEIRS, stuck_after=2.0)
    c.handle(tick(0.0))
    c.handle(ClaimWaitOver(link_connected=False, arp_holders=frozenset({"02:00:00:00:00:99"})))
    c.handle(tick(3.0))
    assert c.own_role == CLAIMING
    assert c.stuck.startswith(f"02:00:00:00:00:99 answer(s) ARP for {MINE} while b is unreachable")


def test_a_peer_hello_with_another_address_than_peer_address_is_named():
    c = core()
    c.handle(HelloReceived(frozenset(), SERVING, "10.0.0.7/24"))
    assert c.own_role == SERVING   # a warning, never a different decision
    assert c.address_mismatch == (f'b says its own address is 10.0.0.7, but [peer] address here is {THEIRS}: set '
                                  f'[peer] address = "10.0.0.7" here, or [node] address on b to {THEIRS}')
    c.handle(HelloReceived(frozenset(), SERVING, THEIRS))
    assert c.address_mismatch is None
