"""sync.detector: the pure failure detector, and its trio driver under MockClock."""

import pytest
import trio
from trio.testing import MockClock

from sync.detector import (TRANSITIONS, FailureDetector, PeerAlive, PeerDead, StartProbe, watch)

DEAD_AFTER = 0.1


@pytest.fixture
def autojump_clock():
    return MockClock(autojump_threshold=0)


# -- the pure machine ------------------------------------------------------------------------

def run_script(script):
    """Feed ("hb"|"tick"|"answered"|"silent", now) steps; return [(state, actions)] after each."""
    d = FailureDetector(DEAD_AFTER)
    out, probe = [], None
    for step, now in script:
        if step == "hb":
            actions = d.heartbeat(now)
        elif step == "tick":
            actions = d.tick(now)
        elif step == "answered":
            actions = d.probe_answered(now, probe)
        elif step == "silent":
            actions = d.probe_silent(now, probe)
        elif step == "unauth":
            actions = d.probe_unauthenticated(now, probe)
        elif step == "refused":
            actions = d.peer_refused(now, "authentication failed")
        for a in actions:
            if isinstance(a, StartProbe):
                probe = a.probe_id
        out.append((d.state, actions))
    return out


CASES = {
    "first heartbeat": ([("hb", 0.0)], ["alive"]),
    "heartbeats keep it alive": ([("hb", 0.0), ("tick", 0.05), ("hb", 0.08), ("tick", 0.15)], [..., ..., ..., "alive"]),
    "silence below dead_after is nothing": ([("hb", 0.0), ("tick", 0.099)], ["alive", "alive"]),
    "silence starts a probe": ([("hb", 0.0), ("tick", 0.1)], ["alive", ("suspect", [StartProbe(1)])]),
    "silent probe: dead": ([("hb", 0.0), ("tick", 0.1), ("silent", 0.12)],
                           [..., ..., ("dead", [PeerDead(pytest.approx(0.12))])]),
    "answered probe: link down, no takeover": ([("hb", 0.0), ("tick", 0.1), ("answered", 0.11)],
                                              [..., ..., ("link_down", [])]),
    "link down, heartbeats resume: alive": ([("hb", 0.0), ("tick", 0.1), ("answered", 0.11), ("hb", 0.2)],
                                            [..., ..., ..., ("alive", [PeerAlive()])]),
    "dead, heartbeats resume: alive": ([("hb", 0.0), ("tick", 0.1), ("silent", 0.11), ("hb", 0.5)],
                                       [..., ..., ..., ("alive", [PeerAlive()])]),
    "suspect, heartbeat: alive, nothing to undo": ([("hb", 0.0), ("tick", 0.1), ("hb", 0.105)],
                                                  [..., ..., ("alive", [])]),
    "link down keeps probing, then the peer dies": (
        [("hb", 0.0), ("tick", 0.1), ("answered", 0.11), ("tick", 0.12), ("tick", 0.16), ("silent", 0.17)],
        [..., ..., ..., ("link_down", []), ("link_down", [StartProbe(2)]), ("dead", [PeerDead(pytest.approx(0.17))])]),
    "no second probe while one is pending": ([("hb", 0.0), ("tick", 0.1), ("tick", 0.2)],
                                             [..., ("suspect", [StartProbe(1)]), ("suspect", [])]),
    "never heard the peer: silence from start": ([("tick", 0.0), ("tick", 0.1), ("silent", 0.11)],
                                                 [("unknown", []), ("suspect", [StartProbe(1)]), ("dead", [PeerDead(pytest.approx(0.11))])]),
    "dead stays dead without heartbeats": ([("hb", 0.0), ("tick", 0.1), ("silent", 0.11), ("tick", 1.0)],
                                           [..., ..., ..., ("dead", [])]),
    # issue 9.1: a peer that answers but cannot be authenticated is alive
    "unauthenticated probe answer: misconfigured, no takeover": (
        [("hb", 0.0), ("tick", 0.1), ("unauth", 0.11)], [..., ..., ("misconfigured", [])]),
    "never paired, peer answers with another key: misconfigured": (
        [("tick", 0.0), ("tick", 0.1), ("unauth", 0.11), ("tick", 0.2), ("unauth", 0.21)],
        [("unknown", []), ("suspect", [StartProbe(1)]), ("misconfigured", []), ("misconfigured", [StartProbe(2)]),
         ("misconfigured", [])]),
    "link refusal and a silent probe: misconfigured (the link proves the process)": (
        [("refused", 0.0), ("tick", 0.1), ("silent", 0.11)], [..., ("suspect", [StartProbe(1)]), ("misconfigured", [])]),
    "link refusal and an answered probe (mode mismatch, same key): misconfigured": (
        [("refused", 0.0), ("tick", 0.1), ("answered", 0.11)], [..., ..., ("misconfigured", [])]),
    "a refusal older than refusal_valid_for proves nothing": (
        [("refused", 0.0), ("hb", 5.0), ("tick", 5.2), ("silent", 5.21)],
        [..., ..., ..., ("dead", [PeerDead(pytest.approx(0.21))])]),
    "a refusal before the link came up says nothing about a later silence": (
        [("refused", 0.0), ("hb", 0.5), ("tick", 0.65), ("silent", 0.66)],
        [..., ..., ..., ("dead", [PeerDead(pytest.approx(0.16))])]),
    "misconfigured, the peer dies (no answers, no refusals): dead": (
        [("hb", 0.0), ("tick", 0.1), ("unauth", 0.11), ("tick", 0.2), ("silent", 0.21)],
        [..., ..., "misconfigured", ("misconfigured", [StartProbe(2)]), ("dead", [PeerDead(pytest.approx(0.21))])]),
    "misconfigured, the peer answers with the key again: link down": (
        [("hb", 0.0), ("tick", 0.1), ("unauth", 0.11), ("tick", 0.2), ("answered", 0.21)],
        [..., ..., ..., ..., ("link_down", [])]),
    "misconfigured, fixed and heartbeats: alive": (
        [("hb", 0.0), ("tick", 0.1), ("unauth", 0.11), ("hb", 0.5)], [..., ..., ..., ("alive", [PeerAlive()])]),
    "dead, the peer comes back refusing: misconfigured, nothing undone or redone": (
        [("hb", 0.0), ("tick", 0.1), ("silent", 0.11), ("refused", 0.5), ("tick", 0.6), ("silent", 0.61),
         ("hb", 1.0)],
        [..., ..., "dead", ("misconfigured", []), ("misconfigured", [StartProbe(2)]), ("misconfigured", []),
         ("alive", [PeerAlive()])]),
    "dead, back, refusing, then gone again: no second PeerDead": (
        [("hb", 0.0), ("tick", 0.1), ("silent", 0.11), ("refused", 0.5), ("tick", 5.0), ("silent", 5.01)],
        [..., ..., "dead", "misconfigured", ..., ("dead", [])]),
}


