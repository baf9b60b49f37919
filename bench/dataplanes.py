"""The iptables and nftables dataplanes side by side on one cluster: the
same objects served by one API server, each dataplane's cycles in their
own processes in one network namespace, taken in turns (the order swapped
every round) so that whatever else loads the machine weighs on both alike.

Each dataplane runs alone: it reads and writes only its own objects
(iptables chains and ipsets; our nft table), so the two coexist in the
namespace without either seeing the other. Measured per dataplane over
REPEATS rounds, each stage's quickest (bench.run.quickest_stages): the
first apply on an empty kernel, the idle loop cycle, and three one-pod
changes (a remote pod joining a peer set, a local pod added, the same pod
removed) twice: in the daemon's running loop, where
they happen in production, and in a new process (`--once`), which lists
the whole kernel state first. Apart from the kernel: the rule count of
the cluster as it is and with every local pod there twice, which nft's
shared pod chains and dispatch maps keep flat.
"""
from __future__ import annotations

import json
import select
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable

from bench import netns, scenarios, synth
from bench.checks import Check
from bench.run import (CYCLE_TIMEOUT, REPO, BenchError, _serve, _tail, _total, model,
                       quickest_stages, run_cycle_process)
from lib import compile as compiler
from lib import iptables_render, nft_render
from lib.dataplane import IptablesDataplane, NftablesDataplane
from lib.selectors import ClusterIndex
from tests.apiserver import ApiServer

DATAPLANES = ("iptables", "nftables")
REPEATS = 3
CHECK_REPEATS = 5            # at the size the checks judge: nearly equal totals need more rounds
CHURN = ("remote-pod", "local-pod", "local-pod-removed")
LOOP = tuple(f"{k} (loop)" for k in CHURN)
CYCLES = ("first", "idle") + LOOP + CHURN
TITLES = {"first": "first apply (empty kernel)", "idle": "idle loop cycle",
          "remote-pod": "remote pod joins, new process", "local-pod": "local pod added, new process",
          "local-pod-removed": "local pod removed, new process",
          "remote-pod (loop)": "remote pod joins, loop",
          "local-pod (loop)": "local pod added, loop",
          "local-pod-removed (loop)": "local pod removed, loop"}
# Cycles of the loop process before a change: the change then meets the loop
# as it runs between changes (nft: a listing the monitor vouches for).
SETTLE = 3


@dataclass(frozen=True)
class LocalScaling:
    """Rules of each dataplane for the cluster, and with every local pod twice."""
    local_pods: int
    rules: dict                      # dataplane -> (rules as is, rules with the copies)
    dispatch: tuple                  # nft verdict map elements: (as is, with the copies)


@dataclass(frozen=True)
class DataplaneResult:
    spec: synth.Spec
    repeats: int
    cycles: dict                     # dataplane -> cycle key -> report (quickest_stages)
    detail: dict                     # cycle key -> what changed


def _counts(state: scenarios.State) -> tuple[int, int, int]:
    cluster = model(state)
    intent = compiler.intend_node(cluster, synth.NODE, ClusterIndex(cluster))
    table = nft_render.render(intent)
    return (IptablesDataplane.counts(iptables_render.render(intent))[0],
            NftablesDataplane.counts(table)[0], sum(len(m.elements) for m in table.maps))


def local_scaling(spec: synth.Spec) -> LocalScaling:
    first = scenarios.initial(synth.generate(spec))
    parsed = model(first)
    local = sum(1 for p in parsed.pods if p.node == synth.NODE and not p.host_network)
    twice = scenarios.local_pods_copied(first, parsed, synth.NODE)
    del parsed
    ipt, nft, dispatch = _counts(first)
    ipt2, nft2, dispatch2 = _counts(twice)
    return LocalScaling(local, {"iptables": (ipt, ipt2), "nftables": (nft, nft2)},
                        (dispatch, dispatch2))


