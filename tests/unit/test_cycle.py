"""When a cycle may skip work: the fingerprint of the API objects, and the
rule that decides whether an applied plan can refuse a flow."""
from __future__ import annotations

import gc
from dataclasses import replace

import pytest

from lib import plan as planner
from lib.compile import compile_node
from lib.cycle import LastCompiled, fingerprint, run_cycle
from lib import nft_plan, nft_render
from lib.compile import intend_node
from lib.dataplane import iptables_may_narrow as may_narrow
from lib.dataplane import nft_may_narrow
from lib.model import ALLOW, DENY
from lib.nft_state import Table
from lib.kubeapi import ClusterObjects
from lib.loop import Stopped
from lib.ruleset import HASH_NET, Chain, DesiredState, FamilyState, IpSet, Rule
from tests.unit.builders import (NAME_LABEL, a_namespaces, a_pods, anp, arule, cluster, namespace,
                                 ns_subject, pod, pods_peer, policy, rule, sel, with_admin)
from tests.unit.fake_kernel import FakeKernel, state_of

NODE = "n1"
WEB = pod("x/web", NODE, "10.0.1.10", {"app": "web"})
CLIENT = pod("x/client", "n2", "10.0.2.10", {"role": "client"})
CLIENT_2 = pod("x/client-2", "n2", "10.0.2.11", {"role": "client"})
FROM_CLIENTS = policy("x/web", sel({"app": "web"}), ingress=[rule([pods_peer({"role": "client"})])])
NAMESPACES = [namespace("x")]


def desired(*objects) -> DesiredState:
    return compile_node(cluster(NAMESPACES, *objects), NODE)


def plan_from(before: DesiredState, after: DesiredState) -> planner.Plan:
    """The plan of a cycle whose kernel holds `before` and that wants `after`."""
    return planner.diff(after, state_of(before))


# --- may_narrow ---------------------------------------------------------------

def test_a_peer_joining_only_adds_a_member_and_cannot_narrow():
    before = desired(WEB, CLIENT, FROM_CLIENTS)
    after = desired(WEB, CLIENT, CLIENT_2, FROM_CLIENTS)
    the_plan = plan_from(before, after)
    assert [c.kind for c in the_plan.changes] == ["set-members"]
    assert not may_narrow(the_plan, after)


def test_a_peer_leaving_deletes_a_member_and_may_narrow():
    before = desired(WEB, CLIENT, CLIENT_2, FROM_CLIENTS)
    after = desired(WEB, CLIENT, FROM_CLIENTS)
    assert may_narrow(plan_from(before, after), after)


def test_a_pod_newly_isolated_may_narrow():
    after = desired(WEB, CLIENT, FROM_CLIENTS)
    assert may_narrow(plan_from(desired(WEB, CLIENT), after), after)


def test_a_policy_edit_rewriting_a_chain_may_narrow():
    before = desired(WEB, CLIENT, FROM_CLIENTS)
    from_admins = policy("x/web", sel({"app": "web"}), ingress=[rule([pods_peer({"role": "admin"})])])
    after = desired(WEB, CLIENT, from_admins)
    the_plan = plan_from(before, after)
    assert any(c.kind == "chain-rewrite" for c in the_plan.changes)
    assert may_narrow(the_plan, after)


def test_a_hook_restored_after_drift_may_narrow():
    want = desired(WEB, CLIENT, FROM_CLIENTS)
    kernel = state_of(want)
    table = kernel.tables[4]
    unhooked = replace(table, chains={**table.chains, "FORWARD": ()})
    the_plan = planner.diff(want, replace(kernel, tables={**kernel.tables, 4: unhooked}))
    assert [c.kind for c in the_plan.changes] == ["hook"]
    assert may_narrow(the_plan, want)


def test_a_set_recreated_with_its_type_may_narrow():
    want = desired(WEB, CLIENT, FROM_CLIENTS)
    kernel = state_of(want)
    (name,) = kernel.sets
    wrong = replace(kernel.sets[name], kind="hash:ip")
    the_plan = planner.diff(want, replace(kernel, sets={name: wrong}))
    assert the_plan.ipset_prepare.startswith(f"destroy {name}\n")
    assert not any(the_plan.iptables.values())
    assert may_narrow(the_plan, want)


def test_a_member_added_to_a_set_a_refusing_rule_matches_may_narrow():
    blocked = IpSet("KPM-N4-blocked", HASH_NET, 4, frozenset({"10.0.0.1"}))
    chain = Chain("KPM-I-x", (Rule(("-m", "set", "--match-set", blocked.name, "src",
                                    "-j", "REJECT"), "refuse"),))
    want = DesiredState(v4=FamilyState(4, (chain,), ()), sets=(blocked,))
    before = replace(want, sets=(replace(blocked, members=frozenset()),))
    the_plan = plan_from(before, want)
    assert [c.kind for c in the_plan.changes] == ["set-members"]
    assert may_narrow(the_plan, want)


