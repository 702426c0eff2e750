"""sync.heartbeat: two monitors exchanging datagrams in fake time; what proves life and what does not."""

from __future__ import annotations

import pytest

from sync.heartbeat import SIZE, HeartbeatMonitor, percentiles

KEY = b"a shared secret of enough bytes!"
HB, DEAD = 0.01, 0.04


def pair(key_b: bytes = KEY, mode_b: str = "stateless", now: float = 0.0):
    a = HeartbeatMonitor(KEY, me="a", peer="b", mode="stateless", heartbeat=HB, dead_after=DEAD, now=now)
    b = HeartbeatMonitor(key_b, me="b", peer="a", mode=mode_b, heartbeat=HB, dead_after=DEAD, now=now)
    return a, b


def exchange(a, b, t0: float, t1: float, paths=("sync", "service"), *, a_to_b=True, b_to_a=True):
    """Both send every HB on ``paths`` from t0 to t1 (delivery instant); returns the last time."""
    t = t0
    while t < t1:
        for path in paths:
            da, db = a.outgoing(path, t), b.outgoing(path, t)
            if a_to_b:
                b.received(path, da, t)
            if b_to_a:
                a.received(path, db, t)
        a.tick(t)
        b.tick(t)
        t = round(t + HB, 6)
    return t


def kinds(monitor):
    return [(f.kind, f.path) for f in monitor.take_facts()]


def test_heartbeats_both_ways_bring_both_paths_up_within_two_beats():
    a, b = pair()
    exchange(a, b, 0.0, 0.03)
    assert ("path_up", "sync") in kinds(a) and a.paths["service"].up and b.paths["sync"].up
    assert a.paths["sync"].received >= 1 and a.silent_for(0.03) <= HB


def test_silence_on_both_paths_is_quiet_then_silent_at_dead_after_exactly():
    a, b = pair()
    t = exchange(a, b, 0.0, 0.2)
    a.take_facts()
    last = a.last_heard()
    a.tick(last + DEAD / 2 - 0.001)
    assert kinds(a) == []
    a.tick(last + DEAD / 2 + 1e-9)
    assert kinds(a) == [("quiet", None)]
    a.tick(last + DEAD - 0.0001)
    assert kinds(a) == []
    a.tick(last + DEAD + 1e-9)
    facts = a.take_facts()
    assert sorted((f.kind, f.path) for f in facts) == [("path_silent", "service"), ("path_silent", "sync"),
                                                       ("silent", None)]
    assert all(f.last_heard == last for f in facts)
    assert a.next_deadline(t) > t  # nothing left to report but paths coming back


def test_silent_on_the_sync_path_only_is_a_path_fact_never_silent():
    a, b = pair()
    exchange(a, b, 0.0, 0.1)
    a.take_facts()
    exchange(a, b, 0.1, 0.5, paths=("service",))
    facts = kinds(a)
    assert ("path_silent", "sync") in facts and ("silent", None) not in facts and ("quiet", None) not in facts


def test_a_replayed_heartbeat_proves_nothing_and_does_not_change_the_echo():
    a, b = pair()
    recorded = []
    t = 0.0
    while t < 0.1:
        a.received("sync", b.outgoing("sync", t), t)
        data = a.outgoing("sync", t)
        b.received("sync", data, t)
        recorded.append(b.outgoing("sync", t))
        a.received("sync", recorded[-1], t)
        t = round(t + HB, 6)
    received = a.paths["sync"].received
    echo_before = a.paths["sync"].peer_nonce
    # b dies; an attacker replays everything b ever sent, later and at a high rate
    for k, old in enumerate(recorded * 5):
        assert not a.received("sync", old, 0.15 + k * 0.0001)
    assert a.paths["sync"].received == received and a.paths["sync"].peer_nonce == echo_before
    a.tick(0.2)
    assert "silent" in [f.kind for f in a.take_facts()]


def test_a_delayed_relay_postpones_the_verdict_by_at_most_dead_after():
    a, b = pair()
    exchange(a, b, 0.0, 0.1)
    held = b.outgoing("sync", 0.1)      # the peer's last datagram, echoing a's nonce of 0.09
    assert a.received("sync", held, 0.1 + DEAD / 2)          # within the freshness bound: it did live then
    late = b.outgoing("sync", 0.1)
    for k in range(1, 7):               # a goes on sending (b is dead, nothing arrives)
        a.outgoing("sync", 0.1 + k * HB)
    assert not a.received("sync", late, 0.1 + DEAD + 0.02)  # later: stale


