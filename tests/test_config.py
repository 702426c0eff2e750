"""Config parsing: every class of bad key or value gives one line naming the key path."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from proxy.config import ConfigError, load_config, parse_config, parse_duration, parse_endpoint

GOOD = """
[node]
name = "a"
interface = "eth0"
address = "10.0.0.1/24"
state_dir = "/var/lib/pairproxy/a"
control = "/run/pairproxy/a.sock"

[[service]]
name = "smb"
protocol = "smb"
port = 445
backend = "10.0.2.10:445"

[[service]]
name = "nfs"
protocol = "nfs"
port = 2049
backend = "10.0.2.10:2049"
extra_ports = [111, 20048]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def problems_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    return info.value.problems


def test_good_config(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    assert config.node.name == "a"
    assert config.node.address == ipaddress.IPv4Interface("10.0.0.1/24")
    assert config.node.grace == 10.0
    smb, nfs = config.services
    assert smb.ports == (445,) and not smb.privileged_source_port
    assert str(smb.backend) == "10.0.2.10:445"
    assert nfs.ports == (2049, 111, 20048) and nfs.privileged_source_port


def test_metrics_endpoint_is_optional(tmp_path):
    assert load_config(write(tmp_path, GOOD)).node.metrics is None
    config = load_config(write(tmp_path, GOOD.replace('control = "/run/pairproxy/a.sock"',
                                                      'control = "/run/pairproxy/a.sock"\nmetrics = "127.0.0.1:9477"')))
    assert str(config.node.metrics) == "127.0.0.1:9477"


def test_nfs_defaults_to_portmapper(tmp_path):
    config = load_config(write(tmp_path, GOOD.replace("extra_ports = [111, 20048]\n", "")))
    assert config.services[1].extra_ports == (111,)


TWO_NFS = GOOD.split("[[service]]")[0] + """
[[service]]
name = "nfs"
protocol = "nfs"
port = 2049
backend = "10.0.2.10:2049"

[[service]]
name = "mount"
protocol = "nfs"
port = 20048
backend = "10.0.2.10:20048"
"""


def test_two_nfs_services_share_one_default_portmapper(tmp_path):
    """Portmapper once per address: the default goes to the first nfs service only."""
    nfs, mount = load_config(write(tmp_path, TWO_NFS)).services
    assert nfs.ports == (2049, 111) and mount.ports == (20048,)


def test_a_default_never_takes_an_explicit_port(tmp_path):
    text = TWO_NFS + '\n[[service]]\nname = "pm"\nprotocol = "tcp"\nport = 111\nbackend = "10.0.2.11:111"\n'
    nfs, mount, pm = load_config(write(tmp_path, text)).services
    assert nfs.ports == (2049,) and mount.ports == (20048,) and pm.ports == (111,)


def test_explicit_duplicate_ports_stay_an_error(tmp_path):
    text = TWO_NFS.replace('port = 20048\n', 'port = 20048\nextra_ports = [111]\n')
    problems = problems_of(tmp_path, text.replace('port = 2049\n', 'port = 2049\nextra_ports = [111]\n'))
    assert problems == ["service[1].extra_ports[0]: port 111 is already proxied by service[0]"], problems


@pytest.mark.parametrize("old, new, expected", [
    ('name = "a"', 'name = ""', "node.name: must not be empty"),
    ('name = "a"', 'name = "a b"', "node.name: 'a b' is not a valid name"),
    ('name = "a"', "name = 3", "node.name: expected a string, got int"),
    ('interface = "eth0"', 'interface = "much-too-long-ifname"', "node.interface: 'much-too-long-ifname' is not a valid interface name"),
    ('address = "10.0.0.1/24"', 'address = "10.0.0.1"', "node.address: expected an address with prefix length"),
    ('address = "10.0.0.1/24"', 'address = "10.0.0.300/24"', "node.address: '10.0.0.300/24' is not an IPv4 address"),
    ('address = "10.0.0.1/24"', 'address = "10.0.0.1/33"', "node.address: '10.0.0.1/33' is not an IPv4 address"),
    ('address = "10.0.0.1/24"', 'address = "127.0.0.1/8"', "node.address: 127.0.0.1 cannot be a service address"),
    ('address = "10.0.0.1/24"', 'address = "10.0.0.255/24"', "node.address: 10.0.0.255 cannot be a service address"),
    ('state_dir = "/var/lib/pairproxy/a"', 'state_dir = "relative/dir"', "node.state_dir: 'relative/dir' must be an absolute path"),
    ('control = "/run/pairproxy/a.sock"', 'control = "/run/x.sock"\ngrace = "soon"', "node.grace: expected a duration"),
    ('control = "/run/pairproxy/a.sock"', 'control = "/run/x.sock"\nlog_level = "loud"', "node.log_level: 'loud' is not one of"),
    ('control = "/run/pairproxy/a.sock"', 'control = "/run/x.sock"\nmetrics = "9477"', "node.metrics: expected 'IPv4:PORT', got '9477'"),
    ('control = "/run/pairproxy/a.sock"', 'control = "/run/x.sock"\nmetrics = "localhost:9477"', "node.metrics: 'localhost' is not an IPv4 address"),
    ('control = "/run/pairproxy/a.sock"', 'control = "/run/x.sock"\nmetrics = 9477', "node.metrics: expected 'IPv4:PORT' as a string, got int"),
    ('port = 445', 'port = 0', "service[0].port: port 0 is outside 1-65535"),
    ('port = 445', 'port = 70000', "service[0].port: port 70000 is outside 1-65535"),
    ('port = 445', 'port = "smb"', "service[0].port: expected a port number, got 'smb'"),
    ('port = 445', 'port = true', "service[0].port: expected a port number, got True"),
    ('protocol = "smb"', 'protocol = "cifs"', "service[0].protocol: 'cifs' is not one of smb, nfs, tcp"),
    ('backend = "10.0.2.10:445"', 'backend = "10.0.2.10"', "service[0].backend: expected 'IPv4:PORT', got '10.0.2.10' (no port)"),
    ('backend = "10.0.2.10:445"', 'backend = "fileserver:445"', "service[0].backend: 'fileserver' is not an IPv4 address"),
    ('backend = "10.0.2.10:445"', 'backend = "10.0.2.10:99999"', "service[0].backend: port 99999 is outside 1-65535"),
    ('backend = "10.0.2.10:445"', 'backend = "10.0.0.1:445"', "service[0].backend: 10.0.0.1:445 is this node's own service address"),
    ('extra_ports = [111, 20048]', 'extra_ports = 111', "service[1].extra_ports: expected a list of ports, got int"),
    ('extra_ports = [111, 20048]', 'extra_ports = [111, 0]', "service[1].extra_ports: [1]: port 0 is outside 1-65535"),
    ('extra_ports = [111, 20048]', 'extra_ports = [111, 111]', "service[1].extra_ports[1]: port 111 is listed twice"),
    ('extra_ports = [111, 20048]', 'extra_ports = [445]', "service[1].extra_ports[0]: port 445 is already proxied by service[0]"),
    ('name = "nfs"', 'name = "smb"', "service[1].name: 'smb' is already used by service[0]"),
    ('port = 2049', 'port = 2049\nconnect_timeout = "0s"', "service[1].connect_timeout: must be greater than zero"),
    ('port = 2049', 'port = 2049\nconnect_timeout = "-1s"', "service[1].connect_timeout: expected a duration"),
])
def test_bad_values_name_their_key(tmp_path, old, new, expected):
    assert old in GOOD
    problems = problems_of(tmp_path, GOOD.replace(old, new, 1))
    assert any(p.startswith(expected) for p in problems), problems


def test_unknown_keys_are_named_with_a_hint(tmp_path):
    text = GOOD.replace('interface = "eth0"', 'interface = "eth0"\ninterfce = "eth1"')
    text = text.replace('port = 445', 'port = 445\nbackends = "x"')
    text += "\n[peerz]\nname = 'b'\n"
    problems = problems_of(tmp_path, text)
    assert "node.interfce: unknown key (did you mean 'interface'?)" in problems
    assert "service[0].backends: unknown key (did you mean 'backend'?)" in problems
    assert any(p.startswith("peerz: unknown key") for p in problems)


def test_missing_keys_and_tables(tmp_path):
    problems = problems_of(tmp_path, GOOD.replace('interface = "eth0"\n', "").replace('backend = "10.0.2.10:445"\n', ""))
    assert "node.interface: missing" in problems
    assert "service[0].backend: missing" in problems
    assert problems_of(tmp_path, "") == ["node: missing table",
                                         "service: no [[service]] defined: a node must proxy at least one service"]


def test_every_problem_is_reported_at_once(tmp_path):
    text = GOOD.replace('port = 445', 'port = 0').replace('protocol = "nfs"', 'protocol = "ftp"')
    text = text.replace('name = "a"', 'name = ""')
    problems = problems_of(tmp_path, text)
    assert len(problems) == 3
    assert [p.split(":")[0] for p in problems] == ["node.name", "service[0].port", "service[1].protocol"]


def test_wrong_shapes(tmp_path):
    assert problems_of(tmp_path, 'node = "a"\n[[service]]\nname="x"') [0] == "node: expected a table, got str"
    problems = problems_of(tmp_path, 'service = "smb"\n' + GOOD.split("[[service]]")[0])
    assert problems == ["service: expected an array of tables ([[service]])"]


def test_unreadable_files(tmp_path):
    assert problems_of(tmp_path, "[node\nname=") [0].startswith(f"{tmp_path / 'node.toml'}: invalid TOML")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.toml")
    assert info.value.problems == [f"{tmp_path / 'absent.toml'}: no such file"]
    path = tmp_path / "binary.toml"
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "cannot read" in info.value.problems[0]


@pytest.mark.parametrize("text, seconds", [("20ms", 0.02), ("1.5s", 1.5), ("2m", 120.0), (5, 5.0),
                                           (0.25, 0.25), (" 10 ms ", 0.01)])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "ms", "1h", "fast", True, None, [1], -1])
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_a_quoted_duration_without_unit_is_refused_on_its_own_key(tmp_path):
    """``heartbeat = "20"`` used to be 20 s, and the error then blamed dead_after."""
    problems = problems_of(tmp_path, PAIR.replace('heartbeat = "20ms"', 'heartbeat = "20"'))
    assert problems == ["pair.heartbeat: '20' needs a unit: '20ms' or '20s'?"], problems
    with pytest.raises(ValueError, match="needs a unit"):
        parse_duration("1.5")


