"""lib/kubeapi.py against real HTTP and HTTPS servers on 127.0.0.1 (tests/apiserver.py).

TLS material is made with the `openssl` command (tests.apiserver.make_ca / issue_cert).
"""
import base64
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pytest
import requests
import yaml

from lib.kubeapi import (ADMIN_NETWORK_POLICIES, BASELINE_ADMIN_NETWORK_POLICIES, NAMESPACES,
                         NETWORK_POLICIES, NODES, PODS, ApiClient, ApiError, ClusterObjects,
                         load_config)
from tests.apiserver import ApiServer, issue_cert, make_ca

SECRET = "s3cret-T0ken-that-must-never-be-logged-0123456789"


# -- object builders (minimal: the client does not interpret objects) ---------

def ns(name, **labels):
    return {"metadata": {"name": name, "labels": labels}}


def pod(namespace, name):
    return {"metadata": {"namespace": namespace, "name": name},
            "spec": {"nodeName": "node-1"}, "status": {"phase": "Running", "podIP": "10.244.1.10"}}


def policy(namespace, name):
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": namespace, "name": name}, "spec": {"podSelector": {}}}


def admin_policy(name, priority=10):
    return {"metadata": {"name": name},
            "spec": {"priority": priority, "subject": {"namespaces": {}},
                     "egress": [{"action": "Deny", "to": [{"nodes": {}}]}]}}


def baseline_policy(name="default"):
    return {"metadata": {"name": name},
            "spec": {"subject": {"namespaces": {}}, "ingress": [{"action": "Deny",
                                                                 "from": [{"namespaces": {}}]}]}}


def node(name, ip):
    return {"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "spec": {"podCIDR": "10.244.1.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}],
                       "conditions": [{"type": "Ready", "status": "True"}]}}


def names(items):
    return [item["metadata"]["name"] for item in items]


FIVE_PODS = [pod("x", f"p{i}") for i in range(5)]


# -- fixtures --------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("pki"))
    ca = make_ca(d, "ca")
    other_ca = make_ca(d, "other-ca")

    class Pki:
        pass
    p = Pki()
    p.ca, p.other_ca = ca, other_ca
    p.server = issue_cert(ca, d, "server", hosts=["127.0.0.1", "::1", "localhost"])
    p.client = issue_cert(ca, d, "client", client=True)
    p.stranger = issue_cert(other_ca, d, "stranger", client=True)
    return p


@pytest.fixture
def tls_serve(serve, pki):
    def start(**kwargs):
        return serve(tls_cert=pki.server.cert, tls_key=pki.server.key, **kwargs)
    return start


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def b64(path):
    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode()


def write_kubeconfig(path, server, cluster=None, user=None):
    doc = {
        "apiVersion": "v1", "kind": "Config", "current-context": "ctx",
        "clusters": [{"name": "c", "cluster": {"server": server, **(cluster or {})}}],
        "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
        "users": [{"name": "u", "user": user or {}}],
    }
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)
    return str(path)


def list_error(client, path=PODS):
    with pytest.raises(ApiError) as info:
        client.list(path)
    return info.value


# -- lists and pagination ------------------------------------------------------------

def test_list_follows_continue_tokens_and_sends_the_expected_queries(serve):
    api = serve(pods=FIVE_PODS)
    client = ApiClient(load_config(api_server=api.url), page_size=2)

    assert names(client.list(PODS)) == ["p0", "p1", "p2", "p3", "p4"]

    sent = api.requests
    assert [r.page for r in sent] == [1, 2, 3]
    assert sent[0].query == "limit=2&resourceVersion=0"
    for later in sent[1:]:
        assert set(later.params) == {"limit", "continue"}
        assert later.params["limit"] == "2" and later.params["continue"]
    assert sent[1].params["continue"] != sent[2].params["continue"]
    assert all(r.status == 200 for r in sent)


def test_list_cluster_reads_the_three_lists_and_counts_the_load(serve):
    api = serve(namespaces=[ns("x"), ns("y")], pods=FIVE_PODS[:3], policies=[policy("x", "deny")])
    client = ApiClient(load_config(api_server=api.url), page_size=2)

    objects = client.list_cluster()

    assert isinstance(objects, ClusterObjects)
    assert names(objects.namespaces) == ["x", "y"]
    assert names(objects.pods) == ["p0", "p1", "p2"]
    assert names(objects.policies) == ["deny"]
    # the admin kinds are asked for, and not served here
    assert [(r.path, r.status) for r in api.requests] == [
        (NAMESPACES, 200), (PODS, 200), (PODS, 200), (NETWORK_POLICIES, 200),
        (ADMIN_NETWORK_POLICIES, 404), (BASELINE_ADMIN_NETWORK_POLICIES, 404)]
    assert objects.requests == 6
    assert objects.bytes == sum(r.response_bytes for r in api.requests) > 0

    again = client.list_cluster()
    assert again.requests == 6 and again.bytes == objects.bytes
    assert client.request_count == 12


