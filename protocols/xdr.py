"""XDR (RFC 4506) read cursor and the :class:`Program` description of one RPC program's bodies.

Why a module of its own: :mod:`protocols.rpc` (the record/envelope decoder) uses the program
bodies of :mod:`protocols.nfs` as its default, and :mod:`protocols.nfs` decodes those bodies with
the XDR cursor. With the cursor here the imports run one way only: rpc -> nfs -> xdr.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["Xdr", "XdrError", "XdrShort", "Program", "MAX_RECORD"]

MAX_RECORD = 4 << 20
"""Largest record we accept (NFS READ/WRITE of 1 MiB plus headers fit easily)."""


class XdrError(ValueError):
    """The XDR data is short or not what the protocol allows (caught inside this package)."""


class XdrShort(XdrError):
    """The data ended before the item did (more bytes might make it parse)."""


_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")


class Xdr:
    """A read cursor over XDR data (RFC 4506): big-endian 4-byte units, opaques padded to 4."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes | memoryview, pos: int = 0) -> None:
        self.buf = memoryview(buf)
        self.pos = pos

    def _take(self, n: int) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise XdrShort(f"short data: need {n} bytes at {self.pos}, have {len(self.buf) - self.pos}")
        v = self.buf[self.pos:end]
        self.pos = end
        return v

    @property
    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def u32(self) -> int:
        return _U32.unpack(self._take(4))[0]

    def i32(self) -> int:
        return _I32.unpack(self._take(4))[0]

    def u64(self) -> int:
        return _U64.unpack(self._take(8))[0]

    def i64(self) -> int:
        return _I64.unpack(self._take(8))[0]

    def boolean(self) -> bool:
        v = self.u32()
        if v > 1:
            raise XdrError(f"bad bool {v}")
        return bool(v)

    def fixed(self, n: int) -> bytes:
        """Fixed-length opaque[n] (padded to 4)."""
        data = bytes(self._take(n))
        self._take((-n) % 4)
        return data

    def opaque(self, limit: int = MAX_RECORD) -> bytes:
        """Variable-length opaque<limit>."""
        n = self.u32()
        if n > limit:
            raise XdrError(f"opaque of {n} bytes exceeds {limit}")
        return self.fixed(n)

    def skip_opaque(self, limit: int = MAX_RECORD) -> int:
        """Skip an opaque<> without copying it; returns its length (READ/WRITE data)."""
        n = self.u32()
        if n > limit:
            raise XdrError(f"opaque of {n} bytes exceeds {limit}")
        self._take(n + (-n) % 4)
        return n

    def string(self, limit: int = MAX_RECORD) -> str:
        return self.opaque(limit).decode("utf-8", errors="surrogateescape")

    def array(self, item: Callable[["Xdr"], Any], limit: int = 1 << 16) -> list:
        n = self.u32()
        if n > limit or n > self.remaining:  # every item takes at least one byte
            raise XdrError(f"array of {n} items exceeds {min(limit, self.remaining)}")
        return [item(self) for _ in range(n)]

    def optional(self, item: Callable[["Xdr"], Any]) -> Any:
        """XDR ``*item``: a bool then the item if true."""
        return item(self) if self.boolean() else None

    def linked(self, item: Callable[["Xdr"], Any], limit: int = 1 << 20) -> list:
        """An XDR linked list (``entry *next``), flattened; bounded so junk cannot loop long."""
        out = []
        while self.boolean():
            if len(out) >= limit:
                raise XdrError("linked list too long")
            out.append(item(self))
        return out


@dataclass(frozen=True)
class Program:
    """How to decode the bodies of one (program, version): names and two functions.

    ``call(proc, xdr) -> dict`` decodes arguments; ``reply(proc, args, xdr) -> dict`` decodes
    results, given the call's decoded arguments (None if it was not decoded). Both raise
    :class:`XdrError` on bad data; a partial result may be attached to the exception as ``.partial``.
    """

    name: str
    procs: dict[int, str]
    call: Callable[[int, Xdr], dict]
    reply: Callable[[int, dict | None, Xdr], dict]
