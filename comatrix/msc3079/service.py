"""MSC3079 resources: Client-Server API pass-through over CoAP, ``/versions`` and ``/sync``.

`Msc3079Service` is the per-gateway state every MSC3079 resource shares (kept
in ``PluginContext.state["msc3079"]``): the sticky peer table, the ``/sync``
observation loops and their resume points.  Every ``/sync`` goes through the
gateway's uncapped long-poll pool (`comatrix.longpoll`), not the capped client.

* `Msc3079Resource` serves a subtree (``/_matrix`` or one path code): the CoAP
  method becomes the same HTTP method, Uri-Query the query, the CBOR body
  (integer keys named) the JSON body; the answer goes back as CBOR with the
  client's integer keys (JSON when the client asked for it).  Homeserver errors
  keep their CoAP code from the gateway's one table (``comatrix.errors``) and
  carry ``{errcode, error}`` as payload, as the MSC's clients expect.
* `SyncResource` serves ``/7`` and the full ``/sync`` paths: a plain GET is a
  long-poll (its ``timeout`` is passed on, capped, with an HTTP deadline a
  margin above it) and takes one of the device's long-poll slots for its
  duration (`comatrix.longpoll.LongPollQuota`: beyond the device's share 4.29,
  beyond the gateway's total 5.03, both at once); GET with Observe registers a
  loop, which holds one such slot from its registration to its end, that long-polls from the
  last ``next_batch`` and pushes each non-empty answer as a CON notification,
  waiting for the acknowledgement before it asks the homeserver again, so no
  batch is ever replaced by the next one before the client has it.  Each
  acknowledged batch moves the observation's resume point
  (`comatrix.msc3079.resume`), so a re-registration -- also after a gateway
  restart -- continues from there.  Homeserver trouble (no answer, 429, 5xx)
  is waited out with jittered exponential back-off; other errors end the
  observation with an error notification.

In application-service mode the loop of a provisioned device user holds no
long-poll: it syncs without waiting on the homeserver whenever the event stream
says its user has news (`comatrix.appservice.wakeups`), and at the latest every
`FALLBACK_SECONDS`.
"""

from __future__ import annotations

import json
import random
from typing import Any, Callable, Mapping

from twisted.internet import defer, task
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure

from comatrix.logs import get_logger
from comatrix.coap.errors import BadRequest, ServiceUnavailable, UnsupportedContentFormat
from comatrix.coap.message import Request, Response, Security
from comatrix.coap.numbers import Code, ContentFormat
from comatrix.coap.resource import LinkAttributes
from comatrix.coap.server import total_delivered
from comatrix.codec import cbor
from comatrix.codec.cbor import CodecError
from comatrix.codec.msc3079 import ACCESS_TOKEN_OPTION, KEY_TABLES
from comatrix.credentials import address_scoped_txn_id
from comatrix.errors import matrix_error_response
from comatrix.identity import acting_as, device_of
from comatrix.interfaces import PluginContext
from comatrix.longpoll import Backoff, Lease, LongPoller, is_transient, long_poller, retry_delay
from comatrix.appservice.wakeups import FALLBACK_SECONDS, Waiter, Wakeups
from comatrix.matrix import api
from comatrix.matrix.errors import HomeserverError, InvalidResponse, MatrixError
from comatrix.matrix.transport import MatrixTransport
from comatrix.msc3079.peers import PeerState, PeerTable
from comatrix.msc3079.resume import ResumePoints, registration_fingerprint
from comatrix.msc3079.translate import (KNOWN_KEY_TABLE, Target, json_from_request, keys_for_client,
                                        map_path, success_code, sync_is_empty, uses_integer_keys,
                                        with_txn_id)
from comatrix.policy import OTHER, check_registration, operation_for
from comatrix.resources import MatrixResource

__all__ = ["Msc3079Settings", "Msc3079Service", "Msc3079Resource", "SyncResource", "LOW_BANDWIDTH"]

log = get_logger(__name__)

#: The /versions key while MSC3079 is a proposal (its stable name is m.low_bandwidth).
LOW_BANDWIDTH = "org.matrix.msc3079.low_bandwidth"
#: Longest Matrix error text passed to the device; the errcode says what matters.
MAX_ERROR_TEXT = 64
#: Content-formats MSC3079 resources speak.
FORMATS = (ContentFormat.CBOR, ContentFormat.JSON)

