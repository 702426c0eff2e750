"""Types shared by every decoder in ``protocols/``: the connection key, the error event, and the
two small interfaces (an application decoder per TCP connection, a state table per protocol).

Why a shared module: the pipeline glues decoders written independently (SMB here, ONC RPC/NFS
elsewhere); they agree only on these names. Nothing in here does I/O or knows about clocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["ConnKey", "ProtocolError", "AppDecoder", "StateTable"]


@dataclass(frozen=True, order=True)
class ConnKey:
    """One TCP connection, oriented: the client is the side that connects (or, picked up
    mid-stream, the side that does not use the well-known server port)."""

    client_ip: str
    client_port: int
    server_ip: str
    server_port: int

    @property
    def client(self) -> str:
        return f"{self.client_ip}:{self.client_port}"

    @property
    def server(self) -> str:
        return f"{self.server_ip}:{self.server_port}"

    def __str__(self) -> str:
        return f"{self.client} -> {self.server}"


@dataclass(frozen=True)
class ProtocolError:
    """Malformed input from the wire (never a bug of ours): the stream it came from becomes
    unsynchronised until the decoder finds a message boundary again.

    ``offset`` is the byte offset in that direction's stream where decoding failed, if known.
    """

    what: str
    offset: int | None = None


@runtime_checkable
class AppDecoder(Protocol):
    """One per TCP connection and application protocol. Sans-I/O: never raises on bad input."""

    unsynchronised: bool

    def feed(self, from_client: bool, data: bytes) -> list[object]:
        """In-order bytes of one direction -> the events they complete."""
        ...

    def gap(self, from_client: bool, length: int) -> list[object]:
        """``length`` bytes of one direction were lost (capture gap): resync at the next message
        boundary if the protocol allows it."""
        ...


@runtime_checkable
class StateTable(Protocol):
    """Session state of one protocol over all connections, built only from decoder events."""

    def apply(self, conn_key: ConnKey, event: object) -> None: ...

    def forget(self, conn_key: ConnKey) -> None:
        """The connection closed: drop what lived only on it."""
        ...

    def to_json(self) -> dict: ...
