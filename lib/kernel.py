"""The node's filter state through its own binaries: choose the iptables
backend, read the owned chains and sets, apply a plan step by step.

Every binary is run with an argument list, its input on stdin and a timeout,
so nothing is ever parsed by a shell and nothing can hang a cycle. With a
network namespace name, each command runs through `ip netns exec`; that is
the only difference between the tests and production.
"""
from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional, Sequence, TypeVar

import sh

from lib import ipsets, iptables_save, logs
from lib import plan as planner
from lib.plan import KernelState, Plan, TableState
from lib.ruleset import PREFIX

BACKENDS = ("nft", "legacy")
FORCED_CHOICES = ("auto",) + BACKENDS
FAMILY_NAMES = {4: "IPv4", 6: "IPv6"}

# kubelet creates one of these in the mangle table of the backend it uses.
KUBE_HINT_CHAINS = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")

IPV6_SYSCTL_DIR = "/proc/sys/net/ipv6"   # absent when the kernel runs without IPv6

DEFAULT_TIMEOUT = 60.0     # seconds for one binary, beyond the time it may wait for a lock
DEFAULT_LOCK_WAIT = 10     # seconds iptables-legacy-restore waits for /run/xtables.lock
STDERR_LIMIT = 800         # characters of a binary's stderr kept in an error message
LINE_QUOTE_LIMIT = 200     # characters of a failing payload line quoted in an error
READ_CHUNK = 65536         # bytes of a binary's output read at a time

# Where each binary reports the payload line it refused.
_FAILED_LINE = re.compile(r"(?:Error occurred at line: |Error in line |line )(\d+)")


class KernelError(Exception):
    """A binary failed or printed something we cannot read. `stats` holds what
    an interrupted apply had done before the failing step."""

    def __init__(self, message: str, step: str = "", exit_code: Optional[int] = None,
                 stats: Optional["ApplyStats"] = None, stderr: str = ""):
        super().__init__(message)
        self.step = step
        self.exit_code = exit_code
        self.stats = stats
        self.stderr = stderr           # the binary's own words, whole, when it failed


@dataclass(frozen=True)
class ApplyStats:
    processes: int = 0                 # binaries started
    iptables_lines: int = 0            # non-empty lines fed to iptables-restore
    ipset_lines: int = 0               # non-empty lines fed to ipset restore
    seconds: tuple = ()                # ((step, seconds), ...) in the order run
    nft_lines: int = 0                 # lines fed to nft -f (the nftables dataplane)

    @property
    def step_seconds(self) -> dict[str, float]:
        return dict(self.seconds)


class BackendChoice(NamedTuple):
    backend: str       # "nft" or "legacy"
    reason: str        # why, for the startup log


# --- running binaries -------------------------------------------------------

def command_argv(binary: str, args: Sequence[str], netns: Optional[str]) -> list[str]:
    """The argument list run for `binary args` in the target namespace."""
    if netns is None:
        return [binary, *args]
    return ["ip", "netns", "exec", netns, binary, *args]


def run(step: str, binary: str, args: Sequence[str], netns: Optional[str] = None,
        stdin: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT) -> str:
    """Run one binary to completion and return its stdout; every way it can
    fail becomes a KernelError that names the step."""
    return start(step, binary, args, netns, stdin, timeout).result()


def start(step: str, binary: str, args: Sequence[str], netns: Optional[str] = None,
          stdin: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT) -> "Running":
    """Start one binary, for reading its result later, while other work goes on."""
    return Running(step, binary, args, netns, stdin, timeout)


