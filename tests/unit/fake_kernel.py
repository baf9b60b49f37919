"""A kernel stand-in that applies restore payloads with the real tools'
semantics, for property tests of lib.plan without root.

What it models, as measured on iptables 1.8.9 / ipset 7.17:
- iptables-restore --noflush: `:X - [0:0]` creates or flushes X; `-A`, `-I [N]`,
  `-D spec|N`, `-F [X]`, `-X [X]`, `-N X`; a jump to a chain that does not
  exist, a set that does not exist, deleting a chain that is referenced, not
  empty or built in, deleting a rule that is not there: the line fails and the
  whole `*filter` block is dropped (all or nothing). Built-in chains appear
  with policy ACCEPT when a block touches a table that has none.
- ipset restore: not atomic, stops at the first failing line with the lines
  before it applied; `-exist` ignores re-creating an identical set, adding a
  member that is there and deleting one that is not; destroying a set that a
  rule uses fails ("in use"); members are stored canonically.

Tokenizing follows iptables-restore's C tokenizer and is written here
independently of lib.iptables_save, so a quoting bug there shows up.
"""
from __future__ import annotations

from dataclasses import dataclass

from lib.ipsets import IpsetParseError, canonical_member
from lib.iptables_save import saved_rule
from lib.plan import KernelState, Plan, SavedRule, TableState
from lib.ruleset import FAMILIES, PREFIX, DesiredState, IpSet

BUILTINS = ("INPUT", "FORWARD", "OUTPUT")
STANDARD_TARGETS = {"ACCEPT", "DROP", "RETURN", "QUEUE", "REJECT", "LOG", "NFLOG", "MARK",
                    "CONNMARK", "CT", "NOTRACK", "TRACE", "TCPMSS"}
DEFAULT_MAXELEM = 65536


class RestoreError(Exception):
    """A payload line the real tool would refuse."""


def restore_argv(line: str) -> list[str]:
    """iptables-restore's add_param_to_argv, transcribed: a `"` opens a
    quote anywhere; inside, `\\` takes the next character; the closing quote
    ends the token (even an empty one)."""
    out: list[str] = []
    param: list[str] = []
    quote_open = escaped = False
    for ch in line:
        if quote_open:
            if escaped:
                param.append(ch)
                escaped = False
                continue
            if ch == "\\":
                escaped = True
                continue
            if ch != '"':
                param.append(ch)
                continue
            quote_open = False
        elif ch == '"':
            quote_open = True
            continue
        if ch == '"':
            out.append("".join(param))
            param = []
        elif ch in " \t\n":
            if param:
                out.append("".join(param))
                param = []
        else:
            param.append(ch)
    if quote_open:
        raise RestoreError(f"unterminated quote in {line!r}")
    if param:
        out.append("".join(param))
    return out


@dataclass
class _Set:
    kind: str
    family: int
    maxelem: int
    members: set


