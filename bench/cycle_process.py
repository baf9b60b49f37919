"""One reconcile cycle in a process of its own, reporting what it cost as JSON.

The benchmark runs this inside the node's network namespace (`ip netns exec`),
as the DaemonSet runs in the host's: the same calls as `reconcile.py --once`
(config, ApiClient, Kernel, run_cycle), plus what a benchmark wants to know
and the log line does not say. Its peak memory is read right after the
cycle, before the comparisons below run.

    python -m bench.cycle_process --api-server URL --node NODE --backend nft \
        [--dataplane iptables|nftables] [--cycles N] [--empty-first] [--full-rewrite] \
        [--time-saves] [--profile FILE] [--on-demand]

With --cycles N, N cycles run one after the other the way the daemon's loop
runs them (sharing one LastCompiled); the last is reported, and the earlier
ones under "previous". With --on-demand the process is the daemon's loop
driven from outside: a cycle each time a line arrives on stdin, reported
as one JSON line, until stdin ends; the parent changes what the API server
serves in between. The dataplane runs alone (it looks for no leftovers of
the other one), so that both can be measured in one namespace; with
--empty-first its own objects are removed before the first cycle, untimed.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import subprocess
import sys
import time
from collections import Counter

SAVE_REPEATS = 3


def peak_rss_kb() -> int:
    """This process's peak resident memory since it started its program.

    Not getrusage's ru_maxrss: a process started by fork or vfork carries
    its parent's resident size at exec into that figure."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/status: no VmHWM line")


def _payload_lines(payload: str, verb: str) -> int:
    return sum(1 for line in payload.splitlines() if line.startswith(verb + " "))


def _elements(payload: str, verb: str) -> int:
    """Elements named by the `VERB element` lines of an nft payload."""
    head = verb + " element "
    return sum(line.count(",") + 1 for line in payload.splitlines() if line.startswith(head))


def _plan_summary(the_plan) -> dict:
    if the_plan is None:
        return {}
    if hasattr(the_plan, "payload"):            # an nft plan: one transaction
        payload = the_plan.payload
        return {
            "changes": dict(Counter(c.kind for c in the_plan.changes)),
            "drift": sum(1 for c in the_plan.changes if c.drift),
            "members_added": _elements(payload, "add"),
            "members_removed": _elements(payload, "delete"),
            "sets_created": _payload_lines(payload, "add set") + _payload_lines(payload, "add map"),
            "sets_destroyed": (_payload_lines(payload, "delete set")
                               + _payload_lines(payload, "delete map")),
            "nft_payload_lines": the_plan.lines,
        }
    ipset = the_plan.ipset_prepare + the_plan.ipset_cleanup
    return {
        "changes": dict(Counter(c.kind for c in the_plan.changes)),
        "drift": sum(1 for c in the_plan.changes if c.drift),
        "members_added": _payload_lines(ipset, "add"),
        "members_removed": _payload_lines(ipset, "del"),
        "sets_created": _payload_lines(ipset, "create"),
        "sets_destroyed": _payload_lines(ipset, "destroy"),
        "iptables_payload_lines": sum(p.count("\n") for p in list(the_plan.iptables.values())
                                      + list(the_plan.iptables_cleanup.values())),
    }


def _time_saves(kern) -> dict:
    """Best of a few runs of the bare binaries the read stage runs, started
    without any wrapper: the floor of what reading the state can cost."""
    from lib import dataplane, kernel, nft_kernel

    def best(argv) -> float:
        times = []
        for _ in range(SAVE_REPEATS):
            start = time.perf_counter()
            subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, check=True,
                           timeout=kernel.DEFAULT_TIMEOUT)
            times.append(time.perf_counter() - start)
        return min(times)

    if isinstance(kern, dataplane.NftablesDataplane):
        return {"nft_list": best([nft_kernel.NFT, *nft_kernel.LIST_ARGS])}
    iptables = sum(best([kernel.save_binary(kern.kernel.backend, f), "-t", "filter"]) for f in kern.families)
    return {"iptables_save": iptables, "ipset_save": best(["ipset", "save"])}