def test_a_member_added_only_to_allowing_sets_cannot_narrow_though_another_set_refuses():
    """A node with an admin Deny still skips the cleanup when a pod joins a
    set that only RETURN rules match; joining the Deny's set may narrow."""
    blocked = IpSet("KPM-N4-blocked", HASH_NET, 4, frozenset({"10.0.0.1"}))
    allowed = IpSet("KPM-N4-allowed", HASH_NET, 4, frozenset({"10.0.0.2"}))
    chain = Chain("KPM-I-x", (
        Rule(("-m", "set", "--match-set", blocked.name, "src", "-j", "REJECT"), "refuse"),
        Rule(("-m", "set", "--match-set", allowed.name, "src", "-j", "RETURN"), "admit")))
    want = DesiredState(v4=FamilyState(4, (chain,), ()), sets=(allowed, blocked))
    grow_allowed = replace(want, sets=(replace(allowed, members=frozenset()), blocked))
    assert not may_narrow(plan_from(grow_allowed, want), want)
    grow_blocked = replace(want, sets=(allowed, replace(blocked, members=frozenset())))
    assert may_narrow(plan_from(grow_blocked, want), want)


# --- fingerprint -----------------------------------------------------------------

def _obj(name: str, version, ns: str = "x", uid: str = "u1") -> dict:
    meta = {"name": name, "namespace": ns, "uid": uid}
    if version is not None:
        meta["resourceVersion"] = version
    return {"metadata": meta, "spec": {}}


def _fetched(pods=(), policies=(), namespaces=()) -> ClusterObjects:
    return ClusterObjects(list(namespaces), list(pods), list(policies), 0, 0)


def test_fingerprint_changes_with_any_object_version_name_uid_or_order():
    base = _fetched([_obj("a", "1"), _obj("b", "2")])
    assert fingerprint(base) == fingerprint(_fetched([_obj("a", "1"), _obj("b", "2")]))
    for other in ([_obj("a", "1"), _obj("b", "3")],
                  [_obj("a", "1"), _obj("b", "2", uid="u2")],
                  [_obj("a", "1"), _obj("c", "2")],
                  [_obj("b", "2"), _obj("a", "1")],
                  [_obj("a", "1")]):
        assert fingerprint(_fetched(other)) != fingerprint(base)


def test_fingerprint_tells_the_kinds_apart():
    assert fingerprint(_fetched(pods=[_obj("a", "1")])) != \
        fingerprint(_fetched(policies=[_obj("a", "1")]))


def _admin(name: str, version: str) -> dict:
    return {"metadata": {"name": name, "uid": f"uid-{name}", "resourceVersion": version},
            "spec": {"priority": 1, "subject": {"namespaces": {}}}}


def _node(version: str, zone: str = "a") -> dict:
    return {"metadata": {"name": "n1", "uid": "uid-n1", "resourceVersion": version,
                         "labels": {"zone": zone}},
            "status": {"addresses": [{"type": "InternalIP", "address": "172.18.0.1"}],
                       "conditions": [{"type": "Ready", "lastHeartbeatTime": version}]}}


def _with_admin(admin=(), baseline=(), nodes=()) -> ClusterObjects:
    return ClusterObjects([], [], [], 0, 0, admin_policies=list(admin),
                          baseline_policies=list(baseline), nodes=list(nodes),
                          admin_api=frozenset({"adminnetworkpolicies"}))


def test_fingerprint_covers_the_admin_kinds_and_nodes_by_what_they_mean():
    base = _with_admin([_admin("a", "1")], nodes=[_node("5")])
    assert fingerprint(base) == fingerprint(_with_admin([_admin("a", "1")], nodes=[_node("5")]))
    assert fingerprint(base) != fingerprint(_with_admin([_admin("a", "2")], nodes=[_node("5")]))
    assert fingerprint(base) != fingerprint(_with_admin(baseline=[_admin("a", "1")], nodes=[_node("5")]))
    assert fingerprint(base) != fingerprint(_with_admin([_admin("a", "1")], nodes=[_node("5", "b")]))
    # a kubelet heartbeat: a new resourceVersion, the same labels and addresses
    assert fingerprint(base) == fingerprint(_with_admin([_admin("a", "1")], nodes=[_node("6")]))


def test_no_fingerprint_without_a_resource_version():
    assert fingerprint(_fetched([_obj("a", "1"), _obj("b", None)])) is None
    assert fingerprint(_fetched([_obj("a", "")])) is None
    assert fingerprint(_fetched(["not an object"])) is None


