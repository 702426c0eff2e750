"""The data path: move bytes from one TCP socket to another without looking at them.

Why ``os.splice`` through a pipe: the payload stays in kernel pages (socket -> pipe -> socket), so a
64 MiB SMB read costs a few hundred system calls and no copies into Python objects. The pipe is drained
completely before the next read, which gives backpressure for free: while the destination socket's
send buffer is full we do not read from the source, so the source's receive window closes and the
sender slows down, exactly as a plain TCP connection would.

The pipes come from a :class:`PipePool` and are held only while bytes are in them, so an idle
connection costs its two sockets and nothing more.

Each direction of a connection is one task running :func:`splice_pump`. EOF in one direction is passed
on as ``shutdown(SHUT_WR)`` on the other socket (half-close), and the other direction goes on until it
sees its own EOF.

:func:`sockmap_relay` is the other byte path: the kernel relays the bytes (:mod:`proxy.sockmap`), and
Python passes EOF and resets on and takes the connection out of the kernel again, for the splice pump
(a bulk phase, a slow reader) or for a live move, without losing a byte (``bench/BYTEPATH.md``).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import time
from typing import Callable

import trio

from proxy.fds import BUDGET, FdBudget
from proxy.rstguard import mark_own_close

log = logging.getLogger("pairproxy.data")

#: Bytes moved per splice call at most; also the pipe's size where the kernel allows it.
CHUNK = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK

#: Errors that mean "this connection is gone", not "pairproxy has a bug".
CONNECTION_LOST = (errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, errno.ENOTCONN, errno.EHOSTUNREACH,
                   errno.ENETUNREACH, errno.ECONNABORTED)


class ConnectionLost(Exception):
    """The peer on one side reset or broke the connection; the whole proxied connection must end."""


def _open_pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, _F_SETPIPE_SZ, CHUNK)
    except OSError:
        pass  # pipe-max-size is lower here; the default 64 KiB pipe still works, only with more calls
    return r, w


class PipePool:
    """Pipes lent to pumps only while bytes are in them.

    Why: a pipe per direction per connection costs four descriptors for every connection, also for
    the thousands of idle ones an NFS or SMB server has; lent only between a read and the end of
    the write that empties the pipe, an idle connection holds just its two sockets. A pipe comes
    back only empty (the pump writes all it read before returning it), so the next pump can never
    see another connection's bytes; a pipe that may hold bytes (an error mid-write) is closed.

    Opening a pipe takes two descriptors from ``budget`` (waiting while there is no room: bytes
    wait, as with a full send buffer, instead of the connection failing); ``keep`` idle pipes stay
    open for the next reads.
    """

    def __init__(self, budget: FdBudget = BUDGET, keep: int = 32):
        self.budget = budget
        self.keep = keep
        self._idle: list[tuple[int, int]] = []
        self.opened = 0
        self._warned_at = -1e9

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def get(self) -> tuple[int, int]:
        if self._idle:
            return self._idle.pop()
        while True:
            await self.budget.acquire(2)
            try:
                pipe = _open_pipe()
            except OSError as exc:
                self.budget.release(2)
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                    raise
                # the rest of the process took more than its reserve: wait for descriptors to free
                now = time.monotonic()
                if now - self._warned_at >= 1.0:
                    self._warned_at = now
                    log.warning("no descriptor for a pipe (%s): bytes wait until connections end",
                                os.strerror(exc.errno))
                await trio.sleep(0.05)
                continue
            self.opened += 1
            return pipe

    def put(self, pipe: tuple[int, int]) -> None:
        """Return an *empty* pipe."""
        if len(self._idle) < self.keep:
            self._idle.append(pipe)
        else:
            self.discard(pipe)

    def discard(self, pipe: tuple[int, int]) -> None:
        """Close a pipe (it may hold bytes)."""
        os.close(pipe[0])
        os.close(pipe[1])
        self.budget.release(2)

    def close(self) -> None:
        """Close the idle pipes."""
        while self._idle:
            self.discard(self._idle.pop())


#: The pipes of every pump in this process.
PIPES = PipePool()


def _read_all(fd: int, size: int) -> bytes:
    """The ``size`` bytes waiting in a pipe (non-blocking read end)."""
    out = b""
    while len(out) < size:
        try:
            chunk = os.read(fd, size - len(out))
        except BlockingIOError:
            break
        if not chunk:
            break
        out += chunk
    return out


async def splice_pump(src: trio.socket.SocketType, dst: trio.socket.SocketType,
                      on_bytes: Callable[[int], None], pipes: PipePool = PIPES,
                      spill: Callable[[bytes], None] | None = None) -> None:
    """Copy ``src`` to ``dst`` until EOF on ``src``, then half-close ``dst``.

    ``spill``: a pump cancelled while bytes wait in its pipe for ``dst`` (its send buffer full) hands
    them to ``spill`` instead of losing them; a live move (:mod:`proxy.livemove`) stops pumps that way
    and puts those bytes at the end of ``dst``'s frozen send queue.

    Raises :class:`ConnectionLost` when either side resets. ``on_bytes(n)`` is called after each
    chunk has been fully written, so counters never run ahead of what the other side received.
    The pipe comes from ``pipes`` when bytes arrive and goes back once they are all written.
    """
    src_fd, dst_fd = src.fileno(), dst.fileno()
    pipe: tuple[int, int] | None = None
    try:
        readable = False
        while True:
            # A short read drained the socket: wait for more instead of asking again (that would
            # cost a splice returning EAGAIN on every small message). wait_readable returns at once
            # if bytes arrived meanwhile, and it is a checkpoint, as the explicit one is after a
            # full chunk (so a bulk transfer still yields to other tasks and to cancellation).
            if readable:
                await trio.lowlevel.checkpoint()
            else:
                await trio.lowlevel.wait_readable(src)
            if pipe is None:
                pipe = await pipes.get()
            try:
                n = os.splice(src_fd, pipe[1], CHUNK, flags=_FLAGS)
            except BlockingIOError:
                readable = False
                pipes.put(pipe)
                pipe = None
                continue
            except OSError as exc:
                if exc.errno in CONNECTION_LOST:
                    raise ConnectionLost(f"read: {os.strerror(exc.errno)}") from None
                raise
            if n == 0:
                pipes.put(pipe)  # nothing was read: still empty
                pipe = None
                break
            left = n
            while left:
                try:
                    left -= os.splice(pipe[0], dst_fd, left, flags=_FLAGS)
                except BlockingIOError:
                    try:
                        await trio.lowlevel.wait_writable(dst)
                    except trio.Cancelled:
                        if spill is not None:
                            spill(_read_all(pipe[0], left))
                            on_bytes(n - left)
                        raise
                except OSError as exc:
                    if exc.errno in CONNECTION_LOST:
                        raise ConnectionLost(f"write: {os.strerror(exc.errno)}") from None
                    raise
            on_bytes(n)
            readable = n == CHUNK
            if not readable:
                pipes.put(pipe)  # all written: empty, lend it to the next reader while we wait
                pipe = None
        try:
            mark_own_close(dst)  # a deliberate FIN: it passes the node's FIN/RST guard (proxy.rstguard)
            dst.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno not in CONNECTION_LOST:
                raise
    finally:
        if pipe is not None:
            pipes.discard(pipe)


# ------------------------------------------------------------------------------ the in-kernel relay
_TCP_CLOSE = 7
#: how long a cancelled relay waits for bytes in flight inside the kernel before it gives up (moves)
LEAVE_TIMEOUT = 2.0
#: bytes per leg a leaving relay reads while it waits for the other leg's queue to drain
HOLD_READ_LIMIT = 4 << 20


def _tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


def _check_reset(sock: socket.socket, where: str, shut: bool = False) -> None:
    """Raise ConnectionLost if ``sock`` was reset (or otherwise closed by the kernel).

    ``shut``: we half-closed it ourselves, so its reaching CLOSE (our FIN acknowledged after the peer's)
    is the normal end. The error it reports is read (and so cleared) here: a leg gets a harmless EPIPE
    when its peer's FIN passes through the relay (the kernel tries to send the empty FIN segment and
    stops sending to it, which is right: nothing follows a FIN), and a cleared error no longer wakes us."""
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if (_tcp_state(sock) == _TCP_CLOSE and not shut) or (err and err != errno.EPIPE):
        raise ConnectionLost(f"{where}: {os.strerror(err) if err else 'reset'}")


async def _until(done: Callable[[], bool], watch: tuple[socket.socket, ...], where: str,
                 limit: float = float("inf"), shut: set[int] = frozenset()) -> bool:
    """Poll ``done`` (1 ms, backing off to 50 ms) while none of ``watch`` is reset; False after ``limit`` s."""
    delay, deadline = 0.0005, trio.current_time() + limit
    while not done():
        for s in watch:
            _check_reset(s, where, s.fileno() in shut)
        if trio.current_time() >= deadline:
            return False
        await trio.sleep(delay)
        delay = min(delay * 2, 0.05)
    return True


class Switch:
    """What :func:`sockmap_relay` returns when it handed a connection back to Python mid-way (a bulk
    phase, or a reader too slow for the kernel's queue): the bytes it held on each leg, to be written
    before the splice pump takes over."""

    def __init__(self, to_backend: bytes, to_client: bytes, why: str):
        self.to_backend, self.to_client, self.why = to_backend, to_client, why


async def sockmap_relay(relay, client: trio.socket.SocketType, backend: trio.socket.SocketType,
                        counters: Callable[[int, int], None],
                        spill: tuple[Callable[[bytes], None], Callable[[bytes], None]] | None = None,
                        expose: Callable[[Callable[[], None] | None], None] | None = None,
                        careful: Callable[[], bool] = lambda: True) -> bool | Switch:
    """Relay ``client`` and ``backend`` to each other in the kernel (:class:`proxy.sockmap.Relay`)
    until both directions ended; Python only waits for EOF and reset on each leg.

    ``counters(to_backend, to_client)`` receives byte counts as they become known (at the end, and
    whenever the function handed to ``expose`` is called; ``expose(None)`` at the end). EOF on a leg
    is passed on as ``shutdown(SHUT_WR)`` of the other once every byte before it is in that leg's send
    queue. Raises :class:`ConnectionLost` when either leg resets. Returns False, having done nothing,
    where the relay cannot take this connection (the caller uses the splice pump), True once it ended,
    or a :class:`Switch` when the relay's governor moved it to the splice pump (bulk or a slow reader:
    the kernel's relay queue has no bound of its own, see :class:`proxy.sockmap.Governor`).

    ``spill`` (to_backend, to_client): cancelled with it (a live move), the relay holds new bytes on
    their own socket, waits until no byte is still on its way inside the kernel, and hands the held
    ones to ``spill`` as the sockets leave the map, so they can be frozen with nothing lost. A byte
    that slips in at the last instant is detected: ConnectionLost then. ``careful()`` says at the
    cancellation whether that is needed (only for a move; otherwise the sockets just leave).
    """
    from proxy.sockmap import WINDOW, BpfError  # noqa: PLC0415

    cs, bs = client._sock, backend._sock
    try:
        lc, lb = relay.join(cs, bs)
    except BpfError as exc:
        # EOPNOTSUPP: a leg is no longer ESTABLISHED (its peer's FIN came first); ENOSPC: the map is full
        log.debug("in-kernel relay refused this connection (%s): splice pump instead", exc)
        return False
    reported = [0, 0]

    def report() -> None:
        now = (relay.seen(lc) - relay.held(lc), relay.seen(lb) - relay.held(lb))
        counters(now[0] - reported[0], now[1] - reported[1])
        reported[0], reported[1] = now

    shut: set[int] = set()  # the legs we half-closed
    governor = relay.governor()

    async def direction(src, dst, name: str, done: trio.Event) -> None:
        while True:
            await trio.lowlevel.wait_readable(src.sock)
            _check_reset(src.sock, name, src.sock.fileno() in shut)
            try:
                peek = src.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue  # woken by an error we just cleared
            except OSError as exc:
                if exc.errno in CONNECTION_LOST:
                    raise ConnectionLost(f"{name}: {os.strerror(exc.errno)}") from None
                raise
            if peek:
                if relay.holding(src):
                    # a burst past the window (or a leave under way): the held bytes go out with it
                    governor.request(lc, f"a burst {name}: more than {WINDOW} bytes at once" if relay.seen(src) > WINDOW
                                     else f"bytes {name} arrived before the other leg was in the relay")
                    await trio.sleep_forever()
                # the program passes bytes to a socket's own queue only while leaving: a bug, not data to lose
                raise RuntimeError(f"{name}: bytes on a relayed socket's own queue")
            break
        # EOF: pass it on once every byte before it has left the kernel's queue for dst
        await _until(lambda: relay.caught_up(src, eof=True) and relay.delivered(src, dst), (dst.sock,), name,
                     shut=shut)
        try:
            shut.add(dst.sock.fileno())
            mark_own_close(dst.sock)  # a deliberate FIN: it passes the node's FIN/RST guard (proxy.rstguard)
            dst.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno in CONNECTION_LOST:
                raise ConnectionLost(f"{name}: {os.strerror(exc.errno)}") from None
            raise
        done.set()
        # src sends nothing more, but may still be reset while the other direction goes on
        while True:
            await trio.sleep(0.5)
            _check_reset(src.sock, name, src.sock.fileno() in shut)

    wake = trio.Event()  # both directions ended, or the governor wants the connection out
    taken: list[list[bytes]] = [[], []]  # bytes a leave read from each leg (see _leave)
    if expose is not None:
        expose(report)
    leaving = False
    try:
        try:
            async with trio.open_nursery() as nursery:
                done_c, done_b = trio.Event(), trio.Event()
                nursery.start_soon(direction, lc, lb, "client", done_c)
                nursery.start_soon(direction, lb, lc, "backend", done_b)

                async def both() -> None:
                    await done_c.wait()
                    await done_b.wait()
                    wake.set()
                nursery.start_soon(both)
                governor.watch(lc, lb, wake)
                await wake.wait()
                # a direction that passed its FIN on is over (its pump sees EOF at once and shuts the
                # other leg again, which is harmless); one waiting to pass it on is cancelled and its
                # pump redoes that
                leaving = bool(governor.why(lc)) and not (done_c.is_set() and done_b.is_set())
                if not leaving:
                    await done_c.wait()
                    await done_b.wait()
                nursery.cancel_scope.cancel()
        finally:
            why = governor.why(lc)
            governor.forget(lc)
        if not leaving:
            return True
        log.debug("handing a connection to the splice pump: %s", why)
        t0 = trio.current_time()
        held = await _leave(relay, lc, lb, shut, taken=taken)  # cancelled (a move): the except below finishes it
        log.debug("left the relay in %.1f ms, %d + %d bytes held", (trio.current_time() - t0) * 1000,
                  len(held[0]), len(held[1]))
        return Switch(held[0], held[1], why)
    except BaseException as exc:
        # cancelled (a move, the grace time): the nursery may raise the Cancelled in a group
        if not _only_cancelled(exc):
            raise
        if spill is not None and careful() and not lc.parted:
            with trio.CancelScope(shield=True):
                held = await _leave(relay, lc, lb, shut, LEAVE_TIMEOUT, taken)
            spill[0](held[0])
            spill[1](held[1])
        raise
    finally:
        relay.part(lc, lb)  # nothing if already parted
        report()
        if expose is not None:
            expose(None)


def _only_cancelled(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_cancelled(e) for e in exc.exceptions)
    return isinstance(exc, trio.Cancelled)


async def _leave(relay, lc, lb, shut: set[int], limit: float = float("inf"),
                 taken: list[list[bytes]] | None = None) -> tuple[bytes, bytes]:
    """Take a connection out of the kernel relay without losing a byte; the bytes that arrived on each
    leg and were not relayed (to_backend, to_client).

    New bytes are held on their own socket (charged to it, so its TCP window closes: bounded), until
    every byte already redirected is in the other leg's send queue; then the held ones are copied
    (peeked: reading would reopen the window at the worst moment) and the sockets leave the map, which
    drops the kernel's copy. The program counts the bytes it held: more than were peeked means some
    came in between, and the connection is reset (ConnectionLost) rather than continued without them.
    """
    from proxy.sockmap import read_held  # noqa: PLC0415

    started = trio.current_time()
    relay.hold(lc, lb)
    legs = (lc, lb)
    # what was read so far: kept by the caller, so a leave cancelled half-way (a move during a switch)
    # is finished by the next call without losing what this one read
    taken = taken if taken is not None else [[], []]
    ntaken = [sum(map(len, t)) for t in taken]
    deadline = trio.current_time() + limit
    delay = 0.0005
    try:
        while True:
            # held bytes wait in the same kernel queue as the bytes redirected *to* their socket, in
            # order: one over the socket's receive budget blocks those behind it until it is read.
            # So read them as they come (up to HOLD_READ_LIMIT per leg: a sender whose peer does not
            # read must not fill this process instead; its window closes on the unread ones).
            for i, leg in enumerate(legs):
                if ntaken[i] < HOLD_READ_LIMIT:
                    data = read_held(leg.sock, limit=HOLD_READ_LIMIT - ntaken[i])
                    if data:
                        taken[i].append(data)
                        ntaken[i] += len(data)
            if relay.delivered(lc, lb) and relay.delivered(lb, lc):
                # every redirected byte has left the kernel's queues; the held ones wait on their own
                # socket. Shrink the receive buffers (so reading them opens no window), read them all
                # (a read, not a peek: the kernel counts a held byte as consumed only when read), and
                # let go of the map. Held bytes not on the queue yet (kept back over its budget) come
                # after this read: try again.
                bufs = [_shrink_rcvbuf(leg.sock) for leg in legs]
                try:
                    for i, leg in enumerate(legs):
                        data = read_held(leg.sock)
                        if data:
                            taken[i].append(data)
                            ntaken[i] += len(data)
                    if all(relay.held(leg) == ntaken[i] for i, leg in enumerate(legs)):
                        relay.part(lc, lb)
                        break
                finally:
                    for leg, size in zip(legs, bufs):
                        _restore_rcvbuf(leg.sock, size)
            for leg in legs:
                _check_reset(leg.sock, "leaving the relay", leg.sock.fileno() in shut)
            if trio.current_time() >= deadline:
                relay.part(lc, lb)
                raise ConnectionLost(f"leaving the relay: bytes still queued in the kernel after {limit:g} s "
                                     "(the receiver does not read)")
            await trio.sleep(delay)
            delay = min(delay * 2, 0.02)
    except trio.Cancelled:
        raise  # still held and joined: the caller finishes or parts
    except BaseException:
        relay.part(lc, lb)
        raise
    for leg in legs:
        # the EPIPE a passed-on FIN leaves (see _check_reset) would fail the pump's first write
        err = leg.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err and err != errno.EPIPE:
            raise ConnectionLost(f"leaving the relay: {os.strerror(err)}")
    for i, leg in enumerate(legs):
        if relay.held(leg) != ntaken[i]:
            raise ConnectionLost("leaving the relay: bytes arrived at the instant the sockets left the map "
                                 f"({relay.held(leg)} held, {ntaken[i]} read)")
    return b"".join(taken[0]), b"".join(taken[1])


_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


def _shrink_rcvbuf(sock: socket.socket) -> int:
    size = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
    return size


def _restore_rcvbuf(sock: socket.socket, size: int) -> None:
    """Give the receive buffer back, as large as autotuning could have made it: a size set by hand
    turns autotuning off for good, and the buffer of a young connection would then cap its throughput.

    The window clamp too: a segment that arrives while the buffer is shrunk and changes the socket's
    len/truesize ratio makes the kernel (``tcp_measure_rcv_mss``) clamp the window to what the tiny
    buffer holds (about 2 KB), and nothing raises it again while every segment the sender may send
    is smaller than the last one measured: the leg then crawls at some 20 KB/s on window probes
    (``test_receive_window_reopens_after_the_leave_shrink``)."""
    try:
        size = max(size, int(open("/proc/sys/net/ipv4/tcp_rmem").read().split()[2]))
    except (OSError, ValueError, IndexError):
        pass
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, size // 2)  # the kernel doubles what it is given
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size // 2)
    try:
        # the buffer's size in bytes is at least the window it holds; the kernel uses the smaller of the two
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_WINDOW_CLAMP,
                        sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
    except OSError:
        pass  # reset meanwhile: the caller's reset check sees it


async def send_all(sock: trio.socket.SocketType, data: bytes, spill: Callable[[bytes], None] | None = None) -> None:
    """Write ``data`` to ``sock`` (bytes a relay held when it handed the connection to the pump).
    Cancelled (a live move), the bytes not yet written go to ``spill``, as a pump's would."""
    view = memoryview(data)
    try:
        while view:
            try:
                n = sock._sock.send(view, socket.MSG_DONTWAIT)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                continue
            except OSError as exc:
                if exc.errno in CONNECTION_LOST:
                    raise ConnectionLost(f"write: {os.strerror(exc.errno)}") from None
                raise
            view = view[n:]
    except trio.Cancelled:
        if spill is not None and view:
            spill(bytes(view))
        raise
