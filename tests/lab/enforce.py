"""One cycle on one lab node, run in this process with CompileOptions of the
test's choosing: fetch from the lab's API server over the node's network,
parse, compile, and apply to the node's kernel on the lab's dataplane, as
lib/cycle.py does.

Tests of compile options use it to pick options per node and per step
without a command line in between; everything else (the API, the network,
iptables and ipsets or the nft table in the node's namespace) is the real
thing.
"""
from __future__ import annotations

from typing import Optional

from lib import dataplane, objects
from lib.compile import CompileOptions, intend_node
from lib.cycle import intent_families, parse_fetched
from lib.kubeapi import ApiClient, load_config

from . import netns
from .lab import Lab

BACKEND = "nft"          # the iptables backend of the iptables dataplane


def node_dataplane(lab: Lab, node: str, name: Optional[str] = None):
    """The node's dataplane `name` (default the lab's), with the other one's
    kernel for leftovers, as reconcile.py builds it."""
    return dataplane.build(name or lab.dataplane, BACKEND, lab.network.node_ns(node))


def fetch(lab: Lab, node: str, with_node: bool = False):
    """(ClusterObjects, the Node object or None), read from the node's namespace."""
    config = load_config(api_server=lab.api.url)
    with netns.inside(lab.network.node_ns(node)), ApiClient(config) as api:
        return api.list_cluster(), (api.get_node(node) if with_node else None)


def options_for(lab: Lab, node: str, **kwargs) -> CompileOptions:
    """CompileOptions(**kwargs); with isolate_new_pods and no pod_cidrs, the
    node's pod ranges come from its Node object, as they would in a cluster."""
    if kwargs.get("isolate_new_pods") and not kwargs.get("pod_cidrs"):
        _, node_obj = fetch(lab, node, with_node=True)
        cidrs, problems = objects.parse_node_pod_cidrs(node_obj)
        assert not problems, [str(p) for p in problems]
        kwargs["pod_cidrs"] = cidrs
    return CompileOptions(**kwargs)


def _desired(lab: Lab, node: str, plane, options: CompileOptions):
    fetched, _ = fetch(lab, node)
    cluster = parse_fetched(fetched)
    intent = intent_families(intend_node(cluster, node, options=options), plane.families)
    return plane.render(intent)


def enforce(lab: Lab, node: str, options: CompileOptions = CompileOptions(),
            dataplane_name: Optional[str] = None):
    """One cycle on `node`; returns the plan it applied (empty when in sync).
    Once the rules are in force, what the other dataplane left is removed."""
    plane = node_dataplane(lab, node, dataplane_name)
    desired = _desired(lab, node, plane, options)
    the_plan = plane.diff(desired, plane.read())
    if not the_plan.empty:
        plane.apply(the_plan)
    plane.settle()
    return the_plan


def in_sync(lab: Lab, node: str, options: CompileOptions = CompileOptions(),
            dataplane_name: Optional[str] = None) -> bool:
    """Whether a cycle now would write nothing (the kernel reads back as written)."""
    plane = node_dataplane(lab, node, dataplane_name)
    desired = _desired(lab, node, plane, options)
    return plane.diff(desired, plane.read()).empty