_SYNC_PATH = ("_matrix", "client", "v3", "sync")


class Msc3079Settings:
    """``[plugins.msc3079]`` settings, checked."""

    def __init__(self, raw: Mapping[str, Any], exchange_lifetime: float) -> None:
        def number(name: str, default: float, low: float) -> float:
            value = raw.get(name, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
                raise ValueError(f"plugins.msc3079.{name} must be a number >= {low}")
            return float(value)

        self.sticky = bool(raw.get("sticky", True))
        self.max_peers = int(number("max_peers", 1024, 1))
        self.sticky_idle_timeout = number("sticky_idle_timeout", exchange_lifetime, 1)
        self.max_sync_loops = int(number("max_sync_loops", 64, 0))
        #: Longest /sync long-poll passed to the homeserver (ms are capped to this).
        self.max_long_poll = number("max_long_poll", min(60.0, exchange_lifetime / 2), 0)
        #: HTTP deadline = long-poll timeout + this margin.
        self.http_margin = number("http_margin", 10.0, 1)
        #: The long-poll an Observe loop asks for; Synapse answers at once when there is news.
        self.observe_poll = min(number("observe_poll", 30.0, 1), self.max_long_poll or 30.0)


class Msc3079Service:
    """State shared by every MSC3079 resource of one gateway."""

    def __init__(self, context: PluginContext, *, long_poll: MatrixTransport | None = None,
                 jitter: Callable[[], float] = random.random) -> None:
        """``long_poll``: a transport for /sync (tests); default: the gateway's long-poll pool."""
        self.context = context
        self.reactor = context.reactor
        self.transport = context.matrix.transport
        self.settings = Msc3079Settings(context.config.plugin_settings("msc3079"),
                                        context.config.coap_settings().exchange_lifetime)
        self.peers = PeerTable(self.settings.max_peers, self.settings.sticky_idle_timeout,
                               self.reactor.seconds, sticky=self.settings.sticky)
        self.long_polls: LongPoller = (LongPoller(long_poll, self.reactor) if long_poll is not None
                                       else long_poller(context))
        self.resumes = ResumePoints(context.store, self.reactor)
        #: Random source of the loops' back-off jitter (tests make it deterministic).
        self.jitter = jitter
        self.loops: dict[LoopKey, SyncLoop] = {}
        #: Application-service mode: who has news, from the event stream (None otherwise).
        self.wakeups: Wakeups | None = None
        if context.events is not None:
            self.wakeups = Wakeups(context.matrix, self.reactor)
            context.events.subscribe(self.wakeups)
        trigger = getattr(self.reactor, "addSystemEventTrigger", None)
        if trigger is not None:
            trigger("before", "shutdown", self.shutdown)

    @classmethod
    def of(cls, context: PluginContext) -> "Msc3079Service":
        service = context.state.get("msc3079")
        if not isinstance(service, cls):
            service = context.state["msc3079"] = cls(context)
        return service

    def shutdown(self) -> None:
        for loop in list(self.loops.values()):
            loop.stop()

    # -- one request ---------------------------------------------------------------------

    def prepare(self, request: Request) -> tuple[PeerState, dict[str, Any] | None, int]:
        """Sticky options, the JSON body, and the key table the answer uses."""
        state = self.peers.update(request)
        body = None
        if request.payload and request.method in (Code.POST, Code.PUT, Code.DELETE):
            decoded = decode_body(request)
            if uses_integer_keys(decoded) and state.version is None:
                state.version = 1  # MSC3079: numeric keys in a request imply version 1
            body = json_from_request(decoded, KEY_TABLES[state.version or 1])
        return state, body, state.version or 0

    async def sync_token(self, request: Request, state: PeerState) -> str | None:
        """The token a /sync acts with: sticky/explicit, else the device's configured credentials."""
        if state.token is not None:
            return state.token
        if self.context.credentials.entry_for(request) is not None:
            return await self.context.credentials.token_for(request, operation="sync")
        return None

    async def call(self, request: Request, target: Target, state: PeerState, body: dict[str, Any] | None,
                   query: tuple[tuple[str, str], ...], operation: str) -> tuple[int, dict[str, Any]]:
        token = state.token if target.takes_token or token_sent(request) else None
        credentials = self.context.credentials

        def send(access_token: str | None) -> "defer.Deferred[tuple[int, dict[str, Any]]]":
            req = api.generic(request.method.name, target.segments, access_token, query, body)
            return self.transport.request(req)

        if token is None and target.takes_token and credentials.entry_for(request) is not None:
            # A [[devices]] entry: one Matrix device for all its addresses, so this one's txnIds get its tag.
            target = with_txn_id(target, lambda txn_id: address_scoped_txn_id(request, txn_id))
            token = await credentials.token_for(request, operation=operation)
            try:
                return await send(token)
            except MatrixError as error:
                if error.http_status != 401 or not credentials.forget(request, token):
                    raise
            return await send(await credentials.token_for(request, operation=operation))
        result = await send(token)
        if target.is_logout and token is not None:
            self.peers.forget_token(request, token)
            await self.resumes.forget(token)
        return result

    def sync(self, token: str | None, query: tuple[tuple[str, str], ...], timeout_ms: int,
             lease: Lease | None = None) -> "defer.Deferred[tuple[int, dict[str, Any]]]":
        """One /sync with ``timeout`` set to ``timeout_ms`` (capped) and an HTTP deadline above it.

        ``lease``: the observation's long-poll slot; without one the call takes its own.
        """
        timeout_ms = max(0, min(timeout_ms, int(self.settings.max_long_poll * 1000)))
        items = tuple((k, v) for k, v in query if k != "timeout") + (("timeout", str(timeout_ms)),)
        return self.long_polls.request(api.generic("GET", _SYNC_PATH, token, items),
                                       timeout_ms / 1000.0 + self.settings.http_margin, lease)


def token_sent(request: Request) -> bool:
    return request.option(ACCESS_TOKEN_OPTION) is not None


def decode_body(request: Request) -> Any:
    if request.content_format in (None, ContentFormat.CBOR):
        return cbor.decode_map(request.payload)
    if request.content_format == ContentFormat.JSON:
        try:
            value = json.loads(request.payload.decode("utf-8"))
        except RecursionError:
            raise CodecError("JSON nested too deeply") from None
        except (UnicodeDecodeError, ValueError):
            raise CodecError("malformed JSON") from None
        if not isinstance(value, dict):
            raise CodecError("body must be a JSON object")
        if cbor.too_deep(value):  # the limit CBOR bodies have
            raise CodecError("JSON nested too deeply")
        return value
    raise UnsupportedContentFormat("expected application/cbor (60)")


def wants_json(request: Request) -> bool:
    if request.accept is not None:
        return request.accept == ContentFormat.JSON
    return request.content_format == ContentFormat.JSON


def query_items(request: Request) -> tuple[tuple[str, str], ...]:
    """Uri-Query as (key, value) pairs in order, repeats kept; no token in URLs."""
    items = []
    for item in request.query:
        key, _, value = item.partition("=")
        if key == "access_token":
            raise BadRequest("send the token in option 256")
        items.append((key, value))
    return tuple(items)


def encode(body: Any, code: Code, version: int, as_json: bool, max_age: int | None = None) -> Response:
    if as_json:
        payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        return Response(code=code, payload=payload, content_format=ContentFormat.JSON, max_age=max_age)
    return Response(code=code, payload=cbor.encode(keys_for_client(body, version)),
                    content_format=ContentFormat.CBOR, max_age=max_age)


def error_answer(error: MatrixError, version: int, as_json: bool) -> Response:
    """The CoAP code and Max-Age of the gateway's table, with ``{errcode, error}`` as payload."""
    mapped = matrix_error_response(error)
    if not error.errcode:
        return mapped
    body: dict[str, Any] = {"errcode": error.errcode}
    if error.message:
        body["error"] = error.message[:MAX_ERROR_TEXT]
    if error.soft_logout:
        body["soft_logout"] = True
    return encode(body, mapped.code, version, as_json, mapped.max_age)


class Msc3079Resource(MatrixResource):
    """``/_matrix/client/...`` or one path code's subtree, passed through to the homeserver."""

    subtree = True
    link = LinkAttributes(rt="org.matrix.msc3079", ct=FORMATS, title="Matrix CS API (MSC3079)")
    operation = OTHER  # each request's own comes from its path (`operation_of`)

    def __init__(self, context: PluginContext, service: Msc3079Service, *, visible: bool = True) -> None:
        super().__init__(context)
        self.service = service
        self.visible = visible

    async def _answer(self, request: Request) -> Response:
        target = map_path(request.path)
        if target.is_sync:
            return await SyncResource.long_poll(self.service, request)
        operation = operation_of(request, target)
        check_registration(self.context.config.allow_registration, operation)
        state, body, version = self.service.prepare(request)
        as_json = wants_json(request)
        try:
            status, answer = await self.service.call(request, target, state, body, query_items(request),
                                                     operation)
        except MatrixError as error:
            return error_answer(error, version, as_json)
        if target.is_versions:
            # The gateway's dtls_port is set exactly when its DTLS port listens.
            answer = advertise(answer, self.service.context.config.dtls_port)
        return encode(answer, success_code(request.method, status), version, as_json)

    render_GET = render_POST = render_PUT = render_DELETE = _answer


def operation_of(request: Request, target: Target) -> str:
    """What a pass-through request does (`comatrix.policy`): by path code, else by full path."""
    return operation_for(request.method.name, target.code, target.segments[3:])


def advertise(versions: dict[str, Any], dtls_port: int | None) -> dict[str, Any]:
    """Synapse's /versions plus what this gateway supports of MSC3079."""
    answer = dict(versions)
    features = answer.get("unstable_features")
    features = dict(features) if isinstance(features, dict) else {}
    features[LOW_BANDWIDTH] = True
    answer["unstable_features"] = features
    answer[LOW_BANDWIDTH] = {"dtls": dtls_port, "cbor_enum_version": KNOWN_KEY_TABLE,
                             "coap_enum_version": 1, "observe": 1}
    return answer


class SyncResource(MatrixResource):
    """``/sync``: long-poll, or Observe with one loop per registration."""

    link = LinkAttributes(rt="org.matrix.msc3079.sync", ct=FORMATS, obs=True, title="Matrix /sync (MSC3079)")
    operation = "sync"

    def __init__(self, context: PluginContext, service: Msc3079Service, *, visible: bool = True) -> None:
        super().__init__(context)
        self.service = service
        self.visible = visible

    def render_GET(self, request: Request) -> Any:
        loop = self.service.loops.get(loop_key(request))
        if loop is not None and loop.request is request and loop.pending is not None:
            return loop.pending  # a notification the loop is pushing right now
        if request.observe == 0:
            return defer.ensureDeferred(self._register(request))
        if request.observe == 1:
            if loop is not None:
                loop.stop()
            return defer.ensureDeferred(self._deregister(request))
        return defer.ensureDeferred(self.long_poll(self.service, request))

    def observer_removed(self, request: Request) -> None:
        loop = self.service.loops.get(loop_key(request))
        if loop is not None and loop.request is request:
            loop.stop()

    @staticmethod
    async def long_poll(service: Msc3079Service, request: Request) -> Response:
        state, _body, version = service.prepare(request)
        query = query_items(request)
        timeout_ms = _timeout_ms(query)
        token = await service.sync_token(request, state)
        try:
            _status, answer = await service.sync(token, query, timeout_ms)
        except MatrixError as error:
            return error_answer(error, version, wants_json(request))
        return encode(answer, Code.CONTENT, version, wants_json(request))

    async def _deregister(self, request: Request) -> Response:
        """Observe: 1 -- the client is done with this observation: its resume point goes too."""
        state, _body, _version = self.service.prepare(request)
        token = await self.service.sync_token(request, state)
        if token is not None:
            await self.service.resumes.forget(token, request.token)
        return await self.long_poll(self.service, request)

    async def _register(self, request: Request) -> Response:
        service = self.service
        key = loop_key(request)
        old = service.loops.get(key)
        if old is not None:
            old.stop()  # a re-registration replaces the loop (and resumes from the acknowledged point)
        if len(service.loops) >= service.settings.max_sync_loops:
            raise ServiceUnavailable("too many sync observers", max_age=60)
        lease = service.long_polls.lease()  # the loop's slot, from now to its end
        try:
            return await self._start_loop(request, key, lease)
        except BaseException:
            lease.release()
            raise

    async def _start_loop(self, request: Request, key: LoopKey, lease: Lease) -> Response:
        """The registration's answer; a `SyncLoop` holding ``lease`` is started unless it fails."""
        service = self.service
        state, _body, version = service.prepare(request)
        as_json = wants_json(request)
        query = query_items(request)
        token = await service.sync_token(request, state)
        registration = registration_fingerprint(query)
        try:
            if token is not None and not _wants_full_state(query):
                answer = await self._first_answer(request, token, query, registration, lease)
            else:
                _status, answer = await service.sync(token, query, 0, lease)
        except MatrixError as error:
            lease.release()
            return error_answer(error, version, as_json)
        next_batch = answer.get("next_batch")
        if not isinstance(next_batch, str):
            raise InvalidResponse("/sync answer without next_batch")
        if len(service.loops) >= service.settings.max_sync_loops:
            raise ServiceUnavailable("too many sync observers", max_age=60)
        loop = SyncLoop(service, self, request, token, version, as_json, next_batch,
                        tuple((k, v) for k, v in query if k not in ("since", "timeout", "full_state")),
                        registration, lease)
        service.loops[key] = loop
        # Start once the CoAP layer has registered the observer with this answer.
        service.reactor.callLater(0, loop.start)
        return encode(answer, Code.CONTENT, version, as_json)

    async def _first_answer(self, request: Request, token: str, query: tuple[tuple[str, str], ...],
                            registration: bytes, lease: Lease) -> dict[str, Any]:
        """The registration answer: from the observation's resume point if it has one
        (see `comatrix.msc3079.resume`), else as the request asks."""
        service = self.service
        resume = await service.resumes.resume_from(token, request.token, registration)
        if resume is None:
            _status, answer = await service.sync(token, query, 0, lease)
            return answer
        log.info("sync observation of {peer} resumes from its last acknowledged batch", peer=str(request.peer))
        try:
            _status, answer = await service.sync(token, _with_since(query, resume), 0, lease)
        except MatrixError as error:
            if error.http_status == 401 or is_transient(error):
                raise
            # The homeserver no longer knows that position: serve the request as it was asked.
            log.info("resume point of {peer} refused ({error}); serving the registration as asked",
                     peer=str(request.peer), error=error.errcode or error.http_status)
            await service.resumes.forget(token, request.token)
            _status, answer = await service.sync(token, query, 0, lease)
        return answer


def _with_since(query: tuple[tuple[str, str], ...], since: str) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in query if k != "since") + (("since", since),)


