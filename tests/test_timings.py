"""proxy.timings: the derived timings keep the proportions the pair relies on, for any valid config."""

import pytest

from proxy.config import PairConfig
from proxy.timings import PairTimings


@pytest.mark.parametrize("heartbeat, dead_after", [(0.02, 0.1), (0.01, 0.04), (0.5, 3.0), (0.005, 0.01)])
def test_proportions(heartbeat, dead_after):
    t = PairTimings.from_config(PairConfig(heartbeat=heartbeat, dead_after=dead_after))
    # a stopped node falls silent long after a loop stall the heartbeats ride out; never before a verdict
    assert t.loop_stall_limit >= 3.0 and t.loop_stall_limit >= 10 * dead_after
    # the link never drops a connection before the detector could judge its silence, nor for a short stall
    assert t.link_idle_timeout > dead_after and t.link_idle_timeout >= 0.5
    assert t.link_heartbeat >= heartbeat and t.link_heartbeat < t.link_idle_timeout / 4
    # a stuck observer costs a takeover no more than one dead_after; a prepared plan is younger
    assert t.observer_timeout <= dead_after and t.prepared_takeover_max_age <= dead_after
    assert 0 < t.takeover_retry_first < t.takeover_retry_max
