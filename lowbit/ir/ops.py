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

import numpy as np

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
    """What passes need to know about an op type. This table is the only place such facts are written:
    every module reads them from here (tests/test_layout.py fails on an op set defined elsewhere)."""

    name: str
    weight_inputs: tuple[int, ...] = ()  # inputs that hold weights when constant
    traits: frozenset[str] = field(default_factory=frozenset)
    flow: str = "opaque"  # how channels flow through the op: one of FLOWS (see channel_flow for attributes)
    shape_rule: str | None = None  # how infer.py derives the output: "same", "broadcast", "compare" or None
    defaults: tuple[tuple[str, object], ...] = ()  # ONNX attribute defaults that passes read
    since_opset: int | None = None  # the ONNX opset that introduced the op, where newer than IR_OPSET
    bias_input: int | None = None  # the input that holds a bias added to the output channels


# How channels flow through an op, for passes that follow channels (per-channel statistics, pruning):
# "layer" consumes its input channels and makes new output channels (a weighted op); "grouped" is a layer whose
# groups tie input to output channels (a depthwise Conv); "elementwise" keeps channels, tying those of all its
# inputs (broadcast); "normalize" keeps them, with per-channel parameters (BatchNormalization) or over an axis;
# "pool" keeps them and changes the spatial size; "reduce" may remove the axis it reduces; "concat" and
# "split" join and cut along an axis (attribute `axis`); "reshape" moves them (Reshape, Flatten, Transpose, ...);
# "index" picks some (Gather); "size" reads the sizes of its input, not its values (Shape); "opaque" is anything
# a pass cannot follow.
FLOWS = ("layer", "grouped", "elementwise", "normalize", "pool", "reduce", "concat", "split", "reshape", "index",
         "size", "opaque")


def _ops(*infos: OpInfo) -> dict[str, OpInfo]:
    return {i.name: i for i in infos}


def _t(*names: str) -> frozenset[str]:
    return frozenset(names)


ELEMENTWISE_BINARY = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Equal", "Less", "Greater", "Where",
                      "GreaterOrEqual", "LessOrEqual", "And", "Or")
ARITHMETIC = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min")  # broadcast, output of the inputs' type
COMPARISONS = ("Equal", "Less", "Greater", "GreaterOrEqual", "LessOrEqual")  # broadcast, bool output
ACTIVATIONS = ("Relu", "Clip", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Gelu", "Swish", "LeakyRelu",
               "Elu", "Selu", "Softplus", "Mish", "Erf", "Exp", "Log", "Sqrt", "Reciprocal", "Neg", "Abs", "Sin",
               "Cos")
# Activations that a hardware config fuses into the layer before them (fuse.py's patterns)
FUSABLE_ACTIVATIONS = frozenset({"Relu", "Clip", "Sigmoid", "Tanh", "Swish", "HardSwish", "HardSigmoid", "Gelu",
                                 "LeakyRelu", "Elu"})
SHAPE_OPS = ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Gather", "GatherElements",
             "GatherND", "Split",
             "Concat", "Expand", "Tile", "Identity", "Shape", "Cast", "Pad", "DepthToSpace", "SpaceToDepth")
SHAPE_FLOW = {"Slice": "split", "Split": "split", "Concat": "concat", "Gather": "index", "GatherElements": "index",
              "GatherND": "index", "Identity": "elementwise", "Cast": "elementwise", "Shape": "size",
              "Pad": "pool"}

# Shape ops a quantizer does not move up through: Shape and Cast change the dtype, Concat joins several grids
# (the config's `propagate` decides), and Slice, Gather and Split keep a part of their input, whose range is
# narrower: moved above them a quantizer would take the whole tensor's range (a ViT's value quantizer took the
# fused query/key/value tensor's) and run on all of it.
NOT_AGNOSTIC_SHAPE_OPS = ("Shape", "Cast", "Concat", "Slice", "Gather", "GatherElements", "GatherND", "Split")
# Ops whose outputs are some of their first input's values, rearranged: what is on a quantizer's grid stays on
# it (the QDQ writer requantizes after them; see qdq.py)
KEEPS_VALUES = ("Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "MaxPool", "GlobalMaxPool", "Identity",
                "Slice", "Gather", "Expand", "Tile", "DepthToSpace", "SpaceToDepth")
# Ops cleanup never constant-folds: random ones, Dropout (kept for training) and DequantizeLinear (what keeps a
# quantized model's integer weights)
RANDOM = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli")
# The most elements a constant lowbit computes once may have (cleanup's folding, the torch lowerer's opaque
# constant regions): a larger one stays computed, as the model computed it
MAX_FOLDED_ELEMENTS = 1 << 22
# Words in the name of an opaque torch op (aten::randn.default, aten::empty_like.default) whose result differs
# from run to run: drawn at random, or uninitialized memory; never computed once at lowering
UNREPEATABLE_TORCH_OPS = ("rand", "normal", "uniform", "bernoulli", "multinomial", "dropout", "empty")
COMMUTATIVE_OPS = ("Add", "Mul", "Max", "Min", "Equal")
NORMALIZE_SAME = ("BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization",
                  "Softmax", "LogSoftmax")
