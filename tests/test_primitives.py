"""bench.primitives counts the primitive nodes of a lazy graph, by name."""

import collections

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


def test_a_fast_op_counts_as_one_kernel_and_views_as_none():
    from bench.primitives import fast_ops_counted_once, kernels

    x, w = mx.ones((2, 8)), mx.ones((8,))
    mx.eval(x, w)
    with fast_ops_counted_once() as fallback:
        y = mx.fast.rms_norm(x, w, 1e-6).reshape(16) * 2
    nodes = primitives(y)
    assert kernels(nodes, fallback) == {"rms_norm": 1, "Multiply": 1}
    assert mx.array_equal(y, (x * mx.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6) * w).reshape(16) * 2)


def test_swiglu_and_the_routers_elementwise_steps_are_fused():
    """mx.compile turns SwiGLU into one kernel and the router's score / weight arithmetic into fused
    ones: what a decode step launches per MoE layer (bench.primitives) depends on it."""
    from bench.primitives import kernels
    from mlx_deepseek.models.moe import route, swiglu

    g, u = mx.ones((1, 8)), mx.ones((1, 8))
    mx.eval(g, u)
    for limit in (0.0, 7.0):
        fused = kernels(primitives(swiglu(g, u, limit)), collections.Counter())
        assert sum(fused.values()) == 1 and next(iter(fused)).startswith("Compiled")
    x, weight, bias = mx.ones((1, 1, 8)), mx.random.normal((16, 8)), mx.zeros((16,))
    mx.eval(x, weight, bias)
    indices, weights = route(x, weight, bias, 4, "noaux_tc", "sigmoid", 4, 2, True, 2.5)
    ops = kernels(primitives([indices, weights]), collections.Counter())
    assert "Divide" not in ops and "Add" not in ops  # bias add, normalization, scaling: fused
    assert sum(v for k, v in ops.items() if k.startswith("Compiled")) == 2
