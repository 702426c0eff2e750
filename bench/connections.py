"""Connection-count benchmark: how many connections one node takes, how fast, at what cost.

    sudo .venv/bin/python bench/connections.py [--prefix ppc] [--short 5000] [--parallel 16]
        [--concurrent 2000] [--idle 9000] [--json FILE]

In its own lab (prefix ``ppc``, root in a temp dir under /var/tmp, torn down at the end) it runs node
a with three services: ``nfs`` (2049 -> ganesha 2049, source ports below 1024), ``nfs-open``
(12049 -> ganesha 2049, ``secure = false``) and ``echo`` (7777 -> an echo server on the lab server).
Clients are deploy/lab/scripts/tcp_clients.py in the client namespace (one process, non-blocking).

* ``short``: ``--short`` ONC RPC NULL calls (NFSv3), each over a fresh TCP connection, ``--parallel``
  at a time, through the node (nfs) and direct to ganesha: connections/s, all answered or not.
* ``concurrent``: ``--concurrent`` NFS connections open at once through ``nfs-open`` (one NULL each),
  then one more call each and a clean close.
* ``idle``: ``--idle`` echo connections open at once; the node's descriptors and RSS before and while
  they are open (/proc), per connection; then one more echo each and a clean close.

Prints one JSON document (also to ``--json``). Exit 0 unless something broke.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deploy.lab import Lab  # noqa: E402
from deploy.lab.clients import SCRIPTS, NodeProcess  # noqa: E402

TCP_CLIENTS = SCRIPTS / "tcp_clients.py"


def proc_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def proc_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def config_text(lab: Lab, state: Path) -> str:
    a, server = lab.addresses, lab.addresses.server
    return f"""[node]
name = "a"
interface = "eth0"
address = "{a.service_a}/{a.prefixlen}"
state_dir = "{state}"
control = "{state / 'control.sock'}"
grace = "2s"

[[service]]
name = "nfs"
protocol = "nfs"
port = 2049
backend = "{server}:2049"
extra_ports = []

[[service]]
name = "nfs-open"
protocol = "nfs"
port = 12049
backend = "{server}:2049"
extra_ports = []
secure = false

[[service]]
name = "echo"
protocol = "tcp"
port = 7777
backend = "{server}:7777"
"""


def clients(lab: Lab, *args: str) -> dict:
    cp = lab.run(lab.ns_client, [sys.executable, str(TCP_CLIENTS), *args], capture_output=True, text=True,
                 timeout=600)
    if cp.returncode:
        raise RuntimeError(cp.stderr[-1000:])
    return json.loads(cp.stdout.splitlines()[-1])


def held(lab: Lab, node: NodeProcess, port: int, count: int, *rpc: str) -> dict:
    proc = lab.popen(lab.ns_client, [sys.executable, str(TCP_CLIENTS), *rpc, "hold", lab.addresses.service_a,
                                     str(port), str(count)],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        fds0, rss0 = proc_fds(node.pid), proc_rss_kib(node.pid)  # hold starts slowly (python start-up)
        opened = json.loads(proc.stdout.readline())
        fds1, rss1 = proc_fds(node.pid), proc_rss_kib(node.pid)
        out, err = proc.communicate("\n", timeout=600)
        closed = json.loads(out.splitlines()[-1])
        return {"opened": opened, "closed": closed, "node_fds_before": fds0, "node_fds_open": fds1,
                "node_rss_kib_before": rss0, "node_rss_kib_open": rss1,
                "fds_per_connection": round((fds1 - fds0) / max(1, opened["open"]), 3),
                "rss_kib_per_connection": round((rss1 - rss0) / max(1, opened["open"]), 2)}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefix", default="ppc")
    ap.add_argument("--short", type=int, default=5000)
    ap.add_argument("--parallel", type=int, default=16)
    ap.add_argument("--concurrent", type=int, default=2000)
    ap.add_argument("--idle", type=int, default=9000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    root = tempfile.mkdtemp(prefix=f"pairproxy-bench-{args.prefix}-", dir="/var/tmp")
    lab = Lab(prefix=args.prefix, root=root)
    echo = node = None
    result: dict = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "hard_nofile": int(subprocess.run(["bash", "-c", "ulimit -Hn"], capture_output=True,
                                                      text=True).stdout)}
    try:
        lab.up()
        state = lab.root / "bench-node"
        state.mkdir()
        config = lab.root / "bench-a.toml"
        config.write_text(config_text(lab, state))
        echo = lab.popen(lab.ns_server, [sys.executable, str(TCP_CLIENTS), "echo-server", lab.addresses.server,
                                         "7777"], stdout=subprocess.PIPE, text=True)
        assert echo.stdout.readline().strip() == "ready"
        node = NodeProcess(lab, "a", config=config, log=lab.root / "bench-node.log").start()
        a, server = lab.addresses.service_a, lab.addresses.server
        result["short_direct"] = clients(lab, "--rpc", "100003:3", "short", server, "2049",
                                         str(args.short), str(args.parallel))
        result["short_node"] = clients(lab, "--rpc", "100003:3", "short", a, "2049",
                                       str(args.short), str(args.parallel))
        result["concurrent_nfs_open"] = held(lab, node, 12049, args.concurrent, "--rpc", "100003:3")
        result["idle_echo"] = held(lab, node, 7777, args.idle)
        time.sleep(1)
        result["node_fds_after"] = proc_fds(node.pid)
        result["services"] = {s["name"]: s for s in node.status()["services"]}
    finally:
        if node is not None:
            node.stop()
        if echo is not None:
            echo.kill()
            echo.wait()
        lab.down()
        shutil.rmtree(root, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