# The inputs of a normalization that hold one parameter per channel of axis 1 (BatchNormalization,
# InstanceNormalization) or of the normalized last axis (LayerNormalization)
CHANNEL_PARAMS = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2), "LayerNormalization": (1, 2)}
# Ops that regroup their input's dims into the output's (pruning follows channels through a flatten)
REGROUPING = frozenset({"Flatten", "Reshape"})
# Ops that only move or pick dims (pruning follows attention heads from a projection's Reshape through them)
DIM_MOVERS = frozenset({"Transpose", "Gather"})
# Ops that can leave a dim as it is, element by element, cutting and joining or reducing other dims (a rotary
# embedding on a query's or key's head_dim: q * cos + cat(-q2, q1) * sin; Qwen3's RMSNorm of each head; GPT-NeoX's
# split of each head into q, k and v; pruning checks the heads dim is untouched)
DIM_KEEPERS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Neg", "Sqrt", "Reciprocal", "Cast", "Identity", "Slice",
                         "Split", "Concat", "ReduceMean", "ReduceSum"})
# What an attention written out in ops applies to q @ kT before its Softmax: a scale, a mask, a soft cap
# (Gemma-2: tanh(scores / cap) * cap)
SCALES = frozenset({"Mul", "Div"})
SCORE_STEPS = SCALES | {"Add", "Where", "Tanh"}
# What joins a per-head term on an attention's scores to one the same for every head (Swin's window mask is
# added, T5's padding mask selects with Where)
HEAD_TERM_JOINS = frozenset({"Add", "Where"})
# What may stand between an attention's Softmax and its MatMul by the values, entry by entry (eager attention
# lowered without cleanup: `.to(dtype)`, dropout on the probabilities)
PROBABILITY_STEPS = frozenset({"Identity", "Cast", "Dropout"})

VOCABULARY: dict[str, OpInfo] = _ops(
    OpInfo("Conv", weight_inputs=(1,), traits=_t("weighted", "convolution"), flow="layer",
           defaults=(("group", 1),), bias_input=2),
    OpInfo("ConvTranspose", weight_inputs=(1,), traits=_t("weighted", "convolution"), flow="layer",
           defaults=(("group", 1),), bias_input=2),
    OpInfo("Gemm", weight_inputs=(1,), traits=_t("weighted"), flow="layer",
           defaults=(("transA", 0), ("transB", 0), ("alpha", 1.0), ("beta", 1.0)), bias_input=2),
    OpInfo("MatMul", weight_inputs=(1,), traits=_t("weighted"), flow="layer"),
    *(OpInfo(n, flow="normalize", shape_rule="same",
             defaults=(("axis", -1),) if n in ("LayerNormalization", "Softmax", "LogSoftmax") else ())
      for n in NORMALIZE_SAME),
    OpInfo("MaxPool", traits=_t("agnostic", "keeps_values"), flow="pool"),
    OpInfo("AveragePool", flow="pool"),
    OpInfo("GlobalAveragePool", flow="pool"),
    OpInfo("GlobalMaxPool", traits=_t("agnostic", "keeps_values"), flow="pool"),
    OpInfo("ReduceMean", flow="reduce"),
    OpInfo("ReduceSum", flow="reduce"),
    OpInfo("ReduceMax", flow="reduce"),
    OpInfo("Attention", since_opset=23),
    OpInfo("Dropout", traits=_t("agnostic", "never_folded"), flow="elementwise", shape_rule="same"),
    OpInfo("Constant"),
    OpInfo("Resize", traits=_t("agnostic"), flow="pool"),
    OpInfo("Range"),
    OpInfo("ConstantOfShape"),
    OpInfo("TopK"),
    OpInfo("ArgMax", flow="reduce"),
    OpInfo("CumSum"),
    OpInfo("Not", flow="elementwise"),
    OpInfo("DequantizeLinear", traits=_t("never_folded")),
    *(OpInfo(n, traits=_t("never_folded")) for n in RANDOM),
    *(OpInfo(n, traits=_t("elementwise", *(("commutative",) if n in COMMUTATIVE_OPS else ())), flow="elementwise",
             shape_rule="broadcast" if n in ARITHMETIC else "compare" if n in COMPARISONS else None)
      for n in ELEMENTWISE_BINARY),
    *(OpInfo(n, traits=_t("elementwise", "activation"), flow="elementwise", shape_rule="same",
             since_opset=24 if n == "Swish" else None) for n in ACTIVATIONS),
    *(OpInfo(n, traits=_t("shape", *(("agnostic",) if n not in NOT_AGNOSTIC_SHAPE_OPS else ()),
                          *(("keeps_values",) if n in KEEPS_VALUES else ())),
             flow=SHAPE_FLOW.get(n, "reshape"), shape_rule="same" if n == "Identity" else None)
      for n in SHAPE_OPS),
)


