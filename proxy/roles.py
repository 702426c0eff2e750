"""Who serves which address: the pair's decisions, as one sans-I/O core (events in, actions out).

Rules of this file: every decision about serving an address lives here, in the two transition
tables below; this file does no I/O and keeps no clock (events that need a time carry it). The
node (:mod:`proxy.node`) feeds :class:`PairCore` events (the peer's hello, the failure detector's
verdicts, hand-back messages, the claim's result, the results of the actions it ran) and executes
the actions :meth:`PairCore.handle` returns, in order. The node never sets a role itself.

Theory of operation
-------------------
A node has two addresses to think about, each with its own small machine.

Its *own* address starts ``claiming``: a node must never serve its address while the peer does (the
peer may have taken it over while this node was dead). It learns from the peer's hello, over the sync
link, whether the peer holds it; if the peer cannot be reached within ``claim_wait``, it claims only
if no other host answers ARP for the address. If the peer holds it, the node has ``yielded`` and
asks for it back (patent element 316; the only place a ``handback_request`` is made is
:func:`_ask_for_my_address`); it serves once the peer says it has let go, or once the peer is dead.

The *peer's* address is on ``standby`` until the failure detector declares the peer dead (or the peer
says it is leaving); then this node is ``holding`` it and the node runs the takeover sequence
(:mod:`proxy.takeover`), reporting :class:`TakeoverDone` or :class:`TakeoverFailed`. A takeover
that failed on a kernel error is ``retrying``: the core asks to be woken after a backoff
(:class:`RetryTakeoverLater`) and tries again while the peer stays dead. When the peer returns and
asks for its address, the node is ``releasing`` (:mod:`proxy.handback`) and then ``standby`` again,
and only then tells the peer it may claim. Because the holder lets go before the owner claims, at no
moment do both serve one address.

A node that stays ``claiming`` or ``yielded`` (issue 9.7: swapped service addresses, a peer that keeps
holding the address, another host answering ARP for it) must not go quiet after one log line. The node
feeds :class:`OwnAddressTick` every ``claim_wait``; once the own address has not been served for
``stuck_after``, the core names the cause and what to change (:meth:`PairCore.why_not_serving`),
warns at most every ``stuck_warn_every`` and keeps it in :attr:`PairCore.stuck` for status. A peer
hello whose own address is not ``[peer] address`` here is warned about at once
(:attr:`PairCore.address_mismatch`). Neither changes a role: both only say what is wrong.

Every (state, event) pair is in a table, or in :data:`IGNORED` (known and harmless, e.g. a second
verdict while holding); anything else is unexpected. Both are logged and counted (``ignored``,
``unexpected``), so a surprise in the field shows up in the log instead of vanishing.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

log = logging.getLogger("pairproxy.roles")

# -- states ------------------------------------------------------------------------------------
# own address
CLAIMING, SERVING, YIELDED = "claiming", "serving", "yielded"
# peer address
STANDBY, HOLDING, RETRYING, RELEASING = "standby", "holding", "retrying", "releasing"

OWN_STATES = (CLAIMING, SERVING, YIELDED)
PEER_STATES = (STANDBY, HOLDING, RETRYING, RELEASING)


# -- events in ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class HelloReceived:
    """The peer's hello (patent element 300): which addresses it serves, and its own address's role."""

    holds: frozenset[str]
    peer_own_role: str | None
    peer_address: str | None = None  # the peer's own service address, as its hello says (None: not said)


@dataclass(frozen=True)
class PeerDeclaredDead:
    """The failure detector's verdict: no heartbeat on either path for dead_after (trio time ``at``)."""

    at: float
    silent_for: float


@dataclass(frozen=True)
class PeerProbing:
    """The detector started probing a silent peer: time to prepare a takeover (stateful prefetch)."""


@dataclass(frozen=True)
class PeerAlive:
    """Heartbeats came back after ``dead`` or ``link_down``."""


@dataclass(frozen=True)
class PeerRestarted:
    """The heartbeats are a new process's of the peer (before the :class:`PeerAlive` they bring): what
    its old process said it served is void. Why: a peer that restarts (a reboot, an upgrade) serves
    nothing until it asks for its address back, which the live move then gives it with every connection;
    taken for the old hello's "serving", the returning peer looked like one that was only late, and
    the address was released with every connection cut (bench/SOAK.md, 2026-11-29)."""


@dataclass(frozen=True)
class HandbackRequested:
    """Message ``handback_request``: the peer wants ``address`` back."""

    address: str | None


@dataclass(frozen=True)
class HandbackDone:
    """Message ``handback_done``: the peer has let go of ``address``."""

    address: str | None


@dataclass(frozen=True)
class PeerLeaving:
    """Message ``leaving``: a planned stop; the peer hands over ``address`` (its own) now, and drains
    the connections in ``drain`` for ``grace`` seconds through this node (see :mod:`proxy.drain`)."""

    address: str | None
    at: float
    drain: tuple = ()
    grace: float = 0.0


