"""The pattern language (P, Any, Const, |, Opt, captures) and the rewrite engine (Rule, RuleSet, explain).

Graphs are built by hand with `lowbit.ir.Graph` so every test knows exactly
which nodes exist, which values feed which, and what a match must bind.
"""

import time

import numpy as np
import pytest

import lowbit
from lowbit.ir.graph import Graph
from lowbit.patterns import Any, Const, Opt, P, Rule, RuleSet, explain
from lowbit.patterns.pattern import NO_TRACE, Trace


# -- helpers -------------------------------------------------------------------

def _graph(name="t"):
    g = Graph(name)
    x = g.add_input("x", "float32", (1, 3, 8, 8))
    return g, x


def _conv(g, x, name="conv", bias=True, **attrs):
    w = g.add_constant(f"{name}.w", np.ones((3, 3, 1, 1), np.float32))
    ins = [x, w]
    if bias:
        ins.append(g.add_constant(f"{name}.b", np.zeros(3, np.float32)))
    return g.make_node("Conv", ins, {"kernel_shape": [1, 1], **attrs}, name=name)


def _first(pattern, value):
    """The first bindings `pattern` yields on `value` (or None)."""
    return next(iter(pattern.match(value, {}, NO_TRACE)), None)


def _rule(pattern, name="r", replace=lambda m: None, **kw):
    return Rule(name, pattern, replace, **kw)


def _match(pattern, graph, node):
    return _rule(pattern).match(graph, node)


def _ops(graph):
    return [n.op_type for n in graph]


# -- P: op names, op sets, attributes, predicates, inputs ---------------------

def test_p_matches_its_op_name_and_nothing_else():
    g, x = _graph()
    relu = g.make_node("Relu", [x], name="relu")
    sig = g.make_node("Sigmoid", [relu.output], name="sig")
    assert _match(P("Relu"), g, relu) is not None
    assert _match(P("Relu"), g, sig) is None
    assert _match(P("Sigmoid"), g, sig).root is sig


def test_p_with_an_op_set_matches_each_member():
    g, x = _graph()
    relu = g.make_node("Relu", [x], name="relu")
    clip = g.make_node("Clip", [relu.output], name="clip")
    tanh = g.make_node("Tanh", [clip.output], name="tanh")
    pattern = P({"Relu", "Clip"})
    assert _match(pattern, g, relu) is not None
    assert _match(pattern, g, clip) is not None
    assert _match(pattern, g, tanh) is None
    assert _rule(pattern).root_ops == frozenset({"Relu", "Clip"})


def test_attribute_constraints_by_value_by_default_and_by_predicate():
    g, x = _graph()
    plain = _conv(g, x, "plain")                       # no "group" attribute: ONNX default 1
    grouped = _conv(g, plain.output, "grouped", group=3)
    strided = _conv(g, grouped.output, "strided", strides=[2, 2])
    assert _match(P("Conv", attrs={"group": 1}), g, plain) is not None
    assert _match(P("Conv", attrs={"group": 1}), g, grouped) is None
    assert _match(P("Conv", attrs={"group": 3}), g, grouped) is not None
    two = P("Conv", attrs={"strides": lambda s: s is not None and list(s) == [2, 2]})
    assert [n.name for n in g if _match(two, g, n)] == ["strided"]


def test_where_predicate_is_a_last_test_on_the_node():
    g, x = _graph()
    a = g.make_node("Relu", [x], name="a")
    b = g.make_node("Relu", [a.output], name="b")
    p = P("Relu", where=lambda node: node.name == "b")
    assert _match(p, g, a) is None
    assert _match(p, g, b) is not None


def test_inputs_match_a_prefix_and_extra_inputs_are_free():
    g, x = _graph()
    conv = _conv(g, x)                                  # Conv(x, w, b)
    assert _match(P("Conv"), g, conv) is not None      # no input patterns: all free
    m = _match(P("Conv", Any("x")), g, conv)
    assert m["x"] is x
    m = _match(P("Conv", Any("x"), Const("w")), g, conv)
    assert m["w"].name == "conv.w"
    assert _match(P("Conv", Any(), Any(), Any(), Const()), g, conv) is None   # a 4th input it does not have


