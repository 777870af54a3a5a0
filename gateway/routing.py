"""The route table: which rule a request matches, and the path to send upstream.

Pure and on the hot path, so indexes are built once in :class:`RouteTable` and a
match is a few dict lookups plus a short scan.

Matching (``path`` is the raw path without the query string; its percent-encoding
is kept as given, and params are returned undecoded):

* **exact** ``path`` rules: literal equality (a trailing slash is significant);
* **template** ``path`` rules with ``{param}`` segments: a param matches exactly one
  non-empty segment (never a '/');
* **prefix** rules, on segment boundaries: ``/billing/`` matches ``/billing/`` and
  ``/billing/x`` (not ``/billing``); ``/billing`` matches ``/billing`` and
  ``/billing/x`` but never ``/billingx``; ``/`` matches everything.

Precedence, highest first:

1. kind: exact, then template, then prefix;
2. within a kind, host: exact host, then ``*.`` wildcard host, then no host
   (host-specific rules beat host-less rules of the same kind);
3. within that: templates with more literal segments first, prefixes longest first;
4. ties keep file order.

Candidates are tried in that order and the first whose ``methods`` allow the
request's method wins; if some rule matched the path and host but none allowed the
method, the result is :class:`MethodNotAllowed` with the union of their methods.
Hosts compare case-insensitively, without port or trailing dot; ``*.example.com``
matches exactly one extra label (``a.example.com``, not ``example.com`` or
``a.b.example.com``). A request without a host matches only host-less rules.

Rewrite (prefix rules only): ``strip_prefix`` removes the matched prefix and
``replace_prefix`` substitutes it; segment boundaries are kept (the result always
starts with '/').
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

_PARAM_RE = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")


def normalize_host(host: str) -> str:
    """Lower-case, without port and trailing dot ('[::1]:80' -> '[::1]')."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        if end != -1:
            host = host[: end + 1]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


@dataclass(frozen=True, slots=True)
class Rule:
    """One route: what to match and how to rewrite; ``payload`` is the caller's."""

    name: str
    path: str | None = None
    prefix: str | None = None
    methods: frozenset[str] | None = None
    host: str | None = None
    strip_prefix: bool = False
    replace_prefix: str | None = None
    payload: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        where = f"route {self.name!r}"
        if not self.name:
            raise ValueError("route name must not be empty")
        if (self.path is None) == (self.prefix is None):
            raise ValueError(f"{where}: exactly one of path or prefix is required")
        target = self.path if self.path is not None else self.prefix
        if not isinstance(target, str) or not target.startswith("/"):
            raise ValueError(f"{where}: path/prefix must start with '/', got {target!r}")
        if "?" in target or "#" in target:
            raise ValueError(f"{where}: path/prefix must not contain a query or fragment")
        if self.path is not None:
            if self.strip_prefix or self.replace_prefix is not None:
                raise ValueError(f"{where}: strip_prefix/replace_prefix need a prefix rule")
            _template_parts(self.path, where)  # validates params
        elif "{" in target or "}" in target:
            raise ValueError(f"{where}: a prefix cannot contain {{param}} segments")
        if self.strip_prefix and self.replace_prefix is not None:
            raise ValueError(f"{where}: use strip_prefix or replace_prefix, not both")
        if self.replace_prefix is not None and not self.replace_prefix.startswith("/"):
            raise ValueError(f"{where}: replace_prefix must start with '/'")
        if self.methods is not None:
            if isinstance(self.methods, str):
                raise ValueError(f"{where}: methods must be a collection, not a string")
            methods = frozenset(m.strip().upper() for m in self.methods)
            if not methods or "" in methods:
                raise ValueError(f"{where}: methods must not be empty (omit it for any)")
            object.__setattr__(self, "methods", methods)
        if self.host is not None:
            host = normalize_host(self.host)
            wildcard_rest = host[2:] if host.startswith("*.") else host
            if not wildcard_rest or "*" in wildcard_rest or "/" in host:
                raise ValueError(f"{where}: bad host {self.host!r}")
            object.__setattr__(self, "host", host)

    @property
    def is_template(self) -> bool:
        return self.path is not None and "{" in self.path


