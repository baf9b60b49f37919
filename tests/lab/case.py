"""Lab case files: loading, strict validation, defaults, and the state of each step.

A case is written by someone who has never read this code, so every field we
do not know is an error that names it and the file: a typo must never turn a
check into a silent pass. The result is a list of fully resolved states (one
per step) that the rest of the lab consumes without looking at YAML again.

Where the format leaves room, the lab reads it like this:
- a step applies deletePods, then deleteNamespaces (which, as in Kubernetes,
  also removes the namespace's pods and policies), then namespaces, then
  pods, then policies;
- pods without a node are spread by their position among the pods created so
  far in the file (the k-th pod goes to node k mod N);
- a default address is the lowest one from .10 up that no current pod holds
  and no pod of the same batch claims explicitly;
- a pod that moves to another node (or gets a new address) is re-created;
- policies and pods must name existing namespaces; policy manifests are
  checked for field names and shapes only, their values are the reconciler's
  to judge;
- `policies` holds NetworkPolicy (networking.k8s.io/v1), AdminNetworkPolicy and
  BaselineAdminNetworkPolicy (policy.networking.k8s.io/v1alpha1) manifests,
  and a step's `policies` replaces the whole set, every kind; the admin
  kinds are cluster-scoped (no namespace), so deleteNamespaces keeps them;
- a node's `labels` are its Node object's, beside kubernetes.io/hostname.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import yaml

TCP, UDP, SCTP = "TCP", "UDP", "SCTP"
PROTOCOLS = (TCP, UDP, SCTP)
IPV4, IPV6 = "IPv4", "IPv6"
FAMILIES = (IPV4, IPV6)
ALLOW, DENY = ".", "X"

_CASE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
_PORT_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")


class CaseError(ValueError):
    """A case file that the lab cannot run as written."""


# ---------------------------------------------------------------- resolved types

@dataclass(frozen=True)
class Port:
    port: int
    protocol: str = TCP
    name: Optional[str] = None


@dataclass(frozen=True)
class Node:
    name: str
    index: int                    # 1-based position in the file
    pod_cidr: str
    pod_cidr6: str
    ip: str
    ipv6: str
    labels: tuple[tuple[str, str], ...] = ()   # sorted, as given (kubernetes.io/hostname is added)


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: tuple[tuple[str, str], ...]   # sorted, with kubernetes.io/metadata.name


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    labels: tuple[tuple[str, str], ...]
    node: str
    ip: str                       # the node's address for host-network pods
    ipv6: str
    host_network: bool
    ports: tuple[Port, ...]
    generation: int = 0           # bumped when the pod is re-created (new node or address)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class External:
    name: str
    ip: str
    ipv6: Optional[str]
    ports: tuple[Port, ...]


@dataclass(frozen=True)
class Table:
    """One expectation: every listed (source, destination) pair on one port."""
    port: int
    protocol: str
    family: str
    cells: tuple[tuple[str, str, bool], ...]   # (source, destination, allowed), diagonal left out
    where: str                                  # "steps[1].expect[0]" for messages
    rows: tuple[str, ...] = ()                  # sources, in the order written
    columns: tuple[str, ...] = ()               # destinations, in the order written


@dataclass(frozen=True)
class State:
    """The cluster as it must be after one step, and what must then hold."""
    index: int                    # 0-based step number
    namespaces: tuple[Namespace, ...]
    pods: tuple[Pod, ...]
    policies: tuple[dict, ...]
    expect: tuple[Table, ...]


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    path: str
    nodes: tuple[Node, ...]
    externals: tuple[External, ...]
    states: tuple[State, ...]
    multi_step: bool
    initial: Optional[State] = None   # with steps: the cluster before the first step (no expect)


# ---------------------------------------------------------------- endpoints

def endpoint_kind(name: str) -> str:
    if name.startswith("node:"):
        return "node"
    if name.startswith("ext:"):
        return "ext"
    return "pod"


# ---------------------------------------------------------------- checking helpers

class _Checker:
    """Field checks that name the file and the field path in every message."""

    def __init__(self, path: str):
        self.path = path

    def fail(self, where: str, message: str) -> CaseError:
        return CaseError(f"{self.path}: {where}: {message}")

    def mapping(self, value: Any, where: str, known: tuple[str, ...],
                required: tuple[str, ...] = ()) -> dict:
        if not isinstance(value, dict):
            raise self.fail(where, f"must be a mapping, got {type(value).__name__}")
        for key in value:
            if key not in known:
                field = f"{where}.{key}" if where else str(key)
                raise self.fail(field, f"unknown field {key!r} (known: {', '.join(known)})")
        for key in required:
            if key not in value:
                field = f"{where}.{key}" if where else key
                raise self.fail(field, "required field missing")
        return value

    def seq(self, value: Any, where: str) -> list:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(where, f"must be a list, got {type(value).__name__}")
        return value

    def string(self, value: Any, where: str, pattern: Optional[re.Pattern] = None) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(where, f"must be a non-empty string, got {value!r}")
        if pattern is not None and not pattern.match(value):
            raise self.fail(where, f"invalid name {value!r}")
        return value

    def labels(self, value: Any, where: str) -> dict[str, str]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(where, "must be a mapping of label keys to values")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or isinstance(v, (dict, list)) or v is None:
                raise self.fail(f"{where}.{k}", f"label values must be strings, got {v!r}")
            out[k] = v if isinstance(v, str) else _scalar_text(v)
        return out

    def boolean(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(where, f"must be true or false, got {value!r}")
        return value

    def port_number(self, value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise self.fail(where, f"must be a port number 1-65535, got {value!r}")
        return value

    def choice(self, value: Any, where: str, choices: tuple[str, ...]) -> str:
        if value not in choices:
            raise self.fail(where, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def address(self, value: Any, where: str, version: int) -> str:
        try:
            addr = ipaddress.ip_address(str(value))
        except ValueError:
            raise self.fail(where, f"not an IP address: {value!r}") from None
        if addr.version != version:
            raise self.fail(where, f"must be an IPv{version} address, got {value!r}")
        return str(addr)

    def network(self, value: Any, where: str, version: int) -> ipaddress._BaseNetwork:
        try:
            net = ipaddress.ip_network(str(value), strict=True)
        except ValueError:
            raise self.fail(where, f"not a network in CIDR form: {value!r}") from None
        if net.version != version:
            raise self.fail(where, f"must be an IPv{version} network, got {value!r}")
        return net


def _scalar_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


# ---------------------------------------------------------------- policies (structure only)

NETWORK_POLICY = "NetworkPolicy"
ADMIN_NETWORK_POLICY, BASELINE_ADMIN_NETWORK_POLICY = "AdminNetworkPolicy", "BaselineAdminNetworkPolicy"
ADMIN_API_VERSION = "policy.networking.k8s.io/v1alpha1"
# kind -> the apiVersion the lab serves it as
POLICY_KINDS = {NETWORK_POLICY: "networking.k8s.io/v1", ADMIN_NETWORK_POLICY: ADMIN_API_VERSION,
                BASELINE_ADMIN_NETWORK_POLICY: ADMIN_API_VERSION}

_META_FIELDS = ("name", "namespace", "labels", "annotations", "uid", "resourceVersion",
                "generation", "creationTimestamp", "generateName")
_SELECTOR_FIELDS = ("matchLabels", "matchExpressions")
_REQUIREMENT_FIELDS = ("key", "operator", "values")
_PEER_FIELDS = ("podSelector", "namespaceSelector", "ipBlock")
_PORT_FIELDS = ("protocol", "port", "endPort")
_ADMIN_SPEC_FIELDS = {ADMIN_NETWORK_POLICY: ("priority", "subject", "ingress", "egress"),
                      BASELINE_ADMIN_NETWORK_POLICY: ("subject", "ingress", "egress")}
_SUBJECT_FIELDS = ("namespaces", "pods")
_NAMESPACED_POD_FIELDS = ("namespaceSelector", "podSelector")
_ADMIN_PEER_FIELDS = {"from": ("namespaces", "pods"), "to": ("namespaces", "pods", "nodes", "networks")}
_ADMIN_PORT_FIELDS = {"portNumber": ("protocol", "port"), "namedPort": None,
                      "portRange": ("protocol", "start", "end")}


def policy_label(policy: dict) -> str:
    """How messages name a policy manifest: ns/name, or `ANP name` / `BANP name`."""
    meta = policy["metadata"]
    if policy["kind"] == NETWORK_POLICY:
        return f"{meta['namespace']}/{meta['name']}"
    return f"{'ANP' if policy['kind'] == ADMIN_NETWORK_POLICY else 'BANP'} {meta['name']}"


def _check_policy(c: _Checker, policy: Any, where: str) -> dict:
    """Field names and shapes of a policy manifest of a kind the lab serves.
    Values are left to the reconciler: invalid values are what it must handle,
    unknown fields are typos."""
    c.mapping(policy, where, ("apiVersion", "kind", "metadata", "spec"),
              ("apiVersion", "kind", "metadata"))
    kind, api_version = policy["kind"], policy["apiVersion"]
    if kind not in POLICY_KINDS:
        raise c.fail(f"{where}.kind", f"the lab does not serve {kind!r}; it serves "
                     + ", ".join(f"{k} ({v})" for k, v in POLICY_KINDS.items()))
    if api_version != POLICY_KINDS[kind]:
        raise c.fail(f"{where}.apiVersion", f"{kind} must be {POLICY_KINDS[kind]} (the version "
                     f"the lab serves), got {api_version!r}")
    if kind != NETWORK_POLICY:
        return _check_admin_policy(c, policy, where, kind)
    meta = c.mapping(policy["metadata"], f"{where}.metadata", _META_FIELDS, ("name", "namespace"))
    c.string(meta["name"], f"{where}.metadata.name", _DNS_SUBDOMAIN)
    c.string(meta["namespace"], f"{where}.metadata.namespace", _DNS_LABEL)
    c.labels(meta.get("labels"), f"{where}.metadata.labels")
    spec = policy.get("spec") or {}
    c.mapping(spec, f"{where}.spec", ("podSelector", "policyTypes", "ingress", "egress"))
    if "podSelector" in spec:
        _check_selector(c, spec["podSelector"], f"{where}.spec.podSelector")
    c.seq(spec.get("policyTypes"), f"{where}.spec.policyTypes")
    for direction, peers_key in (("ingress", "from"), ("egress", "to")):
        for i, rule in enumerate(c.seq(spec.get(direction), f"{where}.spec.{direction}")):
            rw = f"{where}.spec.{direction}[{i}]"
            c.mapping(rule if rule is not None else {}, rw, (peers_key, "ports"))
            rule = rule or {}
            for j, peer in enumerate(c.seq(rule.get(peers_key), f"{rw}.{peers_key}")):
                pw = f"{rw}.{peers_key}[{j}]"
                c.mapping(peer, pw, _PEER_FIELDS)
                for sel in ("podSelector", "namespaceSelector"):
                    if sel in peer:
                        _check_selector(c, peer[sel], f"{pw}.{sel}")
                if "ipBlock" in peer:
                    block = c.mapping(peer["ipBlock"], f"{pw}.ipBlock", ("cidr", "except"), ("cidr",))
                    c.seq(block.get("except"), f"{pw}.ipBlock.except")
            for j, port in enumerate(c.seq(rule.get("ports"), f"{rw}.ports")):
                c.mapping(port if port is not None else {}, f"{rw}.ports[{j}]", _PORT_FIELDS)
    return policy


def _check_admin_policy(c: _Checker, policy: dict, where: str, kind: str) -> dict:
    meta = c.mapping(policy["metadata"], f"{where}.metadata", _META_FIELDS, ("name",))
    if "namespace" in meta:
        raise c.fail(f"{where}.metadata.namespace", f"a {kind} is cluster-scoped: it has no namespace")
    c.string(meta["name"], f"{where}.metadata.name", _DNS_SUBDOMAIN)
    c.labels(meta.get("labels"), f"{where}.metadata.labels")
    spec = policy.get("spec") or {}
    c.mapping(spec, f"{where}.spec", _ADMIN_SPEC_FIELDS[kind])
    if spec.get("subject") is not None:
        c.mapping(spec["subject"], f"{where}.spec.subject", _SUBJECT_FIELDS)
        _check_admin_selectors(c, spec["subject"], f"{where}.spec.subject")
    for direction, peers_key in (("ingress", "from"), ("egress", "to")):
        for i, rule in enumerate(c.seq(spec.get(direction), f"{where}.spec.{direction}")):
            rw = f"{where}.spec.{direction}[{i}]"
            c.mapping(rule if rule is not None else {}, rw, ("name", "action", peers_key, "ports"))
            rule = rule or {}
            for j, peer in enumerate(c.seq(rule.get(peers_key), f"{rw}.{peers_key}")):
                pw = f"{rw}.{peers_key}[{j}]"
                c.mapping(peer, pw, _ADMIN_PEER_FIELDS[peers_key])
                _check_admin_selectors(c, peer, pw)
                c.seq(peer.get("networks"), f"{pw}.networks")
            for j, port in enumerate(c.seq(rule.get("ports"), f"{rw}.ports")):
                pw = f"{rw}.ports[{j}]"
                port = c.mapping(port if port is not None else {}, pw, tuple(_ADMIN_PORT_FIELDS))
                for key, fields in _ADMIN_PORT_FIELDS.items():
                    if fields and port.get(key) is not None:
                        c.mapping(port[key], f"{pw}.{key}", fields)
    return policy


def _check_admin_selectors(c: _Checker, holder: dict, where: str) -> None:
    """The label selectors of an admin subject or peer."""
    for key in ("namespaces", "nodes"):
        if key in holder:
            _check_selector(c, holder[key], f"{where}.{key}")
    if holder.get("pods") is not None:
        pods = c.mapping(holder["pods"], f"{where}.pods", _NAMESPACED_POD_FIELDS)
        for key in _NAMESPACED_POD_FIELDS:
            if key in pods:
                _check_selector(c, pods[key], f"{where}.pods.{key}")


def _check_selector(c: _Checker, sel: Any, where: str) -> None:
    if sel is None:
        return
    c.mapping(sel, where, _SELECTOR_FIELDS)
    c.labels(sel.get("matchLabels"), f"{where}.matchLabels")
    for i, req in enumerate(c.seq(sel.get("matchExpressions"), f"{where}.matchExpressions")):
        c.mapping(req, f"{where}.matchExpressions[{i}]", _REQUIREMENT_FIELDS, ("key", "operator"))
        c.seq(req.get("values"), f"{where}.matchExpressions[{i}].values")


# ---------------------------------------------------------------- cluster pieces

_NODE_FIELDS = ("name", "podCIDR", "podCIDRv6", "ip", "ipv6", "labels")
_NS_FIELDS = ("name", "labels")
_POD_FIELDS = ("namespace", "name", "labels", "node", "ip", "ipv6", "hostNetwork", "ports")
_PORT_DECL_FIELDS = ("name", "containerPort", "protocol")
_EXT_FIELDS = ("name", "ip", "ipv6", "ports")
_TOP_FIELDS = ("name", "description", "cluster", "policies", "expect", "steps")
_CLUSTER_FIELDS = ("nodes", "namespaces", "pods", "externals")
_STEP_FIELDS = ("policies", "namespaces", "pods", "deletePods", "deleteNamespaces", "expect")
_EXPECT_FIELDS = ("port", "protocol", "family", "table", "all")


def _nodes(c: _Checker, raw: Any) -> tuple[Node, ...]:
    entries = c.seq(raw, "cluster.nodes") or [{"name": "node-1"}]
    nodes, seen = [], set()
    for i, entry in enumerate(entries, start=1):
        where = f"cluster.nodes[{i - 1}]"
        c.mapping(entry, where, _NODE_FIELDS, ("name",))
        name = c.string(entry["name"], f"{where}.name", _DNS_SUBDOMAIN)
        if name in seen:
            raise c.fail(f"{where}.name", f"duplicate node {name!r}")
        seen.add(name)
        cidr = c.network(entry.get("podCIDR", f"10.244.{i}.0/24"), f"{where}.podCIDR", 4)
        cidr6 = c.network(entry.get("podCIDRv6", f"fd00:10:244:{i}::/64"), f"{where}.podCIDRv6", 6)
        ip = c.address(entry.get("ip", f"172.18.0.{i}"), f"{where}.ip", 4)
        ipv6 = c.address(entry.get("ipv6", f"fd00:172:18::{i}"), f"{where}.ipv6", 6)
        labels = c.labels(entry.get("labels"), f"{where}.labels")
        nodes.append(Node(name, i, str(cidr), str(cidr6), ip, ipv6, tuple(sorted(labels.items()))))
    _distinct(c, "cluster.nodes", [(n.name, "ip", n.ip) for n in nodes] +
              [(n.name, "ipv6", n.ipv6) for n in nodes])
    for a in nodes:
        for b in nodes:
            if a.index < b.index and (ipaddress.ip_network(a.pod_cidr).overlaps(ipaddress.ip_network(b.pod_cidr))
                                      or ipaddress.ip_network(a.pod_cidr6).overlaps(ipaddress.ip_network(b.pod_cidr6))):
                raise c.fail("cluster.nodes", f"pod ranges of {a.name} and {b.name} overlap")
    return tuple(nodes)


def _distinct(c: _Checker, where: str, items: list[tuple[str, str, str]]) -> None:
    owners: dict[str, str] = {}
    for owner, field, addr in items:
        if addr in owners and owners[addr] != owner:
            raise c.fail(where, f"{owner}.{field}: address {addr} is also used by {owners[addr]}")
        owners[addr] = owner


def _ports(c: _Checker, raw: Any, where: str) -> tuple[Port, ...]:
    ports, names, seen = [], set(), set()
    for i, entry in enumerate(c.seq(raw, where)):
        pw = f"{where}[{i}]"
        c.mapping(entry, pw, _PORT_DECL_FIELDS, ("containerPort",))
        number = c.port_number(entry["containerPort"], f"{pw}.containerPort")
        protocol = c.choice(entry.get("protocol", TCP), f"{pw}.protocol", PROTOCOLS)
        name = entry.get("name")
        if name is not None:
            c.string(name, f"{pw}.name", _PORT_NAME)
            if name in names:
                raise c.fail(f"{pw}.name", f"duplicate port name {name!r}")
            names.add(name)
        if (number, protocol) in seen:
            raise c.fail(pw, f"port {number}/{protocol} declared twice")
        seen.add((number, protocol))
        ports.append(Port(number, protocol, name))
    return tuple(ports)


def _externals(c: _Checker, raw: Any, nodes: tuple[Node, ...]) -> tuple[External, ...]:
    out, seen = [], set()
    for i, entry in enumerate(c.seq(raw, "cluster.externals")):
        where = f"cluster.externals[{i}]"
        c.mapping(entry, where, _EXT_FIELDS, ("name", "ip"))
        name = c.string(entry["name"], f"{where}.name", _DNS_SUBDOMAIN)
        if name in seen:
            raise c.fail(f"{where}.name", f"duplicate external {name!r}")
        seen.add(name)
        ip = c.address(entry["ip"], f"{where}.ip", 4)
        ipv6 = c.address(entry["ipv6"], f"{where}.ipv6", 6) if entry.get("ipv6") is not None else None
        out.append(External(name, ip, ipv6, _ports(c, entry.get("ports"), f"{where}.ports")))
    items = [(f"node {n.name}", "ip", n.ip) for n in nodes] + [(f"node {n.name}", "ipv6", n.ipv6) for n in nodes]
    items += [(f"external {e.name}", "ip", e.ip) for e in out]
    items += [(f"external {e.name}", "ipv6", e.ipv6) for e in out if e.ipv6]
    _distinct(c, "cluster.externals", items)
    return tuple(out)


def _namespace_entry(c: _Checker, entry: Any, where: str) -> Namespace:
    c.mapping(entry, where, _NS_FIELDS, ("name",))
    name = c.string(entry["name"], f"{where}.name", _DNS_LABEL)
    labels = c.labels(entry.get("labels"), f"{where}.labels")
    labels["kubernetes.io/metadata.name"] = name
    return Namespace(name, tuple(sorted(labels.items())))


class _Pods:
    """Pod bookkeeping across steps: partial updates and the address defaults."""

    def __init__(self, c: _Checker, nodes: tuple[Node, ...]):
        self.c = c
        self.nodes = {n.name: n for n in nodes}
        self.order = [n.name for n in nodes]
        self.raw: dict[str, dict] = {}          # key -> merged raw fields
        self.pods: dict[str, Pod] = {}
        self.spread = 0                         # round-robin position over nodes

    def apply(self, entries: list, where: str) -> None:
        new_keys = []
        for i, entry in enumerate(entries):
            ew = f"{where}[{i}]"
            self.c.mapping(entry, ew, _POD_FIELDS, ("namespace", "name"))
            ns = self.c.string(entry["namespace"], f"{ew}.namespace", _DNS_LABEL)
            name = self.c.string(entry["name"], f"{ew}.name", _DNS_SUBDOMAIN)
            key = f"{ns}/{name}"
            if key in new_keys:
                raise self.c.fail(f"{ew}.name", f"pod {key} listed twice")
            merged = dict(self.raw.get(key, {}))
            merged.update(entry)
            merged["_where"] = ew
            if key not in self.raw:                # position among created pods, in file order
                if "node" not in entry:
                    merged["node"] = self.order[self.spread % len(self.order)]
                self.spread += 1
            self.raw[key] = merged
            new_keys.append(key)
        # explicit addresses of the whole batch are reserved before any default is chosen
        reserved = {str(ipaddress.ip_address(str(self.raw[k]["ip"]))) for k in new_keys
                    if "ip" in self.raw[k] and _is_address(self.raw[k]["ip"])}
        for key in new_keys:
            self.pods[key] = self._resolve_address(key, self._resolve_fixed(key), reserved)

    def _resolve_fixed(self, key: str) -> Pod:
        raw, c = self.raw[key], self.c
        ew = raw["_where"]
        node_name = c.string(raw["node"], f"{ew}.node")
        if node_name not in self.nodes:
            raise c.fail(f"{ew}.node", f"unknown node {node_name!r}")
        host = c.boolean(raw.get("hostNetwork", False), f"{ew}.hostNetwork")
        if host and ("ip" in raw or "ipv6" in raw):
            raise c.fail(f"{ew}.ip", "a host-network pod has its node's addresses; ip/ipv6 not allowed")
        labels = c.labels(raw.get("labels"), f"{ew}.labels")
        ip = c.address(raw["ip"], f"{ew}.ip", 4) if "ip" in raw else ""
        ipv6 = c.address(raw["ipv6"], f"{ew}.ipv6", 6) if "ipv6" in raw else ""
        return Pod(raw["namespace"], raw["name"], tuple(sorted(labels.items())), node_name,
                   ip, ipv6, host, _ports(c, raw.get("ports"), f"{ew}.ports"))

    def _resolve_address(self, key: str, pod: Pod, reserved: set[str]) -> Pod:
        node = self.nodes[pod.node]
        old = self.pods.get(key)
        kept = old is not None and old.node == pod.node and not old.host_network
        if pod.host_network:
            pod = replace(pod, ip=node.ip, ipv6=node.ipv6)
        else:
            if not pod.ip:
                pod = replace(pod, ip=old.ip if kept else self._next_free(node, key, reserved))
            if not pod.ipv6:
                if kept and old.ip == pod.ip:
                    pod = replace(pod, ipv6=old.ipv6)
                else:
                    pod = replace(pod, ipv6=_default_ipv6(node, pod.ip, self.c, self.raw[key]["_where"]))
        if old is not None:
            moved = (old.node, old.ip, old.ipv6, old.host_network) != (pod.node, pod.ip, pod.ipv6, pod.host_network)
            pod = replace(pod, generation=old.generation + (1 if moved else 0))
        return pod

    def _next_free(self, node: Node, key: str, reserved: set[str]) -> str:
        """From .10 up, skipping every address held by another pod or given explicitly."""
        net = ipaddress.ip_network(node.pod_cidr)
        used = reserved | {p.ip for k, p in self.pods.items() if k != key and not p.host_network}
        for offset in range(10, net.num_addresses - 1):
            cand = str(net.network_address + offset)
            if cand not in used:
                return cand
        raise self.c.fail(self.raw[key]["_where"], f"no free address left in {node.pod_cidr}")

    def delete(self, key: str) -> None:
        self.raw.pop(key, None)
        self.pods.pop(key, None)

    def snapshot(self) -> tuple[Pod, ...]:
        return tuple(self.pods.values())


def _is_address(value: Any) -> bool:
    try:
        ipaddress.ip_address(str(value))
        return True
    except ValueError:
        return False


def _default_ipv6(node: Node, ip: str, c: _Checker, where: str) -> str:
    """podCIDRv6 prefix + the last IPv4 octet written as is: .10 -> ::10."""
    last = ip.rsplit(".", 1)[1]
    net = ipaddress.ip_network(node.pod_cidr6)
    try:
        return str(net.network_address + int(last, 16))
    except ValueError:
        raise c.fail(where, f"cannot derive an IPv6 address from {ip}") from None


# ---------------------------------------------------------------- truth tables

def _tables(c: _Checker, raw: Any, where: str, endpoints: dict[str, dict],
            pods: tuple[Pod, ...]) -> tuple[Table, ...]:
    entries = c.seq(raw, where)
    if not entries:
        raise c.fail(where, "at least one truth table is required")
    out = []
    for i, entry in enumerate(entries):
        tw = f"{where}[{i}]"
        c.mapping(entry, tw, _EXPECT_FIELDS, ("port",))
        port = c.port_number(entry["port"], f"{tw}.port")
        protocol = c.choice(entry.get("protocol", TCP), f"{tw}.protocol", PROTOCOLS)
        family = c.choice(entry.get("family", IPV4), f"{tw}.family", FAMILIES)
        if ("table" in entry) == ("all" in entry):
            raise c.fail(tw, "exactly one of `table` and `all` is required")
        if "all" in entry:
            mark = c.choice(entry["all"], f"{tw}.all", ("allow", "deny"))
            names = tuple(p.key for p in pods)
            cells = tuple((s, d, mark == "allow") for s in names for d in names if s != d)
            rows = columns = names
        else:
            rows, columns, cells = _parse_table(c, entry["table"], f"{tw}.table")
        for src, dst, _ in cells:
            for name, role in ((src, "row"), (dst, "column")):
                info = endpoints.get(name)
                if info is None:
                    raise c.fail(f"{tw}.table", f"unknown endpoint {name!r} ({role}); known: "
                                 f"{', '.join(sorted(endpoints))}")
                if family == IPV6 and not info.get("ipv6"):
                    raise c.fail(f"{tw}.table", f"{name} has no IPv6 address for an IPv6 probe")
        out.append(Table(port, protocol, family, cells, tw, rows, columns))
    return tuple(out)


def _parse_table(c: _Checker, text: Any, where: str):
    """(rows, columns, cells) of a table block."""
    if not isinstance(text, str):
        raise c.fail(where, "must be a text block")
    lines = [ln.split() for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2:
        raise c.fail(where, "a table needs a header line and at least one row")
    columns = lines[0][1:]
    if not columns:
        raise c.fail(where, "the header line names no destination")
    if len(set(columns)) != len(columns):
        raise c.fail(where, "a destination is listed twice in the header")
    cells, rows = [], set()
    for n, parts in enumerate(lines[1:], start=2):
        src, marks = parts[0], parts[1:]
        if src in rows:
            raise c.fail(where, f"line {n}: source {src} listed twice")
        rows.add(src)
        if len(marks) != len(columns):
            raise c.fail(where, f"line {n}: {len(marks)} marks for {len(columns)} columns")
        for dst, mark in zip(columns, marks):
            if dst == src:
                continue                       # the diagonal may hold any mark
            if mark not in (ALLOW, DENY):
                raise c.fail(where, f"line {n}: mark {mark!r} for {src} -> {dst} must be '.' or 'X'")
            cells.append((src, dst, mark == ALLOW))
    return tuple(r[0] for r in lines[1:]), tuple(columns), tuple(cells)


# ---------------------------------------------------------------- whole case

def _endpoints(nodes, externals, pods) -> dict[str, dict]:
    eps = {f"node:{n.name}": {"ipv6": n.ipv6} for n in nodes}
    eps.update({f"ext:{e.name}": {"ipv6": e.ipv6} for e in externals})
    eps.update({p.key: {"ipv6": p.ipv6} for p in pods})
    return eps


def _check_state(c: _Checker, where: str, namespaces: dict[str, Namespace], pods: tuple[Pod, ...],
                 policies: tuple[dict, ...], nodes, externals) -> None:
    for p in pods:
        if p.namespace not in namespaces:
            raise c.fail(where, f"pod {p.key}: namespace {p.namespace!r} does not exist")
    for pol in policies:
        ns = pol["metadata"].get("namespace")
        if ns is not None and ns not in namespaces:
            raise c.fail(where, f"policy {policy_label(pol)}: namespace {ns!r} does not exist")
    keys = [(pol["kind"], pol["metadata"].get("namespace"), pol["metadata"]["name"]) for pol in policies]
    if len(set(keys)) != len(keys):
        raise c.fail(where, "two policies share a kind, namespace and name")
    items = [(f"node {n.name}", "ip", n.ip) for n in nodes] + [(f"node {n.name}", "ipv6", n.ipv6) for n in nodes]
    items += [(f"external {e.name}", "ip", e.ip) for e in externals]
    items += [(f"external {e.name}", "ipv6", e.ipv6) for e in externals if e.ipv6]
    items += [(f"pod {p.key}", "ip", p.ip) for p in pods if not p.host_network]
    items += [(f"pod {p.key}", "ipv6", p.ipv6) for p in pods if not p.host_network]
    _distinct(c, where, items)


def parse_case(data: Any, path: str) -> Case:
    """A validated, fully resolved case from the parsed YAML of one file."""
    c = _Checker(path)
    c.mapping(data, "", _TOP_FIELDS, ("name", "cluster"))
    name = c.string(data["name"], "name", _CASE_NAME)
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise c.fail("description", "must be text")
    cluster = c.mapping(data["cluster"] or {}, "cluster", _CLUSTER_FIELDS)
    nodes = _nodes(c, cluster.get("nodes"))
    externals = _externals(c, cluster.get("externals"), nodes)

    namespaces: dict[str, Namespace] = {}
    for i, entry in enumerate(c.seq(cluster.get("namespaces"), "cluster.namespaces")):
        ns = _namespace_entry(c, entry, f"cluster.namespaces[{i}]")
        if ns.name in namespaces:
            raise c.fail(f"cluster.namespaces[{i}].name", f"duplicate namespace {ns.name!r}")
        namespaces[ns.name] = ns
    pods = _Pods(c, nodes)
    pods.apply(c.seq(cluster.get("pods"), "cluster.pods"), "cluster.pods")
    policies = tuple(_check_policy(c, p, f"policies[{i}]")
                     for i, p in enumerate(c.seq(data.get("policies"), "policies")))

    has_steps = "steps" in data
    if has_steps and "expect" in data:
        raise c.fail("expect", "a case has either `expect` or `steps`, not both")
    if not has_steps and "expect" not in data:
        raise c.fail("expect", "required field missing (or use `steps`)")
    step_entries = c.seq(data["steps"], "steps") if has_steps else [{"expect": data["expect"]}]
    if not step_entries:
        raise c.fail("steps", "at least one step is required")

    initial = State(-1, tuple(namespaces.values()), pods.snapshot(), policies, ()) if has_steps else None
    states = []
    for index, step in enumerate(step_entries):
        sw = f"steps[{index}]" if has_steps else ""
        c.mapping(step, sw, _STEP_FIELDS, ("expect",))
        pre = f"{sw}." if sw else ""
        for i, key in enumerate(c.seq(step.get("deletePods"), f"{pre}deletePods")):
            if not isinstance(key, str) or key not in pods.pods:
                raise c.fail(f"{pre}deletePods[{i}]", f"no such pod {key!r}")
            pods.delete(key)
        for i, ns_name in enumerate(c.seq(step.get("deleteNamespaces"), f"{pre}deleteNamespaces")):
            if ns_name not in namespaces:
                raise c.fail(f"{pre}deleteNamespaces[{i}]", f"no such namespace {ns_name!r}")
            del namespaces[ns_name]
            for key in [k for k, p in pods.pods.items() if p.namespace == ns_name]:
                pods.delete(key)
            policies = tuple(p for p in policies if p["metadata"].get("namespace") != ns_name)
        for i, entry in enumerate(c.seq(step.get("namespaces"), f"{pre}namespaces")):
            ns = _namespace_entry(c, entry, f"{pre}namespaces[{i}]")
            namespaces[ns.name] = ns
        pods.apply(c.seq(step.get("pods"), f"{pre}pods"), f"{pre}pods")
        if "policies" in step:
            policies = tuple(_check_policy(c, p, f"{pre}policies[{i}]")
                             for i, p in enumerate(c.seq(step["policies"], f"{pre}policies")))
        snapshot = pods.snapshot()
        _check_state(c, sw or "cluster", namespaces, snapshot, policies, nodes, externals)
        expect = _tables(c, step["expect"], f"{pre}expect", _endpoints(nodes, externals, snapshot), snapshot)
        states.append(State(index, tuple(namespaces.values()), snapshot, policies, expect))
    if initial is not None:
        _check_state(c, "cluster", {n.name: n for n in initial.namespaces}, initial.pods,
                     initial.policies, nodes, externals)
    return Case(name, description, path, nodes, externals, tuple(states), has_steps, initial)


def load_case(path: str | Path) -> Case:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise CaseError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CaseError(f"{path}: not valid YAML: {exc}") from None
    return parse_case(data, str(path))


def case_files(paths: list[str]) -> list[Path]:
    """Files named, and every *.yaml of the folders named, sorted per folder."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(p.glob("*.yaml")))
        else:
            out.append(p)
    return out
