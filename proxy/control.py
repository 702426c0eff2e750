"""The node's local control socket: one JSON request line in, one JSON reply line out.

Why a Unix socket with JSON lines: ``pairproxy status`` must work with nothing but the config file
(which names the socket), file permissions are the access control, and operators can speak to it
with ``socat`` when they need to.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Any, Awaitable, Callable

import trio

log = logging.getLogger("pairproxy.control")

MAX_REQUEST = 64 * 1024
Handler = Callable[[dict], Awaitable[Any]]


class ControlError(Exception):
    """The control socket cannot be served or reached."""


def socket_is_live(path: Path) -> bool:
    """True if something accepts connections on the Unix socket ``path`` (a running node)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def control_path_problem(path: Path) -> str | None:
    """Why ``path`` cannot become the control socket, or None.

    Only a socket may be replaced (a stale one, left by a killed node): anything else at that path
    (a config file, a symlink, a directory) belongs to someone, and a typo in ``control`` must not
    delete it.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"{path}: cannot inspect: {exc.strerror}"
    if not stat.S_ISSOCK(mode):
        kind = ("a symlink" if stat.S_ISLNK(mode) else "a directory" if stat.S_ISDIR(mode)
                else "a regular file" if stat.S_ISREG(mode) else "not a socket")
        return f"{path} exists and is {kind}, not a control socket; not replacing it (choose another path)"
    return None


def bind_control_socket(path: Path) -> trio.socket.SocketType:
    """Listen on ``path``; a stale socket from a crashed node is replaced, a live one is an error,
    and anything that is not a socket is left alone (an error)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    problem = control_path_problem(path)
    if problem:
        raise ControlError(problem)
    if path.exists() or path.is_symlink():
        if socket_is_live(path):
            raise ControlError(f"{path}: another node is already running with this control socket")
        path.unlink()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock._sock.bind(str(path))
        os.chmod(path, 0o660)
        sock.listen(16)
    except OSError as exc:
        sock.close()
        raise ControlError(f"{path}: cannot listen: {exc.strerror}") from None
    return sock


async def serve_control(sock: trio.socket.SocketType, path: Path, handlers: dict[str, Handler]) -> None:
    """Answer requests ``{"cmd": NAME, ...}`` with ``handlers[NAME](request)`` until cancelled."""
    try:
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await sock.accept()
                nursery.start_soon(_answer, conn, handlers)
    finally:
        sock.close()
        try:
            path.unlink()
        except FileNotFoundError:
            pass


async def _answer(sock: trio.socket.SocketType, handlers: dict[str, Handler]) -> None:
    async with trio.SocketStream(sock) as conn:
        data = b""
        with trio.move_on_after(5):
            while b"\n" not in data and len(data) < MAX_REQUEST:
                chunk = await conn.receive_some(4096)
                if not chunk:
                    break
                data += chunk
        try:
            request = json.loads(data.split(b"\n", 1)[0] or b"null")
            if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                raise ValueError("expected a JSON object with a string 'cmd'")
            handler = handlers.get(request["cmd"])
            if handler is None:
                raise ValueError(f"unknown command {request['cmd']!r}; known: {', '.join(sorted(handlers))}")
            reply = {"ok": True, "result": await handler(request)}
        except ValueError as exc:
            reply = {"ok": False, "error": str(exc)}
        except Exception as exc:
            # A bug behind one control command must not stop the node from serving clients.
            log.exception("control command failed")
            reply = {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
        try:
            await conn.send_all(json.dumps(reply).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the asking side went away; nothing to tell it


def request(path: Path, cmd: str, timeout: float = 5.0, **args: Any) -> Any:
    """Send one request to a running node (blocking; used by the CLI). Raises ControlError."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise ControlError(f"{path}: no such socket; is the node running?") from None
        except ConnectionRefusedError:
            raise ControlError(f"{path}: nobody listens; the node is not running (stale socket)") from None
        sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        raise ControlError(f"{path}: the node did not answer within {timeout:g}s") from None
    except OSError as exc:
        raise ControlError(f"{path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        reply = json.loads(data)
    except ValueError:
        raise ControlError(f"{path}: unreadable reply from the node") from None
    if not reply.get("ok"):
        raise ControlError(f"the node refused: {reply.get('error')}")
    return reply["result"]
