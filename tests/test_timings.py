"""proxy.timings: the derived timings keep the proportions the pair relies on, for any valid config."""

import pytest

from proxy.config import PairConfig
from proxy.timings import PairTimings


@pytest.mark.parametrize("heartbeat, dead_after", [(0.02, 0.1), (0.01, 0.04), (0.5, 3.0), (0.005, 0.01)])
def test_proportions(heartbeat, dead_after):
    t = PairTimings.from_config(PairConfig(heartbeat=heartbeat, dead_after=dead_after))
    # a probe started when probing starts has reported before the silence reaches dead_after
    assert t.probe_after + t.probe_answer_within < dead_after
    assert t.probe_answer_within < t.probe_timeout <= t.probe_every
    # the link never drops a connection before the detector could judge its silence
    assert t.link_idle_timeout > dead_after
    assert t.detector_tick <= heartbeat / 4 and t.detector_tick <= 0.005
    # a stuck observer costs a takeover no more than one dead_after; a prepared plan is younger
    assert t.observer_timeout <= dead_after and t.prepared_takeover_max_age <= dead_after
    assert 0 < t.takeover_retry_first < t.takeover_retry_max