@pytest.mark.parametrize("name", CASES)
def test_machine(name):
    script, expected = CASES[name]
    got = run_script(script)
    for (state, actions), want in zip(got, expected):
        if want is ...:
            continue
        if isinstance(want, str):
            assert state == want, name
        else:
            assert (state, actions) == want, name


def test_stale_probe_result_is_ignored():
    """A probe asked for before the last heartbeat cannot judge the silence after it."""
    d = FailureDetector(DEAD_AFTER)
    d.heartbeat(0.0)
    [old] = d.tick(0.1)
    d.heartbeat(0.12)
    [new] = d.tick(0.22)
    assert new.probe_id != old.probe_id
    assert d.probe_silent(0.23, old.probe_id) == [] and d.state == "suspect"
    assert d.probe_silent(0.23, new.probe_id) == [PeerDead(pytest.approx(0.11))]


def test_probe_result_while_alive_is_ignored():
    d = FailureDetector(DEAD_AFTER)
    d.heartbeat(0.0)
    [p] = d.tick(0.1)
    d.heartbeat(0.11)
    assert d.probe_silent(0.12, p.probe_id) == [] and d.state == "alive"


def test_peer_dead_never_before_dead_after():
    d = FailureDetector(DEAD_AFTER)
    d.heartbeat(0.0)
    for i in range(100):
        now = i / 1000
        for a in d.tick(now):
            d.probe_silent(now, a.probe_id)  # an instant "no answer"
        assert d.state != "dead"
    assert d.tick(0.1) == [StartProbe(1)]


def test_table_only_names_known_states():
    states = {"unknown", "alive", "suspect", "link_down", "misconfigured", "dead"}
    for (state, _), new in TRANSITIONS.items():
        assert state in states and new in states
    # only a heartbeat brings "dead" back to life: a returning peer must come back over the sync link;
    # "misconfigured" only says why it cannot (no action, no PeerAlive)
    assert {event for (state, event) in TRANSITIONS if state == "dead"} == {"heartbeat", "misconfigured"}
    assert TRANSITIONS[("dead", "misconfigured")] == "misconfigured"
    # nothing but a silent probe leads to "dead", and "misconfigured" never does without one
    assert {event for (_, event), new in TRANSITIONS.items() if new == "dead"} == {"probe_silent"}


