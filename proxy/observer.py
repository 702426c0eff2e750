"""The stateful node's observer: snoopers and decoders in a child process of their own.

Why a separate process: decoding every frame of the node's own and its peer's traffic is the most
CPU-hungry thing a node does. In the node's event loop it competed with the splice pumps (a stateful
node proxied at about half the rate of a stateless one) and with the heartbeats (late heartbeats
are how false takeovers start). As a child process it runs on the other core, and the node's loop
only asks it questions: a digest every 250 ms, a snapshot for status, and, at a takeover, the live
connections with their exact sequence numbers.

The child owns the :class:`~capture.snooper.Snooper` s and :class:`~proxy.stateful.AddressView` s. The
protocol is requests and answers on the child's standard input and output: a 4-byte length and a
msgpack map each way, one request at a time. When the node dies, even by SIGKILL, the child reads EOF
on its standard input and exits: it never outlives its node.
"""

from __future__ import annotations

import gc
import logging
import os
import struct
import subprocess
import sys
import time
from typing import Any

import msgpack
import trio

log = logging.getLogger("pairproxy.observer")

_LENGTH = struct.Struct("!I")
MAX_MESSAGE = 64 << 20
_PAGE = os.sysconf("SC_PAGE_SIZE")
#: status asks for the continuation summary often; with thousands of the peer's connections it costs tens
#: of milliseconds here, which a takeover's requests would wait behind: at most one per this many seconds
SUMMARY_MAX_AGE = 0.5
#: how often the continuation book drops the bytes both sides have (it trims a busy one as it goes)
SWEEP_EVERY = 5.0
#: fault injection, for tests only: ``op=seconds[,op=seconds...]`` in the node's environment makes the
#: observer child block that long before it answers those requests, as one stuck behind a backlog of
#: frames would (tests/test_continuation_lab.py: a takeover's address does not wait for a slow observer)
DELAY_ENV = "PAIRPROXY_OBSERVER_DELAY"
#: at most this long processing the frames already captured before a takeover hands the outage's SYNs over
SYNS_CATCH_UP = 0.02