def test_dead_after_problem_shows_the_heartbeat_it_compares_with(tmp_path):
    problems = problems_of(tmp_path, PAIR.replace('heartbeat = "20ms"', 'heartbeat = "1s"'))
    assert problems == ["pair.dead_after: 100ms must be at least two heartbeats (pair.heartbeat is 1000ms), "
                        "or one late heartbeat is a takeover"], problems


def test_endpoint():
    ep = parse_endpoint("10.1.2.3:445")
    assert (str(ep.host), ep.port) == ("10.1.2.3", 445)
    for bad in ("10.1.2.3", ":445", "10.1.2.3:", "10.1.2.3:x", "::1:445", 445):
        with pytest.raises(ValueError):
            parse_endpoint(bad)


def test_parse_config_accepts_a_dict_without_file():
    config = parse_config({"node": {"name": "n", "interface": "lo", "address": "10.9.0.1/32",
                                    "state_dir": "/tmp/s", "control": "/tmp/s/c.sock", "grace": "250ms"},
                           "service": [{"name": "t", "protocol": "tcp", "port": 8080, "backend": "10.9.0.2:80"}]})
    assert config.node.grace == 0.25
    assert config.services[0].extra_ports == ()


PAIR = GOOD + """
[peer]
name = "b"
address = "10.0.0.2"
link = "10.1.0.2:7400"
listen = "10.1.0.1:7400"
key_file = "/etc/pairproxy/pair.key"

[pair]
mode = "stateless"
heartbeat = "20ms"
dead_after = "100ms"
"""


