"""Build the bus a service should use from its settings."""

from __future__ import annotations

import logging

from .bus import EventBus
from .inprocess import InProcessBus
from .rabbit import RabbitBus
from .settings import EventSettings, warn_in_process

log = logging.getLogger("aiagg.events")


def build_bus(
    service: str,
    settings: EventSettings | None = None,
    *,
    shared: InProcessBus | None = None,
) -> EventBus:
    """RabbitBus when ``AMQP_URL`` is set; otherwise the in-process bus.

    ``shared`` is the launcher's one InProcessBus for all the services of the process.
    Without it (a service started alone, no ``AMQP_URL``) a WARNING says the events stay
    in this process.
    """
    settings = settings or EventSettings()
    if settings.amqp_url:
        return RabbitBus(settings.amqp_url, settings, connection_name=service)
    if shared is not None:
        log.info("%s uses the launcher's in-process event bus (AMQP_URL is not set)", service)
        return shared
    warn_in_process(service, log)
    return InProcessBus(settings)


__all__ = ["build_bus"]
