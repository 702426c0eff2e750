"""The heartbeat process: heartbeats sent and checked off the node's event loop (issue 12).

Why a process of its own and not a task or a thread: the node's trio loop also runs the pumps, status,
hand-backs and garbage collection. A loop busy for 40 ms delayed the heartbeats (the peer then saw this
node as dead) and delayed noticing the peer's (this node then saw the peer as dead): with a 40 ms
``dead_after`` that was a false takeover. A thread would share the GIL with that loop, so a long
stretch of Python in the loop would still delay it. A small process does one thing: every
``heartbeat`` it sends one datagram on each path (:mod:`sync.heartbeat`), reads the peer's, and
reports *facts* (a path up or silent, the peer quiet, silent, heard again, answering unauthenticated)
over a pipe that a trio task of the node reads. It decides nothing: :mod:`sync.detector` and
:mod:`proxy.roles` do, in the node.

How it keeps its timing:

* ``SCHED_FIFO`` (priority ``RT_PRIORITY``) and ``mlockall`` where allowed (root, or
  ``CAP_SYS_NICE``/``CAP_IPC_LOCK``). Without them it runs as an ordinary process and says so in
  status (``heartbeat.realtime``, ``heartbeat.memory_locked``) and in the log: nothing is refused.
  ``mlockall`` is skipped when the memory lock limit is finite and ``CAP_IPC_LOCK`` is missing, since
  ``MCL_FUTURE`` would then make a later allocation fail.
* it blocks in ``poll`` until the next send, the next verdict deadline or a datagram: it never spins,
  so real-time priority cannot starve the node.
* a flood costs it little: a socket filter in the kernel drops every datagram that is not from the
  peer's address or not of a heartbeat's size, and it reads at most ``READ_RATE`` datagrams a second
  per path (beyond that the kernel's small receive buffer drops them).

It lives and dies with the node:

* ``PR_SET_PDEATHSIG``: the kernel kills it when the node dies (SIGKILL included), so a dead node
  falls silent on both paths at once; it also exits when its standard input reaches EOF.
* a stopped or dead node falls silent at once: before every send the process reads the node's state in
  ``/proc/<node>/stat``. Stopped (``T``; ``t`` on two reads in a row, as a debugger's stop lasts while
  a traced syscall's does not) or a zombie (``Z``/``X``): no heartbeat is sent, so the peer takes over
  at ``dead_after``, as it would for a killed node. A node stopped by SIGSTOP serves nobody: its
  address must move as fast as a dead node's.
* a busy or hung loop (the node runs but its trio loop does not) is told apart from a short stall by
  time: the node's loop writes a line every ``LOOP_TICK`` seconds; without one for ``loop_stall_limit``
  (:attr:`proxy.timings.PairTimings.loop_stall_limit`, far longer than ``dead_after``) the process stops
  sending, and starts again when the loop writes again. A short stall of the loop (GC, a long status)
  thus never silences the heartbeats; a hung loop is still found, only later. Until the loop's first
  line the bound is ``START_LIMIT``: the node spawns this process first thing and reaches its loop
  only after its own start-up (seconds on a loaded machine), which must not look like a hang, or the
  peer would take over a node that is starting.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger("pairproxy.heartbeat")

RT_PRIORITY = 20           # above ordinary processes, below the kernel's own real-time threads (50)
LOOP_TICK = 0.1            # the node's loop writes a line this often
START_LIMIT = 30.0         # the loop's first line may take this long (a Python start-up under load)
STATS_EVERY = 1.0          # the process reports its counters and jitter this often
SAVE_EVERY = 10.0          # the node saves them for `pairproxy check` this often
JITTER_FILE = "heartbeat-jitter.json"
READ_RATE = 4000.0         # datagrams read per second and path at most (4x what two peers could send)
RECEIVE_BUFFER = 16 * 1024
IP_FREEBIND = 15
PR_SET_PDEATHSIG = 1
MCL_CURRENT, MCL_FUTURE = 1, 2
CAP_IPC_LOCK = 14


# ------------------------------------------------------------------------------- the child side
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def die_with_parent(parent: int) -> None:
    """PR_SET_PDEATHSIG: SIGKILL when the parent dies; exit now if it already has."""
    if _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:
        os._exit(0)


def go_realtime(priority: int = RT_PRIORITY) -> str | None:
    """SCHED_FIFO at ``priority``; None if done, else why not."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        return None
    except OSError as exc:
        if exc.errno == errno.EPERM:  # named by what is missing (an unprivileged node's log stays readable)
            return "SCHED_FIFO not allowed: needs CAP_SYS_NICE or an RLIMIT_RTPRIO"
        return f"SCHED_FIFO refused ({os.strerror(exc.errno) if exc.errno else exc})"


