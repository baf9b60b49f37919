"""lib/watch.py (and the watch side of lib/kubeapi.py) against the test API
server's real watch streams on 127.0.0.1: list then watch, resume, relist on
410 or garbage, bookmarks, cost of an idle cycle, the change trigger."""
import logging
import threading
import time

import pytest

from lib import objects
from lib.kubeapi import (ADMIN_NETWORK_POLICIES, BASELINE_ADMIN_NETWORK_POLICIES, NAMESPACES,
                         NETWORK_POLICIES, NODES, PODS, ApiClient, ApiError, WatchEventError,
                         load_config)
from lib.watch import ClusterCache, Trigger, WatchCache


# -- objects -----------------------------------------------------------------------

def ns(name, **labels):
    return {"metadata": {"name": name, "labels": labels}}


def pod(name, ip, namespace="x", node="node-1", **labels):
    return {"metadata": {"namespace": namespace, "name": name, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


def policy(name, namespace="x", **match):
    return {"metadata": {"namespace": namespace, "name": name},
            "spec": {"podSelector": {"matchLabels": match}, "policyTypes": ["Ingress"]}}


NAMESPACES_0 = [ns("x"), ns("y", team="b")]
PODS_0 = [pod("a", "10.244.1.10", app="web"), pod("b", "10.244.1.11", app="db")]
POLICIES_0 = [policy("deny-web", app="web")]


def names(items):
    return [item["metadata"]["name"] for item in items]


def eventually(check, timeout=5.0):
    """Poll `check` until it returns a true value; that value, or fail."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except ApiError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not true within {timeout} s: {check}")
        time.sleep(0.02)


def watches(requests, path=None):
    return [r for r in requests if r.params.get("watch") == "1" and (path is None or r.path == path)]


def lists(requests, path=None):
    return [r for r in requests if "watch" not in r.params and (path is None or r.path == path)]


# -- fixtures ----------------------------------------------------------------------

@pytest.fixture
def serve(serve):
    """conftest's serve, with this module's objects and no bookmarks unless asked."""
    def start(**kwargs):
        kwargs.setdefault("namespaces", NAMESPACES_0)
        kwargs.setdefault("pods", PODS_0)
        kwargs.setdefault("policies", POLICIES_0)
        kwargs.setdefault("bookmark_seconds", 3600)
        return serve(**kwargs)
    return start


@pytest.fixture
def watched():
    """Start ClusterCaches (fast retries) on a server; each must stop within a second."""
    started = []

    def start(api, synced=True, **kwargs):
        kwargs.setdefault("retry", (0.05, 0.5))
        trigger = kwargs.pop("trigger", None) or Trigger()
        cache = ClusterCache(load_config(api_server=api.url), on_change=trigger.notify, **kwargs)
        started.append(cache)
        cache.start()
        if synced:
            assert cache.wait_synced(2)
            eventually(lambda: api.open_watches() == 3)
        return cache, trigger
    yield start
    for cache in started:
        assert cache.stop(1.0)


# -- list, then watch ----------------------------------------------------------------

def test_initial_list_then_watch_from_the_lists_resource_version(serve, watched):
    api = serve()
    cache, _ = watched(api, watch_seconds=100, jitter=0.5)
    got = cache.snapshot()
    assert names(got.namespaces) == ["x", "y"]
    assert names(got.pods) == ["a", "b"]
    assert names(got.policies) == ["deny-web"]
    log = api.requests
    for path in (NAMESPACES, PODS, NETWORK_POLICIES):
        (listed,) = lists(log, path)
        (watch,) = watches(log, path)
        assert listed.params["resourceVersion"] == "0" and listed.params["limit"] == "500"
        assert log.index(listed) < log.index(watch)
        assert watch.params["resourceVersion"] == api.resource_version
        assert watch.params["allowWatchBookmarks"] == "true"
        assert 100 <= int(watch.params["timeoutSeconds"]) <= 150
    # and each admin kind asked for once: not served here
    assert [r.status for r in lists(log, ADMIN_NETWORK_POLICIES)] == [404]
    assert [r.status for r in lists(log, BASELINE_ADMIN_NETWORK_POLICIES)] == [404]
    assert not lists(log, NODES) and not watches(log, NODES)
    assert (got.requests, got.bytes) == (8, api.bytes_sent)


def test_a_snapshot_equals_a_fresh_list_after_adds_changes_and_deletes(serve, watched):
    api = serve()
    cache, _ = watched(api)
    api.set_state(pods=PODS_0 + [pod("c", "10.244.2.5", node="node-2", app="web")])
    managed = pod("c", "10.244.2.5")
    managed["metadata"]["managedFields"] = [{"manager": "kubectl", "operation": "Apply"}]
    api.set_state(pods=[pod("a", "10.244.1.10", app="api"), PODS_0[1], managed],
                  namespaces=[ns("x", team="a"), ns("z")], policies=[policy("allow", app="db")])
    api.set_state(pods=[managed])

    polled = ApiClient(load_config(api_server=api.url)).list_cluster()
    expected = objects.parse_cluster(polled.namespaces, polled.pods, polled.policies)

    def same():
        got = cache.snapshot()
        return objects.parse_cluster(got.namespaces, got.pods, got.policies) == expected
    eventually(same)
    got = cache.snapshot()
    assert names(got.pods) == ["c"] and names(got.namespaces) == ["x", "z"]
    assert names(got.policies) == ["allow"]
    assert "managedFields" not in got.pods[0]["metadata"]     # not kept: nothing reads it
    assert got.pods[0]["metadata"]["uid"]


def test_a_snapshot_before_the_first_list_completes_raises(serve, watched):
    api = serve()
    api.fail_next(503, count=2, path=PODS, watch=False, message="etcd leader changed")
    cache, _ = watched(api, synced=False, retry=(0.15, 1))
    assert cache.caches["namespaces"].wait_synced(1) and cache.caches["policies"].wait_synced(1)
    err = eventually(lambda: (lambda e: e if e and "last error" in str(e) else None)(
        _error_of(cache.snapshot)))
    assert str(err).startswith("/api/v1/pods: watch cache not filled yet: the first list is not "
                               "complete; last error: GET /api/v1/pods page 1: HTTP 503 Service "
                               "Unavailable: etcd leader changed")
    assert cache.wait_synced(2)
    assert names(cache.snapshot().pods) == ["a", "b"]
    assert len(lists(api.requests, PODS)) == 3              # two failures, then the list


# -- changes and the trigger ---------------------------------------------------------

def test_a_change_reaches_the_cache_within_a_second_and_fires_the_trigger_once(serve, watched):
    api = serve()
    cache, trigger = watched(api, trigger=Trigger(min_gap=0.4))
    assert trigger.take() is not None                        # the first lists count as a change
    before = time.monotonic()
    api.set_state(pods=PODS_0 + [pod("c", "10.244.1.12", app="web")])
    api.set_state(policies=POLICIES_0 + [policy("allow-db", app="db")])     # same burst

    seen = trigger.wait(2)
    fired = time.monotonic()
    assert seen is not None and before <= seen <= fired and fired - before < 1.0
    got = cache.snapshot()
    assert names(got.pods) == ["a", "b", "c"] and names(got.policies) == ["allow-db", "deny-web"]
    assert trigger.take() == seen
    assert trigger.wait(0.6) is None                         # one cycle for the burst


def test_changes_are_coalesced_to_one_cycle_a_second(serve, watched):
    api = serve()
    _, trigger = watched(api, trigger=Trigger(min_gap=0.2, settle=0.0))
    trigger.take()
    fired = []
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            if trigger.wait(0.05) is not None:
                fired.append(time.monotonic())
                trigger.take()
    thread = threading.Thread(target=loop)
    thread.start()
    try:
        for i in range(12):                                  # a change every 50 ms for 0.6 s
            api.set_state(pods=PODS_0 + [pod("c", "10.244.1.12", gen=str(i))])
            time.sleep(0.05)
        time.sleep(0.3)                                      # the last change's turn
    finally:
        stop.set()
        thread.join()
    gaps = [b - a for a, b in zip(fired, fired[1:])]
    assert 2 <= len(fired) <= 6                              # not 12
    assert all(gap >= 0.19 for gap in gaps)
    assert trigger.pending is None


def test_a_status_heartbeat_updates_the_cache_but_fires_nothing(serve, watched):
    api = serve()
    cache, trigger = watched(api)
    trigger.take()
    beating = pod("a", "10.244.1.10", app="web")
    beating["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    beating["metadata"]["annotations"] = {"seen": "now"}
    before = cache.caches["pods"].resource_version
    api.set_state(pods=[beating, PODS_0[1]])
    eventually(lambda: cache.caches["pods"].resource_version != before)
    assert trigger.wait(0.2) is None
    # kept: what parsing reads, not the conditions or annotations nothing reads
    kept = cache.snapshot().pods[0]
    assert kept["metadata"]["labels"] == {"app": "web"} and kept["status"]["podIPs"]
    assert "conditions" not in kept["status"] and "annotations" not in kept["metadata"]

    relabelled = pod("a", "10.244.1.10", app="api")
    api.set_state(pods=[relabelled, PODS_0[1]])
    assert trigger.wait(1.5) is not None


def test_deleted_objects_leave_the_cache(serve, watched):
    api = serve()
    cache, trigger = watched(api)
    trigger.take()
    api.set_state(pods=[PODS_0[1]], policies=[], namespaces=[ns("x")])
    assert trigger.wait(2) is not None
    got = eventually(lambda: (lambda s: s if names(s.pods) == ["b"] else None)(cache.snapshot()))
    assert got.policies == [] and names(got.namespaces) == ["x"]


# -- cost ------------------------------------------------------------------------------

def test_idle_cycles_cost_no_requests_and_no_bytes(serve, watched):
    api = serve()
    cache, _ = watched(api)
    first = cache.snapshot()
    assert first.requests == 8 and first.bytes > 0
    logged, sent = len(api.requests), api.bytes_sent
    time.sleep(0.3)
    for _ in range(3):
        idle = cache.snapshot()
        assert (idle.requests, idle.bytes) == (0, 0)
    assert len(api.requests) == logged and api.bytes_sent == sent

    api.set_state(pods=PODS_0 + [pod("c", "10.244.1.12")])      # a change costs its event
    changed = eventually(lambda: (lambda s: s if len(s.pods) == 3 else None)(cache.snapshot()))
    assert changed.requests == 0 and 0 < changed.bytes == api.bytes_sent - sent
    assert len(api.requests) == logged

    polled = ApiClient(load_config(api_server=api.url)).list_cluster()   # the poll, for contrast
    assert polled.requests == 5 and polled.bytes > changed.bytes


# -- resuming and relisting ----------------------------------------------------------

def test_a_dropped_stream_resumes_from_the_last_resource_version_without_a_list(serve, watched):
    api = serve()
    cache, _ = watched(api)
    version = cache.caches["pods"].resource_version
    before = len(api.requests)
    assert api.drop_watches(PODS) == 1
    api.set_state(pods=PODS_0 + [pod("c", "10.244.1.12")])
    eventually(lambda: len(cache.snapshot().pods) == 3)
    new = api.requests[before:]
    assert lists(new) == []
    (resumed,) = watches(new, PODS)
    assert resumed.params["resourceVersion"] == version


@pytest.mark.parametrize("too_old_watch", ["event", "status"])
def test_a_too_old_resource_version_leads_to_a_fresh_list(serve, watched, too_old_watch):
    api = serve(too_old_watch=too_old_watch)
    cache, _ = watched(api)
    version = cache.caches["pods"].resource_version
    before = len(api.requests)
    api.hang_next(0.3, path=PODS, watch=True)      # the resumed watch is answered after ...
    api.drop_watches(PODS)
    api.set_state(pods=[PODS_0[0]])                  # ... a change and a compaction
    api.compact()
    eventually(lambda: names(cache.snapshot().pods) == ["a"]
               and len(watches(api.requests[before:], PODS)) == 2)
    new = api.requests[before:]
    stale, fresh = watches(new, PODS)
    assert stale.params["resourceVersion"] == version
    assert stale.status == (410 if too_old_watch == "status" else 200)
    (relisted,) = lists(new, PODS)
    assert new.index(stale) < new.index(relisted) < new.index(fresh)
    assert fresh.params["resourceVersion"] == api.resource_version
    assert lists(new, NAMESPACES) == []


def test_a_server_that_always_answers_410_gets_fewer_and_fewer_lists(serve, watched):
    api = serve()
    cache, _ = watched(api)
    before = len(api.requests)
    api.fail_next(410, count=1000, path=PODS, watch=True, message="too old resource version")
    api.drop_watches(PODS)
    time.sleep(0.8)
    relists = lists(api.requests[before:], PODS)
    assert 2 <= len(relists) <= 6                      # 0.05 s doubling, not a busy loop
    api.clear_faults()
    eventually(lambda: api.open_watches(PODS) == 1)
    assert names(cache.snapshot().pods) == ["a", "b"]


def test_an_error_event_410_on_an_open_stream_leads_to_a_fresh_list(serve, watched):
    api = serve()
    cache, _ = watched(api)
    before = len(api.requests)
    assert api.expire_watches(NETWORK_POLICIES) == 1
    eventually(lambda: len(lists(api.requests[before:], NETWORK_POLICIES)) == 1
               and api.open_watches(NETWORK_POLICIES) == 1)
    assert names(cache.snapshot().policies) == ["deny-web"]


def test_a_garbage_event_is_an_error_that_leads_to_a_fresh_list(serve, watched, caplog):
    api = serve()
    cache, trigger = watched(api)
    trigger.take()
    before = len(api.requests)
    assert api.garbage_watches(path=PODS) == 1
    eventually(lambda: len(lists(api.requests[before:], PODS)) == 1 and api.open_watches(PODS) == 1)
    assert trigger.pending is None                   # the fresh list found nothing new
    assert any("not JSON" in r.getMessage() for r in caplog.records)
    api.set_state(pods=[PODS_0[0]])                 # and the cache still follows changes
    eventually(lambda: names(cache.snapshot().pods) == ["a"])


def test_bookmarks_move_the_resource_version_and_fire_nothing(serve, watched):
    api = serve(bookmark_seconds=0.1)
    cache, trigger = watched(api)
    trigger.take()
    pods = cache.caches["pods"]
    listed = pods.resource_version
    api.set_state(nodes=[{"metadata": {"name": "node-1"}}])     # a new version, no pod changed
    eventually(lambda: pods.resource_version == api.resource_version != listed)
    assert trigger.wait(0.2) is None
    before = len(api.requests)
    api.drop_watches(PODS)
    eventually(lambda: api.open_watches(PODS) == 1)
    (resumed,) = watches(api.requests[before:], PODS)
    assert resumed.params["resourceVersion"] == api.resource_version


def test_an_idle_stream_ends_normally_and_a_silent_one_is_reconnected(serve, watched, caplog):
    api = serve()
    cache, _ = watched(api, watch_seconds=1, jitter=0, timeout=(1, 0.3))
    started = time.monotonic()
    assert api.silence_watches(PODS) == 1
    # the others: ended by the server after timeoutSeconds (1 s), resumed without an error
    eventually(lambda: len(watches(api.requests, NAMESPACES)) == 2)
    # the silent one: reconnected after timeoutSeconds + the read timeout (0.3 s)
    eventually(lambda: len(watches(api.requests, PODS)) == 2, timeout=3)
    assert 1.25 <= time.monotonic() - started < 3.0
    errors = [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "watch-error"]
    assert len(errors) == 1 and errors[0].startswith(
        "watch /api/v1/pods: GET /api/v1/pods watch from resourceVersion 1: no data within the "
        "read timeout (1.3 s); resuming in")
    assert [len(lists(api.requests, path)) for path in (NAMESPACES, PODS, NETWORK_POLICIES)] == [1] * 3


def test_a_cache_out_of_sync_beyond_the_bound_refuses_snapshots(serve, watched):
    api = serve()
    cache, _ = watched(api, stale_after=0.3)
    gone = time.monotonic()
    api.stop()                                        # streams cut, reconnections refused
    assert names(cache.snapshot().pods) == ["a", "b"]   # within the bound: the last state
    err = eventually(lambda: _error_of(cache.snapshot))
    assert time.monotonic() - gone >= 0.3
    assert "watch cache out of sync for" in str(err) and "(limit 0.3 s)" in str(err)
    assert "connection failed" in str(err)


def _error_of(call):
    try:
        call()
    except ApiError as exc:
        return exc
    return None


def test_stop_ends_the_threads_within_a_second(serve):
    api = serve()
    cache = ClusterCache(load_config(api_server=api.url)).start()
    assert cache.wait_synced(2)
    eventually(lambda: api.open_watches() == 3)
    started = time.monotonic()
    assert cache.stop(1.0)
    assert time.monotonic() - started < 1.0
    assert not [t for t in threading.enumerate() if t.name.startswith("watch /")]
    eventually(lambda: api.open_watches() == 0)


# -- the admin policy kinds: served, not served, appearing, removed -----------------------

def admin_policy(name, priority=10):
    return {"metadata": {"name": name},
            "spec": {"priority": priority, "subject": {"namespaces": {}},
                     "egress": [{"action": "Deny", "to": [{"nodes": {}}]}]}}


def node(name, ip, **labels):
    return {"metadata": {"name": name, "labels": labels},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}


ADMIN_PATHS = (ADMIN_NETWORK_POLICIES, BASELINE_ADMIN_NETWORK_POLICIES, NODES)
NODES_0 = [node("node-1", "172.18.0.1", zone="a")]


def admin_log(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "admin-api"]


NOT_SERVED = ("policy.networking.k8s.io/v1alpha1 adminnetworkpolicies and "
              "baselineadminnetworkpolicies not served: enforcing NetworkPolicy alone")
SERVED = ("policy.networking.k8s.io/v1alpha1 adminnetworkpolicies and baselineadminnetworkpolicies "
          "served: enforcing AdminNetworkPolicy, NetworkPolicy and BaselineAdminNetworkPolicy")


def test_without_the_admin_api_network_policy_alone_and_one_log_line(serve, watched, caplog):
    api = serve(admin_policies=[admin_policy("a")], nodes=NODES_0)
    with caplog.at_level(logging.INFO, logger="kube-policy-manager"):
        cache, _ = watched(api)
        snapshots = [cache.snapshot() for _ in range(3)]
    for got in snapshots:
        assert not got.admin_served and got.admin_policies == [] and got.nodes == []
        assert names(got.policies) == ["deny-web"]
    assert admin_log(caplog) == [NOT_SERVED]
    assert [len(lists(api.requests, path)) for path in ADMIN_PATHS] == [1, 1, 0]
    assert not any(watches(api.requests, path) for path in ADMIN_PATHS)


def test_the_admin_api_served_later_is_picked_up_and_dropped_when_removed(serve, watched, caplog):
    api = serve(admin_policies=[admin_policy("a")], nodes=NODES_0)
    with caplog.at_level(logging.INFO, logger="kube-policy-manager"):
        cache, trigger = watched(api, recheck=0.2)
        assert not cache.snapshot().admin_served
        trigger.take()

        api.set_admin_api(True)
        # each kind is listed by its own cache: served may be seen before the list
        got = eventually(lambda: (lambda s: s if s.admin_served and s.admin_policies and s.nodes
                                  else None)(cache.snapshot()))
        assert names(got.admin_policies) == ["a"] and got.baseline_policies == []
        assert names(got.nodes) == ["node-1"] and got.nodes[0]["status"] == NODES_0[0]["status"]
        assert trigger.pending is not None
        eventually(lambda: all(api.open_watches(path) == 1 for path in ADMIN_PATHS))

        # watched like the other kinds: a change arrives as an event, no list
        listed = len(lists(api.requests))
        api.set_state(admin_policies=[admin_policy("a"), admin_policy("b", 5)],
                      nodes=NODES_0 + [node("node-2", "172.18.0.2")])
        eventually(lambda: (names(cache.snapshot().admin_policies), names(cache.snapshot().nodes))
                   == (["a", "b"], ["node-1", "node-2"]))
        assert len(lists(api.requests)) == listed

        trigger.take()
        api.set_admin_api(False)
        got = eventually(lambda: (lambda s: s if not s.admin_served else None)(cache.snapshot()))
        assert (got.admin_policies, got.baseline_policies, got.nodes) == ([], [], [])
        assert trigger.pending is not None
        # the Nodes are no longer watched, and the admin kinds are asked for again, cheaply
        eventually(lambda: not any(api.open_watches(path) for path in ADMIN_PATHS))
        asked = len(lists(api.requests, ADMIN_NETWORK_POLICIES))
        eventually(lambda: len(lists(api.requests, ADMIN_NETWORK_POLICIES)) > asked)
        assert lists(api.requests, ADMIN_NETWORK_POLICIES)[-1].status == 404
    # once at start, then at each change seen (the kinds may go one after the other)
    logged = admin_log(caplog)
    assert logged[:2] == [NOT_SERVED, SERVED] and logged[-1] == NOT_SERVED and len(logged) <= 4
    assert all(a != b for a, b in zip(logged, logged[1:]))


def test_one_admin_kind_served_alone_brings_the_nodes_its_nodes_peer_needs(serve, watched):
    api = serve(admin_api=["baselineadminnetworkpolicies"], nodes=NODES_0,
                baseline_policies=[{"metadata": {"name": "default"},
                                    "spec": {"subject": {"namespaces": {}},
                                             "egress": [{"action": "Deny", "to": [{"nodes": {}}]}]}}])
    cache, _ = watched(api, synced=False)
    assert cache.wait_synced(2)
    got = cache.snapshot()
    assert got.admin_api == {"baselineadminnetworkpolicies"}
    assert names(got.baseline_policies) == ["default"] and names(got.nodes) == ["node-1"]


def test_the_nodes_are_read_only_while_a_nodes_peer_needs_them(serve, watched):
    """Admin policies without a `nodes` peer cost no Node list or watch;
    one that gains such a peer brings them, and until they are listed the
    admin policies are given as they were."""
    plain = {"metadata": {"name": "a"}, "spec": {"priority": 10, "subject": {"namespaces": {}},
                                                 "ingress": [{"action": "Deny",
                                                              "from": [{"namespaces": {}}]}]}}
    api = serve(admin_api=True, admin_policies=[plain], nodes=NODES_0)
    cache, _ = watched(api, synced=False)
    assert cache.wait_synced(2)
    eventually(lambda: api.open_watches() == 5)
    before = cache.snapshot()
    assert names(before.admin_policies) == ["a"] and before.nodes == []
    assert lists(api.requests, NODES) == [] and api.open_watches(NODES) == 0

    api.hang_next(2.0, path=NODES)
    api.set_state(admin_policies=[plain, admin_policy("b")])
    eventually(lambda: names(cache.caches["admin_policies"].items()) == ["a", "b"])
    waiting = cache.snapshot()                          # the Nodes list is hanging
    assert names(waiting.admin_policies) == ["a"] and waiting.nodes == []
    got = eventually(lambda: (lambda s: s if s.nodes else None)(cache.snapshot()), timeout=5)
    assert names(got.admin_policies) == ["a", "b"] and names(got.nodes) == ["node-1"]

    api.set_state(admin_policies=[plain])
    # the watch closes, then the cache is emptied: both are awaited
    eventually(lambda: api.open_watches(NODES) == 0 and cache.snapshot().nodes == []
               and not cache.caches["nodes"].served)


def test_a_500_on_the_admin_list_fails_the_snapshot(serve, watched):
    api = serve(admin_api=True, admin_policies=[admin_policy("a")])
    api.fail_next(500, count=1000, path=ADMIN_NETWORK_POLICIES)
    cache, _ = watched(api, synced=False)
    assert not cache.wait_synced(0.5)
    with pytest.raises(ApiError) as err:
        cache.snapshot()
    assert str(err.value).startswith(f"{ADMIN_NETWORK_POLICIES}: watch cache not filled yet")
    assert "HTTP 500" in str(err.value)
    api.clear_faults()
    eventually(lambda: names(cache.snapshot().admin_policies) == ["a"], timeout=3)


def test_the_admin_kinds_wait_for_the_nodes_and_fail_without_them(serve, watched):
    """A `nodes` peer must never be read as matching no node: until the Nodes
    are listed the snapshot holds the admin kinds as the last one did (here:
    not served), and when they cannot be listed it fails."""
    api = serve(admin_policies=[admin_policy("a")], nodes=NODES_0)
    cache, _ = watched(api, recheck=0.1)
    assert not cache.snapshot().admin_served
    api.hang_next(3.0, path=NODES)                  # long enough for a loaded machine's look
    api.set_admin_api(True)
    # both admin kinds are in the cache (not only answered by the server); a policy names nodes
    eventually(lambda: all(cache.caches[kind].contents()[0]
                           for kind in ("admin_policies", "baseline_policies")))
    waiting = cache.snapshot()
    assert not waiting.admin_served and waiting.admin_policies == [] and waiting.nodes == []
    got = eventually(lambda: (lambda s: s if s.admin_served else None)(cache.snapshot()), timeout=6)
    assert names(got.nodes) == ["node-1"]

    api.set_admin_api(False)
    eventually(lambda: not cache.snapshot().admin_served)
    api.fail_next(500, count=1000, path=NODES)
    api.set_admin_api(True)
    eventually(lambda: any(r.status == 500 for r in lists(api.requests, NODES)))
    with pytest.raises(ApiError, match="/api/v1/nodes: watch cache not filled yet.*HTTP 500"):
        cache.snapshot()


def test_nodes_listed_while_the_admin_kinds_went_away_are_not_kept_nor_watched(serve, watched):
    api = serve(admin_policies=[admin_policy("a")], nodes=NODES_0)
    cache, _ = watched(api, recheck=0.1)
    api.hang_next(1.5, path=NODES)
    api.set_admin_api(True)
    eventually(lambda: any(r.status == 200 for r in lists(api.requests, ADMIN_NETWORK_POLICIES)))
    time.sleep(0.2)                                  # the Nodes list is in flight
    api.set_admin_api(False)
    eventually(lambda: not cache.caches["admin_policies"].served)
    eventually(lambda: lists(api.requests, NODES), timeout=3)      # the list came back
    time.sleep(0.3)
    assert api.open_watches(NODES) == 0 and not cache.caches["nodes"].served
    assert not cache.snapshot().admin_served and cache.snapshot().nodes == []


def test_a_node_heartbeat_updates_the_cache_but_fires_nothing(serve, watched):
    api = serve(admin_api=True, admin_policies=[admin_policy("a")], nodes=NODES_0)
    cache, trigger = watched(api, synced=False)
    assert cache.wait_synced(2)
    eventually(lambda: api.open_watches(NODES) == 1)
    trigger.take()
    beat = node("node-1", "172.18.0.1", zone="a")
    beat["status"]["conditions"] = [{"type": "Ready", "lastHeartbeatTime": "2026-11-21T10:05:00Z"}]
    before = cache.caches["nodes"].resource_version
    api.set_state(nodes=[beat])
    eventually(lambda: cache.caches["nodes"].resource_version != before)
    assert trigger.pending is None
    api.set_state(nodes=[node("node-1", "172.18.0.1", zone="b")])
    eventually(lambda: trigger.pending is not None)


# -- the watch request itself --------------------------------------------------------

def test_watch_errors_name_the_path_and_the_cause(serve):
    api = serve()
    client = ApiClient(load_config(api_server=api.url), timeout=(1, 1))
    api.fail_next(403, watch=True, message="")
    with pytest.raises(ApiError) as err:
        client.watch(PODS, "1", 5)
    assert err.value.status == 403 and str(err.value) == (
        "GET /api/v1/pods watch from resourceVersion 1: HTTP 403 Forbidden: "
        "forbidden: RBAC must allow watch on this resource")

    stream = client.watch(PODS, api.resource_version, 5)
    api.garbage_watches(b'{"type":"RENAMED","object":{}}\n')
    with pytest.raises(WatchEventError, match="event 1: unknown event type 'RENAMED'"):
        next(iter(stream))


def test_watch_from_zero_sends_the_current_objects_first(serve):
    api = serve()
    client = ApiClient(load_config(api_server=api.url))
    api.set_state(pods=PODS_0 + [pod("c", "10.244.1.12", namespace="y")])
    with client.watch("/api/v1/namespaces/x/pods", "0", 5) as stream:
        events = iter(stream)
        first = [next(events), next(events)]
        api.set_state(pods=[PODS_0[1], pod("c", "10.244.1.12", namespace="y")])
        deleted = next(events)
    assert [(e["type"], e["object"]["kind"], e["object"]["metadata"]["name"]) for e in first] == [
        ("ADDED", "Pod", "a"), ("ADDED", "Pod", "b")]
    assert (deleted["type"], deleted["object"]["metadata"]["name"]) == ("DELETED", "a")
    assert deleted["object"]["metadata"]["resourceVersion"] == api.resource_version


def test_trigger_reports_time_to_enforce_and_keeps_failed_changes_pending():
    trigger = Trigger(min_gap=0.2, settle=0.0)
    observed = []

    class Report:
        def __init__(self, ok):
            self.ok = ok

    assert trigger.run(lambda: Report(True), observed.append).ok and observed == []
    trigger.notify(time.monotonic() - 0.5)
    trigger.notify()
    failed = trigger.run(lambda: Report(False), observed.append)
    assert not failed.ok and observed == [] and trigger.pending is not None
    trigger.run(lambda: Report(True), observed.append)
    assert len(observed) == 1 and 0.5 <= observed[0] < 1.0
    assert trigger.pending is None


def test_trigger_wait_returns_a_change_at_most_once_per_gap():
    trigger = Trigger(min_gap=0.2, settle=0.0)
    trigger.notify()
    started = time.monotonic()
    assert trigger.wait(1) is not None
    assert trigger.wait(1) is not None                  # not taken: again, but a gap later
    assert 0.19 <= time.monotonic() - started < 0.6
    trigger.take()
    assert trigger.wait(0.1) is None


def test_a_cache_of_one_kind_without_a_meaning_reports_every_change(serve):
    api = serve()
    seen = []
    cache = WatchCache(ApiClient(load_config(api_server=api.url)), PODS, on_change=seen.append)
    cache.start()
    try:
        assert cache.wait_synced(2)
        eventually(lambda: api.open_watches(PODS) == 1)
        beating = pod("a", "10.244.1.10", app="web")
        beating["metadata"]["annotations"] = {"seen": "now"}
        api.set_state(pods=[beating, PODS_0[1]])
        eventually(lambda: len(seen) == 2)            # the first list, then the change
    finally:
        assert cache.stop(1.0)
