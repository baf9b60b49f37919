# Image of kube-policy-manager: the reconciler and the netfilter tools it runs.
#
# Base pinned to Python 3.11 (the version the project is tested with) on
# Debian 12, whose iptables, ipset and conntrack are the versions the kernel
# tests run against. For a release build pin the digest as well:
#   FROM python:3.11-slim-bookworm@sha256:<digest>
FROM python:3.11-slim-bookworm

# Both iptables backends come with Debian's iptables package
# (iptables-nft-* and iptables-legacy-*); the program picks one per node.
# nftables brings `nft` for the native dataplane (--dataplane nftables).
# Versions are Debian 12's: when a Debian update replaces one, the build
# fails here on purpose, and the pin moves after the tests pass on the new one.
# No kmod: the kernel loads netfilter modules by itself (see deploy/daemonset.yaml).
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        iptables=1.8.9-2 \
        ipset=7.17-1 \
        conntrack=1:1.4.7-1+b2 \
        nftables=1.0.6-2+deb12u2 \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY requirements.txt /app/requirements.txt
RUN pip install --no-cache-dir -r /app/requirements.txt

COPY reconcile.py /app/reconcile.py
COPY lib/ /app/lib/
# Byte-compiled at build time: the root filesystem is read-only at run time.
RUN python -m compileall -q /app

# No USER: the process runs as uid 0, holding only NET_ADMIN and NET_RAW (the
# DaemonSet drops every other capability). A non-root user cannot take the
# host's /run/xtables.lock (root's, mode 0600), and would get the capabilities
# only through file capabilities on the xtables binaries, an extra mechanism
# that gains nothing over a root with two capabilities.
# checkov:skip=CKV_DOCKER_3: runs as uid 0 with only NET_ADMIN and NET_RAW, see the comment above
# No HEALTHCHECK: Kubernetes ignores it; the DaemonSet probes /healthz and
# /readyz on the metrics port instead.
# checkov:skip=CKV_DOCKER_2: Kubernetes ignores HEALTHCHECK; the DaemonSet has HTTP probes
ENTRYPOINT ["python", "/app/reconcile.py"]
