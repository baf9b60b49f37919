"""What admin policies cost a node: the check size's cluster with 50
AdminNetworkPolicies and a BaselineAdminNetworkPolicy, against the same
cluster without them, on the cycles a running daemon repeats: the idle loop
cycle and one pod coming or going.

The admin policies are the guard rails a cluster's administrators write: a
few that hold for every namespace (no instance metadata, no control-plane
ports, monitoring may always scrape), and the rest for one namespace or
team each (dev may not reach prod databases, a team's traffic passed on to
its own NetworkPolicies, the ingress controller always admitted). Nodes
carry the labels their `nodes` peers select. Both runs serve the objects
from the same real API server, the second with the admin kinds served.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from bench import netns, scenarios, synth
from bench.checks import Check
from bench.run import _serve, _total, model, quickest_stages, run_cycle_process
from lib.compile import compile_node
from tests.apiserver import ApiServer

ADMIN_POLICIES = 50
CLUSTER_WIDE = 3
MAX_OVERHEAD = 1.20                # admin cycle at most this times the plain one
CONTROL_PLANE_NODE = 1             # node-01 is labelled control-plane
REPEATS = 3                        # runs per cycle kind; each stage's quickest is kept
CYCLES = ("idle", "remote-pod", "local-pod")


def _ns(name: str) -> dict:
    return {"matchLabels": {synth.NAME_LABEL: name}}


def _anp(name: str, priority: int, subject: dict, ingress=(), egress=()) -> dict:
    spec = {"priority": priority, "subject": subject}
    if ingress:
        spec["ingress"] = list(ingress)
    if egress:
        spec["egress"] = list(egress)
    return {"apiVersion": "policy.networking.k8s.io/v1alpha1", "kind": "AdminNetworkPolicy",
            "metadata": {"name": name, "creationTimestamp": "2024-01-01T00:00:00Z"}, "spec": spec}


def admin_policies(cluster: synth.Synthetic, count: int = ADMIN_POLICIES) -> list[dict]:
    """`count` ANPs, priorities 1..count: CLUSTER_WIDE for every namespace,
    the rest one application namespace each, three kinds in turn."""
    everyone = {"namespaces": {}}
    out = [
        _anp("no-instance-metadata", 1, everyone, egress=[{
            "name": "imds", "action": "Deny",
            "to": [{"networks": ["169.254.169.254/32", "fd00:ec2::254/128"]}]}]),
        _anp("no-control-plane", 2, everyone, egress=[{
            "name": "etcd-and-apiserver", "action": "Deny",
            "to": [{"nodes": {"matchLabels": {"node-role.kubernetes.io/control-plane": ""}}}],
            "ports": [{"portRange": {"protocol": "TCP", "start": 2379, "end": 2380}},
                      {"portNumber": {"protocol": "TCP", "port": 6443}}]}]),
        _anp("monitoring-may-scrape", 3, everyone, ingress=[{
            "name": "prometheus", "action": "Allow",
            "from": [{"pods": {"namespaceSelector": {"matchLabels": {"purpose": "observability"}},
                               "podSelector": {"matchLabels": {"app": "prometheus"}}}}],
            "ports": [{"namedPort": "metrics"}]}]),
    ][:CLUSTER_WIDE]
    apps = [o for o in cluster.namespaces if "team" in o["metadata"]["labels"]]
    for i in range(count - len(out)):
        ns = apps[i % len(apps)]["metadata"]
        name, team = ns["name"], ns["labels"]["team"]
        priority = len(out) + 1
        kind = i % 3
        if kind == 0:
            out.append(_anp(f"p{priority:02d}-{name}-no-dev-to-db", priority,
                            {"pods": {"namespaceSelector": _ns(name),
                                      "podSelector": {"matchLabels": {"tier": "db"}}}},
                            ingress=[{"name": "dev", "action": "Deny",
                                      "from": [{"namespaces": {"matchLabels": {"env": "dev"}}}],
                                      "ports": [{"namedPort": "db"}]}]))
        elif kind == 1:
            out.append(_anp(f"p{priority:02d}-{name}-team-to-networkpolicy", priority, {"namespaces": _ns(name)},
                            ingress=[{"name": "own-team", "action": "Pass",
                                      "from": [{"namespaces": {"matchLabels": {"team": team}}}]}]))
        else:
            out.append(_anp(f"p{priority:02d}-{name}-ingress-controller", priority, {"namespaces": _ns(name)},
                            ingress=[{"name": "edge", "action": "Allow",
                                      "from": [{"namespaces": _ns("ingress-nginx")}],
                                      "ports": [{"portNumber": {"protocol": "TCP", "port": 8080}},
                                                {"namedPort": "http"}]}]))
    return out


def baseline_policy() -> dict:
    """Where no NetworkPolicy selects a pod: the edge and monitoring may
    reach it, dev may not, and nothing leaves for the documentation ranges."""
    return {"apiVersion": "policy.networking.k8s.io/v1alpha1", "kind": "BaselineAdminNetworkPolicy",
            "metadata": {"name": "default", "creationTimestamp": "2024-01-01T00:00:00Z"},
            "spec": {"subject": {"namespaces": {}},
                     "ingress": [{"name": "edge", "action": "Allow",
                                  "from": [{"namespaces": _ns("ingress-nginx")}]},
                                 {"name": "no-dev", "action": "Deny",
                                  "from": [{"namespaces": {"matchLabels": {"env": "dev"}}}]}],
                     "egress": [{"name": "no-documentation-ranges", "action": "Deny",
                                 "to": [{"networks": ["192.0.2.0/24", "2001:db8::/32"]}]}]}}


def node_objects(spec: synth.Spec) -> list[dict]:
    out = []
    for n in range(spec.nodes):
        labels = {"kubernetes.io/hostname": synth.node_name(n)}
        if n == CONTROL_PLANE_NODE:
            labels["node-role.kubernetes.io/control-plane"] = ""
        out.append({"metadata": {"name": synth.node_name(n), "labels": labels,
                                 "resourceVersion": "1"},
                    "status": {"addresses": [{"type": "InternalIP", "address": synth.node_ip(n)},
                                             {"type": "Hostname", "address": synth.node_name(n)}]}})
    return out


@dataclass(frozen=True)
class Variant:
    name: str
    admin_served: bool
    rules: int
    cycles: dict                   # cycle key -> report (quickest_stages)


@dataclass(frozen=True)
class AdminResult:
    spec: synth.Spec
    plain: Variant
    admin: Variant


def _states(cluster: synth.Synthetic, with_admin: bool):
    first = scenarios.initial(cluster)
    if with_admin:
        first = replace(first, admin_policies=tuple(admin_policies(cluster)),
                        baseline_policies=(baseline_policy(),), nodes=tuple(node_objects(cluster.spec)))
    parsed = model(first)
    desired = compile_node(parsed, synth.NODE)
    rules = sum(len(c.rules) for f in (desired.v4, desired.v6) for c in f.chains)
    remote = scenarios.remote_pod_joins(first, parsed, desired, synth.NODE)
    local = scenarios.local_pod_added(first, parsed, desired, synth.NODE)
    return first, {"remote-pod": remote.state, "local-pod": local.state}, rules


def _variant(cluster: synth.Synthetic, backend: str, with_admin: bool,
             progress: Callable[[str], None]) -> Variant:
    name = "with admin policies" if with_admin else "without"
    first, changed, rules = _states(cluster, with_admin)
    best: dict = {}
    with netns.namespace() as ns:
        server = ApiServer(sock=netns.bound_socket(ns), admin_api=with_admin)
        server.start()
        try:
            for attempt in range(REPEATS):
                progress(f"{cluster.spec.name} {name}: run {attempt + 1}/{REPEATS}")
                _serve(server, first)
                run_cycle_process(ns, server.url, backend, cycles=1)     # first apply
                out, _ = run_cycle_process(ns, server.url, backend, cycles=2)
                runs = {"idle": out}
                for key in ("remote-pod", "local-pod"):
                    _serve(server, changed[key])
                    runs[key], _ = run_cycle_process(ns, server.url, backend, cycles=1)
                    _serve(server, first)
                    run_cycle_process(ns, server.url, backend, cycles=1)  # back to the first state
                for key, r in runs.items():
                    best.setdefault(key, []).append(r)
        finally:
            server.stop()
    return Variant(name, with_admin, rules, {k: quickest_stages(r) for k, r in best.items()})


def run_admin(spec: synth.Spec, backend: str,
              progress: Callable[[str], None] = lambda _: None) -> AdminResult:
    cluster = synth.generate(spec)
    return AdminResult(spec, _variant(cluster, backend, False, progress),
                       _variant(cluster, backend, True, progress))


# --- judged and shown -------------------------------------------------------------

STAGES = ("fetch", "parse", "compile", "read", "diff", "apply", "conntrack")
TITLES = {"idle": "idle loop cycle", "remote-pod": "remote pod joins", "local-pod": "local pod added"}


def checks(result: AdminResult) -> list:
    out = []
    for key in CYCLES:
        plain, admin = _total(result.plain.cycles[key]), _total(result.admin.cycles[key])
        limit = MAX_OVERHEAD * plain
        out.append(Check(f"{ADMIN_POLICIES} admin policies and a baseline: {TITLES[key]} <= "
                         f"{MAX_OVERHEAD:g} x without them",
                         admin <= limit,
                         f"{admin:.3f} s {'<=' if admin <= limit else '>'} {MAX_OVERHEAD:g} x "
                         f"{plain:.3f} s = {limit:.3f} s (x{admin / plain if plain else 0:.2f})"))
    return out


def table(result: AdminResult) -> str:
    spec = result.spec
    lines = [f"{spec.name}: {spec.pods:,} pods, {spec.policies:,} policies, without and with "
             f"{ADMIN_POLICIES} AdminNetworkPolicies and a BaselineAdminNetworkPolicy "
             f"(seconds: per stage the quickest of {REPEATS} runs, totals their sum)"]
    head = f"  {'':24}" + "".join(f"{v.name:>22}" for v in (result.plain, result.admin))
    lines.append(head)
    lines.append(f"  {'rules':24}" + "".join(f"{v.rules:>22,}" for v in (result.plain, result.admin)))
    for key in CYCLES:
        lines.append(f"  {TITLES[key]:24}" + "".join(
            f"{_total(v.cycles[key]):>22.3f}" for v in (result.plain, result.admin)))
        seen = {s for v in (result.plain, result.admin) for s in v.cycles[key]["seconds"]}
        stages = [s for s in STAGES if s in seen] + sorted(seen - set(STAGES))
        for stage in stages:
            lines.append(f"    {stage:22}" + "".join(
                f"{v.cycles[key]['seconds'].get(stage, 0.0):>22.3f}" for v in (result.plain, result.admin)))
    return "\n".join(lines)

