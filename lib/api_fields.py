"""The parts of API objects that the program reads, and nothing else.

A Pod as the API serves it is mostly what no NetworkPolicy looks at:
container images, environment, resources, probes, volumes, conditions,
container statuses, managedFields. Lists and watches pass every object
through `trimmed()` as it arrives, so that the rest never takes memory: at
10,000 pods that is most of what a cycle (or the watch cache) holds.

What is kept is exactly what lib/objects.py parses (and lib/node_addresses.py
reads of a pod; a Node listed as a `nodes` peer keeps its labels and
status.addresses, not the spec.podCIDRs that --isolate-new-pods reads
through a separate get), with the identity and version that fingerprints and watches
use. A value of an unexpected type is kept as it is, so that parsing reports
it just as it would have on the whole object; a test asserts that parsing a
trimmed object gives what parsing the whole one gives.
"""
from __future__ import annotations

from typing import Any, Callable

from lib.model import ADMIN, BASELINE
from lib.objects import LOG_DROPS_ANNOTATION

_IDENTITY = ("name", "namespace", "uid", "resourceVersion")
_POD_SPEC = ("nodeName", "hostNetwork", "containers")
_POD_STATUS = ("phase", "podIP", "podIPs", "hostIP", "hostIPs")


def _pick(value: Any, keys: tuple[str, ...]) -> Any:
    if not isinstance(value, dict):
        return value
    return {k: value[k] for k in keys if k in value}


def _metadata(meta: Any, labels: bool, annotation: bool) -> Any:
    if not isinstance(meta, dict):
        return meta
    out = _pick(meta, _IDENTITY + (("labels",) if labels else ()))
    if annotation and "annotations" in meta:
        # only ours: a last-applied-configuration annotation alone can be a
        # copy of the whole object
        out["annotations"] = _pick(meta["annotations"], (LOG_DROPS_ANNOTATION,))
    return out


def _kept(obj: Any, *, labels: bool, annotation: bool, **parts: Callable[[Any], Any]) -> Any:
    """The metadata `_metadata` keeps, and each part (spec, status) that its
    function keeps."""
    if not isinstance(obj, dict):
        return obj
    out = {}
    if "metadata" in obj:
        out["metadata"] = _metadata(obj["metadata"], labels=labels, annotation=annotation)
    for key, keep in parts.items():
        if key in obj:
            out[key] = keep(obj[key])
    return out


def _container(container: Any) -> Any:
    return _pick(container, ("ports",))


def _pod_spec(spec: Any) -> Any:
    spec = _pick(spec, _POD_SPEC)
    if isinstance(spec, dict) and isinstance(spec.get("containers"), list):
        spec["containers"] = [_container(c) for c in spec["containers"]]
    return spec


def pod(obj: Any) -> Any:
    return _kept(obj, labels=True, annotation=False, spec=_pod_spec,
                 status=lambda status: _pick(status, _POD_STATUS))


def namespace(obj: Any) -> Any:
    return _kept(obj, labels=True, annotation=True)


def policy(obj: Any) -> Any:
    """A NetworkPolicy or an admin policy: the whole spec is kept, as an
    unknown field in it changes the verdict."""
    return _kept(obj, labels=False, annotation=True, spec=lambda spec: spec)


def node(obj: Any) -> Any:
    """A Node as a `nodes` peer: its labels and status.addresses."""
    return _kept(obj, labels=True, annotation=False,
                 status=lambda status: _pick(status, ("addresses",)))


def names_nodes(obj: Any) -> bool:
    """Whether an admin policy has a `nodes` peer (spec.egress[].to[].nodes):
    the Nodes are read only then. A policy too malformed to tell denies
    instead of matching nodes (lib/objects.py), so it needs none."""
    spec = obj.get("spec") if isinstance(obj, dict) else None
    rules = spec.get("egress") if isinstance(spec, dict) else None
    return isinstance(rules, list) and any(
        isinstance(rule, dict) and isinstance(rule.get("to"), list)
        and any(isinstance(peer, dict) and peer.get("nodes") is not None for peer in rule["to"])
        for rule in rules)


BY_KIND: dict[str, Callable[[Any], Any]] = {
    "Namespace": namespace, "Pod": pod, "NetworkPolicy": policy,
    ADMIN: policy, BASELINE: policy, "Node": node}


def trimmed(kind: str, obj: Any) -> Any:
    """`obj` (an object of `kind`) less what nothing reads."""
    return BY_KIND[kind](obj)
