"""One device cannot lock the others out of Matrix: against a real Synapse with its DEFAULT rate limits.

Synapse limits logins per client address (``rc_login.address``: a burst of 5, then
one every ~5 minutes).  Without ``X-Forwarded-For`` every device behind the gateway
is one address to it, so five wrong passwords from one device used to earn every
other device 4.29 (issue 10).  The gateway now names each device in
``X-Forwarded-For`` and the test Synapse trusts it (``x_forwarded: true``), so the
guesser spends only its own share.  Distinct 127.0.0.x source addresses stand in
for distinct devices.

The guesser aims at an account of its own choosing, not the victims': Synapse's
per-account ``failed_attempts`` limit protects that account whatever the address,
and rightly so.
"""

from __future__ import annotations

from pathlib import Path

import cbor2
import pytest

from comatrix.client import UdpCoap
from comatrix.coap.numbers import Code, ContentFormat
from comatrix.compact.codec import PATHS, LoginRequest
from support.coap_clients import harvest_secrets
from support.secrets import remember
from support.synapse import SynapseServer

pytestmark = pytest.mark.integration

CBOR = ContentFormat.CBOR
ATTACKER, VICTIM, COMPACT, SENSOR = "127.0.0.66", "127.0.0.2", "127.0.0.3", "127.0.0.4"


def login_body(user: str, password: str) -> bytes:
    return cbor2.dumps({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user},
                        "password": password})


def test_five_wrong_logins_from_one_device_lock_out_no_other_device(
        make_gateway, synapse_default_limits: SynapseServer, tmp_path: Path) -> None:
    hs = synapse_default_limits
    target, victim, compact, sensor = (hs.make_user(prefix) for prefix in ("target", "victim", "compact", "sensor"))
    room_id = hs.create_room(sensor.access_token)
    credentials = tmp_path / "credentials.toml"
    credentials.write_text(f'[[devices]]\naddress = "{SENSOR}/32"\nuser = "{sensor.user_id}"\n'
                           f'password = "{sensor.password}"\n')
    credentials.chmod(0o640)
    gw = make_gateway(homeserver=hs.base_url, config_text=f'credentials_file = "{credentials}"\n')
    wrong = remember("not-the-password-" + target.localpart)

    with UdpCoap(gw.uri(), source=ATTACKER) as attacker:
        codes = [attacker.request(Code.POST, "login", payload=login_body(target.localpart, wrong),
                                  content_format=CBOR).code for _ in range(5)]
    # Synapse checked them (4.03); once the target account's own failed_attempts limit is
    # reached, Synapse answers 4.29 for that account.  All five reached Synapse.
    assert codes[0] == Code.FORBIDDEN and set(codes) <= {Code.FORBIDDEN, Code.TOO_MANY_REQUESTS}, codes

    with UdpCoap(gw.uri(), source=VICTIM) as device:
        logged_in = device.request(Code.POST, "login", payload=login_body(victim.localpart, victim.password),
                                   content_format=CBOR)
    harvest_secrets(logged_in.payload)
    assert logged_in.code == Code.CHANGED, logged_in
    assert cbor2.loads(logged_in.payload)["user_id"] == victim.user_id

    with UdpCoap(gw.uri(), source=COMPACT) as device:
        session = device.request(Code.POST, PATHS["login"], content_format=CBOR,
                                 payload=LoginRequest(compact.localpart, compact.password).encode())
    assert session.code == Code.CREATED, session

    with UdpCoap(gw.uri(), source=SENSOR) as device:  # the gateway logs the [[devices]] entry in first
        sent = device.request(Code.POST, "send", content_format=CBOR,
                              payload=cbor2.dumps({"room_id": room_id, "body": "21.5 C"}))
    assert sent.code == Code.CHANGED, sent
    assert hs.text_messages(sensor.access_token, room_id, limit=1)[0]["content"]["body"] == "21.5 C"

    # Synapse saw each device at its own address (its access log names the client address),
    # and all five guesses were its to judge: none was refused by the gateway.
    access = [line for line in hs.log_text().splitlines() if "synapse.access" in line]
    for address in (ATTACKER, VICTIM, COMPACT, SENSOR):
        assert any(f"INFO {address} - " in line for line in access), address
    assert sum(f"INFO {ATTACKER} - " in line and "/login " in line for line in access) == 5
