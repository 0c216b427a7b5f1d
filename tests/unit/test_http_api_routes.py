"""The HTTP API's route table, OpenAPI document and error answers (pure parts)."""

from __future__ import annotations

import pytest

from comatrix.coap.errors import ServiceUnavailable, TooManyRequests
from comatrix.config import ConfigError, build_config
from comatrix.http_api.endpoints import Endpoints
from comatrix.http_api.errors import ApiError, answer_for
from comatrix.http_api.routes import ROUTES, match, openapi_document
from comatrix.matrix.errors import HomeserverTimeout, HomeserverUnreachable, MatrixError


def test_every_route_has_a_handler_and_a_documented_path() -> None:
    document = openapi_document()
    for route in ROUTES:
        assert callable(getattr(Endpoints, route.handler))
        assert route.method.lower() in document["paths"][route.path]
    assert len({(route.method, route.template) for route in ROUTES}) == len(ROUTES)


@pytest.mark.parametrize("method, path, handler, params", [
    ("GET", ("rooms", "!r:x"), "room", {"roomId": "!r:x"}),
    ("PUT", ("rooms", "!r:x", "name"), "room_name", {"roomId": "!r:x"}),
    ("GET", ("rooms", "!r:x", "messages"), "messages", {"roomId": "!r:x"}),
    ("DELETE", ("webhook", "subscribe", "sub-1"), "unsubscribe", {"subscriptionId": "sub-1"}),
    ("POST", ("send",), "send", {}),
])
def test_paths_match_their_route(method: str, path: tuple[str, ...], handler: str, params: dict[str, str]) -> None:
    route, found, _ = match(method, path)
    assert route is not None and route.handler == handler and found == params


def test_a_known_path_with_another_method_is_told_apart_from_an_unknown_path() -> None:
    assert match("GET", ("send",)) == (None, {}, True)
    assert match("GET", ("nothing",)) == (None, {}, False)
    assert match("GET", ("rooms", "")) == (None, {}, False)


@pytest.mark.parametrize("error, status, code", [
    (ApiError(400, "M_BAD_JSON", "x"), 400, "M_BAD_JSON"),
    (MatrixError(403, "M_FORBIDDEN", "no"), 403, "M_FORBIDDEN"),
    (MatrixError(500, "M_UNKNOWN", "boom"), 502, "M_UNKNOWN"),
    (HomeserverUnreachable("down"), 502, "M_UNKNOWN"),
    (HomeserverTimeout("slow"), 504, "M_UNKNOWN"),
    (TooManyRequests("busy", retry_after=7), 429, "M_LIMIT_EXCEEDED"),
    (ServiceUnavailable("queue full", max_age=3), 503, "M_UNKNOWN"),
])
def test_errors_become_the_specs_error_shape(error: Exception, status: int, code: str) -> None:
    answer = answer_for(error)
    assert answer is not None
    got_status, body, headers = answer
    assert (got_status, body["error"]) == (status, code) and isinstance(body["message"], str)
    if status in (429, 503):
        assert int(headers["Retry-After"]) >= 1


def test_an_unexpected_error_is_left_to_the_500_path() -> None:
    assert answer_for(KeyError("bug")) is None


def test_services_and_http_api_settings_are_checked() -> None:
    service = {"name": "logger", "token": "t" * 24, "user": "@logger:example.org", "password": "pw"}
    config = build_config({"http_api": {"enabled": True}, "services": [service]})
    assert config.http_api.port == 7003 and config.http_api.bind == "127.0.0.1"
    assert config.services[0].name == "logger" and "t" * 24 not in repr(config.services[0])
    for bad in ({**service, "token": "short"}, {**service, "password": None}, {**service, "colour": "red"}):
        with pytest.raises(ConfigError):
            build_config({"services": [{k: v for k, v in bad.items() if v is not None}]})
    with pytest.raises(ConfigError, match="two"):
        build_config({"services": [service, {**service, "token": "u" * 24}]})
    with pytest.raises(ConfigError, match="another service"):
        build_config({"services": [service, {**service, "name": "other"}]})
    with pytest.raises(ConfigError, match="IP address"):
        build_config({"http_api": {"bind": "localhost"}})


def test_service_allow_lists_are_read() -> None:
    service = {"name": "door", "token": "d" * 24, "user": "@door:example.org", "access_token": "x",
               "users": ["@comatrix_door*"], "rooms": ["!hall:example.org"], "register_admins": True}
    [entry] = build_config({"services": [service]}).services
    assert entry.users == ("@comatrix_door*",) and entry.rooms == ("!hall:example.org",) and entry.register_admins
    [plain] = build_config({"services": [{**service, "users": [], "rooms": [], "register_admins": False}]}).services
    assert plain.users == () and plain.rooms == () and not plain.register_admins
    with pytest.raises(ConfigError):
        build_config({"services": [{**service, "register_admins": "yes"}]})
