"""The lab's node configs are data written as TOML (deploy/lab/nodeconfigs.py): the writer round-trips
through tomllib, and every lab config is one the node accepts, with the timings it was given."""

from __future__ import annotations

import math
import sys
import tomllib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deploy.lab import Lab, PairTimings
from deploy.lab.nodeconfigs import to_toml
from proxy.config import load_config, parse_config

keys = st.text(min_size=1, max_size=12)
scalars = (st.text(max_size=20) | st.integers(-2**63, 2**63 - 1) | st.booleans()
           | st.floats(allow_nan=False))
values = scalars | st.lists(scalars, max_size=4)


def tables(depth: int):
    leaf = st.dictionaries(keys, values, max_size=5)
    if depth == 0:
        return leaf
    inner = tables(depth - 1)
    return st.dictionaries(keys, values | inner | st.lists(inner, min_size=1, max_size=3), max_size=5)


@given(tables(2))
def test_to_toml_round_trips(doc):
    assert tomllib.loads(to_toml(doc)) == doc


def test_strings_that_need_escaping_survive():
    doc = {"odd key.with dots": {"s": 'quote " backslash \\ tab \t newline \n del \x7f nul \x00 é ✓'}}
    assert tomllib.loads(to_toml(doc)) == doc


def test_special_floats():
    back = tomllib.loads(to_toml({"x": math.inf, "y": -math.inf, "z": 0.1}))
    assert back == {"x": math.inf, "y": -math.inf, "z": 0.1}


def test_unwritable_value_names_its_key():
    with pytest.raises(TypeError, match=r"pair\.dead_after"):
        to_toml({"pair": {"dead_after": None}})


@pytest.mark.parametrize("node", ["a", "b"])
@pytest.mark.parametrize("pair,mode", [(False, "stateless"), (True, "stateless"), (True, "stateful")])
def test_every_lab_config_is_valid(tmp_path, node, pair, mode):
    lab = Lab("q7u", root=tmp_path)
    config = parse_config(lab.node_config(node, pair=pair, mode=mode))
    assert config.node.name == node
    assert str(config.node.address) == (f"{lab.addresses.service_a}/24" if node == "a"
                                        else f"{lab.addresses.service_b}/24")
    assert [s.name for s in config.services] == ["smb", "nfs"]
    if pair:
        assert config.pair.mode == mode and config.peer.name == ("b" if node == "a" else "a")
        assert (config.pair.heartbeat, config.pair.dead_after) == (0.02, 0.1)
    else:
        assert config.peer is None and config.pair is None


def test_timings_are_values_in_the_written_config(tmp_path):
    lab = Lab("q7u", root=tmp_path)
    path = lab.write_node_config(tmp_path / "copy" / "a.toml", "a", pair=True, mode="stateful",
                                 timings=PairTimings.from_ms(12.5, 60))
    config = load_config(path)
    assert (config.pair.mode, config.pair.heartbeat, config.pair.dead_after) == ("stateful", 0.0125, 0.06)
    # the copy shares the state directory of the lab's own stateful config of node a
    assert config.node.state_dir == tmp_path / "stateful-node-a"
    assert config.peer.key_file == lab.pair_key_path and lab.pair_key_path.exists()


def test_milliseconds_never_in_exponent_form():
    assert PairTimings.from_ms(1e6, 2e6) == PairTimings("1000000ms", "2000000ms")
    with pytest.raises(ValueError):
        PairTimings.from_ms(0, 100)


def test_benchmark_timings_reach_the_configs_as_values(tmp_path, monkeypatch):
    """bench/driver.py's Bench.pair_configs: the lab's own files for the lab's timings, copies holding
    exactly the asked-for values otherwise (no text rewriting of the lab's TOML)."""
    import importlib.util
    import shutil
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "driver.py"
    spec = importlib.util.spec_from_file_location("bench_driver", path)
    driver = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_driver", driver)  # dataclasses look their module up
    spec.loader.exec_module(driver)
    bench = driver.Bench("unit", prefix="q7u", root=str(tmp_path / "lab"), workdir=str(tmp_path))
    try:
        own = bench.pair_configs("stateless", PairTimings())
        assert own == {n: bench.lab.node_config_path(n, pair=True) for n in ("a", "b")}
        copies = bench.pair_configs("stateful", PairTimings.from_ms(25, 75))
        for node, cfg in copies.items():
            assert cfg.parent.parent == bench.work
            config = load_config(cfg)
            assert (config.node.name, config.pair.mode) == (node, "stateful")
            assert (config.pair.heartbeat, config.pair.dead_after) == (0.025, 0.075)
    finally:
        shutil.rmtree(bench.work, ignore_errors=True)
