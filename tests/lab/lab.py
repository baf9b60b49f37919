"""One running lab cluster: network, servers, API server and reconcilers together.

`Lab` is the Python API of the lab: build it for a case, move it from state
to state, reconcile, probe truth tables, run commands on a node, tear it down.
The runner and the tests drive it; it decides nothing about pass or fail.
"""
from __future__ import annotations

import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from lib.dataplane import IPTABLES
from tests.apiserver import ApiServer

from . import netns
from .apiobjects import state_objects
from .case import IPV4, Case, State, Table
from .cluster import API_ADDRESS, Network, Endpoint
from .reconcilers import SCRIPT, Reconcilers
from .traffic import (ALLOWED, RETRY_TIMEOUT, SKIPPED, TIMEOUT, Listener, Probe, Prober, Servers,
                      open_socket)


@dataclass(frozen=True)
class Cell:
    """One probed pair on one port, protocol and family."""
    src: str
    dst: str
    port: int
    protocol: str
    family: str

    def label(self) -> str:
        family = "" if self.family == IPV4 else f" {self.family}"
        return f"{self.src} -> {self.dst} {self.port}/{self.protocol}{family}"


@dataclass(frozen=True)
class CellResult:
    cell: Cell
    expected: bool                # True: must get through
    got: str                      # ALLOWED, REFUSED, TIMEOUT, SKIPPED

    @property
    def skipped(self) -> bool:
        return self.got == SKIPPED

    @property
    def passed(self) -> bool:
        return not self.skipped and (self.got == ALLOWED) == self.expected

    def describe(self) -> str:
        want = "." if self.expected else "X"
        got = "." if self.got == ALLOWED else "X"
        note = " (timed out)" if self.got == TIMEOUT else ""
        return f"{self.cell.label()}: expected {want}, got {got}{note}"


def table_cells(tables: Iterable[Table]) -> dict[Cell, bool]:
    """Every cell of the tables with its expectation (a later table wins a repeated cell)."""
    out = {}
    for t in tables:
        for src, dst, allowed in t.cells:
            out[Cell(src, dst, t.port, t.protocol, t.family)] = allowed
    return out


