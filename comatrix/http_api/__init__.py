"""The internal HTTP/JSON API for services on the border router (the seed spec's ``/internal/matrix``).

A second face on the same Matrix operations the CoAP resources use
(`comatrix.matrix.client.MatrixClient`): ``routes`` is the one table of
endpoints (and the OpenAPI document made from it), ``server`` authenticates,
limits and dispatches, ``endpoints`` turns each request into one operation.
"""
