"""lib.nft_kernel against the real nft, each test in its own network
namespace (see conftest.py): apply, read back, idempotence, drift repair,
failing transactions, cleanup beside a foreign table, and real packets
through the base chains' hooks."""
from __future__ import annotations

import contextlib
import dataclasses
import socket
import subprocess
import threading
import time

import pytest

from lib.kernel import KernelError
from lib.kubeapi import ApiError
from lib.nft_kernel import APPLY_STEP, READ_STEP, NftKernel
from lib.nft_plan import NftPlan, cleanup, diff
from lib.nft_state import (
    ABSENT, ADDR, FORWARD, INPUT, AddressSet, BaseHook, Chain, Table, VerdictMap, hashed_name,
    tagged,
)
from tests.kernel.test_conntrack import CLIENT, NODE_ADDRESS, SERVER, wire_node
from tests.lab.netns import forget, inside
from tests.unit.fixtures.nft.our_table import DESIRED, E4, E6, ESTABLISHED, I4, N4, N6, ND

T = ("inet", "kube-policy-manager")
FOREIGN = """table inet other {
    chain forward {
        type filter hook forward priority 0; policy accept;
        tcp dport 25 drop comment "no mail"
    }
}
"""


def nft(netns: str, *args: str, stdin: str | None = None, check: bool = True) -> str:
    return subprocess.run(["ip", "netns", "exec", netns, "nft", *args], input=stdin,
                          capture_output=True, text=True, timeout=30, check=check).stdout


def listing(netns: str) -> str:
    """Our table as nft prints it for people (no handles)."""
    return nft(netns, "list", "table", *T)


def enforce(k: NftKernel, desired: Table, expected: bool = True) -> NftPlan:
    """One cycle's kernel part: read, diff, apply."""
    plan = diff(desired, k.read(), table_expected=expected)
    k.apply(plan)
    return plan


@pytest.fixture
def loaded(netns):
    """A namespace holding DESIRED through our kernel, and the table read back."""
    k = NftKernel(netns=netns)
    k.apply(diff(DESIRED, k.read()))
    return k, k.read()


# --- apply, read back, idempotence --------------------------------------------

def test_a_fresh_namespace_reads_as_no_table(netns):
    assert NftKernel(netns=netns).read() == ABSENT


def test_apply_reads_back_as_desired_and_a_second_cycle_writes_nothing(netns):
    k = NftKernel(netns=netns)
    plan = diff(DESIRED, k.read())

    stats = k.apply(plan)

    assert stats.processes == 1 and stats.nft_lines == plan.lines
    assert [step for step, _ in stats.seconds] == [APPLY_STEP]
    current = k.read()
    assert diff(DESIRED, current).empty
    assert current.sets == DESIRED.sets and current.maps == DESIRED.maps
    assert [c.hashes for c in current.chains] == [c.hashes for c in DESIRED.chains]
    before = nft(netns, "-a", "list", "table", *T)       # with handles: nothing rewritten
    assert k.apply(diff(DESIRED, k.read())).processes == 0
    assert nft(netns, "-a", "list", "table", *T) == before


def test_the_same_listing_is_not_parsed_again_and_a_change_is_seen(loaded):
    k, first = loaded
    assert k.read() is first
    nft(k.netns, "add", "element", *T, N4, "{ 10.99.0.1 }")
    assert "10.99.0.1" in k.read().set_map()[N4].elements


def test_base_chains_are_hooked_before_the_filter_priority(loaded):
    k, _ = loaded
    text = listing(k.netns)
    assert "type filter hook forward priority filter - 10; policy accept;" in text
    assert "type filter hook input priority filter - 10; policy accept;" in text
    assert " accept " not in text.replace("policy accept;", "")


# --- drift is repaired in one cycle ---------------------------------------------