@dataclass(frozen=True)
class ClaimWaitOver:
    """Another ``claim_wait`` passed while claiming: is the sync link up, and which MACs answered ARP
    for the own address (asked only while the link is down)? Alone and unanswered, the node claims."""

    link_connected: bool
    arp_holders: frozenset[str] = frozenset()


@dataclass(frozen=True)
class OwnAddressTick:
    """Fed every ``claim_wait`` (trio time ``at``): lets the core tell how long the own address has not
    been served, and say so loudly when that is too long (see the module docstring)."""

    at: float


@dataclass(frozen=True)
class TakeoverDone:
    """The takeover sequence serves the peer's address."""


@dataclass(frozen=True)
class TakeoverFailed:
    """The takeover sequence could not serve the peer's address (and undid what it did).

    ``retry``: the failure may pass (a kernel error), try again later; else (the peer's MAC or
    services are unknown) only a new verdict can help."""

    reason: str
    retry: bool


@dataclass(frozen=True)
class RetryTakeover:
    """The backoff asked for by :class:`RetryTakeoverLater` has passed."""


@dataclass(frozen=True)
class Released:
    """The hand-back sequence has let go of the peer's address."""


@dataclass(frozen=True)
class Stopping:
    """This node is stopping (SIGTERM, ``Node.stop``). ``link_connected``: the peer can take the own
    address with its live connections (a live move, issue 11) instead of the drain."""

    link_connected: bool = False


Event = (HelloReceived | PeerDeclaredDead | PeerProbing | PeerAlive | PeerRestarted | HandbackRequested | HandbackDone | PeerLeaving
         | ClaimWaitOver | TakeoverDone | TakeoverFailed | RetryTakeover | Released | Stopping | OwnAddressTick)


# -- actions out -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServeOwnAddress:
    """Start serving the own address (listeners, address, gratuitous ARP).

    ``holder_died``: the peer held the address (a ``handover``, or a takeover while this node was
    away) and died with it: the connections it served there are this node's to end (see
    :meth:`proxy.standby.StatefulStandby.holder_connections`)."""

    holder_died: bool = False


@dataclass(frozen=True)
class AnnounceOwnAddress:
    """Gratuitous ARP for the own address: the peer served it too, clients may hold its MAC."""


@dataclass(frozen=True)
class SendMessage:
    """Send ``{"type": type, "address": address}`` to the peer over the sync link."""

    type: Literal["handback_request", "handback_done"]
    address: str


@dataclass(frozen=True)
class PrepareTakeover:
    """Fetch now what a takeover will need (stateful: the peer's live connections)."""


@dataclass(frozen=True)
class DropTakeoverPreparation:
    """The peer lives: what :class:`PrepareTakeover` fetched is stale."""


@dataclass(frozen=True)
class TakeOverPeerAddress:
    """Run the takeover sequence; report :class:`TakeoverDone` or :class:`TakeoverFailed`."""

    detected_at: float | None  # trio time of the verdict (a retry keeps the verdict's time)
    drain: tuple = ()          # a leaving peer's connections to pass on to it (and not reset)
    drain_for: float = 0.0


@dataclass(frozen=True)
class LeaveOwnAddress:
    """This node stops: hand the own address to the peer first, then drain (:func:`proxy.handback.leave`)."""


@dataclass(frozen=True)
class RetryTakeoverLater:
    """Feed :class:`RetryTakeover` after ``delay`` seconds."""

    delay: float


@dataclass(frozen=True)
class ReleasePeerAddress:
    """Run the hand-back sequence (stop serving the peer's address at once); report :class:`Released`."""


Action = (ServeOwnAddress | AnnounceOwnAddress | SendMessage | PrepareTakeover | DropTakeoverPreparation
          | TakeOverPeerAddress | RetryTakeoverLater | ReleasePeerAddress | LeaveOwnAddress)


# -- the tables --------------------------------------------------------------------------------
# What an event means for the machines is a *kind*; one event may be two kinds (a hello says
# whether the peer holds my address, and whether it serves its own). Kinds:
PEER_HOLDS_MINE = "peer_holds_mine"          # hello: it serves my address
PEER_DOES_NOT_HOLD_MINE = "peer_does_not_hold_mine"
OWNER_SERVES = "owner_serves"                # hello/alive: it serves its own address itself
NOBODY_ANSWERS = "nobody_answers"           # claim_wait over, link down, no ARP answer
PEER_RELEASED_MINE = "peer_released_mine"
PEER_DEAD = "peer_dead"                      # verdict, or "leaving"
PEER_PROBING = "peer_probing"
PEER_ALIVE = "peer_alive"
HANDBACK_REQUESTED = "handback_requested"
TAKEOVER_DONE = "takeover_done"
TAKEOVER_FAILED = "takeover_failed"
TAKEOVER_FAILED_RETRY = "takeover_failed_retry"
RETRY_TAKEOVER = "retry_takeover"
RELEASED = "released"
STOPPING = "stopping"

