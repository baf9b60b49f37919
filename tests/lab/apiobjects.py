"""API objects for one state of a case, shaped as kube-apiserver serves them.

The reconciler must see what it would see in a real cluster: running pods with
their addresses (IPv4 first), host-network pods with their node's addresses,
Namespaces with their labels, Nodes with their labels and addresses, the
policies of every kind exactly as written.
"""
from __future__ import annotations

import copy
import uuid

from lib.model import Cluster
from lib.objects import parse_cluster

from .case import (ADMIN_NETWORK_POLICY, BASELINE_ADMIN_NETWORK_POLICY, NETWORK_POLICY, Case,
                   Namespace, Node, Pod, State)

_UID_ROOT = uuid.UUID("6b706d2d-6c61-4200-8000-000000000000")


def _uid(*parts: str) -> str:
    return str(uuid.uuid5(_UID_ROOT, "/".join(parts)))


def namespace_object(case: Case, ns: Namespace) -> dict:
    return {"metadata": {"name": ns.name, "uid": _uid(case.name, "ns", ns.name),
                         "labels": dict(ns.labels)},
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"}}


def pod_object(case: Case, pod: Pod, node: Node) -> dict:
    ports = []
    for p in pod.ports:
        entry = {"containerPort": p.port, "protocol": p.protocol}
        if p.name:
            entry["name"] = p.name
        ports.append(entry)
    container = {"name": "main", "image": "registry.k8s.io/pause:3.9"}
    if ports:
        container["ports"] = ports
    spec = {"nodeName": pod.node, "containers": [container]}
    if pod.host_network:
        spec["hostNetwork"] = True
    return {
        "metadata": {"name": pod.name, "namespace": pod.namespace,
                     "uid": _uid(case.name, "pod", pod.key, str(pod.generation)),
                     "labels": dict(pod.labels)},
        "spec": spec,
        "status": {"phase": "Running", "hostIP": node.ip,
                   "hostIPs": [{"ip": node.ip}, {"ip": node.ipv6}],
                   "podIP": pod.ip, "podIPs": [{"ip": pod.ip}, {"ip": pod.ipv6}]},
    }


def node_object(node: Node) -> dict:
    labels = {"kubernetes.io/hostname": node.name, **dict(node.labels)}
    return {"metadata": {"name": node.name, "labels": labels},
            "spec": {"podCIDR": node.pod_cidr, "podCIDRs": [node.pod_cidr, node.pod_cidr6]},
            "status": {"addresses": [{"type": "InternalIP", "address": node.ip},
                                     {"type": "InternalIP", "address": node.ipv6},
                                     {"type": "Hostname", "address": node.name}]}}


def state_objects(case: Case, state: State) -> dict[str, list[dict]]:
    """Keyword arguments for ApiServer.set_state."""
    nodes = {n.name: n for n in case.nodes}

    def policies(kind: str) -> list[dict]:
        return [copy.deepcopy(p) for p in state.policies if p["kind"] == kind]

    return {
        "namespaces": [namespace_object(case, ns) for ns in state.namespaces],
        "pods": [pod_object(case, p, nodes[p.node]) for p in state.pods],
        "policies": policies(NETWORK_POLICY),
        "admin_policies": policies(ADMIN_NETWORK_POLICY),
        "baseline_policies": policies(BASELINE_ADMIN_NETWORK_POLICY),
        "nodes": [node_object(n) for n in case.nodes],
    }


def state_cluster(case: Case, state: State) -> Cluster:
    """The model a reconciler builds from what the lab's API serves in `state`."""
    objs = state_objects(case, state)
    return parse_cluster(objs["namespaces"], objs["pods"], objs["policies"],
                         admin_policies=objs["admin_policies"],
                         baseline_policies=objs["baseline_policies"], nodes=objs["nodes"])
