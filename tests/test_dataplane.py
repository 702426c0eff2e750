"""The data path's pure parts: where ports go, the ``secure`` key, source-port pools, the
descriptor budget and the pipe pool (unit tests; the lab tests are in test_dataplane_lab.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import ConfigError, load_config, service_to_dict, services_from_dicts

BASE = """
[node]
name = "a"
interface = "eth0"
address = "10.0.0.1/24"
state_dir = "/var/lib/pairproxy/a"
control = "/run/pairproxy/a.sock"

[[service]]
name = "smb"
protocol = "smb"
port = 4450
backend = "10.0.2.10:445"
extra_ports = [4451]
"""


def load(tmp_path: Path, text: str):
    path = tmp_path / "node.toml"
    path.write_text(text)
    return load_config(path)


def test_backend_port_main_and_extra(tmp_path):
    smb, = load(tmp_path, BASE).services
    assert smb.backend_port(4450) == 445      # the main port goes where backend says
    assert smb.backend_port(4451) == 4451     # extra ports keep their numbers
