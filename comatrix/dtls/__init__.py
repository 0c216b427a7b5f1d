"""CoAP over DTLS 1.2 (PSK): a way in below the CoAP message layer, with no Matrix knowledge.

`DtlsProtocol` (``comatrix.dtls.server``) owns the ``dtls_port`` and its sessions;
`comatrix.dtls.libssl` is the small ctypes binding to OpenSSL it runs on;
`comatrix.dtls.sessions` keeps the bounded session table.
"""

from comatrix.dtls.sessions import DtlsSettings

__all__ = ["DtlsSettings"]
