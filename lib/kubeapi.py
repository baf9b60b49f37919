"""Access to the Kubernetes API: where it is and how to authenticate (flag,
kubeconfig, in-cluster), complete paginated lists and watch streams, with
timeouts and verified TLS.

A cycle must act on a whole, consistent list or not at all, so every failure
(HTTP status, timeout, TLS, a body that is not a List, a page failing half
way) raises ApiError and no partial list ever leaves this module. Objects are
returned as the API sent them; lib/objects.py interprets them.

TLS is verified against the configured CA, or else against the system trust
store as OpenSSL finds it (SSL_CERT_FILE / SSL_CERT_DIR can point it
elsewhere, as for kubectl); only a kubeconfig's insecure-skip-tls-verify turns
verification off. The HTTP session ignores the environment (`trust_env =
False`) so that REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE cannot silently replace
the CA the configuration names. As a consequence HTTP(S)_PROXY and NO_PROXY
are not used either: the API server is reached directly.
"""
from __future__ import annotations

import atexit
import base64
import binascii
import json
import logging
import os
import re
import shutil
import socket
import ssl
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator, Mapping, Optional
from urllib.parse import urlsplit

import requests
import yaml
from urllib3.exceptions import InsecureRequestWarning, ReadTimeoutError

from lib import api_fields, logs
from lib.model import ADMIN, BASELINE

log = logging.getLogger(__name__)

NAMESPACES = "/api/v1/namespaces"
PODS = "/api/v1/pods"
NETWORK_POLICIES = "/apis/networking.k8s.io/v1/networkpolicies"
NODES = "/api/v1/nodes"
# The admin tiers: CustomResourceDefinitions a cluster may not have installed.
ADMIN_GROUP_VERSION = "policy.networking.k8s.io/v1alpha1"
ADMIN_NETWORK_POLICIES = f"/apis/{ADMIN_GROUP_VERSION}/adminnetworkpolicies"
BASELINE_ADMIN_NETWORK_POLICIES = f"/apis/{ADMIN_GROUP_VERSION}/baselineadminnetworkpolicies"
ADMIN_RESOURCES = ("adminnetworkpolicies", "baselineadminnetworkpolicies")

SERVICEACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
MAX_LIST_RESTARTS = 3           # after a 410 Gone on a continue token
MAX_EVENT_BYTES = 16 << 20      # one watch event line; etcd caps an object at 1.5 MiB
WATCH_EVENT_TYPES = ("ADDED", "MODIFIED", "DELETED", "BOOKMARK")
USER_AGENT = "kube-policy-manager"
_NODE_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


class ApiError(Exception):
    """The API could not be configured or did not give a complete, valid answer.

    The message names the resource path and the cause; it never holds a token.
    `path`, `page` and `status` are set when they apply.
    """

    def __init__(self, message: str, *, path: Optional[str] = None,
                 page: Optional[int] = None, status: Optional[int] = None):
        super().__init__(message)
        self.path = path
        self.page = page
        self.status = status


class WatchEventError(ApiError):
    """A watch stream sent a line that is not a watch event: what it missed is
    unknown, so the collection must be listed again."""


@dataclass(frozen=True)
class ApiConfig:
    """Where the API server is and how to authenticate to it.

    Paths only, except `token` (an inline kubeconfig token), which repr hides.
    `token_file` is re-read whenever it changes.
    """
    server: str                          # base URL, http or https, without trailing "/"
    token_file: Optional[str] = None
    token: Optional[str] = None
    ca_file: Optional[str] = None        # None: the system trust store
    client_cert: Optional[str] = None
    client_key: Optional[str] = None
    verify: bool = True                  # False only from kubeconfig insecure-skip-tls-verify
    source: str = "flag"                 # "flag", "kubeconfig <path>", "in-cluster"

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "token" and value is not None:
                shown.append("token='<redacted>'")
            else:
                shown.append(f"{f.name}={value!r}")
        return f"ApiConfig({', '.join(shown)})"

    __str__ = __repr__

    @property
    def auth(self) -> str:
        """How requests authenticate, for logs: "token", "token-file",
        "client-certificate", "token+client-certificate" or "none"."""
        kind = "token" if self.token else "token-file" if self.token_file else ""
        if self.client_cert:
            kind = f"{kind}+client-certificate" if kind else "client-certificate"
        return kind or "none"


