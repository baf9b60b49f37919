"""Prometheus metrics and the health endpoints, served from one small HTTP
server: /metrics, /healthz (a recent successful cycle), /readyz (one success)."""
from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest

NS = "kpm"
STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
ENFORCE_BUCKETS = (0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 20, 30, 60)


class Metrics:
    def __init__(self, interval: float, clock: Callable[[], float] = time.time):
        self.interval = interval
        self.clock = clock
        self.registry = r = CollectorRegistry()
        self.stage_seconds = Histogram(f"{NS}_cycle_stage_seconds", "Time spent per cycle stage.",
                                       ["stage"], registry=r, buckets=STAGE_BUCKETS)
        self.cycle_seconds = Histogram(f"{NS}_cycle_seconds", "Time of a whole cycle.",
                                       registry=r, buckets=STAGE_BUCKETS)
        self.last_success = Gauge(f"{NS}_last_successful_sync_timestamp_seconds",
                                  "Unix time of the last successful cycle.", registry=r)
        self.errors = Counter(f"{NS}_errors_total", "Failed cycles, by the stage that failed.",
                              ["stage"], registry=r)
        self.cycles = Counter(f"{NS}_cycles_total", "Cycles run, by result.", ["result"], registry=r)
        self.policies = Gauge(f"{NS}_policies", "NetworkPolicies in the cluster.", registry=r)
        self.admin_policies = Gauge(f"{NS}_admin_policies", "AdminNetworkPolicies in the cluster, "
                                    "and the BaselineAdminNetworkPolicy.", registry=r)
        self.local_pods = Gauge(f"{NS}_local_pods", "Pods on this node (not host-network).", registry=r)
        self.rules = Gauge(f"{NS}_rules", "Rules owned, both families (iptables rules, or nft rules of our table).", registry=r)
        self.sets = Gauge(f"{NS}_ipsets", "Sets owned (ipsets, or the sets of our nft table).", registry=r)
        self.set_members = Gauge(f"{NS}_ipset_members", "Members of the owned sets.", registry=r)
        self.invalid_objects = Gauge(f"{NS}_invalid_object_problems",
                                     "Problems found in API objects in the last cycle.", registry=r)
        self.kernel_writes = Counter(f"{NS}_kernel_writes_total",
                                     "Lines written to the kernel, by tool.", ["tool"], registry=r)
        self.enforce_latency = Histogram(
            f"{NS}_time_to_enforce_seconds",
            "From an object seen changed to its rules live (watch mode).",
            registry=r, buckets=ENFORCE_BUCKETS)
        self._last_ok: Optional[float] = None
        self._last_error: Optional[str] = None
        self._started = clock()

    def observe(self, report) -> None:
        for stage, secs in report.seconds.items():
            self.stage_seconds.labels(stage).observe(secs)
        self.cycle_seconds.observe(sum(report.seconds.values()))
        if not report.ok:
            self.errors.labels(report.failed_stage or "unknown").inc()
            self.cycles.labels("error").inc()
            self._last_error = f"{report.failed_stage}: {report.error}"
            return
        self.cycles.labels("ok").inc()
        c = report.counts
        self.policies.set(c.policies)
        self.admin_policies.set(c.admin_policies)
        self.local_pods.set(c.local_pods)
        self.rules.set(c.rules)
        self.sets.set(c.sets)
        self.set_members.set(c.set_members)
        if report.cluster is not None:
            self.invalid_objects.set(len(report.cluster.problems))
        stats = report.apply_stats
        if stats is not None:
            self.kernel_writes.labels("iptables").inc(getattr(stats, "iptables_lines", 0))
            self.kernel_writes.labels("ipset").inc(getattr(stats, "ipset_lines", 0))
            self.kernel_writes.labels("nft").inc(getattr(stats, "nft_lines", 0))
        now = self.clock()
        self.last_success.set(now)
        self._last_ok = now
        self._last_error = None

    def health(self) -> tuple[int, str]:
        """200 while the last success is younger than three intervals."""
        limit = 3 * self.interval
        now = self.clock()
        if self._last_ok is None:
            if now - self._started < limit:
                return 200, "starting\n"
            return 503, f"no successful cycle yet: {self._last_error or 'none ran'}\n"
        age = now - self._last_ok
        if age <= limit:
            return 200, "ok\n"
        return 503, f"last successful cycle {age:.0f}s ago (limit {limit:.0f}s): {self._last_error}\n"

    def ready(self) -> tuple[int, str]:
        if self._last_ok is None:
            return 503, "no successful cycle yet\n"
        return 200, "ok\n"


class _DualStackServer(ThreadingHTTPServer):
    address_family = socket.AF_INET6

    def server_bind(self):
        # One socket for IPv4 and IPv6, so probes reach us on single- and dual-stack nodes.
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def _bind(address: str, port: int, handler) -> ThreadingHTTPServer:
    if address in ("", "::"):
        try:
            return _DualStackServer(("::", port), handler)
        except OSError:          # no IPv6 on this node
            pass
    return ThreadingHTTPServer((address, port), handler)


def serve(metrics: Metrics, port: int, address: str = "") -> ThreadingHTTPServer:
    """Start the HTTP server in a daemon thread; the caller shuts it down."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                body, ctype, code = generate_latest(metrics.registry), CONTENT_TYPE_LATEST, 200
            elif path in ("/healthz", "/readyz"):
                code, text = metrics.health() if path == "/healthz" else metrics.ready()
                body, ctype = text.encode(), "text/plain; charset=utf-8"
            else:
                body, ctype, code = b"not found\n", "text/plain; charset=utf-8", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # scrapes every few seconds: not worth a log line
            pass

    server = _bind(address, port, Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                     name="metrics", daemon=True).start()
    return server
