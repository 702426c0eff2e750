"""SMB2/3 over direct TCP (port 445), decoded without I/O: in-order bytes of one direction in,
request/response events out.

Layers, outermost first:

* **NetBIOS session framing** (4 bytes: type 0, 24-bit length). Each frame holds one SMB message or
  a compound chain of them (``NextCommand``), an SMB1 NEGOTIATE (0xFF 'SMB', the dialect upgrade some
  clients still start with), or an encrypted/compressed SMB3 transform (0xFD / 0xFC 'SMB'), which is
  opaque to a passive observer: counted and skipped by its length.
* **The 64-byte SMB2 header**, sync or async (flag 0x2), parsed with ``struct`` (it is on every message).
* **Command bodies**, fixed parts parsed with compiled ``construct`` structures; variable parts (names,
  share paths, security blobs, create contexts) read from offsets relative to the header, bounds-checked.

Requests are remembered per connection by MessageId until their final response (a STATUS_PENDING
interim response only records the AsyncId), so every :class:`Smb2Response` carries its request: the
state table needs the share path of a TREE_CONNECT or the name of a CREATE when the response arrives.
Related compound requests inherit SessionId/TreeId, and a related FileId of all ones means "the file the
preceding CREATE in this chain opened"; both are resolved here so that the state table never sees them.

Large READ responses and WRITE requests are not buffered: once the fixed part of a single (not
compounded) message is in, the remaining payload bytes are skipped as they stream by. Memory per
direction is therefore bounded by the largest *non-bulk* frame, not by the I/O size.

Bad input never raises: a malformed frame yields a :class:`~protocols.events.ProtocolError`, sets
``unsynchronised`` (sticky: the tables of this connection may now be incomplete), and the decoder hunts
for the next plausible NetBIOS header followed by an SMB protocol id. A capture gap inside skipped bulk
payload costs nothing; any other gap starts the same hunt.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from construct import (Array, Bytes, ConstructError, Int8ul, Int16ul, Int32ul, Int64ul, Padding, Struct,
                       this)

from .events import ProtocolError

__all__ = ["Smb2Decoder", "Smb2Request", "Smb2Response", "Smb2Interim", "Smb2Notification",
           "Smb1Negotiate", "Smb2Opaque", "COMMAND_NAMES", "STATUS_PENDING", "dialect_name",
           "parse_ntlmssp_user"]

# ------------------------------------------------------------------------------------------ constants
NEGOTIATE, SESSION_SETUP, LOGOFF, TREE_CONNECT, TREE_DISCONNECT, CREATE, CLOSE, FLUSH, READ, WRITE, \
    LOCK, IOCTL, CANCEL, ECHO, QUERY_DIRECTORY, CHANGE_NOTIFY, QUERY_INFO, SET_INFO, OPLOCK_BREAK, \
    SERVER_TO_CLIENT_NOTIFICATION = range(20)
COMMAND_NAMES = ("NEGOTIATE", "SESSION_SETUP", "LOGOFF", "TREE_CONNECT", "TREE_DISCONNECT", "CREATE",
                 "CLOSE", "FLUSH", "READ", "WRITE", "LOCK", "IOCTL", "CANCEL", "ECHO", "QUERY_DIRECTORY",
                 "CHANGE_NOTIFY", "QUERY_INFO", "SET_INFO", "OPLOCK_BREAK", "SERVER_TO_CLIENT_NOTIFICATION")

FLAG_RESPONSE = 0x1
FLAG_ASYNC = 0x2
FLAG_RELATED = 0x4

STATUS_SUCCESS = 0
STATUS_PENDING = 0x00000103
STATUS_MORE_PROCESSING_REQUIRED = 0xC0000016
STATUS_BUFFER_OVERFLOW = 0x80000005

UNSOLICITED_MESSAGE_ID = 0xFFFFFFFFFFFFFFFF
ALL_ONES_SESSION = 0xFFFFFFFFFFFFFFFF
ALL_ONES_TREE = 0xFFFFFFFF
ALL_ONES_FILE_ID = "f" * 32

SMB2_MAGIC = b"\xfeSMB"
SMB1_MAGIC = b"\xffSMB"
TRANSFORM_MAGIC = b"\xfdSMB"
COMPRESSED_MAGIC = b"\xfcSMB"
_MAGICS = (SMB2_MAGIC, SMB1_MAGIC, TRANSFORM_MAGIC, COMPRESSED_MAGIC)

HEADER_SIZE = 64
MAX_FRAME = 0xFFFFFF  # 24-bit NetBIOS length
BULK_THRESHOLD = 64 * 1024  # frames larger than this are decoded from their head and then skipped
BULK_PEEK = 4096
MAX_OUTSTANDING = 8192  # requests remembered per connection; beyond, the oldest are forgotten
MAX_ORPHANS = 64  # responses held while waiting for a request that may arrive late

_HEADER = struct.Struct("<4sHHIHHIIQQQ16s")
_NBT = struct.Struct(">I")

_DIALECTS = {0x0202: "2.0.2", 0x0210: "2.1", 0x0222: "2.2.2", 0x02FF: "2.???", 0x0300: "3.0",
             0x0302: "3.0.2", 0x0310: "3.1.0", 0x0311: "3.1.1"}


def dialect_name(code: int) -> str:
    return _DIALECTS.get(code, f"0x{code:04x}")


# ------------------------------------------------------------------------------------------- events
@dataclass(frozen=True, eq=True)
class Smb2Request:
    """A client request. ``fields`` holds the decoded command-specific values (see ``_REQUEST_DECODERS``)."""

    command: int
    message_id: int
    session_id: int
    tree_id: int
    flags: int
    fields: dict = field(default_factory=dict, hash=False)

    @property
    def name(self) -> str:
        return COMMAND_NAMES[self.command] if self.command < len(COMMAND_NAMES) else f"0x{self.command:x}"

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, eq=True)
class Smb2Response:
    """A final server response, with the request it answers (``None`` if we never saw it)."""

    command: int
    message_id: int
    session_id: int
    tree_id: int
    async_id: int | None
    status: int
    fields: dict = field(default_factory=dict)
    request: Smb2Request | None = None

    @property
    def name(self) -> str:
        return COMMAND_NAMES[self.command] if self.command < len(COMMAND_NAMES) else f"0x{self.command:x}"

    @property
    def ok(self) -> bool:
        return self.status == STATUS_SUCCESS

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Smb2Interim:
    """STATUS_PENDING: the server will answer ``message_id`` later, asynchronously as ``async_id``."""

    command: int
    message_id: int
    session_id: int
    async_id: int | None


@dataclass(frozen=True, eq=True)
class Smb2Notification:
    """A server message nobody asked for (MessageId all ones): oplock/lease breaks, notifications."""

    command: int
    session_id: int
    fields: dict = field(default_factory=dict)

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Smb1Negotiate:
    """An SMB1 NEGOTIATE offering the listed dialects; the server answers with an SMB2 NEGOTIATE."""

    dialects: tuple[str, ...]


@dataclass(frozen=True)
class Smb2Opaque:
    """A message a passive observer cannot read: kind is "encrypted" or "compressed"."""

    from_client: bool
    kind: str
    session_id: int | None
    length: int


# ------------------------------------------------------------------------------- command structures
def _c(s: Struct) -> Struct:
    """Compile a structure where construct can (it is ~5x faster); fall back to the interpreter."""
    try:
        return s.compile()
    except Exception:  # pragma: no cover - depends on construct's compiler coverage
        return s


FILE_ID = Struct("persistent" / Int64ul, "volatile" / Int64ul)

NEGOTIATE_REQ = _c(Struct("size" / Int16ul, "dialect_count" / Int16ul, "security_mode" / Int16ul, Padding(2),
                          "capabilities" / Int32ul, "client_guid" / Bytes(16), "context_offset" / Int32ul,
                          "context_count" / Int16ul, Padding(2),
                          "dialects" / Array(this.dialect_count, Int16ul)))
NEGOTIATE_RESP = _c(Struct("size" / Int16ul, "security_mode" / Int16ul, "dialect" / Int16ul,
                           "context_count" / Int16ul, "server_guid" / Bytes(16), "capabilities" / Int32ul,
                           "max_transact" / Int32ul, "max_read" / Int32ul, "max_write" / Int32ul,
                           "system_time" / Int64ul, "start_time" / Int64ul, "sec_offset" / Int16ul,
                           "sec_length" / Int16ul, "context_offset" / Int32ul))
SESSION_SETUP_REQ = _c(Struct("size" / Int16ul, "flags" / Int8ul, "security_mode" / Int8ul,
                              "capabilities" / Int32ul, "channel" / Int32ul, "sec_offset" / Int16ul,
                              "sec_length" / Int16ul, "previous_session_id" / Int64ul))
SESSION_SETUP_RESP = _c(Struct("size" / Int16ul, "session_flags" / Int16ul, "sec_offset" / Int16ul,
                               "sec_length" / Int16ul))
TREE_CONNECT_REQ = _c(Struct("size" / Int16ul, "flags" / Int16ul, "path_offset" / Int16ul,
                             "path_length" / Int16ul))
TREE_CONNECT_RESP = _c(Struct("size" / Int16ul, "share_type" / Int8ul, Padding(1), "share_flags" / Int32ul,
                              "capabilities" / Int32ul, "maximal_access" / Int32ul))
CREATE_REQ = _c(Struct("size" / Int16ul, "security_flags" / Int8ul, "oplock_level" / Int8ul,
                       "impersonation" / Int32ul, "create_flags" / Int64ul, Padding(8),
                       "desired_access" / Int32ul, "file_attributes" / Int32ul, "share_access" / Int32ul,
                       "disposition" / Int32ul, "create_options" / Int32ul, "name_offset" / Int16ul,
                       "name_length" / Int16ul, "contexts_offset" / Int32ul, "contexts_length" / Int32ul))
CREATE_RESP = _c(Struct("size" / Int16ul, "oplock_level" / Int8ul, "flags" / Int8ul, "create_action" / Int32ul,
                        "creation_time" / Int64ul, "last_access_time" / Int64ul, "last_write_time" / Int64ul,
                        "change_time" / Int64ul, "allocation_size" / Int64ul, "end_of_file" / Int64ul,
                        "file_attributes" / Int32ul, Padding(4), "file_id" / Bytes(16),
                        "contexts_offset" / Int32ul, "contexts_length" / Int32ul))
CREATE_CONTEXT = _c(Struct("next" / Int32ul, "name_offset" / Int16ul, "name_length" / Int16ul, Padding(2),
                           "data_offset" / Int16ul, "data_length" / Int32ul))
CLOSE_REQ = _c(Struct("size" / Int16ul, "flags" / Int16ul, Padding(4), "file_id" / Bytes(16)))
CLOSE_RESP = _c(Struct("size" / Int16ul, "flags" / Int16ul, Padding(4), "creation_time" / Int64ul,
                       "last_access_time" / Int64ul, "last_write_time" / Int64ul, "change_time" / Int64ul,
                       "allocation_size" / Int64ul, "end_of_file" / Int64ul, "file_attributes" / Int32ul))
FLUSH_REQ = _c(Struct("size" / Int16ul, Padding(6), "file_id" / Bytes(16)))
READ_REQ = _c(Struct("size" / Int16ul, "padding" / Int8ul, "flags" / Int8ul, "length" / Int32ul,
                     "offset" / Int64ul, "file_id" / Bytes(16), "minimum_count" / Int32ul, "channel" / Int32ul,
                     "remaining" / Int32ul))
READ_RESP = _c(Struct("size" / Int16ul, "data_offset" / Int8ul, Padding(1), "data_length" / Int32ul,
                      "data_remaining" / Int32ul))
WRITE_REQ = _c(Struct("size" / Int16ul, "data_offset" / Int16ul, "length" / Int32ul, "offset" / Int64ul,
                      "file_id" / Bytes(16), "channel" / Int32ul, "remaining" / Int32ul,
                      "channel_info_offset" / Int16ul, "channel_info_length" / Int16ul, "flags" / Int32ul))
WRITE_RESP = _c(Struct("size" / Int16ul, Padding(2), "count" / Int32ul, "remaining" / Int32ul))
LOCK_REQ = _c(Struct("size" / Int16ul, "lock_count" / Int16ul, "lock_sequence" / Int32ul,
                     "file_id" / Bytes(16)))
LOCK_ELEMENT = _c(Struct("offset" / Int64ul, "length" / Int64ul, "flags" / Int32ul, Padding(4)))
IOCTL_REQ = _c(Struct("size" / Int16ul, Padding(2), "ctl_code" / Int32ul, "file_id" / Bytes(16),
                      "input_offset" / Int32ul, "input_count" / Int32ul, "max_input" / Int32ul,
                      "output_offset" / Int32ul, "output_count" / Int32ul, "max_output" / Int32ul,
                      "flags" / Int32ul))
IOCTL_RESP = _c(Struct("size" / Int16ul, Padding(2), "ctl_code" / Int32ul, "file_id" / Bytes(16),
                       "input_offset" / Int32ul, "input_count" / Int32ul, "output_offset" / Int32ul,
                       "output_count" / Int32ul))
QUERY_DIRECTORY_REQ = _c(Struct("size" / Int16ul, "info_class" / Int8ul, "flags" / Int8ul,
                                "file_index" / Int32ul, "file_id" / Bytes(16), "name_offset" / Int16ul,
                                "name_length" / Int16ul, "output_length" / Int32ul))
QUERY_DIRECTORY_RESP = _c(Struct("size" / Int16ul, "output_offset" / Int16ul, "output_length" / Int32ul))
CHANGE_NOTIFY_REQ = _c(Struct("size" / Int16ul, "flags" / Int16ul, "output_length" / Int32ul,
                              "file_id" / Bytes(16), "completion_filter" / Int32ul))
QUERY_INFO_REQ = _c(Struct("size" / Int16ul, "info_type" / Int8ul, "info_class" / Int8ul,
                           "output_length" / Int32ul, "input_offset" / Int16ul, Padding(2),
                           "input_length" / Int32ul, "additional_information" / Int32ul, "flags" / Int32ul,
                           "file_id" / Bytes(16)))
QUERY_INFO_RESP = _c(Struct("size" / Int16ul, "output_offset" / Int16ul, "output_length" / Int32ul))
SET_INFO_REQ = _c(Struct("size" / Int16ul, "info_type" / Int8ul, "info_class" / Int8ul,
                         "buffer_length" / Int32ul, "buffer_offset" / Int16ul, Padding(2),
                         "additional_information" / Int32ul, "file_id" / Bytes(16)))
OPLOCK_BREAK_MSG = _c(Struct("size" / Int16ul, "oplock_level" / Int8ul, Padding(5), "file_id" / Bytes(16)))
LEASE_BREAK_MSG = _c(Struct("size" / Int16ul, "epoch" / Int16ul, "flags" / Int32ul, "lease_key" / Bytes(16),
                            "current_state" / Int32ul, "new_state" / Int32ul))
LEASE_ACK_MSG = _c(Struct("size" / Int16ul, Padding(2), "flags" / Int32ul, "lease_key" / Bytes(16),
                          "lease_state" / Int32ul))

_NTLM_AUTH = struct.Struct("<8sI HHI HHI HHI HHI HHI HHI I")


# ------------------------------------------------------------------------------------------ helpers
def _file_id(raw: bytes) -> str:
    """FileId as 32 hex digits: persistent then volatile, each little-endian as on the wire."""
    return raw.hex()


def _utf16(msg: memoryview, offset: int, length: int, what: str) -> str:
    if length == 0:
        return ""
    if offset < HEADER_SIZE or offset + length > len(msg) or length % 2:
        raise ValueError(f"{what} at {offset}+{length} outside the message")
    return bytes(msg[offset:offset + length]).decode("utf-16-le", errors="replace")


def _fixed(s: Struct, msg: memoryview, size: int) -> Any:
    """Parse the fixed part (``size`` bytes after the header) of a command body."""
    if len(msg) < HEADER_SIZE + size:
        raise ValueError(f"body needs {size} bytes, message has {len(msg) - HEADER_SIZE}")
    return s.parse(bytes(msg[HEADER_SIZE:HEADER_SIZE + size]))


def parse_ntlmssp_user(blob: bytes) -> dict | None:
    """User and domain of an NTLMSSP AUTHENTICATE message inside a (SPNEGO) security blob.

    Why search for the signature instead of parsing SPNEGO's ASN.1: the NTLMSSP token is carried
    verbatim inside it, and the signature is unambiguous; this also covers raw NTLMSSP blobs.
    Returns ``{"user", "domain", "workstation"}`` or None (no AUTHENTICATE message, or unreadable)."""
    start = blob.find(b"NTLMSSP\x00")
    if start < 0 or len(blob) - start < _NTLM_AUTH.size:
        return None
    (_sig, mtype, _l1, _m1, _o1, _l2, _m2, _o2, dl, _dm, do, ul, _um, uo, wl, _wm, wo,
     _kl, _km, _ko, flags) = _NTLM_AUTH.unpack_from(blob, start)
    if mtype != 3:
        return None
    enc = "utf-16-le" if flags & 0x1 else "latin-1"

    def text(length: int, offset: int) -> str | None:
        a = start + offset
        if length == 0:
            return ""
        if a + length > len(blob):
            return None
        return blob[a:a + length].decode(enc, errors="replace")

    user = text(ul, uo)
    if user is None:
        return None
    return {"user": user, "domain": text(dl, do) or "", "workstation": text(wl, wo) or ""}


def _create_contexts(msg: memoryview, offset: int, length: int) -> list[str]:
    """Names of the create contexts in a CREATE request/response (e.g. DH2Q, RqLs, MxAc)."""
    names: list[str] = []
    if length == 0 or offset == 0:
        return names
    end = offset + length
    if offset < HEADER_SIZE or end > len(msg):
        raise ValueError(f"create contexts at {offset}+{length} outside the message")
    pos = offset
    for _ in range(64):
        if pos + 16 > end:
            raise ValueError("create context header truncated")
        ctx = CREATE_CONTEXT.parse(bytes(msg[pos:pos + 16]))
        n0 = pos + ctx.name_offset
        if ctx.name_length == 0 or n0 + ctx.name_length > end:
            raise ValueError("create context name outside the contexts")
        names.append(bytes(msg[n0:n0 + ctx.name_length]).decode("latin-1"))
        if ctx.next == 0:
            break
        if ctx.next < 16 or ctx.next % 8:
            raise ValueError(f"create context Next {ctx.next} is not an aligned forward offset")
        pos += ctx.next
    return names


# ----------------------------------------------------------------------------- per-command decoding
def _req_negotiate(msg: memoryview) -> dict:
    count = struct.unpack_from("<H", msg, HEADER_SIZE + 2)[0] if len(msg) >= HEADER_SIZE + 4 else 0
    b = _fixed(NEGOTIATE_REQ, msg, 36 + 2 * count)
    return {"dialects": [dialect_name(d) for d in b.dialects], "client_guid": b.client_guid.hex()}


def _resp_negotiate(msg: memoryview) -> dict:
    b = _fixed(NEGOTIATE_RESP, msg, 64)
    return {"dialect": dialect_name(b.dialect), "server_guid": b.server_guid.hex(),
            "max_read": b.max_read, "max_write": b.max_write, "capabilities": b.capabilities}


def _req_session_setup(msg: memoryview) -> dict:
    b = _fixed(SESSION_SETUP_REQ, msg, 24)
    out: dict = {"previous_session_id": b.previous_session_id, "binding": bool(b.flags & 1)}
    if b.sec_length:
        if b.sec_offset < HEADER_SIZE or b.sec_offset + b.sec_length > len(msg):
            raise ValueError("security buffer outside the message")
        auth = parse_ntlmssp_user(bytes(msg[b.sec_offset:b.sec_offset + b.sec_length]))
        if auth is not None:
            out.update(auth)
    return out


def _resp_session_setup(msg: memoryview) -> dict:
    b = _fixed(SESSION_SETUP_RESP, msg, 8)
    return {"session_flags": b.session_flags, "guest": bool(b.session_flags & 1),
            "anonymous": bool(b.session_flags & 2)}


def _req_tree_connect(msg: memoryview) -> dict:
    b = _fixed(TREE_CONNECT_REQ, msg, 8)
    return {"share": _utf16(msg, b.path_offset, b.path_length, "share path")}


def _resp_tree_connect(msg: memoryview) -> dict:
    b = _fixed(TREE_CONNECT_RESP, msg, 16)
    return {"share_type": b.share_type, "share_flags": b.share_flags, "maximal_access": b.maximal_access}


def _req_create(msg: memoryview) -> dict:
    b = _fixed(CREATE_REQ, msg, 56)
    return {"name": _utf16(msg, b.name_offset, b.name_length, "file name"),
            "desired_access": b.desired_access, "share_access": b.share_access,
            "disposition": b.disposition, "create_options": b.create_options,
            "oplock_level": b.oplock_level,
            "contexts": _create_contexts(msg, b.contexts_offset, b.contexts_length)}


def _resp_create(msg: memoryview) -> dict:
    b = _fixed(CREATE_RESP, msg, 88)
    return {"file_id": _file_id(b.file_id), "oplock_level": b.oplock_level, "create_action": b.create_action,
            "end_of_file": b.end_of_file, "file_attributes": b.file_attributes,
            "contexts": _create_contexts(msg, b.contexts_offset, b.contexts_length)}


def _req_file_id(s: Struct, size: int):
    def decode(msg: memoryview) -> dict:
        return {"file_id": _file_id(_fixed(s, msg, size).file_id)}
    return decode


def _req_read(msg: memoryview) -> dict:
    b = _fixed(READ_REQ, msg, 44)
    return {"file_id": _file_id(b.file_id), "offset": b.offset, "length": b.length}


def _resp_read(msg: memoryview) -> dict:
    b = _fixed(READ_RESP, msg, 12)
    return {"length": b.data_length}


def _req_write(msg: memoryview) -> dict:
    b = _fixed(WRITE_REQ, msg, 48)
    return {"file_id": _file_id(b.file_id), "offset": b.offset, "length": b.length}


def _resp_write(msg: memoryview) -> dict:
    return {"count": _fixed(WRITE_RESP, msg, 12).count}


def _req_lock(msg: memoryview) -> dict:
    b = _fixed(LOCK_REQ, msg, 24)
    locks = []
    for i in range(min(b.lock_count, 64)):
        a = HEADER_SIZE + 24 + 24 * i
        if a + 24 > len(msg):
            raise ValueError("lock element truncated")
        e = LOCK_ELEMENT.parse(bytes(msg[a:a + 24]))
        locks.append({"offset": e.offset, "length": e.length, "flags": e.flags})
    return {"file_id": _file_id(b.file_id), "locks": locks}


def _req_ioctl(msg: memoryview) -> dict:
    b = _fixed(IOCTL_REQ, msg, 52)
    return {"ctl_code": b.ctl_code, "file_id": _file_id(b.file_id), "is_fsctl": bool(b.flags & 1)}


def _resp_ioctl(msg: memoryview) -> dict:
    b = _fixed(IOCTL_RESP, msg, 40)
    return {"ctl_code": b.ctl_code, "file_id": _file_id(b.file_id), "output_count": b.output_count}


def _req_query_directory(msg: memoryview) -> dict:
    b = _fixed(QUERY_DIRECTORY_REQ, msg, 32)
    return {"file_id": _file_id(b.file_id), "info_class": b.info_class, "flags": b.flags,
            "pattern": _utf16(msg, b.name_offset, b.name_length, "search pattern")}


def _resp_output_length(s: Struct):
    def decode(msg: memoryview) -> dict:
        return {"output_length": _fixed(s, msg, 8).output_length}
    return decode


def _req_change_notify(msg: memoryview) -> dict:
    b = _fixed(CHANGE_NOTIFY_REQ, msg, 28)
    return {"file_id": _file_id(b.file_id), "completion_filter": b.completion_filter}


def _req_query_info(msg: memoryview) -> dict:
    b = _fixed(QUERY_INFO_REQ, msg, 40)
    return {"file_id": _file_id(b.file_id), "info_type": b.info_type, "info_class": b.info_class}


def _req_set_info(msg: memoryview) -> dict:
    b = _fixed(SET_INFO_REQ, msg, 32)
    out = {"file_id": _file_id(b.file_id), "info_type": b.info_type, "info_class": b.info_class}
    if b.info_type == 1 and b.info_class == 10 and b.buffer_length >= 20:  # FileRenameInformation
        a = b.buffer_offset
        if a >= HEADER_SIZE and a + 20 <= len(msg):
            n = struct.unpack_from("<I", msg, a + 16)[0]
            out["rename_to"] = _utf16(msg, a + 20, n, "new name")
    return out


def _oplock_break(msg: memoryview) -> dict:
    size = struct.unpack_from("<H", msg, HEADER_SIZE)[0] if len(msg) >= HEADER_SIZE + 2 else 0
    if size == 24:
        b = _fixed(OPLOCK_BREAK_MSG, msg, 24)
        return {"kind": "oplock", "file_id": _file_id(b.file_id), "oplock_level": b.oplock_level}
    if size == 44:
        b = _fixed(LEASE_BREAK_MSG, msg, 32)
        return {"kind": "lease", "lease_key": b.lease_key.hex(), "current_state": b.current_state,
                "new_state": b.new_state}
    if size == 36:
        b = _fixed(LEASE_ACK_MSG, msg, 28)
        return {"kind": "lease", "lease_key": b.lease_key.hex(), "lease_state": b.lease_state}
    raise ValueError(f"OPLOCK_BREAK with structure size {size}")


def _nothing(msg: memoryview) -> dict:
    return {}


_REQUEST_DECODERS = {
    NEGOTIATE: _req_negotiate, SESSION_SETUP: _req_session_setup, LOGOFF: _nothing,
    TREE_CONNECT: _req_tree_connect, TREE_DISCONNECT: _nothing, CREATE: _req_create,
    CLOSE: _req_file_id(CLOSE_REQ, 24), FLUSH: _req_file_id(FLUSH_REQ, 24), READ: _req_read,
    WRITE: _req_write, LOCK: _req_lock, IOCTL: _req_ioctl, CANCEL: _nothing, ECHO: _nothing,
    QUERY_DIRECTORY: _req_query_directory, CHANGE_NOTIFY: _req_change_notify,
    QUERY_INFO: _req_query_info, SET_INFO: _req_set_info, OPLOCK_BREAK: _oplock_break,
}
_RESPONSE_DECODERS = {
    NEGOTIATE: _resp_negotiate, SESSION_SETUP: _resp_session_setup, TREE_CONNECT: _resp_tree_connect,
    CREATE: _resp_create, READ: _resp_read, WRITE: _resp_write, IOCTL: _resp_ioctl,
    QUERY_DIRECTORY: _resp_output_length(QUERY_DIRECTORY_RESP), QUERY_INFO: _resp_output_length(QUERY_INFO_RESP),
    OPLOCK_BREAK: _oplock_break,
}


def _smb1_dialects(frame: memoryview) -> tuple[str, ...]:
    """Dialect strings of an SMB1 NEGOTIATE (command 0x72)."""
    if len(frame) < 35 or frame[4] != 0x72:
        raise ValueError("SMB1 message other than NEGOTIATE")
    word_count = frame[32]
    base = 33 + 2 * word_count
    if base + 2 > len(frame):
        raise ValueError("SMB1 NEGOTIATE truncated")
    count = struct.unpack_from("<H", frame, base)[0]
    data = bytes(frame[base + 2:base + 2 + count])
    return tuple(p[1:].decode("latin-1") for p in data.split(b"\x00") if p.startswith(b"\x02"))


def _bulk_head(data: bytes | memoryview) -> int:
    """If ``data`` starts with a single SMB2 message larger than BULK_THRESHOLD and longer than
    ``data`` (a READ response or WRITE request), how many bytes of it to buffer (its head), else 0."""
    if len(data) <= 4 + BULK_PEEK:
        return 0
    word = _NBT.unpack_from(data, 0)[0]
    length = word & 0xFFFFFF
    if (word >> 24 or length <= BULK_THRESHOLD or length + 4 <= len(data) or data[4:8] != SMB2_MAGIC
            or struct.unpack_from("<I", data, 4 + 20)[0]):
        return 0
    return 4 + BULK_PEEK


# ------------------------------------------------------------------------------------------ decoder
@dataclass
class _Pending:
    request: Smb2Request
    chain: int  # MessageId of the first request of its compound chain


class _Direction:
    """Framing state of one direction."""

    __slots__ = ("buf", "skip", "hunting", "offset")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.skip = 0  # bytes of the current (bulk) frame still to discard
        self.hunting = False  # looking for the next frame boundary
        self.offset = 0  # stream offset of buf[0]


class Smb2Decoder:
    """One SMB connection (both directions). Implements :class:`protocols.events.AppDecoder`."""

    def __init__(self, midstream: bool = False) -> None:
        """``midstream``: the connection was picked up after its start. Both directions then hunt
        for a frame boundary, and the connection is unsynchronised from the start (sessions and
        opens set up before we came in are unknown)."""
        self.unsynchronised = midstream
        self._dirs = {True: _Direction(), False: _Direction()}
        for d in self._dirs.values():
            d.hunting = midstream
        self._pending: dict[int, _Pending] = {}
        self._chain_file_ids: dict[int, str] = {}  # chain -> FileId its CREATE returned
        self._orphans: dict[int, Smb2Response] = {}  # responses seen before their request
        self.counters = {"messages": 0, "errors": 0, "encrypted": 0, "compressed": 0, "resyncs": 0,
                         "unmatched_responses": 0, "forgotten_requests": 0}

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------ AppDecoder
    def feed(self, from_client: bool, data: bytes | memoryview) -> list[object]:
        """``data`` may be a view of the caller's buffer: only what a message needs is copied."""
        events: list[object] = []
        d = self._dirs[from_client]
        while data:
            if d.skip:
                n = min(d.skip, len(data))
                d.skip -= n
                d.offset += n
                data = data[n:]
                continue
            head = 0 if d.buf or d.hunting else _bulk_head(data)
            if head:  # a bulk frame starts here: buffer its head only, skip the rest as it streams by
                d.buf += data[:head]
                data = data[head:]
            else:
                d.buf += data
                data = b""
            self._frames(from_client, d, events)
        return events

    def gap(self, from_client: bool, length: int) -> list[object]:
        d = self._dirs[from_client]
        if d.skip >= length and not d.buf:
            d.skip -= length  # the lost bytes were bulk payload we skip anyway
            d.offset += length
            return []
        d.offset += len(d.buf) + length
        d.buf.clear()
        d.skip = 0
        d.hunting = True
        self.unsynchronised = True
        return []

    # ------------------------------------------------------------------ framing
    def _error(self, d: _Direction, events: list, what: str, at: int) -> None:
        self.counters["errors"] += 1
        self.unsynchronised = True
        d.hunting = True
        events.append(ProtocolError(what, d.offset + at))

    def _resync(self, d: _Direction, pos: int, from_client: bool) -> int | None:
        """Position (>= ``pos``) of the next plausible frame start, else None.

        Candidates come from a byte search for the protocol ids (``b"SMB"`` finds all four: 0xFE SMB2,
        0xFF SMB1, 0xFD transform, 0xFC compressed), never from a trial decode at every byte. A
        candidate is a NetBIOS session header (type 0, a length that fits the id) before the id;
        for SMB2 also a 64-byte StructureSize, a known command (below 0x14) and the response flag of this
        direction. The frame itself is decoded once, by the normal path."""
        buf = d.buf
        p = buf.find(b"SMB", pos + 5)
        while p >= 0:
            h = p - 1  # protocol id start
            magic = bytes(buf[h:h + 4])
            if magic in _MAGICS and buf[h - 4] == 0:
                length = _NBT.unpack_from(buf, h - 4)[0] & 0xFFFFFF
                plausible = length >= (32 if magic == SMB1_MAGIC else HEADER_SIZE)
                if plausible and magic == SMB2_MAGIC:
                    if len(buf) >= h + 6:
                        plausible = buf[h + 4] == HEADER_SIZE and buf[h + 5] == 0
                    if plausible and len(buf) >= h + 17:
                        command, flags = buf[h + 12] | buf[h + 13] << 8, buf[h + 16]
                        plausible = command < len(COMMAND_NAMES) and bool(flags & FLAG_RESPONSE) != from_client
                if plausible:
                    return h - 4
            p = buf.find(b"SMB", p + 1)
        return None

    def _frames(self, from_client: bool, d: _Direction, events: list) -> None:
        buf = d.buf
        pos = 0
        while True:
            if d.hunting:
                found = self._resync(d, pos, from_client)
                if found is None:
                    keep = max(pos, len(buf) - 8)
                    pos = keep
                    break
                pos = found
                d.hunting = False
                self.counters["resyncs"] += 1
            avail = len(buf) - pos
            if avail < 4:
                break
            word = _NBT.unpack_from(buf, pos)[0]
            kind, length = word >> 24, word & 0xFFFFFF
            if kind != 0:
                if kind == 0x85 and length == 0:  # NetBIOS keep-alive
                    pos += 4
                    continue
                self._error(d, events, f"NetBIOS message type 0x{kind:02x} is not a session message", pos)
                pos += 1
                continue
            if length < 4:
                self._error(d, events, f"NetBIOS frame of {length} bytes", pos)
                pos += 1
                continue
            if avail >= 8 and bytes(buf[pos + 4:pos + 8]) not in _MAGICS:
                self._error(d, events, f"frame starts with {bytes(buf[pos + 4:pos + 8]).hex()}, not an SMB id",
                            pos)
                pos += 1
                continue
            if avail >= 4 + length:
                self._frame(from_client, d, memoryview(buf)[pos + 4:pos + 4 + length], length, pos, events)
                pos += 4 + length
                continue
            if (length > BULK_THRESHOLD and avail >= 4 + BULK_PEEK
                    and bytes(buf[pos + 4:pos + 8]) == SMB2_MAGIC
                    and struct.unpack_from("<I", buf, pos + 4 + 20)[0] == 0):
                # a single bulk message (READ data, WRITE data, big listing): decode its head, skip the rest
                self._frame(from_client, d, memoryview(buf)[pos + 4:], length, pos, events)
                d.skip = 4 + length - avail
                pos = len(buf)
                break
            if (bytes(buf[pos + 4:pos + 8]) in (TRANSFORM_MAGIC, COMPRESSED_MAGIC) and avail >= 4 + 52
                    and length > BULK_THRESHOLD):
                self._frame(from_client, d, memoryview(buf)[pos + 4:], length, pos, events)
                d.skip = 4 + length - avail
                pos = len(buf)
                break
            break
        d.offset += pos
        del buf[:pos]

    def _frame(self, from_client: bool, d: _Direction, frame: memoryview, length: int, at: int,
               events: list) -> None:
        """One NetBIOS frame (``frame`` may hold only the head of a bulk frame of ``length`` bytes)."""
        try:
            magic = bytes(frame[:4])
            if magic == SMB2_MAGIC:
                self._chain(from_client, frame, at, events)
            elif magic == TRANSFORM_MAGIC:
                self.counters["encrypted"] += 1
                sid = struct.unpack_from("<Q", frame, 44)[0] if len(frame) >= 52 else None
                events.append(Smb2Opaque(from_client, "encrypted", sid, length))
            elif magic == COMPRESSED_MAGIC:
                self.counters["compressed"] += 1
                events.append(Smb2Opaque(from_client, "compressed", None, length))
            elif magic == SMB1_MAGIC:
                dialects = _smb1_dialects(frame)
                events.append(Smb1Negotiate(dialects))
                if from_client:
                    req = Smb2Request(NEGOTIATE, 0, 0, 0, 0, {"dialects": list(dialects), "smb1": True})
                    self._remember(req, 0)
        except (ConstructError, ValueError, struct.error, IndexError, UnicodeError) as exc:
            self._error(d, events, f"{type(exc).__name__}: {exc}", at)
        finally:
            frame.release()

    def _chain(self, from_client: bool, frame: memoryview, at: int, events: list) -> None:
        off = 0
        chain = None
        prev_session = prev_tree = 0
        for _ in range(128):
            if len(frame) - off < HEADER_SIZE:
                raise ValueError(f"SMB2 header truncated ({len(frame) - off} bytes)")
            (magic, size, _charge, status, command, _credits, flags, next_cmd, message_id, word,
             session_id, _sig) = _HEADER.unpack_from(frame, off)
            if magic != SMB2_MAGIC or size != HEADER_SIZE:
                raise ValueError(f"bad SMB2 header (id {magic.hex()}, size {size})")
            if next_cmd:
                if next_cmd % 8 or next_cmd < HEADER_SIZE or off + next_cmd > len(frame):
                    raise ValueError(f"NextCommand {next_cmd} does not point at a message")
                msg = frame[off:off + next_cmd]
            else:
                msg = frame[off:]
            is_async = bool(flags & FLAG_ASYNC)
            async_id = word if is_async else None
            tree_id = 0 if is_async else word >> 32  # Reserved(4) then TreeId(4)
            related = bool(flags & FLAG_RELATED) and off > 0
            if related:
                if session_id == ALL_ONES_SESSION:
                    session_id = prev_session
                if tree_id == ALL_ONES_TREE:
                    tree_id = prev_tree
            else:
                chain = message_id
            prev_session, prev_tree = session_id, tree_id
            self.counters["messages"] += 1
            if bool(flags & FLAG_RESPONSE) == from_client:
                raise ValueError("response flag does not match the direction")
            if from_client:
                self._request(command, message_id, session_id, tree_id, flags, msg, chain, related, events)
            else:
                self._response(command, message_id, session_id, tree_id, async_id, status, msg, events)
            if not next_cmd:
                return
            off += next_cmd
        raise ValueError("compound chain longer than 128 messages")

    # ------------------------------------------------------------------ messages
    def _remember(self, req: Smb2Request, chain: int) -> None:
        if len(self._pending) >= MAX_OUTSTANDING:
            self._pending.pop(next(iter(self._pending)))
            self.counters["forgotten_requests"] += 1
        self._pending[req.message_id] = _Pending(req, chain)

    def _body(self, decode, msg: memoryview, command: int, message_id: int, events: list) -> dict:
        """Decode one command body. Its frame is intact, so a bad body costs no resync, but the
        tables may miss what it said: ProtocolError + unsynchronised, and the message goes on with
        ``{"malformed": why}`` so that its response still matches."""
        if decode is None:
            return {}
        try:
            return decode(msg)
        except (ConstructError, ValueError, struct.error, IndexError, UnicodeError) as exc:
            self.counters["errors"] += 1
            self.unsynchronised = True
            what = f"{COMMAND_NAMES[command] if command < len(COMMAND_NAMES) else command} " \
                   f"message {message_id}: {type(exc).__name__}: {exc}"
            events.append(ProtocolError(what, None))
            return {"malformed": what}

    def _request(self, command: int, message_id: int, session_id: int, tree_id: int, flags: int,
                 msg: memoryview, chain: int, related: bool, events: list) -> None:
        fields = self._body(_REQUEST_DECODERS.get(command), msg, command, message_id, events)
        if related and fields.get("file_id") == ALL_ONES_FILE_ID:
            fields["file_id_from_chain"] = True
        req = Smb2Request(command, message_id, session_id, tree_id, flags, fields)
        events.append(req)
        if self._orphans:
            self._flush_orphans(message_id, events)
        if command != CANCEL:
            self._remember(req, chain)
            early = self._orphans.pop(message_id, None)
            if early is not None:
                self._finish(self._pending.pop(message_id), early, events)

    def _response(self, command: int, message_id: int, session_id: int, tree_id: int, async_id: int | None,
                  status: int, msg: memoryview, events: list) -> None:
        if message_id == UNSOLICITED_MESSAGE_ID:
            fields = self._body(_RESPONSE_DECODERS.get(command), msg, command, message_id, events)
            events.append(Smb2Notification(command, session_id, fields))
            return
        if status == STATUS_PENDING and async_id is not None:
            events.append(Smb2Interim(command, message_id, session_id, async_id))
            return
        fields: dict = {}
        decode = _RESPONSE_DECODERS.get(command)
        error_body = len(msg) >= HEADER_SIZE + 2 and struct.unpack_from("<H", msg, HEADER_SIZE)[0] == 9 \
            and command not in (SESSION_SETUP, QUERY_DIRECTORY, QUERY_INFO)
        if decode and (status in (STATUS_SUCCESS, STATUS_MORE_PROCESSING_REQUIRED, STATUS_BUFFER_OVERFLOW)
                       and not error_body):
            fields = self._body(decode, msg, command, message_id, events)
        resp = Smb2Response(command, message_id, session_id, tree_id, async_id, status, fields, None)
        pending = self._pending.pop(message_id, None)
        if pending is None:
            # Seen before its request: both directions merged by a mirror port or capture may be
            # slightly out of order. Hold it until the client stream passes this MessageId.
            self._orphans[message_id] = resp
            if len(self._orphans) > MAX_ORPHANS:
                self._flush_orphans(None, events)
            return
        self._finish(pending, resp, events)

    def _flush_orphans(self, below: int | None, events: list) -> None:
        """Give up on held responses whose request can no longer come (the client already sent a
        later MessageId), or the oldest one when too many are held."""
        if below is None:
            ids = [next(iter(self._orphans))]
        else:
            ids = [m for m in self._orphans if m < below]
        for mid in ids:
            self.counters["unmatched_responses"] += 1
            events.append(self._orphans.pop(mid))

    def _finish(self, pending: _Pending, resp: Smb2Response, events: list) -> None:
        request = pending.request
        fields = resp.fields
        if resp.command == CREATE and "file_id" in fields:
            self._chain_file_ids[pending.chain] = fields["file_id"]
            if len(self._chain_file_ids) > MAX_OUTSTANDING:
                self._chain_file_ids.pop(next(iter(self._chain_file_ids)))
        rf = request.fields
        if rf.get("file_id_from_chain"):
            fid = self._chain_file_ids.get(pending.chain)
            if fid is not None:
                request = Smb2Request(request.command, request.message_id, request.session_id,
                                      request.tree_id, request.flags, {**rf, "file_id": fid})
        if pending.chain != resp.message_id and not any(p.chain == pending.chain for p in self._pending.values()):
            self._chain_file_ids.pop(pending.chain, None)
        events.append(Smb2Response(resp.command, resp.message_id, resp.session_id, resp.tree_id,
                                   resp.async_id, resp.status, fields, request))
