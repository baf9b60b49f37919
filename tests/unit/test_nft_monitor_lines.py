"""Which lines of `nft monitor` leave our listing as it was: the lines
below are nft 1.0.6's, as it printed them for changes to our table, to
another nft table and to iptables-nft's."""
from __future__ import annotations

import pytest

from lib.nft_monitor import foreign, marks_change

OURS = [
    "add table inet kube-policy-manager",
    "add chain inet kube-policy-manager c1",
    "add set inet kube-policy-manager s1 { type ipv4_addr; } ",
    "add element inet kube-policy-manager s1 { 10.0.0.1 }",
    'add rule inet kube-policy-manager c1 ip saddr @s1 return comment "kpm:abc x"',
    "delete rule inet kube-policy-manager c1 handle 3",
    "delete element inet kube-policy-manager s1 { 10.0.0.1 }",
    "delete set inet kube-policy-manager s1",
    "delete chain inet kube-policy-manager c1",
    "delete table inet kube-policy-manager",
]
OTHERS = [
    "add table ip other",
    "add chain ip other c",
    "add rule ip other c accept",
    "add chain ip filter INPUT { type filter hook input priority filter; policy accept; }",
    "add rule ip filter INPUT ip saddr 1.2.3.4 counter packets 0 bytes 0 accept",
    "delete rule ip filter INPUT handle 2",
    "delete table ip filter",
    "add element inet kube-policy-manager2 s { 10.0.0.1 }",      # only a prefix of our name
    'add ct helper ip other ftp { type "ftp" protocol tcp; }',
]
NOT_UNDERSTOOD = [
    "W: Received event for an unknown set.",
    "# new generation 6 by process 7107 (nft)",
    "add",
    "add table inet",
    "frobnicate table ip other",
    "add widget ip other x",
]


@pytest.mark.parametrize("line", OTHERS)
def test_a_change_to_another_table_is_foreign(line):
    assert foreign(line)


@pytest.mark.parametrize("line", OURS + NOT_UNDERSTOOD)
def test_a_change_to_ours_or_a_line_not_understood_is_not(line):
    assert not foreign(line)


def _changes(lines: list[str]) -> list[bool]:
    out, events = [], 0
    for line in lines:
        changed, events = marks_change(line, events)
        out.append(changed)
    return out


def test_a_batch_of_another_tables_changes_marks_nothing():
    batch = ["add table ip filter", "add rule ip filter INPUT accept",
             "# new generation 3 by process 7104 (iptables)"]
    assert _changes(batch) == [False, False, False]


def test_a_batch_with_no_line_shown_counts_as_a_change():
    # a transaction whose events nft could not print still closes its batch
    assert _changes(["add table ip filter", "# new generation 3 by process 1 (iptables)",
                     "# new generation 4 by process 2 (nft)"]) == [False, False, True]


def test_one_line_of_ours_in_a_batch_is_a_change():
    assert _changes(["add table ip other", "delete table inet kube-policy-manager",
                     "# new generation 7 by process 7108 (nft)"]) == [False, True, False]