DRIFTS = {
    "chain flushed": (("flush", "chain", *T, I4), "chain-rewrite", True),
    "rule inserted": (("insert", "rule", *T, E4, "tcp", "dport", "22", "accept"), "chain-rewrite", True),
    "set element deleted": (("delete", "element", *T, N6, "{ fd00:10:244::7 }"), "set-members", False),
    "set element added": (("add", "element", *T, N4, "{ 10.9.9.9 }"), "set-members", False),
    "map element deleted": (("delete", "element", *T, "kpm-ingress4", "{ 10.244.1.6 }"),
                            "map-elements", False),
    "map element added": (("add", "element", *T, "kpm-egress6", f"{{ fd00:10:244::77 : jump {E6} }}"),
                          "map-elements", False),
    "table deleted": (("delete", "table", *T), "table-create", True),
    "table dormant": (("add", "table", *T, "{ flags dormant; }"), "table-recreate", True),
    "base chain policy drop": (("add", "chain", *T, FORWARD, "{ type filter hook forward priority -10; "
                                "policy drop; }"), "table-recreate", True),
    "chain added": (("add", "chain", *T, "kpm-i4-someone"), "chain-delete", False),
}


@pytest.mark.parametrize("name", DRIFTS)
def test_drift_is_repaired_in_one_cycle(loaded, name):
    k, clean = loaded
    command, kind, drift = DRIFTS[name]
    nft(k.netns, *command)
    assert k.read() != clean

    plan = enforce(k, DESIRED)

    assert (plan.changes[0].kind, plan.changes[0].drift) == (kind, drift)
    assert k.read() == clean
    assert diff(DESIRED, k.read()).empty


def test_a_moved_pod_and_a_changed_chain_in_one_transaction(loaded):
    k, _ = loaded
    i4 = DESIRED.chain_map()[I4]
    new_chain = dataclasses.replace(i4, rules=(tagged("tcp dport 8443 return", "new"),) + i4.rules)
    egress = DESIRED.map_map()["kpm-egress4"]
    desired = dataclasses.replace(
        DESIRED,
        chains=tuple(new_chain if c.name == I4 else c for c in DESIRED.chains),
        maps=tuple(dataclasses.replace(egress, elements={"10.244.1.5": f"jump {I4}"})
                   if m.name == "kpm-egress4" else m for m in DESIRED.maps))

    enforce(k, desired)

    assert diff(desired, k.read()).empty
    assert k.read().chain_map()[I4].hashes == new_chain.hashes


def test_stale_chains_sets_and_maps_are_removed_in_the_same_transaction(loaded):
    k, _ = loaded
    forward = DESIRED.chain_map()[FORWARD]
    inp = DESIRED.chain_map()[INPUT]
    def undispatched(chain: Chain) -> Chain:
        return dataclasses.replace(chain, rules=tuple(r for r in chain.rules
                                                      if "vmap" not in r.statement))
    desired = Table(chains=(undispatched(forward), undispatched(inp)))

    plan = enforce(k, desired)

    assert {c.kind for c in plan.changes} == {"chain-rewrite", "chain-delete", "set-destroy",
                                              "map-destroy"}
    assert plan.payload.count("\n") == plan.lines
    current = k.read()
    assert [c.name for c in current.chains] == [FORWARD, INPUT]
    assert current.sets == () and current.maps == ()
    assert diff(desired, current).empty


# --- a failing transaction changes nothing and names its line ---------------------

def test_a_refused_line_leaves_the_previous_state_whole_and_is_named(loaded):
    k, clean = loaded
    s = DESIRED.set_map()[N4]
    good = diff(dataclasses.replace(DESIRED, sets=tuple(
        dataclasses.replace(x, elements=x.elements | {"10.250.0.1"}) if x.name == N4 else x
        for x in DESIRED.sets)), clean).payload
    bad_line = f"add rule inet kube-policy-manager {I4} ip saddr @kpm-n4-missing return"
    payload = f"flush chain inet kube-policy-manager {E4}\n" + good + bad_line + "\n"

    with pytest.raises(KernelError) as caught:
        k.apply(NftPlan(payload))

    message = str(caught.value)
    number = payload.splitlines().index(bad_line) + 1
    assert message.startswith(f"{APPLY_STEP}: nft exited with code 1: line {number}: ")
    assert "No such file or directory" in message and f"[line {number}: {bad_line}]" in message
    assert caught.value.step == APPLY_STEP and caught.value.stats.processes == 1
    assert k.read() == clean and "10.250.0.1" not in k.read().set_map()[s.name].elements


