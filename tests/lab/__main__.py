"""Command line of the lab.

    python -m tests.lab run [--dataplane iptables|nftables|both] [--keep] [--loop]
                            [--no-transitions] [-k PATTERN] CASE_OR_DIR...
    python -m tests.lab demo [CASE]
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

from lib.dataplane import DATAPLANES

from .runner import Options, run

BOTH = "both"


class Terminated(KeyboardInterrupt):
    """SIGTERM/SIGHUP, raised in the main thread so that every finally: cleans up."""


def _on_signal(signum, frame):
    raise Terminated(f"signal {signum}")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m tests.lab",
                                description="Run lab cases: a cluster of network namespaces, "
                                            "the real reconciler on every node, real packets.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run case files (folders: every *.yaml in them)")
    r.add_argument("paths", nargs="+", metavar="CASE_OR_DIR")
    r.add_argument("--keep", action="store_true",
                   help="leave the namespaces up and print how to enter and remove them")
    r.add_argument("--loop", action="store_true",
                   help="run the reconciler as a loop on every node instead of --once per step")
    r.add_argument("--no-transitions", action="store_true",
                   help="do not probe while a step is being applied")
    r.add_argument("--dataplane", choices=(*DATAPLANES, BOTH), default=BOTH,
                   help="what the nodes enforce with: iptables, nftables, or both (default: "
                        "every case on iptables, then every case on nftables)")
    r.add_argument("-k", dest="pattern", metavar="PATTERN",
                   help="only cases whose name or file contains PATTERN (a glob with * ? [)")
    d = sub.add_parser("demo", help="show connectivity before and after a case's policies")
    d.add_argument("case", nargs="?", help="case file (default: tests/lab/demo.yaml)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        print("the lab needs root (it creates network namespaces)", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    try:
        if args.command == "run":
            options = Options(keep=args.keep, loop=args.loop, transitions=not args.no_transitions)
            planes = DATAPLANES if args.dataplane == BOTH else (args.dataplane,)
            return run(args.paths, options, args.pattern, emit=_emit, dataplanes=planes)
        from .demo import demo
        return demo(args.case, emit=_emit)
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc or 'Ctrl-C'}); lab namespaces removed", file=sys.stderr)
        return 130


def _emit(line: str) -> None:
    print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