class Running:
    """A binary started by start(). Its timeout is a timer that kills it, not
    sh's `_timeout`: sh watches that one from a thread that wakes every 0.1 s,
    and joining that thread added up to 0.1 s to every call, even one that
    took 2 ms."""

    def __init__(self, step: str, binary: str, args: Sequence[str], netns: Optional[str],
                 stdin: Optional[str], timeout: float):
        self.step, self.binary, self.stdin, self.timeout = step, binary, stdin, timeout
        argv = command_argv(binary, args, netns)
        try:
            program = sh.Command(argv[0])
        except sh.CommandNotFound:
            raise KernelError(f"{step}: {argv[0]} not found in PATH", step=step) from None
        # Output is gathered in 64 KiB reads, not sh's default line by line,
        # which costs a third more than the binary itself on a large `ipset save`.
        kwargs = {"_tty_out": False, "_bg": True, "_bg_exc": False, "_return_cmd": True,
                  "_out_bufsize": READ_CHUNK, "_err_bufsize": READ_CHUNK}
        if stdin is not None:
            # in 64 KiB pieces: sh cuts a string into 1 KiB writes, which cost
            # 0.15 s on a 1 MB payload, more than half of what nft takes for it
            kwargs["_in"] = (stdin[i:i + READ_CHUNK] for i in range(0, len(stdin), READ_CHUNK))
        self._command = program(*argv[1:], **kwargs)
        self._killed = False
        self._timer = threading.Timer(timeout, self._kill)
        self._timer.daemon = True
        self._timer.start()

    def _kill(self) -> None:
        self._killed = True
        try:
            self._command.kill()
        except ProcessLookupError:      # it ended meanwhile
            pass

    def result(self) -> str:
        """Wait for the end; its stdout, or a KernelError naming the step."""
        try:
            done = self._command.wait()
        except sh.ErrorReturnCode as err:
            if self._killed:
                raise KernelError(f"{self.step}: {self.binary} timed out after "
                                  f"{self.timeout:g} s and was killed", step=self.step) from None
            stderr = _decode(err.stderr)
            raise KernelError(
                f"{self.step}: {self.binary} exited with code {err.exit_code}: "
                f"{_describe_stderr(stderr, self.stdin)}",
                step=self.step, exit_code=err.exit_code, stderr=stderr) from None
        finally:
            self._timer.cancel()
        return _decode(done.stdout)     # a kill that came after the end changed nothing

    def stop(self) -> None:
        """Kill it if it still runs, and reap it; for a result no longer wanted."""
        self._timer.cancel()
        if self._command.process.exit_code is None:
            try:
                self._command.kill()
            except ProcessLookupError:
                pass
        try:
            self._command.wait()
        except sh.ErrorReturnCode:
            pass


def _decode(data) -> str:
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data or "")


def _describe_stderr(stderr: str, payload: Optional[str]) -> str:
    """The binary's own words, without usage hints, plus the payload line it
    refused when it names one (nft reports some errors at the COMMIT line)."""
    lines = [ln.strip() for ln in stderr.splitlines()
             if ln.strip() and not ln.startswith("Try `")]
    text = "; ".join(lines)[:STDERR_LIMIT] or "(no message)"
    match = _FAILED_LINE.search(stderr)
    if match and payload:
        number = int(match.group(1))
        payload_lines = payload.splitlines()
        if 1 <= number <= len(payload_lines):
            quoted = payload_lines[number - 1][:LINE_QUOTE_LIMIT]
            text += f" [line {number}: {quoted}]"
    return text


def _count_lines(payload: str) -> int:
    return sum(1 for ln in payload.splitlines() if ln.strip())


# --- backend detection ------------------------------------------------------

def save_binary(backend: str, family: int) -> str:
    return f"{'ip6tables' if family == 6 else 'iptables'}-{backend}-save"


def restore_binary(backend: str, family: int) -> str:
    return f"{'ip6tables' if family == 6 else 'iptables'}-{backend}-restore"


