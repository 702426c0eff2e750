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
