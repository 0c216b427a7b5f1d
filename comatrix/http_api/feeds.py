"""Where webhook events come from: the application-service stream, or one /sync loop per service.

In application-service mode the event stream already carries every room a
device user is in, and `Webhooks.events_arrived` listens to it.  Otherwise
(`ServiceEvents`) each service with subscriptions gets one ``/sync`` loop as
its own Matrix user; `ServiceTokens` hands those loops the service's token,
which for a password entry needs the (kept) login the HTTP API also uses.
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.internet import defer

from comatrix.config import ServiceCredentials
from comatrix.credentials import Credentials
from comatrix.logs import get_logger
from comatrix.webhooks import ServiceEvents, Webhooks

log = get_logger(__name__)

__all__ = ["ServiceTokens", "start_feeds"]


class ServiceTokens:
    """(user id, access token) of each service, once its login is known."""

    def __init__(self, services: Sequence[ServiceCredentials], credentials: Credentials) -> None:
        self._services = {service.name: service for service in services}
        self._credentials = credentials
        self._tokens: dict[str, str] = {}

    def __call__(self, name: str) -> tuple[str, str] | None:
        service = self._services.get(name)
        token = self._tokens.get(name)
        return (service.user, token) if service is not None and token is not None else None

    async def ensure(self, name: str) -> None:
        service = self._services.get(name)
        if service is not None:
            self._tokens[name] = await self._credentials.token_of(service.as_device())


def start_feeds(webhooks: Webhooks, events: Any, tokens: ServiceTokens,
                service_events: ServiceEvents | None) -> "defer.Deferred[None]":
    """Start delivering: subscriptions loaded, event sources started (call once the reactor runs)."""
    async def start() -> None:
        if events is not None:
            events.subscribe(webhooks.events_arrived)
        await webhooks.start()
        if service_events is not None:
            for name in webhooks.services():
                try:
                    await tokens.ensure(name)
                except Exception as error:  # the homeserver may be down: the next subscribe retries
                    log.warn("No login for webhook service {name} yet: {error}", name=name,
                             error=type(error).__name__)
            service_events.start()
    return defer.ensureDeferred(start())
