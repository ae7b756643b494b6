"""The canonical Trace: built from unordered spans, it answers roots, layers, depth and graph questions."""

import random

from otel_tracegen.trace import Resource, Span, Trace, group_traces, hex_id


def sp(sid, parent, start, end=None, trace="t"):
    return Span(trace, sid, parent, "svc", sid, start, end if end is not None else start + 10)


SPANS = [sp("r", None, 0, 100), sp("a", "r", 20), sp("b", "r", 10), sp("c", "a", 25), sp("d", "a", 21), sp("e", "d", 22)]


def test_structure_does_not_depend_on_span_order():
    for seed in range(5):
        spans = SPANS[:]
        random.Random(seed).shuffle(spans)
        t = Trace(spans)
        assert [s.span_id for s in t.roots] == ["r"]
        assert [c.span_id for c in t.children("r")] == ["b", "a"]  # a layer is in start order
        assert [(p.span_id, [c.span_id for c in kids]) for p, kids in t.layers()] == [
            ("r", ["b", "a"]),
            ("a", ["d", "c"]),
            ("d", ["e"]),
        ]
        assert [(s.span_id, d) for s, d in t.walk()] == [("r", 1), ("b", 2), ("a", 2), ("d", 3), ("e", 4), ("c", 3)]
        assert t.depth == 4


def test_graph_is_a_networkx_tree_over_span_ids():
    import networkx as nx

    g = Trace(SPANS).graph()
    assert nx.is_arborescence(g)
    assert set(g.successors("a")) == {"c", "d"} and g.nodes["e"]["span"].parent_id == "d"
    assert nx.dag_longest_path_length(g) + 1 == Trace(SPANS).depth


def test_broken_traces_are_representable():
    t = Trace([sp("a", "b", 0), sp("b", "a", 0), sp("x", "missing", 0)])
    assert t.roots == [] and t.root is None and t.depth == 0
    assert [s.span_id for s in t.orphans()] == ["x"]
    loop = Trace([sp("r", None, 0), sp("a", "r", 1), sp("a", "a", 2)])  # a duplicate id that is its own parent
    assert sum(1 for _ in loop.walk()) == 3  # every span object visited once, no endless loop


def test_group_traces_keeps_first_seen_order():
    spans = [sp("1", None, 0, trace="y"), sp("2", None, 0, trace="x"), sp("3", "1", 1, trace="y")]
    assert [(t.trace_id, len(t)) for t in group_traces(spans)] == [("y", 2), ("x", 1)]


def test_resource_or_default_always_names_the_span_service():
    s = Span("t", "1", None, "cart", "op", 0, 1)
    assert s.resource_or_default() == Resource({"service.name": "cart"})
    s.resource = Resource({"service.name": "other", "k8s.pod.name": "p"})
    assert s.resource_or_default().attributes == {"service.name": "cart", "k8s.pod.name": "p"}


def test_hex_id_pads_short_hex_and_hashes_anything_else():
    assert hex_id("ABCDEF0123456789", 16) == "0000000000000000abcdef0123456789"
    assert hex_id("0.1.3", 8) == hex_id("0.1.3", 8) != hex_id("0.1.4", 8)
    assert len(hex_id("T_10000326734", 16)) == 32


def test_hex_id_does_not_pad_a_short_id_into_the_invalid_all_zero_id():
    assert hex_id("0", 8) != "0" * 16 and hex_id("000", 16) != "0" * 32
    assert hex_id("0", 8) == hex_id("0", 8)
    assert hex_id("0" * 16, 8) == "0" * 16  # a full-length id is the format's own: kept, and judged by readers
