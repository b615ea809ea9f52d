"""The Graph mutation API keeps use-def chains true, and verify() catches every broken fact.

Each test builds a small graph with `lowbit.ir.Graph`, changes it through the
mutation API (`make_node` with `before`/`after`, `set_input`,
`replace_all_uses`, `remove`, `remove_unused_constants`, `sort`, `copy`) and
checks the exact `(node, input index)` use lists, the node order and the text
form. The verify() tests corrupt the internals directly, one broken fact at a
time, and check that the error names the node or value at fault.
"""

import time

import numpy as np
import pytest

import lowbit
from lowbit import GraphError
from lowbit.ir import Graph, Node, Value, print_graph


def _names(graph):
    return [n.name for n in graph.nodes]


def _typed(node, shape=("batch", 4)):
    for v in node.outputs:
        v.dtype, v.shape = "float32", shape
    return node


def _diamond():
    """x -> a = Relu(x) -> b = Add(a, a), c = Sigmoid(a); outputs [b, c]."""
    g = Graph("diamond")
    x = g.add_input("x", "float32", ("batch", 4))
    a = _typed(g.make_node("Relu", [x], name="a", output_names=["a_out"]))
    b = _typed(g.make_node("Add", [a.output, a.output], name="b", output_names=["b_out"]))
    c = _typed(g.make_node("Sigmoid", [a.output], name="c", output_names=["c_out"]))
    g.outputs = [b.output, c.output]
    g.verify()
    return g, x, a, b, c


# -- building ---------------------------------------------------------------------

def test_make_node_appends_and_inserts_before_and_after():
    g = Graph("order")
    x = g.add_input("x", "float32", (2,))
    a = g.make_node("Relu", [x], name="a")
    c = g.make_node("Relu", [x], name="c")
    b = g.make_node("Relu", [x], name="b", before=c)
    d = g.make_node("Relu", [x], name="d", after=c)  # after the tail: becomes the tail
    head = g.make_node("Relu", [x], name="head", before=a)  # before the head: becomes the head
    mid = g.make_node("Relu", [x], name="mid", after=a)
    tail = g.make_node("Relu", [x], name="tail")  # appended after d
    assert _names(g) == ["head", "a", "mid", "b", "c", "d", "tail"]
    assert [n.name for n in g] == _names(g)
    assert len(g) == 7
    assert all(n.graph is g for n in (a, b, c, d, head, mid, tail))
    assert x.uses == [(n, 0) for n in (a, c, b, d, head, mid, tail)]  # in the order they were made
    g.verify()


def test_inserting_relative_to_a_node_of_another_graph_is_refused():
    g, other = Graph("g"), Graph("other")
    x = g.add_input("x", "float32", (2,))
    stranger = other.make_node("Relu", [other.add_input("y", "float32", (2,))], name="stranger")
    with pytest.raises(GraphError, match=r"'stranger'.*not in graph 'g'"):
        g.make_node("Relu", [x], before=stranger)
    with pytest.raises(GraphError, match="already in a graph"):
        g.append(stranger)
    assert len(g) == 0 and x.uses == []


def test_unique_name_avoids_clashes_among_values_and_among_nodes():
    g = Graph("names")
    x = g.add_input("x", "float32", (2,))
    w = g.add_constant("w", np.zeros(2, np.float32))
    w2 = g.add_constant("w", np.ones(2, np.float32))
    assert w.name == "w" and w2.name != "w" and set(g.constants) == {w.name, w2.name}
    r1 = g.make_node("Relu", [x], name="x")  # node names and value names are separate namespaces
    r2 = g.make_node("Relu", [x])
    r3 = g.make_node("Relu", [x], name=r2.name)
    nodes = [n.name for n in (r1, r2, r3)]
    values = [x.name, w.name, w2.name] + [n.output.name for n in (r1, r2, r3)]
    assert len(set(nodes)) == 3, nodes
    assert len(set(values)) == 6, values
    assert r1.output.name != "x" and r1.output.name.startswith("x")
    fresh = {g.unique_name("relu") for _ in range(50)}
    assert len(fresh) == 50 and not fresh & set(values)
    fresh_nodes = {g.unique_name("relu", node=True) for _ in range(50)}
    assert len(fresh_nodes) == 50 and not fresh_nodes & set(nodes)
    assert g.unique_name("") not in ("", *values)
    g.verify()