KINDS = (PEER_HOLDS_MINE, PEER_DOES_NOT_HOLD_MINE, OWNER_SERVES, NOBODY_ANSWERS, PEER_RELEASED_MINE, PEER_DEAD,
         PEER_PROBING, PEER_ALIVE, HANDBACK_REQUESTED, TAKEOVER_DONE, TAKEOVER_FAILED, TAKEOVER_FAILED_RETRY,
         RETRY_TAKEOVER, RELEASED, STOPPING)

# Steps a transition takes (turned into actions by PairCore._step_actions):
SERVE, ANNOUNCE, ASK_BACK, LEAVE = "serve", "announce", "ask_back", "leave"
TAKE_OVER, RETRY_LATER, RELEASE, TELL_RELEASED = "take_over", "retry_later", "release", "tell_released"
PREPARE, DROP_PREPARATION, WARN_BOTH_SERVE = "prepare", "drop_preparation", "warn_both_serve"
SERVE_AFTER_HOLDER = "serve_after_holder"  # the peer died holding the own address

# (state, kind) -> (new state, steps)
OWN_TRANSITIONS: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {
    (CLAIMING, PEER_HOLDS_MINE): (YIELDED, (ASK_BACK,)),
    (CLAIMING, PEER_DOES_NOT_HOLD_MINE): (SERVING, (SERVE,)),
    (CLAIMING, NOBODY_ANSWERS): (SERVING, (SERVE,)),
    (CLAIMING, PEER_DEAD): (SERVING, (SERVE,)),
    # every new hello that still shows my address held asks again (the last request may have been
    # sent into a connection that broke)
    (YIELDED, PEER_HOLDS_MINE): (YIELDED, (ASK_BACK,)),
    (YIELDED, PEER_RELEASED_MINE): (SERVING, (SERVE,)),
    (YIELDED, PEER_DOES_NOT_HOLD_MINE): (SERVING, (SERVE,)),
    (YIELDED, PEER_DEAD): (SERVING, (SERVE_AFTER_HOLDER,)),
    # the peer declared this node dead wrongly: this node is the owner and keeps serving; the peer
    # lets go when it sees this node's hello (OWNER_SERVES on its side)
    (SERVING, PEER_HOLDS_MINE): (SERVING, (WARN_BOTH_SERVE,)),
    # the peer let go after serving this address too: clients may still hold its MAC
    (SERVING, PEER_RELEASED_MINE): (SERVING, (ANNOUNCE,)),
    (SERVING, STOPPING): (SERVING, (LEAVE,)),
}

PEER_TRANSITIONS: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {
    (STANDBY, PEER_PROBING): (STANDBY, (PREPARE,)),
    (STANDBY, PEER_ALIVE): (STANDBY, (DROP_PREPARATION,)),
    (STANDBY, PEER_DEAD): (HOLDING, (TAKE_OVER,)),
    # nothing to hand back (e.g. the takeover failed, or this node restarted): say so, the peer claims
    (STANDBY, HANDBACK_REQUESTED): (STANDBY, (TELL_RELEASED,)),
    (HOLDING, TAKEOVER_DONE): (HOLDING, ()),
    (HOLDING, TAKEOVER_FAILED): (STANDBY, ()),
    (HOLDING, TAKEOVER_FAILED_RETRY): (RETRYING, (RETRY_LATER,)),
    (HOLDING, HANDBACK_REQUESTED): (RELEASING, (RELEASE,)),
    # Both serving: only after a wrong death verdict (e.g. the peer's process stalled longer than
    # dead_after). The owner is authoritative; the holder lets go at once.
    (HOLDING, OWNER_SERVES): (RELEASING, (RELEASE,)),
    (RETRYING, RETRY_TAKEOVER): (HOLDING, (TAKE_OVER,)),
    (RETRYING, PEER_ALIVE): (STANDBY, (DROP_PREPARATION,)),
    (RETRYING, OWNER_SERVES): (STANDBY, ()),
    (RETRYING, HANDBACK_REQUESTED): (STANDBY, (TELL_RELEASED,)),
    (RELEASING, RELEASED): (STANDBY, (TELL_RELEASED,)),
}

