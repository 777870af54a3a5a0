"""Analytics settings: ``ANALYTICS_PORT`` (3005), ``ANALYTICS_DATABASE_URL``, plus the
shared ones."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from services.common.settings import DEFAULT_PORTS, ServiceSettings


class AnalyticsSettings(ServiceSettings):
    service_name: ClassVar[str] = "analytics"

    port: int = Field(DEFAULT_PORTS["analytics"], validation_alias="ANALYTICS_PORT")
    database_url: str | None = Field(None, validation_alias="ANALYTICS_DATABASE_URL")
    #: analytics is background work (it consumes events and answers admin queries): on a
    #: busy machine it yields the CPU to the request path and catches up afterwards
    nice: int = Field(5, validation_alias="ANALYTICS_NICE", ge=0, le=19)
