"""What a runtime does with a quantized model: which layers it runs in INT8, read from its own compiled graph.

Structural, so the answer does not depend on the CPU the test runs on:
OpenVINO's compiled model reports each layer's runtime precision; ONNX
Runtime writes the graph it will run (`optimized_model_filepath`), where the
QDQ groups it runs as integer kernels have become QLinearConv, QGemm,
QLinearMatMul, MatMulIntegerToFloat, ...
"""

from __future__ import annotations

import collections
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# ops whose output holds their input's values (or zeros: Pad), so a grid on their input holds it too
PASS_THROUGH = ("Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "MaxPool", "Identity", "Pad", "Dropout")
# the nodes of ONNX Runtime's optimized graph that run a layer in float (MatMulNBits: on activations it quantizes
# itself, per block, not on the model's grid)
ORT_FLOAT_LAYERS = ("Conv", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm", "MatMulNBits")
ORT_INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm", "ConvInteger", "MatMulInteger",
                   "DynamicQuantizeMatMul", "QAttention")
OV_LAYERS = ("Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul")


def quantized_layers(model: onnx.ModelProto) -> dict[str, dict]:
    """The Conv/Gemm/MatMul nodes of a QDQ model whose data inputs all come from DequantizeLinear (through
    value-preserving ops), with whether their weight is a constant and whether their output is quantized."""
    producer = {o: n for n in model.graph.node for o in n.output}
    users = collections.defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            users[i].append(n)
    initializers = {i.name for i in model.graph.initializer}

    def dequantized(name: str) -> bool:
        """Read from a DequantizeLinear through value-preserving ops and Concats of dequantized values."""
        node = producer.get(name)
        while node is not None and node.op_type in PASS_THROUGH:
            node = producer.get(node.input[0])
        if node is not None and node.op_type == "Concat":
            return all(dequantized(i) for i in node.input)
        return node is not None and node.op_type == "DequantizeLinear"

    def constant_weight(name: str) -> bool:
        node = producer.get(name)
        while node is not None and node.op_type in PASS_THROUGH + ("DequantizeLinear",):
            name = node.input[0]
            node = producer.get(name)
        return name in initializers

    zero_points = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}

    def quantized_output(name: str) -> bool:
        """Read by a QuantizeLinear, directly or through a Relu/Clip that ONNX Runtime folds into it (which it
        does when the quantizer's grid starts at 0: zero point 0)."""
        following = users[name]
        if len(following) == 1 and following[0].op_type in ("Relu", "Clip"):
            following = [u for u in users[following[0].output[0]] if u.op_type == "QuantizeLinear"
                         and len(u.input) > 2 and not np.any(zero_points.get(u.input[2], 1))]
        return any(u.op_type == "QuantizeLinear" for u in following)

    found = {}
    for n in model.graph.node:
        if n.op_type in LAYERS and all(dequantized(i) for i in n.input[:2]):
            found[n.name] = {"op": n.op_type, "weight": constant_weight(n.input[1]),
                             "quantized_output": quantized_output(n.output[0])}
    return found


def activation_quantizers(model: onnx.ModelProto) -> int:
    """Distinct activation quantizers of a QDQ model: a QuantizeLinear repeated before a layer (on the same
    grid, after value-preserving ops) shares its scale and zero point with the one it repeats."""
    return len({tuple(n.input[1:3]) for n in model.graph.node if n.op_type == "QuantizeLinear"})


def repeated_quantizers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The QuantizeLinear nodes that repeat an earlier one's grid."""
    seen, repeats = set(), []
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear":
            (repeats if tuple(n.input[1:3]) in seen else []).append(n)
            seen.add(tuple(n.input[1:3]))
    return repeats


def ort_optimized(path: str | Path) -> onnx.ModelProto:
    """The graph ONNX Runtime runs for the model at `path` (extended optimizations, CPU)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


def ort_optimized_ops(path: str | Path) -> collections.Counter:
    """Op counts of the graph ONNX Runtime runs for the model at `path` (extended optimizations, CPU)."""
    return collections.Counter(n.op_type for n in ort_optimized(path).graph.node)


def openvino_layer_precisions(model) -> collections.Counter:
    """(layer type, runtime precision) counts of the conv/matmul layers OpenVINO's CPU plugin runs of `model` (a
    file's path, or an ov.Model)."""
    import openvino as ov

    compiled = ov.Core().compile_model(model if isinstance(model, ov.Model) else str(model), "CPU")
    counts = collections.Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str)
        if kind in OV_LAYERS:
            counts[kind, info["runtimePrecision"].astype(str)] += 1
    return counts


