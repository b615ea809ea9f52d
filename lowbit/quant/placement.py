"""Where quantizers go: requests at quantizable inputs, moved up through quantization-agnostic ops, merged.

1. Every op the hardware config lists asks for a quantizer on each activation
   input (the config's `inputs`, or every non-constant float input) and on
   its constant weight. An input that comes from inside the op's own fused
   group (the bias Add of a Conv, ...) is skipped: a quantizer never splits a
   fused pattern. Ignored nodes ask for nothing, and neither does index math
   (`index_math`: ops whose results reach the outputs only cast to integers
   or as sizes, such as T5's relative-position buckets).
2. Requests move up, consumers first, through ops that do not change values'
   grid (MaxPool, Reshape, Flatten, Transpose, Dropout, ..., and ops the
   config marks `propagate`, such as Concat), but only when every consumer of
   that op's output asked for one, the output is not a model output, and the
   edge is a float edge: a quantizer never crosses an integer edge. They move
   onto the op's data input (every non-constant input of a Concat): a
   Reshape's shape, computed at run time or not, is not what they read.
3. All requests left on one value merge into one quantizer that feeds the
   consumers that asked; model outputs stay FP32.
4. Quantizers on the inputs of an op with `unified_scales` (Concat on every
   device; Add and Mul on NPU) form one group that shares a range.
5. A quantized op whose config says `quantized_output` (Conv for CPU_ORT)
   gets a quantizer on its output for each reader that asked for none: ONNX
   Runtime runs a convolution on integers only as QLinearConv, whose output is
   quantized; without it the Conv ran in FP32 there (a squeeze-excite Conv,
   read by its Sigmoid; a Conv before a SiLU). The output is taken after the
   Relu or Clip of its fused pattern, which ONNX Runtime folds into the
   quantizer, but before a SiLU, HardSwish or other activation, which it does
   not. Model outputs still stay FP32, and so does an output that reshaping
   ops carry into a Concat (a ViT's patch embedding: see
   `_reshaped_into_concat`).

For transformers (`transformer=True`), as NNCF's model type does: a MatMul of
two activations (and an Attention's query and key) takes symmetric quantizers whatever the preset (OpenVINO runs
a query-key product in its INT8 attention kernel only on zero-point-free
grids), and `attention_output_matmuls` names the MatMuls that read a Softmax,
which the quantize pass leaves in FP32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..hw_configs import HwConfig, OpConfig, QuantizerConfig
from ..ir.graph import Graph, Node, Value
from ..ir.ops import (FUSABLE_ACTIVATIONS, ORT_FOLDED_ACTIVATIONS, attribute, channel_flow, nan_guarded,
                      op_info, weight_out_axis)
from ..ir.types import is_float


@dataclass
class QuantPoint:
    """One quantizer: the value it reads, the edges that read its output, and its config."""

    value: Value
    consumers: list[tuple[Node, int]]
    kind: str  # "activation" | "weight"
    config: QuantizerConfig
    axis: int | None = None  # per-channel axis of a weight
    group: int | None = None  # unified-scale group
    layers: tuple[str, ...] = ()  # an activation's: the nodes that asked for it (before moving up agnostic ops)

    @property
    def name(self) -> str:
        return self.value.name


@dataclass
class _Request:
    consumer: Node
    port: int
    configs: tuple[QuantizerConfig, ...]
    groups: set[int] = field(default_factory=set)
    two_activation_matmul: bool = False  # asked for by a MatMul of two activations (maybe through agnostic ops)
    layers: frozenset[str] = frozenset()  # the nodes that asked, through agnostic ops


def _agnostic(node: Node, hw: HwConfig) -> bool:
    info = op_info(node.op_type, node.domain)
    cfg = hw.op(node.op_type)
    return (info is not None and "agnostic" in info.traits) or (cfg is not None and cfg.propagate)


def _data_inputs(node: Node) -> list[tuple[int, Value]]:
    return [(i, v) for i, v in enumerate(node.inputs) if v is not None and v.const is None]


def _moved_data(node: Node) -> list[tuple[int, Value]]:
    """The inputs a request on an agnostic op's output moves to: the non-constant inputs of a Concat, the data
    input (port 0) of the rest. A Reshape's shape, a Resize's scales or an Expand's sizes are not what the
    quantizer reads, computed at run time or not (a transformer's view into heads reads the batch from a Shape).
    [] where one of them is not float, or the data input is a constant."""
    if channel_flow(node) == "concat":
        moved = _data_inputs(node)
    else:
        moved = [(0, node.inputs[0])] if node.inputs and node.inputs[0] is not None else []
    if not moved or any(v.const is not None or not is_float(v.dtype) for _, v in moved):
        return []
    return moved


def _pick(configs: tuple[QuantizerConfig, ...], preset: str, kind: str) -> QuantizerConfig:
    if kind == "activation":
        want = "asymmetric" if preset == "mixed" else "symmetric"
        for c in configs:
            if c.mode == want:
                return c
    return configs[0]


def _same_group(a: Node, b: Node) -> bool:
    return "fused" in a.meta and a.meta.get("fused") == b.meta.get("fused")


def _pattern_output(node: Node) -> Value:
    """Where `node`'s output is quantized for a runtime that needs it quantized: after the rest of its fused
    pattern (a bias Add, a BatchNorm it keeps training, a Relu or Clip, which ONNX Runtime folds into the
    quantizer), but before any other activation of it (SiLU, HardSwish, ...), which ONNX Runtime does not."""
    out = node.outputs[0]
    while len(out.uses) == 1 and _same_group(node, out.uses[0][0]) and out.uses[0][0].outputs:
        user = out.uses[0][0]
        if user.op_type in FUSABLE_ACTIVATIONS and user.op_type not in ORT_FOLDED_ACTIVATIONS:
            break
        out = user.outputs[0]
    return out


def _reshaped_into_concat(value: Value) -> bool:
    """True if `value` reaches a Concat through reshaping ops alone (a ViT's patch embedding, joined to its class
    token). With a quantizer there, OpenVINO 2026.4 computes the ViT's .onnx wrong from the patch embedding's own
    output on (1.4 dB against ONNX Runtime; the .xml is right), so such a Conv's output gets no quantizer of its
    own (step 5). The smallest model that shows it (tests/test_openvino_workarounds.py): a Conv with a bias, Q/DQ,
    Reshape, Transpose, and a Concat with a token Expanded to the dynamic batch; without the bias, with a static
    batch or with a constant token it is right. Moving the quantizer after the reshapes does not help: OpenVINO
    moves it back."""
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        for user, _ in v.uses:
            if user.op_type == "Concat" and not user.domain:
                return True
            if channel_flow(user) == "reshape" and id(user) not in seen:
                seen.add(id(user))
                stack.extend(user.outputs)
    return False


def attention_output_matmuls(graph: Graph) -> set[str]:
    """MatMuls that read a Softmax, directly or through a Reshape or Transpose (attention probabilities x V), or
    through the NaN guard torch.onnx.export's default exporter writes after it (Where(IsNaN(p), 0, p))."""
    names = set()
    for node in graph:
        if node.op_type != "MatMul" or node.domain:
            continue
        for v in node.inputs:
            producer = v.producer if v is not None else None
            if producer is not None and channel_flow(producer) == "reshape":
                producer = producer.input(0).producer
            guarded = nan_guarded(producer)
            producer = guarded.producer if guarded is not None else producer
            if producer is not None and producer.op_type == "Softmax" and not producer.domain:
                names.add(node.name)
    return names


def index_math(graph: Graph) -> set[str]:
    """Names of the nodes whose outputs reach the model's outputs only cast to an integer type or read as sizes
    (Shape): index and position arithmetic done in float. T5's relative-position buckets take the log of each
    distance (-inf at distance 0), scale it and cast it to a bucket index; a quantizer there would round an
    index, and its calibrated range was infinite (a NaN grid that stopped the quantized module). Where the
    sequence length is static, cleanup folds that arithmetic to constants; with a dynamic one it stays.
    Values a subgraph reads count as reaching the outputs; nodes that reach no output at all (a pooler whose
    output the model drops) are not index math."""
    data = _reaching_outputs(graph, through_indices=False)
    live = _reaching_outputs(graph, through_indices=True)
    return {node.name for node in graph
            if any(id(v) in live for v in node.outputs) and not any(id(v) in data for v in node.outputs)}


def _reaching_outputs(graph: Graph, through_indices: bool) -> set[int]:
    """ids of the values the graph outputs (or a subgraph) depend on; without `through_indices`, only through
    float data: not back through a Shape, nor through a Cast that makes a float an integer."""
    reached: set[int] = set()
    stack = list(graph.outputs) + [v for node in graph for v in node.captures]
    while stack:
        value = stack.pop()
        if id(value) in reached:
            continue
        reached.add(id(value))
        node = value.producer
        if node is None:
            continue
        if not through_indices and (channel_flow(node) == "size" or (
                node.op_type == "Cast" and not node.domain and not is_float(value.dtype)
                and node.input(0) is not None and is_float(node.input(0).dtype))):
            continue
        stack.extend(v for v in node.inputs if v is not None)
    return reached


def reads_two_activations(node: Node) -> bool:
    """A MatMul of two activations, or an Attention (query x key)."""
    if node.domain:
        return False
    return node.op_type == "Attention" or (node.op_type == "MatMul" and len(_data_inputs(node)) == 2)


def _ranges_axis(node: Node, w: Value) -> int | None:
    """The axis of a weight's per-channel ranges: its output channels' (ops.weight_out_axis), except a depthwise
    ConvTranspose's ([C, 1, ...]: row c makes output channel c), whose axis 1 holds one entry and would give the
    whole weight one range."""
    if node.op_type == "ConvTranspose" and attribute(node, "group") > 1 and w.const.shape[1] == 1 \
            and w.const.shape[0] == attribute(node, "group"):
        return 0
    return weight_out_axis(node)


def place_quantizers(graph: Graph, hw: HwConfig, *, preset: str = "performance", ignored: set[str] = frozenset(),
                     skip_ops: frozenset[str] = frozenset(), transformer: bool = False) -> list[QuantPoint]:
    """The quantizers to insert into `graph` (which is not changed)."""
    ignored = set(ignored) | index_math(graph)
    requests: dict[int, list[_Request]] = {}
    values: dict[int, Value] = {}
    weights: dict[int, QuantPoint] = {}
    group_ids = iter(range(1, 1 << 30))

    def ask(v: Value, req: _Request) -> None:
        if v.shape is not None and any(isinstance(d, int) and d == 0 for d in v.shape):
            return  # an empty tensor (Phi-3's rotary pass-through half, x[..., 32:] of 32): nothing to quantize
        requests.setdefault(id(v), []).append(req)
        values[id(v)] = v

    nodes = graph.nodes
    output_quantized: list[tuple[Node, OpConfig]] = []  # layers whose outputs the config wants quantized (step 5)
    for node in nodes:
        cfg = hw.op(node.op_type) if node.domain == "" else None
        if cfg is None or node.name in ignored or node.op_type in skip_ops:
            continue
        if cfg.quantized_output and cfg.activations:
            output_quantized.append((node, cfg))
        info = op_info(node.op_type)
        if cfg.weights and info is not None:
            for port in info.weight_inputs:
                w = node.input(port)
                if w is not None and w.const is not None and is_float(w.dtype):
                    point = weights.get(id(w))
                    if point is None:
                        weights[id(w)] = QuantPoint(w, [(node, port)], "weight", _pick(cfg.weights, preset, "weight"),
                                                    axis=_ranges_axis(node, w))
                    else:
                        point.consumers.append((node, port))
        if not cfg.activations:
            continue
        group = next(group_ids) if cfg.unified_scales else None
        ports = cfg.inputs if cfg.inputs is not None else [i for i, _ in _data_inputs(node)]
        for port in ports:
            v = node.input(port)
            if v is None or v.const is not None or not is_float(v.dtype):
                continue
            if v.producer is not None and _same_group(v.producer, node):
                continue
            ask(v, _Request(node, port, cfg.activations, {group} if group else set(), reads_two_activations(node),
                            frozenset({node.name})))

    # Move requests up through agnostic ops, consumers first.
    for node in reversed(nodes):
        if not _agnostic(node, hw) or node.name in ignored or len(node.outputs) != 1:
            continue
        out = node.output
        reqs = requests.get(id(out))
        if not reqs or out.is_graph_output or not is_float(out.dtype):
            continue
        asked = {(id(r.consumer), r.port) for r in reqs}
        if any((id(user), port) not in asked for user, port in out.uses):
            continue
        sources = _moved_data(node)
        if not sources:
            continue
        configs = _common(reqs)
        if configs is None:
            continue
        cfg = hw.op(node.op_type)
        groups = set().union(*(r.groups for r in reqs))
        if cfg is not None and cfg.unified_scales and len(sources) > 1:
            groups |= {next(group_ids)}
        del requests[id(out)]
        for port, v in sources:
            ask(v, _Request(node, port, configs, set(groups), any(r.two_activation_matmul for r in reqs),
                            frozenset().union(*(r.layers for r in reqs))))

    for node, cfg in output_quantized:
        out = _pattern_output(node)
        if out.is_graph_output or not is_float(out.dtype) or _reshaped_into_concat(out):
            continue
        reqs = requests.get(id(out), [])
        asked = {(id(r.consumer), r.port) for r in reqs}
        configs = _common(reqs) if reqs else cfg.activations
        for user, port in out.uses:  # a subgraph's read (a capture, at a negative port) stays FP32
            if port >= 0 and (id(user), port) not in asked and user.name not in ignored and configs:
                ask(out, _Request(user, port, configs, layers=frozenset({node.name})))

    points: list[QuantPoint] = []
    for key, reqs in requests.items():
        configs = _common(reqs) or reqs[0].configs
        v = values[key]
        symmetric = transformer and any(r.two_activation_matmul for r in reqs)
        points.append(QuantPoint(v, [(r.consumer, r.port) for r in reqs], "activation",
                                 _pick(configs, "performance" if symmetric else preset, "activation"),
                                 group=min(set().union(*(r.groups for r in reqs)), default=None),
                                 layers=tuple(sorted(set().union(*(r.layers for r in reqs))))))
    _merge_groups(points, requests)
    order = {id(n): i for i, n in enumerate(nodes)}
    points.sort(key=lambda p: (order.get(id(p.value.producer), -1), p.name))
    weight_points = sorted(weights.values(), key=lambda p: order[id(p.consumers[0][0])])
    return weight_points + points


def _common(reqs: list[_Request]) -> tuple[QuantizerConfig, ...] | None:
    """The configs every request allows, in the first request's order; None if they share none."""
    names = set.intersection(*({c.name for c in r.configs} for r in reqs))
    common = tuple(c for c in reqs[0].configs if c.name in names)
    return common or None


def _merge_groups(points: list[QuantPoint], requests) -> None:
    """Points that share any unified-scale group id end in one group (union-find over ids)."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for reqs in requests.values():
        ids = sorted(set().union(*(r.groups for r in reqs)))
        for a, b in zip(ids, ids[1:]):
            parent[find(b)] = find(a)
    for p in points:
        if p.group is not None:
            p.group = find(p.group)
