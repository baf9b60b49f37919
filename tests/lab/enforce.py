"""One cycle on one lab node, run in this process with CompileOptions of the
test's choosing: fetch from the lab's API server over the node's network,
parse, compile, and apply to the node's kernel, as lib/cycle.py does.

Tests of compile options use it to pick options per node and per step
without a command line in between; everything else (the API, the network,
iptables and ipset in the node's namespace) is the real thing.
"""
from __future__ import annotations

from lib import objects
from lib import plan as planner
from lib.compile import CompileOptions, compile_node
from lib.cycle import only_families, parse_fetched
from lib.kernel import Kernel
from lib.kubeapi import ApiClient, load_config
from lib.plan import Plan

from . import netns
from .lab import Lab

BACKEND = "nft"


def node_kernel(lab: Lab, node: str) -> Kernel:
    return Kernel(BACKEND, netns=lab.network.node_ns(node))


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


def enforce(lab: Lab, node: str, options: CompileOptions = CompileOptions()) -> Plan:
    """One cycle on `node`; returns the plan it applied (empty when in sync)."""
    fetched, _ = fetch(lab, node)
    cluster = parse_fetched(fetched)
    kernel = node_kernel(lab, node)
    desired = only_families(compile_node(cluster, node, options=options), kernel.families)
    the_plan = planner.diff(desired, kernel.read())
    if not the_plan.empty:
        kernel.apply(the_plan)
    return the_plan


def in_sync(lab: Lab, node: str, options: CompileOptions = CompileOptions()) -> bool:
    """Whether a cycle now would write nothing (the kernel reads back as written)."""
    fetched, _ = fetch(lab, node)
    cluster = parse_fetched(fetched)
    kernel = node_kernel(lab, node)
    desired = only_families(compile_node(cluster, node, options=options), kernel.families)
    return planner.diff(desired, kernel.read()).empty
