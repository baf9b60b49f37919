"""kube-policy-manager: enforce the cluster's NetworkPolicies on this node.

Flags and wiring only; the work is in lib/.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

EXIT_OK, EXIT_ERROR, EXIT_PENDING, EXIT_DENIED = 0, 1, 2, 3

# --output values per mode; the first is the default.
OUTPUTS = {
    "dry-run": ("diff", "json", "raw"),
    "explain": ("text", "json"),
    "status": ("table", "json"),
}

EPILOG = """\
commands:
  (none)      the enforcer: the loop, or one cycle with --once
  explain     FROM TO PORT[/PROTOCOL]: would this connection be allowed, and why
              (reads the API only; no root needed)
  status      this node's pods, their isolation and rules, and whether the kernel
              holds what it should (give it the daemon's --log-drops* and
              --isolate-new-pods/--pod-cidr flags)

--dry-run output (--output, with --once or --cleanup):
  diff        (default) the changes per chain and set, rules and members as +/- lines,
              drift (changes made by someone else) named; colour on a terminal only
              (NO_COLOR turns it off)
  json        the same as one JSON object, with the exact restore payloads
  raw         the exact ipset restore / iptables-restore input, in apply order

exit codes:
  --once                 0 ok, 1 error (or stopped by a signal while waiting for the API)
  (the loop)             0 once stopped by SIGTERM or SIGINT
  --once/--cleanup --dry-run
                         0 in sync, 2 changes pending, 1 error
  explain                0 allowed, 3 denied, 1 error (2 is a command-line usage error)
  status                 0 kernel in sync, 2 out of sync, 1 error

Run "reconcile.py COMMAND --help" for a command's flags.
"""


def _api_flags(p: argparse.ArgumentParser, suppress: bool) -> None:
    """The API and logging flags. A command takes them too, so that they may
    come before or after its name; there they default to SUPPRESS, so that
    the command's parser never overwrites a value given before the name."""
    def default(value):
        return argparse.SUPPRESS if suppress else value

    p.add_argument("--api-server", metavar="URL", default=default(None),
                   help="API server URL (http or https)")
    p.add_argument("--kubeconfig", metavar="PATH", default=default(None),
                   help="kubeconfig file (default $KUBECONFIG)")
    p.add_argument("--token-file", metavar="PATH", default=default(None),
                   help="bearer token file, with --api-server")
    p.add_argument("--ca-file", metavar="PATH", default=default(None),
                   help="CA bundle for the API server, with --api-server")


