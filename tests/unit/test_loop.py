"""The loop keeps going through failures, backs off, and stops on request;
a stop signal abandons a request that hangs, and only that."""
import contextlib
import os
import signal
import socket
import threading
import time

import pytest
import requests

from lib.loop import Backoff, Stopped, StopSignals, run_forever


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


# --- stopping on a signal while a request hangs ------------------------------------

@pytest.fixture
def signals():
    """StopSignals installed in this (the main) thread; the previous handlers come back."""
    before = {sig: signal.getsignal(sig) for sig in StopSignals.SIGNALS}
    yield StopSignals().install()
    for sig, handler in before.items():
        signal.signal(sig, handler)


@pytest.fixture
def silent_server():
    """A loopback port that takes connections (the backlog does) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/api/v1/namespaces"
    sock.close()


def signal_later(sig: int, seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, os.kill, (os.getpid(), sig))
    timer.start()
    return timer


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_abandons_a_hung_request_at_once(signals, silent_server, sig):
    timer = signal_later(sig, 0.3)
    began = time.monotonic()
    with contextlib.closing(requests.Session()) as session:
        with pytest.raises(Stopped):
            with signals.abandonable():
                session.get(silent_server, timeout=(3, 20))
    timer.join()
    assert time.monotonic() - began < 1.5
    assert signals.stop.is_set()


def test_outside_abandonable_a_signal_only_asks_to_stop(signals):
    timer = signal_later(signal.SIGTERM, 0.1)
    began = time.monotonic()
    time.sleep(0.5)                                  # stands for an apply: it runs to its end
    timer.join()
    assert time.monotonic() - began >= 0.5
    assert signals.stop.is_set()
    with pytest.raises(Stopped):                     # no new fetch once a stop was asked for
        with signals.abandonable():
            pytest.fail("entered after the stop")


def test_the_flag_is_down_after_the_fetch(signals):
    with signals.abandonable():
        pass
    timer = signal_later(signal.SIGTERM, 0.05)
    time.sleep(0.3)                                  # would raise Stopped if still armed
    timer.join()
    assert signals.stop.is_set()


def test_the_loop_returns_when_its_cycle_is_abandoned():
    stop = threading.Event()
    calls = []

    def cycle():
        calls.append(1)
        stop.set()
        raise Stopped("SIGTERM")

    t = threading.Thread(target=run_forever, args=(cycle, 1, stop))
    t.start()
    t.join(timeout=2)
    assert not t.is_alive() and calls == [1]


def test_a_stop_asked_before_the_loop_starts_runs_no_cycle():
    stop = threading.Event()
    stop.set()
    calls = []
    run_forever(lambda: calls.append(1), 1, stop)
    assert calls == []
