"""``python -m services.proxy``: run the proxy service in the foreground.

A bad providers file (or a missing setting) stops it with one clear message."""

import sys

from gateway.errors import ConfigError
from services.common.app import run_service

from .app import create_app
from .settings import ProxySettings

if __name__ == "__main__":
    try:
        run_service(create_app, ProxySettings())
    except (ConfigError, ValueError) as exc:
        sys.exit(f"proxy: {getattr(exc, 'message', None) or exc}")