# Known and harmless: logged at debug level and counted, nothing happens.
IGNORED: frozenset[tuple[str, str]] = frozenset({
    *((CLAIMING, k) for k in (OWNER_SERVES, PEER_RELEASED_MINE, PEER_PROBING, PEER_ALIVE, HANDBACK_REQUESTED,
                              TAKEOVER_DONE, TAKEOVER_FAILED, TAKEOVER_FAILED_RETRY, RETRY_TAKEOVER, RELEASED,
                              STOPPING)),
    *((YIELDED, k) for k in (OWNER_SERVES, NOBODY_ANSWERS, PEER_PROBING, PEER_ALIVE, HANDBACK_REQUESTED,
                             TAKEOVER_DONE, TAKEOVER_FAILED, TAKEOVER_FAILED_RETRY, RETRY_TAKEOVER, RELEASED,
                             STOPPING)),
    *((SERVING, k) for k in (PEER_DOES_NOT_HOLD_MINE, OWNER_SERVES, NOBODY_ANSWERS, PEER_DEAD, PEER_PROBING,
                             PEER_ALIVE, HANDBACK_REQUESTED, TAKEOVER_DONE, TAKEOVER_FAILED, TAKEOVER_FAILED_RETRY,
                             RETRY_TAKEOVER, RELEASED)),
    # results of sequences that are over, or that a later event overtook (a stale retry timer)
    *((STANDBY, k) for k in (PEER_HOLDS_MINE, PEER_DOES_NOT_HOLD_MINE, OWNER_SERVES, NOBODY_ANSWERS,
                             PEER_RELEASED_MINE, STOPPING, TAKEOVER_DONE, TAKEOVER_FAILED, TAKEOVER_FAILED_RETRY,
                             RETRY_TAKEOVER, RELEASED)),
    *((HOLDING, k) for k in (PEER_HOLDS_MINE, PEER_DOES_NOT_HOLD_MINE, NOBODY_ANSWERS, PEER_RELEASED_MINE,
                             PEER_DEAD, PEER_PROBING, PEER_ALIVE, STOPPING, RETRY_TAKEOVER, RELEASED)),
    # retrying: the retry timer runs on; a new verdict changes nothing
    *((RETRYING, k) for k in (PEER_HOLDS_MINE, PEER_DOES_NOT_HOLD_MINE, NOBODY_ANSWERS, PEER_RELEASED_MINE,
                              PEER_DEAD, PEER_PROBING, STOPPING, TAKEOVER_DONE, TAKEOVER_FAILED,
                              TAKEOVER_FAILED_RETRY, RELEASED)),
    # releasing runs to its end before the next event is handled
    *((RELEASING, k) for k in (PEER_HOLDS_MINE, PEER_DOES_NOT_HOLD_MINE, OWNER_SERVES, NOBODY_ANSWERS,
                               PEER_RELEASED_MINE, PEER_DEAD, PEER_PROBING, PEER_ALIVE, HANDBACK_REQUESTED,
                               STOPPING, TAKEOVER_DONE, TAKEOVER_FAILED, TAKEOVER_FAILED_RETRY, RETRY_TAKEOVER)),
})


@dataclass(frozen=True)
class Transition:
    machine: Literal["own", "peer"]
    old: str
    new: str
    kind: str
    reason: str


