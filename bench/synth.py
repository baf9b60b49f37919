"""Synthetic clusters: the API JSON of Namespaces, Pods and NetworkPolicies of
a multi-team cluster, seeded so that every run measures the same objects.

The shape is chosen so that what the reconciler must write grows linearly
with the cluster, as it does in real clusters that grow by adding teams:
about 100 pods and 10 policies per application namespace, about 10
namespaces per team, and peers that select within a team, within a
namespace, or a fixed set of system pods. Doubling the spec therefore
doubles the work, and a super-linear cost is the reconciler's own.

Policies use the whole API: matchLabels and every matchExpressions operator,
namespaceSelectors (empty, by name, by labels plus expressions), named ports
whose number differs between pods (for ingress and egress), port ranges
(endPort), TCP, UDP and SCTP, ipBlock with except (IPv4 and IPv6), egress
rules, rules with no peers or no ports. A third of the application
namespaces run dual-stack pods; each node has one host-network pod.
"""
from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, replace
from typing import Optional

NAME_LABEL = "kubernetes.io/metadata.name"
NODE = "node-00"                      # the benchmarked node
PODS_PER_NAMESPACE = 100
NAMESPACES_PER_TEAM = 10
APPS_PER_NAMESPACE = 10
POD_NET4 = ipaddress.IPv4Address("10.128.0.0")    # node i owns 10.128.0.0 + i * NODE_BLOCK, a /20
NODE_BLOCK = 4096
SPARE_FROM = 4000                     # addresses of a node's block kept for pods added later
POD_NET6 = "fd00:10:244:{node:x}::{host:x}"
NODE_IP = "172.18.{hi}.{lo}"
SYSTEM_NAMESPACES = ("kube-system", "monitoring", "ingress-nginx")
TIERS = ("frontend", "backend", "db", "cache")
RULE_KINDS = ("from-ingress", "from-team-frontends", "data-access", "egress",
              "from-namespace", "from-team", "open-ports")


@dataclass(frozen=True)
class Spec:
    """How big a cluster to make. `extra_remote_pods` adds pods of the same
    kinds on other nodes than NODE only, after the rest is generated: the
    cluster is otherwise identical to the one without them."""
    name: str
    pods: int
    policies: int
    nodes: int
    seed: int = 1
    extra_remote_pods: int = 0

    @property
    def app_namespaces(self) -> int:
        return max(3, self.pods // PODS_PER_NAMESPACE)

    @property
    def teams(self) -> int:
        return max(2, self.app_namespaces // NAMESPACES_PER_TEAM)


SIZES = {
    "small": Spec("small", 1_000, 100, 20),
    "medium": Spec("medium", 10_000, 1_000, 30),
    "large": Spec("large", 50_000, 5_000, 50),
}


def doubled(spec: Spec) -> Spec:
    """Twice the pods, policies and namespaces on the same nodes."""
    return replace(spec, name=f"{spec.name}x2", pods=spec.pods * 2, policies=spec.policies * 2)


def with_remote_peers(spec: Spec, extra: int) -> Spec:
    return replace(spec, name=f"{spec.name}+{extra}remote", extra_remote_pods=extra)


@dataclass(frozen=True)
class Synthetic:
    spec: Spec
    namespaces: tuple[dict, ...]
    pods: tuple[dict, ...]
    policies: tuple[dict, ...]


def node_name(index: int) -> str:
    return f"node-{index:02d}"


def node_ip(index: int) -> str:
    return NODE_IP.format(hi=(index + 1) // 256, lo=(index + 1) % 256)


def pod_ips(node_index: int, host: int, dual: bool) -> tuple[str, ...]:
    """Addresses of the host-th pod of a node, from the node's own block."""
    if not 0 <= host < NODE_BLOCK - 2:
        raise ValueError(f"node {node_name(node_index)}: pod address index {host} out of its block")
    v4 = str(POD_NET4 + node_index * NODE_BLOCK + 2 + host)
    if not dual:
        return (v4,)
    return v4, POD_NET6.format(node=node_index, host=host + 2)


def node_index(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


# --- objects -----------------------------------------------------------------

def namespace_object(name: str, labels: dict) -> dict:
    return {"metadata": {"name": name, "labels": {**labels, NAME_LABEL: name},
                         "creationTimestamp": "2024-01-01T00:00:00Z"},
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}


def pod_object(namespace: str, name: str, node: int, ips: tuple[str, ...], labels: dict,
               ports: list[tuple[str, int, str]], host_network: bool = False,
               phase: str = "Running") -> dict:
    """A pod with the fields a real one carries, so list sizes are realistic
    (managedFields left out, as clients may ask the server to)."""
    owner = labels.get("app") or labels.get("k8s-app") or name
    status = {
        "phase": phase, "hostIP": node_ip(node), "hostIPs": [{"ip": node_ip(node)}],
        "qosClass": "Burstable", "startTime": "2024-01-01T00:00:00Z",
        "conditions": [{"type": t, "status": "True", "lastProbeTime": None,
                        "lastTransitionTime": "2024-01-01T00:00:00Z"}
                       for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")],
        "containerStatuses": [{"name": "main", "ready": True, "restartCount": 0, "started": True,
                               "image": f"registry.example/{owner}:1.0",
                               "imageID": f"registry.example/{owner}@sha256:" + "0" * 64,
                               "containerID": "containerd://" + "0" * 64,
                               "state": {"running": {"startedAt": "2024-01-01T00:00:00Z"}}}],
    }
    if phase == "Running":
        status["podIP"] = ips[0]
        status["podIPs"] = [{"ip": ip} for ip in ips]
    return {
        "metadata": {"name": name, "namespace": namespace, "labels": labels,
                     "creationTimestamp": "2024-01-01T00:00:00Z",
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                          "name": f"{owner}-7d4b9c", "uid": "0" * 8,
                                          "controller": True, "blockOwnerDeletion": True}]},
        "spec": {
            "nodeName": node_name(node), "hostNetwork": host_network,
            "serviceAccountName": "default", "restartPolicy": "Always", "dnsPolicy": "ClusterFirst",
            "containers": [{
                "name": "main", "image": f"registry.example/{owner}:1.0",
                "ports": [{"name": n, "containerPort": p, "protocol": proto} for n, p, proto in ports],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                              "limits": {"memory": "256Mi"}},
                "env": [{"name": "LOG_LEVEL", "value": "info"}],
            }],
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                             "effect": "NoExecute", "tolerationSeconds": 300}],
        },
        "status": status,
    }