def test_pair_config(tmp_path):
    config = load_config(write(tmp_path, PAIR))
    assert config.peer.name == "b" and str(config.peer.address) == "10.0.0.2"
    assert str(config.peer.link) == "10.1.0.2:7400" and config.peer.listen.port == 7400
    assert config.peer.macvlan == "pp-b" and config.peer.probe_port == 7401
    assert (config.pair.mode, config.pair.heartbeat, config.pair.dead_after) == ("stateless", 0.02, 0.1)
    assert config.peer.heartbeat_port == 7402
    assert load_config(write(tmp_path, GOOD)).peer is None


def test_pair_timing_defaults_are_issue_12s(tmp_path):
    text = PAIR.replace('heartbeat = "20ms"\n', "").replace('dead_after = "100ms"\n', "")
    config = load_config(write(tmp_path, text))
    assert (config.pair.heartbeat, config.pair.dead_after) == (0.01, 0.1)


@pytest.mark.parametrize("old, new, expected", [
    ('name = "b"', 'name = "a"', "peer.name: 'a' is this node's own name"),
    ('address = "10.0.0.2"', 'address = "10.0.0.1"', "peer.address: 10.0.0.1 is this node's own service address"),
    ('address = "10.0.0.2"', 'address = "10.9.0.2"', "peer.address: 10.9.0.2 is not in this node's service network"),
    ('address = "10.0.0.2"', 'address = "10.0.0.2/24"', "peer.address: '10.0.0.2/24' is not an IPv4 address"),
    ('link = "10.1.0.2:7400"', 'link = "10.1.0.1:7400"', "peer.link: 10.1.0.1:7400 is this node's own sync endpoint"),
    ('link = "10.1.0.2:7400"', 'link = "peer-b"', "peer.link: expected 'IPv4:PORT'"),
    ('key_file = "/etc/pairproxy/pair.key"', 'key_file = "pair.key"', "peer.key_file: 'pair.key' must be an absolute path"),
    ('mode = "stateless"', 'mode = "active"', "pair.mode: 'active' is not one of stateless, stateful"),
    ('heartbeat = "20ms"', 'heartbeat = "0ms"', "pair.heartbeat: must be greater than zero"),
    ('dead_after = "100ms"', 'dead_after = "30ms"', "pair.dead_after: 30ms must be at least two heartbeats"),
    ('dead_after = "100ms"', 'dead_after = "100ms"\ndeadafter = 1', "pair.deadafter: unknown key (did you mean 'dead_after'?)"),
    ('heartbeat = "20ms"', 'heartbeat = "0.5ms"', "pair.heartbeat: 0.5ms is below 1ms"),
    ('key_file = "/etc/pairproxy/pair.key"', 'key_file = "/etc/pairproxy/pair.key"\nheartbeat_port = 7401',
     "peer.heartbeat_port: 7401 is also peer.probe_port"),
    ('key_file = "/etc/pairproxy/pair.key"', 'key_file = "/etc/pairproxy/pair.key"\nheartbeat_port = 70000',
     "peer.heartbeat_port: "),
])
def test_bad_pair_values(tmp_path, old, new, expected):
    assert old in PAIR
    problems = problems_of(tmp_path, PAIR.replace(old, new, 1) if old.startswith(("mode", "heartbeat", "dead_after"))
                           else PAIR[:len(GOOD)] + PAIR[len(GOOD):].replace(old, new, 1))
    assert any(p.startswith(expected) for p in problems), problems


