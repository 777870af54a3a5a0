"""Billing settings.

``BILLING_PORT`` (3004), ``BILLING_DATABASE_URL``, ``BILLING_HOLD_TTL`` (how long an
unsettled reservation holds money, default ``15m``), ``BILLING_SWEEP_INTERVAL`` (how
often expired holds are released, default ``30s``), plus the shared ones.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, field_validator

from services.common.events.settings import parse_duration
from services.common.settings import DEFAULT_PORTS, ServiceSettings


class BillingSettings(ServiceSettings):
    service_name: ClassVar[str] = "billing"

    port: int = Field(DEFAULT_PORTS["billing"], validation_alias="BILLING_PORT")
    database_url: str | None = Field(None, validation_alias="BILLING_DATABASE_URL")
    hold_ttl: float = Field(900.0, validation_alias="BILLING_HOLD_TTL", gt=0)
    sweep_interval: float = Field(30.0, validation_alias="BILLING_SWEEP_INTERVAL", gt=0)

    @field_validator("hold_ttl", "sweep_interval", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration(value)
