"""deploy/ and the Dockerfile hold what a reviewer of a node-level enforcer checks.

Three kinds of test: the Kubernetes schemas (kubernetes-validate, offline), the
scanners (checkov on manifests and Dockerfile, hadolint on the Dockerfile),
and the facts themselves read with PyYAML (RBAC, privileges, probes, flags).
The scanners live in their own virtualenv: $KPM_SCAN_BIN, by default
.venv-scan/bin (`pip install -r requirements-scan.txt`). A missing scanner
fails the test rather than skipping it.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from lib import kubeapi

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKERFILE = REPO / "Dockerfile"
SCAN_BIN = Path(os.environ.get("KPM_SCAN_BIN", REPO / ".venv-scan" / "bin"))
KUBERNETES_VERSION = "1.37.0"
SCAN_TIMEOUT = 300

IMAGE = re.compile(r"^ghcr\.io/kube-policy-manager/kube-policy-manager:\d+\.\d+\.\d+(@sha256:[0-9a-f]{64})?$")
BASE_IMAGE = re.compile(r"^python:3\.11(\.\d+)?-slim-bookworm(@sha256:[0-9a-f]{64})?$")
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "Namespace", "PriorityClass"}
READ_VERBS = {"get", "list", "watch"}
SKIP_ANNOTATION = "checkov.io/skip"


# ---------------------------------------------------------------- helpers

def kustomize_dirs() -> list[Path]:
    return sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml"))


def manifest_files() -> list[Path]:
    """Every Kubernetes manifest in deploy/ (kustomization files are kustomize's own config)."""
    return sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml")


class StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        duplicates = sorted({k for k in keys if keys.count(k) > 1}, key=str)
        if duplicates:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {duplicates}",
                                                    node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.load_all(path.read_text(), Loader=StrictLoader) if d is not None]


def load_kustomization(kdir: Path) -> dict:
    (kust,) = load_docs(kdir / "kustomization.yaml")
    return kust


def render(kdir: Path) -> list[dict]:
    """What `kustomize build` makes of the directory, for the fields kustomize changes here.

    Namespace goes on namespaced objects and on ServiceAccount subjects of
    bindings; label pairs go on metadata and, with includeTemplates, on pod
    templates."""
    kust = load_kustomization(kdir)
    ns = kust.get("namespace")
    out = []
    for name in kust["resources"]:
        for doc in load_docs(kdir / name):
            meta = doc.setdefault("metadata", {})
            if ns and doc["kind"] not in CLUSTER_SCOPED:
                meta["namespace"] = ns
            if ns and doc["kind"] in ("ClusterRoleBinding", "RoleBinding"):
                for subject in doc.get("subjects", []):
                    if subject["kind"] == "ServiceAccount":
                        subject["namespace"] = ns
            for label_set in kust.get("labels", []):
                meta.setdefault("labels", {}).update(label_set["pairs"])
                template = doc.get("spec", {}).get("template")
                if template is not None and label_set.get("includeTemplates"):
                    template.setdefault("metadata", {}).setdefault("labels", {}).update(label_set["pairs"])
            out.append(doc)
    return out


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def main_docs() -> list[dict]:
    return render(DEPLOY)


def main_container(ds: dict) -> dict:
    containers = ds["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "DaemonSet kube-policy-manager: spec.template.spec.containers: expected one"
    return containers[0]


def comments(text: str) -> str:
    """The comment part of every line (manifests hold no '#' inside values)."""
    return "\n".join(line.split("#", 1)[1] for line in text.splitlines() if "#" in line)


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def scan_tool(name: str) -> str:
    path = SCAN_BIN / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"scanner {name} not found in {SCAN_BIN} (set KPM_SCAN_BIN, or run: "
                    f"python3 -m venv .venv-scan && .venv-scan/bin/pip install -r requirements-scan.txt)")
    return str(path)


def run_tool(argv: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=SCAN_TIMEOUT,
                          stdin=subprocess.DEVNULL)