# -- the admin policy kinds: served or not -------------------------------------------

def admin_log(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "admin-api"]


def test_without_the_admin_api_network_policy_alone_is_read_and_that_is_said_once(serve, caplog):
    api = serve(namespaces=[ns("x")], policies=[policy("x", "deny")],
                admin_policies=[admin_policy("a")], nodes=[node("node-1", "172.18.0.1")])
    client = ApiClient(load_config(api_server=api.url))
    with caplog.at_level(logging.INFO, logger="kube-policy-manager"):
        first, second = client.list_cluster(), client.list_cluster()
    for objects in (first, second):
        assert not objects.admin_served and objects.admin_api == frozenset()
        assert (objects.admin_policies, objects.baseline_policies, objects.nodes) == ([], [], [])
        assert names(objects.policies) == ["deny"]
    assert NODES not in {r.path for r in api.requests}          # no nodes peer to serve
    assert admin_log(caplog) == [
        "policy.networking.k8s.io/v1alpha1 adminnetworkpolicies and baselineadminnetworkpolicies "
        "not served: enforcing NetworkPolicy alone"]
    assert all(r.levelno == logging.INFO for r in caplog.records
               if getattr(r, "event", "") == "admin-api")


def test_the_nodes_are_listed_only_when_a_nodes_peer_needs_them(serve):
    """Node objects are large and every node lists them each cycle: admin
    policies without a `nodes` peer cost no Node list."""
    plain = {"metadata": {"name": "plain"},
             "spec": {"priority": 5, "subject": {"namespaces": {}},
                      "egress": [{"action": "Deny", "to": [{"networks": ["192.0.2.0/24"]}]}]}}
    api = serve(admin_api=True, admin_policies=[plain], baseline_policies=[baseline_policy()],
                nodes=[node("node-1", "172.18.0.1")])
    client = ApiClient(load_config(api_server=api.url))
    got = client.list_cluster()
    assert names(got.admin_policies) == ["plain"] and got.nodes == []
    assert NODES not in {r.path for r in api.requests}
    api.set_state(admin_policies=[plain, admin_policy("a")])
    assert names(client.list_cluster().nodes) == ["node-1"]


def test_the_admin_api_served_later_is_read_and_dropped_when_removed(serve, caplog):
    api = serve(namespaces=[ns("x")], admin_policies=[admin_policy("b", 20), admin_policy("a")],
                baseline_policies=[baseline_policy()],
                nodes=[node("node-2", "172.18.0.2"), node("node-1", "172.18.0.1")])
    client = ApiClient(load_config(api_server=api.url), page_size=1)
    with caplog.at_level(logging.INFO, logger="kube-policy-manager"):
        before = client.list_cluster()
        api.set_admin_api(True)
        api.clear_requests()
        served = client.list_cluster()
        served_paths = [(r.path, r.page) for r in api.requests]
        api.set_admin_api(False)
        removed = client.list_cluster()
    assert not before.admin_served
    assert served.admin_api == {"adminnetworkpolicies", "baselineadminnetworkpolicies"}
    assert names(served.admin_policies) == ["a", "b"] and names(served.baseline_policies) == ["default"]
    assert names(served.nodes) == ["node-1", "node-2"]
    # trimmed as they arrive: no spec, no conditions
    assert set(served.nodes[0]) == {"metadata", "status"}
    assert served.nodes[0]["status"] == {"addresses": [{"type": "InternalIP", "address": "172.18.0.1"}]}
    # paginated like every list (one object a page), the Nodes last
    assert served_paths == [(NAMESPACES, 1), (PODS, 1), (NETWORK_POLICIES, 1),
                            (ADMIN_NETWORK_POLICIES, 1), (ADMIN_NETWORK_POLICIES, 2),
                            (BASELINE_ADMIN_NETWORK_POLICIES, 1), (NODES, 1), (NODES, 2)]
    assert not removed.admin_served and removed.admin_policies == [] and removed.nodes == []
    assert admin_log(caplog) == [
        "policy.networking.k8s.io/v1alpha1 adminnetworkpolicies and baselineadminnetworkpolicies "
        "not served: enforcing NetworkPolicy alone",
        "policy.networking.k8s.io/v1alpha1 adminnetworkpolicies and baselineadminnetworkpolicies "
        "served: enforcing AdminNetworkPolicy, NetworkPolicy and BaselineAdminNetworkPolicy",
        "policy.networking.k8s.io/v1alpha1 adminnetworkpolicies and baselineadminnetworkpolicies "
        "not served: enforcing NetworkPolicy alone"]


def test_a_cluster_serving_both_admin_kinds_from_the_start_logs_nothing(serve, caplog):
    api = serve(admin_api=True, admin_policies=[admin_policy("a")])
    with caplog.at_level(logging.INFO, logger="kube-policy-manager"):
        objects = ApiClient(load_config(api_server=api.url)).list_cluster()
    assert names(objects.admin_policies) == ["a"] and admin_log(caplog) == []