def _plane(name: str, backend: str):
    """The dataplane `name` alone in this namespace."""
    from lib import dataplane, kernel, nft_kernel
    if name == dataplane.NFTABLES:
        return dataplane.NftablesDataplane(nft_kernel.NftKernel())
    return dataplane.IptablesDataplane(kernel.Kernel(backend))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cycle_process")
    p.add_argument("--api-server", required=True)
    p.add_argument("--node", required=True)
    p.add_argument("--backend", choices=("nft", "legacy"), default="nft")
    p.add_argument("--dataplane", choices=("iptables", "nftables"), default="iptables")
    p.add_argument("--empty-first", action="store_true",
                   help="remove the dataplane's own objects before the first cycle (untimed)")
    p.add_argument("--cycles", type=int, default=1,
                   help="run this many cycles in a row, as the daemon's loop does (default 1)")
    p.add_argument("--full-rewrite", action="store_true",
                   help="after the cycles, also write the whole state the full-rewrite way")
    p.add_argument("--time-saves", action="store_true",
                   help="after the cycles, time iptables-save and ipset save of the state")
    p.add_argument("--profile", metavar="FILE", help="write cProfile stats of the last cycle here")
    p.add_argument("--on-demand", action="store_true",
                   help="run a cycle for each line on stdin, each reported as a JSON line")
    args = p.parse_args(argv)

    from bench import fullsync
    from lib import cycle, kubeapi, logs
    logs.setup("WARNING")
    api = kubeapi.ApiClient(kubeapi.load_config(api_server=args.api_server))
    kern = _plane(args.dataplane, args.backend)
    if (args.cycles > 1 or args.on_demand) and args.dataplane == "nftables":
        kern.kernel.watch_changes()          # as the daemon's loop does
    if args.empty_first:
        kern.apply(kern.cleanup_plan(kern.read()))
    last = cycle.LastCompiled()
    if args.on_demand:
        return _on_demand(api, kern, args.node, last)

    outs = []
    for n in range(max(1, args.cycles)):
        profiler = cProfile.Profile() if args.profile and n == args.cycles - 1 else None
        start = time.perf_counter()
        if profiler:
            profiler.enable()
        report = cycle.run_cycle(api.list_cluster, kern, args.node, problem_log=cycle.ProblemLog(),
                                 last=last)
        if profiler:
            profiler.disable()
            profiler.dump_stats(args.profile)
        outs.append(_summary(report, time.perf_counter() - start))
        if not report.ok:
            break
    out = outs[-1]
    if report.ok and args.full_rewrite:
        if args.dataplane == "nftables":
            cost = fullsync.sync_nft(report.desired)
        else:
            cost = fullsync.sync(report.desired, kern.kernel.backend, kern.families)
        full = {"render": cost.render_seconds, "apply": cost.apply_seconds,
                "iptables_lines": cost.iptables_lines, "ipset_lines": cost.ipset_lines,
                "steps": list(cost.steps)}
        for o in outs:
            o["full"] = full          # every cycle ended on this same state
    if report.ok and args.time_saves:
        out["saves"] = _time_saves(kern)
    out["previous"] = outs[:-1]
    if args.dataplane == "nftables":
        out["nft_listings"] = kern.kernel.listings
        kern.kernel.close()
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0 if report.ok else 1


def _on_demand(api, kern, node: str, last) -> int:
    from lib import cycle
    ok = True
    for _ in sys.stdin:
        start = time.perf_counter()
        report = cycle.run_cycle(api.list_cluster, kern, node, problem_log=cycle.ProblemLog(),
                                 last=last)
        out = _summary(report, time.perf_counter() - start)
        if hasattr(kern.kernel, "listings"):
            out["nft_listings"] = kern.kernel.listings
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
        sys.stdout.flush()
        ok = ok and report.ok
    if hasattr(kern.kernel, "close"):
        kern.kernel.close()
    return 0 if ok else 1


def _summary(report, wall: float) -> dict:
    """What the benchmark reads of one cycle; the peak memory is the
    process's so far, read right after the cycle."""
    stats = report.apply_stats
    c = report.counts
    return {
        "ok": report.ok, "failed_stage": report.failed_stage, "error": report.error,
        "seconds": report.seconds, "wall": wall, "reused": report.reused,
        "counts": {"policies": c.policies, "local_pods": c.local_pods, "rules": c.rules,
                   "sets": c.sets, "set_members": c.set_members,
                   "map_elements": sum(len(m.elements) for m in getattr(report.desired, "maps", ()))},
        "problems": len(report.cluster.problems) if report.cluster else 0,
        "apply": {"processes": stats.processes if stats else 0,
                  "iptables_lines": stats.iptables_lines if stats else 0,
                  "ipset_lines": stats.ipset_lines if stats else 0,
                  "nft_lines": stats.nft_lines if stats else 0,
                  "steps": list(stats.seconds) if stats else []},
        "plan": _plan_summary(report.plan),
        "api_requests": report.api_requests, "api_bytes": report.api_bytes,
        "rss_kb": peak_rss_kb(),
    }


if __name__ == "__main__":
    sys.exit(main())
