"""kube-policy-manager: enforce the cluster's NetworkPolicies on this node.

Flags and wiring only; the work is in lib/.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading

EXIT_OK, EXIT_ERROR, EXIT_PENDING = 0, 1, 2


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="reconcile.py",
        description="Enforce Kubernetes NetworkPolicies on this node with iptables and ipsets.")
    p.add_argument("--once", action="store_true", help="run one cycle and exit (0 ok, 1 error)")
    p.add_argument("--interval", type=int, default=10, metavar="SECONDS",
                   help="seconds between cycles in the loop (default 10)")
    p.add_argument("--node-name", default=os.environ.get("NODE_NAME") or socket.gethostname(),
                   help="this node's name (default $NODE_NAME, then the host name)")
    p.add_argument("--api-server", metavar="URL", help="API server URL (http or https)")
    p.add_argument("--kubeconfig", metavar="PATH", help="kubeconfig file (default $KUBECONFIG)")
    p.add_argument("--token-file", metavar="PATH", help="bearer token file, with --api-server")
    p.add_argument("--ca-file", metavar="PATH", help="CA bundle for the API server, with --api-server")
    p.add_argument("--dry-run", action="store_true",
                   help="with --once: print the plan, write nothing; exit 0 in sync, 2 changes pending, 1 error")
    p.add_argument("--cleanup", action="store_true",
                   help="remove every chain, jump rule and ipset this program owns, then exit")
    p.add_argument("--iptables-backend", choices=("auto", "nft", "legacy"), default="auto",
                   help="iptables backend (default auto: the one the node already uses)")
    p.add_argument("--metrics-port", type=int, default=9101, metavar="PORT",
                   help="serve /metrics, /healthz and /readyz on this port in the loop (0: off)")
    p.add_argument("--log-level", default="INFO",
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"), type=str.upper)
    args = p.parse_args(argv)
    if args.interval < 1:
        p.error("--interval must be at least 1 second")
    if args.dry_run and not (args.once or args.cleanup):
        p.error("--dry-run needs --once (or --cleanup)")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)

    from lib import cycle, kernel, kubeapi, logs, loop, metrics, plan
    log = logs.setup(args.log_level)

    try:
        backend, reason = kernel.detect_backend(args.iptables_backend)
        log.info(f"iptables backend {backend}", extra={"event": "backend", "backend": backend,
                                                        "reason": reason})
        kern = kernel.Kernel(backend)
        if args.cleanup:
            cleanup = plan.cleanup(kern.read())
            if args.dry_run:
                print(plan.render(cleanup), end="")
                return EXIT_OK if cleanup.empty else EXIT_PENDING
            kern.apply(cleanup)
            log.info("cleanup done", extra={"event": "cleanup", "changes": len(cleanup.changes)})
            return EXIT_OK
        config = kubeapi.load_config(args.api_server, args.kubeconfig, args.token_file, args.ca_file)
        api = kubeapi.ApiClient(config)
    except Exception as exc:  # noqa: BLE001 - start-up errors end the program with a clear line
        log.error(f"start-up failed: {exc}", extra={"event": "startup-error"})
        return EXIT_ERROR

    problems = cycle.ProblemLog()

    def one_cycle(dry_run=False):
        return cycle.run_cycle(api.list_cluster, kern, args.node_name, dry_run, problems)

    if args.once:
        report = one_cycle(args.dry_run)
        if not report.ok:
            return EXIT_ERROR
        if args.dry_run:
            print(plan.render(report.plan), end="")
            return EXIT_OK if report.plan.empty else EXIT_PENDING
        return EXIT_OK

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("starting", extra={"event": "start", "node": args.node_name,
                                "interval": args.interval, "api": config.source})
    observer = None
    if args.metrics_port:
        stats = metrics.Metrics(args.interval)
        server = metrics.serve(stats, args.metrics_port)
        observer = stats.observe
    loop.run_forever(one_cycle, args.interval, stop, on_report=observer)
    if args.metrics_port:
        server.shutdown()
    log.info("stopping; rules stay in force", extra={"event": "stop"})
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
