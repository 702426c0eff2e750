"""Is the peer dead? A pure state machine, and a small trio driver that feeds it.

Rules of this file: everything that decides the peer's liveness lives in :class:`FailureDetector`;
it knows no sockets, no ARP and no clock of its own (every input carries ``now``), so tests drive it
with plain numbers and ``MockClock``. It does not take over anything either: it returns actions and
the owner executes them.

Theory of operation
-------------------
Two independent witnesses, as the patent's watchdog (306/406) suggests:

* the sync link: any authenticated message from the peer is a heartbeat;
* a probe on the service network, run by the owner: an ARP for the peer's service address that the
  peer's own MAC answers.

A silent sync link alone proves nothing: the link's cable or switch may have failed while the peer
still serves its clients. Taking over then would put the peer's address on two nodes (split brain).
So the peer is declared dead only when

    nothing arrived on the sync link for ``dead_after`` seconds, AND
    a probe *started after that silence began* got no answer.

If the probe is answered, the state is ``link_down``: the peer lives, nobody takes over, and probing
goes on every ``probe_every`` seconds, so a peer that dies later while the link is still down is
still caught. Each probe has an id; a result for any probe other than the one currently asked for
(e.g. a late answer to a probe from before the last heartbeat) is ignored, so an old result can
never decide about a new silence. ``dead`` is left only by a heartbeat: a peer that comes back must
come back over the sync link, where the hand-back of its address is negotiated.

A peer that answers but cannot be authenticated is alive (issue 9.1): two nodes with different
key files (or modes) used to declare each other dead and both served both addresses. Two
kinds of evidence say "its process lives, but we cannot pair with it":

* the probe's ``unauthenticated`` answer (:mod:`proxy.probe`: a process calling itself the peer
  answered our fresh nonce, but not with our key), input :meth:`FailureDetector.probe_unauthenticated`;
* a refusal on the sync link from the peer's address within the last ``refusal_valid_for`` seconds
  (its first frame failed authentication, or a hello with another mode/version/name was refused
  either way), input :meth:`FailureDetector.peer_refused`.

With either, a silent peer is ``misconfigured``, not dead: nobody takes over, probing goes on, and
the reason (what to change) is logged once at error level. When the evidence stops (the peer really
died: no answers, no refusals for ``refusal_valid_for``) a silent probe declares it dead as usual,
so a misconfigured pair still fails over, ``refusal_valid_for`` later at most.

``unknown`` is the state before the first heartbeat. Silence is counted from the first input the
detector sees, so a node that starts while its peer is already dead still finds out (it knows the
peer's MAC from the persisted hello).

States::

    unknown    no heartbeat seen yet
    alive      heartbeats arrive
    suspect    silent for dead_after, probe running
    link_down  silent, but the peer answers probes: it lives
    misconfigured  silent, but the peer's process answers without our key or refuses our
                   configuration (see above): it lives, nobody takes over
    dead       silent, and a probe started during the silence got no answer

Actions (returned by every input; the owner executes them in order):
:class:`StartProbe`, :class:`PeerDead`, :class:`PeerAlive`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Awaitable, Callable, Literal

import trio

log = logging.getLogger("pairproxy.detector")

State = Literal["unknown", "alive", "suspect", "link_down", "misconfigured", "dead"]
Input = Literal["heartbeat", "silence", "probe_answered", "probe_silent", "misconfigured"]

# (state, input) -> new state. An input missing for a state leaves the state alone (and is ignored):
# e.g. a probe result while alive, or silence while already suspect (probing just goes on).
TRANSITIONS: dict[tuple[State, Input], State] = {
    ("unknown", "heartbeat"): "alive",
    ("unknown", "silence"): "suspect",
    ("alive", "heartbeat"): "alive",
    ("alive", "silence"): "suspect",
    ("suspect", "heartbeat"): "alive",
    ("suspect", "probe_answered"): "link_down",
    ("suspect", "probe_silent"): "dead",
    ("link_down", "heartbeat"): "alive",
    ("link_down", "probe_answered"): "link_down",
    ("link_down", "probe_silent"): "dead",
    # "misconfigured": the peer's process answers but cannot be paired with (derived from a probe
    # result plus the link's refusals, see FailureDetector._verdict)
    ("suspect", "misconfigured"): "misconfigured",
    ("link_down", "misconfigured"): "misconfigured",
    ("misconfigured", "misconfigured"): "misconfigured",
    ("misconfigured", "heartbeat"): "alive",
    ("misconfigured", "probe_answered"): "link_down",
    ("misconfigured", "probe_silent"): "dead",
    ("dead", "heartbeat"): "alive",
    # a peer declared dead comes back, but cannot pair: show why (what the node holds stays as is)
    ("dead", "misconfigured"): "misconfigured",
}

# States in which the peer is silent and probes are repeated.
PROBING: frozenset[State] = frozenset({"suspect", "link_down", "misconfigured"})

#: What to change, per kind of misconfiguration evidence, for the one loud log line.
MISCONFIGURED_HINT = "not taking over; make key_file, [pair] mode and the two names match on both nodes"


@dataclass(frozen=True)
class StartProbe:
    """Probe the peer on the service network; report with ``probe_answered/probe_silent(now, probe_id)``."""

    probe_id: int


@dataclass(frozen=True)
class PeerDead:
    """Sync link silent and the probe unanswered: the owner may take over the peer's address."""

    silent_for: float


