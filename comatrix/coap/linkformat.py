"""``/.well-known/core``: RFC 6690 link-format built from each resource's `LinkAttributes`.

txThings' ``generateResourceList`` fails on Python 3 (facts §7.3); this
module replaces it.  Filtering follows RFC 6690 §4.1: one query parameter,
``href`` or a link attribute, with a trailing ``*`` meaning prefix match.
"""

from __future__ import annotations

from typing import Callable, Iterable
from urllib.parse import quote, unquote

from comatrix.coap.message import Request, Response
from comatrix.coap.numbers import Code, ContentFormat
from comatrix.coap.resource import CoapResource, LinkAttributes

WELL_KNOWN_CORE = (".well-known", "core")

Path = tuple[str, ...]


def href(path: Path) -> str:
    return "/" + "/".join(quote(segment, safe="!$&'()*+,;=:@-._~") for segment in path)


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def link_attributes(link: LinkAttributes) -> list[tuple[str, str | None]]:
    """The (name, value) pairs of one link; value None for a flag like ``obs``."""
    pairs: list[tuple[str, str | None]] = []
    if link.rt is not None:  # rt="" is a statement of its own (no resource type), not an absent rt
        pairs.append(("rt", link.rt))
    if link.interface:
        pairs.append(("if", link.interface))
    if link.ct:
        pairs.append(("ct", " ".join(str(ct) for ct in link.ct)))
    if link.sz is not None:
        pairs.append(("sz", str(link.sz)))
    if link.title:
        pairs.append(("title", link.title))
    if link.obs:
        pairs.append(("obs", None))
    return pairs


def format_link(path: Path, link: LinkAttributes) -> str:
    parts = [f"<{href(path)}>"]
    for name, value in link_attributes(link):
        if value is None:
            parts.append(name)
        elif name in ("ct", "sz") and " " not in value:
            parts.append(f"{name}={value}")
        else:
            parts.append(f"{name}={_quoted(value)}")
    return ";".join(parts)


def _matches(pattern: str, candidates: Iterable[str]) -> bool:
    if pattern.endswith("*"):
        prefix = pattern[:-1]
        return any(candidate.startswith(prefix) for candidate in candidates)
    return any(candidate == pattern for candidate in candidates)


def link_matches(path: Path, link: LinkAttributes, query: tuple[str, ...]) -> bool:
    """RFC 6690 §4.1 filtering; an empty query matches everything."""
    for item in query:
        name, has_value, raw_value = item.partition("=")
        name = unquote(name)
        value = unquote(raw_value)
        if name == "href":
            if not _matches(value, [href(path)]):
                return False
            continue
        attributes = dict(link_attributes(link))
        if name not in attributes:
            return False
        present = attributes[name]
        if present is None:  # flag attribute such as obs
            if has_value and value not in ("", "*"):
                return False
            continue
        # rt, if and ct are space-separated lists; a filter matches any member.
        members = present.split(" ") if name in ("rt", "if", "ct") else [present]
        if not _matches(value, members):
            return False
    return True


def link_format(resources: Iterable[tuple[Path, CoapResource]], query: tuple[str, ...] = ()) -> str:
    return ",".join(format_link(path, resource.link) for path, resource in resources
                    if getattr(resource, "visible", True) and link_matches(path, resource.link, query))


class WellKnownCore(CoapResource):
    """Served automatically by every `Site`; large listings go out block-wise like any response."""

    link = LinkAttributes(ct=(ContentFormat.LINK_FORMAT,))

    def __init__(self, listing: Callable[[], Iterable[tuple[Path, CoapResource]]]) -> None:
        super().__init__()
        self.visible = False
        self._listing = listing

    def render_GET(self, request: Request) -> Response:
        body = link_format(self._listing(), request.query)
        return Response(code=Code.CONTENT, payload=body.encode("utf-8"),
                        content_format=ContentFormat.LINK_FORMAT)