def test_misconfigured_is_logged_loudly_once_with_what_to_change(caplog):
    d = FailureDetector(DEAD_AFTER)
    d.heartbeat(0.0)
    for i in range(1, 20):
        for a in d.tick(i * 0.1):
            d.probe_unauthenticated(i * 0.1 + 0.01, a.probe_id)
    assert d.state == "misconfigured"
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1
    assert "key_file" in errors[0].getMessage() and "not taking over" in errors[0].getMessage()
    st = d.stats()
    assert st["state"] == "misconfigured" and "key_file" in st["misconfigured"]
    assert st["probes"]["unauthenticated"] >= 10 and st["probes"]["silent"] == 0


# -- the async driver under MockClock --------------------------------------------------------

class Peer:
    """A fake peer: sends heartbeats (sets ``last``) while ``beating``; answers probes while ``on_lan``."""

    def __init__(self):
        self.last = None
        self.beating = True
        self.on_lan = True
        self.probes = 0

    async def beat(self, every=0.02):
        while True:
            if self.beating:
                self.last = trio.current_time()
            await trio.sleep(every)

    async def probe(self):
        self.probes += 1
        await trio.sleep(0.005)  # the ARP round trip
        if not self.on_lan:
            await trio.sleep_forever()  # no reply: the driver's timeout decides
        return True


async def run_scenario(script):
    """Run watch() against a Peer; ``script(peer, actions)`` drives the peer, then all is cancelled."""
    peer, actions = Peer(), []
    detector = FailureDetector(DEAD_AFTER)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.beat)
        nursery.start_soon(lambda: watch(detector, peer.probe, lambda a: actions.append((trio.current_time(), a)),
                                         heard=lambda: peer.last))
        await script(peer, detector, actions)
        nursery.cancel_scope.cancel()
    return peer, detector, actions


async def test_peer_dies(autojump_clock):
    async def script(peer, detector, actions):
        await trio.sleep(0.5)
        assert detector.state == "alive" and actions == []
        peer.beating = peer.on_lan = False
        died = trio.current_time()
        await trio.sleep(0.5)
        [(t, dead)] = [(t, a) for t, a in actions if isinstance(a, PeerDead)]
        assert detector.state == "dead"
        assert t - died >= DEAD_AFTER  # never before dead_after
        assert t - died <= DEAD_AFTER + 0.02 + 0.05 + 0.01  # beat period + probe timeout + ticks
        assert dead.silent_for >= DEAD_AFTER
        starts = [t0 for t0, a in actions if isinstance(a, StartProbe)]
        assert starts and starts[0] - died >= DEAD_AFTER - 0.02

    await run_scenario(script)


async def test_link_silent_but_peer_answers_probe(autojump_clock):
    async def script(peer, detector, actions):
        await trio.sleep(0.2)
        peer.beating = False  # sync link cut; the peer still serves on the LAN
        await trio.sleep(1.0)
        assert detector.state == "link_down"
        assert not any(isinstance(a, PeerDead) for _, a in actions)
        assert peer.probes >= 10  # it keeps probing every dead_after/2
        peer.beating = True
        await trio.sleep(0.05)
        assert detector.state == "alive"
        assert isinstance(actions[-1][1], PeerAlive)

    await run_scenario(script)


async def test_heartbeats_resume_after_dead(autojump_clock):
    async def script(peer, detector, actions):
        await trio.sleep(0.1)
        peer.beating = peer.on_lan = False
        await trio.sleep(0.5)
        assert detector.state == "dead"
        peer.beating = peer.on_lan = True
        await trio.sleep(0.05)
        assert detector.state == "alive"
        kinds = [type(a) for _, a in actions if not isinstance(a, StartProbe)]
        assert kinds == [PeerDead, PeerAlive]

    await run_scenario(script)


async def test_failing_probe_counts_as_silent(autojump_clock):
    actions = []

    async def broken_probe():
        raise OSError("no such device")

    detector = FailureDetector(DEAD_AFTER)
    with trio.move_on_after(0.3):
        await watch(detector, broken_probe, actions.append)
    assert detector.state == "dead"
    assert [type(a) for a in actions] == [StartProbe, PeerDead]


