"""File descriptors: the process limit, and the data path's share of it.

Why a budget instead of handling EMFILE where it happens: a proxied connection needs a client
socket, a backend socket and, while bytes move, a pipe per direction. Running out half-way (client
accepted, no descriptor for the backend socket or the pipe) can only end in resetting a client that
the node had already taken. Counting what the data path holds lets the node stop *accepting* a
little before the limit instead: new clients then wait in the listen backlog (their handshake is
done by the kernel) and are accepted as soon as older connections end.

The count is of what the data path itself opens (two sockets per connection, the pipes); the rest
of the node (listeners, control socket, sync link, logs) is what was open when the budget was first
used plus a reserve for what it opens later.
"""

from __future__ import annotations

import logging
import os
import resource

import trio

log = logging.getLogger("pairproxy.fds")


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft descriptor limit to the hard one (the usual soft 1024 would cap a node at a few
    hundred connections); (old soft, new soft)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return soft, soft
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, target, exc)
            return soft, soft
        log.info("descriptor limit raised from %d to %d", soft, target)
    return soft, target


def open_descriptors() -> int:
    """How many descriptors this process has open now (O(n): for start-up and tests, not per connection)."""
    return len(os.listdir("/proc/self/fd"))


class FdBudget:
    """The data path's share of the process's descriptors, with a wait for room.

    ``acquire(n, headroom)`` waits until ``n`` more descriptors fit with ``headroom`` still free;
    ``release(n)`` gives them back and wakes the waiters. The limit is read at every check (one
    cheap system call), so a limit changed while running (``prlimit``) counts at once.
    """

    def __init__(self, reserve: int | None = None):
        self.used = 0
        self._reserve = reserve
        self._base: int | None = None
        self._lot = trio.lowlevel.ParkingLot()

    def capacity(self) -> int:
        """Descriptors the data path may hold in all."""
        if self._base is None:
            self._base = open_descriptors()
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if limit == resource.RLIM_INFINITY:
            limit = 1 << 20
        reserve = self._reserve if self._reserve is not None else max(64, limit // 50)
        return limit - self._base - reserve

    def fits(self, n: int, headroom: int = 0) -> bool:
        return self.used + n + headroom <= self.capacity()

    def try_acquire(self, n: int, headroom: int = 0) -> bool:
        if not self.fits(n, headroom):
            return False
        self.used += n
        return True

    async def acquire(self, n: int, headroom: int = 0) -> None:
        """Take ``n`` descriptors, waiting as long as they do not fit (a checkpoint either way)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self.try_acquire(n, headroom):
            await self._lot.park()
        await trio.lowlevel.cancel_shielded_checkpoint()

    def release(self, n: int) -> None:
        self.used -= n
        if self._lot:
            self._lot.unpark_all()

    def status(self) -> dict:
        return {"used": self.used, "capacity": self.capacity()}


#: The process-wide budget every ServiceProxy and pump shares (descriptors are per process).
BUDGET = FdBudget()
