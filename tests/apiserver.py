"""A small Kubernetes-shaped API server for tests, the lab and the benchmark.

It is a real HTTP(S) server (stdlib, one thread per connection) that serves
Namespaces, Pods, NetworkPolicies, Nodes, and AdminNetworkPolicies and
BaselineAdminNetworkPolicies (switched on and off at runtime, as a cluster
installs or removes their CustomResourceDefinitions) the way kube-apiserver
shapes them, so the client is exercised over real sockets, TLS and pagination
instead of through mocks.

    from tests.apiserver import ApiServer

    with ApiServer(namespaces=[...], pods=[...], policies=[...]) as api:
        client = ApiClient(load_config(api_server=api.url))
        api.set_state(pods=[...])          # atomic switch, new resourceVersion
        api.set_admin_api(True)            # serve the admin policy kinds (404 until then)
        api.fail_next(500)                 # fault injection
        api.drop_watches()                 # cut the open watch streams
        api.requests                       # what was asked, Authorization removed

Interface: ApiServer(host, port | sock=, tls_cert=, tls_key=, client_ca=,
token=, namespaces=, pods=, policies=, nodes=, admin_policies=, baseline_policies=,
admin_api=, history=, bookmark_seconds=, watch_seconds=, too_old_watch=); .url,
.address, .start(), .stop(), context manager; .set_state(), .resource_version,
.compact(); .set_admin_api(), .admin_api; .set_tokens(); faults
.fail_next(), .fail_page(), .respond_next(), .malformed_next(), .hang_next()
(each with watch=True/False to match only watch / only other requests),
.expire_continue(), .clear_faults(); faults of open watch streams
.drop_watches(), .expire_watches(), .garbage_watches(), .silence_watches();
observation .requests (list of Request), .clear_requests(), .bytes_sent,
.open_watches(), .tls_errors.
TLS material for it: make_ca() and issue_cert() (the openssl command).

Served paths (GET only):

    /api/v1/namespaces[/NAME]
    /api/v1/pods,  /api/v1/namespaces/NS/pods[/NAME]
    /apis/networking.k8s.io/v1/networkpolicies,
    /apis/networking.k8s.io/v1/namespaces/NS/networkpolicies[/NAME]
    /api/v1/nodes[/NAME]
    /apis/policy.networking.k8s.io/v1alpha1/adminnetworkpolicies[/NAME],
    /apis/policy.networking.k8s.io/v1alpha1/baselineadminnetworkpolicies[/NAME]
        (while served, see set_admin_api(); otherwise 404 with a NotFound Status,
        as for a cluster without their CustomResourceDefinitions)
    /version, /healthz, /readyz

What it does like kube-apiserver: `XList` bodies with apiVersion, kind,
metadata.resourceVersion and items (items without apiVersion/kind, as the
real server sends them); items ordered by namespace/name; `limit` and
opaque `continue` tokens that keep serving the snapshot the list began on
(continue plus resourceVersion is refused with 400, a snapshot older than
`history` state changes answers 410 Expired); Status bodies for errors;
uid and resourceVersion filled when missing (an object keeps its
resourceVersion while its content does not change); the
`kubernetes.io/metadata.name` label on Namespaces; watches of the list
paths (below). What it does not: label and field selectors (refused with
400, never ignored), watches of one object, writes, any other defaulting.
`resourceVersion=0` is accepted and `limit` is honoured with it, so
pagination is exercised; a real API server answering from its watch cache
may instead send everything in one page, which clients handle the same way
(no continue token).

Watch (`?watch=1` or `watch=true` on a list path): a 200 answer with chunked
transfer encoding, one JSON event a line, `{"type": ..., "object": {...}}`,
objects with apiVersion and kind. Events come from set_state(): each call
compares the new objects of each kind given with the old (by namespace/name)
and records ADDED, MODIFIED (content or resourceVersion changed) and DELETED
(the last state, with the deletion's resourceVersion) at the new
resourceVersion. A watch from resourceVersion R sends every recorded event
after R, then the new ones as they come; R empty or "0" first sends the
current objects as ADDED. With `allowWatchBookmarks=true` a BOOKMARK (an
object of the kind with only metadata.resourceVersion) follows every
`bookmark_seconds`. The stream ends after `timeoutSeconds` (default
`watch_seconds`). Events are kept as long as the snapshots for continue
tokens (`history` state changes, or until compact()); a watch from an older
R gets 410 Expired: as an ERROR event holding a Status, as kube-apiserver's
watch cache answers, or with too_old_watch="status" as an HTTP 410. A watch
request is logged when it starts, and its entry gets its byte count when it
ends. Explicit metadata.resourceVersion values given to set_state() are
served as given, so a watch resuming from them is not meaningful.

The admin kinds keep their objects while they are not served (set_state()
changes them all the same); a watch of one that stops being served ends,
as kube-apiserver ends the watches of a CustomResourceDefinition that is
deleted, and asking again then gets the 404.
"""
from __future__ import annotations

import base64
import binascii
import bisect
import dataclasses
import ipaddress
import json
import logging
import os
import re
import secrets
import select
import socket
import ssl
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import BaseServer
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger(__name__)

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


