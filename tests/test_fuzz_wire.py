"""A short run of bench/fuzz_wire.py's harness (the long one is recorded in bench/FUZZ-WIRE.json)."""

import importlib.util
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st

_spec = importlib.util.spec_from_file_location("fuzz_wire", Path(__file__).parent.parent / "bench" / "fuzz_wire.py")
fuzz_wire = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz_wire)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_receive_data_survives_anything_and_keeps_its_invariants(data):
    fuzz_wire.check_input(data)  # raises on an exception or a broken invariant


def test_random_engine_short_run():
    tally = fuzz_wire.Tally(20_000, "random")
    fuzz_wire.run_random(tally, 20_000, seed=7)
    result = tally.result()
    assert result["inputs"] == 20_000
    assert result["uncaught_exceptions"] == 0 and result["invariant_violations"] == 0, result["failures"]


def test_the_harness_catches_the_one_segment_killer(monkeypatch):
    """Without the fix of issue 8.1 the harness reports it (so a passing run means something)."""
    real = fuzz_wire.SyncSession.receive_data

    def old_receive_data(self, data):  # as before the fix: Ready and the broken Rejected together
        events = real(self, data)
        if self.broken and self.peer_nonce is not None and len(data) >= 24 and not self.counters["messages_in"]:
            return [fuzz_wire.Ready(), *events]
        return events

    monkeypatch.setattr(fuzz_wire.SyncSession, "receive_data", old_receive_data)
    killer = bytes([1, 0]) + b"\xff\xff\xff\xff"  # kind 1: preamble, then an impossible length
    try:
        fuzz_wire.check_input(killer)
    except fuzz_wire.Violation as exc:
        assert "broke the session" in str(exc)
    else:
        raise AssertionError("the harness missed a Ready handed out with a broken Rejected")
