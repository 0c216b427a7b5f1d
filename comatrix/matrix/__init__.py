"""CoMatrix's Matrix Client-Server API layer (no CoAP knowledge).

* `comatrix.matrix.api` -- pure request builders returning `MatrixRequest`.
* `comatrix.matrix.responses` -- pure parsers into typed frozen values.
* `comatrix.matrix.errors` -- `MatrixError` and the transport failures.
* `comatrix.matrix.transport` -- `MatrixTransport`, the one treq client.
* `comatrix.matrix.client` -- `MatrixClient`, the operations plugins call.
* `comatrix.matrix.testing` -- an in-memory fake homeserver for unit tests
  (import it explicitly; it is not re-exported here).
"""

from comatrix.matrix import api
from comatrix.matrix.api import MatrixRequest
from comatrix.matrix.client import MatrixClient, check_room_reference
from comatrix.matrix.errors import (
    HomeserverError,
    HomeserverTimeout,
    HomeserverUnreachable,
    InvalidResponse,
    InvalidRoomReference,
    MatrixError,
)
from comatrix.matrix.responses import (
    Event,
    LoginResponse,
    MessagesPage,
    RegisterResponse,
    ResolvedAlias,
    SyncResponse,
    UIAFlows,
    Versions,
)
from comatrix.matrix.transport import MatrixTransport

__all__ = [
    "Event",
    "HomeserverError",
    "HomeserverTimeout",
    "HomeserverUnreachable",
    "InvalidResponse",
    "InvalidRoomReference",
    "LoginResponse",
    "MatrixClient",
    "MatrixError",
    "MatrixRequest",
    "MatrixTransport",
    "MessagesPage",
    "RegisterResponse",
    "ResolvedAlias",
    "SyncResponse",
    "UIAFlows",
    "Versions",
    "api",
    "check_room_reference",
]
