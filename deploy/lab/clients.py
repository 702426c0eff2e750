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
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable
from pathlib import Path

from .core import Lab, LabError


#: Small smbprotocol clients run inside the client namespace (see their docstrings).
SCRIPTS = Path(__file__).resolve().parent / "scripts"
SMB_COPY = SCRIPTS / "smb_copy.py"
SMB_HOLD = SCRIPTS / "smb_hold.py"


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


def established(lab: Lab, address: str, port: int) -> set[str]:
    """Local ends ("IP:PORT") of the client namespace's established connections to address:port."""
    out = lab.run(lab.ns_client, ["ss", "-tnH", "state", "established", "dst", f"{address}:{port}"],
                  capture_output=True, text=True).stdout
    return {line.split()[2] for line in out.splitlines() if line.strip()}


def serving(address: str, node: str):
    """A status predicate: ``node`` serves ``address`` now (its own, or the peer's after a takeover)."""
    def check(status: dict) -> bool:
        a = status.get("pair", {}).get("addresses", {}).get(address)
        return bool(a) and a["held_by"] == node and a["role"] in ("serving", "holding")
    return check


def hears_peer_on_both_paths(status: dict) -> bool:
    """A status predicate: the peer is alive and this node's heartbeat process hears it on the sync
    link and on the service network (a test that cuts one path needs both up first: a path never up
    cannot go down)."""
    pair = status.get("pair", {})
    paths = (pair.get("heartbeat") or {}).get("paths", {})
    return pair.get("peer_state") == "alive" and len(paths) == 2 and all(p["up"] for p in paths.values())


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.005) -> float:
    """Poll until ``predicate()`` holds; the time it did. LabError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(step)
    raise LabError(f"{what} not within {timeout:g}s")


def rst_guard_in(lab: Lab, ns: str, address: str) -> bool:
    """Whether namespace ``ns`` has the FIN/RST guard table of ``address`` (:mod:`proxy.rstguard`)."""
    code = f"from proxy import rstguard; print(rstguard.drops({address!r}) is not None)"
    out = lab.run(ns, [sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return out.strip() == "True"


def takeover_settled(address: str, node: str):
    """A status predicate: ``node`` holds ``address`` after a takeover and has decided every connection
    of the dead peer (continued or reset: the takeover's counts are final). Serving comes first: a
    status read in between shows the address up with the counts still at 0."""
    is_serving = serving(address, node)

    def check(status: dict) -> bool:
        takeovers = status.get("pair", {}).get("takeovers") or []
        return is_serving(status) and bool(takeovers) and takeovers[-1]["address"] == address and \
            takeovers[-1].get("settled_ms") is not None
    return check


class NodeProcess:
    """``pairproxy run`` of one lab node config in that node's namespace, owned by PID."""

    def __init__(self, lab: Lab, node: str, config: Path | None = None, log: Path | None = None,
                 pair: bool = False, mode: str = "stateless", env: dict[str, str] | None = None):
        self.lab = lab
        self.env = env  # added to this process's environment (e.g. proxy.observer.DELAY_ENV)
        self.node = node
        self.ns = lab.ns_a if node == "a" else lab.ns_b
        self.config = config or lab.node_config_path(node, pair=pair, mode=mode)
        self.log = log or lab.root / f"node-{node}.log"
        self.proc: subprocess.Popen | None = None

    def _cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "proxy.cli", *args]

    def start(self, timeout: float = 15) -> "NodeProcess":
        """Start the node and wait until its control socket says it is serving."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            # its own process group: the node and the children it starts (observer, heartbeat), which
            # kill_hard's dead machine kills at once
            self.proc = self.lab.popen(self.ns, self._cli("run", "-c", str(self.config)),
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                       env={**os.environ, **self.env} if self.env else None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LabError(f"node {self.node} exited with {self.proc.returncode} at start:\n"
                               + self.log.read_text(errors="replace")[-1500:])
            try:
                if self.status().get("state") in ("serving", "pair"):
                    return self
            except LabError:
                pass
            time.sleep(0.05)
        self.kill()
        raise LabError(f"node {self.node} did not start serving within {timeout:g}s; log: {self.log}")

    @property
    def control_socket(self) -> Path:
        from proxy.config import load_config

        return load_config(self.config).node.control

    def status(self, tables: bool = True) -> dict:
        """The node's status over its control socket (what ``pairproxy status --json`` prints);
        LabError if it does not answer. The socket is a file, so this works from any namespace.
        ``tables=False``: without a stateful node's decoded tables and digests (cheap to poll)."""
        from proxy.control import ControlError, request

        try:
            return request(self.control_socket, "status", timeout=5, **({} if tables else {"tables": False}))
        except ControlError as exc:
            raise LabError(f"status of node {self.node}: {exc}") from None

    def wait_for(self, predicate, timeout: float = 10, what: str = "condition", tables: bool = True) -> dict:
        """Poll the status (every 20 ms) until ``predicate(status)`` holds; the status then. LabError on
        timeout. ``tables=False`` polls the cheap status (see :meth:`status`)."""
        deadline = time.monotonic() + timeout
        last: dict | str = "no answer"
        while time.monotonic() < deadline:
            try:
                last = self.status(tables)
                if predicate(last):
                    return last
            except LabError as exc:
                last = str(exc)
            time.sleep(0.02)
        raise LabError(f"node {self.node}: {what} not reached within {timeout:g}s; last status: {last}")

    def kill_hard(self, link_down: bool = True, links: tuple[str, ...] = ("eth0",)) -> float:
        """A node death: SIGKILL (and ``links`` down first, as a dead machine); the time it happened.

        A dead machine's processes all stop at once: with ``link_down`` the node's whole process group
        gets the SIGKILL, its observer and heartbeat children too. Left to notice their parent's death
        and exit on their own, they ran on for milliseconds (a stateful node's observer: 3-6 ms of CPU)
        on the lab's shared cores during the survivor's takeover, which no dead machine does.
        ``link_down=False`` is the process alone crashing, its kernel alive: only the node's process,
        its children leave as they do then.

        ``links=("eth0", "sync0")`` is a whole machine dying: both links go down in one ``ip -batch``
        (microseconds apart), so neither heartbeat path outlives the other."""
        if link_down:
            self.lab.set_links(self.ns, links, "down")
        at = time.monotonic()
        if link_down and self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group this object started (start)
            self.proc.wait(10)
        self.kill()
        return at

    def link_up(self, links: tuple[str, ...] = ("eth0",)) -> None:
        """The dead node's machine comes back: as after a reboot, its kernel holds none of the
        addresses the killed process had (``pairproxy cleanup``, what boot or systemd's
        ExecStopPost would do), then its links come up."""
        self.lab.run(self.ns, self._cli("cleanup", "-c", str(self.config)), check=True, capture_output=True)
        self.lab.set_links(self.ns, links, "up")

    def handover(self, back: bool = False) -> tuple[subprocess.CompletedProcess, float]:
        """``pairproxy handover`` (``--back``) for this node, as an operator runs it; the result and
        how long it took (it returns once the address has arrived)."""
        argv = self._cli("handover", "-c", str(self.config)) + (["--back"] if back else [])
        start = time.monotonic()
        done = self.lab.run(self.ns, argv, capture_output=True, text=True, timeout=60)
        return done, time.monotonic() - start

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


