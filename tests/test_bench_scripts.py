"""The gateway benchmarks run end to end, briefly, and leave nothing behind.

They are the README's evidence, so a change that breaks them should fail here, not in
the next benchmark session. Each script runs with ``TMPDIR`` pointed at an empty
directory of the test's own: whatever temp directory it made must be gone at the end
(runs once left their routes file and nginx's work directory behind, one per run), and
no process that inherited that ``TMPDIR`` (the upstream, the proxies, nginx) may still
be running.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, args: list[str], tmp: Path, timeout: float) -> str:
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = subprocess.run(
        [sys.executable, f"bench/{script}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def _still_running(tmp: Path) -> list[str]:
    """Command lines of live processes whose environment has our TMPDIR."""
    marker = f"TMPDIR={tmp}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return found


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    return scratch


def test_gateway_proxy_runs_and_cleans_up(tmp: Path) -> None:
    out = _run(
        "gateway_proxy.py", ["--seconds", "1", "--warmup", "1", "--connections", "4"], tmp, 120
    )
    assert "| gateway (full policy chain, uvloop)" in out
    assert "| 30-line aiohttp proxy" in out
    assert "gateway req/s / 30-line proxy req/s = " in out
    assert "machine yardstick: the upstream alone costs" in out
    assert list(tmp.iterdir()) == []
    assert _still_running(tmp) == []


def test_gateway_memory_runs_and_cleans_up(tmp: Path) -> None:
    out = _run("gateway_memory.py", ["--requests", "500", "--slice-seconds", "1"], tmp, 60)
    assert "growth after warm-up" in out
    assert list(tmp.iterdir()) == []
    assert _still_running(tmp) == []