@dataclass
class PairCore:
    """The pair's decisions for one node: ``handle(event)`` -> actions, in the order to execute them.

    ``my_address``/``peer_address`` are the two service addresses (as strings, as messages carry them),
    the names are for the reasons in the log.
    """

    my_name: str
    peer_name: str
    my_address: str
    peer_address: str
    own_role: str = CLAIMING
    peer_role: str = STANDBY
    #: what the peer's last hello said (also the persisted one before the first hello)
    peer_holds: frozenset[str] = frozenset()
    peer_own_role: str | None = None
    #: takeover retries since the last successful takeover (for the backoff)
    takeover_attempts: int = 0
    last_takeover_error: str | None = None
    retry_first: float = 0.05
    retry_max: float = 2.0
    history: list[Transition] = field(default_factory=list)
    ignored: Counter = field(default_factory=Counter)     # (state, kind) -> count
    unexpected: Counter = field(default_factory=Counter)  # (state, kind) -> count
    #: the own address is not served (claiming/yielded) since this trio time (None: it is served)
    not_serving_since: float | None = None
    #: why the own address has not been served for ``stuck_after``, with what to change (None: not stuck)
    stuck: str | None = None
    stuck_after: float = 5.0
    stuck_warn_every: float = 30.0
    #: the peer's hello names an own address that is not [peer] address here: what to change
    address_mismatch: str | None = None
    peer_own_address: str | None = None
    last_arp_holders: frozenset[str] = frozenset()
    handback_requests: int = 0
    _stuck_warned_at: float | None = None
    _detected_at: float | None = None
    _drain: tuple = ()
    _drain_for: float = 0.0

    # -- queries ---------------------------------------------------------------------------------
    @property
    def serves_own(self) -> bool:
        return self.own_role == SERVING

    @property
    def holds_peer(self) -> bool:
        return self.peer_role in (HOLDING, RELEASING)

    def holds(self) -> list[str]:
        """The addresses this node serves, for its hello."""
        return ([self.my_address] if self.serves_own else []) + ([self.peer_address] if self.holds_peer else [])

    def remember_hello(self, holds: frozenset[str], peer_own_role: str | None) -> None:
        """What the peer said last (a persisted hello at start): used by :class:`PeerAlive`."""
        self.peer_holds, self.peer_own_role = frozenset(holds), peer_own_role

    # -- the one entry point ---------------------------------------------------------------------
    def handle(self, event: Event) -> list[Action]:
        """Apply ``event`` to both machines (own first); the actions to execute, in order."""
        actions: list[Action] = []
        for kind, reason in self._kinds(event):
            for machine in ("own", "peer"):
                actions += self._step(machine, kind, reason, event)
        return actions

    # -- internals -------------------------------------------------------------------------------
    def _kinds(self, event: Event) -> list[tuple[str, str]]:
        """What ``event`` means for the machines, with the reason for the log."""
        peer, mine, theirs = self.peer_name, self.my_address, self.peer_address
        moving = _move_kinds(self, event)  # live moves (issue 11): below
        if moving is not None:
            return moving
        if isinstance(event, (HelloReceived, PeerAlive)):  # the peer lives: a failed takeover is moot
            self.takeover_attempts, self.last_takeover_error = 0, None
        if isinstance(event, OwnAddressTick):
            self._check_not_serving(event.at)
            return []
        if isinstance(event, PeerRestarted):
            self.remember_hello(frozenset(), None)
            return []
        if isinstance(event, HelloReceived):
            self.remember_hello(event.holds, event.peer_own_role)
            self._check_peer_address(event.peer_address)
            kinds = [(PEER_HOLDS_MINE, f"{peer} serves {mine}") if mine in event.holds
                     else (PEER_DOES_NOT_HOLD_MINE, f"{peer} does not serve {mine}")]
            if self._owner_serves():
                kinds.append((OWNER_SERVES, f"{peer} serves {theirs} itself"))
            return kinds
        if isinstance(event, PeerAlive):
            kinds = [(PEER_ALIVE, f"{peer} is alive again")]
            if self._owner_serves():
                # the verdict was wrong (the peer only stalled): it never stopped serving
                kinds.append((OWNER_SERVES, f"{peer} was only late; it serves {theirs} itself"))
            return kinds
        if isinstance(event, PeerDeclaredDead):
            self._detected_at, self._drain, self._drain_for = event.at, (), 0.0
            return [(PEER_DEAD, f"peer {peer} silent {event.silent_for * 1000:.0f} ms on both heartbeat paths")]
        if isinstance(event, PeerLeaving):
            if event.address != theirs:
                return self._wrong_address("leaving", event.address, theirs)
            self._detected_at, self._drain, self._drain_for = event.at, tuple(event.drain), event.grace
            draining = f" (draining {len(event.drain)} connection(s) through here)" if event.drain else ""
            return [(PEER_DEAD, f"{peer} is stopping and has let go of {theirs}{draining}")]
        if isinstance(event, HandbackRequested):
            if event.address != theirs:
                return self._wrong_address("handback_request", event.address, theirs)
            return [(HANDBACK_REQUESTED, f"{peer} is back and asks for {theirs}")]
        if isinstance(event, HandbackDone):
            if event.address != mine:
                return self._wrong_address("handback_done", event.address, mine)
            return [(PEER_RELEASED_MINE, f"{peer} let go of {mine}")]
        if isinstance(event, TakeoverFailed):
            self.last_takeover_error = event.reason
            return [(TAKEOVER_FAILED_RETRY if event.retry else TAKEOVER_FAILED, f"takeover failed: {event.reason}")]
        if isinstance(event, TakeoverDone):
            self.takeover_attempts, self.last_takeover_error = 0, None
            return [(TAKEOVER_DONE, f"serving {theirs}")]
        if isinstance(event, ClaimWaitOver):
            self.last_arp_holders = frozenset(event.arp_holders)
            if event.arp_holders:
                self.unexpected[("claim", "arp_answered")] += 1
                log.warning("%s: no word from the peer, but %s answers ARP for it: not claiming", mine,
                            ", ".join(sorted(event.arp_holders)))
                return []
            if event.link_connected:  # the peer's hello decides
                return []
            return [(NOBODY_ANSWERS, "no word from the peer and no ARP answer for the address")]
        simple = {PeerProbing: (PEER_PROBING, f"{peer} silent, probing"),
                  RetryTakeover: (RETRY_TAKEOVER, f"retrying the takeover of {theirs}"),
                  Released: (RELEASED, f"let go of {theirs}"),
                  Stopping: (STOPPING, "stopping")}
        return [simple[type(event)]]

    def _check_peer_address(self, address: str | None) -> None:
        """The peer's hello says which address is its own: is it [peer] address here?"""
        if address is None:
            return
        self.peer_own_address = address = address.split("/")[0]
        if address == self.peer_address:
            self.address_mismatch = None
            return
        peer, mine, theirs = self.peer_name, self.my_address, self.peer_address
        if address == mine:
            problem = (f"{peer} says {mine} is its own address, but it is this node's own ([node] address here): "
                       f"one of the two configs is wrong; each node's [node] address must be its own service "
                       f"address and its [peer] address the other's (here: {mine} and {theirs})")
        else:
            problem = (f"{peer} says its own address is {address}, but [peer] address here is {theirs}: set "
                       f"[peer] address = \"{address}\" here, or [node] address on {peer} to {theirs}")
        if problem != self.address_mismatch:
            log.warning("%s", problem)
        self.address_mismatch = problem

    def _check_not_serving(self, at: float) -> None:
        if self.own_role == SERVING:
            self.not_serving_since = self.stuck = self._stuck_warned_at = None
            return
        if self.not_serving_since is None:
            self.not_serving_since = at
        waited = at - self.not_serving_since
        if waited < self.stuck_after:
            return
        self.stuck = self.why_not_serving()
        if self._stuck_warned_at is None or at - self._stuck_warned_at >= self.stuck_warn_every:
            self._stuck_warned_at = at
            log.warning("own address %s %s for %.0f s, not served: %s", self.my_address, self.own_role, waited,
                        self.stuck)

    def why_not_serving(self) -> str:
        """Why the own address is not served (claiming or yielded), and what to change."""
        peer, mine = self.peer_name, self.my_address
        if self.address_mismatch is not None:
            return self.address_mismatch
        if self.own_role == YIELDED:
            if mine in self.peer_holds:
                return (f"{peer} serves {mine} and has not handed it back after {self.handback_requests} "
                        f"request(s): {peer}'s [peer] address must be {mine}; see {peer}'s log and status")
            return f"waiting for {peer} to say it has let go of {mine}"
        if self.last_arp_holders:
            return (f"{', '.join(sorted(self.last_arp_holders))} answer(s) ARP for {mine} while {peer} is "
                    f"unreachable: another host uses {mine}? (remove it there, or fix [node] address)")
        return f"waiting for {peer}'s hello or for it to be declared dead"

    def _owner_serves(self) -> bool:
        return self.peer_address in self.peer_holds and self.peer_own_role == SERVING

    def _wrong_address(self, message: str, address: str | None, expected: str) -> list[tuple[str, str]]:
        self.unexpected[("message", message)] += 1
        log.warning("%s for %r, which is not %s: ignored", message, address, expected)
        return []

    def _step(self, machine: str, kind: str, reason: str, event: Event) -> list[Action]:
        state = self.own_role if machine == "own" else self.peer_role
        table = OWN_TRANSITIONS if machine == "own" else PEER_TRANSITIONS
        found = table.get((state, kind))
        if found is None:
            if (state, kind) in IGNORED:
                self.ignored[(state, kind)] += 1
                log.debug("%s address %s: %s ignored (%s)", machine, state, kind, reason)
            else:
                self.unexpected[(state, kind)] += 1
                log.warning("%s address %s: unexpected %s ignored (%s)", machine, state, kind, reason)
            return []
        new, steps = found
        if machine == "own" and new == SERVING:
            self.not_serving_since = self.stuck = self._stuck_warned_at = None
            self.handback_requests = 0
        if new != state:
            log.info("%s address: %s -> %s (%s)", machine, state, new, reason)
            self.history.append(Transition(machine, state, new, kind, reason))
            del self.history[:-100]
            if machine == "own":
                self.own_role = new
            else:
                self.peer_role = new
        return [action for step in steps for action in self._step_actions(step)]

    def _step_actions(self, step: str) -> list[Action]:
        if step == SERVE:
            return [ServeOwnAddress()]
        if step == SERVE_AFTER_HOLDER:
            return [ServeOwnAddress(holder_died=True)]
        if step == ANNOUNCE:
            return [AnnounceOwnAddress()]
        if step == ASK_BACK:
            self.handback_requests += 1
            return [_ask_for_my_address(self.my_address)]
        if step == LEAVE:
            return [LeaveOwnAddress()]
        if step == TAKE_OVER:
            return [TakeOverPeerAddress(self._detected_at, self._drain, self._drain_for)]
        if step == RETRY_LATER:
            self.takeover_attempts += 1
            return [RetryTakeoverLater(min(self.retry_max, self.retry_first * 2 ** (self.takeover_attempts - 1)))]
        if step == RELEASE:
            return [ReleasePeerAddress()]
        if step == TELL_RELEASED:
            return [SendMessage("handback_done", self.peer_address)]
        if step == PREPARE:
            return [PrepareTakeover()]
        if step == DROP_PREPARATION:
            return [DropTakeoverPreparation()]
        if step == WARN_BOTH_SERVE:
            log.warning("%s serves %s too (it declared this node dead): it must let go", self.peer_name,
                        self.my_address)
            return []
        moving = _move_step_actions(self, step)
        if moving is not None:
            return moving
        raise AssertionError(f"unknown step {step!r}")


