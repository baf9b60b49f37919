"""lib.plan_view: the readable diff and the JSON document of a plan, for
kernel states built here (tests/unit/fake_kernel.py applies the plans)."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from lib.ipsets import parse_save
from lib.iptables_save import parse, saved_rule
from lib.plan import KernelState, cleanup, diff
from lib.plan_view import document, render_diff, saved_view
from lib.ruleset import HASH_IP_PORT, HASH_NET, Chain, DesiredState, IpSet, Rule
from lib.terminal import printable, wants_color
from tests.unit.fake_kernel import FakeKernel, state_of
from tests.unit.fixtures.save.our_rules import DESIRED, N4, POD

FIXTURES = Path(__file__).parent / "fixtures" / "save"


def applied(state: KernelState, plan) -> KernelState:
    kernel = FakeKernel(state)
    kernel.apply(plan)
    return kernel.state


def with_chain(state: KernelState, family: int, name: str, rules) -> KernelState:
    table = state.tables[family]
    chains = {**table.chains, name: tuple(rules)}
    return dataclasses.replace(state, tables={**state.tables,
                                              family: dataclasses.replace(table, chains=chains)})


def with_sets(state: KernelState, *sets: IpSet) -> KernelState:
    return dataclasses.replace(state, sets={**state.sets, **{s.name: s for s in sets}})


def view(desired: DesiredState, current: KernelState, **kw) -> tuple[str, dict]:
    plan = diff(desired, current)
    return render_diff(plan, desired, current, **kw), document(plan, desired, current)


def block_of(text: str, header_start: str) -> list[str]:
    """The lines of the block whose header starts with `header_start`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith("  ")), len(lines))
    return lines[start:end]


POD_RULES = DESIRED.v4.chain_map()[POD].rules


# --- the readable diff -----------------------------------------------------------

def test_in_sync_says_so_and_the_document_is_empty():
    text, doc = view(DESIRED, state_of(DESIRED))
    assert text == "in sync: nothing to change\n"
    assert doc["in_sync"] is True and doc["changes"] == 0 and doc["drift"] == 0
    assert doc["chains"] == doc["hooks"] == doc["sets"] == []


def test_first_install_shows_every_rule_hook_and_member_as_added():
    text, _ = view(DESIRED, KernelState())
    assert not any(line.lstrip().startswith("- ") for line in text.splitlines())
    assert block_of(text, f"+ chain {POD} (IPv4)") == [
        f"+ chain {POD} (IPv4): 5 rules",
        f"    + -m set --match-set {N4} src -p tcp --dport 80:90 -j RETURN   "
        "# default/allow-client_ingress[0]_ports[0]",
        f"    + -m set --match-set {N4} src -p sctp --dport 7777 -j RETURN   "
        "# default/allow-client_ingress[0]_ports[1]",
        "    + -p udp --dport 53 -j RETURN   # default/_dns__it_s",
        "    + -p tcp -j REJECT --reject-with tcp-reset   # default/web",
        "    + -j REJECT --reject-with icmp-port-unreachable   # default/web",
    ]
    assert block_of(text, "~ hook FORWARD (IPv4)") == [
        "~ hook FORWARD (IPv4): insert KPM-FORWARD at 1", "    + [1] -j KPM-FORWARD   # hook"]
    assert block_of(text, f"+ set {N4}") == [
        f"+ set {N4} hash:net (IPv4): +2 members", "    + 10.244.1.7", "    + 10.244.2.0/24"]
    assert text.splitlines()[-1] == \
        "15 changes pending: 3 sets created, 8 chains added, 4 hook changes"
    assert "DRIFT" not in text


def test_a_policy_edit_shows_the_new_rule_between_unchanged_ones_without_drift():
    allow = Rule(("-p", "tcp", "--dport", "443", "-j", "RETURN"), "default/new ingress[0]")
    edited = Chain(POD, POD_RULES[:-2] + (allow,) + POD_RULES[-2:])
    desired = dataclasses.replace(DESIRED, v4=dataclasses.replace(
        DESIRED.v4, chains=tuple(edited if c.name == POD else c for c in DESIRED.v4.chains)))
    text, doc = view(desired, state_of(DESIRED))
    assert block_of(text, "~ chain") == [
        f"~ chain {POD} (IPv4): rewrite 6 rules",
        "      ... 1 unchanged rule",
        f"      -m set --match-set {N4} src -p sctp --dport 7777 -j RETURN   "
        "# default/allow-client_ingress[0]_ports[1]",
        "      -p udp --dport 53 -j RETURN   # default/_dns__it_s",
        "    + -p tcp --dport 443 -j RETURN   # default/new_ingress[0]",
        "      -p tcp -j REJECT --reject-with tcp-reset   # default/web",
        "      -j REJECT --reject-with icmp-port-unreachable   # default/web",
    ]
    assert "DRIFT" not in text and doc["drift"] == 0
    chain = doc["chains"][0]
    assert chain["kind"] == "chain-rewrite" and chain["drift"] is False
    assert [r["hash"] for r in chain["after"]] == [r.hash for r in edited.rules]
    assert [r["hash"] for r in chain["before"]] == [r.hash for r in POD_RULES]


