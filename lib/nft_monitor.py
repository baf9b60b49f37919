"""Whether the kernel's nftables ruleset changed since a point: `nft monitor`
in the background, so that an idle loop need not list our table again.

Listing the table costs the nft binary most of an idle cycle at scale (it
decodes every set element), while nothing changed. The kernel announces
every change to every table (ours, anyone's, a flushed chain, a deleted
element) to monitor listeners, one batch per transaction, each closed by a
`# new generation N by process P` line. A change to another table
(kube-proxy's iptables-nft rules, Docker's, an admin's) leaves our listing
as it was, so it marks nothing; anything else does: a line about our
table, a line not understood, a batch with no line at all. The mark is
conservative: an event that arrives late only costs one listing more. The
loop still lists at least every `max_age` seconds, and whenever the
monitor is not running, so a monitor that missed something or died costs
at most that long.
"""
from __future__ import annotations

import ctypes
import signal
import subprocess
import threading
import time
from typing import Callable, Optional

from lib.kernel import command_argv
from lib.nft_state import FAMILY, TABLE

_PR_SET_PDEATHSIG = 1
# The monitor listens only once nft has started and subscribed, which no
# output shows: listings begun this soon after the start are not trusted.
STARTUP_GRACE = 1.0
GENERATION = "# new generation "
_VERBS = frozenset({"add", "delete", "destroy", "flush", "insert", "replace", "reset", "update",
                    "rename", "create"})
_OBJECTS = frozenset({"table", "chain", "rule", "set", "map", "element", "flowtable", "counter",
                      "quota", "limit", "secmark", "synproxy", "meter"})
_CT_OBJECTS = frozenset({"helper", "timeout", "expectation"})


def foreign(line: str) -> bool:
    """Whether a line of `nft monitor` names a change to a table other than
    ours: `VERB OBJECT FAMILY TABLE ...` (`VERB ct helper FAMILY TABLE ...`
    for the ct objects). False for everything else, ours or not understood."""
    words = line.split()
    if len(words) > 2 and words[1] == "ct" and words[2] in _CT_OBJECTS:
        words = words[:1] + words[2:]
    elif len(words) > 1 and words[1] not in _OBJECTS:
        return False
    return len(words) >= 4 and words[0] in _VERBS and (words[2], words[3]) != (FAMILY, TABLE)


def marks_change(line: str, events: int) -> tuple[bool, int]:
    """For one line of the monitor, given the lines already seen of the
    batch it belongs to: whether our listing may no longer hold, and the
    count of lines of the batch still open."""
    if line.startswith(GENERATION):
        return events == 0, 0                # a batch we saw nothing of counts
    return not foreign(line), events + 1


def _die_with_parent() -> None:      # pragma: no cover - runs in the child
    """The monitor ends with the process that started it, even on SIGKILL."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


class ChangeMonitor:
    """One `nft monitor` in a network namespace (None: this one)."""

    def __init__(self, netns: Optional[str] = None, max_age: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        self._changed = True                 # nothing known yet
        self._since: Optional[float] = None  # when the last listing started
        self._started = clock()
        self._process = subprocess.Popen(
            command_argv("nft", ["-p", "monitor"], netns), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        self._reader = threading.Thread(target=self._read, name="nft-monitor", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        events = 0                           # lines of the batch not yet closed
        for raw in iter(self._process.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            changed, events = marks_change(line, events)
            if changed:
                with self._lock:
                    self._changed = True
        with self._lock:
            self._changed = True             # ended: nothing is known any more

    @property
    def running(self) -> bool:
        return self._process.poll() is None

    def unchanged(self) -> bool:
        """True when no change was announced since the last `listing()` and
        that listing is younger than max_age; the previous listing then
        still holds."""
        with self._lock:
            if self._changed or self._since is None or not self.running:
                return False
            if self._since - self._started < STARTUP_GRACE:
                return False
            return self._clock() - self._since < self.max_age

    def listing(self) -> None:
        """Call right before listing the table: changes announced from now
        on mark it stale again."""
        with self._lock:
            self._changed = False
            self._since = self._clock()

    def close(self) -> None:
        if self.running:
            self._process.kill()
        self._process.wait()
        self._process.stdout.close()
        self._reader.join(timeout=1)
