"""Each node's own addresses, as its pods report them.

The model has no Node objects (the program does not list them), yet a
connection from a node to its own pods is always allowed, so `explain` must
recognise a node's address. Every pod states its node's address in
`status.hostIP` / `status.hostIPs`, and a host-network pod's own addresses
are its node's; that is enough, and needs no extra API permission.
"""
from __future__ import annotations

import ipaddress
from typing import Any, Iterable, Iterator


def _addresses(value: Any) -> Iterator[str]:
    """Canonical text of a valid address; anything else is skipped (objects.py
    reports malformed pods, this only reads what it can)."""
    if isinstance(value, str):
        try:
            yield str(ipaddress.ip_address(value))
        except ValueError:
            return


def _listed(entries: Any) -> Iterator[str]:
    if isinstance(entries, list):
        for entry in entries:
            if isinstance(entry, dict):
                yield from _addresses(entry.get("ip"))


def from_pods(pods: Iterable[Any]) -> dict[str, tuple[str, ...]]:
    """Node name -> its addresses (sorted, IPv4 first), from raw API Pod objects."""
    found: dict[str, set[str]] = {}
    for pod in pods:
        if not isinstance(pod, dict):
            continue
        spec = pod.get("spec") if isinstance(pod.get("spec"), dict) else {}
        status = pod.get("status") if isinstance(pod.get("status"), dict) else {}
        node = spec.get("nodeName")
        if not isinstance(node, str) or not node:
            continue
        addrs = set(_addresses(status.get("hostIP"))) | set(_listed(status.get("hostIPs")))
        if spec.get("hostNetwork") is True:
            addrs |= set(_addresses(status.get("podIP"))) | set(_listed(status.get("podIPs")))
        if addrs:
            found.setdefault(node, set()).update(addrs)
    return {node: tuple(sorted(addrs, key=lambda a: (ipaddress.ip_address(a).version,
                                                     ipaddress.ip_address(a))))
            for node, addrs in sorted(found.items())}
