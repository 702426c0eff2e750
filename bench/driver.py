"""What every benchmark here needs, in one place: its own lab, nodes, probes, baselines, cleanup.

* :class:`Bench`: a benchmark's run as a context manager. It owns the lab (its own prefix and root,
  torn down at the end unless ``keep_lab``), a work directory, and everything started or changed
  inside the lab: processes (nodes, haproxy, keepalived, probes) are stopped by PID, kernel changes
  (bridge flood mode, extra addresses, sysctls, links) undone in reverse order, also on errors,
  Ctrl-C and SIGTERM.
* Nodes: :meth:`Bench.pair_configs` writes the lab's pair configs with the timings a setup asks for
  (as config data, through ``Lab.write_node_config``); :func:`~deploy.lab.clients.NodeProcess` runs them.
* Probes in the client namespace: :class:`Probe` (bench/_failprobe.py: new connections, SMB2 NEGOTIATE
  and NFS NULL, many in flight), :class:`IdleProbe` (bench/_idleprobe.py: idle connections and when
  each one ended), :func:`small_ops` (bench/_smallops.py: per-operation latency).
* Copies: :func:`copies` (smbclient and nfs-cp, each way, checksums, proxy CPU).
* Baselines: :class:`HAProxy` (``mode tcp``) and :class:`KeepalivedNode` (keepalived VRRPv3 + haproxy).
* Reporting helpers: :func:`stats`, :func:`ms`, :func:`cpu_seconds`, :func:`system_busy`, :func:`run_info`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, TypeVar

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from deploy.lab import Lab, LabError, PairTimings  # noqa: E402
from deploy.lab.clients import (NodeProcess, Transfer, nfs_get, nfs_put, random_file, wait_until,  # noqa: E402
                                serving, sha256_of, smb_get, smb_put)
from deploy.lab.processes import pid_alive  # noqa: E402

BENCH = REPO / "bench"
FAIL_PROBE = BENCH / "_failprobe.py"
IDLE_PROBE = BENCH / "_idleprobe.py"
SMALL_OPS = BENCH / "_smallops.py"
PROTOS = ("smb", "nfs")
CLK_TCK = os.sysconf("SC_CLK_TCK")

__all__ = ["Bench", "Probe", "IdleProbe", "HAProxy", "KeepalivedNode", "copies", "small_ops", "say",
           "wait_until", "standing_by", "serving", "stats", "ms", "cpu_seconds", "system_busy", "run_info",
           "Lab", "LabError", "NodeProcess", "PairTimings", "PROTOS", "random_file", "sha256_of"]


def say(text: str = "") -> None:
    print(text, flush=True)


class Stoppable(Protocol):
    def stop(self) -> Any: ...


S = TypeVar("S", bound=Stoppable)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# --------------------------------------------------------------------------------------- Bench
class Bench:
    """One benchmark run: the lab, the work directory, and everything to stop and undo at the end.

    ::

        with Bench("failover", prefix=args.prefix, keep_lab=args.keep_lab) as bench:
            bench.up()
            node = bench.started(NodeProcess(bench.lab, "a")).start()
            ...
    """

    def __init__(self, name: str, prefix: str, default_prefix: str | None = None, root: str | None = None,
                 keep_lab: bool = False, keep_work: bool = False, workdir: str = "/var/tmp") -> None:
        self._own_root = root is None  # a directory given by the caller is theirs: not removed
        if root is None:
            base = f"/var/tmp/pairproxy-{name}-lab"
            root = base if prefix == default_prefix else f"{base}-{prefix}"
        self.name = name
        self.lab = Lab(prefix=prefix, root=root)
        self.keep_lab = keep_lab
        self.keep_work = keep_work
        self.work = Path(tempfile.mkdtemp(prefix=f"pairproxy-{name}-", dir=workdir))
        self._running: list[Stoppable] = []
        self._undo = contextlib.ExitStack()
        self._flooding = False
        self._flood_undo = False

    # ---- life cycle
    def __enter__(self) -> "Bench":
        signal.signal(signal.SIGTERM, _interrupt)
        # and Ctrl-C's SIGINT also when started in the background (``&`` in a script): the shell starts
        # such a job with SIGINT ignored, and its lab would stay up until a SIGTERM
        signal.signal(signal.SIGINT, signal.default_int_handler)
        return self

    def __exit__(self, *exc_info) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            self.stop_all()
            try:
                self._undo.close()
            except (LabError, subprocess.SubprocessError, OSError) as exc:
                say(f"{self.name}: undoing a lab change: {exc}")
            if not self.keep_lab:
                try:
                    self.lab.down(purge=self._own_root)  # and its own directory: nothing left in /var/tmp
                except LabError as exc:
                    say(f"{self.name}: lab down: {exc}")
            else:
                say(f"lab {self.lab.prefix} left up (--keep-lab); tear down: "
                    f"pairproxy lab down --prefix {self.lab.prefix} --dir {self.lab.root}")
            if self.keep_work:
                say(f"logs kept in {self.work}")
            else:
                shutil.rmtree(self.work, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def up(self) -> Lab:
        say(f"lab {self.lab.prefix} ({self.lab.root}): up ...")
        self.lab.up()
        return self.lab

    # ---- processes
    def started(self, thing: S) -> S:
        """Track ``thing`` (before its start, so a half-started one is stopped too)."""
        self._running.append(thing)
        return thing

    def stop(self, thing: Stoppable) -> Any:
        """Stop one tracked thing now; what its stop() returned."""
        if thing in self._running:
            self._running.remove(thing)
        return thing.stop()

    def stop_all(self) -> None:
        while self._running:
            thing = self._running.pop()
            try:
                thing.stop()
            except (LabError, subprocess.SubprocessError, OSError) as exc:
                say(f"{self.name}: stopping {type(thing).__name__}: {exc}")

    # ---- lab changes, undone at the end
    def defer(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run ``fn(*args, **kwargs)`` at the end (in reverse order of registration)."""
        self._undo.callback(fn, *args, **kwargs)

    def flood(self, on: bool) -> None:
        """The service bridge hub-like or learning; set back to learning at the end."""
        if on == self._flooding:
            return
        if on and not self._flood_undo:
            self.defer(self._flood_off)
            self._flood_undo = True
        self.lab.flood(on)
        self._flooding = on

    def _flood_off(self) -> None:
        if self._flooding and self.lab.ns_switch in Lab.existing_namespaces():
            self.lab.flood(False)
        self._flooding = False

    def add_address(self, ns: str, address: str, dev: str = "eth0") -> None:
        """``address`` (with the lab's prefix length) on ``dev`` in ``ns``; removed at the end."""
        cidr = f"{address}/{self.lab.addresses.prefixlen}"
        cp = self.lab.run(ns, ["ip", "address", "add", cidr, "dev", dev], capture_output=True, text=True)
        if cp.returncode != 0:
            raise LabError(f"cannot add {cidr} in {ns}: {cp.stderr.strip()}")
        self.defer(self.at_end_in, ns, ["ip", "address", "del", cidr, "dev", dev])

    def sysctl(self, ns: str, key: str, value: str) -> None:
        """Set a sysctl in ``ns``; its old value is restored at the end."""
        old = self.lab.run(ns, ["sysctl", "-n", key], capture_output=True, text=True).stdout.strip()
        self.lab.run(ns, ["sysctl", "-q", "-w", f"{key}={value}"], check=True, capture_output=True)
        if old:
            self.defer(self.at_end_in, ns, ["sysctl", "-q", "-w", f"{key}={old}"])

    def links_up_at_end(self, ns: str, devs: Iterable[str] = ("eth0",)) -> None:
        """A benchmark that kills a node by taking its link down brings it up again at the end."""
        for dev in devs:
            self.defer(self.at_end_in, ns, ["ip", "link", "set", dev, "up"])

    def at_end_in(self, ns: str, argv: list[str]) -> None:
        """Run ``argv`` in ``ns`` if the namespace (still) exists; what :meth:`defer` calls for undoing."""
        if ns in Lab.existing_namespaces():
            self.lab.run(ns, argv, capture_output=True)

    # ---- nodes
    def pair_configs(self, mode: str, timings: PairTimings) -> dict[str, Path]:
        """The pair's configs for ``mode`` with these timings: the lab's own files when the timings
        are the lab's, else copies in the work directory (same state directories)."""
        if timings == PairTimings():
            return {n: self.lab.node_config_path(n, pair=True, mode=mode) for n in ("a", "b")}
        tag = f"{mode}-hb{timings.heartbeat}-da{timings.dead_after}"
        return {n: self.lab.write_node_config(self.work / "configs" / f"{tag}-{n}.toml", n, pair=True,
                                              mode=mode, timings=timings) for n in ("a", "b")}


