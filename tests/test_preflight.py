"""proxy.preflight: environment problems, one line each, naming the key (runs in the test's own
namespace and only reads: interfaces, files)."""

from __future__ import annotations

import os

import json
import subprocess
import sys
from pathlib import Path

from proxy.cli import main
from proxy.config import load_config, parse_config
from proxy.preflight import environment_problems, environment_warnings, reachability_warnings

DEPLOY = Path(__file__).parent.parent / "deploy"


def pair_config(tmp_path, key_file, interface="lo"):
    return parse_config({
        "node": {"name": "a", "interface": interface, "address": "10.99.0.1/24",
                 "state_dir": str(tmp_path / "state"), "control": str(tmp_path / "state" / "c.sock")},
        "service": [{"name": "t", "protocol": "tcp", "port": 8080, "backend": "10.99.0.10:80"}],
        "peer": {"name": "b", "address": "10.99.0.2", "link": "127.0.0.2:7399", "listen": "127.0.0.1:7400",
                 "key_file": str(key_file)},
        "pair": {"mode": "stateless"},
    })


def test_a_good_key_and_interface_give_no_problems(tmp_path):
    key = tmp_path / "pair.key"
    key.write_bytes(os.urandom(24).hex().encode())
    key.chmod(0o600)
    assert environment_problems(pair_config(tmp_path, key)) == []


def test_key_file_problems_name_the_key(tmp_path):
    missing = environment_problems(pair_config(tmp_path, tmp_path / "absent.key"))
    assert len(missing) == 1 and missing[0].startswith("peer.key_file: key_file ") and "does not exist" in missing[0]
    short = tmp_path / "short.key"
    short.write_bytes(b"tiny\n")
    short.chmod(0o600)
    [problem] = environment_problems(pair_config(tmp_path, short))
    assert problem.startswith("peer.key_file:") and "needs at least 16" in problem
    loose = tmp_path / "loose.key"
    loose.write_bytes(os.urandom(32).hex().encode())
    loose.chmod(0o644)
    [problem] = environment_problems(pair_config(tmp_path, loose))
    assert problem.startswith("peer.key_file:") and "chmod 600" in problem


def test_missing_interface_and_unwritable_state_dir(tmp_path):
    key = tmp_path / "pair.key"
    key.write_bytes(os.urandom(24).hex().encode())
    key.chmod(0o600)
    (tmp_path / "state").write_text("a file where a directory should be")
    problems = environment_problems(pair_config(tmp_path, key, interface="nosuch0"))
    assert any(p.startswith("node.interface: no interface 'nosuch0' in this network namespace (there are: ")
               for p in problems)
    assert any(p.startswith("node.state_dir:") and "not a directory" in p for p in problems)


def test_key_file_must_be_private_to_its_owner(tmp_path):
    """The README asks for mode 600: 640 (group-readable) is refused, 400 and 600 are fine."""
    key = tmp_path / "pair.key"
    key.write_bytes(os.urandom(24).hex().encode())
    for mode, ok in ((0o640, False), (0o604, False), (0o400, True), (0o600, True)):
        key.chmod(mode)
        problems = [p for p in environment_problems(pair_config(tmp_path, key)) if p.startswith("peer.key_file")]
        assert (problems == []) == ok, (oct(mode), problems)
        if not ok:
            assert f"mode {mode:04o}" in problems[0] and "chmod 600" in problems[0]


def good_key(tmp_path) -> Path:
    key = tmp_path / "pair.key"
    key.write_bytes(os.urandom(24).hex().encode())
    key.chmod(0o600)
    return key


def write_config(tmp_path, **changes) -> Path:
    """A pair config on loopback only (check must send nothing anywhere else), with text replaced."""
    text = f"""
[node]
name = "a"
interface = "lo"
address = "10.99.0.1/24"
state_dir = "{tmp_path / 'state'}"
control = "{tmp_path / 'state' / 'c.sock'}"

[[service]]
name = "t"
protocol = "tcp"
port = 8080
backend = "127.0.0.1:9"

[peer]
name = "b"
address = "10.99.0.2"
link = "127.0.0.2:7399"
listen = "127.0.0.1:7400"
key_file = "{good_key(tmp_path)}"

[pair]
heartbeat = "20ms"
"""
    for old, new in changes.items():
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "a.toml"
    path.write_text(text)
    return path


def check(path, capsys) -> tuple[int, list[str]]:
    code = main(["check", "-c", str(path)])
    return code, capsys.readouterr().err.splitlines()


def test_check_reports_config_and_machine_problems_at_once(tmp_path, capsys):
    """A typo used to hide the key-file problem until the typo was fixed."""
    path = write_config(tmp_path, **{'heartbeat = "20ms"': 'heartbeat = "20"', 'port = 8080': 'prot = 8080'})
    Path(load_key_path(path)).chmod(0o640)
    code, lines = check(path, capsys)
    assert code == 1
    keys = [line.split(": ")[1] for line in lines if not line.startswith("pairproxy: warning")]
    assert keys == ["service[0].prot", "service[0].port", "pair.heartbeat", "peer.key_file"], lines
    assert "mode 0640" in lines[3]


def load_key_path(path: Path) -> str:
    return next(line.split('"')[1] for line in path.read_text().splitlines() if line.startswith("key_file"))