def test_a_line_the_kernel_refuses_at_commit_is_named_too(loaded):
    k, clean = loaded
    payload = (f"add element inet kube-policy-manager {N4} {{ 10.250.0.1 }}\n"
               "delete element inet kube-policy-manager kpm-egress4 { 10.9.9.9 }\n")

    with pytest.raises(KernelError) as caught:
        k.apply(NftPlan(payload))

    assert "line 2: " in str(caught.value)
    assert "[line 2: delete element inet kube-policy-manager kpm-egress4 { 10.9.9.9 }]" in str(caught.value)
    assert k.read() == clean


def test_an_element_nft_points_at_in_a_long_line_is_quoted(loaded):
    k, clean = loaded
    elements = ", ".join(f"10.251.{i // 200}.{i % 200}" for i in range(300))
    payload = f"add element inet kube-policy-manager {N4} {{ {elements}, 10.244.2.7 }}\n"

    with pytest.raises(KernelError) as caught:
        k.apply(NftPlan(payload))

    assert "line 1: interval overlaps with an existing one at '10.244.2.7'" in str(caught.value)
    assert k.read() == clean


# --- the listing begun early ------------------------------------------------------

def test_a_prefetched_listing_is_the_next_read(loaded):
    k, clean = loaded
    listed = k.listings
    k.prefetch()
    assert k.read() == clean and k.listings == listed + 1
    assert k.read() == clean and k.listings == listed + 2     # no prefetch: listed then


def test_a_prefetched_listing_no_read_took_is_stopped(loaded):
    k, clean = loaded
    k.prefetch()
    process = k._started._command.process
    k.drop_prefetch()
    assert process.exit_code is not None                     # reaped, not left running
    nft(k.netns, "flush", "chain", "inet", "kube-policy-manager", E4)
    assert k.read().chain_map()[E4].rules == ()              # read lists anew


def test_a_cycle_that_fails_before_its_read_leaves_no_listing(loaded):
    from lib import cycle, dataplane

    def failing_fetch():
        raise ApiError("the API is down")

    k, _ = loaded
    report = cycle.run_cycle(failing_fetch, dataplane.NftablesDataplane(k), "node-1")
    assert not report.ok and report.failed_stage == "fetch"
    assert k._started is None


# --- reading failures ------------------------------------------------------------

def test_corrupt_listing_is_an_error_and_nothing_is_written(loaded, tmp_path, monkeypatch):
    k, _ = loaded
    real = nft(k.netns, "-j", "list", "table", *T)
    fake = tmp_path / "nft"
    fake.write_text(f"#!/bin/sh\nprintf '%s' '{real[:len(real) // 2]}'\n")
    fake.chmod(0o755)
    before = nft(k.netns, "-a", "list", "ruleset")
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/sbin:/usr/bin:/sbin:/bin")

    with pytest.raises(KernelError) as caught:
        k.read()

    assert str(caught.value).startswith(
        f"{READ_STEP}: cannot parse the output of nft -j list table: nft -j listing: not JSON")
    monkeypatch.undo()
    assert nft(k.netns, "-a", "list", "ruleset") == before


def test_a_missing_namespace_is_a_failure_not_an_absent_table(netns):
    k = NftKernel(netns=netns + "-gone", families=(4,))
    with pytest.raises(KernelError) as caught:
        k.read()
    assert caught.value.step == READ_STEP and "Cannot open network namespace" in str(caught.value)


# --- cleanup: our table goes, a foreign one stays ------------------------------------

def test_cleanup_removes_our_table_and_leaves_a_foreign_one(netns):
    nft(netns, "-f", "-", stdin=FOREIGN)
    foreign = nft(netns, "-a", "list", "table", "inet", "other")
    k = NftKernel(netns=netns)
    enforce(k, DESIRED, expected=False)
    assert nft(netns, "-a", "list", "table", "inet", "other") == foreign

    stats = k.cleanup()

    assert stats.processes == 1 and stats.nft_lines == 1
    assert k.read() == ABSENT
    assert nft(netns, "list", "tables") == "table inet other\n"
    assert nft(netns, "-a", "list", "table", "inet", "other") == foreign
    assert k.cleanup().processes == 0 and cleanup(ABSENT).empty


