"""The compact device profile: every common device operation in one 802.15.4 frame.

* `comatrix.compact.codec` -- the wire layouts (pure functions; the device client
  and the gateway share them, and ``docs/protocol.rst`` specifies them byte by byte);
* `comatrix.compact.service` -- sessions, room handles, message cursors and the
  per-session ``/sync`` loop that feeds Observe notifications.

The CoAP resources live in ``comatrix.plugins.compact``.
"""