def policy_object(namespace: str, name: str, spec: dict) -> dict:
    return {"metadata": {"name": name, "namespace": namespace,
                         "creationTimestamp": "2024-01-01T00:00:00Z"}, "spec": spec}


def _app_ports(tier: str, app_index: int) -> list[tuple[str, int, str]]:
    """The same port names with different numbers across tiers and apps."""
    if tier == "frontend":
        http = 80 if app_index % 8 == 4 else 8080
        return [("http", http, "TCP"), ("metrics", 9090, "TCP"), ("statsd", 8125, "UDP")]
    if tier == "backend":
        return [("http", 8000, "TCP"), ("grpc", 9000, "TCP"), ("metrics", 9100, "TCP")]
    if tier == "db":
        return [("db", 5432, "TCP"), ("metrics", 9187, "TCP")]
    return [("db", 6379, "TCP"), ("metrics", 9121, "TCP"), ("statsd", 9125, "UDP")]


def _requirement(key: str, operator: str, values: tuple = ()) -> dict:
    return {"key": key, "operator": operator, **({"values": list(values)} if values else {})}


def _sel(labels: Optional[dict] = None, *expressions: tuple) -> dict:
    out: dict = {}
    if labels:
        out["matchLabels"] = labels
    if expressions:
        out["matchExpressions"] = [_requirement(*e) for e in expressions]
    return out