def test_peer_and_pair_come_together(tmp_path):
    only_peer = PAIR[:PAIR.index("[pair]")]
    assert "pair: missing table" in problems_of(tmp_path, only_peer)
    only_pair = GOOD + PAIR[PAIR.index("[pair]"):]
    assert "peer: missing table" in problems_of(tmp_path, only_pair)


def test_the_shipped_example_configs_are_valid_and_each_others_mirror():
    """deploy/example-a.toml and example-b.toml describe one pair: what one node calls its own, the
    other calls its peer's; services, key and [pair] are the same."""
    deploy = Path(__file__).parent.parent / "deploy"
    a, b = load_config(deploy / "example-a.toml"), load_config(deploy / "example-b.toml")
    assert (a.node.name, b.node.name) == ("a", "b") and a.pair.mode == "stateless"
    for one, other in ((a, b), (b, a)):
        assert one.peer.name == other.node.name
        assert one.peer.address == other.node.address.ip
        assert one.peer.link == other.peer.listen
        assert one.node.state_dir.name == one.node.name and one.node.control.stem == one.node.name
    assert a.node.address.network == b.node.address.network and a.node.interface == b.node.interface
    assert a.services == b.services and a.pair == b.pair and a.peer.key_file == b.peer.key_file
    assert (a.peer.probe_port, a.peer.macvlan, b.peer.macvlan) == (b.peer.probe_port, "pp-b", "pp-a")
