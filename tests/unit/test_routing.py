"""Unit tests for gateway.routing: precedence, params, hosts, 405, rewrite, boundaries."""

from __future__ import annotations

from dataclasses import FrozenInstanceError

import pytest

from gateway.routing import (
    Match,
    MethodNotAllowed,
    NoRoute,
    RouteTable,
    Rule,
    normalize_host,
)


def name_of(result: object) -> str | None:
    return result.rule.name if isinstance(result, Match) else None


def m(*methods: str) -> frozenset[str]:
    return frozenset(methods)


# -- Rule validation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of path or prefix"),
        ({"path": "/a", "prefix": "/a"}, "exactly one of path or prefix"),
        ({"path": "a"}, "must start with '/'"),
        ({"prefix": ""}, "must start with '/'"),
        ({"path": "/a?x=1"}, "query"),
        ({"path": "/a", "strip_prefix": True}, "need a prefix rule"),
        ({"path": "/a/{x}", "replace_prefix": "/b"}, "need a prefix rule"),
        ({"prefix": "/a", "strip_prefix": True, "replace_prefix": "/b"}, "not both"),
        ({"prefix": "/a", "replace_prefix": "b"}, "replace_prefix must start"),
        ({"prefix": "/a/{x}"}, "prefix cannot contain"),
        ({"path": "/a/x{y}"}, "whole segment"),
        ({"path": "/a/{y"}, "whole segment"),
        ({"path": "/a/{1x}"}, "whole segment"),
        ({"path": "/a/{x}/{x}"}, "duplicate param"),
        ({"path": "/a", "methods": frozenset()}, "methods must not be empty"),
        ({"path": "/a", "methods": "GET"}, "not a string"),
        ({"path": "/a", "host": "*."}, "bad host"),
        ({"path": "/a", "host": "a.*.com"}, "bad host"),
        ({"path": "/a", "host": ""}, "bad host"),
    ],
)
def test_rule_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Rule("r", **kwargs)  # type: ignore[arg-type]


def test_rule_requires_name() -> None:
    with pytest.raises(ValueError, match="name"):
        Rule("", path="/a")


def test_rule_normalizes_methods_and_host() -> None:
    r = Rule("r", path="/a", methods=["get", " Post "], host="API.Example.com:8443")  # type: ignore[arg-type]
    assert r.methods == frozenset({"GET", "POST"})
    assert r.host == "api.example.com"


def test_rule_is_frozen_and_payload_opaque() -> None:
    payload = {"service": "billing"}
    r = Rule("r", prefix="/b/", payload=payload)
    assert r.payload is payload
    with pytest.raises(FrozenInstanceError):
        r.name = "x"  # type: ignore[misc]


def test_duplicate_names_rejected_and_named() -> None:
    rules = [
        Rule("a", path="/a"),
        Rule("b", path="/b"),
        Rule("a", prefix="/c"),
        Rule("b", path="/d"),
        Rule("c", path="/e"),
    ]
    with pytest.raises(ValueError, match="duplicate route names: a, b"):
        RouteTable(rules)


def test_table_accessors() -> None:
    rules = [Rule("a", path="/a"), Rule("b", prefix="/b")]
    t = RouteTable(rules)
    assert t.rules == tuple(rules) and len(t) == 2
    assert t.get("b") is rules[1] and t.get("zz") is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Example.COM", "example.com"),
        ("example.com:3000", "example.com"),
        ("example.com.", "example.com"),
        ("[::1]:3000", "[::1]"),
        ("[::1]", "[::1]"),
        ("127.0.0.1:80", "127.0.0.1"),
    ],
)
def test_normalize_host(raw: str, expected: str) -> None:
    assert normalize_host(raw) == expected


# -- basic matching --------------------------------------------------------------------


def test_empty_table() -> None:
    assert RouteTable([]).match("GET", None, "/") == NoRoute()


def test_exact_match() -> None:
    t = RouteTable([Rule("chat", path="/v1/chat/completions", methods=m("POST"))])
    r = t.match("POST", None, "/v1/chat/completions")
    assert isinstance(r, Match)
    assert r.rule.name == "chat" and r.params == {} and r.upstream_path == "/v1/chat/completions"
    assert isinstance(t.match("POST", None, "/v1/chat"), NoRoute)
    assert isinstance(t.match("POST", None, "/v1/chat/completions/x"), NoRoute)