def test_any_matches_an_input_constant_or_omitted_input_and_const_only_constants():
    g, x = _graph()
    c = g.add_constant("c", np.float32(2.0))
    mul = g.make_node("Mul", [x, c], name="mul")
    clip = g.make_node("Clip", [mul.output, None, c], name="clip")   # omitted min
    assert _first(Any("v"), x) == {"v": x}
    assert _first(Const("k"), c) == {"k": c}
    assert _first(Const(), x) is None                   # a graph input is not a constant
    assert _first(Const(), mul.output) is None          # nor is a node output
    m = _match(P("Clip", Any("v"), Any("lo"), Const("hi")), g, clip)
    assert m["v"] is mul.output and m["lo"] is None and m["hi"] is c
    assert _match(P("Clip", Any(), Const(), Const()), g, clip) is None


def test_any_matches_a_trailing_omitted_optional_input():
    g, x = _graph()
    conv = _conv(g, x, bias=False)                      # Conv(x, w): the bias is omitted
    m = _match(P("Conv", Any("x"), Const("w"), Any("b")), g, conv)
    assert m is not None, "Any() matches an omitted input, including one left off the end"
    assert m["b"] is None


def test_const_predicate_is_applied_to_the_array():
    g, x = _graph()
    half = g.add_constant("half", np.float32(0.5))
    vec = g.add_constant("vec", np.ones(3, np.float32))
    scalar = Const("s", where=lambda a: a.ndim == 0)
    assert _first(scalar, half) == {"s": half}
    assert _first(scalar, vec) is None


# -- captures -----------------------------------------------------------------

def _swish_graph(same: bool):
    g, x = _graph()
    y = g.add_input("y", "float32", (1, 3, 8, 8))
    sig = g.make_node("Sigmoid", [x if same else y], name="sig")
    mul = g.make_node("Mul", [x, sig.output], name="mul")
    g.outputs.append(mul.output)
    return g, mul


def test_a_capture_used_twice_must_bind_the_same_value():
    swish = P("Mul", Any("x"), P("Sigmoid", Any("x"), name="gate"), name="mul")
    g, mul = _swish_graph(same=True)
    m = _match(swish, g, mul)
    assert m is not None
    assert m["x"] is g.inputs[0] and m["gate"].name == "sig" and m["mul"] is mul
    assert [n.name for n in m.nodes] == ["mul", "sig"]
    g, mul = _swish_graph(same=False)                   # x * sigmoid(y)
    assert _match(swish, g, mul) is None


# -- commutative ops ----------------------------------------------------------

@pytest.mark.parametrize("op", ["Add", "Mul"])
@pytest.mark.parametrize("const_first", [False, True])
def test_commutative_ops_match_in_either_input_order(op, const_first):
    g, x = _graph()
    c = g.add_constant("c", np.float32(1.0))
    node = g.make_node(op, [c, x] if const_first else [x, c], name="n")
    m = _match(P(op, Any("x"), Const("c")), g, node)
    assert m is not None
    assert m["x"] is x and m["c"] is c


def test_sub_is_not_commutative():
    g, x = _graph()
    c = g.add_constant("c", np.float32(1.0))
    x_minus_c = g.make_node("Sub", [x, c], name="x_minus_c")
    c_minus_x = g.make_node("Sub", [c, x_minus_c.output], name="c_minus_x")
    p = P("Sub", Any("x"), Const("c"))
    assert _match(p, g, x_minus_c) is not None
    assert _match(p, g, c_minus_x) is None


# -- alternatives and optional nodes ------------------------------------------

def test_alternatives_are_tried_in_order():
    g, x = _graph()
    conv = _conv(g, x)
    relu = g.make_node("Relu", [conv.output], name="relu")
    m = _match(P("Relu", P("Conv", name="a") | P({"Conv", "Gemm"}, name="b")), g, relu)
    assert "a" in m and "b" not in m
    m = _match(P("Relu", P("Gemm", name="a") | P({"Conv", "Gemm"}, name="b")), g, relu)
    assert "a" not in m and m["b"] is conv


