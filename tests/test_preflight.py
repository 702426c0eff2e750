"""proxy.preflight: environment problems, one line each, naming the key (runs in the test's own
namespace and only reads: interfaces, files)."""

from __future__ import annotations

import os

from proxy.config import parse_config
from proxy.preflight import environment_problems


def pair_config(tmp_path, key_file, interface="lo"):
    return parse_config({
        "node": {"name": "a", "interface": interface, "address": "10.99.0.1/24",
                 "state_dir": str(tmp_path / "state"), "control": str(tmp_path / "state" / "c.sock")},
        "service": [{"name": "t", "protocol": "tcp", "port": 8080, "backend": "10.99.0.10:80"}],
        "peer": {"name": "b", "address": "10.99.0.2", "link": "10.98.0.2:7400", "listen": "10.98.0.1:7400",
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
