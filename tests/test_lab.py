"""The namespace lab with real Samba and NFS-Ganesha (needs root)."""

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from deploy.lab import Lab

pytestmark = pytest.mark.lab


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


@pytest.fixture
def workdir():
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        os.chmod(d, 0o755)
        yield Path(d)


def test_topology(lab):
    st = lab.status()
    assert st["up"]
    assert all(st["namespaces"].values())
    a = lab.addresses
    assert st["interfaces"][lab.ns_client]["eth0"] == [f"{a.client}/24"]
    assert st["interfaces"][lab.ns_server]["eth0"] == [f"{a.server}/24"]
    assert st["interfaces"][lab.ns_a] == {"eth0": [f"{a.admin_a}/24"], "sync0": [f"{a.sync_a}/24"]}
    assert st["interfaces"][lab.ns_b] == {"eth0": [f"{a.admin_b}/24"], "sync0": [f"{a.sync_b}/24"]}
    mac = lab.run(lab.ns_a, ["cat", "/sys/class/net/eth0/address"], capture_output=True, text=True)
    assert mac.stdout.strip() == "02:77:00:00:00:0a"
    v6 = lab.run(lab.ns_b, ["sysctl", "-n", "net.ipv6.conf.eth0.disable_ipv6"], capture_output=True, text=True)
    assert v6.stdout.strip() == "1"
    # the sync link works between the nodes, and the node configs exist
    ping = lab.run(lab.ns_a, ["ping", "-c1", "-W2", a.sync_b], capture_output=True)
    assert ping.returncode == 0
    text = lab.node_config_path("b").read_text()
    assert 'address = "10.77.0.2/24"' in text and 'backend = "10.77.0.10:2049"' in text


def test_status_servers_alive(lab):
    st = lab.status()
    for name in ("smbd", "rpcbind", "ganesha"):
        assert st["servers"][name]["alive"], name
        assert _alive(st["servers"][name]["pid"])


def test_smbclient_roundtrip(lab, workdir):
    data = os.urandom(3 * 1024 * 1024 + 17)
    (workdir / "up.bin").write_bytes(data)
    cp = lab.smbclient(lab.addresses.server, "put up.bin smb-rt.bin; get smb-rt.bin down.bin", cwd=workdir)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert (workdir / "down.bin").read_bytes() == data
    assert (lab.smb_share_path / "smb-rt.bin").read_bytes() == data


def test_smbclient_reads_test_data(lab, workdir):
    cp = lab.smbclient(lab.addresses.server, "get data-1M.bin d.bin", cwd=workdir)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert (workdir / "d.bin").read_bytes() == (lab.smb_share_path / "data-1M.bin").read_bytes()


def test_nfs3_copy_both_ways(lab, workdir):
    data = os.urandom(2 * 1024 * 1024 + 5)
    (workdir / "up.bin").write_bytes(data)
    url = lab.nfs_url(lab.addresses.server, "nfs3-rt.bin", version=3)
    assert url == f"nfs://10.77.0.10{lab.nfs_export_path}/nfs3-rt.bin?version=3"
    cp = lab.run(lab.ns_client, ["nfs-cp", str(workdir / "up.bin"), url], capture_output=True, text=True,
                 timeout=60)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert (lab.nfs_export_path / "nfs3-rt.bin").read_bytes() == data
    cp = lab.run(lab.ns_client, ["nfs-cp", url, str(workdir / "down.bin")], capture_output=True, text=True,
                 timeout=60)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert (workdir / "down.bin").read_bytes() == data
    ls = lab.run(lab.ns_client, ["nfs-ls", lab.nfs_url(lab.addresses.server, "", 3)],
                 capture_output=True, text=True, timeout=30)
    assert ls.returncode == 0 and "nfs3-rt.bin" in ls.stdout and "hello.txt" in ls.stdout


def test_nfs4_cat(lab):
    url = lab.nfs_url(lab.addresses.server, "hello.txt", version=4)
    assert url == "nfs://10.77.0.10/export/hello.txt?version=4"
    cp = lab.run(lab.ns_client, ["nfs-cat", url], capture_output=True, timeout=30)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == (lab.nfs_export_path / "hello.txt").read_bytes()
    cp = lab.run(lab.ns_client, ["nfs-cat", lab.nfs_url(lab.addresses.server, "data-1M.bin", version=4)],
                 capture_output=True, timeout=30)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == (lab.nfs_export_path / "data-1M.bin").read_bytes()


def test_up_is_idempotent(lab):
    before = lab.status()["servers"]
    lab.up()
    after = lab.status()["servers"]
    assert {k: v["pid"] for k, v in after.items()} == {k: v["pid"] for k, v in before.items()}
    assert all(v["alive"] for v in after.values())
    # exactly one main smbd / rpcbind / ganesha.nfsd in the server namespace
    srv_ino = os.stat(f"/run/netns/{lab.ns_server}").st_ino
    counts: dict[str, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or not _alive(int(entry)):
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino != srv_ino:
                continue
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
        except OSError:
            continue
        counts[comm] = counts.get(comm, 0) + 1
    assert counts.get("smbd") == 1 and counts.get("rpcbind") == 1 and counts.get("ganesha.nfsd") == 1, counts


def test_restarts_dead_server(lab):
    pid = lab.status()["servers"]["smbd"]["pid"]
    os.kill(pid, 9)
    lab.up()
    st = lab.status()["servers"]["smbd"]
    assert st["alive"] and st["pid"] != pid
    assert lab.smbclient(lab.addresses.server, "ls").returncode == 0


def test_up_down_leaves_nothing():
    prefix = os.environ.get("PAIRPROXY_TEST_LAB", "ppt") + "d"  # apart from the session's lab
    root = tempfile.mkdtemp(prefix=f"pairproxy-lab-{prefix}-", dir="/var/tmp")
    lab = Lab(prefix=prefix, root=root)
    names = {lab.ns_client, lab.ns_a, lab.ns_b, lab.ns_server, lab.ns_switch}
    try:
        lab.up()
        assert names <= _netns()
        pids = [s["pid"] for s in lab.status()["servers"].values()]
        assert all(_alive(p) for p in pids)
    finally:
        lab.down(purge=True)
    assert not any(n.startswith("ppd-") for n in _netns())
    assert not any(_alive(p) for p in pids)
    assert not Path(root).exists()
    lab.down()  # idempotent
