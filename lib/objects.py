"""Kubernetes API JSON -> the frozen values of lib.model.

The input is whatever the API (or something posing as it) returned, so no
field is trusted: each is type-checked and validated as the API server would,
and every defect becomes a `Problem` instead of an exception.

Fail closed, never open. A NetworkPolicy that is only partly understood must
not allow more than its author meant, and must not stop isolating what it
isolates:

- an invalid field anywhere inside one rule drops that whole rule (a dropped
  rule allows nothing; dropping only a peer or a port could leave an empty
  list, which means "all");
- an invalid `spec.podSelector` selects every pod of the namespace, for both
  directions, keeping the rules that parsed;
- invalid `spec.policyTypes` means both directions;
- `spec.ingress` / `spec.egress` that is not a list contributes no rule, and
  still counts as present when policyTypes is defaulted;
- an unknown field directly in `spec` (perhaps a newer API field whose meaning
  we would miss) keeps the isolation and drops every rule.

An AdminNetworkPolicy or BaselineAdminNetworkPolicy rule is evaluated in
order and may deny, so a dropped rule could open what it closed. Instead:

- a rule with any invalid part (action, peer, selector, CIDR, port, name, an
  unknown field, a peer kind its direction does not allow) denies all
  traffic at its place;
- an AdminNetworkPolicy whose `spec.priority` is missing or out of range
  goes before every other one, and each of its rules denies all traffic;
- an invalid `spec.subject` selects every pod (every pod of the selected
  namespaces, when only the podSelector of `pods` is at fault), and each rule
  denies all traffic;
- an unknown field directly in `spec` makes each rule deny all traffic;
  `spec.ingress` / `spec.egress` that is not a list is one rule that does;
- a baseline policy not named `default` is ignored, as the API server
  refuses such names; AdminNetworkPolicies that share a priority are all
  kept, in name order, with a Problem saying so.

Pods, Namespaces and Nodes are data for selectors: a bad label entry,
container port or node address is dropped on its own, with a Problem.

The annotation `kube-policy-manager/log-drops` on a NetworkPolicy, an admin
policy or a Namespace asks for the refusals it causes to be logged; it changes no
verdict, so a value we cannot read is a Problem and means "no logging".
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from dataclasses import replace
from typing import Any, Callable, Optional, Union

from lib.model import (
    ADMIN, ALLOW, BASELINE, DENY, EGRESS, EVERYTHING, INGRESS, NOTHING, PASS, PROTOCOLS, TCP,
    AdminPeer, AdminPolicy, AdminRule, AdminSubject, Cluster, ContainerPort, IPBlock,
    LabelSelector, Namespace, NetworkPolicy, Node, Peer, Pod, PolicyPort, PolicyRule, Problem,
    Requirement, freeze_labels,
)

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
LOG_DROPS_ANNOTATION = "kube-policy-manager/log-drops"
TERMINAL_PHASES = ("Succeeded", "Failed")
OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
BOTH = frozenset((INGRESS, EGRESS))
UNKNOWN = "<unknown>"           # object label when the name cannot be read
ROOT = "<root>"                 # field label for the object itself

SPEC_FIELDS = ("podSelector", "policyTypes", "ingress", "egress")
SELECTOR_FIELDS = ("matchLabels", "matchExpressions")
REQUIREMENT_FIELDS = ("key", "operator", "values")
PEER_FIELDS = ("podSelector", "namespaceSelector", "ipBlock")
PORT_FIELDS = ("protocol", "port", "endPort")
IPBLOCK_FIELDS = ("cidr", "except")

ADMIN_SPEC_FIELDS = ("priority", "subject", "ingress", "egress")
BASELINE_SPEC_FIELDS = ("subject", "ingress", "egress")
SUBJECT_FIELDS = ("namespaces", "pods")
NAMESPACED_POD_FIELDS = ("namespaceSelector", "podSelector")
INGRESS_PEER_FIELDS = ("namespaces", "pods")
EGRESS_PEER_FIELDS = ("namespaces", "pods", "nodes", "networks")
ADMIN_PORT_FIELDS = ("portNumber", "namedPort", "portRange")
ADMIN_ACTIONS = (ALLOW, DENY, PASS)
BASELINE_ACTIONS = (ALLOW, DENY)
BASELINE_NAME = "default"       # the only name the API server accepts for a baseline policy
NODE_ADDRESS_TYPES = ("InternalIP", "ExternalIP")
CLUSTER_SCOPED = ("Namespace", "Node", ADMIN, BASELINE)
MAX_PRIORITY = 1000
MAX_ITEMS = 100                 # rules of a direction; peers and ports of a rule
MAX_NETWORKS = 25
MAX_RULE_NAME = 100
MAX_CIDR_TEXT = 43
ALL_PODS = AdminSubject(namespace_selector=EVERYTHING, pod_selector=EVERYTHING)
DENIES_ALL = "rule denies all traffic"

MAX_SHOWN = 64                  # characters of a value quoted in a message

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?")
# Only the text forms Go's net.ParseIP / ParseCIDR take: no zone, no netmask.
_IP_TEXT = re.compile(r"[0-9A-Fa-f.:]+")
_CIDR_TEXT = re.compile(r"[0-9A-Fa-f.:]+/[0-9]{1,3}")
_PORT_NAME_CHARS = re.compile(r"[-a-z0-9]*")
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


# --- safe text for one-line logs -------------------------------------------

def _escape_char(c: str) -> str:
    if c in _ESCAPES:
        return _ESCAPES[c]
    if c.isprintable():
        return c
    code = ord(c)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def quote(text: str) -> str:
    """Double-quoted, control characters escaped, bounded: safe in a log line
    whatever the API sent."""
    body = "".join(_escape_char(c) for c in text[:MAX_SHOWN])
    suffix = f"...({len(text)} chars)" if len(text) > MAX_SHOWN else ""
    return f'"{body}"{suffix}'


def show(value: Any) -> str:
    """A short, safe rendering of any decoded JSON value, for "got ..."."""
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if value.bit_length() <= 64 else "a very large integer"
    if isinstance(value, float):
        return repr(value)
    if value is None:
        return "null"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "a value of type " + quote(type(value).__name__)


def _name(text: str) -> str:
    """Object names as they appear in Problems: plain when they are ordinary
    Kubernetes names, quoted otherwise."""
    return text if _PLAIN_NAME.fullmatch(text) else quote(text)


def _key(path: str, key: Any) -> str:
    if isinstance(key, str) and _IDENT.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{show(key)}]"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- problem collection ------------------------------------------------------

class _Report:
    """The problems of one object; `len()` lets a caller see whether a part it
    just parsed added any."""

    def __init__(self, kind: str, obj: str):
        self.kind, self.obj = kind, obj
        self.problems: list[Problem] = []

    def add(self, field: str, message: str) -> None:
        self.problems.append(Problem(self.kind, self.obj, field, message))

    def __len__(self) -> int:
        return len(self.problems)

    def annotate_since(self, start: int, note: str) -> None:
        """Say what a defect costs, on the problems added since `start`."""
        self.problems[start:] = [replace(p, message=f"{p.message} ({note})")
                                 for p in self.problems[start:]]


def _unknown_fields(r: _Report, obj: dict, path: str, known: tuple[str, ...],
                    note: str = "") -> int:
    count = 0
    for k in obj:
        if k not in known:
            r.add(_key(path, k), "unknown field" + (f" ({note})" if note else ""))
            count += 1
    return count


def _identity(kind: str, obj: Any, where: str, namespaced: bool
              ) -> tuple[Optional[str], Optional[str], list[Problem]]:
    """(namespace, name) of an API object, or the problems that hide it."""
    if not isinstance(obj, dict):
        return None, None, [Problem(kind, where, ROOT, f"must be an object, got {show(obj)}")]
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        msg = "required" if meta is None else f"must be an object, got {show(meta)}"
        return None, None, [Problem(kind, where, "metadata", msg)]
    problems = []
    namespace = None
    if namespaced:
        namespace = meta.get("namespace")
        if not isinstance(namespace, str) or not namespace:
            namespace = None
            problems.append(Problem(kind, where, "metadata.namespace",
                                    _required_string(meta.get("namespace"))))
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        obj_label = f"{_name(namespace)}/{where}" if namespace else where
        problems.append(Problem(kind, obj_label, "metadata.name", _required_string(name)))
        name = None
    if problems:
        return None, None, problems
    return namespace, name, []


def _required_string(value: Any) -> str:
    return "required" if value is None or value == "" else f"must be a string, got {show(value)}"


def _object_label(namespace: Optional[str], name: str) -> str:
    return f"{_name(namespace)}/{_name(name)}" if namespace is not None else _name(name)


def _labels(r: _Report, value: Any, path: str) -> dict[str, str]:
    """A label map (of an object, or a selector's matchLabels): every valid entry."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        r.add(path, f"must be a map of strings to strings, got {show(value)}")
        return {}
    labels = {}
    for k, v in value.items():
        if not isinstance(k, str) or not k:
            r.add(_key(path, k), "label key must be a non-empty string")
        elif not isinstance(v, str):
            r.add(_key(path, k), f"label value must be a string, got {show(v)}")
        else:
            labels[k] = v
    return labels


def _flag_annotation(r: _Report, meta: dict, key: str) -> bool:
    """An opt-in annotation: "true" or "false" (any case); absent is false."""
    annotations = meta.get("annotations")
    if annotations is None:
        return False
    if not isinstance(annotations, dict):
        r.add("metadata.annotations", f"must be a map of strings to strings, got {show(annotations)}")
        return False
    value = annotations.get(key)
    if value is None:
        return False
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    r.add(_key("metadata.annotations", key), f'must be "true" or "false", got {show(value)} '
          "(read as false)")
    return False


# --- addresses and ports -----------------------------------------------------

def _parse_ip(text: str) -> Optional[Union[ipaddress.IPv4Address, ipaddress.IPv6Address]]:
    if not _IP_TEXT.fullmatch(text):
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _parse_cidr(text: str) -> Optional[Union[ipaddress.IPv4Network, ipaddress.IPv6Network]]:
    if not _CIDR_TEXT.fullmatch(text):
        return None
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


def port_name_errors(name: str) -> list[str]:
    """Why `name` is not an IANA service name (empty list when it is one)."""
    errors = []
    if not name:
        return ["must not be empty"]
    if len(name) > 15:
        errors.append("must be no more than 15 characters")
    if not _PORT_NAME_CHARS.fullmatch(name):
        errors.append("must contain only lowercase letters (a-z), digits (0-9) and '-'")
    if not re.search(r"[a-z]", name):
        errors.append("must contain at least one letter (a-z)")
    if name.startswith("-") or name.endswith("-"):
        errors.append("must not begin or end with '-'")
    if "--" in name:
        errors.append("must not contain consecutive '-'")
    return errors


def _protocol(r: _Report, value: Any, path: str) -> Optional[str]:
    if value is None:
        return TCP
    if isinstance(value, str) and value in PROTOCOLS:
        return value
    r.add(path, f'unsupported value {show(value)}: supported values: "TCP", "UDP", "SCTP"')
    return None


def _port_number(r: _Report, value: Any, path: str) -> Optional[int]:
    if _is_int(value) and 1 <= value <= 65535:
        return value
    r.add(path, f"must be an integer between 1 and 65535, got {show(value)}")
    return None


# --- namespaces ---------------------------------------------------------------

def parse_namespace(obj: Any) -> tuple[Optional[Namespace], list[Problem]]:
    return _parse_namespace(obj, UNKNOWN)


def _parse_namespace(obj: Any, where: str) -> tuple[Optional[Namespace], list[Problem]]:
    _, name, problems = _identity("Namespace", obj, where, namespaced=False)
    if name is None:
        return None, problems
    r = _Report("Namespace", _object_label(None, name))
    labels = _labels(r, obj["metadata"].get("labels"), "metadata.labels")
    labels[NAMESPACE_NAME_LABEL] = name     # as the API server sets it
    log_drops = _flag_annotation(r, obj["metadata"], LOG_DROPS_ANNOTATION)
    return Namespace(name=name, labels=freeze_labels(labels), log_drops=log_drops), r.problems


# --- pods ---------------------------------------------------------------------

def parse_pod(obj: Any) -> tuple[Optional[Pod], list[Problem]]:
    return _parse_pod(obj, UNKNOWN)


def _has_address(status: Any) -> bool:
    """Whether the pod may hold traffic. A finished pod's address may already
    belong to a new pod, so it must never contribute one."""
    if not isinstance(status, dict):
        return status is not None      # a malformed status is reported later
    if status.get("phase") in TERMINAL_PHASES:
        return False
    return status.get("podIPs") not in (None, []) or status.get("podIP") not in (None, "")


def _parse_pod(obj: Any, where: str) -> tuple[Optional[Pod], list[Problem]]:
    if isinstance(obj, dict) and not _has_address(obj.get("status")):
        return None, []
    namespace, name, problems = _identity("Pod", obj, where, namespaced=True)
    if name is None:
        return None, problems
    r = _Report("Pod", _object_label(namespace, name))
    status = obj.get("status")
    if not isinstance(status, dict):
        r.add("status", f"must be an object, got {show(status)}")
        return None, r.problems
    ips = _pod_ips(r, status)
    if not ips:
        return None, r.problems
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        r.add("spec", "required" if spec is None else f"must be an object, got {show(spec)}")
        return None, r.problems
    host_network = spec.get("hostNetwork")
    if host_network is None:
        host_network = False
    elif not isinstance(host_network, bool):
        # Guessing either way is wrong: as a pod it would isolate its node's
        # address, as host network it would escape isolation.
        r.add("spec.hostNetwork", f"must be a boolean, got {show(host_network)}")
        return None, r.problems
    node = spec.get("nodeName")
    if node is None:
        node = ""
    elif not isinstance(node, str):
        r.add("spec.nodeName", f"must be a string, got {show(node)}")
        node = ""
    labels = _labels(r, obj["metadata"].get("labels"), "metadata.labels")
    pod = Pod(namespace=namespace, name=name, node=node, ips=tuple(ips),
              labels=freeze_labels(labels), host_network=host_network,
              ports=_container_ports(r, spec.get("containers")))
    return pod, r.problems


def _pod_ips(r: _Report, status: dict) -> list[str]:
    """Valid addresses, canonical text, in the API's order; podIP only when
    podIPs gives none."""
    ips: list[str] = []
    rejected: set = set()

    def add(value: Any, path: str) -> None:
        if value is None or value == "":
            r.add(path, "required")
        elif not isinstance(value, str):
            r.add(path, f"must be a string, got {show(value)}")
        elif (ip := _parse_ip(value)) is None:
            r.add(path, f"invalid IP address {quote(value)}")
            rejected.add(value)
        elif str(ip) not in ips:
            ips.append(str(ip))

    entries = status.get("podIPs")
    if entries is not None and not isinstance(entries, list):
        r.add("status.podIPs", f"must be a list, got {show(entries)}")
        entries = None
    for i, entry in enumerate(entries or ()):
        path = f"status.podIPs[{i}]"
        if isinstance(entry, dict):
            add(entry.get("ip"), path + ".ip")
        else:
            r.add(path, f"must be an object, got {show(entry)}")
    primary = status.get("podIP")
    if not ips and primary not in (None, "") and not (isinstance(primary, str) and primary in rejected):
        add(primary, "status.podIP")
    return ips


def _container_ports(r: _Report, containers: Any) -> tuple[ContainerPort, ...]:
    """Declared ports of the regular containers (init containers' ports serve
    no traffic once the pod runs)."""
    if containers is None:
        return ()
    if not isinstance(containers, list):
        r.add("spec.containers", f"must be a list, got {show(containers)}")
        return ()
    ports = []
    for i, container in enumerate(containers):
        path = f"spec.containers[{i}]"
        if not isinstance(container, dict):
            r.add(path, f"must be an object, got {show(container)}")
            continue
        entries = container.get("ports")
        if entries is None:
            continue
        if not isinstance(entries, list):
            r.add(path + ".ports", f"must be a list, got {show(entries)}")
            continue
        for j, entry in enumerate(entries):
            port = _container_port(r, entry, f"{path}.ports[{j}]")
            if port is not None:
                ports.append(port)
    return tuple(ports)


def _container_port(r: _Report, entry: Any, path: str) -> Optional[ContainerPort]:
    if not isinstance(entry, dict):
        r.add(path, f"must be an object, got {show(entry)}")
        return None
    start = len(r)
    number = _port_number(r, entry.get("containerPort"), path + ".containerPort")
    protocol = _protocol(r, entry.get("protocol"), path + ".protocol")
    name = entry.get("name")
    if name is not None:
        if not isinstance(name, str):
            r.add(path + ".name", f"must be a string, got {show(name)}")
        elif errors := port_name_errors(name):
            r.add(path + ".name", f"invalid port name {quote(name)}: " + "; ".join(errors))
    if len(r) > start:
        return None
    return ContainerPort(port=number, protocol=protocol, name=name)


# --- network policies -----------------------------------------------------------

def parse_policy(obj: Any) -> tuple[Optional[NetworkPolicy], list[Problem]]:
    return _parse_policy(obj, UNKNOWN)


def _parse_policy(obj: Any, where: str) -> tuple[Optional[NetworkPolicy], list[Problem]]:
    namespace, name, problems = _identity("NetworkPolicy", obj, where, namespaced=True)
    if name is None:
        return None, problems       # no namespace to apply to
    r = _Report("NetworkPolicy", _object_label(namespace, name))
    log_drops = _flag_annotation(r, obj["metadata"], LOG_DROPS_ANNOTATION)
    spec = obj.get("spec")
    if spec is None:
        r.add("spec", "required (read as {}: every pod of the namespace, all ingress denied)")
        spec = {}
    elif not isinstance(spec, dict):
        r.add("spec", f"must be an object, got {show(spec)} "
                      "(every pod of the namespace isolated, both directions)")
        return NetworkPolicy(namespace, name, EVERYTHING, BOTH, log_drops=log_drops), r.problems

    unknown = _unknown_fields(r, spec, "spec", SPEC_FIELDS, "every rule of the policy ignored")

    both_types = False
    pod_selector = EVERYTHING
    if spec.get("podSelector") is not None:
        start = len(r)
        pod_selector = _selector(r, spec["podSelector"], "spec.podSelector")
        if pod_selector is None:
            r.annotate_since(start, "policy applied to every pod of the namespace, both directions")
            pod_selector, both_types = EVERYTHING, True

    ingress, has_ingress = _rules(r, spec.get("ingress"), "spec.ingress", "from")
    egress, has_egress = _rules(r, spec.get("egress"), "spec.egress", "to")

    raw_types = spec.get("policyTypes")
    if raw_types is None or raw_types == []:
        # API server defaulting: Ingress always, Egress when egress rules exist.
        types = frozenset((INGRESS, EGRESS) if has_egress else (INGRESS,))
        if unknown:
            both_types = True
    else:
        types = _policy_types(r, raw_types)
    if unknown:
        ingress, egress = (), ()
    if both_types:
        types = BOTH
    return NetworkPolicy(namespace=namespace, name=name, pod_selector=pod_selector,
                         policy_types=types, ingress=ingress, egress=egress,
                         log_drops=log_drops), r.problems


def _policy_types(r: _Report, value: Any) -> frozenset[str]:
    """Explicit policyTypes; anything not understood isolates both ways."""
    note = "policy isolates both directions"
    if not isinstance(value, list):
        r.add("spec.policyTypes", f"must be a list, got {show(value)} ({note})")
        return BOTH
    start = len(r)
    if len(value) > 2:
        r.add("spec.policyTypes", "may not specify more than two policyTypes")
    for i, item in enumerate(value):
        if not (isinstance(item, str) and item in (INGRESS, EGRESS)):
            r.add(f"spec.policyTypes[{i}]",
                  f'unsupported value {show(item)}: supported values: "Ingress", "Egress"')
    if len(r) > start:
        r.annotate_since(start, note)
        return BOTH
    return frozenset(value)


def _rules(r: _Report, value: Any, path: str, peers_key: str
           ) -> tuple[tuple[PolicyRule, ...], bool]:
    """The valid rules of one direction, and whether the direction counts as
    present for policyTypes defaulting (an unreadable list does: fail closed)."""
    if value is None:
        return (), False
    if not isinstance(value, list):
        r.add(path, f"must be a list, got {show(value)} (no rule of this direction applies)")
        return (), True
    rules = []
    for i, item in enumerate(value):
        rule = _rule(r, item, f"{path}[{i}]", peers_key, i)
        if rule is not None:
            rules.append(rule)
    return tuple(rules), bool(value)


def _rule(r: _Report, value: Any, path: str, peers_key: str, index: int) -> Optional[PolicyRule]:
    """One rule, or None (the rule allows nothing) when any part is invalid."""
    if not isinstance(value, dict):
        r.add(path, f"must be an object, got {show(value)}")
        return None
    start = len(r)
    _unknown_fields(r, value, path, (peers_key, "ports"))
    peers = _entries(r, value.get(peers_key), f"{path}.{peers_key}", _peer)
    ports = _entries(r, value.get("ports"), f"{path}.ports", _policy_port)
    if len(r) > start:
        return None
    return PolicyRule(peers=peers, ports=ports, index=index)


def _entries(r: _Report, value: Any, path: str, parse: Callable) -> Optional[tuple]:
    """A list of peers or ports; None when absent or empty (meaning "all")."""
    if value is None:
        return None
    if not isinstance(value, list):
        r.add(path, f"must be a list, got {show(value)}")
        return None
    parsed = [parse(r, item, f"{path}[{i}]") for i, item in enumerate(value)]
    return tuple(parsed) if parsed else None


def _peer(r: _Report, value: Any, path: str) -> Optional[Peer]:
    """Reports every defect of one peer; the result means something only
    when none was reported (the caller drops the rule otherwise)."""
    if not isinstance(value, dict):
        r.add(path, f"must be an object, got {show(value)}")
        return None
    _unknown_fields(r, value, path, PEER_FIELDS)
    given = [k for k in PEER_FIELDS if value.get(k) is not None]
    if not given:
        r.add(path, "must specify a peer: podSelector, namespaceSelector or ipBlock")
    elif "ipBlock" in given and len(given) > 1:
        r.add(path, "may not specify both ipBlock and another peer")
    pod = ns = block = None
    if "podSelector" in given:
        pod = _selector(r, value["podSelector"], path + ".podSelector")
    if "namespaceSelector" in given:
        ns = _selector(r, value["namespaceSelector"], path + ".namespaceSelector")
    if "ipBlock" in given:
        block = _ip_block(r, value["ipBlock"], path + ".ipBlock")
    return Peer(pod_selector=pod, namespace_selector=ns, ip_block=block)


def _policy_port(r: _Report, value: Any, path: str) -> Optional[PolicyPort]:
    """Like _peer: meaningful only when it reported nothing."""
    if not isinstance(value, dict):
        r.add(path, f"must be an object, got {show(value)}")
        return None
    _unknown_fields(r, value, path, PORT_FIELDS)
    protocol = _protocol(r, value.get("protocol"), path + ".protocol")
    port, end = value.get("port"), value.get("endPort")
    if port is None:
        pass
    elif _is_int(port):
        _port_number(r, port, path + ".port")
    elif isinstance(port, str):
        if errors := port_name_errors(port):
            if port.isdigit():
                errors.append("a port number must be a JSON number, not a string")
            r.add(path + ".port", f"invalid port name {quote(port)}: " + "; ".join(errors))
    else:
        r.add(path + ".port", f"must be a port number or a port name, got {show(port)}")
    if end is not None:
        end_path = path + ".endPort"
        if _port_number(r, end, end_path) is None:
            pass
        elif port is None:
            r.add(end_path, "may not be specified when port is not specified")
        elif not _is_int(port):
            r.add(end_path, "may not be specified when port is not a number")
        elif 1 <= port <= 65535 and end < port:
            r.add(end_path, f"must be >= port ({port})")
    return PolicyPort(protocol=protocol or TCP, port=port, end_port=end)


def _selector(r: _Report, value: Any, path: str) -> Optional[LabelSelector]:
    """A label selector in canonical form (sorted, deduplicated), so equal
    selectors compare equal; None when invalid."""
    if not isinstance(value, dict):
        r.add(path, f"must be an object (a label selector), got {show(value)}")
        return None
    start = len(r)
    _unknown_fields(r, value, path, SELECTOR_FIELDS)
    labels = _labels(r, value.get("matchLabels"), path + ".matchLabels")
    requirements = set()
    expressions = value.get("matchExpressions")
    if expressions is not None:
        me_path = path + ".matchExpressions"
        if not isinstance(expressions, list):
            r.add(me_path, f"must be a list, got {show(expressions)}")
        else:
            for i, item in enumerate(expressions):
                req = _requirement(r, item, f"{me_path}[{i}]")
                if req is not None:
                    requirements.add(req)
    if len(r) > start:
        return None
    ordered = sorted(requirements, key=lambda q: (q.key, q.operator, q.values))
    return LabelSelector(match_labels=freeze_labels(labels), match_expressions=tuple(ordered))


def _requirement(r: _Report, value: Any, path: str) -> Optional[Requirement]:
    if not isinstance(value, dict):
        r.add(path, f"must be an object, got {show(value)}")
        return None
    start = len(r)
    _unknown_fields(r, value, path, REQUIREMENT_FIELDS)
    key = value.get("key")
    if not isinstance(key, str) or not key:
        r.add(path + ".key", _required_string(key))
    operator = value.get("operator")
    if operator is None:
        r.add(path + ".operator", "required")
        operator = None
    elif not (isinstance(operator, str) and operator in OPERATORS):
        r.add(path + ".operator", f"unsupported value {show(operator)}: supported values: "
              + ", ".join(f'"{o}"' for o in OPERATORS))
        operator = None
    values = value.get("values")
    if values is None:
        values = []
    elif not isinstance(values, list):
        r.add(path + ".values", f"must be a list, got {show(values)}")
        values = None
    else:
        for i, item in enumerate(values):
            if not isinstance(item, str):
                r.add(f"{path}.values[{i}]", f"must be a string, got {show(item)}")
    if operator is not None and values is not None:
        if operator in ("In", "NotIn") and not values:
            r.add(path + ".values", f"must be non-empty when operator is {operator}")
        elif operator in ("Exists", "DoesNotExist") and values:
            r.add(path + ".values", f"must be empty when operator is {operator}")
    if len(r) > start:
        return None
    return Requirement(key=key, operator=operator, values=tuple(sorted(set(values))))


def _ip_block(r: _Report, value: Any, path: str) -> Optional[IPBlock]:
    if not isinstance(value, dict):
        r.add(path, f"must be an object, got {show(value)}")
        return None
    start = len(r)
    _unknown_fields(r, value, path, IPBLOCK_FIELDS)
    cidr = value.get("cidr")
    network = None
    if not isinstance(cidr, str) or not cidr:
        r.add(path + ".cidr", _required_string(cidr))
    elif (network := _parse_cidr(cidr)) is None:
        r.add(path + ".cidr", f"invalid CIDR {quote(cidr)}")
    excepts = value.get("except")
    if excepts is None:
        excepts = []
    elif not isinstance(excepts, list):
        r.add(path + ".except", f"must be a list, got {show(excepts)}")
        excepts = []
    inside = set()
    for i, text in enumerate(excepts):
        e_path = f"{path}.except[{i}]"
        if not isinstance(text, str):
            r.add(e_path, f"must be a string, got {show(text)}")
        elif (sub := _parse_cidr(text)) is None:
            r.add(e_path, f"invalid CIDR {quote(text)}")
        elif network is None:
            continue
        elif (sub.version != network.version or sub.prefixlen <= network.prefixlen
              or not sub.subnet_of(network)):
            r.add(e_path, f"must be a strict subset of cidr {network}, got {quote(text)}")
        else:
            inside.add(sub)
    if len(r) > start:
        return None
    return IPBlock(cidr=str(network), excepts=tuple(str(n) for n in sorted(inside)))


# --- admin network policies (policy.networking.k8s.io/v1alpha1) ------------------

def parse_admin_policy(obj: Any) -> tuple[Optional[AdminPolicy], list[Problem]]:
    """An AdminNetworkPolicy."""
    return _parse_admin_policy(obj, UNKNOWN)


def parse_baseline_policy(obj: Any) -> tuple[Optional[AdminPolicy], list[Problem]]:
    """A BaselineAdminNetworkPolicy; None, with a Problem, unless it is named `default`."""
    return _parse_baseline_policy(obj, UNKNOWN)


def _parse_admin_policy(obj: Any, where: str) -> tuple[Optional[AdminPolicy], list[Problem]]:
    return _parse_admin(ADMIN, obj, where)


def _parse_baseline_policy(obj: Any, where: str) -> tuple[Optional[AdminPolicy], list[Problem]]:
    return _parse_admin(BASELINE, obj, where)


def _deny_all(rule: AdminRule) -> AdminRule:
    """The fail-closed form of a rule: a Deny of all traffic at its place."""
    return AdminRule(action=DENY, name=rule.name, index=rule.index)


def _parse_admin(kind: str, obj: Any, where: str) -> tuple[Optional[AdminPolicy], list[Problem]]:
    _, name, problems = _identity(kind, obj, where, namespaced=False)
    if name is None:
        return None, problems
    r = _Report(kind, _object_label(None, name))
    if kind == BASELINE and name != BASELINE_NAME:
        r.add("metadata.name", f'must be "{BASELINE_NAME}": the API server accepts no other name '
                               "for a BaselineAdminNetworkPolicy (ignored)")
        return None, r.problems
    log_drops = _flag_annotation(r, obj["metadata"], LOG_DROPS_ANNOTATION)

    spec = obj.get("spec")
    if spec is None:
        r.add("spec", "required (the policy has no rule: it changes no verdict)")
        return AdminPolicy(kind, name, ALL_PODS, log_drops=log_drops), r.problems
    if not isinstance(spec, dict):
        r.add("spec", f"must be an object, got {show(spec)} "
                      "(policy applied to every pod, denies all traffic both ways)")
        return AdminPolicy(kind, name, ALL_PODS, ingress=(AdminRule(DENY),),
                           egress=(AdminRule(DENY),), log_drops=log_drops), r.problems

    known = ADMIN_SPEC_FIELDS if kind == ADMIN else BASELINE_SPEC_FIELDS
    deny_all = _unknown_fields(r, spec, "spec", known,
                               "every rule of the policy denies all traffic") > 0
    priority = None
    if kind == ADMIN:
        priority = _priority(r, spec.get("priority"))
        deny_all = deny_all or priority is None
    subject, understood = _admin_subject(r, spec.get("subject"))
    deny_all = deny_all or not understood
    ingress = _admin_rules(r, kind, spec.get("ingress"), "spec.ingress", INGRESS)
    egress = _admin_rules(r, kind, spec.get("egress"), "spec.egress", EGRESS)
    if deny_all:
        ingress, egress = tuple(map(_deny_all, ingress)), tuple(map(_deny_all, egress))
    return AdminPolicy(kind=kind, name=name, subject=subject, priority=priority,
                       ingress=ingress, egress=egress, log_drops=log_drops), r.problems


def _priority(r: _Report, value: Any) -> Optional[int]:
    """spec.priority, or None: the policy then goes before every other one, and
    each of its rules denies all traffic."""
    note = "policy denies all traffic of its subject"
    if value is None:
        r.add("spec.priority", f"required ({note})")
    elif not _is_int(value):
        r.add("spec.priority", f"must be an integer, got {show(value)} ({note})")
    elif not 0 <= value <= MAX_PRIORITY:
        r.add("spec.priority", f"must be between 0 and {MAX_PRIORITY}, got {show(value)} ({note})")
    else:
        return value
    return None


def _admin_subject(r: _Report, value: Any) -> tuple[AdminSubject, bool]:
    """The subject, and whether it was understood. One that was not selects
    every pod (every pod of the namespaces it selects, when only the
    podSelector of `pods` is at fault), and the caller makes every rule deny
    all traffic."""
    path = "spec.subject"
    start = len(r)
    subject = ALL_PODS
    if not isinstance(value, dict):
        r.add(path, "required" if value is None else f"must be an object, got {show(value)}")
    else:
        _unknown_fields(r, value, path, SUBJECT_FIELDS)
        given = [k for k in SUBJECT_FIELDS if value.get(k) is not None]
        if len(given) != 1:
            r.add(path, _exactly_one(SUBJECT_FIELDS, given))
        if "namespaces" in given:
            namespaces = _selector(r, value["namespaces"], path + ".namespaces")
            subject = AdminSubject(namespace_selector=namespaces or NOTHING)
        if "pods" in given:
            namespaces, pods, pods_from = _namespaced_pods(r, value["pods"], path + ".pods")
            if pods_from == start and namespaces is not None and len(r) > start:
                r.annotate_since(start, "policy applied to every pod of the namespaces it "
                                        "selects, every rule denies all traffic")
                return AdminSubject(namespace_selector=namespaces), False
            subject = AdminSubject(namespace_selector=namespaces or NOTHING,
                                   pod_selector=pods or NOTHING)
    if len(r) > start:
        r.annotate_since(start, "policy applied to every pod, every rule denies all traffic")
        return ALL_PODS, False
    return subject, True


def _namespaced_pods(r: _Report, value: Any, path: str
                     ) -> tuple[Optional[LabelSelector], Optional[LabelSelector], int]:
    """`pods` of a subject or a peer, where both selectors are required: the
    two selectors (None when invalid), and how many problems the report held
    before the podSelector was looked at."""
    if not isinstance(value, dict):
        r.add(path, f"must be an object, got {show(value)}")
        return None, None, len(r)
    _unknown_fields(r, value, path, NAMESPACED_POD_FIELDS)
    namespaces = _required_selector(r, value.get("namespaceSelector"), path + ".namespaceSelector")
    before_pods = len(r)
    pods = _required_selector(r, value.get("podSelector"), path + ".podSelector")
    return namespaces, pods, before_pods


def _required_selector(r: _Report, value: Any, path: str) -> Optional[LabelSelector]:
    if value is None:
        r.add(path, "required")
        return None
    return _selector(r, value, path)


def _exactly_one(fields: tuple[str, ...], given: list[str]) -> str:
    expected = "must specify exactly one of " + ", ".join(fields)
    return expected + (f", got {' and '.join(given)}" if given else "")


def _admin_rules(r: _Report, kind: str, value: Any, path: str, direction: str
                 ) -> tuple[AdminRule, ...]:
    """One direction's rules in order; each invalid one denies all traffic at
    its place, and a list that cannot be read is one rule that does."""
    if value is None:
        return ()
    note = "this direction denies all traffic"
    if not isinstance(value, list):
        r.add(path, f"must be a list, got {show(value)} ({note})")
        return (AdminRule(DENY),)
    if len(value) > MAX_ITEMS:
        r.add(path, f"must have at most {MAX_ITEMS} items, got {len(value)} ({note})")
        return (AdminRule(DENY),)
    return tuple(_admin_rule(r, kind, item, f"{path}[{i}]", direction, i)
                 for i, item in enumerate(value))


def _admin_rule(r: _Report, kind: str, value: Any, path: str, direction: str,
                index: int) -> AdminRule:
    if not isinstance(value, dict):
        r.add(path, f"must be an object, got {show(value)} ({DENIES_ALL})")
        return AdminRule(DENY, index=index)
    start = len(r)
    peers_key = "from" if direction == INGRESS else "to"
    _unknown_fields(r, value, path, ("name", "action", peers_key, "ports"))
    name = _rule_name(r, value.get("name"), path + ".name")
    action = _action(r, kind, value.get("action"), path + ".action")
    peers = _admin_peers(r, value.get(peers_key), f"{path}.{peers_key}", direction)
    ports = _admin_ports(r, value.get("ports"), path + ".ports")
    if (any(p.node_selector is not None or p.networks for p in peers)
            and any(p.protocol is None for p in ports or ())):
        r.add(path, "a namedPort may not be used with nodes or networks peers: nodes and "
                    "networks have no named ports")
    if len(r) > start:
        r.annotate_since(start, DENIES_ALL)
        return AdminRule(DENY, name=name, index=index)
    return AdminRule(action=action, peers=peers, ports=ports, name=name, index=index)


def _rule_name(r: _Report, value: Any, path: str) -> str:
    """The rule's name, kept whenever it is a string (logs use it)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        r.add(path, f"must be a string, got {show(value)}")
        return ""
    if len(value) > MAX_RULE_NAME:
        r.add(path, f"must be no more than {MAX_RULE_NAME} characters, got {len(value)}")
    return value


def _action(r: _Report, kind: str, value: Any, path: str) -> Optional[str]:
    actions = ADMIN_ACTIONS if kind == ADMIN else BASELINE_ACTIONS
    if value is None:
        r.add(path, "required")
    elif isinstance(value, str) and value in actions:
        return value
    else:
        r.add(path, f"unsupported value {show(value)}: supported values: "
              + ", ".join(f'"{a}"' for a in actions))
    return None


def _bounded_list(r: _Report, value: Any, path: str, most: int) -> Optional[list]:
    """`value` when it is a list of 1 to `most` items, else None (reported)."""
    if not isinstance(value, list):
        r.add(path, "required" if value is None else f"must be a list, got {show(value)}")
    elif not value:
        r.add(path, "must have at least 1 item")
    elif len(value) > most:
        r.add(path, f"must have at most {most} items, got {len(value)}")
    else:
        return value
    return None


def _admin_peers(r: _Report, value: Any, path: str, direction: str) -> tuple[AdminPeer, ...]:
    """Meaningful only when nothing was reported (the rule then denies all)."""
    items = _bounded_list(r, value, path, MAX_ITEMS) or []
    peers = (_admin_peer(r, item, f"{path}[{i}]", direction) for i, item in enumerate(items))
    return tuple(p for p in peers if p is not None)


def _admin_peer(r: _Report, value: Any, path: str, direction: str) -> Optional[AdminPeer]:
    if not isinstance(value, dict):
        r.add(path, f"must be an object, got {show(value)}")
        return None
    allowed = INGRESS_PEER_FIELDS if direction == INGRESS else EGRESS_PEER_FIELDS
    start = len(r)
    for key in value:
        if key in EGRESS_PEER_FIELDS and key not in allowed:
            r.add(_key(path, key), "not allowed in ingress rules: nodes and networks peers are "
                                   "for egress only")
    _unknown_fields(r, value, path, EGRESS_PEER_FIELDS)
    given = [k for k in allowed if value.get(k) is not None]
    if len(given) > 1 or (not given and len(r) == start):
        r.add(path, _exactly_one(allowed, given))
    if len(given) != 1:
        return None
    key = given[0]
    where = f"{path}.{key}"
    if key == "namespaces":
        return AdminPeer(namespace_selector=_selector(r, value[key], where), pod_selector=EVERYTHING)
    if key == "pods":
        namespaces, pods, _ = _namespaced_pods(r, value[key], where)
        return AdminPeer(namespace_selector=namespaces, pod_selector=pods)
    if key == "nodes":
        return AdminPeer(node_selector=_selector(r, value[key], where))
    return AdminPeer(networks=_networks(r, value[key], where))


def _networks(r: _Report, value: Any, path: str) -> tuple[str, ...]:
    """The CIDRs of a `networks` peer, normalised, sorted and deduplicated."""
    items = _bounded_list(r, value, path, MAX_NETWORKS) or []
    networks, seen = set(), set()
    for i, text in enumerate(items):
        where = f"{path}[{i}]"
        if not isinstance(text, str):
            r.add(where, f"must be a string, got {show(text)}")
        elif len(text) > MAX_CIDR_TEXT:
            r.add(where, f"must be no more than {MAX_CIDR_TEXT} characters, got {len(text)}")
        elif text in seen:
            r.add(where, f"duplicate value {quote(text)}")
        elif (network := _parse_cidr(text)) is None:
            r.add(where, f"invalid CIDR {quote(text)}")
        elif network.version == 6 and network.network_address.ipv4_mapped is not None:
            r.add(where, f"invalid CIDR {quote(text)}: IPv4-mapped IPv6 addresses are not allowed")
        else:
            networks.add(network)
        if isinstance(text, str):
            seen.add(text)
    return tuple(str(n) for n in sorted(networks, key=lambda n: (n.version, n)))


def _admin_ports(r: _Report, value: Any, path: str) -> Optional[tuple[PolicyPort, ...]]:
    """None when absent (every port); meaningful only when nothing was reported."""
    if value is None:
        return None
    items = _bounded_list(r, value, path, MAX_ITEMS) or []
    return tuple(_admin_port(r, item, f"{path}[{i}]") for i, item in enumerate(items))


def _admin_port(r: _Report, value: Any, path: str) -> PolicyPort:
    if not isinstance(value, dict):
        r.add(path, f"must be an object, got {show(value)}")
        return PolicyPort()
    _unknown_fields(r, value, path, ADMIN_PORT_FIELDS)
    given = [k for k in ADMIN_PORT_FIELDS if value.get(k) is not None]
    if len(given) != 1:
        r.add(path, _exactly_one(ADMIN_PORT_FIELDS, given))
        return PolicyPort()
    key = given[0]
    where = f"{path}.{key}"
    entry = value[key]
    if key == "namedPort":
        if not isinstance(entry, str):
            r.add(where, f"must be a string, got {show(entry)}")
        elif errors := port_name_errors(entry):
            r.add(where, f"invalid port name {quote(entry)}: " + "; ".join(errors)
                  + " (no container port can have it)")
        return PolicyPort(protocol=None, port=entry)
    if not isinstance(entry, dict):
        r.add(where, f"must be an object, got {show(entry)}")
        return PolicyPort()
    numbers = ("port",) if key == "portNumber" else ("start", "end")
    _unknown_fields(r, entry, where, ("protocol",) + numbers)
    protocol = _protocol(r, entry.get("protocol"), where + ".protocol") or TCP
    found = [_required_port(r, entry.get(n), f"{where}.{n}") for n in numbers]
    if key == "portNumber":
        return PolicyPort(protocol=protocol, port=found[0])
    start, end = found
    if start is not None and end is not None and end < start:
        r.add(where + ".end", f"must be >= start ({start})")
    return PolicyPort(protocol=protocol, port=start, end_port=end)


def _required_port(r: _Report, value: Any, path: str) -> Optional[int]:
    if value is None:
        r.add(path, "required")
        return None
    return _port_number(r, value, path)


# --- nodes -------------------------------------------------------------------------

def parse_node(obj: Any) -> tuple[Optional[Node], list[Problem]]:
    return _parse_node(obj, UNKNOWN)


def _parse_node(obj: Any, where: str) -> tuple[Optional[Node], list[Problem]]:
    """Name, labels and the InternalIP / ExternalIP entries of status.addresses;
    a bad entry is left out on its own."""
    _, name, problems = _identity("Node", obj, where, namespaced=False)
    if name is None:
        return None, problems
    r = _Report("Node", _object_label(None, name))
    labels = _labels(r, obj["metadata"].get("labels"), "metadata.labels")
    ips: list[str] = []
    status = obj.get("status")
    entries = status.get("addresses") if isinstance(status, dict) else None
    if status is not None and not isinstance(status, dict):
        r.add("status", f"must be an object, got {show(status)}")
    elif entries is not None and not isinstance(entries, list):
        r.add("status.addresses", f"must be a list, got {show(entries)}")
    else:
        for i, entry in enumerate(entries or ()):
            path = f"status.addresses[{i}]"
            if not isinstance(entry, dict):
                r.add(path, f"must be an object, got {show(entry)}")
                continue
            kind, address = entry.get("type"), entry.get("address")
            if not isinstance(kind, str):
                r.add(path + ".type", _required_string(kind))
            elif kind not in NODE_ADDRESS_TYPES:
                continue                    # Hostname, InternalDNS, ExternalDNS: not addresses
            elif not isinstance(address, str) or not address:
                r.add(path + ".address", _required_string(address))
            elif (ip := _parse_ip(address)) is None:
                r.add(path + ".address", f"invalid IP address {quote(address)}")
            elif str(ip) not in ips:
                ips.append(str(ip))
    return Node(name=name, labels=freeze_labels(labels), ips=tuple(ips)), r.problems


def parse_node_pod_cidrs(obj: Any) -> tuple[tuple[str, ...], list[Problem]]:
    """This node's pod ranges from its Node object: `spec.podCIDRs`, else
    `spec.podCIDR`; normalised, in the API's order. An entry that is not a
    CIDR is left out with a Problem (its family then has no range)."""
    _, name, problems = _identity("Node", obj, UNKNOWN, namespaced=False)
    if name is None:
        return (), problems
    r = _Report("Node", _object_label(None, name))
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        r.add("spec", "required" if spec is None else f"must be an object, got {show(spec)}")
        return (), r.problems
    entries = spec.get("podCIDRs")
    if entries is None or entries == []:
        single = spec.get("podCIDR")
        located = [] if single in (None, "") else [("spec.podCIDR", single)]
    elif isinstance(entries, list):
        located = [(f"spec.podCIDRs[{i}]", text) for i, text in enumerate(entries)]
    else:
        r.add("spec.podCIDRs", f"must be a list, got {show(entries)}")
        return (), r.problems
    cidrs: list[str] = []
    for where, text in located:
        if not isinstance(text, str):
            r.add(where, f"must be a string, got {show(text)}")
        elif (net := _parse_cidr(text)) is None:
            r.add(where, f"invalid CIDR {quote(text)}")
        elif str(net) not in cidrs:
            cidrs.append(str(net))
    if not cidrs and not r.problems:
        r.add("spec.podCIDRs", "required (the node has no pod range yet)")
    return tuple(cidrs), r.problems


# --- the whole cluster ---------------------------------------------------------

class ParseMemo:
    """What each object parsed to, kept from one cycle to the next by its
    identity and resourceVersion. The API server gives an object a new
    resourceVersion on every change, so an object seen before at the same
    version parses the same, and a cycle after a change parses only what
    changed. Only the objects of the latest parse are kept.

    A Node is the exception: its status changes with every heartbeat of
    its kubelet, and parsing reads only its labels and addresses, so those
    stand for its version. A heartbeat then neither parses it again nor
    makes a cycle recompile (cycle.fingerprint is made of these keys)."""

    def __init__(self) -> None:
        self._kept: dict[tuple, tuple] = {}
        self._next: dict[tuple, tuple] = {}
        self.hits = 0

    @staticmethod
    def key(kind: str, obj: Any) -> Optional[tuple]:
        """None when the object lacks what makes its parse depend on nothing
        else (its name, namespace and version as non-empty strings)."""
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        if not isinstance(meta, dict):
            return None
        name, version, uid = meta.get("name"), meta.get("resourceVersion"), meta.get("uid")
        namespace = meta.get("namespace") if kind not in CLUSTER_SCOPED else ""
        if kind == "Node" and isinstance(version, str) and version:
            version = _node_content(obj)
        if not all(isinstance(v, str) and v for v in (name, version)):
            return None
        if not isinstance(namespace, str) or (kind not in CLUSTER_SCOPED and not namespace):
            return None
        if uid is not None and not isinstance(uid, str):
            return None
        return (kind, namespace, name, uid, version)

    def parse(self, kind: str, obj: Any, where: str, parse: Callable) -> tuple:
        key = self.key(kind, obj)
        if key is None:
            return parse(obj, where)
        hit = self._kept.get(key)
        if hit is None:
            value, problems = parse(obj, where)
            hit = (value, tuple(problems))
        else:
            self.hits += 1
        self._next[key] = hit
        return hit[0], list(hit[1])

    def _start(self) -> None:
        self._next, self.hits = {}, 0

    def _finish(self) -> None:
        self._kept, self._next = self._next, {}


def _node_content(obj: dict) -> str:
    """What parsing reads of a Node (labels, status.addresses), as a short digest.
    In the order served: the API server writes a map's keys sorted, so the
    same content is the same text."""
    meta, status = obj["metadata"], obj.get("status")
    read = [meta.get("labels"), status.get("addresses") if isinstance(status, dict) else status]
    text = json.dumps(read, separators=(",", ":"), default=repr)
    return "content:" + hashlib.sha256(text.encode()).hexdigest()[:32]


def evaluation_order(policy: AdminPolicy) -> tuple:
    """AdminNetworkPolicies by priority, then name; one without a valid
    priority (which denies all it could) before every other."""
    return (policy.priority is not None, policy.priority or 0, policy.name)


def parse_cluster(namespaces: list, pods: list, policies: list,
                  memo: Optional[ParseMemo] = None, *, admin_policies: Optional[list] = None,
                  baseline_policies: Optional[list] = None,
                  nodes: Optional[list] = None) -> Cluster:
    """Every usable object, sorted by namespace/name (AdminNetworkPolicies in
    evaluation order); problems in input order. The admin kinds default to
    none (a cluster that does not serve them). With `memo`, objects parsed
    by the previous call at the same version are not parsed again."""
    problems: list[Problem] = []
    if memo is not None:
        memo._start()
    found_ns = _parse_all("Namespace", "namespaces", namespaces, _parse_namespace, problems, memo)
    found_pods = _parse_all("Pod", "pods", pods, _parse_pod, problems, memo)
    found_pols = _parse_all("NetworkPolicy", "policies", policies, _parse_policy, problems, memo)
    found_admin = _parse_all(ADMIN, "adminnetworkpolicies", admin_policies, _parse_admin_policy,
                             problems, memo)
    found_baseline = _parse_all(BASELINE, "baselineadminnetworkpolicies", baseline_policies,
                                _parse_baseline_policy, problems, memo)
    found_nodes = _parse_all("Node", "nodes", nodes, _parse_node, problems, memo)
    if memo is not None:
        memo._finish()
    ordered = sorted(found_admin, key=evaluation_order)
    problems.extend(_shared_priorities(ordered))
    return Cluster(
        namespaces=tuple(sorted(found_ns, key=lambda n: n.name)),
        pods=tuple(sorted(found_pods, key=lambda p: (p.namespace, p.name))),
        policies=tuple(sorted(found_pols, key=lambda p: (p.namespace, p.name))),
        problems=tuple(problems),
        admin_policies=tuple(ordered),
        baseline=found_baseline[0] if found_baseline else None,
        nodes=tuple(sorted(found_nodes, key=lambda n: n.name)),
    )


def _shared_priorities(ordered: list[AdminPolicy]) -> list[Problem]:
    """The API leaves the order of policies of equal priority open; ours is
    by name, and each such policy says so."""
    sharing: dict[int, list[str]] = {}
    for policy in ordered:
        if policy.priority is not None:
            sharing.setdefault(policy.priority, []).append(policy.name)
    problems = []
    for priority, names in sharing.items():
        if len(names) < 2:
            continue
        order = (f"{_name(names[0])} is evaluated first (by name)" if len(names) == 2 else
                 "they are evaluated in name order: " + ", ".join(map(_name, names)))
        for name in names:
            others = ", ".join(_name(n) for n in names if n != name)
            problems.append(Problem(ADMIN, _name(name), "spec.priority",
                                    f"{priority} is also the priority of {others}; {order}"))
    return problems


def _parse_all(kind: str, label: str, items: Any, parse: Callable, problems: list,
               memo: Optional[ParseMemo] = None) -> list:
    """Parse one list; a second object with the same identity is ignored (a
    list response never holds one, and downstream names derive from it)."""
    if items is None:
        items = []
    if not isinstance(items, list):
        problems.append(Problem(kind, label, ROOT, f"must be a list, got {show(items)}"))
        return []
    found, seen = [], set()
    for i, item in enumerate(items):
        if memo is None:
            value, item_problems = parse(item, f"{label}[{i}]")
        else:
            value, item_problems = memo.parse(kind, item, f"{label}[{i}]", parse)
        problems.extend(item_problems)
        if value is None:
            continue
        identity = (getattr(value, "namespace", None), value.name)
        if identity in seen:
            problems.append(Problem(kind, _object_label(*identity), "metadata.name",
                                    f"duplicate object ({label}[{i}]) ignored"))
            continue
        seen.add(identity)
        found.append(value)
    return found
