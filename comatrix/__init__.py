"""CoMatrix: a CoAP + CBOR gateway to the Matrix Client-Server API for constrained devices."""

__version__ = "0.1.0"
