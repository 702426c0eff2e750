"""Status, schema and Prometheus metrics of real lab nodes under real traffic (lab, root).

* one node alone: exact byte counts through a TCP echo service, a backend that refuses, GET /metrics
  and ``status --prometheus`` agreeing, the proxied connections in ``status --json``, and a capture of
  the same SMB traffic replayed: both fit the one schema and name the same connection;
* a stateless pair: peer liveness, sync link RTT, a takeover's phases as metrics.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from deploy.lab.clients import NodeProcess, SmbHolder, serving, smb_put
from proxy.config import load_config
from proxy.status import NodeStatus, from_json
from tests.conftest import capturing, replay_json

pytestmark = pytest.mark.lab

ECHO_PORT, DEAD_PORT, METRICS = 7000, 7001, "127.0.0.1:9477"

ECHO_SERVER = f"""
import socket, sys, threading
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((sys.argv[1], {ECHO_PORT}))
ls.listen(16)
print("ready", flush=True)
def serve(c):
    with c:
        while data := c.recv(65536):
            c.sendall(data)
        c.shutdown(socket.SHUT_WR)
while True:
    c, _ = ls.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

ECHO_CLIENT = """
import json, os, socket, sys, threading
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = os.urandom(n)
s = socket.create_connection((host, port), timeout=30)
got = bytearray()
def read():
    while chunk := s.recv(65536):
        got.extend(chunk)
t = threading.Thread(target=read)
t.start()
s.sendall(data)
s.shutdown(socket.SHUT_WR)
t.join(60)
print(json.dumps({"sent": n, "received": len(got), "same": bytes(got) == data}))
"""