def detect_backend(forced: str = "auto", netns: Optional[str] = None,
                   timeout: float = DEFAULT_TIMEOUT) -> BackendChoice:
    """Pick the backend kubelet and kube-proxy use, so our rules sit in the
    same tables as theirs: a forced value, else kubelet's hint chain (nft
    first), else the backend holding more IPv4 rules, else nft.

    The legacy side is read with a full `iptables-legacy-save`, which prints
    only tables that already exist: `-t mangle` would instantiate a legacy
    mangle table on a host that has none (and make every iptables-nft call on
    it warn about legacy tables)."""
    if forced not in FORCED_CHOICES:
        raise ValueError(f"iptables backend: must be one of {', '.join(FORCED_CHOICES)}, "
                         f"not {forced!r}")
    if forced != "auto":
        return BackendChoice(forced, f"forced to {forced}")

    nft_mangle = _try_save("nft", ["-t", "mangle"], netns, timeout)
    hint = _hint_chain(nft_mangle, "mangle")
    if hint:
        return BackendChoice("nft", f"kubelet chain {hint} found in the nft mangle table")
    legacy_all = _try_save("legacy", [], netns, timeout)
    hint = _hint_chain(legacy_all, "mangle")
    if hint:
        return BackendChoice("legacy", f"kubelet chain {hint} found in the legacy mangle table")

    nft_rules = _rule_count(_try_save("nft", [], netns, timeout))
    legacy_rules = _rule_count(legacy_all)
    if legacy_rules > nft_rules:
        return BackendChoice("legacy", f"no kubelet chain; legacy holds more rules "
                                       f"({legacy_rules} against {nft_rules} in nft)")
    if nft_rules > legacy_rules:
        return BackendChoice("nft", f"no kubelet chain; nft holds more rules "
                                    f"({nft_rules} against {legacy_rules} in legacy)")
    return BackendChoice("nft", f"no kubelet chain, {nft_rules} rules in either backend: "
                                f"default nft")


def _try_save(backend: str, args: list[str], netns: Optional[str], timeout: float) -> str:
    """A save that may fail (backend not in this kernel) reads as empty."""
    try:
        return run(f"backend detection ({backend})", save_binary(backend, 4), args,
                   netns=netns, timeout=timeout)
    except KernelError as err:
        logs.get().info(f"backend detection: {err}", extra={"event": "backend-probe-failed"})
        return ""


def _hint_chain(save_text: str, table: str) -> Optional[str]:
    """The first kubelet hint chain declared in `table` of a save dump."""
    current = None
    for line in save_text.splitlines():
        if line.startswith("*"):
            current = line[1:].strip()
        elif current == table and line.startswith(":"):
            name = line[1:].split(" ", 1)[0]
            if name in KUBE_HINT_CHAINS:
                return name
    return None


def _rule_count(save_text: str) -> int:
    return sum(1 for line in save_text.splitlines() if line.startswith("-A "))


# --- families ---------------------------------------------------------------

