"""Application-service mode: the gateway as a Matrix application service (AS API v1).

Provisioned devices are users of the gateway's exclusive namespace
(``@<prefix>NAME:<server>``).  A request from one acts as its user with the
``as_token`` and identity assertion (`comatrix.matrix.api.AppserviceToken`):
no password, no login, no per-device token.  The homeserver pushes new events
in transactions (`comatrix.appservice.server`); one stream
(`comatrix.appservice.stream`) feeds every watching device from them, accepts
invitations for device users from allowed inviters and drops events it has
seen, so no device holds a ``/sync`` long-poll.

``registration`` builds and reads the registration file Synapse loads
(``app_service_config_files``).
"""