@dataclass(frozen=True)
class ClusterObjects:
    """One complete read of the objects a cycle needs, with the API load it cost.

    The admin policy kinds are read only where the API server serves them
    (`admin_api`: which of ADMIN_RESOURCES it does), and the Nodes (for
    `nodes` peers) only while it serves one of them."""
    namespaces: list
    pods: list
    policies: list
    requests: int                        # HTTP requests made, failed ones included
    bytes: int                           # response body bytes as transferred
    admin_policies: list = field(default_factory=list)
    baseline_policies: list = field(default_factory=list)
    nodes: list = field(default_factory=list)
    admin_api: frozenset = frozenset()

    @property
    def admin_served(self) -> bool:
        return bool(self.admin_api)


def admin_api_message(served: frozenset) -> str:
    """What the cluster serves of the admin tiers, and so what is enforced."""
    missing = [r for r in ADMIN_RESOURCES if r not in served]
    kinds = (["AdminNetworkPolicy"] if ADMIN_RESOURCES[0] in served else []) + ["NetworkPolicy"]
    kinds += ["BaselineAdminNetworkPolicy"] if ADMIN_RESOURCES[1] in served else []
    enforcing = ("NetworkPolicy alone" if len(kinds) == 1
                 else ", ".join(kinds[:-1]) + " and " + kinds[-1])
    state = f"{' and '.join(missing)} not served" if missing else f"{' and '.join(ADMIN_RESOURCES)} served"
    return f"{ADMIN_GROUP_VERSION} {state}: enforcing {enforcing}"


class AdminApiLog:
    """Says which admin policy kinds the API server does not serve, once at
    start and again whenever that changes. A cluster without their
    CustomResourceDefinitions is normal: an INFO line, not a warning."""

    def __init__(self) -> None:
        self._served: Optional[frozenset] = None

    def update(self, served: frozenset) -> None:
        if served == self._served:
            return
        first, self._served = self._served is None, served
        if first and served == frozenset(ADMIN_RESOURCES):
            return                          # everything is there: nothing to say
        logs.get().info(admin_api_message(served),
                        extra={"event": "admin-api", "served": sorted(served)})


# -- configuration -------------------------------------------------------------

_private_lock = threading.Lock()
_private_dir: Optional[str] = None


