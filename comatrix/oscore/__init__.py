"""OSCORE (RFC 8613) on the ordinary CoAP port: security contexts, the compressed COSE codec and the layer.

`OscoreLayer` plugs into `comatrix.coap.server.CoapServer` as its
``protection``; `ContextStore` holds the contexts (from ``[[devices]]`` entries,
later from EDHOC).  Nothing here knows about Matrix.
"""

from comatrix.oscore.context import SecurityContext
from comatrix.oscore.contexts import SEQUENCE_FILENAME, ContextStore, SequenceFile
from comatrix.oscore.layer import ECHO_OPTION, OscoreLayer

__all__ = ["SecurityContext", "ContextStore", "SequenceFile", "SEQUENCE_FILENAME", "OscoreLayer", "ECHO_OPTION"]