def checkov(framework: str, target: list[str], cwd: Path = REPO) -> dict:
    """checkov's JSON report; --skip-download keeps it offline.

    Give target paths absolute: with a relative --directory checkov 3.3.30
    reports a wrong file_abs_path (the directory twice)."""
    proc = run_tool([scan_tool("checkov"), "--framework", framework, *target, "--skip-download",
                     "--output", "json"], cwd)
    assert proc.returncode in (0, 1), f"checkov failed to run ({proc.returncode}): {proc.stderr[-2000:]}"
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    assert [r["check_type"] for r in reports] == [framework], proc.stdout[:500]
    return reports[0]


def findings(report: dict, key: str, root: Path) -> set[tuple[str, str, str]]:
    """(file under root, resource, check id) of one result list of a checkov report.

    A Dockerfile's resource name is its path: made relative too."""
    return {(str(Path(c["file_abs_path"]).relative_to(root)), c["resource"].replace(f"{root}/", ""),
             c["check_id"])
            for c in report["results"].get(key, [])}


def describe(report: dict, key: str) -> list[str]:
    return [f"{c['check_id']} {c['check_name']} ({c['file_path']}: {c['resource']})"
            for c in report["results"].get(key, [])]


# ---------------------------------------------------------------- schemas

def test_every_manifest_matches_the_kubernetes_schema():
    files = manifest_files()
    proc = run_tool([scan_tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION,
                     *map(str, files)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    passed = [line for line in proc.stdout.splitlines() if " passed for resource " in line]
    assert len(passed) == sum(len(load_docs(f)) for f in files), proc.stdout


def test_schema_validation_is_strict(tmp_path):
    """A misspelled field is an error, not a warning: otherwise the test above proves little."""
    bad = tmp_path / "daemonset.yaml"
    bad.write_text((DEPLOY / "daemonset.yaml").read_text().replace("hostNetwork:", "hostNetwrok:"))
    proc = run_tool([scan_tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, str(bad)])
    assert proc.returncode != 0
    assert "'hostNetwrok' was unexpected" in proc.stdout + proc.stderr


# ---------------------------------------------------------------- scanners

@pytest.fixture(scope="module")
def manifest_scan() -> dict:
    return checkov("kubernetes", ["--directory", str(DEPLOY)])


@pytest.fixture(scope="module")
def dockerfile_scan() -> dict:
    return checkov("dockerfile", ["--file", str(DOCKERFILE)])


def test_checkov_finds_nothing_unjustified_in_the_manifests(manifest_scan):
    summary = manifest_scan["summary"]
    assert summary["parsing_errors"] == 0
    assert summary["resource_count"] >= sum(len(load_docs(f)) for f in manifest_files())
    assert summary["failed"] == 0, describe(manifest_scan, "failed_checks")
    for check in manifest_scan["results"]["skipped_checks"]:
        reason = check["check_result"]["suppress_comment"]
        assert len(reason) >= 20 and reason != "No comment provided", (check["check_id"], reason)


def test_every_manifest_skip_is_explained_beside_its_field():
    for path in manifest_files():
        text = path.read_text()
        for doc in load_docs(path):
            annotations = doc["metadata"].get("annotations") or {}
            for key, value in annotations.items():
                if not key.startswith(SKIP_ANNOTATION):
                    continue
                # checkov splits the value on '=': a second one breaks its parser.
                assert value.count("=") == 1, f"{path.name}: {key}: one '=' between id and reason"
                check_id = value.split("=")[0]
                assert re.search(rf"\b{check_id}\b", comments(text)), (
                    f"{path.name}: {check_id} is skipped but no comment beside a field names it")


def test_every_manifest_skip_hides_a_real_finding(manifest_scan, tmp_path):
    """Without the skip annotations checkov reports exactly the skipped checks: no stale skip."""
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy)
    for path in copy.rglob("*.yaml"):
        kept = [line for line in path.read_text().splitlines(keepends=True) if SKIP_ANNOTATION not in line]
        path.write_text("".join(kept))
    bare = checkov("kubernetes", ["--directory", str(copy)], cwd=tmp_path)
    skipped = findings(manifest_scan, "skipped_checks", DEPLOY)
    assert skipped, "the manifests carry skips, so the report must list them"
    assert findings(bare, "failed_checks", copy) == skipped


def test_checkov_finds_nothing_unjustified_in_the_dockerfile(dockerfile_scan):
    assert dockerfile_scan["summary"]["parsing_errors"] == 0
    assert dockerfile_scan["summary"]["failed"] == 0, describe(dockerfile_scan, "failed_checks")
    for check in dockerfile_scan["results"]["skipped_checks"]:
        reason = check["check_result"]["suppress_comment"].strip()
        assert len(reason) >= 20 and reason != "No comment provided", (check["check_id"], reason)


def test_every_dockerfile_skip_hides_a_real_finding(dockerfile_scan, tmp_path):
    kept = [line for line in DOCKERFILE.read_text().splitlines(keepends=True) if "checkov:skip" not in line]
    (tmp_path / "Dockerfile").write_text("".join(kept))
    bare = checkov("dockerfile", ["--file", str(tmp_path / "Dockerfile")], cwd=tmp_path)
    skipped = findings(dockerfile_scan, "skipped_checks", REPO)
    assert skipped
    assert findings(bare, "failed_checks", tmp_path) == skipped


def test_hadolint_finds_nothing_in_the_dockerfile():
    proc = run_tool([scan_tool("hadolint"), "--format", "json", "--no-color", str(DOCKERFILE)])
    assert json.loads(proc.stdout or "[]") == [], proc.stdout
    assert proc.returncode == 0, proc.stderr


def test_hadolint_does_flag_an_unpinned_install(tmp_path):
    """The linter is live: dropping a version pin is reported (DL3008)."""
    loose = tmp_path / "Dockerfile"
    loose.write_text(DOCKERFILE.read_text().replace("ipset=7.17-1", "ipset"))
    proc = run_tool([scan_tool("hadolint"), "--format", "json", "--no-color", str(loose)])
    assert "DL3008" in {finding["code"] for finding in json.loads(proc.stdout)}


# ---------------------------------------------------------------- YAML and kustomize

def test_strict_loader_refuses_a_duplicate_key():
    """Every load here goes through it, so a field given twice cannot hide the first."""
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate keys"):
        yaml.load("a:\n  b: 1\n  b: 2\n", Loader=StrictLoader)


def test_each_kustomization_lists_every_manifest_of_its_directory():
    assert kustomize_dirs() == [DEPLOY, DEPLOY / "cleanup"]
    assert {p.parent for p in manifest_files()} <= set(kustomize_dirs()), "a manifest outside any kustomization"
    for kdir in kustomize_dirs():
        listed = load_kustomization(kdir)["resources"]
        present = sorted(p.name for p in kdir.glob("*.yaml") if p.name != "kustomization.yaml")
        assert sorted(listed) == present, kdir
        assert len(listed) == len(set(listed)), kdir


def test_kustomize_changes_no_namespace_and_no_selector():
    """`kubectl apply -k` and a plain read of the files agree; DaemonSet selectors stay as written."""
    for kdir in kustomize_dirs():
        kust = load_kustomization(kdir)
        for label_set in kust.get("labels", []):
            assert label_set.get("includeSelectors") is False, kdir
        for name in kust["resources"]:
            for doc in load_docs(kdir / name):
                if doc["kind"] not in CLUSTER_SCOPED:
                    assert doc["metadata"].get("namespace") == kust["namespace"], (name, doc["kind"])
                for subject in doc.get("subjects", []):
                    assert subject.get("namespace") == kust["namespace"], name


def test_service_account_binding_and_daemonset_agree():
    docs = main_docs()
    sa, crb, role, ds = (one(docs, k) for k in ("ServiceAccount", "ClusterRoleBinding", "ClusterRole", "DaemonSet"))
    assert crb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                              "name": role["metadata"]["name"]}
    assert crb["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                "namespace": sa["metadata"]["namespace"]}]
    pod = ds["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert ds["metadata"]["namespace"] == sa["metadata"]["namespace"] == "kube-system"


def test_common_labels_reach_every_object_and_pod():
    for kdir in kustomize_dirs():
        for doc in render(kdir):
            assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "kube-policy-manager"
            if doc["kind"] == "DaemonSet":
                template_labels = doc["spec"]["template"]["metadata"]["labels"]
                assert template_labels["app.kubernetes.io/part-of"] == "kube-policy-manager"
                selector = doc["spec"]["selector"]["matchLabels"]
                assert selector.items() <= template_labels.items()


# ---------------------------------------------------------------- RBAC

def granted_by(role: dict) -> dict:
    """(API group, resource) -> the verbs the ClusterRole grants on it."""
    granted = {}
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no resourceNames, no nonResourceURLs
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


def test_cluster_role_only_reads_what_the_program_uses():
    granted = granted_by(one(main_docs(), "ClusterRole"))
    assert granted == {
        ("", "pods"): READ_VERBS,
        ("", "namespaces"): READ_VERBS,
        ("networking.k8s.io", "networkpolicies"): READ_VERBS,
        ("policy.networking.k8s.io", "adminnetworkpolicies"): READ_VERBS,
        ("policy.networking.k8s.io", "baselineadminnetworkpolicies"): READ_VERBS,
        ("", "nodes"): READ_VERBS,      # get: this node's pod ranges; list, watch: `nodes` peers
    }


def test_cluster_role_grants_list_and_watch_on_every_collection_the_program_reads():
    granted = granted_by(one(main_docs(), "ClusterRole"))
    for path in (kubeapi.NAMESPACES, kubeapi.PODS, kubeapi.NETWORK_POLICIES,
                 kubeapi.ADMIN_NETWORK_POLICIES, kubeapi.BASELINE_ADMIN_NETWORK_POLICIES,
                 kubeapi.NODES):
        parts = path.strip("/").split("/")         # api/v1/R or apis/GROUP/VERSION/R
        group = "" if parts[0] == "api" else parts[1]
        assert {"list", "watch"} <= granted.get((group, parts[-1]), set()), path


def test_no_manifest_grants_a_wildcard_or_secrets():
    for path in manifest_files():
        for doc in load_docs(path):
            for rule in doc.get("rules", []):
                for field in ("apiGroups", "resources", "verbs"):
                    assert "*" not in rule.get(field, []), (path.name, rule)
                assert not {"secrets", "serviceaccounts/token"} & set(rule.get("resources", [])), rule
                assert set(rule["verbs"]) <= READ_VERBS, rule


# ---------------------------------------------------------------- the DaemonSet

def test_daemonset_runs_in_the_node_network_on_every_node():
    ds = one(main_docs(), "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"], "must tolerate every taint"
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is True
    assert pod["terminationGracePeriodSeconds"] <= 10
    assert not pod.get("hostPID") and not pod.get("hostIPC")
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate",
                                            "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}


def test_service_account_token_is_mounted_only_where_asked():
    sa = one(main_docs(), "ServiceAccount")
    assert sa["automountServiceAccountToken"] is False


def test_container_holds_only_net_admin_and_net_raw():
    security = main_container(one(main_docs(), "DaemonSet"))["securityContext"]
    assert security.get("privileged", False) is False
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert sorted(security["capabilities"]["add"]) == ["NET_ADMIN", "NET_RAW"]
    assert security["runAsUser"] == 0


def test_node_name_comes_from_the_downward_api():
    env = {e["name"]: e for e in main_container(one(main_docs(), "DaemonSet"))["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}


def test_probes_ask_the_health_endpoints_of_the_metrics_port():
    container = main_container(one(main_docs(), "DaemonSet"))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    expected = {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/readyz"}
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert get["port"] == "metrics", probe
    assert f"--metrics-port={ports['metrics']}" in container["args"]


def test_only_host_path_is_the_xtables_lock():
    ds = one(main_docs(), "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    host_paths = {v["name"]: v["hostPath"] for v in pod["volumes"] if "hostPath" in v}
    assert host_paths == {"xtables-lock": {"path": "/run/xtables.lock", "type": "FileOrCreate"}}
    mounts = {m["name"]: m for m in main_container(ds)["volumeMounts"]}
    assert mounts["xtables-lock"]["mountPath"] == "/run/xtables.lock"
    assert not mounts["xtables-lock"].get("readOnly", False)


def test_resources_request_and_cap_memory():
    resources = main_container(one(main_docs(), "DaemonSet"))["resources"]
    assert resources["requests"] == {"cpu": "50m", "memory": "64Mi"}
    assert resources["limits"] == {"memory": "256Mi"}


def test_image_is_pinned_and_the_same_everywhere():
    images = set()
    for path in manifest_files():
        for doc in load_docs(path):
            if doc["kind"] != "DaemonSet":
                continue
            pod = doc["spec"]["template"]["spec"]
            for container in pod.get("initContainers", []) + pod["containers"]:
                assert IMAGE.match(container["image"]), (path.name, container["image"])
                assert container["imagePullPolicy"] == "IfNotPresent"
                images.add(container["image"])
    assert len(images) == 1, images


def test_reconcile_accepts_the_manifest_arguments(monkeypatch):
    """The flags in the manifests parse with the program's own parser: no crash loop on a typo."""
    import reconcile

    monkeypatch.setenv("NODE_NAME", "node-a")
    ds = one(main_docs(), "DaemonSet")
    args = reconcile.parse_args(main_container(ds)["args"])
    assert args.node_name == "node-a"
    assert args.metrics_port == 9101
    cleanup = one(render(DEPLOY / "cleanup"), "DaemonSet")
    (init,) = cleanup["spec"]["template"]["spec"]["initContainers"]
    assert reconcile.parse_args(init["args"]).cleanup is True


def test_cleanup_daemonset_cleans_every_node_and_then_holds_no_privilege():
    ds = one(render(DEPLOY / "cleanup"), "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["automountServiceAccountToken"] is False
    assert {"operator": "Exists"} in pod["tolerations"]
    assert pod["priorityClassName"] == "system-node-critical"
    (init,) = pod["initContainers"]
    assert "--cleanup" in init["args"]
    assert sorted(init["securityContext"]["capabilities"]["add"]) == ["NET_ADMIN", "NET_RAW"]
    assert {m["mountPath"] for m in init["volumeMounts"]} == {"/run/xtables.lock"}
    (holder,) = pod["containers"]
    assert holder["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert holder["securityContext"]["runAsNonRoot"] is True
    assert "volumeMounts" not in holder


# ---------------------------------------------------------------- Dockerfile

def test_dockerfile_base_is_pinned_python_on_debian_12():
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    froms = [args for word, args in instructions if word == "FROM"]
    assert len(froms) == 1 and BASE_IMAGE.match(froms[0]), froms


def apt_pins() -> dict[str, str]:
    runs = [args for word, args in dockerfile_instructions(DOCKERFILE.read_text()) if word == "RUN"]
    installs = [r for r in runs if "apt-get install" in r]
    assert len(installs) == 1, runs
    words = shlex.split(installs[0])
    assert "--no-install-recommends" in words
    assert "rm -rf /var/lib/apt/lists/*" in installs[0], "the package lists stay out of the image"
    return dict(w.split("=", 1) for w in words if re.match(r"^[a-z0-9.+-]+=\S+$", w))


def test_dockerfile_installs_the_netfilter_tools_pinned():
    assert set(apt_pins()) == {"iptables", "ipset", "conntrack", "nftables"}


def test_image_tools_are_the_versions_the_kernel_tests_run():
    """The pins equal the Debian 12 packages installed here, where tests/kernel exercises them.

    Fails when Debian ships an update: the old version then leaves the
    mirror and the image build would fail too; move the pin."""
    for package, pinned in apt_pins().items():
        proc = subprocess.run(["dpkg-query", "--show", "--showformat=${Version}", package],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, f"{package} is not installed here: {proc.stderr}"
        assert proc.stdout == pinned, f"Dockerfile pins {package}={pinned}, this machine has {proc.stdout}"


def test_dockerfile_installs_requirements_and_runs_reconcile():
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    runs = [args for word, args in instructions if word == "RUN"]
    assert any(re.search(r"pip install --no-cache-dir -r \S*requirements\.txt", r) for r in runs), runs
    copies = [args.split()[0] for word, args in instructions if word == "COPY"]
    assert copies == ["requirements.txt", "reconcile.py", "lib/"]
    entry = [json.loads(args) for word, args in instructions if word == "ENTRYPOINT"]
    assert entry == [["python", "/app/reconcile.py"]]
    assert not [args for word, args in instructions if word == "USER"], "runs as uid 0, see the Dockerfile"


def test_dockerignore_sends_only_what_the_image_copies():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert patterns[0] == "*", "exclude everything, then re-include"
    included = sorted(p[1:] for p in patterns if p.startswith("!"))
    copies = sorted(args.split()[0] for word, args in dockerfile_instructions(DOCKERFILE.read_text())
                    if word == "COPY")
    assert included == copies
    for source in copies:
        assert (REPO / source).exists(), source
