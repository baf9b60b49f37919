"""python -m bench.nft_listing [--chains N] [--rules N] [--elements N] [--repeat N] [--quick]

The nftables dataplane's kernel costs on a synthetic table of our shape
(base chains dispatching through verdict maps, pod chains, interval and
named-port sets): a full apply, small deltas, and reading the table back
as JSON (what lib.nft_kernel reads) against the text listing, each listed
by nft and parsed. The text side is parsed by a minimal reader written
here for the comparison only: it checks nothing and keeps only what the
diff needs (rule comments, elements), so it is a lower bound of what a
real text parser would cost. Needs root; writes only inside a network
namespace it makes and deletes.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import resource
import statistics
import sys
import time
from typing import Callable

from bench.netns import namespace
from lib import nft_parse
from lib.kernel import run
from lib.nft_kernel import LIST_ARGS, NFT, NftKernel
from lib.nft_plan import diff
from lib.nft_state import (
    ABSENT, ADDR, ADDR_PROTO_PORT, FORWARD, INPUT, AddressSet, BaseHook, Chain, Table, VerdictMap,
    hashed_name, port_element, tagged,
)

TEXT_ARGS = tuple(a for a in LIST_ARGS if a != "-j")
_COMMENT = re.compile(r' comment "((?:[^"\\]|\\.)*)"$')


def synthetic(chains: int, rules: int, elements: int) -> Table:
    """About `chains` chains holding `rules` rules, and sets and maps
    holding `elements` elements, 4/5 of them in address sets."""
    pods = max(chains - 2, 2)
    per_chain = max(rules // pods - 3, 1)
    maps_total = min(elements // 10, 2 * pods * 8)
    port_total = elements // 10
    net_total = elements - maps_total - port_total
    net_sets = max(net_total // 300, 1)
    port_sets = max(port_total // 200, 1)
    nets = [hashed_name("n", 4, str(i)) for i in range(net_sets)]
    ports = [hashed_name("p", 4, str(i)) for i in range(port_sets)]
    sets = []
    for i, name in enumerate(nets):
        base = int(ipaddress.IPv4Address("10.0.0.0")) + i * 65536
        sets.append(AddressSet(name, ADDR[4], True, frozenset(
            str(ipaddress.IPv4Address(base + 2 * j)) for j in range(net_total // net_sets))))
    for i, name in enumerate(ports):
        base = int(ipaddress.IPv4Address("11.0.0.0")) + i * 65536
        sets.append(AddressSet(name, ADDR_PROTO_PORT[4], False, frozenset(
            port_element(f"{ipaddress.IPv4Address(base + j)},tcp:{8000 + j % 10}")
            for j in range(port_total // port_sets))))
    pod_chains = []
    for c in range(pods):
        kind, side = ("i", "saddr") if c % 2 else ("e", "daddr")
        body = tuple(tagged(f"ip {side} @{nets[(c + r) % len(nets)]} tcp dport {80 + r}-{90 + r} return",
                            f"ns-{c}/policy-{r} {'ingress' if kind == 'i' else 'egress'}[0] ports[{r}]")
                     for r in range(per_chain))
        body += (tagged(f"ip daddr . meta l4proto . th dport @{ports[c % len(ports)]} return", "named"),
                 tagged("meta l4proto tcp reject with tcp reset", f"ns-{c}/pod"),
                 tagged("reject with icmpx port-unreachable", f"ns-{c}/pod"))
        pod_chains.append(Chain(hashed_name(kind, 4, str(c)), body))
    maps = []
    for kind, direction in (("e", "egress"), ("i", "ingress")):
        targets = [ch.name for ch in pod_chains if ch.name.startswith(f"kpm-{kind}4-")]
        first = int(ipaddress.IPv4Address("10.244.0.0"))
        maps.append(VerdictMap(f"kpm-{direction}4", ADDR[4], False, {
            str(ipaddress.IPv4Address(first + j)): f"jump {targets[j % len(targets)]}"
            for j in range(maps_total // 2)}))
    top = (tagged("ct state established,related return", "established"),
           tagged("ip saddr vmap @kpm-egress4", "egress dispatch"))
    base = [Chain(FORWARD, top + (tagged("ip daddr vmap @kpm-ingress4", "ingress dispatch"),),
                  BaseHook("forward")),
            Chain(INPUT, top, BaseHook("input"))]
    return Table(chains=tuple(sorted(base + pod_chains, key=lambda ch: ch.name)),
                 sets=tuple(sorted(sets, key=lambda s: s.name)),
                 maps=tuple(sorted(maps, key=lambda m: m.name)))


def text_reader(text: str) -> tuple[dict, dict]:
    """Chains -> rule comments and sets -> elements from `nft list table`."""
    chains: dict[str, list] = {}
    sets: dict[str, list] = {}
    kind = current = None
    into = None                          # the element list being read over lines
    for raw in text.split("\n"):
        line = raw.strip()
        if into is not None:
            done = line.endswith("}")
            into.extend(e.strip() for e in (line[:-1] if done else line).split(",") if e.strip())
            into = None if done else into
        elif line.startswith("chain ") and line.endswith("{"):
            kind, current = "chain", line[6:-2]
            chains[current] = []
        elif line.startswith(("set ", "map ")) and line.endswith("{"):
            kind, current = "set", line[4:-2]
            sets[current] = []
        elif kind == "set" and line.startswith("elements = {"):
            body = line[len("elements = {"):]
            done = body.endswith("}")
            sets[current].extend(e.strip() for e in (body[:-1] if done else body).split(",") if e.strip())
            into = None if done else sets[current]
        elif kind == "chain" and line and line != "}" and not line.startswith("type "):
            m = _COMMENT.search(line)
            chains[current].append(m.group(1) if m else None)
    return chains, sets


def _best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _listing_costs(netns: str, repeat: int) -> dict:
    """Wall and CPU seconds of each listing, interleaved so that other work
    on the machine weighs on both alike."""
    out: dict = {"json": {"wall": [], "cpu": []}, "text": {"wall": [], "cpu": []}}
    for _ in range(repeat):
        for form, args in (("json", LIST_ARGS), ("text", TEXT_ARGS)):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            out[form]["text"] = run("bench listing", NFT, args, netns=netns)
            out[form]["wall"].append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            out[form]["cpu"].append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return out


def _apply(k: NftKernel, desired: Table) -> tuple[float, int]:
    plan = diff(desired, k.read())
    stats = k.apply(plan)
    return stats.seconds[0][1] if stats.seconds else 0.0, plan.lines


def measure(chains: int, rules: int, elements: int, repeat: int) -> list[tuple[str, str]]:
    desired = synthetic(chains, rules, elements)
    rows = [("table", f"{len(desired.chains)} chains, {sum(len(c.rules) for c in desired.chains)} rules, "
                      f"{sum(len(s.elements) for s in desired.sets + desired.maps)} elements")]
    with namespace() as netns:
        k = NftKernel(netns=netns, families=(4,))
        full = []
        for _ in range(max(repeat // 3, 1)):
            k.cleanup()
            seconds, lines = _apply(k, desired)
            full.append(seconds)
        rows.append(("full apply (nft -f, from no table)", f"{min(full):.3f} s, {lines} lines"))
        costs = _listing_costs(netns, repeat)
        for form in ("json", "text"):
            c = costs[form]
            rows.append((f"list, {form} (nft {'-j ' if form == 'json' else ''}list table)",
                         f"wall min {min(c['wall']):.3f} median {statistics.median(c['wall']):.3f} s, "
                         f"cpu min {min(c['cpu']):.3f} median {statistics.median(c['cpu']):.3f} s, "
                         f"{len(c['text']) / 1e6:.2f} MB"))
        listed_json, listed_text = costs["json"]["text"], costs["text"]["text"]
        rows.append(("parse json (lib.nft_parse.parse)",
                     f"{_best(lambda: nft_parse.parse(listed_json), repeat):.3f} s "
                     f"(json.loads alone {_best(lambda: json.loads(listed_json), repeat):.3f} s)"))
        rows.append(("parse text (minimal reader, checks nothing)",
                     f"{_best(lambda: text_reader(listed_text), repeat):.3f} s"))
        current = nft_parse.parse(listed_json)
        rows.append(("diff, in sync", f"{_best(lambda: diff(desired, current), repeat):.3f} s"))
        rows.append(("read, same listing again (no parse)",
                     f"{_best(k.read, max(repeat // 3, 1)):.3f} s"))

        first_set = desired.sets[0]
        one_more = Table(desired.chains, (AddressSet(first_set.name, first_set.key, first_set.interval,
                                                     first_set.elements | {"10.255.255.1"}),)
                         + desired.sets[1:], desired.maps)
        seconds, lines = _apply(k, one_more)
        rows.append(("delta: one element added", f"{seconds:.3f} s, {lines} lines"))
        chain = desired.chains[0]
        edited = Table(tuple(Chain(c.name, (tagged("tcp dport 1 return", "edit"),) + c.rules, c.base)
                             if c.name == chain.name else c for c in desired.chains),
                       one_more.sets, one_more.maps)
        seconds, lines = _apply(k, edited)
        rows.append(("delta: one chain rewritten", f"{seconds:.3f} s, {lines} lines"))
        k.cleanup()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.nft_listing",
                                description=__doc__.split("\n\n")[1])
    p.add_argument("--chains", type=int, default=200)
    p.add_argument("--rules", type=int, default=5000)
    p.add_argument("--elements", type=int, default=30000)
    p.add_argument("--repeat", type=int, default=9, help="runs per figure (best or median of them)")
    p.add_argument("--quick", action="store_true", help="a small table, three runs: a few seconds")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.chains, args.rules, args.elements, args.repeat = 12, 100, 600, 3
    if os.geteuid() != 0:
        print("python -m bench.nft_listing: must run as root (it creates a network namespace)",
              file=sys.stderr)
        return 2
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for name, value in measure(args.chains, args.rules, args.elements, args.repeat):
        print(f"{name:<46} {value}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
