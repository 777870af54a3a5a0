"""The gateway process's settings, from the environment (pydantic-settings)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore")

    routes_file: str = Field(default="routes.yaml", description="GATEWAY_ROUTES_FILE")
    host: str = "0.0.0.0"
    port: int = 3000
    #: several gateway processes may listen on one public port (SO_REUSEPORT): the kernel
    #: spreads new connections over them; each needs its own GATEWAY_ADMIN_PORT. Off by
    #: default, so that a second gateway started by mistake fails instead of sharing.
    reuse_port: bool = False
    admin_host: str = "127.0.0.1"
    admin_port: int = 9901
    admin_token: str | None = Field(default=None, description="GATEWAY_ADMIN_TOKEN")
    access_log: bool = True
    uvloop: bool = True  # uvloop's event loop (a dependency); false: asyncio's own
    gc_tune: bool = True  # freeze start-up objects, collect the young generation less often
    # Parser-level ceilings; the per-route limits in routes.yaml are checked below these.
    max_line_size: int = 16 * 1024
    max_field_size: int = 64 * 1024
    shutdown_grace: float = 10.0
