"""How fused-pattern matching scales: the `fuse` rules on CNN/MLP graphs of 1k, 10k and 100k nodes, against networkx.

Builds synthetic IR graphs from repeated blocks (Conv+bias+BN+ReLU, Conv-BN
with a residual Add, Conv-Clip, Conv-BN-swish, squeeze-excite gating,
MatMul-Add-Gelu MLPs, scale-shift, inception-style branches with MaxPool and
Concat, and a Conv whose output is shared, which must not fuse), so that the
fused patterns match many times and fail many times. Then, on the same
graphs:

- lowbit: `fusion_rules().apply(graph, reverse=True)`, what the `fuse` pass
  runs (on a copy; the copy is not timed);
- networkx: the same fused patterns written out as the concrete op-type DAGs
  they denote (every Opt/OneOf alternative spelled out), each searched with
  `DiGraphMatcher(graph, pattern, node_match=...).subgraph_isomorphisms_iter()`,
  largest pattern first, keeping the matches that overlap no earlier one and
  whose interior nodes have no users outside the match (NNCF's approach).
  Converting the IR to an `nx.DiGraph` is timed separately and counted
  against neither side.

Each side reports the best of --repeat runs. A linear matcher keeps lowbit's
us/node flat as the graph grows. networkx on the largest size runs only with
--full (about 25 s a run, so over a minute).

    python bench/patterns.py [--sizes 1000 10000 100000] [--full] [--repeat 3]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import time

import networkx as nx
import numpy as np
from networkx.algorithms.isomorphism import DiGraphMatcher

from lowbit.ir.graph import Graph, Value
from lowbit.passes.fuse import fusion_groups, fusion_rules
from lowbit.ir.ops import FUSABLE_ACTIVATIONS as ACTIVATION_OPS
from lowbit.ir.ops import LAYERS as LINEAR_OPS

import report  # bench/report.py: the script's own directory is on sys.path

NX_DEFAULT_LIMIT = 10_000  # networkx runs above this size only with --full


# -- the synthetic graphs -------------------------------------------------------------------------------------


class Builder:
    """Appends blocks to a trunk value; every constant is one of a few shared small arrays."""

    def __init__(self, n: int):
        self.g = Graph(f"blocks_{n}")
        self.h: Value = self.g.add_input("x", "float32", (1, 8, 16, 16))
        scalar = np.ones((1,), np.float32)
        self.w = self.g.add_constant("w", np.ones((8, 8, 1, 1), np.float32))
        self.mw = self.g.add_constant("mw", np.ones((16, 16), np.float32))
        self.c = self.g.add_constant("c", scalar)
        self.lo, self.hi = self.g.add_constant("lo", np.float32(0)), self.g.add_constant("hi", np.float32(6))

    def op(self, op_type: str, *inputs: Value, **attrs) -> Value:
        return self.g.make_node(op_type, list(inputs), attrs or None).outputs[0]

    def conv(self, x: Value) -> Value:
        return self.op("Conv", x, self.w, pads=[0, 0, 0, 0])

    def bn(self, x: Value) -> Value:
        return self.op("BatchNormalization", x, self.c, self.c, self.c, self.c)

    # Each block: what it is, then the groups lowbit should find in it.
    def conv_bias_bn_relu(self) -> None:  # 4 nodes, 1 group
        self.h = self.op("Relu", self.bn(self.op("Add", self.conv(self.h), self.c)))

    def resnet_basic(self) -> None:  # 7 nodes: Conv-BN-Relu, Conv-BN; the Relu after the residual Add fails
        x = self.h
        y = self.op("Relu", self.bn(self.conv(x)))
        y = self.bn(self.conv(y))
        self.h = self.op("Relu", self.op("Add", y, x))

    def conv_relu6(self) -> None:  # 2 nodes, 1 group
        self.h = self.op("Clip", self.conv(self.h), self.lo, self.hi)

    def conv_bn_swish(self) -> None:  # 4 nodes: Conv-BN-Sigmoid-Mul, x * sigmoid(x)
        y = self.bn(self.conv(self.h))
        self.h = self.op("Mul", y, self.op("Sigmoid", y))

    def squeeze_excite(self) -> None:  # 6 nodes: Conv-Relu, Conv-Sigmoid; the gating Mul fails as a swish
        s = self.op("Relu", self.conv(self.op("GlobalAveragePool", self.h)))
        self.h = self.op("Mul", self.h, self.op("Sigmoid", self.conv(s)))

    def mlp(self) -> None:  # 6 nodes: MatMul-Add-Gelu, MatMul-Add; the residual Add fails as a bias
        x = self.h
        y = self.op("Gelu", self.op("Add", self.op("MatMul", x, self.mw), self.c))
        y = self.op("Add", self.op("MatMul", y, self.mw), self.c)
        self.h = self.op("Add", x, y)

    def scale_shift(self) -> None:  # 3 nodes: Mul-Add; the Relu after it fails (no linear op)
        self.h = self.op("Relu", self.op("Add", self.op("Mul", self.h, self.c), self.c))

    def inception(self) -> None:  # 8 nodes: Conv-Relu, Conv-Relu, Conv-BN
        x = self.h
        a = self.op("Relu", self.conv(x))
        b = self.op("Relu", self.conv(self.op("MaxPool", x, kernel_shape=[3, 3], pads=[1, 1, 1, 1])))
        c = self.bn(self.conv(x))
        self.h = self.op("Concat", a, b, c, axis=1)

    def shared_conv(self) -> None:  # 4 nodes, no group: the Conv is also used outside Conv-Relu
        y = self.conv(self.h)
        self.h = self.op("MaxPool", self.op("Add", self.op("Relu", y), y), kernel_shape=[2, 2])

    def gemm_relu(self) -> None:  # 2 nodes, 1 group
        self.h = self.op("Relu", self.op("Gemm", self.h, self.mw, self.c, transB=1))

    STAGE = ("conv_bias_bn_relu", "resnet_basic", "conv_relu6", "conv_bn_swish", "squeeze_excite", "mlp",
             "scale_shift", "inception", "shared_conv", "resnet_basic", "gemm_relu", "conv_bn_swish")


def build_graph(n: int) -> Graph:
    """A graph of about n nodes (a whole number of blocks, so slightly more), one input and one output."""
    b = Builder(n)
    for name in itertools.cycle(Builder.STAGE):
        if len(b.g) >= n:
            break
        getattr(b, name)()
    b.g.outputs.append(b.h)
    return b.g


# -- networkx: the fused patterns as explicit op-type DAGs ----------------------------------------------------

def _chain(*ops: frozenset[str] | str) -> nx.DiGraph:
    p = nx.DiGraph()
    for i, ops_i in enumerate(ops):
        p.add_node(i, ops=frozenset([ops_i]) if isinstance(ops_i, str) else ops_i)
        if i:
            p.add_edge(i - 1, i)
    return p


def _swish(*ops: frozenset[str] | str) -> nx.DiGraph:
    """`ops` then x * sigmoid(x) on the last one: a DAG, not a chain."""
    p = _chain(*ops, "Sigmoid", "Mul")
    p.add_edge(len(ops) - 1, len(ops) + 1)
    return p


def nx_patterns() -> list[tuple[str, nx.DiGraph]]:
    """Every concrete form of FUSED_PATTERNS, largest first (stable: library order within a size).

    linear_bn_act = linear [-> Add] [-> BatchNormalization] -> (activation | x * sigmoid(x)),
    linear_bias_bn = linear [-> Add] [-> BatchNormalization] with at least two nodes,
    scale_shift = Mul -> Add. An op set is one pattern node whose node_match accepts any op in it.
    """
    L, A = LINEAR_OPS, ACTIVATION_OPS
    stems = [(L, "Add", "BatchNormalization"), (L, "BatchNormalization"), (L, "Add"), (L,)]
    out = [("linear_bn_act", _chain(*s, A)) for s in stems]
    out += [("linear_bn_act", _swish(*s)) for s in stems]
    out += [("linear_bias_bn", _chain(*s)) for s in stems if len(s) > 1]
    out += [("scale_shift", _chain("Mul", "Add"))]
    return sorted(out, key=lambda e: -len(e[1]))


def to_networkx(graph: Graph) -> nx.DiGraph:
    """One nx node per IR node (attribute `op`), an edge per producer -> consumer; constants are not nodes."""
    g = nx.DiGraph()
    for node in graph:
        g.add_node(node.name, op=node.op_type)
        for v in node.inputs:
            if v is not None and v.producer is not None:
                g.add_edge(v.producer.name, node.name)
    return g


def _node_match(graph_attrs: dict, pattern_attrs: dict) -> bool:
    return graph_attrs["op"] in pattern_attrs["ops"]


def nx_fuse(g: nx.DiGraph, patterns: list[tuple[str, nx.DiGraph]]) -> list[tuple[str, set]]:
    """Greedy, largest pattern first: keep a match when no node is claimed yet and no interior node is used outside.

    Differences from lowbit that can change the group count: networkx sees op types only, so a residual
    `Conv -> Add(x, .)` or `Mul(x, gate) -> Add(x, .)` passes as a bias Add / scale-shift, where lowbit's
    patterns require a constant operand; and overlaps are resolved by pattern size over the whole graph
    rather than by lowbit's sweep from the outputs back (same outcome on these blocks).
    """
    claimed: set = set()
    groups: list[tuple[str, set]] = []
    for name, pattern in patterns:
        sinks = {n for n in pattern if pattern.out_degree(n) == 0}
        for mapping in DiGraphMatcher(g, pattern, node_match=_node_match).subgraph_isomorphisms_iter():
            nodes = set(mapping)
            if not claimed.isdisjoint(nodes):
                continue
            # the interior-use rule: a node other than the pattern's sink feeds only nodes of the match
            if any(not nodes.issuperset(g.successors(n)) for n, p in mapping.items() if p not in sinks):
                continue
            claimed |= nodes
            groups.append((name, nodes))
    return groups


# -- measuring ------------------------------------------------------------------------------------------------

def timed(fn):
    gc.collect()  # start each measurement from a clean heap, so one side does not pay for the other's garbage
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def best_of(repeat: int, setup, fn):
    """The fastest of `repeat` runs of fn(setup()) (setup not timed): the machine may be shared."""
    runs = [timed(lambda arg=setup(): fn(arg)) for _ in range(repeat)]
    return min(runs, key=lambda r: r[1])


def measure(n: int, run_nx: bool, repeat: int) -> dict:
    graph = build_graph(n)

    def lowbit_fuse(g: Graph) -> Graph:
        fusion_rules().apply(g, reverse=True)
        return g

    g, t_lowbit = best_of(repeat, graph.copy, lowbit_fuse)
    row = {"size": n, "nodes": len(graph), "lowbit": t_lowbit, "groups": len(fusion_groups(g)),
           "nx_convert": None, "networkx": None, "nx_groups": None}
    if run_nx:
        nxg, row["nx_convert"] = timed(lambda: to_networkx(graph))
        patterns = nx_patterns()
        groups, row["networkx"] = best_of(repeat, lambda: nxg, lambda h: nx_fuse(h, patterns))
        row["nx_groups"] = len(groups)
    return row


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--full", action="store_true",
                        help=f"also run networkx above {NX_DEFAULT_LIMIT} nodes (minutes at 100k)")
    parser.add_argument("--repeat", type=int, default=3, help="report the best of this many runs, both sides")
    args = parser.parse_args(argv)
    rows = [measure(n, args.full or n <= NX_DEFAULT_LIMIT, args.repeat) for n in args.sizes]

    from rich.console import Console
    from rich.table import Table

    table = Table(title="Fused patterns: lowbit fuse rules vs networkx DiGraphMatcher (same graphs, same patterns)")
    for col in ("nodes", "lowbit s", "lowbit us/node", "groups", "networkx s", "networkx us/node", "nx groups",
                "to nx s", "speed-up"):
        table.add_column(col, justify="right")
    for r in rows:
        us = lambda t: f"{1e6 * t / r['nodes']:.1f}"  # noqa: E731
        if r["networkx"] is None:
            nx_cells = ["skipped (use --full)", "", "", "", ""]
        else:
            nx_cells = [f"{r['networkx']:.2f}", us(r["networkx"]), str(r["nx_groups"]), f"{r['nx_convert']:.2f}",
                        f"{r['networkx'] / r['lowbit']:.1f}x"]
        table.add_row(str(r["nodes"]), f"{r['lowbit']:.3f}", us(r["lowbit"]), str(r["groups"]), *nx_cells)
    console = Console(width=140)
    console.print(table)
    command = " ".join(["python bench/patterns.py", *(argv or [])])
    console.print(f"Markdown: {report.write('patterns', 'Fused-pattern matching: lowbit vs networkx', [table], command)}")
    return rows


if __name__ == "__main__":
    main()
