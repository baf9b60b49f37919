"""lib.status: one node's pods against the kernel, for states built here."""
from __future__ import annotations

import dataclasses
import json

from lib.compile import (FORWARD_CHAIN, LOCAL_SRC_CHAIN, UNKNOWN_CHAIN, CompileOptions,
                         compile_node, local_set_name, np_tier_chain_name, pod_chain_name)
from lib.model import EGRESS, INGRESS
from lib.plan import KernelState, diff
from lib.status import DIFFERS, IN_SYNC, MISSING, STALE, node_status, render_table
from tests.unit.builders import (a_namespaces, anp, arule, banp, cluster, cport, namespace, ns_subject,
                                 pod, pods_peer, pods_subject, policy, pport, rule, sel, with_admin)
from tests.unit.fake_kernel import state_of

NODE = "n1"
CLUSTER = cluster(
    namespace("x"),
    pod("x/web", NODE, ["10.244.1.10", "fd00::10"], {"app": "web"}, ports=[cport(80, "http")]),
    pod("x/db", NODE, "10.244.1.11", {"app": "db"}),
    pod("x/free", NODE, "10.244.1.12"),
    pod("x/client", "n2", "10.244.2.10", {"role": "client"}),
    pod("x/agent", NODE, "192.168.0.1", host_network=True),
    policy("x/web", sel({"app": "web"}), ingress=[rule([pods_peer({"role": "client"})],
                                                       [pport(80)])]),
    policy("x/web-out", sel({"app": "web"}), egress=[rule([pods_peer({"app": "db"})])],
           types=[EGRESS]),
    policy("x/db", sel({"app": "db"}), types=[EGRESS]),
)
DESIRED = compile_node(CLUSTER, NODE)
POD = {p.key: p for p in CLUSTER.pods}
WEB, DB, FREE = POD["x/web"], POD["x/db"], POD["x/free"]


def status_of(current: KernelState):
    return node_status(CLUSTER, DESIRED, current, diff(DESIRED, current), NODE, "nft")


def pods(status) -> dict:
    return {p.pod: p for p in status.pods}


def drop_chain(state: KernelState, family: int, name: str) -> KernelState:
    table = state.tables[family]
    chains = {n: r for n, r in table.chains.items() if n != name}
    return dataclasses.replace(state, tables={**state.tables,
                                              family: dataclasses.replace(table, chains=chains)})


def set_chain(state: KernelState, family: int, name: str, rules) -> KernelState:
    table = state.tables[family]
    chains = {**table.chains, name: tuple(rules)}
    return dataclasses.replace(state, tables={**state.tables,
                                              family: dataclasses.replace(table, chains=chains)})


def test_a_kernel_in_sync():
    s = status_of(state_of(DESIRED))
    assert s.in_sync and s.changes == 0 and s.drift == 0
    assert (s.policies, s.local_pods) == (3, 3)           # the host-network pod is not one
    assert s.rules == sum(len(c.rules) for f in (4, 6) for c in DESIRED.family(f).chains)
    assert s.sets == len(DESIRED.sets) == 4     # web's two peer sets, per family
    by = pods(s)
    assert list(by) == ["x/db", "x/free", "x/web"]
    web = by["x/web"]
    assert (web.ingress_isolated, web.egress_isolated) == (True, True)
    assert web.policies == ("x/web", "x/web-out")
    # per family: ingress 1 rule + 2 rejects, egress 1 rule + 2 rejects; IPv6 the same
    assert web.rules == 12
    assert len(web.sets) == 4 and web.state == IN_SYNC and web.reasons == ()
    assert [(c.family, c.direction) for c in web.chains] == [
        (4, "ingress"), (4, "egress"), (6, "ingress"), (6, "egress")]
    db = by["x/db"]
    assert (db.ingress_isolated, db.egress_isolated, db.rules, db.sets) == (False, True, 2, ())
    free = by["x/free"]
    assert (free.ingress_isolated, free.egress_isolated, free.policies, free.chains) == \
        (False, False, (), ())
    assert free.state == IN_SYNC