class Lab:
    """A case's cluster, built on enter and removed on exit (unless kept)."""

    def __init__(self, case: Case, prefix: str, *, script: Path = SCRIPT, loop: bool = False,
                 dataplane: str = IPTABLES):
        self.case = case
        self.dataplane = dataplane      # what the nodes' reconcilers enforce with
        self.prefix = prefix
        self.loop = loop
        self.network = Network(prefix, case.nodes, case.externals)
        self.servers: Optional[Servers] = None
        self.prober: Optional[Prober] = None
        self.api: Optional[ApiServer] = None
        self.reconcilers: Optional[Reconcilers] = None
        self.script = Path(script)
        self.state: Optional[State] = None
        self._node_listeners: set[Listener] = set()
        self._loops_started = False

    # -- life cycle -----------------------------------------------------------

    def __enter__(self) -> "Lab":
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def build(self) -> None:
        self.network.build()
        self.servers = Servers()
        self.prober = Prober()
        sock = open_socket(self.network.underlay, IPV4, "TCP")
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((API_ADDRESS, 0))
        except OSError:
            sock.close()
            raise
        self.api = ApiServer(sock=sock, admin_api=True).start()   # a cluster with the admin CRDs
        self.reconcilers = Reconcilers({n.name: self.network.node_ns(n.name) for n in self.case.nodes},
                                       self.api.url, script=self.script, dataplane=self.dataplane)

    def close(self, keep: bool = False) -> list[str]:
        """Stop processes and servers; delete the namespaces unless `keep`.
        Returns what could not be cleaned up."""
        errors = []
        if self.reconcilers is not None:
            errors += self.reconcilers.stop()
        if self.prober is not None:
            self.prober.close()
            self.prober = None
        if self.servers is not None:
            self.servers.stop()
            self.servers = None
        if self.api is not None:
            self.api.stop()
            self.api = None
        if not keep:
            errors += self.network.destroy()
        return errors

    # -- state ------------------------------------------------------------------

    def set_state(self, state: State) -> None:
        """Make the network, the servers and the API match `state` (the
        reconcilers are not run: see reconcile())."""
        wanted = {p.key: p for p in state.pods}
        for key, pod in list(self.network.pods.items()):
            new = wanted.get(key)
            if pod.host_network:
                continue                     # its listeners are the node's: see _refresh_listeners
            if new is None or new.generation != pod.generation or new.ports != pod.ports:
                self.servers.close_namespace(self.network.pod_ns(pod))
        self.network.update_pods(state.pods)
        self._refresh_listeners(state)
        self.api.set_state(**state_objects(self.case, state))
        self.state = state

    def _refresh_listeners(self, state: State) -> None:
        wanted: set[Listener] = set()
        for pod in state.pods:
            ns = self.network.pod_ns(pod)
            for port in pod.ports:
                wanted.add(Listener(ns, pod.ip, port.port, port.protocol))
                wanted.add(Listener(ns, pod.ipv6, port.port, port.protocol))
        for ext in self.case.externals:
            for port in ext.ports:
                wanted.add(Listener(self.network.ext_ns(ext.name), ext.ip, port.port, port.protocol))
                if ext.ipv6:
                    wanted.add(Listener(self.network.ext_ns(ext.name), ext.ipv6, port.port, port.protocol))
        for table in state.expect:
            for _, dst, _ in table.cells:
                if dst.startswith("node:"):
                    node = self.network.nodes[dst[5:]]
                    for address in (node.ip, node.ipv6):
                        wanted.add(Listener(self.network.node_ns(node.name), address, table.port,
                                            table.protocol))
        # node namespaces outlive their listeners: close just the ones no longer wanted
        self.servers.close(self._node_listeners - wanted)
        self._node_listeners = {w for w in wanted if w.netns.startswith(f"{self.prefix}n-")}
        self.servers.ensure(sorted(wanted, key=lambda l: (l.netns, l.address, l.port, l.protocol)))

    # -- reconcilers ----------------------------------------------------------------

    def reconcile(self) -> list[str]:
        """Bring every node's rules to the API state; return the errors."""
        if self.loop:
            if not self._loops_started:
                self.reconcilers.start_loops()
                self._loops_started = True
            return self.reconcilers.converge()
        return [o.describe("--once") for o in self.reconcilers.once() if o.returncode != 0]

    # -- probing ----------------------------------------------------------------------

    def endpoint(self, name: str) -> Endpoint:
        return self.network.endpoint(name)

    def probe(self, cells: Sequence[Cell], timeout: Optional[float] = None) -> list[str]:
        probes = []
        for cell in cells:
            src, dst = self.endpoint(cell.src), self.endpoint(cell.dst)
            probes.append(Probe(src.netns, dst.address(cell.family), cell.port, cell.protocol, cell.family))
        return self.prober.run(probes, timeout)

    def check(self, tables: Iterable[Table]) -> list[CellResult]:
        """Probe every cell. A cell that must connect but timed out is probed
        again with a longer timeout: silence can come from a busy machine,
        while a reset, an ICMP error or an answer cannot."""
        expected = table_cells(tables)
        cells = list(expected)
        got = dict(zip(cells, self.probe(cells)))
        again = [c for c in cells if expected[c] and got[c] == TIMEOUT]
        if again:
            got.update(zip(again, self.probe(again, RETRY_TIMEOUT)))
        return [CellResult(c, expected[c], got[c]) for c in cells]

    # -- inspection -------------------------------------------------------------------

    def node_exec(self, node: str, argv: Sequence[str], stdin: Optional[str] = None,
                  timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a command inside a node's network namespace."""
        return subprocess.run(netns.exec_argv(self.network.node_ns(node), list(argv)), input=stdin,
                              capture_output=True, text=True, timeout=timeout)

    def namespaces(self) -> list[str]:
        return self.network.namespaces()