def _ask_for_my_address(address: str) -> SendMessage:
    """The hand-back request (patent element 316): made here and nowhere else."""
    return SendMessage("handback_request", address)


# -- live moves (issue 11; proxy.livemove) ------------------------------------------------------
# A planned move hands one address and its live connections to the peer: ``pairproxy handover`` moves
# the own address out (the node goes on running and serves nothing for it: ``handed_over``),
# ``handover --back`` asks the peer to move it back the same way. Only the holder of an address moves
# it; the receiver takes it when the giver's ``move_commit`` arrives (:class:`MoveArrived`).
MOVING_OUT, HANDED_OVER = "moving_out", "handed_over"   # own address
MOVING_BACK = "moving_back"                             # peer address: moving it back to its owner
OWN_STATES += (MOVING_OUT, HANDED_OVER)
PEER_STATES += (MOVING_BACK,)


@dataclass(frozen=True)
class HandoverRequested:
    """``pairproxy handover``: move the own address (and its connections) to the peer."""


@dataclass(frozen=True)
class HandoverBackRequested:
    """``pairproxy handover --back``: ask the peer to move the own address back."""


@dataclass(frozen=True)
class MoveBackRequested:
    """Message ``move_request``: the peer wants ``address`` (its own) moved back to it."""

    address: str | None


