"""Watched caches of the API objects a cycle needs (the --watch data source),
and the trigger that runs a cycle soon after one of them changes.

Listing every pod from every node each interval costs the API server a full
read per node per interval. Here each kind is listed once, then kept current
from a watch stream, so a cycle reads a local copy: an idle cycle costs the
API server nothing. What the steady state costs is one watch request per
kind per watch period (240-360 s) and the changes themselves.

Staying correct, per kind (one WatchCache, one thread, one HTTP session):

- list, keep the List's resourceVersion, then watch from it; apply ADDED,
  MODIFIED and DELETED by namespace/name and move the resourceVersion with
  every event (a BOOKMARK moves only the resourceVersion);
- when the server ends the stream (its timeoutSeconds) or the connection
  breaks, watch again from the last resourceVersion: nothing is missed and
  nothing is listed again;
- when the server answers 410 Gone (HTTP status or ERROR event: that
  resourceVersion is no longer in its history), or sends a line that is not
  a watch event, what was missed is unknown: list again, and replace the
  cache in one step when the new list is complete;
- failures are retried with a doubling, jittered delay (0.5 s up to 30 s).

The admin policy kinds are CustomResourceDefinitions a cluster may lack. A
404 on one means "not served": its cache holds nothing, counts as in sync,
and lists again every minute (`recheck`); a served kind that answers 404
(its definition was deleted: the server ends its watch) drops its objects.
The Nodes, which only `nodes` peers need, are listed and watched only
while a served admin policy has such a peer (Node objects change often and
are large; a cluster of a thousand nodes would otherwise send each agent
every Node's status updates). When a `nodes` peer appears, the cycles
enforce the admin policies as they were until the Nodes are listed.

Failing safe: snapshot() raises ApiError, so that the cycle writes nothing,
until every kind has completed its first list, and when a kind has been out
of sync (no established watch or completed list) for longer than
`stale_after` seconds. Within that bound a cycle enforces the last state
seen, as the rules in force would stay in poll mode while the API is
unreachable, and repairs drift in the kernel meanwhile. The daemon passes
three intervals, so a node cut off from the API fails its cycles after three
intervals and /healthz says so three intervals later. A server that keeps a
connection open but sends nothing is noticed only when the read timeout
(the watch's timeoutSeconds plus the client's read timeout) runs out.

Changes are reported to `on_change(seen)`, `seen` being the time.monotonic()
at which the change arrived, only when what the object means to enforcement
changed (lib/objects.py parses it differently): a pod's status heartbeat or
a new annotation runs no cycle. The first list counts as a change, so that a
cycle follows at once. The cache holds the objects as the API sent them,
less what nothing here reads: ClusterCache trims each object as it arrives
to the fields the program parses (lib/api_fields.py), a WatchCache without
`trim` drops metadata.managedFields (server-side apply bookkeeping, often the
larger half of an object).
"""
from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any, Callable, Optional, TypeVar

from lib import api_fields, logs, objects
from lib.kubeapi import (ADMIN_NETWORK_POLICIES, ADMIN_RESOURCES, BASELINE_ADMIN_NETWORK_POLICIES,
                         NAMESPACES, NETWORK_POLICIES, NODES, PODS, AdminApiLog, ApiClient,
                         ApiConfig, ApiError, ClusterObjects, WatchEventError, WatchStream)
from lib.model import ADMIN, BASELINE

WATCH_SECONDS = 240.0          # the server ends a watch after this, times 1 to 1.5 (jitter)
RETRY = (0.5, 30.0)            # first and longest delay between failed attempts
STALE_AFTER = 30.0             # seconds out of sync before snapshot() refuses
MIN_HEALTHY_STREAM = 0.5       # a stream that ends sooner, empty, counts as a failure
RECHECK = 60.0                 # seconds between asks for a kind the API server does not serve

R = TypeVar("R")