@dataclass(frozen=True)
class _Resource:
    name: str            # plural, as in the path
    kind: str
    api_version: str
    prefix: str          # "/api/v1" or "/apis/<group>/<version>"
    namespaced: bool


_RESOURCES = {
    r.name: r for r in (
        _Resource("namespaces", "Namespace", "v1", "/api/v1", False),
        _Resource("pods", "Pod", "v1", "/api/v1", True),
        _Resource("networkpolicies", "NetworkPolicy", "networking.k8s.io/v1",
                  "/apis/networking.k8s.io/v1", True),
        _Resource("nodes", "Node", "v1", "/api/v1", False),
        _Resource("adminnetworkpolicies", "AdminNetworkPolicy", "policy.networking.k8s.io/v1alpha1",
                  "/apis/policy.networking.k8s.io/v1alpha1", False),
        _Resource("baselineadminnetworkpolicies", "BaselineAdminNetworkPolicy",
                  "policy.networking.k8s.io/v1alpha1", "/apis/policy.networking.k8s.io/v1alpha1",
                  False),
    )
}
ADMIN_RESOURCES = ("adminnetworkpolicies", "baselineadminnetworkpolicies")
_PREFIXES = tuple(dict.fromkeys(r.prefix for r in _RESOURCES.values()))


@dataclass(frozen=True)
class Request:
    """One answered request, as the server saw it (the Authorization header is never kept)."""
    method: str
    path: str
    query: str                     # raw query string
    params: dict                   # query parameter -> last value
    headers: dict                  # request headers minus Authorization
    auth: str                      # "none" (no header), "accepted", "rejected",
                                   # "unchecked" (a header, but no token is required)
    status: int
    page: Optional[int] = None     # 1-based page of a list request
    response_bytes: int = 0        # body bytes sent


@dataclass(frozen=True)
class CertFiles:
    cert: str
    key: str


@dataclass
class _Fault:
    action: str                    # "status", "body", "hang", "gone"
    count: int
    path: Optional[str] = None
    page: Optional[int] = None
    continue_only: bool = False
    watch: Optional[bool] = None   # True: watch requests only, False: others only
    status: int = 500
    body: bytes = b""
    content_type: str = "application/json"
    seconds: float = 0.0


@dataclass(frozen=True)
class _Item:
    key: str                       # "ns/name" or "name": the order kube-apiserver lists in
    namespace: str
    name: str
    content: str                   # JSON of the object without resourceVersion, to spot changes
    resource_version: str
    body: bytes                    # JSON of the object as served in a list


@dataclass(frozen=True)
class _Snapshot:
    rv: int
    items: dict                    # resource name -> tuple[_Item, ...], sorted by key


@dataclass(frozen=True)
class _Event:
    rv: int                        # the state change that made it
    resource: str
    namespace: str
    line: bytes                    # the event as sent: JSON and a newline


@dataclass(eq=False)
class _Stream:
    """One open watch, and what a test asked it to do next."""
    path: str
    since: int = 0                                  # every event up to this rv is sent
    actions: list = field(default_factory=list)     # of _StreamAction
    sent: int = 0                                   # body bytes so far


@dataclass(eq=False)
class _StreamAction:
    action: str                    # "drop", "expire", "garbage", "silence"
    data: bytes = b""
    done: threading.Event = field(default_factory=threading.Event)


def _event_line(kind: str, obj: bytes) -> bytes:
    return b'{"type":"' + kind.encode() + b'","object":' + obj + b"}\n"


def _typed(resource: "_Resource", body: bytes) -> bytes:
    """An object's JSON with apiVersion and kind in front, as watch events carry it."""
    head = json.dumps({"apiVersion": resource.api_version, "kind": resource.kind},
                      separators=(",", ":")).encode()
    return head[:-1] + (b"," + body[1:] if body != b"{}" else b"}")


def _too_old_message(since: int, floor: int) -> str:
    return f"too old resource version: {since} ({floor + 1})"


def _too_old(since: int, floor: int) -> bytes:
    return _status(410, "Expired", _too_old_message(since, floor))


def _peer_gone(conn, wait: float = 0.0) -> bool:
    """Whether the client closed its end (a watch client never sends more)."""
    try:
        readable, _, _ = select.select([conn], [], [], wait)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _status(code: int, reason: str, message: str) -> bytes:
    return json.dumps({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    }, separators=(",", ":")).encode()


def _non_negative(text: str, parse: Callable[[str], Any]) -> Any:
    """The number `text` holds by `parse` (int or float); None when it holds
    none, or a negative one, which no query parameter of ours accepts."""
    try:
        value = parse(text)
    except ValueError:
        return None
    return None if value < 0 else value


def _invalid(param: str, text: str) -> tuple[int, bytes]:
    """The answer to a query parameter whose value cannot be used."""
    return 400, _status(400, "BadRequest", f"{param}: invalid value {text!r}")


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.replace(" ", "")
    except ValueError:
        return "Unknown"


def _encode_continue(data: dict) -> str:
    raw = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_continue(token: str) -> Optional[dict]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
    except (ValueError, binascii.Error):
        return None
    if not isinstance(data, dict) or not all(k in data for k in ("r", "ns", "rv", "i", "p")):
        return None
    return data


def _format_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