def _log_flag(p: argparse.ArgumentParser, suppress: bool) -> None:
    p.add_argument("--log-level", default=argparse.SUPPRESS if suppress else "INFO",
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"), type=str.upper)


def _node_flags(p: argparse.ArgumentParser, suppress: bool) -> None:
    p.add_argument("--node-name",
                   default=argparse.SUPPRESS if suppress
                   else os.environ.get("NODE_NAME") or socket.gethostname(),
                   help="this node's name (default $NODE_NAME, then the host name)")
    p.add_argument("--iptables-backend", choices=("auto", "nft", "legacy"),
                   default=argparse.SUPPRESS if suppress else "auto",
                   help="iptables backend (default auto: the one the node already uses)")
    _dataplane_flag(p, suppress)


def _dataplane_flag(p: argparse.ArgumentParser, suppress: bool) -> None:
    p.add_argument("--dataplane", choices=("iptables", "nftables"),
                   default=argparse.SUPPRESS if suppress else "iptables",
                   help="iptables (default: chains in the shared filter tables, ipsets) or "
                        "nftables (a table of its own, inet kube-policy-manager); switching "
                        "on a running node removes the other one's rules once the new ones "
                        "are in force")


def _compile_flags(p: argparse.ArgumentParser, suppress: bool) -> None:
    """What the node writes beyond the NetworkPolicy API. The enforcer and
    `status` take the same flags, so that status compares the kernel with
    what the daemon, given the same flags, writes. In a command they default
    to SUPPRESS, as the API flags do; --pod-cidr there collects into its own
    list, joined to the one given before the command's name."""
    def default(value):
        return argparse.SUPPRESS if suppress else value

    p.add_argument("--log-drops", action="store_true", default=default(False),
                   help='log refused packets of every isolated pod; without it only pods whose '
                        'NetworkPolicy or Namespace has kube-policy-manager/log-drops: "true"')
    p.add_argument("--log-drops-target", choices=("nflog", "log"), default=default("nflog"),
                   help="nflog (default; read with ulogd) or log (kernel log)")
    p.add_argument("--log-drops-group", type=int, default=default(100), metavar="N",
                   help="NFLOG group (default 100)")
    p.add_argument("--log-drops-rate", type=int, default=default(10), metavar="PER_MINUTE",
                   help="log lines a minute per pod and direction (default 10)")
    p.add_argument("--log-drops-burst", type=int, default=default(5), metavar="N",
                   help="burst (default 5)")
    p.add_argument("--isolate-new-pods", action="store_true", default=default(False),
                   help="refuse traffic to and from addresses of this node's pod CIDRs that no "
                        "cycle has seen as a pod yet")
    p.add_argument("--pod-cidr", action="append", default=default([]), metavar="CIDR",
                   dest="command_pod_cidr" if suppress else "pod_cidr",
                   help="this node's pod range, repeatable (default: the Node's spec.podCIDRs)")


def _port(text: str):
    from lib.explain import parse_port
    try:
        return parse_port(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="reconcile.py",
        description="Enforce Kubernetes NetworkPolicies on this node with iptables and ipsets.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--once", action="store_true", help="run one cycle and exit (0 ok, 1 error)")
    p.add_argument("--interval", type=int, default=10, metavar="SECONDS",
                   help="seconds between cycles in the loop (default 10)")
    p.add_argument("--node-name", default=os.environ.get("NODE_NAME") or socket.gethostname(),
                   help="this node's name (default $NODE_NAME, then the host name)")
    _api_flags(p, suppress=False)
    p.add_argument("--dry-run", action="store_true",
                   help="with --once: print the plan, write nothing; exit 0 in sync, 2 changes pending, 1 error")
    p.add_argument("--cleanup", action="store_true",
                   help="remove every chain, jump rule and ipset this program owns, then exit")
    p.add_argument("--iptables-backend", choices=("auto", "nft", "legacy"), default="auto",
                   help="iptables backend (default auto: the one the node already uses)")
    _dataplane_flag(p, suppress=False)
    p.add_argument("--api-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="read timeout of every API request (default 10; connecting: 3 s)")
    p.add_argument("--watch", action="store_true",
                   help="in the loop, keep the API objects in a cache fed by watch streams instead "
                        "of listing them every cycle; a change runs a cycle within about a second")
    p.add_argument("--no-conntrack-cleanup", dest="conntrack_cleanup", action="store_false",
                   help="after an apply, do not delete the conntrack entries of connections the "
                        "new rules refuse (by default they are cut)")
    _compile_flags(p, suppress=False)
    p.add_argument("--metrics-port", type=int, default=9101, metavar="PORT",
                   help="serve /metrics, /healthz and /readyz on this port in the loop (0: off)")
    _log_flag(p, suppress=False)
    every_output = sorted({o for choices in OUTPUTS.values() for o in choices})
    p.add_argument("--output", choices=every_output, default=None,
                   help="with --dry-run: diff (default), json or raw; for a command, see its --help")

    commands = p.add_subparsers(dest="command", metavar="[COMMAND]")
    ex = commands.add_parser(
        "explain", help="would a connection be allowed, and why",
        description="Evaluate the cluster's NetworkPolicies for one connection: the source's "
                    "egress and the destination's ingress, the policies selecting each, and the "
                    "rule that admits it or that none does. Exit 0 allowed, 3 denied, 1 error.")
    ex.add_argument("source", metavar="FROM", help="namespace/pod, an IP address or a CIDR")
    ex.add_argument("destination", metavar="TO", help="namespace/pod, an IP address or a CIDR")
    ex.add_argument("port", metavar="PORT[/PROTOCOL]", type=_port,
                    help="destination port; protocol TCP (default), UDP or SCTP")
    ex.add_argument("--family", type=int, choices=(4, 6), default=None,
                    help="address family for dual-stack pods (default: the destination's first address)")
    ex.add_argument("--output", choices=OUTPUTS["explain"], default=argparse.SUPPRESS,
                    help="text (default) or json")
    _api_flags(ex, suppress=True)
    _log_flag(ex, suppress=True)

    st = commands.add_parser(
        "status", help="this node's pods and whether the kernel holds their rules",
        description="One row per pod of this node: isolated for ingress and egress, policies, "
                    "rules, sets, and whether the kernel matches (in sync, differs, missing); "
                    "then a summary. Give it the drop-logging and new-pod flags the daemon runs "
                    "with: what the kernel should hold depends on them. Writes nothing. "
                    "Exit 0 in sync, 2 out of sync, 1 error.")
    st.add_argument("--output", choices=OUTPUTS["status"], default=argparse.SUPPRESS,
                    help="table (default) or json")
    _api_flags(st, suppress=True)
    _node_flags(st, suppress=True)
    _compile_flags(st, suppress=True)
    _log_flag(st, suppress=True)

    args = p.parse_args(argv)
    args.pod_cidr = args.pod_cidr + vars(args).pop("command_pod_cidr", [])
    if args.interval < 1:
        p.error("--interval must be at least 1 second")
    if args.command:
        if args.once or args.dry_run or args.cleanup:
            p.error(f"{args.command} takes none of --once, --dry-run, --cleanup")
        mode = args.command
    elif args.dry_run:
        mode = "dry-run"
    else:
        mode = None
    if args.dry_run and not (args.once or args.cleanup):
        p.error("--dry-run needs --once (or --cleanup)")
    if mode is None:
        if args.output is not None:
            p.error("--output needs --dry-run (or the explain or status command)")
    elif args.output is None:
        args.output = OUTPUTS[mode][0]
    elif args.output not in OUTPUTS[mode]:
        p.error(f"--output {args.output}: {mode} prints one of {', '.join(OUTPUTS[mode])}")
    return args


def print_plan(output: str, plane, the_plan, desired, current) -> None:
    from lib import terminal
    if output == "raw":
        print(plane.raw(the_plan), end="")
    elif output == "json":
        print(json.dumps(plane.document(the_plan, desired, current), indent=2))
    else:
        print(plane.render_diff(the_plan, desired, current,
                                color=terminal.wants_color(sys.stdout)), end="")


def build_dataplane(args, log):
    """The dataplane the flags ask for, with the other one's kernel for the
    leftovers of a switch. On a node without iptables the nftables
    dataplane runs alone."""
    from lib import dataplane, kernel
    try:
        backend, reason = kernel.detect_backend(args.iptables_backend)
    except kernel.KernelError as err:
        if args.dataplane == dataplane.IPTABLES:
            raise
        backend, reason = None, str(err)
    log.info(f"dataplane {args.dataplane}", extra={
        "event": "backend", "dataplane": args.dataplane, "backend": backend, "reason": reason})
    return dataplane.build(args.dataplane, backend), backend


def cleanup_command(args, plane, log) -> int:
    """Remove what this program owns on both dataplanes: the one given,
    then the other one, where its tools are installed."""
    from lib import dataplane
    from lib.kernel import KernelError
    planes = [plane] + ([dataplane.alone(plane.other)] if plane.other is not None else [])
    pending = False
    for dp in planes:
        try:
            current = dp.read()
        except KernelError as err:
            if dp is not plane and dataplane.missing_binary(err):
                continue
            raise
        cleanup = dp.cleanup_plan(current)
        if args.dry_run:
            print_plan(args.output, dp, cleanup, dp.empty_desired(), current)
            pending = pending or not cleanup.empty
            continue
        dp.apply(cleanup)
        log.info("cleanup done", extra={"event": "cleanup", "dataplane": dp.name,
                                        "changes": len(cleanup.changes)})
    if args.dry_run:
        return EXIT_PENDING if pending else EXIT_OK
    return EXIT_OK


def explain_command(args, log) -> int:
    from lib import cycle, explain, kubeapi, node_addresses, terminal
    port, protocol = args.port
    try:
        config = kubeapi.load_config(args.api_server, args.kubeconfig, args.token_file, args.ca_file)
        with kubeapi.ApiClient(config) as api:
            fetched = api.list_cluster()
        cluster = cycle.parse_fetched(fetched)
        result = explain.explain(cluster, args.source, args.destination, port, protocol,
                                 args.family, node_addresses.from_pods(fetched.pods))
    except Exception as exc:  # noqa: BLE001 - any failure ends the command with a clear line
        log.error(f"explain failed: {exc}", extra={"event": "explain-error"})
        return EXIT_ERROR
    if args.output == "json":
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(explain.render(result, color=terminal.wants_color(sys.stdout)), end="")
    return EXIT_OK if result.allowed else EXIT_DENIED


def status_command(args, log) -> int:
    from lib import cycle, dataplane, kubeapi, status, terminal
    api = None
    try:
        kern, backend = build_dataplane(args, log)
        config = kubeapi.load_config(args.api_server, args.kubeconfig, args.token_file, args.ca_file)
        api = kubeapi.ApiClient(config, timeout=(3.05, args.api_timeout))
        options = compile_options(args, api, log)
    except Exception as exc:  # noqa: BLE001 - start-up errors end the command with a clear line
        log.error(f"start-up failed: {exc}", extra={"event": "startup-error"})
        if api is not None:
            api.close()
        return EXIT_ERROR
    with api:
        report = cycle.run_cycle(api.list_cluster, kern, args.node_name, dry_run=True,
                                 problem_log=cycle.ProblemLog(), options=options)
    if not report.ok:
        return EXIT_ERROR
    if kern.name == dataplane.NFTABLES:
        from lib import nft_status
        node = nft_status.node_status(report.cluster, report.desired, report.kernel, report.plan,
                                      args.node_name, kern.families)
    else:
        node = status.node_status(report.cluster, report.desired, report.kernel, report.plan,
                                  args.node_name, backend, kern.families)
    if args.output == "json":
        print(json.dumps(node.as_dict(), indent=2))
    else:
        print(status.render_table(node, color=terminal.wants_color(sys.stdout)), end="")
    return EXIT_OK if node.in_sync else EXIT_PENDING


def compile_options(args, api, log):
    """Drop logging and new-pod isolation; the pod ranges come from the Node
    object when --pod-cidr is not given."""
    from lib import objects
    from lib.compile import CompileOptions
    pod_cidrs = tuple(args.pod_cidr)
    if args.isolate_new_pods and not pod_cidrs:
        pod_cidrs, problems = objects.parse_node_pod_cidrs(api.get_node(args.node_name))
        for p in problems:
            log.warning(str(p), extra={"event": "invalid-object", "kind": p.kind,
                                       "object": p.object, "field": p.field})
    return CompileOptions(
        log_drops=args.log_drops, log_target=args.log_drops_target,
        log_group=args.log_drops_group, log_rate=args.log_drops_rate,
        log_burst=args.log_drops_burst, isolate_new_pods=args.isolate_new_pods,
        pod_cidrs=pod_cidrs)


def _wait_synced(cache, seconds: float, stop) -> None:
    """Up to `seconds` for the watch caches' first lists, or until a stop."""
    deadline = time.monotonic() + seconds
    while not stop.is_set() and time.monotonic() < deadline:
        if cache.wait_synced(min(0.1, max(0.0, deadline - time.monotonic()))):
            return


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)

    from lib import cycle, kubeapi, logs, loop, metrics, watch
    log = logs.setup(args.log_level)

    if args.command == "explain":
        return explain_command(args, log)
    if args.command == "status":
        return status_command(args, log)

    # SIGTERM and SIGINT never cut a kernel write short: they end the loop
    # after its cycle, or at once while it waits for the API (see
    # lib.loop.StopSignals). Installed first, so that a stop during start-up
    # is kept and a read of the Node object that hangs is abandoned too. A
    # run stopped before its work is done (--once) exits 1; the loop exits 0.
    signals = loop.StopSignals().install()
    stopped_code = EXIT_ERROR if args.once else EXIT_OK
    try:
        kern, _ = build_dataplane(args, log)
        if args.cleanup:
            return cleanup_command(args, kern, log)
        config = kubeapi.load_config(args.api_server, args.kubeconfig, args.token_file, args.ca_file)
        api = kubeapi.ApiClient(config, timeout=(3.05, args.api_timeout))
        with signals.abandonable():
            options = compile_options(args, api, log)
    except loop.Stopped:
        log.info("stopping during start-up; nothing was written", extra={"event": "stop"})
        return stopped_code
    except Exception as exc:  # noqa: BLE001 - start-up errors end the program with a clear line
        log.error(f"start-up failed: {exc}", extra={"event": "startup-error"})
        return EXIT_ERROR

    problems = cycle.ProblemLog()
    last = cycle.LastCompiled()

    def abandonable_fetch():
        # A hung list ends at a stop signal, not at the read timeout.
        with signals.abandonable():
            return api.list_cluster()

    fetch = abandonable_fetch

    def one_cycle(dry_run=False):
        # `fetch` is read at call time: watch mode swaps in its cache.
        return cycle.run_cycle(fetch, kern, args.node_name, dry_run, problems,
                               conntrack_cleanup=args.conntrack_cleanup, last=last,
                               options=options)

    if args.once:
        try:
            report = one_cycle(args.dry_run)
        except loop.Stopped:
            log.info("stopped during the fetch; nothing was written", extra={"event": "stop"})
            return stopped_code
        if not report.ok:
            return EXIT_ERROR
        if args.dry_run:
            print_plan(args.output, kern, report.plan, report.desired, report.kernel)
            return EXIT_OK if report.plan.empty else EXIT_PENDING
        return EXIT_OK

    stop = signals.stop
    log.info("starting", extra={"event": "start", "node": args.node_name, "watch": args.watch,
                                "interval": args.interval, "api": config.source})
    observer = enforced = server = None
    if args.metrics_port:
        stats = metrics.Metrics(args.interval)
        server = metrics.serve(stats, args.metrics_port)
        observer, enforced = stats.observe, stats.enforce_latency.observe
    if kern.name == "nftables":
        # An idle cycle lists our table only after the kernel announced a
        # change, and at least once a minute (lib.nft_monitor).
        kern.kernel.watch_changes(max_age=60.0)
    run, trigger, cache = one_cycle, None, None
    if args.watch:
        trigger = watch.Trigger()
        cache = watch.ClusterCache(config, on_change=trigger.notify,
                                   timeout=(3.05, args.api_timeout),
                                   stale_after=3 * args.interval).start()
        _wait_synced(cache, args.interval, stop)
        fetch = cache.snapshot          # memory only: nothing to abandon
        run = lambda: trigger.run(one_cycle, enforced)  # noqa: E731
    loop.run_forever(run, args.interval, stop, on_report=observer, trigger=trigger)
    if cache is not None:
        cache.stop()
    if server is not None:
        server.shutdown()
    if kern.name == "nftables":
        kern.kernel.close()
    log.info("stopping; rules stay in force", extra={"event": "stop"})
    return EXIT_OK

if __name__ == "__main__":
    sys.exit(main())