def test_make_node_records_one_use_per_input_slot():
    g = Graph("uses")
    x = g.add_input("x", "float32", (2,))
    y = g.add_input("y", "float32", (2,))
    sq = g.make_node("Mul", [x, x], name="sq")
    n = g.make_node("Where", [y, None, sq.output], name="n")
    assert x.uses == [(sq, 0), (sq, 1)]
    assert x.users == [sq]
    assert y.uses == [(n, 0)]
    assert sq.output.uses == [(n, 2)]
    assert n.inputs == (y, None, sq.output)
    assert sq.output.producer is sq and sq.output.index == 0
    assert sq.successors == [n] and n.predecessors == [sq]
    g.verify()


def test_make_node_multi_output_names_and_indices():
    g = Graph("multi")
    x = g.add_input("x", "float32", (4,))
    split = g.make_node("Split", [x], {"axis": 0}, num_outputs=3, name="split")
    assert len(split.outputs) == 3
    assert [v.index for v in split.outputs] == [0, 1, 2]
    assert all(v.producer is split for v in split.outputs)
    assert len({v.name for v in split.outputs} | {split.name, x.name}) == 5
    with pytest.raises(GraphError, match="split"):
        split.output  # three outputs, not one


# -- set_input / replace_all_uses ----------------------------------------------------

def test_set_input_moves_exactly_one_use():
    g = Graph("set_input")
    x = g.add_input("x", "float32", (2,))
    y = g.add_input("y", "float32", (2,))
    n = g.make_node("Add", [x, y], name="n")
    n.set_input(1, x)
    assert y.uses == [] and x.uses == [(n, 0), (n, 1)]
    n.set_input(1, x)  # the same value again: no duplicate use
    assert x.uses == [(n, 0), (n, 1)]
    n.set_input(0, None)
    assert n.inputs == (None, x) and x.uses == [(n, 1)]
    n.set_input(0, y)
    assert y.uses == [(n, 0)] and x.uses == [(n, 1)]
    n.append_input(y)
    assert n.inputs == (y, x, y) and y.uses == [(n, 0), (n, 2)]
    g.verify()


def test_replace_all_uses_updates_uses_and_graph_outputs():
    g, x, a, b, c = _diamond()
    g.outputs = [a.output, b.output, a.output]
    t = _typed(g.make_node("Tanh", [x], name="t", output_names=["t_out"], after=a))
    g.replace_all_uses(a.output, t.output)
    assert a.output.uses == []
    assert t.output.uses == [(b, 0), (b, 1), (c, 0)]
    assert b.inputs == (t.output, t.output) and c.inputs == (t.output,)
    assert g.outputs == [t.output, b.output, t.output]
    assert not a.output.is_graph_output and t.output.is_graph_output
    g.verify()
    g.remove(a)  # now unused
    assert x.uses == [(t, 0)]
    g.verify()


def test_replace_all_uses_without_outputs_leaves_graph_outputs():
    g, x, a, b, c = _diamond()
    g.outputs = [a.output, b.output]
    t = g.make_node("Tanh", [x], name="t", output_names=["t_out"], after=a)
    g.replace_all_uses(a.output, t.output, outputs=False)
    assert a.output.uses == [] and t.output.uses == [(b, 0), (b, 1), (c, 0)]
    assert g.outputs == [a.output, b.output]
    g.verify()
    with pytest.raises(GraphError, match=r"cannot remove node 'a'.*'a_out'.*graph outputs"):
        g.remove(a)


# -- remove -------------------------------------------------------------------------

def test_remove_refuses_a_node_whose_outputs_are_used_and_names_the_users():
    g, x, a, b, c = _diamond()
    before = print_graph(g)
    with pytest.raises(GraphError, match=r"cannot remove node 'a': its output 'a_out' is used by b, c"):
        g.remove(a)
    with pytest.raises(GraphError, match=r"cannot remove node 'b': its output 'b_out' is used by the graph outputs"):
        g.remove(b)
    assert print_graph(g) == before and len(g) == 3
    assert x.uses == [(a, 0)] and a.output.uses == [(b, 0), (b, 1), (c, 0)]
    g.verify()


