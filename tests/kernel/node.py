"""A one-node harness for end-to-end tests: the real `reconcile.py` runs as a
process inside a network namespace (as the DaemonSet runs in the host's),
talking to a real API server whose socket lives in that same namespace.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from prometheus_client.parser import text_string_to_metric_families

from tests.apiserver import ApiServer
from tests.lab.netns import inside
from tests.scratch_netns import bound_socket

REPO = Path(__file__).resolve().parents[2]
NODE = "node-1"
NODE_IP = "172.18.0.1"
METRICS_PORT = 9101


def namespace(name: str, **labels: str) -> dict:
    return {"metadata": {"name": name, "labels": dict(labels)}}


def pod(ns: str, name: str, ip: str, node: str = NODE, labels: Optional[dict] = None,
        ports=(), ipv6: Optional[str] = None, host_network: bool = False) -> dict:
    ips = [{"ip": ip}] + ([{"ip": ipv6}] if ipv6 else [])
    return {
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
        "spec": {"nodeName": node, "hostNetwork": host_network,
                 "containers": [{"name": "main", "ports": [
                     {"name": n, "containerPort": p, "protocol": proto} for n, p, proto in ports]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": ips, "hostIP": NODE_IP},
    }


def policy(ns: str, name: str, spec: dict) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def small_cluster(node, policies, extra_pods=()) -> None:
    """Namespaces x and y: x/web (port http 80, dual-stack) and x/db on this
    node, y/client on node-2, plus `extra_pods`, under `policies`."""
    node.api.set_state(
        namespaces=[namespace("x"), namespace("y", team="b")],
        pods=[pod("x", "web", "10.244.1.10", labels={"app": "web"}, ipv6="fd00:10:244:1::10",
                  ports=[("http", 80, "TCP")]),
              pod("x", "db", "10.244.1.11", labels={"app": "db"}),
              pod("y", "client", "10.244.2.10", node="node-2", labels={"role": "client"}),
              *extra_pods],
        policies=list(policies))


_COUNTERS = re.compile(r"\[\d+:\d+\]")


def strip_volatile(save: str) -> str:
    """iptables-save output without its timestamps and packet counters."""
    return "\n".join(_COUNTERS.sub("[0:0]", line) for line in save.splitlines()
                     if not line.startswith("#")) + "\n"


def json_lines(text: str) -> list[dict]:
    """The JSON log lines of a run's stderr (anything else is skipped)."""
    lines = []
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            lines.append(value)
    return lines


def wait_for(condition: Callable[[], object], timeout: float, what: str,
             step: float = 0.05) -> object:
    """Poll `condition` until it returns something true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def log(self) -> list[dict]:
        return json_lines(self.stderr)


class Daemon:
    """reconcile.py in its loop, in the background inside the node's namespace.

    Its stderr goes to a file: a pipe nobody reads would fill up and stall it.
    That file's offset is shared with the process, which writes at it: the
    log is read with positional reads that leave it alone, as a seek to the
    start would make the next line overwrite the first ones.
    """

    def __init__(self, netns: str, argv: list[str], metrics_port: int):
        self.netns = netns
        self.metrics_port = metrics_port
        self._stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self._stderr,
                                        cwd=REPO)

    @property
    def pid(self) -> int:
        return self.process.pid

    def get(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        """GET http://127.0.0.1:PORT/path from inside the namespace: (status, body)."""
        with inside(self.netns):
            conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=timeout)
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                return response.status, response.read().decode("utf-8", "replace")
            finally:
                conn.close()

    def status(self, path: str) -> Optional[int]:
        """The HTTP status of `path`, None while nothing answers."""
        try:
            return self.get(path)[0]
        except OSError:
            return None

    def metric(self, name: str, **labels: str) -> Optional[float]:
        """One sample of /metrics (None when absent), e.g.
        metric("kpm_errors_total", stage="fetch")."""
        _, text = self.get("/metrics")
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v
                                               for k, v in labels.items()):
                    return sample.value
        return None

    def log(self) -> list[dict]:
        fd = self._stderr.fileno()
        text = os.pread(fd, os.fstat(fd).st_size, 0).decode("utf-8", "replace")
        return json_lines(text)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL if still running; idempotent."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self._stderr.close()


class Node:
    def __init__(self, netns: str, backend: str = "nft"):
        self.netns = netns
        self.backend = backend
        self.api = ApiServer(sock=bound_socket(netns)).start()
        self.api_address = self.api.address     # still known once the server is stopped
        self.daemons: list[Daemon] = []

    def close(self) -> None:
        for daemon in self.daemons:
            daemon.kill()
        self.api.stop()

    def stop_api(self) -> None:
        """The API server goes away: connections to its port are refused."""
        self.api.stop()

    def restart_api(self) -> ApiServer:
        """A new, empty API server on the same address (the old one is stopped
        first); give it its objects again with set_state()."""
        host, port = self.api_address
        self.api.stop()
        self.api = ApiServer(sock=bound_socket(self.netns, host, port)).start()
        return self.api

    def start_daemon(self, *flags: str, metrics_port: int = METRICS_PORT) -> Daemon:
        """reconcile.py in its loop (not --once) in the background; close() kills it."""
        daemon = Daemon(self.netns, self.reconcile_argv("--metrics-port", str(metrics_port),
                                                        *flags), metrics_port)
        self.daemons.append(daemon)
        return daemon

    def reconcile_argv(self, *flags: str) -> list[str]:
        """The command line reconcile() runs, for a test that starts it itself."""
        host, port = self.api_address
        return ["ip", "netns", "exec", self.netns, sys.executable, str(REPO / "reconcile.py"),
                "--node-name", NODE, "--api-server", f"http://{host}:{port}",
                "--iptables-backend", self.backend, *flags]

    def reconcile(self, *flags: str, timeout: float = 60) -> Result:
        argv = self.reconcile_argv(*flags)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        return Result(done.returncode, done.stdout, done.stderr)

    def run(self, *argv: str, stdin: Optional[str] = None) -> str:
        done = subprocess.run(["ip", "netns", "exec", self.netns, *argv], input=stdin,
                              capture_output=True, text=True, timeout=30, check=True)
        return done.stdout

    def iptables_save(self, family: int = 4) -> str:
        binary = f"{'ip6' if family == 6 else 'ip'}tables-{self.backend}-save"
        return strip_volatile(self.run(binary, "-t", "filter"))

    def ipset_save(self) -> str:
        # initval is random per creation, the rest is state.
        return re.sub(r" initval 0x[0-9a-f]+", "", self.run("ipset", "save"))

    def snapshot(self) -> tuple[str, str, str]:
        return self.iptables_save(4), self.iptables_save(6), self.ipset_save()

    def owned_chain(self, name: str, family: int = 4) -> list[str]:
        return [line for line in self.iptables_save(family).splitlines()
                if line.startswith(f"-A {name} ")]