def test_alternatives_backtrack_when_a_later_capture_conflicts():
    # Mul(r, Sigmoid(r)) with r = Relu(a): the first alternative binds x=a and then fails on Sigmoid(r);
    # the second alternative binds x=r and succeeds.
    g, x = _graph()
    r = g.make_node("Relu", [x], name="r")
    sig = g.make_node("Sigmoid", [r.output], name="sig")
    mul = g.make_node("Mul", [r.output, sig.output], name="mul")
    p = P("Mul", P("Relu", Any("x"), name="relu") | Any("x"), P("Sigmoid", Any("x")))
    m = _match(p, g, mul)
    assert m is not None and "relu" not in m
    assert m["x"] is r.output


def _act_after_conv(with_add: bool, add_const: bool = True):
    g, x = _graph()
    conv = _conv(g, x)
    v = conv.output
    if with_add:
        other = g.add_constant("bias", np.ones((1, 3, 1, 1), np.float32)) if add_const else g.add_input(
            "y", "float32", (1, 3, 8, 8))
        v = g.make_node("Add", [v, other], name="add").output
    relu = g.make_node("Relu", [v], name="relu")
    g.outputs.append(relu.output)
    return g, relu


OPT_PATTERN = P("Relu", Opt(P("Add", P("Conv", name="conv"), Const("bias"), name="add")), name="act")


def test_opt_matches_without_the_optional_node():
    g, relu = _act_after_conv(with_add=False)
    m = _match(OPT_PATTERN, g, relu)
    assert m is not None
    assert "add" not in m and "bias" not in m
    assert [n.op_type for n in m.nodes] == ["Relu", "Conv"]


def test_opt_matches_with_the_optional_node():
    g, relu = _act_after_conv(with_add=True)
    m = _match(OPT_PATTERN, g, relu)
    assert m is not None
    assert m["add"].op_type == "Add" and m["bias"].name == "bias"
    assert [n.op_type for n in m.nodes] == ["Relu", "Add", "Conv"]


def test_opt_does_not_skip_a_node_that_fails_its_pattern():
    g, relu = _act_after_conv(with_add=True, add_const=False)   # Add(conv, graph input): not a bias add
    assert _match(OPT_PATTERN, g, relu) is None


def test_opt_needs_a_p_with_inputs():
    with pytest.raises(TypeError):
        Opt(P("Relu"))


# -- interior uses ---------------------------------------------------------------

def test_an_interior_node_used_outside_the_match_is_rejected():
    g, x = _graph()
    conv = _conv(g, x)
    relu = g.make_node("Relu", [conv.output], name="relu")
    neg = g.make_node("Neg", [conv.output], name="neg")      # a second user of the Conv output
    g.outputs += [relu.output, neg.output]
    assert _match(P("Relu", P("Conv")), g, relu) is None
    # the same structure is found once the interior check is off
    assert Rule("r", P("Relu", P("Conv")), lambda m: None, check_interior=False).match(g, relu) is not None


def test_an_interior_value_that_is_a_graph_output_is_rejected():
    g, x = _graph()
    conv = _conv(g, x)
    relu = g.make_node("Relu", [conv.output], name="relu")
    g.outputs += [conv.output, relu.output]
    assert _match(P("Relu", P("Conv")), g, relu) is None


def test_match_at_reads_a_pattern_without_a_rule_and_keeps_the_interior_check():
    from lowbit.patterns import match_at

    g, x = _graph()
    conv = _conv(g, x)
    relu = g.make_node("Relu", [conv.output], name="relu")
    g.outputs.append(relu.output)
    found = match_at(P("Relu", P("Conv", Any("x"), Const("w"), name="conv")), relu)
    assert found["conv"] is conv and found["x"] is x and found["w"].const.shape == (3, 3, 1, 1)
    assert match_at(P("Relu", P("Gemm")), relu) is None
    g.outputs.append(conv.output)  # the Conv's output now leaves the match: a writer must not fuse it away
    assert match_at(P("Relu", P("Conv")), relu) is None


