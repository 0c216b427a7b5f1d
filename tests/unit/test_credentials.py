"""`comatrix.credentials.Credentials` with a store: a configured device's login outlives a restart."""

from __future__ import annotations

from typing import Any

from comatrix.coap.message import Peer, Request, Security
from comatrix.coap.numbers import Code
from comatrix.credentials import Credentials, address_scoped_txn_id
from comatrix.matrix.testing import run
from support.world import World

HOST = "2001:db8::5"


class KeptTokens:
    """The three `comatrix.store.Store` methods `Credentials` uses, in a dict."""

    def __init__(self) -> None:
        self.tokens: dict[tuple[str, str], str] = {}

    async def device_token(self, user_id: str, device_id: str) -> str | None:
        return self.tokens.get((user_id, device_id))

    async def save_device_token(self, user_id: str, device_id: str, access_token: str, now: float) -> None:
        self.tokens[(user_id, device_id)] = access_token

    async def forget_device_token(self, user_id: str, device_id: str, access_token: str) -> None:
        if self.tokens.get((user_id, device_id)) == access_token:
            del self.tokens[(user_id, device_id)]


def credentials(world: World, store: Any) -> Credentials:
    context = world.context([{"address": "2001:db8::/64", "user": world.user_id, "password": "pw"}])
    return Credentials(context.config.devices, context.matrix, store)


def request() -> Request:
    return Request(method=Code.POST, path=("send",), peer=Peer(HOST, 5683))


def test_the_token_of_a_login_is_kept_and_reused_by_the_next_process() -> None:
    world, store = World(), KeptTokens()
    first = run(credentials(world, store).token_for(request(), operation="send"))
    assert len(world.homeserver.calls("login")) == 1
    assert list(store.tokens.values()) == [first]
    # The gateway restarts: a new Credentials over the same store logs in no more.
    assert run(credentials(world, store).token_for(request(), operation="send")) == first
    assert len(world.homeserver.calls("login")) == 1


def test_a_refused_token_is_dropped_and_replaced_by_a_new_login() -> None:
    world, store = World(), KeptTokens()
    creds = credentials(world, store)
    old = run(creds.token_for(request(), operation="send"))
    assert creds.forget(request(), old)  # the homeserver said 401
    assert store.tokens == {}
    new = run(creds.token_for(request(), operation="send"))
    assert new != old and list(store.tokens.values()) == [new]
    assert len(world.homeserver.calls("login")) == 2


def test_a_kept_copy_of_the_refused_token_is_not_reused() -> None:
    world, store = World(), KeptTokens()
    creds = credentials(world, store)
    old = run(creds.token_for(request(), operation="send"))
    kept = dict(store.tokens)
    assert creds.forget(request(), old)
    store.tokens.update(kept)  # as if dropping it had not reached the database yet
    assert run(creds.token_for(request(), operation="send")) != old


def test_a_second_request_refused_with_the_same_token_retries_too() -> None:
    # After a restart two requests both used the kept token; it was revoked meanwhile.
    world, store = World(), KeptTokens()
    creds = credentials(world, store)
    old = run(creds.token_for(request(), operation="send"))
    assert creds.forget(request(), old)       # the first refusal drops it...
    assert creds.forget(request(), old)       # ...and the second is worth a retry as well
    assert not creds.forget(request(), "syt_never_ours_0000")


class BrokenStore(KeptTokens):
    async def device_token(self, user_id: str, device_id: str) -> str | None:
        raise OSError("disk I/O error")

    async def save_device_token(self, user_id: str, device_id: str, access_token: str, now: float) -> None:
        raise OSError("database or disk is full")


def test_a_failing_store_costs_a_login_not_the_request() -> None:
    from twisted.logger import globalLogPublisher

    world = World()
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        creds = credentials(world, BrokenStore())
        token = run(creds.token_for(request(), operation="send"))
        assert run(creds.token_for(request(), operation="send")) == token  # then from memory
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert len(world.homeserver.calls("login")) == 1
    assert len([e for e in events if "log_failure" in e]) == 2  # read and save, each logged once