def test_a_rule_deleted_by_hand_is_named_drift_in_both_outputs():
    saved = state_of(DESIRED).tables[4].chains[POD]
    current = with_chain(state_of(DESIRED), 4, POD, saved[:-1])
    text, doc = view(DESIRED, current)
    header = block_of(text, "~ chain")[0]
    assert header == f"~ chain {POD} (IPv4): rewrite 5 rules  DRIFT: lost its final rules"
    assert block_of(text, "~ chain")[-1] == \
        "    + -j REJECT --reject-with icmp-port-unreachable   # default/web"
    assert "1 of them drift" in text.splitlines()[-1]
    assert doc["drift"] == 1
    assert doc["chains"][0]["drift"] is True
    assert doc["chains"][0]["drift_reason"] == "lost its final rules"
    assert doc["chains"][0]["name"] == POD


def test_a_foreign_rule_in_our_chain_shows_as_removed_drift():
    saved = state_of(DESIRED).tables[4].chains[POD]
    odd = saved_rule(POD, ("-s", "10.0.0.9/32", "-m", "comment", "--comment", "admin \x1b[2J",
                           "-j", "ACCEPT"))
    current = with_chain(state_of(DESIRED), 4, POD, saved[:1] + (odd,) + saved[1:])
    text, doc = view(DESIRED, current)
    lines = block_of(text, "~ chain")
    assert lines[0].endswith("DRIFT: 1 untagged rule")
    assert "    - -s 10.0.0.9/32 -j ACCEPT   # admin \\x1b[2J" in lines
    assert "\x1b" not in text
    assert doc["chains"][0]["before"][1] == {"hash": None, "comment": "admin \x1b[2J",
                                             "args": ["-s", "10.0.0.9/32", "-j", "ACCEPT"]}


def test_a_chain_emptied_by_hand_shows_every_rule_coming_back():
    current = with_chain(state_of(DESIRED), 4, POD, ())
    text, doc = view(DESIRED, current)
    lines = block_of(text, "~ chain")
    assert lines[0].endswith("DRIFT: emptied")
    assert [line[:6] for line in lines[1:]] == ["    + "] * 5
    assert doc["chains"][0]["before"] == []


@pytest.mark.parametrize("backend", ("nft", "legacy"))
def test_a_moved_hook_shows_where_it_was_and_where_it_goes(backend):
    current = KernelState(
        tables={f: parse((FIXTURES / f"{backend}-v{f}.save").read_text(), f) for f in (4, 6)},
        sets=parse_save((FIXTURES / "ipset.save").read_text()))
    text, doc = view(DESIRED, current)
    assert block_of(text, "~ hook FORWARD (IPv4)") == [
        "~ hook FORWARD (IPv4): remove 1, insert KPM-FORWARD at 1  DRIFT: moved to 2",
        "    - [2] -j KPM-FORWARD   # hook",
        "    + [1] -j KPM-FORWARD   # hook",
    ]
    hook = doc["hooks"][0]
    assert hook["name"] == "FORWARD" and hook["drift_reason"] == "moved to 2"
    assert [(r["position"], r["args"]) for r in hook["before"]] == [(2, ["-j", "KPM-FORWARD"])]
    assert [(r["position"], r["args"]) for r in hook["after"]] == [(1, ["-j", "KPM-FORWARD"])]


def test_a_stale_chain_is_shown_removed_with_its_rules():
    gone = tuple(saved_rule("KPM-I-gone", r.restore_args()) for r in POD_RULES[-2:])
    current = with_chain(state_of(DESIRED), 4, "KPM-I-gone", gone)
    text, doc = view(DESIRED, current)
    assert block_of(text, "- chain") == [
        "- chain KPM-I-gone (IPv4): 2 rules",
        "    - -p tcp -j REJECT --reject-with tcp-reset   # default/web",
        "    - -j REJECT --reject-with icmp-port-unreachable   # default/web",
    ]
    assert doc["chains"][0]["kind"] == "chain-delete" and doc["chains"][0]["after"] == []


def test_set_members_added_and_removed_and_a_stale_set():
    have = DESIRED.set_map()[N4]
    current = with_sets(state_of(DESIRED),
                        dataclasses.replace(have, members=frozenset({"10.244.1.7", "10.9.0.0/16"})),
                        IpSet("KPM-N4-stale", HASH_NET, 4, frozenset({"10.0.0.1"})))
    text, doc = view(DESIRED, current)
    assert block_of(text, "~ set") == [
        f"~ set {N4} hash:net (IPv4): +1 -1 members", "    + 10.244.2.0/24", "    - 10.9.0.0/16"]
    assert block_of(text, "- set") == [
        "- set KPM-N4-stale hash:net (IPv4): 1 members", "    - 10.0.0.1"]
    assert "DRIFT" not in text          # members come and go with pods
    assert doc["sets"] == [
        {"kind": "set-members", "family": 4, "name": N4, "detail": "+1 -1 members",
         "drift": False, "drift_reason": None, "type": HASH_NET,
         "members_added": ["10.244.2.0/24"], "members_removed": ["10.9.0.0/16"]},
        {"kind": "set-destroy", "family": 4, "name": "KPM-N4-stale", "detail": "1 members",
         "drift": False, "drift_reason": None, "type": HASH_NET,
         "members_added": [], "members_removed": ["10.0.0.1"]},
    ]