def test_exact_trailing_slash_is_significant() -> None:
    t = RouteTable([Rule("models", path="/v1/models")])
    assert name_of(t.match("GET", None, "/v1/models")) == "models"
    assert isinstance(t.match("GET", None, "/v1/models/"), NoRoute)


def test_method_is_case_insensitive() -> None:
    t = RouteTable([Rule("a", path="/a", methods=m("GET"))])
    assert name_of(t.match("get", None, "/a")) == "a"


def test_methods_none_allows_any() -> None:
    t = RouteTable([Rule("a", path="/a")])
    for method in ("GET", "POST", "DELETE", "PATCH", "FOO"):
        assert name_of(t.match(method, None, "/a")) == "a"


def test_percent_encoding_preserved() -> None:
    t = RouteTable(
        [
            Rule("enc", path="/files/a%20b"),
            Rule("tpl", path="/users/{id}"),
            Rule("pfx", prefix="/p/", strip_prefix=True),
        ]
    )
    assert name_of(t.match("GET", None, "/files/a%20b")) == "enc"
    assert isinstance(t.match("GET", None, "/files/a b"), NoRoute)
    r = t.match("GET", None, "/users/a%2Fb")
    assert isinstance(r, Match) and r.params == {"id": "a%2Fb"}
    r = t.match("GET", None, "/p/x%2Fy")
    assert isinstance(r, Match) and r.upstream_path == "/x%2Fy"


# -- templates -----------------------------------------------------------------------


def test_template_params() -> None:
    t = RouteTable([Rule("bal", path="/billing/balance/{user_id}", methods=m("GET"))])
    r = t.match("GET", None, "/billing/balance/u-42")
    assert isinstance(r, Match)
    assert r.params == {"user_id": "u-42"} and r.upstream_path == "/billing/balance/u-42"


def test_template_multiple_params() -> None:
    t = RouteTable([Rule("x", path="/orgs/{org}/users/{user}")])
    r = t.match("GET", None, "/orgs/acme/users/bob")
    assert isinstance(r, Match) and r.params == {"org": "acme", "user": "bob"}


@pytest.mark.parametrize(
    "path",
    [
        "/billing/balance/",  # empty segment
        "/billing/balance",
        "/billing/balance/u1/extra",  # a param never spans '/'
        "/billing/balance/u1/",
        "/billing/balanceX/u1",
        "/billing//u1",
    ],
)
def test_template_non_matches(path: str) -> None:
    t = RouteTable([Rule("bal", path="/billing/balance/{user_id}")])
    assert isinstance(t.match("GET", None, path), NoRoute)


def test_template_with_trailing_slash() -> None:
    t = RouteTable([Rule("x", path="/a/{id}/")])
    assert name_of(t.match("GET", None, "/a/1/")) == "x"
    assert isinstance(t.match("GET", None, "/a/1"), NoRoute)


def test_template_first_segment_param() -> None:
    t = RouteTable([Rule("x", path="/{tenant}/status")])
    r = t.match("GET", None, "/acme/status")
    assert isinstance(r, Match) and r.params == {"tenant": "acme"}


# -- precedence ----------------------------------------------------------------------


def test_exact_beats_template_beats_prefix_regardless_of_order() -> None:
    rules = [
        Rule("prefix", prefix="/billing/"),
        Rule("template", path="/billing/balance/{user_id}"),
        Rule("exact", path="/billing/balance/me"),
    ]
    for order in (rules, rules[::-1]):
        t = RouteTable(order)
        assert name_of(t.match("GET", None, "/billing/balance/me")) == "exact"
        assert name_of(t.match("GET", None, "/billing/balance/u1")) == "template"
        assert name_of(t.match("GET", None, "/billing/top-up")) == "prefix"