class LoopProcess:
    """bench.cycle_process --on-demand: one dataplane's daemon loop, one
    cycle per `cycle()` call, in the namespace."""

    def __init__(self, ns: str, url: str, backend: str, dataplane: str):
        self._err = tempfile.TemporaryFile()
        argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "bench.cycle_process",
                "--api-server", url, "--node", synth.NODE, "--backend", backend,
                "--dataplane", dataplane, "--on-demand"]
        self._process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self._err, cwd=REPO, text=True, bufsize=1)

    def cycle(self) -> dict:
        self._process.stdin.write("\n")
        self._process.stdin.flush()
        ready, _, _ = select.select([self._process.stdout], [], [], CYCLE_TIMEOUT)
        line = self._process.stdout.readline() if ready else ""
        try:
            out = json.loads(line)
        except ValueError:
            raise BenchError(f"loop process gave no report:\n{self._stderr()}") from None
        if not out.get("ok"):
            raise BenchError(f"loop cycle failed in {out.get('failed_stage')}: {out.get('error')}")
        out["process"] = None
        return out

    def _stderr(self) -> str:
        self._err.seek(0)
        return _tail(self._err.read().decode("utf-8", "replace"))

    def close(self) -> None:
        try:
            self._process.stdin.close()
            self._process.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self._process.kill()
            self._process.wait()
        self._err.close()

    def __enter__(self) -> "LoopProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_loop(ns: str, server: ApiServer, backend: str, dataplane: str,
             changes: list[tuple[str, "scenarios.State"]], start: "scenarios.State") -> dict:
    """One loop process through `changes` (key, state), SETTLE cycles on
    each state before the next change; the first cycle on each changed
    state is the one measured."""
    out = {}
    with LoopProcess(ns, server.url, backend, dataplane) as loop:
        _serve(server, start)
        for _ in range(SETTLE):
            loop.cycle()
        for key, state in changes:
            _serve(server, state)
            measured = loop.cycle()
            if key is not None:
                out[key] = measured
            for _ in range(SETTLE - 1):
                loop.cycle()
    return out


def run_dataplanes(spec: synth.Spec, backend: str,
                   progress: Callable[[str], None] = lambda _: None,
                   quick: bool = False, judged: bool = False) -> DataplaneResult:
    """Every cycle of CYCLES on both dataplanes, REPEATS rounds (CHECK_REPEATS
    at the `judged` size, one when `quick`); per dataplane and cycle, the
    rounds as one report: each stage's quickest (quickest_stages)."""
    cluster = synth.generate(spec)
    first = scenarios.initial(cluster)
    parsed = model(first)
    desired = compiler.compile_node(parsed, synth.NODE)
    remote = scenarios.remote_pod_joins(first, parsed, desired, synth.NODE)
    local = scenarios.local_pod_added(first, parsed, desired, synth.NODE)
    del parsed, desired
    # (cycle key or None for a step back to the first state, state, cycles, flags)
    steps = [("first", first, 1, {"empty_first": True}),
             ("idle", first, 3, {"time_saves": True}),
             ("remote-pod", remote.state, 1, {}),
             (None, first, 1, {}),
             ("local-pod", local.state, 1, {}),
             ("local-pod-removed", first, 1, {})]
    loop_changes = [("remote-pod (loop)", remote.state), (None, first),
                    ("local-pod (loop)", local.state), ("local-pod-removed (loop)", first)]
    repeats = 1 if quick else CHECK_REPEATS if judged else REPEATS
    runs: dict = {dp: {} for dp in DATAPLANES}      # dataplane -> cycle key -> its reports

    def keep(dp: str, key, out: dict) -> None:
        if key is not None:
            runs[dp].setdefault(key, []).append(out)
    with netns.namespace() as ns:
        server = ApiServer(sock=netns.bound_socket(ns))
        server.start()
        try:
            served = None
            for attempt in range(repeats):
                order = DATAPLANES if attempt % 2 == 0 else DATAPLANES[::-1]
                progress(f"{spec.name}: iptables and nftables, round {attempt + 1}/{repeats} "
                         f"({order[0]} first)")
                for key, state, cycles, flags in steps:
                    if state is not served:
                        _serve(server, state)
                        served = state
                    for dp in order:
                        out, _ = run_cycle_process(ns, server.url, backend, cycles=cycles,
                                                   dataplane=dp, **flags)
                        if key is not None:
                            keep(dp, key, out)
                for dp in order:
                    for key, out in run_loop(ns, server, backend, dp, loop_changes, first).items():
                        keep(dp, key, out)
                served = first
        finally:
            server.stop()
    best = {dp: {key: quickest_stages(reports) for key, reports in cycles.items()}
            for dp, cycles in runs.items()}
    detail = {"first": "every rule and set written",
              "idle": "nothing changed: the third cycle of a process, its start behind it",
              "remote-pod": remote.detail, "local-pod": local.detail,
              "local-pod-removed": "the pod added just before deleted"}
    detail.update({loop: detail[k] for loop, k in zip(LOOP, CHURN)})
    return DataplaneResult(spec, repeats, best, detail)


# --- shown and judged --------------------------------------------------------------

def _lines(r: dict) -> int:
    a = r["apply"]
    return a["iptables_lines"] + a["ipset_lines"] + a.get("nft_lines", 0)