def standing_by(status: dict) -> bool:
    """A node status predicate: every address served by its owner, the sync link connected."""
    pair = status.get("pair", {})
    return all(a["role"] in ("serving", "standby") for a in pair.get("addresses", {}).values()) and \
        pair.get("link", {}).get("state") == "connected"


# -------------------------------------------------------------------------------------- probes
class JsonLinesProcess:
    """A helper script in the client namespace printing one JSON object per line; a thread reads them."""

    def __init__(self, lab: Lab, argv: list[str]) -> None:
        self.lab = lab
        self.argv = argv
        self.proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _spawn(self) -> None:
        self.proc = self.lab.popen(self.lab.ns_client, [sys.executable, *self.argv], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                self._record(rec)

    def _record(self, rec: dict) -> None:
        raise NotImplementedError

    def _stderr(self) -> str:
        if self.proc is not None and self.proc.poll() is not None and self.proc.stderr:
            return self.proc.stderr.read()[-800:]
        return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._thread is not None:
            self._thread.join(5)


class Probe(JsonLinesProcess):
    """bench/_failprobe.py via ``host``: new connections (SMB2 NEGOTIATE, NFS NULL) every few ms, each
    attempt a record ``{"p": proto, "s": start, "e": end, "ok": 0|1, "err": ...}`` (CLOCK_MONOTONIC)."""

    def __init__(self, lab: Lab, host: str) -> None:
        super().__init__(lab, [str(FAIL_PROBE), host])
        self.host = host
        self.records: list[dict] = []

    def start(self) -> "Probe":
        self._spawn()
        return self

    def _record(self, rec: dict) -> None:
        self.records.append(rec)

    def snapshot(self) -> list[dict]:
        with self._lock:
            return list(self.records)

    def oks(self, proto: str, started_after: float = 0.0) -> list[dict]:
        return [r for r in self.snapshot() if r["p"] == proto and r["ok"] and r["s"] >= started_after]

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise LabError(f"probe exited with {self.proc.returncode}: {self._stderr()}")
            if predicate():
                return
            time.sleep(0.01)
        fails = [r for r in self.snapshot() if not r["ok"]][-3:]
        raise LabError(f"probe via {self.host}: {what} not within {timeout:g}s (last failures: {fails})")

    def wait_ok(self, n: int = 10, after: float = 0.0, timeout: float = 10) -> None:
        self.wait(lambda: all(len(self.oks(p, after)) >= n for p in PROTOS), timeout,
                  f"{n} successes per protocol")

    def stop(self) -> list[dict]:  # type: ignore[override]
        super().stop()
        return self.snapshot()


class IdleProbe(JsonLinesProcess):
    """bench/_idleprobe.py via ``host``: ``smb`` + ``nfs`` idle connections, and when each one ended."""

    def __init__(self, lab: Lab, host: str, smb: int = 2, nfs: int = 2) -> None:
        super().__init__(lab, [str(IDLE_PROBE), host, "--smb", str(smb), "--nfs", str(nfs)])
        self.host = host
        self.ready: list[dict] = []
        self.events: list[dict] = []
        self._ready = threading.Event()

    def start(self, timeout: float = 10) -> "IdleProbe":
        self._spawn()
        if not self._ready.wait(timeout):
            raise LabError(f"idle probe via {self.host} not ready within {timeout:g}s {self._stderr()}")
        return self

    def _record(self, rec: dict) -> None:
        if "ready" in rec:
            self.ready = rec["ready"]
            self._ready.set()
        else:
            self.events.append(rec)

    def ended(self) -> list[dict]:
        with self._lock:
            return list(self.events)

    def notice_times(self, died: float, cap: float) -> list[dict]:
        """Per idle connection: death -> its recv() returned (None: not within ``cap``)."""
        by_i = {e["i"]: e for e in self.ended()}
        out = []
        for r in self.ready:
            e = by_i.get(r["i"])
            dt = None if e is None or e["t"] - died > cap else e["t"] - died
            out.append({"p": r["p"], "local": r["local"], "notice_s": dt, "ev": None if e is None else e["ev"],
                        "ended_before_death": e is not None and e["t"] < died})
        return out

    def wait_ended(self, died: float, cap: float) -> list[dict]:
        """Wait until every idle connection ended or ``cap`` after the death; the notice times."""
        deadline = died + cap + 0.05
        while time.monotonic() < deadline and len([e for e in self.ended() if e["t"] >= died]) < len(self.ready):
            time.sleep(0.01)
        return self.notice_times(died, cap)


def small_ops(lab: Lab, host: str, ops: int, timeout: float = 300) -> dict:
    """bench/_smallops.py via ``host``: per-operation latency of SMB2 ECHO/CREATE+CLOSE and NFS NULL."""
    cp = lab.run(lab.ns_client, [sys.executable, str(SMALL_OPS), host, str(ops)],
                 capture_output=True, text=True, timeout=timeout)
    if cp.returncode != 0:
        raise LabError(f"_smallops.py via {host} failed: {cp.stderr.strip()[-800:]}")
    return json.loads(cp.stdout)


# -------------------------------------------------------------------------------------- copies
COPIES = ("smb_write", "smb_read", "nfs_write", "nfs_read")


@dataclass
class Copy:
    """One copy through a path: the client's transfer, the proxy's CPU seconds during it, and (reads,
    when asked) whether the copy's sha256 matched the source."""

    transfer: Transfer
    proxy_cpu_s: float | None = None
    sha256_ok: bool | None = None


def copies(lab: Lab, host: str, src: Path, name: str, local: Path, *, proxy_pid: int | None = None,
           expect_sha256: str | None = None, timeout: float = 300) -> dict[str, Copy]:
    """smbclient put + get, then libnfs nfs-cp (NFSv3) put + get of ``src`` through ``host``, stored
    as ``name`` on the servers and read back into ``local``; with ``proxy_pid`` the proxy's CPU seconds
    during each. LabError if a client fails, a read is short, or a read-back copy's sha256 is not
    ``expect_sha256`` (when given). Server-side files and ``local`` are removed (Ganesha caches
    directory entries: use names unique per run, never reuse one)."""
    size = src.stat().st_size
    out: dict[str, Copy] = {}

    def timed(fn, *args) -> tuple[Transfer, float | None]:
        before = cpu_seconds(proxy_pid)
        t = fn(*args, timeout=timeout).check()
        after = cpu_seconds(proxy_pid)
        return t, (after - before if before is not None and after is not None else None)

    try:
        for proto, put, get in (("smb", smb_put, smb_get), ("nfs", nfs_put, nfs_get)):
            out[f"{proto}_write"] = Copy(*timed(put, lab, host, src, name))
            local.unlink(missing_ok=True)
            t, cpu = timed(get, lab, host, name, local)
            if t.size != size:
                raise LabError(f"{t.what}: got {t.size} bytes, want {size}")
            read = out[f"{proto}_read"] = Copy(t, cpu)
            if expect_sha256 is not None:
                read.sha256_ok = sha256_of(local) == expect_sha256
                if not read.sha256_ok:
                    raise LabError(f"{t.what}: sha256 of the copy differs from the source")
            local.unlink(missing_ok=True)
            base = lab.smb_share_path if proto == "smb" else lab.nfs_export_path
            (base / name).unlink(missing_ok=True)
    finally:
        local.unlink(missing_ok=True)
        for base in (lab.smb_share_path, lab.nfs_export_path):
            (base / name).unlink(missing_ok=True)
    return out


# ------------------------------------------------------------------------------------ baselines
def listening(lab: Lab, ns: str, address: str) -> set[int]:
    """TCP ports listening on ``address`` in ``ns``."""
    cp = lab.run(ns, ["ss", "-Hltn"], capture_output=True, text=True)
    ports = set()
    for line in cp.stdout.splitlines():
        f = line.split()
        if len(f) >= 4 and f[3].rsplit(":", 1)[0] == address:
            ports.add(int(f[3].rsplit(":", 1)[1]))
    return ports


class HAProxy:
    """haproxy 2.6 ``mode tcp`` in the foreground (``-db``, our PID) in namespace ``ns``: ``bind`` on
    each port, to the same port on the lab's server. ``source`` (optional): the address backend
    connections leave from (NFS ports from the privileged range 665-1023 pairproxy uses, for
    ``secure`` exports); ``splice`` adds ``option splice-auto``."""

    def __init__(self, lab: Lab, ns: str, bind: str, ports: Iterable[int], workdir: Path, *, threads: int = 1,
                 splice: bool = False, source: str | None = None, name: str | None = None) -> None:
        self.lab, self.ns, self.bind, self.ports = lab, ns, bind, tuple(ports)
        self.threads, self.splice, self.source = threads, splice, source
        self.name = name or f"haproxy-{threads}t" + ("-splice" if splice else "")
        self.dir = workdir / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = self.dir / "haproxy.cfg"
        self.log = self.dir / "haproxy.log"
        self.proc: subprocess.Popen | None = None

    def config(self) -> str:
        srv = self.lab.addresses.server
        lines = ["global", f"    nbthread {self.threads}", "    maxconn 2000", f"    pidfile {self.dir / 'haproxy.pid'}",
                 "defaults", "    mode tcp", "    timeout connect 5s", "    timeout client 1h",
                 "    timeout server 1h"]
        if self.splice:
            lines.append("    option splice-auto")
        for port in self.ports:
            server = f"    server s {srv}:{port}"
            if self.source:
                server += f" source {self.source}" if port == 445 else f" source {self.source}:665-1023"
            lines += [f"listen p{port}", f"    bind {self.bind}:{port}", server]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10) -> "HAProxy":
        self.cfg.write_text(self.config())
        with open(self.log, "ab") as log:
            self.proc = self.lab.popen(self.ns, ["haproxy", "-db", "-f", str(self.cfg)],
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LabError(f"{self.name} in {self.ns} exited with {self.proc.returncode}:\n"
                               + self.log.read_text(errors="replace")[-1500:])
            if self.listening():
                return self
            time.sleep(0.02)
        self.stop()
        raise LabError(f"{self.name} did not listen on {self.ports} within {timeout:g}s; log {self.log}")

    def listening(self) -> bool:
        return set(self.ports) <= listening(self.lab, self.ns, self.bind)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()


class KeepalivedNode:
    """keepalived 2.2.7 (VRRPv3, ``advert_int 0.01``, preempt) holding ``vip`` on eth0, and haproxy on
    the VIP's ports (445, 2049), in one node's namespace; all foreground processes with our PIDs.
    Needs ``net.ipv4.ip_nonlocal_bind=1`` in the namespace, so the standby's haproxy is bound already."""

    VRID = 77
    PORTS = (445, 2049)

    def __init__(self, lab: Lab, node: str, priority: int, vip: str, workdir: Path) -> None:
        self.lab, self.node, self.priority, self.vip = lab, node, priority, vip
        self.ns = lab.ns_a if node == "a" else lab.ns_b
        self.dir = workdir / f"ka-{node}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.haproxy = HAProxy(lab, self.ns, vip, self.PORTS, self.dir, name="haproxy")
        self.keepalived: subprocess.Popen | None = None

    @property
    def vrrp_pid_file(self) -> Path:
        return self.dir / "vrrp.pid"

    def config(self) -> str:
        return "\n".join([
            "global_defs {", f"    router_id ppf_{self.node}", "    vrrp_version 3", "    enable_script_security", "}",
            "vrrp_instance VI_PPF {", "    state BACKUP", "    interface eth0", f"    virtual_router_id {self.VRID}",
            f"    priority {self.priority}", "    advert_int 0.01", "    virtual_ipaddress {",
            f"        {self.vip}/{self.lab.addresses.prefixlen} dev eth0", "    }", "}", ""])

    def start(self, timeout: float = 10) -> "KeepalivedNode":
        self.haproxy.start(timeout)
        kcfg = self.dir / "keepalived.conf"
        kcfg.write_text(self.config())
        self.vrrp_pid_file.unlink(missing_ok=True)
        with open(self.dir / "keepalived.log", "ab") as log:
            self.keepalived = self.lab.popen(
                self.ns, ["keepalived", "-n", "-l", "-D", "-G", "-P", "-R", "-f", str(kcfg),
                          "-p", str(self.dir / "keepalived.pid"), "-r", str(self.vrrp_pid_file),
                          "-c", str(self.dir / "checkers.pid"), "-b", str(self.dir / "bfd.pid")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.keepalived.poll() is not None:
                raise LabError(f"keepalived in {self.ns} exited with {self.keepalived.returncode}; see {self.dir}")
            if self.vrrp_pid():
                return self
            time.sleep(0.02)
        raise LabError(f"keepalived in {self.ns} not ready within {timeout:g} s; see {self.dir}")

    def vrrp_pid(self) -> int | None:
        try:
            pid = int(self.vrrp_pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if pid_alive(pid, "keepalived") else None

    def has_vip(self) -> bool:
        cp = self.lab.run(self.ns, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"], capture_output=True, text=True)
        return f" {self.vip}/" in cp.stdout

    def remove_vip(self) -> None:
        self.lab.run(self.ns, ["ip", "addr", "del", f"{self.vip}/{self.lab.addresses.prefixlen}", "dev", "eth0"],
                     capture_output=True)

    def kill_hard(self, links: tuple[str, ...] = ("eth0",)) -> float:
        """Links down (one ``ip -batch``), then SIGKILL of keepalived's VRRP child, keepalived and
        haproxy: a dead machine."""
        self.lab.set_links(self.ns, links, "down")
        at = time.monotonic()
        vp = self.vrrp_pid()
        if vp:
            os.kill(vp, signal.SIGKILL)
        if self.keepalived is not None and self.keepalived.poll() is None:
            self.keepalived.kill()
            self.keepalived.wait(5)
        self.haproxy.kill()
        return at

    def stop(self) -> None:
        """SIGTERM (keepalived then drops the VIP), SIGKILL if it overstays; VRRP child too."""
        vp = self.vrrp_pid()
        if self.keepalived is not None and self.keepalived.poll() is None:
            self.keepalived.terminate()
            try:
                self.keepalived.wait(5)
            except subprocess.TimeoutExpired:
                self.keepalived.kill()
                self.keepalived.wait(5)
        self.haproxy.stop()
        if vp and pid_alive(vp, "keepalived"):
            os.kill(vp, signal.SIGKILL)
        self.remove_vip()


# ------------------------------------------------------------------------------------ reporting
def stats(values: list[float | None]) -> dict:
    """n, median, worst, best of the values that are not None, and how many were None."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"n": 0, "median": None, "worst": None, "best": None, "missing": len(values)}
    return {"n": len(vals), "median": statistics.median(vals), "worst": max(vals), "best": min(vals),
            "missing": len(values) - len(vals)}


def ms(v: float | None) -> str:
    """Seconds as milliseconds with one decimal, "-" for None."""
    return "-" if v is None else f"{v * 1000:.1f}"


def cpu_seconds(pid: int | None) -> float | None:
    """utime+stime of a whole process (all threads) from /proc; None if there is no such process."""
    if not pid:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def system_busy(seconds: float) -> float:
    """Percent of all CPUs busy over ``seconds`` (from /proc/stat): how loaded the machine is."""
    def sample() -> tuple[int, int]:
        v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        return sum(v), v[3] + v[4]
    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return 100.0 * (1 - (i1 - i0) / max(1, t1 - t0))


def run_info(script: str, started: datetime.datetime) -> dict:
    """What a results file records about the run: date, command, machine, git commit."""
    return {
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", f"bench/{script}", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
        "git_commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                     text=True).stdout.strip(),
    }