def test_one_admin_kind_served_alone(serve, caplog):
    api = serve(admin_api=["adminnetworkpolicies"], admin_policies=[admin_policy("a")],
                baseline_policies=[baseline_policy()], nodes=[node("node-1", "172.18.0.1")])
    with caplog.at_level(logging.INFO, logger="kube-policy-manager"):
        objects = ApiClient(load_config(api_server=api.url)).list_cluster()
    assert objects.admin_api == {"adminnetworkpolicies"} and objects.baseline_policies == []
    assert names(objects.admin_policies) == ["a"] and names(objects.nodes) == ["node-1"]
    assert admin_log(caplog) == ["policy.networking.k8s.io/v1alpha1 baselineadminnetworkpolicies "
                                 "not served: enforcing AdminNetworkPolicy and NetworkPolicy"]


@pytest.mark.parametrize("path, status", [
    (ADMIN_NETWORK_POLICIES, 500), (BASELINE_ADMIN_NETWORK_POLICIES, 403), (NODES, 500)])
def test_any_other_error_on_the_admin_kinds_or_nodes_fails_the_fetch(serve, path, status):
    api = serve(admin_api=True, admin_policies=[admin_policy("a")])
    client = ApiClient(load_config(api_server=api.url))
    api.fail_next(status, path=path)
    with pytest.raises(ApiError) as err:
        client.list_cluster()
    assert err.value.path == path and err.value.status == status
    assert str(err.value).startswith(f"GET {path} page 1: HTTP {status}")
    assert names(client.list_cluster().admin_policies) == ["a"]    # the next cycle reads them


def test_plain_http_without_token_sends_no_authorization_like_kubectl_proxy(serve):
    api = serve(namespaces=[ns("x")])
    config = load_config(api_server=api.url)
    assert config.auth == "none" and config.source == "flag"
    ApiClient(config).list(NAMESPACES)
    assert [r.auth for r in api.requests] == ["none"]


def test_expired_continue_token_restarts_the_whole_list(serve):
    api = serve(pods=FIVE_PODS)
    api.expire_continue(1)
    client = ApiClient(load_config(api_server=api.url), page_size=2)

    assert names(client.list(PODS)) == ["p0", "p1", "p2", "p3", "p4"]

    assert [(r.page, r.status) for r in api.requests] == [(1, 200), (2, 410), (1, 200), (2, 200), (3, 200)]
    assert api.requests[2].params == {"limit": "2", "resourceVersion": "0"}


def test_expired_continue_token_gives_up_after_three_restarts(serve):
    api = serve(pods=FIVE_PODS)
    api.expire_continue(count=100)
    client = ApiClient(load_config(api_server=api.url), page_size=2)

    err = list_error(client)

    assert str(err).startswith(f"GET {PODS} page 2: HTTP 410")
    assert err.status == 410 and err.path == PODS
    assert [r.page for r in api.requests] == [1, 2] * 4


@pytest.mark.parametrize("status", [500, 403, 404, 429])
def test_http_error_names_path_page_and_status(serve, status):
    api = serve(pods=FIVE_PODS)
    api.fail_next(status, message="etcdserver: request timed out")
    client = ApiClient(load_config(api_server=api.url))

    err = list_error(client)

    assert str(err).startswith(f"GET {PODS} page 1: HTTP {status} ")
    assert "etcdserver: request timed out" in str(err)
    assert (err.path, err.page, err.status) == (PODS, 1, status)


def test_wrong_token_is_a_401_error(serve, tmp_path):
    api = serve(token="the-right-token-1234", namespaces=[ns("x")])
    token_file = tmp_path / "token"
    token_file.write_text("a-wrong-token-5678\n")
    client = ApiClient(load_config(api_server=api.url, token_file=str(token_file)))

    err = list_error(client, NAMESPACES)

    assert str(err).startswith(f"GET {NAMESPACES} page 1: HTTP 401")
    assert "a-wrong-token-5678" not in str(err)
    assert [r.auth for r in api.requests] == ["rejected"]


@pytest.mark.parametrize("page", [1, 2])
def test_body_that_is_not_json_names_the_page(serve, page):
    api = serve(pods=FIVE_PODS)
    api.malformed_next(page=page)
    client = ApiClient(load_config(api_server=api.url), page_size=2)

    err = list_error(client)

    assert str(err).startswith(f"GET {PODS} page {page}: response is not JSON")
    assert err.page == page