@pytest.mark.parametrize("position", ["head", "middle", "tail"])
def test_removing_an_unused_node_updates_its_inputs_uses(position):
    g = Graph("remove")
    x = g.add_input("x", "float32", (2,))
    w = g.add_constant("w", np.ones(2, np.float32))
    keep1 = g.make_node("Relu", [x], name="keep1")
    keep2 = g.make_node("Add", [keep1.output, w], name="keep2")
    g.outputs = [keep2.output]
    anchor = {"head": dict(before=keep1), "middle": dict(after=keep1), "tail": dict(after=keep2)}[position]
    dead = g.make_node("Mul", [x, w], name="dead", **anchor)
    assert x.uses == [(keep1, 0), (dead, 0)] and w.uses == [(keep2, 1), (dead, 1)]
    g.remove(dead)
    assert x.uses == [(keep1, 0)] and w.uses == [(keep2, 1)]
    assert _names(g) == ["keep1", "keep2"] and len(g) == 2 and dead.graph is None
    g.verify()
    with pytest.raises(GraphError, match=r"'dead'.*not in graph"):
        g.remove(dead)
    # the list is still linked both ways: inserting at both ends works
    g.make_node("Relu", [x], name="first", before=keep1)
    g.make_node("Relu", [x], name="last", after=keep2)
    assert _names(g) == ["first", "keep1", "keep2", "last"]
    g.verify()


def test_remove_all_nodes_then_rebuild():
    g, x, a, b, c = _diamond()
    g.outputs = []
    for n in (c, b, a):
        g.remove(n)
    assert len(g) == 0 and g.nodes == [] and x.uses == []
    g.verify()
    r = g.make_node("Relu", [x], name="r")
    assert _names(g) == ["r"] and x.uses == [(r, 0)]
    g.verify()


def test_remove_unused_constants():
    g = Graph("consts")
    x = g.add_input("x", "float32", (2,))
    used = g.add_constant("used", np.ones(2, np.float32))
    g.add_constant("unused", np.zeros(2, np.float32))
    out = g.add_constant("as_output", np.full(2, 3.0, np.float32))
    n = g.make_node("Add", [x, used], name="n")
    g.outputs = [n.output, out]
    assert g.remove_unused_constants() == 1
    assert set(g.constants) == {"used", "as_output"}
    g.outputs = [out]
    g.remove(n)
    assert used.uses == []
    assert g.remove_unused_constants() == 1
    assert set(g.constants) == {"as_output"}
    assert g.remove_unused_constants() == 0
    g.verify()


# -- verify -------------------------------------------------------------------------

def test_verify_accepts_well_formed_graphs():
    g, *_ = _diamond()
    g.verify()
    Graph("empty").verify()


def test_verify_catches_an_input_produced_by_a_later_node_and_sort_repairs_it():
    g = Graph("order")
    x = g.add_input("x", "float32", (2,))
    early = Value("early", "float32", (2,))
    b = g.make_node("Relu", [early], name="b")  # appended first, but reads a value made later
    a = g.make_node("Neg", [x], name="a", outputs=[early])
    g.outputs = [b.output]
    with pytest.raises(GraphError, match=r"node 'b' \(Relu\) input 0 'early' is defined by a later node"):
        g.verify()
    g.sort()
    assert _names(g) == ["a", "b"]
    assert early.uses == [(b, 0)] and x.uses == [(a, 0)]
    g.verify()


def test_verify_catches_an_input_defined_nowhere_in_the_graph():
    g = Graph("g")
    other = Graph("other")
    y = other.add_input("y", "float32", (2,))
    g.make_node("Relu", [y], name="r")
    with pytest.raises(GraphError, match=r"node 'r' \(Relu\) input 0 'y' is defined by nowhere in this graph"):
        g.verify()


def test_verify_catches_a_duplicate_value_name():
    g = Graph("dup")
    x = g.add_input("x", "float32", (2,))
    g.make_node("Relu", [x], name="r", outputs=[Value("x", "float32", (2,))])
    with pytest.raises(GraphError, match=r"value name 'x' is defined twice \(graph input and node 'r'\)"):
        g.verify()


def test_verify_catches_a_duplicate_name_between_a_constant_and_an_input():
    g = Graph("dup")
    g.add_input("w", "float32", (2,))
    g.add_constant("w", np.ones(2, np.float32), unique=False)
    with pytest.raises(GraphError, match=r"value name 'w' is defined twice"):
        g.verify()