def test_after_a_delay_both_ways_the_echoes_catch_up_in_one_round_trip():
    """Datagrams lost both ways for 30 ms, then one of b's arrives late (stale): the next exchange must
    be fresh again on both sides, not each echoing the other's old nonce until the path falls silent."""
    a, b = pair()
    exchange(a, b, 0.0, 0.1)
    late = b.outgoing("sync", 0.1)
    for t in (0.11, 0.12, 0.13):         # lost both ways
        a.outgoing("sync", t)
        b.outgoing("sync", t)
    assert not a.received("sync", late, 0.145)  # stale, but its nonce is the one to echo
    fresh = []
    for t in (0.15, 0.16, 0.17):
        fresh.append(b.received("sync", a.outgoing("sync", t), t))
        fresh.append(a.received("sync", b.outgoing("sync", t + 0.001), t + 0.001))
    assert fresh[2:] == [True] * 4, fresh


def test_our_own_stall_is_not_the_peers_silence():
    """a's process did not run for 200 ms (sent nothing): b's answer to a's last heartbeat, read after
    the stall, proves b lives; it echoes a's latest nonce, which a replay cannot."""
    a, b = pair()
    exchange(a, b, 0.0, 0.1)
    b.received("sync", a.outgoing("sync", 0.1), 0.1)
    answer = b.outgoing("sync", 0.105)
    assert a.received("sync", answer, 0.3)
    assert a.silent_for(0.3) == 0.0


def test_a_stall_both_processes_share_is_no_silence_and_a_death_after_it_is_found_at_dead_after_of_our_time():
    """Both processes stopped 300 ms at once (one machine stalled): when they run again a heard nothing
    for 300 ms, but was not there to hear; b's first heartbeat after it (answering a's nonce from before the
    stall) is life. If b does not come back, a's verdict comes dead_after of a's own running time later."""
    a, b = pair()
    t = exchange(a, b, 0.0, 0.1)          # last exchange at 0.09
    a.take_facts()
    a.own_stall(t, t + 0.3)               # a woke 300 ms late
    now = t + 0.3
    a.tick(now)
    assert [f.kind for f in a.take_facts()] == [] and a.paths["sync"].up
    assert a.silent_for(now) == pytest.approx(now - 0.09 - 0.3)
    assert a.received("sync", b.outgoing("sync", now), now + 0.001)  # b's first after its own stall
    # the same stall, then b dead: silent at dead_after of a's running time after the stall
    a2, b2 = pair()
    t = exchange(a2, b2, 0.0, 0.1)
    a2.take_facts()
    a2.own_stall(t, t + 0.3)
    a2.tick(t + 0.3 + DEAD - 0.011)
    assert "silent" not in [f.kind for f in a2.take_facts()]
    a2.tick(t + 0.3 + DEAD)
    assert "silent" in [f.kind for f in a2.take_facts()]
    assert a2.next_deadline(t + 0.3) >= t + 0.3


def test_without_a_stall_of_ours_the_silence_is_the_peers():
    a, b = pair()
    t = exchange(a, b, 0.0, 0.1)
    a.take_facts()
    a.own_stall(t + 0.01, t + 0.01)        # zero length: nothing excused
    a.tick(t - HB + DEAD)
    assert "silent" in [f.kind for f in a.take_facts()]


def test_reflection_of_own_heartbeat_and_crossing_paths_are_rejected():
    a, b = pair()
    exchange(a, b, 0.0, 0.05)
    own = a.outgoing("sync", 0.05)
    assert not a.received("sync", own, 0.05)                   # a's own datagram bounced back
    theirs = b.outgoing("sync", 0.05)
    assert not a.received("service", theirs, 0.05)             # the sync path's datagram on the service path
    forged = bytearray(b.outgoing("service", 0.05))
    forged[30] ^= 1
    assert not a.received("service", bytes(forged), 0.05)      # one bit changed
    assert not a.received("service", b"x" * SIZE, 0.05) and not a.received("service", b"short", 0.05)
    assert a.paths["sync"].rejected == 1 and a.paths["service"].rejected == 4


@pytest.mark.parametrize("mistake", ["key", "mode"])
def test_another_key_or_mode_is_unauthenticated_evidence_never_life(mistake):
    a, b = pair(key_b=b"another secret of enough bytes!!" if mistake == "key" else KEY,
                mode_b="stateful" if mistake == "mode" else "stateless")
    exchange(a, b, 0.0, 0.3)
    facts = kinds(a)
    assert a.paths["sync"].received == 0 and a.paths["service"].received == 0
    assert ("unauthenticated", "sync") in facts or ("unauthenticated", "service") in facts
    assert ("silent", None) in facts  # silent it is; the detector weighs the evidence


def test_a_spoofed_unauthenticated_heartbeat_without_our_nonce_is_no_evidence():
    a, _ = pair()
    stranger = HeartbeatMonitor(b"not the key, but long enough!!!", me="b", peer="a", mode="stateless",
                                heartbeat=HB, dead_after=DEAD, now=0.0)
    for k in range(50):  # names b, comes "from b's address", never saw a's nonces
        a.outgoing("service", k * HB)
        a.received("service", stranger.outgoing("service", k * HB), k * HB)
    assert a.paths["service"].unauthenticated == 0
    assert "unauthenticated" not in [f.kind for f in a.take_facts()]


