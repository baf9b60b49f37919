"""The full-rewrite way of syncing, measured beside ours on the same state.

This is how kube-router's policy controller syncs: every cycle writes the
whole ruleset, every owned chain re-declared and refilled in one
`iptables-restore` of the filter table (without --noflush), and every set
refilled through a temporary set swapped in. It needs no reading or
diffing, but its kernel work is the whole state every time.

For the nftables dataplane the same idea is one `nft -f` transaction that
deletes our table and declares it again, whole (`sync_nft`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from lib import iptables_save, kernel, nft_kernel, nft_plan
from lib.nft_state import ABSENT, Table
from lib.plan import MAXELEM
from lib.ruleset import SET_FAMILY, DesiredState, Rule

BUILTINS = ("INPUT", "FORWARD", "OUTPUT")
TEMP_SET = "KPMT-{index}"


@dataclass(frozen=True)
class Payloads:
    iptables: dict          # family -> iptables-restore input (whole filter table)
    ipset: str              # ipset restore input

    def lines(self) -> tuple[int, int]:
        """(iptables lines, ipset lines) written."""
        return (sum(_count(p) for p in self.iptables.values()), _count(self.ipset))


@dataclass(frozen=True)
class Cost:
    render_seconds: float
    apply_seconds: float
    iptables_lines: int
    ipset_lines: int
    steps: tuple            # ((step, seconds), ...)


def _count(payload: str) -> int:
    return payload.count("\n")


def _rule_line(chain: str, rule: Rule) -> str:
    return " ".join(["-A", chain] + [iptables_save.quote(a) for a in rule.restore_args()])


def render(desired: DesiredState, families) -> Payloads:
    """The whole owned state as restore payloads."""
    tables = {}
    for family in families:
        fs = desired.family(family)
        lines = ["*filter"] + [f":{b} ACCEPT [0:0]" for b in BUILTINS]
        lines += [f":{c.name} - [0:0]" for c in fs.chains]
        lines += [_rule_line(h.builtin, h.rule) for h in fs.hooks]
        for chain in fs.chains:
            lines += [_rule_line(chain.name, r) for r in chain.rules]
        lines.append("COMMIT")
        tables[family] = "\n".join(lines) + "\n"
    sets = []
    for index, s in enumerate(x for x in desired.sets if x.family in families):
        temp = TEMP_SET.format(index=index)
        sets.append(f"create {temp} {s.kind} family {SET_FAMILY[s.family]} maxelem {MAXELEM}")
        sets += [f"add {temp} {m}" for m in sorted(s.members)]
        sets += [f"swap {temp} {s.name}", f"destroy {temp}"]
    return Payloads(tables, "".join(line + "\n" for line in sets))


def sync(desired: DesiredState, backend: str, families, netns=None,
         timeout: float = kernel.DEFAULT_TIMEOUT) -> Cost:
    """Render and write the whole state; the kernel must already hold its
    sets (swap needs both), as it does after one of our cycles."""
    start = time.perf_counter()
    payloads = render(desired, families)
    rendered = time.perf_counter()
    steps = []

    def step(name: str, binary: str, args: list, payload: str) -> None:
        began = time.perf_counter()
        kernel.run(name, binary, args, netns=netns, stdin=payload, timeout=timeout)
        steps.append((name, time.perf_counter() - began))

    if payloads.ipset:
        step("ipset restore (full)", "ipset", ["restore"], payloads.ipset)
    for family in families:
        step(f"iptables-restore IPv{family} (full)", kernel.restore_binary(backend, family),
             ["--wait", str(kernel.DEFAULT_LOCK_WAIT)], payloads.iptables[family])
    ipt, ips = payloads.lines()
    return Cost(rendered - start, time.perf_counter() - rendered, ipt, ips, tuple(steps))


def sync_nft(desired: Table, netns=None, timeout: float = kernel.DEFAULT_TIMEOUT) -> Cost:
    """Our whole nft table written again: `delete table` and the table
    built from nothing, in one transaction; the table must exist, as it
    does after one of our cycles. Its lines count as iptables lines."""
    start = time.perf_counter()
    payload = f"delete table {nft_plan.FAMILY} {nft_plan.TABLE}\n" + nft_plan.diff(desired, ABSENT).payload
    rendered = time.perf_counter()
    kernel.run("nft -f (full)", nft_kernel.NFT, nft_kernel.APPLY_ARGS, netns=netns, stdin=payload,
               timeout=timeout)
    done = time.perf_counter()
    return Cost(rendered - start, done - rendered, _count(payload), 0,
                (("nft -f (full)", done - rendered),))
