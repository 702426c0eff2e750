"""Issue 9, items 7 and 9 in the lab: mistakes that used to leave a pair half-working and quiet are
loud in the log and in status, with what to change.

* a wrong ``peer.link`` port on one node (the link comes up only through the other node's dial);
* swapped service addresses (b's ``[node] address`` is a's): b stays ``yielded``, and says why;
* a stateful standby on a learning bridge sees nothing of its peer's traffic, and says so plainly
  (with the bridge flooding, it sees both directions).

Configs are the lab's own, changed as data (``Lab.node_config`` + ``write_toml``), with state
directories under the test's temp dir so the lab's own node state is left alone.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from deploy.lab.clients import NodeProcess, SmbHolder, serving
from deploy.lab.nodeconfigs import write_toml
from proxy.status import NodeStatus, from_json

pytestmark = pytest.mark.lab


def node_config(lab, tmp_path: Path, node: str, mode: str = "stateless", **changes) -> Path:
    """The lab's pair config of ``node``, with its state under ``tmp_path`` and ``changes`` applied
    (``{"node.address": ..., "peer.link": ...}`` as dotted keys)."""
    config = lab.node_config(node, pair=True, mode=mode)
    state = tmp_path / node
    state.mkdir(exist_ok=True)
    config["node"]["state_dir"] = str(state)
    config["node"]["control"] = str(state / "control.sock")
    for dotted, value in changes.items():
        table, key = dotted.split(".")
        config[table][key] = value
    return write_toml(tmp_path / f"{node}.toml", config)


def human_status(lab, node: NodeProcess) -> str:
    cp = lab.run(node.ns, [sys.executable, "-m", "proxy.cli", "status", "-c", str(node.config)],
                 capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr
    return cp.stdout


@pytest.fixture
def nodes():
    started: list[NodeProcess] = []
    yield started
    for node in started:
        node.stop(10)


def test_a_wrong_link_port_is_loud_on_the_node_that_has_it(lab, tmp_path, nodes):
    addr = lab.addresses
    a = NodeProcess(lab, "a", config=node_config(lab, tmp_path, "a", **{"peer.link": f"{addr.sync_b}:7499"}),
                    log=tmp_path / "a.log")
    b = NodeProcess(lab, "b", config=node_config(lab, tmp_path, "b"), log=tmp_path / "b.log")
    nodes += [a, b]
    a.start()
    b.start()
    # the link comes up, dialled by b: it used to look healthy from both sides
    st = a.wait_for(lambda s: s["pair"]["link"]["state"] == "connected" and s["pair"]["link"].get("dial_problem"),
                    10, "a's link up and its peer.link problem known")
    link = st["pair"]["link"]
    assert link["dialled_by"] == "b"
    assert f"peer.link {addr.sync_b}:7499 is not where b listens" in link["dial_problem"]
    assert f'set peer.link = "{addr.sync_b}:7400" on a' in link["dial_problem"]
    assert link["dial"] == f"{addr.sync_b}:7499"
    assert "WARNING" in (tmp_path / "a.log").read_text() and link["dial_problem"] in (tmp_path / "a.log").read_text()
    assert f"SYNC LINK PROBLEM: {link['dial_problem']}" in human_status(lab, a)
    assert b.status()["pair"]["link"].get("dial_problem") is None   # b's peer.link is right


def test_swapped_service_addresses_leave_b_yielded_and_loud(lab, tmp_path, nodes):
    """b's config has the two service addresses swapped (a's as its own, its own as the peer's): a
    serves its address, b yields and asks for it in vain. b says for how long and why (in status and, repeatedly, in its log); a says it too."""
    addr = lab.addresses
    fast = {"pair.claim_wait": "300ms"}   # stuck after 5 claim_waits: 1.5 s
    a = NodeProcess(lab, "a", config=node_config(lab, tmp_path, "a", **fast), log=tmp_path / "a.log")
    b = NodeProcess(lab, "b", config=node_config(lab, tmp_path, "b", **fast,
                                                 **{"node.address": f"{addr.service_a}/{addr.prefixlen}",
                                                    "peer.address": addr.service_b}),
                    log=tmp_path / "b.log")
    nodes += [a, b]
    a.start()
    a.wait_for(serving(addr.service_a, "a"), 10, "a serving its address")
    b.start()
    st = b.wait_for(lambda s: "own_address_stuck" in s["pair"], 10, "b saying its address is not served")
    stuck = st["pair"]["own_address_stuck"]
    assert st["pair"]["addresses"][addr.service_a]["role"] == "yielded"
    assert stuck["role"] == "yielded" and stuck["for_s"] >= 1.4
    assert f"a says {addr.service_a} is its own address, but it is this node's own" in stuck["reason"]
    assert "[node] address" in stuck["reason"]
    from_json(NodeStatus, st)  # strict: exactly the schema
    log_b = (tmp_path / "b.log").read_text()
    assert f"own address {addr.service_a} yielded for" in log_b and "not served" in log_b
    assert f"OWN ADDRESS NOT SERVED (yielded for" in human_status(lab, b)
    # a keeps serving its own address, and says what b's hello shows
    st_a = a.wait_for(lambda s: s["pair"].get("address_mismatch"), 5, "a naming the mismatch")
    assert f"b says {addr.service_a} is its own address" in st_a["pair"]["address_mismatch"]
    assert st_a["pair"]["addresses"][addr.service_a]["role"] == "serving"
    assert "ADDRESSES DO NOT MATCH" in human_status(lab, a)


def test_a_stateful_standby_on_a_learning_bridge_says_it_sees_nothing_of_its_peer(lab, tmp_path, nodes):
    """The default lab bridge learns: b's port gets none of a's frames. With a client working through
    a's address, b's status must say so plainly (not add up its snoopers and call itself in sync);
    with the bridge flooding (a hub, as a mirror port would be) it sees both directions."""
    addr, host = lab.addresses, lab.addresses.service_a
    a = NodeProcess(lab, "a", config=node_config(lab, tmp_path, "a", "stateful"), log=tmp_path / "a.log")
    b = NodeProcess(lab, "b", config=node_config(lab, tmp_path, "b", "stateful"), log=tmp_path / "b.log")
    nodes += [a, b]
    lab.flood(False)
    holder = None
    try:
        b.start()
        a.start()
        a.wait_for(serving(host, "a"), 10, "a serving")
        for node in (a, b):
            node.wait_for(lambda s: s["pair"]["link"]["state"] == "connected" and
                          s["pair"]["state_sync"]["observer"] == "running", 10, "link up, observer running")
        holder = SmbHolder(lab, host, "loud-sight.bin")

        def working_until(predicate, what):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                assert holder.do("write")["ok"]
                st = b.status()
                if predicate(st["pair"]["state_sync"]):
                    return st
                time.sleep(0.1)
            raise AssertionError(f"{what}: {b.status()['pair']['state_sync']}")

        st = working_until(lambda s: s["sight"] == "nothing", "b judging what it sees of a")
        sync = st["pair"]["state_sync"]
        assert sync["sight_detail"].startswith("SEES NOTHING of a's traffic while a has ")
        assert sync["peer_connections"] >= 1 and sync["in_sync"] is False
        views = {s["view"]: s for s in sync["snoopers"]}
        assert views["peer_address"]["address"] == host
        assert views["peer_address"]["frames_to"] == views["peer_address"]["frames_from"] == 0
        assert views["own_address"]["address"] == addr.service_b
        from_json(NodeStatus, st)
        human = human_status(lab, b)
        assert "SEES NOTHING of a's traffic while a has " in human, human
        assert f"{host:<15} a's address: 0 frames, 0 to a, 0 from a" in human
        assert "state sync with a: NOT in sync" in human

        lab.flood(True)   # a hub: b's port gets every frame
        st = working_until(lambda s: s["sight"] == "both", "b seeing a's traffic both ways")
        views = {s["view"]: s for s in st["pair"]["state_sync"]["snoopers"]}
        assert views["peer_address"]["frames_to"] > 0 and views["peer_address"]["frames_from"] > 0
        assert "this node sees a's traffic both ways" in human_status(lab, b)
    finally:
        if holder is not None:
            holder.close()
        lab.flood(False)