# --- real packets ------------------------------------------------------------------

ALLOWED, REFUSED, DROPPED_BY_OTHERS, DROPPED_BY_IPTABLES = 9090, 8080, 7070, 6060
SERVER_PORTS = (ALLOWED, REFUSED, DROPPED_BY_OTHERS, DROPPED_BY_IPTABLES)
QUICK = 0.5          # a reset or ICMP error comes back well within this


def wire_table(family: int) -> Table:
    """The server admits ALLOWED and the two ports other tables drop; the
    client may send to the server only (not to the node: INPUT)."""
    ipf = "ip" if family == 4 else "ip6"
    server_in = Chain(hashed_name("i", family, "server"), (
        tagged(f"tcp dport {{ {ALLOWED}, {DROPPED_BY_OTHERS}, {DROPPED_BY_IPTABLES} }} return", "server"),
        tagged(f"udp dport {ALLOWED} return", "server udp"),
        tagged("meta l4proto tcp reject with tcp reset", "refuse tcp"),
        tagged("reject with icmpx port-unreachable", "refuse"),
    ))
    client_out = Chain(hashed_name("e", family, "client"), (
        tagged(f"{ipf} daddr @{hashed_name('n', family, 'server')} return", "to server"),
        tagged("meta l4proto tcp reject with tcp reset", "refuse tcp"),
        tagged("reject with icmpx port-unreachable", "refuse"),
    ))
    maps = (VerdictMap(f"kpm-egress{family}", ADDR[family], False,
                       {CLIENT[family]: f"jump {client_out.name}"}),
            VerdictMap(f"kpm-ingress{family}", ADDR[family], False,
                       {SERVER[family]: f"jump {server_in.name}"}))
    egress = tagged(f"{ipf} saddr vmap @kpm-egress{family}", "egress")
    ingress = tagged(f"{ipf} daddr vmap @kpm-ingress{family}", "ingress")
    return Table(
        chains=tuple(sorted((
            Chain(FORWARD, (ESTABLISHED, ND, egress, ingress), BaseHook("forward")),
            Chain(INPUT, (ESTABLISHED, ND, egress), BaseHook("input")),
            server_in, client_out), key=lambda c: c.name)),
        sets=(AddressSet(hashed_name("n", family, "server"), ADDR[family], True,
                         frozenset({SERVER[family]})),),
        maps=maps)


class Servers:
    """TCP listeners (accepting, then closing) and UDP echoes in a namespace."""

    def __init__(self, netns: str, family: int, address: str, tcp=(), udp=()):
        self.sockets: list[socket.socket] = []
        af = socket.AF_INET6 if family == 6 else socket.AF_INET
        for kind, ports in ((socket.SOCK_STREAM, tcp), (socket.SOCK_DGRAM, udp)):
            for port in ports:
                with inside(netns):
                    s = socket.socket(af, kind)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((address, port))
                if kind == socket.SOCK_STREAM:
                    s.listen()
                self.sockets.append(s)
                threading.Thread(target=self._serve, args=(s, kind), daemon=True).start()

    @staticmethod
    def _serve(s: socket.socket, kind: int) -> None:
        with contextlib.suppress(OSError):
            while True:
                if kind == socket.SOCK_STREAM:
                    s.accept()[0].close()
                else:
                    data, peer = s.recvfrom(64)
                    if peer is None:        # shut down
                        return
                    s.sendto(data, peer)

    def close(self) -> None:
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def tcp_connect(netns: str, family: int, address: str, port: int, timeout: float = 1.5) -> tuple[str, float]:
    """("connected" | "refused" | "timeout", seconds)."""
    with inside(netns):
        s = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    start = time.monotonic()
    try:
        s.connect((address, port))
        return "connected", time.monotonic() - start
    except ConnectionRefusedError:
        return "refused", time.monotonic() - start
    except (socket.timeout, TimeoutError):
        return "timeout", time.monotonic() - start
    finally:
        s.close()


