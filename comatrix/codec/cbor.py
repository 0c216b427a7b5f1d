"""CBOR in and out for request and response bodies: decoding with limits, typed field access.

Pure functions, no I/O.  Every problem raises `CodecError` with a short
diagnostic that is safe to send back to the device (it never echoes values).
"""

from __future__ import annotations

import io
from typing import Any, Mapping

import cbor2

#: Deepest nesting accepted in a request body; Matrix bodies a device sends are shallow.
MAX_DEPTH = 8
#: Longest text string accepted in a field unless the caller says otherwise.
MAX_STRING = 4096


class CodecError(ValueError):
    """The body is not what the resource needs; the message is the 4.00 diagnostic."""


def decode(payload: bytes) -> Any:
    """Decode one CBOR data item; trailing bytes, bad encodings and deep nesting are errors."""
    stream = io.BytesIO(payload)
    try:
        value = cbor2.CBORDecoder(stream).decode()
    except RecursionError:
        raise CodecError("CBOR nested too deeply") from None
    except Exception:  # cbor2 raises a zoo of types, including ValueError subclasses and TypeError
        raise CodecError("malformed CBOR") from None
    if stream.tell() != len(payload):
        raise CodecError("trailing bytes after CBOR item")
    if too_deep(value):
        raise CodecError("CBOR nested too deeply")
    return value


def too_deep(value: Any) -> bool:
    """Whether an already decoded body (CBOR, or JSON) nests deeper than `MAX_DEPTH`."""
    return _depth(value) > MAX_DEPTH


def decode_map(payload: bytes) -> dict[Any, Any]:
    """The body as a CBOR map; an empty payload is an empty map."""
    if not payload:
        return {}
    value = decode(payload)
    if not isinstance(value, dict):
        raise CodecError("body must be a CBOR map")
    return value


def encode(value: Any) -> bytes:
    return cbor2.dumps(value)


def _depth(value: Any, level: int = 1) -> int:
    if level > MAX_DEPTH:
        return level
    if isinstance(value, dict):
        return max([level] + [_depth(item, level + 1) for item in value.values()])
    if isinstance(value, list):
        return max([level] + [_depth(item, level + 1) for item in value])
    return level


def text(body: Mapping[Any, Any], key: str, *, max_length: int = MAX_STRING,
         required: bool = True) -> str | None:
    """A text-string field; missing -> error if required, else None."""
    value = body.get(key)
    if value is None:
        if required:
            raise CodecError(_missing(body, key))
        return None
    if not isinstance(value, str):
        raise CodecError(f"{key} must be a text string")
    if not value:
        raise CodecError(f"{key} must not be empty")
    if len(value.encode("utf-8", "surrogatepass")) > max_length:
        raise CodecError(f"{key} too long")
    return value


def _missing(body: Mapping[Any, Any], key: str) -> str:
    # An empty body is most often a payload file that was never written (a failed
    # command before the CoAP client): say so rather than name the first field.
    return f"missing {key}" if body else f"empty body: expected a CBOR map with {key}"


def mapping(body: Mapping[Any, Any], key: str, *, required: bool = False) -> dict[Any, Any] | None:
    value = body.get(key)
    if value is None:
        if required:
            raise CodecError(_missing(body, key))
        return None
    if not isinstance(value, dict):
        raise CodecError(f"{key} must be a map")
    return value
