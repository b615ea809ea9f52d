"""fold_bn: fold inference BatchNormalization into the Conv / Gemm / MatMul(+bias) before it.

The rewrite rules live in `lowbit.patterns.library.bn_folding`; outputs stay
equal within float32 rounding (the scale is computed in float64).
"""

from __future__ import annotations

from ..ir.graph import Graph
from ..patterns.library.bn_folding import rules
from .base import Pass, PassContext, PassResult, register_pass


@register_pass
class FoldBatchNorm(Pass):
    name = "fold_bn"
    description = "fold BatchNormalization into the preceding Conv/Gemm/MatMul"

    def __call__(self, graph: Graph, ctx: PassContext) -> PassResult:
        fired = rules.apply(graph)
        if fired:
            graph.remove_unused_constants()  # the folded BatchNormalizations' statistics
        return PassResult(graph, changed=bool(fired), fired=fired)