class _HttpServer(ThreadingHTTPServer):
    """ThreadingHTTPServer on a socket made elsewhere, with the TLS handshake done
    in the connection's thread so that a silent client cannot stall accept()."""
    daemon_threads = True

    def __init__(self, sock: socket.socket, owner: "ApiServer"):
        BaseServer.__init__(self, sock.getsockname()[:2], _Handler)
        self.socket = sock
        self.server_name, self.server_port = sock.getsockname()[:2]
        self.owner = owner

    def finish_request(self, request, client_address):
        conn = request
        try:
            # headers and body go out in separate writes: without this, delayed
            # ACKs would add ~40 ms to every keep-alive request
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        tls = self.owner._tls
        if tls is not None:
            request.settimeout(10)
            try:
                conn = tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                self.owner._note_tls_error(f"{client_address[0]}: {exc}")
                return
        self.owner._track(conn, True)
        try:
            self.RequestHandlerClass(conn, client_address, self)
        finally:
            self.owner._track(conn, False)
            if conn is not request:
                conn.close()

    def handle_error(self, request, client_address):
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kpm-test-apiserver"
    timeout = 30                   # an idle keep-alive connection is closed after this

    def do_GET(self):
        self.server.owner._handle(self)

    def _refuse(self):
        self.server.owner._handle(self, method_allowed=False)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _refuse

    def log_message(self, format, *args):
        log.debug("%s " + format, self.address_string(), *args)


JsonObject = Mapping[str, Any]