@dataclass(frozen=True)
class PeerAlive:
    """Heartbeats came back after ``dead`` or ``link_down``."""


Action = StartProbe | PeerDead | PeerAlive


class FailureDetector:
    """Decides the peer's liveness from heartbeats and probe results; see the module docstring."""

    def __init__(self, dead_after: float, *, probe_every: float | None = None, probe_after: float | None = None,
                 refusal_valid_for: float = 3.0):
        if dead_after <= 0:
            raise ValueError("dead_after must be positive")
        self.dead_after = dead_after
        self.probe_every = probe_every if probe_every is not None else dead_after / 2
        #: Silence after which probing starts. Below ``dead_after`` the probe's answer is ready when
        #: the silence reaches dead_after, so the verdict comes at dead_after, not dead_after plus
        #: a probe's timeout; a result before dead_after is remembered, never acted on.
        self.probe_after = dead_after if probe_after is None else probe_after
        if not 0 < self.probe_after <= dead_after:
            raise ValueError("probe_after must be positive and at most dead_after")
        self._early_silent = False  # a probe during this silence, before dead_after, got no answer
        #: how long a refusal on the sync link counts as proof that the peer's process lives (the link
        #: retries a refused connection at least every second)
        self.refusal_valid_for = refusal_valid_for
        self._refused: tuple[float, str] | None = None  # (when, reason) of the last peer refusal
        self._declared_dead = False  # PeerDead was returned since the last heartbeat
        self._logged_misconfigured: str | None = None
        self.probes: dict[str, int] = {"answered": 0, "unauthenticated": 0, "silent": 0}
        self.state: State = "unknown"
        self.reason = "no heartbeat seen yet"
        self.last_heartbeat: float | None = None
        self._silence_since: float | None = None  # last heartbeat, or the first input seen
        self._probe_id = 0
        self._probe_pending = False  # the current probe (self._probe_id) has not reported yet
        self._probe_started: float = -math.inf

    # -- inputs ------------------------------------------------------------------------------

    def heartbeat(self, now: float) -> list[Action]:
        """Any authenticated message from the peer arrived at ``now``."""
        self._start_clock(now)
        if self.last_heartbeat is not None and now < self.last_heartbeat:
            return []  # an older observation, already superseded
        self.last_heartbeat = self._silence_since = now
        self._probe_pending = False  # a probe asked for before now cannot judge a later silence
        self._early_silent = False
        self._probe_started = -math.inf  # the next silence probes at once
        self._declared_dead = False
        self._logged_misconfigured = None
        if self._refused is not None and self._refused[0] <= now:
            self._refused = None  # the link works now: an earlier refusal says nothing about a later silence
        was = self.state
        self._move("heartbeat", "heartbeats arrive")
        return [PeerAlive()] if was in ("dead", "link_down", "misconfigured") else []

    def probe_answered(self, now: float, probe_id: int) -> list[Action]:
        """The peer's MAC answered probe ``probe_id``: the peer is on the service network."""
        self._start_clock(now)
        if not self._is_current_probe(probe_id):
            return []
        self._probe_pending = False
        self.probes["answered"] += 1
        if self.silent_for(now) < self.dead_after:
            self._early_silent = False  # the peer answers: silence this short is no news yet
            return []
        refused = self._fresh_refusal(now)
        if refused:
            self._misconfigured(f"the peer answers probes, but its process refuses the sync link: {refused}")
            return []
        self._move("probe_answered",
                   f"sync link silent {self.silent_for(now) * 1000:.0f} ms but the peer answers probes")
        return []

    def probe_unauthenticated(self, now: float, probe_id: int) -> list[Action]:
        """A process calling itself the peer answered probe ``probe_id``, but not with our key."""
        self._start_clock(now)
        if not self._is_current_probe(probe_id):
            return []
        self._probe_pending = False
        self.probes["unauthenticated"] += 1
        if self.silent_for(now) < self.dead_after:
            self._early_silent = False  # it lives
            return []
        refused = self._fresh_refusal(now)
        self._misconfigured("the peer's process answers probes, but not with this node's key (different "
                            "key_file on the two nodes?)" + (f"; sync link: {refused}" if refused else ""))
        return []

    def peer_refused(self, now: float, reason: str) -> list[Action]:
        """The peer's process answered on the sync link at ``now`` but refused or failed authentication."""
        self._start_clock(now)
        if self._refused is None or now > self._refused[0]:
            self._refused = (now, reason)
        if self.state == "dead":  # it came back unpaired: say so; what the node holds stays
            self._misconfigured(f"the peer's process is back but refuses the sync link: {reason}")
        return []

    def probe_silent(self, now: float, probe_id: int) -> list[Action]:
        """Probe ``probe_id`` got no answer from the peer's MAC."""
        self._start_clock(now)
        if not self._is_current_probe(probe_id):
            return []
        self._probe_pending = False
        self.probes["silent"] += 1
        silent = self.silent_for(now)
        if silent < self.dead_after:
            self._early_silent = True  # judged when the silence reaches dead_after (tick)
            return []
        return self._silent_verdict(now, silent)

    def tick(self, now: float) -> list[Action]:
        """Let time pass: notice silence, and ask for (repeated) probes while silent."""
        self._start_clock(now)
        if self.state in ("unknown", "alive") and self.silent_for(now) >= self.probe_after:
            self._move("silence", f"sync link silent {self.silent_for(now) * 1000:.0f} ms, probing")
        if self.state == "suspect" and self._early_silent and self.silent_for(now) >= self.dead_after:
            self._early_silent = False
            return self._silent_verdict(now, self.silent_for(now))
        if self.state in PROBING and not self._probe_pending and now - self._probe_started >= self.probe_every:
            self._probe_id += 1
            self._probe_pending = True
            self._probe_started = now
            return [StartProbe(self._probe_id)]
        return []

    # -- queries -----------------------------------------------------------------------------

    @property
    def misconfigured_reason(self) -> str | None:
        """Why the peer cannot be paired with, while the state is ``misconfigured``."""
        return self.reason if self.state == "misconfigured" else None

    def stats(self) -> dict[str, object]:
        """The detector as ``pairproxy status`` shows it (JSON-able)."""
        return {"state": self.state, "reason": self.reason, "misconfigured": self.misconfigured_reason,
                "probes": dict(self.probes)}

    def silent_for(self, now: float) -> float:
        """Seconds since the last heartbeat (or since the detector started, before the first one)."""
        return 0.0 if self._silence_since is None else max(0.0, now - self._silence_since)

    # -- internals ---------------------------------------------------------------------------

    def _start_clock(self, now: float) -> None:
        if self._silence_since is None:
            self._silence_since = now

    def _fresh_refusal(self, now: float) -> str | None:
        if self._refused is not None and now - self._refused[0] <= self.refusal_valid_for:
            return self._refused[1]
        return None

    def _silent_verdict(self, now: float, silent: float) -> list[Action]:
        """The probe got no answer after ``dead_after`` of silence: dead, unless the link says otherwise."""
        refused = self._fresh_refusal(now)
        if refused:
            self._misconfigured(f"no answer to the probe, but the peer's process refuses the sync link: {refused}")
            return []
        self._move("probe_silent", f"sync link silent {silent * 1000:.0f} ms and no answer to the probe")
        if self.state == "dead" and not self._declared_dead:
            self._declared_dead = True
            return [PeerDead(silent)]
        return []

    def _misconfigured(self, reason: str) -> None:
        self._move("misconfigured", reason)
        if self.state == "misconfigured" and self._logged_misconfigured != reason:
            self._logged_misconfigured = reason
            log.error("peer cannot be paired with but is alive: %s; %s", reason, MISCONFIGURED_HINT)

    def _is_current_probe(self, probe_id: int) -> bool:
        return self._probe_pending and probe_id == self._probe_id

    def _move(self, event: Input, reason: str) -> None:
        new = TRANSITIONS.get((self.state, event))
        if new is None:
            return
        if new != self.state:
            log.info("peer %s -> %s: %s", self.state, new, reason)
        if new != self.state or event == "misconfigured":
            self.reason = reason
        self.state = new


