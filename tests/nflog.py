"""A small NFLOG listener: what `-j NFLOG --nflog-group G` sends, read over a
raw netlink socket (NETLINK_NETFILTER, subsystem nfnetlink_log), as ulogd
would read it.

The socket belongs to the network namespace it is created in, so the
listener is made from a thread that entered the namespace
(`tests.lab.netns.inside`) and then hears only that namespace's rules. In a
namespace other than the host's this is the way to see logged packets: the
LOG target writes nothing there unless the host-wide sysctl
net.netfilter.nf_log_all_netns is 1.

Message layout (include/uapi/linux/netfilter/nfnetlink_log.h): a netlink
header, a `struct nfgenmsg` (family, version, group), then attributes. Each
packet carries NFULA_PREFIX (NUL-terminated), NFULA_PACKET_HDR (hook) and,
with copy mode "packet", NFULA_PAYLOAD: the packet from its IP header on.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from tests.lab.netns import inside

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET, NFULNL_MSG_CONFIG = 0, 1
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4

NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_TIMEOUT, NFULA_CFG_QTHRESH = 1, 2, 4, 5
NFULNL_CFG_CMD_BIND, NFULNL_CFG_CMD_UNBIND = 1, 2
NFULNL_COPY_PACKET = 2

NFULA_PACKET_HDR, NFULA_IFINDEX_INDEV, NFULA_IFINDEX_OUTDEV = 1, 4, 5
NFULA_PAYLOAD, NFULA_PREFIX = 9, 10
NLA_TYPE_MASK = 0x3FFF                   # without NLA_F_NESTED / NLA_F_NET_BYTEORDER

HOOKS = {0: "PREROUTING", 1: "INPUT", 2: "FORWARD", 3: "OUTPUT", 4: "POSTROUTING"}
PORT_PROTOCOLS = {6: "tcp", 17: "udp", 132: "sctp"}
PROTOCOL_NAMES = {1: "icmp", 58: "ipv6-icmp", **PORT_PROTOCOLS}
COPY_RANGE = 0xFFFF
_NLMSG = struct.Struct("=IHHII")          # length, type, flags, sequence, port id
_NLATTR = struct.Struct("=HH")            # length, type


class NflogError(RuntimeError):
    pass


@dataclass(frozen=True)
class LogRecord:
    """One logged packet."""
    group: int
    prefix: str
    hook: str                      # "FORWARD", "INPUT", ...
    family: int                    # 4 or 6
    src: str
    dst: str
    protocol: str                  # "tcp", "udp", "icmp", ... or the number
    dport: Optional[int] = None
    indev: Optional[int] = None    # interface index
    outdev: Optional[int] = None

    def line(self) -> str:
        port = f" dport={self.dport}" if self.dport is not None else ""
        return (f"{self.prefix}hook={self.hook} family=IPv{self.family} src={self.src} "
                f"dst={self.dst} proto={self.protocol}{port}")


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attr(kind: int, payload: bytes) -> bytes:
    raw = _NLATTR.pack(_NLATTR.size + len(payload), kind) + payload
    return raw + b"\0" * (_align(len(raw)) - len(raw))


def _attrs(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    i = 0
    while i + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, i)
        if length < _NLATTR.size or i + length > len(data):
            break
        out.setdefault(kind & NLA_TYPE_MASK, data[i + _NLATTR.size:i + length])
        i += _align(length)
    return out


def parse_payload(payload: bytes) -> tuple[int, str, str, str, Optional[int]]:
    """(family, source, destination, protocol, destination port) of an IP packet."""
    if not payload:
        raise NflogError("empty payload")
    version = payload[0] >> 4
    if version == 4 and len(payload) >= 20:
        header = (payload[0] & 0x0F) * 4
        proto = payload[9]
        src, dst = str(ipaddress.IPv4Address(payload[12:16])), str(ipaddress.IPv4Address(payload[16:20]))
    elif version == 6 and len(payload) >= 40:
        header, proto = 40, payload[6]        # extension headers are not followed
        src, dst = str(ipaddress.IPv6Address(payload[8:24])), str(ipaddress.IPv6Address(payload[24:40]))
    else:
        raise NflogError(f"not an IP packet (version {version}, {len(payload)} bytes)")
    dport = None
    if proto in PORT_PROTOCOLS and len(payload) >= header + 4:
        dport = struct.unpack_from(">H", payload, header + 2)[0]
    return version, src, dst, PROTOCOL_NAMES.get(proto, str(proto)), dport


def parse_packet_message(group: int, body: bytes) -> LogRecord:
    """A NFULNL_MSG_PACKET body (after the netlink header): nfgenmsg, then attributes."""
    attrs = _attrs(body[4:])
    prefix = attrs.get(NFULA_PREFIX, b"").split(b"\0", 1)[0].decode("ascii", "replace")
    hook = None
    if NFULA_PACKET_HDR in attrs and len(attrs[NFULA_PACKET_HDR]) >= 3:
        hook = attrs[NFULA_PACKET_HDR][2]
    family, src, dst, proto, dport = parse_payload(attrs.get(NFULA_PAYLOAD, b""))

    def index(kind: int) -> Optional[int]:
        raw = attrs.get(kind)
        return struct.unpack(">I", raw[:4])[0] if raw and len(raw) >= 4 else None

    return LogRecord(group, prefix, HOOKS.get(hook, str(hook)), family, src, dst, proto, dport,
                     index(NFULA_IFINDEX_INDEV), index(NFULA_IFINDEX_OUTDEV))


class NflogListener:
    """Listens on one NFLOG group inside one network namespace, collecting
    records in a background thread until close()."""

    def __init__(self, netns: str, group: int):
        self.netns = netns
        self.group = group
        self._records: list[LogRecord] = []
        self._errors: list[str] = []
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._seq = 0
        with inside(netns):
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self._sock.bind((0, 0))
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            self._configure(_attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND])))
            self._configure(_attr(NFULA_CFG_MODE, struct.pack(">IBB", COPY_RANGE, NFULNL_COPY_PACKET, 0))
                            + _attr(NFULA_CFG_QTHRESH, struct.pack(">I", 1))
                            + _attr(NFULA_CFG_TIMEOUT, struct.pack(">I", 1)))
        except BaseException:
            self._sock.close()
            raise
        self._thread = threading.Thread(target=self._read, name=f"nflog-{group}", daemon=True)
        self._thread.start()

    def __enter__(self) -> "NflogListener":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- configuration ----------------------------------------------------------

    def _configure(self, attributes: bytes) -> None:
        """One config message for our group, acknowledged or NflogError."""
        self._seq += 1
        body = struct.pack("=BB", socket.AF_UNSPEC, 0) + struct.pack(">H", self.group) + attributes
        header = _NLMSG.pack(_NLMSG.size + len(body), (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG,
                             NLM_F_REQUEST | NLM_F_ACK, self._seq, 0)
        self._sock.sendto(header + body, (0, 0))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self._sock], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            data = self._sock.recv(65536)
            for kind, seq, payload in self._messages(data):
                if kind == NLMSG_ERROR and seq == self._seq:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code:
                        raise NflogError(f"NFLOG group {self.group} in {self.netns}: "
                                         f"configuration refused: {errno.errorcode.get(code, code)} "
                                         f"({os.strerror(code)})")
                    return
        raise NflogError(f"NFLOG group {self.group} in {self.netns}: no answer to configuration")

    @staticmethod
    def _messages(data: bytes):
        i = 0
        while i + _NLMSG.size <= len(data):
            length, kind, _flags, seq, _pid = _NLMSG.unpack_from(data, i)
            if length < _NLMSG.size or i + length > len(data):
                break
            yield kind, seq, data[i + _NLMSG.size:i + length]
            i += _align(length)

    # -- reading ------------------------------------------------------------------

    def _read(self) -> None:
        packet_type = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._sock], [], [], 0.1)
                if not ready:
                    continue
                data = self._sock.recv(1 << 17)
            except OSError as exc:
                if self._stop.is_set():
                    return
                with self._lock:
                    self._errors.append(f"recv: {exc}")
                if exc.errno == errno.ENOBUFS:       # records were lost; later ones still come
                    continue
                return
            for kind, _seq, body in self._messages(data):
                if kind != packet_type:
                    continue
                try:
                    record = parse_packet_message(self.group, body)
                except (NflogError, ValueError, struct.error) as exc:
                    with self._lock:
                        self._errors.append(str(exc))
                    continue
                with self._lock:
                    self._records.append(record)
                    self._lock.notify_all()

    def records(self) -> list[LogRecord]:
        with self._lock:
            return list(self._records)

    def errors(self) -> list[str]:
        with self._lock:
            return list(self._errors)

    def clear(self) -> None:
        with self._lock:
            self._records.clear()

    def wait_for(self, match: Callable[[LogRecord], bool], timeout: float = 2.0) -> Optional[LogRecord]:
        """The first record (already heard or arriving within `timeout`) that matches."""
        found = self.wait_count(match, 1, timeout)
        return found[0] if found else None

    def wait_count(self, match: Callable[[LogRecord], bool], count: int,
                   timeout: float = 2.0) -> list[LogRecord]:
        """The matching records once there are `count` of them, or all there
        are when `timeout` runs out (records are read in the background, so
        the last ones of a burst may still be on their way)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = [r for r in self._records if match(r)]
                left = deadline - time.monotonic()
                if len(found) >= count or left <= 0:
                    return found
                self._lock.wait(left)

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(2)
        try:
            self._configure(_attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_UNBIND])))
        except (OSError, NflogError):
            pass                     # the socket's close unbinds it as well
        self._sock.close()
