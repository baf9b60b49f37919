"""ApiClient.get_node against the test API server on 127.0.0.1, and the pod
ranges lib.objects reads from what it returns."""
from __future__ import annotations

import dataclasses

import pytest

from lib.kubeapi import ApiClient, ApiError, load_config
from lib.objects import parse_node_pod_cidrs
from tests.apiserver import ApiServer

NODE = {"metadata": {"name": "node-1"},
        "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:10:244:1::/64"]}}
TOKEN = "node-reader-token-0123456789abcdef"


@pytest.fixture
def api():
    with ApiServer(nodes=[NODE], token=TOKEN) as server:
        config = dataclasses.replace(load_config(api_server=server.url), token=TOKEN)
        with ApiClient(config) as client:
            yield server, client


def test_get_node_returns_the_object_and_its_pod_ranges(api):
    server, client = api
    node = client.get_node("node-1")
    assert node["kind"] == "Node" and node["metadata"]["name"] == "node-1"
    assert parse_node_pod_cidrs(node) == (("10.244.1.0/24", "fd00:10:244:1::/64"), [])
    assert client.request_count == 1 and client.byte_count > 0
    assert [(r.path, r.auth) for r in server.requests] == [("/api/v1/nodes/node-1", "accepted")]


def test_a_missing_node_names_the_path(api):
    _, client = api
    with pytest.raises(ApiError) as err:
        client.get_node("node-9")
    assert str(err.value).startswith("GET /api/v1/nodes/node-9 for this node's pod CIDRs: HTTP 404")
    assert err.value.status == 404


def test_forbidden_says_what_rbac_must_allow(api):
    server, client = api
    server.fail_next(403)
    with pytest.raises(ApiError) as err:
        client.get_node("node-1")
    assert "HTTP 403" in str(err.value) and TOKEN not in str(err.value)


def test_something_else_than_a_node_is_refused(api):
    server, client = api
    server.respond_next({"kind": "Pod", "metadata": {"name": "node-1"}})
    with pytest.raises(ApiError) as err:
        client.get_node("node-1")
    assert "not a Node object" in str(err.value)
    server.respond_next("[1, 2")
    with pytest.raises(ApiError) as err:
        client.get_node("node-1")
    assert "not JSON" in str(err.value)


@pytest.mark.parametrize("name", ["", "../pods", "Node-1", "node 1", "node/1", "nöde"])
def test_names_that_cannot_be_nodes_never_reach_the_wire(api, name):
    server, client = api
    with pytest.raises(ValueError):
        client.get_node(name)
    assert server.requests == []