async def watch(detector: FailureDetector,
                probe: Callable[[], Awaitable[bool]],
                on_action: Callable[[Action], None],
                *,
                heard: Callable[[], float | None] | None = None,
                refused: Callable[[], tuple[float, str] | None] | None = None,
                tick_every: float = 0.005,
                probe_timeout: float | None = None) -> None:
    """Drive ``detector`` with trio's clock until cancelled.

    ``probe()`` returns True when the peer answered; it runs in its own task (ticking goes on) and
    is cut off after ``probe_timeout`` (default ``detector.probe_every``), which counts as silent.
    A probe that raises counts as silent too: not knowing is not an answer.
    ``on_action`` is called for every action, PeerDead and PeerAlive included, and must not block;
    StartProbe is executed here before it is passed on (for logging).
    ``heard()``, if given, returns the trio time of the last authenticated message from the peer
    (e.g. ``lambda: link.last_received``); it is polled every tick, so the link needs no reference
    to the detector. Without it, the owner calls ``detector.heartbeat`` itself.
    ``probe()`` may also return ``"answered"``, ``"unauthenticated"`` or ``"silent"``
    (:data:`proxy.probe.ProbeResult`). ``refused()``, if given, returns ``(when, reason)`` of the last
    refusal by the peer's process on the sync link (``link.peer_refused``), polled like ``heard``.
    """
    timeout = probe_timeout if probe_timeout is not None else detector.probe_every

    async def run_probe(probe_id: int) -> None:
        result: object = "silent"
        with trio.move_on_after(timeout):
            try:
                result = await probe()
            except Exception as exc:  # a failing probe must not stop failure detection
                log.warning("probe failed: %s", exc)
        now = trio.current_time()
        if result is True or result == "answered":
            report = detector.probe_answered
        elif result == "unauthenticated":
            report = detector.probe_unauthenticated
        else:
            report = detector.probe_silent
        for action in report(now, probe_id):
            on_action(action)

    last_refusal: tuple[float, str] | None = None
    async with trio.open_nursery() as nursery:
        while True:
            now = trio.current_time()
            actions: list[Action] = []
            if heard is not None:
                last = heard()
                if last is not None and (detector.last_heartbeat is None or last > detector.last_heartbeat):
                    actions += detector.heartbeat(last)
            if refused is not None:
                refusal = refused()
                if refusal is not None and refusal != last_refusal:
                    last_refusal = refusal
                    actions += detector.peer_refused(*refusal)
            actions += detector.tick(now)
            for action in actions:
                if isinstance(action, StartProbe):
                    nursery.start_soon(run_probe, action.probe_id)
                on_action(action)
            await trio.sleep(tick_every)
