"""`reconcile.py explain` end to end: the real command against a real API
server on loopback. It only reads the API, so it needs no root."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lib.node_addresses import from_pods
from tests.apiserver import ApiServer

REPO = Path(__file__).resolve().parents[2]
NODE_IPS = {"n1": "172.18.0.1", "n2": "172.18.0.2"}


def namespace(name: str, **labels: str) -> dict:
    return {"metadata": {"name": name, "labels": labels}}


def pod(key: str, ip: str, node: str, labels=None, ports=(), host_network=False) -> dict:
    ns, name = key.split("/")
    return {
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
        "spec": {"nodeName": node, "hostNetwork": host_network, "containers": [
            {"name": "main", "ports": [{"name": n, "containerPort": p} for n, p in ports]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                   "hostIP": NODE_IPS[node]},
    }


def policy(key: str, spec: dict) -> dict:
    ns, name = key.split("/")
    return {"metadata": {"name": name, "namespace": ns}, "spec": spec}


NAMESPACES = [namespace("x"), namespace("y", team="b")]
PODS = [pod("x/web", "10.244.1.10", "n1", {"app": "web"}, ports=[("http", 8080)]),
        pod("x/client", "10.244.2.10", "n2", {"role": "client"}),
        pod("y/client", "10.244.2.20", "n2", {"role": "client"})]
WEB_FROM_CLIENTS = policy("x/web", {
    "podSelector": {"matchLabels": {"app": "web"}},
    "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                 "ports": [{"port": "http"}]}]})


@pytest.fixture
def api():
    server = ApiServer(namespaces=NAMESPACES, pods=PODS, policies=[WEB_FROM_CLIENTS]).start()
    yield server
    server.stop()


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "reconcile.py"), *argv],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def log_lines(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def test_allowed_exits_0_and_names_the_rule(api):
    done = run("explain", "x/client", "x/web", "8080", "--api-server", api.url)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "x/client -> x/web 8080/TCP (IPv4): ALLOWED"
    assert "  ingress of x/web: isolated, allows: admitted by x/web ingress[0] ports[0]" in lines
    assert "    selected by: x/web" in lines
    assert "\x1b" not in done.stdout                  # a pipe gets no colour


def test_denied_exits_3_and_says_no_rule_admits_it(api):
    done = run("explain", "y/client", "x/web", "8080/tcp", "--api-server", api.url)
    assert done.returncode == 3, done.stderr
    assert done.stdout.splitlines()[0] == "y/client -> x/web 8080/TCP (IPv4): DENIED"
    assert "isolated by x/web and no rule admits it" in done.stdout


def test_json_output(api):
    done = run("--api-server", api.url, "explain", "10.244.2.10", "10.244.1.10", "80",
               "--output", "json")
    assert done.returncode == 3, done.stderr
    doc = json.loads(done.stdout)
    assert doc["allowed"] is False
    assert doc["source"] == "x/client" and doc["destination"] == "x/web"
    assert doc["ingress"]["policies"] == ["x/web"] and doc["ingress"]["allowed_by"] == []
    assert doc["egress"] == {"direction": "egress", "applies": True, "isolated": False,
                             "policies": [], "allowed_by": [], "allowed": True,
                             "reason": "no policy isolates x/client for egress",
                             "tier": "", "decided_by": "", "admin_policies": [], "passed_by": ""}


def test_the_node_reaches_its_own_pods_by_the_hostIP_its_pods_report(api):
    done = run("explain", NODE_IPS["n1"], "x/web", "9999", "--api-server", api.url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "own node n1" in done.stdout
    other = run("explain", NODE_IPS["n2"], "x/web", "9999", "--api-server", api.url)
    assert other.returncode == 3


def test_flags_before_the_command_and_after_it_combine(api):
    done = run("--log-level", "warning", "--api-server", api.url,
               "--node-name", "n1", "--iptables-backend", "nft",
               "explain", "x/client", "x/web", "8080/UDP")
    assert done.returncode == 3
    assert done.stderr == ""                          # WARNING level: nothing to say


def test_an_unknown_pod_is_an_error_exit_1(api):
    done = run("explain", "x/nope", "x/web", "80", "--api-server", api.url)
    assert done.returncode == 1 and done.stdout == ""
    errors = [line for line in log_lines(done.stderr) if line.get("event") == "explain-error"]
    assert errors[0]["message"] == "explain failed: x/nope: no such running pod with an address"


def test_an_api_failure_is_an_error_exit_1(api):
    api.fail_next(403, count=10)
    done = run("explain", "x/client", "x/web", "80", "--api-server", api.url)
    assert done.returncode == 1 and done.stdout == ""
    assert any(line.get("event") == "explain-error" for line in log_lines(done.stderr))


@pytest.mark.parametrize("argv, message", [
    (["explain", "x/a", "x/b", "80/icmp"], "protocol must be one of TCP, UDP, SCTP"),
    (["explain", "x/a", "x/b"], "the following arguments are required"),
    (["--once", "explain", "x/a", "x/b", "80"], "explain takes none of --once"),
    (["explain", "x/a", "x/b", "80", "--output", "table"], "invalid choice: 'table'"),
    (["--output", "table", "explain", "x/a", "x/b", "80"], "explain prints one of text, json"),
    (["--output", "json"], "--output needs --dry-run"),
    (["--once", "--dry-run", "--output", "table"], "dry-run prints one of diff, json, raw"),
])
def test_usage_errors_exit_2(argv, message):
    done = run(*argv)
    assert done.returncode == 2
    assert message in done.stderr


def test_node_addresses_come_from_host_ips_and_host_network_pods():
    pods = PODS + [
        pod("kube-system/agent", "172.18.0.1", "n1", host_network=True),
        {"metadata": {"name": "dual", "namespace": "x"},
         "spec": {"nodeName": "n3"},
         "status": {"hostIP": "10.0.0.3", "hostIPs": [{"ip": "10.0.0.3"}, {"ip": "FD00::3"}],
                    "podIP": "10.244.3.3"}},
        {"metadata": {"name": "hostnet", "namespace": "x"},
         "spec": {"nodeName": "n4", "hostNetwork": True},
         "status": {"podIPs": [{"ip": "10.0.0.4"}, {"ip": "bogus"}], "hostIP": 7}},
        {"metadata": {"name": "pending", "namespace": "x"}, "spec": {}, "status": {}},
        "not an object",
    ]
    assert from_pods(pods) == {
        "n1": ("172.18.0.1",), "n2": ("172.18.0.2",),
        "n3": ("10.0.0.3", "fd00::3"), "n4": ("10.0.0.4",),
    }


def test_the_deciding_admin_rule_is_named():
    """With the admin API served, explain reads the admin policies too and
    names the tier and rule that decided."""
    guard = {"metadata": {"name": "guard-web"}, "spec": {
        "priority": 3,
        "subject": {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "web"}}}},
        "ingress": [{"name": "team-b", "action": "Deny",
                     "from": [{"namespaces": {"matchLabels": {"team": "b"}}}]},
                    {"name": "clients", "action": "Allow",
                     "from": [{"pods": {"namespaceSelector": {}, "podSelector": {}}}]}]}}
    server = ApiServer(namespaces=NAMESPACES, pods=PODS, policies=[WEB_FROM_CLIENTS],
                       admin_policies=[guard], admin_api=True).start()
    try:
        denied = run("--api-server", server.url, "explain", "y/client", "x/web", "8080")
        allowed = run("--api-server", server.url, "explain", "x/client", "x/web", "9999")
    finally:
        server.stop()
    assert denied.returncode == 3, denied.stderr
    assert "  ingress of x/web: refuses: ANP guard-web ingress rule 0 (team-b): Deny\n" in denied.stdout
    assert "    admin policies: ANP guard-web\n" in denied.stdout
    assert allowed.returncode == 0, allowed.stderr       # the Allow wins over x/web's NetworkPolicy
    assert "ANP guard-web ingress rule 1 (clients): Allow" in allowed.stdout