@dataclass(frozen=True)
class MoveArrived:
    """Message ``move_commit``: the peer has frozen and sent ``address``'s connections; take it."""

    address: str | None


@dataclass(frozen=True)
class MovedOut:
    """The move-out sequence ended. ``started``: False if it changed nothing (e.g. no sync link).
    ``stopping``: as the :class:`MoveOut` it answers (a stop that falls back to the drain).
    ``thawed``: the move was called off after the freeze (no confirmation from the peer, or the sync link
    broke); the connections go on here and the address never left."""

    address: str
    started: bool = True
    stopping: bool = False
    thawed: bool = False


@dataclass(frozen=True)
class MoveInFailed:
    """Taking the peer's address in a move failed (and was undone): it must serve it again itself."""

    reason: str


@dataclass(frozen=True)
class MoveOut:
    """Run the move-out sequence (:func:`proxy.livemove.move_out`) for ``address``; report :class:`MovedOut`
    (with ``stopping`` passed on)."""

    address: str
    stopping: bool = False


@dataclass(frozen=True)
class MoveIn:
    """Take ``address`` with the connections the peer sent (:func:`proxy.livemove.move_in`); for the peer's
    address report :class:`TakeoverDone` or :class:`MoveInFailed`."""

    address: str


Event = Event | HandoverRequested | HandoverBackRequested | MoveBackRequested | MoveArrived | MovedOut | MoveInFailed
Action = Action | MoveOut | MoveIn

MOVE_REQUESTED = "move_requested"        # handover (own address)
MOVE_BACK_WANTED = "move_back_wanted"    # handover --back
PEER_ASKS_MOVE = "peer_asks_move"        # move_request for the peer's address
MINE_ARRIVES = "mine_arrives"            # move_commit for the own address
THEIRS_ARRIVES = "theirs_arrives"        # move_commit for the peer's address
MOVED_OUT = "moved_out"
MOVE_OUT_FAILED = "move_out_failed"      # nothing was changed
MOVE_IN_FAILED = "move_in_failed"
STOPPING_LINKED = "stopping_linked"      # SIGTERM with the sync link up: move instead of drain
STOP_MOVE_FAILED = "stop_move_failed"    # ... and that move could not start: drain as before
MOVE_THAWED = "move_thawed"              # called off after the freeze: everything stays as it was
MOVE_KINDS = (MOVE_REQUESTED, MOVE_BACK_WANTED, PEER_ASKS_MOVE, MINE_ARRIVES, THEIRS_ARRIVES, MOVED_OUT,
              MOVE_OUT_FAILED, MOVE_IN_FAILED, STOPPING_LINKED, STOP_MOVE_FAILED, MOVE_THAWED)
KINDS += MOVE_KINDS

MOVE_OUT_MINE, MOVE_OUT_THEIRS, MOVE_IN_MINE, MOVE_IN_THEIRS = "move_out_mine", "move_out_theirs", "move_in_mine", \
    "move_in_theirs"
ASK_MOVE_BACK = "ask_move_back"
MOVE_OUT_MINE_STOPPING = "move_out_mine_stopping"

