"""The loop keeps going through failures, backs off, and stops on request."""
import threading
import time

from lib.loop import Backoff, run_forever


def test_backoff_doubles_after_repeated_failures_and_resets_on_success():
    b = Backoff(interval=10, cap=60)
    b.record(False, 0)
    assert b.ready(0)                    # one failure: retry at the next tick
    b.record(False, 0)
    assert not b.ready(19) and b.ready(20)
    b.record(False, 0)
    assert not b.ready(39) and b.ready(40)
    for _ in range(5):
        b.record(False, 0)
    assert b.ready(60)                   # capped
    b.record(True, 100)
    assert b.ready(100) and b.failures == 0


def test_loop_survives_a_crashing_cycle_and_stops_promptly():
    calls = []
    stop = threading.Event()

    def cycle():
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RuntimeError("boom")
        stop.set()
        return None

    t = threading.Thread(target=run_forever, args=(cycle, 1, stop))
    t.start()
    t.join(timeout=5)
    assert not t.is_alive()
    assert len(calls) == 2               # the crash did not end the loop


def test_loop_exits_within_a_second_of_stop():
    stop = threading.Event()
    t = threading.Thread(target=run_forever, args=(lambda: None, 60, stop))
    t.start()
    time.sleep(0.3)
    began = time.monotonic()
    stop.set()
    t.join(timeout=2)
    assert not t.is_alive() and time.monotonic() - began < 1.0
