"""The --watch data source in a process of its own, reporting what it cost as JSON.

The benchmark runs this inside the node's network namespace, wired as
`reconcile.py --watch` wires it: a ClusterCache whose changes notify a
Trigger, and run_cycle reading the cache's snapshot. The kernel is emptied
first, so that its first cycle compares with poll mode's first apply.

    python -m bench.watch_process --api-server URL --node NODE --backend nft \
        [--idle-cycles N] [--timeout SECONDS]

One JSON object a line on stdout, one word a line on stdin, so that the
benchmark changes the served objects at the right moment:

    out {"step": "synced", ...}        every kind has completed its first list
    in  go                             the benchmark has seen the three watches open
    out {"step": "start-up", ...}      the first cycle, and the API cost until then
    out {"step": "idle", ...}          N cycles with nothing changed
    in  changed T                      the benchmark changed one object; T is its
                                       time.monotonic() when set_state() returned
    out {"step": "change", ...}        the cycle the watch event triggered
    in  quit (or end of input)         stop the caches and exit

Every wait ends after --timeout seconds with {"ok": false, ...}; the end of
stdin at any point ends the process. time.monotonic() reads CLOCK_MONOTONIC,
one clock for every process of the machine, so T and this process's times
can be subtracted.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import sys
import time
from typing import Callable, Optional

IDLE_CYCLES = 3
TIMEOUT = 600.0
POLL = 0.1          # the daemon loop's wait on its trigger (lib/loop.py)


class Timeout(Exception):
    pass


class LineReader:
    """Lines from a file descriptor, each read with a deadline: a peer that
    stops talking ends a wait instead of hanging it."""

    def __init__(self, fd: int):
        self.fd = fd
        self._buffer = b""
        self._eof = False

    def read(self, timeout: float) -> Optional[str]:
        """The next line without its newline, or None when none came within
        `timeout` (0: only what is already there). EOFError at the end of input."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            if self._eof:
                raise EOFError
            left = max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                return None
            data = os.read(self.fd, 65536)
            if not data:
                self._eof = True
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode("utf-8", "replace").strip()


def emit(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def expect(lines: LineReader, word: str, timeout: float) -> str:
    """The next line, which must begin with `word`."""
    line = lines.read(timeout)
    if line is None:
        raise Timeout(f"no {word!r} on stdin within {timeout:g} s")
    if line.split(" ", 1)[0] != word:
        raise ValueError(f"stdin: expected {word!r}, got {line[:80]!r}")
    return line


def summary(report) -> dict:
    """What the benchmark reads of one cycle."""
    stats = report.apply_stats
    return {
        "ok": report.ok, "failed_stage": report.failed_stage, "error": report.error,
        "seconds": report.seconds, "reused": report.reused,
        "requests": report.api_requests, "bytes": report.api_bytes,
        "changes": report.changes,
        "iptables_lines": stats.iptables_lines if stats else 0,
        "ipset_lines": stats.ipset_lines if stats else 0,
    }


def _checked(report) -> dict:
    out = summary(report)
    if not report.ok:
        raise RuntimeError(f"cycle failed in {report.failed_stage}: {report.error}")
    return out


def await_change(trigger, lines: LineReader, run: Callable, timeout: float) -> dict:
    """Wait as the daemon's loop does (the trigger, every POLL seconds) for
    the change the benchmark makes, run the cycle it triggers, and time it
    from the benchmark's set_state() and from the event's arrival."""
    deadline = time.monotonic() + timeout
    changed_at = None
    while trigger.wait(POLL) is None:
        if changed_at is None:
            line = lines.read(0)
            if line is not None:
                changed_at = _change_time(line)
        if time.monotonic() > deadline:
            raise Timeout(f"no change reached the watch caches within {timeout:g} s")
    enforced: list = []
    out = _checked(trigger.run(run, enforced.append))
    live = time.monotonic()
    if changed_at is None:
        changed_at = _change_time(expect(lines, "changed", max(0.0, deadline - live)))
    out["change_to_live"] = live - changed_at
    out["event_to_live"] = enforced[0] if enforced else None
    return out


def _change_time(line: str) -> float:
    word, _, value = line.partition(" ")
    if word != "changed":
        raise ValueError(f"stdin: expected 'changed T', got {line[:80]!r}")
    return float(value)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.watch_process")
    p.add_argument("--api-server", required=True)
    p.add_argument("--node", required=True)
    p.add_argument("--backend", choices=("nft", "legacy"), default="nft")
    p.add_argument("--idle-cycles", type=int, default=IDLE_CYCLES,
                   help=f"cycles with nothing changed to measure (default {IDLE_CYCLES})")
    p.add_argument("--timeout", type=float, default=TIMEOUT,
                   help=f"longest wait for any step, in seconds (default {TIMEOUT:g})")
    args = p.parse_args(argv)

    from bench.cycle_process import peak_rss_kb
    from lib import cycle, kernel, kubeapi, logs, plan, watch
    logs.setup("WARNING")
    lines = LineReader(sys.stdin.fileno())
    kern = kernel.Kernel(args.backend)
    emptied = plan.cleanup(kern.read())
    if not emptied.empty:
        kern.apply(emptied)

    trigger = watch.Trigger()
    last, problems = cycle.LastCompiled(), cycle.ProblemLog()
    cache = watch.ClusterCache(kubeapi.load_config(api_server=args.api_server),
                               on_change=trigger.notify)

    def one_cycle():
        return cycle.run_cycle(cache.snapshot, kern, args.node, problem_log=problems, last=last)

    started = time.monotonic()
    cache.start()
    try:
        if not cache.wait_synced(args.timeout):
            raise Timeout(f"the first lists did not complete within {args.timeout:g} s")
        emit({"step": "synced", "ok": True, "seconds": time.monotonic() - started})
        expect(lines, "go", args.timeout)
        emit({"step": "start-up", **_checked(trigger.run(one_cycle))})
        idle = [_checked(trigger.run(one_cycle)) for _ in range(max(1, args.idle_cycles))]
        emit({"step": "idle", "ok": True, "cycles": idle})
        change = await_change(trigger, lines, one_cycle, args.timeout)
        emit({"step": "change", **change, "rss_kb": peak_rss_kb()})
        while lines.read(args.timeout) not in (None, "quit"):
            pass
    except EOFError:
        pass                      # the benchmark is gone or done: so is this process
    except (Timeout, ValueError, RuntimeError) as exc:
        emit({"ok": False, "error": str(exc)})
        return 1
    finally:
        cache.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
