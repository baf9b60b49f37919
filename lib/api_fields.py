"""The parts of API objects that the program reads, and nothing else.

A Pod as the API serves it is mostly what no NetworkPolicy looks at:
container images, environment, resources, probes, volumes, conditions,
container statuses, managedFields. Lists and watches pass every object
through `trimmed()` as it arrives, so that the rest never takes memory: at
10,000 pods that is most of what a cycle (or the watch cache) holds.

What is kept is exactly what lib/objects.py parses (and lib/node_addresses.py
reads of a pod), with the identity and version that fingerprints and watches
use. A value of an unexpected type is kept as it is, so that parsing reports
it just as it would have on the whole object; a test asserts that parsing a
trimmed object gives what parsing the whole one gives.
"""
from __future__ import annotations

from typing import Any, Callable

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


def _container(container: Any) -> Any:
    return _pick(container, ("ports",))


def pod(obj: Any) -> Any:
    if not isinstance(obj, dict):
        return obj
    out: dict = {}
    if "metadata" in obj:
        out["metadata"] = _metadata(obj["metadata"], labels=True, annotation=False)
    if "spec" in obj:
        spec = _pick(obj["spec"], _POD_SPEC)
        if isinstance(spec, dict) and isinstance(spec.get("containers"), list):
            spec["containers"] = [_container(c) for c in spec["containers"]]
        out["spec"] = spec
    if "status" in obj:
        out["status"] = _pick(obj["status"], _POD_STATUS)
    return out


def namespace(obj: Any) -> Any:
    if not isinstance(obj, dict):
        return obj
    if "metadata" not in obj:
        return {}
    return {"metadata": _metadata(obj["metadata"], labels=True, annotation=True)}


def network_policy(obj: Any) -> Any:
    """The whole spec is kept: an unknown field in it changes the verdict."""
    if not isinstance(obj, dict):
        return obj
    out = {}
    if "metadata" in obj:
        out["metadata"] = _metadata(obj["metadata"], labels=False, annotation=True)
    if "spec" in obj:
        out["spec"] = obj["spec"]
    return out


BY_KIND: dict[str, Callable[[Any], Any]] = {
    "Namespace": namespace, "Pod": pod, "NetworkPolicy": network_policy}


def trimmed(kind: str, obj: Any) -> Any:
    """`obj` (an object of `kind`) less what nothing reads."""
    return BY_KIND[kind](obj)
