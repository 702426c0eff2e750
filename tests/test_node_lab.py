"""One node in front of real Samba and NFS-Ganesha, used by real clients (lab, root).

Node a runs ``pairproxy run`` in its namespace with the lab's a.toml; the clients run in the client
namespace and reach the servers only through the service address 10.77.0.1.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy.lab.clients import SMB_COPY, NodeProcess, nfs_cat, nfs_get, nfs_put, random_file, sha256_of, smb_get, smb_put

pytestmark = pytest.mark.lab

SIZES = {"0B": 0, "1B": 1, "1MiB": 1 << 20, "64MiB": 64 << 20}


@pytest.fixture(scope="module")
def node_a(lab):
    node = NodeProcess(lab, "a", log=lab.root / "test-node-a.log")
    node.start()
    try:
        yield node
    finally:
        code = node.stop()
        assert code == 0, f"node a exited with {code}: {node.log.read_text()[-2000:]}"
        assert not has_address(lab, lab.ns_a, lab.addresses.service_a)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    return {label: random_file(d / f"src-{label}.bin", size) for label, size in SIZES.items()}


def has_address(lab, ns: str, address: str) -> bool:
    out = lab.run(ns, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"], capture_output=True, text=True).stdout
    return f"inet {address}/" in out


def smbprotocol_copy(lab, op: str, host: str, local: Path, remote: str, *extra: str) -> subprocess.CompletedProcess:
    return lab.run(lab.ns_client, [sys.executable, str(SMB_COPY), op, host, lab.smb_share, lab.smb_user,
                                   lab.smb_password, str(local), remote, *extra],
                   capture_output=True, text=True, timeout=120)


def slow_get(lab, host: str, remote: str, out: Path, rate: int) -> subprocess.Popen:
    """An smbprotocol client reading ``remote`` at about ``rate`` bytes/s: one still mid-transfer
    when a test cuts it off or stops the node."""
    return lab.popen(lab.ns_client, [sys.executable, str(SMB_COPY), "slow-get", host, lab.smb_share, lab.smb_user,
                                     lab.smb_password, str(out), remote, str(rate)],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("label", SIZES)
def test_smbclient_both_ways(lab, node_a, files, tmp_path, label):
    src, remote = files[label], f"smbclient-{label}.bin"
    smb_put(lab, lab.addresses.service_a, src, remote).check()
    assert sha256_of(lab.smb_share_path / remote) == sha256_of(src)
    back = tmp_path / "back.bin"
    smb_get(lab, lab.addresses.service_a, remote, back).check()
    assert back.stat().st_size == SIZES[label]
    assert sha256_of(back) == sha256_of(src)


@pytest.mark.parametrize("label", SIZES)
def test_smbprotocol_both_ways(lab, node_a, files, tmp_path, label):
    src, remote = files[label], f"smbprotocol-{label}.bin"
    cp = smbprotocol_copy(lab, "put", lab.addresses.service_a, src, remote)
    assert cp.returncode == 0, cp.stderr[-2000:]
    assert json.loads(cp.stdout)["bytes"] == SIZES[label]
    assert sha256_of(lab.smb_share_path / remote) == sha256_of(src)
    back = tmp_path / "back.bin"
    cp = smbprotocol_copy(lab, "get", lab.addresses.service_a, back, remote)
    assert cp.returncode == 0, cp.stderr[-2000:]
    assert sha256_of(back) == sha256_of(src)


@pytest.mark.parametrize("label", SIZES)
def test_nfs3_both_ways(lab, node_a, files, tmp_path, label):
    src, remote = files[label], f"nfs3-{label}.bin"
    nfs_put(lab, lab.addresses.service_a, src, remote, 3).check()
    assert sha256_of(lab.nfs_export_path / remote) == sha256_of(src)
    back = tmp_path / "back.bin"
    nfs_get(lab, lab.addresses.service_a, remote, back, 3).check()
    assert back.stat().st_size == SIZES[label]
    assert sha256_of(back) == sha256_of(src)


@pytest.mark.parametrize("label", SIZES)
def test_nfs4_reads(lab, node_a, files, label):
    src, remote = files[label], f"nfs4-{label}.bin"
    (lab.nfs_export_path / remote).write_bytes(src.read_bytes())
    assert nfs_cat(lab, lab.addresses.service_a, remote, 4) == src.read_bytes()


def test_status_counts_connections_and_bytes(lab, node_a):
    before = {s["name"]: s for s in node_a.status()["services"]}
    data = nfs_cat(lab, lab.addresses.service_a, "data-1M.bin", 4)
    after = {s["name"]: s for s in node_a.status()["services"]}
    assert after["nfs"]["connections_total"] > before["nfs"]["connections_total"]
    assert after["nfs"]["bytes_to_client"] - before["nfs"]["bytes_to_client"] >= len(data)
    assert after["nfs"]["connections_active"] == 0 or after["nfs"]["connections_active"] <= 1
    human = lab.run(lab.ns_a, [sys.executable, "-m", "proxy.cli", "status", "-c", str(node_a.config)],
                    capture_output=True, text=True)
    assert human.returncode == 0
    assert "node a" in human.stdout and "serving" in human.stdout
    assert any(line.startswith("smb ") and "10.77.0.10:445" in line for line in human.stdout.splitlines())


def test_many_parallel_connections(lab, node_a, tmp_path):
    host = lab.addresses.service_a
    want = sha256_of(lab.smb_share_path / "data-1M.bin")
    total_before = sum(s["connections_total"] for s in node_a.status()["services"])
    procs = []
    for i in range(12):
        procs.append(("smb", tmp_path / f"smb-{i}.bin", lab.popen(lab.ns_client, [
            "smbclient", f"//{host}/{lab.smb_share}", "-s", str(lab.smb_client_conf),
            "-U", f"{lab.smb_user}%{lab.smb_password}", "-c", f"get data-1M.bin {tmp_path}/smb-{i}.bin"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
        procs.append(("nfs", tmp_path / f"nfs-{i}.bin", lab.popen(lab.ns_client, [
            "nfs-cp", lab.nfs_url(host, "data-1M.bin", 3), str(tmp_path / f"nfs-{i}.bin")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
    for kind, out, proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{kind}: {err.decode()[-500:]}"
        assert sha256_of(out) == want
    total_after = sum(s["connections_total"] for s in node_a.status()["services"])
    assert total_after - total_before >= 24


def wait_for(predicate, timeout: float = 10, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def test_client_disconnects_mid_transfer(lab, node_a, files, tmp_path):
    remote = "midway-64MiB.bin"
    (lab.smb_share_path / remote).write_bytes(files["64MiB"].read_bytes())
    out = tmp_path / "partial.bin"
    proc = slow_get(lab, lab.addresses.service_a, remote, out, 8 << 20)
    assert wait_for(lambda: out.exists() and out.stat().st_size > (1 << 20), timeout=30)
    assert proc.poll() is None, "the client finished before it could be cut off"
    proc.kill()
    proc.wait(10)
    assert out.stat().st_size < SIZES["64MiB"]
    # the node cleans up that connection and goes on serving everyone else
    assert wait_for(lambda: next(s for s in node_a.status()["services"] if s["name"] == "smb")
                    ["connections_active"] == 0)
    smb_get(lab, lab.addresses.service_a, "hello.txt", tmp_path / "hello.txt").check()
    assert (tmp_path / "hello.txt").read_bytes() == (lab.smb_share_path / "hello.txt").read_bytes()
