"""Drop ops that compute nothing at inference: Identity, and Dropout in eval mode.

    Identity(x)        -> x
    Dropout(x)         -> x      (no training_mode input set to true, mask output unused)

A node whose output is a graph output is kept, so the model's output names
do not change.
"""

from __future__ import annotations

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


rules = RuleSet([
    Rule("drop_identity", P("Identity", Any("x")), lambda m: m["x"], where=_passes_through),
    Rule("drop_eval_dropout", P("Dropout", Any("x")), _input, where=_passes_through),
])
