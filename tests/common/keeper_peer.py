"""An attacker's client of `vaultfs keeper`, for tests/keeper.rs: run as root without
capabilities (under `setpriv --inh-caps=-all --ambient-caps=-all --bounding-set=-all`), it
tries every request of the keeper protocol (src/keeper.rs), and reads the keeper's memory.
Prints one JSON object per attempt, one a line. A refused attempt reads until the keeper hangs
up; a served one stops at the first reply.

usage: keeper_peer.py requests SOCKET   every request, each on a connection of its own
       keeper_peer.py userns SOCKET     the same after unshare(CLONE_NEWUSER): every capability,
                                        in a user namespace of its own
       keeper_peer.py mem PID           open /proc/PID/mem, read a page of a readable mapping
"""

import array
import ctypes
import errno
import json
import os
import socket
import sys

CLONE_NEWUSER = 0x10000000
TIMEOUT_S = 10

REQUESTS = [
    {"type": "take"},
    {"type": "unstash", "name": "victim"},
    {"type": "wait_predecessor"},
    {"type": "put", "name": "node", "init": ""},
    {"type": "stash", "name": "victim", "record": "6f776e6564"},
    {"type": "forget", "name": "victim"},
    {"type": "release", "name": "node"},
]


def capabilities():
    with open("/proc/self/status") as f:
        return next(l.split()[1] for l in f if l.startswith("CapEff:"))


def attempt(path, request):
    """One connection: send `request`, then read until the keeper hangs up."""
    out = {"pid": os.getpid(), "cap_eff": capabilities(), "request": request["type"]}
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(TIMEOUT_S)
    s.connect(path)
    message = json.dumps(dict(request, version=1)).encode()
    r, w = os.pipe()
    fds = [r] if request["type"] == "put" else []
    try:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        s.sendmsg([message], ancillary)
    except OSError as e:
        # The keeper may have refused and closed the connection before this was sent.
        out["send_error"] = errno.errorcode.get(e.errno, str(e.errno))
    replies, descriptors = [], 0
    while True:
        try:
            data, ancdata, _, _ = s.recvmsg(65536, socket.CMSG_SPACE(4 * 4))
        except ConnectionResetError:
            break
        except socket.timeout:
            out["timeout"] = True
            break
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(payload[: len(payload) - len(payload) % 4])
                descriptors += len(received)
                for fd in received:
                    os.close(fd)
        if not data:
            break
        replies.append(json.loads(data))
        if replies[-1].get("type") != "error":
            break  # served: the keeper keeps the connection open
    out["replies"], out["descriptors"] = replies, descriptors
    for fd in (r, w):
        os.close(fd)
    s.close()
    return out


def read_memory(pid):
    out = {"pid": os.getpid(), "cap_eff": capabilities(), "target": pid}
    try:
        mem = open(f"/proc/{pid}/mem", "rb", buffering=0)
    except OSError as e:
        out["open"] = errno.errorcode.get(e.errno, str(e.errno))
        return out
    out["open"] = "ok"
    try:
        with open(f"/proc/{pid}/maps") as maps:
            start = next(
                int(l.split("-")[0], 16) for l in maps if l.split()[1].startswith("r")
            )
        mem.seek(start)
        out["read_bytes"] = len(mem.read(4096))
    except OSError as e:
        out["read"] = errno.errorcode.get(e.errno, str(e.errno))
    return out


def main():
    mode, arg = sys.argv[1], sys.argv[2]
    if mode == "mem":
        results = [read_memory(int(arg))]
    else:
        if mode == "userns":
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_NEWUSER) != 0:
                sys.exit(f"unshare(CLONE_NEWUSER): {os.strerror(ctypes.get_errno())}")
        results = [attempt(arg, r) for r in REQUESTS]
    for r in results:
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
