"""The benchmark's tables and check lines, as plain text."""
from __future__ import annotations

from typing import Callable

from bench.checks import Check
from bench.run import SizeResult, WatchRun
from bench import synth

LABEL_WIDTH = 40
COLUMN_WIDTH = 18
STAGES = {"fetch": "fetch (API, JSON decode)", "parse": "parse", "compile": "compile",
          "read": "read kernel state", "diff": "diff", "apply": "apply",
          "conntrack": "conntrack cleanup"}


def _n(value: int) -> str:
    return f"{value:,}"


def _s(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _ratio(part: float, whole: float) -> str:
    return f"{part / whole:.3f}" if whole else "-"


def _stage(name: str) -> Callable[[dict], str]:
    return lambda r: _s(r["seconds"].get(name))


def _changes(r: dict) -> str:
    return _n(sum(r["plan"]["changes"].values()))


def _apply_ratio(r: dict) -> str:
    return _ratio(r["seconds"].get("apply", 0.0), r["full"]["apply"])


def _lines_ratio(r: dict) -> str:
    ours = r["apply"]["iptables_lines"] + r["apply"]["ipset_lines"]
    return _ratio(ours, r["full"]["iptables_lines"] + r["full"]["ipset_lines"])


def _stage_rows(result: SizeResult) -> list:
    """The stages the cycles ran, in pipeline order; a stage the pipeline
    gains later shows up under its own name."""
    seen: dict = {}
    for c in result.cycles:
        for key in c.result["seconds"]:
            seen.setdefault(key, None)
    order = [k for k in STAGES if k in seen] + [k for k in seen if k not in STAGES]
    return [(f"  {STAGES.get(k, k)}", _stage(k)) for k in order]


def _cycle_ratio(r: dict) -> str:
    """Our cycle against one that syncs by full rewrite: the same fetch,
    parse and compile, then render and write everything (no read, no diff).
    Conntrack cleanup is left out of both."""
    sec = r["seconds"]
    ours = sum(v for k, v in sec.items() if k != "conntrack")
    full = sec["fetch"] + sec["parse"] + sec["compile"] + r["full"]["render"] + r["full"]["apply"]
    return _ratio(ours, full)


ROWS: list = [
    ("  cycle total", lambda r: _s(sum(r["seconds"].values()))),
    ("  process, start to exit", lambda r: _s(r.get("process"))),
    ("  parse and compile reused", lambda r: "yes" if r.get("reused") else "no"),
    ("kernel work of the cycle", None),
    ("  plan changes", _changes),
    ("  processes run", lambda r: _n(r["apply"]["processes"])),
    ("  iptables lines written", lambda r: _n(r["apply"]["iptables_lines"])),
    ("  ipset lines written", lambda r: _n(r["apply"]["ipset_lines"])),
    ("  set members added / removed",
     lambda r: f"+{_n(r['plan']['members_added'])} -{_n(r['plan']['members_removed'])}"),
    ("  sets created / destroyed",
     lambda r: f"+{_n(r['plan']['sets_created'])} -{_n(r['plan']['sets_destroyed'])}"),
    ("state after the cycle", None),
    ("  iptables rules, IPv4 + IPv6", lambda r: _n(r["counts"]["rules"])),
    ("  ipsets / members", lambda r: f"{_n(r['counts']['sets'])} / {_n(r['counts']['set_members'])}"),
    ("API", None),
    ("  requests", lambda r: _n(r["api_requests"])),
    ("  bytes", lambda r: f"{r['api_bytes'] / 1e6:.1f} MB"),
    ("peak RSS of the cycle process", lambda r: f"{r['rss_kb'] / 1024:.0f} MB"),
    ("full rewrite of the same state", None),
    ("  render seconds", lambda r: _s(r["full"]["render"])),
    ("  apply seconds", lambda r: _s(r["full"]["apply"])),
    ("  iptables / ipset lines",
     lambda r: f"{_n(r['full']['iptables_lines'])} / {_n(r['full']['ipset_lines'])}"),
    ("  apply: ours / full", _apply_ratio),
    ("  cycle without conntrack: ours / full", _cycle_ratio),
    ("  lines written: ours / full", _lines_ratio),
]


def size_table(result: SizeResult) -> str:
    spec = result.spec
    first = result.cycles[0].result
    out = [f"== {spec.name}: {_n(spec.pods)} pods on {spec.nodes} nodes ({_n(result.local_pods)} on "
           f"{synth.NODE}), {_n(spec.policies)} policies, "
           f"{_n(spec.app_namespaces + len(synth.SYSTEM_NAMESPACES))} namespaces, "
           f"{result.backend} backend (cluster generated in {result.generate_seconds:.1f} s)"]
    if first.get("problems"):
        out.append(f"   {first['problems']} objects with problems")
    header = " " * LABEL_WIDTH + "".join(c.step.title.rjust(COLUMN_WIDTH) for c in result.cycles)
    out.append(header)
    for label, cell in [("stage seconds", None)] + _stage_rows(result) + ROWS:
        if cell is None:
            out.append(label)
            continue
        out.append(label.ljust(LABEL_WIDTH) + "".join(cell(c.result).rjust(COLUMN_WIDTH)
                                                      for c in result.cycles))
    out += [f"{c.step.title}: the quickest of {c.repeats} runs shown"
            for c in result.cycles if c.repeats > 1]
    out.append("changes:")
    out += [f"  {c.step.title}: {c.step.detail}" for c in result.cycles[2:]]
    runs = "; ".join(f"{run.what} {run.seconds:.2f} s, peak {run.peak_rss_kb / 1024:.0f} MB"
                     for run in result.reconcile_runs)
    out.append(f"reconcile.py as a process: {runs}")
    if result.watch is not None:
        out += ["", watch_table(result)]
    return "\n".join(out)


def _poll(result: SizeResult, key: str) -> dict:
    return next(c.result for c in result.cycles if c.step.key == key)


def _watch_idle(w: WatchRun) -> dict:
    """The idle cycles as one column: the most any of them asked of the
    API (all must be 0), the seconds of the quickest."""
    quickest = min(w.idle, key=lambda r: sum(r["seconds"].values()))
    return {**quickest, "requests": max(r["requests"] for r in w.idle),
            "bytes": max(r["bytes"] for r in w.idle)}


WATCH_STAGES = {**STAGES, "fetch": "fetch (cache snapshot)"}


def watch_table(result: SizeResult) -> str:
    """Poll and watch side by side for the three moments that tell their API
    cost apart: start-up, a cycle when nothing changed, one change."""
    w = result.watch
    columns = [("start-up", _poll(result, "first"), w.startup, w.server["start-up"]),
               ("idle cycle", _poll(result, "idle"), _watch_idle(w), w.server["idle"]),
               (w.change_step.title, _poll(result, w.change_step.key), w.change,
                w.server["change"])]
    stages: dict = {}
    for _, _, r, _ in columns:
        for key in r["seconds"]:
            stages.setdefault(key, None)
    order = [k for k in STAGES if k in stages] + [k for k in stages if k not in STAGES]

    def row(label: str, cells) -> str:
        return label.ljust(LABEL_WIDTH) + "".join(c.rjust(COLUMN_WIDTH) for c in cells)

    def timed(key: str) -> list:
        return [_s(w.change.get(key)) if r is w.change else "-" for _, _, r, _ in columns]

    out = [row("API per cycle: poll vs watch", [c[0] for c in columns]),
           row("  poll: requests", [_n(p["api_requests"]) for _, p, _, _ in columns]),
           row("  poll: bytes", [_n(p["api_bytes"]) for _, p, _, _ in columns]),
           row("  watch: requests", [_n(r["requests"]) for _, _, r, _ in columns]),
           row("  watch: bytes", [_n(r["bytes"]) for _, _, r, _ in columns]),
           row("  watch: lists / watches (server log)",
               [f"{_n(s.lists)} / {_n(s.watches)}" for _, _, _, s in columns]),
           "watch mode: stage seconds"]
    out += [row(f"  {WATCH_STAGES.get(k, k)}", [_s(r["seconds"].get(k)) for _, _, r, _ in columns])
            for k in order]
    out += [row("  cycle total", [_s(sum(r["seconds"].values())) for _, _, r, _ in columns]),
            row("  iptables / ipset lines written",
                [f"{_n(r['iptables_lines'])} / {_n(r['ipset_lines'])}" for _, _, r, _ in columns]),
            row("  time to enforce, from the API change", timed("change_to_live")),
            row("  time to enforce, from event arrival", timed("event_to_live")),
            f"start-up: poll's first apply; watch: every kind listed (in {w.synced_seconds:.2f} s) "
            "and its watch open, then the first cycle, on an empty kernel",
            f"idle cycle: poll's idle loop; watch: the most requests and bytes of {len(w.idle)} "
            "cycles, the seconds of the quickest",
            f"{w.change_step.title}: {w.change_step.detail}; time to enforce: until the cycle's "
            "apply is done, from the benchmark's set_state() returning, and from the watch event "
            "reaching the cache (kpm_time_to_enforce_seconds); both include the trigger's 0.1 s "
            "wait for more changes",
            f"watch process: peak RSS {w.rss_kb / 1024:.0f} MB"]
    return "\n".join(out)


def check_lines(title: str, checks: list[Check]) -> str:
    out = [title]
    out += [f"{'PASS' if c.passed else 'FAIL'}  {c.name}  |  {c.figure}" for c in checks]
    return "\n".join(out)