def test_a_missing_chain_a_changed_chain_and_a_missing_dispatch_rule():
    current = state_of(DESIRED)
    current = drop_chain(current, 4, pod_chain_name(DB, EGRESS))
    web_in = pod_chain_name(WEB, INGRESS)
    current = set_chain(current, 4, web_in, current.tables[4].chains[web_in][:-1])
    forward = current.tables[6].chains[FORWARD_CHAIN]
    current = set_chain(current, 6, FORWARD_CHAIN,
                        tuple(r for r in forward if web_in not in r.spec))
    s = status_of(current)
    assert not s.in_sync and s.changes == 3 and s.drift == 1
    by = pods(s)
    assert by["x/db"].state == MISSING
    assert by["x/db"].reasons == (f"{pod_chain_name(DB, EGRESS)} (IPv4 egress): missing",)
    assert by["x/web"].state == DIFFERS
    assert by["x/web"].reasons == (
        f"{web_in} (IPv4 ingress): differs, rules differ",
        f"{web_in} (IPv6 ingress): differs, not reached: dispatch rule missing from KPM-FORWARD",
    )


def test_set_members_that_differ_make_the_pod_differ():
    current = state_of(DESIRED)
    name = next(n for n in pods(status_of(current))["x/web"].sets if n.startswith("KPM-N4-"))
    sets = {**current.sets, name: dataclasses.replace(current.sets[name], members=frozenset())}
    s = status_of(dataclasses.replace(current, sets=sets))
    web = pods(s)["x/web"]
    assert web.state == DIFFERS
    assert web.reasons == (f"{pod_chain_name(WEB, INGRESS)} (IPv4 ingress): differs, "
                           f"set {name} members differ",)
    assert not s.in_sync and s.drift == 0


def test_a_chain_left_for_a_pod_no_longer_isolated_is_stale():
    current = state_of(DESIRED)
    stale = pod_chain_name(FREE, INGRESS)
    current = set_chain(current, 4, stale, ())
    free = pods(status_of(current))["x/free"]
    assert free.state == DIFFERS
    assert [(c.name, c.state) for c in free.chains] == [(stale, STALE)]


def test_the_table_and_the_document():
    current = drop_chain(state_of(DESIRED), 4, pod_chain_name(DB, EGRESS))
    s = status_of(current)
    text = render_table(s)
    lines = text.splitlines()
    assert lines[:4] == [
        "POD     INGRESS   EGRESS    POLICIES  RULES  SETS  KERNEL",
        "x/db    -         isolated  1         2      0     missing",
        "x/free  -         -         0         0      0     in sync",
        "x/web   isolated  isolated  2         12     4     in sync",
    ]
    assert lines[5] == (f"node n1: 3 policies, 3 local pods, {s.rules} rules, 4 sets "
                        f"({s.set_members} members); kernel out of sync (1 change pending); "
                        "dataplane iptables (backend nft), IPv4+IPv6")
    assert lines[6] == f"  x/db: {pod_chain_name(DB, EGRESS)} (IPv4 egress): missing"
    assert "\x1b" not in text and "\x1b[1;31mmissing\x1b[0m" in render_table(s, color=True)
    doc = json.loads(json.dumps(s.as_dict()))
    assert doc["in_sync"] is False and doc["backend"] == "nft"
    assert doc["pods"][0]["pod"] == "x/db" and doc["pods"][0]["state"] == "missing"
    assert doc["pods"][2]["chains"][0] == {
        "name": pod_chain_name(WEB, INGRESS), "family": 4, "direction": "ingress", "rules": 3,
        "state": "in sync", "reason": ""}


def test_in_sync_summary():
    text = render_table(status_of(state_of(DESIRED)))
    assert "; kernel in sync; dataplane iptables (backend nft), IPv4+IPv6" in text


# --- compile options: what the daemon writes beyond the API -------------------------

OPTIONS = CompileOptions(log_drops=True, isolate_new_pods=True,
                         pod_cidrs=("10.244.1.0/24", "fd00::/64"))
WITH_OPTIONS = compile_node(CLUSTER, NODE, options=OPTIONS)


def status_with(desired, current: KernelState):
    return node_status(CLUSTER, desired, current, diff(desired, current), NODE, "nft")


def test_a_kernel_written_with_options_is_in_sync_only_against_the_same_options():
    current = state_of(WITH_OPTIONS)
    same = status_with(WITH_OPTIONS, current)
    assert same.in_sync and same.node_changes == ()
    assert {p.pod: (p.state, p.known) for p in same.pods} == {
        "x/db": (IN_SYNC, True), "x/free": (IN_SYNC, True), "x/web": (IN_SYNC, True)}

    plain = status_with(DESIRED, current)
    assert not plain.in_sync
    by = pods(plain)
    # the drop-log rule: every isolated pod's chains differ
    assert by["x/web"].state == by["x/db"].state == DIFFERS
    assert f"{pod_chain_name(DB, EGRESS)} (IPv4 egress): differs, rules differ" in by["x/db"].reasons
    assert by["x/free"].state == IN_SYNC and by["x/free"].known is None
    # new-pod isolation is no pod's: named as the node's
    removed = {(c.kind, c.name, c.family) for c in plain.node_changes}
    assert {("chain-delete", LOCAL_SRC_CHAIN, 4), ("chain-delete", UNKNOWN_CHAIN, 6),
            ("set-destroy", local_set_name(4), 4)} <= removed
    text = render_table(plain)
    # a RETURN per address of x/db and x/web, the known-pods set, the jump to KPM-UNKNOWN
    assert f"  node: chain-delete {LOCAL_SRC_CHAIN} (IPv4): 4 rules" in text.splitlines()