def udp_exchange(netns: str, family: int, address: str, port: int) -> str:
    """"answered" | "refused" (an ICMP port unreachable came back) | "timeout"."""
    with inside(netns):
        s = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1.5)
    try:
        s.connect((address, port))
        s.send(b"ping")
        return "answered" if s.recv(64) == b"ping" else "garbled"
    except ConnectionRefusedError:
        return "refused"
    except (socket.timeout, TimeoutError):
        return "timeout"
    finally:
        s.close()


@pytest.fixture(params=[4, 6], ids=["ipv4", "ipv6"])
def wired(request, netns_factory):
    """A node namespace forwarding between a client and a server namespace,
    servers listening on every test port, on the server and on the node."""
    family = request.param
    node, client, server = netns_factory(), netns_factory(), netns_factory()
    wire_node(node, client, server)
    servers = [Servers(server, family, SERVER[family], tcp=SERVER_PORTS, udp=(ALLOWED, REFUSED)),
               Servers(node, family, NODE_ADDRESS[family], tcp=(ALLOWED,))]
    try:
        yield family, node, client
    finally:
        for s in servers:
            s.close()
        for name in (node, client, server):
            forget(name)


def test_packets_meet_our_refusals_first_and_every_other_table_after(wired):
    family, node, client = wired
    dst = SERVER[family]
    before = {port: tcp_connect(client, family, dst, port)[0] for port in SERVER_PORTS}
    assert set(before.values()) == {"connected"}

    # Foreign rules at the filter priority (0): an nft table and iptables-nft,
    # dropping on ports that our table lets through, and on the one it refuses.
    nft(node, "-f", "-", stdin=FOREIGN.replace("tcp dport 25 drop", f"tcp dport {{ {DROPPED_BY_OTHERS}, "
                                                                  f"{REFUSED} }} drop"))
    iptables = "ip6tables-nft" if family == 6 else "iptables-nft"
    subprocess.run(["ip", "netns", "exec", node, iptables, "-A", "FORWARD", "-p", "tcp", "--dport",
                    str(DROPPED_BY_IPTABLES), "-j", "DROP"], check=True, timeout=30)
    NftKernel(netns=node, families=(family,)).apply(diff(wire_table(family), ABSENT))

    assert tcp_connect(client, family, dst, ALLOWED)[0] == "connected"
    result, seconds = tcp_connect(client, family, dst, REFUSED)
    # a reset from our chain, at once: it ran before the foreign drop at priority 0
    assert result == "refused" and seconds < QUICK
    # what we let through still meets the node's other rules: we only narrow
    assert tcp_connect(client, family, dst, DROPPED_BY_OTHERS, timeout=0.7)[0] == "timeout"
    assert tcp_connect(client, family, dst, DROPPED_BY_IPTABLES, timeout=0.7)[0] == "timeout"
    assert udp_exchange(client, family, dst, ALLOWED) == "answered"
    assert udp_exchange(client, family, dst, REFUSED) == "refused"       # ICMP port unreachable
    # the input hook: the client may not reach the node itself
    result, seconds = tcp_connect(client, family, NODE_ADDRESS[family], ALLOWED)
    assert result == "refused" and seconds < QUICK


def test_packets_follow_an_incremental_change_and_cleanup(wired):
    family, node, client = wired
    dst = SERVER[family]
    k = NftKernel(netns=node, families=(family,))
    desired = wire_table(family)
    k.apply(diff(desired, k.read()))
    assert tcp_connect(client, family, dst, REFUSED)[0] == "refused"

    # the server's chain now admits REFUSED too: one flush + add rules
    server_in = next(c for c in desired.chains if c.name.startswith("kpm-i"))
    opened = dataclasses.replace(server_in, rules=(tagged(f"tcp dport {REFUSED} return", "opened"),)
                                 + server_in.rules)
    desired = dataclasses.replace(desired, chains=tuple(opened if c.name == opened.name else c
                                                        for c in desired.chains))
    plan = enforce(k, desired)
    assert [c.kind for c in plan.changes] == ["chain-rewrite"]
    assert tcp_connect(client, family, dst, REFUSED)[0] == "connected"

    k.cleanup()
    assert tcp_connect(client, family, NODE_ADDRESS[family], ALLOWED)[0] == "connected"
