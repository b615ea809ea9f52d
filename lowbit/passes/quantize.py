"""quantize: place quantizers as the hardware config says, calibrate their ranges, insert FakeQuantize.

Placement is `lowbit.quant.placement` (merged, propagated, never inside a
fused pattern, model outputs FP32). Activation ranges come from one run over
the calibration data in the graph's origin runtime (`lowbit/runtime.py`),
reduced on the fly (`quant/summary.py`), shared with the other passes of the
pipeline (an earlier pass that ran over the data tapped them already); weight ranges from the weights
(per channel where the config prefers it). Quantizers in one unified-scale
group share the union of their ranges.

Options (ctx.options): `preset` ("performance": symmetric activations;
"mixed": asymmetric), `model_type` ("transformer", as NNCF's: mixed preset by
default, element-wise Add/Mul and the attention-probabilities x V MatMul stay
FP32, a MatMul of two activations gets symmetric quantizers), `range_estimator` (see quant/stats.py),
`overflow_fix` ("enable", "first_layer" (default), "disable"; 8-bit weights only; "enable" also keeps
every MatMul of two activations FP32), `batch_size`
for calibration, `bits` (quant/bits.py: 2 to 8 bits per weight or activation, per layer), `range_learning`
(how the torch module's quantizers train: "range" or "lsq"), `per_tensor_weights` (what a per-tensor weight
quantizer's grid spans where a BN is folded into its layer: "folded", W * s, or "unfolded", W; `weight_range`).
"""

from __future__ import annotations

import warnings

import numpy as np

from ..ir.graph import Graph, Node
from ..errors import AlreadyQuantizedError
from ..ir.ops import CONVOLUTIONS, QUANT_DOMAIN, TRANSFORMER_FP32_OPS, is_quantizer
from ..patterns.library.bn_folding import BEFORE_BN, FOLDED_BN_SCALE, merged_pairs, merged_weight
from ..quant.calibration import collect, gather  # noqa: F401  (collect: kept importable here)
from ..quant.placement import QuantPoint, attention_output_matmuls, place_quantizers, reads_two_activations
from ..quant.ranges import fq_range
from ..quant.stats import RangeStats
from ..quant.summary import DERIVABLE_ESTIMATORS, Need
from ..quant.weight_mse import clip_ratio, resolved
from .base import Pass, PassContext, PassResult, register_pass


def preset_for(ctx: PassContext) -> str:
    return ctx.options.effective_preset


