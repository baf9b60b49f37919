"""The semantic tests run on both dataplanes: one intent, rendered for
iptables or for nftables, walked by that dataplane's tracer."""
from __future__ import annotations

from typing import Optional

import pytest

from lib import iptables_render, nft_render
from lib.compile import DEFAULT_OPTIONS, CompileOptions, intend_node
from lib.dataplane import DATAPLANES, IPTABLES, NFTABLES
from lib.model import Cluster
from lib.selectors import ClusterIndex
from tests.unit.nft_tracer import tracer_for

__all__ = ["DATAPLANES", "IPTABLES", "NFTABLES", "node_state", "tracer_for", "each_dataplane"]


def node_state(dataplane: str, cluster: Cluster, node: str, index: Optional[ClusterIndex] = None,
               options: CompileOptions = DEFAULT_OPTIONS):
    """`node`'s rendered state: a lib.ruleset.DesiredState or a lib.nft_state.Table."""
    intent = intend_node(cluster, node, index, options)
    if dataplane == NFTABLES:
        return nft_render.render(intent)
    assert dataplane == IPTABLES, dataplane
    return iptables_render.render(intent)


# Runs a test taking `dataplane` once for each.
each_dataplane = pytest.mark.parametrize("dataplane", DATAPLANES)
