"""Semantic-convention attributes for generated spans, by protocol.

The model writes services, operations, kinds, times and status; real spans also carry protocol attributes
(``http.*``, ``rpc.*``, ``db.*``) that backends group and filter by. Where the training data had attributes,
the catalog keeps those that were constant for an operation (``Catalog.attributes``) and they are copied as
seen. Where it had none (the Nezha captures keep only names), they are inferred from the operation name and
kind, following the OpenTelemetry semantic conventions (v1.26+ names):

- ``pkg.Service/Method`` (gRPC full method names) -> ``rpc.system=grpc``, ``rpc.service``, ``rpc.method``, and
  ``rpc.grpc.status_code`` (0, or 2 UNKNOWN on error);
- ``GET``, ``HTTP GET``, ``GET /path`` and ``/path`` routes -> ``http.request.method``, ``http.route`` (server) or
  ``url.path`` (client), and ``http.response.status_code`` (200, or 500 on error) on server and client spans;
- ``SELECT table`` (and INSERT, UPDATE, DELETE) -> ``db.operation.name``, ``db.collection.name``,
  ``db.query.summary``;
- ``Class.method`` (controllers, repositories) -> ``code.function.name``.

Every inferred span also gets nothing that could be mistaken for measured data: no hosts, ports or sizes.
"""

from __future__ import annotations

import re

from .trace import AttrValue, SpanKind, StatusCode

_RPC = re.compile(r"(?:grpc\.)?((?:[A-Za-z_][\w]*\.)+[A-Za-z_]\w*)/([A-Za-z_]\w*)\Z")
_HTTP = re.compile(r"(?:HTTP )?(GET|POST|PUT|DELETE|PATCH|HEAD|OPTIONS)(?: (/\S*))?\Z")
_DB = re.compile(r"(SELECT|INSERT|UPDATE|DELETE) (\S+)\Z")
_CODE = re.compile(r"[A-Za-z_]\w*\.[A-Za-z_]\w*\Z")


def inferred(operation: str, kind: SpanKind, status: StatusCode) -> dict[str, AttrValue]:
    """Attributes the operation name and kind imply (see the module docstring); {} when it says nothing."""
    error = status == StatusCode.ERROR
    m = _RPC.match(operation)
    if m:
        return {"rpc.system": "grpc", "rpc.service": m.group(1), "rpc.method": m.group(2),
                "rpc.grpc.status_code": 2 if error else 0}  # fmt: skip
    http: dict[str, AttrValue] = {}
    m = _HTTP.match(operation)
    if m:
        http["http.request.method"] = m.group(1)
        path = m.group(2)
    else:
        path = operation if operation.startswith("/") else None
    if path:
        http["url.path" if kind == SpanKind.CLIENT else "http.route"] = path
    if http:
        if kind in (SpanKind.SERVER, SpanKind.CLIENT):
            http["http.response.status_code"] = 500 if error else 200
        return http
    m = _DB.match(operation)
    if m:
        return {"db.operation.name": m.group(1), "db.collection.name": m.group(2), "db.query.summary": operation}
    if _CODE.match(operation):
        return {"code.function.name": operation}
    return {}


def attributes_for(operation: str, kind: SpanKind, status: StatusCode,
                   learned: dict[str, AttrValue] | None = None) -> dict[str, AttrValue]:
    """What a generated span carries: the attributes learned for its operation, else the inferred ones."""
    if learned:
        return dict(learned)
    return inferred(operation, kind, status)
