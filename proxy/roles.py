"""Who serves which address: the node's role state machine.

Rules of this file: every decision about serving an address lives in the two transition tables
below; this file does no I/O and keeps no time. The node feeds it events (from the sync link, the
failure detector and its own claim logic) and executes the transitions it reports: adding or
removing an address, starting or stopping services, sending hand-back messages.

Theory of operation
-------------------
A node has two addresses to think about.

Its *own* address starts ``claiming``: a node must never serve its address while the peer does (the
peer may have taken it over while this node was dead). It learns from the peer's hello, over the sync
link, whether the peer holds it; if the peer cannot be reached within ``claim_wait``, it claims only
if no other host answers ARP for the address. If the peer holds it, the node ``yielded`` and asks for
it back (patent element 316); it serves once the peer says it has let go, or once the peer is dead.

The *peer's* address is on ``standby`` until the failure detector declares the peer dead; then this
node is ``holding`` it. When the peer returns and asks for it back, the node is ``releasing`` (stops
its services there, removes the address) and then ``standby`` again, after which the peer claims.
Because the holder lets go before the owner claims, at no moment do both serve one address.

Events a table does not list for the current state are ignored (and logged by the node): e.g. a
second ``peer_dead`` while already holding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# own address
CLAIMING, SERVING, YIELDED = "claiming", "serving", "yielded"
# peer address
STANDBY, HOLDING, RELEASING = "standby", "holding", "releasing"

OwnState = Literal["claiming", "serving", "yielded"]
PeerState = Literal["standby", "holding", "releasing"]

# events
PEER_HOLDS_MINE = "peer_holds_mine"          # peer's hello/roles: it serves my address
PEER_DOES_NOT_HOLD_MINE = "peer_does_not_hold_mine"
NOBODY_ANSWERS = "nobody_answers"            # no sync link within claim_wait, no ARP answer for my address
PEER_RELEASED_MINE = "peer_released_mine"    # hand-back done by the peer
PEER_DEAD = "peer_dead"                      # failure detector
HANDBACK_REQUESTED = "handback_requested"    # the peer wants its address back
RELEASED = "released"                        # this node has let go of the peer's address
OWNER_SERVES = "owner_serves"                # the peer's hello: it serves its own address itself

OWN_TRANSITIONS: dict[tuple[str, str], str] = {
    (CLAIMING, PEER_HOLDS_MINE): YIELDED,
    (CLAIMING, PEER_DOES_NOT_HOLD_MINE): SERVING,
    (CLAIMING, NOBODY_ANSWERS): SERVING,
    (CLAIMING, PEER_DEAD): SERVING,
    (YIELDED, PEER_RELEASED_MINE): SERVING,
    (YIELDED, PEER_DOES_NOT_HOLD_MINE): SERVING,
    (YIELDED, PEER_DEAD): SERVING,
}

PEER_TRANSITIONS: dict[tuple[str, str], str] = {
    (STANDBY, PEER_DEAD): HOLDING,
    (HOLDING, HANDBACK_REQUESTED): RELEASING,
    # Both serving: only after a wrong death verdict (e.g. the peer's process stalled longer than
    # dead_after). The owner is authoritative; the holder lets go at once.
    (HOLDING, OWNER_SERVES): RELEASING,
    (RELEASING, RELEASED): STANDBY,
}


@dataclass(frozen=True)
class Transition:
    machine: Literal["own", "peer"]
    old: str
    new: str
    event: str


@dataclass
class PairRoles:
    own: str = CLAIMING
    peer: str = STANDBY
    history: list[Transition] = field(default_factory=list)

    def handle(self, event: str) -> list[Transition]:
        """Apply ``event`` to both machines; the transitions that happened, in order (own first)."""
        done = []
        new_own = OWN_TRANSITIONS.get((self.own, event))
        if new_own is not None:
            done.append(Transition("own", self.own, new_own, event))
            self.own = new_own
        new_peer = PEER_TRANSITIONS.get((self.peer, event))
        if new_peer is not None:
            done.append(Transition("peer", self.peer, new_peer, event))
            self.peer = new_peer
        self.history.extend(done)
        del self.history[:-100]
        return done

    @property
    def serves_own(self) -> bool:
        return self.own == SERVING

    @property
    def holds_peer(self) -> bool:
        return self.peer in (HOLDING, RELEASING)