def test_long_member_lists_are_cut_in_the_diff_but_not_in_the_document():
    big = IpSet("KPM-N4-big", HASH_NET, 4, frozenset(f"10.0.{i // 250}.{i % 250}" for i in range(120)))
    desired = dataclasses.replace(DESIRED, sets=DESIRED.sets + (big,))
    text, doc = view(desired, state_of(DESIRED), max_members=10)
    lines = block_of(text, "+ set KPM-N4-big")
    assert len(lines) == 1 + 10 + 1
    assert lines[-1] == "      ... 110 more to add (--output json lists them all)"
    assert len(doc["sets"][0]["members_added"]) == 120


def test_a_set_of_the_wrong_type_is_recreated_as_drift():
    odd = IpSet(N4, HASH_IP_PORT, 6, frozenset({"fd00::1,tcp:80"}))
    text, doc = view(DESIRED, with_sets(state_of(DESIRED), odd))
    assert block_of(text, "+ set")[0] == (
        f"+ set {N4} hash:net (IPv4): recreate (was hash:ip,port family inet6), +2 members  "
        "DRIFT: the set exists with another type or family")
    assert doc["sets"][0]["was"] == "hash:ip,port family inet6"
    assert doc["sets"][0]["drift"] is True


def test_cleanup_shows_everything_removed():
    current = state_of(DESIRED)
    plan = cleanup(current)
    text = render_diff(plan, DesiredState(), current)
    assert block_of(text, "~ hook FORWARD (IPv4)") == [
        "~ hook FORWARD (IPv4): remove 1", "    - [1] -j KPM-FORWARD   # hook"]
    assert not any(line.lstrip().startswith("+ ") for line in text.splitlines())
    assert f"- chain {POD} (IPv4): 5 rules" in text
    assert f"- set {N4} hash:net (IPv4): 2 members" in text


def test_the_document_carries_the_exact_payloads_and_is_json():
    plan = diff(DESIRED, KernelState())
    doc = json.loads(json.dumps(document(plan, DESIRED, KernelState())))
    assert doc["payloads"] == {
        "ipset_prepare": plan.ipset_prepare,
        "iptables": {"4": plan.iptables[4], "6": plan.iptables[6]},
        "iptables_cleanup": {"4": "", "6": ""},
        "ipset_cleanup": "",
    }
    assert doc["changes"] == len(plan.changes) == 15
    assert {c["kind"] for c in doc["chains"]} == {"chain-add"}
    assert sorted((c["family"], c["name"]) for c in doc["chains"]) == sorted(
        (f, c.name) for f in (4, 6) for c in DESIRED.family(f).chains)
    # the payloads applied as they stand reach the desired state
    assert diff(DESIRED, applied(KernelState(), plan)).empty


def test_saved_rules_lose_only_their_first_comment_match():
    rule = saved_rule("X", ("-m", "comment", "--comment", "kpm:0123456789ab web x", "-p", "tcp",
                            "-m", "comment", "--comment", "second", "-j", "RETURN"))
    assert saved_view(rule) == {"hash": "0123456789ab", "comment": "web x",
                                "args": ["-p", "tcp", "-m", "comment", "--comment", "second",
                                         "-j", "RETURN"]}


# --- colour ------------------------------------------------------------------------

def test_colour_marks_added_removed_and_drift_lines():
    saved = state_of(DESIRED).tables[4].chains[POD]
    current = with_chain(state_of(DESIRED), 4, POD, saved[:-1])
    text, _ = view(DESIRED, current, color=True)
    assert "\x1b[1;33mDRIFT: lost its final rules\x1b[0m" in text
    assert "\x1b[32m    + -j REJECT --reject-with icmp-port-unreachable   # default/web\x1b[0m" in text
    plain, _ = view(DESIRED, current)
    assert "\x1b" not in plain


def test_colour_only_on_a_terminal_and_never_with_no_color():
    main, other = os.openpty()
    try:
        with os.fdopen(other, "w", closefd=False) as tty:
            assert wants_color(tty, {"TERM": "xterm"})
            assert not wants_color(tty, {"TERM": "xterm", "NO_COLOR": "1"})
            assert not wants_color(tty, {"TERM": "dumb"})
            assert wants_color(tty, {"NO_COLOR": ""})     # empty means unset (no-color.org)
    finally:
        os.close(main)
        os.close(other)
    read, write = os.pipe()
    try:
        with os.fdopen(write, "w", closefd=False) as pipe:
            assert not wants_color(pipe, {})
    finally:
        os.close(read)
        os.close(write)


def test_printable_escapes_control_characters_only():
    assert printable("x/web ingress[0] é") == "x/web ingress[0] é"
    assert printable("a\x1b[2Jb\nc\u202ed") == "a\\x1b[2Jb\\x0ac\\u202ed"