def _template_parts(path: str, where: str) -> tuple[tuple[str | None, ...], tuple[str, ...]]:
    """Segments of a path rule: literal strings, or None where a param goes."""
    parts: list[str | None] = []
    names: list[str] = []
    for segment in path.split("/"):
        m = _PARAM_RE.match(segment)
        if m:
            if m.group(1) in names:
                raise ValueError(f"{where}: duplicate param {{{m.group(1)}}}")
            names.append(m.group(1))
            parts.append(None)
        elif "{" in segment or "}" in segment:
            raise ValueError(f"{where}: a param must be a whole segment: {segment!r}")
        else:
            parts.append(segment)
    return tuple(parts), tuple(names)


@dataclass(frozen=True, slots=True)
class Match:
    rule: Rule
    params: dict[str, str]
    upstream_path: str


@dataclass(frozen=True, slots=True)
class NoRoute:
    pass


@dataclass(frozen=True, slots=True)
class MethodNotAllowed:
    allowed: frozenset[str]


class _Compiled:
    """A rule with its precomputed match data and sort key."""

    __slots__ = (
        "host",
        "host_suffix",
        "key",
        "methods",
        "names",
        "param_index",
        "parts",
        "prefix_base",
        "replace",
        "rule",
        "strip",
    )

    def __init__(self, rule: Rule, order: int) -> None:
        self.rule = rule
        self.methods = rule.methods
        host = rule.host
        self.host: str | None = None
        self.host_suffix: str | None = None
        if host is None:
            host_rank = 2
        elif host.startswith("*."):
            host_rank, self.host_suffix = 1, host[2:]
        else:
            host_rank, self.host = 0, host
        self.parts: tuple[str | None, ...] = ()
        self.names: tuple[str, ...] = ()
        self.param_index: tuple[int, ...] = ()
        self.strip = rule.strip_prefix
        self.replace = rule.replace_prefix
        self.prefix_base = ""
        if rule.prefix is not None:
            self.prefix_base = rule.prefix.rstrip("/")
            self.key: tuple[int, ...] = (host_rank, -len(rule.prefix), order)
        elif rule.is_template:
            self.parts, self.names = _template_parts(rule.path or "", "")
            self.param_index = tuple(i for i, p in enumerate(self.parts) if p is None)
            literals = sum(1 for p in self.parts if p is not None)
            self.key = (host_rank, -literals, order)
        else:
            self.key = (host_rank, order)

    def host_ok(self, host: str | None, parent: str | None) -> bool:
        if self.host is not None:
            return host == self.host
        if self.host_suffix is not None:
            return parent == self.host_suffix
        return True

    def rewrite(self, path: str) -> str:
        if not self.strip and self.replace is None:
            return path
        rest = path[len(self.prefix_base) :]  # '' or starts with '/'
        if self.strip:
            return rest or "/"
        base = (self.replace or "/").rstrip("/")
        return base + rest if rest else base or "/"


class _Node:
    """One segment level of the template trie."""

    __slots__ = ("literal", "param", "rules")

    def __init__(self) -> None:
        self.literal: dict[str, _Node] = {}
        self.param: _Node | None = None
        self.rules: list[_Compiled] = []

    def insert(self, c: _Compiled) -> None:
        node = self
        for part in c.parts:
            if part is None:
                if node.param is None:
                    node.param = _Node()
                node = node.param
            else:
                node = node.literal.setdefault(part, _Node())
        node.rules.append(c)

    def sort(self) -> None:
        self.rules.sort(key=_key)
        for child in self.literal.values():
            child.sort()
        if self.param is not None:
            self.param.sort()

    def find(self, segments: list[str]) -> list[_Compiled]:
        """Every template matching ``segments`` (unsorted across leaves)."""
        found: list[_Compiled] = []
        end = len(segments)
        stack: list[tuple[_Node, int]] = [(self, 0)]
        while stack:
            node, depth = stack.pop()
            if depth == end:
                found.extend(node.rules)
                continue
            segment = segments[depth]
            child = node.literal.get(segment)
            if child is not None:
                stack.append((child, depth + 1))
            if node.param is not None and segment:
                stack.append((node.param, depth + 1))
        return found


