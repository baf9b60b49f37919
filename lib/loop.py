"""The daemon's main loop: a cycle every interval (with per-node jitter),
backing off while cycles fail, stopping promptly on SIGTERM."""
from __future__ import annotations

import signal
import threading
import time
from typing import Callable, Optional

import schedule

from lib import logs

MAX_BACKOFF = 300.0


class Stopped(BaseException):
    """The program is stopping: what the main thread was waiting for is
    abandoned. A BaseException, as KeyboardInterrupt is, so that no
    `except Exception` on its way (requests, the API client, a cycle's
    stage, the loop's job) turns it into a failed cycle to log and retry."""


class StopSignals:
    """SIGTERM and SIGINT set `stop`; inside `abandonable()`, the handler
    also raises Stopped, so that a request to an API server that does not
    answer ends at once instead of after its read timeout.

    Only a fetch is made abandonable, and raising there is safe: Python
    runs the handler in the main thread between two of its bytecodes, so
    the exception lands in the code the flag covers and nowhere else. A
    fetch writes nothing and holds only a connection of the main thread's
    own HTTP session; requests and urllib3 let such an exception through
    and close that connection, as they do for KeyboardInterrupt. The flag
    is down before the kernel is read, so during a read, an apply or a
    conntrack cleanup a signal only sets `stop`: the cycle ends, its writes
    complete, and then the loop returns. The handler lowers the flag before
    raising, so a second signal cannot strike the code that unwinds.

    Closing the session from the handler instead would not do: the
    connection of a request in flight is checked out of its pool, out of
    the session's reach, and a request that failed would be reported as a
    failed cycle rather than a stop."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, stop: Optional[threading.Event] = None):
        self.stop = stop if stop is not None else threading.Event()
        self._armed = False

    def install(self) -> "StopSignals":
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        self.stop.set()
        if self._armed:
            self._armed = False
            raise Stopped(signal.Signals(signum).name)

    def abandonable(self) -> "_Abandonable":
        """`with signals.abandonable():` around code that may block on the
        network and writes nothing; raises Stopped at once when a stop was
        already asked for."""
        return _Abandonable(self)


class _Abandonable:
    def __init__(self, owner: StopSignals):
        self.owner = owner

    def __enter__(self) -> None:
        self.owner._armed = True
        if self.owner.stop.is_set():
            self.owner._armed = False
            raise Stopped("stop requested")

    def __exit__(self, *exc) -> None:
        self.owner._armed = False


class Backoff:
    """After k failures in a row, wait interval * 2**(k-1) (capped) before trying again."""

    def __init__(self, interval: float, cap: float = MAX_BACKOFF):
        self.interval, self.cap = interval, cap
        self.failures = 0
        self.not_before = 0.0

    def record(self, ok: bool, now: float) -> None:
        self.failures = 0 if ok else self.failures + 1
        delay = min(self.interval * 2 ** (self.failures - 1), self.cap) if self.failures > 1 else 0
        self.not_before = now + delay

    def ready(self, now: float) -> bool:
        return now >= self.not_before


def run_forever(cycle: Callable[[], object], interval: int, stop: threading.Event,
                on_report: Optional[Callable[[object], None]] = None, trigger=None) -> None:
    """`trigger` (lib.watch.Trigger): also run a cycle as soon as it reports a change.
    Returns once `stop` is set, after the cycle in progress, or at once when
    that cycle raises Stopped (abandoned in its fetch: nothing was written)."""
    try:
        _run(cycle, interval, stop, on_report, trigger)
    except Stopped as why:
        logs.get().info("cycle abandoned in its fetch: stopping; nothing was written",
                        extra={"event": "cycle-abandoned", "reason": str(why)})


def _run(cycle, interval, stop, on_report, trigger) -> None:
    backoff = Backoff(interval)
    scheduler = schedule.Scheduler()

    def job() -> None:
        # An exception escaping a job would end run_pending() and the loop with it.
        if not backoff.ready(time.monotonic()):
            return
        try:
            report = cycle()
            ok = bool(getattr(report, "ok", False))
            if on_report is not None:
                on_report(report)
        except Exception:  # noqa: BLE001
            logs.get().exception("cycle crashed", extra={"event": "cycle-crash"})
            ok = False
        backoff.record(ok, time.monotonic())
        if not ok and backoff.failures > 1:
            logs.get().warning("backing off", extra={
                "event": "backoff", "failures": backoff.failures,
                "seconds": round(backoff.not_before - time.monotonic(), 1)})

    scheduler.every(interval).to(interval + interval // 10).seconds.do(job)
    if not stop.is_set():
        job()
    while not stop.is_set():
        scheduler.run_pending()
        if trigger is None:
            stop.wait(0.1)
        elif trigger.wait(0.1) is not None:
            job()