def _has_cap(bit: int) -> bool:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    except OSError:
        pass
    return False


def lock_memory() -> str | None:
    """mlockall(MCL_CURRENT | MCL_FUTURE) where it is safe; None if done, else why not."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != resource.RLIM_INFINITY and not _has_cap(CAP_IPC_LOCK):
        return f"no CAP_IPC_LOCK and a memory lock limit of {soft} bytes"
    if _libc().mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
        err = ctypes.get_errno()
        if err == errno.EPERM:
            return "mlockall not allowed: needs CAP_IPC_LOCK"
        return f"mlockall refused ({os.strerror(err)})"
    return None


def source_filter(peer_ip: str, payload: int) -> list:
    """Classic BPF for a UDP socket: accept only datagrams from ``peer_ip`` with ``payload`` bytes."""
    from capture.bpf import BPF_ABS, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_LEN, BPF_RET, BPF_W, Insn

    skf_net_off = -0x100000 & 0xFFFFFFFF  # SKF_NET_OFF: the IP header (a UDP socket's filter starts at UDP)
    (ip,) = struct.unpack("!I", socket.inet_aton(peer_ip))
    return [
        Insn(BPF_LD | BPF_W | BPF_ABS, 0, 0, skf_net_off + 12),   # IPv4 source address
        Insn(BPF_JMP | BPF_JEQ | BPF_K, 0, 3, ip),
        Insn(BPF_LD | BPF_W | BPF_LEN, 0, 0, 0),                  # UDP header + payload
        Insn(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, 8 + payload),
        Insn(BPF_RET | BPF_K, 0, 0, 0xFFFF),
        Insn(BPF_RET | BPF_K, 0, 0, 0),
    ]


def _open_stat(pid: int) -> int | None:
    """An open /proc/<pid>/stat, read again with pread at each send (no open per heartbeat)."""
    try:
        return os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def process_state(stat_fd: int | None) -> str:
    """The state letter (``R``, ``S``, ``T``, ``Z``...) of the process whose /proc/<pid>/stat is open as
    ``stat_fd``; ``X`` if it cannot be read (the process is gone)."""
    if stat_fd is None:
        return "X"
    try:
        data = os.pread(stat_fd, 1024, 0)
        return chr(data[data.rindex(b")") + 2])  # the name in parentheses may hold spaces and ")"
    except (OSError, ValueError, IndexError):
        return "X"


def _open_socket(local: str, port: int, peer_ip: str, payload: int) -> socket.socket:
    from capture.bpf import attach

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)  # the service address comes and goes with serving
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, 0xB8)  # EF: ahead of bulk traffic in any queue
    attach(sock, source_filter(peer_ip, payload))
    sock.bind((local, port))
    sock.setblocking(False)
    return sock


class _Child:
    """The loop of the heartbeat process (see the module docstring)."""

    def __init__(self, setup: dict[str, Any], out: Callable[[dict], None]):
        from sync.heartbeat import SIZE, HeartbeatMonitor, TokenBucket

        self.setup = setup
        self.out = out
        self.heartbeat = float(setup["heartbeat"])
        self.loop_stall_limit = float(setup["loop_stall_limit"])
        now = time.monotonic()
        self.monitor = HeartbeatMonitor(bytes.fromhex(setup["key"]), me=setup["me"], peer=setup["peer"],
                                        mode=setup["mode"], heartbeat=self.heartbeat,
                                        dead_after=float(setup["dead_after"]), now=now)
        self.paths: dict[str, tuple[socket.socket, tuple[str, int]]] = {}
        for path, (local, peer_ip) in setup["paths"].items():
            sock = _open_socket(local, int(setup["port"]), peer_ip, SIZE)
            self.paths[path] = (sock, (peer_ip, int(setup["port"])))
        self.reads = {path: TokenBucket(READ_RATE, READ_RATE / 20) for path in self.paths}
        self.loop_heard = now
        self.loop_started = False   # the node's loop has written its first line
        self.parent = int(setup["parent"])
        self._parent_stat = _open_stat(self.parent)
        self._traced = False        # the last read saw "t" (tracing stop)
        self.paused: str | None = None  # why no heartbeat is sent: "stopped", "gone", "loop" (see the docstring)
        self.pauses = 0
        self.stalls = 0             # times this process woke a heartbeat or more late (own_stall)
        self.stalled = 0.0          # the longest of them (s)
        self.late: list[float] = []
        self.max_late = 0.0

    def run(self, stdin: int) -> None:
        poller = select.poll()
        by_fd = {sock.fileno(): path for path, (sock, _) in self.paths.items()}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        poller.register(stdin, select.POLLIN)
        os.set_blocking(stdin, False)
        next_send = time.monotonic()
        next_stats = next_send + STATS_EVERY
        muted: dict[int, float] = {}  # fd -> until (over the read rate)
        wake: float | None = None
        while True:
            now = time.monotonic()
            if wake is not None and now - wake > self.heartbeat:
                # woke a beat or more late: we did not run meanwhile, so that was no silence of the peer's
                self.monitor.own_stall(wake, now)
                self.stalls += 1
                self.stalled = max(self.stalled, now - wake)
            for fd, until in list(muted.items()):
                if now >= until:
                    del muted[fd]
                    poller.register(fd, select.POLLIN)
            # Read before judging: after a stall of this process (a preempted VM, a kernel that would not
            # let it run) the peer's heartbeats wait in the socket buffers; judging the silence first
            # would call the peer dead for this process's own stall.
            for fd, path in by_fd.items():
                if fd not in muted:
                    self._read(path, fd, poller, muted)
            now = time.monotonic()
            self.monitor.tick(now)
            self._report(now)
            if now >= next_send:
                self._send(now, now - next_send)
                next_send += self.heartbeat
                if next_send <= now:  # more than a whole interval late: start the rhythm again
                    next_send = now + self.heartbeat
            if now >= next_stats:
                self.out({"k": "stats", **self.stats(now)})
                next_stats = now + STATS_EVERY
            wake = min([next_send, self.monitor.next_deadline(now), next_stats, *muted.values()])
            timeout = max(0.0, wake - time.monotonic())
            wake = max(wake, time.monotonic())
            for fd, _ in poller.poll(timeout * 1000 + 0.5 if timeout > 0 else 0):
                if fd == stdin and not self._read_stdin(stdin):
                    return
                # datagrams are read at the top of the loop

    def _read(self, path: str, fd: int, poller: select.poll, muted: dict[int, float]) -> None:
        sock = self.paths[path][0]
        for _ in range(64):
            t = time.monotonic()
            if not self.reads[path].take(t):
                poller.unregister(fd)  # the kernel drops what does not fit meanwhile
                muted[fd] = t + self.reads[path].wait()
                return
            try:
                data = sock.recv(128)
            except (BlockingIOError, InterruptedError):
                self.reads[path].tokens += 1  # nothing read: the token is not spent
                return
            except OSError:
                continue  # e.g. an ICMP error from an earlier send
            self.monitor.received(path, data, t)

    def _read_stdin(self, stdin: int) -> bool:
        try:
            data = os.read(stdin, 4096)
        except BlockingIOError:
            return True
        if not data:
            return False  # the node is gone
        self.loop_heard = time.monotonic()
        self.loop_started = True
        return True

    def _why_silent(self, now: float) -> str | None:
        """Why this node must not heartbeat now (None: it may)."""
        state = process_state(self._parent_stat)
        traced, self._traced = self._traced, state == "t"
        if state in "ZX":
            return "gone"
        if state == "T" or (state == "t" and traced):
            return "stopped"
        if now - self.loop_heard > (self.loop_stall_limit if self.loop_started else max(START_LIMIT, self.loop_stall_limit)):
            return "loop"
        return None

    def _send(self, now: float, late: float) -> None:
        why = self._why_silent(now)
        if why != self.paused:
            if why is not None:
                self.pauses += 1
                self.out({"k": "paused", "at": now, "why": why})  # read when the node runs again
            else:
                self.out({"k": "resumed", "at": now, "was": self.paused})
            self.paused = why
        if why is not None:
            return
        self.late.append(late)
        self.max_late = max(self.max_late, late)
        for path, (sock, target) in self.paths.items():
            data = self.monitor.outgoing(path, now)
            try:
                sock.sendto(data, target)
            except OSError as exc:
                self.monitor.send_failed(path, os.strerror(exc.errno) if exc.errno else str(exc))

    def _report(self, now: float) -> None:
        for fact in self.monitor.take_facts():
            self.out({"k": "fact", "kind": fact.kind, "at": fact.at, "path": fact.path,
                      "last_heard": fact.last_heard, "now": now})

    def stats(self, now: float) -> dict:
        from sync.heartbeat import percentiles

        late = [v * 1000 for v in self.late[-6000:]]
        del self.late[:-6000]
        return {"now": now, "paths": self.monitor.stats(now), "last_heard": self.monitor.last_heard(),
                "send_late_ms": percentiles(late), "max_send_late_ever_ms": round(self.max_late * 1000, 3),
                "paused": self.paused, "pauses": self.pauses, "own_stalls": self.stalls,
                "max_own_stall_ms": round(self.stalled * 1000, 3)}


def child_main() -> int:
    """``python -m proxy.heartbeat``: one JSON line of setup on stdin, then ticks; facts out on stdout."""
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    setup = json.loads(sys.stdin.buffer.readline())
    die_with_parent(int(setup["parent"]))
    realtime = go_realtime(int(setup.get("rt_priority", RT_PRIORITY))) if setup.get("realtime", True) else "disabled"
    locked = lock_memory() if setup.get("realtime", True) else "disabled"

    def out(message: dict) -> None:
        data = (json.dumps(message) + "\n").encode()
        try:
            os.write(stdout, data)
        except BlockingIOError:
            pass  # the node's loop is stalled and the pipe full: facts are re-sent as stats
        except BrokenPipeError:
            os._exit(0)

    try:
        child = _Child(setup, out)
    except OSError as exc:
        out({"k": "ready", "ok": False, "error": f"{exc.strerror or exc} ({exc.__class__.__name__})"})
        return 1
    os.set_blocking(stdout, False)
    out({"k": "ready", "ok": True, "pid": os.getpid(), "realtime": realtime, "memory_locked": locked})
    child.run(stdin)
    return 0


# ------------------------------------------------------------------------------- the node side
@dataclass
class HeartbeatSetup:
    """What the process needs: names, key, mode, timings, the port, and per path (local, peer) addresses."""

    me: str
    peer: str
    key: bytes
    mode: str
    heartbeat: float
    dead_after: float
    port: int
    paths: dict[str, tuple[str, str]]
    loop_stall_limit: float
    realtime: bool = True

    def to_json(self) -> dict:
        return {"me": self.me, "peer": self.peer, "key": self.key.hex(), "mode": self.mode,
                "heartbeat": self.heartbeat, "dead_after": self.dead_after, "port": self.port,
                "paths": {p: list(v) for p, v in self.paths.items()}, "loop_stall_limit": self.loop_stall_limit,
                "realtime": self.realtime, "parent": os.getpid(), "rt_priority": RT_PRIORITY}


class HeartbeatProcess:
    """The node's handle on its heartbeat process: start it, read its facts, tick it.

    ``on_fact(kind, at, path, last_heard)`` gets every fact with times in trio's clock (the process
    uses ``time.monotonic``; each message carries the process's "now" to convert). Run with
    ``await nursery.start(hb.run)``: started once the process has bound its sockets.
    """

    def __init__(self, setup: HeartbeatSetup, on_fact: Callable[[str, float, str | None, float | None], None],
                 state_dir: str | os.PathLike[str] | None = None):
        self.setup = setup
        self.state_dir = state_dir
        self._saved_at: float | None = None
        self.on_fact = on_fact
        self.pid: int | None = None
        self.realtime: str | None = None          # None: SCHED_FIFO; else why not
        self.memory_locked: str | None = None     # None: locked; else why not
        self.last_stats: dict | None = None
        self.stats_at: float | None = None
        self.failed: str | None = None
        self.paused = False
        self._process: subprocess.Popen | None = None

    def spawn(self) -> None:
        """Start the process now, before :meth:`run`: a Python start-up takes 50 ms on an idle machine
        and seconds on a loaded one, and a starting node is silent to its peer until the process
        heartbeats. The node calls this first thing, so the start-up overlaps its own.

        Popen here, in the loop's own thread, not trio's open_process: that forks from a worker
        thread, and PR_SET_PDEATHSIG fires when the *thread* that forked exits (trio's idle worker
        threads do after 10 s), which killed the heartbeat process of a healthy node."""
        if self._process is not None:
            return
        process = subprocess.Popen([sys.executable, "-m", "proxy.heartbeat"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, close_fds=True)
        try:
            os.write(process.stdin.fileno(), (json.dumps(self.setup.to_json()) + "\n").encode())  # < a pipe's buffer
        except OSError:
            pass  # it died at once: run() reports it
        self._process = process

    def discard(self) -> None:
        """Kill a process spawned but never run (the node failed to start)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        for pipe in (process.stdin, process.stdout) if process is not None else ():
            if not pipe.closed:
                pipe.close()

    async def run(self, *, task_status: Any = None) -> None:
        import trio

        if task_status is None:
            task_status = trio.TASK_STATUS_IGNORED
        self.spawn()
        process, self._process = self._process, None
        stdin = trio.lowlevel.FdStream(os.dup(process.stdin.fileno()))
        stdout = trio.lowlevel.FdStream(os.dup(process.stdout.fileno()))
        process.stdin.close()
        process.stdout.close()
        try:
            lines = _Lines(stdout)
            ready = await lines.next()
            if not ready or not ready.get("ok"):
                raise OSError(f"heartbeat process did not start: {(ready or {}).get('error', 'no answer')}")
            self.pid = ready.get("pid")
            self.realtime, self.memory_locked = ready.get("realtime"), ready.get("memory_locked")
            if self.realtime or self.memory_locked:
                log.warning("heartbeat process %s runs without %s", self.pid,
                            " and ".join(f"{what}: {why}" for what, why in (("real-time priority", self.realtime),
                                                                            ("locked memory", self.memory_locked))
                                         if why))
            else:
                log.info("heartbeat process %s: SCHED_FIFO %d, memory locked", self.pid, RT_PRIORITY)
            task_status.started()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._tick, stdin)
                while True:
                    message = await lines.next()
                    if message is None:
                        break
                    self._on_message(message, trio.current_time(), time.monotonic())
                nursery.cancel_scope.cancel()
            code = await trio.to_thread.run_sync(process.wait)
            self.failed = f"heartbeat process exited with {code}"
            log.error("%s: the peer will see this node as dead", self.failed)
        finally:
            with trio.CancelScope(shield=True):
                if process.poll() is None:
                    process.kill()
                    await trio.to_thread.run_sync(process.wait)
                for pipe in (stdin, stdout):
                    await pipe.aclose()

    async def _tick(self, stdin: Any) -> None:
        import trio

        while True:
            try:
                await stdin.send_all(b".\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            await trio.sleep(LOOP_TICK)

    def _on_message(self, message: dict, trio_now: float, mono_now: float) -> None:
        def trio_time(t: float | None) -> float | None:
            return None if t is None else trio_now - (mono_now - t)

        kind = message.get("k")
        if kind == "fact":
            self.on_fact(message["kind"], trio_time(message["at"]), message.get("path"),
                         trio_time(message.get("last_heard")))
        elif kind == "stats":
            self.last_stats, self.stats_at = message, trio_now
            self.paused = bool(message.get("paused"))
            if self.state_dir is not None and (self._saved_at is None or trio_now - self._saved_at >= SAVE_EVERY):
                self._saved_at = trio_now
                self._save_jitter()
        elif kind == "paused":
            self.paused = True
            why = {"stopped": "this node's process was stopped (SIGSTOP or a debugger)",
                   "gone": "this node's process was exiting"}.get(
                message.get("why"), f"the node's loop did not run for {self.setup.loop_stall_limit:.1f} s (hung)")
            log.error("heartbeats were stopped: %s; the peer has probably taken over", why)
        elif kind == "resumed":
            self.paused = False
            log.warning("heartbeats sent again: this node runs again")

    def _save_jitter(self) -> None:
        """``state_dir/heartbeat-jitter.json``: what ``pairproxy check`` compares dead_after with."""
        from pathlib import Path

        s = self.last_stats or {}
        doc = {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "heartbeat_ms": self.setup.heartbeat * 1000,
               "dead_after_ms": self.setup.dead_after * 1000, "send_late_ms": s.get("send_late_ms"),
               "realtime": self.realtime is None, "paths": {
                   p: {k: v.get(k) for k in ("gap_ms", "jitter_ms", "max_gap_ever_ms", "received")}
                   for p, v in (s.get("paths") or {}).items()}}
        path = Path(self.state_dir) / JITTER_FILE
        tmp = path.with_name(f".{JITTER_FILE}.tmp")
        try:
            tmp.write_text(json.dumps(doc, indent=1) + "\n")
            os.replace(tmp, path)
        except OSError as exc:
            log.debug("cannot save %s: %s", path, exc)

    def status(self) -> dict:
        """The process, its priority, and per path: up, counters, gaps and jitter (ms)."""
        s = self.last_stats or {}
        return {"pid": self.pid, "realtime": self.realtime is None and self.pid is not None,
                "realtime_problem": self.realtime, "memory_locked": self.memory_locked is None and self.pid is not None,
                "memory_problem": self.memory_locked, "failed": self.failed, "paused": self.paused,
                "pauses": s.get("pauses", 0), "paths": s.get("paths", {}), "send_late_ms": s.get("send_late_ms"),
                "max_send_late_ever_ms": s.get("max_send_late_ever_ms"), "own_stalls": s.get("own_stalls", 0),
                "max_own_stall_ms": s.get("max_own_stall_ms", 0.0)}


class _Lines:
    """JSON lines from a trio receive stream."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.buffer = bytearray()

    async def next(self) -> dict | None:
        while True:
            i = self.buffer.find(b"\n")
            if i >= 0:
                line = bytes(self.buffer[:i])
                del self.buffer[:i + 1]
                try:
                    return json.loads(line)
                except ValueError:
                    log.warning("heartbeat process said something unreadable: %r", line[:200])
                    continue
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                return None
            self.buffer += chunk


if __name__ == "__main__":
    sys.exit(child_main())
