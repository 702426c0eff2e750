"""The data path: move bytes from one TCP socket to another without looking at them.

Why ``os.splice`` through a pipe: the payload stays in kernel pages (socket -> pipe -> socket), so a
64 MiB SMB read costs a few hundred system calls and no copies into Python objects. The pipe is drained
completely before the next read, which gives backpressure for free: while the destination socket's
send buffer is full we do not read from the source, so the source's receive window closes and the
sender slows down, exactly as a plain TCP connection would.

Each direction of a connection is one task running :func:`splice_pump`. EOF in one direction is passed
on as ``shutdown(SHUT_WR)`` on the other socket (half-close), and the other direction goes on until it
sees its own EOF.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from typing import Callable

import trio

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


async def splice_pump(src: trio.socket.SocketType, dst: trio.socket.SocketType,
                      on_bytes: Callable[[int], None]) -> None:
    """Copy ``src`` to ``dst`` until EOF on ``src``, then half-close ``dst``.

    Raises :class:`ConnectionLost` when either side resets. ``on_bytes(n)`` is called after each
    chunk has been fully written, so counters never run ahead of what the other side received.
    """
    src_fd, dst_fd = src.fileno(), dst.fileno()
    pipe_r, pipe_w = _open_pipe()
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
            try:
                n = os.splice(src_fd, pipe_w, CHUNK, flags=_FLAGS)
            except BlockingIOError:
                readable = False
                continue
            except OSError as exc:
                if exc.errno in CONNECTION_LOST:
                    raise ConnectionLost(f"read: {os.strerror(exc.errno)}") from None
                raise
            if n == 0:
                break
            left = n
            while left:
                try:
                    left -= os.splice(pipe_r, dst_fd, left, flags=_FLAGS)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(dst)
                except OSError as exc:
                    if exc.errno in CONNECTION_LOST:
                        raise ConnectionLost(f"write: {os.strerror(exc.errno)}") from None
                    raise
            on_bytes(n)
            readable = n == CHUNK
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno not in CONNECTION_LOST:
                raise
    finally:
        os.close(pipe_r)
        os.close(pipe_w)