class RouteTable:
    """Immutable, indexed set of rules; build a new one to change routes."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        counts = Counter(r.name for r in rules)
        dupes = sorted(n for n, c in counts.items() if c > 1)
        if dupes:
            raise ValueError(f"duplicate route names: {', '.join(dupes)}")
        self._rules = tuple(rules)
        exact: dict[str, list[_Compiled]] = {}
        templates = _Node()
        self._has_templates = False
        prefixes: dict[str, list[_Compiled]] = {}
        for order, rule in enumerate(self._rules):
            c = _Compiled(rule, order)
            if rule.prefix is not None:
                prefixes.setdefault(rule.prefix, []).append(c)
            elif rule.is_template:
                templates.insert(c)
                self._has_templates = True
            else:
                exact.setdefault(rule.path or "", []).append(c)
        self._exact = {k: tuple(sorted(v, key=_key)) for k, v in exact.items()}
        templates.sort()
        self._templates = templates
        self._prefixes = {k: tuple(sorted(v, key=_key)) for k, v in prefixes.items()}
        self._by_name = {r.name: r for r in self._rules}

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self._rules

    def __len__(self) -> int:
        return len(self._rules)

    def get(self, name: str) -> Rule | None:
        return self._by_name.get(name)

    def match(self, method: str, host: str | None, path: str) -> Match | NoRoute | MethodNotAllowed:
        """The rule for this request; see the module docstring for the order."""
        method = method.upper()
        parent: str | None = None
        if host:
            host = normalize_host(host)
            dot = host.find(".")
            if dot > 0:
                parent = host[dot + 1 :]
        else:
            host = None
        allowed: set[str] | None = None

        # 1. exact paths
        candidates = self._exact.get(path)
        if candidates:
            for c in candidates:
                if c.host_ok(host, parent):
                    if c.methods is None or method in c.methods:
                        return Match(c.rule, {}, path)
                    allowed = _add(allowed, c.methods)

        # 2. templates, through a segment trie
        if self._has_templates:
            segments = path.split("/")
            candidates = self._templates.find(segments)
            if candidates:
                if len(candidates) > 1:
                    candidates.sort(key=_key)
                for c in candidates:
                    if not c.host_ok(host, parent):
                        continue
                    if c.methods is None or method in c.methods:
                        params = {
                            n: segments[i] for n, i in zip(c.names, c.param_index, strict=True)
                        }
                        return Match(c.rule, params, path)
                    allowed = _add(allowed, c.methods)

        # 3. prefixes ending at a segment boundary of the path
        if self._prefixes:
            best: _Compiled | None = None
            prefixes = self._prefixes
            for candidate_prefix in _boundary_prefixes(path):
                found = prefixes.get(candidate_prefix)
                if not found:
                    continue
                for c in found:
                    if best is not None and c.key >= best.key:
                        break  # sorted: nothing better in this bucket
                    if not c.host_ok(host, parent):
                        continue
                    if c.methods is None or method in c.methods:
                        best = c
                        break
                    allowed = _add(allowed, c.methods)
            if best is not None:
                return Match(best.rule, {}, best.rewrite(path))

        if allowed:
            return MethodNotAllowed(frozenset(allowed))
        return NoRoute()


def _key(c: _Compiled) -> tuple[int, ...]:
    return c.key


def _add(allowed: set[str] | None, methods: frozenset[str]) -> set[str]:
    if allowed is None:
        return set(methods)
    allowed |= methods
    return allowed


def _boundary_prefixes(path: str) -> list[str]:
    """Every prefix string a prefix rule could have to match ``path``, longest first."""
    out: list[str] = []
    if not path.endswith("/"):
        out.append(path)  # a prefix without trailing slash equal to the whole path
    i = path.rfind("/")
    while i >= 0:
        out.append(path[: i + 1])  # '/billing/'
        if i > 0:
            out.append(path[:i])  # '/billing', which matches '/billing/...'
        i = path.rfind("/", 0, i)
    return out
