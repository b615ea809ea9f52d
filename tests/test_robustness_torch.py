"""Robustness of the torch frontend (issue 9): in-place ops, fixed batches, control flow, shape constraints,
threads and float16 models, checked against the user's own module."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import lowbit
from conftest import run_onnx


def _lower_quietly(model, example):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = lowbit.lower(model, example)
    return graph, [str(w.message) for w in caught if "no exact ONNX equivalent" in str(w.message)]


def _opaque(graph):
    return sorted(n.qualified_op for n in graph if n.domain)


# -- in-place ops ---------------------------------------------------------------------


class InplaceNet(nn.Module):
    """Every in-place op of the vocabulary that torch.export leaves in the graph."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.acts = nn.Sequential(nn.ReLU(inplace=True), nn.Hardtanh(-2.0, 2.0, inplace=True),
                                  nn.ReLU6(inplace=True), nn.Hardswish(inplace=True), nn.SiLU(inplace=True),
                                  nn.Hardsigmoid(inplace=True))

    def forward(self, x):
        y = self.conv(x)
        z = y.clone()
        y += 1.0
        y.mul_(2.0)
        y.sub_(z)
        y.div_(3.0)
        y = self.acts(y)
        y.sigmoid_()
        y.clamp_(0.1, 0.9)
        y.tanh_()
        return y + z


class ViewMutation(nn.Module):
    """In-place ops through views that are read again: functional lowering would be wrong here."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        y[:, :2].mul_(2.0)
        flat = y.view(y.shape[0], -1)
        y.add_(1.0)
        return y, flat


def test_inplace_ops_lower_to_functional_ops_and_round_trip_exactly():
    model, x = InplaceNet().eval(), torch.randn(2, 3, 8, 8)
    graph, opaque_warnings = _lower_quietly(model, (x,))
    assert _opaque(graph) == [] and opaque_warnings == []
    ops = [n.op_type for n in graph]
    assert {"Add", "Mul", "Sub", "Div", "Relu", "Clip", "HardSwish", "Swish", "HardSigmoid", "Sigmoid",
            "Tanh"} <= set(ops)
    expected = model(x.clone())
    assert torch.equal(lowbit.codegen(graph, "torch")(x.clone()), expected)
    got = run_onnx(lowbit.codegen(graph, "onnx"), {graph.inputs[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, expected.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_inplace_ops_through_read_views_stay_in_place_and_exact():
    model, x = ViewMutation().eval(), torch.randn(2, 3, 8, 8)
    graph, _ = _lower_quietly(model, (x,))
    assert _opaque(graph) == ["torch::aten::add_.Tensor", "torch::aten::mul_.Tensor"]
    for got, want in zip(lowbit.codegen(graph, "torch")(x.clone()), model(x.clone())):
        assert torch.equal(got, want)


def test_transformers_resnet_has_no_opaque_inplace_add():
    pytest.importorskip("transformers")
    from zoo_models import build

    model, make_input, _ = build("resnet", "small")
    x = make_input(2)
    graph, _ = _lower_quietly(model, (x,))
    assert _opaque(graph) == []
    expected = model(x).detach().numpy()
    got = run_onnx(lowbit.codegen(graph, "onnx"), {graph.inputs[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