class PruningStore(KeptTokens):
    async def keep_device_tokens_of(self, logins: Any) -> int:
        wanted = set(logins)
        stale = [key for key in self.tokens if key not in wanted]
        for key in stale:
            del self.tokens[key]
        return len(stale)


def test_kept_tokens_of_removed_entries_are_dropped_at_start() -> None:
    world, store = World(), PruningStore()
    creds = credentials(world, store)
    current = run(creds.token_for(request(), operation="send"))
    store.tokens[("@s:hs", "REMOVED-ENTRY")] = "syt_left_over_0000"
    run(creds.drop_unconfigured_tokens())
    assert list(store.tokens.values()) == [current]


def test_an_entry_is_found_by_the_psk_identity_a_dtls_request_proved() -> None:
    world = World()
    context = world.context([{"address": HOST, "user": world.user_id, "password": "pw"},
                             {"user": "@other:example.org", "password": "pw2", "psk_identity": "s1",
                              "psk": "a-long-enough-psk-secret"}])
    creds = Credentials(context.config.devices, context.matrix)
    over_dtls = Request(method=Code.POST, path=("send",), peer=Peer(HOST, 5684), security=Security("dtls", "s1"))
    found = creds.entry_for(over_dtls)
    assert found is not None and found.user == "@other:example.org"
    # The same address in plain CoAP gets the address entry; an unknown identity gets none.
    plain = creds.entry_for(request())
    assert plain is not None and plain.user == world.user_id
    stranger = Request(method=Code.POST, path=("send",), peer=Peer("192.0.2.9", 5684),
                       security=Security("dtls", "s2"))
    assert creds.entry_for(stranger) is None
    assert creds.psk_for("s1") == b"a-long-enough-psk-secret" and creds.psk_for("s2") is None
    assert address_scoped_txn_id(over_dtls, "7") != address_scoped_txn_id(request(), "7")


def test_a_request_through_an_oscore_context_acts_through_the_entry_of_its_recipient_id() -> None:
    world = World()
    secret = "00112233445566778899aabbccddeeff"
    context = world.context([
        {"address": "2001:db8::/64", "access_token": "by-address"},
        {"access_token": "by-oscore", "oscore": {"recipient_id": "01", "sender_id": "", "master_secret": secret}},
    ])
    creds = Credentials(context.config.devices, context.matrix, None)
    secured = Request(method=Code.POST, path=("send",), peer=Peer(HOST, 5683), security=Security("oscore", "01"))
    assert run(creds.token_for(secured, operation="send")) == "by-oscore"  # the identity wins over the address
    assert run(creds.token_for(request(), operation="send")) == "by-address"
    elsewhere = Request(method=Code.POST, path=("send",), peer=Peer("192.0.2.9", 1), security=Security("oscore", "01"))
    assert run(creds.token_for(elsewhere, operation="send")) == "by-oscore"  # from any address
    assert address_scoped_txn_id(secured, "7") == address_scoped_txn_id(elsewhere, "7")
    assert address_scoped_txn_id(secured, "7") != address_scoped_txn_id(request(), "7")


def test_a_single_address_entry_beats_the_prefix_holding_it_whatever_the_order() -> None:
    world = World()
    context = world.context([{"address": "2001:db8::/64", "access_token": "prefix"},
                             {"address": "192.0.2.0/24", "access_token": "v4-prefix"},
                             {"address": "192.0.2.7", "access_token": "v4-host"},
                             {"address": HOST, "access_token": "host"}])
    creds = Credentials(context.config.devices, context.matrix)

    def token(host: str) -> str | None:
        device = creds.device_for(host)
        return None if device is None else device.access_token

    assert token(HOST) == "host" and token("2001:db8::6") == "prefix"
    assert token(HOST + "%lowpan0") == "host"  # the zone id is not part of the address
    assert token("192.0.2.7") == "v4-host" and token("::ffff:192.0.2.7") == "v4-host"  # IPv4-mapped
    assert token("192.0.2.8") == "v4-prefix"
    assert token("198.51.100.1") is None and token("not-an-address") is None
