"""The CLI and dashboard tests drive a live gateway with the gateway tests' fixtures."""

from __future__ import annotations

from tests.gateway.conftest import make_upstream, start_gateway

__all__ = ["make_upstream", "start_gateway"]
