"""The documented host install (deploy/install-host.sh) and the systemd unit it installs: every path
the unit names exists afterwards, systemd accepts the unit, and the unit, the example configs and
``check`` agree on directories and capabilities. The install goes below a temporary root
(PAIRPROXY_ROOT), so the test changes nothing on the machine."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from proxy.config import load_config
from proxy.preflight import CAP_NAMES

REPO = Path(__file__).parent.parent
UNIT = REPO / "deploy" / "systemd" / "pairproxy@.service"


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


@pytest.fixture
def host_root(host_install):
    return host_install


def test_every_path_the_unit_names_exists_after_the_host_install(host_root):
    settings = unit_settings()
    commands = settings["ExecStartPre"] + settings["ExecStart"] + settings["ExecStopPost"]
    assert {c.split()[0] for c in commands} == {"/usr/local/bin/pairproxy"}
    binary = host_root / "usr/local/bin/pairproxy"
    assert os.access(binary, os.X_OK) and binary.resolve().is_relative_to(host_root / "opt/pairproxy")
    cp = subprocess.run([str(binary), "check", "--help"], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0 and "-c FILE" in cp.stdout
    [doc] = settings["Documentation"]
    assert doc.startswith("file:///") and (host_root / doc[len("file:///"):]).is_file()
    etc = host_root / "etc/pairproxy"
    assert stat.S_IMODE(etc.stat().st_mode) == 0o700  # the README's key command writes here
    assert all(c.split("-c ")[1] == "/etc/pairproxy/%i.toml" for c in commands)
    assert (host_root / "etc/systemd/system/pairproxy@.service").read_text() == UNIT.read_text()
    for example in ("example-a.toml", "example-b.toml"):
        assert (host_root / "usr/share/doc/pairproxy" / example).is_file()


def test_systemd_accepts_the_unit(host_root, tmp_path):
    """``systemd-analyze verify`` with the unit's binary at the installed (temporary) place: no unknown
    keys, bad values or missing executables."""
    unit = tmp_path / "pairproxy@a.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/pairproxy", str(host_root / "usr/local/bin/pairproxy")))
    cp = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0 and cp.stderr.strip() == "" and cp.stdout.strip() == "", cp.stderr


def test_a_second_install_is_quick_and_changes_nothing(host_root):
    venv = host_root / "opt/pairproxy"
    before = (venv / ".pairproxy-source").stat().st_mtime_ns
    started = time.monotonic()
    cp = subprocess.run(["bash", str(REPO / "deploy" / "install-host.sh")], capture_output=True, text=True,
                        env={**os.environ, "PAIRPROXY_ROOT": str(host_root)}, timeout=120)
    assert cp.returncode == 0, cp.stderr
    assert time.monotonic() - started < 5 and "installing pairproxy" not in cp.stdout
    assert (venv / ".pairproxy-source").stat().st_mtime_ns == before


def test_unit_examples_and_check_agree_on_directories_and_capabilities():
    settings = unit_settings()
    assert settings["User"] == ["pairproxy"] and settings["NoNewPrivileges"] == ["yes"]
    assert settings["ProtectSystem"] == ["strict"]
    caps = set(settings["AmbientCapabilities"][0].split())
    assert caps == set(settings["CapabilityBoundingSet"][0].split()) == set(CAP_NAMES.values())
    assert settings["StateDirectory"] == ["pairproxy/%i"] and settings["RuntimeDirectory"] == ["pairproxy"]
    assert int(settings["LimitNOFILE"][0]) >= 65536
    for name in ("a", "b"):
        config = load_config(REPO / "deploy" / f"example-{name}.toml")
        # the only writable places under ProtectSystem=strict
        assert config.node.state_dir == Path("/var/lib/pairproxy") / name
        assert config.node.control.parent == Path("/run/pairproxy")
