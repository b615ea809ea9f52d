"""fold_bn: fold inference BatchNormalization into the Conv / Gemm / MatMul(+bias) before it.

The rewrite rules live in `lowbit.patterns.library.bn_folding`; outputs stay
equal within float32 rounding (the scale is computed in float64).

With the option `fold_bn="train"` (quantization-aware training with BN
merge), a Conv keeps its BatchNormalization, marked `bn_merge`: the BN trains
on, its weight quantizer sees the weight scaled by the BN, and the BN is
folded exactly when the module is exported or stripped (`fold_merged`).
Gemm and MatMul BNs fold as usual.

Each layer a BN is folded into records the BN's scale (node meta
`folded_bn_scale`), so that `per_tensor_weights="unfolded"` can put a
per-tensor weight grid on the weight as stored before the BN (passes/quantize.py).
"""

from __future__ import annotations

from ..ir.graph import Graph
from ..patterns.library.bn_folding import mark_bn_merge, rules
from ..patterns.rewrite import RuleSet
from .base import Pass, PassContext, PassResult, register_pass


@register_pass
class FoldBatchNorm(Pass):
    name = "fold_bn"
    description = "fold BatchNormalization into the preceding Conv/Gemm/MatMul"

    def __call__(self, graph: Graph, ctx: PassContext) -> PassResult:
        if ctx.options.fold_bn == "train":
            marked = mark_bn_merge(graph)
            fired = RuleSet(r for r in rules if r.name != "fold_bn_conv").apply(graph)
            if marked:
                fired["bn_merge"] = marked
        else:
            fired = rules.apply(graph)
        if fired:
            graph.remove_unused_constants()  # the folded BatchNormalizations' statistics
        return PassResult(graph, changed=bool(fired), fired=fired)
