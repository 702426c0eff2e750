"""``check`` then ``run`` in a node's namespace of the lab: what check refuses, run refuses with the
same line (before any kernel change); what check only warns about, run survives."""

from __future__ import annotations

import pytest

from .test_node_lab import has_address
from .test_node_lifecycle import run_cli

pytestmark = pytest.mark.lab


def variant(lab, tmp_path, old: str, new: str) -> str:
    text = lab.node_config_path("b", pair=True).read_text()
    assert old in text
    path = tmp_path / "b.toml"
    path.write_text(text.replace(old, new))
    return str(path)


@pytest.mark.parametrize("old, new, expected", [
    ('listen = "{sync_b}:7400"', 'listen = "10.77.9.9:7400"', "peer.listen: 10.77.9.9 is not an address of this host"),
    ('link = "{sync_a}:7400"\nlisten = "{sync_b}:7400"', 'link = "{sync_b}:7400"\nlisten = "{sync_a}:7400"',
     "peer.link: {sync_b} is an address of this host; link is the peer's sync endpoint (swapped with peer.listen?)"),
    ('state_dir = "', 'state_dir = "/proc/pairproxy', "node.state_dir: cannot create or write /proc/pairproxy"),
])
def test_what_check_refuses_run_refuses_with_the_same_line(lab, tmp_path, old, new, expected):
    addresses = {"sync_a": lab.addresses.sync_a, "sync_b": lab.addresses.sync_b}
    old, new, expected = (s.format(**addresses) for s in (old, new, expected))
    path = variant(lab, tmp_path, old, new)
    lines = {}
    for command in ("check", "run"):
        cp = run_cli(lab, lab.ns_b, command, "-c", path)
        assert cp.returncode == 1, (command, cp.stderr)
        lines[command] = [line for line in cp.stderr.splitlines() if "warning" not in line]
        assert any(expected in line for line in lines[command]), (command, cp.stderr)
        assert "Traceback" not in cp.stderr
    assert [line for line in lines["check"] if "cannot run" not in line] == lines["run"]
    assert not has_address(lab, lab.ns_b, lab.addresses.service_b)


def test_a_backend_port_nobody_listens_on_is_a_warning_and_run_starts(lab, tmp_path):
    path = variant(lab, tmp_path, f'backend = "{lab.addresses.server}:445"', f'backend = "{lab.addresses.server}:4450"')
    cp = run_cli(lab, lab.ns_b, "check", "-c", path)
    assert cp.returncode == 0, cp.stderr
    assert f"pairproxy: warning: service[0].backend: backend {lab.addresses.server}:4450 does not answer " \
           "(Connection refused)" in cp.stderr
    assert "service[1]" not in cp.stderr, "the other backend ports answer"