def test_verify_catches_a_stale_use_entry():
    g, x, a, b, c = _diamond()
    x._uses.append((b, 0))  # b's input 0 is a_out, not x
    with pytest.raises(GraphError, match=r"value 'x' lists a stale use by node 'b' input 0"):
        g.verify()


def test_verify_catches_a_use_by_a_removed_node():
    g, x, a, b, c = _diamond()
    g.outputs = [b.output]
    g.remove(c)
    a.output._uses.append((c, 0))  # c still reads a_out, but it is no longer in the graph
    with pytest.raises(GraphError, match=r"value 'a_out' lists a stale use by node 'c' input 0"):
        g.verify()


def test_verify_catches_a_missing_use_entry():
    g, x, a, b, c = _diamond()
    a.output._uses.remove((c, 0))
    with pytest.raises(GraphError, match=r"value 'a_out' does not list node 'c' input 0 as a use"):
        g.verify()


def test_verify_catches_a_duplicated_use_entry():
    g, x, a, b, c = _diamond()
    x._uses.append((a, 0))  # listed twice: uses no longer match the inputs one to one
    with pytest.raises(GraphError, match=r"'x'.*node 'a' input 0"):
        g.verify()


def test_verify_catches_an_undefined_graph_output():
    g, *_ = _diamond()
    g.outputs.append(Value("ghost", "float32", (2,)))
    with pytest.raises(GraphError, match=r"graph output 'ghost' is not defined in the graph"):
        g.verify()


def test_verify_catches_a_wrong_producer():
    g, x, a, b, c = _diamond()
    b.output.index = 1
    with pytest.raises(GraphError, match=r"node 'b' output 0 'b_out' does not name the node as its producer"):
        g.verify()


def test_verify_catches_a_constant_without_data_or_under_another_name():
    g = Graph("c")
    w = g.add_constant("w", np.ones(2, np.float32))
    w.name = "renamed"
    with pytest.raises(GraphError, match=r"constant 'w'.*'renamed'"):
        g.verify()


# -- sort -----------------------------------------------------------------------------

def test_sort_keeps_a_valid_order_unchanged():
    g = Graph("stable")
    x = g.add_input("x", "float32", (2,))
    c = g.make_node("Relu", [x], name="c")  # independent branches in a non-alphabetical order
    a = g.make_node("Neg", [x], name="a")
    b = g.make_node("Add", [c.output, a.output], name="b")
    d = g.make_node("Tanh", [x], name="d")
    g.outputs = [b.output, d.output]
    before = print_graph(g)
    g.sort()
    assert _names(g) == ["c", "a", "b", "d"]
    assert print_graph(g) == before
    g.verify()


def test_sort_restores_topological_order_stably():
    g = Graph("sort")
    x = g.add_input("x", "float32", (2,))
    va, vb = Value("va"), Value("vb")
    c = g.append(Node("Relu", [vb], [Value("vc")], name="c"))
    e = g.append(Node("Neg", [x], [Value("ve")], name="e"))  # independent of the chain
    b = g.append(Node("Relu", [va], [vb], name="b"))
    a = g.append(Node("Relu", [x], [va], name="a"))
    g.outputs = [c.output, e.output]
    with pytest.raises(GraphError, match="later node"):
        g.verify()
    g.sort()
    # among the nodes ready at each step, the one that came first goes first
    assert _names(g) == ["e", "a", "b", "c"]
    assert len(g) == 4 and x.uses == [(e, 0), (a, 0)]
    g.verify()
    g.sort()
    assert _names(g) == ["e", "a", "b", "c"]


def test_sort_raises_on_a_cycle_naming_a_node():
    g = Graph("cyclic")
    x = g.add_input("x", "float32", (2,))
    a = g.make_node("Relu", [x], name="a")
    b = g.make_node("Relu", [a.output], name="b")
    a.set_input(0, b.output)  # a <- b <- a
    assert b.output.uses == [(a, 0)] and x.uses == []
    with pytest.raises(GraphError, match=r"cycle through node '(a|b)'"):
        g.sort()
    assert _names(g) == ["a", "b"]  # a failed sort leaves the order alone
    with pytest.raises(GraphError, match="later node"):
        g.verify()


# -- copy -------------------------------------------------------------------------------