def compiled_f32(model):
    """`model` (a path, or a model OpenVINO compiled already) compiled for the CPU with the f32 hint: the same
    fusions and numerics on every CPU."""
    import openvino as ov

    if isinstance(model, ov.CompiledModel):
        return model
    return ov.Core().compile_model(str(model), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def split_projections(model) -> dict[str, str]:
    """{name: output precision} of the FullyConnected layers OpenVINO's CPU plugin runs for the parts of the
    query/key/value projections lowbit's OpenVINO forms split (backends/openvino_projections.py), in `model`
    (compiled_f32). A Gemm's part is named by the Gemm (OpenVINO calls its MatMul `<gemm>/WithoutBiases`)."""
    compiled = compiled_f32(model)
    return {info["originalLayersNames"].astype(str).split(",")[0].split("/")[0]: info["outputPrecisions"].astype(str)
            for op in compiled.get_runtime_model().get_ordered_ops()
            if (info := op.get_rt_info())["layerType"].astype(str).startswith("FullyConnected")
            and "_part" in info["originalLayersNames"].astype(str)}


def lone_quantizers_after_projections(model) -> list[str]:
    """The FakeQuantize layers OpenVINO's CPU plugin runs alone on a FullyConnected's output carried only through
    ops that move values (Reshape, Transpose, Gather, Split, Reorder: a projection's output cut into heads);
    lowbit's OpenVINO forms put such a quantizer on the projection, where the plugin fuses it
    (backends/openvino_projections.py). `model`: as compiled_f32 takes it."""
    compiled = compiled_f32(model)
    kind = lambda node: node.get_rt_info()["layerType"].astype(str)  # noqa: E731
    lone = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        if kind(op) != "FakeQuantize":
            continue
        source = op.input_value(0).get_node()
        while kind(source) in ("Reshape", "Transpose", "Gather", "Split", "Reorder"):
            source = source.input_value(0).get_node()
        if kind(source).startswith("FullyConnected"):
            lone.append(op.get_friendly_name())
    return lone


def layers_added_by_splits(path) -> int:
    """How many more layers the OpenVINO form at `path` holds than the QDQ file: a projection lowbit's OpenVINO
    forms split (backends/openvino_projections.py) is one MatMul per part, `<projection>_part<i>` (read from the
    file, not compiled)."""
    import openvino as ov

    parts = [op.get_friendly_name() for op in ov.Core().read_model(str(path)).get_ordered_ops()
             if op.get_type_name() == "MatMul" and "_part" in op.get_friendly_name()]
    return len(parts) - len({name.rsplit("_part", 1)[0] for name in parts})


def int8_count(precisions: collections.Counter) -> int:
    return sum(n for (_, precision), n in precisions.items() if precision in ("u8", "i8"))


def sqnr(reference, x) -> float:
    reference, x = np.asarray(reference, np.float64), np.asarray(x, np.float64)
    return float(10 * np.log10((reference ** 2).sum() / max(((reference - x) ** 2).sum(), 1e-30)))


def agreement(reference, x) -> float:
    return float((np.asarray(reference).argmax(-1) == np.asarray(x).argmax(-1)).mean())


def host_has_vnni() -> bool:
    """Whether this test host's CPU has int8 dot-product instructions (its int8 kernels do not saturate)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


# The overflow fix a user deploying to this test host uses (README: `overflow_fix`): the default where the CPU has
# VNNI, the 7-bit weight grid where its u8 x s8 kernels saturate. A test that runs what lowbit wrote in this host's
# int8 kernels and compares numbers quantizes with it; what lowbit writes never depends on the host.
HOST_OVERFLOW_FIX = "first_layer" if host_has_vnni() else "enable"


# The model families of tests/models.py that the deploy tests quantize and deploy: family -> model name
FAMILIES = {"residual": "resnet18", "depthwise": "mobilenet_v2", "densenet": "densenet", "inception": "concat",
            "squeeze_excite": "se", "transformer": "vit", "grouped": "resnext"}


def family_options(name: str) -> dict:
    """lowbit.quantize's options for model `name`: the transformer model type for the ViT."""
    return {"model_type": "transformer"} if name == "vit" else {}


# Epochs on the digits (8x8) of the families the deploy tests train; MobileNetV2 keeps its random initialisation
# (it needs 40 epochs at 32x32 to learn them, and agrees at 42 dB as it is)
FAMILY_EPOCHS = {"resnet18": 15, "densenet": 8, "concat": 5, "se": 5, "vit": 10, "resnext": 5}


def trained_family(name: str):
    """(model, x_train, x_test): tests/models.py's `name` trained on the digits at 8x8 (weights cached under
    ~/.cache/lowbit), and the digits splits at its channels."""
    from models import REFERENCE_MODELS

    sys.path.insert(0, str(Path(__file__).parent.parent))
    from examples.digits import load_digits_split, trained

    factory, shape = REFERENCE_MODELS[name]
    channels = shape[1]
    x_train, _, x_test, _ = load_digits_split(size=8, channels=channels)
    if name not in FAMILY_EPOCHS:
        return factory(), x_train, x_test
    return trained(f"deploy_{name}", factory, epochs=FAMILY_EPOCHS[name], size=8, channels=channels), x_train, x_test


def placed_quantizers(source, example, items, model_type) -> tuple[int, int]:
    """(weight, activation) FakeQuantize nodes lowbit's PTQ passes put into `source` (a torch module or an ONNX
    model), calibrated on `items`."""
    import lowbit
    from lowbit.compiler import pass_context, ptq_passes
    from lowbit.passes import PassManager

    context = pass_context(hw="ANY", dataset=lowbit.Dataset(items), model_type=model_type, progress=False)
    graph = PassManager(ptq_passes(items, model_type)).run(lowbit.lower(source, example), context)
    quantizers = [n for n in graph if n.op_type == "FakeQuantize"]
    weights = sum(n.input(0).const is not None for n in quantizers)
    return weights, len(quantizers) - weights


def default_exported(model, example, path) -> onnx.ModelProto:
    """torch.onnx.export with its default exporter (dynamo=True) and a dynamic batch, its progress lines kept out
    of the log."""
    import contextlib
    import copy
    import io

    import torch

    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(copy.deepcopy(model).eval(), (example,), str(path), dynamo=True, input_names=["x"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
    return onnx.load(path)
