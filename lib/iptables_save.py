"""Parse `iptables-save` / `ip6tables-save` output (either backend) into a
TableState of the filter table.

Rules are kept as the tokens iptables-save printed: the diff compares only the
hashes in our comments, and deleting a rule needs its spec exactly as saved.
The tokenizer follows iptables-restore's own, so `quote(t)` written back into a
restore line reads as `t` again.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

from lib.plan import SavedRule, TableState
from lib.ruleset import COMMENT_TAG, HASH_LEN

TABLE = "filter"
_MAX_SHOWN = 120
_TAG = re.compile(re.escape(COMMENT_TAG) + r"([0-9a-f]{%d})(?: |$)" % HASH_LEN)
_COUNTERS = re.compile(r"^\[\d+:\d+\][ \t]+")
_CHAIN_LINE = re.compile(r"^:([^ \t]+) ([^ \t]+)(?: \[\d+:\d+\])?$")
# Lines end at "\n" only: str.splitlines() would also cut at characters such
# as U+0085 that a quoted comment may hold.
_ASCII_SPACE = " \t\r\n\f\v"
# iptables-nft-save prints this instead of a table it cannot represent.
_INCOMPATIBLE = re.compile(r"^# Table `([^']+)' is incompatible")
# A token that iptables-restore reads back unchanged without quotes.
_BARE = re.compile(r"^[^\s\"'\\]+$")


class SaveParseError(ValueError):
    """The save text is not what iptables-save prints: we refuse to diff
    against a state we could only half read."""


def _shown(line: str) -> str:
    return line if len(line) <= _MAX_SHOWN else line[:_MAX_SHOWN] + "..."


def _error(lineno: int, line: str, why: str) -> SaveParseError:
    return SaveParseError(f"iptables-save line {lineno}: {why}: {_shown(line)!r}")


# One token, after any separators: either characters up to a quoted part,
# which the closing quote ends (`ab"c d"` is `abc d`), or a run of plain ones.
_TOKEN = re.compile(r'[ \t\n]*(?:([^ \t\n"]*)"((?:[^"\\]|\\.)*)"|([^ \t\n"]+))', re.DOTALL)
_SEPARATORS = re.compile(r"[ \t\n]*")
_ESCAPED = re.compile(r"\\(.)", re.DOTALL)


def tokenize(line: str) -> list[str]:
    """Split a rule line as iptables-restore does: whitespace separates,
    "..." groups (a closing quote ends the token), and inside quotes a
    backslash takes the next character literally (\\" \\' \\\\)."""
    tokens: list[str] = []
    pos, end = 0, len(line)
    match = _TOKEN.match
    while pos < end:
        m = match(line, pos)
        if m is None:
            if _SEPARATORS.match(line, pos).end() == end:
                break
            raise ValueError("unterminated quote")
        head, quoted, plain = m.groups()
        if plain is not None:
            tokens.append(plain)
        else:
            tokens.append(head + (_ESCAPED.sub(r"\1", quoted) if "\\" in quoted else quoted))
        pos = m.end()
    return tokens


def quote(token: str) -> str:
    """One token for a restore line, in iptables-save's quoting."""
    if "\n" in token or "\r" in token or "\0" in token:
        raise ValueError(f"token {token!r}: a line break or NUL cannot be written in a restore line")
    if _BARE.match(token):
        return token
    escaped = re.sub(r"([\"'\\])", r"\\\1", token)
    return f'"{escaped}"'


def saved_rule(chain: str, spec: Sequence[str]) -> SavedRule:
    """A SavedRule with our hash (from the first `--comment` carrying our tag)
    and the `-j`/`-g` target. Comment values are skipped when looking for the
    target, so a comment reading "-j" cannot fake one."""
    spec = tuple(spec)
    tag: Optional[str] = None
    target: Optional[str] = None
    i = 0
    while i < len(spec):
        tok = spec[i]
        if tok == "--comment" and i + 1 < len(spec):
            if tag is None:
                m = _TAG.match(spec[i + 1])
                if m:
                    tag = m.group(1)
            i += 2
            continue
        if tok in ("-j", "-g", "--jump", "--goto") and i + 1 < len(spec) and target is None:
            target = spec[i + 1]
            i += 2
            continue
        i += 1
    return SavedRule(chain=chain, spec=spec, hash=tag, target=target)


def parse(text: str, family: int) -> TableState:
    """The filter table of one save text. Other tables are checked for
    structure but not kept. Empty text (no table yet) is an empty state; a
    filter table that iptables-nft-save says it cannot show is an error, not
    an empty table we would then fill."""
    table: Optional[str] = None
    tables_seen: set[str] = set()
    chains: dict[str, list[SavedRule]] = {}
    policies: dict[str, str] = {}
    cur_chains: dict[str, list[SavedRule]] = {}
    cur_policies: dict[str, str] = {}
    last = (0, "")
    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw.strip(_ASCII_SPACE)
        if not line:
            continue
        last = (lineno, raw)
        if line.startswith("#"):
            m = _INCOMPATIBLE.match(line)
            if m and m.group(1) == TABLE:
                raise _error(lineno, raw, "the filter table holds rules iptables cannot show")
            continue
        if table is None:
            if line.startswith("*") and len(line) > 1 and " " not in line:
                table = line[1:]
                if table in tables_seen:
                    raise _error(lineno, raw, f"table {table} appears twice")
                tables_seen.add(table)
                cur_chains, cur_policies = {}, {}
                continue
            raise _error(lineno, raw, "expected a *table line")
        if line == "COMMIT":
            if table == TABLE:
                chains, policies = cur_chains, cur_policies
            table = None
            continue
        if line.startswith("*"):
            raise _error(lineno, raw, f"COMMIT missing for table {table}")
        if line.startswith(":"):
            m = _CHAIN_LINE.match(line)
            if not m:
                raise _error(lineno, raw, "malformed chain line")
            name, policy = m.groups()
            if name in cur_chains:
                raise _error(lineno, raw, f"chain {name} declared twice")
            cur_chains[name] = []
            if policy != "-":
                cur_policies[name] = policy
            continue
        line = _COUNTERS.sub("", line)
        try:
            tokens = tokenize(line)
        except ValueError as e:
            raise _error(lineno, raw, str(e)) from None
        if len(tokens) < 2 or tokens[0] != "-A":
            raise _error(lineno, raw, "expected -A CHAIN ...")
        chain = tokens[1]
        if chain not in cur_chains:
            raise _error(lineno, raw, f"rule for undeclared chain {chain}")
        cur_chains[chain].append(saved_rule(chain, tokens[2:]))
    if table is not None:
        raise _error(last[0], last[1], f"COMMIT missing for table {table} at end of text")
    return TableState(
        family=family,
        chains={name: tuple(rules) for name, rules in chains.items()},
        policies=dict(policies),
    )
