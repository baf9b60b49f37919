"""Diff the desired filter state against the kernel's, and render the
restore payloads that turn one into the other, in hitless order.

(Types are fixed here; the functions are filled in by the plan work.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from lib.ruleset import IpSet


@dataclass(frozen=True)
class SavedRule:
    """One rule as `iptables-save` printed it."""
    chain: str
    spec: tuple[str, ...]          # tokens after "-A CHAIN", unquoted, as saved
    hash: Optional[str] = None     # our tag from a "kpm:<hash> ..." comment, if any
    target: Optional[str] = None   # the -j / -g target, if any


@dataclass(frozen=True)
class TableState:
    """The filter table of one family, as read back from the kernel."""
    family: int
    chains: dict = field(default_factory=dict)   # name -> tuple[SavedRule, ...], every chain
    policies: dict = field(default_factory=dict) # built-in chain name -> policy ("ACCEPT", ...)


@dataclass(frozen=True)
class KernelState:
    tables: dict = field(default_factory=dict)   # family (4, 6) -> TableState
    sets: dict = field(default_factory=dict)     # name -> IpSet, owned (KPM-) sets only


@dataclass(frozen=True)
class Change:
    """One line of the plan summary, for logs and --dry-run."""
    kind: str       # "chain-add", "chain-rewrite", "chain-delete", "hook", "set-create",
                    # "set-members", "set-destroy"
    family: int     # 4 or 6
    name: str
    detail: str = ""
    drift: bool = False   # True when the kernel lost something we had written


@dataclass(frozen=True)
class Plan:
    ipset_prepare: str = ""                 # ipset restore input: create, add
    iptables: dict = field(default_factory=dict)          # family -> iptables-restore input
    iptables_cleanup: dict = field(default_factory=dict)  # family -> iptables-restore input
    ipset_cleanup: str = ""                 # ipset restore input: del, destroy
    changes: tuple[Change, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.ipset_prepare or self.ipset_cleanup
                    or any(self.iptables.values()) or any(self.iptables_cleanup.values()))