def weight_range(point: QuantPoint, merged_bn: dict[str, Node], per_tensor_weights: str = "folded",
                 estimator: str = "min_max", half_range: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The range of a weight quantizer's values. A per-channel one: each channel's (it rounds W on a grid that
    folding a BN scales with it). A per-tensor one, where its layer's BN is merged (fold_bn="train";
    `merged_bn`: Conv name -> its BN): the range of W * s (`per_tensor_weights="folded"`), or of W. Where a BN
    was folded into its layer before (fold_bn's `folded_bn_scale` s) and `per_tensor_weights="unfolded"`: one
    range for W / s, the weight as stored before the BN, scaled by s per channel (NNCF's per-tensor weights on
    a torch model, whose BN the runtime folds). `estimator` "mse" clips those ends to the ratio that rounds the
    weight with the least squared error (quant/weight_mse.py; `half_range`: the overflow fix's grid)."""
    w, lo, hi = _weight_ends(point, merged_bn, per_tensor_weights)
    if estimator == "mse":
        ratio = clip_ratio(w, lo, hi, point.config, point.axis, half_range)
        lo, hi = lo * ratio, hi * ratio
    return lo, hi


def _weight_ends(point: QuantPoint, merged_bn: dict[str, Node],
                 per_tensor_weights: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the weight the quantizer rounds, its low ends, its high ends): see weight_range."""
    w = point.value.const.astype(np.float64)
    if not point.config.per_channel and w.ndim >= 2:
        if per_tensor_weights == "unfolded":
            folded = next((n for n, port in point.consumers if port == 1 and FOLDED_BN_SCALE in n.meta), None)
            if folded is not None:
                return (w, *_unfolded_range(w, np.asarray(folded.meta[FOLDED_BN_SCALE]), point.axis % w.ndim))
        elif (conv := merged_layer(point, merged_bn)) is not None:
            w = merged_weight(conv, merged_bn[conv.name])
    if not point.config.per_channel or w.ndim < 2:
        return w, np.array(w.min()), np.array(w.max())
    axis = point.axis % w.ndim
    dims = tuple(d for d in range(w.ndim) if d != axis)
    shape = [1] * w.ndim
    shape[axis] = -1
    return w, w.min(axis=dims).reshape(shape), w.max(axis=dims).reshape(shape)


def merged_layer(point: QuantPoint, merged_bn: dict[str, Node]) -> Node | None:
    """The Conv whose merged BN (fold_bn="train"; `merged_bn`: Conv name -> its BN) follows the weight that
    `point` quantizes per tensor, or None."""
    if point.config.per_channel:
        return None
    return next((node for node, port in point.consumers if port == 1 and node.name in merged_bn), None)


def _unfolded_range(w: np.ndarray, s: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ends s * [min, max] of the folded weight `w` divided by the BN scale `s` along `axis` (a
    channel whose s is 0 is all zero, and keeps s = 1: any grid holds it)."""
    shape = [1] * w.ndim
    shape[axis] = -1
    s = np.where(s == 0, 1.0, s).reshape(shape)
    stored = w / s
    ends = np.array(stored.min()) * s, np.array(stored.max()) * s
    return np.minimum(*ends), np.maximum(*ends)


def insert_fake_quantize(graph: Graph, point: QuantPoint, levels: int, low: np.ndarray, high: np.ndarray,
                         learning: str = "range") -> Node:
    """A FakeQuantize of `point`'s value. Its meta says how a torch module trains it (backends/torch_fq.py):
    `grid` "symmetric" keeps the zero point fixed, "asymmetric" lets it move (zero stays a level either way);
    `learning` "lsq" learns the step size with LSQ's gradient scale instead of the range ends; `unified` (the
    point's unified-scale group) makes the FakeQuantizes of one group a single torch module, so that they keep
    one range while they train, as the device needs (NNCF shares one quantizer module the same way)."""
    v = point.value
    lo = graph.add_constant(f"{v.name}_fq_low", low)
    hi = graph.add_constant(f"{v.name}_fq_high", high)
    where = {"after": v.producer} if v.producer is not None else {"before": min_consumer(graph, point)}
    fq = graph.make_node("FakeQuantize", [v, lo, hi, lo, hi], {"levels": levels}, domain=QUANT_DOMAIN,
                         name=f"{v.name}_fq", meta={"quantizer": point.kind, "config": point.config.name,
                                                    "grid": point.config.mode,
                                                    **({"learning": learning} if learning != "range" else {}),
                                                    **({"unified": point.group} if point.group is not None else {})},
                         **where)
    for node, port in point.consumers:
        node.set_input(port, fq.output)
    return fq


def min_consumer(graph: Graph, point: QuantPoint) -> Node:
    consumers = {id(n) for n, _ in point.consumers}
    return next(n for n in graph if id(n) in consumers)


def first_quantized_convolutions(graph: Graph, weights: list[QuantPoint]) -> list[QuantPoint]:
    """The weight quantizers of the first quantized convolutions met walking down from each graph input
    (NNCF's "first_layer": the walk stops at a convolution whose weight is quantized)."""
    by_layer = {id(node): p for p in weights for node, _ in p.consumers if node.op_type in CONVOLUTIONS}
    found, seen = [], set()
    queue = [node for v in graph.inputs for node, _ in v.uses]
    while queue:
        node = queue.pop(0)
        if id(node) in seen:
            continue
        seen.add(id(node))
        if id(node) in by_layer:
            found.append(by_layer[id(node)])
            continue
        queue.extend(user for out in node.outputs for user, _ in out.uses)
    return found


def half_range_weights(graph: Graph, points: list[QuantPoint], mode: str) -> set[int]:
    """The weight quantizers that use half the integer grid (the overflow fix; see quant/ranges.py).

    x86 int8 kernels without VNNI (AVX2, AVX-512 without VNNI) add pairs of
    u8 x s8 products in saturating 16-bit lanes: with full 8-bit weights both
    OpenVINO's and ONNX Runtime's kernels lose accuracy there (measured on an
    AVX2 host: 30 dB instead of 41 dB agreement on ResNet18). "enable" uses a
    7-bit grid on every weight (safe on any x86 CPU), "first_layer" (the
    default, as NNCF) only on the first convolutions, whose inputs are widest,
    "disable" nowhere. The choice is the caller's: nothing here reads the CPU
    that quantizes, since the model is deployed elsewhere.

    A MatMul of two activations (attention's query x key) multiplies two full
    8-bit grids, which no weight grid fixes: OpenVINO, which fuses attention
    only on CPUs with AVX-512, runs it as a plain INT8 MatMul elsewhere, and on
    an AVX2-only CPU a ViT then lands 19.7 dB from the simulation (69 dB with
    query x key in FP32). So "enable" also leaves those MatMuls FP32
    (`quant_points`).
    """
    weights = [p for p in points if p.kind == "weight" and p.config.bits == 8]  # NNCF's fix: 8-bit grids only
    if mode == "enable":
        return {id(p) for p in weights}
    if mode == "first_layer":
        return {id(p) for p in first_quantized_convolutions(graph, weights)}
    return set()


def refuse_quantized(graph: Graph) -> None:
    """Raise AlreadyQuantizedError when `graph` already holds quantizers: quantizing twice stacks them."""
    found = [n for n in graph if is_quantizer(n)]
    if found:
        kinds = ", ".join(sorted({n.op_type for n in found}))
        raise AlreadyQuantizedError(
            f"graph {graph.name!r} is already quantized: it holds {len(found)} quantizer node(s) ({kinds}), "
            f"the first {found[0].name!r}. Quantize the FP32 model instead, or export this one as it is "
            "(its quantization is kept)")


def quant_points(graph: Graph, ctx: PassContext) -> list[QuantPoint]:
    """The quantizers the pass places in `graph` (which is not changed), as ctx's options say."""
    hw = ctx.hw
    ignored = ctx.ignored_scope.resolve(graph) if ctx.ignored_scope is not None else set()
    ignored |= {n.name for n in graph if n.meta.get("smooth_quant")}  # x / s stays FP32; its output is quantized
    transformer = ctx.options.model_type == "transformer"
    if transformer:
        ignored |= attention_output_matmuls(graph)
    if ctx.options.overflow_fix == "enable":  # the grid for CPUs without VNNI: see half_range_weights
        ignored |= {n.name for n in graph if reads_two_activations(n)}
    points = place_quantizers(graph, hw, preset=preset_for(ctx), ignored=ignored,
                              skip_ops=TRANSFORMER_FP32_OPS if transformer else frozenset(),
                              transformer=transformer)
    return ctx.options.bits.apply(graph, points) if ctx.options.bits is not None else points


def activation_ranges(graph: Graph, ctx: PassContext, activations: list[QuantPoint]) -> dict[str, tuple[float, float]]:
    """The observed range of each activation quantizer's value, by the context's range estimator.

    "min_max" and "mean_min_max" are derived from the shared statistics
    (`quant/summary.py`: tapped once for the whole pipeline); "percentile"
    needs its own run over the data.
    """
    estimator = ctx.options.range_estimator
    if not activations:
        return {}
    if estimator in DERIVABLE_ESTIMATORS:
        summaries = gather(graph, ctx, [Need(p.value) for p in activations])
        return {p.name: s.range(estimator) for p, s in zip(activations, summaries)}
    stats = {p.name: RangeStats(estimator) for p in activations}
    gather(graph, ctx, [], extra=[(p.value, stats[p.name]) for p in activations])  # and the later passes' needs
    return {name: s.range() for name, s in stats.items()}


@register_pass
class Quantize(Pass):
    name = "quantize"
    prerequisites = ("fuse",)
    description = "place, calibrate and insert FakeQuantize as the hardware config says"
    # FakeQuantize nodes are inserted, no value's FP32 function changes: statistics (FP32 ones) stay valid
    preserves_statistics = True

    def statistics_needed(self, graph: Graph, ctx: PassContext) -> list[Need]:
        if "quantize" in ctx.history or any(is_quantizer(n) for n in graph):
            return []
        if ctx.options.range_estimator not in DERIVABLE_ESTIMATORS:
            return []
        return [Need(p.value) for p in quant_points(graph, ctx) if p.kind == "activation"]

    def __call__(self, graph: Graph, ctx: PassContext) -> PassResult:
        if "quantize" in ctx.history:
            raise AlreadyQuantizedError(
                f"pass 'quantize' already ran in this pipeline (step {ctx.history.index('quantize') + 1} of "
                f"{', '.join(ctx.history)}): the graph is already quantized, and quantizing again would stack "
                "quantizers. Name the pass once")
        refuse_quantized(graph)
        points = quant_points(graph, ctx)
        if not points:
            warnings.warn("lowbit: nothing to quantize in this model for this device; it is returned unchanged",
                          stacklevel=2)
            return PassResult(graph, changed=False, notes=["nothing to quantize"])
        activations = [p for p in points if p.kind == "activation"]
        ranges = activation_ranges(graph, ctx, activations)
        unbounded: dict[str, tuple[float, float]] = {}  # quantizers no float32 grid spans: left FP32
        group_range: dict[int, tuple[float, float]] = {}
        for p in activations:
            if p.group is not None:  # np.minimum/np.maximum carry a NaN to the whole group, as -inf is carried
                lo, hi = ranges[p.name]
                old = group_range.get(p.group, (lo, hi))
                group_range[p.group] = (float(np.minimum(old[0], lo)), float(np.maximum(old[1], hi)))
        half = half_range_weights(graph, points, ctx.options.overflow_fix)
        merged_bn = {conv.name: bn for conv, bn in merged_pairs(graph)}
        unfolded = ctx.options.per_tensor_weights == "unfolded"
        for p in points:
            if p.kind == "weight":
                lo, hi = weight_range(p, merged_bn, ctx.options.per_tensor_weights,
                                      resolved(ctx.options.weight_range_estimator, p.config), id(p) in half)
            else:
                lo, hi = group_range[p.group] if p.group is not None else ranges[p.name]
            with np.errstate(over="ignore", invalid="ignore"):  # inf, NaN, or past float32: _representable
                r = fq_range(p.config, lo, hi, half_range=id(p) in half)
            # a value that holds -inf (scores masked with it) or NaN, or a mask of float32's lowest value, whose
            # grid's end or width overflows float32: no grid spans it (a NaN grid stopped the quantized module)
            if not _representable(r):
                unbounded[p.name] = (float(np.min(lo)), float(np.max(hi)))
                continue
            fq = insert_fake_quantize(graph, p, r.levels, r.low, r.high, ctx.options.range_learning)
            if unfolded and p.kind == "weight" and merged_layer(p, merged_bn) is not None:
                fq.meta[BEFORE_BN] = True  # it rounds W, the BN's s folded onto its grid at export
        counts = {"weight_quantizers": sum(p.kind == "weight" and p.name not in unbounded for p in points),
                  "activation_quantizers": sum(p.name not in unbounded for p in activations)}
        notes = [f"left in FP32, no float32 grid spans its calibrated range ({lo} .. {hi}): {name}"
                 for name, (lo, hi) in unbounded.items()]
        if unbounded:
            warnings.warn(f"lowbit: {len(unbounded)} value(s) left in FP32: their calibrated ranges hold inf or NaN, "
                          "or span more than float32 can (a mask of float32's lowest value), so no grid spans them: "
                          f"{', '.join(sorted(unbounded))}", stacklevel=2)
        return PassResult(graph, changed=True, fired=counts, notes=notes)


def _representable(r) -> bool:
    """True if a grid's ends and its width are finite float32 numbers (the torch and QDQ quantizers compute in
    float32: a symmetric grid over float32's lowest value ends at -inf there)."""
    low, high = np.asarray(r.low, np.float32), np.asarray(r.high, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.all(np.isfinite(low)) and np.all(np.isfinite(high)) and np.all(np.isfinite(high - low)))