def ipv6_available(netns: Optional[str] = None, sysctl_dir: str = IPV6_SYSCTL_DIR,
                   timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Whether the target namespace has IPv6 at all (its sysctl tree is
    per-namespace, so a namespace is asked from inside)."""
    if netns is None:
        return os.path.isdir(sysctl_dir)
    try:
        run("IPv6 check", "test", ["-d", sysctl_dir], netns=netns, timeout=timeout)
    except KernelError:
        return False
    return True


def usable_families(families: Sequence[int], netns: Optional[str] = None,
                    sysctl_dir: str = IPV6_SYSCTL_DIR,
                    timeout: float = DEFAULT_TIMEOUT) -> tuple[int, ...]:
    """`families` less IPv6 when the kernel has none, with a warning, so that a
    node without IPv6 runs IPv4 alone instead of failing every cycle."""
    for f in families:
        if f not in FAMILY_NAMES:
            raise ValueError(f"families: {f!r} is not 4 or 6")
    if 6 in families and not ipv6_available(netns, sysctl_dir, timeout):
        logs.get().warning(f"IPv6 is not available ({sysctl_dir} is missing): "
                           f"managing IPv4 only", extra={"event": "ipv6-unavailable"})
        return tuple(f for f in families if f != 6)
    return tuple(families)


# --- the kernel -------------------------------------------------------------

@dataclass
class _Progress:
    processes: int = 0
    iptables_lines: int = 0
    ipset_lines: int = 0
    seconds: list = field(default_factory=list)

    def stats(self) -> ApplyStats:
        return ApplyStats(self.processes, self.iptables_lines, self.ipset_lines,
                          tuple(self.seconds))


T = TypeVar("T")

# What changes in a save text from one read to the next while the state does
# not: the time stamps of iptables-save's framing comments, and the packet
# counters of the built-in chains (the parse reads neither).
_UNSTABLE = re.compile(r"^# (?:Generated by|Completed on) .*$|^(:\S+ \S+) \[\d+:\d+\]$",
                       re.MULTILINE)


def _stable(text: str) -> str:
    return _UNSTABLE.sub(lambda m: m.group(1) or "", text)


class _LastParse:
    """The previous parse of each kind of read, by its text. An idle cycle
    reads the same state again, and parsing it anew costs more than running
    the save binaries: the same text (less what _UNSTABLE says varies) gives
    the same parse back. Any other text, drift included, is parsed in full."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[str, object]] = {}

    def __call__(self, what: str, text: str, parse: Callable[[str], T]) -> T:
        key = _stable(text)
        hit = self._last.get(what)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = parse(text)
        self._last[what] = (key, value)
        return value


def _save_step(family: int) -> str:
    return f"iptables-save ({FAMILY_NAMES[family]}, filter table)"


class Kernel:
    """The filter tables and ipsets of one network namespace, through one
    iptables backend."""

    def __init__(self, backend: str, netns: Optional[str] = None,
                 families: Sequence[int] = (4, 6), lock_wait: int = DEFAULT_LOCK_WAIT,
                 timeout: float = DEFAULT_TIMEOUT, ipv6_sysctl_dir: str = IPV6_SYSCTL_DIR):
        if backend not in BACKENDS:
            raise ValueError(f"iptables backend: must be nft or legacy, not {backend!r}")
        if lock_wait < 1:
            raise ValueError(f"lock_wait: must be >= 1 second, not {lock_wait!r}")
        self.backend = backend
        self.netns = netns
        self.lock_wait = int(lock_wait)
        self.timeout = float(timeout)
        self.families = usable_families(families, netns, ipv6_sysctl_dir, timeout)
        self._parsed = _LastParse()
        self._started: Optional[tuple[Running, dict[int, Running]]] = None   # by prefetch()

    def __repr__(self) -> str:
        return f"Kernel(backend={self.backend!r}, netns={self.netns!r}, families={self.families})"

    # reading

    def read(self) -> KernelState:
        """The filter table of each family and our ipsets, parsed, from the
        save binaries prefetch() started or, without one, started now, all
        at once: `ipset save` takes longest."""
        started, self._started = self._started, None
        sets_saved, saves = started or self._start_saves()
        try:
            tables = {family: self._parse_table(family, saves[family].result())
                      for family in self.families}
            text = sets_saved.result()
        finally:
            for running in (sets_saved, *saves.values()):
                running.stop()
        try:
            sets = self._parsed("ipset save", text, ipsets.parse_save)
        except ipsets.IpsetParseError as err:
            raise KernelError(f"ipset save: cannot parse the output of ipset save: {err}",
                              step="ipset save") from None
        owned = {name: s for name, s in sets.items() if name.startswith(PREFIX)}
        return KernelState(tables=tables, sets=owned)

    def prefetch(self) -> None:
        """Start the save binaries the next read() takes: they run while this
        process fetches from the API and compiles. What they save is as old
        as their start; a change after it is met by the next cycle."""
        self.drop_prefetch()
        self._started = self._start_saves()

    def drop_prefetch(self) -> None:
        """Stop saves no read() took (the cycle ended before its read)."""
        if self._started is not None:
            sets_saved, saves = self._started
            self._started = None
            for running in (sets_saved, *saves.values()):
                running.stop()

    def _start_saves(self) -> tuple["Running", dict[int, "Running"]]:
        sets_saved = start("ipset save", "ipset", ["save"], netns=self.netns, timeout=self.timeout)
        saves: dict[int, Running] = {}
        try:
            for family in self.families:
                saves[family] = start(_save_step(family), save_binary(self.backend, family),
                                      ["-t", "filter"], netns=self.netns, timeout=self.timeout)
        except KernelError:
            for running in (sets_saved, *saves.values()):
                running.stop()
            raise
        return sets_saved, saves

    def _parse_table(self, family: int, text: str) -> TableState:
        binary = save_binary(self.backend, family)
        step = _save_step(family)
        try:
            return self._parsed(step, text, lambda t: iptables_save.parse(t, family))
        except iptables_save.SaveParseError as err:
            raise KernelError(f"{step}: cannot parse the output of {binary}: {err}",
                              step=step) from None

    # writing

    def apply(self, plan: Plan) -> ApplyStats:
        """Run the plan's payloads in hitless order, stopping at the first
        failure: the steps not run leave the old rules, or a superset of the
        new ones that still holds together, for the next cycle to repair.
        Empty payloads start no process; families this node lacks are skipped."""
        progress = _Progress()
        self._ipset_restore("ipset restore (prepare)", plan.ipset_prepare, progress)
        for family in self.families:
            self._iptables_restore(family, "main transaction",
                                   plan.iptables.get(family, ""), progress)
        for family in self.families:
            self._iptables_restore(family, "cleanup transaction",
                                   plan.iptables_cleanup.get(family, ""), progress)
        self._ipset_cleanup(plan.ipset_cleanup, progress)
        return progress.stats()

    def cleanup(self) -> ApplyStats:
        """Remove every chain, hook and set of ours from the kernel."""
        return self.apply(planner.cleanup(self.read()))

    def _iptables_restore(self, family: int, what: str, payload: str,
                          progress: _Progress) -> None:
        if not payload:
            return
        # --wait bounds the wait for the xtables lock (legacy); nft accepts and
        # ignores it, as it does not use that lock.
        args = ["--noflush", "--wait", str(self.lock_wait)]
        step = f"iptables-restore ({FAMILY_NAMES[family]}, {what})"
        self._run_step(step, restore_binary(self.backend, family), args, payload, progress,
                       timeout=self.timeout + self.lock_wait)
        progress.iptables_lines += _count_lines(payload)

    def _ipset_restore(self, step: str, payload: str, progress: _Progress) -> None:
        if not payload:
            return
        self._run_step(step, "ipset", ["restore", "-exist"], payload, progress,
                       timeout=self.timeout)
        progress.ipset_lines += _count_lines(payload)

    def _ipset_cleanup(self, payload: str, progress: _Progress) -> None:
        """Removing stale members and sets is best effort. The policy is fully
        in force by now, and a stale set that someone else's rule still uses
        cannot be destroyed: that must not fail every cycle (and the liveness
        probe with it). A refused line is logged and skipped, the rest applied."""
        lines = [ln for ln in payload.splitlines() if ln.strip()]
        step = "ipset restore (cleanup)"
        while lines:
            try:
                self._ipset_restore(step, "\n".join(lines) + "\n", progress)
                return
            except KernelError as err:
                match = _FAILED_LINE.search(str(err))
                number = int(match.group(1)) if match else 0
                if not 1 <= number <= len(lines):
                    raise
                logs.get().warning(f"{step}: left in place: {lines[number - 1]}: {err}",
                                   extra={"event": "stale-set-kept", "line": lines[number - 1]})
                lines = lines[number:]

    def _run_step(self, step: str, binary: str, args: list[str], payload: str,
                  progress: _Progress, timeout: float) -> None:
        start = time.perf_counter()
        progress.processes += 1
        try:
            run(step, binary, args, netns=self.netns, stdin=payload, timeout=timeout)
        except KernelError as err:
            progress.seconds.append((step, time.perf_counter() - start))
            err.stats = progress.stats()
            raise
        progress.seconds.append((step, time.perf_counter() - start))
