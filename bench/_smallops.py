"""Small-operation latency client for bench/throughput.py; runs inside the lab's client namespace.

usage: _smallops.py HOST OPS [--smb-user U --smb-password P --share S --file NAME]

Prints one JSON object with per-operation latencies (microseconds: median, p99, mean, min, max) of:

* ``smb_echo_raw``: NEGOTIATE, then N x SMB2 ECHO on one connection, hand-written (no session, no
                  signing, no client library: the SMB counterpart of the NFS NULL call);
* ``smb_echo``:   N x SMB2 ECHO on one authenticated, signed connection (smbprotocol low level API,
                  whose receiver thread adds ~0.2 ms of client-side overhead per call);
* ``smb_open``:   N x CREATE (open existing small file, read attributes) + CLOSE on the same tree;
* ``nfs_null``:   N x ONC RPC NULL (program 100003 NFS, version 3, procedure 0, AUTH_NONE) over one
                  TCP connection to port 2049 with record marking, sequential.

Each series starts with a few untimed warm-up operations.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import sys
import time
import uuid

WARMUP = 20


def summary(samples_ns: list[int]) -> dict:
    us = sorted(s / 1000 for s in samples_ns)
    n = len(us)
    p99 = us[min(n - 1, max(0, int(round(0.99 * n)) - 1))]
    return {"n": n, "median_us": statistics.median(us), "p99_us": p99, "mean_us": statistics.fmean(us),
            "min_us": us[0], "max_us": us[-1]}


# ---------------------------------------------------------------- NFS NULL over ONC RPC (RFC 5531)
def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk
    return bytes(buf)


def _rpc_reply(sock: socket.socket) -> bytes:
    """One RPC reply, reassembled from its record-marking fragments."""
    data = b""
    while True:
        (mark,) = struct.unpack(">I", _recv_exact(sock, 4))
        data += _recv_exact(sock, mark & 0x7FFFFFFF)
        if mark & 0x80000000:
            return data


def nfs_null(host: str, ops: int, port: int = 2049) -> dict:
    sock = socket.create_connection((host, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    xid = int.from_bytes(os.urandom(4), "big") & 0x7FFFFFFF
    samples = []
    try:
        for i in range(WARMUP + ops):
            xid = (xid + 1) & 0xFFFFFFFF
            # xid, CALL(0), rpcvers 2, prog 100003, vers 3, proc 0, cred AUTH_NONE(0,len 0), verf AUTH_NONE
            body = struct.pack(">IIIIIIIIII", xid, 0, 2, 100003, 3, 0, 0, 0, 0, 0)
            msg = struct.pack(">I", 0x80000000 | len(body)) + body
            t0 = time.perf_counter_ns()
            sock.sendall(msg)
            reply = _rpc_reply(sock)
            t1 = time.perf_counter_ns()
            rxid, mtype, reply_stat = struct.unpack(">III", reply[:12])
            if rxid != xid or mtype != 1 or reply_stat != 0:
                raise RuntimeError(f"bad RPC reply xid={rxid} (want {xid}) type={mtype} stat={reply_stat}")
            # verifier flavor + length, then accept_stat
            (vlen,) = struct.unpack(">I", reply[16:20])
            (accept_stat,) = struct.unpack(">I", reply[20 + vlen:24 + vlen])
            if accept_stat != 0:
                raise RuntimeError(f"NULL call not accepted: accept_stat={accept_stat}")
            if i >= WARMUP:
                samples.append(t1 - t0)
    finally:
        sock.close()
    return summary(samples)


# ------------------------------------------------------------- raw SMB2 ECHO (MS-SMB2 2.2.28)
_SMB2_HDR = struct.Struct("<4sHHIHHIIQIIQ16s")  # 64 bytes


def _smb2_send(sock: socket.socket, command: int, msg_id: int, body: bytes) -> None:
    hdr = _SMB2_HDR.pack(b"\xfeSMB", 64, 0, 0, command, 8, 0, 0, msg_id, 0, 0, 0, b"\0" * 16)
    pdu = hdr + body
    sock.sendall(struct.pack(">I", len(pdu)) + pdu)  # direct TCP transport: 0x00 + 24-bit length


def _smb2_recv(sock: socket.socket) -> tuple[int, int, bytes]:
    (length,) = struct.unpack(">I", _recv_exact(sock, 4))
    pdu = _recv_exact(sock, length & 0xFFFFFF)
    _, _, _, status, command, _, _, _, msg_id, _, _, _, _ = _SMB2_HDR.unpack_from(pdu)
    return status, msg_id, pdu


def smb_echo_raw(host: str, ops: int, port: int = 445) -> dict:
    """NEGOTIATE (SMB 2.0.2/2.1) then N sequential ECHOs; no session, so no signing and no
    client-library overhead: the SMB counterpart of the NFS NULL call."""
    sock = socket.create_connection((host, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    samples = []
    try:
        dialects = (0x0202, 0x0210)
        body = struct.pack("<HHHHI16sQ", 36, len(dialects), 1, 0, 0, uuid.uuid4().bytes, 0)
        body += struct.pack(f"<{len(dialects)}H", *dialects)
        _smb2_send(sock, 0x0000, 0, body)
        status, _, _ = _smb2_recv(sock)
        if status != 0:
            raise RuntimeError(f"SMB2 NEGOTIATE failed: status 0x{status:08x}")
        echo = struct.pack("<HH", 4, 0)
        for i in range(WARMUP + ops):
            msg_id = i + 1
            t0 = time.perf_counter_ns()
            _smb2_send(sock, 0x000D, msg_id, echo)
            status, rid, _ = _smb2_recv(sock)
            t1 = time.perf_counter_ns()
            if status != 0 or rid != msg_id:
                raise RuntimeError(f"SMB2 ECHO {msg_id}: status 0x{status:08x}, message id {rid}")
            if i >= WARMUP:
                samples.append(t1 - t0)
    finally:
        sock.close()
    return summary(samples)


# ------------------------------------------------------------------------- SMB with smbprotocol
def smb_ops(host: str, ops: int, user: str, password: str, share: str, name: str) -> dict:
    from smbprotocol.connection import Connection
    from smbprotocol.open import (CreateDisposition, CreateOptions, FileAttributes, ImpersonationLevel, Open,
                                  ShareAccess)
    from smbprotocol.session import Session
    from smbprotocol.tree import TreeConnect

    conn = Connection(uuid.uuid4(), host, 445)
    conn.connect(timeout=10)
    try:
        session = Session(conn, user, password, require_encryption=False)
        session.connect()
        tree = TreeConnect(session, rf"\\{host}\{share}")
        tree.connect()
        echo = []
        for i in range(WARMUP + ops):
            t0 = time.perf_counter_ns()
            conn.echo(sid=session.session_id, timeout=10)
            t1 = time.perf_counter_ns()
            if i >= WARMUP:
                echo.append(t1 - t0)
        opened = []
        for i in range(WARMUP + ops):
            fh = Open(tree, name)
            t0 = time.perf_counter_ns()
            fh.create(ImpersonationLevel.Impersonation, 0x00120089,  # FILE_GENERIC_READ
                      FileAttributes.FILE_ATTRIBUTE_NORMAL, ShareAccess.FILE_SHARE_READ,
                      CreateDisposition.FILE_OPEN, CreateOptions.FILE_NON_DIRECTORY_FILE)
            fh.close(get_attributes=False)
            t1 = time.perf_counter_ns()
            if i >= WARMUP:
                opened.append(t1 - t0)
        tree.disconnect()
        session.disconnect()
    finally:
        conn.disconnect()
    return {"smb_echo": summary(echo), "smb_open": summary(opened)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("ops", type=int)
    p.add_argument("--smb-user", default="pp")
    p.add_argument("--smb-password", default="pairproxy")
    p.add_argument("--share", default="share")
    p.add_argument("--file", default="hello.txt")
    p.add_argument("--skip-smb", action="store_true")
    args = p.parse_args()
    out = {"smb_echo_raw": smb_echo_raw(args.host, args.ops)}
    if not args.skip_smb:
        out.update(smb_ops(args.host, args.ops, args.smb_user, args.smb_password, args.share, args.file))
    out["nfs_null"] = nfs_null(args.host, args.ops)
    json.dump(out, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