def test_a_restarted_peer_is_heard_again_although_its_sequence_starts_over():
    a, b = pair()
    exchange(a, b, 0.0, 0.2)
    a.tick(0.3)
    a.take_facts()
    b2 = HeartbeatMonitor(KEY, me="b", peer="a", mode="stateless", heartbeat=HB, dead_after=DEAD, now=0.5)
    exchange(a, b2, 0.5, 0.6)
    kinds = [f.kind for f in a.take_facts()]
    assert kinds.count("heard") == 1 and a.paths["sync"].up
    # a new process, said once per path, before the life it brings (the roles forget the old hello first)
    assert kinds.count("restarted") == 2 and kinds.index("restarted") < kinds.index("heard")
    exchange(a, b2, 0.6, 0.7)
    assert "restarted" not in [f.kind for f in a.take_facts()]


def test_a_peer_restarted_within_dead_after_is_heard_at_once_and_a_replay_is_no_life():
    """The path is still up when the new process's first heartbeats (seq from 1) arrive: the first that
    echoes a nonce newer than the old process's last echo is the peer's; a replay of the old process's
    datagrams still changes nothing."""
    a, b = pair()
    recorded = []
    t = 0.0
    while t < 0.2:  # as exchange(), keeping what b sent
        for path in ("sync", "service"):
            da, db = a.outgoing(path, t), b.outgoing(path, t)
            b.received(path, da, t)
            recorded.append((path, db))
            a.received(path, db, t)
        t = round(t + HB, 6)
    a.take_facts()
    old_seq = a.paths["sync"].old_seq
    b2 = HeartbeatMonitor(KEY, me="b", peer="a", mode="stateless", heartbeat=HB, dead_after=DEAD, now=0.21)
    for path in ("sync", "service"):  # b2's first: echoes nothing of a's yet
        a.received(path, b2.outgoing(path, 0.21), 0.21)
    for path in ("sync", "service"):
        b2.received(path, a.outgoing(path, 0.215), 0.215)
    assert a.paths["sync"].up  # 15 ms < dead_after: the path never went down
    assert a.received("sync", b2.outgoing("sync", 0.22), 0.22)  # b2's, echoing a's nonce of 0.215
    assert a.paths["sync"].peer_seq == b2._seq  # the new process's sequence
    assert "restarted" in [f.kind for f in a.take_facts()]
    for path, data in recorded[:6] + recorded[-6:]:  # the old process's datagrams, replayed: no life
        assert not a.received(path, data, 0.225)
    assert a.paths["sync"].old_seq > old_seq
    assert "restarted" not in [f.kind for f in a.take_facts()]  # a replay is no new process either
    # after the replay (which may have changed the nonce a echoes), b2 and a hear each other again
    for t in (0.23, 0.24, 0.25):
        b2.received("sync", a.outgoing("sync", t), t)
        a.received("sync", b2.outgoing("sync", t + 0.001), t + 0.002)
    assert b2.paths["sync"].up and a.paths["sync"].heard_at == 0.252


def test_gaps_and_jitter_are_measured_per_path():
    a, b = pair()
    exchange(a, b, 0.0, 0.5)
    st = a.stats(0.5)
    assert st["sync"]["gap_ms"]["p50"] == pytest.approx(10.0, abs=0.01)
    assert st["sync"]["jitter_ms"]["max"] == pytest.approx(0.0, abs=0.01)
    assert percentiles([1.0, 2.0, 3.0, 100.0]) == {"p50": 2.0, "p99": 100.0, "max": 100.0, "count": 4}


def test_constructor_checks():
    with pytest.raises(ValueError):
        HeartbeatMonitor(KEY, me="a", peer="b", mode="stateless", heartbeat=0.05, dead_after=0.04, now=0)


def test_check_warns_when_dead_after_is_tight_for_the_gaps_the_node_measured(tmp_path):
    import json

    from proxy.preflight import jitter_warnings
    from sync.heartbeat import jitter_warning

    calm = {"paths": {"sync": {"max_gap_ever_ms": 14.0}, "service": {"max_gap_ever_ms": 12.0}}}
    assert jitter_warning(0.04, calm) is None
    rough = {"at": "2026-11-27T22:00:00", "paths": {"sync": {"max_gap_ever_ms": 36.0, "gap_ms": {"p99": 11.0}},
                                                    "service": {"max_gap_ever_ms": 33.0}}}
    warning = jitter_warning(0.04, rough)
    assert warning.startswith("pair.dead_after: 40ms is tight") and "36.0 ms on the sync path" in warning
    assert "at least 48ms" in warning
    (tmp_path / "heartbeat-jitter.json").write_text(json.dumps(rough))
    values = {"node.state_dir": tmp_path, "pair.dead_after": 0.04}
    assert jitter_warnings(values) == [warning]
    assert jitter_warnings({"node.state_dir": tmp_path / "never-ran", "pair.dead_after": 0.04}) == []