def _policy_spec(kind: str, app: str, team: str) -> dict:
    """One application policy; `kind` is one of RULE_KINDS."""
    by_app = _sel({"app": app})
    if kind == "from-ingress":
        return {"podSelector": by_app, "ingress": [{
            "from": [{"namespaceSelector": {},
                      "podSelector": _sel({"app.kubernetes.io/name": "ingress-nginx"})}],
            "ports": [{"port": "http"}, {"protocol": "TCP", "port": 8443}]}]}
    if kind == "from-team-frontends":
        return {"podSelector": _sel(None, ("app", "In", [app]), ("version", "Exists")),
                "ingress": [{
                    "from": [{"namespaceSelector": _sel({"team": team}, ("env", "In", ["prod", "staging"])),
                              "podSelector": _sel(None, ("tier", "In", ["frontend"]),
                                                  ("canary", "DoesNotExist"))}],
                    "ports": [{"protocol": "TCP", "port": 8000, "endPort": 8100},
                              {"port": "grpc"}]}]}
    if kind == "data-access":
        return {"podSelector": by_app, "policyTypes": ["Ingress"], "ingress": [{
            "from": [{"podSelector": _sel({"tier": "backend"})},
                     {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.128.0.0/9"]}}],
            "ports": [{"port": "db"}, {"protocol": "TCP", "port": 5432}]}]}
    if kind == "egress":
        return {"podSelector": by_app, "policyTypes": ["Egress"], "egress": [
            {"to": [{"podSelector": _sel(None, ("tier", "In", ["db", "cache"]))}],
             "ports": [{"port": "db"}]},
            {"to": [{"namespaceSelector": _sel({"team": team}),
                     "podSelector": _sel({"tier": "backend"})}],
             "ports": [{"port": "http"}, {"port": "grpc"}]},
            {"to": [{"ipBlock": {"cidr": "0.0.0.0/0",
                                 "except": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]}},
                    {"ipBlock": {"cidr": "::/0", "except": ["fd00::/8"]}}],
             "ports": [{"protocol": "TCP", "port": 443}, {"protocol": "UDP", "port": 443}]}]}
    if kind == "from-namespace":
        return {"podSelector": _sel(None, ("app", "In", [app]), ("version", "NotIn", ["v0"])),
                "ingress": [{
                    "from": [{"podSelector": {}},
                             {"ipBlock": {"cidr": "192.168.0.0/16",
                                          "except": ["192.168.1.0/24", "192.168.2.0/24"]}}],
                    "ports": [{"port": 8080}, {"protocol": "UDP", "port": "statsd"},
                              {"protocol": "SCTP", "port": 3868}]}]}
    if kind == "from-team":
        return {"podSelector": by_app, "ingress": [{"from": [{"namespaceSelector": _sel({"team": team})}]}]}
    if kind == "open-ports":
        return {"podSelector": by_app, "policyTypes": ["Ingress", "Egress"],
                "ingress": [{"ports": [{"protocol": "TCP", "port": 9000, "endPort": 9010}]}],
                "egress": [{"ports": [{"protocol": "TCP", "port": 443}]},
                           {"to": [{"ipBlock": {"cidr": "fd00:10:244::/48",
                                                "except": ["fd00:10:244:1::/64"]}}]}]}
    raise ValueError(f"policy kind {kind!r}: unknown")


def _namespace_policies(namespace: str, index: int, team: str, count: int) -> list[dict]:
    apps = [f"svc-{j}" for j in range(APPS_PER_NAMESPACE)]
    out = []
    for k in range(count):
        if k == 0:
            types = ["Ingress", "Egress"] if index % 2 == 0 else ["Ingress"]
            out.append(policy_object(namespace, "default-deny", {"podSelector": {}, "policyTypes": types}))
        elif k == 1:
            out.append(policy_object(namespace, "allow-dns", {
                "podSelector": {}, "policyTypes": ["Egress"], "egress": [{
                    "to": [{"namespaceSelector": _sel({NAME_LABEL: "kube-system"}),
                            "podSelector": _sel({"k8s-app": "kube-dns"})}],
                    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": "dns-tcp"}]}]}))
        elif k == 2:
            out.append(policy_object(namespace, "allow-monitoring", {
                "podSelector": {}, "ingress": [{
                    "from": [{"namespaceSelector": _sel({NAME_LABEL: "monitoring"}),
                              "podSelector": _sel({"app": "prometheus"})}],
                    "ports": [{"port": "metrics"}]}]}))
        else:
            kind = RULE_KINDS[(k - 3) % len(RULE_KINDS)]
            app = apps[(k - 3) % len(apps)]
            out.append(policy_object(namespace, f"{kind}-{app}-{k}", _policy_spec(kind, app, team)))
    return out


# --- the cluster ------------------------------------------------------------------

class _Addresses:
    """Next free address index per node."""

    def __init__(self, nodes: int):
        self.next = [0] * nodes

    def take(self, node: int, dual: bool) -> tuple[str, ...]:
        host = self.next[node]
        if host >= SPARE_FROM:
            raise ValueError(f"node {node_name(node)}: more than {SPARE_FROM} pods")
        self.next[node] += 1
        return pod_ips(node, host, dual)


def generate(spec: Spec) -> Synthetic:
    """The cluster of `spec`; the same spec always gives the same objects."""
    if spec.nodes < 2:
        raise ValueError("Spec.nodes: at least 2, so that some pods are remote")
    rng = random.Random(spec.seed)
    addresses = _Addresses(spec.nodes)
    namespaces = [namespace_object("kube-system", {}), namespace_object("monitoring", {"purpose": "observability"}),
                  namespace_object("ingress-nginx", {"purpose": "edge"})]
    pods: list[dict] = []

    deal: list[int] = []

    def next_node() -> int:
        """Nodes dealt in shuffled rounds, the way a scheduler spreads
        replicas: every node holds its share of the pods, give or take one."""
        if not deal:
            deal.extend(rng.sample(range(spec.nodes), spec.nodes))
        return deal.pop()

    def add_pod(ns: str, name: str, labels: dict, ports, node: Optional[int] = None,
                dual: bool = False) -> None:
        node = next_node() if node is None else node
        pods.append(pod_object(ns, name, node, addresses.take(node, dual), labels, ports))

    for n in range(spec.nodes):
        ip = node_ip(n)
        pods.append(pod_object("kube-system", f"kube-proxy-{node_name(n)}", n, (ip,),
                               {"k8s-app": "kube-proxy"}, [("metrics", 10249, "TCP")],
                               host_network=True))
    for i in range(2):
        add_pod("kube-system", f"coredns-{i}", {"k8s-app": "kube-dns"},
                [("dns", 53, "UDP"), ("dns-tcp", 53, "TCP"), ("metrics", 9153, "TCP")], dual=True)
    for i in range(2):
        add_pod("monitoring", f"prometheus-{i}", {"app": "prometheus"}, [("web", 9090, "TCP")])
    for i in range(3):
        add_pod("ingress-nginx", f"controller-{i}", {"app.kubernetes.io/name": "ingress-nginx"},
                [("http", 80, "TCP"), ("https", 443, "TCP")], dual=True)

    app_ns = []
    for i in range(spec.app_namespaces):
        name = f"app-{i:04d}"
        team = f"t{i % spec.teams:03d}"
        dual = i % 3 == 0
        labels = {"team": team, "env": rng.choice(("prod", "staging", "dev")),
                  "stack": "dual" if dual else "single"}
        if rng.random() < 0.5:
            labels["istio-injection"] = "enabled"
        namespaces.append(namespace_object(name, labels))
        app_ns.append((name, team, dual))

    def app_pod(k: int, node: Optional[int], suffix: str = "") -> None:
        ns, _, dual = app_ns[k % len(app_ns)]
        j = (k // len(app_ns)) % APPS_PER_NAMESPACE
        replica = k // (len(app_ns) * APPS_PER_NAMESPACE)
        tier = TIERS[j % len(TIERS)]
        labels = {"app": f"svc-{j}", "tier": tier, "version": rng.choice(("v1", "v2")),
                  "pod-template-hash": "7d4b9c"}
        if rng.random() < 0.1:
            labels["canary"] = "true"
        add_pod(ns, f"svc-{j}-{replica:04d}{suffix}", labels, _app_ports(tier, j), node, dual)

    system = len(pods)
    for k in range(max(0, spec.pods - system)):
        app_pod(k, None)
    # A few finished pods: listed by the API, never part of the model.
    for k in range(min(5, len(pods) // 200)):
        pods[system + k * 97]["status"] = {**pods[system + k * 97]["status"], "phase": "Succeeded"}

    extra = random.Random(spec.seed + 1)
    for k in range(spec.extra_remote_pods):
        app_pod(k, extra.randrange(1, spec.nodes), suffix="-x")

    policies: list[dict] = []
    per_ns, rest = divmod(spec.policies, len(app_ns))
    for i, (ns, team, _) in enumerate(app_ns):
        policies += _namespace_policies(ns, i, team, per_ns + (1 if i < rest else 0))
    return Synthetic(spec, tuple(namespaces), tuple(pods), tuple(policies))