def test_a_root_with_outside_users_still_matches():
    g, x = _graph()
    conv = _conv(g, x)
    relu = g.make_node("Relu", [conv.output], name="relu")
    a = g.make_node("Neg", [relu.output], name="a")
    b = g.make_node("Abs", [relu.output], name="b")
    g.outputs += [relu.output, a.output, b.output]
    m = _match(P("Relu", P("Conv", name="conv")), g, relu)
    assert m is not None and m["conv"] is conv


def test_fold_bn_leaves_a_conv_with_another_consumer_alone():
    from lowbit.patterns.library.bn_folding import rules

    g, x = _graph()
    conv = _conv(g, x)
    consts = [g.add_constant(n, np.full(3, v, np.float32)) for n, v in
              (("gamma", 2.0), ("beta", 0.5), ("mean", 0.1), ("var", 1.0))]
    bn = g.make_node("BatchNormalization", [conv.output, *consts], name="bn")
    relu = g.make_node("Relu", [conv.output], name="relu")
    g.outputs += [bn.output, relu.output]
    assert rules.apply(g) == {}
    assert _ops(g) == ["Conv", "BatchNormalization", "Relu"]
    assert "fold_bn_conv" in explain(g, rules.rules[0]) and "is also used by Relu 'relu'" in explain(g, rules.rules[0])


# -- rules: replacement ----------------------------------------------------------

def _swish_rule(**kw):
    return Rule("swish", P("Mul", Any("x"), P("Sigmoid", Any("x"))), lambda m: m.op("Swish", [m["x"]]), **kw)


def test_a_returned_value_replaces_the_root_and_dead_matched_nodes_are_removed():
    g, x = _graph()
    sig = g.make_node("Sigmoid", [x], name="sig")
    mul = g.make_node("Mul", [sig.output, x], name="mul")    # sigmoid(x) * x: either order
    neg = g.make_node("Neg", [mul.output], name="neg")
    g.outputs += [mul.output, neg.output]
    fired = RuleSet([_swish_rule()]).apply(g)
    assert fired == {"swish": 1}
    g.verify()
    assert _ops(g) == ["Swish", "Neg"]
    swish = g.nodes[0]
    assert swish.inputs == (x,) and swish.meta["rule"] == "swish"
    assert neg.inputs == (swish.output,)
    assert g.outputs[0] is swish.output                # the graph output follows the replacement
    assert [v.name for v in g.outputs] == ["mul", "neg"]  # ... and keeps its name
    assert sig.graph is None and mul.graph is None


def test_returning_false_declines_and_leaves_the_graph_unchanged():
    g, mul = _swish_graph(same=True)
    before = str(g)
    fired = RuleSet([Rule("nope", P("Mul", Any("x"), P("Sigmoid", Any("x"))), lambda m: False)]).apply(g)
    assert fired == {}
    assert str(g) == before
    g.verify()


def test_a_rule_where_rejects_a_structural_match():
    g, mul = _swish_graph(same=True)
    rule = _swish_rule(where=lambda m: m["x"].name != "x")
    assert rule.match(g, mul) is None
    assert RuleSet([rule]).apply(g) == {}
    assert "its where() rejected the match at 'mul'" in explain(g, rule)


def test_a_rule_root_must_be_a_p():
    with pytest.raises(TypeError, match="root of a rule's pattern must be a P"):
        Rule("bad", Any("x"), lambda m: None)


# -- rule sets ------------------------------------------------------------------

def test_rules_for_returns_only_the_rules_indexed_under_the_node_op():
    relu_a = _rule(P("Relu"), "relu_a")
    act = _rule(P({"Relu", "Clip"}), "act")
    add = _rule(P("Add"), "add")
    rs = RuleSet([relu_a, act, add])
    g, x = _graph()
    relu = g.make_node("Relu", [x], name="relu")
    clip = g.make_node("Clip", [relu.output], name="clip")
    add_n = g.make_node("Add", [clip.output, x], name="add")
    tanh = g.make_node("Tanh", [add_n.output], name="tanh")
    assert rs.rules_for(relu) == [relu_a, act]
    assert rs.rules_for(clip) == [act]
    assert rs.rules_for(add_n) == [add]
    assert rs.rules_for(tanh) == []