def test_more_literal_segments_first() -> None:
    rules = [
        Rule("two_params", path="/a/{x}/{y}"),
        Rule("one_param_late", path="/a/b/{y}"),
        Rule("one_param_mid", path="/a/{x}/c"),
    ]
    t = RouteTable(rules)
    assert name_of(t.match("GET", None, "/a/b/z")) == "one_param_late"
    assert name_of(t.match("GET", None, "/a/q/c")) == "one_param_mid"
    # both one-param templates match /a/b/c: equal literal count, file order decides
    assert name_of(t.match("GET", None, "/a/b/c")) == "one_param_late"
    assert name_of(RouteTable(rules[::-1]).match("GET", None, "/a/b/c")) == "one_param_mid"
    assert name_of(t.match("GET", None, "/a/q/z")) == "two_params"


def test_longest_prefix_first() -> None:
    rules = [
        Rule("root", prefix="/"),
        Rule("v1", prefix="/v1/"),
        Rule("v1_chat", prefix="/v1/chat"),
    ]
    for order in (rules, rules[::-1]):
        t = RouteTable(order)
        assert name_of(t.match("GET", None, "/v1/chat/completions")) == "v1_chat"
        assert name_of(t.match("GET", None, "/v1/chat")) == "v1_chat"
        assert name_of(t.match("GET", None, "/v1/models")) == "v1"
        assert name_of(t.match("GET", None, "/v1/chatter")) == "v1"
        assert name_of(t.match("GET", None, "/health")) == "root"
        assert name_of(t.match("GET", None, "/")) == "root"


def test_slash_prefix_beats_bare_prefix_by_length() -> None:
    t = RouteTable([Rule("bare", prefix="/billing"), Rule("slash", prefix="/billing/")])
    assert name_of(t.match("GET", None, "/billing/x")) == "slash"
    assert name_of(t.match("GET", None, "/billing")) == "bare"


def test_ties_keep_file_order() -> None:
    t = RouteTable([Rule("first", prefix="/a/"), Rule("second", prefix="/a/")])
    assert name_of(t.match("GET", None, "/a/x")) == "first"
    t = RouteTable([Rule("first", path="/a"), Rule("second", path="/a")])
    assert name_of(t.match("GET", None, "/a")) == "first"


# -- prefix boundaries -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "path", "matches"),
    [
        ("/billing/", "/billing/x", True),
        ("/billing/", "/billing/", True),
        ("/billing/", "/billing/x/y", True),
        ("/billing/", "/billing", False),
        ("/billing/", "/billingx", False),
        ("/billing", "/billing", True),
        ("/billing", "/billing/", True),
        ("/billing", "/billing/x", True),
        ("/billing", "/billingx", False),
        ("/billing", "/billing-x", False),
        ("/billing", "/bill", False),
        ("/", "/anything/at/all", True),
        ("/", "/", True),
        ("/a/b", "/a/b/c", True),
        ("/a/b", "/a/bc", False),
        ("/a//", "/a//x", True),
    ],
)
def test_prefix_boundaries(prefix: str, path: str, matches: bool) -> None:
    t = RouteTable([Rule("p", prefix=prefix)])
    assert isinstance(t.match("GET", None, path), Match) is matches


# -- hosts -----------------------------------------------------------------------------


def test_host_rule_needs_that_host() -> None:
    t = RouteTable([Rule("api", prefix="/", host="api.example.com")])
    assert name_of(t.match("GET", "api.example.com", "/x")) == "api"
    assert name_of(t.match("GET", "API.Example.COM:3000", "/x")) == "api"
    assert name_of(t.match("GET", "api.example.com.", "/x")) == "api"
    assert isinstance(t.match("GET", "other.example.com", "/x"), NoRoute)
    assert isinstance(t.match("GET", None, "/x"), NoRoute)
    assert isinstance(t.match("GET", "", "/x"), NoRoute)


def test_wildcard_host_one_label() -> None:
    t = RouteTable([Rule("w", prefix="/", host="*.example.com")])
    assert name_of(t.match("GET", "a.example.com", "/")) == "w"
    assert name_of(t.match("GET", "B.Example.com:8080", "/")) == "w"
    assert isinstance(t.match("GET", "example.com", "/"), NoRoute)
    assert isinstance(t.match("GET", "a.b.example.com", "/"), NoRoute)
    assert isinstance(t.match("GET", ".example.com", "/"), NoRoute)
    assert isinstance(t.match("GET", "aexample.com", "/"), NoRoute)