def _private_file(data: bytes, suffix: str) -> str:
    """Write kubeconfig -data content where only this user can read it; removed at exit."""
    global _private_dir
    with _private_lock:
        if _private_dir is None:
            _private_dir = tempfile.mkdtemp(prefix="kpm-kubeconfig-")   # mode 0700
            atexit.register(shutil.rmtree, _private_dir, True)
        fd, path = tempfile.mkstemp(dir=_private_dir, suffix=suffix)   # mode 0600
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _check_readable(path: str, what: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ApiError(f"{what}: {path}: {exc.strerror or exc}") from None


def _check_server(url: str, what: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ApiError(f"{what}: {url!r}: must be an http:// or https:// URL")
    if parts.query or parts.fragment:
        raise ApiError(f"{what}: {url!r}: must not have a query or fragment")
    return url.rstrip("/")


def load_config(api_server: Optional[str] = None, kubeconfig: Optional[str] = None,
                token_file: Optional[str] = None, ca_file: Optional[str] = None,
                environ: Mapping[str, str] = os.environ,
                serviceaccount_dir: str = SERVICEACCOUNT_DIR) -> ApiConfig:
    """The API configuration from the first source that applies: `api_server`
    (the --api-server flag), then `kubeconfig` or $KUBECONFIG, then the
    in-cluster service account.

    `token_file` and `ca_file` (the --token-file and --ca-file flags) go with
    `api_server`; given with another source they replace its token and CA.
    """
    if token_file:
        _check_readable(token_file, "--token-file")
    if ca_file:
        _check_readable(ca_file, "--ca-file")

    if api_server:
        config = ApiConfig(server=_check_server(api_server, "--api-server"),
                           token_file=token_file, ca_file=ca_file, source="flag")
        return config

    tried = ["--api-server (not given)"]
    path = kubeconfig
    if not path:
        listed = [p for p in environ.get("KUBECONFIG", "").split(os.pathsep) if p]
        if listed:
            path = next((p for p in listed if os.path.exists(p)), None)
            if path is None:
                raise ApiError(f"$KUBECONFIG: none of its files exists: {', '.join(listed)}")
        tried += ["--kubeconfig (not given)", "$KUBECONFIG (unset)"]
    if path:
        config = _from_kubeconfig(path)
    else:
        config = _in_cluster(environ, serviceaccount_dir)
        if config is None:
            tried.append("in-cluster (KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT not both set)")
            raise ApiError("no API server configured; tried: " + ", ".join(tried))

    if token_file or ca_file:
        config = ApiConfig(server=config.server,
                           token_file=token_file or (None if config.token else config.token_file),
                           token=None if token_file else config.token,
                           ca_file=ca_file or config.ca_file,
                           client_cert=config.client_cert, client_key=config.client_key,
                           verify=True if ca_file else config.verify, source=config.source)
    return config


def _in_cluster(environ: Mapping[str, str], serviceaccount_dir: str) -> Optional[ApiConfig]:
    host = environ.get("KUBERNETES_SERVICE_HOST", "")
    port = environ.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port:
        return None
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    token_path = os.path.join(serviceaccount_dir, "token")
    _check_readable(token_path, "in-cluster service account token")
    ca_path = os.path.join(serviceaccount_dir, "ca.crt")
    if not os.path.exists(ca_path):
        log.warning("in-cluster: %s is missing; verifying the API server against the system "
                    "trust store", ca_path)
        ca_path = None
    return ApiConfig(server=_check_server(f"https://{host}:{port}", "in-cluster"),
                     token_file=token_path, ca_file=ca_path, source="in-cluster")


def _named(doc: dict, section: str, name: str, where: str) -> dict:
    entries = doc.get(section) or []
    if not isinstance(entries, list):
        raise ApiError(f"{where}: {section}: must be a list")
    for entry in entries:
        if isinstance(entry, dict) and entry.get("name") == name:
            body = entry.get(section[:-1])       # clusters -> cluster, users -> user, ...
            if body is None:
                return {}
            if not isinstance(body, dict):
                raise ApiError(f"{where}: {section[:-1]} {name}: must be a mapping")
            return body
    raise ApiError(f"{where}: {section[:-1]} {name!r}: not found")


def _data_file(value, what: str, suffix: str) -> str:
    if not isinstance(value, str):
        raise ApiError(f"{what}: must be a base64 string")
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(f"{what}: not valid base64") from None
    return _private_file(data, suffix)


def _from_kubeconfig(path: str) -> ApiConfig:
    """The current context of one kubeconfig file. As in kubectl, a `-data`
    field wins over its path form, an inline token over tokenFile, and
    relative paths are relative to the file's folder."""
    where = f"kubeconfig {path}"
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except OSError as exc:
        raise ApiError(f"{where}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ApiError(f"{where}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ApiError(f"{where}: not a kubeconfig (top level must be a mapping)")
    folder = os.path.dirname(os.path.abspath(path))

    def resolve(p):
        return p if os.path.isabs(p) else os.path.join(folder, p)

    def file_field(section: dict, name: str, what: str, suffix: str) -> Optional[str]:
        """The file that `name`-data (written out) or `name` (a path) gives."""
        if section.get(f"{name}-data"):
            return _data_file(section[f"{name}-data"], f"{what}: {name}-data", suffix)
        if section.get(name):
            found = resolve(section[name])
            _check_readable(found, f"{what}: {name}")
            return found
        return None

    context_name = doc.get("current-context")
    if not context_name:
        raise ApiError(f"{where}: current-context: not set")
    context = _named(doc, "contexts", context_name, where)
    cluster_name = context.get("cluster")
    if not cluster_name:
        raise ApiError(f"{where}: context {context_name}: cluster: not set")
    cluster = _named(doc, "clusters", cluster_name, where)
    cwhere = f"{where}: cluster {cluster_name}"
    server = cluster.get("server")
    if not isinstance(server, str) or not server:
        raise ApiError(f"{cwhere}: server: not set")
    server = _check_server(server, f"{cwhere}: server")

    ca_file = file_field(cluster, "certificate-authority", cwhere, "-ca.crt")
    verify = True
    if cluster.get("insecure-skip-tls-verify") is True:
        if ca_file:
            raise ApiError(f"{cwhere}: insecure-skip-tls-verify and a certificate authority "
                           "are both set; keep one")
        verify = False
        log.warning("%s: insecure-skip-tls-verify is set: the API server's certificate is "
                    "NOT verified", cwhere)

    user = {}
    user_name = context.get("user")
    if user_name:
        user = _named(doc, "users", user_name, where)
    uwhere = f"{where}: user {user_name}"
    for unsupported in ("exec", "auth-provider"):
        if user.get(unsupported):
            raise ApiError(f"{uwhere}: {unsupported}: not supported; use token, tokenFile or "
                           "client-certificate/client-key")
    if user.get("username") or user.get("password"):
        raise ApiError(f"{uwhere}: username/password: not supported; use token, tokenFile or "
                       "client-certificate/client-key")

    token = user.get("token") or None
    if token is not None and not isinstance(token, str):
        raise ApiError(f"{uwhere}: token: must be a string")
    token_file = None
    if not token and user.get("tokenFile"):
        token_file = resolve(user["tokenFile"])
        _check_readable(token_file, f"{uwhere}: tokenFile")

    client_cert = file_field(user, "client-certificate", uwhere, "-client.crt")
    client_key = file_field(user, "client-key", uwhere, "-client.key")
    if bool(client_cert) != bool(client_key):
        raise ApiError(f"{uwhere}: client-certificate and client-key must be given together")

    return ApiConfig(server=server, token_file=token_file, token=token, ca_file=ca_file,
                     client_cert=client_cert, client_key=client_key, verify=verify,
                     source=f"kubeconfig {path}")


# -- requests ------------------------------------------------------------------

def _system_trust_store():
    """The system CA bundle, so that verification without a CA file trusts what
    the host trusts (requests alone would use its own bundled list)."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and os.path.isfile(candidate):
            return candidate
    for candidate in (paths.capath, paths.openssl_capath):
        if candidate and os.path.isdir(candidate):
            return candidate
    return True


class _TokenFile:
    """A bearer token read from a file and re-read when the file changes:
    kubelet rotates bound service-account tokens by swapping the file.

    A stat() per request is the whole cost while nothing changes. If the file
    becomes unreadable or empty (a writer half way), the last good token is kept.
    """

    def __init__(self, path: str):
        self.path = path
        self._signature = None
        self._token: Optional[str] = None
        self._complained = False

    def get(self) -> str:
        try:
            st = os.stat(self.path)
            signature = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
            if signature != self._signature:
                with open(self.path, encoding="utf-8", errors="replace") as f:
                    token = f.read().strip()
                if not token:
                    raise OSError("the file is empty")
                if self._token is not None and token != self._token:
                    log.info("token file %s changed; using the new token", self.path)
                self._token, self._signature, self._complained = token, signature, False
        except OSError as exc:
            cause = exc.strerror or str(exc)
            if self._token is None:
                raise ApiError(f"token file {self.path}: {cause}") from None
            if not self._complained:
                log.warning("token file %s: %s; keeping the last token read", self.path, cause)
                self._complained = True
        return self._token


class _Expired(Exception):
    def __init__(self, page: int):
        super().__init__(page)
        self.page = page


_STATUS_HINTS = {
    401: "the token or client certificate was not accepted (missing, wrong or expired)",
    403: "forbidden: RBAC must allow {verb} on this resource",
}


class ApiClient:
    """Complete, paginated lists from one API server, over one HTTP session.

    `timeout` is (connect, read) in seconds for every request; `page_size` is
    the `limit` of each page. `request_count` and `byte_count` add up the load
    put on the API server over the client's life.
    """

    def __init__(self, config: ApiConfig, timeout=(3.05, 10.0), page_size: int = 500):
        if page_size < 1:
            raise ValueError("page_size must be >= 1")
        self.config = config
        self.timeout = timeout
        self.page_size = page_size
        self.request_count = 0
        self.byte_count = 0
        self.admin_api_log = AdminApiLog()
        self._base = config.server.rstrip("/")
        self._token_file = _TokenFile(config.token_file) if config.token_file and not config.token else None
        session = requests.Session()
        session.trust_env = False
        if not config.verify:
            session.verify = False
        elif config.ca_file:
            session.verify = config.ca_file
        else:
            session.verify = _system_trust_store()
        if config.client_cert:
            session.cert = (config.client_cert, config.client_key)
        session.headers.update({"Accept": "application/json", "User-Agent": USER_AGENT})
        self._session = session
        if self._base.startswith("http://") and config.auth.startswith("token"):
            log.warning("API server %s is plain http: the bearer token is sent unencrypted", self._base)

    def __repr__(self) -> str:
        return f"ApiClient(server={self._base!r}, source={self.config.source!r}, auth={self.config.auth!r})"

    def __enter__(self) -> "ApiClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._session.close()

    def list_cluster(self, trim: Optional[Callable[[str, Any], Any]] = api_fields.trimmed
                     ) -> ClusterObjects:
        """Namespaces, Pods, NetworkPolicies and, where the API server serves
        them, AdminNetworkPolicies, BaselineAdminNetworkPolicies and then,
        when one of those has a `nodes` peer, the Nodes; each list complete,
        or ApiError. A kind the server does not
        serve (404) is asked for again by the next call, which costs one
        small answer. `trim(kind, obj)` is applied to each object as its page
        arrives, so that a page's unread fields are freed before the next page
        is fetched; None keeps the objects whole."""
        requests_before, bytes_before = self.request_count, self.byte_count

        def of(kind: str) -> Optional[Callable[[Any], Any]]:
            return None if trim is None else (lambda obj: trim(kind, obj))

        namespaces = self.list(NAMESPACES, of("Namespace"))
        pods = self.list(PODS, of("Pod"))
        policies = self.list(NETWORK_POLICIES, of("NetworkPolicy"))
        admin = self._list_if_served(ADMIN_NETWORK_POLICIES, of(ADMIN))
        baseline = self._list_if_served(BASELINE_ADMIN_NETWORK_POLICIES, of(BASELINE))
        served = frozenset(r for r, items in zip(ADMIN_RESOURCES, (admin, baseline))
                           if items is not None)
        wanted = any(api_fields.names_nodes(o) for o in (admin or []) + (baseline or []))
        nodes = self.list(NODES, of("Node")) if wanted else []
        self.admin_api_log.update(served)
        return ClusterObjects(namespaces, pods, policies,
                              requests=self.request_count - requests_before,
                              bytes=self.byte_count - bytes_before,
                              admin_policies=admin or [], baseline_policies=baseline or [],
                              nodes=nodes, admin_api=served)

    def _list_if_served(self, path: str, trim: Optional[Callable[[Any], Any]]) -> Optional[list]:
        """The list at `path`, or None when the API server does not serve it
        (404: its CustomResourceDefinition is not installed)."""
        try:
            return self.list(path, trim)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def get_node(self, name: str) -> dict:
        """The Node object `name` as the API sent it (lib/objects.py reads its
        pod ranges), or ApiError."""
        if not _NODE_NAME.fullmatch(name or ""):
            raise ValueError(f"node name {name!r}: not a Kubernetes object name")
        path, where = f"{NODES}/{name}", "for this node's pod CIDRs"
        response = self._send(path, {}, where)
        content = response.content
        self.byte_count += len(content)
        if response.status_code != 200:
            raise self._status_error(path, where, response, content, verb="get")
        try:
            body = json.loads(content)
        except ValueError as exc:
            raise self._error(path, None, f"response is not JSON ({exc})", where=where) from None
        if not isinstance(body, dict) or body.get("kind", "Node") != "Node":
            raise self._error(path, None, "not a Node object", where=where)
        return body

    def list(self, path: str, trim: Optional[Callable[[Any], Any]] = None) -> list[dict]:
        """Every item of the List at `path` (each passed through `trim` when
        given), following continue tokens.

        The first page asks for resourceVersion=0 so that the API server may
        answer from its watch cache instead of etcd. An expired continue token
        (410) restarts the whole list, at most MAX_LIST_RESTARTS times.
        """
        return self._list(path, trim)[0]

    def list_versioned(self, path: str, trim: Optional[Callable[[Any], Any]] = None
                       ) -> tuple[list[dict], str]:
        """Like list(), with the List's metadata.resourceVersion: the point a
        watch of `path` resumes from so that it misses nothing."""
        items, version = self._list(path, trim)
        if not version:
            raise ApiError(f"GET {path}: not a List: metadata.resourceVersion is missing, so no "
                           "watch can start from it", path=path)
        return items, version

    def _list(self, path: str, trim: Optional[Callable[[Any], Any]]) -> tuple[list[dict], str]:
        if not path.startswith("/"):
            raise ValueError(f"path {path!r} must start with '/'")
        restarts = 0
        while True:
            try:
                return self._list_once(path, trim)
            except _Expired as expired:
                if restarts == MAX_LIST_RESTARTS:
                    raise ApiError(
                        f"GET {path} page {expired.page}: HTTP 410 Gone: continue token expired "
                        f"again after {restarts} restarts of the list; giving up",
                        path=path, page=expired.page, status=410) from None
                restarts += 1
                log.info("GET %s page %d: continue token expired (410 Gone); restarting the "
                         "list (%d of %d)", path, expired.page, restarts, MAX_LIST_RESTARTS)

    def _list_once(self, path: str, trim: Optional[Callable[[Any], Any]]) -> tuple[list[dict], str]:
        items: list[dict] = []
        params = {"limit": str(self.page_size), "resourceVersion": "0"}
        page = 1
        while True:
            body = self._get_page(path, params, page)
            metadata = body.get("metadata") or {}
            if not isinstance(metadata, dict):
                raise self._error(path, page, "not a List: metadata is not an object")
            token = metadata.get("continue") or ""
            if not isinstance(token, str):
                raise self._error(path, page, "not a List: metadata.continue is not a string")
            items.extend(body["items"] if trim is None else map(trim, body["items"]))
            del body
            if not token:
                version = metadata.get("resourceVersion")
                return items, version if isinstance(version, str) else ""
            if token == params.get("continue"):
                raise self._error(path, page, "metadata.continue did not change from the previous page")
            page += 1
            params = {"limit": str(self.page_size), "continue": token}

    def watch(self, path: str, resource_version: str, timeout_seconds: int,
              read_timeout: Optional[float] = None) -> "WatchStream":
        """Open a watch of the collection at `path` from `resource_version`,
        with bookmarks, that the server ends after `timeout_seconds`.

        Returns once the server has answered 200; any other answer, a 410 Gone
        included (status 410: list again), raises ApiError. `read_timeout` is
        the longest silence accepted while streaming; it defaults to
        timeout_seconds plus the client's read timeout, so that an idle
        healthy stream is never cut before the server ends it.
        """
        if not path.startswith("/"):
            raise ValueError(f"path {path!r} must start with '/'")
        if timeout_seconds < 1:
            raise ValueError("timeout_seconds must be >= 1")
        if read_timeout is None:
            read_timeout = timeout_seconds + self._read_timeout()
        where = f"watch from resourceVersion {resource_version}"
        params = {"watch": "1", "resourceVersion": resource_version,
                  "allowWatchBookmarks": "true", "timeoutSeconds": str(timeout_seconds)}
        response = self._send(path, params, where, stream=True,
                              timeout=(self._connect_timeout(), read_timeout))
        if response.status_code != 200:
            try:
                content = response.content          # a Status: small, and bounded by the timeout
            except requests.exceptions.RequestException:
                content = b""
            finally:
                response.close()
            self.byte_count += len(content)
            raise self._status_error(path, where, response, content, verb="watch")
        return WatchStream(self, response, path, where, read_timeout)

    def _status_error(self, path: str, where: str, response, content: bytes,
                      page: Optional[int] = None, verb: str = "list") -> ApiError:
        status = response.status_code
        cause = f"HTTP {status} {response.reason or ''}".rstrip()
        detail = _status_message(content) or _STATUS_HINTS.get(status, "").format(verb=verb)
        if detail:
            cause += f": {detail}"
        return self._error(path, page, cause, status=status, where=where)

    def _error(self, path: str, page: Optional[int], cause: str, status: Optional[int] = None,
               where: Optional[str] = None) -> ApiError:
        message = f"GET {path} {where or f'page {page}'}: {cause}"
        token = self.config.token or (self._token_file._token if self._token_file else None)
        if token and len(token) >= 8:
            message = message.replace(token, "<redacted>")
        return ApiError(message, path=path, page=page, status=status)

    def _send(self, path: str, params: dict, where: str, stream: bool = False, timeout=None,
              page: Optional[int] = None) -> requests.Response:
        """One authenticated GET, counted; every transport failure is an ApiError."""
        headers = {}
        try:
            token = self.config.token or (self._token_file.get() if self._token_file else None)
        except ApiError as exc:
            raise self._error(path, page, str(exc), where=where) from None
        if token:
            headers["Authorization"] = f"Bearer {token}"
        timeout = self.timeout if timeout is None else timeout
        self.request_count += 1
        try:
            with warnings.catch_warnings():
                if not self.config.verify:
                    warnings.simplefilter("ignore", InsecureRequestWarning)
                return self._session.get(self._base + path, params=params, headers=headers,
                                         timeout=timeout, allow_redirects=False, stream=stream)
        except requests.exceptions.ConnectTimeout:
            raise self._error(path, page, f"connect timed out ({_part(timeout, 0)} s)",
                              where=where) from None
        except requests.exceptions.ReadTimeout:
            raise self._error(path, page, f"no response within the read timeout "
                                          f"({_part(timeout, 1)} s)", where=where) from None
        except requests.exceptions.SSLError as exc:
            raise self._error(path, page, f"TLS error: {_innermost(exc)}", where=where) from None
        except requests.exceptions.ConnectionError as exc:
            raise self._error(path, page, f"connection failed: {_innermost(exc)}", where=where) from None
        except requests.exceptions.RequestException as exc:
            raise self._error(path, page, f"request failed: {_innermost(exc)}", where=where) from None
        except OSError as exc:          # e.g. a CA or client certificate file that vanished
            raise self._error(path, page, f"request failed: {exc}", where=where) from None

    def _get_page(self, path: str, params: dict, page: int) -> dict:
        started = time.monotonic()
        response = self._send(path, params, f"page {page}", page=page)
        try:
            transferred = response.raw.tell() or len(response.content)
        except (AttributeError, OSError):
            transferred = len(response.content)
        self.byte_count += transferred
        status = response.status_code
        log.debug("GET %s page %d: HTTP %d, %d bytes, %.3f s", path, page, status, transferred,
                  time.monotonic() - started)

        if status == 410 and "continue" in params:
            raise _Expired(page)
        if status != 200:
            raise self._status_error(path, f"page {page}", response, response.content, page)
        try:
            body = json.loads(response.content)
        except ValueError as exc:
            raise self._error(path, page, f"response is not JSON ({exc})", status=status) from None
        if not isinstance(body, dict):
            raise self._error(path, page, f"not a List: the body is a JSON {type(body).__name__}",
                              status=status)
        items = body.get("items")
        if not isinstance(items, list):
            what = "missing" if items is None else f"a JSON {type(items).__name__}"
            raise self._error(path, page, f"not a List: items is {what}", status=status)
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise self._error(path, page, f"not a List: items[{i}] is not an object", status=status)
        return body

    def _connect_timeout(self):
        return self.timeout[0] if isinstance(self.timeout, tuple) else self.timeout

    def _read_timeout(self):
        return self.timeout[1] if isinstance(self.timeout, tuple) else self.timeout


class WatchStream:
    """One open watch response: its events as they arrive, one JSON object a
    line, as kube-apiserver writes them.

    Iterating yields {"type": ADDED|MODIFIED|DELETED|BOOKMARK, "object": {...}}
    and ends when the server ends the stream (its timeoutSeconds). An ERROR
    event raises ApiError with the Status code as `status` (410: the
    resourceVersion is too old, list again); a line that is not such an
    event raises WatchEventError; a cut connection or a silence longer than
    the read timeout raise ApiError. Bytes read are added to the client's
    byte_count as they arrive. close() may be called from another thread: it
    ends a blocked read at once and the iteration then stops quietly. A
    stream read to its end leaves its connection to the session for reuse.
    """

    def __init__(self, client: ApiClient, response: requests.Response, path: str, where: str,
                 read_timeout: float):
        self._client = client
        self._read_timeout = read_timeout
        self._response = response
        self.path = path
        self._where = where
        self._closed = False
        self._finished = False
        connection = getattr(response.raw, "connection", None)
        self._sock = getattr(connection, "sock", None)
        self.events = 0

    def close(self) -> None:
        self._closed = True
        sock = self._sock
        if sock is not None:
            try:
                # the socket-level shutdown wakes a read blocked in another
                # thread, TLS or not; close() alone would not
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "WatchStream":
        return self

    def __exit__(self, *exc) -> None:
        if not self._finished:
            self.close()
            self._response.close()

    def __iter__(self) -> Iterator[dict]:
        raw = self._response.raw
        buffer = bytearray()
        try:
            while True:
                before = raw.tell()
                try:
                    data = raw.read1(65536)
                except Exception as exc:  # noqa: BLE001 - urllib3 wraps socket errors many ways
                    if self._closed:
                        return
                    raise self._failure(exc) from None
                finally:
                    self._client.byte_count += raw.tell() - before
                if not data:
                    if self._closed:
                        return
                    if buffer.strip():
                        raise self._bad(bytes(buffer), "the stream ended inside an event")
                    self._finished = True
                    return
                searched = len(buffer)
                buffer += data
                end = buffer.find(b"\n", searched)
                while end != -1:
                    line = bytes(buffer[:end])
                    del buffer[:end + 1]
                    if line.strip():
                        yield self._event(line)
                    end = buffer.find(b"\n")
                if len(buffer) > MAX_EVENT_BYTES:
                    raise self._bad(bytes(buffer[:200]),
                                    f"an event longer than {MAX_EVENT_BYTES} bytes")
        finally:
            if self._finished:
                raw.release_conn()
            else:
                self._response.close()

    def _failure(self, exc: BaseException) -> ApiError:
        if isinstance(exc, (ReadTimeoutError, TimeoutError)):
            cause = f"no data within the read timeout ({self._read_timeout} s)"
        elif exc.args and isinstance(exc.args[0], str):       # urllib3's ProtocolError
            cause = f"stream broken: {exc.args[0]}"
        else:
            cause = f"stream broken: {_innermost(exc)}"
        return self._client._error(self.path, None, cause, where=self._where)

    def _bad(self, line: bytes, cause: str) -> WatchEventError:
        text = line[:80].decode("utf-8", "replace")     # the event's head, not its content
        error = self._client._error(self.path, None, f"event {self.events + 1}: {cause}: {text!r}",
                                    where=self._where)
        return WatchEventError(str(error), path=self.path)

    def _event(self, line: bytes) -> dict:
        try:
            event = json.loads(line)
        except ValueError:
            raise self._bad(line, "not JSON") from None
        if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
            raise self._bad(line, "not a watch event (an object with type and object)")
        kind = event.get("type")
        if kind == "ERROR":
            status = event["object"]
            code = status.get("code")
            message = status.get("message") if isinstance(status.get("message"), str) else ""
            reason = status.get("reason") if isinstance(status.get("reason"), str) else "Error"
            raise self._client._error(self.path, None, f"ERROR event: {code} {reason}: {message[:300]}",
                                      status=code if isinstance(code, int) else None,
                                      where=self._where)
        if kind not in WATCH_EVENT_TYPES:
            raise self._bad(line, f"unknown event type {kind!r}")
        self.events += 1
        return event


def _part(timeout, index: int):
    """One part of a requests timeout, which is a number or (connect, read)."""
    return timeout[index] if isinstance(timeout, tuple) else timeout


def _status_message(content: bytes) -> str:
    """The message of a Kubernetes Status body, shortened, or ""."""
    try:
        body = json.loads(content)
    except ValueError:
        return ""
    if isinstance(body, dict) and body.get("kind") == "Status" and isinstance(body.get("message"), str):
        message = body["message"]
        return message if len(message) <= 300 else message[:300] + "..."
    return ""


def _innermost(exc: BaseException) -> str:
    """The most specific cause of a requests exception, without the pool's wrapping."""
    cause: BaseException = exc
    while True:
        inner = getattr(cause, "reason", None)
        if not isinstance(inner, BaseException) and cause.args and isinstance(cause.args[0], BaseException):
            inner = cause.args[0]
        if not isinstance(inner, BaseException) or inner is cause:
            break
        cause = inner
    text = str(cause) or type(cause).__name__
    return text if len(text) <= 300 else text[:300] + "..."
