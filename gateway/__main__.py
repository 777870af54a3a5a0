"""``python -m gateway``: run the gateway with settings from the environment."""

from __future__ import annotations

import asyncio
import logging
import sys

from .errors import ConfigError
from .server import serve
from .settings import GatewaySettings


def main() -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stdout,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    settings = GatewaySettings()
    runner = asyncio.run
    if settings.uvloop:
        try:
            import uvloop
        except ImportError:
            print(
                "gateway: uvloop is not installed; running on asyncio's loop "
                "(pip install uvloop, or set GATEWAY_UVLOOP=false to silence this)",
                file=sys.stderr,
            )
        else:
            runner = uvloop.run
    try:
        runner(serve(settings))
    except ConfigError as exc:
        print(f"gateway: cannot start: {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"gateway: cannot start: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