# --- run_cycle with a LastCompiled ---------------------------------------------------

class _Kernel:
    """The fake kernel behind the cycle's read and apply."""
    families = (4, 6)

    def __init__(self):
        self.fake = FakeKernel()

    def read(self):
        return self.fake.state

    def apply(self, the_plan):
        self.fake.apply(the_plan)


def _api(version_of_web, client_ip="10.0.2.10") -> ClusterObjects:
    def meta(name, version, ns=None):
        out = {"name": name, "uid": f"uid-{name}"}
        if ns:
            out["namespace"] = ns
        if version is not None:
            out["resourceVersion"] = version
        return out

    def pod_obj(name, node, ip, labels, version):
        return {"metadata": {**meta(name, version, "x"), "labels": labels},
                "spec": {"nodeName": node, "containers": [{"name": "c"}]},
                "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}

    return ClusterObjects(
        namespaces=[{"metadata": {**meta("x", "1"), "labels": {"kubernetes.io/metadata.name": "x"}}}],
        pods=[pod_obj("web", NODE, "10.0.1.10", {"app": "web"}, version_of_web),
              pod_obj("client", "n2", client_ip, {"role": "client"}, client_ip)],
        policies=[{"metadata": meta("web", "3", "x"), "spec": {
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}]}]}}],
        requests=1, bytes=0)


def _cycles(*served, last=None) -> list:
    kernel, last = _Kernel(), last or LastCompiled()
    return [run_cycle(lambda a=api: a, kernel, NODE, conntrack_cleanup=False, last=last)
            for api in served]


def test_the_same_objects_are_not_parsed_again_and_a_change_is():
    same, moved = _api("7"), _api("7", client_ip="10.0.2.99")
    first, idle, changed, after = _cycles(same, _api("7"), moved, _api("7", client_ip="10.0.2.99"))
    assert [r.ok for r in (first, idle, changed, after)] == [True] * 4
    assert [r.reused for r in (first, idle, changed, after)] == [False, True, False, True]
    assert idle.desired is first.desired and idle.cluster is first.cluster
    assert idle.changes == 0 and after.changes == 0
    (member_change,) = changed.plan.changes
    assert member_change.detail == "+1 -1 members"
    assert "10.0.2.99" in {m for s in changed.desired.sets for m in s.members}


def test_after_a_change_only_the_changed_object_is_parsed_again():
    last = LastCompiled()
    first, changed = _cycles(_api("7"), _api("7", client_ip="10.0.2.99"), last=last)
    assert not changed.reused
    # namespace, web pod and policy reused; the client pod has a new version
    assert last.memo.hits == 3
    fresh = _cycles(_api("7", client_ip="10.0.2.99"))[0]
    assert changed.cluster == fresh.cluster and changed.desired == fresh.desired


def test_the_cycle_parses_the_admin_kinds_it_fetched():
    api = _api("7")
    fetched = ClusterObjects(api.namespaces, api.pods, api.policies, 1, 0,
                             admin_policies=[_admin("b", "1"), _admin("a", "1")],
                             baseline_policies=[{**_admin("default", "2"), "spec": {
                                 "subject": {"namespaces": {}}}}],
                             nodes=[_node("5")], admin_api=frozenset({"adminnetworkpolicies"}))
    report, = _cycles(fetched)
    assert report.ok
    assert [p.name for p in report.cluster.admin_policies] == ["a", "b"]
    assert report.cluster.baseline.name == "default"
    assert [(n.name, n.ips) for n in report.cluster.nodes] == [("n1", ("172.18.0.1",))]
    assert [p.field for p in report.cluster.problems] == ["spec.priority", "spec.priority"]


def test_objects_without_a_resource_version_are_parsed_every_cycle():
    assert [r.reused for r in _cycles(_api(None), _api(None))] == [False, False]


def test_without_a_last_compiled_every_cycle_parses():
    kernel = _Kernel()
    reports = [run_cycle(lambda: _api("7"), kernel, NODE, conntrack_cleanup=False)
               for _ in range(2)]
    assert [r.reused for r in reports] == [False, False]


# --- a fetch abandoned by a stop signal ---------------------------------------------

def test_a_stop_during_the_fetch_ends_the_cycle_without_a_failure_or_a_write():
    """Stopped is not one of the failures a cycle reports and the loop backs
    off from: it leaves run_cycle as it came, and nothing is read or written."""
    class Watched(_Kernel):
        calls = 0

        def read(self):
            Watched.calls += 1
            return super().read()

    def fetch():
        raise Stopped("SIGTERM")

    kernel = Watched()
    assert gc.isenabled()
    with pytest.raises(Stopped):
        run_cycle(fetch, kernel, NODE, conntrack_cleanup=False, last=LastCompiled())
    assert Watched.calls == 0 and kernel.fake.log == []
    assert gc.isenabled()                  # the collector pause ends with the cycle