def _conv_graph():
    g = Graph("copyme")
    x = g.add_input("x", "float32", ("batch", 2, 4, 4))
    w = g.add_constant("w", np.arange(36, dtype=np.float32).reshape(2, 2, 3, 3))
    conv = g.make_node("Conv", [x, w, None], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "group": 1},
                       name="conv", output_names=["y"])
    conv.output.dtype, conv.output.shape = "float32", ("batch", 2, 4, 4)
    relu = g.make_node("Relu", [conv.output], name="relu", output_names=["z"])
    g.outputs = [relu.output]
    g.verify()
    return g


def test_copy_is_independent_of_the_original():
    g = _conv_graph()
    text = print_graph(g)
    c = g.copy()
    assert print_graph(c) == text
    c.verify()
    assert not {id(v) for v in c.values()} & {id(v) for v in g.values()}
    assert not {id(n) for n in c} & {id(n) for n in g}
    assert all(n.graph is c for n in c)
    assert all(v.producer.graph is c for n in c for v in n.outputs)

    conv, relu = c.find_node("conv"), c.find_node("relu")
    assert c.inputs[0].uses == [(conv, 0)] and conv.output.uses == [(relu, 0)]
    conv.attrs["pads"][0] = 0  # nested attribute lists are not shared
    conv.attrs["group"] = 2
    conv.output.shape = ("batch", 2, 3, 3)
    conv.output.name = "renamed"
    tanh = c.make_node("Tanh", [c.inputs[0]], name="tanh", after=conv)
    c.replace_all_uses(conv.output, tanh.output)
    c.remove(conv)
    c.outputs = [tanh.output]
    c.remove(relu)
    c.add_constant("extra", np.zeros(3, np.float32))
    c.verify()
    assert print_graph(c) != text
    assert print_graph(g) == text
    g.verify()
    assert g.find_node("conv").attrs == {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "group": 1}


def test_copy_does_not_share_nested_node_meta():
    """The ONNX reader records attribute types in a nested meta dict; a pass on a copy must not edit the original's."""
    g = _conv_graph()
    conv = g.find_node("conv")
    conv.meta["onnx_attr_types"] = {"group": 2, "pads": 7}
    c = g.copy()
    c.find_node("conv").meta["onnx_attr_types"]["group"] = 99
    assert conv.meta["onnx_attr_types"] == {"group": 2, "pads": 7}


def test_copy_shares_constant_arrays_read_only():
    g = _conv_graph()
    c = g.copy()
    original, copied = g.constants["w"], c.constants["w"]
    assert copied is not original
    assert np.shares_memory(copied.const, original.const)
    for array in (copied.const, original.const):
        with pytest.raises(ValueError):
            array[0, 0, 0, 0] = 42.0
    assert original.const[0, 0, 0, 0] == 0.0
    copied.const = np.full((2, 2, 3, 3), 7.0, np.float32)  # a new array, not a write into the shared one
    assert original.const[0, 0, 0, 0] == 0.0 and copied.const[0, 0, 0, 0] == 7.0
    assert not copied.const.flags.writeable


def test_constants_never_alias_a_writeable_user_array():
    g = Graph("c")
    data = np.zeros(3, np.float32)
    v = g.add_constant("w", data)
    data[0] = 5.0
    assert v.const[0] == 0.0 and data.flags.writeable
    with pytest.raises(ValueError):
        v.const[0] = 1.0


# -- complexity ----------------------------------------------------------------------------

def test_insertion_and_removal_are_constant_time():
    """20k inserts before existing nodes and 20k removals: quadratic behaviour would take minutes."""
    n = 20_000
    start = time.perf_counter()
    g = Graph("chain")
    v = g.add_input("x", "float32", (2,))
    chain = []
    for _ in range(n):
        node = g.make_node("Relu", [v])
        chain.append(node)
        v = node.output
    g.outputs = [v]
    inserted = [g.make_node("Identity", [node.input(0)], before=node) for node in chain]
    assert len(g) == 2 * n
    nodes = g.nodes
    assert nodes[0::2] == inserted and nodes[1::2] == chain
    for node in inserted:
        g.remove(node)
    elapsed = time.perf_counter() - start
    assert len(g) == n and g.nodes == chain
    assert all(len(node.output.uses) == 1 for node in chain[:-1])
    g.verify()
    assert elapsed < 10, f"{2 * n} inserts and {n} removals took {elapsed:.1f} s"


def test_graph_errors_are_lowbit_errors():
    assert issubclass(GraphError, lowbit.LowbitError)
