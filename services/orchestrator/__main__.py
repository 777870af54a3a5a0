"""``python -m services.orchestrator``: run the orchestrator service in the foreground.

A bad providers file (or a missing setting) stops it with one clear message."""

import sys

from gateway.errors import ConfigError
from services.common.app import run_service

from .app import create_app
from .settings import OrchestratorSettings

if __name__ == "__main__":
    try:
        run_service(create_app, OrchestratorSettings())
    except (ConfigError, ValueError) as exc:
        sys.exit(f"orchestrator: {getattr(exc, 'message', None) or exc}")
