"""python -m bench [--sizes small,medium,large] [--quick] [--backend nft|legacy]
[--profile-dir DIR]

Prints per size a table of poll mode's cycles, one of the API cost of
poll against watch mode and one of the iptables and nftables dataplanes
side by side, then the pass/fail checks; exits 1 when a check
fails, 2 when the benchmark cannot run. Needs root: it makes network
namespaces, and writes iptables rules, ipsets and nft tables only inside them.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

CHECK_SIZE = "medium"
EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2


def _sizes(text: str) -> list[str]:
    from bench.synth import SIZES
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in SIZES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown size {', '.join(unknown) or '(none)'}; choose from {', '.join(SIZES)}")
    return names


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    p.add_argument("--sizes", type=_sizes, default=["small", "medium", "large"],
                   help="comma-separated sizes (default small,medium,large)")
    p.add_argument("--quick", action="store_true",
                   help="the small size only, checks judged on it: a few seconds")
    p.add_argument("--backend", choices=("nft", "legacy"), default="nft",
                   help="iptables backend (default nft)")
    p.add_argument("--profile-dir", metavar="DIR",
                   help="write cProfile stats of every cycle into DIR (size-cycle.prof)")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = ["small"]
    return args


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        print("python -m bench: must run as root (it creates network namespaces)", file=sys.stderr)
        return EXIT_ERROR
    signal.signal(signal.SIGTERM, _interrupt)
    from bench import admin, checks, dataplanes, netns, report, run, synth
    if args.profile_dir:
        os.makedirs(args.profile_dir, exist_ok=True)

    def progress(text: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    print(f"kube-policy-manager benchmark: {os.cpu_count()} CPUs, load average "
          f"{_load()} at the start", flush=True)
    check_size = CHECK_SIZE if CHECK_SIZE in args.sizes else args.sizes[0]
    judged = judged_planes = None
    try:
        for name in args.sizes:
            result = run.run_size(synth.SIZES[name], args.backend, args.profile_dir, progress,
                                  quick=args.quick)
            print(report.size_table(result), end="\n\n", flush=True)
            planes = dataplanes.run_dataplanes(synth.SIZES[name], args.backend, progress,
                                               quick=args.quick, judged=name == check_size)
            print(dataplanes.table(planes), end="\n\n", flush=True)
            if name == check_size:
                judged, judged_planes = result, planes
        progress(f"{check_size}: compile scaling and rule count against peer pods")
        scaling = run.scaling(synth.SIZES[check_size])
        local_scaling = dataplanes.local_scaling(synth.SIZES[check_size])
        progress(f"{check_size}: without and with admin policies")
        with_admin = admin.run_admin(synth.SIZES[check_size], args.backend, progress)
        print(admin.table(with_admin), end="\n\n", flush=True)
    except (run.BenchError, netns.NetnsError, subprocess.SubprocessError, OSError) as err:
        print(f"python -m bench: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("python -m bench: interrupted; its network namespaces are deleted", file=sys.stderr)
        return 130
    spec = synth.SIZES[check_size]
    busy = os.getloadavg()[0] > (os.cpu_count() or 1)
    print(f"load average {_load()} at the end"
          + ("; other work shared the CPUs, so times ran long" if busy else ""), flush=True)
    title = (f"checks at {check_size} ({spec.pods:,} pods, {spec.policies:,} policies, "
             f"{args.backend} backend)")
    if check_size != CHECK_SIZE:
        title += f"; the targets are set for {CHECK_SIZE}"
    results = (checks.evaluate(judged, scaling) + admin.checks(with_admin)
               + dataplanes.checks(judged_planes, local_scaling))
    print(report.check_lines(title, results), flush=True)
    return EXIT_OK if all(c.passed for c in results) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
