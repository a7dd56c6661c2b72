"""bench.primitives counts the primitive nodes of a lazy graph, by name."""

import mlx.core as mx

from bench.primitives import primitives


def test_counts_the_primitives_of_a_small_graph():
    a = mx.ones((3,))
    counts = primitives(((a * 2 + 1) * a).sum())
    assert counts["Multiply"] == 2 and counts["Add"] == 1 and counts["Sum"] == 1
    assert "Exp" not in counts


def test_an_evaluated_array_has_no_graph():
    a = mx.exp(mx.ones((3,)))
    mx.eval(a)
    counts = primitives(a + 1)
    assert counts["Add"] == 1 and counts["Exp"] == 0
