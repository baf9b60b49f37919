"""--watch end to end: the real daemon in a namespace, fed by watch streams.
A change is enforced within about a second although the interval is long,
and idle cycles cost the API server nothing."""
from __future__ import annotations

import time

import pytest

from tests.kernel.node import Node, namespace, pod, policy, wait_for

DENY_WEB = policy("x", "deny-web", {"podSelector": {"matchLabels": {"app": "web"}},
                                    "policyTypes": ["Ingress"]})


@pytest.fixture
def node(netns):
    n = Node(netns)
    n.api.set_state(namespaces=[namespace("x")],
                    pods=[pod("x", "web", "10.244.1.10", labels={"app": "web"})], policies=[])
    yield n
    n.close()


def web_isolated(node: Node) -> bool:
    return any("-d 10.244.1.10/32" in line for line in node.owned_chain("KPM-FORWARD"))


def test_change_is_enforced_within_seconds_and_idle_costs_nothing(node):
    daemon = node.start_daemon("--watch", "--interval", "60")
    wait_for(lambda: daemon.status("/readyz") == 200, 20, "the first cycle")
    assert not web_isolated(node)

    # Idle: no request reaches the API while nothing changes.
    time.sleep(0.5)
    node.api.clear_requests()
    time.sleep(3)
    assert [r for r in node.api.requests if "watch" not in r.query] == []

    changed = time.monotonic()
    node.api.set_state(policies=[DENY_WEB])
    wait_for(lambda: web_isolated(node), 5, "the new policy's dispatch rule")
    assert time.monotonic() - changed < 5          # far below the 60 s interval
    wait_for(lambda: (daemon.metric("kpm_time_to_enforce_seconds_count") or 0) >= 1, 5,
             "a time-to-enforce observation")
    assert daemon.metric("kpm_time_to_enforce_seconds_sum") < 5

    node.api.set_state(policies=[])
    wait_for(lambda: not web_isolated(node), 5, "the policy's removal")