def test_host_specific_beats_hostless_same_kind() -> None:
    rules = [
        Rule("any_exact", path="/status"),
        Rule("wild_exact", path="/status", host="*.example.com"),
        Rule("api_exact", path="/status", host="api.example.com"),
    ]
    t = RouteTable(rules)
    assert name_of(t.match("GET", "api.example.com", "/status")) == "api_exact"
    assert name_of(t.match("GET", "www.example.com", "/status")) == "wild_exact"
    assert name_of(t.match("GET", "other.org", "/status")) == "any_exact"
    assert name_of(t.match("GET", None, "/status")) == "any_exact"


def test_host_prefix_beats_longer_hostless_prefix() -> None:
    t = RouteTable([Rule("long", prefix="/v1/chat/"), Rule("vhost", prefix="/", host="a.io")])
    assert name_of(t.match("GET", "a.io", "/v1/chat/x")) == "vhost"
    assert name_of(t.match("GET", "b.io", "/v1/chat/x")) == "long"


def test_host_template_beats_more_literal_hostless_template() -> None:
    t = RouteTable(
        [Rule("literal", path="/a/b/{x}"), Rule("vhost", path="/a/{y}/{x}", host="a.io")]
    )
    assert name_of(t.match("GET", "a.io", "/a/b/c")) == "vhost"
    assert name_of(t.match("GET", "b.io", "/a/b/c")) == "literal"


def test_kind_beats_host() -> None:
    t = RouteTable([Rule("vhost_prefix", prefix="/", host="a.io"), Rule("exact", path="/x")])
    assert name_of(t.match("GET", "a.io", "/x")) == "exact"
    assert name_of(t.match("GET", "a.io", "/y")) == "vhost_prefix"


# -- methods and 405 ---------------------------------------------------------------------


def test_method_not_allowed_with_allowed_set() -> None:
    t = RouteTable([Rule("chat", path="/v1/chat/completions", methods=m("POST"))])
    assert t.match("GET", None, "/v1/chat/completions") == MethodNotAllowed(frozenset({"POST"}))


def test_405_unions_methods_of_all_matching_rules() -> None:
    t = RouteTable(
        [
            Rule("get", path="/keys/{id}", methods=m("GET")),
            Rule("del", path="/keys/{id}", methods=m("DELETE")),
            Rule("pfx", prefix="/keys/", methods=m("PATCH")),
            Rule("other", path="/other", methods=m("PUT")),
        ]
    )
    r = t.match("POST", None, "/keys/1")
    assert r == MethodNotAllowed(frozenset({"GET", "DELETE", "PATCH"}))
    assert name_of(t.match("DELETE", None, "/keys/1")) == "del"
    assert name_of(t.match("PATCH", None, "/keys/1")) == "pfx"


def test_falls_through_to_a_less_specific_rule_allowing_the_method() -> None:
    t = RouteTable(
        [Rule("create", path="/auth/api-keys", methods=m("POST")), Rule("auth", prefix="/auth/")]
    )
    assert name_of(t.match("POST", None, "/auth/api-keys")) == "create"
    assert name_of(t.match("GET", None, "/auth/api-keys")) == "auth"


def test_405_needs_host_match_too() -> None:
    t = RouteTable([Rule("a", path="/a", methods=m("POST"), host="a.io")])
    assert t.match("GET", "a.io", "/a") == MethodNotAllowed(frozenset({"POST"}))
    assert t.match("GET", "b.io", "/a") == NoRoute()


def test_405_when_prefix_rules_exclude_method_and_longer_prefix_allowed_elsewhere() -> None:
    t = RouteTable(
        [
            Rule("long_post", prefix="/a/b/", methods=m("POST")),
            Rule("short_get", prefix="/a/", methods=m("GET")),
        ]
    )
    assert name_of(t.match("POST", None, "/a/b/c")) == "long_post"
    assert name_of(t.match("GET", None, "/a/b/c")) == "short_get"
    assert t.match("PUT", None, "/a/b/c") == MethodNotAllowed(frozenset({"POST", "GET"}))


