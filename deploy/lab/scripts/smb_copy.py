"""smbprotocol client used by the lab tests, run inside the client namespace.

usage: smb_copy.py put|get|slow-get SERVER SHARE USER PASSWORD LOCAL REMOTE [RATE_BYTES_PER_S]
Copies with smbprotocol's high-level ``smbclient`` API and prints JSON {"bytes": N, "seconds": S}.
``slow-get`` reads 64 KiB at a time at about RATE bytes/s: a client that is still mid-transfer
when a test kills it or stops the node.
"""

import json
import shutil
import sys
import time

import smbclient


def main() -> int:
    op, server, share, user, password, local, remote = sys.argv[1:8]
    smbclient.register_session(server, username=user, password=password)
    path = rf"\\{server}\{share}\{remote}"
    start = time.monotonic()
    if op == "put":
        with open(local, "rb") as src, smbclient.open_file(path, mode="wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    elif op == "get":
        with smbclient.open_file(path, mode="rb") as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    elif op == "slow-get":
        rate = float(sys.argv[8])
        with smbclient.open_file(path, mode="rb") as src, open(local, "wb") as dst:
            done = 0
            while chunk := src.read(65536):
                dst.write(chunk)
                dst.flush()
                done += len(chunk)
                delay = start + done / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
    else:
        print(f"unknown operation {op!r}", file=sys.stderr)
        return 2
    seconds = time.monotonic() - start
    size = smbclient.stat(path).st_size
    smbclient.reset_connection_cache()
    print(json.dumps({"bytes": size, "seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
