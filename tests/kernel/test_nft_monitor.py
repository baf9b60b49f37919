"""The loop's idle read on nftables: the table is listed again only after the
kernel announced a change (lib.nft_monitor), and a change is never missed."""
from __future__ import annotations

import subprocess
import time

import pytest

from lib import nft_monitor
from lib.nft_kernel import NftKernel
from lib.nft_plan import diff
from tests.kernel.test_nft_kernel import E4, FOREIGN, nft
from tests.unit.fixtures.nft.our_table import DESIRED


@pytest.fixture
def watched(netns, monkeypatch):
    monkeypatch.setattr(nft_monitor, "STARTUP_GRACE", 0.0)
    k = NftKernel(netns=netns)
    k.apply(diff(DESIRED, k.read()))
    k.watch_changes(max_age=60)
    time.sleep(0.3)                       # nft monitor has subscribed
    yield k
    k.close()


def settled(k: NftKernel, before: int, timeout: float = 5.0) -> None:
    """Reads until one lists the table: the announcement reached the monitor."""
    deadline = time.monotonic() + timeout
    while k.listings == before:
        assert time.monotonic() < deadline, "the change was never announced"
        k.read()
        time.sleep(0.05)


def test_idle_reads_list_nothing_and_a_flushed_chain_is_seen(watched):
    k = watched
    first = k.read()
    listed = k.listings
    for _ in range(5):
        assert k.read() == first
    assert k.listings == listed                          # idle: no listing at all
    nft(k.netns, "flush", "chain", "inet", "kube-policy-manager", E4)
    settled(k, listed)
    assert k.read().chain_map()[E4].rules == ()          # the drift, as the kernel holds it
    assert diff(DESIRED, k.read(), table_expected=True).changes


def test_another_tables_changes_list_nothing_and_a_deleted_table_is_seen(watched):
    k = watched
    k.read()
    listed = k.listings
    nft(k.netns, "-f", "-", stdin=FOREIGN)               # someone else's table
    subprocess.run(["ip", "netns", "exec", k.netns, "iptables", "-A", "INPUT", "-s", "192.0.2.1",
                    "-j", "ACCEPT"], check=True, timeout=30)       # iptables-nft's table
    time.sleep(0.5)                                      # announced by now
    k.read()
    assert k.listings == listed                          # our listing still holds
    nft(k.netns, "delete", "table", "inet", "kube-policy-manager")
    settled(k, listed)
    assert not k.read().exists
    k.apply(diff(DESIRED, k.read(), table_expected=True))   # our own write is announced too
    listed = k.listings
    settled(k, listed)
    assert k.read().exists


def test_a_deleted_element_is_seen(watched):
    k = watched
    before = k.read()
    listed = k.listings
    s = next(s for s in before.sets if s.elements)
    element = sorted(s.elements)[0]
    nft(k.netns, "delete", "element", "inet", "kube-policy-manager", s.name, "{", element, "}")
    settled(k, listed)
    assert element not in k.read().set_map()[s.name].elements


def test_the_table_is_listed_again_after_max_age_and_when_the_monitor_ends(watched):
    k = watched
    k.changes.max_age = 0.3
    k.read()
    listed = k.listings
    time.sleep(0.4)
    k.read()
    assert k.listings == listed + 1
    k.changes.max_age = 60
    k.changes._process.kill()                            # the monitor died
    k.changes._process.wait()
    k.read()
    k.read()
    assert k.listings == listed + 3


def test_a_listing_begun_in_the_startup_grace_is_not_trusted(netns, monkeypatch):
    monkeypatch.setattr(nft_monitor, "STARTUP_GRACE", 30.0)
    k = NftKernel(netns=netns).watch_changes()
    try:
        k.read()
        k.read()
        assert k.listings == 2
    finally:
        k.close()