def _listing(r: dict) -> float:
    saves = r.get("saves", {})
    return saves.get("nft_list", saves.get("iptables_save", 0.0) + saves.get("ipset_save", 0.0))


def _ratio(nft: float, ipt: float) -> str:
    return f"x{nft / ipt:.2f}" if ipt else "-"


ROW_STAGES = (("compile (with render)", "compile"), ("read kernel state", "read"),
              ("diff", "diff"), ("apply", "apply"))


def table(result: DataplaneResult) -> str:
    spec = result.spec
    ipt, nft = result.cycles["iptables"], result.cycles["nftables"]
    width = 14
    out = [f"{spec.name}: iptables and nftables dataplanes, {spec.pods:,} pods, "
           f"{spec.policies:,} policies (seconds: per stage the quickest of "
           f"{result.repeats} rounds taken in turns, totals their sum)",
           f"  {'':38}" + "".join(h.rjust(width) for h in ("iptables", "nftables", "nft / ipt"))]

    def row(label: str, a, b, ratio: bool = True, fmt: str = "{:.3f}") -> None:
        cells = [fmt.format(a), fmt.format(b), _ratio(b, a) if ratio else ""]
        out.append(f"  {label:38}" + "".join(c.rjust(width) for c in cells))

    for key in CYCLES:
        a, b = ipt[key], nft[key]
        row(TITLES[key], _total(a), _total(b))
        for label, stage in ROW_STAGES:
            if stage in a["seconds"] or stage in b["seconds"]:
                row(f"  {label}", a["seconds"].get(stage, 0.0), b["seconds"].get(stage, 0.0))
        row("  lines written", _lines(a), _lines(b), ratio=False, fmt="{:,}")
        if key == "idle":
            row("  bare listing (ipt: -save + ipset save)", _listing(a), _listing(b))
    a, b = ipt["first"]["counts"], nft["first"]["counts"]
    row("rules", a["rules"], b["rules"], fmt="{:,}")
    row("sets", a["sets"], b["sets"], ratio=False, fmt="{:,}")
    row("set members / elements", a["set_members"], b["set_members"], ratio=False, fmt="{:,}")
    out.append(f"  {'nft dispatch map elements':38}" + "-".rjust(width)
               + f"{b.get('map_elements', 0):,}".rjust(width))
    fa, fb = ipt["first"]["full"], nft["first"]["full"]
    row("full rewrite of the state: apply", fa["apply"], fb["apply"])
    named = {"remote-pod": "remote pod joins", "local-pod": "local pod added",
             "local-pod-removed": "local pod removed"}
    out.append("  changes (the same in the loop and in a new process): "
               + "; ".join(f"{named[k]}: {result.detail[k]}" for k in CHURN))
    return "\n".join(out)


def _compare(name: str, nft: dict, ipt: dict, strict: bool = False) -> Check:
    a, b = _total(ipt), _total(nft)
    passed = b < a if strict else b <= a
    sign = ("<" if b < a else ">=") if strict else ("<=" if b <= a else ">")
    return Check(name, passed, f"nftables {b:.3f} s {sign} iptables {a:.3f} s ({_ratio(b, a)}; "
                 f"read {nft['seconds'].get('read', 0):.3f} / {ipt['seconds'].get('read', 0):.3f}, "
                 f"diff {nft['seconds'].get('diff', 0):.3f} / {ipt['seconds'].get('diff', 0):.3f}, "
                 f"apply {nft['seconds'].get('apply', 0):.3f} / {ipt['seconds'].get('apply', 0):.3f})")


def checks(result: DataplaneResult, scaling: LocalScaling) -> list[Check]:
    ipt, nft = result.cycles["iptables"], result.cycles["nftables"]
    out = [_compare("nftables idle loop cycle <= iptables", nft["idle"], ipt["idle"])]
    out += [_compare(f"nftables {TITLES[k]} <= iptables", nft[k], ipt[k]) for k in LOOP + CHURN]
    out.append(_compare("nftables first apply faster than iptables", nft["first"], ipt["first"],
                        strict=True))
    (n1, n2), (i1, i2) = scaling.rules["nftables"], scaling.rules["iptables"]
    d1, d2 = scaling.dispatch
    out.append(Check("nftables rule count does not grow with local pods",
                     n1 == n2 and d2 > d1,
                     f"{n1:,} rules with {scaling.local_pods:,} local pods, {n2:,} with "
                     f"{2 * scaling.local_pods:,} (dispatch map elements {d1:,} -> {d2:,}; "
                     f"iptables {i1:,} -> {i2:,} rules)"))
    return out
