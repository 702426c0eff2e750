"""A node installed as documented (deploy/install-host.sh) with exactly the systemd unit's privileges: a non-root user whose only capabilities are
CAP_NET_ADMIN, CAP_NET_RAW and CAP_NET_BIND_SERVICE (ambient, and nothing else in the bounding set),
with no_new_privs, as deploy/systemd/pairproxy@.service grants them. It takes over its peer's address
(macvlan with the peer's MAC, sysctls, gratuitous ARP, ports below 1024) and serves a client, and hands
the address back with a live move when the peer returns.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from deploy.lab.clients import NodeProcess, SmbHolder, serving, takeover_settled

from .test_instance_lab import CLIENT_CONNECT
from .test_pair_lab import standing_by

pytestmark = pytest.mark.lab

UNIT = Path(__file__).parent.parent / "deploy" / "systemd" / "pairproxy@.service"
NOBODY = 65534


def unit_capabilities() -> set[str]:
    """The capabilities the unit grants (AmbientCapabilities=), which must equal its bounding set."""
    lines = dict(line.split("=", 1) for line in UNIT.read_text().splitlines()
                 if line.startswith(("AmbientCapabilities=", "CapabilityBoundingSet=")))
    ambient = set(lines["AmbientCapabilities="[:-1]].split())
    assert ambient == set(lines["CapabilityBoundingSet="[:-1]].split())
    return ambient


class UnprivilegedNode(NodeProcess):
    """The binary of the documented host install (``/usr/local/bin/pairproxy`` below ``root``), run as
    user nobody with only the unit's capabilities (setpriv, as systemd does)."""

    def __init__(self, *args, root: Path, **kwargs):
        super().__init__(*args, **kwargs)
        self.root = root

    def _cli(self, *args: str) -> list[str]:
        caps = ",".join("+" + c.removeprefix("CAP_").lower() for c in sorted(unit_capabilities()))
        return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                f"--inh-caps=-all,{caps}", f"--ambient-caps=-all,{caps}", f"--bounding-set=-all,{caps}",
                "--no-new-privs", str(self.root / "usr/local/bin/pairproxy"), *args]


@pytest.fixture
def private_dir():
    path = Path(tempfile.mkdtemp(prefix="pairproxy-caps-", dir="/var/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def connections_to(status: dict, address: str) -> list[dict]:
    return [c for c in status.get("connections", []) if c["server"].startswith(address + ":")]


@pytest.mark.parametrize("mode", ["stateless", "stateful"])
def test_a_node_with_only_the_units_capabilities_takes_over_and_serves(lab, host_install, private_dir, tmp_path,
                                                                        mode):
    """Stateless: macvlan, sysctls, ARP, ports below 1024. Stateful adds the snooper (AF_PACKET with
    SO_RCVBUFFORCE, in the observer child, which gets the capabilities as ambient ones) and the
    continuation of the dead peer's client (TCP_REPAIR) or resets (raw IP)."""
    assert unit_capabilities() == {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_NET_BIND_SERVICE"}
    key = private_dir / "pair.key"
    shutil.copy(lab.pair_key_path, key)
    state = private_dir / "state"
    state.mkdir()
    for path in (key, state):
        os.chown(path, NOBODY, NOBODY)
    key.chmod(0o600)
    original = lab.node_config_path("b", pair=True, mode=mode)
    config = private_dir / "b.toml"
    text = original.read_text().replace(str(original.parent / f"{'pair' if mode == 'stateless' else mode}-node-b"),
                                        str(state))
    assert str(state) in text
    config.write_text(text.replace(str(lab.pair_key_path), str(key)))

    a = NodeProcess(lab, "a", pair=True, mode=mode, log=tmp_path / "a.log")
    b = UnprivilegedNode(lab, "b", config=config, log=tmp_path / "b.log", root=host_install)
    lab.run(lab.ns_a, ["ip", "link", "set", "eth0", "up"])
    holder = None
    if mode == "stateful":
        lab.flood(True)
    try:
        b.start()
        status = Path(f"/proc/{b.pid}/status").read_text()
        uid = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
        cap_eff = int(next(line for line in status.splitlines() if line.startswith("CapEff:")).split()[1], 16)
        assert uid == [str(NOBODY)] * 4
        assert cap_eff == (1 << 10) | (1 << 12) | (1 << 13), hex(cap_eff)  # bind_service, net_admin, net_raw
        a.start()
        b.wait_for(serving(lab.addresses.service_b, "b"), 10, "b serving its address")
        b.wait_for(standing_by, 10, "b standing by, link up")
        if mode == "stateful":
            b.wait_for(lambda s: s["pair"]["state_sync"]["observer"] == "running", 10, "observer running")
            a.wait_for(serving(lab.addresses.service_a, "a"), 10, "a serving")
            holder = SmbHolder(lab, lab.addresses.service_a, "caps-hold.bin")
            b.wait_for(lambda s: any(o["path"] == "caps-hold.bin" for c in connections_to(s, lab.addresses.service_a)
                                     for o in c["opens"]), 5, "b snooping a's client")

        a.kill_hard(link_down=True)
        st = b.wait_for(takeover_settled(lab.addresses.service_a, "b"), 5, "b holding a's address")
        if mode == "stateful":
            # the client's connection continued: TCP_REPAIR works with CAP_NET_ADMIN alone, and the same
            # session goes on writing through b
            t = st["pair"]["takeovers"][-1]
            assert t["connections_continued"] >= 1, t
            assert holder.do("write")["ok"]
        for address in (lab.addresses.service_a, lab.addresses.service_b):
            cp = lab.run(lab.ns_client, [sys.executable, "-c", CLIENT_CONNECT.replace("s.recv(100)", "b''"),
                                         address, "445"], capture_output=True, text=True)
            assert cp.returncode == 0, (address, cp.stderr)
        # a returns and asks for its address back: b moves it out live (the move lock's nftables rules
        # and NFLOG copies, TCP_REPAIR freezes) with the same capabilities
        a.link_up()
        since = time.time()
        a.start(timeout=60)
        a.wait_for(serving(lab.addresses.service_a, "a"), 20, "a serving its address again")
        st = b.wait_for(lambda s: (s["pair"].get("last_move") or {}).get("finished") and
                        s["pair"]["last_move"]["started_at"] >= since - 1, 10, "b's move out finished")
        move = st["pair"]["last_move"]
        assert move["direction"] == "out" and move["outcome"] == "moved", move
        if mode == "stateful":  # the continued SMB session went back to a with the move
            assert move["moved"] >= 1 and move["failed"] == 0, move
            assert holder.do("write")["ok"]
        assert b.stop(20) == 0, (tmp_path / "b.log").read_text()[-2000:]
        assert lab.run(lab.ns_b, ["ip", "link", "show", "pp-a"], capture_output=True).returncode != 0, \
            "b could not remove its macvlan"
        log = (tmp_path / "b.log").read_text()
        assert "Permission denied" not in log and "Operation not permitted" not in log, log[-2000:]
    finally:
        if holder is not None:
            holder.close()
        b.kill()
        a.kill()
        a.link_up()
        if mode == "stateful":
            lab.flood(False)
