"""Plans applied by the real tools in a network namespace, read back with
*-save and parsed: the diff against the same desired state must then be
empty, and foreign rules must be exactly as they were. Both backends."""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess

import pytest

from lib.ipsets import parse_save
from lib.iptables_save import SaveParseError, parse
from lib.plan import KernelState, SavedRule, cleanup, diff, render
from lib.ruleset import PREFIX, Chain, DesiredState, IpSet, Rule, HASH_NET
from tests.unit.fixtures.save.our_rules import DESIRED, N4, P4, POD, POD_E

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces")

BUILTINS = ("INPUT", "FORWARD", "OUTPUT")
TIMEOUT = 30

FOREIGN_SETS = "create KUBE-CLUSTER-IP hash:ip,port family inet\nadd KUBE-CLUSTER-IP 10.96.0.10,udp:53\n"
FOREIGN = {
    4: """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER-USER - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
-A INPUT -p tcp --dport 22 -j ACCEPT
-A INPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A FORWARD -j DOCKER-USER
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A DOCKER-USER -j RETURN
-A KUBE-SERVICES -d 10.96.5.5/32 -p tcp -m comment --comment "default/my \\"svc\\" it's:http has no endpoints" -m tcp --dport 80 -j REJECT
-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
COMMIT
""",
    6: """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-FORWARD - [0:0]
-A INPUT -p tcp --dport 22 -j ACCEPT
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
COMMIT
""",
}
_HEADER = re.compile(r"^# (.*)$", re.M)
_IPTABLES_HEADER = re.compile(r"^(ip6?tables)-restore --noflush: IPv[46] ")


class Node:
    """One namespace seen through one iptables backend."""

    def __init__(self, netns: str, backend: str):
        self.netns, self.backend = netns, backend

    def run(self, *argv: str, stdin: str | None = None) -> str:
        done = subprocess.run(["ip", "netns", "exec", self.netns, *argv], input=stdin,
                              capture_output=True, text=True, timeout=TIMEOUT, check=False)
        assert done.returncode == 0, f"{argv} failed: {done.stderr}\n--- input:\n{stdin}"
        return done.stdout

    def tool(self, family: int, name: str) -> str:
        return f"{'ip6' if family == 6 else 'ip'}tables-{self.backend}{name}"

    def state(self) -> KernelState:
        tables = {f: parse(self.run(self.tool(f, "-save")), f) for f in (4, 6)}
        return KernelState(tables=tables, sets=parse_save(self.run("ipset", "save")))

    def apply_rendered(self, text: str) -> None:
        """Feed each payload of a --dry-run rendering to the command its
        header names, in the rendered order."""
        parts = _HEADER.split(text)
        assert parts[0] == ""
        for header, payload in zip(parts[1::2], parts[2::2]):
            payload = payload.lstrip("\n")
            if header.startswith("ipset restore -exist"):
                self.run("ipset", "restore", "-exist", stdin=payload)
                continue
            m = _IPTABLES_HEADER.match(header)
            assert m, header
            self.run(f"{m.group(1)}-{self.backend}-restore", "--noflush", stdin=payload)

    def converge(self, desired: DesiredState) -> None:
        plan = diff(desired, self.state())
        self.apply_rendered(render(plan))
        again = diff(desired, self.state())
        assert again.empty, render(again)


def owned(state: KernelState) -> dict:
    return {f: {n: tuple(r.hash for r in rules) for n, rules in t.chains.items() if n.startswith(PREFIX)}
            for f, t in state.tables.items()}


def foreign(state: KernelState) -> dict:
    def ours(r: SavedRule) -> bool:
        return r.hash is not None or (r.target or "").startswith(PREFIX)
    return {f: ({n: tuple(r.spec for r in rules if not (n in BUILTINS and ours(r)))
                 for n, rules in t.chains.items() if not n.startswith(PREFIX)}, t.policies)
            for f, t in state.tables.items()}


@pytest.fixture(params=("nft", "legacy"))
def node(request, netns) -> Node:
    return Node(netns, request.param)


@pytest.fixture
def busy_node(node) -> Node:
    """A node where kube-proxy, Docker and an admin came first."""
    node.run("ipset", "restore", stdin=FOREIGN_SETS)
    for family, payload in FOREIGN.items():
        node.run(node.tool(family, "-restore"), stdin=payload)
    return node


def test_a_fresh_namespace_converges(node):
    assert node.state() == KernelState(tables={4: parse("", 4), 6: parse("", 6)}, sets={})
    node.converge(DESIRED)
    state = node.state()
    assert owned(state) == {f: {c.name: c.hashes for c in DESIRED.family(f).chains} for f in (4, 6)}
    assert state.sets == DESIRED.set_map()
    for family in (4, 6):
        hooks = [h.rule.hash for h in DESIRED.family(family).hooks]
        assert sorted(state.tables[family].chains[b][0].hash for b in ("FORWARD", "INPUT")) == sorted(hooks)