def _with(trait: str) -> frozenset[str]:
    return frozenset(name for name, info in VOCABULARY.items() if trait in info.traits)


# Op groups, derived from the table
LAYERS = _with("weighted")  # Conv, ConvTranspose, Gemm, MatMul
CONVOLUTIONS = _with("convolution")
MATMULS = LAYERS - CONVOLUTIONS  # Gemm, MatMul: channels on the last axis
COMMUTATIVE = _with("commutative")
VALUE_PRESERVING = _with("keeps_values")
NEVER_FOLDED = _with("never_folded")
# Ops ONNX Runtime fuses with the DequantizeLinear nodes they read (QLinearConv, QLinearAdd, QLinearMul,
# QLinearAveragePool, ...): what the QDQ writer requantizes for after value-preserving ops
ORT_QDQ_READERS = LAYERS | {"Add", "Mul", "AveragePool", "GlobalAveragePool"}
# Activations ONNX Runtime folds into the QuantizeLinear after a layer where that grid starts at the zero point
ORT_FOLDED_ACTIVATIONS = frozenset({"Relu", "Clip"})
# Ops that pick dims out of a Shape's output (cleanup folds those that pick static dims)
SHAPE_PICKERS = frozenset({"Gather", "Slice"})
# Ops that lay a tensor's elements out in a new shape, in the same order: where the last dim keeps its size, every
# element keeps its index along it (GPT-2's Conv1D views [B, N, C] as [B * N, C])
VIEWS = frozenset({"Reshape", "Flatten"})
# Ops that carry dims read with Shape on, unchanged, to a Reshape's target (`x.view(x.size(0), -1, 16)`)
DIM_CARRIERS = frozenset({"Concat", "Unsqueeze", "Cast"})
# Ops NNCF's transformer model type leaves unquantized (their inputs get no quantizer): elementwise ops, and the
# mean of a decomposed LayerNorm or RMSNorm (a CNN's spatial mean, a global average pool, is quantized)
TRANSFORMER_FP32_OPS = frozenset({"Add", "Mul", "ReduceMean"})


def attribute(node, name: str):
    """`node`'s attribute `name`, or its ONNX default from the table (None where the table has none)."""
    info = op_info(node.op_type, node.domain)
    default = dict(info.defaults).get(name) if info is not None else None
    return node.attrs.get(name, default)


def weight_out_axis(node) -> int | None:
    """The axis of a layer's constant weight along which its output channels run (per-channel quantization,
    BatchNorm folding): Conv 0, ConvTranspose 1, Gemm 0 with transB else 1, MatMul the last; None otherwise."""
    if node.op_type == "Gemm":
        return 0 if attribute(node, "transB") else 1
    return {"Conv": 0, "ConvTranspose": 1, "MatMul": -1}.get(node.op_type) if not node.domain else None