def test_the_engine_only_tries_a_rule_on_nodes_of_its_root_op():
    seen = []
    rule = Rule("relu", P("Relu", where=lambda n: seen.append(n.op_type) or False), lambda m: None)
    g, x = _graph()
    v = x
    for op in ["Relu", "Sigmoid", "Tanh", "Relu", "Abs"]:
        v = g.make_node(op, [v]).output
    RuleSet([rule]).apply_once(g)
    assert seen == ["Relu", "Relu"]


def test_rule_sets_compose_with_plus_in_order():
    a, b, c = _rule(P("Relu"), "a"), _rule(P("Relu"), "b"), _rule(P("Add"), "c")
    ab = RuleSet([a]) + RuleSet([b])
    abc = ab + [c]
    assert isinstance(abc, RuleSet)
    assert [r.name for r in abc] == ["a", "b", "c"] and len(abc) == 3
    g, x = _graph()
    relu = g.make_node("Relu", [x])
    assert abc.rules_for(relu) == [a, b]
    assert len(ab) == 2                                 # + makes a new set


def test_quick_reject_looks_at_the_ops_producing_the_inputs():
    g, x = _graph()
    conv = _conv(g, x)
    after_conv = g.make_node("Relu", [conv.output], name="after_conv")
    sig = g.make_node("Sigmoid", [after_conv.output], name="sig")
    after_sig = g.make_node("Relu", [sig.output], name="after_sig")
    on_input = g.make_node("Relu", [x], name="on_input")
    rule = _rule(P("Relu", P("Conv")))
    assert rule.quick_reject(after_conv) is False
    assert rule.quick_reject(after_sig) is True
    assert rule.quick_reject(on_input) is True
    # inputs matched by Any/Const are never grounds for a quick reject
    assert _rule(P("Relu", Any())).quick_reject(on_input) is False


def test_quick_reject_of_a_commutative_root_accepts_either_order():
    g, x = _graph()
    conv = _conv(g, x)
    c = g.add_constant("c", np.float32(1.0))
    conv_first = g.make_node("Add", [conv.output, c], name="conv_first")
    conv_second = g.make_node("Add", [c, conv.output], name="conv_second")
    no_conv = g.make_node("Add", [x, c], name="no_conv")
    rule = _rule(P("Add", P("Conv"), Const()))
    assert rule.quick_reject(conv_first) is False
    assert rule.quick_reject(conv_second) is False
    assert rule.quick_reject(no_conv) is True


def test_quick_reject_keeps_the_root_predicate_from_running():
    seen = []
    rule = Rule("conv_relu", P("Relu", P("Conv"), where=lambda n: seen.append(n.name) or True), lambda m: None)
    g, x = _graph()
    conv = _conv(g, x)
    g.make_node("Relu", [conv.output], name="ok")
    sig = g.make_node("Sigmoid", [x], name="sig")
    g.make_node("Relu", [sig.output], name="rejected")
    RuleSet([rule]).apply_once(g)
    assert seen == ["ok"]


# -- loop guard -------------------------------------------------------------------

def test_a_rule_that_never_converges_raises_rule_loop_error_naming_it():
    g, x = _graph()
    g.outputs.append(g.make_node("Relu", [x], name="relu").output)
    forever = Rule("relu_forever", P("Relu", Any("x")), lambda m: m.op("Relu", [m["x"]]))
    with pytest.raises(lowbit.RuleLoopError, match=r"after 5 sweeps.*relu_forever \(1 times in the last sweep\)"):
        RuleSet([forever]).apply(g, max_rounds=5)
    with pytest.raises(lowbit.LowbitError, match="relu_forever"):
        RuleSet([forever]).apply(g)


def test_rules_that_converge_report_the_total_per_rule():
    g, x = _graph()
    v = x
    for i in range(3):
        v = g.make_node("Identity", [v], name=f"id{i}").output
    g.outputs.append(g.make_node("Relu", [v], name="relu").output)
    fired = RuleSet([Rule("drop", P("Identity", Any("x")), lambda m: m["x"])]).apply(g)
    assert fired == {"drop": 3}
    assert _ops(g) == ["Relu"] and g.nodes[0].inputs == (x,)