def _edited() -> DesiredState:
    """Pod web loses egress isolation in IPv4, its ingress gains a rule
    using a new set, and a peer set changes members."""
    v4 = DESIRED.v4
    new_set = IpSet("KPM-N4-new", HASH_NET, 4, frozenset({"10.250.0.0/16"}))
    pod = v4.chain_map()[POD]
    pod = Chain(POD, pod.rules[:1] + (
        Rule(("-m", "set", "--match-set", new_set.name, "src", "-j", "RETURN"), "default/new ingress[0]"),
    ) + pod.rules[1:])
    chains = []
    for c in v4.chains:
        if c.name == POD_E:
            continue
        c = pod if c.name == POD else c
        chains.append(Chain(c.name, tuple(r for r in c.rules if POD_E not in r.args)))
    sets = {s.name: s for s in DESIRED.sets if s.name != P4}
    sets[N4] = dataclasses.replace(sets[N4], members=frozenset({"10.244.1.7", "10.244.3.0/24"}))
    sets[new_set.name] = new_set
    return dataclasses.replace(DESIRED, v4=dataclasses.replace(v4, chains=tuple(chains)),
                               sets=tuple(sets[n] for n in sorted(sets)))


def test_changes_drift_and_cleanup_leave_foreign_rules_alone(busy_node):
    node = busy_node
    start = node.state()
    node.converge(DESIRED)
    assert foreign(node.state()) == foreign(start)

    edited = _edited()
    plan = diff(edited, node.state())
    assert {(c.kind, c.name) for c in plan.changes} >= {
        ("chain-rewrite", POD), ("chain-delete", POD_E), ("set-destroy", P4),
        ("set-create", "KPM-N4-new"), ("set-members", N4)}
    assert not any(c.drift for c in plan.changes)
    node.converge(edited)
    state = node.state()
    assert POD_E not in state.tables[4].chains and POD_E in state.tables[6].chains
    assert P4 not in state.sets
    assert state.sets[N4].members == {"10.244.1.7", "10.244.3.0/24"}
    assert foreign(state) == foreign(start)

    # Behind our back: something inserted before our hook, an admin rule in
    # our chain, a flushed set, a deleted hook.
    node.run(node.tool(4, ""), "-I", "FORWARD", "1", "-s", "10.9.9.9", "-j", "ACCEPT")
    node.run(node.tool(4, ""), "-A", "KPM-INPUT", "-s", "10.0.0.9", "-j", "ACCEPT")
    node.run("ipset", "flush", N4)
    node.run(node.tool(6, ""), "-D", "INPUT", "1")
    tampered = node.state()
    plan = diff(edited, tampered)
    drift = {(c.kind, c.family, c.name) for c in plan.changes if c.drift}
    assert drift == {("hook", 4, "FORWARD"), ("chain-rewrite", 4, "KPM-INPUT"), ("hook", 6, "INPUT")}
    assert ("set-members", 4, N4) in {(c.kind, c.family, c.name) for c in plan.changes}
    node.converge(edited)
    assert node.state().tables[4].chains["FORWARD"][1].spec[:2] == ("-s", "10.9.9.9/32")

    node.apply_rendered(render(cleanup(node.state())))
    end = node.state()
    assert owned(end) == {4: {}, 6: {}} and end.sets == {}
    after = foreign(end)
    before = foreign(start)
    # The rule inserted behind our back is foreign and stays.
    assert after[4][0]["FORWARD"][0] == ("-s", "10.9.9.9/32", "-j", "ACCEPT")
    after[4][0]["FORWARD"] = after[4][0]["FORWARD"][1:]
    assert after == before
    assert "KUBE-CLUSTER-IP" in node.run("ipset", "list", "-n")
    assert cleanup(end).empty


def test_a_filter_table_iptables_cannot_show_is_refused(netns):
    """Written with nft directly, in a form iptables-nft cannot print."""
    node = Node(netns, "nft")
    node.run("nft", "add", "table", "ip", "filter")
    node.run("nft", "add", "chain", "ip", "filter", "INPUT",
             "{ type filter hook input priority 0; policy accept; }")
    node.run("nft", "add", "rule", "ip", "filter", "INPUT", "tcp", "dport", "22", "log", "prefix", '"x "',
             "counter", "reject")
    with pytest.raises(SaveParseError, match="cannot show"):
        parse(node.run("iptables-nft-save"), 4)