class ApiServer:
    """A Kubernetes-shaped API server on a real socket; see the module docstring.

    Listen either on (host, port) (port 0 picks a free port) or on `sock`, an
    already bound socket (for example made inside a network namespace); the
    server takes ownership of it and calls listen() on it.

    TLS: give `tls_cert`/`tls_key` (PEM files); with `client_ca` a client
    certificate signed by that CA is required. `token`: when set, requests
    must carry `Authorization: Bearer <token>` or get 401.

    The socket is bound at construction, so `url` is known before start().
    One instance serves once: start(), then stop() (or use `with`).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 sock: Optional[socket.socket] = None,
                 tls_cert: Optional[str] = None, tls_key: Optional[str] = None,
                 client_ca: Optional[str] = None,
                 token: Optional[str] = None,
                 namespaces: Iterable[JsonObject] = (), pods: Iterable[JsonObject] = (),
                 policies: Iterable[JsonObject] = (), nodes: Iterable[JsonObject] = (),
                 admin_policies: Iterable[JsonObject] = (),
                 baseline_policies: Iterable[JsonObject] = (),
                 admin_api: Union[bool, Iterable[str]] = False,
                 history: int = 16, bookmark_seconds: float = 60.0,
                 watch_seconds: float = 1800.0, too_old_watch: str = "event"):
        if too_old_watch not in ("event", "status"):
            raise ValueError('too_old_watch must be "event" or "status"')
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)     # a state change, a stream action
        self._events: list[_Event] = []
        self._event_rvs: list[int] = []                      # rv of each event, for bisect
        self._floor = 0                                      # oldest rv a watch may start from
        self._kept_from = 0                                  # events from this rv on are kept
        self._streams: set[_Stream] = set()
        self._bytes_done = 0                                 # body bytes of finished answers
        self.bookmark_seconds = bookmark_seconds
        self.watch_seconds = watch_seconds
        self.too_old_watch = too_old_watch
        self._stopping = threading.Event()
        self._faults: list[_Fault] = []
        self._log: list[Request] = []
        self._tls_errors: list[str] = []
        self._connections: set = set()
        self._tokens: frozenset[str] = frozenset([token]) if token else frozenset()
        self._admin_api = self._served_set(admin_api)
        self._history_size = max(1, history)
        self._history: dict[int, _Snapshot] = {}
        self._snapshot = _Snapshot(0, {name: () for name in _RESOURCES})
        self._thread: Optional[threading.Thread] = None
        self._stopped = False

        self._tls: Optional[ssl.SSLContext] = None
        if tls_cert or tls_key:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(tls_cert, tls_key)
            if client_ca:
                ctx.verify_mode = ssl.CERT_REQUIRED
                ctx.load_verify_locations(client_ca)
            self._tls = ctx
        elif client_ca:
            raise ValueError("client_ca needs tls_cert and tls_key")

        if sock is None:
            sock = self._bind(host, port)
        sock.listen(128)
        self._sock = sock
        self._server = _HttpServer(sock, self)
        try:
            self.set_state(namespaces=namespaces, pods=pods, policies=policies, nodes=nodes,
                           admin_policies=admin_policies, baseline_policies=baseline_policies)
        except Exception:
            sock.close()
            raise

    @staticmethod
    def _bind(host: str, port: int) -> socket.socket:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        except OSError:
            sock.close()
            raise
        return sock

    # -- lifecycle -------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return host, port

    @property
    def url(self) -> str:
        host, port = self.address
        scheme = "https" if self._tls else "http"
        return f"{scheme}://{_format_host(host)}:{port}"

    def start(self) -> "ApiServer":
        if self._stopped:
            raise RuntimeError("ApiServer cannot be restarted; make a new one")
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever,
                                            kwargs={"poll_interval": 0.1},
                                            name=f"apiserver {self.url}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake injected hangs, close open connections and the socket."""
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        with self._changed:
            self._changed.notify_all()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
        with self._lock:
            open_connections = list(self._connections)
        for conn in open_connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server.server_close()

    def __enter__(self) -> "ApiServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- state -----------------------------------------------------------

    @property
    def resource_version(self) -> str:
        return str(self._snapshot.rv)

    def set_state(self, namespaces: Optional[Iterable[JsonObject]] = None,
                  pods: Optional[Iterable[JsonObject]] = None,
                  policies: Optional[Iterable[JsonObject]] = None,
                  nodes: Optional[Iterable[JsonObject]] = None,
                  admin_policies: Optional[Iterable[JsonObject]] = None,
                  baseline_policies: Optional[Iterable[JsonObject]] = None) -> str:
        """Replace the objects of every kind given (None keeps that kind as it is)
        in one step, and return the new resourceVersion.

        Objects are copied; a missing metadata.name (or metadata.namespace for
        Pods and NetworkPolicies) or a duplicate raises ValueError.
        """
        given = {"namespaces": namespaces, "pods": pods,
                 "networkpolicies": policies, "nodes": nodes,
                 "adminnetworkpolicies": admin_policies,
                 "baselineadminnetworkpolicies": baseline_policies}
        with self._lock:
            old = self._snapshot
            rv = old.rv + 1
            items = dict(old.items)
            for name, objects in given.items():
                if objects is not None:
                    items[name] = self._build(_RESOURCES[name], objects, rv, old.items[name])
                    self._record(_RESOURCES[name], old.items[name], items[name], rv)
            snapshot = _Snapshot(rv, items)
            self._snapshot = snapshot
            self._history[rv] = snapshot
            for stale in sorted(self._history)[:-self._history_size]:
                del self._history[stale]
            self._forget_before(min(self._history))
            self._changed.notify_all()
        return str(rv)

    @staticmethod
    def _served_set(served: Union[bool, Iterable[str]]) -> frozenset:
        if isinstance(served, bool):
            return frozenset(ADMIN_RESOURCES) if served else frozenset()
        chosen = frozenset(served)
        if not chosen <= frozenset(ADMIN_RESOURCES):
            raise ValueError(f"admin_api: not admin resources: {sorted(chosen - set(ADMIN_RESOURCES))}")
        return chosen

    @property
    def admin_api(self) -> frozenset:
        """The admin resources served now."""
        with self._lock:
            return self._admin_api

    def set_admin_api(self, served: Union[bool, Iterable[str]]) -> None:
        """Serve both admin kinds (True), neither (False), or those named
        (of ADMIN_RESOURCES). Open watches of a kind no longer served end."""
        chosen = self._served_set(served)
        with self._changed:
            self._admin_api = chosen
            self._changed.notify_all()

    def compact(self) -> str:
        """Forget every older state, as etcd compaction does: a continue token
        or a watch from an older resourceVersion then gets 410 Expired."""
        with self._lock:
            rv = self._snapshot.rv
            self._history = {rv: self._snapshot}
            self._forget_before(rv + 1)
            self._changed.notify_all()
        return str(rv)

    def _forget_before(self, rv: int) -> None:
        """A new watch must start at rv - 1 or later; events older than `rv` are
        dropped, except those an open stream has yet to send."""
        self._floor = max(self._floor, rv - 1)
        keep = min([rv] + [s.since + 1 for s in self._streams if s.since >= 0])
        cut = bisect.bisect_left(self._event_rvs, keep)
        if cut:
            del self._events[:cut], self._event_rvs[:cut]
        self._kept_from = max(self._kept_from, keep)

    def _record(self, resource: _Resource, before: Sequence[_Item], after: Sequence[_Item],
                rv: int) -> None:
        old = {item.key: item for item in before}
        new = {item.key: item for item in after}
        events = []
        for key, item in new.items():
            was = old.get(key)
            if was is None:
                events.append((key, item.namespace, "ADDED", item.body))
            elif was.content != item.content or was.resource_version != item.resource_version:
                events.append((key, item.namespace, "MODIFIED", item.body))
        for key, item in old.items():
            if key not in new:
                obj = json.loads(item.body)
                obj["metadata"]["resourceVersion"] = str(rv)
                events.append((key, item.namespace, "DELETED",
                               json.dumps(obj, separators=(",", ":")).encode()))
        for _, namespace, kind, body in sorted(events):
            self._events.append(_Event(rv, resource.name, namespace,
                                       _event_line(kind, _typed(resource, body))))
            self._event_rvs.append(rv)

    @staticmethod
    def _build(resource: _Resource, objects: Iterable[JsonObject], rv: int,
               previous: Sequence[_Item]) -> tuple[_Item, ...]:
        before = {item.key: item for item in previous}
        built: dict[str, _Item] = {}
        for i, original in enumerate(objects):
            obj = json.loads(json.dumps(original))      # a private, JSON-only copy
            where = f"{resource.kind} #{i}"
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: not an object")
            meta = obj.setdefault("metadata", {})
            name = meta.get("name") if isinstance(meta, dict) else None
            if not isinstance(name, str) or not name:
                raise ValueError(f"{where}: metadata.name: required")
            namespace = meta.get("namespace") or ""
            if resource.namespaced and (not isinstance(namespace, str) or not namespace):
                raise ValueError(f"{resource.kind} {name}: metadata.namespace: required")
            if not resource.namespaced:
                meta.pop("namespace", None)
                namespace = ""
            key = f"{namespace}/{name}" if resource.namespaced else name
            if key in built:
                raise ValueError(f"{resource.kind} {key}: duplicate")
            if resource.kind == "Namespace":
                labels = meta.get("labels") or {}
                meta["labels"] = {**labels, NAMESPACE_NAME_LABEL: name}
            obj.pop("apiVersion", None)
            obj.pop("kind", None)
            meta.setdefault("uid", str(uuid.uuid5(uuid.NAMESPACE_URL, f"kpm-test/{resource.kind}/{key}")))
            given_rv = meta.pop("resourceVersion", None)
            content = json.dumps(obj, sort_keys=True, separators=(",", ":"))
            old = before.get(key)
            if given_rv is not None:
                resource_version = str(given_rv)
            elif old is not None and old.content == content:
                resource_version = old.resource_version
            else:
                resource_version = str(rv)
            meta["resourceVersion"] = resource_version
            built[key] = _Item(key, namespace, name, content, resource_version,
                               json.dumps(obj, separators=(",", ":")).encode())
        return tuple(built[k] for k in sorted(built))

    # -- authentication --------------------------------------------------

    @property
    def tokens(self) -> frozenset:
        return self._tokens

    def set_tokens(self, *tokens: str) -> None:
        """Accept exactly these bearer tokens from now on (none: no token required)."""
        with self._lock:
            self._tokens = frozenset(tokens)

    # -- faults ----------------------------------------------------------

    def _add_fault(self, fault: _Fault) -> None:
        if fault.count < 1:
            raise ValueError("count must be >= 1")
        with self._lock:
            self._faults.append(fault)

    # Every fault answers the next `count` matching requests, then is gone.
    # A request matches when its path equals `path` (if given) and it asks for
    # page `page` of a list (if given; 1-based). Faults match in the order given;
    # a request consumes at most one.

    def fail_next(self, status: int = 500, count: int = 1, *, path: Optional[str] = None,
                  page: Optional[int] = None, message: str = "injected failure",
                  watch: Optional[bool] = None) -> None:
        """Answer with a Status of `status`."""
        self._add_fault(_Fault("body", count, path, page, status=status, watch=watch,
                               body=_status(status, _reason(status), message)))

    def fail_page(self, page: int, status: int = 500, count: int = 1, *,
                  path: Optional[str] = None) -> None:
        """Answer page `page` of a list with a Status of `status`."""
        self.fail_next(status, count, path=path, page=page,
                       message=f"injected failure of page {page}")

    def respond_next(self, body: Union[bytes, str, Mapping, list], *, status: int = 200,
                     count: int = 1, path: Optional[str] = None, page: Optional[int] = None,
                     content_type: str = "application/json",
                     watch: Optional[bool] = None) -> None:
        """Answer with this body (a dict or list is sent as JSON)."""
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        elif isinstance(body, str):
            body = body.encode()
        self._add_fault(_Fault("body", count, path, page, status=status, body=bytes(body),
                               content_type=content_type, watch=watch))

    def malformed_next(self, count: int = 1, *, path: Optional[str] = None,
                       page: Optional[int] = None,
                       body: bytes = b'{"apiVersion":"v1","kind":"PodList","items":[{"metad',
                       watch: Optional[bool] = None) -> None:
        """Answer with 200 and a body that is not JSON."""
        self.respond_next(body, count=count, path=path, page=page, watch=watch)

    def hang_next(self, seconds: float, count: int = 1, *, path: Optional[str] = None,
                  page: Optional[int] = None, watch: Optional[bool] = None) -> None:
        """Hold the request for `seconds`, then answer it normally (stop() cuts the wait short)."""
        self._add_fault(_Fault("hang", count, path, page, seconds=seconds, watch=watch))

    def expire_continue(self, count: int = 1, *, path: Optional[str] = None) -> None:
        """Answer a request that carries a continue token with 410 Expired."""
        self._add_fault(_Fault("gone", count, path, continue_only=True))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    # Faults of the watch streams open now (on `path`, if given). Each returns
    # how many streams it reached, once they have acted on it (at most a few
    # seconds); watches opened later are not affected.

    def drop_watches(self, path: Optional[str] = None) -> int:
        """Cut the connection, in the middle of the chunked body: nothing more is sent."""
        return self._act_on_streams("drop", path)

    def expire_watches(self, path: Optional[str] = None) -> int:
        """Send an ERROR event with a 410 Expired Status, then end the stream."""
        return self._act_on_streams("expire", path)

    def garbage_watches(self, data: bytes = b'{"type":"ADDED","object":{"metad\n', *,
                        path: Optional[str] = None) -> int:
        """Send `data` as it is (by default a line that is not JSON); the stream goes on."""
        return self._act_on_streams("garbage", path, data)

    def silence_watches(self, path: Optional[str] = None) -> int:
        """Send nothing more, not even the end at timeoutSeconds, until the client goes away."""
        return self._act_on_streams("silence", path)

    def open_watches(self, path: Optional[str] = None) -> int:
        with self._lock:
            return sum(1 for s in self._streams if path is None or s.path == path)

    def _act_on_streams(self, action: str, path: Optional[str], data: bytes = b"") -> int:
        with self._changed:
            targets = [s for s in self._streams if path is None or s.path == path]
            acts = [_StreamAction(action, data) for _ in targets]
            for stream, act in zip(targets, acts):
                stream.actions.append(act)
            self._changed.notify_all()
        deadline = time.monotonic() + 5
        for act in acts:
            act.done.wait(max(0.0, deadline - time.monotonic()))
        return len(acts)

    def _take_fault(self, path: str, page: Optional[int], has_continue: bool,
                    watching: bool = False) -> Optional[_Fault]:
        with self._lock:
            for fault in self._faults:
                if fault.path is not None and fault.path != path:
                    continue
                if fault.watch is not None and fault.watch != watching:
                    continue
                if fault.page is not None and fault.page != page:
                    continue
                if fault.continue_only and not has_continue:
                    continue
                fault.count -= 1
                if fault.count == 0:
                    self._faults.remove(fault)
                return fault
        return None

    # -- observation -----------------------------------------------------

    @property
    def requests(self) -> list[Request]:
        """Every answered request, oldest first."""
        with self._lock:
            return list(self._log)

    def clear_requests(self) -> None:
        with self._lock:
            self._log.clear()

    @property
    def bytes_sent(self) -> int:
        """Body bytes sent so far, open watch streams included."""
        with self._lock:
            return self._bytes_done + sum(s.sent for s in self._streams)

    @property
    def tls_errors(self) -> list[str]:
        """Failed TLS handshakes (for example a client without the required certificate)."""
        with self._lock:
            return list(self._tls_errors)

    def _note_tls_error(self, text: str) -> None:
        log.debug("TLS handshake failed: %s", text)
        with self._lock:
            self._tls_errors.append(text)

    def _track(self, conn, opened: bool) -> None:
        with self._lock:
            (self._connections.add if opened else self._connections.discard)(conn)

    # -- serving ---------------------------------------------------------

    def _handle(self, handler: _Handler, method_allowed: bool = True) -> None:
        split = urlsplit(handler.path)
        path, query = split.path, split.query
        params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        headers = {k: v for k, v in handler.headers.items() if k.lower() != "authorization"}
        auth = self._authenticate(handler.headers.get("Authorization"))
        page = None
        content_type = "application/json"

        if not method_allowed:
            status, body = 405, _status(405, "MethodNotAllowed", f"{handler.command} is not supported")
        elif auth in ("none", "rejected") and self._tokens:
            status, body = 401, _status(401, "Unauthorized", "Unauthorized")
        else:
            continue_token = params.get("continue") or ""
            route = self._route(path)
            if route is not None and not self._serves(route[0]):
                route = None                    # answered 404, as an unknown resource is
            watching = (route is not None and route[2] is None
                        and params.get("watch") in ("1", "true"))
            if route is not None and route[2] is None and not watching:
                page = 1
                if continue_token:
                    decoded = _decode_continue(continue_token)
                    page = decoded["p"] if decoded else None
            fault = self._take_fault(path, page, bool(continue_token), watching)
            if fault is not None and fault.action == "hang":
                self._stopping.wait(fault.seconds)
                fault = None
            if fault is not None and fault.action == "gone":
                status, body = 410, _status(
                    410, "Expired", "The provided continue parameter is too old to display a "
                    "consistent list result. You can start a new list without the continue parameter.")
            elif fault is not None:
                status, body, content_type = fault.status, fault.body, fault.content_type
            elif watching:
                answer = self._watch(handler, route, params,
                                     Request(handler.command, path, query, params, headers, auth,
                                             200, None, 0))
                if answer is None:
                    return
                status, body = answer
            else:
                status, body = self._answer(path, params, route)

        entry = Request(handler.command, path, query, params, headers, auth, status, page, len(body))
        with self._lock:
            self._log.append(entry)
            self._bytes_done += len(body)
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", content_type)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            if handler.command != "HEAD":
                handler.wfile.write(body)
        except OSError:
            handler.close_connection = True

    def _authenticate(self, header: Optional[str]) -> str:
        tokens = self._tokens
        if header is None:
            return "none"
        if not tokens:
            return "unchecked"
        scheme, _, value = header.partition(" ")
        ok = scheme.lower() == "bearer" and any(
            secrets.compare_digest(value.strip().encode(), t.encode()) for t in tokens)
        return "accepted" if ok else "rejected"

    def _serves(self, resource: _Resource) -> bool:
        return resource.name not in ADMIN_RESOURCES or resource.name in self._admin_api

    @staticmethod
    def _route(path: str) -> Optional[tuple[_Resource, str, Optional[str]]]:
        """(resource, namespace or "", object name or None for a list), or None."""
        for prefix in _PREFIXES:
            if not path.startswith(prefix + "/"):
                continue
            parts = path[len(prefix) + 1:].rstrip("/").split("/")
            namespace, name = "", None
            if len(parts) >= 3 and parts[0] == "namespaces":
                namespace, parts = parts[1], parts[2:]
            if len(parts) == 2:
                name = parts[1]
            elif len(parts) != 1:
                return None
            resource = _RESOURCES.get(parts[0])
            if resource is None or resource.prefix != prefix:
                return None
            if namespace and not resource.namespaced:
                return None
            return resource, namespace, name
        return None

    def _answer(self, path: str, params: dict, route) -> tuple[int, bytes]:
        if path == "/version":
            return 200, json.dumps({"major": "1", "minor": "30", "gitVersion": "v1.30.0-kpm-test",
                                    "platform": "linux/amd64"}).encode()
        if path in ("/healthz", "/readyz", "/livez"):
            return 200, b"ok"
        if route is None:
            return 404, _status(404, "NotFound", f"the server could not find the requested resource ({path})")
        for unsupported in ("watch", "labelSelector", "fieldSelector"):
            if params.get(unsupported) not in (None, "", "false", "0"):
                return 400, _status(400, "BadRequest", f"{unsupported} is not supported by this test server")
        resource, namespace, name = route
        if name is not None:
            return self._get(resource, namespace, name)
        return self._list(resource, namespace, params)

    def _watch(self, handler: _Handler, route, params: dict,
               entry: Request) -> Optional[tuple[int, bytes]]:
        """Serve a watch as a stream; None once it has, or (status, body) to answer instead."""
        resource, namespace, _ = route
        for unsupported in ("labelSelector", "fieldSelector"):
            if params.get(unsupported):
                return 400, _status(400, "BadRequest", f"{unsupported} is not supported by this test server")
        rv_text = params.get("resourceVersion", "")
        since = _non_negative(rv_text, int) if rv_text else 0
        if since is None:
            return _invalid("resourceVersion", rv_text)
        seconds_text = params.get("timeoutSeconds", "")
        seconds = _non_negative(seconds_text, float) if seconds_text else 0.0
        if seconds is None:
            return _invalid("timeoutSeconds", seconds_text)
        seconds = seconds or self.watch_seconds
        bookmarks = params.get("allowWatchBookmarks") in ("1", "true")

        stream = _Stream(entry.path)
        with self._lock:
            if rv_text in ("", "0"):
                snapshot = self._snapshot
                since = snapshot.rv
                first = [_event_line("ADDED", _typed(resource, item.body))
                         for item in snapshot.items[resource.name]
                         if not namespace or item.namespace == namespace]
            elif since < self._floor:
                if self.too_old_watch == "status":
                    return 410, _status(410, "Expired", _too_old_message(since, self._floor))
                first = [_event_line("ERROR", _too_old(since, self._floor))]
                since = -1                                   # the stream ends after it
            else:
                first = []
            stream.since = since
            self._streams.add(stream)
            self._log.append(entry)

        conn = handler.connection
        ended = "normally"
        actions: list[_StreamAction] = []
        try:
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Transfer-Encoding", "chunked")
            handler.end_headers()
            handler.wfile.flush()

            def send(lines: list) -> None:
                data = b"".join(lines)
                if data:
                    handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    stream.sent += len(data)

            send(first)
            started = time.monotonic()
            deadline = started + seconds
            next_bookmark = started + self.bookmark_seconds if bookmarks else float("inf")
            while since >= 0:
                with self._changed:
                    now = time.monotonic()
                    if (not stream.actions and self._snapshot.rv <= since
                            and not self._stopping.is_set()):
                        self._changed.wait(max(0.0, min(0.1, deadline - now, next_bookmark - now)))
                    actions, stream.actions = stream.actions, []
                    lines = []
                    if since + 1 < self._kept_from:             # fell behind the kept events
                        lines, since = [_event_line("ERROR", _too_old(since, self._floor))], -1
                    elif self._snapshot.rv > since:
                        start = bisect.bisect_right(self._event_rvs, since)
                        lines = [e.line for e in self._events[start:]
                                 if e.resource == resource.name
                                 and (not namespace or e.namespace == namespace)]
                        since = self._snapshot.rv
                    stream.since = since
                if self._stopping.is_set():
                    ended = "server stopping"
                    break
                if not self._serves(resource):
                    send(lines)
                    break                               # its definition is gone: the watch ends
                for act in actions:
                    if act.action == "drop":
                        ended = "dropped"
                        return None
                    if act.action == "garbage":
                        send([act.data])
                    elif act.action == "expire":
                        send([_event_line("ERROR", _status(410, "Expired", "injected expiry"))])
                        lines, since = [], -1
                    elif act.action == "silence":
                        ended = "silenced"
                        for taken in actions:
                            taken.done.set()
                        while not self._stopping.is_set() and not _peer_gone(conn, 0.1):
                            pass
                        return None
                    act.done.set()
                actions = []
                send(lines)
                now = time.monotonic()
                if since >= 0 and now >= next_bookmark:
                    send([_event_line("BOOKMARK", _typed(resource, json.dumps(
                        {"metadata": {"resourceVersion": str(since)}},
                        separators=(",", ":")).encode()))])
                    next_bookmark = now + self.bookmark_seconds
                if _peer_gone(conn):
                    ended = "client gone"
                    break
                if now >= deadline:
                    break
            if ended == "normally":
                handler.wfile.write(b"0\r\n\r\n")
        except OSError:
            ended = "client gone"
        finally:
            if ended != "normally":
                handler.close_connection = True
                try:
                    socket.socket.shutdown(conn, socket.SHUT_RDWR)
                except OSError:
                    pass
            with self._changed:
                self._streams.discard(stream)
                self._bytes_done += stream.sent
                for i in range(len(self._log) - 1, -1, -1):
                    if self._log[i] is entry:
                        self._log[i] = dataclasses.replace(entry, response_bytes=stream.sent)
                        break
                for act in stream.actions + actions:
                    act.done.set()
            log.debug("watch %s ended: %s", entry.path, ended)
        return None

    def _get(self, resource: _Resource, namespace: str, name: str) -> tuple[int, bytes]:
        key = f"{namespace}/{name}" if resource.namespaced else name
        for item in self._snapshot.items[resource.name]:
            if item.key == key:
                obj = json.loads(item.body)
                return 200, json.dumps({"apiVersion": resource.api_version, "kind": resource.kind,
                                        **obj}, separators=(",", ":")).encode()
        return 404, _status(404, "NotFound", f'{resource.name} "{name}" not found')

    def _list(self, resource: _Resource, namespace: str, params: dict) -> tuple[int, bytes]:
        limit_text = params.get("limit", "")
        limit = _non_negative(limit_text, int) if limit_text else 0
        if limit is None:
            return _invalid("limit", limit_text)
        token = params.get("continue") or ""
        if token:
            if params.get("resourceVersion"):
                return 400, _status(400, "BadRequest",
                                    "specifying resource version is not allowed when using continue")
            data = _decode_continue(token)
            if data is None or data["r"] != resource.name or data["ns"] != namespace:
                return 400, _status(400, "BadRequest", "continue key is not valid")
            with self._lock:
                snapshot = self._history.get(data["rv"])
            if snapshot is None:
                return 410, _status(
                    410, "Expired", "The provided continue parameter is too old to display a "
                    "consistent list result. You can start a new list without the continue parameter.")
            start, page = data["i"], data["p"]
        else:
            snapshot, start, page = self._snapshot, 0, 1
        items = snapshot.items[resource.name]
        if namespace:
            items = tuple(item for item in items if item.namespace == namespace)
        end = len(items) if limit == 0 else min(len(items), start + limit)
        metadata: dict[str, Any] = {"resourceVersion": str(snapshot.rv)}
        if end < len(items):
            metadata["continue"] = _encode_continue(
                {"r": resource.name, "ns": namespace, "rv": snapshot.rv, "i": end, "p": page + 1})
            metadata["remainingItemCount"] = len(items) - end
        head = json.dumps({"apiVersion": resource.api_version, "kind": resource.kind + "List",
                           "metadata": metadata}, separators=(",", ":")).encode()
        body = head[:-1] + b',"items":[' + b",".join(i.body for i in items[start:end]) + b"]}"
        return 200, body


