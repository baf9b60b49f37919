"""The daemon's main loop: a cycle every interval (with per-node jitter),
backing off while cycles fail, stopping promptly on SIGTERM."""
from __future__ import annotations

import threading
import time
from typing import Callable, Optional

import schedule

from lib import logs

MAX_BACKOFF = 300.0


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
    """`trigger` (lib.watch.Trigger): also run a cycle as soon as it reports a change."""
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
    job()
    while not stop.is_set():
        scheduler.run_pending()
        if trigger is None:
            stop.wait(0.1)
        elif trigger.wait(0.1) is not None:
            job()
