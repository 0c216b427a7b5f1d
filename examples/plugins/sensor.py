"""Example third-party CoMatrix plugin: ``POST /sensor`` posts a device's readings to a room.

Install: copy this file into a plugin directory (``--plugin-dir DIR`` or
``plugin_dirs = ["DIR"]``; ``/etc/comatrix/plugins`` for the Debian package) and
configure the room::

    [plugins.sensor]
    room = "#sensors:example.org"      # room id or alias the device has joined

Request: POST /sensor, Content-Format 60, CBOR map of reading name -> number,
optionally ``"seq"`` (a device counter: a retry with the same seq never posts
twice).  Response: 2.04 with no payload.  The message is an ``m.notice`` such as
``temp=21.5 hum=40`` with the raw readings under ``org.comatrix.readings`` (non-integers
as text: Matrix event content may not hold floats).
"""

from __future__ import annotations

import secrets

from comatrix.coap import Code, ContentFormat, LinkAttributes, Request, Response
from comatrix.coap.errors import BadRequest
from comatrix.resources import MatrixResource, ResourcePlugin

MAX_READINGS = 16


class SensorResource(MatrixResource):
    link = LinkAttributes(rt="comatrix.example.sensor", ct=(ContentFormat.CBOR,),
                          title="Post sensor readings")

    async def render_POST(self, request: Request) -> Response:
        body = self.body(request)
        room = self.context.config.plugin_settings("sensor").get("room")
        if not isinstance(room, str):
            raise BadRequest("sensor plugin: no room configured")
        seq = body.pop("seq", None)
        if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < 2**63):
            raise BadRequest("seq must be an unsigned integer")
        if not body or len(body) > MAX_READINGS:
            raise BadRequest(f"send 1 to {MAX_READINGS} readings")
        readings = {}
        for name, value in body.items():
            if not isinstance(name, str) or len(name) > 32:
                raise BadRequest("reading names are short text strings")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise BadRequest(f"reading {name} must be a number")
            # Matrix events are canonical JSON: no floats, so non-integers travel as text.
            readings[name] = value if isinstance(value, int) else repr(value)
        text = " ".join(f"{name}={value}" for name, value in readings.items())
        content = {"msgtype": "m.notice", "body": text, "org.comatrix.readings": readings}
        # A device-chosen key goes through device_txn_id: devices sharing a [[devices]] entry are
        # one Matrix device, whose txn ids it tags with the device's address.
        txn_id = (self.device_txn_id(request, f"sensor-{seq}") if seq is not None
                  else "sensor-" + secrets.token_urlsafe(12))

        async def post(token: str) -> str:
            room_id = await self.matrix.resolve_room(token, room)
            return await self.matrix.send_message(token, room_id, content, txn_id)

        await self.with_token(request, post)
        return Response(code=Code.CHANGED)


plugin = ResourcePlugin("sensor", ("sensor",), SensorResource)
