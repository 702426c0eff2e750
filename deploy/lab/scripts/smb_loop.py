"""An SMB client with an open file that writes a block and reads it back, again and again (issue 10).

usage: smb_loop.py SERVER SHARE USER PASSWORD NAME SECONDS [BLOCK] [EVERY]
One connection, one session, one tree connect, one open (smbprotocol's low-level API, so nothing
reconnects behind the test's back). Every EVERY seconds (default 0.01) it writes BLOCK bytes (default
64 KiB) of fresh random data at offset 0 and reads them back. Prints ``{"ready": true, "session_id": N}``
once open, then, after SECONDS, one JSON line: rounds, errors, read-backs that differed, the session id
at the start and the end, and the longest round (the stall a takeover caused). Any exception ends the
loop and is reported, with when it came (``failed_at``, CLOCK_MONOTONIC, the same clock as the test's): a
client that continued across a node's death has none. SIGUSR1 ends the loop
early (with the same report).
"""

import json
import os
import signal
import sys
import time
import uuid

from smbprotocol.connection import Connection
from smbprotocol.open import (CreateDisposition, CreateOptions, FileAttributes, FilePipePrinterAccessMask,
                              ImpersonationLevel, Open, ShareAccess)
from smbprotocol.session import Session
from smbprotocol.tree import TreeConnect


def say(**kw) -> None:
    print(json.dumps(kw), flush=True)


def main() -> int:
    server, share, user, password, name, seconds = sys.argv[1:7]
    block = int(sys.argv[7]) if len(sys.argv) > 7 else 64 * 1024
    every = float(sys.argv[8]) if len(sys.argv) > 8 else 0.01
    conn = Connection(uuid.uuid4(), server, 445)
    conn.connect(timeout=5)
    session = Session(conn, user, password, require_encryption=False)
    session.connect()
    tree = TreeConnect(session, rf"\\{server}\{share}")
    tree.connect()
    handle = Open(tree, name)
    handle.create(ImpersonationLevel.Impersonation,
                  FilePipePrinterAccessMask.GENERIC_READ | FilePipePrinterAccessMask.GENERIC_WRITE,
                  FileAttributes.FILE_ATTRIBUTE_NORMAL, ShareAccess.FILE_SHARE_READ,
                  CreateDisposition.FILE_OVERWRITE_IF, CreateOptions.FILE_NON_DIRECTORY_FILE)
    first_session = session.session_id
    say(ready=True, session_id=first_session, local_port=conn.transport._sock.getsockname()[1]
        if getattr(conn.transport, "_sock", None) else None)
    stop = []
    signal.signal(signal.SIGUSR1, lambda *_: stop.append(True))
    rounds = mismatches = 0
    longest = 0.0
    longest_at = None
    error = failed_at = None
    start = time.monotonic()
    while time.monotonic() - start < float(seconds) and not stop:
        t0 = time.monotonic()
        data = os.urandom(block)
        try:
            handle.write(data, 0)
            back = handle.read(0, block)
        except Exception as exc:  # the test wants to know what the client saw, whatever it was
            error = f"{type(exc).__name__}: {exc}"[:300]
            failed_at = time.monotonic()
            break
        rounds += 1
        if back != data:
            mismatches += 1
        took = time.monotonic() - t0
        if took > longest:
            longest, longest_at = took, round(t0 - start, 3)
        time.sleep(max(0.0, every - took))
    say(done=True, rounds=rounds, mismatches=mismatches, error=error, session_id=session.session_id,
        first_session_id=first_session, longest_round_s=round(longest, 3), longest_at_s=longest_at,
        failed_at=failed_at)
    try:
        handle.close()
        tree.disconnect()
        session.disconnect()
        conn.disconnect()
    except Exception:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
