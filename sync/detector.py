"""Is the peer dead? A pure state machine over the heartbeat process's facts.

Rules of this file: everything that decides the peer's liveness lives in :class:`FailureDetector`;
it knows no sockets and no clock of its own (every input carries its time), so tests drive it with
plain numbers and ``MockClock``. It does not take over anything either: it returns actions and the
owner (:mod:`proxy.node`, then :mod:`proxy.roles`) executes them.

Theory of operation
-------------------
The witnesses are heartbeats on two paths, sent and checked by the heartbeat process
(:mod:`proxy.heartbeat`, off the node's event loop; the datagrams and what they prove:
:mod:`sync.heartbeat`): the sync network and the service network, both all the time. The process
reports facts, this machine turns them into a state:

* ``path_up``/``path_silent``: one path carries fresh heartbeats, or has been silent ``dead_after``;
* ``quiet``: both paths silent ``dead_after / 2``: ``PeerQuiet`` (a stateful node prefetches what a
  takeover needs);
* ``silent``: both paths silent ``dead_after``: the peer is ``dead`` (``PeerDead``), with no probe round
  trip after the silence: the service path was watched all along;
* ``heard``: a fresh heartbeat after ``quiet``/``silent``: ``alive`` again (``PeerAlive``).

A silent sync path while the service path carries heartbeats is ``link_down``: the peer serves its
clients; taking over would put its address on two nodes (split brain), so nobody takes over.

A peer that answers but cannot be authenticated is alive (issue 9.1): two nodes with different key
files (or modes) used to declare each other dead and both served both addresses. Two kinds of
evidence say "its process lives, but we cannot pair with it":

* ``unauthenticated`` heartbeats: from the peer's address, naming the peer, echoing our fresh nonce,
  but keyed with another key or mode (input :meth:`FailureDetector.unauthenticated`);
* a refusal on the sync link from the peer's address (its first frame failed authentication, or a
  hello with another mode/version/name was refused either way), input :meth:`FailureDetector.peer_refused`.

Evidence counts for ``refusal_valid_for`` seconds. With fresh evidence a silent peer is
``misconfigured``, not dead: nobody takes over, and the reason (what to change) is logged once at
error level. When the evidence stops (the peer really died) :meth:`FailureDetector.tick` declares it
dead, so a misconfigured pair still fails over, ``refusal_valid_for`` later at most.

``unknown`` is the state before the first heartbeat; a peer silent from the start is still found
(the ``silent`` fact is counted from the heartbeat process's start). ``dead`` is left only by
heartbeats.

States::

    unknown        no heartbeat seen yet
    alive          heartbeats arrive on the sync path
    link_down      the sync path is silent, the service path carries heartbeats: it lives
    suspect        both paths quiet for dead_after / 2
    misconfigured  silent, but the peer's process answers without our key or refuses our
                   configuration: it lives, nobody takes over
    dead           both paths silent for dead_after, no evidence of life

Actions (returned by every input; the owner executes them in order):
:class:`PeerQuiet`, :class:`PeerDead`, :class:`PeerAlive`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger("pairproxy.detector")

State = Literal["unknown", "alive", "link_down", "suspect", "misconfigured", "dead"]
Input = Literal["sync_up", "sync_silent", "quiet", "silent", "heard", "misconfigured"]

# (state, input) -> new state. An input missing for a state leaves the state alone.
TRANSITIONS: dict[tuple[State, Input], State] = {
    ("unknown", "sync_up"): "alive",
    ("unknown", "heard"): "alive",
    ("unknown", "quiet"): "suspect",
    ("unknown", "silent"): "dead",
    ("alive", "sync_silent"): "link_down",
    ("alive", "quiet"): "suspect",
    ("alive", "silent"): "dead",
    ("link_down", "sync_up"): "alive",
    ("link_down", "quiet"): "suspect",
    ("link_down", "silent"): "dead",
    ("suspect", "heard"): "alive",
    ("suspect", "sync_up"): "alive",
    ("suspect", "silent"): "dead",
    ("dead", "heard"): "alive",
    ("dead", "sync_up"): "alive",
    # "misconfigured": silent, with fresh evidence that the peer's process lives (see _silent_verdict)
    ("unknown", "misconfigured"): "misconfigured",
    ("suspect", "misconfigured"): "misconfigured",
    ("misconfigured", "misconfigured"): "misconfigured",
    ("misconfigured", "heard"): "alive",
    ("misconfigured", "sync_up"): "alive",
    ("misconfigured", "silent"): "dead",
    # a peer declared dead comes back, but cannot pair: show why (what the node holds stays as is)
    ("dead", "misconfigured"): "misconfigured",
}

#: What to change, per kind of misconfiguration evidence, for the one loud log line.
MISCONFIGURED_HINT = "not taking over; make key_file, [pair] mode and the two names match on both nodes"


@dataclass(frozen=True)
class PeerQuiet:
    """Both paths quiet for dead_after / 2: prepare a takeover (it may come in dead_after / 2)."""


@dataclass(frozen=True)
class PeerDead:
    """Both paths silent for ``silent_for`` (at least dead_after), no evidence of life: the owner may
    take over the peer's address."""

    silent_for: float


