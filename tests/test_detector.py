"""sync.detector: the pure failure detector over the heartbeat process's facts (fake time)."""

from __future__ import annotations

import pytest

from sync.detector import TRANSITIONS, FailureDetector, PeerAlive, PeerDead, PeerQuiet
from sync.heartbeat import HeartbeatMonitor

DEAD = 0.04


def up(d, at=0.0):
    return d.fact("path_up", at, "sync", at) + d.fact("path_up", at, "service", at)


def test_both_paths_silent_is_dead_once_and_heartbeats_bring_it_back():
    d = FailureDetector(DEAD)
    assert up(d) == [] and d.state == "alive"
    assert d.fact("quiet", 0.02, None, 0.0) == [PeerQuiet()] and d.state == "suspect"
    assert d.fact("silent", 0.04, None, 0.0) == [PeerDead(pytest.approx(0.04))] and d.state == "dead"
    assert d.fact("silent", 0.05, None, 0.0) == []  # a second report: no second verdict
    assert d.fact("heard", 0.5, "sync", 0.5) == [PeerAlive()] and d.state == "alive"
    assert d.last_heartbeat == 0.5


def test_sync_path_silent_while_the_service_path_carries_heartbeats_is_link_down_never_dead():
    d = FailureDetector(DEAD)
    up(d)
    assert d.fact("path_silent", 0.04, "sync", 0.0) == [] and d.state == "link_down"
    for t in range(1, 100):  # a long cut of the sync network: nothing but the path fact
        assert d.tick(t * 0.05) == []
    assert d.state == "link_down"
    assert d.fact("path_up", 5.0, "sync", 5.0) == [PeerAlive()] and d.state == "alive"


def test_a_peer_dying_during_link_down_is_still_found():
    d = FailureDetector(DEAD)
    up(d)
    d.fact("path_silent", 0.04, "sync", 0.0)
    d.fact("quiet", 1.02, None, 1.0)
    assert d.fact("silent", 1.04, None, 1.0) == [PeerDead(pytest.approx(0.04))]


def test_a_service_path_first_peer_is_link_down_until_its_sync_path_arrives():
    d = FailureDetector(DEAD)
    assert d.fact("path_up", 0.0, "service", 0.0) == [] and d.state == "link_down"
    assert d.fact("path_up", 0.01, "sync", 0.01) == [PeerAlive()] and d.state == "alive"


def test_silent_from_the_start_is_dead():
    d = FailureDetector(DEAD)
    d.fact("quiet", 0.02)
    assert d.fact("silent", 0.04) == [PeerDead(pytest.approx(0.04))]


@pytest.mark.parametrize("evidence", ["refused", "unauthenticated"])
def test_evidence_of_a_living_process_makes_silence_misconfigured_until_it_stops(evidence):
    d = FailureDetector(DEAD, refusal_valid_for=3.0)

    def show(at):
        if evidence == "refused":
            return d.peer_refused(at, "authentication failed (different key_file?)")
        return d.fact("unauthenticated", at, "service", None)

    show(0.0)
    d.fact("quiet", 0.02)
    assert d.fact("silent", 0.04) == [] and d.state == "misconfigured"
    assert "key_file" in d.misconfigured_reason
    for k in range(1, 20):  # the evidence keeps coming: never dead
        show(k * 0.5)
        assert d.tick(k * 0.5 + 0.01) == []
    assert d.state == "misconfigured"
    assert d.tick(9.4 + 2.9) == []
    assert d.tick(9.5 + 3.01) == [PeerDead(pytest.approx(9.5 + 3.01 - 0.0))]  # it really died: 3 s later
    assert d.state == "dead"


def test_a_dead_peer_back_with_another_key_is_misconfigured_and_what_is_held_stays():
    d = FailureDetector(DEAD)
    up(d)
    d.fact("silent", 0.04, None, 0.0)
    assert d.peer_refused(5.0, "a hello with mode 'stateful'") == [] and d.state == "misconfigured"


def test_every_state_has_a_way_out_and_only_heartbeats_leave_dead():
    states = {s for s, _ in TRANSITIONS} | set(TRANSITIONS.values())
    for s in states - {"dead"}:
        assert any(old == s and new != s for (old, _), new in TRANSITIONS.items()), s
    assert {e for (s, e), new in TRANSITIONS.items() if s == "dead" and new == "alive"} == {"heard", "sync_up"}


def test_the_monitor_and_the_detector_together_in_fake_time():
    """The wiring of the node, without processes: a's monitor facts feed a's detector."""
    hb = 0.01
    a = HeartbeatMonitor(b"k" * 32, me="a", peer="b", mode="stateless", heartbeat=hb, dead_after=DEAD, now=0.0)
    b = HeartbeatMonitor(b"k" * 32, me="b", peer="a", mode="stateless", heartbeat=hb, dead_after=DEAD, now=0.0)
    d, verdicts = FailureDetector(DEAD), []
    t, b_alive, cut_sync = 0.0, True, False
    while t < 2.0:
        for path in ("sync", "service"):
            da = a.outgoing(path, t)
            if b_alive:
                b.received(path, da, t)
                if not (cut_sync and path == "sync"):
                    a.received(path, b.outgoing(path, t), t)
        for step in (0.0, 0.005):
            a.tick(t + step)
            for f in a.take_facts():
                verdicts += [(f.at, v) for v in d.fact(f.kind, f.at, f.path, f.last_heard)]
        t = round(t + hb, 6)
        cut_sync = 0.5 <= t < 1.0
        b_alive = t < 1.5
        if t == 0.8:
            assert d.state == "link_down"
    dead = [at for at, v in verdicts if isinstance(v, PeerDead)]
    assert len(dead) == 1 and 1.5 + DEAD - hb <= dead[0] <= 1.5 + DEAD + 0.006


def test_a_peer_heard_only_on_the_link_is_dead_once_the_link_is_silent_for_dead_after():
    """Killed right after its start, before its heartbeats reached us: the start-up's "silent" verdict
    (never heard) was not acted on; the link's silence is the peer's death, once."""
    d = FailureDetector(DEAD)
    assert d.fact("silent", 0.4) == [PeerDead(pytest.approx(DEAD))]      # at the start, before anything
    (verdict,) = d.link_silent_never_heard(2.0, 0.15)
    assert isinstance(verdict, PeerDead) and verdict.silent_for == pytest.approx(0.15)
    assert d.state == "dead"
    assert d.link_silent_never_heard(2.1, 0.25) == []                      # once


def test_the_link_says_nothing_once_a_heartbeat_was_heard():
    d = FailureDetector(DEAD)
    d.fact("path_up", 1.0, "sync", last_heard=1.0)
    assert d.state == "alive"
    assert d.link_silent_never_heard(2.0, 0.5) == [] and d.state == "alive"
