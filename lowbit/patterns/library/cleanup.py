"""Drop ops that compute nothing at inference: Identity, Dropout in eval mode, empty Concat inputs.

    Identity(x)        -> x
    Dropout(x)         -> x      (no training_mode input set to true, mask output unused)
    Pad(x, zeros)      -> x      (constant pads that are all 0: MobileNetV2's 1x1 convolutions)
    Concat(e, x, ...)  -> Concat(x, ...), or x alone
                                 (e empty: of size 0 along the axis, as the pass-through half of a rotary
                                 embedding that rotates every dim (Phi-3's x[..., rotary_dim:]); or a 1-D empty
                                 tensor beside inputs of another rank: torch.cat skips it, a legacy rule ONNX
                                 does not have; transformers' DynamicCache starts from one)
    Reshape(Transpose(Reshape(x, [-1, T, D]), [0, 2, 1]), [B, H, D, T])
                       -> Transpose(x, [0, 1, 3, 2])
                                 (x: [B, H, T, D]; torch.onnx.export's default exporter transposes an attention's
                                 keys so, through the batch and heads merged into one dim; the shapes before and
                                 after are checked, so the rewrite is exact)

A node whose output is a graph output is kept, so the model's output names
do not change.
"""

from __future__ import annotations

import numpy as np

from ...ir.infer import empty_concat_inputs
from ..pattern import Any, P
from ..rewrite import Match, Rule, RuleSet


def _passes_through(m: Match) -> bool:
    node = m.root
    if node.output.is_graph_output if len(node.outputs) == 1 else node.outputs[0].is_graph_output:
        return False
    if node.op_type == "Dropout":
        training = node.input(2)
        if training is not None and (training.const is None or bool(training.const)):
            return False
        if len(node.outputs) > 1 and (node.outputs[1].uses or node.outputs[1].is_graph_output):
            return False
    return True


def _input(m: Match):
    return [m["x"]] + [None] * (len(m.root.outputs) - 1)


def _has_empty_input(node) -> bool:
    empty = empty_concat_inputs(node)
    return any(empty) and not all(empty)


def _without_empty_inputs(m: Match):
    node = m.root
    kept = [v for v, empty in zip(node.inputs, empty_concat_inputs(node)) if not empty]
    if len(kept) == 1:
        return kept[0] if kept[0].dtype == node.output.dtype else False
    return m.graph.make_node("Concat", kept, dict(node.attrs), name=node.name, before=node).output


def _pads_nothing(m: Match) -> bool:
    pads = m.root.input(1)
    return pads is not None and pads.const is not None and not np.asarray(pads.const).any() \
        and _passes_through(m)


def _merged_transpose(m: Match) -> bool:
    """The two Reshapes only merge x's first two dims and split them again, around a swap of the last two."""
    x, merged, out = m["x"], m["merged"].output, m.root.output
    if any(v.shape is None for v in (x, merged, out)) or len(x.shape) != 4 or len(merged.shape) != 3:
        return False
    batch, heads, tokens, dim = x.shape
    return (isinstance(tokens, int) and isinstance(dim, int) and tuple(merged.shape[1:]) == (tokens, dim)
            and list(m["swapped"].attrs.get("perm", [])) == [0, 2, 1]
            and tuple(out.shape) == (batch, heads, dim, tokens) and not out.is_graph_output)


def _transposed(m: Match):
    node = m.root
    return m.graph.make_node("Transpose", [m["x"]], {"perm": [0, 1, 3, 2]}, name=node.name, before=node).output


rules = RuleSet([
    Rule("drop_zero_pad", P("Pad"), lambda m: m.root.input(0), where=_pads_nothing),
    Rule("drop_empty_concat_inputs", P("Concat"), _without_empty_inputs, precheck=_has_empty_input),
    Rule("drop_identity", P("Identity", Any("x")), lambda m: m["x"], where=_passes_through),
    Rule("drop_eval_dropout", P("Dropout", Any("x")), _input, where=_passes_through),
    Rule("transpose_without_merging", P("Reshape", P("Transpose", P("Reshape", Any("x"), name="merged"),
                                                    name="swapped")),
         _transposed, where=_merged_transpose),
])
