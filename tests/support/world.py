"""An in-memory gateway world for unit tests: the Matrix layer's fake homeserver with one user,
its token and a room, and a `PluginContext` wired to it through StubTreq (no sockets)."""

from __future__ import annotations

from typing import Any

from twisted.internet import task

from comatrix.config import build_config
from comatrix.credentials import Credentials
from comatrix.interfaces import PluginContext
from comatrix.matrix.client import MatrixClient
from comatrix.matrix.testing import FakeHomeserver, stub_transport


class World:
    """User ``@d`` (password ``pw``) with a token, and a room aliased ``#lab``."""

    def __init__(self) -> None:
        self.homeserver = FakeHomeserver()
        self.user_id = self.homeserver.add_user("d", "pw")
        self.token, _ = self.homeserver.issue_token(self.user_id)
        self.room = self.homeserver.new_room(self.user_id, alias_local="lab")
        self.alias = f"#lab:{self.homeserver.server_name}"

    def context(self, devices: list[dict[str, Any]] | None = None, *,
                allow_registration: bool = False) -> PluginContext:
        config = build_config({"devices": devices or [], "allow_registration": allow_registration})
        reactor = task.Clock()
        reactor.advance(1_700_000_000)
        transport, _ = stub_transport(self.homeserver, reactor)
        matrix = MatrixClient(transport, reactor=reactor)
        return PluginContext(config=config, matrix=matrix, credentials=Credentials(config.devices, matrix),
                             state={}, reactor=reactor)

    @property
    def auth(self) -> dict[int, tuple[bytes, ...]]:
        """Request options carrying the token (option 256)."""
        return {256: (self.token.encode(),)}

    def paths(self) -> list[tuple[str, ...]]:
        """What was forwarded, as path segments after /_matrix/client/v3."""
        return [request.path[3:] for request in self.homeserver.requests]
