"""Real clients in the lab's client namespace, and pairproxy nodes in the node namespaces.

One place for "copy a file over SMB/NFS through HOST and time it" and "start node a and wait until
it serves", shared by ``pairproxy lab demo``, the lab tests and the benchmarks, so all three measure
the same thing the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .core import Lab, LabError


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def random_file(path: Path, size: int) -> Path:
    """A file of ``size`` random bytes (written in chunks, so 1 GiB costs no 1 GiB of memory)."""
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 22)
            f.write(os.urandom(n))
            left -= n
    return path


@dataclass
class Transfer:
    """One client transfer: what ran, how long it took, whether the client said it worked."""

    what: str
    size: int
    seconds: float
    returncode: int
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def mb_per_s(self) -> float:
        return self.size / self.seconds / 1e6 if self.seconds > 0 else float("inf")

    def check(self) -> "Transfer":
        if not self.ok:
            raise LabError(f"{self.what} failed (exit {self.returncode}): {self.output.strip()[-500:]}")
        return self


def _timed(lab: Lab, what: str, size: int, argv: list[str], timeout: float, cwd: Path | None = None) -> Transfer:
    start = time.monotonic()
    cp = lab.run(lab.ns_client, argv, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    seconds = time.monotonic() - start
    return Transfer(what, size, seconds, cp.returncode, cp.stdout + cp.stderr)


def smb_put(lab: Lab, host: str, local: Path, remote: str, timeout: float = 300) -> Transfer:
    """smbclient ``put`` of ``local`` to the share as ``remote``, through ``host``."""
    argv = ["smbclient", f"//{host}/{lab.smb_share}", "-s", str(lab.smb_client_conf),
            "-U", f"{lab.smb_user}%{lab.smb_password}", "-m", "SMB3", "-c", f'put "{local}" "{remote}"']
    return _timed(lab, f"smbclient put {remote} via {host}", local.stat().st_size, argv, timeout)


def smb_get(lab: Lab, host: str, remote: str, local: Path, timeout: float = 300) -> Transfer:
    """smbclient ``get`` of ``remote`` from the share into ``local``, through ``host``."""
    argv = ["smbclient", f"//{host}/{lab.smb_share}", "-s", str(lab.smb_client_conf),
            "-U", f"{lab.smb_user}%{lab.smb_password}", "-m", "SMB3", "-c", f'get "{remote}" "{local}"']
    t = _timed(lab, f"smbclient get {remote} via {host}", 0, argv, timeout)
    t.size = local.stat().st_size if local.exists() else 0
    return t


def nfs_put(lab: Lab, host: str, local: Path, remote: str, version: int = 3, timeout: float = 300) -> Transfer:
    """libnfs ``nfs-cp`` of ``local`` to the export as ``remote``, through ``host``."""
    argv = ["nfs-cp", str(local), lab.nfs_url(host, remote, version)]
    return _timed(lab, f"nfs-cp v{version} put {remote} via {host}", local.stat().st_size, argv, timeout)


def nfs_get(lab: Lab, host: str, remote: str, local: Path, version: int = 3, timeout: float = 300) -> Transfer:
    """libnfs ``nfs-cp`` of ``remote`` from the export into ``local``, through ``host``."""
    if local.exists():
        local.unlink()  # nfs-cp does not truncate an existing local file
    argv = ["nfs-cp", lab.nfs_url(host, remote, version), str(local)]
    t = _timed(lab, f"nfs-cp v{version} get {remote} via {host}", 0, argv, timeout)
    t.size = local.stat().st_size if local.exists() else 0
    return t


def nfs_cat(lab: Lab, host: str, remote: str, version: int = 4, timeout: float = 120) -> bytes:
    """Read ``remote`` with libnfs ``nfs-cat`` (NFSv4 by default); LabError if it fails."""
    cp = lab.run(lab.ns_client, ["nfs-cat", lab.nfs_url(host, remote, version)],
                 capture_output=True, timeout=timeout)
    if cp.returncode != 0:
        raise LabError(f"nfs-cat v{version} {remote} via {host} failed: {cp.stderr.decode(errors='replace')[-300:]}")
    return cp.stdout


class NodeProcess:
    """``pairproxy run`` of one lab node config in that node's namespace, owned by PID."""

    def __init__(self, lab: Lab, node: str, config: Path | None = None, log: Path | None = None):
        self.lab = lab
        self.node = node
        self.ns = lab.ns_a if node == "a" else lab.ns_b
        self.config = config or lab.node_config_path(node)
        self.log = log or lab.root / f"node-{node}.log"
        self.proc: subprocess.Popen | None = None

    def _cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "proxy.cli", *args]

    def start(self, timeout: float = 15) -> "NodeProcess":
        """Start the node and wait until its control socket says it is serving."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = self.lab.popen(self.ns, self._cli("run", "-c", str(self.config)),
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LabError(f"node {self.node} exited with {self.proc.returncode} at start:\n"
                               + self.log.read_text(errors="replace")[-1500:])
            try:
                if self.status().get("state") == "serving":
                    return self
            except LabError:
                pass
            time.sleep(0.05)
        self.kill()
        raise LabError(f"node {self.node} did not start serving within {timeout:g}s; log: {self.log}")

    def status(self) -> dict:
        """The node's ``pairproxy status --json``; LabError if it does not answer."""
        cp = self.lab.run(self.ns, self._cli("status", "-c", str(self.config), "--json"),
                          capture_output=True, text=True, timeout=10)
        if cp.returncode != 0:
            raise LabError(f"status of node {self.node}: {cp.stderr.strip()}")
        return json.loads(cp.stdout)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def signal(self, signum: int) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM and wait (the node drains for its grace time); SIGKILL if it overstays."""
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> "NodeProcess":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
