"""lib.kernel against the real binaries, each test inside its own network
namespace (see conftest.py)."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time

import pytest

from lib import kernel
from lib import plan as planner
from lib.kernel import ApplyStats, Kernel, KernelError, detect_backend
from lib.plan import Plan
from lib.ruleset import Chain, DesiredState, FamilyState, Hook, IpSet, Rule

BACKEND_FAMILIES = [("nft", 4), ("nft", 6), ("legacy", 4), ("legacy", 6)]
XTABLES_LOCK = "/run/xtables.lock"

HOOK_PAYLOAD = (
    "*filter\n"
    ":KPM-FORWARD - [0:0]\n"
    "-A KPM-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN\n"
    "-I FORWARD 1 -m comment --comment \"kpm:0123456789ab hook\" -j KPM-FORWARD\n"
    "COMMIT\n"
)


# --- helpers ------------------------------------------------------------------

def in_ns(netns: str, *argv: str, stdin: str | None = None,
          check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", netns, *argv], input=stdin,
                          capture_output=True, text=True, timeout=30, check=check)


def iptables(backend: str, family: int) -> str:
    return f"{'ip6tables' if family == 6 else 'iptables'}-{backend}"


def saved(netns: str, backend: str, family: int, table: str = "filter") -> list[str]:
    """The table as iptables-save prints it, without its dated comment lines."""
    out = in_ns(netns, iptables(backend, family) + "-save", "-t", table).stdout
    return [ln for ln in out.splitlines() if ln and not ln.startswith("#")]


def rules_of(netns: str, backend: str, family: int, chain: str) -> list[str]:
    return [ln for ln in saved(netns, backend, family) if ln.startswith(f"-A {chain} ")]


def ipset_save(netns: str) -> list[str]:
    return in_ns(netns, "ipset", "save").stdout.splitlines()


def chain_payload(chain: str, *rules: str) -> str:
    body = "".join(f"-A {chain} {r}\n" for r in rules)
    return f"*filter\n:{chain} - [0:0]\n{body}COMMIT\n"


# --- restore facts: built-in chains need no declaration ------------------------

@pytest.mark.parametrize("backend,family", BACKEND_FAMILIES)
def test_fresh_namespace_takes_hook_without_builtin_chain_lines(netns, backend, family):
    if backend == "nft":
        # nothing at all exists yet: iptables-nft-save prints nothing
        assert in_ns(netns, iptables(backend, family) + "-save").stdout == ""
    k = Kernel(backend, netns=netns, families=(family,))

    stats = k.apply(Plan(iptables={family: HOOK_PAYLOAD}))

    assert rules_of(netns, backend, family, "FORWARD") == [
        '-A FORWARD -m comment --comment "kpm:0123456789ab hook" -j KPM-FORWARD']
    assert rules_of(netns, backend, family, "KPM-FORWARD") == [
        "-A KPM-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"]
    assert stats.processes == 1 and stats.iptables_lines == 5


@pytest.mark.parametrize("backend,family", BACKEND_FAMILIES)
def test_hook_goes_first_and_keeps_admin_policy_and_rules(netns, backend, family):
    cmd = iptables(backend, family)
    in_ns(netns, cmd, "-P", "FORWARD", "DROP")
    in_ns(netns, cmd, "-A", "FORWARD", "-p", "udp", "-j", "ACCEPT")
    k = Kernel(backend, netns=netns, families=(family,))

    k.apply(Plan(iptables={family: HOOK_PAYLOAD}))

    table = saved(netns, backend, family)
    assert ":FORWARD DROP [0:0]" in table
    assert rules_of(netns, backend, family, "FORWARD") == [
        '-A FORWARD -m comment --comment "kpm:0123456789ab hook" -j KPM-FORWARD',
        "-A FORWARD -p udp -j ACCEPT",
    ]


# --- reading: an unchanged state is not parsed again, a changed one is ---------

@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_a_read_of_the_same_state_reuses_its_parse_and_any_change_is_seen(netns, backend):
    k = Kernel(backend, netns=netns, families=(4,))
    k.apply(Plan(iptables={4: HOOK_PAYLOAD},
                 ipset_prepare="create KPM-N4-test hash:net family inet\nadd KPM-N4-test 10.0.0.1\n"))
    first = k.read()
    time.sleep(1.1)          # iptables-save's dated comments now differ
    in_ns(netns, "ping", "-c", "1", "-W", "1", "127.0.0.1", check=False)   # counters move
    again = k.read()
    assert again.tables[4] is first.tables[4] and again.sets == first.sets

    # a foreign policy change, our rule deleted, a member added: each is read
    in_ns(netns, iptables(backend, 4), "-P", "INPUT", "DROP")
    assert k.read().tables[4].policies["INPUT"] == "DROP"
    in_ns(netns, iptables(backend, 4), "-D", "KPM-FORWARD", "-m", "conntrack", "--ctstate",
          "RELATED,ESTABLISHED", "-j", "RETURN")
    assert k.read().tables[4].chains["KPM-FORWARD"] == ()
    in_ns(netns, "ipset", "add", "KPM-N4-test", "10.0.0.2")
    assert k.read().sets["KPM-N4-test"].members == {"10.0.0.1", "10.0.0.2"}


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_prefetched_saves_are_the_next_read_and_dropped_ones_are_reaped(netns, backend):
    k = Kernel(backend, netns=netns)
    k.apply(Plan(iptables={4: HOOK_PAYLOAD},
                 ipset_prepare="create KPM-N4-test hash:net family inet\nadd KPM-N4-test 10.0.0.1\n"))
    plain = k.read()
    k.prefetch()
    assert k.read() == plain
    k.prefetch()
    sets_saved, saves = k._started
    k.drop_prefetch()
    assert all(r._command.process.exit_code is not None for r in (sets_saved, *saves.values()))
    in_ns(netns, "ipset", "add", "KPM-N4-test", "10.0.0.2")
    assert k.read().sets["KPM-N4-test"].members == {"10.0.0.1", "10.0.0.2"}   # read anew


# --- restore facts: a block is all or nothing ----------------------------------

@pytest.mark.parametrize("backend,family", BACKEND_FAMILIES)
def test_failing_line_leaves_table_untouched(netns, backend, family):
    k = Kernel(backend, netns=netns, families=(family,))
    k.apply(Plan(iptables={family: HOOK_PAYLOAD}))
    before = saved(netns, backend, family)
    bad = (
        "*filter\n"
        ":KPM-NEW - [0:0]\n"
        "-A KPM-NEW -j RETURN\n"
        ":KPM-FORWARD - [0:0]\n"                 # would flush the existing chain
        "-A KPM-FORWARD -j KPM-MISSING\n"        # line 5: no such chain
        "COMMIT\n"
    )

    with pytest.raises(KernelError) as caught:
        k.apply(Plan(iptables={family: bad}))

    fam = "IPv4" if family == 4 else "IPv6"
    message = str(caught.value)
    assert message.startswith(f"iptables-restore ({fam}, main transaction): ")
    assert f"{iptables(backend, family)}-restore exited with code 2" in message
    assert "KPM-MISSING" in message
    assert "line" in message and "iptables-nft-restore -h" not in message
    assert caught.value.exit_code == 2
    assert saved(netns, backend, family) == before


def test_error_quotes_the_refused_payload_line(netns):
    k = Kernel("legacy", netns=netns, families=(4,))
    bad = "*filter\n:KPM-A - [0:0]\n-A KPM-A -p tcp --dport 99999 -j RETURN\nCOMMIT\n"

    with pytest.raises(KernelError) as caught:
        k.apply(Plan(iptables={4: bad}))

    assert "[line 3: -A KPM-A -p tcp --dport 99999 -j RETURN]" in str(caught.value)


# --- the xtables lock ------------------------------------------------------------

def _lock_held() -> bool:
    return subprocess.run(["flock", "-n", XTABLES_LOCK, "true"], timeout=5).returncode != 0


def test_legacy_apply_waits_for_xtables_lock_and_nft_ignores_it(netns):
    nft = Kernel("nft", netns=netns, families=(4,))
    short = Kernel("legacy", netns=netns, families=(4,), lock_wait=1)
    patient = Kernel("legacy", netns=netns, families=(4,), lock_wait=10)
    holder = subprocess.Popen(["flock", XTABLES_LOCK, "sleep", "3"])
    try:
        deadline = time.monotonic() + 2
        while not _lock_held():
            assert time.monotonic() < deadline, "flock did not take the xtables lock"
            time.sleep(0.05)
        held_since = time.monotonic()

        start = time.monotonic()
        nft.apply(Plan(iptables={4: chain_payload("KPM-N", "-j RETURN")}))
        assert time.monotonic() - start < 1.0          # nft does not use the lock

        with pytest.raises(KernelError) as caught:
            short.apply(Plan(iptables={4: chain_payload("KPM-S", "-j RETURN")}))
        assert caught.value.exit_code == 4
        assert "xtables lock" in str(caught.value)

        patient.apply(Plan(iptables={4: chain_payload("KPM-L", "-j RETURN")}))
        assert holder.poll() is not None               # it ran only once the lock was free
        assert time.monotonic() - held_since >= 2.5
    finally:
        holder.kill()
        holder.wait(timeout=10)
    assert rules_of(netns, "legacy", 4, "KPM-L") == ["-A KPM-L -j RETURN"]
    assert rules_of(netns, "legacy", 4, "KPM-S") == []
    assert rules_of(netns, "nft", 4, "KPM-N") == ["-A KPM-N -j RETURN"]


# --- backend detection -------------------------------------------------------------

def _add_rules(netns: str, backend: str, count: int) -> None:
    lines = "".join("-A INPUT -p udp --dport %d -j ACCEPT\n" % (1000 + i) for i in range(count))
    in_ns(netns, f"iptables-{backend}-restore", "--noflush",
          stdin=f"*filter\n{lines}COMMIT\n")


def _add_hint(netns: str, backend: str, chain: str = "KUBE-IPTABLES-HINT") -> None:
    in_ns(netns, f"iptables-{backend}", "-t", "mangle", "-N", chain)


def test_detect_legacy_hint_beats_more_nft_rules(netns):
    _add_hint(netns, "legacy")
    _add_rules(netns, "nft", 5)
    choice = detect_backend(netns=netns)
    assert choice.backend == "legacy"
    assert "KUBE-IPTABLES-HINT" in choice.reason and "legacy" in choice.reason


def test_detect_nft_hint_beats_more_legacy_rules(netns):
    _add_hint(netns, "nft")
    _add_rules(netns, "legacy", 5)
    backend, reason = detect_backend(netns=netns)
    assert backend == "nft"
    assert "KUBE-IPTABLES-HINT" in reason and "nft" in reason


def test_detect_kubelet_canary_counts_as_hint(netns):
    _add_hint(netns, "legacy", "KUBE-KUBELET-CANARY")
    assert detect_backend(netns=netns).backend == "legacy"


def test_detect_nft_hint_wins_when_both_have_one(netns):
    _add_hint(netns, "legacy")
    _add_hint(netns, "nft")
    assert detect_backend(netns=netns).backend == "nft"


def test_detect_without_hint_picks_backend_with_more_rules(netns):
    _add_rules(netns, "nft", 2)
    _add_rules(netns, "legacy", 3)
    choice = detect_backend(netns=netns)
    assert choice.backend == "legacy"
    assert "3 against 2" in choice.reason


def test_detect_empty_namespace_is_nft_and_creates_no_legacy_table(netns):
    choice = detect_backend(netns=netns)
    assert choice.backend == "nft"
    assert "default" in choice.reason
    # reading must not instantiate legacy tables (that would make iptables-nft warn)
    assert in_ns(netns, "cat", "/proc/net/ip_tables_names").stdout == ""


@pytest.mark.parametrize("forced", ["nft", "legacy"])
def test_detect_forced_value_wins(netns, forced):
    other = "legacy" if forced == "nft" else "nft"
    _add_hint(netns, other)
    _add_rules(netns, other, 3)
    assert detect_backend(forced, netns=netns) == (forced, f"forced to {forced}")


def test_detect_rejects_unknown_forced_value():
    with pytest.raises(ValueError, match="iptables backend: must be one of auto, nft, legacy"):
        detect_backend("iptables")


# --- what apply runs -----------------------------------------------------------------

@pytest.fixture
def ip_calls(tmp_path, monkeypatch):
    """Every `ip` process started from here on, counted through a logging
    wrapper first in PATH (with a namespace, every command starts as `ip`)."""
    real_ip = shutil.which("ip")
    log = tmp_path / "calls.log"
    wrapper = tmp_path / "bin" / "ip"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\nexec "{real_ip}" "$@"\n')
    wrapper.chmod(0o755)
    log.touch()

    def calls() -> list[str]:
        return log.read_text().splitlines()

    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    return calls


def test_empty_plan_starts_no_process(netns, ip_calls):
    k = Kernel("nft", netns=netns)
    constructed = len(ip_calls())        # the IPv6 check at construction

    stats = k.apply(Plan())
    stats_blank = k.apply(Plan(iptables={4: "", 6: ""}, iptables_cleanup={4: ""}))

    assert stats == stats_blank == ApplyStats()
    assert len(ip_calls()) == constructed


def test_apply_runs_steps_in_order_and_counts_them(netns, ip_calls):
    k = Kernel("nft", netns=netns)
    before = len(ip_calls())
    plan = Plan(
        ipset_prepare="create KPM-N4-t hash:net family inet maxelem 1048576\n"
                      "add KPM-N4-t 10.0.0.0/8\n",
        iptables={4: chain_payload("KPM-A", "-m set --match-set KPM-N4-t src -j RETURN"),
                  6: chain_payload("KPM-A", "-j RETURN")},
        iptables_cleanup={4: "*filter\n:KPM-OLD - [0:0]\n-X KPM-OLD\nCOMMIT\n"},
        ipset_cleanup="create KPM-N4-old hash:net family inet\ndestroy KPM-N4-old\n",
    )

    stats = k.apply(plan)

    calls = ip_calls()[before:]
    assert [c.split()[3] for c in calls] == [
        "ipset", "iptables-nft-restore", "ip6tables-nft-restore", "iptables-nft-restore",
        "ipset"]
    assert calls[1].endswith("iptables-nft-restore --noflush --wait 10")
    assert stats.processes == 5
    assert stats.ipset_lines == 4
    assert stats.iptables_lines == 4 + 4 + 4
    assert [step for step, _ in stats.seconds] == [
        "ipset restore (prepare)",
        "iptables-restore (IPv4, main transaction)",
        "iptables-restore (IPv6, main transaction)",
        "iptables-restore (IPv4, cleanup transaction)",
        "ipset restore (cleanup)",
    ]
    assert all(s >= 0 for _, s in stats.seconds)
    assert rules_of(netns, "nft", 4, "KPM-A") == ["-A KPM-A -m set --match-set KPM-N4-t src -j RETURN"]
    assert rules_of(netns, "nft", 6, "KPM-A") == ["-A KPM-A -j RETURN"]
    assert ipset_save(netns)[1:] == ["add KPM-N4-t 10.0.0.0/8"]


# --- stopping at the first failure ---------------------------------------------------

def test_ipset_failure_midway_names_line_and_stops_the_plan(netns):
    k = Kernel("nft", netns=netns, families=(4,))
    plan = Plan(
        ipset_prepare="create KPM-N4-t hash:net family inet maxelem 1048576\n"
                      "add KPM-N4-t 10.0.0.0/8\n"
                      "add KPM-N4-t not-an-address\n"
                      "add KPM-N4-t 11.0.0.0/8\n",
        iptables={4: chain_payload("KPM-A", "-j RETURN")},
        ipset_cleanup="destroy KPM-N4-t\n",
    )

    with pytest.raises(KernelError) as caught:
        k.apply(plan)

    message = str(caught.value)
    assert message.startswith("ipset restore (prepare): ipset exited with code 1: ")
    assert "Error in line 3" in message
    assert "[line 3: add KPM-N4-t not-an-address]" in message
    assert caught.value.step == "ipset restore (prepare)"
    assert caught.value.stats.processes == 1
    assert ":KPM-A - [0:0]" not in saved(netns, "nft", 4)      # iptables step not run
    # the cleanup step did not run either: the set created by line 1 is still there
    assert ipset_save(netns)[0].startswith("create KPM-N4-t hash:net")


def test_iptables_failure_skips_cleanup_steps(netns):
    k = Kernel("nft", netns=netns, families=(4, 6))
    k.apply(Plan(ipset_prepare="create KPM-N4-old hash:net family inet\n",
                 iptables={4: chain_payload("KPM-OLD", "-j RETURN")}))
    plan = Plan(
        iptables={4: chain_payload("KPM-A", "-j KPM-MISSING"),
                  6: chain_payload("KPM-A", "-j RETURN")},
        iptables_cleanup={4: "*filter\n-F KPM-OLD\n-X KPM-OLD\nCOMMIT\n"},
        ipset_cleanup="destroy KPM-N4-old\n",
    )

    with pytest.raises(KernelError) as caught:
        k.apply(plan)

    assert caught.value.step == "iptables-restore (IPv4, main transaction)"
    assert caught.value.stats.processes == 1
    assert rules_of(netns, "nft", 6, "KPM-A") == []        # IPv6 step not run
    assert rules_of(netns, "nft", 4, "KPM-OLD") == ["-A KPM-OLD -j RETURN"]
    assert ipset_save(netns)[0].startswith("create KPM-N4-old ")


# --- running binaries ------------------------------------------------------------------

def test_run_reports_missing_binary_in_namespace(netns):
    with pytest.raises(KernelError) as caught:
        kernel.run("probe", "no-such-binary-kpm", ["-x"], netns=netns)
    assert str(caught.value) == ('probe: no-such-binary-kpm exited with code 1: '
                                 'exec of "no-such-binary-kpm" failed: No such file or directory')


def test_run_reports_missing_binary_without_namespace():
    with pytest.raises(KernelError, match="^probe: no-such-binary-kpm not found in PATH$"):
        kernel.run("probe", "no-such-binary-kpm", [])


def test_run_kills_a_binary_past_its_timeout(netns):
    start = time.monotonic()
    with pytest.raises(KernelError, match=r"^slow: sleep timed out after 0\.5 s"):
        kernel.run("slow", "sleep", ["30"], netns=netns, timeout=0.5)
    assert time.monotonic() - start < 5


def test_run_returns_as_soon_as_a_quick_binary_ends(netns):
    # A cycle runs a handful of binaries: a fixed wait on each (a timeout
    # watcher polling every 0.1 s) would dominate an idle cycle.
    def seconds() -> float:
        start = time.perf_counter()
        kernel.run("probe", "ipset", ["save"], netns=netns, timeout=30)
        return time.perf_counter() - start

    assert min(seconds() for _ in range(5)) < 0.05


def test_run_feeds_payload_on_stdin_and_returns_stdout(netns):
    assert kernel.run("echo", "cat", [], netns=netns, stdin="a b\n'c'\n") == "a b\n'c'\n"


# --- families ----------------------------------------------------------------------------

def test_ipv6_present_here(netns):
    assert kernel.ipv6_available(netns)
    assert kernel.ipv6_available(None)
    assert Kernel("nft", netns=netns).families == (4, 6)


def test_missing_ipv6_drops_the_family_with_a_warning(netns, caplog):
    caplog.set_level(logging.WARNING)
    k = Kernel("nft", netns=netns, ipv6_sysctl_dir="/proc/sys/net/ipv6-absent")

    stats = k.apply(Plan(iptables={4: chain_payload("KPM-A", "-j RETURN"),
                                   6: chain_payload("KPM-A", "-j RETURN")}))

    assert k.families == (4,)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "IPv6 is not available (/proc/sys/net/ipv6-absent is missing): managing IPv4 only"]
    assert stats.processes == 1
    assert rules_of(netns, "nft", 6, "KPM-A") == []
    assert rules_of(netns, "nft", 4, "KPM-A") == ["-A KPM-A -j RETURN"]


def test_constructor_rejects_bad_values():
    with pytest.raises(ValueError, match="iptables backend: must be nft or legacy"):
        Kernel("auto")
    with pytest.raises(ValueError, match="families: 5 is not 4 or 6"):
        Kernel("nft", families=(4, 5))
    with pytest.raises(ValueError, match="lock_wait: must be >= 1"):
        Kernel("nft", lock_wait=0)


# --- reading -----------------------------------------------------------------------------

SETS_PAYLOAD = (
    "create KPM-N4-t hash:net family inet maxelem 1048576\n"
    "add KPM-N4-t 10.1.2.3/32\n"
    "add KPM-N4-t 10.8.0.0/16\n"
    "create KPM-P6-t hash:ip,port family inet6 maxelem 1048576\n"
    "add KPM-P6-t fd00:0:0::5,tcp:8080\n"
    "create OTHER-set hash:ip family inet\n"
    "add OTHER-set 192.0.2.1\n"
)


def test_read_fresh_namespace_is_empty(netns):
    state = Kernel("nft", netns=netns).read()
    assert sorted(state.tables) == [4, 6]
    assert all(not any(name.startswith("KPM-") for name in t.chains)
               for t in state.tables.values())
    assert state.sets == {}


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_read_returns_rules_hooks_and_only_our_sets(netns, backend):
    k = Kernel(backend, netns=netns)
    in_ns(netns, iptables(backend, 4), "-P", "FORWARD", "DROP")
    in_ns(netns, iptables(backend, 4), "-N", "ADMIN")
    k.apply(Plan(ipset_prepare=SETS_PAYLOAD,
                 iptables={4: HOOK_PAYLOAD, 6: chain_payload("KPM-A", "-j RETURN")}))

    state = k.read()

    v4, v6 = state.tables[4], state.tables[6]
    assert (v4.family, v6.family) == (4, 6)
    assert v4.policies["FORWARD"] == "DROP"
    assert "ADMIN" in v4.chains
    (hook,) = v4.chains["FORWARD"]
    assert (hook.hash, hook.target) == ("0123456789ab", "KPM-FORWARD")
    (ret,) = v4.chains["KPM-FORWARD"]
    assert ret.spec == ("-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "RETURN")
    assert ret.hash is None
    assert [r.target for r in v6.chains["KPM-A"]] == ["RETURN"]
    assert "KPM-FORWARD" not in v6.chains
    assert sorted(state.sets) == ["KPM-N4-t", "KPM-P6-t"]
    assert state.sets["KPM-N4-t"].members == {"10.1.2.3", "10.8.0.0/16"}
    assert state.sets["KPM-P6-t"].members == {"fd00::5,tcp:8080"}
    assert (state.sets["KPM-P6-t"].family, state.sets["KPM-P6-t"].kind) == (6, "hash:ip,port")


def test_read_skips_a_dropped_family(netns):
    k = Kernel("nft", netns=netns, families=(4,))
    assert sorted(k.read().tables) == [4]


@pytest.fixture
def path_dir(tmp_path, monkeypatch):
    """A directory that replaces PATH: the test puts there only the binaries
    (or stand-ins) it wants found."""
    bin_dir = tmp_path / "path"
    bin_dir.mkdir()

    def add(name: str, script: str | None = None) -> None:
        target = bin_dir / name
        if script is None:
            target.symlink_to(shutil.which(name))
        else:
            target.write_text(script)
            target.chmod(0o755)

    def activate() -> None:
        monkeypatch.setenv("PATH", str(bin_dir))

    add.activate = activate
    return add


def test_read_names_a_missing_binary(netns, path_dir):
    k = Kernel("nft", netns=netns)
    for name in ("ip", "iptables-nft-save", "ip6tables-nft-save"):
        path_dir(name)
    path_dir.activate()

    with pytest.raises(KernelError) as caught:
        k.read()

    assert str(caught.value) == ('ipset save: ipset exited with code 1: '
                                 'exec of "ipset" failed: No such file or directory')


@pytest.mark.parametrize("binary,output,expected", [
    ("ip6tables-nft-save", "*filter\\n-A KPM-X -j RETURN\\nCOMMIT\\n",
     "iptables-save (IPv6, filter table): cannot parse the output of ip6tables-nft-save: "
     "iptables-save line 2: rule for undeclared chain KPM-X: '-A KPM-X -j RETURN'"),
    ("ipset", "create KPM-N4-x hash:net family inet\\nflush KPM-N4-x\\n",
     "ipset save: cannot parse the output of ipset save: "
     "ipset save line 2: unknown command flush: 'flush KPM-N4-x'"),
])
def test_read_refuses_output_it_cannot_parse(netns, path_dir, binary, output, expected):
    k = Kernel("nft", netns=netns)
    for name in ("ip", "iptables-nft-save", "ip6tables-nft-save", "ipset"):
        if name != binary:
            path_dir(name)
    path_dir(binary, f"#!/bin/sh\nprintf '{output}'\n")
    path_dir.activate()

    with pytest.raises(KernelError) as caught:
        k.read()

    assert str(caught.value) == expected


def test_a_failing_table_read_stops_the_ipset_save_started_beside_it(netns, path_dir):
    k = Kernel("nft", netns=netns)
    path_dir("ip")
    path_dir("iptables-nft-save", "#!/bin/sh\necho 'no table here' >&2\nexit 4\n")
    path_dir("ip6tables-nft-save")
    path_dir("ipset", f"#!/bin/sh\nexec {shutil.which('sleep')} 30\n")
    path_dir.activate()

    start = time.monotonic()
    with pytest.raises(KernelError) as caught:
        k.read()

    assert time.monotonic() - start < 5
    assert str(caught.value) == ("iptables-save (IPv4, filter table): iptables-nft-save exited "
                                 "with code 4: no table here")
    left = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True,
                          timeout=10).stdout.split()
    assert left == []


# --- with the planner: converge, repair, clean up ------------------------------------------

def _desired() -> DesiredState:
    peers = IpSet("KPM-N4-0123456789abcdef0123", "hash:net", 4,
                  frozenset({"10.0.0.0/8", "192.0.2.7"}))
    established = Rule(("-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "RETURN"),
                       "established")
    v4 = FamilyState(4, chains=(
        Chain("KPM-FORWARD", (established,
                              Rule(("-d", "10.244.1.5", "-j", "KPM-I-0123456789abcdef0123"),
                                   "ns/pod ingress"))),
        Chain("KPM-I-0123456789abcdef0123", (
            Rule(("-m", "set", "--match-set", peers.name, "src", "-p", "tcp", "--dport", "80",
                  "-j", "RETURN"), "ns/allow-web ingress[0]"),
            Rule(("-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"), "ns/pod reject"),
            Rule(("-j", "REJECT", "--reject-with", "icmp-port-unreachable"), "ns/pod reject"),
        )),
        Chain("KPM-INPUT", (established,)),
    ), hooks=(Hook("FORWARD", Rule(("-j", "KPM-FORWARD"), "hook")),
              Hook("INPUT", Rule(("-j", "KPM-INPUT"), "hook"))))
    v6 = FamilyState(6, chains=(Chain("KPM-FORWARD", (established,)),),
                     hooks=(Hook("FORWARD", Rule(("-j", "KPM-FORWARD"), "hook")),))
    return DesiredState(v4=v4, v6=v6, sets=(peers,))


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_diff_apply_converges_repairs_and_cleanup_removes_only_ours(netns, backend):
    desired = _desired()
    ipt4 = iptables(backend, 4)
    in_ns(netns, ipt4, "-P", "FORWARD", "DROP")
    in_ns(netns, ipt4, "-A", "FORWARD", "-p", "udp", "-j", "ACCEPT")
    in_ns(netns, "ipset", "create", "ADMIN-set", "hash:ip")
    k = Kernel(backend, netns=netns)

    first = planner.diff(desired, k.read())
    assert not first.empty
    k.apply(first)

    assert planner.diff(desired, k.read()).empty
    forward = rules_of(netns, backend, 4, "FORWARD")
    assert forward[0].endswith("-j KPM-FORWARD") and forward[1:] == ["-A FORWARD -p udp -j ACCEPT"]

    in_ns(netns, ipt4, "-D", "FORWARD", "1")                 # someone removes our hook
    repair = planner.diff(desired, k.read())
    assert [c.kind for c in repair.changes] == ["hook"]
    stats = k.apply(repair)
    assert stats.processes == 1
    assert planner.diff(desired, k.read()).empty

    k.cleanup()

    state = k.read()
    for table in state.tables.values():
        assert [n for n in table.chains if n.startswith("KPM-")] == []
        assert all(r.hash is None for rules in table.chains.values() for r in rules)
    assert state.sets == {}
    assert state.tables[4].policies["FORWARD"] == "DROP"
    assert rules_of(netns, backend, 4, "FORWARD") == ["-A FORWARD -p udp -j ACCEPT"]
    assert [ln.split()[1] for ln in ipset_save(netns)] == ["ADMIN-set"]
    assert planner.diff(DesiredState(), state).empty
    assert k.cleanup() == ApplyStats()                       # nothing left: nothing run
