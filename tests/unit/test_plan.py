"""diff / cleanup / render, checked by applying plans to a fake kernel with
the real tools' semantics (tests/unit/fake_kernel.py)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from lib.ipsets import parse_save
from lib.iptables_save import parse, saved_rule
from lib.plan import Change, KernelState, Plan, SavedRule, TableState, cleanup, diff, render
from lib.ruleset import (
    HASH_IP_PORT, HASH_NET, PREFIX, Chain, DesiredState, FamilyState, Hook, IpSet, Rule,
)
from tests.unit.fake_kernel import BUILTINS, FakeKernel, RestoreError, restore_argv, state_of
from tests.unit.fixtures.save.our_rules import DESIRED, N4, POD, POD_E

FIXTURES = Path(__file__).parent / "fixtures" / "save"
CT = ("-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "RETURN")


# --- views of a kernel state --------------------------------------------------

def _owned(name):
    return bool(name) and name.startswith(PREFIX)


def _ours(rule: SavedRule) -> bool:
    return rule.hash is not None or _owned(rule.target)


def owned_view(state: KernelState) -> dict:
    """Everything we own, in a form a DesiredState maps to exactly."""
    view = {}
    for family, table in state.tables.items():
        chains = {n: tuple((r.hash, r.spec) for r in rules)
                  for n, rules in table.chains.items() if _owned(n)}
        hooks = {n: tuple((i, r.hash, r.spec) for i, r in enumerate(rules) if _ours(r))
                 for n, rules in table.chains.items() if n in BUILTINS}
        view[family] = (chains, {n: h for n, h in hooks.items() if h})
    return {"tables": view, "sets": {n: (s.kind, s.family, s.members) for n, s in state.sets.items()}}


def desired_view(desired: DesiredState) -> dict:
    view = {}
    for family in (4, 6):
        fs = desired.family(family)
        chains = {c.name: tuple((r.hash, r.restore_args()) for r in c.rules) for c in fs.chains}
        hooks: dict = {}
        for h in fs.hooks:
            hooks.setdefault(h.builtin, []).append((h.rule.hash, h.rule.restore_args()))
        view[family] = (chains, {b: tuple((i,) + x for i, x in enumerate(hs)) for b, hs in hooks.items()})
    return {"tables": view, "sets": {s.name: (s.kind, s.family, s.members) for s in desired.sets}}


def foreign_part(state: KernelState) -> dict:
    """Every chain not ours with every rule not ours, and the policies."""
    out = {}
    for family, table in state.tables.items():
        chains = {n: tuple(r for r in rules if not (n in BUILTINS and _ours(r)))
                  for n, rules in table.chains.items() if not _owned(n)}
        out[family] = (chains, dict(table.policies))
    return out


def check_payload_lines(plan: Plan) -> None:
    """Only our chains are declared, appended to, flushed or deleted; built-in
    chains only get rules inserted or deleted."""
    for payload in list(plan.iptables.values()) + list(plan.iptables_cleanup.values()):
        for line in payload.split("\n"):
            if line in ("*filter", "COMMIT", ""):
                continue
            argv = restore_argv(line)
            if line.startswith(":"):
                assert _owned(argv[0][1:]) and argv[1:] == ["-", "[0:0]"], line
            elif argv[0] in ("-A", "-F", "-X"):
                assert _owned(argv[1]), line
            else:
                assert argv[0] in ("-I", "-D") and argv[1] in BUILTINS, line


def applied(state: KernelState, plan: Plan) -> KernelState:
    kernel = FakeKernel(state)
    kernel.apply(plan)
    return kernel.state


# --- random states ----------------------------------------------------------------

LEAVES = ("KPM-E-a", "KPM-E-b", "KPM-I-a", "KPM-I-b", "KPM-I-c")
TOPS = {"FORWARD": "KPM-FORWARD", "INPUT": "KPM-INPUT"}
SET_POOL = {"KPM-N4-a": (HASH_NET, 4), "KPM-N4-b": (HASH_NET, 4), "KPM-N6-a": (HASH_NET, 6),
            "KPM-P4-a": (HASH_IP_PORT, 4), "KPM-P6-a": (HASH_IP_PORT, 6)}
MEMBERS = {
    (HASH_NET, 4): ("10.0.0.1", "10.0.0.2", "10.1.0.0/16", "192.168.0.0/24", "0.0.0.0/1"),
    (HASH_NET, 6): ("fd00::1", "fd00::2", "fd00:1::/64", "::/1"),
    (HASH_IP_PORT, 4): ("10.0.0.1,tcp:80", "10.0.0.1,udp:53", "10.0.0.2,sctp:9"),
    (HASH_IP_PORT, 6): ("fd00::1,tcp:80", "fd00::2,udp:53"),
}
FOREIGN_CHAINS = ("DOCKER-USER", "KUBE-FORWARD", "KUBE-SERVICES")

texts = st.text(st.characters(blacklist_characters="\n\r\x00", blacklist_categories=("Cs",)),
                max_size=6)


def rules(sets: list[str]):
    args = [
        st.tuples(st.sampled_from(["tcp", "udp", "sctp"]), st.sampled_from(["80", "53", "80:90"]))
          .map(lambda t: ("-p", t[0], "--dport", t[1], "-j", "RETURN")),
        texts.map(lambda t: ("-m", "comment", "--comment", t, "-j", "RETURN")),
        st.just(("-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset")),
    ]
    if sets:
        args.append(st.sampled_from(sets).map(
            lambda s: ("-m", "set", "--match-set", s, "dst,dst" if "-P" in s else "src", "-j", "RETURN")))
    return st.builds(Rule, st.one_of(args), texts)


@st.composite
def desired_states(draw):
    """Shaped like compile's output: pod chains end in REJECT, top chains
    start with the conntrack rule and are hooked, no rule twice in a chain."""
    names = draw(st.lists(st.sampled_from(sorted(SET_POOL)), unique=True))
    sets = tuple(IpSet(n, *SET_POOL[n], frozenset(draw(st.lists(st.sampled_from(MEMBERS[SET_POOL[n]]),
                                                                  unique=True))))
                 for n in sorted(names))
    families = {}
    for family in (4, 6):
        own_sets = [s.name for s in sets if s.family == family]
        leaves = draw(st.lists(st.sampled_from(LEAVES), unique=True))
        chains = []
        for name in leaves:
            body = draw(st.lists(rules(own_sets), max_size=4, unique_by=lambda r: r.hash))
            final = Rule(("-j", "REJECT"), name)
            chains.append(Chain(name, tuple(r for r in body if r != final) + (final,)))
        hooks = []
        for builtin, top in TOPS.items():
            if draw(st.booleans()):
                jumps = draw(st.lists(st.sampled_from(leaves), unique=True)) if leaves else []
                chains.append(Chain(top, (Rule(CT, "established"),) + tuple(
                    Rule(("-s", f"10.0.0.{i}", "-j", leaf), leaf) for i, leaf in enumerate(jumps))))
                hooks.append(Hook(builtin, Rule(("-j", top), draw(st.sampled_from(["hook", "hook v2"])))))
        families[family] = FamilyState(family, tuple(sorted(chains, key=lambda c: c.name)), tuple(hooks))
    return DesiredState(v4=families[4], v6=families[6], sets=sets)


def foreign_rule(chain: str, targets: list[str]):
    specs = [
        st.integers(1, 254).map(lambda i: ("-s", f"172.16.0.{i}", "-j", "ACCEPT")),
        st.just(("-p", "tcp", "-m", "tcp", "--dport", "22", "-j", "ACCEPT")),
        texts.filter(lambda t: not t.startswith("kpm:"))
             .map(lambda t: ("-m", "comment", "--comment", t, "-j", "DROP")),
    ]
    if targets:
        specs.append(st.sampled_from(targets).map(lambda t: ("-j", t)))
    return st.one_of(specs).map(lambda spec: saved_rule(chain, spec))


@st.composite
def foreign_states(draw):
    tables = {}
    for family in (4, 6):
        names = draw(st.lists(st.sampled_from(FOREIGN_CHAINS), unique=True))
        chains = {}
        for i, name in enumerate(names):
            chains[name] = tuple(draw(st.lists(foreign_rule(name, names[i + 1:]), max_size=3)))
        for b in BUILTINS:
            chains[b] = tuple(draw(st.lists(foreign_rule(b, names), max_size=3)))
        policies = {b: draw(st.sampled_from(["ACCEPT", "DROP"])) for b in BUILTINS}
        tables[family] = TableState(family, chains, policies)
    return KernelState(tables=tables)


def _mutate(draw, chains: dict, sets: dict) -> None:
    """One change made behind our back, of a kind the kernel allows."""
    owned = sorted(n for n in chains if _owned(n))
    hooked = sorted(b for b in BUILTINS if any(_ours(r) for r in chains[b]))
    kind = draw(st.sampled_from([
        "untagged", "drop-rule", "dup-rule", "move-hook", "drop-hook", "dup-hook", "untagged-jump",
        "stale-chain", "stale-set", "mismatched-set", "member", "flush-set", "foreign-first"]))
    if kind in ("untagged", "drop-rule", "dup-rule", "untagged-jump") and owned:
        name = draw(st.sampled_from(owned))
        rules_ = list(chains[name])
        if kind == "untagged":
            rules_.insert(draw(st.integers(0, len(rules_))), saved_rule(name, ("-s", "10.9.9.9", "-j", "ACCEPT")))
        elif kind == "drop-rule" and rules_:
            del rules_[draw(st.integers(0, len(rules_) - 1))]
        elif kind == "dup-rule" and rules_:
            rules_.insert(draw(st.integers(0, len(rules_))), draw(st.sampled_from(rules_)))
        elif kind == "untagged-jump":
            b = draw(st.sampled_from(BUILTINS))
            pos = draw(st.integers(0, len(chains[b])))
            chains[b] = chains[b][:pos] + (saved_rule(b, ("-j", name)),) + chains[b][pos:]
        chains[name] = tuple(rules_)
    elif kind in ("move-hook", "drop-hook", "dup-hook") and hooked:
        b = draw(st.sampled_from(hooked))
        rules_ = list(chains[b])
        i = draw(st.sampled_from([i for i, r in enumerate(rules_) if _ours(r)]))
        hook = rules_[i] if kind == "dup-hook" else rules_.pop(i)
        if kind != "drop-hook":
            rules_.insert(draw(st.integers(0, len(rules_))), hook)
        chains[b] = tuple(rules_)
    elif kind == "stale-chain":
        name = "KPM-I-old" + str(draw(st.integers(0, 2)))
        chains[name] = tuple(draw(st.lists(st.one_of(
            st.builds(Rule, st.just(("-j", "REJECT")), texts).map(lambda r: saved_rule(name, r.restore_args())),
            st.just(saved_rule(name, ("-j", "ACCEPT")))), max_size=3)))
    elif kind == "stale-set":
        sets["KPM-N4-old"] = IpSet("KPM-N4-old", HASH_NET, 4, frozenset({"10.7.0.0/16"}))
    elif kind == "mismatched-set":
        free = sorted(set(SET_POOL) - set(sets))
        if free:
            name = draw(st.sampled_from(free))
            k, f = SET_POOL[name]
            wrong = draw(st.sampled_from([(HASH_IP_PORT if k == HASH_NET else HASH_NET, f), (k, 10 - f)]))
            members = frozenset(draw(st.lists(st.sampled_from(MEMBERS[wrong]), max_size=2)))
            sets[name] = IpSet(name, wrong[0], wrong[1], members)
    elif kind in ("member", "flush-set") and sets:
        name = draw(st.sampled_from(sorted(sets)))
        s = sets[name]
        if kind == "flush-set":
            members = frozenset()
        else:
            members = s.members ^ {draw(st.sampled_from(MEMBERS[(s.kind, s.family)]))}
        sets[name] = dataclasses.replace(s, members=members)
    elif kind == "foreign-first":
        b = draw(st.sampled_from(BUILTINS))
        chains[b] = (saved_rule(b, ("-s", "10.8.8.8", "-j", "ACCEPT")),) + chains[b]


@st.composite
def current_states(draw):
    """The kernel after an earlier desired state, foreign rules, and
    changes made behind our back."""
    k = state_of(draw(desired_states()), draw(foreign_states()))
    tables = {f: dict(t.chains) for f, t in k.tables.items()}
    sets = dict(k.sets)
    for _ in range(draw(st.integers(0, 4))):
        _mutate(draw, tables[draw(st.sampled_from((4, 6)))], sets)
    return KernelState(
        tables={f: TableState(f, tables[f], dict(k.tables[f].policies)) for f in (4, 6)},
        sets=sets)


# --- properties --------------------------------------------------------------------

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(desired_states(), current_states())
def test_a_plan_brings_any_kernel_to_the_desired_state(desired, current):
    plan = diff(desired, current)
    check_payload_lines(plan)
    after = applied(current, plan)
    assert owned_view(after) == desired_view(desired)
    assert foreign_part(after) == foreign_part(current)
    again = diff(desired, after)
    assert again.empty and again.changes == ()


@settings(deadline=None)
@given(desired_states(), foreign_states())
def test_a_kernel_in_the_desired_state_needs_no_plan(desired, foreign):
    plan = diff(desired, state_of(desired, foreign))
    assert plan.empty and plan.changes == ()
    assert plan.iptables == {4: "", 6: ""} and plan.iptables_cleanup == {4: "", 6: ""}


@settings(deadline=None)
@given(desired_states(), desired_states(), foreign_states())
def test_moving_between_desired_states_is_not_drift(before, desired, foreign):
    current = state_of(before, foreign)
    plan = diff(desired, current)
    assert [c for c in plan.changes if c.drift] == []
    assert diff(desired, applied(current, plan)).empty


@settings(deadline=None)
@given(current_states())
def test_cleanup_leaves_exactly_the_foreign_part(current):
    after = applied(current, cleanup(current))
    for family, (chains, policies) in foreign_part(current).items():
        assert after.tables[family].chains == chains
        assert after.tables[family].policies == policies
    assert after.sets == {}
    assert cleanup(after).empty


# --- examples ------------------------------------------------------------------------

def fixture_state(backend: str = "nft") -> KernelState:
    tables = {f: parse((FIXTURES / f"{backend}-v{f}.save").read_text(), f) for f in (4, 6)}
    return KernelState(tables=tables, sets=parse_save((FIXTURES / "ipset.save").read_text()))


def test_nothing_desired_and_nothing_there_writes_nothing():
    plan = diff(DesiredState(), KernelState())
    assert plan.empty and plan.changes == ()
    assert render(plan) == ""


def test_first_install_payloads_are_ordered():
    plan = diff(DESIRED, KernelState())
    lines = plan.ipset_prepare.splitlines()
    verbs = [line.split()[0] for line in lines]
    assert verbs == ["create"] * 3 + ["add"] * 5
    assert lines[0] == f"create {N4} hash:net family inet maxelem 1048576"
    v4 = plan.iptables[4].splitlines()
    assert v4[0] == "*filter" and v4[-1] == "COMMIT"
    kinds = [line[0] if line.startswith(":") else line.split()[0] for line in v4[1:-1]]
    assert kinds == [":"] * 4 + ["-A"] * 13 + ["-I"] * 2     # every chain exists before a jump to it
    assert v4[-3] == '-I FORWARD 1 -m comment --comment "kpm:a48d50b411e7 hook" -j KPM-FORWARD'
    assert plan.iptables_cleanup == {4: "", 6: ""} and plan.ipset_cleanup == ""
    assert sorted((c.kind, c.family) for c in plan.changes if c.kind != "set-create") == \
        [("chain-add", 4)] * 4 + [("chain-add", 6)] * 4 + [("hook", 4)] * 2 + [("hook", 6)] * 2
    assert not any(c.drift for c in plan.changes)
    applied_state = applied(KernelState(), plan)
    assert diff(DESIRED, applied_state).empty


@pytest.mark.parametrize("backend", ("nft", "legacy"))
def test_a_hook_pushed_down_by_docker_is_moved_back_as_drift(backend):
    current = fixture_state(backend)
    plan = diff(DESIRED, current)
    assert plan.changes == (
        Change("hook", 4, "FORWARD", "remove 1, insert KPM-FORWARD at 1; moved to 2", drift=True),
        Change("hook", 6, "FORWARD", "remove 1, insert KPM-FORWARD at 1; moved to 2", drift=True),
    )
    assert plan.iptables[4] == (
        "*filter\n"
        '-D FORWARD -m comment --comment "kpm:a48d50b411e7 hook" -j KPM-FORWARD\n'
        '-I FORWARD 1 -m comment --comment "kpm:a48d50b411e7 hook" -j KPM-FORWARD\n'
        "COMMIT\n")
    after = applied(current, plan)
    forward = after.tables[4].chains["FORWARD"]
    assert [r.target for r in forward] == ["KPM-FORWARD", "DOCKER-USER", "KUBE-FORWARD",
                                           "DOCKER-ISOLATION-STAGE-1", "ACCEPT"]
    assert after.tables[4].policies["FORWARD"] == "DROP"
    assert diff(DESIRED, after).empty


def _with_chain(desired: DesiredState, family: int, chain: Chain) -> DesiredState:
    fs = desired.family(family)
    chains = tuple(chain if c.name == chain.name else c for c in fs.chains)
    fs = dataclasses.replace(fs, chains=chains)
    return dataclasses.replace(desired, **{f"v{family}": fs})


def _kernel_with(family: int, chain: str, rules) -> KernelState:
    k = state_of(DESIRED)
    table = k.tables[family]
    chains = dict(table.chains)
    chains[chain] = tuple(rules)
    return dataclasses.replace(k, tables={**k.tables, family: dataclasses.replace(table, chains=chains)})


def test_a_policy_edit_rewrites_only_its_chain_without_drift():
    pod = DESIRED.v4.chain_map()[POD]
    allow = Rule(("-p", "tcp", "--dport", "443", "-j", "RETURN"), "default/new ingress[0]")
    edited = Chain(POD, pod.rules[:-2] + (allow,) + pod.rules[-2:])
    plan = diff(_with_chain(DESIRED, 4, edited), state_of(DESIRED))
    assert plan.changes == (Change("chain-rewrite", 4, POD, "rewrite 6 rules"),)
    lines = plan.iptables[4].splitlines()
    assert lines[1] == f":{POD} - [0:0]"
    assert len(lines) == 2 + 1 + 6
    assert all(line.startswith(f"-A {POD} ") for line in lines[2:-1])
    assert plan.iptables[6] == "" and plan.ipset_prepare == ""


@pytest.mark.parametrize("mutate, why", [
    (lambda rs: rs[:1] + (saved_rule("x", ("-s", "10.0.0.9", "-j", "ACCEPT")),) + rs[1:], "1 untagged rule"),
    (lambda rs: (), "emptied"),
    (lambda rs: rs[:-1], "lost its final rules"),
    (lambda rs: rs[:2], "lost its final rules"),
    (lambda rs: rs + rs[-1:], "duplicated rules"),
])
def test_a_chain_changed_behind_our_back_is_drift(mutate, why):
    current = _kernel_with(4, POD, mutate(state_of(DESIRED).tables[4].chains[POD]))
    plan = diff(DESIRED, current)
    assert plan.changes == (Change("chain-rewrite", 4, POD, f"rewrite 5 rules; {why}", drift=True),)
    assert diff(DESIRED, applied(current, plan)).empty


def test_a_new_pod_jump_appended_to_the_top_chain_is_not_drift():
    top = DESIRED.v4.chain_map()["KPM-FORWARD"]
    grown = Chain(top.name, top.rules + (Rule(("-d", "10.244.1.6", "-j", POD), "default/web2 ingress"),))
    plan = diff(_with_chain(DESIRED, 4, grown), state_of(DESIRED))
    assert plan.changes == (Change("chain-rewrite", 4, "KPM-FORWARD", "rewrite 4 rules"),)


@pytest.mark.parametrize("mutate, detail", [
    (lambda rs: rs[1:], "insert KPM-INPUT at 1; missing"),
    (lambda rs: rs + rs[:1], "remove 2, insert KPM-INPUT at 1; 2 copies"),
    (lambda rs: (saved_rule("INPUT", ("-j", "ACCEPT")),) + rs, "remove 1, insert KPM-INPUT at 1; moved to 2"),
    (lambda rs: rs + (saved_rule("INPUT", ("-j", POD_E)),), "remove 2, insert KPM-INPUT at 1; untagged jump"),
])
def test_a_hook_changed_behind_our_back_is_drift(mutate, detail):
    base = state_of(DESIRED).tables[4].chains["INPUT"]
    current = _kernel_with(4, "INPUT", mutate(base))
    plan = diff(DESIRED, current)
    assert plan.changes == (Change("hook", 4, "INPUT", detail, drift=True),)
    after = applied(current, plan)
    assert after.tables[4].chains["INPUT"][0].hash == DESIRED.v4.hooks[1].rule.hash
    assert diff(DESIRED, after).empty


def test_a_new_hook_version_replaces_the_old_without_drift():
    hooks = tuple(Hook(h.builtin, Rule(h.rule.args, "hook v2")) for h in DESIRED.v4.hooks)
    desired = dataclasses.replace(DESIRED, v4=dataclasses.replace(DESIRED.v4, hooks=hooks))
    plan = diff(desired, state_of(DESIRED))
    assert plan.changes == (
        Change("hook", 4, "FORWARD", "remove 1, insert KPM-FORWARD at 1"),
        Change("hook", 4, "INPUT", "remove 1, insert KPM-INPUT at 1"),
    )


def test_our_rules_in_an_unhooked_builtin_chain_are_removed():
    old = saved_rule("OUTPUT", Rule(("-j", "KPM-INPUT"), "old").restore_args())
    k = _kernel_with(4, "OUTPUT", (old,))
    plan = diff(DESIRED, k)
    assert plan.changes == (Change("hook", 4, "OUTPUT", "remove 1"),)
    assert applied(k, plan).tables[4].chains["OUTPUT"] == ()


def _with_sets(state: KernelState, *sets: IpSet) -> KernelState:
    return dataclasses.replace(state, sets={**state.sets, **{s.name: s for s in sets}})


def test_set_members_are_added_first_and_deleted_last():
    have = DESIRED.set_map()[N4]
    current = _with_sets(state_of(DESIRED), dataclasses.replace(have, members=frozenset({"10.244.1.7", "10.9.0.0/16"})),
                         IpSet("KPM-N4-stale", HASH_NET, 4, frozenset({"10.0.0.1"})))
    plan = diff(DESIRED, current)
    assert plan.ipset_prepare == f"add {N4} 10.244.2.0/24\n"
    assert plan.ipset_cleanup == f"del {N4} 10.9.0.0/16\ndestroy KPM-N4-stale\n"
    assert plan.changes == (Change("set-members", 4, N4, "+1 -1 members"),
                            Change("set-destroy", 4, "KPM-N4-stale", "1 members"))
    assert all(not c.drift for c in plan.changes)
    assert diff(DESIRED, applied(current, plan)).empty


def test_a_set_of_ours_with_the_wrong_type_is_recreated_last_as_drift():
    new = IpSet("KPM-N4-new", HASH_NET, 4, frozenset({"10.1.0.0/16"}))
    odd = IpSet("KPM-N4-odd", HASH_NET, 4, frozenset({"10.2.0.0/16"}))
    desired = dataclasses.replace(DESIRED, sets=tuple(sorted(DESIRED.sets + (new, odd), key=lambda s: s.name)))
    current = _with_sets(state_of(DESIRED), IpSet("KPM-N4-odd", HASH_IP_PORT, 6, frozenset({"fd00::1,tcp:80"})))
    plan = diff(desired, current)
    assert plan.ipset_prepare.splitlines() == [
        "create KPM-N4-new hash:net family inet maxelem 1048576",
        "add KPM-N4-new 10.1.0.0/16",
        "destroy KPM-N4-odd",
        "create KPM-N4-odd hash:net family inet maxelem 1048576",
        "add KPM-N4-odd 10.2.0.0/16",
    ]
    assert Change("set-create", 4, "KPM-N4-odd",
                  "recreate (was hash:ip,port family inet6), +1 members", drift=True) in plan.changes
    assert diff(desired, applied(current, plan)).empty


def test_a_stale_chain_a_foreign_chain_jumps_to_is_kept_empty():
    k = state_of(DESIRED)
    table = k.tables[4]
    stale = saved_rule("KPM-I-gone", Rule(("-j", "REJECT"), "gone").restore_args())
    chains = {**table.chains, "KPM-I-gone": (stale,), "MY-CHAIN": (saved_rule("MY-CHAIN", ("-j", "KPM-I-gone")),)}
    current = dataclasses.replace(k, tables={**k.tables, 4: dataclasses.replace(table, chains=chains)})
    plan = diff(DESIRED, current)
    assert plan.iptables_cleanup[4] == "*filter\n-F KPM-I-gone\nCOMMIT\n"
    assert plan.changes == (Change("chain-delete", 4, "KPM-I-gone", "1 rules; kept empty, MY-CHAIN jumps to it"),)
    after = applied(current, plan)
    assert after.tables[4].chains["KPM-I-gone"] == ()
    assert diff(DESIRED, after).empty
    assert applied(after, cleanup(after)).tables[4].chains["MY-CHAIN"] == chains["MY-CHAIN"]


def test_stale_chains_are_flushed_then_deleted_after_the_main_transaction():
    desired = dataclasses.replace(DESIRED, v6=FamilyState(6))
    plan = diff(desired, state_of(DESIRED))
    assert plan.iptables[6] == (
        "*filter\n"
        '-D FORWARD -m comment --comment "kpm:a48d50b411e7 hook" -j KPM-FORWARD\n'
        '-D INPUT -m comment --comment "kpm:fb0ce059a552 hook" -j KPM-INPUT\n'
        "COMMIT\n")
    names = sorted(c.name for c in DESIRED.v6.chains)
    assert plan.iptables_cleanup[6] == "*filter\n" + "".join(f"-F {n}\n" for n in names) + \
        "".join(f"-X {n}\n" for n in names) + "COMMIT\n"
    assert plan.iptables[4] == "" and plan.iptables_cleanup[4] == ""


@pytest.mark.parametrize("backend", ("nft", "legacy"))
def test_cleanup_of_a_real_save_removes_hooks_chains_and_sets(backend):
    current = fixture_state(backend)
    plan = cleanup(current)
    assert plan.ipset_prepare == ""
    assert plan.ipset_cleanup == "".join(f"destroy {s.name}\n" for s in DESIRED.sets)
    v4 = plan.iptables[4].splitlines()
    assert v4[1:3] == ['-D FORWARD -m comment --comment "kpm:a48d50b411e7 hook" -j KPM-FORWARD',
                       '-D INPUT -m comment --comment "kpm:fb0ce059a552 hook" -j KPM-INPUT']
    assert [line.split()[0] for line in v4[3:-1]] == ["-F"] * 4
    assert plan.iptables_cleanup[4].count("-X ") == 4
    after = applied(current, plan)
    for family in (4, 6):
        assert not any(_owned(n) for n in after.tables[family].chains)
        assert after.tables[family].policies["FORWARD"] == "DROP"
    assert foreign_part(after) == foreign_part(current)
    assert cleanup(after).empty


def test_cleanup_of_a_kernel_without_ours_is_empty():
    assert cleanup(KernelState()).empty
    assert cleanup(state_of(DesiredState(), fixture_state_foreign())).changes == ()


def fixture_state_foreign() -> KernelState:
    current = fixture_state()
    return applied(current, cleanup(current))


def test_a_fresh_namespace_without_tables_gets_everything():
    after = applied(KernelState(), diff(DESIRED, KernelState()))
    assert owned_view(after) == desired_view(DESIRED)


@pytest.mark.parametrize("desired, why", [
    (DesiredState(v4=FamilyState(4, (Chain("FORWARD"),))), "IPv4 chain 'FORWARD': name must start with KPM-"),
    (DesiredState(v4=FamilyState(4, (Chain("KPM-" + "x" * 30),))), "at most 28 characters"),
    (DesiredState(v6=FamilyState(6, (Chain("KPM-A", (Rule(("-j", "KPM-B")),)),))),
     r"IPv6 chain KPM-A: rules\[0\] jumps to KPM-B, which the desired state does not hold"),
    (DesiredState(v4=FamilyState(4, (), (Hook("FORWARD", Rule(("-j", "KPM-FORWARD"))),))),
     "IPv4 hook FORWARD: target KPM-FORWARD is not a chain of the desired state"),
    (DesiredState(v4=FamilyState(4, (Chain("KPM-A"),), (Hook("KPM-A", Rule(("-j", "KPM-A"))),))),
     "IPv4 hook KPM-A: must be a built-in chain"),
    (DesiredState(sets=(IpSet("other", HASH_NET, 4),)), "set 'other': name must start with KPM-"),
])
def test_a_desired_state_that_would_touch_foreign_names_is_refused(desired, why):
    with pytest.raises(ValueError, match=why):
        diff(desired, KernelState())


def test_render_shows_every_payload_under_its_command_in_apply_order():
    current = _with_sets(state_of(dataclasses.replace(DESIRED, v6=FamilyState(6))),
                         IpSet("KPM-N4-stale", HASH_NET, 4, frozenset({"10.0.0.1"})))
    desired = _with_chain(DESIRED, 4, Chain(POD, DESIRED.v4.chain_map()[POD].rules[1:]))
    plan = diff(desired, current)
    text = render(plan)
    headers = [line for line in text.splitlines() if line.startswith("# ")]
    assert headers == [
        "# iptables-restore --noflush: IPv4 chains and hooks",
        "# ip6tables-restore --noflush: IPv6 chains and hooks",
        "# ipset restore -exist: delete members, destroy sets",
    ]
    assert text == "".join(f"{h}\n{p}" for h, p in zip(headers, (plan.iptables[4], plan.iptables[6],
                                                                  plan.ipset_cleanup)))
    cleanup_text = render(cleanup(state_of(DESIRED)))
    assert [line for line in cleanup_text.splitlines() if line.startswith("# ")] == [
        "# iptables-restore --noflush: IPv4 chains and hooks",
        "# ip6tables-restore --noflush: IPv6 chains and hooks",
        "# iptables-restore --noflush: IPv4 stale chains",
        "# ip6tables-restore --noflush: IPv6 stale chains",
        "# ipset restore -exist: delete members, destroy sets",
    ]


# --- the fake itself behaves like the real tools ------------------------------------

def test_fake_drops_a_whole_block_when_one_line_fails():
    kernel = FakeKernel(state_of(DESIRED))
    before = kernel.state
    with pytest.raises(RestoreError, match="line 3 failed: No chain/target/match by that name: KPM-NOPE"):
        kernel.iptables_restore(4, "*filter\n:KPM-NEW - [0:0]\n-A KPM-NEW -j KPM-NOPE\nCOMMIT\n")
    assert kernel.state == before


@pytest.mark.parametrize("payload, why", [
    ("*filter\n-X KPM-INPUT\nCOMMIT\n", "Directory not empty"),
    (f"*filter\n-F {POD_E}\n-X {POD_E}\nCOMMIT\n", "is referenced"),
    ("*filter\n-D INPUT -j ACCEPT\nCOMMIT\n", "Bad rule"),
    ("*filter\n-X INPUT\nCOMMIT\n", "built-in"),
    ("*filter\n-A KPM-INPUT -m set --match-set KPM-N4-none src -j RETURN\nCOMMIT\n", "doesn't exist"),
    ("*filter\n-I KPM-INPUT 9 -j RETURN\nCOMMIT\n", "too big"),
    ("*filter\n-A KPM-INPUT -j ACCEPT\n", "COMMIT missing"),
])
def test_fake_refuses_what_iptables_refuses(payload, why):
    kernel = FakeKernel(state_of(DESIRED))
    with pytest.raises(RestoreError, match=why):
        kernel.iptables_restore(4, payload)


def test_fake_ipset_restore_is_not_atomic_and_honours_exist():
    kernel = FakeKernel(state_of(DESIRED))
    with pytest.raises(RestoreError, match="line 3 failed: Set cannot be destroyed: it is in use"):
        kernel.ipset_restore(f"add {N4} 10.5.0.0/16\nadd {N4} 10.244.1.7/32\ndestroy {N4}\nadd {N4} 10.6.0.0/16\n")
    assert kernel.state.sets[N4].members == DESIRED.set_map()[N4].members | {"10.5.0.0/16"}
    with pytest.raises(RestoreError, match="already added"):
        kernel.ipset_restore(f"add {N4} 10.5.0.0/16\n", exist=False)
    with pytest.raises(RestoreError, match="same name already exists"):
        kernel.ipset_restore(f"create {N4} hash:ip,port family inet maxelem 1048576\n")
    kernel.ipset_restore(f"create {N4} hash:net family inet maxelem 1048576\ndel {N4} 10.99.0.0/16\n")
