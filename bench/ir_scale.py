"""How lowering and codegen scale with graph size: a transformer at 8, 64, 256 and 1024 layers.

Prints one row per depth: node count, then seconds for torch.export (torch's
own capture, for scale), lowering the ExportedProgram to the IR, printing the
text form, and writing torch / ONNX, each also as microseconds per node. A
linear implementation keeps the per-node figures flat as depth grows. A
block (pre-norm, fused qkv, scaled_dot_product_attention, GELU MLP) lowers to
22 nodes, so 1024 layers give the graph tens of thousands of nodes; most of
that row's time is torch.export's own. An ONNX chain of 1k-100k nodes shows
the same for the ONNX border.

    python bench/ir_scale.py [--depths 8 64 256 1024] [--chain 1000 10000 100000]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import lowbit
import report
from lowbit.frontends.torch_fx import capture


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Transformer(nn.Module):
    def __init__(self, depth: int, dim: int = 32, heads: int = 4):
        super().__init__()
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(self.blocks(x))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure(depth: int) -> dict:
    model = Transformer(depth).eval()
    ep, t_export = timed(lambda: capture(model, (torch.randn(2, 16, 32),)))
    graph, t_lower = timed(lambda: lowbit.lower(ep))
    _, t_text = timed(lambda: str(graph))
    _, t_torch = timed(lambda: lowbit.codegen(graph, "torch"))
    _, t_onnx = timed(lambda: lowbit.codegen(graph, "onnx"))
    return {"depth": depth, "nodes": len(graph), "export": t_export, "lower": t_lower, "text": t_text,
            "torch": t_torch, "onnx": t_onnx}


def onnx_chain(n: int):
    """An ONNX model of n nodes: a chain of Add/Relu/Mul on a small tensor, with a constant per Add/Mul."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, prev = [], [], "x"
    for i in range(n):
        op = ("Add", "Relu", "Mul")[i % 3]
        ins = [prev]
        if op != "Relu":
            inits.append(numpy_helper.from_array(np.full((4,), 0.5, np.float32), f"c{i}"))
            ins.append(f"c{i}")
        nodes.append(helper.make_node(op, ins, [f"v{i}"], name=f"n{i}"))
        prev = f"v{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def measure_onnx(n: int) -> dict:
    model = onnx_chain(n)
    graph, t_lower = timed(lambda: lowbit.lower(model))
    _, t_text = timed(lambda: str(graph))
    _, t_onnx = timed(lambda: lowbit.codegen(graph, "onnx"))
    return {"nodes": len(graph), "lower": t_lower, "text": t_text, "onnx": t_onnx}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 64, 256, 1024])
    parser.add_argument("--chain", type=int, nargs="+", default=[1000, 10000, 100000])
    args = parser.parse_args(argv)
    rows = [measure(d) for d in args.depths]
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)

    table = Table(title="IR scale: transformer encoder, seconds (us/node)")
    for col in ("layers", "nodes", "torch.export", "lower", "text form", "codegen torch", "codegen onnx"):
        table.add_column(col, justify="right")
    for r in rows:
        per = lambda k: f"{r[k]:.2f} ({1e6 * r[k] / r['nodes']:.0f})"  # noqa: E731
        table.add_row(str(r["depth"]), str(r["nodes"]), f"{r['export']:.1f}", per("lower"), per("text"),
                      per("torch"), per("onnx"))
    console.print(table)
    chain = Table(title="IR scale: ONNX chain of N nodes, seconds (us/node)")
    for col in ("nodes", "lower (ONNX -> IR)", "text form", "codegen onnx"):
        chain.add_column(col, justify="right")
    for r in (measure_onnx(n) for n in args.chain):
        per = lambda k: f"{r[k]:.2f} ({1e6 * r[k] / r['nodes']:.0f})"  # noqa: E731
        chain.add_row(str(r["nodes"]), per("lower"), per("text"), per("onnx"))
    console.print(chain)
    command = " ".join(["python bench/ir_scale.py", *(argv or [])])
    console.print(f"Markdown: {report.write('ir_scale', 'IR scale: lowering and codegen time per node', [table, chain], command)}")
    return rows


if __name__ == "__main__":
    main()
