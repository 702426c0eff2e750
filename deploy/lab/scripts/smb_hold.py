"""An SMB client that keeps a file open and acts only when told (lab tests of stateful takeover).

usage: smb_hold.py SERVER SHARE USER PASSWORD NAME
Reads commands from standard input, one per line, and answers each with one JSON line:
``write`` (write 4 KiB at the end and flush), ``reopen`` (drop the connection cache and open NAME
again), ``exit``. Between commands it sends nothing: an idle client, as most are most of the time.
"""

import json
import os
import sys
import time

import smbclient


def say(**kw) -> None:
    print(json.dumps(kw), flush=True)


def main() -> int:
    server, share, user, password, name = sys.argv[1:6]
    path = rf"\\{server}\{share}\{name}"
    smbclient.register_session(server, username=user, password=password)
    handle = smbclient.open_file(path, mode="wb")
    handle.write(os.urandom(4096))
    handle.flush()
    say(ready=True)
    for line in sys.stdin:
        command = line.strip()
        start = time.monotonic()
        try:
            if command == "write":
                handle.write(os.urandom(4096))
                handle.flush()
            elif command == "reopen":
                smbclient.reset_connection_cache()
                smbclient.register_session(server, username=user, password=password)
                handle = smbclient.open_file(path, mode="ab")
            elif command == "exit":
                break
            say(ok=True, command=command, seconds=round(time.monotonic() - start, 3))
        except Exception as exc:  # the test wants to know what the client saw, whatever it was
            say(ok=False, command=command, error=f"{type(exc).__name__}: {exc}"[:300],
                seconds=round(time.monotonic() - start, 3))
    try:
        handle.close()
    except Exception:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