def test_a_good_config_is_ok_and_unanswered_backend_and_peer_are_warnings(tmp_path, capsys):
    code, lines = check(write_config(tmp_path), capsys)
    assert code == 0, lines
    assert any(line.startswith("pairproxy: warning: service[0].backend: backend 127.0.0.1:9 does not answer "
                               "(Connection refused)") for line in lines), lines
    assert any(line.startswith("pairproxy: warning: peer.link: 127.0.0.2:7399 does not answer") and
               "compare with the peer's listen" in line for line in lines), lines
    assert not (tmp_path / "state").exists(), "check leaves the machine as it found it"


def test_a_backend_that_answers_gives_no_warning(tmp_path):
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        config = load_config(write_config(tmp_path, **{"127.0.0.1:9": f"127.0.0.1:{port}"}))
        assert [w for w in reachability_warnings(config) if w.startswith("service")] == []


def test_listen_not_on_this_host_and_swapped_link(tmp_path):
    config = load_config(write_config(tmp_path, **{'listen = "127.0.0.1:7400"': 'listen = "10.98.0.1:7400"'}))
    [problem] = environment_problems(config)
    assert problem.startswith("peer.listen: 10.98.0.1 is not an address of this host"), problem
    config = load_config(write_config(tmp_path, **{'listen = "127.0.0.1:7400"': 'listen = "0.0.0.0:7400"',
                                                   'link = "127.0.0.2:7399"': 'link = "127.0.0.1:7399"'}))
    [problem] = environment_problems(config)
    assert problem.startswith("peer.link: 127.0.0.1 is an address of this host") and "swapped" in problem


def test_the_shipped_example_does_not_pass_check_on_a_host_without_its_addresses():
    problems = environment_problems(load_config(DEPLOY / "example-a.toml"))
    assert any(p.startswith("peer.listen: 10.1.0.1 is not an address of this host") for p in problems), problems


def test_a_state_dir_that_cannot_be_created_names_the_key(tmp_path):
    """Root passes os.access() almost everywhere; check tries mkdir as run will (here under /proc)."""
    config = load_config(write_config(tmp_path, **{f'state_dir = "{tmp_path / "state"}"':
                                                   'state_dir = "/proc/pairproxy-check/a"'}))
    [problem] = environment_problems(config)
    assert problem.startswith("node.state_dir: cannot create or write /proc/pairproxy-check/a"), problem


def test_swapped_service_addresses_are_caught_from_the_peers_last_hello(tmp_path):
    """Node a configured with b's address (and b's as its peer's) would fight b for it, yielded forever."""
    path = write_config(tmp_path, **{'address = "10.99.0.1/24"': 'address = "10.99.0.2/24"',
                                     'address = "10.99.0.2"\n': 'address = "10.99.0.1"\n'})
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "peer-hello.json").write_text(json.dumps({"name": "b", "address": "10.99.0.2/24"}))
    problems = environment_problems(load_config(path))
    assert [p.split(":")[0] for p in problems] == ["node.address"], problems
    assert "swapped with peer.address" in problems[0] and "peer-hello.json" in problems[0]


def test_a_peer_address_other_than_the_peers_last_hello_is_a_warning(tmp_path):
    config = load_config(write_config(tmp_path))
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "peer-hello.json").write_text(json.dumps({"name": "b", "address": "10.99.0.3/24"}))
    assert environment_problems(config) == []
    [warning] = [w for w in environment_warnings(config, timeout=0.2) if w.startswith("peer.address")]
    assert warning.startswith("peer.address: 10.99.0.2 but peer b said its address is 10.99.0.3"), warning


def test_check_names_the_missing_capability(tmp_path):
    """Without CAP_NET_RAW (dropped from the bounding set, so even root lacks it) check says so."""
    path = write_config(tmp_path)
    cp = subprocess.run(["setpriv", "--bounding-set=-net_raw,-net_bind_service", "--inh-caps=-all",
                         sys.executable, "-m", "proxy.cli", "check", "-c", str(path)],
                        capture_output=True, text=True, timeout=30, cwd=Path(__file__).parent.parent)
    assert cp.returncode == 1, cp.stderr
    assert any(line.startswith("pairproxy: node.interface: announcing the address (gratuitous ARP) needs "
                               "CAP_NET_RAW, which this process does not have") and "AmbientCapabilities" in line
               for line in cp.stderr.splitlines()), cp.stderr
    assert "CAP_NET_ADMIN" not in cp.stderr and "CAP_NET_BIND_SERVICE" not in cp.stderr  # port 8080, tcp


def test_run_refuses_what_check_refuses_before_touching_anything(tmp_path, capsys):
    """run reports the same problems as check (here an uncreatable state_dir and a group-readable key),
    all at once, naming the keys, and exits before any kernel change or lock."""
    path = write_config(tmp_path, **{f'state_dir = "{tmp_path / "state"}"': 'state_dir = "/proc/pairproxy-run/a"'})
    Path(load_key_path(path)).chmod(0o640)
    code = main(["run", "-c", str(path)])
    lines = capsys.readouterr().err.splitlines()
    assert code == 1
    assert [line.split(": ")[1] for line in lines] == ["peer.key_file", "node.state_dir"], lines
