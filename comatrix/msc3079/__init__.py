"""Native MSC3079 (Low Bandwidth Client-Server API) over CoAP.

* `comatrix.msc3079.translate` -- pure: Uri-Path -> homeserver path, integer
  keys <-> names with the request checks, HTTP success status -> CoAP code.
* `comatrix.msc3079.peers` -- the bounded per-peer table of sticky option 256
  (access token) and option 257 (key-table version) values.
* `comatrix.msc3079.service` -- the resources (pass-through, ``/versions``,
  ``/sync`` long-poll and Observe) and the shared per-gateway state.
* `comatrix.msc3079.resume` -- where each ``/sync`` observation got to (the
  last acknowledged ``next_batch``), kept in SQLite across restarts.

The plugins that put these resources on the site live in
``comatrix.plugins.msc3079``.
"""
