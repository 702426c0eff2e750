"""proxy.roles: the role state machine, pure (no I/O, no time)."""

import pytest

from proxy import roles
from proxy.roles import (CLAIMING, HOLDING, RELEASING, SERVING, STANDBY, YIELDED, OWN_TRANSITIONS, PEER_TRANSITIONS,
                         PairRoles)


def run(events):
    r = PairRoles()
    for e in events:
        r.handle(e)
    return r.own, r.peer


@pytest.mark.parametrize("events, own, peer", [
    ([], CLAIMING, STANDBY),
    ([roles.PEER_DOES_NOT_HOLD_MINE], SERVING, STANDBY),
    ([roles.NOBODY_ANSWERS], SERVING, STANDBY),
    ([roles.PEER_HOLDS_MINE], YIELDED, STANDBY),
    ([roles.PEER_HOLDS_MINE, roles.PEER_RELEASED_MINE], SERVING, STANDBY),
    ([roles.PEER_HOLDS_MINE, roles.PEER_DEAD], SERVING, HOLDING),      # the holder died: serve both
    ([roles.PEER_DEAD], SERVING, HOLDING),                             # started while the peer is dead
    ([roles.NOBODY_ANSWERS, roles.PEER_DEAD, roles.HANDBACK_REQUESTED], SERVING, RELEASING),
    ([roles.NOBODY_ANSWERS, roles.PEER_DEAD, roles.HANDBACK_REQUESTED, roles.RELEASED], SERVING, STANDBY),
    ([roles.NOBODY_ANSWERS, roles.PEER_DEAD, roles.OWNER_SERVES], SERVING, RELEASING),  # wrong verdict
    ([roles.NOBODY_ANSWERS, roles.PEER_DEAD, roles.PEER_DEAD], SERVING, HOLDING),      # repeated: ignored
    ([roles.NOBODY_ANSWERS, roles.HANDBACK_REQUESTED], SERVING, STANDBY),              # nothing to hand back
    ([roles.NOBODY_ANSWERS, roles.PEER_HOLDS_MINE], SERVING, STANDBY),                 # the owner keeps serving
])
def test_transitions(events, own, peer):
    assert run(events) == (own, peer)


def test_never_serving_the_peers_address_without_a_death_or_a_departure():
    """Only PEER_DEAD (a verdict or a planned stop) moves the peer's address to this node."""
    into_holding = [event for (state, event), new in PEER_TRANSITIONS.items() if new == HOLDING]
    assert into_holding == [roles.PEER_DEAD]


def test_own_address_is_served_only_when_the_peer_cannot_be_serving_it():
    reasons = {event for (state, event), new in OWN_TRANSITIONS.items() if new == SERVING}
    assert reasons == {roles.PEER_DOES_NOT_HOLD_MINE, roles.NOBODY_ANSWERS, roles.PEER_RELEASED_MINE, roles.PEER_DEAD}


def test_handle_reports_transitions_in_order_and_keeps_history():
    r = PairRoles()
    done = r.handle(roles.PEER_DEAD)
    assert [(t.machine, t.old, t.new) for t in done] == [("own", CLAIMING, SERVING), ("peer", STANDBY, HOLDING)]
    assert r.history == done
    assert r.serves_own and r.holds_peer