def metrics(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a Prometheus text: (sample name, sorted labels) -> value; checked for HELP/TYPE."""
    out = {}
    for family in text_string_to_metric_families(text):
        assert family.documentation and family.type in ("counter", "gauge"), family
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def cli(lab, ns: str, *args: str) -> subprocess.CompletedProcess:
    return lab.run(ns, [sys.executable, "-m", "proxy.cli", *args], capture_output=True, text=True, timeout=30)


def http_get(lab, ns: str, url: str) -> str:
    cp = lab.run(ns, [sys.executable, "-c", f"import urllib.request; print(urllib.request.urlopen({url!r}, "
                                            "timeout=5).read().decode(), end='')"],
                 capture_output=True, text=True, timeout=30)
    assert cp.returncode == 0, cp.stderr
    return cp.stdout


@pytest.fixture
def single_node(lab, tmp_path):
    """Node a alone with smb, a TCP echo service and a service whose backend refuses; metrics on."""
    a = load_config(lab.node_config_path("a")).node
    server = lab.addresses.server
    config = tmp_path / "a.toml"
    config.write_text(f"""[node]
name = "a"
interface = "eth0"
address = "{a.address}"
state_dir = "{tmp_path / 'state'}"
control = "{tmp_path / 'control.sock'}"
metrics = "{METRICS}"
grace = "1s"

[[service]]
name = "smb"
protocol = "smb"
port = 445
backend = "{server}:445"

[[service]]
name = "echo"
protocol = "tcp"
port = {ECHO_PORT}
backend = "{server}:{ECHO_PORT}"

[[service]]
name = "refused"
protocol = "tcp"
port = {DEAD_PORT}
backend = "{server}:{DEAD_PORT}"
""")
    echo = lab.popen(lab.ns_server, [sys.executable, "-c", ECHO_SERVER, server], stdout=subprocess.PIPE, text=True)
    node = NodeProcess(lab, "a", config=config, log=tmp_path / "node-a.log")
    try:
        assert echo.stdout.readline().strip() == "ready"
        node.start()
        yield node
    finally:
        node.stop(10)
        echo.kill()
        echo.wait(10)


def test_single_node_metrics_count_real_traffic_exactly(lab, single_node):
    node, host = single_node, lab.addresses.service_a
    sizes = [(3 << 20) + 17, 1]
    for n in sizes:
        cp = lab.run(lab.ns_client, [sys.executable, "-c", ECHO_CLIENT, host, str(ECHO_PORT), str(n)],
                     capture_output=True, text=True, timeout=60)
        assert cp.returncode == 0, cp.stderr
        assert json.loads(cp.stdout) == {"sent": n, "received": n, "same": True}
    # the backend refuses: the node closes the client (a clean FIN) and counts a backend failure
    refused = lab.run(lab.ns_client, [sys.executable, "-c", "import socket, sys; s = socket.create_connection("
                                      f"({host!r}, {DEAD_PORT}), timeout=10); print(len(s.recv(10)))"],
                      capture_output=True, text=True, timeout=60)
    assert refused.stdout.strip() == "0", refused.stderr
    node.wait_for(lambda s: all(x["connections_active"] == 0 for x in s["services"]), 5, "connections closed")

    cp = cli(lab, lab.ns_a, "status", "-c", str(node.config), "--prometheus")
    assert cp.returncode == 0, cp.stderr
    m = metrics(cp.stdout)
    echo = (("address", host), ("service", "echo"))
    assert m[("pairproxy_up", ())] == 1
    assert m[("pairproxy_bytes_total", tuple(sorted(echo + (("direction", "to_backend"),))))] == sum(sizes)
    assert m[("pairproxy_bytes_total", tuple(sorted(echo + (("direction", "to_client"),))))] == sum(sizes)
    assert m[("pairproxy_connections_total", echo)] == len(sizes)
    assert m[("pairproxy_connections_active", echo)] == 0
    assert m[("pairproxy_backend_failures_total", echo)] == 0
    assert m[("pairproxy_backend_failures_total", (("address", host), ("service", "refused")))] == 1
    assert not [k for k in m if k[0] in ("pairproxy_peer_alive", "pairproxy_takeovers_total")]  # no pair

    # the node serves the same at GET /metrics (counters cannot have moved: no traffic since)
    served = metrics(http_get(lab, lab.ns_a, f"http://{METRICS}/metrics"))
    assert {k: v for k, v in served.items() if "bytes" in k[0]} == {k: v for k, v in m.items() if "bytes" in k[0]}

    human = cli(lab, lab.ns_a, "status", "-c", str(node.config))
    assert "last backend error: " in human.stdout and f"{lab.addresses.server}:{DEAD_PORT}" in human.stdout
    assert "None" not in human.stdout

    # and the node says "down" when it is
    node.stop(10)
    cp = cli(lab, lab.ns_a, "status", "-c", str(node.config), "--prometheus")
    assert cp.returncode == 1 and metrics(cp.stdout)[("pairproxy_up", ())] == 0


def test_stateless_status_and_a_replay_of_the_same_traffic_share_the_schema(lab, single_node, tmp_path):
    """A stateless node knows its connections from its sockets; a replay of a capture of the same
    traffic knows them from the frames: both are the same record type and name the same connection."""
    node, host = single_node, lab.addresses.service_a
    capture = tmp_path / "client.pcap"
    holder = None
    try:
        with capturing(lab, lab.ns_client, capture, f"tcp and host {host} and port 445"):
            holder = SmbHolder(lab, host, "schema-hold.bin")
            assert holder.do("write")["ok"]
            cp = cli(lab, lab.ns_a, "status", "-c", str(node.config), "--json")
            assert cp.returncode == 0, cp.stderr
            live = from_json(NodeStatus, json.loads(cp.stdout))  # strict: exactly the schema
    finally:
        if holder:
            holder.close()
    replayed = replay_json(capture)

    [mine] = [c for c in live.connections if c.server == f"{host}:445"]
    assert mine.protocol == "smb" and mine.client.startswith(lab.addresses.client + ":")
    assert mine.proxied.service == "smb" and mine.proxied.backend == f"{lab.addresses.server}:445"
    assert mine.proxied.backend_source.startswith(host + ":")
    assert mine.proxied.bytes_to_backend > 0 and mine.proxied.bytes_to_client > 0
    assert mine.tcp is None and mine.unsynchronised is None  # a stateless node decodes nothing
    # the replay of the capture (stopped while the holder was still connected) decoded the same one
    seen = {(c.client, c.server): c for c in replayed.connections}.get((mine.client, mine.server))
    assert seen is not None, (mine.client, [c.client for c in replayed.connections])
    assert seen.protocol == "smb" and seen.sessions and seen.sessions[0].user == "pp"
    assert any(o.path == "schema-hold.bin" for o in seen.opens)
    assert seen.tcp is not None and seen.proxied is None
    assert set(replayed.digests) == {host}


@pytest.fixture
def pair_with_metrics(lab, tmp_path):
    configs = {}
    for name in ("a", "b"):
        text = lab.node_config_path(name, pair=True).read_text()
        configs[name] = tmp_path / f"pair-{name}.toml"
        configs[name].write_text(text.replace("[node]\n", f'[node]\nmetrics = "{METRICS}"\n', 1))
    a = NodeProcess(lab, "a", config=configs["a"], log=tmp_path / "pair-a.log")
    b = NodeProcess(lab, "b", config=configs["b"], log=tmp_path / "pair-b.log")
    lab.run(lab.ns_a, ["ip", "link", "set", "eth0", "up"])
    try:
        b.start()
        a.start()
        a.wait_for(serving(lab.addresses.service_a, "a"), 10, "a serving its address")
        b.wait_for(lambda s: s["pair"]["link"]["state"] == "connected" and
                   (s["pair"]["link"]["rtt_ms"] or {}).get("count", 0) > 5, 10, "b: link up, heartbeats")
        yield a, b
    finally:
        a.stop(10)
        b.stop(10)
        a.link_up()  # a killed node's kernel keeps its address: what `pairproxy cleanup` is for


def test_pair_metrics_show_liveness_rtt_and_the_takeover(lab, pair_with_metrics, tmp_path):
    a, b = pair_with_metrics
    host = lab.addresses.service_a
    m = metrics(http_get(lab, lab.ns_b, f"http://{METRICS}/metrics"))
    assert m[("pairproxy_peer_alive", (("peer", "a"),))] == 1
    assert m[("pairproxy_sync_link_up", (("peer", "a"),))] == 1
    assert 0 < m[("pairproxy_sync_link_rtt_seconds", (("peer", "a"), ("stat", "median")))] < 0.02
    assert m[("pairproxy_takeovers_total", ())] == 0
    assert m[("pairproxy_address_held", (("address", host), ("owner", "a")))] == 0
    assert m[("pairproxy_address_held", (("address", lab.addresses.service_b), ("owner", "b")))] == 1

    src = tmp_path / "up.bin"
    src.write_bytes(b"x" * (1 << 20))
    a.kill_hard(link_down=True)
    b.wait_for(serving(host, "b"), 5, "b holding a's address")
    smb_put(lab, host, src, "metrics-takeover.bin").check()
    b.wait_for(lambda s: s["pair"]["takeovers"][-1]["first_client_ms"] is not None, 5, "first client")
    m = metrics(http_get(lab, lab.ns_b, f"http://{METRICS}/metrics"))
    dead_after = load_config(b.config).pair.dead_after
    assert m[("pairproxy_peer_alive", (("peer", "a"),))] == 0
    assert m[("pairproxy_takeovers_total", ())] == 1
    assert m[("pairproxy_address_held", (("address", host), ("owner", "a")))] == 1
    phases = {p: m[("pairproxy_last_takeover_seconds", (("address", host), ("phase", p)))]
              for p in ("detection", "address", "first_client")}
    assert dead_after * 0.9 <= phases["detection"] < 1.0, phases
    assert 0 < phases["address"] < 0.5 and phases["address"] <= phases["first_client"], phases
    smb = (("address", host), ("service", "smb"))
    assert m[("pairproxy_connections_total", smb)] >= 1
    assert m[("pairproxy_bytes_total", tuple(sorted(smb + (("direction", "to_backend"),))))] > 1 << 20
    cp = cli(lab, lab.ns_b, "status", "-c", str(b.config))
    assert "last takeover of" in cp.stdout and "(1 in all)" in cp.stdout and "None" not in cp.stdout, cp.stdout
