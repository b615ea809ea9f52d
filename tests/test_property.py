"""Random DAGs of vocabulary ops survive every round trip (a hypothesis property test).

Hypothesis draws a recipe: an input of shape ("batch", C, H, W) with small
C/H/W, then 6-20 nodes, each a shape-preserving vocabulary op (activations,
Clip, binary ops of two earlier values or with a 0-d constant, Conv,
BatchNormalization, pools, Softmax, Concat followed by Split) whose inputs are
drawn from the values made so far. The graph is built with the IR API only
(`Graph.make_node`, `add_constant`), and for each one we check:

a. `verify()` passes, and print -> parse -> print gives the same text;
b. ONNX Runtime on the ONNX writer's model agrees with the torch writer's
   module (different kernels, so within 1e-4);
c. ONNX -> IR -> ONNX gives bit-identical ONNX Runtime outputs;
d. torch -> IR -> torch (the generated module lowered again) gives
   bit-identical torch outputs.
"""

import math

import numpy as np
import torch
from conftest import run_onnx
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import lowbit
from lowbit.ir import Graph, parse_graph, print_graph

UNARY = ["Relu", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "Swish", "Gelu"]
OPS = [*UNARY, "Clip", "Add", "Mul", "Sub", "AddConst", "MulConst", "Conv", "BatchNormalization", "MaxPool",
       "AveragePool", "Softmax", "ConcatSplit"]
MAX_POOL_VALUE = 10 ** 6  # pool indices are drawn in [0, this) and reduced modulo the pool size


@st.composite
def recipes(draw):
    """The plan of one random graph; `build` turns it into a Graph deterministically."""
    dims = (draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    n_nodes = draw(st.integers(6, 20))
    steps = []
    count = 0
    while count < n_nodes:
        op = draw(st.sampled_from(OPS))
        if op == "ConcatSplit" and count + 2 > n_nodes:
            op = "Relu"
        picks = (draw(st.integers(0, MAX_POOL_VALUE - 1)), draw(st.integers(0, MAX_POOL_VALUE - 1)))
        variant = draw(st.integers(0, 3))  # per-op choices: bias or not, depthwise, operand order, epsilon
        steps.append((op, picks, variant))
        count += 2 if op == "ConcatSplit" else 1
    extra_output = draw(st.none() | st.integers(0, MAX_POOL_VALUE - 1))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    return dims, steps, extra_output, seed


def build(recipe):
    """A Graph from a recipe, plus its random input (batch 2)."""
    (c, h, w), steps, extra_output, seed = recipe
    rng = np.random.default_rng(seed)
    shape = ("batch", c, h, w)
    g = Graph("random_dag")
    x = g.add_input("x", "float32", shape)
    pool = [x]

    def f32(a):
        return np.asarray(a, dtype=np.float32)

    def add(op, inputs, attrs=None, **kwargs):
        node = g.make_node(op, inputs, attrs or {}, **kwargs)
        for v in node.outputs:
            v.dtype, v.shape = "float32", shape
        pool.extend(node.outputs)
        return node

    for op, (i, j), variant in steps:
        a, b = pool[i % len(pool)], pool[j % len(pool)]
        if op in UNARY:
            attrs = {"alpha": 1.0 / 6.0, "beta": 0.5} if op == "HardSigmoid" else {}
            add(op, [a], attrs)
        elif op == "Clip":
            lo = g.add_constant("clip_min", f32(rng.uniform(-1.0, 0.0)))
            hi = g.add_constant("clip_max", f32(rng.uniform(0.1, 1.5)))
            add("Clip", [a, lo, hi])
        elif op in ("Add", "Mul", "Sub"):
            add(op, [a, b])
        elif op in ("AddConst", "MulConst"):
            k = g.add_constant("k", f32(rng.uniform(-1.5, 1.5)))
            add(op[:3], [a, k] if variant % 2 == 0 else [k, a])
        elif op == "Conv":
            group = c if variant >= 2 else 1  # depthwise or dense, always C -> C
            weight = rng.standard_normal((c, c // group, 3, 3)) / math.sqrt(9 * c // group)
            inputs = [a, g.add_constant("conv_w", f32(weight))]
            inputs.append(g.add_constant("conv_b", f32(0.1 * rng.standard_normal(c))) if variant % 2 else None)
            add("Conv", inputs, {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1],
                                 "dilations": [1, 1], "group": group})
        elif op == "BatchNormalization":
            params = [f32(rng.uniform(0.5, 1.5, c)), f32(0.1 * rng.standard_normal(c)),
                      f32(0.1 * rng.standard_normal(c)), f32(rng.uniform(0.5, 1.5, c))]
            names = ["bn_scale", "bn_bias", "bn_mean", "bn_var"]
            add(op, [a, *(g.add_constant(n, p) for n, p in zip(names, params))],
                {"epsilon": [1e-5, 1e-3, 1e-5, 1e-4][variant]})
        elif op == "MaxPool":
            add(op, [a], {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]})
        elif op == "AveragePool":
            add(op, [a], {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1], "count_include_pad": 1})
        elif op == "Softmax":
            add(op, [a], {"axis": 1})
        elif op == "ConcatSplit":
            cat = g.make_node("Concat", [a, b], {"axis": 1})
            cat.output.dtype, cat.output.shape = "float32", ("batch", 2 * c, h, w)
            sizes = g.add_constant("split_sizes", np.array([c, c], np.int64))
            add("Split", [cat.output, sizes], {"axis": 1}, num_outputs=2)
        else:
            raise AssertionError(op)

    outputs = [pool[-1]]
    earlier = pool[1:-1]
    if extra_output is not None and earlier:
        outputs.insert(0, earlier[extra_output % len(earlier)])
    g.outputs = outputs
    x_in = rng.standard_normal((2, c, h, w)).astype(np.float32)
    return g, x_in


def _torch_outputs(module, x):
    with torch.no_grad():
        out = module(torch.from_numpy(x))
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recipes())
def test_random_dags_round_trip(recipe):
    graph, x = build(recipe)
    text = print_graph(graph)
    note(text)
    assert 6 <= len(graph) <= 20

    # a. well formed, and the text form parses back to the same text
    graph.verify()
    parsed = parse_graph(text, constants={name: v.const for name, v in graph.constants.items()})
    parsed.verify()
    assert print_graph(parsed) == text

    # b. the ONNX and torch writers compute the same function
    onnx_model = lowbit.codegen(graph, "onnx")
    ort_out = run_onnx(onnx_model, {"x": x})
    module = lowbit.codegen(graph, "torch")
    torch_out = _torch_outputs(module, x)
    assert len(ort_out) == len(torch_out) == len(graph.outputs)
    for o, t in zip(ort_out, torch_out):
        assert o.shape == tuple(t.shape) == (2, *graph.inputs[0].shape[1:])
        np.testing.assert_allclose(o, t.numpy(), rtol=1e-4, atol=1e-4)

    # c. ONNX -> IR -> ONNX is exact
    again = lowbit.lower(onnx_model)
    again.verify()
    for want, got in zip(ort_out, run_onnx(lowbit.codegen(again, "onnx"), {"x": x})):
        assert _same_bits(want, got), f"ONNX round trip: max diff {np.abs(want - got).max()}"

    # d. torch -> IR -> torch is exact
    relowered = lowbit.lower(module, (torch.from_numpy(x),))
    relowered.verify()
    for want, got in zip(torch_out, _torch_outputs(lowbit.codegen(relowered, "torch"), x)):
        assert torch.equal(want, got), f"torch round trip: max diff {(want - got).abs().max()}"
