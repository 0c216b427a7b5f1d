"""EDHOC (RFC 9528): OSCORE contexts established at run time from static P-256 keys, no shared secret.

`ccs` (pure) reads and writes the CCS credentials; `responder` runs the
exchanges with lakers-python (optional: `available` says whether it imports);
`resource` serves ``/.well-known/edhoc`` and the RFC 9668 combined request.
"""
