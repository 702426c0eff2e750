"""Process supervision by PID: what the lab started, recorded in PID files, and stopped again.

Why PIDs and not names: several labs (and other people's processes) run on one machine, so a process
is ours only if its PID is recorded *and* its command name and network namespace still match (a
recycled PID fails that check). Daemons outlive the CLI and are reparented to PID 1; on this VM PID 1
does not reap, so stopped daemons may remain as zombies: liveness treats zombies as dead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Sequence

from . import netns

__all__ = ["KILL_TIMEOUT", "proc_state", "pid_alive", "kill_pids", "pids_in_namespaces", "Supervisor"]

KILL_TIMEOUT = 5.0


def proc_state(pid: int) -> str | None:
    """The one-letter state of a process (R, S, Z ...), None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # field after the ")" that closes comm
    return stat[stat.rindex(")") + 2:].split()[0]


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except OSError:  # not our child (ChildProcessError) or already reaped
        pass


def pid_alive(pid: int | None, comm: str | None = None, ns: str | None = None) -> bool:
    """True if pid exists, is not a zombie, and (when given) has that comm and lives in netns ns."""
    if not pid:
        return False
    _reap(pid)
    st = proc_state(pid)
    if st is None or st in ("Z", "X"):
        return False
    if comm is not None:
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() != comm[:15]:
                return False
        except OSError:
            return False
    if ns is not None:
        want = netns.namespace_inode(f"/run/netns/{ns}")
        # if the namespace is already gone (crashed down), comm alone must do
        if want is not None and want != netns.namespace_inode(f"/proc/{pid}/ns/net"):
            return False
    return True


def kill_pids(pids: Sequence[int], timeout: float = KILL_TIMEOUT) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL whatever is left (and wait for that too)."""
    live = [p for p in pids if pid_alive(p)]
    for p in live:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while live and time.monotonic() < deadline:
        live = [p for p in live if pid_alive(p)]
        if live:
            time.sleep(0.05)
    for p in live:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 2
    while live and time.monotonic() < deadline:
        live = [p for p in live if pid_alive(p)]
        if live:
            time.sleep(0.02)


def pids_in_namespaces(namespaces: Sequence[str]) -> dict[int, str]:
    """Live processes in one of these network namespaces (found by namespace inode), and where."""
    inodes = {}
    for ns in namespaces:
        ino = netns.namespace_inode(f"/run/netns/{ns}")
        if ino is not None:
            inodes[ino] = ns
    if not inodes:
        return {}
    me = os.getpid()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        ino = netns.namespace_inode(f"/proc/{entry}/ns/net")
        if ino in inodes and proc_state(int(entry)) not in (None, "Z", "X"):
            found[int(entry)] = inodes[ino]
    return found


class Supervisor:
    """Named daemons in one namespace, each recorded in ``run_dir/NAME.pid``.

    ``programs`` maps a name to the command name (comm) the daemon runs as; a recorded PID counts as
    ours only with that comm in namespace ``ns``.
    """

    def __init__(self, run_dir: Path, ns: str, programs: dict[str, str]) -> None:
        self.run_dir = run_dir
        self.ns = ns
        self.programs = programs
        self._procs: dict[str, subprocess.Popen] = {}

    def pid_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def read_pid(self, name: str) -> int | None:
        try:
            return int(self.pid_file(name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _record(self, name: str, pid: int) -> None:
        tmp = self.pid_file(name).with_suffix(".tmp")
        tmp.write_text(f"{pid}\n")
        tmp.replace(self.pid_file(name))

    def spawn(self, name: str, argv: list[str], log: Path) -> subprocess.Popen:
        """Start ``argv`` in the namespace (stdin /dev/null, output appended to ``log``), record its PID."""
        with open(log, "ab") as out:
            proc = netns.popen(self.ns, argv, stdin=subprocess.DEVNULL, stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        self._procs[name] = proc
        self._record(name, proc.pid)
        return proc

    def alive(self, name: str) -> bool:
        proc = self._procs.get(name)
        if proc is not None and proc.pid == self.read_pid(name):
            # our own child: right after spawning it may still be `ip`/`unshare`/`nsenter` before exec
            return proc.poll() is None
        return pid_alive(self.read_pid(name), self.programs[name], self.ns)

    def returncode(self, name: str) -> int | None:
        """The exit status of a daemon this object started (None: running, or not started here)."""
        proc = self._procs.get(name)
        return proc.poll() if proc is not None else None

    def stop(self, name: str) -> None:
        """Stop the recorded daemon, if the PID is still it (comm + namespace), and forget it."""
        pid = self.read_pid(name)
        if pid and pid_alive(pid, self.programs[name], self.ns):
            kill_pids([pid])
        self.pid_file(name).unlink(missing_ok=True)
        proc = self._procs.pop(name, None)
        if proc is not None:
            try:
                proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass

    def listening_ports(self, name: str) -> set[int]:
        """TCP ports in LISTEN state whose socket belongs to the recorded process."""
        pid = self.read_pid(name)
        if not pid:
            return set()
        try:
            inodes = set()
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
            ports = set()
            for table in ("tcp", "tcp6"):
                try:
                    lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
                except OSError:
                    continue
                for line in lines:
                    f = line.split()
                    if len(f) > 9 and f[3] == "0A" and f[9] in inodes:
                        ports.add(int(f[1].rsplit(":", 1)[1], 16))
            return ports
        except OSError:
            return set()