class FakeKernel:
    def __init__(self, state: KernelState | None = None):
        state = state or KernelState()
        self.tables: dict[int, tuple[dict, dict]] = {}
        for family, table in state.tables.items():
            self.tables[family] = ({n: list(r) for n, r in table.chains.items()}, dict(table.policies))
        self.sets: dict[str, _Set] = {
            name: _Set(s.kind, s.family, 1048576, set(s.members))
            for name, s in state.sets.items()
        }
        self.log: list[str] = []

    # --- reading --------------------------------------------------------

    @property
    def state(self) -> KernelState:
        tables = {
            f: TableState(f, chains={n: tuple(r) for n, r in chains.items()}, policies=dict(pol))
            for f, (chains, pol) in self.tables.items()
        }
        sets = {n: IpSet(n, s.kind, s.family, frozenset(s.members))
                for n, s in sorted(self.sets.items()) if n.startswith(PREFIX)}
        return KernelState(tables=tables, sets=sets)

    def _set_in_use(self, name: str) -> bool:
        for chains, _ in self.tables.values():
            for rules in chains.values():
                for r in rules:
                    spec = r.spec
                    if any(spec[i] == "--match-set" and spec[i + 1] == name
                           for i in range(len(spec) - 1)):
                        return True
        return False

    # --- iptables-restore --noflush ---------------------------------------

    def iptables_restore(self, family: int, payload: str) -> None:
        block = None      # (chains, policies) copy while inside *filter
        for lineno, raw in enumerate(payload.split("\n"), 1):     # as the C code: "\n" only
            line = raw.strip(" \t")
            if not line or line.startswith("#"):
                continue
            try:
                if line.startswith("*"):
                    if block is not None:
                        raise RestoreError("COMMIT expected")
                    if line != "*filter":
                        raise RestoreError(f"table {line[1:]} not modelled")
                    chains, pol = self.tables.get(family, ({}, {}))
                    block = ({n: list(r) for n, r in chains.items()}, dict(pol))
                    for b in BUILTINS:
                        if b not in block[0]:
                            block[0][b] = []
                            block[1][b] = "ACCEPT"
                elif line == "COMMIT":
                    if block is None:
                        raise RestoreError("COMMIT outside a table")
                    self.tables[family] = block
                    block = None
                elif block is None:
                    raise RestoreError("line outside a table")
                elif line.startswith(":"):
                    self._chain_line(block, line)
                else:
                    self._command(block, restore_argv(line))
            except RestoreError as e:
                raise RestoreError(f"IPv{family} restore line {lineno} failed: {e}: {raw}") from None
        if block is not None:
            raise RestoreError(f"IPv{family} restore: COMMIT missing")
        self.log.append(payload)

    def _chain_line(self, block, line: str) -> None:
        chains, policies = block
        parts = [x for x in line[1:].split(" ") if x]
        if len(parts) < 2:
            raise RestoreError("malformed chain line")
        name, policy = parts[0], parts[1]
        if name in BUILTINS:
            if policy == "-":
                raise RestoreError(f"built-in chain {name} needs a policy")
            policies[name] = policy
            chains.setdefault(name, [])
        else:
            if policy != "-":
                raise RestoreError(f"user chain {name} cannot have a policy")
            chains[name] = []       # --noflush: create, or flush if it exists

    def _check_spec(self, chains: dict, chain: str, spec: list[str]) -> SavedRule:
        rule = saved_rule(chain, spec)
        t = rule.target
        if t is not None and t not in STANDARD_TARGETS and t not in chains:
            raise RestoreError(f"No chain/target/match by that name: {t}")
        if t == chain:
            raise RestoreError("Too many levels of symbolic links")
        for i, tok in enumerate(spec[:-1]):
            if tok == "--match-set" and spec[i + 1] not in self.sets:
                raise RestoreError(f"Set {spec[i + 1]} doesn't exist")
        return rule

    def _need_chain(self, chains: dict, name: str) -> list:
        if name not in chains:
            raise RestoreError(f"chain {name} does not exist")
        return chains[name]

    def _command(self, block, argv: list[str]) -> None:
        chains, policies = block
        if not argv:
            return
        op, rest = argv[0], argv[1:]
        if op == "-A":
            rules = self._need_chain(chains, rest[0])
            rules.append(self._check_spec(chains, rest[0], rest[1:]))
        elif op == "-I":
            rules = self._need_chain(chains, rest[0])
            pos, spec = 1, rest[1:]
            if spec and spec[0].isdigit():
                pos, spec = int(spec[0]), spec[1:]
            if not 1 <= pos <= len(rules) + 1:
                raise RestoreError("Index of insertion too big")
            rules.insert(pos - 1, self._check_spec(chains, rest[0], spec))
        elif op == "-D":
            rules = self._need_chain(chains, rest[0])
            spec = tuple(rest[1:])
            if len(spec) == 1 and spec[0].isdigit():
                i = int(spec[0]) - 1
                if not 0 <= i < len(rules):
                    raise RestoreError("Index of deletion too big")
            else:
                found = [j for j, r in enumerate(rules) if r.spec == spec]
                if not found:
                    raise RestoreError("Bad rule (does a matching rule exist in that chain?)")
                i = found[0]
            del rules[i]
        elif op == "-F":
            for name in ([rest[0]] if rest else list(chains)):
                self._need_chain(chains, name).clear()
        elif op == "-N":
            if rest[0] in chains:
                raise RestoreError("Chain already exists")
            chains[rest[0]] = []
        elif op == "-X":
            names = [rest[0]] if rest else [n for n in chains if n not in BUILTINS]
            for name in names:
                if name in BUILTINS:
                    raise RestoreError(f"cannot delete built-in chain {name}")
                if self._need_chain(chains, name):
                    raise RestoreError(f"Directory not empty: {name}")
                if any(r.target == name for rs in chains.values() for r in rs):
                    raise RestoreError(f"Too many links: {name} is referenced")
                del chains[name]
        else:
            raise RestoreError(f"unknown command {op}")

    # --- ipset restore ----------------------------------------------------

    def ipset_restore(self, payload: str, exist: bool = True) -> None:
        """Line by line; the lines before a failure stay applied."""
        for lineno, raw in enumerate(payload.split("\n"), 1):
            f = raw.split(" ")
            f = [x for x in f if x]
            if not f or f[0].startswith("#"):
                continue
            try:
                self._ipset_line(f, exist)
            except (RestoreError, IpsetParseError) as e:
                raise RestoreError(f"ipset restore line {lineno} failed: {e}: {raw}") from None
        self.log.append(payload)

    def _ipset_line(self, f: list[str], exist: bool) -> None:
        cmd = f[0]
        if cmd == "create":
            name, kind, opts = f[1], f[2], f[3:]
            fam = {"inet": 4, "inet6": 6}[opts[opts.index("family") + 1]] if "family" in opts else 4
            maxelem = int(opts[opts.index("maxelem") + 1]) if "maxelem" in opts else DEFAULT_MAXELEM
            new = _Set(kind, fam, maxelem, set())
            old = self.sets.get(name)
            if old is not None:
                if exist and (old.kind, old.family, old.maxelem) == (kind, fam, maxelem):
                    return
                raise RestoreError("Set cannot be created: set with the same name already exists")
            self.sets[name] = new
        elif cmd in ("add", "del"):
            s = self.sets.get(f[1])
            if s is None:
                raise RestoreError("The set with the given name does not exist")
            try:
                m = canonical_member(s.kind, f[2])
            except IpsetParseError as e:
                raise RestoreError(str(e))
            if cmd == "add":
                if m in s.members and not exist:
                    raise RestoreError("Element cannot be added to the set: it's already added")
                s.members.add(m)
            else:
                if m not in s.members and not exist:
                    raise RestoreError("Element cannot be deleted from the set: it's not added")
                s.members.discard(m)
        elif cmd == "destroy":
            if f[1] not in self.sets:
                raise RestoreError("The set with the given name does not exist")
            if self._set_in_use(f[1]):
                raise RestoreError("Set cannot be destroyed: it is in use by a kernel component")
            del self.sets[f[1]]
        elif cmd == "flush":
            self.sets[f[1]].members.clear()
        else:
            raise RestoreError(f"unknown command {cmd}")

    # --- a whole plan -------------------------------------------------------

    def apply(self, plan: Plan) -> None:
        """In the documented order; the first failure stops it."""
        self.ipset_restore(plan.ipset_prepare)
        for family in FAMILIES:
            self.iptables_restore(family, plan.iptables.get(family, ""))
        for family in FAMILIES:
            self.iptables_restore(family, plan.iptables_cleanup.get(family, ""))
        self.ipset_restore(plan.ipset_cleanup)


def state_of(desired: DesiredState, foreign: KernelState | None = None) -> KernelState:
    """The kernel holding `foreign` plus exactly `desired`, hooks first."""
    foreign = foreign or KernelState()
    tables = {}
    for family in FAMILIES:
        fs = desired.family(family)
        base = foreign.tables.get(family) or TableState(family)
        chains = {n: tuple(r) for n, r in base.chains.items()}
        policies = dict(base.policies)
        for b in BUILTINS:
            chains.setdefault(b, ())
            policies.setdefault(b, "ACCEPT")
        hooks: dict[str, list] = {}
        for hook in fs.hooks:
            hooks.setdefault(hook.builtin, []).append(
                saved_rule(hook.builtin, hook.rule.restore_args()))
        for b, rules in hooks.items():
            chains[b] = tuple(rules) + chains.get(b, ())
        for c in fs.chains:
            chains[c.name] = tuple(saved_rule(c.name, r.restore_args()) for r in c.rules)
        tables[family] = TableState(family, chains=chains, policies=policies)
    return KernelState(tables=tables, sets={**foreign.sets, **desired.set_map()})
