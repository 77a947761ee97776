#!/usr/bin/env python3
"""A pod's reader of a vaultfs file, for the restart tests (tests/e2e_restart.rs).

The tests run it as `unshare --mount --propagation private python3 restart_reader.py ...`, so it
sees the volume the way a container without `mountPropagation: HostToContainer` does: through
the mount that existed when it started, never through a mount stacked on it later.

`loop --file PATH --allowed V ... --stop STOP --status STATUS`
    Two threads read PATH every `--interval` seconds until the file STOP appears:
    `open_read` opens, reads to the end and closes it each time; `held_pread` opened it once at
    the start and calls `pread` on that descriptor each time. For each it records the reads, the
    failures by errno name (ENOTCONN also counted on its own), the longest read, every distinct
    content (anything not in `--allowed` is a failure too) and the reads that took 10 ms or
    more (wall-clock start and end). STATUS is rewritten (atomically) every 0.2 s and a last
    time on exit, as JSON; `"done": true` marks the final summary.

`once --file PATH --out OUT`
    One open + read + close of PATH; writes {"ok", "content", "errno", "error", "ms", "start",
    "end"} to OUT.
"""

import argparse
import errno
import json
import os
import sys
import threading
import time

SLOW_SECONDS = 0.010
MAX_SLOW = 500
MAX_BAD = 10


def read_all(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def errno_name(err):
    return errno.errorcode.get(err.errno, str(err.errno)) if err.errno else type(err).__name__


class Loop:
    """What one reading thread saw."""

    def __init__(self, name, allowed):
        self.name = name
        self.allowed = set(allowed)
        self.lock = threading.Lock()
        self.reads = 0
        self.failures = 0
        self.enotconn = 0
        self.errors = {}
        self.first_error = None
        self.longest = 0.0
        self.longest_start = None
        self.contents = {}
        self.first_seen = {}
        self.last = None
        self.bad = []
        self.slow = []
        self.in_progress_since = None
        self.thread_error = None

    def begin(self, start):
        with self.lock:
            self.in_progress_since = start

    def record(self, start, seconds, data, err):
        end = start + seconds
        with self.lock:
            self.in_progress_since = None
            self.reads += 1
            if seconds > self.longest:
                self.longest = seconds
                self.longest_start = start
            if seconds >= SLOW_SECONDS and len(self.slow) < MAX_SLOW:
                self.slow.append([start, end])
            if err is not None:
                self.failures += 1
                name = errno_name(err)
                self.errors[name] = self.errors.get(name, 0) + 1
                if err.errno == errno.ENOTCONN:
                    self.enotconn += 1
                if self.first_error is None:
                    self.first_error = {"at": start, "error": f"{name}: {err}"}
                return
            text = data.decode("utf-8", "replace")
            self.contents[text] = self.contents.get(text, 0) + 1
            self.first_seen.setdefault(text, start)
            self.last = text
            if text not in self.allowed:
                self.failures += 1
                if len(self.bad) < MAX_BAD:
                    self.bad.append({"at": start, "content": text})

    def summary(self, now):
        with self.lock:
            return {
                "reads": self.reads,
                "ok": self.reads - self.failures,
                "failures": self.failures,
                "enotconn": self.enotconn,
                "errors": dict(self.errors),
                "first_error": self.first_error,
                "longest_ms": round(self.longest * 1000.0, 3),
                "longest_start": self.longest_start,
                "contents": dict(self.contents),
                "first_seen": dict(self.first_seen),
                "last": self.last,
                "bad": list(self.bad),
                "slow": list(self.slow),
                # A read still waiting for an answer, and for how long.
                "pending_ms": (
                    None
                    if self.in_progress_since is None
                    else round((now - self.in_progress_since) * 1000.0, 3)
                ),
                "thread_error": self.thread_error,
            }


def timed(loop, op):
    start = time.time()
    t0 = time.monotonic()
    loop.begin(start)
    data, err = None, None
    try:
        data = op()
    except OSError as e:
        err = e
    loop.record(start, time.monotonic() - t0, data, err)


def open_read_loop(path, loop, interval, stop):
    def op():
        fd = os.open(path, os.O_RDONLY)
        try:
            return read_all(fd)
        finally:
            os.close(fd)

    try:
        while not stop.is_set():
            timed(loop, op)
            stop.wait(interval)
    except Exception as e:  # a bug here must show in the summary, not vanish with the thread
        loop.thread_error = repr(e)


def held_pread_loop(fd, loop, interval, stop):
    try:
        while not stop.is_set():
            timed(loop, lambda: os.pread(fd, 65536, 0))
            stop.wait(interval)
    except Exception as e:
        loop.thread_error = repr(e)


def write_json(path, value):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.rename(tmp, path)


def run_loop(args):
    stop = threading.Event()
    loops = [Loop("open_read", args.allowed), Loop("held_pread", args.allowed)]
    try:
        held = os.open(args.file, os.O_RDONLY)
    except OSError as e:
        write_json(
            args.status,
            {"file": args.file, "pid": os.getpid(), "done": True,
             "fatal": f"open {args.file} for the held descriptor: {errno_name(e)}: {e}"},
        )
        return 2
    threads = [
        threading.Thread(target=open_read_loop, args=(args.file, loops[0], args.interval, stop),
                         name="open_read", daemon=True),
        threading.Thread(target=held_pread_loop, args=(held, loops[1], args.interval, stop),
                         name="held_pread", daemon=True),
    ]
    started = time.time()
    for t in threads:
        t.start()

    def status(done, hung=()):
        now = time.time()
        return {
            "file": args.file,
            "pid": os.getpid(),
            "started": started,
            "now": now,
            "done": done,
            "hung": list(hung),
            "loops": {loop.name: loop.summary(now) for loop in loops},
        }

    next_status = 0.0
    while not os.path.exists(args.stop):
        if time.monotonic() >= next_status:
            write_json(args.status, status(False))
            next_status = time.monotonic() + 0.2
        time.sleep(0.01)
    stop.set()
    deadline = time.monotonic() + 10.0
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    hung = [t.name for t in threads if t.is_alive()]
    write_json(args.status, status(True, hung))
    if not hung:
        os.close(held)
    # A thread stuck in the kernel cannot be joined; leave without waiting for it.
    sys.stdout.flush()
    os._exit(3 if hung else 0)


def run_once(args):
    start = time.time()
    t0 = time.monotonic()
    result = {"file": args.file, "start": start, "ok": False, "content": None, "errno": None,
              "error": None}
    try:
        fd = os.open(args.file, os.O_RDONLY)
        try:
            data = read_all(fd)
        finally:
            os.close(fd)
        result["ok"] = True
        result["content"] = data.decode("utf-8", "replace")
    except OSError as e:
        result["errno"] = errno_name(e)
        result["error"] = str(e)
    result["ms"] = round((time.monotonic() - t0) * 1000.0, 3)
    result["end"] = time.time()
    write_json(args.out, result)
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    loop = sub.add_parser("loop")
    loop.add_argument("--file", required=True)
    loop.add_argument("--allowed", action="append", required=True)
    loop.add_argument("--stop", required=True)
    loop.add_argument("--status", required=True)
    loop.add_argument("--interval", type=float, default=0.005)
    once = sub.add_parser("once")
    once.add_argument("--file", required=True)
    once.add_argument("--out", required=True)
    args = parser.parse_args()
    return run_loop(args) if args.mode == "loop" else run_once(args)


if __name__ == "__main__":
    sys.exit(main())