@dataclass(frozen=True)
class PeerAlive:
    """Heartbeats came back after ``suspect``, ``dead``, ``link_down`` or ``misconfigured``."""


Action = PeerQuiet | PeerDead | PeerAlive


class FailureDetector:
    """Decides the peer's liveness from the heartbeat process's facts; see the module docstring."""

    def __init__(self, dead_after: float, *, refusal_valid_for: float = 3.0):
        if dead_after <= 0:
            raise ValueError("dead_after must be positive")
        self.dead_after = dead_after
        #: how long a refusal on the sync link (or an unauthenticated heartbeat) counts as proof that
        #: the peer's process lives (the link retries a refused connection at least every second)
        self.refusal_valid_for = refusal_valid_for
        self._evidence: tuple[float, str] | None = None  # (when, reason) of the last sign of a misconfigured peer
        self._declared_dead = False  # PeerDead was returned since the last heartbeat
        self._link_verdict = False  # link_silent_never_heard gave its verdict
        self._logged_misconfigured: str | None = None
        self.state: State = "unknown"
        self.reason = "no heartbeat seen yet"
        #: the last fresh heartbeat on any path (the caller's clock), None before the first
        self.last_heartbeat: float | None = None
        self.paths: dict[str, bool] = {"sync": False, "service": False}
        self._silent_since: float | None = None  # both paths silent (the "silent" fact's last heartbeat)
        self.facts: dict[str, int] = {}

    # -- inputs ------------------------------------------------------------------------------

    def fact(self, kind: str, at: float, path: str | None = None, last_heard: float | None = None) -> list[Action]:
        """One fact of the heartbeat process (:class:`sync.heartbeat.Fact`), times in the caller's clock."""
        self.facts[kind] = self.facts.get(kind, 0) + 1
        if last_heard is not None and (self.last_heartbeat is None or last_heard > self.last_heartbeat):
            self.last_heartbeat = last_heard
        if kind == "path_up":
            self.paths[path] = True
            if path == "sync":
                return self._alive("sync_up", f"heartbeats arrive on the sync path")
            if self.state == "unknown":
                self._move("heard", "heartbeats arrive on the service path (the sync path not yet)")
                if self.state == "alive" and not self.paths["sync"]:
                    self.state, self.reason = "link_down", "heartbeats arrive on the service path only"
            return self._alive("heard", "heartbeats arrive on the service path") if self.state != "link_down" else []
        if kind == "path_silent":
            self.paths[path] = False
            if path == "sync" and self.paths["service"]:
                self._move("sync_silent", f"no heartbeat on the sync path for {self.dead_after * 1000:.0f} ms, "
                                          "but the service path carries them: the peer lives")
            return []
        if kind == "quiet":
            self._move("quiet", f"no heartbeat on either path for {self.dead_after * 500:.0f} ms")
            return [PeerQuiet()]
        if kind == "silent":
            self._silent_since = last_heard if last_heard is not None else at - self.dead_after
            return self._silent_verdict(at)
        if kind == "heard":
            self._silent_since = None
            return self._alive("heard", f"heartbeats again on the {path} path")
        if kind == "unauthenticated":
            return self.unauthenticated(at, path)
        if kind == "restarted":  # for the roles (proxy.node passes it on); life itself comes as heard/path_up
            return []
        raise ValueError(f"unknown fact {kind!r}")

    def unauthenticated(self, at: float, path: str | None = None) -> list[Action]:
        """The peer's process sent heartbeats on ``path`` that echo our nonce, with another key or mode."""
        reason = (f"the peer's process sends heartbeats{f' on the {path} path' if path else ''}, but not with "
                  "this node's key or mode (different key_file or [pair] mode on the two nodes?)")
        return self._evidence_of_life(at, reason)

    def peer_refused(self, at: float, reason: str) -> list[Action]:
        """The peer's process answered on the sync link at ``at`` but refused or failed authentication."""
        return self._evidence_of_life(at, f"the peer's process refuses the sync link: {reason}")

    def link_silent_never_heard(self, at: float, silent_for: float) -> list[Action]:
        """The peer was heard only on the sync link (its heartbeats never arrived: killed right after
        its start) and the link has been silent for ``silent_for`` (at least dead_after): dead, as if
        its heartbeats had stopped when the link did. Nothing once a heartbeat was heard (the heartbeat
        process judges from then on)."""
        if self.last_heartbeat is not None or self._link_verdict:
            return []
        self._link_verdict = True
        self._silent_since = at - silent_for
        self._declared_dead = False  # a verdict at the start, before anything was heard, is not this one
        return self._silent_verdict(at)

    def tick(self, now: float) -> list[Action]:
        """Let time pass: a misconfigured peer whose evidence of life stopped is dead."""
        if self.state == "misconfigured" and self._silent_since is not None and self._fresh_evidence(now) is None:
            return self._silent_verdict(now)
        return []

    # -- queries -----------------------------------------------------------------------------

    @property
    def misconfigured_reason(self) -> str | None:
        """Why the peer cannot be paired with, while the state is ``misconfigured``."""
        return self.reason if self.state == "misconfigured" else None

    def stats(self) -> dict[str, object]:
        """The detector as ``pairproxy status`` shows it (JSON-able)."""
        return {"state": self.state, "reason": self.reason, "misconfigured": self.misconfigured_reason,
                "facts": dict(self.facts)}

    def silent_for(self, now: float) -> float | None:
        """Seconds since the last heartbeat on any path (None before the first)."""
        return None if self.last_heartbeat is None else max(0.0, now - self.last_heartbeat)

    # -- internals ---------------------------------------------------------------------------

    def _alive(self, event: Input, reason: str) -> list[Action]:
        was = self.state
        self._silent_since = None
        self._declared_dead = False
        self._logged_misconfigured = None
        self._move(event, reason)
        return [PeerAlive()] if was in ("dead", "link_down", "misconfigured", "suspect") and \
            self.state in ("alive", "link_down") else []

    def _evidence_of_life(self, at: float, reason: str) -> list[Action]:
        if self._evidence is None or at >= self._evidence[0]:
            self._evidence = (at, reason)
        if self.state in ("dead", "suspect", "unknown") or (self.state == "misconfigured"):
            if self._silent_since is not None or self.state in ("dead", "suspect"):
                self._misconfigured(reason)
        return []

    def _fresh_evidence(self, now: float) -> str | None:
        if self._evidence is not None and now - self._evidence[0] <= self.refusal_valid_for:
            return self._evidence[1]
        return None

    def _silent_verdict(self, now: float) -> list[Action]:
        """Both paths silent for dead_after: dead, unless the peer's process shows it lives."""
        evidence = self._fresh_evidence(now)
        if evidence:
            self._misconfigured(evidence)
            return []
        silent = now - self._silent_since if self._silent_since is not None else self.dead_after
        self._move("silent", f"no heartbeat on either path for {silent * 1000:.0f} ms")
        if self.state == "dead" and not self._declared_dead:
            self._declared_dead = True
            return [PeerDead(silent)]
        return []

    def _misconfigured(self, reason: str) -> None:
        self._move("misconfigured", reason)
        if self.state == "misconfigured" and self._logged_misconfigured != reason:
            self._logged_misconfigured = reason
            log.error("peer cannot be paired with but is alive: %s; %s", reason, MISCONFIGURED_HINT)

    def _move(self, event: Input, reason: str) -> None:
        new = TRANSITIONS.get((self.state, event))
        if new is None:
            return
        if new != self.state:
            log.info("peer %s -> %s: %s", self.state, new, reason)
        if new != self.state or event == "misconfigured":
            self.reason = reason
        self.state = new