# -- probing before dead_after: the verdict comes at dead_after, not dead_after + a probe timeout --

def test_early_probe_silent_gives_the_verdict_at_dead_after():
    d = FailureDetector(DEAD_AFTER, probe_after=DEAD_AFTER / 2)
    d.heartbeat(0.0)
    assert d.tick(0.049) == []
    [p] = d.tick(0.05)
    assert d.state == "suspect"
    assert d.probe_silent(0.07, p.probe_id) == [] and d.state == "suspect"   # too early to judge
    assert d.tick(0.099) == []
    assert d.tick(0.1) == [PeerDead(pytest.approx(0.1))] and d.state == "dead"


def test_early_probe_answered_is_no_news_and_a_heartbeat_clears_an_early_silence():
    d = FailureDetector(DEAD_AFTER, probe_after=DEAD_AFTER / 2)
    d.heartbeat(0.0)
    [p] = d.tick(0.05)
    assert d.probe_answered(0.06, p.probe_id) == [] and d.state == "suspect"
    [p2] = d.tick(0.11)                       # probing goes on; judged after dead_after now
    assert d.probe_answered(0.12, p2.probe_id) == [] and d.state == "link_down"
    d2 = FailureDetector(DEAD_AFTER, probe_after=DEAD_AFTER / 2)
    d2.heartbeat(0.0)
    [p] = d2.tick(0.05)
    d2.probe_silent(0.06, p.probe_id)
    d2.heartbeat(0.07)                        # it was only late
    assert d2.tick(0.1) == [] and d2.state == "alive"
    assert d2.tick(0.119) == [] and d2.state == "alive"


def test_probe_after_must_not_exceed_dead_after():
    with pytest.raises(ValueError):
        FailureDetector(DEAD_AFTER, probe_after=2 * DEAD_AFTER)


async def test_early_probing_detects_at_dead_after(autojump_clock):
    d = FailureDetector(DEAD_AFTER, probe_after=DEAD_AFTER / 2)
    d.heartbeat(trio.current_time())
    died = trio.current_time()
    verdicts = []

    async def probe():
        await trio.sleep(1)          # the dead peer never answers; the driver's timeout decides
        return True

    async with trio.open_nursery() as nursery:
        def on_action(action):
            if isinstance(action, PeerDead):
                verdicts.append(trio.current_time())
                nursery.cancel_scope.cancel()
        nursery.start_soon(lambda: watch(d, probe, on_action, probe_timeout=DEAD_AFTER / 2 - 0.01))
    assert DEAD_AFTER <= verdicts[0] - died < DEAD_AFTER + 0.01


class MisconfiguredPeer(Peer):
    """A peer whose process lives but uses another key: probes get "unauthenticated", and its link
    refuses us every ``refuse_every`` (as sync.link's reconnect backoff would) while ``refusing``."""

    def __init__(self):
        super().__init__()
        self.refusing = True
        self.refusal = None

    async def refuse(self, every=1.0):
        while True:
            if self.refusing:
                self.refusal = (trio.current_time(), "authentication failed")
            await trio.sleep(every)

    async def probe(self):
        self.probes += 1
        await trio.sleep(0.005)
        if not self.on_lan:
            await trio.sleep_forever()
        return "unauthenticated"


@pytest.mark.parametrize("witness", ["probe", "link", "both"])
async def test_misconfigured_peer_is_never_declared_dead_until_it_really_goes(autojump_clock, witness):
    peer, actions = MisconfiguredPeer(), []
    peer.beating = False
    peer.on_lan = witness in ("probe", "both")
    peer.refusing = witness in ("link", "both")
    detector = FailureDetector(DEAD_AFTER)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.refuse)
        nursery.start_soon(lambda: watch(detector, peer.probe, lambda a: actions.append((trio.current_time(), a)),
                                         heard=lambda: peer.last, refused=lambda: peer.refusal))
        await trio.sleep(30)  # half a minute of a misconfigured pair: nobody takes over
        assert detector.state == "misconfigured", detector.reason
        assert not any(isinstance(a, PeerDead) for _, a in actions)
        peer.on_lan = peer.refusing = False  # now it really dies
        gone = trio.current_time()
        await trio.sleep(detector.refusal_valid_for + 1)
        [t] = [t for t, a in actions if isinstance(a, PeerDead)]
        assert detector.state == "dead" and t - gone <= detector.refusal_valid_for + 0.2
        nursery.cancel_scope.cancel()