def test_with_new_pod_isolation_a_pod_the_kernel_does_not_recognise_differs():
    current = state_of(WITH_OPTIONS)
    # x/web has chains: known by its RETURN rule in KPM-LOCAL-SRC
    saved = current.tables[4].chains[LOCAL_SRC_CHAIN]
    current = set_chain(current, 4, LOCAL_SRC_CHAIN,
                        tuple(r for r in saved if "10.244.1.10/32" not in r.spec))
    # x/free has none: known through the set
    name = local_set_name(4)
    members = current.sets[name].members - {"10.244.1.12"}
    current = dataclasses.replace(current, sets={
        **current.sets, name: dataclasses.replace(current.sets[name], members=members)})
    s = status_with(WITH_OPTIONS, current)
    by = pods(s)
    assert (by["x/web"].state, by["x/web"].known) == (DIFFERS, False)
    assert by["x/web"].reasons == (
        f"not known to {LOCAL_SRC_CHAIN} (IPv4): its traffic is refused",)
    assert (by["x/free"].state, by["x/free"].known) == (DIFFERS, False)
    assert by["x/free"].reasons == (
        f"not known (IPv4): 10.244.1.12 missing from set {name}: its traffic is refused",)
    assert (by["x/db"].state, by["x/db"].known) == (IN_SYNC, True)
    # the chain as a whole is the node's change
    assert [(c.kind, c.name) for c in s.node_changes if c.kind.startswith("chain")] == [
        ("chain-rewrite", LOCAL_SRC_CHAIN)]
    doc = json.loads(json.dumps(s.as_dict()))
    assert doc["pods"][2]["known"] is False
    assert {c["name"] for c in doc["node_changes"]} == {LOCAL_SRC_CHAIN, name}


def test_with_the_known_pods_set_gone_every_pod_without_chains_differs():
    current = state_of(WITH_OPTIONS)
    name = local_set_name(4)
    current = dataclasses.replace(current, sets={n: s for n, s in current.sets.items()
                                                 if n != name})
    by = pods(status_with(WITH_OPTIONS, current))
    assert by["x/free"].reasons == (
        f"not known (IPv4): set {name} missing: its traffic is refused",)
    assert by["x/web"].known is True and by["x/db"].known is True   # known by their rules


def test_admin_policies_per_pod_and_both_chains_of_a_pass():
    """The ADMIN column names the admin policies selecting each pod, in
    evaluation order; a Pass gives the pod a NetworkPolicy tier chain of its
    own, checked like the entry chain."""
    c = with_admin(CLUSTER, [anp("pass-clients", 5, pods_subject({}, {"app": "web"}),
                                 ingress=[arule("Pass", [a_namespaces()], [pport(80)])])],
                   banp(ns_subject(), ingress=[arule("Deny", [a_namespaces()])]))
    desired = compile_node(c, NODE)
    current = drop_chain(state_of(desired), 4, np_tier_chain_name(WEB, INGRESS))
    s = node_status(c, desired, current, diff(desired, current), NODE, "nft")
    web, free = pods(s)["x/web"], pods(s)["x/free"]
    assert web.admin_policies == ("ANP pass-clients", "BANP default")
    assert free.admin_policies == ("BANP default",)
    assert web.state == MISSING
    assert f"{np_tier_chain_name(WEB, INGRESS)} (IPv4 ingress): missing" in web.reasons
    lines = render_table(s).splitlines()
    assert lines[0].split() == ["POD", "INGRESS", "EGRESS", "POLICIES", "ADMIN", "RULES", "SETS", "KERNEL"]
    assert lines[3].split()[:5] == ["x/web", "isolated", "isolated", "2", "ANP:pass-clients,BANP:default"]
    assert lines[2].split()[:5] == ["x/free", "-", "-", "0", "BANP:default"]
