"""Which aten overload computes each vocabulary op: the one table the torch frontend (torch_fx,
torch_indexing: aten -> op) and the torch backend (backends/torch_emit, backends/torch_indexing: op -> aten)
both read."""

from __future__ import annotations

import torch

aten = torch.ops.aten

UNARY = {"Relu": aten.relu.default, "Sigmoid": aten.sigmoid.default, "Tanh": aten.tanh.default,
         "HardSwish": aten.hardswish.default, "Exp": aten.exp.default, "Log": aten.log.default,
         "Sqrt": aten.sqrt.default, "Erf": aten.erf.default, "Neg": aten.neg.default, "Abs": aten.abs.default,
         "Reciprocal": aten.reciprocal.default, "Sin": aten.sin.default, "Cos": aten.cos.default}
BINARY = {"Add": aten.add.Tensor, "Sub": aten.sub.Tensor, "Mul": aten.mul.Tensor, "Div": aten.div.Tensor,
          "Pow": aten.pow.Tensor_Tensor, "Max": aten.maximum.default, "Min": aten.minimum.default,
          "Equal": aten.eq.Tensor, "Less": aten.lt.Tensor, "Greater": aten.gt.Tensor}
# the overload a binary op takes when its right-hand side is a Python scalar
SCALAR_RHS = {"Add": aten.add.Tensor, "Sub": aten.sub.Tensor, "Mul": aten.mul.Tensor, "Div": aten.div.Tensor,
              "Pow": aten.pow.Tensor_Scalar, "Equal": aten.eq.Scalar, "Less": aten.lt.Scalar,
              "Greater": aten.gt.Scalar}
# (tensor overload, scalar overload) of the comparisons torch_indexing writes
COMPARE = {"GreaterOrEqual": (aten.ge.Tensor, aten.ge.Scalar), "LessOrEqual": (aten.le.Tensor, aten.le.Scalar)}
LOGICAL = {"And": aten.logical_and.default, "Or": aten.logical_or.default}
# torch.nn.functional.pad mode -> ONNX Pad mode
PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}