# -- TLS material (openssl command, argument lists only) -----------------------

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _write_config(path: str, common_name: str, extensions: list[str]) -> None:
    with open(path, "w") as f:
        f.write("[req]\ndistinguished_name = dn\nprompt = no\n\n"
                f"[dn]\nCN = {common_name}\n\n[ext]\n" + "\n".join(extensions) + "\n")


def make_ca(directory: str, name: str = "kpm-test-ca") -> CertFiles:
    """A self-signed EC P-256 CA valid for two days: DIRECTORY/NAME.crt and .key."""
    if not _NAME_RE.match(name):
        raise ValueError(f"certificate name {name!r}: use letters, digits, '.', '_' and '-'")
    base = os.path.join(directory, name)
    _write_config(base + ".cnf", name, ["basicConstraints = critical,CA:TRUE",
                                        "keyUsage = critical,keyCertSign,cRLSign",
                                        "subjectKeyIdentifier = hash"])
    _openssl("req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", base + ".key", "-out", base + ".crt", "-days", "2",
             "-config", base + ".cnf", "-extensions", "ext")
    return CertFiles(base + ".crt", base + ".key")


def issue_cert(ca: CertFiles, directory: str, name: str, hosts: Sequence[str] = (),
               client: bool = False) -> CertFiles:
    """A leaf certificate signed by `ca`: for a server (hosts become IP or DNS
    subjectAltNames) or, with client=True, for a client (CN = name)."""
    if not _NAME_RE.match(name):
        raise ValueError(f"certificate name {name!r}: use letters, digits, '.', '_' and '-'")
    base = os.path.join(directory, name)
    extensions = ["basicConstraints = critical,CA:FALSE",
                  "keyUsage = critical,digitalSignature",
                  f"extendedKeyUsage = {'clientAuth' if client else 'serverAuth'}",
                  "subjectKeyIdentifier = hash",
                  "authorityKeyIdentifier = keyid,issuer"]
    if hosts:
        sans = []
        for host in hosts:
            try:
                ipaddress.ip_address(host)
                sans.append(f"IP:{host}")
            except ValueError:
                sans.append(f"DNS:{host}")
        extensions.append("subjectAltName = " + ",".join(sans))
    _write_config(base + ".cnf", name, extensions)
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", base + ".key", "-out", base + ".csr", "-config", base + ".cnf")
    _openssl("x509", "-req", "-in", base + ".csr", "-CA", ca.cert, "-CAkey", ca.key,
             "-set_serial", str(secrets.randbits(62) + 1), "-days", "2", "-out", base + ".crt",
             "-extfile", base + ".cnf", "-extensions", "ext")
    return CertFiles(base + ".crt", base + ".key")
