"""The cycles the benchmark measures, as changes to the objects the API serves.

Each change is picked from what the node's compiled state holds, so that it
surely concerns the node: the remote pod that joins is a copy of one already
in a peer set used here, the local pod a copy of an isolated one, the edited
policy one that selects local pods, the relabelled namespace one whose pods
are peers here.
"""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, replace

from bench import synth
from lib.compile import pod_chain_name
from lib.model import EGRESS, INGRESS, Cluster, Pod
from lib.ruleset import DesiredState
from lib.selectors import ClusterIndex

REMOTE_SPARE = synth.SPARE_FROM          # address index of the remote pod that joins
LOCAL_SPARE = synth.SPARE_FROM + 1       # and of the local pod added


@dataclass(frozen=True)
class State:
    namespaces: tuple[dict, ...]
    pods: tuple[dict, ...]
    policies: tuple[dict, ...]
    admin_policies: tuple[dict, ...] = ()     # bench.admin's runs only
    baseline_policies: tuple[dict, ...] = ()
    nodes: tuple[dict, ...] = ()


@dataclass(frozen=True)
class Step:
    key: str            # short identifier, used by the checks
    title: str          # column heading
    state: State        # what the API serves during this cycle
    detail: str         # the object changed


def initial(cluster: synth.Synthetic) -> State:
    return State(cluster.namespaces, cluster.pods, cluster.policies)


def _member_ips(desired: DesiredState) -> Counter:
    """Address -> number of the node's sets that hold it."""
    count: Counter = Counter()
    for s in desired.sets:
        for member in s.members:
            count[member.split(",", 1)[0]] += 1
    return count


def _pod_object(state: State, pod: Pod) -> dict:
    for obj in state.pods:
        meta = obj["metadata"]
        if meta["namespace"] == pod.namespace and meta["name"] == pod.name:
            return obj
    raise LookupError(f"Pod {pod.key}: not in the served objects")


def _copy_pod(obj: dict, name: str, spare: int) -> dict:
    """A new pod like `obj` on the same node, with addresses of its own."""
    new = copy.deepcopy(obj)
    new["metadata"]["name"] = name
    node = synth.node_index(new["spec"]["nodeName"])
    ips = synth.pod_ips(node, spare, dual=len(new["status"]["podIPs"]) > 1)
    new["status"]["podIP"] = ips[0]
    new["status"]["podIPs"] = [{"ip": ip} for ip in ips]
    return new


def remote_pod_joins(state: State, cluster: Cluster, desired: DesiredState, node: str) -> Step:
    members = _member_ips(desired)
    candidates = [p for p in cluster.pods if p.node != node and not p.host_network
                  and members.get(p.ips[0], 0) > 0]
    if not candidates:
        raise LookupError("no remote pod is a peer of this node's rules")
    pod = max(candidates, key=lambda p: (members[p.ips[0]], p.namespace, p.name))
    new = _copy_pod(_pod_object(state, pod), pod.name + "-joined", REMOTE_SPARE)
    detail = (f"pod {pod.namespace}/{new['metadata']['name']} on {pod.node}, labels of "
              f"{pod.key} (in {members[pod.ips[0]]} sets)")
    return Step("remote-pod", "remote pod", replace(state, pods=state.pods + (new,)), detail)


def _isolated(desired: DesiredState, pod: Pod, direction: str) -> bool:
    name = pod_chain_name(pod, direction)
    return any(c.name == name for c in desired.v4.chains + desired.v6.chains)


def local_pod_added(state: State, cluster: Cluster, desired: DesiredState, node: str) -> Step:
    local = sorted((p for p in cluster.pods if p.node == node and not p.host_network),
                   key=lambda p: (-len(p.ips), p.namespace, p.name))
    both = [p for p in local if _isolated(desired, p, INGRESS) and _isolated(desired, p, EGRESS)]
    if not both:
        raise LookupError(f"no pod on {node} is isolated for ingress and egress")
    pod = both[0]
    new = _copy_pod(_pod_object(state, pod), pod.name + "-added", LOCAL_SPARE)
    detail = f"pod {pod.namespace}/{new['metadata']['name']} on {node}, labels of {pod.key}"
    return Step("local-pod", "local pod", replace(state, pods=state.pods + (new,)), detail)


def policy_edited(state: State, cluster: Cluster, desired: DesiredState, node: str) -> Step:
    index = ClusterIndex(cluster)
    local = [p for p in index.pods if p.node == node]
    applying = {pol.key for p in local for pol in index.policies_for(p)}
    for i, obj in enumerate(state.policies):
        meta, spec = obj["metadata"], obj["spec"]
        key = f"{meta['namespace']}/{meta['name']}"
        ingress = spec.get("ingress") or []
        if key in applying and spec.get("podSelector") and ingress and ingress[0].get("ports"):
            edited = copy.deepcopy(obj)
            edited["spec"]["ingress"][0]["ports"].append({"protocol": "TCP", "port": 8444})
            selected = sum(1 for p in local if any(pol.key == key for pol in index.policies_for(p)))
            policies = state.policies[:i] + (edited,) + state.policies[i + 1:]
            return Step("policy", "policy edit", replace(state, policies=policies),
                        f"NetworkPolicy {key}: port 8444 added to ingress[0] "
                        f"({selected} pods here)")
    raise LookupError(f"no policy with ingress ports selects a pod of {node}")


def namespace_relabelled(state: State, cluster: Cluster, desired: DesiredState, node: str) -> Step:
    members = _member_ips(desired)
    weight: Counter = Counter()
    for p in cluster.pods:
        if not p.host_network:
            weight[p.namespace] += members.get(p.ips[0], 0)
    teams = sorted({o["metadata"]["labels"]["team"] for o in state.namespaces
                    if "team" in o["metadata"].get("labels", {})})
    for name, _ in sorted(weight.items(), key=lambda kv: (-kv[1], kv[0])):
        for i, obj in enumerate(state.namespaces):
            labels = obj["metadata"].get("labels", {})
            if obj["metadata"]["name"] != name or "team" not in labels:
                continue
            old = labels["team"]
            new_team = teams[(teams.index(old) + 1) % len(teams)]
            edited = copy.deepcopy(obj)
            edited["metadata"]["labels"]["team"] = new_team
            namespaces = state.namespaces[:i] + (edited,) + state.namespaces[i + 1:]
            return Step("namespace", "ns relabel", replace(state, namespaces=namespaces),
                        f"Namespace {name}: team {old} -> {new_team}")
    raise LookupError("no namespace with a team label holds peers of this node")


def local_pods_copied(state: State, cluster: Cluster, node: str) -> State:
    """`state` with every pod of `node` (host network aside) there twice:
    each copy has the labels of its original, so the same policies select
    it, and an address of its own from the node's block."""
    local = [p for p in cluster.pods if p.node == node and not p.host_network]
    first = synth.SPARE_FROM // 2
    if first + len(local) > synth.SPARE_FROM:
        raise LookupError(f"{node}: no room for {len(local)} more pods' addresses")
    taken = {ip for p in cluster.pods for ip in p.ips}
    copies = []
    for i, pod in enumerate(local):
        new = _copy_pod(_pod_object(state, pod), pod.name + "-twin", first + i)
        if new["status"]["podIP"] in taken:
            raise LookupError(f"pod {pod.key}: copy's address {new['status']['podIP']} in use")
        copies.append(new)
    return replace(state, pods=state.pods + tuple(copies))


CHANGES = (remote_pod_joins, local_pod_added, policy_edited, namespace_relabelled)
