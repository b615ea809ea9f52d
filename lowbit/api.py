"""The public entry points: `lower` a model into the IR, `codegen` the IR back out.

`lower` takes every kind of model lowbit reads and returns one `Graph`;
`codegen` writes a Graph to torch, ONNX or OpenVINO. Later layers (passes,
compile, quantize) stand on these two.
"""

from __future__ import annotations

import functools
import gc
from typing import Any

from .errors import UnsupportedModelError
from .ir.graph import Graph



def _gc_paused(fn):
    """Run `fn` with Python's cyclic garbage collector paused.

    Building a graph allocates many objects that all stay alive, and each
    full collection rescans the whole heap (torch's captured program
    included): at 22k nodes that made lowering 1.7x slower than with the
    collector paused (1.46 s vs 0.85 s, bench/ir_scale.py at 1024 layers), so
    time per node grew with graph size. Nothing here needs cycles collected.
    """

    @functools.wraps(fn)
    def paused(*args, **kwargs):
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()

    return paused


@_gc_paused
def lower(model: Any, example_inputs: Any = None, *, dynamic_dims: Any = None) -> Graph:
    """Lower a model into a lowbit Graph. The model is never modified.

    `model` may be a torch.nn.Module (captured with torch.export from
    `example_inputs`, a tensor or tuple of tensors; dim 0 is made dynamic), a
    torch.export.ExportedProgram, a torch.fx.GraphModule, an onnx.ModelProto
    or the path of an .onnx file. `dynamic_dims`, one collection of axes per
    example input, names further dims a torch module is captured with as
    dynamic (a sentence length): quantize passes the dims its calibration
    items differ in.
    """
    from .frontends import frontend_for

    return frontend_for(model).lower(model, example_inputs, dynamic_dims)


def graph_of(model: Any) -> Graph | None:
    """The IR behind a torch module that compile/quantize returned, with its current weights and ranges;
    None for any other module. Lowering such a module gives this graph, FakeQuantize nodes included."""
    graph = getattr(model, "lowbit_graph", None)
    if graph is None:
        from .ir.torch_fq import FakeQuantize

        if any(isinstance(m, FakeQuantize) for m in getattr(model, "modules", lambda: [])()):
            raise UnsupportedModelError(
                f"this {type(model).__name__} holds lowbit FakeQuantize modules but not the graph they came from "
                "(lowbit_graph): export the module lowbit.compile/quantize returned, or a copy.deepcopy of it")
        return None
    import numpy as np

    graph = graph.copy()
    names = getattr(model, "lowbit_names", {})
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    for value in graph.constants.values():
        attr = names.get(value.name)
        if attr in state:
            array = state[attr].detach().cpu().numpy()
            value.const = array.T.copy() if value.meta.get("torch_transposed") else array.copy()
    for node in graph:
        attr = names.get(node.name)
        if attr is not None and node.op_type == "FakeQuantize":
            fq = model.get_submodule(attr)
            for port, tensor in ((1, fq.low), (2, fq.high), (3, fq.low), (4, fq.high)):
                fresh = graph.add_constant(f"{node.name}_range", tensor.detach().cpu().numpy().astype(np.float32))
                node.set_input(port, fresh)
    graph.remove_unused_constants()
    return graph


@_gc_paused
def codegen(graph: Graph, target: str) -> Any:
    """Write `graph` as a model for `target`: "torch" (fx.GraphModule), "onnx" (ModelProto) or "openvino"."""
    from .backends import backend

    if not isinstance(graph, Graph):
        raise UnsupportedModelError(f"codegen takes a lowbit Graph (from lowbit.lower), not {type(graph).__name__}")
    return backend(target).build(graph)