OWN_TRANSITIONS.update({
    (SERVING, MOVE_REQUESTED): (MOVING_OUT, (MOVE_OUT_MINE,)),
    (MOVING_OUT, MOVED_OUT): (HANDED_OVER, ()),
    (MOVING_OUT, MOVE_OUT_FAILED): (SERVING, ()),
    (MOVING_OUT, MOVE_THAWED): (SERVING, ()),
    (HANDED_OVER, MOVE_BACK_WANTED): (HANDED_OVER, (ASK_MOVE_BACK,)),
    (HANDED_OVER, MINE_ARRIVES): (SERVING, (MOVE_IN_MINE,)),
    # the peer died holding it, or says it does not hold it (its move-in failed): serve it again
    (HANDED_OVER, PEER_DEAD): (SERVING, (SERVE_AFTER_HOLDER,)),
    (HANDED_OVER, PEER_RELEASED_MINE): (SERVING, (SERVE,)),
    # SIGTERM in a pair: the peer takes the address with its connections at once; no drain, no refusals
    (SERVING, STOPPING_LINKED): (MOVING_OUT, (MOVE_OUT_MINE_STOPPING,)),
    (MOVING_OUT, STOP_MOVE_FAILED): (SERVING, (LEAVE,)),
})
PEER_TRANSITIONS.update({
    (STANDBY, THEIRS_ARRIVES): (HOLDING, (MOVE_IN_THEIRS,)),
    (HOLDING, MOVE_IN_FAILED): (STANDBY, (TELL_RELEASED,)),
    (HOLDING, PEER_ASKS_MOVE): (MOVING_BACK, (MOVE_OUT_THEIRS,)),
    # nothing held to move (e.g. the move-in failed): say so, the owner serves it again
    (STANDBY, PEER_ASKS_MOVE): (STANDBY, (TELL_RELEASED,)),
    (MOVING_BACK, MOVED_OUT): (STANDBY, ()),
    # called off after the freeze: the connections went on here, so this node still holds the address
    (MOVING_BACK, MOVE_THAWED): (HOLDING, ()),
    # the move could not start (no sync link): hand it back the old way, cutting its connections
    (MOVING_BACK, MOVE_OUT_FAILED): (RELEASING, (RELEASE,)),
    # the hand-back after the owner returns moves the address with its live connections (issue 11)
    (HOLDING, HANDBACK_REQUESTED): (MOVING_BACK, (MOVE_OUT_THEIRS,)),
})
OWN_TRANSITIONS.update({
    # the holder moved it back with its connections, in answer to the hand-back request
    (YIELDED, MINE_ARRIVES): (SERVING, (MOVE_IN_MINE,)),
})
# Everything else with a move kind, or in a move state, is ignored: a move runs to its end before the
# next event is handled, and a handed-over node waits for its address to be moved back (its peer's
# hellos say it holds the address; that is no reason to ask for it the hand-back way).
IGNORED = IGNORED | frozenset(
    (state, kind)
    for states, table in ((OWN_STATES, OWN_TRANSITIONS), (PEER_STATES, PEER_TRANSITIONS))
    for state in states for kind in KINDS
    if (kind in MOVE_KINDS or state in (MOVING_OUT, HANDED_OVER, MOVING_BACK)) and (state, kind) not in table)


def _move_kinds(core: PairCore, event: Event) -> list[tuple[str, str]] | None:
    """What a move event means (None: not a move event)."""
    mine, theirs, peer = core.my_address, core.peer_address, core.peer_name
    if isinstance(event, HandoverRequested):
        return [(MOVE_REQUESTED, f"handover of {mine} to {peer} requested")]
    if isinstance(event, HandoverBackRequested):
        return [(MOVE_BACK_WANTED, f"asking {peer} to move {mine} back")]
    if isinstance(event, MoveBackRequested):
        if event.address != theirs:
            return core._wrong_address("move_request", event.address, theirs)
        return [(PEER_ASKS_MOVE, f"{peer} asks for {theirs} back")]
    if isinstance(event, MoveArrived):
        if event.address == mine:
            return [(MINE_ARRIVES, f"{peer} moved {mine} back here")]
        if event.address == theirs:
            return [(THEIRS_ARRIVES, f"{peer} moved {theirs} here")]
        return core._wrong_address("move_commit", event.address, f"{mine} or {theirs}")
    if isinstance(event, Stopping) and event.link_connected:
        return [(STOPPING_LINKED, f"stopping: moving {mine} to {peer} with its connections")]
    if isinstance(event, MovedOut):
        if event.thawed and not event.stopping:
            return [(MOVE_THAWED, f"move of {event.address} to {peer} called off: its connections stay here")]
        if event.started and not event.thawed:
            return [(MOVED_OUT, f"moved {event.address} to {peer}")]
        if event.stopping:
            return [(STOP_MOVE_FAILED, f"could not move {event.address}: draining instead")]
        return [(MOVE_OUT_FAILED, f"could not start moving {event.address}")]
    if isinstance(event, MoveInFailed):
        return [(MOVE_IN_FAILED, f"taking {theirs} in a move failed: {event.reason}")]
    return None


def _move_step_actions(core: PairCore, step: str) -> list[Action] | None:
    if step == MOVE_OUT_MINE:
        return [MoveOut(core.my_address)]
    if step == MOVE_OUT_MINE_STOPPING:
        return [MoveOut(core.my_address, stopping=True)]
    if step == MOVE_OUT_THEIRS:
        return [MoveOut(core.peer_address)]
    if step == MOVE_IN_MINE:
        return [MoveIn(core.my_address)]
    if step == MOVE_IN_THEIRS:
        return [MoveIn(core.peer_address)]
    if step == ASK_MOVE_BACK:
        return [SendMessage("move_request", core.my_address)]
    return None
