"""The fuzz harness of bench/fuzz_protocols.py, short: a couple of seconds of mutated real captures
per target (frames + TcpTracker, SMB2, RPC/NFS, pcap/pcapng reader); no input may raise out."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "fuzz_protocols", Path(__file__).resolve().parent.parent / "bench" / "fuzz_protocols.py")
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)
fuzz._load()


@pytest.mark.parametrize("target", sorted(fuzz.TARGETS))
def test_short_fuzz_run_raises_nothing(target):
    result = fuzz.run_mutate(target, runs=10_000_000, seed=7, seconds=2.0)
    assert result["runs"] >= 200, result
    assert result["crashes"] == 0, result["crash_examples"]


def test_the_harness_sees_a_crash():
    """A target that raises on some inputs is reported, so a clean run above means something."""
    fuzz.TARGETS["_boom"] = lambda data: 1 // (len(data) % 7)
    try:
        fn_seeds = fuzz.seeds
        fuzz.seeds = lambda target: [b"x" * 7, b"y" * 8]
        result = fuzz.run_mutate("_boom", runs=300, seed=1)
    finally:
        del fuzz.TARGETS["_boom"]
        fuzz.seeds = fn_seeds
    assert result["crashes"] > 0 and "ZeroDivisionError" in result["crash_examples"][0]["error"]
