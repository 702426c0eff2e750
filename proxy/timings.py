"""Every timing of a pair, derived from ``[pair] heartbeat``/``dead_after``/``claim_wait`` in one place.

Why one place: the failure detector, the sync link, the probe and the takeover all depend on
``dead_after``, and they only work together in the right proportions (a probe must report before the
silence reaches ``dead_after``, the link must not drop a connection the detector still trusts). Spelled
out at each call site, one of them drifts; here each derived value says why it is what it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.config import PairConfig


@dataclass(frozen=True)
class PairTimings:
    """The pair's timings in seconds; build with :meth:`from_config`."""

    heartbeat: float
    dead_after: float
    claim_wait: float

    @classmethod
    def from_config(cls, pair: PairConfig) -> "PairTimings":
        return cls(heartbeat=pair.heartbeat, dead_after=pair.dead_after, claim_wait=pair.claim_wait)

    # -- failure detection (sync.detector, proxy.probe) -------------------------------------------
    @property
    def probe_after(self) -> float:
        """Silence after which probing starts: half of dead_after, so the probe's answer is in when
        the silence reaches dead_after and the verdict is not delayed by a probe's round trip."""
        return self.dead_after / 2

    @property
    def probe_every(self) -> float:
        """How often a silent peer is probed again (link_down: a peer that dies later is still caught)."""
        return self.dead_after / 2

    @property
    def probe_timeout(self) -> float:
        """When the detector's driver cuts a probe off and counts it as silent."""
        return self.dead_after / 2

    @property
    def probe_answer_within(self) -> float:
        """The probe's own deadline: a little under :attr:`probe_timeout`, so it reports its result
        itself instead of being cut off."""
        return self.probe_timeout * 0.9

    @property
    def detector_tick(self) -> float:
        """How often the detector looks at the clock: a quarter heartbeat, at most 5 ms."""
        return min(0.005, self.heartbeat / 4)

    # -- the sync link (sync.link) ---------------------------------------------------------------
    @property
    def link_idle_timeout(self) -> float:
        """A link connection silent this long is dropped: three verdicts' worth, so a connection is
        never dropped before the detector could have judged the silence (and a half-open one does not
        block a fresh one for long)."""
        return 3 * self.dead_after

    # -- the stateful observer (proxy.standby) ---------------------------------------------------
    @property
    def observer_timeout(self) -> float:
        """Longest wait for the observer on the takeover's path (and in the decision task): a stuck
        observer costs a takeover at most this, and the takeover goes on without what it would have
        said (a stateless takeover)."""
        return self.dead_after

    @property
    def prepared_takeover_max_age(self) -> float:
        """A prefetched list of the peer's connections is used at takeover only if fetched within this
        (and after the last heartbeat); older, it is fetched again. Probing repeats every
        :attr:`probe_every`, and each probe refreshes it, so a long link outage cannot leave it stale."""
        return self.dead_after

    digest_every: float = 0.25  # stateful: how often the owner sends the digest of its own address
    status_observer_timeout: float = 2.0  # status may wait longer than a takeover, but not forever

    own_stuck_warn_every: float = 30.0  # the warning about an own address not served, repeated this often

    # -- an own address not served (proxy.roles, issue 9.7) ---------------------------------------
    @property
    def own_stuck_after(self) -> float:
        """Claiming or yielded this long is no start-up or hand-back any more (both take about one
        claim_wait): the node warns, at most every :attr:`own_stuck_warn_every`, and status says why."""
        return 5 * self.claim_wait

    # -- takeover retries (proxy.roles) ----------------------------------------------------------
    @property
    def takeover_retry_first(self) -> float:
        """First backoff after a takeover failed on a kernel error (doubling up to :attr:`takeover_retry_max`)."""
        return self.dead_after / 2

    @property
    def takeover_retry_max(self) -> float:
        return max(1.0, 10 * self.dead_after)
