"""A one-node harness for end-to-end tests: the real `reconcile.py` runs as a
process inside a network namespace (as the DaemonSet runs in the host's),
talking to a real API server whose socket lives in that same namespace.
"""
from __future__ import annotations

import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tests.apiserver import ApiServer
from tests.lab.netns import inside

REPO = Path(__file__).resolve().parents[2]
NODE = "node-1"
NODE_IP = "172.18.0.1"


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


_COUNTERS = re.compile(r"\[\d+:\d+\]")


def strip_volatile(save: str) -> str:
    """iptables-save output without its timestamps and packet counters."""
    return "\n".join(_COUNTERS.sub("[0:0]", line) for line in save.splitlines()
                     if not line.startswith("#")) + "\n"


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


class Node:
    def __init__(self, netns: str, backend: str = "nft"):
        self.netns = netns
        self.backend = backend
        with inside(netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.api = ApiServer(sock=sock).start()

    def close(self) -> None:
        self.api.stop()

    def reconcile(self, *flags: str, timeout: float = 60) -> Result:
        argv = ["ip", "netns", "exec", self.netns, sys.executable, str(REPO / "reconcile.py"),
                "--node-name", NODE, "--api-server", self.api.url,
                "--iptables-backend", self.backend, *flags]
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