def split_sizes(node, length) -> list[int] | None:
    """A Split's part sizes along its axis, `length` long: its constant `split` input (its `split` attribute before
    opset 13), or, without one (opset 18's `num_outputs`, or before it), equal parts, one per output, where
    `length` divides evenly. None otherwise."""
    if node.attrs.get("split") is not None:
        return [int(s) for s in node.attrs["split"]]
    sizes = node.inputs[1] if len(node.inputs) > 1 else None
    if sizes is not None:
        return [int(s) for s in np.asarray(sizes.const).reshape(-1)] if sizes.const is not None else None
    parts = len(node.outputs)
    if not isinstance(length, int) or length % parts:
        return None
    return [length // parts] * parts


def nan_guarded(node):
    """The value p where `node` is Where(IsNaN(p), c, p), c a constant (torch.onnx.export's default exporter writes
    it after an attention's Softmax): it only replaces NaNs, so it reads as p. None for any other node."""
    if node is None or node.op_type != "Where" or node.domain or len(node.inputs) != 3:
        return None
    condition, guarded = node.inputs[0].producer, node.inputs[2]
    if condition is None or condition.op_type != "IsNaN" or condition.domain or condition.inputs[0] is not guarded:
        return None
    return guarded if node.inputs[1].const is not None else None


def nan_guard(value):
    """The Where(IsNaN(value), c, value) that is all that reads `value` (with its IsNaN), or None."""
    readers = value.users
    guards = [u for u in readers if nan_guarded(u) is value]
    if len(guards) != 1 or len(readers) != 2:
        return None
    check = guards[0].inputs[0].producer
    return guards[0] if any(u is check for u in readers) and len(check.outputs[0].users) == 1 else None


def transpose_perm(node, rank: int) -> list[int]:
    """A Transpose's permutation: its `perm`, or the reversed axes of a rank-`rank` input, ONNX's default."""
    return list(node.attrs.get("perm") or reversed(range(rank)))


def const_axes(node, rank: int) -> list[int] | None:
    """The axes a Slice, Squeeze, Unsqueeze or Reduce* acts on, each in [0, rank): its `axes` attribute (older
    opsets) or its constant axes input (a Slice's input 3, the others' input 1); a Slice given neither slices
    the first len(starts) axes, ONNX's default; None where they are not known as constants (a Reduce without
    axes reduces every one)."""
    axes = node.attrs.get("axes")
    if axes is None:
        port = 3 if node.op_type == "Slice" else 1
        v = node.input(port) if len(node.inputs) > port else None
        axes = None if v is None else v.const
        if v is None and node.op_type == "Slice":
            starts = node.attrs.get("starts")
            count = len(starts) if starts is not None else _static_length(node.input(1))
            axes = None if count is None else list(range(count))
    return None if axes is None else [int(a) % rank for a in np.ravel(axes)]


def _static_length(v) -> int | None:
    """The length of a 1-D value whose size is known (a Slice's starts), or None."""
    shape = v.shape if v is not None else None
    return shape[0] if shape is not None and len(shape) == 1 and isinstance(shape[0], int) else None


def weight_in_axis(node) -> int | None:
    """The axis of a layer's constant weight along which its input channels run (SmoothQuant's scaling)."""
    if node.op_type == "Gemm":
        return 1 if attribute(node, "transB") else 0
    return {"Conv": 1, "ConvTranspose": 0, "MatMul": -2}.get(node.op_type) if not node.domain else None


def activation_axis(node) -> int:
    """The channel axis of a layer's input and output activations: 1 for convolutions (NCHW), the last for
    Gemm and MatMul."""
    return 1 if node.op_type in CONVOLUTIONS else -1


def channel_flow(node) -> str:
    """How channels flow through `node` (one of FLOWS): the table's, with a grouped Conv as "grouped"."""
    info = op_info(node.op_type, node.domain)
    if info is None:
        return "opaque"
    if info.flow == "layer" and node.op_type in CONVOLUTIONS and (attribute(node, "group") or 1) > 1:
        return "grouped"
    return info.flow


def channel_params(node, axis: int, rank: int) -> tuple[int, ...] | None:
    """For a "normalize" op whose input has its channels on `axis` (of `rank`): the inputs that hold one
    parameter per channel (() where the op keeps the channels apart and has none along them), or None where it
    mixes the channels (a Softmax over them, a LayerNorm over them and more, a GroupNormalization)."""
    op = node.op_type
    if op in ("BatchNormalization", "InstanceNormalization"):
        return CHANNEL_PARAMS[op] if axis == 1 else None
    if op == "LayerNormalization":
        start = attribute(node, "axis") % rank
        return () if axis < start else CHANNEL_PARAMS[op] if start == axis == rank - 1 else None
    if op in ("Softmax", "LogSoftmax"):
        return None if attribute(node, "axis") % rank == axis else ()
    return None


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


# torch module class names (NNI's config_list, NNCF-style scopes) and the IR layers they lower to
TORCH_LAYER_TYPES = {"Conv1d": "Conv", "Conv2d": "Conv", "Conv3d": "Conv", "Linear": "Gemm|MatMul"}


def layer_types(node) -> set[str]:
    """The types a layer answers to: its op type and the torch module classes that lower to it."""
    return {node.op_type} | {t for t, ir in TORCH_LAYER_TYPES.items() if node.op_type in ir.split("|")}


def layer_path(node) -> str | None:
    """A layer's module path from its weight's parameter name (`layer1.0.conv1.weight` -> `layer1.0.conv1`;
    a Linear weight the IR holds transposed keeps its name in meta["torch_name"]), or None."""
    w = node.input(1) if len(node.inputs) > 1 else None
    name = (w.meta.get("torch_name") or w.name) if w is not None and w.const is not None else ""
    name = name.removesuffix(".T")  # written transposed by lowbit's ONNX writer
    return name.removesuffix(".weight") if name.endswith(".weight") else None


def weight_quantizer(node, port: int = 1):
    """The FakeQuantize a layer reads its weight at `port` through (its input a constant: QAT), or None."""
    v = node.input(port) if len(node.inputs) > port else None
    fq = v.producer if v is not None and v.const is None else None
    return fq if fq is not None and is_fake_quantize(fq) and fq.input(0).const is not None else None
