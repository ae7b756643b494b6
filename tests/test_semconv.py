"""Protocol attributes of generated spans: learned from data that has them, else inferred from names."""

from __future__ import annotations

import pytest

from otel_tracegen.emit.generate import Assembler
from otel_tracegen.encoding import encode_trace
from otel_tracegen.sampling import Catalog
from otel_tracegen.semconv import attributes_for, inferred
from otel_tracegen.trace import Span, SpanKind, Status, StatusCode, Trace


@pytest.mark.parametrize("op, kind, status, want", [
    ("hipstershop.CartService/GetCart", SpanKind.CLIENT, StatusCode.UNSET,
     {"rpc.system": "grpc", "rpc.service": "hipstershop.CartService", "rpc.method": "GetCart", "rpc.grpc.status_code": 0}),
    ("grpc.hipstershop.CurrencyService/Convert", SpanKind.SERVER, StatusCode.ERROR,
     {"rpc.system": "grpc", "rpc.service": "hipstershop.CurrencyService", "rpc.method": "Convert", "rpc.grpc.status_code": 2}),
    ("HTTP POST", SpanKind.CLIENT, StatusCode.ERROR, {"http.request.method": "POST", "http.response.status_code": 500}),
    ("GET /api/v1/x", SpanKind.CLIENT, StatusCode.UNSET,
     {"http.request.method": "GET", "url.path": "/api/v1/x", "http.response.status_code": 200}),
    ("/api/v1/seats/{id}", SpanKind.SERVER, StatusCode.OK, {"http.route": "/api/v1/seats/{id}", "http.response.status_code": 200}),
    ("/*", SpanKind.INTERNAL, StatusCode.UNSET, {"http.route": "/*"}),
    ("SELECT ts.orders", SpanKind.CLIENT, StatusCode.UNSET,
     {"db.operation.name": "SELECT", "db.collection.name": "ts.orders", "db.query.summary": "SELECT ts.orders"}),
    ("TripRepository.findAll", SpanKind.INTERNAL, StatusCode.UNSET, {"code.function.name": "TripRepository.findAll"}),
    ("Session.find contacts.entity.Contacts", SpanKind.INTERNAL, StatusCode.UNSET, {}),
])  # fmt: skip
def test_inferred_attributes_follow_the_conventions(op, kind, status, want):
    assert inferred(op, kind, status) == want


def _trace(attrs_root, attrs_child, n):
    spans = []
    for i in range(n):
        tid = f"{i + 1:032x}"
        spans.append(Span(tid, f"{2 * i + 1:016x}", None, "front", "GET /", 0, 100, SpanKind.SERVER, Status(),
                          dict(attrs_root)))
        spans.append(Span(tid, f"{2 * i + 2:016x}", f"{2 * i + 1:016x}", "db", "query", 10, 20, SpanKind.CLIENT,
                          Status(), dict(attrs_child if i else {})))
    return [Trace([s for s in spans if s.trace_id == f"{i + 1:032x}"]) for i in range(n)]


def test_catalog_learns_constant_attributes_and_generation_copies_them():
    traces = _trace({"http.request.method": "GET", "http.target": "/"}, {"db.system": "mysql"}, 10)
    cat = Catalog.from_traces(traces)
    assert cat.learned_attributes("front", "GET /") == {"http.request.method": "GET", "http.target": "/"}
    assert cat.learned_attributes("db", "query") == {"db.system": "mysql"}  # 9 of 10 spans: >= 90 %
    assert Catalog.from_dict(cat.to_dict()).learned_attributes("db", "query") == {"db.system": "mysql"}
    few = Catalog.from_traces(_trace({}, {"db.system": "mysql"}, 5))  # 4 of 5: not constant enough
    assert few.learned_attributes("db", "query") == {}
    assert attributes_for("query", SpanKind.CLIENT, StatusCode.UNSET, cat.learned_attributes("db", "query")) == {
        "db.system": "mysql"}
    steps = encode_trace(traces[0])
    [made] = Assembler(anchor_ns=0, seed=0, catalog=cat)([steps])
    by_service = {s.service: s.attributes for s in made}
    assert by_service == {"front": {"http.request.method": "GET", "http.target": "/"}, "db": {"db.system": "mysql"}}
    [bare] = Assembler(anchor_ns=0, seed=0, catalog=cat, attributes=False)([steps])
    assert all(not s.attributes for s in bare)
