"""lib.nft_status: one node's pods against our nft table, as the real nft
listed it (fixtures/nft_status, made by make_fixtures.sh)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from lib import nft_plan
from lib.compile import intend_node
from lib.cycle import intent_families
from lib.nft_parse import parse
from lib.nft_render import render
from lib.nft_state import ABSENT
from lib.nft_status import node_status
from lib.status import DIFFERS, IN_SYNC, MISSING, STALE, render_table
from tests.unit.builders import pod
from tests.unit.fixtures.nft_status.node_table import (CLUSTER, DB_OUT4, DESIRED, LOCAL4, NODE,
                                                      OPTIONS, PLAIN, WEB_IN4, WEB_IN6)

FIXTURES = Path(__file__).parent / "fixtures" / "nft_status"


def kernel(name: str):
    return parse((FIXTURES / f"{name}.json").read_text())


def status(name: str, desired=DESIRED, families=(4, 6)):
    current = kernel(name) if name else ABSENT
    return node_status(CLUSTER, desired, current,
                       nft_plan.diff(desired, current, table_expected=True), NODE, families)


def pods(s) -> dict:
    return {p.pod: p for p in s.pods}


def test_the_table_as_loaded_is_in_sync_pod_by_pod():
    s = status("table")
    assert s.in_sync and s.changes == 0 and s.node_changes == ()
    assert (s.dataplane, s.backend, s.families) == ("nftables", None, (4, 6))
    assert (s.policies, s.local_pods) == (3, 3)          # the host-network pod is not one
    assert s.rules == sum(len(c.rules) for c in DESIRED.chains)
    assert s.sets == len(DESIRED.sets)
    by = pods(s)
    assert list(by) == ["x/db", "x/free", "x/web"]
    assert {p: (r.state, r.known) for p, r in by.items()} == {
        "x/db": (IN_SYNC, True), "x/free": (IN_SYNC, True), "x/web": (IN_SYNC, True)}
    web = by["x/web"]
    assert (web.ingress_isolated, web.egress_isolated) == (True, True)
    assert web.policies == ("x/web", "x/web-out")
    assert web.admin_policies == ("ANP pass-clients",)
    # the Pass leads each ingress chain on to a tier chain of its own
    assert [(c.family, c.direction, c.name.split("-")[1]) for c in web.chains] == [
        (4, "ingress", "i4"), (4, "ingress", "ni4"), (4, "egress", "e4"),
        (6, "ingress", "i6"), (6, "ingress", "ni6"), (6, "egress", "e6")]
    assert web.chains[0].name == WEB_IN4
    assert web.rules == sum(len(DESIRED.chain_map()[c.name].rules) for c in web.chains)
    # peer pods in plain address sets, named ports in (address . protocol . port) sets
    assert web.sets and all(name.startswith(("kpm-an4-", "kpm-an6-", "kpm-p4-", "kpm-p6-"))
                            for name in web.sets)
    db = by["x/db"]
    assert (db.ingress_isolated, db.egress_isolated) == (False, True)
    assert [c.name for c in db.chains] == [DB_OUT4]
    assert by["x/free"].chains == ()


def test_a_deleted_map_element_leaves_the_pod_missing():
    s = status("element-deleted")
    assert not s.in_sync and s.changes == 1
    by = pods(s)
    assert by["x/web"].state == MISSING
    assert by["x/web"].reasons == (
        f"{WEB_IN4} (IPv4 ingress): missing, 10.244.1.10 missing from kpm-ingress4",)
    assert by["x/db"].state == by["x/free"].state == IN_SYNC
    assert s.node_changes == ()              # the map's one difference is x/web's row


def test_a_flushed_chain_makes_the_pod_differ():
    s = status("chain-flushed")
    assert (s.changes, s.drift) == (1, 1)
    db = pods(s)["x/db"]
    assert db.state == DIFFERS
    assert db.reasons == (f"{DB_OUT4} (IPv4 egress): differs, rules differ",)
    assert pods(s)["x/web"].state == IN_SYNC
    assert s.node_changes == ()


def test_a_pod_missing_from_the_known_pods_set_would_be_refused():
    s = status("unknown")
    free = pods(s)["x/free"]
    assert (free.state, free.known) == (DIFFERS, False)
    assert free.reasons == (f"not known (IPv4): 10.244.1.12 missing from set {LOCAL4}: "
                            "its traffic is refused",)
    assert pods(s)["x/web"].known is True
    assert [(c.kind, c.name) for c in s.node_changes] == [("set-members", LOCAL4)]


def test_a_missing_dispatch_rule_leaves_the_pods_chain_unreached():
    s = status("dispatch-deleted")
    web = pods(s)["x/web"]
    assert web.state == DIFFERS
    assert web.reasons == (
        f"{WEB_IN6} (IPv6 ingress): differs, not reached: dispatch rule missing from kpm-forward6",)
    assert [(c.kind, c.name) for c in s.node_changes] == [("chain-rewrite", "kpm-forward6")]


def test_the_kernel_written_with_options_differs_from_a_plain_compile():
    s = status("table", desired=PLAIN)
    by = pods(s)
    assert by["x/db"].state == by["x/web"].state == DIFFERS      # the drop-log rules
    assert by["x/free"].state == IN_SYNC and by["x/free"].known is None
    # the pod's element leads to the chain the options made, named by its rules
    assert by["x/db"].reasons[0].startswith("kpm-e4-")
    assert f"10.244.1.11 in kpm-egress4 leads to {DB_OUT4}" in by["x/db"].reasons[0]
    # the chains the pods' elements lead to now are theirs; new-pod isolation is the node's
    names = {c.name for c in s.node_changes}
    assert DB_OUT4 not in names and WEB_IN4 not in names
    assert {"kpm-localsrc4", "kpm-unknown6", LOCAL4} <= names


def test_no_table_every_isolated_pod_missing():
    s = status(None)
    assert {p.pod: p.state for p in s.pods} == {"x/db": MISSING, "x/free": IN_SYNC,
                                                "x/web": MISSING}
    text = render_table(s)
    assert "  node: table-create kube-policy-manager: table missing DRIFT" in text.splitlines()


def test_a_pod_dispatched_but_no_longer_isolated_is_stale():
    current = kernel("table")
    vmap = current.map_map()["kpm-egress4"]
    extra = {**vmap.elements, "10.244.1.12": f"jump {DB_OUT4}"}
    current = replace(current, maps=tuple(
        replace(m, elements=extra) if m.name == "kpm-egress4" else m for m in current.maps))
    s = node_status(CLUSTER, DESIRED, current, nft_plan.diff(DESIRED, current), NODE)
    free = pods(s)["x/free"]
    assert free.state == DIFFERS
    assert [(c.name, c.state, c.reason) for c in free.chains] == [
        (DB_OUT4, STALE, "10.244.1.12 in kpm-egress4, not desired")]


def test_the_table_says_its_dataplane_and_the_document_its_fields():
    s = status("chain-flushed")
    lines = render_table(s).splitlines()
    assert lines[0].split() == ["POD", "INGRESS", "EGRESS", "POLICIES", "ADMIN", "RULES",
                                "SETS", "KERNEL"]
    assert lines[1].split()[0] == "x/db" and lines[1].split()[-1] == "differs"
    assert lines[5] == (f"node n1: 3 policies, 3 local pods, {s.rules} rules, {s.sets} sets "
                        f"({s.set_members} members); kernel out of sync (1 change pending, "
                        "1 drift); dataplane nftables, IPv4+IPv6")
    doc = json.loads(json.dumps(s.as_dict()))
    assert (doc["dataplane"], doc["backend"], doc["in_sync"]) == ("nftables", None, False)
    db = doc["pods"][0]
    assert db["pod"] == "x/db" and db["state"] == "differs"
    assert db["chains"] == [{"name": DB_OUT4, "family": 4, "direction": "egress",
                             "rules": len(DESIRED.chain_map()[DB_OUT4].rules),
                             "state": "differs", "reason": "rules differ"}]


def test_a_node_without_ipv6_checks_ipv4_only():
    v4 = render(intent_families(intend_node(CLUSTER, NODE, options=OPTIONS), (4,)))
    current = kernel("table")
    s = node_status(CLUSTER, v4, current, nft_plan.diff(v4, current), NODE, (4,))
    web = pods(s)["x/web"]
    assert {c.family for c in web.chains} == {4} and web.state == IN_SYNC
    assert s.families == (4,) and "IPv4+" not in render_table(s)


def test_a_peer_set_that_lost_an_element_makes_its_pods_differ():
    current = kernel("table")
    web = pods(status("table"))["x/web"]
    name = next(n for n in web.sets if n.startswith("kpm-an4-"))
    current = replace(current, sets=tuple(
        replace(s, elements=frozenset()) if s.name == name else s for s in current.sets))
    s = node_status(CLUSTER, DESIRED, current, nft_plan.diff(DESIRED, current), NODE)
    web = pods(s)["x/web"]
    assert web.state == DIFFERS
    assert any(r.endswith(f"differs, set {name} members differ") for r in web.reasons)
    assert s.node_changes == ()              # the set is one of x/web's


def test_pods_known_one_element_each_in_the_plain_known_pods_set():
    c = replace(CLUSTER, pods=CLUSTER.pods + (pod("x/free2", NODE, "10.244.1.13"),))
    desired = render(intend_node(c, NODE, options=OPTIONS))
    local = next(s for s in desired.sets if s.name.startswith("kpm-al4-"))
    assert not local.interval
    assert {"10.244.1.12", "10.244.1.13"} <= local.elements     # adjacent, not merged
    s = node_status(c, desired, desired, nft_plan.diff(desired, desired), NODE)
    assert {p.pod: p.known for p in s.pods if p.pod.startswith("x/free")} == {
        "x/free": True, "x/free2": True}
    current = replace(desired, sets=tuple(
        replace(x, elements=x.elements - {"10.244.1.13"}) if x.name == local.name else x
        for x in desired.sets))
    s = node_status(c, desired, current, nft_plan.diff(desired, current), NODE)
    assert {p.pod: p.known for p in s.pods if p.pod.startswith("x/free")} == {
        "x/free": True, "x/free2": False}