def _wants_full_state(query: tuple[tuple[str, str], ...]) -> bool:
    return any(key == "full_state" and value.lower() == "true" for key, value in query)


def _timeout_ms(query: tuple[tuple[str, str], ...]) -> int:
    for key, value in reversed(query):
        if key == "timeout":
            try:
                return max(0, int(value))
            except ValueError:
                raise BadRequest("timeout must be an integer (ms)") from None
    return 0


#: One Observe registration: peer address and port, CoAP token, and the security context
#: (as the CoAP layer keys observations), so a plain request never replaces a secured loop.
LoopKey = tuple[str, int, bytes, Security | None]


def loop_key(request: Request) -> LoopKey:
    return (request.peer.host, request.peer.port, request.token, request.security)


class SyncLoop:
    """Long-polls /sync for one Observe registration and pushes each batch as a CON notification."""

    def __init__(self, service: Msc3079Service, resource: SyncResource, request: Request,
                 token: str | None, version: int, as_json: bool, since: str,
                 query: tuple[tuple[str, str], ...], registration: bytes, lease: Lease) -> None:
        self.service = service
        self.resource = resource
        self.request = request
        self._token = token
        self.version = version
        self.as_json = as_json
        self.since = since
        self.query = query
        #: Fingerprint of the registration request: the resume point belongs to it.
        self.registration = registration
        #: The device the homeserver is told each /sync is for (``X-Forwarded-For``).
        self.device = device_of(request)
        #: The device's long-poll slot this loop holds until it stops.
        self.lease = lease
        self.pending: Response | None = None
        self.stopped = False
        self._waiting: defer.Deferred[Any] | None = None
        self.done: defer.Deferred[None] = defer.Deferred()

    def __repr__(self) -> str:
        return f"SyncLoop(peer={self.request.peer}, since={self.since!r}, stopped={self.stopped})"

    def start(self) -> None:
        if self.stopped:
            return
        # Started by a timer, outside the registration's context: its /syncs are still for its device.
        with acting_as(self.device):
            running = defer.ensureDeferred(self._run())
        running.addBoth(self._finished)

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.lease.release()
        if self.service.loops.get(loop_key(self.request)) is self:
            del self.service.loops[loop_key(self.request)]
        if self._waiting is not None:
            self._waiting.cancel()

    def _finished(self, result: Any) -> None:
        if isinstance(result, Failure) and not result.check(CancelledError):
            log.failure("sync loop failed", result)
        self.stop()
        self.done.callback(None)

    async def _wait(self, d: "defer.Deferred[Any]") -> Any:
        self._waiting = d
        try:
            return await d
        finally:
            self._waiting = None

    def _observed(self) -> bool:
        """Whether the CoAP layer still holds this registration (a resource on no site: assume so).

        A registration the CoAP layer did not take (its observer cap) or dropped without
        telling `SyncResource.observer_removed` must not keep long-polling -- and holding its
        device's long-poll slot -- for nobody.
        """
        if not self.resource.served:
            return True
        return any(registered is self.request for registered in self.resource.observer_requests())

    async def _run(self) -> None:
        waiter = None
        wakeups = self.service.wakeups
        if wakeups is not None and isinstance(self._token, api.AppserviceToken):
            try:
                waiter = await self._wait(defer.ensureDeferred(wakeups.track(self._token)))
            except CancelledError:
                return
            except HomeserverError as error:
                log.info("sync observation of {peer}: joined rooms unknown ({error}); it long-polls",
                         peer=str(self.request.peer), error=type(error).__name__)
        try:
            await self._loop(waiter)
        finally:
            if waiter is not None:
                waiter.release()

    async def _next_sync(self, waiter: Waiter | None, first: bool) -> dict[str, Any]:
        """The next /sync answer: a long-poll, or for a fed observation a sync once its user has news."""
        timeout_ms = int(self.service.settings.observe_poll * 1000)
        if waiter is not None:
            if not first:
                await self._wait(waiter.next(FALLBACK_SECONDS))
            timeout_ms = 0
        _status, answer = await self._wait(self.service.sync(
            self._token, self.query + (("since", self.since),), timeout_ms, self.lease))
        return answer

    async def _loop(self, waiter: Waiter | None) -> None:
        backoff = Backoff(random=self.service.jitter)
        first = True
        while not self.stopped:
            if not self._observed():
                log.info("sync observation of {peer} is no longer registered: its loop ends",
                         peer=str(self.request.peer))
                return
            try:
                answer = await self._next_sync(waiter, first)
                first = False
            except CancelledError:
                return
            except HomeserverError as error:
                if isinstance(error, MatrixError) and not is_transient(error):
                    log.info("sync observation of {peer} ends: {error}", peer=str(self.request.peer),
                             error=error.errcode or error.http_status)
                    if error.http_status == 401 and self._token is not None:
                        await self.service.resumes.forget(self._token)
                    await self._push(error_answer(error, self.version, self.as_json))
                    return
                # Trouble to wait out; the loop keeps its position (since), and syncs again at once after.
                first = True
                delay = retry_delay(backoff, error)
                log.info("sync observation of {peer}: {error}; retrying in {delay:.1f} s",
                         peer=str(self.request.peer), error=str(error) if isinstance(error, MatrixError)
                         else type(error).__name__, delay=delay)
                try:
                    await self._wait(task.deferLater(self.service.reactor, delay, lambda: None))
                except CancelledError:
                    return
                continue
            backoff.reset()
            next_batch = answer.get("next_batch")
            if not isinstance(next_batch, str):
                log.warn("/sync answer without next_batch; observation of {peer} ends",
                         peer=str(self.request.peer))
                return
            self.since = next_batch
            if sync_is_empty(answer):
                continue
            try:
                delivered = await self._push(encode(answer, Code.CONTENT, self.version, self.as_json))
            except CancelledError:
                return
            if not delivered:
                return  # the observer is gone (RST, no ACK, deregistered)
            if self._token is not None:
                await self.service.resumes.delivered(self._token, self.request.token, self.registration,
                                                     next_batch)

    async def _push(self, response: Response) -> int:
        """Notify this registration only, as CON; the number delivered (0 or 1)."""
        request = self.request
        self.pending = response
        try:
            delivered = self.resource.notify_observers(lambda r: r is request, confirmable=True)
        finally:
            self.pending = None
        # Cancelled by stop(): CancelledError, while the CON itself is left to finish.
        return await self._wait(total_delivered([delivered]))