def test_same_path_split_by_method() -> None:
    t = RouteTable(
        [
            Rule("list", path="/items", methods=m("GET", "HEAD")),
            Rule("create", path="/items", methods=m("POST")),
        ]
    )
    assert name_of(t.match("HEAD", None, "/items")) == "list"
    assert name_of(t.match("POST", None, "/items")) == "create"
    assert t.match("DELETE", None, "/items") == MethodNotAllowed(frozenset({"GET", "HEAD", "POST"}))


# -- rewrite ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "path", "expected"),
    [
        ("/billing/", "/billing/balance/1", "/balance/1"),
        ("/billing/", "/billing/", "/"),
        ("/billing", "/billing", "/"),
        ("/billing", "/billing/", "/"),
        ("/billing", "/billing/x", "/x"),
        ("/", "/x/y", "/x/y"),
        ("/a/b", "/a/b/c/", "/c/"),
    ],
)
def test_strip_prefix(prefix: str, path: str, expected: str) -> None:
    t = RouteTable([Rule("p", prefix=prefix, strip_prefix=True)])
    r = t.match("GET", None, path)
    assert isinstance(r, Match) and r.upstream_path == expected


@pytest.mark.parametrize(
    ("prefix", "replacement", "path", "expected"),
    [
        ("/billing/", "/api/v2/", "/billing/balance/1", "/api/v2/balance/1"),
        ("/billing/", "/api/v2", "/billing/balance/1", "/api/v2/balance/1"),
        ("/billing", "/api/v2/", "/billing/x", "/api/v2/x"),
        ("/billing", "/api/v2", "/billing", "/api/v2"),
        ("/billing", "/api/v2/", "/billing", "/api/v2"),
        ("/billing/", "/api", "/billing/", "/api/"),
        ("/billing/", "/", "/billing/x", "/x"),
        ("/billing", "/", "/billing", "/"),
        ("/", "/api", "/x", "/api/x"),
        ("/", "/api", "/", "/api/"),
    ],
)
def test_replace_prefix(prefix: str, replacement: str, path: str, expected: str) -> None:
    t = RouteTable([Rule("p", prefix=prefix, replace_prefix=replacement)])
    r = t.match("GET", None, path)
    assert isinstance(r, Match) and r.upstream_path == expected


def test_no_rewrite_keeps_path() -> None:
    t = RouteTable([Rule("p", prefix="/billing/")])
    r = t.match("GET", None, "/billing/x%20y")
    assert isinstance(r, Match) and r.upstream_path == "/billing/x%20y"


# -- many rules (speed is measured in bench/route_match.py, not here) ---------------------


def test_many_rules_resolve_through_the_indexes() -> None:
    rules: list[Rule] = []
    for i in range(100):
        rules.append(Rule(f"exact{i}", path=f"/svc{i}/exact", methods=m("GET")))
        rules.append(Rule(f"tpl{i}", path=f"/svc{i}/items/{{id}}", methods=m("GET")))
        rules.append(Rule(f"pfx{i}", prefix=f"/svc{i}/", host=None if i % 2 else "a.io"))
    t = RouteTable(rules)
    exact = t.match("GET", "a.io", "/svc50/exact")
    assert isinstance(exact, Match) and exact.rule.name == "exact50"
    tpl = t.match("GET", "a.io", "/svc51/items/9")
    assert isinstance(tpl, Match) and tpl.rule.name == "tpl51" and tpl.params == {"id": "9"}
    pfx = t.match("GET", "a.io", "/svc99/x/y/z")
    assert isinstance(pfx, Match) and pfx.rule.name == "pfx99"
    hosted = t.match("GET", "a.io", "/svc98/x")
    assert isinstance(hosted, Match) and hosted.rule.name == "pfx98"
    assert isinstance(t.match("GET", "b.io", "/svc98/x"), NoRoute)
    assert isinstance(t.match("GET", "a.io", "/nothing/here"), NoRoute)