@pytest.mark.parametrize("body, cause", [
    ({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": {"a": 1}}, "items is a JSON dict"),
    ({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": None}, "items is missing"),
    ({"kind": "Status", "status": "Success"}, "items is missing"),
    ([{"metadata": {"name": "a"}}], "the body is a JSON list"),
    ({"kind": "PodList", "items": [{"metadata": {}}, "pod"]}, "items[1] is not an object"),
    ({"kind": "PodList", "metadata": {"continue": 7}, "items": []}, "metadata.continue is not a string"),
])
def test_body_that_is_not_a_list_is_refused(serve, body, cause):
    api = serve(pods=FIVE_PODS)
    api.respond_next(body)
    err = list_error(ApiClient(load_config(api_server=api.url)))
    assert str(err) == f"GET {PODS} page 1: not a List: {cause}"


def test_failing_middle_page_gives_an_error_and_no_partial_list(serve):
    api = serve(namespaces=[ns("x")], pods=FIVE_PODS, policies=[policy("x", "deny")])
    client = ApiClient(load_config(api_server=api.url), page_size=2)

    api.fail_page(2, 503)
    err = list_error(client)
    assert str(err).startswith(f"GET {PODS} page 2: HTTP 503")
    assert err.page == 2

    api.clear_requests()
    api.fail_page(3, 500, path=PODS)
    with pytest.raises(ApiError, match=f"^GET {PODS} page 3: HTTP 500"):
        client.list_cluster()
    # the failure stops the read: no later list is even asked for
    assert [r.path for r in api.requests] == [NAMESPACES, PODS, PODS, PODS]


@pytest.mark.parametrize("page", [1, 2])
def test_hang_longer_than_the_timeout_is_bounded(serve, page):
    api = serve(pods=FIVE_PODS)
    api.hang_next(20, page=page)
    client = ApiClient(load_config(api_server=api.url), timeout=(1.0, 0.5), page_size=2)

    started = time.monotonic()
    err = list_error(client)
    elapsed = time.monotonic() - started

    assert elapsed < 3
    assert str(err) == f"GET {PODS} page {page}: no response within the read timeout (0.5 s)"


def test_refused_connection_names_path_and_cause():
    client = ApiClient(load_config(api_server=f"http://127.0.0.1:{free_port()}"), timeout=(1.0, 1.0))
    err = list_error(client, NETWORK_POLICIES)
    assert str(err).startswith(f"GET {NETWORK_POLICIES} page 1: connection failed:")
    assert "refused" in str(err).lower()


def test_server_url_with_path_prefix_is_kept(serve):
    api = serve(namespaces=[ns("x")])
    client = ApiClient(load_config(api_server=api.url + "/prefix/"))
    err = list_error(client, NAMESPACES)
    assert api.requests[0].path == "/prefix" + NAMESPACES
    assert "HTTP 404" in str(err)


# -- TLS ------------------------------------------------------------------------------

def test_tls_is_verified_with_the_given_ca(tls_serve, pki):
    api = tls_serve(namespaces=[ns("x")])
    assert api.url.startswith("https://127.0.0.1:")
    client = ApiClient(load_config(api_server=api.url, ca_file=pki.ca.cert))
    assert names(client.list(NAMESPACES)) == ["x"]


def test_tls_fails_without_the_ca(tls_serve):
    api = tls_serve(namespaces=[ns("x")])
    err = list_error(ApiClient(load_config(api_server=api.url)), NAMESPACES)
    assert str(err).startswith(f"GET {NAMESPACES} page 1: TLS error:")
    assert "certificate verify failed" in str(err)


def test_tls_fails_with_a_wrong_ca(tls_serve, pki):
    api = tls_serve(namespaces=[ns("x")])
    err = list_error(ApiClient(load_config(api_server=api.url, ca_file=pki.other_ca.cert)), NAMESPACES)
    assert "certificate verify failed" in str(err)


def test_ca_bundle_from_the_environment_is_not_used(tls_serve, pki, monkeypatch):
    api = tls_serve(namespaces=[ns("x")])
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", pki.ca.cert)
    monkeypatch.setenv("CURL_CA_BUNDLE", pki.ca.cert)
    # a plain requests call does take the bundle from the environment...
    assert requests.get(api.url + NAMESPACES, timeout=5).status_code == 200
    # ...the client does not: without a configured CA it uses the system store
    err = list_error(ApiClient(load_config(api_server=api.url)), NAMESPACES)
    assert "certificate verify failed" in str(err)

    # and a wrong bundle in the environment does not replace the configured CA
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", pki.other_ca.cert)
    monkeypatch.setenv("CURL_CA_BUNDLE", pki.other_ca.cert)
    client = ApiClient(load_config(api_server=api.url, ca_file=pki.ca.cert))
    assert names(client.list(NAMESPACES)) == ["x"]


def test_without_a_ca_the_system_trust_store_is_used(tls_serve, pki, monkeypatch):
    api = tls_serve(namespaces=[ns("x")])
    # SSL_CERT_FILE is how OpenSSL (and kubectl) let the system store be pointed elsewhere
    monkeypatch.setenv("SSL_CERT_FILE", pki.ca.cert)
    monkeypatch.setenv("SSL_CERT_DIR", os.path.dirname(pki.ca.cert))
    assert names(ApiClient(load_config(api_server=api.url)).list(NAMESPACES)) == ["x"]


def test_proxies_from_the_environment_are_not_used(serve, monkeypatch):
    api = serve(namespaces=[ns("x")])
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, dead_proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(api.url + NAMESPACES, timeout=2)
    assert names(ApiClient(load_config(api_server=api.url)).list(NAMESPACES)) == ["x"]


def test_mutual_tls_from_kubeconfig_data_fields(tls_serve, pki, tmp_path):
    api = tls_serve(namespaces=[ns("x")], client_ca=pki.ca.cert)
    path = write_kubeconfig(tmp_path / "kubeconfig", api.url,
                            cluster={"certificate-authority-data": b64(pki.ca.cert)},
                            user={"client-certificate-data": b64(pki.client.cert),
                                  "client-key-data": b64(pki.client.key)})

    config = load_config(kubeconfig=path, environ={})

    assert config.source == f"kubeconfig {path}" and config.auth == "client-certificate"
    for written, original in ((config.ca_file, pki.ca.cert), (config.client_cert, pki.client.cert),
                              (config.client_key, pki.client.key)):
        assert stat.S_IMODE(os.stat(written).st_mode) == 0o600
        with open(written, "rb") as a, open(original, "rb") as b:
            assert a.read() == b.read()
    assert stat.S_IMODE(os.stat(os.path.dirname(config.client_key)).st_mode) == 0o700
    assert names(ApiClient(config).list(NAMESPACES)) == ["x"]

    # the same server refuses a client without a certificate, or with one from another CA
    err = list_error(ApiClient(load_config(api_server=api.url, ca_file=pki.ca.cert)), NAMESPACES)
    assert str(err).startswith(f"GET {NAMESPACES} page 1: ")
    path = write_kubeconfig(tmp_path / "stranger", api.url,
                            cluster={"certificate-authority-data": b64(pki.ca.cert)},
                            user={"client-certificate-data": b64(pki.stranger.cert),
                                  "client-key-data": b64(pki.stranger.key)})
    list_error(ApiClient(load_config(kubeconfig=path, environ={})), NAMESPACES)
    # the server notes a failed handshake in its own thread, maybe just after the client gave up
    deadline = time.monotonic() + 5
    while len(api.tls_errors) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(api.tls_errors) == 2
    assert [r.status for r in api.requests] == [200]


def test_data_field_files_are_removed_at_exit(pki, tmp_path):
    path = write_kubeconfig(tmp_path / "kubeconfig", "https://k.example",
                            cluster={"certificate-authority-data": b64(pki.ca.cert)},
                            user={"client-certificate-data": b64(pki.client.cert),
                                  "client-key-data": b64(pki.client.key)})
    program = ("import sys; from lib.kubeapi import load_config; "
               "c = load_config(kubeconfig=sys.argv[1], environ={}); "
               "print(c.ca_file, c.client_cert, c.client_key)")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", program, path], cwd=root, capture_output=True,
                          text=True, timeout=30, check=True)
    written = done.stdout.split()
    assert len(written) == 3 and all(w.startswith(tempfile.gettempdir()) for w in written)
    assert not [w for w in written if os.path.exists(w)]
    assert not os.path.exists(os.path.dirname(written[0]))


def test_insecure_skip_tls_verify_from_kubeconfig_is_logged(tls_serve, tmp_path, caplog):
    api = tls_serve(namespaces=[ns("x")])
    path = write_kubeconfig(tmp_path / "kubeconfig", api.url, cluster={"insecure-skip-tls-verify": True})
    with caplog.at_level(logging.WARNING, logger="lib.kubeapi"):
        config = load_config(kubeconfig=path, environ={})
    assert config.verify is False
    assert any(r.levelno == logging.WARNING and "insecure-skip-tls-verify" in r.getMessage()
               for r in caplog.records)
    assert names(ApiClient(config).list(NAMESPACES)) == ["x"]


# -- configuration sources ---------------------------------------------------------

@pytest.fixture
def service_account(tmp_path, pki):
    folder = tmp_path / "serviceaccount"
    folder.mkdir()
    (folder / "token").write_text(SECRET + "\n")
    shutil.copy(pki.ca.cert, folder / "ca.crt")
    return str(folder)


def test_configuration_precedence(tmp_path, service_account):
    from_flag = write_kubeconfig(tmp_path / "a" / "config", "https://flag-kubeconfig.example:6443")
    from_env = write_kubeconfig(tmp_path / "b" / "config", "https://env-kubeconfig.example:6443")
    second = write_kubeconfig(tmp_path / "c" / "config", "https://second.example:6443")
    env = {"KUBECONFIG": f"{from_env}:{second}",
           "KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}

    def load(**kwargs):
        return load_config(environ=env, serviceaccount_dir=service_account, **kwargs)

    config = load(api_server="http://127.0.0.1:8001", kubeconfig=from_flag)
    assert (config.source, config.server) == ("flag", "http://127.0.0.1:8001")
    config = load(kubeconfig=from_flag)
    assert (config.source, config.server) == (f"kubeconfig {from_flag}", "https://flag-kubeconfig.example:6443")
    config = load()
    assert (config.source, config.server) == (f"kubeconfig {from_env}", "https://env-kubeconfig.example:6443")
    del env["KUBECONFIG"]
    config = load()
    assert (config.source, config.server) == ("in-cluster", "https://10.96.0.1:443")
    assert config.token_file == os.path.join(service_account, "token")
    assert config.ca_file == os.path.join(service_account, "ca.crt")


def test_kubeconfig_list_in_environment_uses_the_first_existing_file(tmp_path):
    first = write_kubeconfig(tmp_path / "first", "https://first.example")
    second = write_kubeconfig(tmp_path / "second", "https://second.example")
    missing = str(tmp_path / "missing")
    config = load_config(environ={"KUBECONFIG": f"{missing}:{first}:{second}"})
    assert config.server == "https://first.example"
    with pytest.raises(ApiError, match="KUBECONFIG: none of its files exists"):
        load_config(environ={"KUBECONFIG": missing})


def test_nothing_configured_says_what_was_tried(tmp_path):
    with pytest.raises(ApiError) as info:
        load_config(environ={}, serviceaccount_dir=str(tmp_path))
    message = str(info.value)
    for tried in ("--api-server", "--kubeconfig", "$KUBECONFIG", "KUBERNETES_SERVICE_HOST"):
        assert tried in message


def test_kubeconfig_paths_are_relative_to_its_folder(tls_serve, pki, tmp_path, monkeypatch):
    api = tls_serve(token=SECRET, namespaces=[ns("x")])
    folder = tmp_path / "conf"
    (folder / "pki").mkdir(parents=True)
    shutil.copy(pki.ca.cert, folder / "pki" / "ca.crt")
    (folder / "pki" / "token").write_text(SECRET)
    path = write_kubeconfig(folder / "kubeconfig", api.url,
                            cluster={"certificate-authority": "pki/ca.crt"},
                            user={"tokenFile": "pki/token"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    config = load_config(kubeconfig=os.path.relpath(path, elsewhere), environ={})

    assert config.ca_file == str(folder / "pki" / "ca.crt")
    assert config.token_file == str(folder / "pki" / "token")
    assert names(ApiClient(config).list(NAMESPACES)) == ["x"]
    assert api.requests[-1].auth == "accepted"


def test_ca_file_flag_replaces_the_kubeconfig_ca(tls_serve, pki, tmp_path):
    api = tls_serve(namespaces=[ns("x")])
    path = write_kubeconfig(tmp_path / "kubeconfig", api.url,
                            cluster={"certificate-authority": pki.other_ca.cert})
    list_error(ApiClient(load_config(kubeconfig=path, environ={})), NAMESPACES)
    config = load_config(kubeconfig=path, ca_file=pki.ca.cert, environ={})
    assert names(ApiClient(config).list(NAMESPACES)) == ["x"]


@pytest.mark.parametrize("user, field", [
    ({"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "aws"}}, "exec"),
    ({"auth-provider": {"name": "oidc", "config": {}}}, "auth-provider"),
    ({"username": "admin", "password": "pw"}, "username/password"),
])
def test_unsupported_kubeconfig_users_are_clear_errors(tmp_path, user, field):
    path = write_kubeconfig(tmp_path / "kubeconfig", "https://k.example", user=user)
    with pytest.raises(ApiError) as info:
        load_config(kubeconfig=path, environ={})
    assert str(info.value).startswith(f"kubeconfig {path}: user u: {field}: not supported")


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("current-context"), "current-context: not set"),
    (lambda d: d["contexts"][0]["context"].update(cluster="nope"), "cluster 'nope': not found"),
    (lambda d: d["contexts"][0]["context"].update(user="nobody"), "user 'nobody': not found"),
    (lambda d: d["clusters"][0]["cluster"].pop("server"), "cluster c: server: not set"),
    (lambda d: d["clusters"][0]["cluster"].update(server="ftp://x"), "must be an http:// or https:// URL"),
    (lambda d: d["clusters"][0]["cluster"].update({"certificate-authority": "missing.crt"}),
     "cluster c: certificate-authority: "),
    (lambda d: d["clusters"][0]["cluster"].update({"certificate-authority-data": "%%%"}),
     "certificate-authority-data: not valid base64"),
    (lambda d: d["users"][0]["user"].update({"client-certificate-data": "QUJD"}),
     "client-certificate and client-key must be given together"),
])
def test_broken_kubeconfig_names_the_field(tmp_path, change, message):
    path = write_kubeconfig(tmp_path / "kubeconfig", "https://k.example")
    with open(path) as f:
        doc = yaml.safe_load(f)
    change(doc)
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)
    with pytest.raises(ApiError) as info:
        load_config(kubeconfig=path, environ={})
    assert str(info.value).startswith(f"kubeconfig {path}: ")
    assert message in str(info.value)


def test_in_cluster_service_account(tls_serve, service_account):
    api = tls_serve(token=SECRET, namespaces=[ns("x")])
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(api.address[1])}

    config = load_config(environ=env, serviceaccount_dir=service_account)

    assert config.source == "in-cluster" and config.auth == "token-file"
    assert names(ApiClient(config).list(NAMESPACES)) == ["x"]
    assert [r.auth for r in api.requests] == ["accepted"]


def test_in_cluster_ipv6_service_host_is_bracketed(tls_serve, service_account):
    env = {"KUBERNETES_SERVICE_HOST": "fd00:10:96::1", "KUBERNETES_SERVICE_PORT": "443"}
    config = load_config(environ=env, serviceaccount_dir=service_account)
    assert config.server == "https://[fd00:10:96::1]:443"

    try:
        api = tls_serve(host="::1", token=SECRET, namespaces=[ns("x")])
    except OSError:
        pytest.skip("no IPv6 loopback here")
    assert api.url.startswith("https://[::1]:")
    env = {"KUBERNETES_SERVICE_HOST": "::1", "KUBERNETES_SERVICE_PORT": str(api.address[1])}
    config = load_config(environ=env, serviceaccount_dir=service_account)
    assert names(ApiClient(config).list(NAMESPACES)) == ["x"]


def test_in_cluster_without_a_token_is_an_error(tmp_path):
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    with pytest.raises(ApiError) as info:
        load_config(environ=env, serviceaccount_dir=str(tmp_path))
    assert str(tmp_path / "token") in str(info.value)


# -- tokens ----------------------------------------------------------------------------

def test_token_file_is_reread_when_it_changes(serve, tmp_path, caplog):
    api = serve(token="token-one-aaaa", namespaces=[ns("x")])
    token_file = tmp_path / "token"
    token_file.write_text("token-one-aaaa\n")
    client = ApiClient(load_config(api_server=api.url, token_file=str(token_file)))
    client.list(NAMESPACES)

    # rewritten in place
    api.set_tokens("token-two-bbbbbbbb")
    token_file.write_text("token-two-bbbbbbbb\n")
    client.list(NAMESPACES)

    # swapped atomically, as kubelet does, with a token of the same length
    api.set_tokens("token-3-cccccccccc")
    staged = tmp_path / "token.new"
    staged.write_text("token-3-cccccccccc\n")
    os.replace(staged, token_file)
    client.list(NAMESPACES)
    assert [r.auth for r in api.requests] == ["accepted"] * 3

    # the server really checks: a token the file does not hold is refused
    api.set_tokens("token-4-dddddddddd")
    assert "HTTP 401" in str(list_error(client, NAMESPACES))

    # a token file that disappears keeps the last token read, with a warning
    api.set_tokens("token-3-cccccccccc")
    token_file.unlink()
    with caplog.at_level(logging.WARNING, logger="lib.kubeapi"):
        client.list(NAMESPACES)
    assert api.requests[-1].auth == "accepted"
    assert any(str(token_file) in r.getMessage() for r in caplog.records)


def test_token_never_appears_in_errors_repr_or_logs(serve, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    api = serve(token=SECRET, namespaces=[ns("x")])
    token_file = tmp_path / "token"
    token_file.write_text(SECRET)
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api.url, user={"token": SECRET})

    configs = [load_config(api_server=api.url, token_file=str(token_file)),
               load_config(kubeconfig=kubeconfig, environ={})]
    assert configs[1].token == SECRET and "token='<redacted>'" in repr(configs[1])
    texts = []
    for config in configs:
        client = ApiClient(config, timeout=(1.0, 0.5))
        texts += [repr(config), str(config), repr(client)]
        assert names(client.list(NAMESPACES)) == ["x"]
        for fault in (lambda: api.fail_next(500),
                      lambda: api.fail_next(500, message=f"server echoes the token {SECRET}"),
                      lambda: api.hang_next(10),
                      lambda: api.set_tokens("another-token-entirely")):
            fault()
            texts.append(str(list_error(client, NAMESPACES)))
        api.set_tokens(SECRET)

    assert len(texts) == 14 and any("HTTP 401" in t for t in texts) and any("<redacted>" in t for t in texts)
    assert not [t for t in texts if SECRET in t]
    assert any("unencrypted" in r.getMessage() for r in caplog.records)
    assert any(r.name == "lib.kubeapi" and r.levelno == logging.DEBUG for r in caplog.records)
    assert not [r for r in caplog.records if SECRET in r.getMessage()]
    assert SECRET not in caplog.text
    assert not [r for r in api.requests if SECRET in repr(r)]
    assert {r.auth for r in api.requests} == {"accepted", "rejected"}


# -- the test server itself ------------------------------------------------------------

def test_server_continue_serves_its_snapshot_until_it_expires(serve):
    api = serve(pods=FIVE_PODS[:3], history=2)
    session = requests.Session()
    session.trust_env = False

    first = session.get(api.url + PODS, params={"limit": 2}, timeout=5).json()
    assert first["kind"] == "PodList" and first["apiVersion"] == "v1"
    assert names(first["items"]) == ["p0", "p1"] and first["metadata"]["remainingItemCount"] == 1
    token = first["metadata"]["continue"]
    api.set_state(pods=[pod("x", "new")])
    second = session.get(api.url + PODS, params={"limit": 2, "continue": token}, timeout=5).json()
    assert names(second["items"]) == ["p2"] and "continue" not in second["metadata"]
    assert second["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]

    refused = session.get(api.url + PODS, params={"limit": 2, "continue": token, "resourceVersion": "0"},
                          timeout=5)
    assert refused.status_code == 400

    api.set_state(pods=[])
    expired = session.get(api.url + PODS, params={"limit": 2, "continue": token}, timeout=5)
    assert expired.status_code == 410 and expired.json()["reason"] == "Expired"
    assert names(session.get(api.url + PODS, timeout=5).json()["items"]) == []


def test_server_shapes_objects_like_the_api_server(serve):
    api = serve(namespaces=[ns("x", team="blue")], pods=[pod("x", "a"), pod("y", "b")],
                policies=[policy("x", "deny")],
                nodes=[{"metadata": {"name": "node-1"}, "spec": {"podCIDR": "10.244.1.0/24"}}])
    client = ApiClient(load_config(api_server=api.url))

    namespace, = client.list(NAMESPACES)
    assert namespace["metadata"]["labels"] == {"team": "blue", "kubernetes.io/metadata.name": "x"}
    deny, = client.list(NETWORK_POLICIES)
    assert "kind" not in deny and "apiVersion" not in deny
    assert deny["metadata"]["uid"] and deny["metadata"]["resourceVersion"] == api.resource_version
    assert names(client.list("/api/v1/namespaces/y/pods")) == ["b"]

    before = api.resource_version
    api.set_state(pods=[pod("x", "a"), {**pod("y", "b"), "spec": {"nodeName": "node-2"}}])
    assert int(api.resource_version) == int(before) + 1
    a, b = client.list(PODS)
    assert a["metadata"]["resourceVersion"] == before          # unchanged object
    assert b["metadata"]["resourceVersion"] == api.resource_version
    assert client.list(NAMESPACES) == [namespace]              # kinds not given are kept

    session = requests.Session()
    session.trust_env = False
    node = session.get(api.url + "/api/v1/nodes/node-1", timeout=5).json()
    assert (node["kind"], node["apiVersion"], node["spec"]["podCIDR"]) == ("Node", "v1", "10.244.1.0/24")
    assert session.get(api.url + "/api/v1/nodes/node-9", timeout=5).status_code == 404
    assert session.get(api.url + PODS, params={"labelSelector": "a=b"}, timeout=5).status_code == 400
    assert session.post(api.url + PODS, timeout=5).status_code == 405


def test_server_serves_the_admin_kinds_only_while_switched_on(serve):
    api = serve(admin_policies=[admin_policy("a")], baseline_policies=[baseline_policy()])
    client = ApiClient(load_config(api_server=api.url))
    session = requests.Session()
    session.trust_env = False
    off = session.get(api.url + ADMIN_NETWORK_POLICIES + "/a", timeout=5)
    assert off.status_code == 404 and off.json()["reason"] == "NotFound"
    assert session.get(api.url + BASELINE_ADMIN_NETWORK_POLICIES, params={"watch": "1"},
                       timeout=5).status_code == 404

    api.set_admin_api(True)
    one = session.get(api.url + ADMIN_NETWORK_POLICIES + "/a", timeout=5).json()
    assert (one["kind"], one["apiVersion"]) == ("AdminNetworkPolicy", "policy.networking.k8s.io/v1alpha1")
    assert "namespace" not in one["metadata"]
    items, version = client.list_versioned(BASELINE_ADMIN_NETWORK_POLICIES)
    assert names(items) == ["default"] and version == api.resource_version
    with client.watch(ADMIN_NETWORK_POLICIES, version, 30) as stream:
        api.set_state(admin_policies=[admin_policy("a"), admin_policy("b")])
        events = iter(stream)
        added = next(events)
        assert (added["type"], added["object"]["metadata"]["name"]) == ("ADDED", "b")
        assert added["object"]["kind"] == "AdminNetworkPolicy"
        api.set_admin_api(["baselineadminnetworkpolicies"])     # the definition is deleted
        assert list(events) == []                                # and its watch ends
    with pytest.raises(ApiError) as err:
        client.list(ADMIN_NETWORK_POLICIES)
    assert err.value.status == 404
    assert names(client.list(BASELINE_ADMIN_NETWORK_POLICIES)) == ["default"]


def test_server_listens_on_a_socket_it_is_given():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    with ApiServer(sock=sock, namespaces=[ns("x")]) as api:
        assert api.url == f"http://127.0.0.1:{port}"
        assert names(ApiClient(load_config(api_server=api.url)).list(NAMESPACES)) == ["x"]
    assert sock.fileno() == -1


def test_server_rejects_objects_without_names():
    with pytest.raises(ValueError, match="metadata.namespace: required"):
        ApiServer(pods=[{"metadata": {"name": "a"}}])
    with pytest.raises(ValueError, match="duplicate"):
        ApiServer(namespaces=[ns("x"), ns("x")])