class WatchCache:
    """The objects of one collection (`path`), kept by list-then-watch in a
    background thread. `client` is used by this cache only.

    `meaning(obj)` is what a change must alter to be reported (None: any
    ADDED, MODIFIED or DELETED is); `on_change(seen)` is called from the
    cache's thread; `trim(obj)` is what is kept of each object.

    An `optional` collection (a CustomResourceDefinition the cluster may not
    have) that answers 404 is not served: the cache then holds nothing, is
    in sync, and asks again every `recheck` seconds; one that stops being
    served drops its objects. A cache made with `enabled=False` asks
    nothing until enable(True). `on_served()` is called from the cache's
    thread when `served` (the cache holds the live collection) changes,
    before the new state is reported as synced.
    """

    def __init__(self, client: ApiClient, path: str, *,
                 meaning: Optional[Callable[[dict], Any]] = None,
                 on_change: Optional[Callable[[float], None]] = None,
                 trim: Optional[Callable[[Any], Any]] = None,
                 watch_seconds: float = WATCH_SECONDS, jitter: float = 0.5,
                 retry: tuple[float, float] = RETRY, stale_after: float = STALE_AFTER,
                 optional: bool = False, recheck: float = RECHECK,
                 on_served: Optional[Callable[[], None]] = None, enabled: bool = True):
        if watch_seconds < 1:
            raise ValueError("watch_seconds must be >= 1")
        self.client = client
        self.path = path
        self.meaning = meaning
        self.on_change = on_change
        self.trim = trim or _without_managed_fields
        self.watch_seconds = watch_seconds
        self.jitter = jitter
        self.retry = retry
        self.stale_after = stale_after
        self.optional = optional
        self.recheck = recheck
        self.on_served = on_served
        self._served = False
        self._enabled = threading.Event()
        if enabled:
            self._enabled.set()
        self._wake = threading.Event()              # an enable(), disable or stop for the thread
        self._lock = threading.Lock()
        self._items: dict[str, dict] = {}
        self._keys: Optional[list[str]] = None       # sorted, while the key set holds
        self._values: Optional[list[dict]] = None    # in key order, while nothing changes
        self._version = ""
        self._synced = threading.Event()
        self._out_since: Optional[float] = None
        self._last_error: Optional[str] = None
        self._stop = threading.Event()
        self._stream: Optional[WatchStream] = None
        self._thread: Optional[threading.Thread] = None

    def __repr__(self) -> str:
        return f"WatchCache({self.path!r}, resourceVersion={self.resource_version!r})"

    # -- reading ---------------------------------------------------------

    @property
    def resource_version(self) -> str:
        """Where the next watch resumes: the last list's, event's or bookmark's."""
        with self._lock:
            return self._version

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    def wait_synced(self, timeout: float) -> bool:
        return self._synced.wait(timeout)

    @property
    def served(self) -> bool:
        """Whether the cache holds the live collection (not while disabled, nor
        while an optional collection is not served)."""
        with self._lock:
            return self._served

    @property
    def failing(self) -> bool:
        """Whether the last attempt to list or watch failed."""
        with self._lock:
            return self._last_error is not None

    def items(self) -> list[dict]:
        """The objects in namespace/name order, as the API lists them, or
        ApiError while the cache cannot be trusted (see the module docstring);
        none while an optional collection is not served."""
        return self.contents()[1]

    def contents(self) -> tuple[bool, list[dict]]:
        """(served, items) of one moment; ApiError as items() raises it."""
        with self._lock:
            if not self._synced.is_set():
                raise ApiError(f"{self.path}: watch cache not filled yet: the first list is not "
                               f"complete{self._cause()}", path=self.path)
            if not self._served:
                return False, []
            if self._out_since is not None:
                age = time.monotonic() - self._out_since
                if age > self.stale_after:
                    raise ApiError(f"{self.path}: watch cache out of sync for {age:.0f} s (limit "
                                   f"{self.stale_after:g} s){self._cause()}", path=self.path)
            if self._values is None:
                if self._keys is None:
                    self._keys = sorted(self._items)
                self._values = [self._items[k] for k in self._keys]
            return True, list(self._values)

    def cost(self) -> tuple[int, int]:
        """Requests made and body bytes received, over the cache's life."""
        return self.client.request_count, self.client.byte_count

    def _cause(self) -> str:
        return f"; last error: {self._last_error}" if self._last_error else ""

    # -- lifecycle -------------------------------------------------------

    def start(self) -> "WatchCache":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"watch {self.path}", daemon=True)
            self._thread.start()
        return self

    def request_stop(self) -> None:
        """Ask the thread to end and cut its stream; stop() also waits for it."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            stream = self._stream
        if stream is not None:
            stream.close()

    def enable(self, on: bool) -> None:
        """Keep the collection (list, then watch), or stop keeping it: a
        disabled cache asks nothing, holds nothing and is not synced, so that
        nothing reads it as an empty collection."""
        with self._lock:
            if on == self._enabled.is_set():
                return
            had = bool(self._items)
            self._synced.clear()
            if on:
                self._enabled.set()
                self._out_since = self._last_error = None
            else:
                self._enabled.clear()
                self._items, self._keys, self._values, self._version = {}, None, None, ""
                self._served = False
            stream = self._stream
        if not on and stream is not None:
            stream.close()
        self._wake.set()
        if not on and had:
            self._notify(time.monotonic())

    def stop(self, timeout: float = 1.0) -> bool:
        """End the thread; whether it ended within `timeout`. A thread still
        waiting on an unresponsive server ends by its request timeout and
        changes nothing after stop()."""
        self.request_stop()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        self.client.close()
        return True

    # -- the thread ------------------------------------------------------

    def _run(self) -> None:
        need_list, failures = True, 0
        while not self._stop.is_set():
            if not self._enabled.is_set():
                self._wake.wait()
                self._wake.clear()
                need_list, failures = True, 0
                continue
            gone = False
            try:
                if need_list:
                    self._relist()
                    need_list = False
                if self._watch():                 # only a healthy stream ends a run of failures
                    failures = 0
                    continue
                failures += 1
                cause = "the stream ended at once, empty"
            except WatchEventError as exc:        # unknown what was missed: list again
                need_list, failures, cause = True, failures + 1, str(exc)
            except ApiError as exc:
                if self.optional and exc.status == 404:
                    self._not_served()            # no such collection (now): ask again later
                    self._stop.wait(self.recheck)
                    need_list, failures = True, 0
                    continue
                if exc.status == 410:             # resourceVersion too old: list again
                    need_list = gone = True
                failures, cause = failures + 1, str(exc)
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any surprise
                need_list, failures, cause = True, failures + 1, f"{type(exc).__name__}: {exc}"
                logs.get().exception(f"watch {self.path}: unexpected error",
                                     extra={"event": "watch-crash", "path": self.path})
            if self._stop.is_set():
                break
            if not self._enabled.is_set():
                continue                          # disabled meanwhile: its stream was cut for that
            self._fell_out(cause)
            # a first 410 or bad event is answered by a list at once; every
            # other failure, and a repeated one, waits
            delay = 0.0 if need_list and failures == 1 and self.synced else self._delay(failures)
            # a 410 is routine (the server's history moved on); anything else is worth a look
            level = logging.INFO if gone and failures == 1 else logging.WARNING
            logs.get().log(level, f"watch {self.path}: {cause}; "
                                  f"{'listing again' if need_list else 'resuming'} in {delay:.1f} s",
                           extra={"event": "watch-error", "path": self.path,
                                  "relist": need_list, "failures": failures,
                                  "retry_seconds": round(delay, 2)})
            self._stop.wait(delay)

    def _delay(self, failures: int) -> float:
        first, longest = self.retry
        return min(longest, first * 2 ** (max(failures, 1) - 1)) * random.uniform(0.8, 1.2)

    def _fell_out(self, cause: str) -> None:
        with self._lock:
            if self._out_since is None:
                self._out_since = time.monotonic()
            self._last_error = cause

    def _in_sync(self) -> None:
        with self._lock:
            self._out_since = None
            self._last_error = None

    def _relist(self) -> None:
        items, version = self.client.list_versioned(self.path, self.trim)
        fresh: dict[str, dict] = {}
        for i, obj in enumerate(items):
            key = _key(obj)
            if key is None or key in fresh:       # kept, for lib/objects.py to report
                key = f"\0{i}"
            fresh[key] = obj
        with self._lock:
            if self._stop.is_set() or not self._enabled.is_set():
                return
            was_served = self._served
            old, first = self._items, not self._synced.is_set() or not was_served
            self._items, self._keys, self._values = fresh, None, None
            self._version = version
            self._served = True
            self._out_since = self._last_error = None
        if not was_served:
            self._served_changed()
        self._synced.set()
        logs.get().info(f"listed {self.path}: {len(fresh)} objects at resourceVersion {version}",
                        extra={"event": "watch-list", "path": self.path, "objects": len(fresh),
                               "resource_version": version})
        if first or self._differ(old, fresh):
            self._notify(time.monotonic())

    def _not_served(self) -> None:
        """The API server does not serve the collection (404): hold nothing."""
        with self._lock:
            if self._stop.is_set() or not self._enabled.is_set():
                return
            was_served, had = self._served, bool(self._items)
            first = not self._synced.is_set()
            self._items, self._keys, self._values, self._version = {}, None, None, ""
            self._served = False
            self._out_since = self._last_error = None
        if was_served:
            self._served_changed()
        self._synced.set()
        if first or had or was_served:
            self._notify(time.monotonic())

    def _served_changed(self) -> None:
        if self.on_served is None:
            return
        try:
            self.on_served()
        except Exception:  # noqa: BLE001 - a failing listener must not end the watch
            logs.get().exception(f"watch {self.path}: served listener failed",
                                 extra={"event": "watch-listener-error", "path": self.path})

    def _watch(self) -> bool:
        """One watch stream, to its end; whether it was healthy (raises ApiError otherwise)."""
        if not self._enabled.is_set():
            return True                           # disabled while listing: nothing to watch
        timeout = int(self.watch_seconds * (1 + self.jitter * random.random()))
        version = self.resource_version
        stream = self.client.watch(self.path, version, timeout)
        with self._lock:
            self._stream = stream
            cut = self._stop.is_set() or not self._enabled.is_set()
        if cut:
            stream.close()
        self._in_sync()
        opened = time.monotonic()
        events = 0
        try:
            with stream:
                for event in stream:
                    if self._stop.is_set():
                        return True
                    events += 1
                    self._apply(event)
        finally:
            with self._lock:
                self._stream = None
        return events > 0 or time.monotonic() - opened >= MIN_HEALTHY_STREAM

    def _apply(self, event: dict) -> None:
        kind, obj = event["type"], event["object"]
        metadata = obj.get("metadata")
        version = metadata.get("resourceVersion") if isinstance(metadata, dict) else None
        if not isinstance(version, str) or not version:
            raise WatchEventError(f"GET {self.path} watch: {kind} event without "
                                  "object.metadata.resourceVersion", path=self.path)
        if kind == "BOOKMARK":
            with self._lock:
                self._version = version
            return
        key = _key(obj)
        if key is None:
            raise WatchEventError(f"GET {self.path} watch: {kind} event without "
                                  "object.metadata.name", path=self.path)
        with self._lock:
            if not self._enabled.is_set():
                return                            # disabled: the stream is being cut
            old = self._items.get(key)
            if kind == "DELETED":
                if old is not None:
                    del self._items[key]
                    self._keys = None
                new = None
            else:
                if old is None:
                    self._keys = None
                self._items[key] = new = self.trim(obj)
            self._values = None
            self._version = version
        if self._means(old) != self._means(new):
            self._notify(time.monotonic())

    def _means(self, obj: Optional[dict]) -> Any:
        if obj is None:
            return None
        return obj if self.meaning is None else self.meaning(obj)

    def _differ(self, old: dict, new: dict) -> bool:
        if old.keys() != new.keys():
            return True
        return any(self._means(old[k]) != self._means(new[k]) for k in new
                   if _version_of(old[k]) != _version_of(new[k]) or not _version_of(new[k]))

    def _notify(self, seen: float) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(seen)
        except Exception:  # noqa: BLE001 - a failing listener must not end the watch
            logs.get().exception(f"watch {self.path}: change listener failed",
                                 extra={"event": "watch-listener-error", "path": self.path})


def _without_managed_fields(obj: Any) -> Any:
    metadata = obj.get("metadata") if isinstance(obj, dict) else None
    if isinstance(metadata, dict) and "managedFields" in metadata:
        metadata = {k: v for k, v in metadata.items() if k != "managedFields"}
        return {**obj, "metadata": metadata}
    return obj


def _version_of(obj: Any) -> Any:
    metadata = obj.get("metadata") if isinstance(obj, dict) else None
    return metadata.get("resourceVersion") if isinstance(metadata, dict) else None


def _key(obj: Any) -> Optional[str]:
    """namespace/name (name alone for cluster objects), or None without a usable name."""
    metadata = obj.get("metadata") if isinstance(obj, dict) else None
    if not isinstance(metadata, dict):
        return None
    name, namespace = metadata.get("name"), metadata.get("namespace") or ""
    if not isinstance(name, str) or not name or not isinstance(namespace, str):
        return None
    return f"{namespace}/{name}" if namespace else name


class ClusterCache:
    """Namespaces, Pods and NetworkPolicies; the admin policy kinds where the
    API server serves them (asked for again every `recheck` seconds while it
    does not); and the Nodes, for `nodes` peers, only while it serves one of
    them: one WatchCache each. snapshot() stands in for
    ApiClient.list_cluster() in a cycle."""

    KINDS = (("namespaces", NAMESPACES, "Namespace", objects.parse_namespace),
             ("pods", PODS, "Pod", objects.parse_pod),
             ("policies", NETWORK_POLICIES, "NetworkPolicy", objects.parse_policy))
    # name, path, kind, meaning, and the resource as ClusterObjects.admin_api names it
    ADMIN_KINDS = (("admin_policies", ADMIN_NETWORK_POLICIES, ADMIN, objects.parse_admin_policy,
                    ADMIN_RESOURCES[0]),
                   ("baseline_policies", BASELINE_ADMIN_NETWORK_POLICIES, BASELINE,
                    objects.parse_baseline_policy, ADMIN_RESOURCES[1]))

    def __init__(self, config: ApiConfig, *, on_change: Optional[Callable[[float], None]] = None,
                 stale_after: float = STALE_AFTER, watch_seconds: float = WATCH_SECONDS,
                 jitter: float = 0.5, retry: tuple[float, float] = RETRY,
                 timeout=(3.05, 10.0), page_size: int = 500, recheck: float = RECHECK):
        def cache(path: str, kind: str, meaning: Callable, **extra) -> WatchCache:
            return WatchCache(ApiClient(config, timeout=timeout, page_size=page_size), path,
                              meaning=meaning, on_change=on_change, trim=api_fields.BY_KIND[kind],
                              watch_seconds=watch_seconds, jitter=jitter, retry=retry,
                              stale_after=stale_after, **extra)

        def admin_changed(when: float) -> None:
            self._update_nodes()
            if on_change is not None:
                on_change(when)

        self.caches = {name: cache(path, kind, meaning) for name, path, kind, meaning in self.KINDS}
        for name, path, kind, meaning, _ in self.ADMIN_KINDS:
            self.caches[name] = cache(path, kind, meaning, optional=True, recheck=recheck,
                                      on_served=self._update_nodes)
            self.caches[name].on_change = admin_changed
        self.caches["nodes"] = cache(NODES, "Node", objects.parse_node, enabled=False)
        self.admin_api_log = AdminApiLog()
        self._lock = threading.Lock()
        self._reported = (0, 0)
        self._last_admin: Optional[tuple] = None     # (served, admin lists, nodes) last enforced

    def __enter__(self) -> "ClusterCache":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "ClusterCache":
        for cache in self.caches.values():
            cache.start()
        return self

    def stop(self, timeout: float = 1.0) -> bool:
        """End every thread; whether all ended within `timeout`."""
        for cache in self.caches.values():
            cache.request_stop()
        deadline = time.monotonic() + timeout
        return all([cache.stop(max(0.0, deadline - time.monotonic()))
                    for cache in self.caches.values()])

    def _nodes_needed(self) -> Optional[bool]:
        """Whether a served admin policy has a `nodes` peer; None while an
        admin cache cannot tell (not listed yet, or out of sync)."""
        found = False
        for name, *_ in self.ADMIN_KINDS:
            try:
                items = self.caches[name].contents()[1]
            except ApiError:
                return None
            found = found or any(api_fields.names_nodes(o) for o in items)
        return found

    def _update_nodes(self) -> None:
        """Keep the Nodes while a served admin policy has a `nodes` peer."""
        with self._lock:
            needed = self._nodes_needed()
            if needed is not None:
                self.caches["nodes"].enable(needed)

    def wait_synced(self, timeout: float) -> bool:
        """Whether every kind completed its first list within `timeout` (the
        Nodes only when a `nodes` peer needs them)."""
        deadline = time.monotonic() + timeout
        if not all(cache.wait_synced(max(0.0, deadline - time.monotonic()))
                   for name, cache in self.caches.items() if name != "nodes"):
            return False
        self._update_nodes()
        return (self._nodes_needed() is False
                or self.caches["nodes"].wait_synced(max(0.0, deadline - time.monotonic())))

    def snapshot(self) -> ClusterObjects:
        """The cached objects, with what the API cost since the last snapshot
        returned (0 and 0 while nothing changed), or ApiError.

        A `nodes` peer must never be read as matching no node: while the
        Nodes it needs are not listed yet, the admin policies are given as
        the last snapshot gave them (none before the first); if listing the
        Nodes fails, the snapshot fails."""
        namespaces = self.caches["namespaces"].items()
        pods = self.caches["pods"].items()
        policies = self.caches["policies"].items()
        admin: dict[str, list] = {}
        served = set()
        for name, _, _, _, resource in self.ADMIN_KINDS:
            is_served, admin[name] = self.caches[name].contents()
            if is_served:
                served.add(resource)
        nodes: list = []
        if any(api_fields.names_nodes(o) for items in admin.values() for o in items):
            self._update_nodes()
            try:
                nodes = self.caches["nodes"].items()
            except ApiError:
                if self.caches["nodes"].failing or self._last_admin is None:
                    raise
                served, admin, nodes = self._last_admin
        self._last_admin = (served, admin, nodes)
        self.admin_api_log.update(frozenset(served))
        costs = [cache.cost() for cache in self.caches.values()]
        spent = (sum(c[0] for c in costs), sum(c[1] for c in costs))
        reported, self._reported = self._reported, spent
        return ClusterObjects(namespaces, pods, policies,
                              requests=spent[0] - reported[0], bytes=spent[1] - reported[1],
                              admin_policies=admin["admin_policies"],
                              baseline_policies=admin["baseline_policies"], nodes=nodes,
                              admin_api=frozenset(served))


class Trigger:
    """Changes seen by the caches, handed to the loop: a cycle soon after a
    change, at most one per `min_gap` seconds, and `settle` seconds after
    the first change so that a burst (one `kubectl apply` of many objects)
    is enforced by one cycle."""

    def __init__(self, min_gap: float = 1.0, settle: float = 0.1):
        self.min_gap = min_gap
        self.settle = settle
        self._cond = threading.Condition()
        self._pending: Optional[float] = None      # earliest change not yet taken
        self._fired = float("-inf")                # when wait() last returned a change

    def notify(self, seen: Optional[float] = None) -> None:
        """A change seen at `seen` (time.monotonic(); default now). Any thread."""
        seen = time.monotonic() if seen is None else seen
        with self._cond:
            if self._pending is None or seen < self._pending:
                self._pending = seen
            self._cond.notify_all()

    @property
    def pending(self) -> Optional[float]:
        with self._cond:
            return self._pending

    def wait(self, timeout: float) -> Optional[float]:
        """Up to `timeout` seconds for a change due for a cycle; the earliest
        pending change time, or None. Returns a change at most once per
        min_gap, whether or not it is taken, so a loop that cannot run a
        cycle yet does not spin."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                if self._pending is not None:
                    due = max(self._pending + self.settle, self._fired + self.min_gap)
                    if now >= due:
                        self._fired = now
                        return self._pending
                else:
                    due = deadline
                if now >= deadline:
                    return None
                self._cond.wait(min(due, deadline) - now)

    def take(self) -> Optional[float]:
        """Clear the pending changes for a cycle about to fetch; the earliest
        one's time, or None. Changes arriving later stay for the next cycle."""
        with self._cond:
            pending, self._pending = self._pending, None
            return pending

    def run(self, cycle: Callable[[], R], observe: Optional[Callable[[float], None]] = None) -> R:
        """Run `cycle` (returning a report with `ok`) for the changes pending
        now. When it succeeds, `observe` gets the seconds from the earliest of
        them to now (their rules live: kpm_time_to_enforce_seconds); when it
        fails they stay pending, with their time, for the next attempt."""
        seen = self.take()
        report = cycle()
        if seen is not None:
            if getattr(report, "ok", False):
                if observe is not None:
                    observe(time.monotonic() - seen)
            else:
                self.notify(seen)
        return report
