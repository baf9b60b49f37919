"""Our nftables table through the `nft` binary: read it, apply a plan in one
transaction, remove it.

As lib.kernel does for iptables: an argument list, the payload on stdin, a
timeout, and `ip netns exec` for a network namespace. Only our table is
ever named, for reading as for writing.
"""
from __future__ import annotations

import re
import time
from typing import Optional, Sequence

from lib import nft_parse
from lib import nft_plan as planner
from lib.kernel import (
    DEFAULT_TIMEOUT, IPV6_SYSCTL_DIR, LINE_QUOTE_LIMIT, ApplyStats, KernelError, Running, run,
    start, usable_families,
)
from lib.nft_monitor import ChangeMonitor
from lib.nft_plan import NftPlan
from lib.nft_state import ABSENT, FAMILY, TABLE, Table

NFT = "nft"
LIST_ARGS = ("-j", "-p", "list", "table", FAMILY, TABLE)
APPLY_ARGS = ("-f", "-")
READ_STEP = "nft list table"
APPLY_STEP = "nft -f (transaction)"
MAX_ERRORS = 5                 # nft reports every refused command; the first few are named

# nft's report of a refused payload command: /dev/stdin:LINE:FIRST-LAST: Error: WHAT
_LOCATED = re.compile(r"^/dev/stdin:(\d+):(\d+)-(\d+): Error: (.*)$", re.MULTILINE)


def describe_failure(stderr: str, payload: str) -> str:
    """nft's errors, each with the payload line it names quoted (and, for
    a long line such as an element list, the part nft pointed at), rather
    than nft's echo of it; "" when nft named no line."""
    lines = payload.splitlines()
    found = []
    for m in list(_LOCATED.finditer(stderr))[:MAX_ERRORS]:
        number, first, last, what = int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4)
        text = f"line {number}: {what.strip()}"
        if 1 <= number <= len(lines):
            line = lines[number - 1]
            if len(line) > LINE_QUOTE_LIMIT:
                text += f" at {line[first - 1:last][:LINE_QUOTE_LIMIT]!r}"
            text += f" [line {number}: {line[:LINE_QUOTE_LIMIT]}]"
        found.append(text)
    return "; ".join(found)


class NftKernel:
    """Our table in one network namespace (None: this one)."""

    def __init__(self, netns: Optional[str] = None, families: Sequence[int] = (4, 6),
                 timeout: float = DEFAULT_TIMEOUT, ipv6_sysctl_dir: str = IPV6_SYSCTL_DIR):
        self.netns = netns
        self.timeout = float(timeout)
        self.families = usable_families(families, netns, ipv6_sysctl_dir, timeout)
        self._last: Optional[tuple[str, Table]] = None
        self._started: Optional[Running] = None   # a listing begun by prefetch()
        self.changes: Optional[ChangeMonitor] = None
        self.listings = 0                  # times the table was listed

    def watch_changes(self, max_age: float = 60.0) -> "NftKernel":
        """For a long-running process: while `nft monitor` announces no change
        to the ruleset, a read returns the previous listing without listing
        again (lib.nft_monitor); at least every `max_age` seconds it lists."""
        if self.changes is None:
            self.changes = ChangeMonitor(self.netns, max_age)
        return self

    def prefetch(self) -> None:
        """Start the listing the next read() takes, unless the monitor vouches
        for the last one: the nft binary lists (most of a read's time) while
        this process fetches from the API and compiles. The listing is as
        old as its start; a change after it is announced to the monitor, or
        met by the next process."""
        self.drop_prefetch()
        if self.changes is not None and self._last is not None and self.changes.unchanged():
            return
        if self.changes is not None:
            self.changes.listing()
        self._started = start(READ_STEP, NFT, LIST_ARGS, netns=self.netns, timeout=self.timeout)

    def drop_prefetch(self) -> None:
        """Stop a listing no read() took (the cycle ended before its read)."""
        if self._started is not None:
            self._started.stop()
            self._started = None

    def close(self) -> None:
        self.drop_prefetch()
        if self.changes is not None:
            self.changes.close()
            self.changes = None

    def __repr__(self) -> str:
        return f"NftKernel(netns={self.netns!r}, families={self.families})"

    def read(self) -> Table:
        """Our table as the kernel holds it; ABSENT when there is none. The
        same listing as last time gives the same parse back without parsing:
        an idle cycle lists the table again (drift is found that way) but
        parses nothing. The JSON listing holds no counters or times that
        would vary while the table does not. With watch_changes(), not even
        the listing runs while the kernel announced no change."""
        started, self._started = self._started, None
        if started is None:
            if self.changes is not None and self._last is not None and self.changes.unchanged():
                return self._last[1]
            if self.changes is not None:
                self.changes.listing()
        self.listings += 1
        try:
            self._last = self._list(started)
        except BaseException:
            self._last = None              # nothing known: the next read lists again
            raise
        return self._last[1]

    def _list(self, started: Optional[Running] = None) -> tuple[str, Table]:
        try:
            if started is None:
                started = start(READ_STEP, NFT, LIST_ARGS, netns=self.netns, timeout=self.timeout)
            text = started.result()
        except KernelError as err:
            if err.exit_code == 1 and nft_parse.table_absent(err.stderr):
                return "", ABSENT
            raise
        if self._last is not None and self._last[0] == text:
            return self._last
        try:
            return text, nft_parse.parse(text)
        except nft_parse.NftParseError as err:
            raise KernelError(f"{READ_STEP}: cannot parse the output of nft -j list table: {err}",
                              step=READ_STEP) from None

    def apply(self, plan: NftPlan) -> ApplyStats:
        """The plan's payload in one `nft -f -`: all of it or, on failure,
        none, with the error naming the payload lines nft refused. An empty
        plan starts no process."""
        if plan.empty:
            return ApplyStats()
        start = time.perf_counter()
        try:
            run(APPLY_STEP, NFT, APPLY_ARGS, netns=self.netns, stdin=plan.payload,
                timeout=self.timeout)
        except KernelError as err:
            stats = ApplyStats(processes=1, seconds=((APPLY_STEP, time.perf_counter() - start),))
            located = describe_failure(err.stderr, plan.payload)
            message = (f"{APPLY_STEP}: nft exited with code {err.exit_code}: {located}"
                       if located else str(err))
            raise KernelError(message, step=APPLY_STEP, exit_code=err.exit_code, stats=stats,
                              stderr=err.stderr) from None
        return ApplyStats(processes=1, nft_lines=plan.lines,
                          seconds=((APPLY_STEP, time.perf_counter() - start),))

    def cleanup(self) -> ApplyStats:
        """Delete our table, and nothing else."""
        return self.apply(planner.cleanup(self.read()))