class IoLoop:
    """Continuous client I/O through one address, like a user's job: write a file, read it back,
    compare. A failed operation is retried (as a re-mounting client would), and every operation's
    start, end and outcome are kept, so outages can be measured from the client's side.

    ``kind``: "smb" (smbclient), "nfs" (libnfs nfs-cp, NFSv3) or "smbprotocol" (Python client).
    Runs in a thread: the clients are separate processes in the client namespace anyway.
    """

    def __init__(self, lab: Lab, host: str, kind: str, work: Path, size: int = 64 << 10, op_timeout: float = 5.0):
        self.lab, self.host, self.kind, self.work, self.size = lab, host, kind, work, size
        #: like a soft mount's timeout: a client waiting for a reply on a connection the dead node
        #: had acknowledged sends nothing, so only its own timer ends the wait (stateless mode)
        self.op_timeout = op_timeout
        self.stop = threading.Event()
        self.done: list[tuple[str, str]] = []                  # (remote name, sha256) written and read back
        self.ops: list[tuple[float, float, bool]] = []        # (start, end, ok), time.monotonic()
        self.corrupt: list[str] = []
        self.last_error: str | None = None
        #: names are unique per loop: files of earlier runs must not collide (libnfs creates exclusively)
        self.token = os.urandom(3).hex()
        self._thread: threading.Thread | None = None

    def _one(self, i: int) -> None:
        src = random_file(self.work / f"{self.kind}-src-{i}.bin", self.size)
        remote = f"loop-{self.kind}-{self.token}-{i}.bin"
        back = self.work / f"{self.kind}-back-{i}.bin"
        timeout = self.op_timeout
        if self.kind == "smb":
            smb_put(self.lab, self.host, src, remote, timeout=timeout).check()
            smb_get(self.lab, self.host, remote, back, timeout=timeout).check()
        elif self.kind == "nfs":
            nfs_put(self.lab, self.host, src, remote, 3, timeout=timeout).check()
            nfs_get(self.lab, self.host, remote, back, 3, timeout=timeout).check()
        else:
            script = SMB_COPY
            for op, local in (("put", src), ("get", back)):
                cp = self.lab.run(self.lab.ns_client, [sys.executable, str(script), op, self.host, self.lab.smb_share,
                                                       self.lab.smb_user, self.lab.smb_password, str(local), remote],
                                  capture_output=True, text=True, timeout=timeout)
                if cp.returncode:
                    raise LabError(cp.stderr[-300:])
        want = sha256_of(src)
        if sha256_of(back) != want:
            self.corrupt.append(remote)
            raise LabError(f"{remote}: read back differs")
        self.done.append((remote, want))
        src.unlink()
        back.unlink()

    def _run(self) -> None:
        i = 0
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                self._one(i)
                ok = True
            except (LabError, subprocess.TimeoutExpired, OSError) as exc:
                ok = False
                self.last_error = str(exc)[-300:]
            i += 1  # a retry writes a new file: an interrupted create may have left the old name
            self.ops.append((start, time.monotonic(), ok))
            if not ok:
                time.sleep(0.02)

    def start(self) -> "IoLoop":
        self._thread = threading.Thread(target=self._run, name=f"io-{self.kind}", daemon=True)
        self._thread.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        if self._thread is not None:
            self._thread.join(60)

    def wait_ops(self, more: int, timeout: float = 30) -> None:
        """Wait until ``more`` further operations have succeeded; LabError if not within ``timeout``."""
        target = len(self.done) + more
        deadline = time.monotonic() + timeout
        while len(self.done) < target and time.monotonic() < deadline and not self.corrupt:
            time.sleep(0.02)
        if self.corrupt:
            raise LabError(f"{self.kind}: data read back differs: {self.corrupt}")
        if len(self.done) < target:
            raise LabError(f"{self.kind}: only {len(self.done)} operations within {timeout:g}s, wanted {target}")

    def outage_around(self, at: float) -> float | None:
        """Client-visible outage around the moment ``at``: from the end of the last operation that
        succeeded before ``at`` to the end of the first one that succeeded after it, minus one
        normal operation's duration (so it measures the gap, not the work). None if unknown yet."""
        before = [end for start, end, ok in self.ops if ok and end <= at]
        after = [(start, end) for start, end, ok in self.ops if ok and start >= at - 0.0]
        spanning = [(start, end) for start, end, ok in self.ops if ok and start < at < end]
        if not before or not (after or spanning):
            return None
        first_after = min(end for _, end in after + spanning)
        normal = sorted(end - start for start, end, ok in self.ops if ok)[len([1 for *_, ok in self.ops if ok]) // 2]
        return max(0.0, first_after - max(before) - normal)

    def stored(self) -> Path:
        return self.lab.smb_share_path if self.kind != "nfs" else self.lab.nfs_export_path

    def remove_stored(self) -> None:
        """Delete the files this loop wrote (and any an interrupted attempt left) on the server."""
        for path in self.stored().glob(f"loop-{self.kind}-{self.token}-*.bin"):
            path.unlink(missing_ok=True)

    def verify_stored(self) -> list[str]:
        """Names of files this loop wrote whose content on the server is not what was written."""
        return [remote for remote, digest in self.done if sha256_of(self.stored() / remote) != digest]


class SmbHolder:
    """An idle SMB client holding a file open (scripts/smb_hold.py in the client namespace), driven
    one command at a time: ``do("write")``, ``do("reopen")``; each answer is a dict."""

    def __init__(self, lab, host: str, name: str):
        self.proc = lab.popen(lab.ns_client, [sys.executable, str(SMB_HOLD), host, lab.smb_share, lab.smb_user,
                                              lab.smb_password, name],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not json.loads(line or "{}").get("ready"):
            self.close()
            raise LabError(f"smb_hold.py did not start: {line or self.proc.stderr.read()[-500:]}")

    def do(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("exit\n")
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