def _rss() -> int | None:
    """This process's resident memory in bytes (/proc/self/statm), None if unreadable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class ObserverError(Exception):
    """The observer process is gone or answered nonsense; stateful features are unavailable."""


async def _read_message(stream: trio.abc.ReceiveStream, buffer: bytearray) -> dict | None:
    """One length-prefixed msgpack message, or None at EOF."""
    while True:
        if len(buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(buffer)
            if length > MAX_MESSAGE:
                raise ObserverError(f"message of {length} bytes is over the limit")
            if len(buffer) >= _LENGTH.size + length:
                body = bytes(buffer[_LENGTH.size:_LENGTH.size + length])
                del buffer[:_LENGTH.size + length]
                return msgpack.unpackb(body, strict_map_key=False)
        chunk = await stream.receive_some(1 << 20)
        if not chunk:
            return None
        buffer += chunk


def _frame(message: dict) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return _LENGTH.pack(len(body)) + body


# ------------------------------------------------------------------------------------ node side
class ObserverProcess:
    """The node's handle on its observer child: start it, ask it things."""

    def __init__(self, ifname: str, views: dict[str, dict], *, rcvbuf: int = 128 << 20, batch: int = 256,
                 continuation_cap: int | None = None):
        self.setup = {"ifname": ifname, "views": views, "rcvbuf": rcvbuf, "batch": batch,
                      "continuation_cap": continuation_cap}
        self._process: trio.Process | None = None
        self._lock = trio.Lock()
        self._next_id = 0
        #: set once the child has its snoopers running and answers requests
        self.ready = trio.Event()
        self._buffer = bytearray()
        self.failed: str | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the child and keep it until cancelled (then it is terminated)."""
        process = await trio.lowlevel.open_process([sys.executable, "-m", "proxy.observer"],
                                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            await process.stdin.send_all(_frame(self.setup))
            ready = await _read_message(process.stdout, self._buffer)
            if not ready or not ready.get("ok"):
                raise ObserverError(f"observer did not start: {(ready or {}).get('error', 'no answer')}")
            self._process = process  # from now on requests may be made
            self.ready.set()
            task_status.started()
            code = await process.wait()
            self.failed = f"observer process exited with {code}"
            log.error("%s; stateful state is no longer kept", self.failed)
        finally:
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    process.terminate()
                    with trio.move_on_after(2):
                        await process.wait()
                    if process.returncode is None:
                        process.kill()
                        await process.wait()
                for pipe in (process.stdin, process.stdout):
                    await pipe.aclose()

    async def request(self, op: str, **args: Any) -> Any:
        """Ask the observer; its answer. Raises ObserverError if it is gone or refused."""
        if self._process is None or self.failed:
            raise ObserverError(self.failed or "observer still starting")
        async with self._lock:
            self._next_id += 1
            want = self._next_id
            try:
                await self._process.stdin.send_all(_frame({"op": op, "id": want, **args}))
                while True:
                    answer = await _read_message(self._process.stdout, self._buffer)
                    # an answer to a request whose asker was cancelled may still be in the pipe
                    if answer is None or answer.get("id") == want:
                        break
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ObserverError(f"observer gone: {exc}") from None
        if answer is None:
            raise ObserverError("observer gone (EOF)")
        if not answer.get("ok"):
            raise ObserverError(f"observer refused {op}: {answer.get('error')}")
        return answer.get("result")


def delays_from_environment() -> dict[str, float]:
    """The request delays :data:`DELAY_ENV` asks for (none if unset); ValueError names a bad value."""
    delays = {}
    for item in filter(None, (part.strip() for part in os.environ.get(DELAY_ENV, "").split(","))):
        op, _, seconds = item.partition("=")
        try:
            delays[op.strip()] = float(seconds)
        except ValueError:
            raise ValueError(f"{DELAY_ENV}: {item!r} is not op=seconds") from None
    return delays


# ---------------------------------------------------------------------------------- child side
class _Observer:
    def __init__(self, setup: dict):
        from proxy.stateful import AddressView

        self.setup = setup
        self.views = {name: AddressView(v["address"], v["ports"], as_client_of=v.get("as_client_of"))
                      for name, v in setup["views"].items()}
        self.snoopers: list = []
        self.watcher = None
        #: the peer's legs for a continuing takeover (issue 10): fed by both peer views
        self.book = None
        peer, backend = self.views.get("peer_address"), self.views.get("peer_backend")
        if peer is not None and backend is not None:
            from proxy.continuation import DEFAULT_CAP, ContinuationBook

            self.book = ContinuationBook(peer.address, [peer.pipeline.tcp, backend.pipeline.tcp],
                                         cap=DEFAULT_CAP if setup.get("continuation_cap") is None
                                         else setup["continuation_cap"])
        self.delays = delays_from_environment()
        #: new clients' SYNs to the peer's address: answered at a takeover (proxy.synlog)
        self.synlog = None
        if peer is not None:
            from proxy.synlog import SynLog

            self.synlog = SynLog(peer.address, setup["views"]["peer_address"]["ports"])

    def _callback(self, name: str, view):
        """The snooper's callback of one view: the peer's views feed the continuation book too."""
        book = self.book
        synlog = self.synlog if name == "peer_address" else None
        if book is None or name not in ("peer_address", "peer_backend"):
            if synlog is None:
                return view.on_frame

            def on_frame_syns(frame, ts: float) -> None:
                synlog.on_frame(frame, ts)
                view.on_frame(frame, ts)
            return on_frame_syns

        peer = self.views["peer_address"]

        def on_frame(frame, ts: float) -> None:
            if synlog is not None:
                synlog.on_frame(frame, ts)
            events = view.on_frame(frame, ts)
            if events:
                book.feed(events)
                self._relay(book, peer)
        return on_frame

    @staticmethod
    def _relay(book, peer) -> None:
        """Seeing only frames destined to the peer, the client legs' server side is the backend legs'
        server bytes (the peer relays them unchanged): decode them as the client leg's replies, so the
        session tables (and digests) are complete without a hub."""
        for key, data in book.relay_server_bytes():
            events = peer.pipeline.feed_relayed(key, False, data)
            if peer.watcher is not None and events:
                peer.watcher.feed(events)

    async def run(self, stdin: trio.lowlevel.FdStream, buffer: bytearray) -> None:
        from capture.snooper import Snooper

        stdout = trio.lowlevel.FdStream(1)
        async with trio.open_nursery() as nursery:
            try:
                for name, view in self.views.items():
                    # a view of the peer's backend connections filters on the peer's address too, so
                    # the kernel keeps this node's own backend connections out of it
                    snooper = Snooper(self.setup["ifname"], view.capture_addresses, view.ports,
                                      self._callback(name, view),
                                      rcvbuf=self.setup["rcvbuf"], batch=self.setup["batch"],
                                      peers=[view.address] if view.as_client_of else None,
                                      # a ring of rcvbuf bytes (not twice, the Snooper default): three
                                      # views share the node's memory, and the ring pins its pages
                                      ring_bytes=self.setup["rcvbuf"])
                    self.snoopers.append(snooper)
                    await nursery.start(snooper.run)
            except OSError as exc:
                await stdout.send_all(_frame({"ok": False, "error": f"snooper on {self.setup['ifname']}: {exc}"}))
                return
            await stdout.send_all(_frame({"ok": True}))
            if self.book is not None:
                nursery.start_soon(self._sweep)
            while True:
                request = await _read_message(stdin, buffer)
                if request is None:  # the node is gone
                    nursery.cancel_scope.cancel()
                    return
                try:
                    answer = {"ok": True, "result": self.answer(request)}
                except Exception as exc:  # a bad request must not end the observer
                    answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                answer["id"] = request.get("id")
                await stdout.send_all(_frame(answer))

    def _catch_up(self, limit: float) -> int:
        """Process the frames already captured (for at most ``limit`` seconds); how many. Why before the
        outage's SYNs are handed to this node's kernel: under load the observer runs behind the capture,
        and a SYN the peer answered just before it died, whose client's handshake ACK was not processed
        yet, looked unanswered: this node's kernel answered it too, and the peer's connection (in its
        accept queue, continuable) was reset instead (bench/SOAK.md)."""
        deadline = time.monotonic() + limit
        got = 0
        for snooper in self.snoopers:
            while time.monotonic() < deadline:
                n = snooper.read_batch()
                got += n
                if not n:
                    break
        return got

    async def _sweep(self) -> None:
        """Every SWEEP_EVERY: the continuation book keeps only the bytes not yet acknowledged (behaviour 6)."""
        while True:
            await trio.sleep(SWEEP_EVERY)
            self.book.sweep()

    def answer(self, request: dict) -> Any:
        from proxy.stateful import ResumeWatcher

        op = request.get("op")
        if op in self.delays:
            time.sleep(self.delays[op])  # blocks everything here, frames too: a stuck observer
        view = self.views.get(request.get("view", ""))
        if view is None and op in ("digest", "snapshot", "live", "watch", "forget"):
            raise ValueError(f"unknown view {request.get('view')!r}")
        if op == "digest":
            return view.digest_message()
        if op == "snapshot":
            return view.snapshot()
        if op == "live":
            live = view.live_connections()
            if self.book is not None and view in (self.views.get("peer_address"), self.views.get("peer_backend")):
                # over at both ends (ContinuationBook.ended_at_peer): no RST owed, nor sent
                over = {(k.client, k.server) for k, c in view.pipeline.tcp.connections.items()
                        if self.book.ended_at_peer(k, c)}
                live = [c for c in live if (c["client"], c["server"]) not in over]
            return live
        if op == "forget":  # connections the owner no longer has, or a dead peer's (see ViewSync)
            from protocols.tcpstream import ConnectionClosed

            keep = request.get("keep")
            events = view.forget(float(request["before"]), gone=bool(request.get("gone")),
                                 keep=None if keep is None else {(c, s) for c, s in keep})
            if self.book is not None:  # its bytes kept of them go too (they leaked: bench/SOAK.md)
                self.book.feed(events)
            return sum(isinstance(ev, ConnectionClosed) for _, ev in events)
        if op == "watch":  # a takeover: remember who had what, and watch them come back
            self.watcher = ResumeWatcher.from_snapshot(view.snapshot())
            view.watcher = self.watcher
            return None
        if op == "continued":  # the takeover continued these clients' connections
            if self.watcher is not None:
                for client in request.get("clients") or []:
                    ip = str(client).rsplit(":", 1)[0]
                    self.watcher.continued[ip] = self.watcher.continued.get(ip, 0) + 1
            return None
        if op == "unwatch":
            for v in self.views.values():
                v.watcher = None
            return None
        if op == "report":
            return self.watcher.report() if self.watcher else []
        if op == "pairings":  # the peer's message: which client leg pairs with which backend leg
            if self.book is None:
                return []
            problems = self.book.set_pairings(request.get("add") or [], request.get("remove") or [],
                                              bool(request.get("reset")))
            self._relay(self.book, self.views["peer_address"])  # a new pairing's replies so far
            return problems
        if op == "continuations":  # a takeover: each connection's two legs to restore, or why not
            if self.book is None:
                return [] if request.get("first") is None else {"first": [], "rest": 0}
            if request.get("first") is None:
                return [v.to_wire() for v in self.book.plan(time.time())]
            # the busiest first: the takeover restores these before its address comes up, the rest after
            first = [v.to_wire() for v in self.book.plan(time.time(), first=int(request["first"]))]
            return {"first": first, "rest": self.book.rest_waiting}
        if op == "continuations_rest":  # what "continuations" with "first" left for later
            if self.book is None:
                return []
            return [v.to_wire() for v in self.book.plan_rest(time.time(), limit=request.get("limit"))]
        if op == "syns":  # a takeover: the SYNs new clients sent to the peer's address during the outage
            if self.synlog is None:
                return []
            self._catch_up(SYNS_CATCH_UP)  # a SYN whose handshake went on must not look unanswered
            packets = self.synlog.recent(time.time())
            if self.book is not None:
                self.book.answered_here(self.synlog.handed)
            return packets
        if op == "continuation_summary":
            if self.book is None:
                return None
            # and this process's resident memory: everything the standby keeps of the peer lives here
            return dict(self.book.summary(time.time(), max_age=SUMMARY_MAX_AGE), observer_rss=_rss())
        if op == "stats":  # per view, in the order of the views: its snooper's counters, and which way frames went
            from schema.records import SEGMENT_REFUSALS

            return [dict(s.stats(), address=v.address, frames_to=v.frames_to, frames_from=v.frames_from,
                         **{k: v.pipeline.tcp.counters[k] for k in SEGMENT_REFUSALS})
                    for s, v in zip(self.snoopers, self.views.values())]
        raise ValueError(f"unknown request {op!r}")


async def _child_main() -> None:
    stdin, buffer = trio.lowlevel.FdStream(0), bytearray()
    setup = await _read_message(stdin, buffer)
    if setup is None:
        return
    try:
        observer = _Observer(setup)
    except ValueError as exc:  # a bad DELAY_ENV: said, not a traceback
        await trio.lowlevel.FdStream(1).send_all(_frame({"ok": False, "error": str(exc)}))
        return
    # imported now, not at the first resume report (ResumeWatcher.report): that is asked for by the
    # first status while this node holds the peer's address, i.e. during a takeover, and compiling the
    # status schema then held this process 0.1-0.14 s while the takeover waited for its answers
    import proxy.status  # noqa: F401, PLC0415

    gc.collect()
    gc.freeze()  # see proxy.cli.cmd_run: no long collections of what lives as long as the process
    await observer.run(stdin, buffer)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s pairproxy.observer: %(message)s")
    try:
        trio.run(_child_main)
    except KeyboardInterrupt:
        pass
    # the node is gone (or stopping): leave without the interpreter's finalization, which frees the
    # decoded tables object by object: 11 ms of CPU to exit after the node's SIGKILL, 6-8 ms without it
    # (measured from /proc/PID/schedstat, lab pair, one NFS client). In the lab a dead node's exit runs on
    # the survivor's two cores during its takeover. Nothing is left to flush but the log.
    logging.shutdown()
    sys.stderr.flush()
    os._exit(0)