# -- explain ---------------------------------------------------------------------

def _conv_sig_relu():
    g, x = _graph()
    conv = _conv(g, x)
    sig = g.make_node("Sigmoid", [conv.output], name="sig")
    relu = g.make_node("Relu", [sig.output], name="relu")
    g.outputs.append(relu.output)
    return g


def test_explain_when_the_graph_has_no_node_of_the_root_type():
    g = _conv_sig_relu()
    assert explain(g, _rule(P("Gemm"), "gemm")) == (
        "rule 'gemm' needs a root of type Gemm, and the graph has none (it has: Conv, Relu, Sigmoid)")


def test_explain_names_the_closest_node_and_the_failing_part():
    g = _conv_sig_relu()
    assert explain(g, _rule(P("Relu", P("Conv")), "conv_relu")) == (
        "rule 'conv_relu' came closest at Relu 'relu': matched 1 of 2 pattern nodes (Relu 'relu'); "
        "then expected Conv, got Sigmoid ('sig')")


def test_explain_picks_the_candidate_that_got_furthest():
    g, x = _graph()
    a = g.make_node("Relu", [x], name="a")                       # fails at once
    conv = _conv(g, a.output)
    tanh = g.make_node("Tanh", [conv.output], name="tanh")
    b = g.make_node("Relu", [tanh.output], name="b")             # gets two nodes deep
    g.outputs.append(b.output)
    rule = _rule(P("Relu", P("Tanh", P("Gemm"))), "relu_tanh_gemm")
    assert explain(g, rule) == (
        "rule 'relu_tanh_gemm' came closest at Relu 'b': matched 2 of 3 pattern nodes (Relu 'b' -> Tanh 'tanh'); "
        "then expected Gemm, got Conv ('conv')")


def test_explain_says_when_the_rule_matches():
    g = _conv_sig_relu()
    assert explain(g, _rule(P("Relu", P("Sigmoid", P("Conv"))), "chain")) == "rule 'chain' matches at Relu 'relu'"


def test_explain_reports_a_rejection_because_of_an_outside_use():
    g = _conv_sig_relu()
    g.outputs.append(g.make_node("Neg", [g.find_node("sig").output], name="neg").output)
    assert explain(g, _rule(P("Relu", P("Sigmoid", name="s")), "sig_relu")) == (
        "rule 'sig_relu' came closest at Relu 'relu': matched 2 of 2 pattern nodes (Relu 'relu' -> Sigmoid 'sig'); "
        "then the match would split a shared value: Sigmoid 'sig' is also used by Neg 'neg' outside the match")


def test_a_disabled_trace_records_nothing():
    g = _conv_sig_relu()
    trace = Trace(enabled=False)
    assert list(P("Relu", P("Conv")).match_node(g.find_node("relu"), {}, trace)) == []
    assert trace.best_reason == "" and trace.best_path == []


# -- scale ------------------------------------------------------------------------

def test_fusion_rules_on_a_20k_node_chain_take_linear_time():
    from lowbit.passes.fuse import fusion_groups, fusion_rules

    g = Graph("chain")
    v = g.add_input("x", "float32", (1, 4))
    w = g.add_constant("w", np.ones((4, 4), np.float32))
    b = g.add_constant("b", np.zeros(4, np.float32))
    for i in range(10_000):
        v = g.make_node("Gemm", [v, w, b], {"transB": 1}, name=f"fc{i}").output
        v = g.make_node("Relu", [v], name=f"relu{i}").output
    g.outputs.append(v)
    assert len(g) == 20_000
    start = time.perf_counter()
    fired = fusion_rules().apply(g, reverse=True)
    seconds = time.perf_counter() - start
    assert fired == {"linear_bn_act": 10_000}
    assert len(fusion_groups(g)) == 10_000
    assert seconds < 10, f"fusion over 20k nodes took {seconds:.1f} s: quadratic somewhere?"
