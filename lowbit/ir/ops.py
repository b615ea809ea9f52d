"""The op vocabulary of the IR and the facts lowbit knows about each op.

The vocabulary is ONNX's: op names and attribute conventions are those of the
ONNX operator set (version `IR_OPSET`), so `onnx.reference` gives every op an
executable meaning. Two ops newer than opset 21 are used by name with their
ONNX (opset 23/24) semantics because torch has them as single kernels:
`Swish` (x * sigmoid(alpha * x)) and `Attention` (scaled dot-product
attention); the ONNX writer expands them into opset-21 ops.

Quantization is one op, `FakeQuantize` with OpenVINO's semantics (inputs x,
input_low, input_high, output_low, output_high; attribute levels), in the
domain `org.openvinotoolkit`; each writer materializes it (QDQ for ONNX, the
native op for OpenVINO, a trainable module for torch).

An op outside the vocabulary lives in its own domain (`torch` for an aten op
lowbit does not map) and is emitted back only to that framework.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The default-domain opset of graphs lowered from torch. 20, not 21: ONNX Runtime (1.32) cannot load an
# opset-21 model in which an int8 activation QuantizeLinear -> DequantizeLinear feeds a Transpose, Reshape,
# MaxPool, ... (its QDQ propagation writes a QuantizeLinear whose output_dtype says int8 beside the uint8 zero
# point it converted to); at opset 20 it runs them. Nothing lowbit writes needs 21.
IR_OPSET = 20
TORCH_DOMAIN = "torch"
# FakeQuantize (OpenVINO semantics) lives in OpenVINO's ONNX extension domain, which its ONNX reader takes.
QUANT_DOMAIN = "org.openvinotoolkit"


@dataclass(frozen=True)
class OpInfo:
    """What passes need to know about an op type."""

    name: str
    weight_inputs: tuple[int, ...] = ()  # inputs that hold weights when constant
    channel_axis: int | None = None  # output-channel axis of the weight input (per-channel quantization)
    traits: frozenset[str] = field(default_factory=frozenset)


def _ops(*infos: OpInfo) -> dict[str, OpInfo]:
    return {i.name: i for i in infos}


def _t(*names: str) -> frozenset[str]:
    return frozenset(names)


ELEMENTWISE_BINARY = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Equal", "Less", "Greater", "Where",
                      "GreaterOrEqual", "LessOrEqual", "And", "Or")
ACTIVATIONS = ("Relu", "Clip", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Gelu", "Swish", "LeakyRelu",
               "Elu", "Selu", "Softplus", "Mish", "Erf", "Exp", "Log", "Sqrt", "Reciprocal", "Neg", "Abs")
SHAPE_OPS = ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Gather", "GatherElements",
             "GatherND", "Split",
             "Concat", "Expand", "Tile", "Identity", "Shape", "Cast", "Pad", "DepthToSpace", "SpaceToDepth")

# Shape ops a quantizer does not move up through: Shape and Cast change the dtype, Concat joins several grids
# (the config's `propagate` decides), and Slice, Gather and Split keep a part of their input, whose range is
# narrower: moved above them a quantizer would take the whole tensor's range (a ViT's value quantizer took the
# fused query/key/value tensor's) and run on all of it.
NOT_AGNOSTIC_SHAPE_OPS = ("Shape", "Cast", "Concat", "Slice", "Gather", "GatherElements", "GatherND", "Split")

VOCABULARY: dict[str, OpInfo] = _ops(
    OpInfo("Conv", weight_inputs=(1,), channel_axis=0, traits=_t("weighted")),
    OpInfo("ConvTranspose", weight_inputs=(1,), channel_axis=1, traits=_t("weighted")),
    OpInfo("Gemm", weight_inputs=(1,), channel_axis=0, traits=_t("weighted")),
    OpInfo("MatMul", weight_inputs=(1,), channel_axis=-1, traits=_t("weighted")),
    OpInfo("BatchNormalization"),
    OpInfo("LayerNormalization"),
    OpInfo("InstanceNormalization"),
    OpInfo("GroupNormalization"),
    OpInfo("Softmax"),
    OpInfo("LogSoftmax"),
    OpInfo("MaxPool", traits=_t("agnostic")),
    OpInfo("AveragePool"),
    OpInfo("GlobalAveragePool"),
    OpInfo("GlobalMaxPool", traits=_t("agnostic")),
    OpInfo("ReduceMean"),
    OpInfo("ReduceSum"),
    OpInfo("ReduceMax"),
    OpInfo("Attention"),
    OpInfo("Dropout", traits=_t("agnostic")),
    OpInfo("Constant"),
    OpInfo("Resize", traits=_t("agnostic")),
    OpInfo("Range"),
    OpInfo("ConstantOfShape"),
    OpInfo("TopK"),
    OpInfo("ArgMax"),
    OpInfo("CumSum"),
    OpInfo("Not"),
    *(OpInfo(n, traits=_t("elementwise", *(("commutative",) if n in ("Add", "Mul", "Max", "Min", "Equal") else ())))
      for n in ELEMENTWISE_BINARY),
    *(OpInfo(n, traits=_t("elementwise", "activation")) for n in ACTIVATIONS),
    *(OpInfo(n, traits=_t("shape", *(("agnostic",) if n not in NOT_AGNOSTIC_SHAPE_OPS else ())))
      for n in SHAPE_OPS),
)


def op_info(op_type: str, domain: str = "") -> OpInfo | None:
    """The facts about an op, or None for an op outside the vocabulary."""
    return VOCABULARY.get(op_type) if domain in ("", "ai.onnx") else None


def is_fake_quantize(node) -> bool:
    return node.op_type == "FakeQuantize" and node.domain == QUANT_DOMAIN


# Standard ONNX ops that only a quantized model holds: its quantizers and its integer kernels.
QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
                           "QLinearMatMul", "ConvInteger", "MatMulInteger"})


def is_quantizer(node) -> bool:
    """True for a node that makes a graph already quantized: FakeQuantize, QDQ, an integer kernel, or
    torch's own fake-quantize and quantize ops (kept opaque)."""
    if node.domain == TORCH_DOMAIN:
        return "fake_quantize" in node.op_type or "quantize_per" in node.op_type
    return is_fake_quantize(node) or (node.op_type in QUANTIZED_OPS and node.domain in ("", "ai.onnx"))


def is_opaque(domain: str) -> bool:
    """True for nodes that only their origin framework can run."""
    return domain == TORCH_DOMAIN