# --- may_narrow, nftables -----------------------------------------------------------
# The same questions of the one `nft -f` payload: the previous render stands
# for what the kernel holds.

def nft_desired(*objects, admin=()):
    c = with_admin(cluster(NAMESPACES + [namespace("b", team="b")], *objects), admin)
    return nft_render.render(intend_node(c, NODE))


def nft_plan_from(before, after) -> nft_plan.NftPlan:
    return nft_plan.diff(after, before)


CLIENT_FAR = pod("x/client-far", "n2", "10.0.7.1", {"role": "client"})


@pytest.mark.parametrize("joining", [CLIENT_FAR, CLIENT_2], ids=["apart", "adjacent"])
def test_nft_a_peer_joining_only_adds_elements_and_cannot_narrow(joining):
    """CLIENT_2 (10.0.2.11) is next to CLIENT (10.0.2.10): the interval set
    lists the two as 10.0.2.10/31, replacing the element it had; the new one
    covers the old, so nothing is refused that was allowed."""
    before = nft_desired(WEB, CLIENT, FROM_CLIENTS)
    after = nft_desired(WEB, CLIENT, joining, FROM_CLIENTS)
    the_plan = nft_plan_from(before, after)
    assert [c.kind for c in the_plan.changes] == ["set-members"]
    assert not nft_may_narrow(the_plan, after)


@pytest.mark.parametrize("leaving", [CLIENT_FAR, CLIENT_2], ids=["apart", "adjacent"])
def test_nft_a_peer_leaving_may_narrow(leaving):
    before = nft_desired(WEB, CLIENT, leaving, FROM_CLIENTS)
    after = nft_desired(WEB, CLIENT, FROM_CLIENTS)
    assert nft_may_narrow(nft_plan_from(before, after), after)


def test_nft_a_pod_newly_isolated_may_narrow():
    after = nft_desired(WEB, CLIENT, FROM_CLIENTS)
    assert nft_may_narrow(nft_plan_from(nft_desired(WEB, CLIENT), after), after)


def test_nft_a_pod_joining_an_existing_chain_may_narrow():
    """Only a map element is added, and it puts the pod under policy."""
    web_2 = pod("x/web-2", NODE, "10.0.1.11", {"app": "web"})
    before = nft_desired(WEB, CLIENT, FROM_CLIENTS)
    after = nft_desired(WEB, web_2, CLIENT, FROM_CLIENTS)
    the_plan = nft_plan_from(before, after)
    assert [c.kind for c in the_plan.changes] == ["map-elements"]
    assert nft_may_narrow(the_plan, after)


def test_nft_a_policy_edit_may_narrow():
    from_admins = policy("x/web", sel({"app": "web"}), ingress=[rule([pods_peer({"role": "admin"})])])
    after = nft_desired(WEB, CLIENT, from_admins)
    assert nft_may_narrow(nft_plan_from(nft_desired(WEB, CLIENT, FROM_CLIENTS), after), after)


def test_nft_a_rebuilt_table_may_narrow():
    after = nft_desired(WEB, CLIENT, FROM_CLIENTS)
    assert nft_may_narrow(nft_plan.diff(after, Table(exists=False)), after)


def test_nft_an_admin_deny_set_growing_may_narrow_an_allow_set_growing_cannot():
    deny = anp("deny-b", 1, ns_subject({NAME_LABEL: "x"}), ingress=[arule(DENY, [a_namespaces({"team": "b"})])])
    allow = anp("allow-clients", 2, ns_subject({NAME_LABEL: "x"}),
                ingress=[arule(ALLOW, [a_pods({NAME_LABEL: "x"}, {"role": "client"})])])
    b_1 = pod("b/one", "n2", "10.0.5.1", {})
    b_2 = pod("b/two", "n2", "10.0.6.1", {})
    before = nft_desired(WEB, CLIENT, b_1, FROM_CLIENTS, admin=[deny, allow])
    grown_deny = nft_desired(WEB, CLIENT, b_1, b_2, FROM_CLIENTS, admin=[deny, allow])
    the_plan = nft_plan_from(before, grown_deny)
    assert [c.kind for c in the_plan.changes] == ["set-members"]
    assert nft_may_narrow(the_plan, grown_deny)
    grown_allow = nft_desired(WEB, CLIENT, CLIENT_FAR, b_1, FROM_CLIENTS, admin=[deny, allow])
    the_plan = nft_plan_from(before, grown_allow)
    assert {c.kind for c in the_plan.changes} == {"set-members"}
    assert not nft_may_narrow(the_plan, grown_allow)
