"""The chat benchmark's verdict: per-round ratios against LiteLLM and their medians.

The script decides whether the issue's targets are met, so its arithmetic gets a test
of its own (rows built by hand; no load is run here).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import chat_vs_litellm as bench
from harness import LoadResult


def _row(name: str, rnd: int, rps: float, p99: float, conns: int = 50) -> bench.Row:
    result = LoadResult(requests=int(rps * 10), seconds=10.0, p50_ms=p99 / 2, p99_ms=p99, errors=0)
    return bench.Row(name, conns, False, result, cpu_us=1000.0, round=rnd)


def _cells(rounds: list[tuple[float, float, float, float]], conns: int = 50):
    """(platform rps, platform p99, LiteLLM rps, LiteLLM p99) per round; direct: 2000
    req/s with a 20 ms p99."""
    rows, direct = [], {}
    for rnd, (prps, pp99, lrps, lp99) in enumerate(rounds):
        d = _row("direct to mock", rnd, 2000, 20.0, conns)
        direct[(rnd, conns, False)] = d
        rows += [
            d,
            _row("platform (gateway+5 services)", rnd, prps, pp99, conns),
            _row("LiteLLM proxy (1 worker)", rnd, lrps, lp99, conns),
        ]
    return rows, direct


def test_one_round_is_judged_as_before() -> None:
    rows, direct = _cells([(520, 120.0, 100, 520.0)])
    (line,) = bench.verdict(rows, direct)
    assert line.startswith("plain  c=50  req/s platform/LiteLLM = 5.20x (target >= 5x: MET)")
    assert "= 100.0/500.0 ms = 0.20 (target <= 0.20: MET)" in line


def test_rounds_are_each_reported_and_the_median_decides() -> None:
    rows, direct = _cells(
        [(400, 120.0, 100, 520.0), (600, 120.0, 100, 420.0), (510, 220.0, 100, 620.0)]
    )
    lines = bench.verdict(rows, direct)
    assert [line.split(":")[0] for line in lines[:3]] == ["round 1", "round 2", "round 3"]
    assert "4.00x (target >= 5x: NOT met)" in lines[0]
    assert "6.00x (target >= 5x: MET)" in lines[1]
    summary = lines[-1]
    assert summary.startswith("median of 3 rounds: plain  c=50  req/s ratio 5.10x (4.00-6.00;")
    assert "target >= 5x: MET" in summary
    # p99 overhead shares: 100/500, 100/400, 200/600 -> median 0.25
    assert "p99 overhead share 0.25 (0.20-0.33; target <= 0.20: NOT met)" in summary


def test_the_upstream_ceiling_is_named_when_it_caps_the_ratio() -> None:
    rows, direct = _cells([(220, 60.0, 104, 130.0)], conns=10)
    for row in rows:
        if row.name.startswith("direct"):
            row.result = LoadResult(4610, 10.0, 21.0, 22.0, 0)  # 461 req/s: 4.4x at most
    (line,) = bench.verdict(rows, direct)
    assert "at most 4.4x is possible here: the upstream alone serves 461 req/s at c=10" in line


def test_the_latency_budget_is_named_when_5x_is_close_to_the_upstream_alone() -> None:
    # LiteLLM 88 req/s: 5x = 440 req/s = 95 % of the upstream's 465 at c=10, so the
    # platform would get 10/440 - 10/465 s = 1.2 ms per request on top of 21.5 ms
    rows, direct = _cells([(231, 60.0, 88, 184.0)], conns=10)
    for row in rows:
        if row.name.startswith("direct"):
            row.result = LoadResult(4650, 10.0, 21.0, 22.0, 0)
    (line,) = bench.verdict(rows, direct)
    assert (
        "5x is 440 req/s, 95% of the upstream alone (465 req/s at c=10): 1.2 ms per request "
        "for the whole platform path on top of the upstream's 21.5 ms" in line
    )
    # far from the upstream's rate (c=50 here: 2,000 req/s alone), nothing is added
    rows, direct = _cells([(520, 120.0, 100, 520.0)])
    assert "upstream" not in bench.verdict(rows, direct)[0]
