"""One running node per config: the lock ``pairproxy run`` takes before it touches the kernel.

Why this exists: ``run`` removes an address or macvlan "left by an earlier run" before the pair
decides who serves. Done by a second ``run`` of a node that is alive, that removes the live node's
address and its clients are cut off. So before any kernel change, ``run`` must know it is the only
node with this config, and ``cleanup`` must know no node is running before it removes anything.

Three signs of a running node, any one is enough:

- its control socket answers (``node.control``);
- it holds ``flock`` on ``<state_dir>/lock`` (released by the kernel when the process dies, even by
  SIGKILL, so a killed node never blocks its restart or ``cleanup``);
- it holds an abstract Unix socket named after its service address. Abstract names live per network
  namespace and vanish with the process: this catches a copy of the config with another
  ``state_dir`` and ``control`` that would otherwise take the same address away.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

from proxy.config import Config
from proxy.control import socket_is_live

LOCK_FILE = "lock"


class AlreadyRunning(Exception):
    """Another node runs with this config (or this service address); ``str()`` says how we know."""


def _address_name(config: Config) -> bytes:
    return f"\0pairproxy-node-address-{config.node.address.ip}".encode()


def running_node(config: Config) -> str | None:
    """Why we think a node runs with ``config`` in this network namespace, or None.

    Read-only: takes no lock and leaves nothing behind (for ``cleanup`` and ``check``).
    """
    node = config.node
    if socket_is_live(node.control):
        return f"node {node.name} is running: its control socket {node.control} answers"
    lock = node.state_dir / LOCK_FILE
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        pass
    else:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f"node {node.name} is running: {_holder(lock)} holds {lock}"
        finally:
            os.close(fd)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.bind(_address_name(config))
    except OSError:
        return f"a node serving {node.address.ip} is running in this network namespace (another config?)"
    finally:
        probe.close()
    return None


def _holder(lock: Path) -> str:
    try:
        pid = lock.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "another process"


class InstanceLock:
    """Held by ``pairproxy run`` for the life of the process; the kernel drops it when the process ends.

    Take it before the first kernel change (``acquire``); :meth:`release` is for tests and an orderly
    exit. The file descriptors are close-on-exec, so child processes (the observer) never hold it.
    """

    def __init__(self, config: Config):
        self.config = config
        self._fd: int | None = None
        self._address: socket.socket | None = None

    def acquire(self) -> "InstanceLock":
        """Raises AlreadyRunning if a node runs with this config, OSError (naming the key) if the lock
        cannot be made."""
        node = self.config.node
        if socket_is_live(node.control):
            raise AlreadyRunning(f"node {node.name} is already running (its control socket {node.control} "
                                 "answers); not touching its address")
        try:
            node.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OSError(exc.errno, f"node.state_dir: cannot create {node.state_dir}: {exc.strerror}") from None
        lock = node.state_dir / LOCK_FILE
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise OSError(exc.errno, f"node.state_dir: cannot open {lock}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(f"node {node.name} is already running ({_holder(lock)} holds {lock}); "
                                 "not touching its address") from None
        address = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            address.bind(_address_name(self.config))
        except OSError as exc:
            address.close()
            os.close(fd)
            if exc.errno != errno.EADDRINUSE:
                raise
            raise AlreadyRunning(f"another node serving {node.address.ip} is already running in this network "
                                 "namespace (with another state_dir); not touching its address") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd, self._address = fd, address
        return self

    def release(self) -> None:
        if self._address is not None:
            self._address.close()
            self._address = None
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "InstanceLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()
