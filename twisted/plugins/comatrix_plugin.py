"""twistd dropin: makes ``twistd comatrix`` start the CoMatrix gateway (see comatrix.tap)."""

from twisted.application.service import ServiceMaker

comatrix = ServiceMaker(
    "CoMatrix",
    "comatrix.tap",
    "CoAP/CBOR gateway to the Matrix Client-Server API for constrained devices",
    "comatrix",
)
